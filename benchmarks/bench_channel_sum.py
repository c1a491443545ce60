"""The backward's per-channel gradient sums (the bias gradients) on channels_last bf16 maps:
PyTorch (threshold_backward + sum over (0, 2, 3)) against the one-pass Triton kernel
(model/kernels/bias.channel_sums) in several launch configurations, each replayed from a CUDA
graph.

    python benchmarks/bench_channel_sum.py [--iters 50]

Maps: the seed's FPN levels P2-P5 at 832x1344, batch 8 (256 channels), and the mask head's
1024 RoIs of 14 x 14. Modes: "relu" (the masked gradient written and summed: reads the
gradient and the ReLU output, writes the masked gradient) and "sum" (reads the gradient).
Prints us per call and GB/s of those bytes for the default (kernels/bias.sum_config's choice,
named in the mode column) and per configuration (tile rows x channels, programs per
multiprocessor, warps), with device, date and versions. Needs a CUDA GPU with Triton.
"""

import argparse
import datetime

import torch
import triton
from bench_conv_fusion import graphed, time_graph

from mrcnn_helpers.model.kernels.bias import channel_sums, sum_config

SHAPES = {"P2": (8, 256, 208, 336), "P3": (8, 256, 104, 168), "P4": (8, 256, 52, 84),
          "P5": (8, 256, 26, 42), "mask RoIs": (1024, 256, 14, 14)}
CONFIGS = [(32, 64, 4, 4), (32, 256, 4, 8), (16, 256, 8, 4), (64, 128, 4, 8),
           (128, 64, 4, 8), (32, 128, 8, 4)]


def pytorch(grad, y):
    masked = grad if y is None else torch.ops.aten.threshold_backward(grad, y, 0)
    return masked, masked.sum((0, 2, 3), dtype=torch.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    cl = torch.channels_last
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{triton.__version__}, {datetime.date.today()}, bf16 channels_last, CUDA graphs; "
          "config = tile rows x channels / programs per SM / warps")
    names = ["PyTorch", "default"] + ["x".join(map(str, c[:2])) + f"/{c[2]}/{c[3]}"
                                      for c in CONFIGS]
    print("| map | mode | " + " | ".join(f"{n} us (GB/s)" for n in names) + " |")
    print("|---|---|" + "---|" * len(names))
    for label, shape in SHAPES.items():
        grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=cl)
        y = torch.randn(shape, device="cuda", dtype=torch.bfloat16).relu().contiguous(
            memory_format=cl)
        for mode, ref_y in (("relu", y), ("sum", None)):
            nbytes = grad.numel() * grad.element_size() * (3 if ref_y is not None else 1)
            want = pytorch(grad, ref_y)[1]
            cells = []
            configs = [None] + CONFIGS  # None: sum_config's choice for this map
            for fn in [pytorch] + [lambda g, yy, c=c: channel_sums(g, yy, c) for c in configs]:
                g, out = graphed(lambda t, fn=fn: fn(t, ref_y), grad)
                us = time_graph(g, args.iters) * 1e3
                error = ((out[1] - want).abs().max() / want.abs().max()).item()
                flag = "" if error < 1e-2 else f" WRONG {error:.1e}"
                cells.append(f"{us:.1f} ({nbytes / us / 1e3:.0f}){flag}")
            chosen = "x".join(map(str, sum_config(grad.numel() // shape[1], ref_y is not None)))
            print(f"| {label} {list(shape)} | {mode} ({chosen}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
