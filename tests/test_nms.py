"""Batched, fixed-shape NMS and detection selection against torchvision's per-image batched_nms."""

import torch
from torchvision.ops import batched_nms

from mrcnn_helpers.model import nms as nms_module
from mrcnn_helpers.model import roi_heads
from mrcnn_helpers.model.maskrcnn import trim_target_padding
from mrcnn_helpers.model.nms import nms_keep_mask, top_kept


def random_boxes(gen, batch, n, size=100.0):
    xy = torch.rand(batch, n, 2, generator=gen) * size
    wh = torch.rand(batch, n, 2, generator=gen) * size / 3 + 1
    return torch.cat((xy, xy + wh), dim=-1)


def reference(boxes, scores, groups, candidate, thresh, k):
    """torchvision, one image at a time: the kept indices sorted by score, first k."""
    out = []
    for i in range(boxes.shape[0]):
        sel = candidate[i].nonzero().squeeze(1)
        kept = batched_nms(boxes[i, sel], scores[i, sel], groups[i, sel], thresh)[:k]
        out.append(sel[kept].tolist())
    return out


def test_keep_mask_and_top_kept_equal_torchvision_per_image():
    gen = torch.Generator().manual_seed(0)
    batch, n = 3, 300
    boxes = random_boxes(gen, batch, n)
    scores = torch.rand(batch, n, generator=gen)
    groups = torch.randint(0, 4, (batch, n), generator=gen)
    candidate = torch.rand(batch, n, generator=gen) > 0.2
    candidate[2] = False  # an image without any candidate
    keep = nms_keep_mask(boxes, scores, candidate, 0.5, groups=groups)
    # The CUDA algorithm (a fixed point of batched matrix products), run here on the CPU.
    assert torch.equal(nms_module._fixed_point_nms(boxes, scores, candidate, 0.5, groups), keep)
    index, values, valid = top_kept(scores, keep, 50)
    expected = reference(boxes, scores, groups, candidate, 0.5, 50)
    for i in range(batch):
        n_valid = int(valid[i].sum())
        assert index[i, :n_valid].tolist() == expected[i]
        assert not valid[i, n_valid:].any() and (values[i, n_valid:] == 0).all()
        assert torch.equal(values[i, :n_valid], scores[i, expected[i]])
    assert len(expected[0]) == 50 and valid[2].sum() == 0
    # Boxes of different groups or images never suppress each other: an identical copy of a box
    # in another group survives, in the same group it does not.
    same = torch.tensor([[[0.0, 0, 10, 10], [0, 0, 10, 10]]])
    two = torch.tensor([[0.9, 0.8]])
    ones = torch.ones(1, 2, dtype=torch.bool)
    for nms in (nms_keep_mask, nms_module._fixed_point_nms):
        assert nms(same, two, ones, 0.5, torch.tensor([[0, 1]])).tolist() == [[True, True]]
        assert nms(same, two, ones, 0.5, torch.tensor([[0, 0]])).tolist() == [[True, False]]


def test_fixed_point_follows_long_suppression_chains():
    # A chain of boxes each overlapping the next: greedy keeps every other one, and the fixed
    # point needs one step per link (more than one convergence check).
    n = 3 * nms_module.STEPS_PER_CHECK + 2
    x = torch.arange(n, dtype=torch.float32) * 2
    boxes = torch.stack((x, torch.zeros(n), x + 5, torch.ones(n) * 5), dim=1)[None]
    scores = torch.linspace(1.0, 0.5, n)[None]
    candidate = torch.ones(1, n, dtype=torch.bool)
    groups = torch.zeros(1, n, dtype=torch.long)
    expected = nms_keep_mask(boxes, scores, candidate, 0.4)
    assert expected[0].tolist() == [i % 2 == 0 for i in range(n)]
    assert torch.equal(nms_module._fixed_point_nms(boxes, scores, candidate, 0.4, groups), expected)


def test_non_candidates_neither_kept_nor_suppressing():
    boxes = torch.tensor([[[0.0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 10, 10]]])
    scores = torch.tensor([[0.9, 0.8, 0.7]])
    candidate = torch.tensor([[False, True, True]])
    groups = torch.zeros(1, 3, dtype=torch.long)
    assert nms_keep_mask(boxes, scores, candidate, 0.5).tolist() == [[False, True, False]]
    assert nms_module._fixed_point_nms(boxes, scores, candidate, 0.5, groups).tolist() == [
        [False, True, False]]  # box 1 now suppresses box 2


