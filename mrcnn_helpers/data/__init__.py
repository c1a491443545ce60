"""Input pipeline: synthetic dataset, COCO instances dataset, transforms, batching and loaders."""

from .coco import CocoInstanceDataset, load_coco, load_image
from .loader import (
    build_eval_dataset,
    build_eval_loader,
    build_train_dataset,
    build_train_loader,
    collate_batch,
)
from .synthetic import CLASS_NAMES as SYNTHETIC_CLASS_NAMES
from .synthetic import generate_synthetic_dataset
from .transforms import crop_and_resize_mask, flip_boxes, flip_masks, resize_and_pad

__all__ = [
    "SYNTHETIC_CLASS_NAMES",
    "CocoInstanceDataset",
    "build_eval_dataset",
    "build_eval_loader",
    "build_train_dataset",
    "build_train_loader",
    "collate_batch",
    "crop_and_resize_mask",
    "flip_boxes",
    "flip_masks",
    "generate_synthetic_dataset",
    "load_coco",
    "load_image",
    "resize_and_pad",
]
