"""The speed switches that are off by default, measured together: `bench_maskrcnn.py` (ours
only) run once per setting in a process of its own (the switches are read at import), at
the seed spec's 832x1344, batch 8, bf16, CUDA graphs.

    python benchmarks/bench_options.py [--jobs train,infer] [--only NAME,...] [--iters 10]

Settings: the defaults, each switch alone (MRCNN_BATCHED_FOLD, MRCNN_NMS_BITMASK,
MRCNN_STEM_POOL, MRCNN_ROI_MERGE_BACKWARD = 1), the RoIAlign kernels with 2 warps (backward
only, and both), and all of them (the RoIAlign backward with 2 warps). Prints one table row
per setting: training img/s and ms per step, the step's change from the defaults, the sum of
the losses bench_maskrcnn prints (averaged over its steps at learning rate 0 on one batch: the
switches are exact or change only rounding, so it must stay put), inference batch 8 img/s and
batch 1 p50 / p99 ms, with device, date and versions. A switch that pays is made the default
in its module. Needs a CUDA GPU.
"""

import argparse
import ast
import datetime
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

SWITCHES = ("MRCNN_BATCHED_FOLD", "MRCNN_NMS_BITMASK", "MRCNN_STEM_POOL",
            "MRCNN_ROI_MERGE_BACKWARD")
ROI_BACKWARD_2 = {"MRCNN_ROI_BACKWARD_WARPS": "2"}
SETTINGS = {"defaults": {}, **{name[6:].lower(): {name: "1"} for name in SWITCHES},
            "roi_backward_warps_2": ROI_BACKWARD_2,
            "roi_warps_2": {"MRCNN_ROI_FORWARD_WARPS": "2", **ROI_BACKWARD_2},
            "all": {**{name: "1" for name in SWITCHES}, **ROI_BACKWARD_2}}
ROW = re.compile(r"^\| (train step|inference[^|]*?)\s*\|\s*(\d+)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)")
LATENCY = re.compile(r"batch-1 latency over \d+ calls, ours: p50 ([\d.]+) ms, p99 ([\d.]+) ms")
LOSSES = re.compile(r"^losses ours: (\{.*\})")


def run(setting: dict, job: str, iters: int) -> dict:
    """One bench_maskrcnn run; {(job, batch): (img/s, ms)} and the batch-1 latency."""
    env = dict(os.environ, **setting)
    script = Path(__file__).with_name("bench_maskrcnn.py")
    proc = subprocess.run([sys.executable, str(script), "--only", job, "--ours-only", "--iters",
                           str(iters)], capture_output=True, text=True, env=env)
    if proc.returncode:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1][:80]}
    found = {}
    for line in proc.stdout.splitlines():
        if match := ROW.match(line):
            found[(match[1].split()[0], int(match[2]))] = float(match[3]), float(match[4])
        if match := LATENCY.search(line):
            found["latency"] = float(match[1]), float(match[2])
        if match := LOSSES.match(line):  # the same batch and seed: a switch must not move them
            found["loss"] = sum(ast.literal_eval(match[1]).values())
    return found


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", default="train,infer")
    ap.add_argument("--only", default="", help="comma-separated setting names")
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n] or list(SETTINGS)
    jobs = [j for j in args.jobs.split(",") if j]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"{datetime.date.today()}, seed spec 832x1344, batch 8, bf16, ours only, one process "
          "per setting")
    print("| setting | train img/s (ms) | change ms | loss (lr 0) | infer b8 img/s | "
          "b1 p50 / p99 ms |")
    print("|---|---|---|---|---|---|")
    base = None
    for name in names:
        found = {}
        for job in jobs:
            found.update(run(SETTINGS[name], job, args.iters))
        if "error" in found:
            print(f"| {name} | failed: {found['error']} | | | | |", flush=True)
            continue
        train = found.get(("train", 8))
        infer = found.get(("inference", 8))
        latency = found.get("latency")
        ms = 8000.0 / train[0] if train else None  # from img/s: more digits than the ms column
        if name == "defaults":
            base = ms
        change = f"{ms - base:+.2f}" if ms is not None and base is not None else ""
        loss = f"{found['loss']:.4f}" if "loss" in found else ""
        print(f"| {name} | {f'{train[0]:.1f} ({ms:.2f})' if train else ''} | {change} | {loss} | "
              f"{f'{infer[0]:.1f}' if infer else ''} | "
              f"{f'{latency[0]:.2f} / {latency[1]:.2f}' if latency else ''} |", flush=True)


if __name__ == "__main__":
    main()
