"""`mrcnn train` end to end on a COCO-JSON dataset of PNG files, against its own step benchmark.

    python benchmarks/bench_train_e2e.py [--sizes 256 832x1344] [--images 12 400] [--steps 300]

For each image size and dataset size: writes the synthetic shapes dataset (PNG files, COCO
JSON), trains specs/synthetic_gpu_r50.txt at that size (batch 8, bf16, no evaluation) through
the same `train` the CLI runs, and reads images/s from RESULTS_DIR/results.csv (the trainer's
own windows, which leave checkpoint time out), skipping the first window (warm-up, CUDA graph
capture). Then times the training step alone on batches already on the GPU (the step
benchmark: the trainer's graphed step, no loader). Prints a table: end to end vs step, and
their ratio (the target is >= 0.9). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import tempfile
import time
from pathlib import Path

import torch
from train_step import make_train_step

from mrcnn_helpers.data import build_train_loader, generate_synthetic_dataset
from mrcnn_helpers.engine.distributed import DistContext
from mrcnn_helpers.model import build_model, place_model
from mrcnn_helpers.spec import load_spec, replace_spec
from mrcnn_helpers.workflow import train

SPEC = Path(__file__).resolve().parents[1] / "specs" / "synthetic_gpu_r50.txt"


def _size(text: str) -> tuple[int, int]:
    h, _, w = text.partition("x")
    return int(h), int(w or h)


def spec_for(data: dict, size, steps: int, workers: int):
    return replace_spec(load_spec(SPEC), total_steps=steps, logging_frequency=max(10, steps // 10),
                        num_steps_per_eval=10 * steps, warmup_steps=min(300, steps // 2), **{
                            "learning_rate_steps": "[]", "learning_rate_decay_levels": "[]",
                            "data_config.image_size": size,
                            "data_config.n_workers": workers,
                            "data_config.train_json_file": data["train_json"],
                            "data_config.train_image_dir": data["train_images"],
                            "data_config.val_json_file": data["val_json"],
                            "data_config.val_image_dir": data["val_images"]})


def end_to_end(spec, results: Path) -> float:
    """Images/s of `train` over its log windows after the first."""
    train(spec, results, evaluate_fn=None)
    with open(results / "results.csv", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r.get("event") == "train"]
    speeds = [float(r["samples_per_sec"]) for r in rows[1:] if r.get("samples_per_sec")]
    return sum(speeds) / len(speeds) if speeds else float("nan")


def step_only(spec, iters: int = 30) -> float:
    """Images/s of the graphed training step on one batch already on the GPU."""
    device = torch.device("cuda")
    batch = next(iter(build_train_loader(spec)))
    images = batch["image"].to(device)
    targets = {k: batch[k].to(device) for k in ("boxes", "classes", "masks")}
    model = place_model(build_model(spec), device).train()
    step, meter = make_train_step(model, device)
    for _ in range(6):
        step(images, targets, 1e-3)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step(images, targets, 1e-3)
    torch.cuda.synchronize()
    meter.read_window(DistContext())
    return iters * images.shape[0] / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", type=_size, default=[(256, 256), (832, 1344)])
    ap.add_argument("--images", nargs="+", type=int, default=[12, 400])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    root = Path(args.workdir or tempfile.mkdtemp(prefix="mrcnn-e2e-"))
    rows = []
    for size in args.sizes:
        reference = None
        for count in args.images:
            data = generate_synthetic_dataset(root / f"data_{size[0]}x{size[1]}_{count}",
                                              num_train=count, num_val=8, image_size=size)
            spec = spec_for(data, size, args.steps, args.workers)
            e2e = end_to_end(spec, root / f"run_{size[0]}x{size[1]}_{count}")
            if reference is None:
                reference = step_only(spec)
            rows.append((f"{size[0]}x{size[1]}", count, e2e, reference))
            print(f"{size} {count} images: end to end {e2e:.1f} img/s, step {reference:.1f}",
                  flush=True)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, {datetime.date.today()}, "
          f"R50-FPN synthetic_gpu_r50 spec, batch 8, bf16, {args.workers} loader workers, "
          f"{args.steps} steps")
    print("| size | train images | mrcnn train img/s | step only img/s | ratio |")
    print("|---|---|---|---|---|")
    for size, count, e2e, ref in rows:
        print(f"| {size} | {count} | {e2e:.1f} | {ref:.1f} | {e2e / ref:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
