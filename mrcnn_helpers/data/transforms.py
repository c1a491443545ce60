"""Pure image / box / mask transforms of the input pipeline.

Conventions (shared by the whole toolkit): images are uint8 Tensor[3, H, W] RGB; boxes are
float32 (x1, y1, x2, y2) in continuous pixel coordinates, x right, y down, pixel (y, x) covering
[x, x+1) x [y, y+1); binary masks are numpy arrays [h, w] (row = y). A gt mask is stored as TLT
does: the instance mask cropped to its box and resampled to S x S (uint8 0..255, soft), so the box
edges are the mask's outer edges. The model re-projects it onto proposals.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as TF


def resized_shape(height: int, width: int, scale: float) -> tuple[int, int]:
    """Size (h, w) of an image of size (height, width) resized by `scale` (at least 1 px each)."""
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_image(image: Tensor, size: tuple[int, int], scale: float | None = None) -> Tensor:
    """uint8 Tensor[3, h, w] -> uint8 Tensor[3, size[0], size[1]] (bilinear, antialiased).

    With `scale`, output pixel centres map to input coordinates exactly as x_in = x_out / scale
    (the same factor that scales the boxes), even though `size` is rounded to whole pixels;
    without it, each axis stretches to fit `size`.
    """
    if tuple(image.shape[-2:]) == tuple(size) and (scale is None or scale == 1.0):
        return image
    if scale is not None:
        try:
            # The antialiased kernel behind F.interpolate, which also takes the output size and the
            # mapping scale separately (public interpolate ties the size to floor(h * scale)).
            return torch.ops.aten._upsample_bilinear2d_aa(
                image[None], [int(size[0]), int(size[1])], False, float(scale), float(scale))[0]
        except (AttributeError, RuntimeError, NotImplementedError):
            pass
    return TF.resize(image, list(size), interpolation=TF.InterpolationMode.BILINEAR, antialias=True)


def resize_and_pad(image: Tensor, image_size: tuple[int, int]) -> tuple[Tensor, float]:
    """Resize keeping the aspect ratio to fit `image_size`, then zero-pad at the bottom / right.

    image: uint8 Tensor[3, h, w]; image_size: (H, W). Returns (uint8 Tensor[3, H, W], scale) with
    scale = min(H / h, W / w): the resized content is round(h * scale) x round(w * scale) pixels
    placed top-left, sampled so that a point (x, y) of the original maps exactly to
    (x * scale, y * scale) on both axes.
    """
    out_h, out_w = int(image_size[0]), int(image_size[1])
    height, width = int(image.shape[-2]), int(image.shape[-1])
    scale = min(out_h / height, out_w / width)
    new_h, new_w = resized_shape(height, width, scale)
    new_h, new_w = min(new_h, out_h), min(new_w, out_w)
    return pad_to(resize_image(image, (new_h, new_w), scale), (out_h, out_w)), float(scale)


def pad_to(image: Tensor, size: tuple[int, int]) -> Tensor:
    """Zero-pad uint8 Tensor[3, h, w] at the bottom / right to Tensor[3, H, W] (h <= H, w <= W)."""
    height, width = int(image.shape[-2]), int(image.shape[-1])
    if (height, width) == tuple(size):
        return image
    out = image.new_zeros((image.shape[0], int(size[0]), int(size[1])))
    out[:, :height, :width] = image
    return out


def _overlap_weights(start: float, stop: float, size: int, origin: int, length: int) -> np.ndarray:
    """[size, length] fraction of each output bin covered by each input pixel along one axis.

    Output bins split [start, stop) into `size` equal parts; input pixel k covers
    [origin + k, origin + k + 1). Rows sum to 1 where the bin lies inside the input.
    """
    edges = start + (stop - start) * np.arange(size + 1, dtype=np.float64) / size
    pixels = origin + np.arange(length + 1, dtype=np.float64)
    lo = np.maximum(edges[:-1, None], pixels[None, :-1])
    hi = np.minimum(edges[1:, None], pixels[None, 1:])
    return np.clip(hi - lo, 0.0, None) / ((stop - start) / size)


def crop_and_resize_mask(mask: np.ndarray, box, size: int, origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """The part of a binary mask inside `box`, area-averaged onto a size x size grid.

    mask: bool/uint8 array [h, w] whose pixel [0, 0] is the pixel (origin[0], origin[1]) = (x, y)
    of the frame `box` is given in (pass a crop of a large mask with its origin to save work);
    box: (x1, y1, x2, y2) floats in that frame, x2 > x1, y2 > y1. Returns uint8 [size, size]:
    each value is round(255 * fraction of that bin covered by the mask); pixels outside the array
    count as background. Exact box filter, so a mask that fills the box gives all 255.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (x2 > x1 and y2 > y1):
        raise ValueError(f"box must have x2 > x1 and y2 > y1, got {tuple(box)}")
    m = np.asarray(mask)
    ox, oy = int(origin[0]), int(origin[1])
    # Only rows / columns that touch the box take part.
    r0, r1 = max(0, math.floor(y1) - oy), min(m.shape[0], math.ceil(y2) - oy)
    c0, c1 = max(0, math.floor(x1) - ox), min(m.shape[1], math.ceil(x2) - ox)
    if r1 <= r0 or c1 <= c0:
        return np.zeros((size, size), dtype=np.uint8)
    crop = torch.from_numpy(m[r0:r1, c0:c1].astype(np.float32))
    wy = torch.from_numpy(_overlap_weights(y1, y2, size, oy + r0, r1 - r0).astype(np.float32))
    wx = torch.from_numpy(_overlap_weights(x1, x2, size, ox + c0, c1 - c0).astype(np.float32))
    # torch rather than numpy matmul: numpy's BLAS threads fight torch's for the same cores.
    coverage = (wy @ crop @ wx.T).clamp_(0.0, 1.0).mul_(255.0).round_()
    return coverage.to(torch.uint8).numpy()


