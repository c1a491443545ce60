"""COCO instance-segmentation dataset producing fixed-shape samples for Mask R-CNN.

Sample format (a contract other modules rely on), with M = max_num_instances, S = gt_mask_size
and (H, W) = image_size:
  "image"          uint8 Tensor[3, H, W]   resized (aspect kept) and zero-padded bottom / right
  "boxes"          float32 Tensor[M, 4]    (x1, y1, x2, y2) in padded-input pixels; rows >= n are 0
  "classes"        int64 Tensor[M]         contiguous labels 1..K; 0 for padding rows
  "masks"          uint8 Tensor[M, S, S]   each gt mask cropped to its box, resampled to S x S,
                                           0..255 (area-averaged); 0 for padding rows
  "num_instances"  int,  "image_id": int (COCO id),  "scale": float (resized / original),
  "orig_size"      (h, w) of the original image
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
from PIL import Image, UnidentifiedImageError
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from ..errors import DataError
from . import transforms as T

log = logging.getLogger(__name__)

_REQUIRED_KEYS = ("images", "annotations", "categories")


def load_coco(json_file: str | os.PathLike) -> COCO:
    """Read and check a COCO instances JSON; returns a pycocotools COCO object (quietly).

    Raises DataError naming the file when it is missing, not JSON, or not COCO instances (missing
    "images" / "annotations" / "categories", entries without their ids, unknown references).
    """
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
    _check_entries(path, data)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def _check_entries(path: str, data: dict) -> None:
    for key, fields in (("images", ("id", "file_name", "width", "height")), ("categories", ("id", "name")),
                        ("annotations", ("id", "image_id", "category_id", "segmentation"))):
        for index, entry in enumerate(data[key]):
            absent = [f for f in fields if not isinstance(entry, dict) or f not in entry]
            if absent:
                raise DataError(f"{path}: {key}[{index}] lacks {absent} (each entry of '{key}' "
                                f"needs {list(fields)})")
    image_ids = {img["id"] for img in data["images"]}
    category_ids = {cat["id"] for cat in data["categories"]}
    for ann in data["annotations"]:
        if ann["image_id"] not in image_ids:
            raise DataError(f"{path}: annotation {ann['id']} refers to image id {ann['image_id']}, "
                            f"which is not in 'images'")
        if ann["category_id"] not in category_ids:
            raise DataError(f"{path}: annotation {ann['id']} has category_id {ann['category_id']}, "
                            f"not one of the categories {sorted(category_ids)}")


def load_image(path: str, image_id: int | None = None) -> torch.Tensor:
    """Read an image file as RGB uint8 Tensor[3, h, w].

    Grayscale, palette, RGBA (alpha dropped), CMYK and 16-bit images are converted; 16-/32-bit
    integer images are scaled by 1/257 (0..65535 -> 0..255). EXIF orientation is not applied:
    COCO annotations refer to the pixels as stored. Raises DataError naming the path and
    the image id when the file is missing, unreadable or corrupt.
    """
    where = f"{path}" + (f" (image id {image_id})" if image_id is not None else "")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
                gray = np.asarray(im, dtype=np.float64) / 257.0
                array = np.repeat(np.clip(np.rint(gray), 0, 255).astype(np.uint8)[..., None], 3, 2)
            elif im.mode == "F":
                gray = np.clip(np.rint(np.asarray(im, dtype=np.float64)), 0, 255).astype(np.uint8)
                array = np.repeat(gray[..., None], 3, 2)
            else:
                array = np.array(im.convert("RGB"))
    except FileNotFoundError as e:
        raise DataError(f"image file not found: {where}") from e
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {where}: {e}") from e
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous()


class CocoInstanceDataset(Dataset):
    """COCO instances (JSON + image folder) as fixed-shape Mask R-CNN samples (see module doc).

    Category ids map to contiguous labels 1..K in sorted-id order: `category_ids[i - 1]` is the COCO
    id of label i and `class_names[i]` its name (`class_names[0]` = "background"). Crowd
    annotations are skipped when training with skip_crowd, and always in eval mode (the
    evaluator reads them from the JSON). Per image at most max_num_instances instances are kept,
    the largest by area; `truncated_image_ids` lists the images that had more. Annotations with
    an empty box or no usable segmentation are dropped. With train and augment, each sample gets
    a random horizontal flip and a random scale in scale_range on top of the fit-to-image_size
    scale, then a random crop / pad to image_size; instances left with a box under 1 px are
    dropped. Randomness comes from torch's RNG, which DataLoader seeds per worker.
    """

    def __init__(self, json_file, image_dir, image_size=(512, 512), train=True, augment=False,
                 skip_crowd=True, gt_mask_size=112, max_num_instances=200, scale_range=(0.8, 1.25),
                 max_images=None):
        self.json_file = os.fspath(json_file)
        self.image_dir = os.fspath(image_dir)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.train = bool(train)
        self.augment = bool(augment) and self.train
        self.skip_crowd = bool(skip_crowd) if self.train else True
        self.gt_mask_size = int(gt_mask_size)
        self.max_num_instances = int(max_num_instances)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        if self.max_num_instances < 1 or self.gt_mask_size < 1:
            raise ValueError("max_num_instances and gt_mask_size must be >= 1")
        if not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"scale_range must satisfy 0 < min <= max, got {scale_range}")

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
            self._instances[image_id] = self._select(image_id)
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

    def _select(self, image_id: int) -> list[tuple[np.ndarray, int, dict]]:
        """Usable annotations of one image as (box (x1, y1, x2, y2) original px, label, ann)."""
        picked = []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0) and self.skip_crowd:
                continue
            segm = ann["segmentation"]
            if isinstance(segm, list):
                # Polygons need >= 3 points; an annotation with none cannot give a mask.
                if not _polygons(segm):
                    self.num_dropped_annotations += 1
                    continue
            elif not (isinstance(segm, dict) and "counts" in segm and "size" in segm):
                raise DataError(f"{self.json_file}: annotation {ann['id']} has a segmentation that is "
                                f"neither a list of polygons nor an RLE dict with 'size' and 'counts'")
            box = self._box_of(ann)
            if box is None:
                self.num_dropped_annotations += 1
                continue
            area = float(ann.get("area", (box[2] - box[0]) * (box[3] - box[1])))
            picked.append((area, box, self._label_of[ann["category_id"]], ann))
        if len(picked) > self.max_num_instances:
            self.truncated_image_ids.append(image_id)
            # Stable sort: equal areas keep the file's order.
            picked = sorted(picked, key=lambda p: -p[0])[:self.max_num_instances]
        return [(box, label, ann) for _, box, label, ann in picked]

    def _box_of(self, ann: dict) -> np.ndarray | None:
        info = self.coco.imgs[ann["image_id"]]
        bbox = ann.get("bbox")
        if bbox is None:  # some converters omit it: take the mask's own box
            bbox = mask_utils.toBbox(self._full_rle(ann, info)).tolist()
        try:
            x, y, w, h = (float(v) for v in bbox)
        except (TypeError, ValueError) as e:
            raise DataError(f"{self.json_file}: annotation {ann['id']} has bbox {bbox!r}; "
                            f"expected [x, y, width, height]") from e
        x1, y1 = max(0.0, x), max(0.0, y)
        x2, y2 = min(float(info["width"]), x + w), min(float(info["height"]), y + h)
        if not (x2 > x1 and y2 > y1):
            return None
        return np.array([x1, y1, x2, y2], dtype=np.float64)

    def _full_rle(self, ann: dict, info: dict) -> dict:
        segm = ann["segmentation"]
        height, width = int(info["height"]), int(info["width"])
        if isinstance(segm, list):
            return mask_utils.merge(mask_utils.frPyObjects(_polygons(segm), height, width))
        if list(segm["size"]) != [height, width]:
            raise DataError(f"{self.json_file}: annotation {ann['id']} has an RLE of size "
                            f"{list(segm['size'])}, but image {info['id']} is {[height, width]} (h, w)")
        if isinstance(segm["counts"], list):  # uncompressed RLE
            return mask_utils.frPyObjects(segm, height, width)
        return segm

    def _mask_crop(self, ann: dict, box: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """Binary mask of `ann` inside its (integer-expanded) box: (uint8 [h', w'], origin (x, y))."""
        info = self.coco.imgs[ann["image_id"]]
        x0, y0 = math.floor(box[0]), math.floor(box[1])
        x1 = min(int(info["width"]), math.ceil(box[2]))
        y1 = min(int(info["height"]), math.ceil(box[3]))
        segm = ann["segmentation"]
        if isinstance(segm, list):
            # Rasterize the polygons in the box's own frame: an integer shift does not change which
            # pixels pycocotools fills, and it avoids a full-image mask per instance.
            polys = [[v - (x0 if k % 2 == 0 else y0) for k, v in enumerate(p)]
                     for p in _polygons(segm)]
            rle = mask_utils.merge(mask_utils.frPyObjects(polys, y1 - y0, x1 - x0))
            return mask_utils.decode(rle), (x0, y0)
        full = mask_utils.decode(self._full_rle(ann, info))
        return full[y0:y1, x0:x1], (x0, y0)

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
                            f"{self.json_file} says {info['height']}x{info['width']}")

        flip, offset = False, (0, 0)
        if self.augment:
            flip = bool(torch.rand(()) < 0.5)
            lo, hi = self.scale_range
            jitter = lo + (hi - lo) * float(torch.rand(()))
            frac = torch.rand(2).tolist()
            scale, resized, offset = T.jitter_geometry(height, width, self.image_size, jitter, frac)
            if flip:
                image = T.flip_image(image)
            image = T.crop_and_pad(T.resize_image(image, resized, scale), offset, self.image_size)
        else:
            image, scale = T.resize_and_pad(image, self.image_size)
            resized = T.resized_shape(height, width, scale)
        limits = (min(self.image_size[1], resized[1] - offset[0]),
                  min(self.image_size[0], resized[0] - offset[1]))

        boxes, classes, masks = self._targets(self._instances[image_id], width, scale, offset,
                                              limits, flip)
        m, s = self.max_num_instances, self.gt_mask_size
        n = len(classes)
        out_boxes = torch.zeros((m, 4), dtype=torch.float32)
        out_classes = torch.zeros((m,), dtype=torch.int64)
        out_masks = torch.zeros((m, s, s), dtype=torch.uint8)
        if n:
            out_boxes[:n] = boxes
            out_classes[:n] = torch.as_tensor(classes, dtype=torch.int64)
            out_masks[:n] = torch.from_numpy(np.stack(masks))
        return {"image": image, "boxes": out_boxes, "classes": out_classes, "masks": out_masks,
                "num_instances": n, "image_id": int(image_id), "scale": float(scale),
                "orig_size": (height, width)}

    def _targets(self, instances, width, scale, offset, limits, flip):
        """Boxes (output frame), labels and S x S masks of the instances that survive the geometry.

        A box cut by the crop is shrunk to the visible part of its mask (so gt boxes stay tight),
        and an instance with no mask pixel left in view is dropped.
        """
        if not instances:
            return torch.zeros((0, 4)), [], []
        src = torch.from_numpy(np.stack([box for box, _, _ in instances]))
        if flip:
            src = T.flip_boxes(src, width)
        out = T.transform_boxes(src, scale, offset, limits)
        clipped = ((out - T.transform_boxes(src, scale, offset, None)).abs() > 1e-6).any(dim=1)
        # The part of each original box that is still in view, in original (unflipped) pixels.
        regions = T.boxes_to_source(out, scale, offset)
        if flip:
            regions = T.flip_boxes(regions, width)
        boxes, classes, masks = [], [], []
        for i in range(len(instances)):
            box_out = out[i]
            if box_out[2] - box_out[0] < 1.0 or box_out[3] - box_out[1] < 1.0:
                continue  # degenerate (or out of view) at the input resolution
            _, label, ann = instances[i]
            crop, origin = self._mask_crop(ann, instances[i][0])
            region = regions[i].tolist()
            if clipped[i]:
                region = _tight_region(crop, origin, region)
                if region is None:
                    continue
                tight = torch.tensor([region], dtype=torch.float64)
                box_out = T.transform_boxes(T.flip_boxes(tight, width) if flip else tight,
                                            scale, offset, limits)[0]
                if box_out[2] - box_out[0] < 1.0 or box_out[3] - box_out[1] < 1.0:
                    continue
            mask = T.crop_and_resize_mask(crop, region, self.gt_mask_size, origin)
            masks.append(np.ascontiguousarray(mask[:, ::-1]) if flip else mask)
            boxes.append(box_out)
            classes.append(label)
        if not boxes:
            return torch.zeros((0, 4)), [], []
        return torch.stack(boxes).float(), classes, masks


def _polygons(segm: list) -> list[list[float]]:
    """The polygons of a COCO polygon segmentation that have at least 3 points."""
    return [p for p in segm if isinstance(p, list) and len(p) >= 6]


def _tight_region(crop: np.ndarray, origin: tuple[int, int], region: list[float]) -> list[float] | None:
    """`region` (x1, y1, x2, y2) shrunk to the extent of the mask pixels inside it; None if none.

    crop: binary mask [h, w] whose pixel [0, 0] is at `origin` (x, y) in the region's frame.
    """
    ox, oy = origin
    x1, y1, x2, y2 = region
    c0, c1 = max(0, math.floor(x1) - ox), min(crop.shape[1], math.ceil(x2) - ox)
    r0, r1 = max(0, math.floor(y1) - oy), min(crop.shape[0], math.ceil(y2) - oy)
    if c1 <= c0 or r1 <= r0:
        return None
    sub = crop[r0:r1, c0:c1]
    cols, rows = np.flatnonzero(sub.any(axis=0)), np.flatnonzero(sub.any(axis=1))
    if cols.size == 0:
        return None
    return [max(x1, ox + c0 + cols[0]), max(y1, oy + r0 + rows[0]),
            min(x2, ox + c0 + cols[-1] + 1), min(y2, oy + r0 + rows[-1] + 1)]
