"""Anchor boxes for every FPN level, in the order the RPN head's outputs are flattened.

TLT's convention: on level l (stride 2**l) the anchor size is anchor_scale * 2**l * 2**(s / num_scales)
for s in 0..num_scales-1, and an aspect ratio (ax, ay) gives width = size * ax, height = size * ay.
With anchor_scale 8 on levels 2..6 this is the 32..512 pixel ladder of torchvision's detector.
Anchors are centred on the feature-map grid points (i * stride, j * stride) and their half-extents
rounded to whole pixels, as torchvision's AnchorGenerator does, so its COCO weights transfer.
"""

import torch
from torch import Tensor


def cell_anchors(stride: int, anchor_scale: float, num_scales: int,
                 aspect_ratios: tuple[tuple[float, float], ...]) -> Tensor:
    """Anchors of one level centred on (0, 0): Tensor[len(aspect_ratios) * num_scales, 4].

    Ordered aspect-ratio-major, scale-minor (torchvision's order for one size per level).
    """
    rows = []
    for ax, ay in aspect_ratios:
        for s in range(num_scales):
            size = anchor_scale * stride * 2.0 ** (s / num_scales)
            w, h = size * ax, size * ay
            rows.append([-w / 2, -h / 2, w / 2, h / 2])
    return torch.tensor(rows, dtype=torch.float32).round()


def generate_anchors(feature_sizes: list[tuple[int, int]], strides: list[int], anchor_scale: float,
                     num_scales: int, aspect_ratios: tuple[tuple[float, float], ...],
                     device: torch.device | str = "cpu") -> Tensor:
    """All anchors of an image: Tensor[sum_l H_l * W_l * A, 4], (x1, y1, x2, y2) input pixels.

    Level-major, then feature row, then column, then anchor: the order of
    `head_output.permute(0, 2, 3, 1).reshape(B, -1)` concatenated over levels.
    """
    out = []
    for (fh, fw), stride in zip(feature_sizes, strides):
        base = cell_anchors(stride, anchor_scale, num_scales, aspect_ratios).to(device)
        ys = torch.arange(fh, dtype=torch.float32, device=device) * stride
        xs = torch.arange(fw, dtype=torch.float32, device=device) * stride
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        shifts = torch.stack((cx, cy, cx, cy), dim=-1).reshape(-1, 1, 4)
        out.append((shifts + base[None]).reshape(-1, 4))
    return torch.cat(out)


def num_anchors_per_location(num_scales: int, aspect_ratios: tuple[tuple[float, float], ...]) -> int:
    return num_scales * len(aspect_ratios)
