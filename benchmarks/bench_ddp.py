"""Throughput of the trainer's plain path against its data-parallel (DDP) path on one GPU.

    python benchmarks/bench_ddp.py [--rounds 3] [--steps 300] [--size 384] [--batch 8]

`mrcnn train --gpus N` runs N processes under torchrun; each takes the DDP path of
`mrcnn_helpers.engine.train`. With one process that path does the same work as plain training
plus DDP's gradient hooks and all-reduces over a one-rank NCCL group, so its throughput should
match. This script calls `train()` in one process, alternating the plain path and the DDP path
(the environment torchrun would set: WORLD_SIZE=1, RANK=0, a local rendezvous) with the
trainer's DDP options and variants of them (PATHS), `--rounds` times each, so drifts of the
machine hit all alike. Both use the same model (R50-FPN,
specs/synthetic_gpu_r50.txt, bf16), the same in-memory batches (so no data-loader noise) and
learning rate 1e-12 (the work stays constant; see bench_maskrcnn.py). Prints img/s per log window
of 50 steps (the first window, with warm-up, is dropped) and the median of each path. Meant for a CUDA
GPU; on a CPU it runs (gloo) as a smoke test.
"""

import argparse
import datetime
import os
import socket
import statistics
import sys
import tempfile

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from bench_maskrcnn import synthetic_batch

from mrcnn_helpers.engine import train, trainer
from mrcnn_helpers.model import build_model
from mrcnn_helpers.spec import load_spec, replace_spec

SPEC = os.path.join(os.path.dirname(__file__), "..", "specs", "synthetic_gpu_r50.txt")
LOG_EVERY = 50
DIST_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def in_memory_batches(spec, count: int, objects: int) -> list[dict]:
    """`count` loader-style batches (uint8 images, padded boxes / classes / box masks), pinned."""
    h, w = spec.data_config.image_size
    m = spec.data_config.max_num_instances
    gen = torch.Generator().manual_seed(0)
    out = []
    pin = torch.cuda.is_available()
    for _ in range(count):
        images, boxes, classes, masks, _ = synthetic_batch(
            spec.train_batch_size, h, w, objects, spec.maskrcnn_config.gt_mask_size, "cpu", gen)
        pad = m - objects
        batch = {"image": images, "boxes": F.pad(boxes, (0, 0, 0, pad)),
                 "classes": F.pad(1 + classes % (spec.data_config.num_classes - 1), (0, pad)),
                 "masks": F.pad(masks, (0, 0, 0, 0, 0, pad))}
        out.append({k: v.pin_memory() if pin else v for k, v in batch.items()})
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Paths compared: name -> DDP options (None: plain training).
PATHS = {
    "plain": None,
    "DDP, 1 process": dict(trainer.DDP_OPTIONS),
    "DDP, 1 process, static_graph": {**trainer.DDP_OPTIONS, "static_graph": True},
    "DDP, 1 process, static_graph, 100 MB buckets": {**trainer.DDP_OPTIONS, "static_graph": True,
                                                     "bucket_cap_mb": 100},
}


def run_once(spec, batches, steps: int, ddp_options: dict | None) -> list[float]:
    """img/s of each log window after the first, for one train() call of `steps` steps."""
    windows = []
    distributed = ddp_options is not None
    if distributed:
        trainer.DDP_OPTIONS = ddp_options
        os.environ.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    try:
        torch.manual_seed(0)
        model = build_model(spec)
        with tempfile.TemporaryDirectory() as results:
            train(spec, results, max_steps=steps, model=model, train_loader=batches,
                  evaluate_fn=lambda *a, **k: {}, verbose=False,
                  on_log=lambda r: windows.append(r["samples_per_sec"])
                  if r.get("event") == "train" else None)
    finally:
        for name in DIST_ENV:
            os.environ.pop(name, None)
    return windows[1:]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--objects", type=int, default=8)
    ap.add_argument("--log-every", type=int, default=LOG_EVERY)
    ap.add_argument("--nlayers", type=int, default=50, help="ResNet depth (small for a smoke test)")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    spec = replace_spec(load_spec(SPEC), **{
        "data_config.image_size": (args.size, args.size), "train_batch_size": args.batch,
        "init_learning_rate": 1e-12, "warmup_learning_rate": 1e-12, "l2_weight_decay": 0.0,
        "num_steps_per_eval": 10**6,
        "logging_frequency": args.log_every, "maskrcnn_config.nlayers": args.nlayers})
    batches = in_memory_batches(spec, 16, args.objects)
    results = {name: [] for name in PATHS}
    for round_ in range(args.rounds):
        for name, options in PATHS.items():
            windows = run_once(spec, batches, args.steps, options)
            results[name] += windows
            print(f"round {round_ + 1} {name}: " + ", ".join(f"{w:.1f}" for w in windows),
                  flush=True)

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(f"\n{device}, torch {torch.__version__}, {datetime.date.today()}, R{args.nlayers}-FPN "
          f"{args.size}x{args.size}, batch {args.batch}, bf16, {args.rounds} rounds x "
          f"{args.steps} steps, img/s per {args.log_every}-step window")
    print("| path | windows | median img/s | min | max | / plain |")
    print("|---|---|---|---|---|---|")
    plain = statistics.median(results["plain"])
    for name, values in results.items():
        median = statistics.median(values)
        print(f"| {name} | {len(values)} | {median:.1f} | {min(values):.1f} | {max(values):.1f} | "
              f"{median / plain:.3f} |")


if __name__ == "__main__":
    main()
