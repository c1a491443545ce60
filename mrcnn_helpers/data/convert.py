"""Converters from common annotation layouts to COCO instances JSON.

Every converter writes one COCO instances file (images, annotations with polygon or RLE
segmentations, bbox [x, y, w, h] and area from the mask, categories with ids 1..K) and returns a
dict with "json" (the file), "images" (the folder its file_name entries are relative to: put it
in the spec's train_image_dir / val_image_dir), counts, and "skipped" counts of what could not
be used. Masks become polygons traced along pixel edges (contours.py), which pycocotools
rasterizes back to exactly the same pixels; regions with holes become RLE. A polygon tolerance
> 0 simplifies the polygons (smaller files, IoU >= 0.97 with the mask).

Layouts:
- LabelMe: a folder of LabelMe JSON files (searched recursively), one per image, next to or
  pointing at their images (imagePath). Shapes: polygon, rectangle, circle, mask; shapes with
  the same label and group_id form one instance; point / line shapes are skipped and counted.
- VOC: VOC_ROOT/JPEGImages/<id>.jpg, VOC_ROOT/SegmentationObject/<id>.png (palette indices:
  1..254 = instance, 0 = background, 255 = void) and VOC_ROOT/SegmentationClass/<id>.png (class
  indices). An instance takes the class most of its pixels have; void pixels belong to no one.
- Per-instance mask folder: see convert_mask_folder.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from .contours import mask_to_segmentation, polygons_to_mask
from .images import IMAGE_EXTENSIONS

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
               "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")
# LabelMe's labels.txt convention: these names are not classes.
_LABELME_RESERVED = ("__ignore__", "_background_")


def mask_annotation(mask: np.ndarray, ann_id: int, image_id: int, category_id: int,
                    tolerance: float = 0.0) -> dict | None:
    """COCO annotation of a binary mask [H, W] (None when the mask is empty).

    bbox is the tight integer box of the mask pixels, area their count; the segmentation is
    exact polygons (tolerance 0) or simplified ones (tolerance in px), RLE for regions with holes.
    """
    mask = np.asarray(mask, dtype=bool)
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    segmentation, _ = mask_to_segmentation(mask, epsilon=float(tolerance))
    x0, y0 = int(xs.min()), int(ys.min())
    return {"id": int(ann_id), "image_id": int(image_id), "category_id": int(category_id),
            "segmentation": segmentation,
            "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0],
            "area": int(xs.size), "iscrowd": 0}


def write_coco_json(data: dict, path: str | os.PathLike) -> str:
    """Write a COCO dict to `path` atomically (temporary file + rename); returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, separators=(",", ":"))
    os.replace(tmp, path)
    return path


def category_entries(names, supercategory: str = "") -> list[dict]:
    """COCO categories with ids 1..K in the order of `names`."""
    return [{"id": i, "name": str(n), "supercategory": supercategory}
            for i, n in enumerate(names, start=1)]


def read_label_list(path: str | os.PathLike) -> list[str]:
    """Class names from a text file, one per line (LabelMe's __ignore__ / _background_ skipped)."""
    try:
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise DataError(f"cannot read labels file {path}: {e.strerror or e}") from e
    return [n for n in names if n not in _LABELME_RESERVED]


def _image_size(path: str) -> tuple[int, int]:
    """(width, height) from the image header."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError as e:
        raise DataError(f"image file not found: {path}") from e
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"cannot read image {path}: {e}") from e


def _read_index_png(path: str, what: str) -> np.ndarray:
    """Palette / grayscale PNG as its raw index values [H, W] (not converted to colours)."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "I", "I;16", "1"):
                raise DataError(f"{path}: {what} must be a palette or grayscale PNG of indices, "
                                f"got mode {im.mode}")
            return np.asarray(im).astype(np.int64)
    except FileNotFoundError as e:
        raise DataError(f"{what} not found: {path}") from e
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"cannot read {what} {path}: {e}") from e


