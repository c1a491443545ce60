"""Accuracy parity: our trainer vs stock torchvision Mask R-CNN on the same data, seed and schedule.

    python benchmarks/parity_train.py [--spec specs/synthetic_gpu_r50.txt] [--steps N]
        [--out results/parity] [--only ours|stock] [--set KEY=VALUE ...] [--pure-stock]

Run from the repository root (spec data paths are relative to it). A missing dataset is generated
as the synthetic shapes set (--num-train / --num-val, default 1200 / 100, at the spec's
image_size). --steps N scales warmup and learning_rate_steps by N / total_steps. --set overrides
spec fields (dotted keys for blocks, Python literal values), e.g. --set maskrcnn_config.nlayers=18.

Both models go through the same `mrcnn_helpers.engine.train`: same loader (shuffle, and with
n_workers > 0 augmentation), seed, SGD + weight decay, schedule, batch and precision (bf16
autocast on CUDA when use_amp), then the same `evaluate_model` (pycocotools on the val split).
- ours: `build_model(spec)`, as `mrcnn train` builds it.
- stock: torchvision `MaskRCNN` on `resnet_fpn_backbone` (BatchNorm2d unless freeze_bn,
  trainable_layers = 5 - len(freeze_blocks)), min/max size = image size (no resize), the spec's
  RPN/RoI sampling, top-n, NMS, score threshold, box weights and loss weights, and exactly our
  anchors (cell anchors replaced; P2-P6 = four ResNet stages + torchvision's max-pool level).
  `StockAdapter` (holding `.model`) converts our batch in training (images / 255, normalized by
  torchvision with the same ImageNet mean/std; box-relative gt masks pasted into full-image
  binary masks at 0.5, where ours trains on the soft box-relative masks) and, in evaluation, runs
  torchvision's forward without its final `transform.postprocess`: its R x R box-relative mask
  probabilities are then pasted by our evaluation exactly as ours are (no extra resampling).
  torchvision has no bg_thresh_lo (it must be 0). Unless --pure-stock, two settings follow ours:
  the class/box/mask predictor layers get ours' small normal init (torchvision's defaults give
  mask logits ~10 at the start, which ours' roi_heads notes makes from-scratch training diverge),
  and the RPN head / box predictor outputs are cast to fp32, so box decoding is not done in bf16
  under autocast (torchvision casts anchors and proposals to the deltas' dtype: 2 px steps at
  256-512 px).

Prints box AP, AP50, mask AP, mask AP50 (points), wall time of the train() call (evaluations
included) and training img/s (median of the log windows after the first) per model and ours -
stock, with device, versions and date; writes <out>/parity.json. Each model's result is also kept
in <out>/<model>/parity_result.json, so `--only ours` and `--only stock` can run as separate
commands and the second prints the comparison.
"""

import argparse
import ast
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

from mrcnn_helpers.data.synthetic import generate_synthetic_dataset
from mrcnn_helpers.engine import latest_checkpoint
from mrcnn_helpers.errors import TrainingError
from mrcnn_helpers.model import paste_masks_in_image
from mrcnn_helpers.model.anchors import cell_anchors
from mrcnn_helpers.spec import load_spec, replace_spec
from mrcnn_helpers.spec.schema import field_types
from mrcnn_helpers.spec.values import coerce
from mrcnn_helpers.workflow import train  # engine.train with COCO evaluation

DEFAULT_SPEC = os.path.relpath(os.path.join(os.path.dirname(__file__), "..", "specs",
                                            "synthetic_gpu_r50.txt"))
METRICS = ("AP", "AP50", "mask_AP", "mask_AP50")
MODELS = ("ours", "stock")


