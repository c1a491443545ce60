"""Multi-level RoIAlign in Triton: every RoI pooled from its own FPN level, reading the levels in
their own dtype and layout (bf16, channels_last on CUDA), with no host synchronization.

The arithmetic is torchvision's `roi_align(aligned=False, sampling_ratio=S)`: a RoI (x1, y1, x2,
y2) in input pixels is scaled to the level (1 / 2**level), at least 1 x 1; each of its P x P bins
averages S x S bilinear samples; a sample outside [-1, size] contributes 0, one inside is clamped
to the map. Accumulation is fp32; the result is written in the features' dtype.

Why a kernel of its own: torchvision's op converts each level to fp32 NCHW (autocast upcasts it)
and back, its backward scatters fp32 atomics across NCHW planes, and pooling each level
separately needs the per-level counts on the host. Here one launch per level runs over all RoIs
(RoIs of other levels return at once), loads and atomics run along the channels, which are
contiguous in channels_last maps, and nothing waits for the host, so the step can be captured in
a CUDA graph.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

# Warps per program (one RoI row of bins, all channels). With 256 channels, 4 warps give each
# thread 2 channels: the backward's atomics compile to 2-float vector atomics; 2 warps give
# 4-float ones, half the atomic instructions (the backward took 1.38 ms per training step at
# 832x1344, 2026-12-04 morning profile), and the forward's loads get twice as wide.
# MRCNN_ROI_FORWARD_WARPS / MRCNN_ROI_BACKWARD_WARPS try other counts until measured
# (benchmarks/bench_roi_align.py).
FORWARD_WARPS = int(os.environ.get("MRCNN_ROI_FORWARD_WARPS", "4"))
BACKWARD_WARPS = int(os.environ.get("MRCNN_ROI_BACKWARD_WARPS", "4"))
# The backward's per-pixel merge of a small bin's samples (_roi_align_backward, MERGE): opt-in
# with MRCNN_ROI_MERGE_BACKWARD=1 until measured.
MERGE_BACKWARD = os.environ.get("MRCNN_ROI_MERGE_BACKWARD", "0") == "1"


@triton.jit
def _sample_weights(y, x, height, width):
    """Bilinear corner indices and weights of one sample (torchvision's boundary rules)."""
    valid = (y >= -1.0) & (y <= height) & (x >= -1.0) & (x <= width)
    y = tl.maximum(y, 0.0)
    x = tl.maximum(x, 0.0)
    y_low = tl.minimum(y.to(tl.int32), height - 1)
    x_low = tl.minimum(x.to(tl.int32), width - 1)
    y_edge = y_low >= height - 1
    x_edge = x_low >= width - 1
    y_high = tl.where(y_edge, y_low, y_low + 1)
    x_high = tl.where(x_edge, x_low, x_low + 1)
    y = tl.where(y_edge, y_low.to(tl.float32), y)
    x = tl.where(x_edge, x_low.to(tl.float32), x)
    ly = y - y_low.to(tl.float32)
    lx = x - x_low.to(tl.float32)
    hy = 1.0 - ly
    hx = 1.0 - lx
    scale = tl.where(valid, 1.0, 0.0)
    return (y_low, y_high, x_low, x_high, hy * hx * scale, hy * lx * scale, ly * hx * scale,
            ly * lx * scale)


@triton.jit
def _axis_weights(v, size):
    """One axis of _sample_weights: (low, high, weight of low, weight of high), the weights
    zero where the coordinate is outside [-1, size]. A sample's corner weights are the
    products of its two axes' weights."""
    valid = (v >= -1.0) & (v <= size)
    v = tl.maximum(v, 0.0)
    low = tl.minimum(v.to(tl.int32), size - 1)
    edge = low >= size - 1
    high = tl.where(edge, low, low + 1)
    v = tl.where(edge, low.to(tl.float32), v)
    frac = v - low.to(tl.float32)
    scale = tl.where(valid, 1.0, 0.0)
    return low, high, (1.0 - frac) * scale, frac * scale


@triton.jit
def _merged_axis(a_low, a_high, a_wl, a_wh, b_low, b_high, b_wl, b_wh, first, k):
    """The weight of line first + k along one axis, summed over a bin's two samples."""
    line = first + k
    return (tl.where(a_low == line, a_wl, 0.0) + tl.where(a_high == line, a_wh, 0.0)
            + tl.where(b_low == line, b_wl, 0.0) + tl.where(b_high == line, b_wh, 0.0))


@triton.jit
def _roi_geometry(rois_ptr, n, spatial_scale, P: tl.constexpr):
    batch = tl.load(rois_ptr + n * 5).to(tl.int32)
    x1 = tl.load(rois_ptr + n * 5 + 1) * spatial_scale
    y1 = tl.load(rois_ptr + n * 5 + 2) * spatial_scale
    x2 = tl.load(rois_ptr + n * 5 + 3) * spatial_scale
    y2 = tl.load(rois_ptr + n * 5 + 4) * spatial_scale
    bin_w = tl.maximum(x2 - x1, 1.0) / P
    bin_h = tl.maximum(y2 - y1, 1.0) / P
    return batch, x1, y1, bin_w, bin_h


@triton.jit
def _roi_align_forward(feat_ptr, rois_ptr, levels_ptr, out_ptr, channels, height, width,
                       stride_b, stride_c, stride_h, stride_w, spatial_scale,
                       LEVEL: tl.constexpr, P: tl.constexpr, S: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    n = tl.program_id(0)
    ph = tl.program_id(1)
    if tl.load(levels_ptr + n) != LEVEL:
        return
    batch, x1, y1, bin_w, bin_h = _roi_geometry(rois_ptr, n, spatial_scale, P)
    offs = tl.arange(0, BLOCK_C)
    cmask = offs < channels
    base = feat_ptr + batch.to(tl.int64) * stride_b + offs * stride_c
    for pw in tl.static_range(P):
        acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for iy in tl.static_range(S):
            y = y1 + ph * bin_h + (iy + 0.5) * bin_h / S
            for ix in tl.static_range(S):
                x = x1 + pw * bin_w + (ix + 0.5) * bin_w / S
                y0, yh, x0, xh, w1, w2, w3, w4 = _sample_weights(y, x, height, width)
                v1 = tl.load(base + y0 * stride_h + x0 * stride_w, mask=cmask, other=0.0)
                v2 = tl.load(base + y0 * stride_h + xh * stride_w, mask=cmask, other=0.0)
                v3 = tl.load(base + yh * stride_h + x0 * stride_w, mask=cmask, other=0.0)
                v4 = tl.load(base + yh * stride_h + xh * stride_w, mask=cmask, other=0.0)
                acc += (w1 * v1.to(tl.float32) + w2 * v2.to(tl.float32)
                        + w3 * v3.to(tl.float32) + w4 * v4.to(tl.float32))
        out = out_ptr + ((n * P + ph) * P + pw).to(tl.int64) * channels + offs
        tl.store(out, (acc / (S * S)).to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _roi_align_backward(grad_ptr, rois_ptr, levels_ptr, grad_feat_ptr, channels, height, width,
                        spatial_scale, LEVEL: tl.constexpr, P: tl.constexpr, S: tl.constexpr,
                        BLOCK_C: tl.constexpr, MERGE: tl.constexpr):
    """grad_feat (fp32, [B, H, W, C] contiguous) += the adjoint of the forward's samples.

    The atomics are relaxed: they only accumulate, nothing in the kernel reads them back, and the
    kernel's end orders them before any reader; acq_rel (Triton's default) fences each one.

    MERGE (with S == 2): in a RoI whose bins are at most 2 pixels on a side, a bin's 2 x 2
    samples fall within 3 x 3 pixels, so their 16 corner contributions are summed per pixel
    first (the weights are separable: row weight times column weight) and at most 9 atomics
    are issued, none for a zero weight. The mask head's RoIs (14 x 14 bins over ~14-28 pixels
    of their level) take that path."""
    n = tl.program_id(0)
    ph = tl.program_id(1)
    if tl.load(levels_ptr + n) != LEVEL:
        return
    batch, x1, y1, bin_w, bin_h = _roi_geometry(rois_ptr, n, spatial_scale, P)
    offs = tl.arange(0, BLOCK_C)
    cmask = offs < channels
    row = width * channels
    base = grad_feat_ptr + batch.to(tl.int64) * height * row + offs
    merged = False
    if MERGE and S == 2:
        merged = (bin_h <= 2.0) & (bin_w <= 2.0)
    if merged:
        ya_low, ya_high, ya_wl, ya_wh = _axis_weights(y1 + ph * bin_h + 0.25 * bin_h, height)
        yb_low, yb_high, yb_wl, yb_wh = _axis_weights(y1 + ph * bin_h + 0.75 * bin_h, height)
        for pw in tl.static_range(P):
            g = tl.load(grad_ptr + ((n * P + ph) * P + pw).to(tl.int64) * channels + offs,
                        mask=cmask, other=0.0).to(tl.float32) / (S * S)
            xa_low, xa_high, xa_wl, xa_wh = _axis_weights(x1 + pw * bin_w + 0.25 * bin_w, width)
            xb_low, xb_high, xb_wl, xb_wh = _axis_weights(x1 + pw * bin_w + 0.75 * bin_w, width)
            for k in tl.static_range(3):
                wy = _merged_axis(ya_low, ya_high, ya_wl, ya_wh, yb_low, yb_high, yb_wl, yb_wh,
                                  ya_low, k)
                for m in tl.static_range(3):
                    wx = _merged_axis(xa_low, xa_high, xa_wl, xa_wh, xb_low, xb_high, xb_wl,
                                      xb_wh, xa_low, m)
                    w = wy * wx
                    # w spread over the channels: (Triton's interpreter cannot AND a vector
                    # mask with a scalar condition)
                    live = cmask & (tl.zeros((BLOCK_C,), tl.float32) + w != 0.0)
                    tl.atomic_add(base + (ya_low + k) * row + (xa_low + m) * channels, g * w,
                                  mask=live, sem="relaxed")
    else:
        for pw in tl.static_range(P):
            g = tl.load(grad_ptr + ((n * P + ph) * P + pw).to(tl.int64) * channels + offs,
                        mask=cmask, other=0.0).to(tl.float32) / (S * S)
            for iy in tl.static_range(S):
                y = y1 + ph * bin_h + (iy + 0.5) * bin_h / S
                for ix in tl.static_range(S):
                    x = x1 + pw * bin_w + (ix + 0.5) * bin_w / S
                    y0, yh, x0, xh, w1, w2, w3, w4 = _sample_weights(y, x, height, width)
                    tl.atomic_add(base + y0 * row + x0 * channels, g * w1, mask=cmask,
                                  sem="relaxed")
                    tl.atomic_add(base + y0 * row + xh * channels, g * w2, mask=cmask,
                                  sem="relaxed")
                    tl.atomic_add(base + yh * row + x0 * channels, g * w3, mask=cmask,
                                  sem="relaxed")
                    tl.atomic_add(base + yh * row + xh * channels, g * w4, mask=cmask,
                                  sem="relaxed")


def _block(channels: int) -> int:
    return triton.next_power_of_2(int(channels))


class MultilevelRoIAlign(torch.autograd.Function):
    """RoIAlign of one or more sets of rois [N_i, 5] (batch index, x1, y1, x2, y2; finite) from
    the same features, each RoI from features[levels[n]] at its set's output size.

    features: [B, C, H_l, W_l] per level (any strides, one dtype); levels: int32 [N_i] index into
    features (-1: pooled to zeros). Returns one [N_i, P_i, P_i, C] per set in the features' dtype
    (channels last). The backward accumulates every set's gradient into one fp32 map per level
    and rounds it once: the box and mask heads pool the same FPN maps in training, and separate
    calls would cost a zeroed fp32 map, a conversion and autograd's sum of the two per level
    (about 1 ms of the seed spec's step at 832x1344, 2026-12-03).
    """

    @staticmethod
    def forward(ctx, scales: tuple, output_sizes: tuple, sampling_ratio: int,
                *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.set_materialize_grads(False)  # a set whose output no loss reads: no backward work
        sets, features = tensors[:2 * len(output_sizes)], tensors[2 * len(output_sizes):]
        channels = features[0].shape[1]
        outs = []
        for i, size in enumerate(output_sizes):
            rois, levels = sets[2 * i], sets[2 * i + 1]
            n = rois.shape[0]
            out = torch.zeros((n, size, size, channels), dtype=features[0].dtype,
                              device=rois.device)
            if n:
                for level, (feat, scale) in enumerate(zip(features, scales, strict=True)):
                    _roi_align_forward[(n, size)](
                        feat, rois, levels, out, channels, feat.shape[2], feat.shape[3],
                        *feat.stride(), float(scale), LEVEL=level, P=size, S=sampling_ratio,
                        BLOCK_C=_block(channels), num_warps=FORWARD_WARPS)
            outs.append(out)
        ctx.save_for_backward(*sets)
        ctx.meta = (scales, output_sizes, sampling_ratio,
                    [(tuple(f.shape), f.dtype) for f in features])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outs: Tensor | None):
        sets = ctx.saved_tensors
        scales, output_sizes, sampling_ratio, shapes = ctx.meta
        grad_outs = [None if g is None else g.contiguous() for g in grad_outs]
        grads = []
        for level, ((b, c, h, w), dtype) in enumerate(shapes):
            grad = torch.zeros((b, h, w, c), dtype=torch.float32, device=sets[0].device)
            for i, size in enumerate(output_sizes):
                rois, levels = sets[2 * i], sets[2 * i + 1]
                if grad_outs[i] is None or not rois.shape[0]:
                    continue
                _roi_align_backward[(rois.shape[0], size)](
                    grad_outs[i], rois, levels, grad, c, h, w, float(scales[level]),
                    LEVEL=level, P=size, S=sampling_ratio, BLOCK_C=_block(c),
                    MERGE=MERGE_BACKWARD, num_warps=BACKWARD_WARPS)
            # [B, H, W, C] viewed as [B, C, H, W]: the channels_last layout of the features.
            grads.append(grad.to(dtype).permute(0, 3, 1, 2))
        return (None, None, None, *[None] * len(sets), *grads)


def multilevel_roi_align_sets_triton(features: list[Tensor], sets: list[tuple[Tensor, Tensor, int]],
                                     scales: list[float],
                                     sampling_ratio: int = 2) -> list[Tensor]:
    """[N_i, C, P_i, P_i] (channels_last views) RoIAlign of each set (rois [N_i, 5], levels
    [N_i], output size P_i) from the same features, in one autograd node."""
    tensors = []
    for rois, levels, _ in sets:
        tensors += [rois.float().contiguous(), levels.to(torch.int32).contiguous()]
    outs = MultilevelRoIAlign.apply(tuple(scales), tuple(int(p) for _, _, p in sets),
                                    int(sampling_ratio), *tensors, *features)
    return [out.permute(0, 3, 1, 2) for out in outs]


def multilevel_roi_align_triton(features: list[Tensor], rois: Tensor, levels: Tensor,
                                scales: list[float], output_size: int,
                                sampling_ratio: int = 2) -> Tensor:
    """[N, C, P, P] (a channels_last view) RoIAlign of each RoI from features[levels[n]]."""
    return multilevel_roi_align_sets_triton(features, [(rois, levels, output_size)], scales,
                                            sampling_ratio)[0]
