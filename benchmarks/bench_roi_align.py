"""The multi-level RoIAlign kernels (model/kernels/roi_align.py) forward and backward at the
seed spec's training shapes, by warps per program (kernels.roi_align.FORWARD_WARPS and
BACKWARD_WARPS; MRCNN_ROI_FORWARD_WARPS, MRCNN_ROI_BACKWARD_WARPS) and with the backward's
small bins merged per pixel (MERGE_BACKWARD, MRCNN_ROI_MERGE_BACKWARD=1) or not, replayed from
a CUDA graph.

    python benchmarks/bench_roi_align.py [--iters 30]

Features: P2-P5 of an 832x1344 batch of 8, 256 channels, bf16 channels_last. Sets: the box
head's 4096 RoIs at 7 x 7 and the mask head's 1024 at 14 x 14, sampling ratio 2, each RoI on
its FPN level (torchvision's level mapping). Prints ms per forward and per forward + backward,
and whether the pooled values and gradients equal those of 4 warps, with device, date and
versions. Needs a CUDA GPU with Triton.
"""

import argparse
import datetime
import math

import torch
import triton
from bench_conv_fusion import graphed, time_graph

from mrcnn_helpers.model.kernels import roi_align


def rois(n, batch, height, width, gen):
    """n random RoIs [n, 5] over the batch and their level index (0 = P2)."""
    side = torch.exp(torch.rand(n, 2, generator=gen) * math.log(600 / 16)) * 16
    xy = torch.rand(n, 2, generator=gen) * (torch.tensor([width, height]) - side).clamp(min=1)
    index = torch.randint(0, batch, (n, 1), generator=gen).float()
    boxes = torch.cat([index, xy, xy + side], 1)
    level = torch.floor(4 + torch.log2(side.prod(1).sqrt() / 224 + 1e-8)).clamp(2, 5) - 2
    return boxes.cuda(), level.to(torch.int32).cuda()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=30)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    batch, height, width, channels = 8, 832, 1344, 256
    features = [torch.randn(batch, channels, height // s, width // s, generator=gen).to(
        "cuda", torch.bfloat16).contiguous(memory_format=torch.channels_last).requires_grad_(True)
        for s in (4, 8, 16, 32)]
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    sets = [(*rois(4096, batch, height, width, gen), 7), (*rois(1024, batch, height, width, gen),
                                                          14)]
    upstream = [torch.randn(n.shape[0], channels, p, p, generator=gen).to("cuda", torch.bfloat16)
                for n, _, p in sets]

    def forward(_):
        return roi_align.multilevel_roi_align_sets_triton(features, sets, scales, 2)

    def forward_backward(_):
        outs = forward(_)
        return outs, torch.autograd.grad(outs, features, upstream)

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{triton.__version__}, {datetime.date.today()}, 832x1344 batch 8, 256 channels bf16 "
          "channels_last, 4096 RoIs 7x7 + 1024 RoIs 14x14, CUDA graphs")
    print("| warps forward / backward, backward | forward ms | forward + backward ms | "
          "same as 4 / 4 |")
    print("|---|---|---|---|")
    reference = None
    for *warps, merge in ((4, 4, False), (4, 2, False), (2, 2, False), (4, 1, False),
                          (4, 4, True), (4, 2, True)):
        roi_align.FORWARD_WARPS, roi_align.BACKWARD_WARPS = warps
        roi_align.MERGE_BACKWARD = merge
        g_f, _ = graphed(forward, None)
        g_fb, out = graphed(forward_backward, None)
        ms_f, ms_fb = time_graph(g_f, args.iters), time_graph(g_fb, args.iters)
        if reference is None:
            reference = out
        pooled_same = all(torch.equal(a, b) for a, b in zip(out[0], reference[0]))
        # The atomics add in a different order: gradients within fp32 rounding, not equal.
        grad_error = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                         for a, b in zip(out[1], reference[1]))
        label = f"{warps[0]} / {warps[1]}, {'merged' if merge else 'per sample'}"
        print(f"| {label} | {ms_f:.3f} | {ms_fb:.3f} | pooled "
              f"{'yes' if pooled_same else 'NO'}, gradients within {grad_error:.1e} |")


if __name__ == "__main__":
    main()
