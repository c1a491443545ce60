"""Validation of a whole spec: types, ranges and cross-field rules.

`validate_spec` is what `load_spec` runs after parsing; call it again after changing a spec with
`dataclasses.replace`. It raises SpecFieldError (a SpecError) naming the field, its value and what
would be valid, and warns (SpecWarning) about specs that load but will probably train badly.
Size-like fields have upper bounds (SIZE_LIMITS) and one batch's estimated memory must fit one
device (estimate_batch_memory, MAX_BATCH_BYTES), so a spec that validates never asks for an
absurd allocation.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from typing import Any

from mrcnn_helpers.errors import SpecError

from .config import DataConfig, ExperimentSpec, MaskRCNNConfig
from .errors import SpecFieldError, SpecWarning
from .schema import BLOCKS, dotted, field_types, scalar_kind
from .values import coerce, format_literal, format_value, is_finite_number, parse_literal, quote

# ResNet depths TLT ships backbones for.
RESNET_DEPTHS = (10, 18, 34, 50, 101)
# TLT's freeze_blocks numbering for ResNet: 0 = stem (conv1 + bn1), 1..4 = layer1..layer4.
RESNET_BLOCKS = range(5)
# FPN levels the model can build: P2 (stride 4, from layer1) to P6 (stride 64, pooled from P5).
MIN_FPN_LEVEL, MAX_FPN_LEVEL = 2, 6
# Upper bounds of the size-like fields: far past any real experiment (TLT's COCO spec is 3 x
# 832x1344 images, 200 instances, 112 px masks), they stop values that would allocate without
# bound (a few zeros too many) with the field named, before anything is built.
MAX_IMAGE_SIDE = 16384
SIZE_LIMITS = {
    "train_batch_size": 1024, "eval_batch_size": 1024,
    "data_config.max_num_instances": 10_000, "data_config.num_classes": 100_000,
    "data_config.n_workers": 256,
    "maskrcnn_config.gt_mask_size": 1024, "maskrcnn_config.mrcnn_resolution": 256,
    "maskrcnn_config.rpn_batch_size_per_im": 100_000, "maskrcnn_config.batch_size_per_im": 100_000,
    "maskrcnn_config.fast_rcnn_mlp_head_dim": 16384,
    "maskrcnn_config.train_rpn_pre_nms_topn": 100_000,
    "maskrcnn_config.train_rpn_post_nms_topn": 100_000,
    "maskrcnn_config.test_rpn_pre_nms_topn": 100_000,
    "maskrcnn_config.test_rpn_post_nms_topn": 100_000,
    "maskrcnn_config.test_detections_per_image": 10_000,
    "maskrcnn_config.num_scales": 16, "maskrcnn_config.anchor_scale": 1024,
}
MAX_ASPECT_RATIOS = 16
# What one device may hold for one batch (estimate_batch_memory); the largest GPUs have 141 GB,
# and the estimate leaves out the activations, which take more than everything it counts.
MAX_BATCH_BYTES = 64 * 2**30


def _shown(value: Any, hint: Any) -> str:
    if scalar_kind(hint) == "literal" and isinstance(value, (tuple, list)):
        return quote(format_literal(value, hint))
    if isinstance(value, str):
        return quote(value)
    return format_value(value)


def _normalized(spec: ExperimentSpec) -> ExperimentSpec:
    """Each field coerced to its declared type (lists -> tuples, ints -> floats where numbers are
    expected, list-valued strings parsed); wrong types raise SpecFieldError."""
    if not isinstance(spec, ExperimentSpec):
        raise SpecError(f"expected an ExperimentSpec, got {type(spec).__name__}")

    def block_values(obj: Any, block: str) -> dict[str, Any]:
        if not isinstance(obj, BLOCKS[block]):
            raise SpecFieldError(block, f"{block} must be a {BLOCKS[block].__name__}, got "
                                        f"{type(obj).__name__}", source=spec.source)
        values = {}
        for name, hint in field_types(block).items():
            value, field = getattr(obj, name), dotted(block, name)
            kind = scalar_kind(hint)
            if kind == "block":
                continue
            if kind == "literal" and isinstance(value, str):
                example = format_literal(getattr(BLOCKS[block](), name), hint)
                value = parse_literal(value, hint, field, example)
            values[name] = coerce(value, hint, field)
            if kind == "float" and not is_finite_number(values[name]):
                raise SpecFieldError(field, f"{field} = {value!r}: must be a finite number")
        return values

    try:
        data = DataConfig(**block_values(spec.data_config, "data_config"))
        model = MaskRCNNConfig(**block_values(spec.maskrcnn_config, "maskrcnn_config"))
        top = block_values(spec, "")
    except SpecFieldError as exc:
        raise exc.located(spec.source, None, None) from None
    return ExperimentSpec(**top, data_config=data, maskrcnn_config=model, source=spec.source)


class _Checker:
    """Collects the rule checks of one spec; the first failing rule raises."""

    def __init__(self, spec: ExperimentSpec):
        self.spec = spec

    def value(self, field: str) -> Any:
        obj: Any = self.spec
        for part in field.split("."):
            obj = getattr(obj, part)
        return obj

    def require(self, ok: bool, field: str, rule: str, related: tuple[str, ...] = ()) -> None:
        if ok:
            return
        block, _, name = field.rpartition(".")
        shown = _shown(self.value(field), field_types(block)[name])
        raise SpecFieldError(field, f"{field} = {shown}: {rule}", source=self.spec.source,
                             related=related)

    def positive(self, *fields: str) -> None:
        for field in fields:
            self.require(self.value(field) > 0, field, "must be > 0")

    def non_negative(self, *fields: str) -> None:
        for field in fields:
            self.require(self.value(field) >= 0, field, "must be >= 0")

    def at_most(self, field: str, limit: float) -> None:
        self.require(self.value(field) <= limit, field,
                     f"must be at most {limit:g} (valid: {'1' if limit >= 1 else '0'}..{limit:g}); "
                     "larger values only exhaust memory")

    def fraction(self, *fields: str) -> None:
        for field in fields:
            self.require(0.0 <= self.value(field) <= 1.0, field, "must be in [0, 1]")


def _check_schedule(c: _Checker, spec: ExperimentSpec) -> None:
    c.positive("total_steps", "train_batch_size", "eval_batch_size", "num_steps_per_eval",
               "logging_frequency", "num_checkpoints_to_keep", "init_learning_rate")
    c.non_negative("warmup_learning_rate", "l2_weight_decay")
    c.require(0.0 <= spec.momentum < 1.0, "momentum", "must be in [0, 1), typically 0.9")
    steps, levels = spec.learning_rate_steps, spec.learning_rate_decay_levels
    c.require(len(steps) == len(levels), "learning_rate_steps",
              f"has {len(steps)} steps but learning_rate_decay_levels has {len(levels)} levels; "
              "give one decay level per step", ("learning_rate_decay_levels",))
    c.require(all(b > a for a, b in itertools.pairwise(steps)), "learning_rate_steps",
              "steps must be strictly increasing")
    c.require(all(0 < s < spec.total_steps for s in steps), "learning_rate_steps",
              f"every step must be > 0 and < total_steps ({spec.total_steps})", ("total_steps",))
    c.require(all(level > 0 for level in levels), "learning_rate_decay_levels",
              "every decay level must be > 0")


def _round_up(size: int, stride: int) -> int:
    return max(stride, -(-size // stride) * stride)


def _check_data(c: _Checker, spec: ExperimentSpec) -> None:
    height, width = spec.data_config.image_size
    stride = 2 ** spec.maskrcnn_config.max_level
    c.require(height > 0 and width > 0 and height % stride == 0 and width % stride == 0,
              "data_config.image_size",
              f"height and width must be positive multiples of 2^max_level = {stride} "
              f"(max_level {spec.maskrcnn_config.max_level}), e.g. \"({_round_up(height, stride)}, "
              f"{_round_up(width, stride)})\"",
              ("maskrcnn_config.max_level",))
    c.require(height <= MAX_IMAGE_SIDE and width <= MAX_IMAGE_SIDE, "data_config.image_size",
              f"height and width must be at most {MAX_IMAGE_SIDE} (valid: multiples of {stride} "
              f"from {stride} to {MAX_IMAGE_SIDE // stride * stride})")
    c.require(spec.data_config.num_classes >= 2, "data_config.num_classes",
              "must be >= 2: the number of object categories + 1 for background")
    c.positive("data_config.eval_samples", "data_config.max_num_instances",
               "data_config.aug_scale_min")
    c.require(spec.data_config.aug_scale_max >= spec.data_config.aug_scale_min,
              "data_config.aug_scale_max",
              f"must be >= aug_scale_min ({spec.data_config.aug_scale_min})",
              ("data_config.aug_scale_min",))


def _check_backbone(c: _Checker, m: MaskRCNNConfig) -> None:
    c.require(m.arch == "resnet", "maskrcnn_config.arch", 'only "resnet" is supported')
    c.require(m.nlayers in RESNET_DEPTHS, "maskrcnn_config.nlayers",
              f"must be one of {', '.join(map(str, RESNET_DEPTHS))}")
    c.require(all(b in RESNET_BLOCKS for b in m.freeze_blocks), "maskrcnn_config.freeze_blocks",
              "block numbers must be within 0..4 (0 = stem conv1/bn1, 1..4 = layer1..layer4), "
              'e.g. "[0, 1]"')
    c.require(MIN_FPN_LEVEL <= m.min_level, "maskrcnn_config.min_level",
              f"must be >= {MIN_FPN_LEVEL} (P2, stride 4, is the finest FPN level)")
    c.require(m.max_level <= MAX_FPN_LEVEL, "maskrcnn_config.max_level",
              f"must be <= {MAX_FPN_LEVEL} (P6, stride 64, is the coarsest FPN level)")
    c.require(m.min_level < m.max_level, "maskrcnn_config.min_level",
              f"must be < max_level ({m.max_level})", ("maskrcnn_config.max_level",))


def _check_heads(c: _Checker, m: MaskRCNNConfig) -> None:
    c.fraction("maskrcnn_config.rpn_positive_overlap", "maskrcnn_config.rpn_negative_overlap",
               "maskrcnn_config.rpn_fg_fraction", "maskrcnn_config.fg_fraction",
               "maskrcnn_config.fg_thresh", "maskrcnn_config.bg_thresh_hi",
               "maskrcnn_config.bg_thresh_lo", "maskrcnn_config.train_rpn_nms_threshold",
               "maskrcnn_config.test_nms", "maskrcnn_config.test_rpn_nms_thresh",
               "maskrcnn_config.test_score_thresh")
    c.require(m.rpn_negative_overlap <= m.rpn_positive_overlap,
              "maskrcnn_config.rpn_negative_overlap",
              f"must be <= rpn_positive_overlap ({m.rpn_positive_overlap})",
              ("maskrcnn_config.rpn_positive_overlap",))
    c.require(m.bg_thresh_lo <= m.bg_thresh_hi, "maskrcnn_config.bg_thresh_lo",
              f"must be <= bg_thresh_hi ({m.bg_thresh_hi})", ("maskrcnn_config.bg_thresh_hi",))
    c.positive(*(f"maskrcnn_config.{name}" for name in (
        "rpn_batch_size_per_im", "batch_size_per_im", "fast_rcnn_mlp_head_dim",
        "train_rpn_pre_nms_topn", "train_rpn_post_nms_topn", "test_rpn_pre_nms_topn",
        "test_rpn_post_nms_topn", "test_detections_per_image", "num_scales", "anchor_scale",
        "gt_mask_size", "mrcnn_resolution")))
    c.non_negative("maskrcnn_config.rpn_min_size", "maskrcnn_config.rpn_box_loss_weight",
                   "maskrcnn_config.fast_rcnn_box_loss_weight",
                   "maskrcnn_config.mrcnn_weight_loss_mask")
    c.require(m.mrcnn_resolution % 4 == 0, "maskrcnn_config.mrcnn_resolution",
              "must be a multiple of 4 (e.g. 28): the mask head upsamples a grid of half this "
              "size by 2")
    c.require(m.gt_mask_size >= m.mrcnn_resolution, "maskrcnn_config.gt_mask_size",
              f"must be >= mrcnn_resolution ({m.mrcnn_resolution}) so mask targets are not "
              "upsampled", ("maskrcnn_config.mrcnn_resolution",))
    c.require(len(m.bbox_reg_weights) == 4 and all(w > 0 for w in m.bbox_reg_weights),
              "maskrcnn_config.bbox_reg_weights",
              'must be 4 positive numbers (wx, wy, ww, wh), e.g. "(10., 10., 5., 5.)"')
    c.require(len(m.aspect_ratios) > 0 and all(x > 0 and y > 0 for x, y in m.aspect_ratios),
              "maskrcnn_config.aspect_ratios",
              'must be a non-empty list of (x, y) pairs of positive numbers, '
              'e.g. "[(1.0, 1.0), (1.4, 0.7), (0.7, 1.4)]"')


def _check_sizes(c: _Checker, m: MaskRCNNConfig) -> None:
    for field, limit in SIZE_LIMITS.items():
        c.at_most(field, limit)
    c.require(len(m.aspect_ratios) <= MAX_ASPECT_RATIOS, "maskrcnn_config.aspect_ratios",
              f"at most {MAX_ASPECT_RATIOS} anchor shapes")


def estimate_batch_memory(spec: ExperimentSpec) -> dict[str, int]:
    """Rough bytes one device holds for one batch, by part (a floor: activations not counted).

    "images": the training batch as uint8 and as its float32 normalized copy; "targets": the
    padded gt boxes and classes; "gt_masks": the padded S x S gt masks (uint8 and float32);
    "mask_head": float32 mask logits of the target class on the positive RoIs, with their
    gradient; "inference_masks": the pasted uint8 masks of test_detections_per_image detections
    at image_size for an evaluation batch; "inference_mask_logits": float32 mask logits of every
    class for those detections (inference computes all classes, as the exported graph does).
    """
    dc, m = spec.data_config, spec.maskrcnn_config
    batch, (height, width) = spec.train_batch_size, dc.image_size
    instances = batch * dc.max_num_instances
    positives = batch * math.ceil(m.batch_size_per_im * m.fg_fraction)
    return {
        "images": batch * 3 * height * width * (1 + 4),
        "targets": instances * (4 * 4 + 8),
        "gt_masks": instances * m.gt_mask_size ** 2 * (1 + 4),
        "mask_head": positives * m.mrcnn_resolution ** 2 * 4 * 2,
        "inference_masks": spec.eval_batch_size * m.test_detections_per_image * height * width,
        "inference_mask_logits": (spec.eval_batch_size * m.test_detections_per_image
                                  * dc.num_classes * m.mrcnn_resolution ** 2 * 4),
    }


_EVALUATION_PARTS = ("inference_masks", "inference_mask_logits")


# Fields that scale each estimate, in the order they are named when one is to be lowered.
_MEMORY_FIELDS = {
    "training": ("train_batch_size", "data_config.image_size", "data_config.max_num_instances",
                 "maskrcnn_config.gt_mask_size", "maskrcnn_config.mrcnn_resolution",
                 "maskrcnn_config.batch_size_per_im"),
    "evaluation": ("eval_batch_size", "maskrcnn_config.test_detections_per_image",
                   "data_config.image_size", "data_config.num_classes",
                   "maskrcnn_config.mrcnn_resolution"),
}


def _memory_need(spec: ExperimentSpec) -> dict[str, int]:
    parts = estimate_batch_memory(spec)
    return {"training": sum(v for k, v in parts.items() if k not in _EVALUATION_PARTS),
            "evaluation": sum(parts[k] for k in _EVALUATION_PARTS)}


def _with_default(spec: ExperimentSpec, field: str) -> ExperimentSpec:
    block, _, name = field.rpartition(".")
    if not block:
        return dataclasses.replace(spec, **{name: getattr(ExperimentSpec(), name)})
    default = getattr(BLOCKS[block](), name)
    return dataclasses.replace(spec, **{block: dataclasses.replace(getattr(spec, block),
                                                                   **{name: default})})


def _check_memory(c: _Checker, spec: ExperimentSpec) -> None:
    """Refuse a spec whose batch cannot fit one device (estimate_batch_memory), naming the
    first field whose default would make it fit (else the first that scales it)."""
    for kind, used in _memory_need(spec).items():
        if used <= MAX_BATCH_BYTES:
            continue
        fields = _MEMORY_FIELDS[kind]
        field = next((f for f in fields
                      if _memory_need(_with_default(spec, f))[kind] <= MAX_BATCH_BYTES), fields[0])
        parts = {k: v for k, v in estimate_batch_memory(spec).items()
                 if (k in _EVALUATION_PARTS) == (kind == "evaluation")}
        shown = ", ".join(f"{k} {v / 2**30:.1f}" for k, v in parts.items())
        others = ", ".join(f for f in fields if f != field)
        c.require(False, field, f"one {kind} batch would need at least {used / 2**30:.0f} GiB "
                  f"({shown} GiB), more than the {MAX_BATCH_BYTES // 2**30} GiB one device has; "
                  f"lower {field} (or {others})", tuple(f for f in fields if f != field))


def validate_spec(spec: ExperimentSpec) -> ExperimentSpec:
    """Check every field and the cross-field rules; return the spec with normalized types.

    Raises SpecFieldError (a SpecError) on the first violated rule, e.g.
    "specs/x.txt: maskrcnn_config.mrcnn_resolution = 30: must be a multiple of 4 (e.g. 28) ...".
    Warns SpecWarning for freeze_bn without a checkpoint (frozen random BatchNorm diverges).
    """
    spec = _normalized(spec)
    checker = _Checker(spec)
    _check_schedule(checker, spec)
    _check_backbone(checker, spec.maskrcnn_config)
    _check_data(checker, spec)
    _check_heads(checker, spec.maskrcnn_config)
    _check_sizes(checker, spec.maskrcnn_config)
    _check_memory(checker, spec)
    if spec.maskrcnn_config.freeze_bn and not spec.checkpoint:
        warnings.warn(
            f"{spec.source}: maskrcnn_config.freeze_bn is true but checkpoint is \"\": frozen "
            "BatchNorm keeps its random initial statistics and training from scratch diverges. "
            "Set freeze_bn: false, or give a pretrained checkpoint.", SpecWarning, stacklevel=2)
    return spec


def check_num_classes(spec: ExperimentSpec, num_categories: int, dataset_name: str) -> None:
    """Raise SpecError unless data_config.num_classes == num_categories + 1 (background).

    `dataset_name` names the annotation file (or dataset) that declares `num_categories`.
    """
    num_classes = spec.data_config.num_classes
    if num_classes != num_categories + 1:
        raise SpecFieldError(
            "data_config.num_classes",
            f"num_classes is {num_classes} but {dataset_name} declares {num_categories} "
            f"categories; num_classes must be categories + 1 = {num_categories + 1}",
            source=spec.source)


def replace_spec(spec: ExperimentSpec, **changes: Any) -> ExperimentSpec:
    """dataclasses.replace on the spec or one of its blocks, then validate_spec.

    Keys are field names, dotted for blocks: replace_spec(spec, total_steps=10,
    **{"data_config.num_classes": 3}).
    """
    blocks: dict[str, dict[str, Any]] = {"": {}, "data_config": {}, "maskrcnn_config": {}}
    for key, value in changes.items():
        block, _, name = key.rpartition(".")
        if block not in blocks or name not in field_types(block):
            raise SpecError(f"{spec.source}: unknown field {key!r}")
        blocks[block][name] = value
    top = dict(blocks[""])
    for block in ("data_config", "maskrcnn_config"):
        if blocks[block]:
            top[block] = dataclasses.replace(top.get(block, getattr(spec, block)),
                                             **blocks[block])
    return validate_spec(dataclasses.replace(spec, **top))