def test_top_kept_pads_when_fewer_entries_than_k():
    scores = torch.tensor([[0.2, 0.9, 0.5]])
    keep = torch.tensor([[True, True, False]])
    index, values, valid = top_kept(scores, keep, 5)
    assert index.tolist() == [[1, 0, 0, 0, 0]]
    assert valid.tolist() == [[True, True, False, False, False]]
    assert torch.allclose(values, torch.tensor([[0.9, 0.2, 0, 0, 0]]))


def test_select_detections_exact_when_the_candidate_set_must_grow(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    batch, n, num_det = 2, 400, 30
    # Heavily overlapping boxes, one class: most of the best candidates suppress each other, so
    # the first 40 candidates keep fewer than num_det and the set must grow to stay exact.
    xy = torch.rand(batch, n, 2, generator=gen) * 8
    boxes = torch.cat((xy, xy + 20 + torch.rand(batch, n, 2, generator=gen) * 10), dim=-1)
    scores = torch.rand(batch, n, generator=gen)
    classes = torch.ones(batch, n, dtype=torch.long)
    classes[:, ::7] = 2
    candidate = scores > 0.05
    monkeypatch.setattr(roi_heads, "PRE_NMS_CANDIDATES", 40)
    sizes = []

    def counting(boxes, *args, **kwargs):
        sizes.append(boxes.shape[1])
        return nms_keep_mask(boxes, *args, **kwargs)

    monkeypatch.setattr(roi_heads, "nms_keep_mask", counting)
    out_boxes, out_scores, out_classes, found = roi_heads.select_detections(
        boxes, scores, classes, candidate, 0.5, num_det)
    expected = reference(boxes, scores, classes, candidate, 0.5, num_det)
    for i in range(batch):
        k = len(expected[i])
        assert int(found[i].sum()) == k and k > 0
        assert torch.equal(out_boxes[i, :k], boxes[i, expected[i]])
        assert torch.equal(out_scores[i, :k], scores[i, expected[i]])
        assert torch.equal(out_classes[i, :k], classes[i, expected[i]])
        assert (out_classes[i, k:] == 0).all() and (out_boxes[i, k:] == 0).all()
    assert sizes[0] == 40 and len(sizes) > 1


def test_trim_target_padding_keeps_every_used_row():
    classes = torch.tensor([[1, 0, 2, 0, 0], [3, 0, 0, 0, 0]])
    targets = {"boxes": torch.rand(2, 5, 4), "classes": classes, "masks": torch.rand(2, 5, 4, 4),
               "image_id": torch.tensor([7, 8])}
    trimmed = trim_target_padding(targets)
    assert trimmed["classes"].tolist() == [[1, 0, 2], [3, 0, 0]]
    assert torch.equal(trimmed["boxes"], targets["boxes"][:, :3])
    assert torch.equal(trimmed["masks"], targets["masks"][:, :3])
    assert trimmed["image_id"] is targets["image_id"]
    empty = trim_target_padding({"boxes": torch.zeros(2, 5, 4), "classes": torch.zeros(2, 5)})
    assert empty["classes"].shape == (2, 1)


def test_roi_align_skips_non_finite_boxes():
    features = [torch.rand(1, 2, 16, 16), torch.rand(1, 2, 8, 8)]
    boxes = torch.tensor([[[0.0, 0, 8, 8], [float("nan"), 0, 4, 4], [0, 0, float("inf"), 4]]])
    pooled = roi_heads.multilevel_roi_align(features, boxes, 2, 2, 3)
    assert pooled.shape == (3, 2, 2, 2)
    assert torch.isfinite(pooled).all() and (pooled[1:] == 0).all() and pooled[0].abs().sum() > 0


def test_roi_align_pools_only_the_active_boxes():
    """multilevel_roi_align(active=...) (the mask head's positive slots): the others give zeros
    and no gradient; the active ones are pooled as without the argument."""
    features = [torch.rand(1, 2, 16, 16, requires_grad=True), torch.rand(1, 2, 8, 8)]
    boxes = torch.tensor([[[0.0, 0, 8, 8], [2, 2, 12, 10], [1, 1, 5, 7]]])
    pooled = roi_heads.multilevel_roi_align(features, boxes, 2, 2, 3,
                                            active=torch.tensor([[False, True, True]]))
    full = roi_heads.multilevel_roi_align(features, boxes, 2, 2, 3)
    assert (pooled[0] == 0).all() and torch.equal(pooled[1:], full[1:])
    assert pooled[1:].abs().sum() > 0
    grad, = torch.autograd.grad(pooled.sum(), features[0])
    want, = torch.autograd.grad(full[1:].sum(), features[0])
    torch.testing.assert_close(grad, want)
