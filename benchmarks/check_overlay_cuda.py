"""The deploy pipeline's mask compositing on CUDA (the Triton blend, the greedy choice of one
drawing per object) against the same functions on the CPU, at video size: 8 frames of 832x1344
with 100 overlapping masks each (duplicates included), and its time per batch."""

import time

import torch

from mrcnn_helpers.deploy.overlay import composite_batch

g = torch.Generator().manual_seed(0)
b, n, h, w = 8, 100, 832, 1344
frames = torch.randint(0, 256, (b, h, w, 3), generator=g, dtype=torch.uint8)
xy = (torch.rand(b, n, 2, generator=g) * torch.tensor([w - 60, h - 60])).long()
size = (torch.rand(b, n, 2, generator=g) * 300 + 20).long()
masks = torch.zeros(b, n, h, w, dtype=torch.bool)
for i in range(b):
    for j in range(n):
        x, y = xy[i, j].tolist()
        masks[i, j, y:y + int(size[i, j, 1]), x:x + int(size[i, j, 0])] = True
masks[:, 50:60] = masks[:, 10:20]  # second drawings of ten objects
classes = torch.randint(1, 91, (b, n), generator=g)
valid = torch.rand(b, n, generator=g) > 0.1
want, want_drawn = composite_batch(frames[:2], masks[:2], classes[:2], valid[:2])  # CPU: slow
cuda = [t.cuda() for t in (frames, masks, classes, valid)]
got, drawn = composite_batch(*(t[:2] for t in cuda))
assert torch.equal(drawn.cpu(), want_drawn), "the drawn instances differ"
assert torch.equal(got.cpu(), want), "the composited frames differ"
print(f"overlay on CUDA equals the CPU: {int(want_drawn.sum())} of {int(valid.sum())} valid "
      f"instances drawn, {int((want != frames[:2]).any(-1).sum())} pixels changed")
for k in (100, 20):
    args = [cuda[0], cuda[1][:, :k].contiguous(), cuda[2][:, :k], cuda[3][:, :k]]
    for _ in range(3):
        composite_batch(*args)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        composite_batch(*args)
    torch.cuda.synchronize()
    print(f"composite_batch, {b} frames x {k} masks at {h}x{w}: "
          f"{(time.perf_counter() - t0) / 10 * 1000:.2f} ms per batch")
