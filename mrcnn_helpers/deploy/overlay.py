"""Detections drawn where they were computed: the translucent masks composited on the GPU.

At 1344x832 a frame's 100 pasted masks are 110 MB of bytes; copying them to the host and blending
them there with numpy is what held the deploy pipeline to a few frames per second. Here the
masks stay on the model's device and a whole batch of frames is composited at once:
`choose_drawn` picks the instances to draw (one drawing per object, as visualize.draw_instances
does) and `blend_masks` blends them in, so only the composited frames (3.3 MB each) cross to the
host, where the box outlines and labels (a few hundred pixels each) are drawn by
visualize.draw_boxes_and_labels. The result equals draw_instances' to the bit for the default
alpha 0.5 (the same float32 arithmetic, the same order), which the tests check on the CPU.

The blend: the host blends worst first, out = out * (1 - a) + color * a per mask, which unrolls
to pixel * (1 - a)^K + sum_j color_j * a * (1 - a)^(drawn masks better than j over the pixel),
K the drawn masks over the pixel. For a = 0.5 every term is exact in float32 up to 15 masks
deep, so summing them best first gives the host's bytes. On a GPU one Triton pass does it
(model/kernels/composite.py); elsewhere a loop over the instances with whole-batch tensors.
"""

from __future__ import annotations

import torch

from mrcnn_helpers.model import kernels
from mrcnn_helpers.visualize import PALETTE

if kernels.ENABLED:
    from mrcnn_helpers.model.kernels.composite import composite_frames


def choose_drawn(masks: torch.Tensor, valid: torch.Tensor, overlap: float | None = 0.6
                 ) -> torch.Tensor:
    """bool [B, N]: which instances of each frame are drawn.

    masks: bool [B, N, h, w], each frame's instances best first; valid: bool [B, N] (False:
    padding, never drawn). An instance whose mask lies more than `overlap` under the masks of
    better instances already drawn is a second drawing of an object and left out (None: every
    valid instance is drawn): draw_instances' greedy choice, made for all frames at once and
    without a host sync (a few small operations per instance rank).
    """
    if overlap is None or masks.shape[1] == 0:
        return valid.clone()
    b, n = int(masks.shape[0]), int(masks.shape[1])
    flat = masks.reshape(b, n, -1)
    areas = flat.sum(2)
    limit = overlap * areas
    covered = torch.zeros_like(flat[:, 0])
    drawn = torch.empty_like(valid)
    for j in range(n):
        m = flat[:, j]
        inside = (m & covered).sum(1)
        drawn[:, j] = valid[:, j] & ((areas[:, j] == 0) | (inside <= limit[:, j]))
        if j + 1 < n:
            covered |= m & drawn[:, j, None]
    return drawn


def class_colors(classes: torch.Tensor, device) -> torch.Tensor:
    """float32 [..., 3]: the visualize.PALETTE color of each contiguous label."""
    palette = torch.tensor(PALETTE, dtype=torch.float32, device=device)
    return palette[(classes.to(device).long() - 1) % len(PALETTE)]


def blend_masks(frames: torch.Tensor, masks: torch.Tensor, drawn: torch.Tensor,
                classes: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """uint8 [B, h, w, 3]: frames uint8 [B, h, w, 3] with the drawn (bool [B, N]) masks (bool
    [B, N, h, w], best first, the best on top) blended in their class colors at `alpha`."""
    colors = class_colors(classes, frames.device)
    if kernels.available(frames):
        return composite_frames(frames, masks, drawn, colors, alpha)
    return blend_masks_reference(frames, masks, drawn, colors, alpha)


def blend_masks_reference(frames: torch.Tensor, masks: torch.Tensor, drawn: torch.Tensor,
                          colors: torch.Tensor, alpha: float) -> torch.Tensor:
    """blend_masks in PyTorch operations (colors float32 [B, N, 3]): the CPU path, and what the
    Triton kernel is checked against."""
    b, n = int(masks.shape[0]), int(masks.shape[1])
    h, w = int(frames.shape[1]), int(frames.shape[2])
    flat = masks.reshape(b, n, h * w)
    weight = torch.ones(b, h * w, dtype=torch.float32, device=frames.device)
    acc = torch.zeros(b, h * w, 3, dtype=torch.float32, device=frames.device)
    for j in range(n):
        m = flat[:, j] & drawn[:, j, None]
        acc += torch.where(m, weight * alpha, 0.0)[..., None] * colors[:, j, None, :]
        weight = torch.where(m, weight * (1.0 - alpha), weight)
    pixels = frames.reshape(b, h * w, 3).float() * weight[..., None] + acc
    return pixels.round_().clamp_(0, 255).to(torch.uint8).reshape(b, h, w, 3)


def composite_batch(frames: torch.Tensor, masks: torch.Tensor, classes: torch.Tensor,
                    valid: torch.Tensor, overlap: float | None = 0.6, alpha: float = 0.5
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(frames with their masks blended in, drawn bool [B, N]) for frames uint8 [B, h, w, 3],
    masks bool [B, N, h, w] best first, classes [B, N] contiguous labels, valid bool [B, N]."""
    drawn = choose_drawn(masks, valid, overlap)
    return blend_masks(frames, masks, drawn, classes, alpha), drawn


def composite_masks(frame: torch.Tensor, masks: torch.Tensor, classes: torch.Tensor,
                    overlap: float | None = 0.6, alpha: float = 0.5
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """One frame: (frame uint8 [h, w, 3] with the masks blended in, the drawn instances' indices
    best first, on the CPU). masks: bool [N, h, w] best first; classes: [N]."""
    n = int(masks.shape[0])
    if n == 0:
        return frame, torch.zeros(0, dtype=torch.long)
    valid = torch.ones(1, n, dtype=torch.bool, device=masks.device)
    blended, drawn = composite_batch(frame[None], masks[None], classes[None], valid, overlap,
                                     alpha)
    return blended[0], torch.nonzero(drawn[0]).flatten().cpu()
