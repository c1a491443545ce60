"""Non-maximum suppression over a whole batch in one NMS launch, as fixed-shape keep masks.

Per image and per group (FPN level in the RPN, class in detection), greedy NMS keeps a box unless a
higher-scoring box of the same image and group overlaps it by more than the IoU threshold: exactly
what `torchvision.ops.batched_nms` computes on each image. Calling that per image costs one host
synchronization per call, and on large candidate sets torchvision falls back to one NMS (and one
sync) per group: about 50 syncs per training step in the RPN alone. Here every (image, group) pair
is moved to its own disjoint coordinate range, so a single `torchvision.ops.nms` handles the batch
(one sync). Coordinates are offset in float64 so the shift costs no precision.

Callers then take a fixed number of the kept boxes per image with `topk` on the masked scores,
which keeps every shape static.
"""

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import nms


def nms_keep_mask(boxes: Tensor, scores: Tensor, groups: Tensor, candidate: Tensor,
                  iou_threshold: float) -> Tensor:
    """Which boxes greedy NMS keeps, per image and group.

    boxes: Tensor[B, N, 4] (x1, y1, x2, y2); scores: Tensor[B, N]; groups: long Tensor[B, N] or
    [N] (boxes of different groups never suppress each other); candidate: bool Tensor[B, N]
    (False: neither kept nor suppressing). Returns bool Tensor[B, N].

    Non-candidates are not removed (that would need a host sync to count them) but collapsed to
    empty boxes, whose IoU with anything is 0 or NaN, so they suppress nothing.
    """
    batch, n = scores.shape
    if batch * n == 0:
        return torch.zeros((batch, n), dtype=torch.bool, device=scores.device)
    flat = boxes.reshape(-1, 4).double()
    flat = torch.where(candidate.reshape(-1, 1), flat, flat[:, :2].repeat(1, 2))
    image = torch.arange(batch, device=scores.device).repeat_interleave(n)
    groups = groups.expand(batch, n).reshape(-1)
    group_id = (image * (groups.max() + 1) + groups).double()  # device tensors: no host sync
    span = flat.max() - flat.min() + 1
    kept = nms(flat + (group_id * span)[:, None], scores.reshape(-1).double(), iou_threshold)
    keep = torch.zeros(batch * n, dtype=torch.bool, device=scores.device)
    keep[kept] = True
    return keep.view(batch, n) & candidate


def top_kept(scores: Tensor, keep: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The k highest-scoring kept entries of each row, best first.

    scores: Tensor[B, N] of probabilities (> -1); keep: bool Tensor[B, N]. Returns (index Long[B, k],
    score Tensor[B, k], valid bool Tensor[B, k]); rows with fewer than k kept entries (or N < k)
    end in invalid slots (score 0, index 0).
    """
    n = scores.shape[1]
    masked = torch.where(keep, scores.float(), torch.full_like(scores, -1.0, dtype=torch.float32))
    values, index = masked.topk(min(k, n), dim=1, sorted=True)
    valid = keep.gather(1, index)
    if k > n:
        index, values = F.pad(index, (0, k - n)), F.pad(values, (0, k - n))
        valid = F.pad(valid, (0, k - n))
    index = torch.where(valid, index, torch.zeros_like(index))
    return index, torch.where(valid, values, torch.zeros_like(values)).to(scores.dtype), valid
