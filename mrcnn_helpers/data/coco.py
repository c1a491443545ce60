"""COCO instance-segmentation dataset producing fixed-shape samples for Mask R-CNN.

The sample format (a contract other modules rely on) is documented in instances.py, which builds
the samples of every dataset kind the same way.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os

import numpy as np
import pycocotools.mask as mask_utils
import torch
from pycocotools.coco import COCO

from ..errors import DataError
from .images import DOCTOR_HINT, load_image
from .instances import InstanceSampleDataset, box_pixel_window, clip_box

log = logging.getLogger(__name__)

_REQUIRED_KEYS = ("images", "annotations", "categories")


def read_coco_json(json_file: str | os.PathLike) -> dict:
    """The parsed top-level object of a COCO instances JSON, with "images", "annotations" and
    "categories" lists. Raises DataError naming the file when it is missing, not JSON, or lacks
    those keys."""
    path = os.fspath(json_file)
    if not os.path.isfile(path):
        raise DataError(f"annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read annotation file {path}: {e}") from e
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a COCO instances file (top level is a "
                        f"{type(data).__name__}, expected an object with keys {list(_REQUIRED_KEYS)})")
    missing = [k for k in _REQUIRED_KEYS if not isinstance(data.get(k), list)]
    if missing:
        raise DataError(f"{path}: not a COCO instances file: missing or non-list keys {missing} "
                        f"(expected {list(_REQUIRED_KEYS)})")
    return data


def coco_from_dict(data: dict) -> COCO:
    """A pycocotools COCO object indexing `data` (no file, no printing)."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def load_coco(json_file: str | os.PathLike) -> COCO:
    """Read and check a COCO instances JSON; returns a pycocotools COCO object (quietly).

    Raises DataError naming the file when it is missing, not JSON, or not COCO instances (missing
    "images" / "annotations" / "categories", entries without their ids, unknown references,
    duplicate ids: pycocotools would silently keep only one of each).
    """
    path = os.fspath(json_file)
    data = read_coco_json(path)
    _check_entries(path, data)
    return coco_from_dict(data)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# field: (test, what is valid). Anything else fails deep inside pycocotools or the sampler.
_FIELD_TYPES = {
    "id": (_is_int, "an integer"),
    "file_name": (lambda v: isinstance(v, str), "a string"),
    "width": (lambda v: _is_int(v) and v > 0, "an integer > 0"),
    "height": (lambda v: _is_int(v) and v > 0, "an integer > 0"),
}


def _check_entries(path: str, data: dict) -> None:
    for key, fields in (("images", ("id", "file_name", "width", "height")), ("categories", ("id", "name")),
                        ("annotations", ("id", "image_id", "category_id", "segmentation"))):
        for index, entry in enumerate(data[key]):
            absent = [f for f in fields if not isinstance(entry, dict) or f not in entry]
            if absent:
                raise DataError(f"{path}: {key}[{index}] lacks {absent} (each entry of '{key}' "
                                f"needs {list(fields)})")
            for field in fields:  # types the loader relies on (the dataset doctor's rules)
                if field in _FIELD_TYPES and not _FIELD_TYPES[field][0](entry[field]):
                    raise DataError(f"{path}: {key}[{index}] has {field} {entry[field]!r}; "
                                    f"expected {_FIELD_TYPES[field][1]}; {DOCTOR_HINT}")
    image_ids = {img["id"] for img in data["images"]}
    category_ids = {cat["id"] for cat in data["categories"]}
    for ann in data["annotations"]:
        if ann["image_id"] not in image_ids:
            raise DataError(f"{path}: annotation {ann['id']} refers to image id {ann['image_id']}, "
                            f"which is not in 'images'")
        if ann["category_id"] not in category_ids:
            raise DataError(f"{path}: annotation {ann['id']} has category_id {ann['category_id']}, "
                            f"not one of the categories {sorted(category_ids)}")
        field = _non_finite_field(ann)
        if field:
            raise DataError(f"{path}: annotation {ann['id']} has a NaN or infinite number in its "
                            f"{field}; coordinates must be finite; {DOCTOR_HINT}")
    for key, count in (("images", len(image_ids)), ("categories", len(category_ids)),
                       ("annotations", len({a["id"] for a in data["annotations"]}))):
        if count != len(data[key]):
            seen, dups = set(), []
            for entry in data[key]:
                if entry["id"] in seen and entry["id"] not in dups:
                    dups.append(entry["id"])
                seen.add(entry["id"])
            raise DataError(f"{path}: {len(data[key]) - count} duplicate id(s) in '{key}' (e.g. "
                            f"{dups[:5]}); every id must be unique; {DOCTOR_HINT}")


