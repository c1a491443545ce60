"""What each deployment precision costs in accuracy: one table, PyTorch to INT8, always measured.

    table = measure_accuracy(model, spec, workdir="export_check", calibration=batches)
    print(table.format())        # and table.warnings: one line per precision that lost AP

Rows (each on the spec's validation images, through `evaluate_model`, so with the same
preprocessing, mask pasting and COCO evaluation as `mrcnn evaluate`):

    pytorch fp32         the trained model: the reference
    pytorch bf16         autocast (only where CUDA is available)
    onnx fp32            export_onnx's graph in ONNX Runtime
    onnx fp16            precision.convert_to_fp16 of it
    onnx int8            quantize.quantize_int8 of it (calibrated Q/DQ graph)

Columns: box AP, mask AP, mask AP50, the largest box deviation from PyTorch fp32 (input pixels,
on the first `deviation_images` validation images; each PyTorch detection is paired with the
nearest unpaired detection of the same class, so equal scores in another order do not count,
and a large value means a detection moved, changed class or vanished), the images whose
detection count differs, and images/s
of the evaluation loop (loading, inference, pasting, RLE; on the CPU for ONNX Runtime, so it says
nothing about TensorRT's speed). The ONNX graphs are the files TensorRT builds engines from, so
their accuracy is the engines' up to TensorRT's own kernels (measure the engine itself with
`evaluate_model(TensorRTModel(plan), spec)` where TensorRT runs).

A precision that loses more than `tolerance` mask AP (default 0.01 = 1 point) against PyTorch
fp32 gets a warning naming what helps: more calibration images (--batches), another
--cal-method, layers kept in float (--int8-exclude / --fp16-exclude).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mrcnn_helpers.evaluate import evaluate_model
from mrcnn_helpers.inference.backends import OnnxRuntimeModel
from mrcnn_helpers.inference.predictor import as_predictor
from mrcnn_helpers.runtime import resolve_device
from mrcnn_helpers.spec import replace_spec

from .calibration import DEFAULT_PERCENTILE, CalibrationBatches, CalibrationError
from .onnx_export import export_onnx
from .precision import convert_to_fp16
from .quantize import quantize_int8
from .verify import AccuracyWarning, compare_detections, load_validation_images

VARIANTS = ("pytorch", "onnx_fp32", "onnx_fp16", "onnx_int8")
DEFAULT_TOLERANCE = 0.01  # mask AP, absolute (1 point)


@dataclass
class AccuracyRow:
    name: str
    box_ap: float
    mask_ap: float | None
    mask_ap50: float | None
    max_box_dev: float | None  # px; None for the reference row
    count_diffs: int | None  # images whose detection count differs from the reference
    images_per_sec: float
    eval_images: int = 0
    per_class: dict = field(default_factory=dict)  # class name -> {"AP", "mask_AP"}


@dataclass
class AccuracyTable:
    rows: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    eval_images: int = 0
    deviation_images: int = 0
    notes: list = field(default_factory=list)

    def format(self) -> str:
        head = ("variant", "box AP", "mask AP", "mask AP50", "max box dev px", "count diffs",
                "img/s")
        cells = [head] + [(r.name, _num(r.box_ap), _num(r.mask_ap), _num(r.mask_ap50),
                           "ref" if r.max_box_dev is None else f"{r.max_box_dev:.3g}",
                           "ref" if r.count_diffs is None else str(r.count_diffs),
                           f"{r.images_per_sec:.1f}") for r in self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
        lines = ["| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(row, widths))) + " |"
                 for row in cells]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        lines.append(f"{self.eval_images} validation images; box deviation on the first "
                     f"{self.deviation_images}, each PyTorch detection paired with the nearest "
                     "of the same class")
        lines += self.notes + [f"WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"rows": [asdict(r) for r in self.rows], "warnings": list(self.warnings),
                "eval_images": self.eval_images, "deviation_images": self.deviation_images,
                "notes": list(self.notes)}


def _num(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{float(value):.4f}"


def _row(name, model, spec, reference, images, *, max_images, device=None,
         use_amp=False) -> AccuracyRow:
    """Evaluate one variant and compare its detections on `images` with `reference`."""
    eval_spec = replace_spec(spec, use_amp=True) if use_amp else spec
    metrics = evaluate_model(model, eval_spec, device=device, max_images=max_images,
                             progress=False)
    deviation = counts = None
    if reference is not None:
        tested = align_detections(reference, _detections(model, spec, images, use_amp=use_amp))
        report = compare_detections(reference, tested, box_tolerance=math.inf)
        deviation, counts = report.max_box_diff, len(report.count_mismatches)
    return AccuracyRow(name=name, box_ap=float(metrics["AP"]), mask_ap=metrics.get("mask_AP"),
                       mask_ap50=metrics.get("mask_AP50"), max_box_dev=deviation,
                       count_diffs=counts,
                       images_per_sec=float(metrics.get("eval_images_per_sec", 0.0)),
                       eval_images=int(metrics.get("eval_images", 0)),
                       per_class=dict(metrics.get("per_class", {})))


def align_detections(reference: dict, tested: dict) -> dict:
    """`tested` with each image's detections reordered to pair with `reference`'s.

    Greedy, in the reference's (score) order: each reference detection takes the unpaired
    tested detection of the same class whose box is nearest (largest coordinate difference),
    else the nearest of any class; unpaired tested detections follow. Rows are the model's
    eval dict (see inference.backends.decode_outputs).
    """
    out = {k: v.clone() for k, v in tested.items()}
    for i in range(reference["boxes"].shape[0]):
        n_ref, n_test = int(reference["num_detections"][i]), int(tested["num_detections"][i])
        free, order = list(range(n_test)), []
        for j in range(min(n_ref, n_test)):
            dist = (tested["boxes"][i, free] - reference["boxes"][i, j]).abs().amax(dim=1)
            same = tested["classes"][i, free] == reference["classes"][i, j]
            dist = torch.where(same, dist, dist + 1e6)  # another class only as a last resort
            order.append(free.pop(int(dist.argmin())))
        order += free
        for key in ("boxes", "scores", "classes", "masks"):
            if out.get(key) is not None and order:
                out[key][i, :n_test] = tested[key][i, order]
    return out


def _detections(model, spec, images, *, use_amp=False, chunk: int = 8) -> dict:
    """The eval dicts of `images` (uint8, resized and padded) on the CPU; PyTorch models in fp32
    or, with use_amp, in the GPU's reduced precision."""
    precision = None
    if isinstance(model, torch.nn.Module):
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if use_amp else "fp32"
    predictor = as_predictor(model, spec, precision=precision)
    parts = [predictor.forward(images[i:i + chunk]) for i in range(0, images.shape[0], chunk)]
    return {k: torch.cat([p[k].cpu() for p in parts]) for k in parts[0]}


