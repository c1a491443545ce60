"""Mask targets and mask pasting.

Ground-truth masks arrive as TLT does it: each instance's mask cropped to its gt box and resampled
to gt_mask_size x gt_mask_size (uint8, 0..255 soft). A training target for a RoI is that mask
re-sampled onto the RoI (`project_masks_to_rois`); at inference the R x R prediction of a detection
is resampled back into the image inside its box (`paste_masks_in_image`). Both are plain
bilinear resamplings in continuous coordinates, batched over all instances at once.
"""

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align


def project_masks_to_rois(gt_masks: Tensor, gt_boxes: Tensor, rois: Tensor, matched: Tensor,
                          resolution: int) -> Tensor:
    """Mask targets of RoIs from box-relative gt masks.

    gt_masks: uint8/float Tensor[B, M, S, S] (255 = inside for uint8); gt_boxes: Tensor[B, M, 4];
    rois: Tensor[B, Q, 4]; matched: Long[B, Q] index of each RoI's gt. All boxes in input pixels.
    Returns float Tensor[B, Q, resolution, resolution] in [0, 1]; parts of a RoI outside its gt box
    are background.
    """
    batch, num_gt, size = gt_masks.shape[0], gt_masks.shape[1], gt_masks.shape[-1]
    q = rois.shape[1]
    if q == 0 or num_gt == 0:
        return rois.new_zeros((batch, q, resolution, resolution))
    scale = 1.0 / 255.0 if gt_masks.dtype == torch.uint8 else 1.0
    masks = gt_masks.reshape(batch * num_gt, 1, size, size).float() * scale
    gt = gt_boxes.gather(1, matched[..., None].expand(-1, -1, 4)).float()
    gw = (gt[..., 2] - gt[..., 0]).clamp(min=1e-3)
    gh = (gt[..., 3] - gt[..., 1]).clamp(min=1e-3)
    # RoI corners in the gt mask's own pixel frame: the gt box spans [0, S] there.
    x1 = (rois[..., 0] - gt[..., 0]) / gw * size
    y1 = (rois[..., 1] - gt[..., 1]) / gh * size
    x2 = (rois[..., 2] - gt[..., 0]) / gw * size
    y2 = (rois[..., 3] - gt[..., 1]) / gh * size
    image_index = matched + torch.arange(batch, device=matched.device)[:, None] * num_gt
    boxes = torch.stack((image_index.float(), x1, y1, x2, y2), dim=-1).reshape(-1, 5)
    out = roi_align(masks, boxes, (resolution, resolution), spatial_scale=1.0, sampling_ratio=2,
                    aligned=True)
    return out.reshape(batch, q, resolution, resolution).clamp(0.0, 1.0)


def paste_masks_in_image(masks: Tensor, boxes: Tensor, height: int, width: int,
                         chunk_pixels: int = 1 << 25) -> Tensor:
    """Resample R x R mask probabilities into an image.

    masks: float Tensor[N, R, R] (probabilities, row = y); boxes: Tensor[N, 4] (x1, y1, x2, y2)
    in the output image's pixels. Returns float Tensor[N, height, width]: each pixel centre
    (x + 0.5, y + 0.5) inside a box takes the bilinear sample of its mask; outside, 0.
    All masks are pasted in one grid_sample call per chunk of `chunk_pixels` output values.
    """
    n = masks.shape[0]
    out = masks.new_zeros((n, height, width), dtype=torch.float32)
    if n == 0 or height == 0 or width == 0:
        return out
    boxes = boxes.float()
    xs = torch.arange(width, device=masks.device, dtype=torch.float32) + 0.5
    ys = torch.arange(height, device=masks.device, dtype=torch.float32) + 0.5
    step = max(1, chunk_pixels // (height * width))
    for start in range(0, n, step):
        b = boxes[start:start + step]
        bw = (b[:, 2] - b[:, 0]).clamp(min=1e-3)
        bh = (b[:, 3] - b[:, 1]).clamp(min=1e-3)
        # grid_sample with align_corners=False maps -1..1 to the mask's outer edges, i.e. the box.
        gx = (xs[None] - b[:, 0:1]) / bw[:, None] * 2 - 1  # [n, W]
        gy = (ys[None] - b[:, 1:2]) / bh[:, None] * 2 - 1  # [n, H]
        grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
        sampled = F.grid_sample(masks[start:start + step, None].float(), grid, mode="bilinear",
                                padding_mode="zeros", align_corners=False)[:, 0]
        inside = ((gx.abs() <= 1)[:, None, :] & (gy.abs() <= 1)[:, :, None])
        out[start:start + step] = sampled * inside
    return out