def _find_image(folder: str, stem: str) -> str | None:
    for ext in IMAGE_EXTENSIONS:
        for candidate in (stem + ext, stem + ext.upper()):
            if os.path.isfile(os.path.join(folder, candidate)):
                return candidate
    return None


# -------------------------------------------------------------------------------------- LabelMe

def _labelme_files(folder: str, exclude: str) -> list[str]:
    out = []
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if name.lower().endswith(".json") and os.path.abspath(path) != exclude:
                out.append(path)
    return sorted(out)


def _labelme_shape_mask(shape: dict, height: int, width: int, where: str) -> np.ndarray | None:
    """Binary mask [H, W] of one LabelMe shape; None for shapes that are not regions."""
    kind = shape.get("shape_type") or "polygon"
    try:
        points = np.asarray(shape.get("points") or [], dtype=np.float64).reshape(-1, 2)
    except ValueError as e:
        raise DataError(f"{where}: points must be a list of [x, y] pairs") from e
    if kind == "polygon":
        if len(points) < 3:
            return None
        polygon = points.reshape(-1).tolist()
    elif kind == "rectangle":
        if len(points) != 2:
            raise DataError(f"{where}: a rectangle needs 2 points, got {len(points)}")
        (x1, y1), (x2, y2) = np.sort(points, axis=0)
        polygon = [x1, y1, x2, y1, x2, y2, x1, y2]
    elif kind == "circle":
        if len(points) != 2:
            raise DataError(f"{where}: a circle needs 2 points (centre, rim), got {len(points)}")
        (cx, cy), rim = points
        radius = float(np.hypot(*(rim - points[0])))
        n = max(16, math.ceil(2 * math.pi * radius / 2))  # a vertex every ~2 px of rim
        angles = 2 * math.pi * np.arange(n) / n
        polygon = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], 1)
        polygon = polygon.reshape(-1).tolist()
    elif kind == "mask":
        return _labelme_mask_shape(shape, points, height, width, where)
    else:  # point, line, linestrip: no area
        return None
    return polygons_to_mask([polygon], height, width).astype(bool)


def _labelme_mask_shape(shape, points, height, width, where) -> np.ndarray:
    """A LabelMe "mask" shape: a PNG of the box points[0]..points[1] (inclusive), base64."""
    try:
        with Image.open(io.BytesIO(base64.b64decode(shape["mask"]))) as im:
            crop = np.asarray(im.convert("L")) > 0
    except (KeyError, TypeError, ValueError, OSError) as e:
        raise DataError(f"{where}: a mask shape needs 'mask' = base64 PNG ({e})") from e
    if len(points) < 1:
        raise DataError(f"{where}: a mask shape needs its box corner in 'points'")
    x0, y0 = int(points[0][0]), int(points[0][1])
    full = np.zeros((height, width), dtype=bool)
    h = max(0, min(height - y0, crop.shape[0]))
    w = max(0, min(width - x0, crop.shape[1]))
    full[y0:y0 + h, x0:x0 + w] = crop[:h, :w]
    return full


def _is_polygon_shape(shape: dict) -> bool:
    return (shape.get("shape_type") or "polygon") == "polygon" and len(shape.get("points") or []) >= 3