def _non_finite_field(ann: dict) -> str | None:
    """The field of `ann` ("bbox" or "segmentation") holding a NaN or an infinity, or None.

    Refused when the file is read: pycocotools' polygon rasterizer (used here and by COCOeval)
    allocates without bound on a NaN vertex until the process is killed for memory, and a NaN
    bbox clips to the whole image width. Non-numbers are left to the checks that read them.
    """
    bbox = ann.get("bbox")
    if isinstance(bbox, list) and not _finite(bbox):
        return "bbox"
    segm = ann.get("segmentation")
    if isinstance(segm, list) and not all(_finite(p) for p in segm if isinstance(p, list)):
        return "segmentation"
    return None


def _finite(values: list) -> bool:
    try:
        return math.isfinite(sum(values))  # a NaN or an infinity carries through the sum
    except (TypeError, OverflowError):
        return True


def usable_instances(coco: COCO, image_id: int, source: str, skip_crowd: bool):
    """The annotations of an image that can give a training target, in file order.

    Returns (picked, dropped): picked is a list of (area, box, ann) with box float64
    (x1, y1, x2, y2) clipped to the image; dropped counts the annotations with an empty box or no
    polygon of >= 3 points (left out). Crowd annotations are left out, uncounted, when
    skip_crowd. Raises DataError naming `source` for a segmentation that is neither polygons nor
    RLE. The dataset and the TFRecord writer both select with this, so they keep the same ones.
    """
    info = coco.imgs[image_id]
    picked, dropped = [], 0
    for ann in coco.imgToAnns.get(image_id, []):
        if ann.get("iscrowd", 0) and skip_crowd:
            continue
        segm = ann["segmentation"]
        if isinstance(segm, list):
            # Polygons need >= 3 points; an annotation with none cannot give a mask.
            if not polygons_of(segm):
                dropped += 1
                continue
        elif not (isinstance(segm, dict) and "counts" in segm and "size" in segm):
            raise DataError(f"{source}: annotation {ann['id']} has a segmentation that is "
                            f"neither a list of polygons nor an RLE dict with 'size' and 'counts'")
        box = _box_of(ann, info, source)
        if box is None:
            dropped += 1
            continue
        area = float(ann.get("area", (box[2] - box[0]) * (box[3] - box[1])))
        picked.append((area, box, ann))
    return picked, dropped


def _box_of(ann: dict, info: dict, source: str) -> np.ndarray | None:
    bbox = ann.get("bbox")
    if bbox is None:  # some converters omit it: take the mask's own box
        bbox = mask_utils.toBbox(full_rle(ann, info, source)).tolist()
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError) as e:
        raise DataError(f"{source}: annotation {ann['id']} has bbox {bbox!r}; "
                        f"expected [x, y, width, height]") from e
    return clip_box(x, y, w, h, info["width"], info["height"])


def full_rle(ann: dict, info: dict, source: str) -> dict:
    """Compressed RLE of an annotation's whole-image mask (polygons merged; RLE checked)."""
    segm = ann["segmentation"]
    height, width = int(info["height"]), int(info["width"])
    if isinstance(segm, list):
        return mask_utils.merge(mask_utils.frPyObjects(polygons_of(segm), height, width))
    if list(segm["size"]) != [height, width]:
        raise DataError(f"{source}: annotation {ann['id']} has an RLE of size "
                        f"{list(segm['size'])}, but image {info['id']} is {[height, width]} (h, w)")
    if isinstance(segm["counts"], list):  # uncompressed RLE
        return mask_utils.frPyObjects(segm, height, width)
    return segm


def annotation_mask_crop(ann: dict, info: dict, box: np.ndarray,
                         source: str) -> tuple[np.ndarray, tuple[int, int]]:
    """Binary mask of `ann` inside its (integer-expanded) box: (uint8 [h', w'], origin (x, y))."""
    x0, y0, x1, y1 = box_pixel_window(box, info["width"], info["height"])
    # Rasterized on the image's own grid cut at the box's bottom-right corner: pycocotools fills
    # there exactly the pixels it fills on the whole image (the COCO reference mask, which is
    # also what TFRecords store), at a fraction of a full-image decode. Shifting the polygons
    # into the box's frame would be cheaper still but not exact: shifted coordinates round
    # differently on pycocotools' 5x sub-pixel grid (vertices with one decimal, e.g. 45.9).
    segm = ann["segmentation"]
    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons_of(segm), y1, x1))
        return mask_utils.decode(rle)[y0:y1, x0:x1], (x0, y0)
    full = mask_utils.decode(full_rle(ann, info, source))
    return full[y0:y1, x0:x1], (x0, y0)