def default_calibration(spec, meta, batches: int, image_dir=None) -> CalibrationBatches:
    """Calibration batches from `image_dir`, else the spec's training images (not the
    validation images the table is measured on)."""
    directory = image_dir or spec.data_config.train_image_dir
    if not directory:
        raise CalibrationError("INT8 needs calibration images: pass cal_image_dir "
                               "(--cal-image-dir); the spec names no train_image_dir")
    return CalibrationBatches(directory, meta, batch_size=meta.batch_size, batches=batches)


def precision_warning(name: str, lost: float, tolerance: float, *, images: int = 0,
                      method: str = "", batches: int = 0) -> str:
    """The one-line warning for a precision that lost `lost` mask AP, naming what helps."""
    if name.endswith("int8"):
        others = ", ".join(m for m in ("entropy", "percentile", "max") if m != method)
        helps = (f"calibrate on more images (--batches, now {batches} batches = {images} images), "
                 f"try --cal-method {others} (now {method}), or keep layers in float with "
                 "--int8-exclude PATTERN (e.g. '/backbone/conv1/*', '*fpn*')")
    else:
        helps = ("keep layers in fp32 with --fp16-exclude PATTERN (e.g. '*mask_head*'), or "
                 "deploy the fp32 graph")
    return (f"{name} loses {lost:.4f} mask AP (more than {tolerance}) against PyTorch fp32: "
            f"{helps}")


