"""The stem's 7 x 7 stride-2 convolution of 3-channel images (what stock torchvision runs)
against its space-to-depth rewrite (model/stem.py: a 4 x 4 convolution of 12-channel 2 x 2
blocks), forward, in bf16 channels_last, each replayed from a CUDA graph.

    python benchmarks/bench_stem.py [--batch 8] [--height 832 --width 1344] [--iters 50]

Rows: the plain convolution; the rewrite whole (pad + pixel_unshuffle + layout + convolution);
its convolution alone. Then what follows it in the frozen stem: bias + ReLU and PyTorch's max
pool (which also writes int64 indices) against the one pass of kernels/pool.py. Prints ms per
call, the effective TFLOP/s of the 7 x 7 convolution and the largest difference from the plain
output (then the number of pooled values that differ), with device, date and versions. Needs a
CUDA GPU.
"""

import argparse
import datetime

import torch
import torch.nn.functional as F
from bench_conv_fusion import graphed, time_graph

from mrcnn_helpers.model import stem
from mrcnn_helpers.model.kernels.bias import bias_act_triton
from mrcnn_helpers.model.kernels.pool import bias_relu_maxpool_triton


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--height", type=int, default=832)
    ap.add_argument("--width", type=int, default=1344)
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    cl, dtype = torch.channels_last, torch.bfloat16
    x = torch.randn(args.batch, 3, args.height, args.width, device="cuda", dtype=dtype)
    x = x.contiguous(memory_format=cl)
    weight = (torch.randn(64, 3, 7, 7, device="cuda") * 0.05).to(dtype).contiguous(
        memory_format=cl)
    blocks = F.pixel_unshuffle(F.pad(x, (3, 3, 3, 3)), 2).contiguous(memory_format=cl)
    moved = stem.space_to_depth_weight(weight).contiguous(memory_format=cl)
    jobs = {
        "7x7 stride 2, 3 channels (plain)": (lambda t: F.conv2d(t, weight, stride=2, padding=3),
                                             x),
        "space-to-depth, whole": (lambda t: stem.conv7x7_stride2_space_to_depth(t, weight), x),
        "space-to-depth, convolution only": (lambda t: F.conv2d(t, moved), blocks),
    }
    flop = 2 * args.batch * 64 * 3 * 49 * (args.height // 2) * (args.width // 2)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"{datetime.date.today()}, batch {args.batch}, {args.height}x{args.width}, bf16 "
          "channels_last, CUDA graphs")
    print("| stem convolution | ms | TFLOP/s (7x7 work) | max abs difference |")
    print("|---|---|---|---|")
    reference = None
    for name, (fn, inp) in jobs.items():
        g, out = graphed(fn, inp)
        ms = time_graph(g, args.iters)
        reference = out.float() if reference is None else reference
        diff = (out.float() - reference).abs().max().item()
        print(f"| {name} | {ms:.3f} | {flop / ms / 1e9:.1f} | {diff:.3g} |")

    # What follows the convolution: its bias, the ReLU and the 3 x 3 stride-2 max pool.
    conv_out = F.conv2d(x, weight, stride=2, padding=3)
    bias = torch.randn(64, device="cuda", dtype=dtype)
    pool_jobs = {
        "bias + ReLU (bias_act), then max_pool2d": lambda t: F.max_pool2d(
            bias_act_triton(t, bias, True), 3, 2, 1),
        "one pass (kernels/pool.py, MRCNN_STEM_POOL=1)": lambda t: bias_relu_maxpool_triton(
            t, bias),
    }
    moved_bytes = conv_out.numel() * conv_out.element_size() * 5 / 4  # read the map, write 1/4
    print("\n| after the stem convolution | ms | GB/s (one read, one pooled write) | "
          "values that differ |")
    print("|---|---|---|---|")
    reference = None
    for name, fn in pool_jobs.items():
        g, out = graphed(fn, conv_out)
        ms = time_graph(g, args.iters)
        reference = out if reference is None else reference
        print(f"| {name} | {ms:.3f} | {moved_bytes / ms / 1e6:.0f} | "
              f"{int((out != reference).sum())} |")


if __name__ == "__main__":
    main()
