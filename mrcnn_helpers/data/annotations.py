"""One judgement of a COCO annotation against its image, shared by every reader of COCO files.

The dataset doctor (`mrcnn data check`), load_coco, the training / evaluation datasets and the
TFRecord writer all judge annotations here, so whatever the doctor passes trains, and whatever
it flags training refuses or skips the same way. PROBLEMS lists, per problem: its severity in
the doctor's report, what `--fix` does, and what training does. "refused" problems make every
reader refuse the whole file (DataError naming the annotation): the file is malformed, not just
imprecise. "dropped" problems make training leave the annotation out and count it.

Two stages, so a reader that does not need the pixels pays only for the first:
- check_structure: the types and ranges every later step relies on, before pycocotools sees a
  number (it has no bounds checks: a vertex at 1e9 or RLE counts running past the image crash
  the process). Coordinates must be finite and within coordinate_limit of the image; polygons
  flat lists of an even count; RLE counts non-negative runs covering the image exactly.
- check_geometry: rasterizes the segmentation and compares the bbox with the image and the mask.
check_annotation runs both.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pycocotools.mask as mask_utils

REFUSED = "refused: the file is not read"
DROPPED = "annotation dropped and counted"

# code: (severity, what it means, what --fix does, what training does)
PROBLEMS: dict[str, tuple[str, str, str, str]] = {
    "invalid_segmentation": ("error", (
        "segmentation is neither polygons (flat lists of an even count of finite coordinates "
        "near the image) nor an RLE of the image's size whose counts cover it exactly"),
        "annotation dropped", REFUSED),
    "invalid_bbox": ("error", "bbox is not 4 finite numbers [x, y, w, h] near the image",
                     "bbox recomputed from the mask", REFUSED),
    "invalid_area": ("error", "area is not a finite number >= 0", "area recomputed from the mask",
                     REFUSED),
    "invalid_iscrowd": ("error", "iscrowd is not 0 or 1", "annotation dropped", REFUSED),
    "empty_mask": ("error", ("segmentation covers no pixel of the image (e.g. no polygon of >= 3 "
                             "points, or all of it outside the image)"), "annotation dropped",
                   DROPPED),
    "degenerate_box": ("error", "bbox width or height <= 0", "bbox recomputed from the mask",
                       DROPPED),
    "box_outside_image": ("error", "bbox lies entirely outside the image",
                          "bbox recomputed from the mask", DROPPED),
    "polygon_too_few_points": ("warning", "polygon with fewer than 3 points", "polygon removed",
                               "that polygon is ignored"),
    "missing_bbox": ("warning", "annotation has no bbox", "bbox set from the mask",
                     "the mask's box is used"),
    "box_partly_outside": ("warning", "bbox extends past the image border",
                           "bbox clipped to the image", "the box is clipped to the image"),
    "mask_outside_box": ("warning", "mask pixels lie > 1 px outside the bbox",
                         "bbox set to the mask's extent", "the mask is cropped to the box"),
}
# TAO's warnings files list, per image, the annotation ids with box and with mask problems.
KIND = {"invalid_bbox": "box", "degenerate_box": "box", "box_outside_image": "box",
        "box_partly_outside": "box", "missing_bbox": "box", "invalid_area": "box",
        "mask_outside_box": "mask", "polygon_too_few_points": "mask", "empty_mask": "mask",
        "invalid_segmentation": "mask", "invalid_iscrowd": "mask"}

# Coordinates may lie this far outside the image (annotation tools let vertices stray past the
# border), but no farther: pycocotools multiplies them by 5 into 32-bit integers and allocates
# per unit of outline.
COORDINATE_MARGIN = 1024
MAX_COORDINATE = 2.0**26
# Outline length (sum over edges of max(|dx|, |dy|), px) of one polygon: pycocotools allocates
# ~80 bytes per unit, so this caps one rasterization at ~340 MB. A polygon traced around every
# pixel edge of a 1024 x 1024 maze stays below it.
MAX_POLYGON_PERIMETER = 2**22
BOX_TOLERANCE = 0.01   # px a box may pass the image border by (float noise) before it is flagged
MASK_TOLERANCE = 1.0   # px mask pixels may pass the box by (polygon rasterization rounds outwards)


def coordinate_limit(height: int, width: int) -> float:
    """Largest |coordinate| (px) accepted in an image of height x width: 4 x its larger side
    plus COORDINATE_MARGIN, at most MAX_COORDINATE."""
    return min(4.0 * max(int(height), int(width)) + COORDINATE_MARGIN, MAX_COORDINATE)


def numeric_array(values) -> np.ndarray | None:
    """`values` as a float64 vector when it is a flat list of numbers, else None.

    Strings, None, nested lists and integers beyond 64 bits are not numbers here (numpy would
    parse "1" or keep objects); an empty list is an empty vector.
    """
    if not isinstance(values, (list, tuple)):
        return None
    try:
        array = np.array(values)
    except (ValueError, TypeError, OverflowError):
        return None
    if array.ndim != 1 or array.dtype.kind not in "iuf":
        return None
    return np.asarray(array, dtype=np.float64)


def polygon_problem(coords: np.ndarray, height: int, width: int) -> str | None:
    """What is wrong with one polygon [x0, y0, x1, y1, ...] (float64) for a height x width image,
    as the end of "annotation N has ...", or None. Polygons of < 3 points are not a problem here
    (check_geometry ignores them)."""
    limit = coordinate_limit(height, width)
    largest = float(np.abs(coords).max()) if coords.size else 0.0
    if not largest <= limit:  # NaN compares False: one test for the common, valid case
        if not np.isfinite(coords).all():
            return "a NaN or infinite number in its segmentation"
        worst = float(coords[np.argmax(np.abs(coords))])
        return (f"a segmentation coordinate {worst:g} outside +-{limit:g} (4 x the {width}x{height} "
                f"image's larger side + {COORDINATE_MARGIN} px)")
    if coords.size % 2:
        return (f"a polygon with an odd number of coordinates ({coords.size}); a polygon is "
                f"[x0, y0, x1, y1, ...]")
    # Each edge is at most 2 * largest long: most polygons cannot reach the limit at all.
    if coords.size >= 6 and coords.size * largest > MAX_POLYGON_PERIMETER:
        xy = coords.reshape(-1, 2)
        steps = np.abs(np.diff(np.concatenate([xy, xy[:1]]), axis=0)).max(axis=1)
        perimeter = float(steps.sum())
        if perimeter > MAX_POLYGON_PERIMETER:
            return (f"a polygon outline {perimeter:.0f} px long, more than the "
                    f"{MAX_POLYGON_PERIMETER} px one polygon may have")
    return None


def decode_rle_counts(text: str | bytes) -> list[int]:
    """Run lengths of a COCO compressed RLE string (the format of pycocotools' rleToString).

    Each run is stored as groups of 5 bits, least significant first, one character per group
    (value + 48, so '0'..'o'); bit 0x20 of a character says another group follows, and bit 0x10
    of the last group is the sign. From the fourth run on, a run is stored as its difference to
    the run two places before it. Raises ValueError saying what is wrong (a character outside
    the alphabet, a string ending inside a run, a run of more than 64 bits).
    """
    data = text.encode("ascii") if isinstance(text, str) else bytes(text)
    counts: list[int] = []
    value = shift = 0
    for position, char in enumerate(data):
        group = char - 48
        if not 0 <= group < 64:
            raise ValueError(f"character {chr(char)!r} at position {position} is not in the "
                             f"COCO RLE alphabet '0'..'o'")
        value |= (group & 0x1F) << shift
        shift += 5
        if group & 0x20:
            if shift > 64:
                raise ValueError(f"the run ending at position {position} has more than 64 bits")
            continue
        if group & 0x10:
            value -= 1 << shift  # sign extension of the last group
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
        value = shift = 0
    if shift:
        raise ValueError("the string ends inside a run length")
    return counts


def _rle_counts(segm: dict, height: int, width: int) -> tuple[list[int] | None, str | None]:
    """(run lengths, None) of a valid RLE dict's counts for a height x width image, or
    (None, what is wrong)."""
    counts = segm["counts"]
    pixels = int(height) * int(width)
    if isinstance(counts, (str, bytes, bytearray)):
        try:
            runs = decode_rle_counts(counts)
        except ValueError as e:  # UnicodeEncodeError included
            return None, f"RLE counts that are not a COCO RLE string ({e})"
    elif isinstance(counts, (list, tuple)):
        array = np.array(counts) if counts else np.zeros(0, np.int64)
        if array.ndim != 1 or array.dtype.kind not in "iu":
            return None, "RLE counts that are not a list of whole run lengths"
        runs = [int(v) for v in array]
    else:
        return None, (f"RLE counts of type {type(counts).__name__}; expected a list of run "
                      f"lengths or a compressed string")
    if any(v < 0 for v in runs):
        return None, "RLE counts with a negative run length"
    if sum(runs) != pixels:
        return None, (f"RLE counts summing to {sum(runs)}, but the {width}x{height} (w x h) image "
                      f"has {pixels} pixels")
    return runs, None


def _as_rle_string(counts: str | bytes | bytearray) -> str | bytes:
    return bytes(counts) if isinstance(counts, bytearray) else counts


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass
class AnnotationCheck:
    """What check_structure / check_geometry found about one annotation of image `info`.

    problems: (code, detail) in the order found; detail ends the sentence "annotation N has ...".
    polygons: the polygons with >= 3 points (polygon segmentations; None for RLE or invalid).
    rle: compressed RLE of the whole-image mask (set by check_geometry, or for RLE input).
    mask_area / mask_box: pixel count and [x, y, w, h] of the mask (check_geometry).
    bbox: the given bbox as floats when valid, else None; box: training's box, float64
    (x1, y1, x2, y2) clipped to the image (None when the annotation is dropped or refused);
    fixed_bbox: the [x, y, w, h] `--fix` writes. area: the given area when valid, else the
    mask's. iscrowd: the crowd flag as a bool.
    """

    ann: dict
    info: dict
    problems: list = dataclasses.field(default_factory=list)
    polygons: list | None = None
    rle: dict | None = None
    mask_area: int = 0
    mask_box: list | None = None
    bbox: list | None = None
    box: np.ndarray | None = None
    area: float | None = None
    iscrowd: bool = False
    fixed_bbox: list | None = None

    def add(self, code: str, detail: str) -> None:
        self.problems.append((code, detail))

    def codes(self) -> set:
        return {code for code, _ in self.problems}

    def refusal(self) -> tuple[str, str] | None:
        """The first problem that makes readers refuse the file, or None."""
        return next((p for p in self.problems if PROBLEMS[p[0]][3] == REFUSED), None)

    def drop_reason(self) -> str | None:
        """The code of the first problem that makes training drop the annotation, or None."""
        return next((c for c, _ in self.problems if PROBLEMS[c][3] == DROPPED), None)

    def fixed(self) -> dict | None:
        """The annotation as `--fix` writes it (see PROBLEMS), or None when it is dropped."""
        if self.codes() & {"invalid_segmentation", "invalid_iscrowd", "empty_mask"}:
            return None
        ann = dict(self.ann)
        if self.polygons is not None:
            ann["segmentation"] = self.polygons
        ann["bbox"] = self.fixed_bbox
        if ann.get("area") is None or "invalid_area" in self.codes():
            ann["area"] = self.mask_area
        return ann


def check_structure(ann: dict, info: dict) -> AnnotationCheck:
    """Types and ranges of an annotation's segmentation, bbox, area and iscrowd (see module doc).

    info: the image entry ({"id", "width", "height"}, already checked). Only "refused"
    problems are found here; the segmentation is then safe to hand to pycocotools.
    """
    check = AnnotationCheck(ann, info)
    height, width = int(info["height"]), int(info["width"])
    segm = ann.get("segmentation")
    if isinstance(segm, list):
        polygons = []
        for polygon in segm:
            coords = numeric_array(polygon)
            problem = ("a polygon that is not a flat list of numbers [x0, y0, x1, y1, ...]"
                       if coords is None else polygon_problem(coords, height, width))
            if problem:
                check.add("invalid_segmentation", problem)
                break
            polygons.append(polygon)
        else:
            check.polygons = polygons
    elif isinstance(segm, dict) and "counts" in segm and "size" in segm:
        size = segm["size"]
        if not (isinstance(size, (list, tuple)) and len(size) == 2
                and all(_is_int(v) for v in size) and list(size) == [height, width]):
            check.add("invalid_segmentation", f"an RLE of size {size!r}, but image {info['id']} is "
                                              f"{[height, width]} (h, w)")
        else:
            runs, problem = _rle_counts(segm, height, width)
            if problem:
                check.add("invalid_segmentation", problem)
            else:
                check.rle = (mask_utils.frPyObjects({"size": [height, width], "counts": runs},
                                                    height, width)
                             if isinstance(segm["counts"], (list, tuple)) else
                             {"size": [height, width], "counts": _as_rle_string(segm["counts"])})
                check.mask_area = sum(runs[1::2])
    else:
        check.add("invalid_segmentation", "a segmentation that is neither a list of polygons nor "
                                          "an RLE dict with 'size' and 'counts'")
    _check_bbox_numbers(check, ann.get("bbox"), height, width)
    area = ann.get("area")
    if area is not None:
        if isinstance(area, (int, float)) and not isinstance(area, bool) and \
                math.isfinite(area) and area >= 0:
            check.area = float(area)
        else:
            check.add("invalid_area", f"area {area!r}; expected a finite number >= 0")
    crowd = ann.get("iscrowd", 0)
    if isinstance(crowd, (int, float)) and crowd in (0, 1):
        check.iscrowd = bool(crowd)
    else:
        check.add("invalid_iscrowd", f"iscrowd {crowd!r}; expected 0 or 1")
    return check


def _check_bbox_numbers(check: AnnotationCheck, bbox, height: int, width: int) -> None:
    if bbox is None:
        return
    values = numeric_array(bbox)
    if values is None or values.size != 4:
        check.add("invalid_bbox", f"bbox {bbox!r}; expected [x, y, width, height] (4 numbers)")
    elif not np.isfinite(values).all():
        check.add("invalid_bbox", "a NaN or infinite number in its bbox")
    elif max(abs(v) for v in values.tolist()) > coordinate_limit(height, width):
        check.add("invalid_bbox", f"bbox {bbox!r} with a number outside "
                                  f"+-{coordinate_limit(height, width):g} (4 x the {width}x{height} "
                                  f"image's larger side + {COORDINATE_MARGIN} px)")
    else:
        check.bbox = values.tolist()


def check_geometry(checks: AnnotationCheck | list[AnnotationCheck]):
    """Rasterize the segmentations and compare the bboxes with the image and the masks.

    checks: one check_structure result, or a list of them for annotations of one image (each
    without invalid_segmentation); a list is rasterized with one pycocotools call, which is
    several times faster than one call per annotation. Sets rle, mask_area, mask_box, box,
    fixed_bbox and area, and adds the "dropped" and warning problems of PROBLEMS. Returns
    what it was given.
    """
    batch = [checks] if isinstance(checks, AnnotationCheck) else checks
    if not batch:
        return checks
    info = batch[0].info
    height, width = int(info["height"]), int(info["width"])
    polygons, owners = [], []
    for check in batch:
        if check.polygons is not None:
            good = polygons_of(check.polygons)
            if len(good) < len(check.polygons):
                check.add("polygon_too_few_points", f"{len(check.polygons) - len(good)} of "
                          f"{len(check.polygons)} polygons with fewer than 3 points")
            check.polygons = good
            polygons += good
            owners += [check] * len(good)
    rles = mask_utils.frPyObjects(polygons, height, width) if polygons else []
    parts: dict[int, list] = {}
    for check, rle in zip(owners, rles):
        parts.setdefault(id(check), []).append(rle)
    for check in batch:
        mine = parts.get(id(check))
        if mine:
            check.rle = mine[0] if len(mine) == 1 else mask_utils.merge(mine)
    masks = [c for c in batch if c.rle is not None]
    if masks:
        rles = [c.rle for c in masks]
        # pycocotools' area() of a list overflows past 255 entries (numpy 2): in chunks.
        areas = [v for k in range(0, len(rles), 255) for v in mask_utils.area(rles[k:k + 255])]
        boxes = mask_utils.toBbox(rles)
        for check, area, box in zip(masks, areas, boxes):
            if check.polygons is not None:
                check.mask_area = int(area)
            check.mask_box = [float(v) for v in box]
    for check in batch:
        if check.mask_area == 0:
            check.add("empty_mask", f"a segmentation that covers no pixel of the {width}x{height} "
                                    f"(w x h) image")
            continue
        if check.area is None:
            check.area = float(check.mask_area)
        _check_box_geometry(check, width, height)
    return checks


def _check_box_geometry(check: AnnotationCheck, width: int, height: int) -> None:
    """fixed_bbox (the doctor's fix) and box (training's) from the bbox, the mask and the image."""
    mask_box = check.mask_box
    if check.bbox is None:
        if "invalid_bbox" not in check.codes():
            check.add("missing_bbox", "no bbox")
        check.fixed_bbox = mask_box
        check.box = clip_box(*mask_box, width, height)
        return
    x, y, w, h = check.bbox
    shown = check.ann["bbox"]
    if w <= 0 or h <= 0:
        check.add("degenerate_box", f"bbox {shown} with width or height <= 0")
        check.fixed_bbox = mask_box
        return
    check.box = clip_box(x, y, w, h, width, height)
    if check.box is None:
        check.add("box_outside_image", f"bbox {shown} outside the {width}x{height} (w x h) image")
        check.fixed_bbox = mask_box
        return
    box = list(check.ann["bbox"])
    if x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > width + BOX_TOLERANCE or \
            y + h > height + BOX_TOLERANCE:
        check.add("box_partly_outside", f"bbox {shown} extending past the {width}x{height} "
                                        f"(w x h) image")
        x1, y1 = max(0.0, x), max(0.0, y)
        box = [x1, y1, min(float(width), x + w) - x1, min(float(height), y + h) - y1]
    mx, my, mw, mh = mask_box
    if (mx < box[0] - MASK_TOLERANCE or my < box[1] - MASK_TOLERANCE
            or mx + mw > box[0] + box[2] + MASK_TOLERANCE
            or my + mh > box[1] + box[3] + MASK_TOLERANCE):
        check.add("mask_outside_box", f"a mask spanning {mask_box}, outside its bbox {shown}")
        box = mask_box
    check.fixed_bbox = box


def check_annotation(ann: dict, info: dict) -> AnnotationCheck:
    """check_structure, then check_geometry when the segmentation can be rasterized."""
    check = check_structure(ann, info)
    if "invalid_segmentation" not in check.codes():
        check_geometry(check)
    return check


def clip_box(x: float, y: float, w: float, h: float, width: float, height: float) -> np.ndarray | None:
    """COCO box [x, y, w, h] -> float64 [4] (x1, y1, x2, y2) clipped to the image; None if empty."""
    x1, y1 = max(0.0, x), max(0.0, y)
    x2, y2 = min(float(width), x + w), min(float(height), y + h)
    if not (x2 > x1 and y2 > y1):
        return None
    return np.array([x1, y1, x2, y2], dtype=np.float64)


def polygons_of(segm: list) -> list[list[float]]:
    """The polygons of a COCO polygon segmentation that have at least 3 points."""
    return [p for p in segm if isinstance(p, list) and len(p) >= 6]
