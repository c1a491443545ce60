"""LabelMe JSON folder -> COCO instances (`mrcnn data convert-labelme`).

LabelMe writes one JSON file per image (next to it, or pointing at it through imagePath) with a
list of shapes: polygon, rectangle, circle, mask (a base64 PNG of its box); point / line shapes
have no area. Shapes with the same label and group_id form one instance.

EXIF orientation: LabelMe shows (and annotates) a JPEG rotated as its EXIF Orientation tag says
(PIL's ImageOps.exif_transpose), and records that view's size as imageWidth x imageHeight. The
toolkit reads pixels as stored (images.load_image does not rotate, as COCO's readers do not), so
the converter maps every point and mask of a rotated image back into the stored frame with the
inverse of that transpose, and the COCO entry records the stored width and height. Where the
declared size is the stored one and the rotation swaps the sides, the file came from a tool
that ignored the tag, and its points are taken as they are.

Every number is checked before it is rasterized: points must be finite pairs within
annotations.coordinate_limit of the image, circles' radii too, group ids integers or null.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os

import numpy as np
from PIL import Image

from ..errors import DataError
from ..fileio import check_output_path
from .annotations import coordinate_limit, numeric_array, polygon_problem
from .contours import polygons_to_mask
from .convert import category_entries, check_tolerance, mask_annotation, write_coco_json
from .images import decode_mask, exif_orientation, open_image
from .progress import progress_bar

# LabelMe's labels.txt convention: these names are not classes.
RESERVED_LABELS = ("__ignore__", "_background_")
# PIL transpose that turns the stored image into the displayed one, per EXIF orientation.
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}
_INVERSE = {**_TRANSPOSE, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
# Vertices of a circle: one every ~2 px of rim, at most this many (0.02 px from a true circle).
_MAX_CIRCLE_VERTICES = 4096


def displayed_size(width: int, height: int, orientation: int) -> tuple[int, int]:
    """(width, height) of an image of stored size width x height as shown for `orientation`."""
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def displayed_to_stored(points: np.ndarray, orientation: int, width: int,
                        height: int) -> np.ndarray:
    """Points [K, 2] (x, y) in the displayed (EXIF-transposed) frame -> the stored frame.

    Continuous pixel coordinates (pixel (x, y) covers [x, x+1) x [y, y+1)); width x height is
    the stored size. The inverse of the transpose of _TRANSPOSE[orientation].
    """
    u, v = points[:, 0], points[:, 1]
    x, y = {1: (u, v), 2: (width - u, v), 3: (width - u, height - v), 4: (u, height - v),
            5: (v, u), 6: (v, height - u), 7: (width - v, height - u),
            8: (width - v, u)}[orientation]
    return np.stack([x, y], axis=1)


def _points(shape: dict, limit: float, where: str) -> np.ndarray:
    """A shape's points as float64 [K, 2], checked (see module doc)."""
    raw = shape.get("points")
    raw = [] if raw is None else raw
    pairs = isinstance(raw, list) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in raw)
    flat = numeric_array([v for p in raw for v in p]) if pairs else None
    if flat is None:
        raise DataError(f"{where}: points must be a list of [x, y] pairs of numbers, got "
                        f"{str(raw)[:80]}")
    if not np.isfinite(flat).all():
        raise DataError(f"{where}: points hold a NaN or infinite number")
    if flat.size and float(np.abs(flat).max()) > limit:
        raise DataError(f"{where}: a point coordinate {float(flat[np.argmax(np.abs(flat))]):g} "
                        f"lies outside +-{limit:g} px (4 x the image's larger side + margin)")
    return flat.reshape(-1, 2)


def _shape_polygon(kind: str, points: np.ndarray, limit: float, where: str) -> list | None:
    """The polygon [x0, y0, ...] of a polygon / rectangle / circle shape (stored frame), or None
    for shapes without area."""
    if kind == "polygon":
        return points.reshape(-1).tolist() if len(points) >= 3 else None
    if kind == "rectangle":
        if len(points) != 2:
            raise DataError(f"{where}: a rectangle needs 2 points, got {len(points)}")
        (x1, y1), (x2, y2) = np.sort(points, axis=0)
        return [x1, y1, x2, y1, x2, y2, x1, y2]
    if kind == "circle":
        if len(points) != 2:
            raise DataError(f"{where}: a circle needs 2 points (centre, rim), got {len(points)}")
        (cx, cy), rim = points
        radius = float(np.hypot(*(rim - points[0])))
        if radius > limit:
            raise DataError(f"{where}: a circle of radius {radius:g} px, more than {limit:g}")
        n = min(_MAX_CIRCLE_VERTICES, max(16, math.ceil(2 * math.pi * radius / 2)))
        angles = 2 * math.pi * np.arange(n) / n
        return np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], 1) \
            .reshape(-1).tolist()
    return None  # point, line, linestrip: no area