def convert_labelme(labelme_dir: str | os.PathLike, out_json: str | os.PathLike, *,
                    labels: list[str] | None = None, polygon_tolerance: float = 0.0) -> dict:
    """Convert a folder of LabelMe JSON files to COCO instances.

    Polygon shapes keep LabelMe's vertices as COCO polygon coordinates (no re-tracing); other
    region shapes (rectangle, circle, mask) and groups mixing kinds are rasterized and encoded
    from the mask. labels: class names in id order (1..K); unlisted labels raise DataError.
    Default: every label found, sorted. Shapes labelled __ignore__ / _background_ are skipped.
    file_name entries are image paths relative to labelme_dir (imagePath is resolved relative
    to each JSON file); image sizes come from the files and must match imageHeight/imageWidth.
    """
    root = os.path.abspath(os.fspath(labelme_dir))
    if not os.path.isdir(root):
        raise DataError(f"LabelMe folder not found: {root}")
    skipped = {"not_labelme_files": 0, "non_region_shapes": 0, "ignored_shapes": 0}
    records = []
    for path in _labelme_files(root, os.path.abspath(os.fspath(out_json))):
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"cannot read LabelMe file {path}: {e}") from e
        if not (isinstance(doc, dict) and isinstance(doc.get("shapes"), list) and doc.get("imagePath")):
            skipped["not_labelme_files"] += 1
            continue
        image_path = os.path.normpath(os.path.join(os.path.dirname(path), doc["imagePath"]))
        if not (image_path == root or image_path.startswith(root + os.sep)):
            raise DataError(f"{path}: imagePath {doc['imagePath']!r} lies outside {root}; the "
                            f"COCO file names are relative to that folder")
        width, height = _image_size(image_path)
        declared = (doc.get("imageWidth"), doc.get("imageHeight"))
        if None not in declared and tuple(declared) != (width, height):
            raise DataError(f"{path}: imageWidth x imageHeight = {declared[0]}x{declared[1]} but "
                            f"{image_path} is {width}x{height}")
        records.append((path, image_path, width, height, doc["shapes"]))
    if not records:
        raise DataError(f"no LabelMe JSON files (with 'shapes' and 'imagePath') under {root}")
    found = sorted({str(s.get("label")) for *_, shapes in records for s in shapes
                    if str(s.get("label")) not in _LABELME_RESERVED})
    names = [n for n in labels if n not in _LABELME_RESERVED] if labels else found
    category_of = {name: i for i, name in enumerate(names, start=1)}
    unknown = sorted(set(found) - set(category_of))
    if unknown:
        raise DataError(f"labels {unknown} are not in the given label list {names}")

    images, annotations = [], []
    for image_id, (path, image_path, width, height, shapes) in enumerate(records, start=1):
        images.append({"id": image_id, "file_name": os.path.relpath(image_path, root).replace(os.sep, "/"),
                       "width": width, "height": height})
        groups: dict = {}
        for k, shape in enumerate(shapes):
            label = str(shape.get("label"))
            if label in _LABELME_RESERVED:
                skipped["ignored_shapes"] += 1
                continue
            key = (label, shape["group_id"]) if shape.get("group_id") is not None else (label, ("shape", k))
            groups.setdefault(key, []).append((k, shape))
        for (label, _), members in groups.items():
            ann = _labelme_instance(members, path, width, height, polygon_tolerance,
                                    len(annotations) + 1, image_id, category_of[label], skipped)
            if ann is not None:
                annotations.append(ann)
    data = {"info": {"description": f"converted from LabelMe files in {root}"}, "images": images,
            "annotations": annotations, "categories": category_entries(names)}
    return {"json": write_coco_json(data, out_json), "images": root, "num_images": len(images),
            "num_annotations": len(annotations), "categories": names, "skipped": skipped}