def flip_boxes(boxes: Tensor, width: float) -> Tensor:
    """Boxes [N, 4] (x1, y1, x2, y2) of an image `width` px wide, after a left-right flip.

    x1' = width - x2, x2' = width - x1; y unchanged. Applying it twice gives the input back.
    """
    out = boxes.clone()
    out[..., 0] = width - boxes[..., 2]
    out[..., 2] = width - boxes[..., 0]
    return out


def flip_masks(masks: Tensor) -> Tensor:
    """Box-relative masks [..., S, S] after a left-right flip of the image (columns reversed)."""
    return masks.flip(-1)


def flip_image(image: Tensor) -> Tensor:
    """Image Tensor[C, H, W] flipped left-right."""
    return image.flip(-1)


def jitter_geometry(height: int, width: int, image_size: tuple[int, int], jitter: float,
                    crop_fraction: tuple[float, float]) -> tuple[float, tuple[int, int], tuple[int, int]]:
    """Geometry of scale jitter: (scale, resized (h, w), crop offset (x, y)).

    The fit-to-image_size scale is multiplied by `jitter`; where the resized image is larger than
    image_size a window of image_size is cut at offset = crop_fraction * slack (fractions in
    [0, 1] along (x, y)); where smaller it is padded at the bottom / right. A point (x, y) of the
    original maps to (x * scale - offset_x, y * scale - offset_y).
    """
    out_h, out_w = int(image_size[0]), int(image_size[1])
    scale = min(out_h / height, out_w / width) * float(jitter)
    new_h, new_w = resized_shape(height, width, scale)
    off_x = math.floor(crop_fraction[0] * max(0, new_w - out_w))
    off_y = math.floor(crop_fraction[1] * max(0, new_h - out_h))
    return scale, (new_h, new_w), (off_x, off_y)


def crop_and_pad(image: Tensor, offset: tuple[int, int], image_size: tuple[int, int]) -> Tensor:
    """Cut the window of image_size at offset (x, y) from uint8 Tensor[3, h, w], zero-pad the rest."""
    off_x, off_y = int(offset[0]), int(offset[1])
    window = image[:, off_y:off_y + int(image_size[0]), off_x:off_x + int(image_size[1])]
    return pad_to(window, image_size)


def transform_boxes(boxes: Tensor, scale: float, offset: tuple[int, int],
                    limits: tuple[float, float] | None) -> Tensor:
    """Boxes [N, 4] in original pixels -> scaled, shifted by -offset (x, y), clipped to [0, limits].

    limits = (max_x, max_y): the extent of real image content in the output (padding excluded);
    None: no clipping.
    """
    out = boxes * float(scale)
    out[:, 0::2] -= float(offset[0])
    out[:, 1::2] -= float(offset[1])
    if limits is None:
        return out
    out[:, 0::2] = out[:, 0::2].clamp(0.0, float(limits[0]))
    out[:, 1::2] = out[:, 1::2].clamp(0.0, float(limits[1]))
    return out


def boxes_to_source(boxes: Tensor, scale: float, offset: tuple[int, int]) -> Tensor:
    """Inverse of transform_boxes' affine part: output-frame boxes [N, 4] -> original pixels."""
    out = boxes.clone().double()
    out[:, 0::2] += float(offset[0])
    out[:, 1::2] += float(offset[1])
    return out / float(scale)