def _mask_shape(shape: dict, points: np.ndarray, record: dict, where: str) -> np.ndarray:
    """A "mask" shape (base64 PNG of the box starting at points[0], displayed frame) as a
    stored-frame bool mask of the whole image."""
    try:
        data = base64.b64decode(shape["mask"], validate=False)
    except (KeyError, TypeError, ValueError, binascii.Error) as e:
        raise DataError(f"{where}: a mask shape needs 'mask' = base64 PNG ({e})") from e
    crop = decode_mask(data, f"{where}: its mask PNG") > 0
    if len(points) < 1:
        raise DataError(f"{where}: a mask shape needs its box corner in 'points'")
    x0, y0 = (float(np.floor(v)) for v in points[0])
    corners = np.array([[x0, y0], [x0 + crop.shape[1], y0 + crop.shape[0]]])
    orientation, width, height = record["orientation"], record["width"], record["height"]
    if orientation != 1:
        corners = displayed_to_stored(corners, orientation, width, height)
        crop = np.asarray(Image.fromarray(crop).transpose(_INVERSE[orientation]))
    left, top = (int(v) for v in corners.min(axis=0))
    full = np.zeros((height, width), dtype=bool)
    xa, ya = max(0, left), max(0, top)
    xb, yb = min(width, left + crop.shape[1]), min(height, top + crop.shape[0])
    if xb > xa and yb > ya:
        full[ya:yb, xa:xb] = crop[ya - top:yb - top, xa - left:xb - left]
    return full


def _read_record(path: str, root: str, doc: dict) -> dict:
    """The image, its stored size, the frame of the points and the shapes of one LabelMe file."""
    image_ref, shapes = doc["imagePath"], doc["shapes"]
    if not isinstance(image_ref, str):
        raise DataError(f"{path}: imagePath {image_ref!r} is not a string")
    image_path = os.path.normpath(os.path.join(os.path.dirname(path), image_ref))
    if not (image_path == root or image_path.startswith(root + os.sep)):
        raise DataError(f"{path}: imagePath {image_ref!r} lies outside {root}; the "
                        f"COCO file names are relative to that folder")
    with open_image(image_path) as im:
        (width, height), orientation = im.size, exif_orientation(im)
    shown = displayed_size(width, height, orientation)
    declared = (doc.get("imageWidth"), doc.get("imageHeight"))
    if None in declared or tuple(declared) == shown:
        frame = orientation
    elif tuple(declared) == (width, height):
        frame = 1  # drawn by a tool that ignored the EXIF tag: points are in the stored frame
    else:
        rotated = (f" as displayed (EXIF orientation {orientation}; {width}x{height} as stored)"
                   if orientation != 1 else "")
        raise DataError(f"{path}: imageWidth x imageHeight = {declared[0]}x{declared[1]} but "
                        f"{image_path} is {shown[0]}x{shown[1]}{rotated}")
    for k, shape in enumerate(shapes):
        if not isinstance(shape, dict):
            raise DataError(f"{path}: shapes[{k}] is not an object")
        if not isinstance(shape.get("label"), str):
            raise DataError(f"{path}: shapes[{k}] has label {shape.get('label')!r}; expected a "
                            f"string")
        group = shape.get("group_id")
        if group is not None and (not isinstance(group, (int, str)) or isinstance(group, bool)):
            raise DataError(f"{path}: shapes[{k}] has group_id {group!r}; expected an integer "
                            f"or null")
    return {"path": path, "image": image_path, "width": width, "height": height,
            "orientation": frame, "shapes": shapes}


def _scan(root: str, out_json: str, skipped: dict) -> list[dict]:
    records = []
    for path in sorted(os.path.join(d, n) for d, _, files in os.walk(root) for n in files
                       if n.lower().endswith(".json")):
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise DataError(f"cannot read LabelMe file {path}: {e}") from e
        is_labelme = (isinstance(doc, dict) and isinstance(doc.get("shapes"), list)
                      and doc.get("imagePath"))
        if os.path.realpath(path) == os.path.realpath(out_json) and not is_labelme:
            continue  # the output of an earlier run
        if not is_labelme:
            skipped["not_labelme_files"] += 1
            continue
        records.append(_read_record(path, root, doc))
    return records