class CocoInstanceDataset(InstanceSampleDataset):
    """COCO instances (JSON + image folder) as fixed-shape Mask R-CNN samples (see instances.py).

    Category ids map to contiguous labels 1..K in sorted-id order: `category_ids[i - 1]` is the COCO
    id of label i and `class_names[i]` its name (`class_names[0]` = "background"). Crowd
    annotations are skipped when training with skip_crowd, and always in eval mode (the
    evaluator reads them from the JSON). Per image at most max_num_instances instances are kept,
    the largest by area; `truncated_image_ids` lists the images that had more. Annotations with
    an empty box or no usable segmentation are dropped and counted (`num_dropped_annotations`).
    A JSON with duplicate ids or dangling references is refused (DataError) at construction; a
    missing or corrupt image when its sample is read. With train and augment, each sample gets
    a random horizontal flip and a random scale in scale_range on top of the fit-to-image_size
    scale, then a random crop / pad to image_size; instances left with a box under 1 px are
    dropped. Randomness comes from torch's RNG, which DataLoader seeds per worker.
    """

    def __init__(self, json_file, image_dir, image_size=(512, 512), train=True, augment=False,
                 skip_crowd=True, gt_mask_size=112, max_num_instances=200, scale_range=(0.8, 1.25),
                 max_images=None):
        super().__init__(image_size=image_size, train=train, augment=augment,
                         skip_crowd=skip_crowd, gt_mask_size=gt_mask_size,
                         max_num_instances=max_num_instances, scale_range=scale_range)
        self.json_file = os.fspath(json_file)
        self.source = self.json_file
        self.image_dir = os.fspath(image_dir)

        self.coco = load_coco(self.json_file)
        cats = sorted(self.coco.dataset["categories"], key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in cats]
        self.class_names = ["background"] + [str(c["name"]) for c in cats]
        self._label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}

        self.image_ids = sorted(self.coco.imgs)
        if max_images is not None:
            self.image_ids = self.image_ids[:max(0, int(max_images))]
        self._instances = {}
        self.truncated_image_ids = []
        self.num_dropped_annotations = 0
        for image_id in self.image_ids:
            picked, dropped = usable_instances(self.coco, image_id, self.json_file, self.skip_crowd)
            self.num_dropped_annotations += dropped
            kept, truncated = self._keep_largest(
                [(area, box, self._label_of[ann["category_id"]], ann) for area, box, ann in picked])
            self._instances[image_id] = kept
            if truncated:
                self.truncated_image_ids.append(image_id)
        if self.num_dropped_annotations:
            log.warning("%s: dropped %d annotations with an empty box or no polygon of >= 3 points",
                        self.json_file, self.num_dropped_annotations)
        if self.truncated_image_ids:
            log.warning("%s: %d images have more than %d instances; kept the largest",
                        self.json_file, len(self.truncated_image_ids), self.max_num_instances)
        if self.image_ids:  # a wrong image_dir is the most common mistake: say so at once
            first = self.coco.imgs[self.image_ids[0]]
            path = os.path.join(self.image_dir, first["file_name"])
            if not os.path.isfile(path):
                raise DataError(f"image file not found: {path} (image id {first['id']}, listed in "
                                f"{self.json_file}); check the image directory '{self.image_dir}'")

    def _mask_crop(self, source, box):
        return annotation_mask_crop(source, self.coco.imgs[source["image_id"]], box, self.json_file)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> dict:
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        path = os.path.join(self.image_dir, info["file_name"])
        image = load_image(path, image_id)
        height, width = int(image.shape[1]), int(image.shape[2])
        if (height, width) != (int(info["height"]), int(info["width"])):
            raise DataError(f"image {path} (image id {image_id}) is {height}x{width} (h x w) but "
                            f"{self.json_file} says {info['height']}x{info['width']}; {DOCTOR_HINT}")
        return self._sample(image, image_id, self._instances[image_id])


def polygons_of(segm: list) -> list[list[float]]:
    """The polygons of a COCO polygon segmentation that have at least 3 points."""
    return [p for p in segm if isinstance(p, list) and len(p) >= 6]
