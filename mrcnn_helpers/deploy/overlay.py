"""Detections drawn where they were computed: the translucent masks composited on the GPU.

At 1344x832 a frame's 100 pasted masks are 110 MB of bytes; copying them to the host and blending
them there with numpy is what held the deploy pipeline to a few frames per second. Here the
masks stay on the model's device: `composite_masks` picks the instances to draw (one drawing per
object, as visualize.draw_instances does) and blends them into the frame there, so only the
composited frame (3.3 MB) crosses to the host, where the box outlines and labels (a few hundred
pixels each) are drawn by visualize.draw_boxes_and_labels. The result equals draw_instances'
(the same float32 arithmetic, the same order), which the tests check on the CPU.
"""

from __future__ import annotations

import torch

from mrcnn_helpers.visualize import PALETTE


def composite_masks(frame: torch.Tensor, masks: torch.Tensor, classes: torch.Tensor,
                    overlap: float | None = 0.6, alpha: float = 0.5
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(frame with the masks blended in, the drawn instances' indices best first).

    frame: uint8 [h, w, 3] on any device; masks: bool [N, h, w] on the same device, best-scored
    first (as postprocess_detections returns them); classes: contiguous labels [N].
    overlap: an instance whose mask lies more than this fraction under the masks of better
    instances already drawn is a second drawing of an object and left out (None: draw all).

    A handful of whole-tensor operations, not a loop over instances (a loop of small kernels
    per instance cost more than the model at 100 detections):
    - which to draw: instance j is drawn when its mask lies at most `overlap` under the drawn
      better ones. Iterated from "all drawn" until nothing changes; each pass fixes at least
      the next instance in order, and the fixed point is the greedy choice draw_instances makes.
    - blending: the host blends worst first, out = out * (1 - a) + color * a per mask, which
      unrolls to pixel * (1 - a)^K + sum_j color_j * a * (1 - a)^(drawn masks above j), K the
      masks over the pixel. For a = 0.5 every term is exact in float32 up to 15 masks deep, so
      the result is the host's to the bit.
    """
    n = int(masks.shape[0])
    device = frame.device
    if n == 0:
        return frame, torch.zeros(0, dtype=torch.long)
    h, w = int(frame.shape[0]), int(frame.shape[1])
    flat = masks.reshape(n, h * w)
    keep = torch.ones(n, dtype=torch.bool, device=device)
    if overlap is not None:
        areas = flat.sum(1)
        for _ in range(n):
            drawn = flat & keep[:, None]
            covered_before = (drawn.cumsum(0, dtype=torch.int32) - drawn.int()) > 0
            inside = (flat & covered_before).sum(1)
            updated = (areas == 0) | (inside <= overlap * areas)
            if torch.equal(updated, keep):
                break
            keep = updated
    drawn = (flat & keep[:, None]).float()
    above = drawn.cumsum(0) - drawn  # drawn masks better than j over each pixel
    weights = drawn * alpha * torch.pow(1.0 - alpha, above)
    palette = torch.tensor(PALETTE, dtype=torch.float32, device=device)
    colors = palette[(classes.to(device).long() - 1) % len(PALETTE)]
    depth = drawn.sum(0)  # [h * w]
    pixels = frame.reshape(h * w, 3).float() * torch.pow(1.0 - alpha, depth)[:, None]
    blended = pixels + weights.t() @ colors
    out = blended.round_().clamp_(0, 255).to(torch.uint8).reshape(h, w, 3)
    return out, torch.nonzero(keep).flatten().cpu()
