"""Input pipeline: datasets (COCO JSON, TFRecord), transforms, batching and loaders, plus the data
tools: synthetic generator, COCO download, converters, the dataset doctor and TFRecord writing.

Names are imported on first use (PEP 562), so `mrcnn --help` and the CLI's argument parsing,
which import data.commands, do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> (submodule, attribute)
_EXPORTS = {
    "CocoInstanceDataset": ("coco", "CocoInstanceDataset"),
    "load_coco": ("coco", "load_coco"),
    "IMAGE_EXTENSIONS": ("images", "IMAGE_EXTENSIONS"),
    "decode_image": ("images", "decode_image"),
    "list_image_files": ("images", "list_image_files"),
    "load_image": ("images", "load_image"),
    "coco_merge": ("coco_edit", "coco_merge"),
    "coco_subset": ("coco_edit", "coco_subset"),
    "TfRecordInstanceDataset": ("coco_tfrecord", "TfRecordInstanceDataset"),
    "write_coco_tfrecords": ("coco_tfrecord", "write_coco_tfrecords"),
    "convert_labelme": ("labelme", "convert_labelme"),
    "convert_mask_folder": ("convert", "convert_mask_folder"),
    "convert_voc": ("convert", "convert_voc"),
    "DoctorReport": ("doctor", "DoctorReport"),
    "check_dataset": ("doctor", "check_dataset"),
    "fix_dataset": ("doctor", "fix_dataset"),
    "download_coco": ("download", "download_coco"),
    "build_eval_dataset": ("loader", "build_eval_dataset"),
    "build_eval_loader": ("loader", "build_eval_loader"),
    "build_train_dataset": ("loader", "build_train_dataset"),
    "build_train_loader": ("loader", "build_train_loader"),
    "collate_batch": ("loader", "collate_batch"),
    "SYNTHETIC_CLASS_NAMES": ("synthetic", "CLASS_NAMES"),
    "generate_synthetic_dataset": ("synthetic", "generate_synthetic_dataset"),
    "crop_and_resize_mask": ("transforms", "crop_and_resize_mask"),
    "flip_boxes": ("transforms", "flip_boxes"),
    "flip_masks": ("transforms", "flip_masks"),
    "resize_and_pad": ("transforms", "resize_and_pad"),
}

__all__ = [
    "IMAGE_EXTENSIONS",
    "SYNTHETIC_CLASS_NAMES",
    "CocoInstanceDataset",
    "DoctorReport",
    "TfRecordInstanceDataset",
    "build_eval_dataset",
    "build_eval_loader",
    "build_train_dataset",
    "build_train_loader",
    "check_dataset",
    "coco_merge",
    "coco_subset",
    "collate_batch",
    "convert_labelme",
    "convert_mask_folder",
    "convert_voc",
    "crop_and_resize_mask",
    "decode_image",
    "download_coco",
    "fix_dataset",
    "flip_boxes",
    "flip_masks",
    "generate_synthetic_dataset",
    "list_image_files",
    "load_coco",
    "load_image",
    "resize_and_pad",
    "write_coco_tfrecords",
]


def __getattr__(name: str):
    try:
        module, attribute = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), attribute)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .coco import CocoInstanceDataset, load_coco
    from .coco_edit import coco_merge, coco_subset
    from .coco_tfrecord import TfRecordInstanceDataset, write_coco_tfrecords
    from .convert import convert_mask_folder, convert_voc
    from .doctor import DoctorReport, check_dataset, fix_dataset
    from .download import download_coco
    from .images import IMAGE_EXTENSIONS, decode_image, list_image_files, load_image
    from .labelme import convert_labelme
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