class StockAdapter(nn.Module):
    """torchvision MaskRCNN (`.model`) behind our model's train / eval interface."""

    def __init__(self, model: nn.Module, spec):
        super().__init__()
        cfg = spec.maskrcnn_config
        self.model = model
        self.image_size = tuple(spec.data_config.image_size)
        self.num_det, self.resolution = cfg.test_detections_per_image, cfg.mrcnn_resolution
        self.rpn_nms = {True: cfg.train_rpn_nms_threshold, False: cfg.test_rpn_nms_thresh}
        self.loss_weights = {"loss_rpn_box_reg": cfg.rpn_box_loss_weight,
                             "loss_box_reg": cfg.fast_rcnn_box_loss_weight,
                             "loss_mask": cfg.mrcnn_weight_loss_mask}

    def forward(self, images: torch.Tensor, targets: dict | None = None):
        self.model.rpn.nms_thresh = self.rpn_nms[self.training]
        inputs = [image.float() / 255 for image in images]
        if self.training:
            losses = self.model(inputs, self.torchvision_targets(targets))
            return {k: v * self.loss_weights.get(k, 1.0) for k, v in losses.items()}
        m = self.model
        image_list, _ = m.transform(inputs)
        if any(tuple(s) != self.image_size for s in image_list.image_sizes):
            raise RuntimeError(f"torchvision resized {self.image_size} to {image_list.image_sizes}")
        features = m.backbone(image_list.tensors)
        proposals, _ = m.rpn(image_list, features)
        detections, _ = m.roi_heads(features, proposals, image_list.image_sizes)
        return self.our_detections(detections, images.device)

    def torchvision_targets(self, targets: dict) -> list[dict]:
        """Our padded targets -> torchvision's per-image dicts with full-image uint8 masks."""
        height, width = self.image_size
        out = []
        with torch.autocast(targets["boxes"].device.type, enabled=False):
            for boxes, classes, masks in zip(targets["boxes"], targets["classes"], targets["masks"]):
                keep = (classes > 0) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
                boxes = boxes[keep].float()
                full = paste_masks_in_image(masks[keep].float() / 255, boxes, height, width)
                out.append({"boxes": boxes, "labels": classes[keep].long(),
                            "masks": (full >= 0.5).to(torch.uint8)})
        return out

    def our_detections(self, detections: list[dict], device) -> dict:
        """torchvision's per-image detections -> our padded batch (masks [B, D, R, R])."""
        b, d, r = len(detections), self.num_det, self.resolution
        out = {"boxes": torch.zeros(b, d, 4, device=device),
               "scores": torch.zeros(b, d, device=device),
               "classes": torch.zeros(b, d, dtype=torch.long, device=device),
               "masks": torch.zeros(b, d, r, r, device=device),
               "num_detections": torch.zeros(b, dtype=torch.long, device=device)}
        for i, det in enumerate(detections):
            n = min(len(det["scores"]), d)
            out["boxes"][i, :n] = det["boxes"][:n].float()
            out["scores"][i, :n] = det["scores"][:n].float()
            out["classes"][i, :n] = det["labels"][:n]
            out["masks"][i, :n] = det["masks"][:n, 0].float()
            out["num_detections"][i] = n
        return out


def _fp32_outputs(module, args, output):
    return tuple([t.float() for t in o] if isinstance(o, list) else o.float() for o in output)


def build_stock(spec, pure: bool) -> StockAdapter:
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
    from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

    cfg, num_classes = spec.maskrcnn_config, spec.data_config.num_classes
    frozen = sorted(cfg.freeze_blocks)
    if (cfg.min_level, cfg.max_level) != (2, 6) or frozen != list(range(len(frozen))):
        raise SystemExit("stock needs levels P2-P6 and freeze_blocks [] or [0..k] (torchvision's "
                         f"trainable_layers); the spec has {cfg.min_level}-{cfg.max_level}, {frozen}")
    if not cfg.include_mask or cfg.bg_thresh_lo != 0:
        raise SystemExit("stock needs include_mask: true and bg_thresh_lo: 0")
    backbone = resnet_fpn_backbone(
        backbone_name=f"resnet{cfg.nlayers}", weights=None, trainable_layers=5 - len(frozen),
        norm_layer=FrozenBatchNorm2d if cfg.freeze_bn else nn.BatchNorm2d)
    per_location = ((1.0,) * cfg.num_scales, (1.0,) * len(cfg.aspect_ratios))
    anchors = AnchorGenerator(sizes=(per_location[0],) * 5, aspect_ratios=(per_location[1],) * 5)
    anchors.cell_anchors = [cell_anchors(2 ** lvl, cfg.anchor_scale, cfg.num_scales,
                                         cfg.aspect_ratios) for lvl in range(2, 7)]
    height, width = spec.data_config.image_size
    dim = cfg.fast_rcnn_mlp_head_dim
    model = MaskRCNN(
        backbone, num_classes=None, min_size=min(height, width), max_size=max(height, width),
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=cfg.train_rpn_pre_nms_topn,
        rpn_pre_nms_top_n_test=cfg.test_rpn_pre_nms_topn,
        rpn_post_nms_top_n_train=cfg.train_rpn_post_nms_topn,
        rpn_post_nms_top_n_test=cfg.test_rpn_post_nms_topn,
        rpn_nms_thresh=cfg.train_rpn_nms_threshold, rpn_fg_iou_thresh=cfg.rpn_positive_overlap,
        rpn_bg_iou_thresh=cfg.rpn_negative_overlap,
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_im,
        rpn_positive_fraction=cfg.rpn_fg_fraction,
        box_head=TwoMLPHead(backbone.out_channels * 7 * 7, dim),
        box_predictor=FastRCNNPredictor(dim, num_classes),
        box_score_thresh=cfg.test_score_thresh, box_nms_thresh=cfg.test_nms,
        box_detections_per_img=cfg.test_detections_per_image, box_fg_iou_thresh=cfg.fg_thresh,
        box_bg_iou_thresh=cfg.bg_thresh_hi, box_batch_size_per_image=cfg.batch_size_per_im,
        box_positive_fraction=cfg.fg_fraction, bbox_reg_weights=tuple(cfg.bbox_reg_weights),
        mask_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], cfg.mrcnn_resolution // 2, 2),
        mask_predictor=MaskRCNNPredictor(backbone.out_channels, 256, num_classes))
    model.rpn.min_size = max(cfg.rpn_min_size, 1e-3)
    if not pure:
        heads = model.roi_heads
        for layer, std in ((heads.box_predictor.cls_score, 0.01),
                           (heads.box_predictor.bbox_pred, 0.001),
                           (heads.mask_predictor.mask_fcn_logits, 0.001)):
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)
        model.rpn.head.register_forward_hook(_fp32_outputs)
        heads.box_predictor.register_forward_hook(_fp32_outputs)
    return StockAdapter(model, spec)


