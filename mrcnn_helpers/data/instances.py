"""Fixed-shape Mask R-CNN samples from an image and its instances: the geometry every dataset shares.

CocoInstanceDataset (JSON + image folder) and TfRecordInstanceDataset (TLT's TFRecord shards)
differ only in where the image, the boxes and the masks come from; both turn them into the same
sample dict here, so a model sees identical tensors whichever source the spec names:

  "image"          uint8 Tensor[3, H, W]   resized (aspect kept) and zero-padded bottom / right
  "boxes"          float32 Tensor[M, 4]    (x1, y1, x2, y2) in padded-input pixels; rows >= n are 0
  "classes"        int64 Tensor[M]         contiguous labels 1..K; 0 for padding rows
  "masks"          uint8 Tensor[M, S, S]   each gt mask cropped to its box, resampled to S x S,
                                           0..255 (area-averaged); 0 for padding rows
  "num_instances"  int,  "image_id": int (COCO id),  "scale": float (resized / original),
  "orig_size"      (h, w) of the original image
with M = max_num_instances, S = gt_mask_size and (H, W) = image_size.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from . import transforms as T


class InstanceSampleDataset(Dataset):
    """Base class: holds the sample options and builds samples (see module doc).

    Subclasses provide `__len__`, `__getitem__` and `_mask_crop(source, box)`, and call
    `_sample(image, image_id, instances)` where instances is a list of (box, label, source):
    box float64 [4] (x1, y1, x2, y2) in original pixels, clipped to the image and non-empty;
    label the contiguous class; source whatever `_mask_crop` needs to produce the mask.
    """

    def __init__(self, image_size=(512, 512), train=True, augment=False, skip_crowd=True,
                 gt_mask_size=112, max_num_instances=200, scale_range=(0.8, 1.25)):
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

    def _mask_crop(self, source, box: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """Binary mask of one instance inside its (integer-expanded) box: (uint8 [h', w'],
        origin (x, y) of pixel [0, 0] in original pixels)."""
        raise NotImplementedError

    def _keep_largest(self, picked: list[tuple[float, np.ndarray, int, object]]) -> tuple[list, bool]:
        """At most max_num_instances of (area, box, label, source), the largest by area (a stable
        sort: equal areas keep their order). Returns (list of (box, label, source), truncated)."""
        truncated = len(picked) > self.max_num_instances
        if truncated:
            picked = sorted(picked, key=lambda p: -p[0])[:self.max_num_instances]
        return [(box, label, source) for _, box, label, source in picked], truncated

    def _sample(self, image: torch.Tensor, image_id: int, instances: list) -> dict:
        """The sample dict of the module doc for uint8 image [3, h, w] and its instances."""
        height, width = int(image.shape[1]), int(image.shape[2])
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

        boxes, classes, masks = self._targets(instances, width, scale, offset, limits, flip)
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
            box, label, source = instances[i]
            crop, origin = self._mask_crop(source, box)
            region = regions[i].tolist()
            if clipped[i]:
                region = tight_region(crop, origin, region)
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


def box_pixel_window(box: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """Integer pixel window (x0, y0, x1, y1) covering a box in an image of width x height."""
    return (math.floor(box[0]), math.floor(box[1]),
            min(int(width), math.ceil(box[2])), min(int(height), math.ceil(box[3])))


def tight_region(crop: np.ndarray, origin: tuple[int, int], region: list[float]) -> list[float] | None:
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
