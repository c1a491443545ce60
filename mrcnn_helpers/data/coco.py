"""COCO instance-segmentation dataset producing fixed-shape samples for Mask R-CNN.

The sample format (a contract other modules rely on) is documented in instances.py, which builds
the samples of every dataset kind the same way.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import os

import numpy as np
import pycocotools.mask as mask_utils
from pycocotools.coco import COCO

from ..errors import DataError
from .annotations import AnnotationCheck, check_geometry, check_structure, polygons_of
from .images import DOCTOR_HINT, check_image_size, load_image
from .instances import InstanceSampleDataset, box_pixel_window

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
    except RecursionError as e:
        raise DataError(f"{path}: not a COCO instances file (nested too deeply to read)") from e
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


def load_coco(json_file: str | os.PathLike, *, check_annotations: bool = True) -> COCO:
    """Read and check a COCO instances JSON; returns a pycocotools COCO object (quietly).

    Raises DataError naming the file when it is missing, not JSON, or not COCO instances (missing
    "images" / "annotations" / "categories", entries without their ids or of the wrong types,
    images over the pixel limit, unknown references, duplicate ids: pycocotools would silently
    keep only one of each), and, with check_annotations, for any annotation with a problem
    that annotations.PROBLEMS says readers refuse (NaN or out-of-range coordinates, malformed
    RLE, ...), so pycocotools (here, in COCOeval) never rasterizes one. The datasets pass
    False and judge the annotations of the images they use themselves (annotations.py).
    """
    path = os.fspath(json_file)
    data = read_coco_json(path)
    _check_entries(path, data, check_annotations)
    return coco_from_dict(data)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# field: (test, what is valid). Anything else fails deep inside pycocotools or the sampler.
_FIELD_TYPES = {
    "id": (_is_int, "an integer"),
    "image_id": (_is_int, "an integer"),
    "category_id": (_is_int, "an integer"),
    "file_name": (lambda v: isinstance(v, str), "a string"),
    "width": (lambda v: _is_int(v) and v > 0, "an integer > 0"),
    "height": (lambda v: _is_int(v) and v > 0, "an integer > 0"),
}


def refusal_error(source: str, ann: dict, problem: tuple[str, str]) -> DataError:
    """The DataError readers raise for an annotation with a "refused" problem (annotations.py)."""
    return DataError(f"{source}: annotation {ann['id']} has {problem[1]}; {DOCTOR_HINT}")


def _check_entries(path: str, data: dict, check_annotations: bool) -> None:
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
            if key == "images":
                check_image_size(entry["width"], entry["height"],
                                 f"{entry['file_name']} (images[{index}] of {path})")
    images = {img["id"]: img for img in data["images"]}
    category_ids = {cat["id"] for cat in data["categories"]}
    for ann in data["annotations"]:
        if ann["image_id"] not in images:
            raise DataError(f"{path}: annotation {ann['id']} refers to image id {ann['image_id']}, "
                            f"which is not in 'images'")
        if ann["category_id"] not in category_ids:
            raise DataError(f"{path}: annotation {ann['id']} has category_id {ann['category_id']}, "
                            f"not one of the categories {sorted(category_ids)}")
        if check_annotations:
            problem = check_structure(ann, images[ann["image_id"]]).refusal()
            if problem:
                raise refusal_error(path, ann, problem)
    for key, count in (("images", len(images)), ("categories", len(category_ids)),
                       ("annotations", len({a["id"] for a in data["annotations"]}))):
        if count != len(data[key]):
            seen, dups = set(), []
            for entry in data[key]:
                if entry["id"] in seen and entry["id"] not in dups:
                    dups.append(entry["id"])
                seen.add(entry["id"])
            raise DataError(f"{path}: {len(data[key]) - count} duplicate id(s) in '{key}' (e.g. "
                            f"{dups[:5]}); every id must be unique; {DOCTOR_HINT}")


def select_instances(coco: COCO, image_id: int, source: str,
                     skip_crowd: bool) -> tuple[list[AnnotationCheck], list[AnnotationCheck]]:
    """Judge the annotations of an image (annotations.py); returns (picked, dropped) in file order.

    picked: the checks of the annotations that give a training target (check.box is the float64
    (x1, y1, x2, y2) box clipped to the image, check.area the area, check.rle the mask);
    dropped: those training leaves out (check.drop_reason() says why). Crowd annotations are
    left out of both when skip_crowd. Raises DataError naming `source` and the annotation for a
    problem that refuses the file. The datasets and the TFRecord writer all select with this,
    so they keep the same annotations the dataset doctor passes.
    """
    info = coco.imgs[image_id]
    checks = []
    for ann in coco.imgToAnns.get(image_id, []):
        check = check_structure(ann, info)
        problem = check.refusal()
        if problem:
            raise refusal_error(source, ann, problem)
        if not (check.iscrowd and skip_crowd):
            checks.append(check)
    check_geometry(checks)
    picked = [c for c in checks if not c.drop_reason()]
    return picked, [c for c in checks if c.drop_reason()]


def full_rle(ann: dict, info: dict) -> dict:
    """Compressed RLE of a (checked) annotation's whole-image mask, polygons merged."""
    segm = ann["segmentation"]
    height, width = int(info["height"]), int(info["width"])
    if isinstance(segm, list):
        return mask_utils.merge(mask_utils.frPyObjects(polygons_of(segm), height, width))
    if isinstance(segm["counts"], list):  # uncompressed RLE
        return mask_utils.frPyObjects(segm, height, width)
    return segm