def parse_overrides(items: list[str]) -> dict:
    changes = {}
    for item in items:
        key, sep, text = item.partition("=")
        block, _, name = key.rpartition(".")
        hint = field_types(block).get(name) if block in ("", "data_config", "maskrcnn_config") \
            else None
        if not sep or hint is None:
            raise SystemExit(f"--set {item!r}: expected a known spec field as key=value")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        changes[key] = coerce(value, hint, key)
    return changes


def scaled_schedule(spec, steps: int) -> dict:
    """Spec changes for `steps` total steps: warmup and LR boundaries scaled by steps/total."""
    f = steps / spec.total_steps
    bounds = {}
    for boundary, level in zip(spec.learning_rate_steps, spec.learning_rate_decay_levels):
        if 0 < round(boundary * f) < steps:
            bounds[round(boundary * f)] = level
    return {"total_steps": steps, "warmup_steps": round(spec.warmup_steps * f),
            "learning_rate_steps": tuple(bounds), "learning_rate_decay_levels": tuple(bounds.values()),
            "num_steps_per_eval": min(spec.num_steps_per_eval, steps),
            "logging_frequency": min(spec.logging_frequency, steps)}


def ensure_data(spec, num_train: int, num_val: int) -> None:
    dc = spec.data_config
    if Path(dc.train_json_file).is_file() and Path(dc.val_json_file).is_file():
        return
    root = Path(dc.train_json_file).parent.parent
    print(f"generating the synthetic dataset in {root}: {num_train} train / {num_val} val images "
          f"at {dc.image_size}", flush=True)
    generate_synthetic_dataset(root, num_train, num_val, tuple(dc.image_size))
    paths = (dc.train_json_file, dc.val_json_file, dc.train_image_dir, dc.val_image_dir)
    if not all(Path(p).exists() for p in paths):
        raise SystemExit(f"the generated layout under {root} does not match the spec's paths {paths}")


def run_model(name: str, spec, out: Path, pure: bool, env: dict) -> dict:
    run_dir = out / name
    if latest_checkpoint(run_dir) is not None:
        print(f"note: {run_dir} holds checkpoints; training resumes from them and the wall time "
              "covers only this call (use a fresh --out for a clean measurement)", flush=True)
    rates, curve = [], []

    def on_log(record: dict) -> None:
        if record["event"] == "train":
            rates.append(record["samples_per_sec"])
        elif record["event"] == "eval":
            curve.append({"step": record["step"], **{k: record.get(k) for k in METRICS}})

    torch.manual_seed(int(spec.seed))  # stock's init follows the seed, as ours does in train()
    model = build_stock(spec, pure) if name == "stock" else None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = {"model": name, "error": None, "environment": env}
    try:
        metrics = train(spec, run_dir, model=model, on_log=on_log, verbose=False)["metrics"] or {}
    except TrainingError as exc:
        metrics, result["error"] = {}, str(exc)
        print(f"{name}: training failed: {exc}", flush=True)
    result.update({k: metrics.get(k) for k in METRICS})
    result["wall_s"] = time.perf_counter() - start
    result["img_per_s"] = statistics.median(rates[1:] or rates) if rates else None
    result["peak_gib"] = (torch.cuda.max_memory_allocated() / 2**30
                          if torch.cuda.is_available() else None)
    result["eval_curve"] = curve
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "parity_result.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def environment(spec, pure: bool) -> dict:
    cuda = torch.cuda.is_available()
    amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if spec.use_amp and cuda else "fp32"
    return {"device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})",
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "date": str(datetime.date.today()), "spec": spec.source,
            "steps": spec.total_steps, "batch": spec.train_batch_size, "precision": amp,
            "image_size": list(spec.data_config.image_size), "nlayers": spec.maskrcnn_config.nlayers,
            "stock": "pure torchvision defaults" if pure else
                     "our predictor init + fp32 box decoding (see module doc)"}


