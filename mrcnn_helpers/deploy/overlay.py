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
    Box-sized crops keep the work proportional to the objects' size, not to the frame's.
    """
    n = int(masks.shape[0])
    device = frame.device
    classes = classes.to(device)
    palette = torch.tensor(PALETTE, dtype=torch.float32, device=device)
    if n == 0:
        return frame, torch.zeros(0, dtype=torch.long)
    # Each mask's bounding rows / columns, all read in one copy.
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    h, w = int(masks.shape[1]), int(masks.shape[2])
    first_row = torch.where(rows.any(1), rows.float().argmax(1), 0)
    last_row = torch.where(rows.any(1), h - rows.flip(1).float().argmax(1), 0)
    first_col = torch.where(cols.any(1), cols.float().argmax(1), 0)
    last_col = torch.where(cols.any(1), w - cols.flip(1).float().argmax(1), 0)
    extents = torch.stack((first_row, last_row, first_col, last_col), 1).tolist()
    drawn: list[int] = []
    if overlap is not None:
        covered = torch.zeros((h, w), dtype=torch.bool, device=device)
        areas = masks.flatten(1).sum(1)
        inside = []
        for i, (y1, y2, x1, x2) in enumerate(extents):
            m = masks[i, y1:y2, x1:x2]
            inside.append((m & covered[y1:y2, x1:x2]).sum())
            covered[y1:y2, x1:x2] |= m
        # Decided on the host in one read: a later instance's coverage counts only the drawn
        # ones, so the union is rebuilt below when one is dropped (rare: duplicates).
        inside_host = torch.stack(inside).tolist()
        areas_host = areas.tolist()
        if all(a == 0 or c <= overlap * a for c, a in zip(inside_host, areas_host, strict=True)):
            drawn = list(range(n))
        else:
            drawn = _drawn_sequentially(masks, extents, areas_host, overlap)
    else:
        drawn = list(range(n))
    out = frame.to(torch.float32)
    colors = palette[(classes.long() - 1) % len(PALETTE)] * alpha
    for i in reversed(drawn):  # the best on top
        y1, y2, x1, x2 = extents[i]
        region = out[y1:y2, x1:x2]
        m = masks[i, y1:y2, x1:x2].unsqueeze(-1)
        region.copy_(torch.where(m, region * (1.0 - alpha) + colors[i], region))
    blended = out.round_().clamp_(0, 255).to(torch.uint8)
    return blended, torch.tensor(drawn, dtype=torch.long)


def _drawn_sequentially(masks, extents, areas, overlap) -> list[int]:
    """The one-drawing-per-object choice with one host read per instance (duplicates present)."""
    h, w = int(masks.shape[1]), int(masks.shape[2])
    covered = torch.zeros((h, w), dtype=torch.bool, device=masks.device)
    drawn = []
    for i, (y1, y2, x1, x2) in enumerate(extents):
        m = masks[i, y1:y2, x1:x2]
        if areas[i] and int((m & covered[y1:y2, x1:x2]).sum()) > overlap * areas[i]:
            continue
        covered[y1:y2, x1:x2] |= m
        drawn.append(i)
    return drawn
