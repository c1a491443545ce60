"""Batching and DataLoaders for training and evaluation, built from the spec.

Reads only: spec.data_config.{train_json_file, train_image_dir, val_json_file, val_image_dir,
training_file_pattern, validation_file_pattern, image_size, augment_input_data,
skip_crowd_during_training, max_num_instances, n_workers, eval_samples, num_classes,
aug_scale_min, aug_scale_max}, spec.maskrcnn_config.gt_mask_size, spec.train_batch_size,
spec.eval_batch_size and spec.seed. Paths are used as given (relative to the working directory).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from ..errors import DataError
from .coco import CocoInstanceDataset, load_coco
from .coco_tfrecord import TfRecordInstanceDataset, tfrecord_files


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


class StreamingEpochSampler(Sampler[int]):
    """The training indices of epoch e, e+1, e+2, ... as one endless stream.

    Epoch e is DistributedSampler's (drop_last) shard of one permutation seeded by seed + e, cut
    to whole batches. One endless stream instead of one iterator per epoch keeps the loader's
    workers decoding ahead across epoch boundaries: with a dozen images an epoch is a step or
    two, and a new iterator per epoch would make each such step wait for its batch to be decoded
    from scratch. len() is one epoch; set_epoch(e) restarts the stream at epoch e (resuming), so
    a resumed run sees the batches an uninterrupted one sees from that epoch on.
    """

    def __init__(self, dataset, *, num_replicas: int, rank: int, seed: int, batch_size: int):
        self.shards = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank,
                                         shuffle=True, seed=seed, drop_last=True)
        self.per_epoch = len(self.shards) // batch_size * batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.per_epoch

    def __iter__(self):
        epoch = self.epoch
        while True:
            self.shards.set_epoch(epoch)
            yield from list(self.shards)[:self.per_epoch]
            epoch += 1


def _json_source(json_file: str, json_field: str, pattern_field: str) -> str:
    """`json_file`, or a DataError saying which field to set."""
    if json_file:
        return json_file
    raise DataError(f"data_config.{json_field} is empty; set it to a COCO instances JSON file, or "
                    f"set data_config.{pattern_field} to TFRecord files")


def _check_num_classes(spec, dataset) -> None:
    num_classes = int(spec.data_config.num_classes)
    if num_classes < len(dataset.class_names):
        raise DataError(f"data_config.num_classes = {num_classes}, but {dataset.source} has "
                        f"{len(dataset.class_names) - 1} categories; num_classes must be at least "
                        f"{len(dataset.class_names)} (categories + background)")


def _sample_options(spec, train: bool) -> dict:
    dc = spec.data_config
    options = {"image_size": tuple(dc.image_size), "gt_mask_size": spec.maskrcnn_config.gt_mask_size,
               "max_num_instances": dc.max_num_instances, "train": train}
    if train:
        options.update(augment=dc.augment_input_data, skip_crowd=dc.skip_crowd_during_training,
                       scale_range=(dc.aug_scale_min, dc.aug_scale_max))
    else:
        options.update(augment=False, skip_crowd=True)
    return options


def _tfrecord_categories(spec) -> tuple[list[dict] | None, object]:
    """(categories, ground-truth COCO) from data_config.val_json_file, or (None, None) if unset.

    As in TLT, the validation JSON names the categories: its sorted ids define the contiguous
    labels for training from TFRecords too, so training and evaluation agree.
    """
    json_file = spec.data_config.val_json_file
    if not json_file:
        return None, None
    coco = load_coco(json_file)
    return list(coco.dataset["categories"]), coco


def build_train_dataset(spec, *, rank: int = 0, world_size: int = 1):
    """The training dataset described by the spec (augmentation as configured).

    data_config.train_json_file (+ train_image_dir) gives a CocoInstanceDataset; when it is empty
    and training_file_pattern is set, a TfRecordInstanceDataset over the matching files. With
    several data-parallel ranks and at least as many files as ranks, rank r reads only files
    r, r + world_size, ... (as TLT shards its input); the dataset's `rank_shard` attribute is then
    True and the loader must not split it again.
    """
    dc = spec.data_config
    if not dc.train_json_file and dc.training_file_pattern:
        files = tfrecord_files(dc.training_file_pattern, "data_config.training_file_pattern")
        rank_shard = world_size > 1 and len(files) >= world_size
        categories, _ = _tfrecord_categories(spec)
        dataset = TfRecordInstanceDataset(files[rank::world_size] if rank_shard else files,
                                          categories=categories, **_sample_options(spec, True))
        dataset.rank_shard = rank_shard
    else:
        json_file = _json_source(dc.train_json_file, "train_json_file", "training_file_pattern")
        dataset = CocoInstanceDataset(json_file, dc.train_image_dir, **_sample_options(spec, True))
    _check_num_classes(spec, dataset)
    return dataset


def build_train_loader(spec, *, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Shuffled, drop_last training DataLoader of batches of spec.train_batch_size (per rank).

    Each rank gets a disjoint shard: whole TFRecord files when the dataset was split by file
    (see build_train_dataset), otherwise every world_size-th index of one permutation
    (DistributedSampler semantics). The permutation is seeded from spec.seed and changes every
    pass. Augmentation draws from torch's RNG: in workers it is seeded from spec.seed and rank;
    with n_workers = 0 it is the process's global RNG. The loader never ends: it streams epoch
    after epoch (StreamingEpochSampler), len(loader) is the batches of one epoch, and
    loader.sampler.set_epoch(e) restarts the stream at epoch e (resuming).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    dataset = build_train_dataset(spec, rank=rank, world_size=world_size)
    batch_size = int(spec.train_batch_size)
    split_here = not getattr(dataset, "rank_shard", False)
    replicas = world_size if split_here else 1
    per_rank = len(dataset) // replicas
    if per_rank < batch_size:
        raise DataError(f"{dataset.source} has {len(dataset)} images: {per_rank} for rank {rank} "
                        f"of {world_size}, fewer than train_batch_size = {batch_size}")
    sampler = StreamingEpochSampler(dataset, num_replicas=replicas,
                                    rank=rank if split_here else 0, seed=int(spec.seed),
                                    batch_size=batch_size)
    generator = torch.Generator().manual_seed(int(spec.seed) * 1000 + rank)
    workers = int(spec.data_config.n_workers)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                      num_workers=workers, persistent_workers=workers > 0,
                      collate_fn=collate_batch, generator=generator,
                      pin_memory=torch.cuda.is_available())


def build_eval_dataset(spec, max_images: int | None = None):
    """The validation dataset (no augmentation), capped at data_config.eval_samples when > 0 and
    at max_images when given (the first images: in id order for JSON, in record order for
    TFRecords).

    val_json_file + val_image_dir give a CocoInstanceDataset. With val_image_dir empty and
    validation_file_pattern set (TLT's specs), the images come from the TFRecords and
    val_json_file is the ground truth for the metrics, as in TLT.
    """
    dc = spec.data_config
    limit = int(dc.eval_samples) if int(dc.eval_samples) > 0 else None
    if max_images is not None:
        limit = int(max_images) if limit is None else min(limit, int(max_images))
    if dc.validation_file_pattern and not dc.val_image_dir:
        if not dc.val_json_file:
            raise DataError("evaluating from data_config.validation_file_pattern needs "
                            "data_config.val_json_file: the COCO ground truth of those records")
        files = tfrecord_files(dc.validation_file_pattern, "data_config.validation_file_pattern")
        categories, coco = _tfrecord_categories(spec)
        dataset = TfRecordInstanceDataset(files, categories=categories, coco=coco,
                                          max_images=limit, **_sample_options(spec, False))
    else:
        json_file = _json_source(dc.val_json_file, "val_json_file", "validation_file_pattern")
        dataset = CocoInstanceDataset(json_file, dc.val_image_dir, max_images=limit,
                                      **_sample_options(spec, False))
    _check_num_classes(spec, dataset)
    return dataset


def build_eval_loader(spec, max_images: int | None = None) -> DataLoader:
    """DataLoader over the validation split in image-id order, batches of spec.eval_batch_size
    (the last one may be smaller). loader.dataset is the CocoInstanceDataset or
    TfRecordInstanceDataset (its .coco is the ground truth for evaluation)."""
    dataset = build_eval_dataset(spec, max_images)
    workers = int(spec.data_config.n_workers)
    return DataLoader(dataset, batch_size=int(spec.eval_batch_size), shuffle=False, drop_last=False,
                      num_workers=workers, collate_fn=collate_batch,
                      pin_memory=torch.cuda.is_available())