def _labelme_instance(members, path, width, height, tolerance, ann_id, image_id, category_id,
                      skipped) -> dict | None:
    if all(_is_polygon_shape(s) for _, s in members):
        polygons = [np.asarray(s["points"], dtype=np.float64).reshape(-1).tolist() for _, s in members]
        mask = polygons_to_mask(polygons, height, width).astype(bool)
        area = int(np.count_nonzero(mask))
        if area == 0:
            skipped["non_region_shapes"] += len(members)
            return None
        pts = np.concatenate([np.asarray(p).reshape(-1, 2) for p in polygons])
        x1, y1 = np.clip(pts.min(0), 0, [width, height])
        x2, y2 = np.clip(pts.max(0), 0, [width, height])
        return {"id": ann_id, "image_id": image_id, "category_id": category_id,
                "segmentation": polygons, "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                "area": area, "iscrowd": 0}
    mask = np.zeros((height, width), dtype=bool)
    for k, shape in members:
        part = _labelme_shape_mask(shape, height, width, f"{path}: shapes[{k}]")
        if part is None:
            skipped["non_region_shapes"] += 1
            continue
        mask |= part
    return mask_annotation(mask, ann_id, image_id, category_id, tolerance)


# ------------------------------------------------------------------------------------------ VOC

def convert_voc(voc_root: str | os.PathLike, out_json: str | os.PathLike, *,
                split: str | None = None, class_names=VOC_CLASSES,
                polygon_tolerance: float = 0.0) -> dict:
    """Convert VOC-style instance PNGs (SegmentationObject + SegmentationClass) to COCO.

    split: name of VOC_ROOT/ImageSets/Segmentation/<split>.txt listing the image ids; None = every
    PNG in SegmentationObject. class_names: index -> name, index 0 = background (VOC's 20
    classes by default); category ids are the class indices, so every split gets the same ids.
    Instances whose pixels are all background in SegmentationClass are skipped and counted.
    """
    root = os.fspath(voc_root)
    objects_dir = os.path.join(root, "SegmentationObject")
    classes_dir = os.path.join(root, "SegmentationClass")
    images_dir = os.path.join(root, "JPEGImages")
    if not os.path.isdir(objects_dir):
        raise DataError(f"{root}: no SegmentationObject folder (expected VOC layout: JPEGImages/, "
                        f"SegmentationObject/, SegmentationClass/)")
    if split:
        list_file = os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")
        try:
            with open(list_file, encoding="utf-8") as f:
                stems = [line.split()[0] for line in f if line.strip()]
        except OSError as e:
            raise DataError(f"cannot read split list {list_file}: {e.strerror or e}") from e
    else:
        stems = sorted(os.path.splitext(n)[0] for n in os.listdir(objects_dir)
                       if n.lower().endswith(".png"))
    skipped = {"background_instances": 0}
    images, annotations = [], []
    for image_id, stem in enumerate(stems, start=1):
        file_name = _find_image(images_dir, stem)
        if file_name is None:
            raise DataError(f"no image for {stem} in {images_dir} (tried {list(IMAGE_EXTENSIONS)})")
        width, height = _image_size(os.path.join(images_dir, file_name))
        objects = _read_index_png(os.path.join(objects_dir, stem + ".png"), "SegmentationObject PNG")
        classes = _read_index_png(os.path.join(classes_dir, stem + ".png"), "SegmentationClass PNG")
        for array, name in ((objects, "SegmentationObject"), (classes, "SegmentationClass")):
            if array.shape != (height, width):
                raise DataError(f"{name}/{stem}.png is {array.shape[0]}x{array.shape[1]} but the "
                                f"image {file_name} is {height}x{width} (h x w)")
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for value in np.unique(objects):
            if value in (0, 255):
                continue
            mask = objects == value
            votes = np.bincount(classes[mask & (classes != 255)], minlength=len(class_names))
            votes[0] = 0
            if not votes.any():
                skipped["background_instances"] += 1
                continue
            label = int(np.argmax(votes))
            if label >= len(class_names):
                raise DataError(f"SegmentationClass/{stem}.png has class index {label}, beyond the "
                                f"{len(class_names)} class names")
            annotations.append(mask_annotation(mask, len(annotations) + 1, image_id, label,
                                               polygon_tolerance))
    categories = [{"id": i, "name": str(n), "supercategory": ""}
                  for i, n in enumerate(class_names) if i > 0]
    data = {"info": {"description": f"converted from VOC instance masks in {root}"},
            "images": images, "annotations": annotations, "categories": categories}
    return {"json": write_coco_json(data, out_json), "images": images_dir,
            "num_images": len(images), "num_annotations": len(annotations),
            "categories": list(class_names[1:]), "skipped": skipped}


# ------------------------------------------------------------------------- per-instance masks

_INDEX_SUFFIX = re.compile(r"^(.*?)(?:[_-]\d+)?$")


def category_of_mask_file(file_name: str) -> str:
    """Category name of a mask file: its stem without a trailing _N / -N instance number."""
    stem = os.path.splitext(os.path.basename(file_name))[0]
    return _INDEX_SUFFIX.match(stem).group(1) or stem


def convert_mask_folder(root: str | os.PathLike, out_json: str | os.PathLike, *,
                        categories: list[str] | None = None, images_subdir: str = "images",
                        masks_subdir: str = "masks", polygon_tolerance: float = 0.0) -> dict:
    """Convert a folder of per-instance binary mask PNGs to COCO instances.

    Layout:
        ROOT/images/<name>.<jpg|png|...>          one image per sample
        ROOT/masks/<name>/<category>_<k>.png     one PNG per instance, same size as the image;
                                                 non-zero pixels = the instance
    The category is the mask file's stem without a trailing _<k> or -<k> (so "person_0.png",
    "person-1.png" and "person.png" are all "person"; "traffic_light_2.png" is
    "traffic_light"). categories: names in id order (1..K); default every name found, sorted.
    Images without a mask folder are kept with no annotations; empty masks are skipped and
    counted; a mask folder without its image raises DataError.
    """
    root = os.fspath(root)
    images_dir, masks_dir = os.path.join(root, images_subdir), os.path.join(root, masks_subdir)
    for folder in (images_dir, masks_dir):
        if not os.path.isdir(folder):
            raise DataError(f"{folder} not found (expected {root}/{images_subdir}/<name>.jpg and "
                            f"{root}/{masks_subdir}/<name>/<category>_<k>.png)")
    image_files = sorted(n for n in os.listdir(images_dir) if n.lower().endswith(IMAGE_EXTENSIONS))
    by_stem = {os.path.splitext(n)[0]: n for n in image_files}
    orphans = sorted({d for d in os.listdir(masks_dir)
                      if os.path.isdir(os.path.join(masks_dir, d))} - set(by_stem))
    if orphans:
        raise DataError(f"mask folders without an image in {images_dir}: {orphans[:5]}")
    mask_files = {stem: sorted(n for n in os.listdir(os.path.join(masks_dir, stem))
                               if n.lower().endswith(".png"))
                  for stem in by_stem if os.path.isdir(os.path.join(masks_dir, stem))}
    found = sorted({category_of_mask_file(n) for files in mask_files.values() for n in files})
    names = list(categories) if categories else found
    category_of = {n: i for i, n in enumerate(names, start=1)}
    unknown = sorted(set(found) - set(category_of))
    if unknown:
        raise DataError(f"mask categories {unknown} are not in the given list {names}")
    skipped = {"empty_masks": 0}
    images, annotations = [], []
    for image_id, (stem, file_name) in enumerate(sorted(by_stem.items()), start=1):
        width, height = _image_size(os.path.join(images_dir, file_name))
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for name in mask_files.get(stem, []):
            path = os.path.join(masks_dir, stem, name)
            try:
                with Image.open(path) as im:
                    mask = np.asarray(im.convert("L")) > 0
            except (OSError, UnidentifiedImageError) as e:
                raise DataError(f"cannot read mask {path}: {e}") from e
            if mask.shape != (height, width):
                raise DataError(f"mask {path} is {mask.shape[0]}x{mask.shape[1]} but the image "
                                f"{file_name} is {height}x{width} (h x w)")
            ann = mask_annotation(mask, len(annotations) + 1, image_id,
                                  category_of[category_of_mask_file(name)], polygon_tolerance)
            if ann is None:
                skipped["empty_masks"] += 1
                continue
            annotations.append(ann)
    data = {"info": {"description": f"converted from per-instance masks in {root}"},
            "images": images, "annotations": annotations, "categories": category_entries(names)}
    return {"json": write_coco_json(data, out_json), "images": images_dir,
            "num_images": len(images), "num_annotations": len(annotations), "categories": names,
            "skipped": skipped}
