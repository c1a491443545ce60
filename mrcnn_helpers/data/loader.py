"""Batching and DataLoaders for training and evaluation, built from the spec.

Reads only: spec.data_config.{train_json_file, train_image_dir, val_json_file, val_image_dir,
training_file_pattern, validation_file_pattern, image_size, augment_input_data,
skip_crowd_during_training, max_num_instances, n_workers, eval_samples, num_classes,
aug_scale_min, aug_scale_max}, spec.maskrcnn_config.gt_mask_size, spec.train_batch_size,
spec.eval_batch_size and spec.seed. Paths are used as given (relative to the working directory).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..errors import DataError
from .coco import CocoInstanceDataset


def collate_batch(samples: list[dict]) -> dict:
    """Stack samples of CocoInstanceDataset into a batch.

    Returns "image" uint8 [B, 3, H, W], "boxes" float32 [B, M, 4], "classes" int64 [B, M],
    "masks" uint8 [B, M, S, S], "num_instances" int64 [B], "image_id" int64 [B], "scale"
    float32 [B], "orig_size" list of (h, w) tuples.
    """
    if not samples:
        raise ValueError("collate_batch needs at least one sample")
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "boxes": torch.stack([s["boxes"] for s in samples]),
        "classes": torch.stack([s["classes"] for s in samples]),
        "masks": torch.stack([s["masks"] for s in samples]),
        "num_instances": torch.tensor([int(s["num_instances"]) for s in samples], dtype=torch.int64),
        "image_id": torch.tensor([int(s["image_id"]) for s in samples], dtype=torch.int64),
        "scale": torch.tensor([float(s["scale"]) for s in samples], dtype=torch.float32),
        "orig_size": [tuple(int(v) for v in s["orig_size"]) for s in samples],
    }


class EpochShuffleSampler(DistributedSampler):
    """DistributedSampler that moves to the next epoch by itself each time it is iterated.

    Rank r of world_size takes indices r, r + world_size, ... of one permutation seeded by
    (seed + epoch), so ranks see disjoint, equal-size shards and every pass over the loader is
    freshly shuffled without the trainer calling set_epoch (it still may, e.g. on resume).
    """

    def __iter__(self):
        indices = super().__iter__()  # computed now, for the current epoch
        self.set_epoch(self.epoch + 1)
        return indices


def _json_source(json_file: str, pattern: str, json_field: str, pattern_field: str) -> str:
    if json_file:
        return json_file
    if pattern:
        raise DataError(f"data_config.{pattern_field} = '{pattern}' asks for TFRecord input, which is "
                        f"not supported yet; set data_config.{json_field} (and the image directory) "
                        f"to a COCO instances JSON instead")
    raise DataError(f"data_config.{json_field} is empty; set it to a COCO instances JSON file")


def _check_num_classes(spec, dataset: CocoInstanceDataset) -> None:
    num_classes = int(spec.data_config.num_classes)
    if num_classes < len(dataset.class_names):
        raise DataError(f"data_config.num_classes = {num_classes}, but {dataset.json_file} has "
                        f"{len(dataset.class_names) - 1} categories; num_classes must be at least "
                        f"{len(dataset.class_names)} (categories + background)")


def build_train_dataset(spec) -> CocoInstanceDataset:
    """The training CocoInstanceDataset described by the spec (augmentation as configured)."""
    dc = spec.data_config
    json_file = _json_source(dc.train_json_file, dc.training_file_pattern, "train_json_file",
                             "training_file_pattern")
    dataset = CocoInstanceDataset(
        json_file, dc.train_image_dir, image_size=tuple(dc.image_size), train=True,
        augment=dc.augment_input_data, skip_crowd=dc.skip_crowd_during_training,
        gt_mask_size=spec.maskrcnn_config.gt_mask_size, max_num_instances=dc.max_num_instances,
        scale_range=(dc.aug_scale_min, dc.aug_scale_max))
    _check_num_classes(spec, dataset)
    return dataset


def build_train_loader(spec, *, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Shuffled, drop_last training DataLoader of batches of spec.train_batch_size (per rank).

    Each rank gets a disjoint shard (DistributedSampler semantics; the permutation is seeded from
    spec.seed and changes every pass). Augmentation draws from torch's RNG: in workers it is
    seeded from spec.seed and rank; with n_workers = 0 it is the process's global RNG.
    Iterate it repeatedly for as many steps as needed. loader.sampler.set_epoch(e) restarts the
    shuffle sequence at epoch e (for resuming).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    dataset = build_train_dataset(spec)
    batch_size = int(spec.train_batch_size)
    per_rank = len(dataset) // world_size
    if per_rank < batch_size:
        raise DataError(f"{dataset.json_file} has {len(dataset)} images: {per_rank} per rank for "
                        f"{world_size} rank(s), fewer than train_batch_size = {batch_size}")
    sampler = EpochShuffleSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                  seed=int(spec.seed), drop_last=True)
    generator = torch.Generator().manual_seed(int(spec.seed) * 1000 + rank)
    workers = int(spec.data_config.n_workers)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                      num_workers=workers, persistent_workers=workers > 0,
                      collate_fn=collate_batch, generator=generator,
                      pin_memory=torch.cuda.is_available())


def build_eval_dataset(spec, max_images: int | None = None) -> CocoInstanceDataset:
    """The validation CocoInstanceDataset (no augmentation), capped at data_config.eval_samples when
    > 0 and at max_images when given (the first images in id order)."""
    dc = spec.data_config
    json_file = _json_source(dc.val_json_file, dc.validation_file_pattern, "val_json_file",
                             "validation_file_pattern")
    limit = int(dc.eval_samples) if int(dc.eval_samples) > 0 else None
    if max_images is not None:
        limit = int(max_images) if limit is None else min(limit, int(max_images))
    dataset = CocoInstanceDataset(
        json_file, dc.val_image_dir, image_size=tuple(dc.image_size), train=False, augment=False,
        skip_crowd=True, gt_mask_size=spec.maskrcnn_config.gt_mask_size,
        max_num_instances=dc.max_num_instances, max_images=limit)
    _check_num_classes(spec, dataset)
    return dataset


def build_eval_loader(spec, max_images: int | None = None) -> DataLoader:
    """DataLoader over the validation split in image-id order, batches of spec.eval_batch_size
    (the last one may be smaller). loader.dataset is the CocoInstanceDataset (its .coco is the
    ground truth for evaluation)."""
    dataset = build_eval_dataset(spec, max_images)
    workers = int(spec.data_config.n_workers)
    return DataLoader(dataset, batch_size=int(spec.eval_batch_size), shuffle=False, drop_last=False,
                      num_workers=workers, collate_fn=collate_batch,
                      pin_memory=torch.cuda.is_available())
