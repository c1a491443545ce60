"""The Triton binary paste on CUDA against the matrix-product paste, at a detection-sized case."""

import torch

from mrcnn_helpers.model.kernels.paste import paste_binary_masks
from mrcnn_helpers.model.masks import paste_masks_in_image

g = torch.Generator().manual_seed(0)
n, r, h, w = 100, 28, 832, 1344
masks = torch.rand(n, r, r, generator=g).cuda()
xy = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) - 20
boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 400 + 1], 1).cuda()
probs = paste_masks_in_image(masks, boxes, h, w)
got = paste_binary_masks(masks, boxes, h, w, 0.5)
differ = got != (probs >= 0.5)
near = (probs[differ] - 0.5).abs().max().item() if differ.any() else 0.0
print(f"paste kernel: {int(differ.sum())} of {got.numel()} pixels differ (all within "
      f"{near:.1e} of the threshold); {int(got.sum())} set")
assert differ.sum() < 1e-6 * got.numel() + 10 and near < 1e-4