def convert_labelme(labelme_dir: str | os.PathLike, out_json: str | os.PathLike, *,
                    labels: list[str] | None = None, polygon_tolerance: float = 0.0,
                    progress: bool = False) -> dict:
    """Convert a folder of LabelMe JSON files (searched recursively) to COCO instances.

    Polygon shapes keep LabelMe's vertices as COCO polygon coordinates (no re-tracing); other
    region shapes (rectangle, circle, mask) and groups mixing kinds are rasterized and encoded
    from the mask. labels: class names in id order (1..K); unlisted labels raise DataError.
    Default: every label found, sorted. Shapes labelled __ignore__ / _background_ are skipped.
    file_name entries are image paths relative to labelme_dir (imagePath is resolved relative
    to each JSON file); coordinates are those of the stored pixels (module doc: EXIF). out_json
    may not be one of the files read. Returns the dict of convert.py's converters.
    """
    root = os.path.abspath(os.fspath(labelme_dir))
    out_json = os.fspath(out_json)
    polygon_tolerance = check_tolerance(polygon_tolerance)
    if not os.path.isdir(root):
        raise DataError(f"LabelMe folder not found: {root}")
    skipped = {"not_labelme_files": 0, "non_region_shapes": 0, "ignored_shapes": 0}
    records = _scan(root, out_json, skipped)
    if not records:
        raise DataError(f"no LabelMe JSON files (with 'shapes' and 'imagePath') under {root}")
    check_output_path(out_json, [r["path"] for r in records] + [r["image"] for r in records],
                      option="output JSON")
    found = sorted({s["label"] for r in records for s in r["shapes"]
                    if s["label"] not in RESERVED_LABELS})
    names = [n for n in labels if n not in RESERVED_LABELS] if labels else found
    category_of = {name: i for i, name in enumerate(names, start=1)}
    unknown = sorted(set(found) - set(category_of))
    if unknown:
        raise DataError(f"labels {unknown} are not in the given label list {names}")
    images, annotations = [], []
    for image_id, record in enumerate(progress_bar(records, "convert-labelme", unit="file",
                                                   enabled=progress), start=1):
        images.append({"id": image_id, "width": record["width"], "height": record["height"],
                       "file_name": os.path.relpath(record["image"], root).replace(os.sep, "/")})
        for label, members in _groups(record, skipped).items():
            ann = _instance(members, record, polygon_tolerance, len(annotations) + 1, image_id,
                            category_of[label[0]], skipped)
            if ann is not None:
                annotations.append(ann)
    data = {"info": {"description": f"converted from LabelMe files in {root}"}, "images": images,
            "annotations": annotations, "categories": category_entries(names)}
    return {"json": write_coco_json(data, out_json), "images": root, "num_images": len(images),
            "num_annotations": len(annotations), "categories": names, "skipped": skipped}


def _groups(record: dict, skipped: dict) -> dict:
    """{(label, group key): [(shape index, shape)]} of a record's shapes (reserved labels out)."""
    groups: dict = {}
    for k, shape in enumerate(record["shapes"]):
        label = shape["label"]
        if label in RESERVED_LABELS:
            skipped["ignored_shapes"] += 1
            continue
        group = shape.get("group_id")
        groups.setdefault((label, ("shape", k) if group is None else group), []).append((k, shape))
    return groups


def _instance(members, record, tolerance, ann_id, image_id, category_id, skipped) -> dict | None:
    """The COCO annotation of one LabelMe instance (its shapes), in the stored frame."""
    width, height, orientation = record["width"], record["height"], record["orientation"]
    limit = coordinate_limit(height, width)
    parts = []  # (shape, kind, points (stored frame; a mask's: displayed), where)
    for k, shape in members:
        where = f"{record['path']}: shapes[{k}]"
        points, kind = _points(shape, limit, where), shape.get("shape_type") or "polygon"
        if orientation != 1 and len(points) and kind != "mask":  # masks map themselves
            points = displayed_to_stored(points, orientation, width, height)
        parts.append((shape, kind, points, where))
    if all(kind == "polygon" and len(points) >= 3 for _, kind, points, _ in parts):
        return _polygon_instance(parts, width, height, ann_id, image_id, category_id, skipped)
    mask = np.zeros((height, width), dtype=bool)
    for shape, kind, points, where in parts:
        if kind == "mask":
            mask |= _mask_shape(shape, points, record, where)
            continue
        polygon = _shape_polygon(kind, points, limit, where)
        if polygon is None:
            skipped["non_region_shapes"] += 1
            continue
        mask |= polygons_to_mask([polygon], height, width).astype(bool)
    return mask_annotation(mask, ann_id, image_id, category_id, tolerance)


def _polygon_instance(parts, width, height, ann_id, image_id, category_id, skipped) -> dict | None:
    polygons = [points.reshape(-1).tolist() for _, _, points, _ in parts]
    for (_, _, points, where), polygon in zip(parts, polygons):
        problem = polygon_problem(points.reshape(-1), height, width)
        if problem:
            raise DataError(f"{where}: the polygon has {problem}")
    mask = polygons_to_mask(polygons, height, width).astype(bool)
    area = int(np.count_nonzero(mask))
    if area == 0:
        skipped["non_region_shapes"] += len(parts)
        return None
    pts = np.concatenate([points for _, _, points, _ in parts])
    x1, y1 = np.clip(pts.min(0), 0, [width, height])
    x2, y2 = np.clip(pts.max(0), 0, [width, height])
    return {"id": ann_id, "image_id": image_id, "category_id": category_id,
            "segmentation": polygons,
            "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
            "area": area, "iscrowd": 0}
