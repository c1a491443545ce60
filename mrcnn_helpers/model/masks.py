"""Mask targets and mask pasting.

Ground-truth masks arrive as TLT does it: each instance's mask cropped to its gt box and resampled
to gt_mask_size x gt_mask_size (uint8, 0..255 soft). A training target for a RoI is that mask
re-sampled onto the RoI (`project_masks_to_rois`); at inference the R x R prediction of a detection
is resampled back into the image inside its box (`paste_masks_in_image`). Both are plain
bilinear resamplings in continuous coordinates, batched over all instances at once.
"""

import torch
from torch import Tensor
from torchvision.ops import roi_align

from . import kernels

if kernels.ENABLED:
    from .kernels.paste import paste_binary_masks as paste_binary_kernel


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


def _interpolation_matrix(start: Tensor, size: Tensor, length: int, resolution: int,
                          first: int = 0) -> Tensor:
    """W[n, p, r]: weight of mask cell r in the bilinear sample at output pixel centre
    first + p + 0.5 (zero padding beyond the mask's cells; zero outside the box)."""
    centres = torch.arange(first, first + length, device=start.device, dtype=torch.float32) + 0.5
    # Position in mask cells: the box's edges are the mask's outer edges (cell centres at r + 0.5).
    u = (centres[None] - start[:, None]) / size[:, None] * resolution - 0.5  # [n, length]
    cells = torch.arange(resolution, device=start.device, dtype=torch.float32)
    weights = (1 - (u[:, :, None] - cells).abs()).clamp(min=0)
    inside = (u >= -0.5) & (u <= resolution - 0.5)
    return weights * inside[:, :, None]


def paste_masks_in_image(masks: Tensor, boxes: Tensor, height: int, width: int,
                         chunk_pixels: int = 1 << 25) -> Tensor:
    """Resample R x R mask probabilities into an image.

    masks: float Tensor[N, R, R] (probabilities, row = y); boxes: Tensor[N, 4] (x1, y1, x2, y2)
    in the output image's pixels. Returns float Tensor[N, height, width]: each pixel centre
    (x + 0.5, y + 0.5) inside a box takes the bilinear sample of its mask (cells beyond the mask
    count as 0, as grid_sample's zero padding); outside, 0.

    Bilinear sampling on a grid is separable, so each mask is pasted as two small matrix
    products, Wy @ M @ Wx^T, instead of sampling every output pixel through a per-pixel grid:
    far less memory traffic for the same values. Works in chunks of about `chunk_pixels` outputs.
    """
    n = masks.shape[0]
    # Every element is written by the products below: no zero fill (3.6 GB at batch 8, 832x1344).
    out = masks.new_empty((n, height, width), dtype=torch.float32)
    if out.numel() == 0:
        return out
    resolution = masks.shape[-1]
    boxes = boxes.float()
    step = max(1, chunk_pixels // (height * width))
    for start in range(0, n, step):
        b = boxes[start:start + step]
        wx = _interpolation_matrix(b[:, 0], (b[:, 2] - b[:, 0]).clamp(min=1e-3), width, resolution)
        wy = _interpolation_matrix(b[:, 1], (b[:, 3] - b[:, 1]).clamp(min=1e-3), height, resolution)
        m = masks[start:start + step].float()
        torch.bmm(wy, torch.bmm(m, wx.transpose(1, 2)), out=out[start:start + step])
    return out


def paste_binary_masks(masks: Tensor, boxes: Tensor, height: int, width: int,
                       threshold: float = 0.5) -> Tensor:
    """bool Tensor[N, height, width]: paste_masks_in_image(...) >= threshold. On the GPU one
    Triton pass computes and thresholds each pixel and writes bytes (kernels/paste.py); elsewhere
    the matrix-product paste is thresholded."""
    if kernels.available(masks):
        return paste_binary_kernel(masks, boxes, height, width, threshold)
    return _paste_binary_in_boxes(masks, boxes, height, width, threshold)


def _paste_binary_in_boxes(masks: Tensor, boxes: Tensor, height: int, width: int,
                           threshold: float) -> Tensor:
    """paste_binary_masks without the Triton kernel: each mask pasted by the same two matrix
    products, over the pixels of its box only (outside it every pixel is 0). A detection's box
    covers a few percent of the image: at 1344x832, 20 masks took 61 ms on the whole image on
    two CPU cores."""
    n, resolution = masks.shape[0], masks.shape[-1]
    out = torch.zeros((n, height, width), dtype=torch.bool, device=masks.device)
    if n == 0 or height == 0 or width == 0:
        return out
    boxes = boxes.float()
    # Pixels whose centres can lie in the box, with a pixel to spare on each side.
    finite = torch.isfinite(boxes).all(dim=1)
    safe = torch.where(finite[:, None], boxes, torch.zeros_like(boxes))
    lo = (safe[:, :2].floor() - 1).clamp(min=0)
    hi = safe[:, 2:].ceil() + 1
    bounds = torch.cat([lo, torch.minimum(hi, torch.tensor([width, height], dtype=hi.dtype,
                                                            device=hi.device))], dim=1)
    for i, ((x0, y0, x1, y1), ok) in enumerate(zip(bounds.long().tolist(), finite.tolist(),
                                                   strict=True)):
        if not ok or x1 <= x0 or y1 <= y0:
            continue
        b = boxes[i:i + 1]
        wx = _interpolation_matrix(b[:, 0], (b[:, 2] - b[:, 0]).clamp(min=1e-3), x1 - x0,
                                   resolution, first=x0)[0]
        wy = _interpolation_matrix(b[:, 1], (b[:, 3] - b[:, 1]).clamp(min=1e-3), y1 - y0,
                                   resolution, first=y0)[0]
        out[i, y0:y1, x0:x1] = (wy @ (masks[i].float() @ wx.t())) >= threshold
    return out
