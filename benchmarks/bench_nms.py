"""Greedy NMS of many rows on the GPU: the walking kernel (one program per row, the default)
against the suppression-bits path (model/kernels/nms.bitmask_nms_rows, MRCNN_NMS_BITMASK=1),
each replayed from a CUDA graph, with the number of decisions that differ between them.

    python benchmarks/bench_nms.py [--iters 50]

Rows as the seed spec makes them at 832x1344, batch 8: the RPN in training (8 images x 5 FPN
levels, 2000 boxes each) and at inference (1000 each), and a batch of 8 detection rows of 2048
boxes in 80 groups. Boxes are random, sorted by a random score. Prints ms per call, with
device, date and versions. Needs a CUDA GPU with Triton.
"""

import argparse
import datetime

import torch
import triton
from bench_conv_fusion import graphed, time_graph

from mrcnn_helpers.model.kernels.nms import bitmask_nms_rows, walk_nms_rows

CASES = {"RPN training, 40 rows x 2000": (40, 2000, 1, 0.7),
         "RPN inference, 40 rows x 1000": (40, 1000, 1, 0.7),
         "detections, 8 rows x 2048, 80 classes": (8, 2048, 80, 0.5)}


def rows_of_boxes(rows, size, groups, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    xy = torch.rand(rows, size, 2, generator=g) * 1200
    boxes = torch.cat([xy, xy + torch.rand(rows, size, 2, generator=g) * 250 + 2], -1)
    return (boxes.to(device), torch.randint(0, groups, (rows, size), generator=g).to(device),
            (torch.rand(rows, size, generator=g) > 0.05).to(device))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{triton.__version__}, {datetime.date.today()}, CUDA graphs")
    print("| rows | walk ms | bitmask ms | speed-up | decisions that differ |")
    print("|---|---|---|---|---|")
    for label, (rows, size, groups, iou) in CASES.items():
        boxes, group, candidate = rows_of_boxes(rows, size, groups, "cuda")
        times, keeps = [], []
        for fn in (walk_nms_rows, bitmask_nms_rows):
            graph, keep = graphed(lambda b, fn=fn: fn(b, group, candidate, iou), boxes)
            times.append(time_graph(graph, args.iters))
            keeps.append(keep)
        differ = int((keeps[0] != keeps[1]).sum())
        print(f"| {label} | {times[0]:.3f} | {times[1]:.3f} | {times[0] / times[1]:.1f}x | "
              f"{differ} of {keeps[0].numel()} |")


if __name__ == "__main__":
    main()