def points(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def report(results: dict, env: dict, out: Path) -> None:
    print(f"\n{env['device']}, torch {env['torch']}, torchvision {env['torchvision']}, "
          f"{env['date']}; {env['spec']}, {env['steps']} steps, batch {env['batch']}, "
          f"{env['precision']}, {env['image_size'][0]}x{env['image_size'][1]}, "
          f"R{env['nlayers']}-FPN; stock: {env['stock']}")
    head = "| model        | box AP | AP50   | mask AP | mask AP50 | wall time | img/s  |"
    print(head + "\n|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for name, r in results.items():
        rate = "n/a" if r["img_per_s"] is None else f"{r['img_per_s']:.1f}"
        print(f"| {name:<12} | {points(r['AP']):>6} | {points(r['AP50']):>6} | "
              f"{points(r['mask_AP']):>7} | {points(r['mask_AP50']):>9} | "
              f"{r['wall_s']:>8.0f}s | {rate:>6} |" + (f" FAILED: {r['error'][:80]}"
                                                       if r["error"] else ""))
    diff = None
    if all(results.get(m) and results[m]["AP"] is not None for m in MODELS):
        diff = {k: 100 * (results["ours"][k] - results["stock"][k]) for k in METRICS}
        print("| ours - stock | " + " | ".join(f"{diff[k]:+{w}.2f}" for k, w in
                                             zip(METRICS, (6, 6, 7, 9))) + " |           |        |")
        ok = diff["AP"] >= -1 and diff["mask_AP"] >= -1
        print(f"ours within 1 AP point of stock (box and mask AP): {'yes' if ok else 'NO'}")
    print("img/s: training only, median of the log windows after the first; wall time: the whole "
          "train() call including data loading, checkpoints and evaluations.")
    payload = {"environment": env, "results": results, "ours_minus_stock_points": diff}
    (out / "parity.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")
    print(f"wrote {out / 'parity.json'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", default=DEFAULT_SPEC)
    ap.add_argument("--steps", type=int, default=None, help="total steps (schedule scaled)")
    ap.add_argument("--out", default="results/parity")
    ap.add_argument("--only", choices=MODELS, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--num-train", type=int, default=1200)
    ap.add_argument("--num-val", type=int, default=100)
    ap.add_argument("--pure-stock", action="store_true",
                    help="torchvision's own predictor init and bf16 box decoding")
    args = ap.parse_args()

    spec = replace_spec(load_spec(args.spec), **parse_overrides(args.set))
    if args.steps is not None:
        spec = replace_spec(spec, **scaled_schedule(spec, args.steps))
    if spec.data_config.n_workers == 0 and spec.data_config.augment_input_data:
        print("note: n_workers 0 draws augmentation from the global RNG, which the models also "
              "use: the two runs then see different augmentations", flush=True)
    ensure_data(spec, args.num_train, args.num_val)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env, results = environment(spec, args.pure_stock), {}
    for name in MODELS:
        if args.only in (None, name):
            results[name] = run_model(name, spec, out, args.pure_stock, env)
        elif (out / name / "parity_result.json").is_file():
            results[name] = json.loads((out / name / "parity_result.json").read_text())
            print(f"{name}: result of an earlier run read from {out / name}")
            earlier = {k: v for k, v in results[name].get("environment", {}).items() if k != "date"}
            if earlier != {k: v for k, v in env.items() if k != "date"}:
                print(f"WARNING: that {name} run used other settings: {earlier}")
    report(results, env, out)


if __name__ == "__main__":
    main()