def annotation_mask_crop(ann: dict, info: dict, box: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """Binary mask of a (checked) annotation inside its (integer-expanded) box:
    (uint8 [h', w'], origin (x, y))."""
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
    full = mask_utils.decode(full_rle(ann, info))
    return full[y0:y1, x0:x1], (x0, y0)


class CocoInstanceDataset(InstanceSampleDataset):
    """COCO instances (JSON + image folder) as fixed-shape Mask R-CNN samples (see instances.py).

    Category ids map to contiguous labels 1..K in sorted-id order: `category_ids[i - 1]` is the COCO
    id of label i and `class_names[i]` its name (`class_names[0]` = "background"). Crowd
    annotations are skipped when training with skip_crowd, and always in eval mode (the
    evaluator reads them from the JSON). Per image at most max_num_instances instances are kept,
    the largest by area; `truncated_image_ids` lists the images that had more. Annotations are
    judged as the dataset doctor judges them (annotations.PROBLEMS): those it says training
    drops (empty mask, degenerate or outside box) are dropped and counted
    (`num_dropped_annotations`, `dropped_by_problem`); a JSON with duplicate ids, dangling
    references or an annotation training refuses (malformed or out-of-range coordinates,
    RLE, area, iscrowd) raises DataError at construction; a missing or corrupt image when its
    sample is read. With train and augment, each sample gets
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

        # Annotations are judged below, image by image, with the pixels (annotations.py).
        self.coco = load_coco(self.json_file, check_annotations=False)
        cats = sorted(self.coco.dataset["categories"], key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in cats]
        self.class_names = ["background"] + [str(c["name"]) for c in cats]
        self._label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}

        self.image_ids = sorted(self.coco.imgs)
        if max_images is not None:
            self.image_ids = self.image_ids[:max(0, int(max_images))]
        self._instances = {}
        self.truncated_image_ids = []
        self.dropped_by_problem = collections.Counter()
        for image_id in self.image_ids:
            picked, dropped = select_instances(self.coco, image_id, self.json_file, self.skip_crowd)
            self.dropped_by_problem.update(check.drop_reason() for check in dropped)
            kept, truncated = self._keep_largest(
                [(c.area, c.box, self._label_of[c.ann["category_id"]], c.ann) for c in picked])
            self._instances[image_id] = kept
            if truncated:
                self.truncated_image_ids.append(image_id)
        self.num_dropped_annotations = sum(self.dropped_by_problem.values())
        if self.num_dropped_annotations:
            log.warning("%s: dropped %d annotations (%s); %s", self.json_file,
                        self.num_dropped_annotations, ", ".join(
                            f"{code}: {n}" for code, n in sorted(self.dropped_by_problem.items())),
                        DOCTOR_HINT)
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
        return annotation_mask_crop(source, self.coco.imgs[source["image_id"]], box)

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