def measure_accuracy(model, spec, workdir, *, onnx_path=None, batch_size: int = 1,
                     max_images: int | None = None, deviation_images: int = 16,
                     calibration=None, cal_image_dir=None, batches: int = 10,
                     cal_method: str = "max", percentile: float = DEFAULT_PERCENTILE,
                     cal_cache_file=None, int8_exclude=(), fp16_exclude=(),
                     variants=VARIANTS, device=None, tolerance: float = DEFAULT_TOLERANCE,
                     threads: int | None = None, prebuilt: dict | None = None,
                     calibrated_images: int = 0) -> AccuracyTable:
    """The accuracy table of `model` (a trained MaskRCNN) at every deployment precision.

    workdir: where the ONNX variants are written (model.onnx, model.fp16.onnx,
    model.int8.onnx; onnx_path: use this fp32 export instead of writing one, exported with
    `batch_size`). calibration: batches for INT8 (default: `batches` batches of the graph's
    batch from cal_image_dir, else the spec's training images); cal_method / percentile /
    cal_cache_file / int8_exclude as quantize_int8; fp16_exclude as convert_to_fp16. variants:
    a subset of VARIANTS. device: of the PyTorch rows (default CUDA when available; the model is
    moved there and left in eval mode); bf16 is added there on CUDA. prebuilt: {variant: path}
    of variants already written (`mrcnn export` passes the file it made), used as they are;
    calibrated_images: how many images a prebuilt int8 file was calibrated on (for the warning).
    Warnings (also issued as AccuracyWarning) for fp16/int8 rows that lose more than `tolerance`
    mask AP.
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; valid: {', '.join(VARIANTS)}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device)
    model = model.to(device).eval()
    images = load_validation_images(spec, deviation_images)
    reference = _detections(model, spec, images)
    base = _row("pytorch fp32", model, spec, None, images, max_images=max_images, device=device)
    table = AccuracyTable(rows=[base], eval_images=base.eval_images,
                          deviation_images=int(images.shape[0]))
    if device.type == "cuda" and "pytorch" in variants:
        half = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        table.rows.append(_row(f"pytorch {half}", model, spec, reference, images,
                               max_images=max_images, device=device, use_amp=True))
    onnx_variants = [v for v in variants if v.startswith("onnx")]
    if onnx_variants:
        fp32 = Path(onnx_path) if onnx_path else workdir / "model.onnx"
        if not onnx_path:
            export_onnx(model, spec, fp32, batch_size=batch_size)  # traces a CPU copy
        files = {"onnx_fp32": fp32, **{k: Path(v) for k, v in (prebuilt or {}).items()}}
        if "onnx_fp16" in variants and "onnx_fp16" not in files:
            files["onnx_fp16"] = Path(convert_to_fp16(fp32, workdir / "model.fp16.onnx",
                                                      exclude=fp16_exclude))
        if "onnx_int8" in variants and "onnx_int8" not in files:
            onnx_model = OnnxRuntimeModel(fp32, threads=threads)
            if calibration is None:
                calibration = default_calibration(spec, onnx_model.meta, batches, cal_image_dir)
            report = quantize_int8(fp32, workdir / "model.int8.onnx", calibration,
                                   method=cal_method, percentile=percentile,
                                   cache_file=cal_cache_file, exclude=int8_exclude,
                                   threads=threads)
            files["onnx_int8"] = Path(report.output)
            table.notes.append(f"int8: {report.summary()}")
            calibrated_images = report.images
        for variant in onnx_variants:
            name = variant.replace("_", " ")
            table.rows.append(_row(name, OnnxRuntimeModel(files[variant], threads=threads), spec,
                                   reference, images, max_images=max_images))
    _add_warnings(table, base, tolerance, method=cal_method, batches=batches,
                  images=calibrated_images)
    return table


def _add_warnings(table: AccuracyTable, base: AccuracyRow, tolerance: float, **details) -> None:
    if base.mask_ap is None:
        return
    for row in table.rows[1:]:
        if row.mask_ap is None or not (row.name.endswith("int8") or row.name.endswith("fp16")
                                       or row.name.endswith("bf16")):
            continue
        lost = float(base.mask_ap) - float(row.mask_ap)
        if lost > tolerance:
            message = precision_warning(row.name, lost, tolerance, **details)
            table.warnings.append(message)
            warnings.warn(message, AccuracyWarning, stacklevel=3)
