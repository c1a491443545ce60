"""Does the exported model compute what the PyTorch model computes? Parity and AP side by side.

`compare_detections` matches detections by order (both sort by score) and reports the largest
box, score and mask differences; `verify_export` runs both models on the same images;
`compare_ap` evaluates several models (PyTorch, ONNX, TensorRT) on the same validation images so
their COCO AP stands side by side, and `check_ap_drop` warns when a backend loses accuracy.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from mrcnn_helpers.data.loader import build_eval_dataset
from mrcnn_helpers.evaluate import evaluate_model
from mrcnn_helpers.inference.loading import spec_for_export
from mrcnn_helpers.inference.predictor import Predictor, as_predictor

# Default tolerances, for fp32 backends. Boxes: 1e-3 of the larger image side (1.3 px at 1344,
# far above the ~1e-5..1e-2 px fp32 rounding differences, far below a different detection).
BOX_TOLERANCE_REL = 1e-3
SCORE_TOLERANCE = 1e-3
MASK_TOLERANCE = 1e-2
AP_KEYS = ("AP", "AP50", "AP75", "mask_AP", "mask_AP50", "mask_AP75")


class AccuracyWarning(UserWarning):
    """An exported model (engine) scores lower than the PyTorch model beyond the tolerance."""


@dataclass
class ParityReport:
    """Differences between a reference and a tested detection dict on the same images."""

    images: int = 0
    detections: int = 0  # matched detections compared
    count_mismatches: list = field(default_factory=list)  # (image, n_ref, n_test)
    class_mismatches: int = 0
    max_box_diff: float = 0.0  # input pixels
    max_score_diff: float = 0.0
    max_mask_diff: float = 0.0  # mask probability
    box_tolerance: float = 0.0
    score_tolerance: float = SCORE_TOLERANCE
    mask_tolerance: float = MASK_TOLERANCE

    @property
    def ok(self) -> bool:
        return (not self.count_mismatches and self.class_mismatches == 0
                and self.max_box_diff <= self.box_tolerance
                and self.max_score_diff <= self.score_tolerance
                and self.max_mask_diff <= self.mask_tolerance)

    def summary(self) -> str:
        verdict = "OK" if self.ok else "MISMATCH"
        text = (f"{verdict}: {self.images} images, {self.detections} detections matched by order; "
                f"max |box| diff {self.max_box_diff:.3g} px (tol {self.box_tolerance:.3g}), "
                f"max |score| diff {self.max_score_diff:.3g} (tol {self.score_tolerance:.3g}), "
                f"max |mask prob| diff {self.max_mask_diff:.3g} (tol {self.mask_tolerance:.3g})")
        if self.count_mismatches:
            text += f"; detection counts differ on {len(self.count_mismatches)} images " \
                    f"(image, pytorch, exported): {self.count_mismatches[:5]}"
        if self.class_mismatches:
            text += f"; {self.class_mismatches} matched detections have another class"
        return text


def compare_detections(reference: dict, tested: dict, *, box_tolerance: float,
                       score_tolerance: float = SCORE_TOLERANCE,
                       mask_tolerance: float = MASK_TOLERANCE, report: ParityReport | None = None
                       ) -> ParityReport:
    """Compare two eval dicts (model output format) image by image, detection i with i."""
    report = report or ParityReport(box_tolerance=box_tolerance, score_tolerance=score_tolerance,
                                    mask_tolerance=mask_tolerance)
    batch = reference["boxes"].shape[0]
    for i in range(batch):
        image = report.images
        report.images += 1
        n_ref, n_test = int(reference["num_detections"][i]), int(tested["num_detections"][i])
        if n_ref != n_test:
            report.count_mismatches.append((image, n_ref, n_test))
        n = min(n_ref, n_test)
        if n == 0:
            continue
        report.detections += n
        ref_cls, test_cls = reference["classes"][i, :n].cpu(), tested["classes"][i, :n].cpu()
        report.class_mismatches += int((ref_cls.long() != test_cls.long()).sum())
        diff = (reference["boxes"][i, :n].float().cpu() - tested["boxes"][i, :n].float().cpu())
        report.max_box_diff = max(report.max_box_diff, float(diff.abs().max()))
        diff = reference["scores"][i, :n].float().cpu() - tested["scores"][i, :n].float().cpu()
        report.max_score_diff = max(report.max_score_diff, float(diff.abs().max()))
        if reference.get("masks") is not None and tested.get("masks") is not None:
            diff = reference["masks"][i, :n].float().cpu() - tested["masks"][i, :n].float().cpu()
            report.max_mask_diff = max(report.max_mask_diff, float(diff.abs().max()))
    return report


def verify_export(model, exported, images: torch.Tensor, *, spec=None, batch_size: int = 4,
                  box_tolerance: float | None = None, score_tolerance: float = SCORE_TOLERANCE,
                  mask_tolerance: float = MASK_TOLERANCE) -> ParityReport:
    """Run the PyTorch model (fp32) and an exported backend on uint8 images [N, 3, H, W]
    (already resize_and_pad'ed) and compare. Both may be Predictors; spec: for models given
    bare, default the spec stored in the export. box_tolerance None =
    BOX_TOLERANCE_REL * max(H, W)."""
    if box_tolerance is None:
        box_tolerance = BOX_TOLERANCE_REL * max(images.shape[-2:])
    if spec is None and not isinstance(exported, Predictor):
        spec = spec_for_export(exported.meta, source=exported.source)
    reference = as_predictor(model, spec, precision="fp32")
    tested = as_predictor(exported, spec)
    report = ParityReport(box_tolerance=box_tolerance, score_tolerance=score_tolerance,
                          mask_tolerance=mask_tolerance)
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start:start + batch_size]
        compare_detections(reference.forward(chunk), tested.forward(chunk),
                           box_tolerance=box_tolerance, report=report)
    return report


def load_validation_images(spec, count: int) -> torch.Tensor:
    """The first `count` validation images of the spec, resized and padded: uint8 [N, 3, H, W].

    Raises DataError when the validation set is missing."""
    dataset = build_eval_dataset(spec, max_images=count)
    return torch.stack([dataset[i]["image"] for i in range(min(count, len(dataset)))])


def compare_ap(models: dict, spec, *, max_images: int | None = None, device=None,
               progress: bool = False) -> dict:
    """COCO metrics of each named model on the same validation images: {name: metrics}."""
    results = {}
    for name, model in models.items():
        results[name] = evaluate_model(model, spec, device=device if name == "pytorch" else None,
                                       max_images=max_images, progress=progress)
    return results


def format_ap_table(results: dict, keys=AP_KEYS) -> str:
    """Side-by-side table: one row per metric, one column per model."""
    names = list(results)
    keys = [k for k in keys if any(k in m for m in results.values())]
    width = max(len(k) for k in keys) if keys else 6
    cols = [max(9, len(n)) for n in names]
    lines = ["metric".ljust(width) + "  " + "  ".join(n.rjust(c) for n, c in zip(names, cols))]
    for k in keys:
        cells = []
        for n, c in zip(names, cols):
            v = results[n].get(k)
            cells.append(("n/a" if v is None else f"{float(v):.4f}").rjust(c))
        lines.append(k.ljust(width) + "  " + "  ".join(cells))
    return "\n".join(lines)


def check_ap_drop(reference: dict, tested: dict, *, tolerance: float = 0.01, name: str = "engine",
                  keys=("AP", "mask_AP")) -> list[str]:
    """Warn (AccuracyWarning) for each metric where `tested` is more than `tolerance` (absolute
    AP) below `reference`; returns the warning messages."""
    messages = []
    for k in keys:
        if k not in reference or k not in tested:
            continue
        drop = float(reference[k]) - float(tested[k])
        if drop > tolerance:
            messages.append(f"{name} {k} {float(tested[k]):.4f} is {drop:.4f} below PyTorch's "
                            f"{float(reference[k]):.4f} (tolerance {tolerance}); check the "
                            "precision (fp16/int8) and the calibration images")
    for message in messages:
        warnings.warn(message, AccuracyWarning, stacklevel=2)
    return messages
