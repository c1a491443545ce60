"""Checks of the Triton kernels, run by tests/test_kernels.py in a subprocess with
TRITON_INTERPRET=1 (Triton's interpreter runs the kernels on the CPU, the same code the GPU runs).

Each kernel is compared with the PyTorch / torchvision op it replaces, in float64 where that op
allows, on random inputs that include the edge cases (boxes partly or wholly outside the map,
boxes under one pixel, non-finite boxes, ties in score, several groups per row).
"""

import os

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms, roi_align

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_kernels.py"

from mrcnn_helpers.deploy.overlay import blend_masks_reference, class_colors
from mrcnn_helpers.model import (
    box_ops,
    kernels,
    nms,
)
from mrcnn_helpers.model import backbone as backbone_module
from mrcnn_helpers.model import bias_ops
from mrcnn_helpers.model import fused_stage
from mrcnn_helpers.model.backbone import FPN, ResNetFPN
from mrcnn_helpers.model.fused_conv import conv_bias_relu
from mrcnn_helpers.model.kernels.bias import (
    bias_act_triton,
    channel_sum,
    channel_sums,
    relu_grad_channel_sum,
    sum_2x2,
    top_down_triton,
)
from mrcnn_helpers.model.kernels.composite import composite_frames
from mrcnn_helpers.model.kernels.matching import match_rpn_anchors
from mrcnn_helpers.model.kernels import nms as nms_kernels
from mrcnn_helpers.model.kernels.nms import bitmask_nms_rows, greedy_nms_rows, walk_nms_rows
from mrcnn_helpers.model.kernels.paste import paste_binary_masks
from mrcnn_helpers.model.kernels.pool import bias_relu_maxpool_triton
from mrcnn_helpers.model.kernels import roi_align as roi_align_kernels
from mrcnn_helpers.model.kernels.residual import relu_grad_of_sum
from mrcnn_helpers.model.kernels.roi_align import multilevel_roi_align_triton
from mrcnn_helpers.model.masks import paste_masks_in_image
from mrcnn_helpers.model.roi_heads import multilevel_roi_align, multilevel_roi_align_sets
from mrcnn_helpers.model.sampling import label_rpn_anchors


def _random_rois(n, batch, generator):
    xy = torch.rand(n, 2, generator=generator, dtype=torch.float64) * 90 - 15  # some outside
    wh = torch.rand(n, 2, generator=generator, dtype=torch.float64) * 50
    wh[: n // 4] *= 0.01  # under one pixel: RoIAlign makes them 1 x 1
    index = torch.randint(0, batch, (n, 1), generator=generator).double()
    return torch.cat([index, xy, xy + wh], dim=1)


def test_roi_align_matches_torchvision_forward_and_backward():
    g = torch.Generator().manual_seed(0)
    batch, channels, scales = 2, 6, [1 / 4, 1 / 8, 1 / 16]
    ref_feats = [torch.randn(batch, channels, 64 // 2 ** i, 80 // 2 ** i, generator=g,
                             dtype=torch.float64, requires_grad=True) for i in range(3)]
    # channels_last fp32 copies, as the model's CUDA features are laid out
    feats = [f.detach().float().contiguous(memory_format=torch.channels_last)
             .requires_grad_(True) for f in ref_feats]
    rois = _random_rois(10, batch, g)
    levels = torch.randint(0, 3, (10,), generator=g)
    out = multilevel_roi_align_triton(feats, rois.float(), levels, scales, 3)
    ref = torch.cat([roi_align(ref_feats[int(lv)], rois[i:i + 1], (3, 3),
                               spatial_scale=scales[int(lv)], sampling_ratio=2, aligned=False)
                     for i, lv in enumerate(levels)])
    assert out.shape == ref.shape
    assert (out.double() - ref).abs().max() < 1e-5
    grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ref.backward(grad)
    out.backward(grad.float())
    for mine, theirs in zip(feats, ref_feats):
        assert mine.grad.shape == theirs.grad.shape
        assert (mine.grad.double() - theirs.grad).abs().max() < 1e-5 * theirs.grad.abs().max()


def test_roi_align_backward_with_merged_small_bins_is_torchvisions():
    """MRCNN_ROI_MERGE_BACKWARD: a small bin's 16 corner contributions summed per pixel before
    the atomics; the gradient still torchvision's, for RoIs that take the merged path (bins of
    at most 2 pixels, some partly outside the map) and RoIs that do not."""
    g = torch.Generator().manual_seed(7)
    batch, channels, scales = 2, 6, [1 / 4, 1 / 8, 1 / 16]
    ref_feats = [torch.randn(batch, channels, 64 // 2 ** i, 80 // 2 ** i, generator=g,
                             dtype=torch.float64, requires_grad=True) for i in range(3)]
    rois = _random_rois(12, batch, g)
    rois[:3, 3:] = rois[:3, 1:3] + 120  # large RoIs: bins over 2 pixels
    levels = torch.randint(0, 3, (12,), generator=g)
    old = roi_align_kernels.MERGE_BACKWARD
    try:
        for size in (3, 5):
            ref = torch.cat([roi_align(ref_feats[int(lv)], rois[i:i + 1], (size, size),
                                       spatial_scale=scales[int(lv)], sampling_ratio=2,
                                       aligned=False) for i, lv in enumerate(levels)])
            grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
            want = torch.autograd.grad(ref, ref_feats, grad)
            scale = torch.tensor(scales, dtype=torch.float64)[levels]
            wh = (rois[:, 3:] - rois[:, 1:3]) * scale[:, None]
            small = (wh.clamp(min=1) / size <= 2).all(1)
            assert 0 < int(small.sum()) < 12, size
            for merge in (False, True):
                roi_align_kernels.MERGE_BACKWARD = merge
                feats = [f.detach().float().contiguous(memory_format=torch.channels_last)
                         .requires_grad_(True) for f in ref_feats]
                out = multilevel_roi_align_triton(feats, rois.float(), levels, scales, size)
                got = torch.autograd.grad(out, feats, grad.float())
                for mine, theirs in zip(got, want):
                    error = (mine.double() - theirs).abs().max() / theirs.abs().max()
                    assert error < 1e-5, (size, merge, float(error))
    finally:
        roi_align_kernels.MERGE_BACKWARD = old


def test_non_finite_rois_pool_to_zeros_and_take_no_gradient():
    feats = [torch.randn(1, 4, 16, 16, requires_grad=True)]
    boxes = torch.tensor([[[1.0, 1.0, 9.0, 9.0], [float("nan"), 0.0, 5.0, 5.0],
                           [0.0, 0.0, float("inf"), 3.0]]])
    out = multilevel_roi_align(feats, boxes, 2, 2, 2)
    assert kernels.available(boxes)
    assert out[0].abs().sum() > 0 and out[1:].abs().sum() == 0
    out.sum().backward()
    assert torch.isfinite(feats[0].grad).all()


def test_inactive_rois_pool_to_zeros_and_the_gradient_is_the_active_ones():
    g = torch.Generator().manual_seed(3)
    boxes = torch.tensor([[[1.0, 1.0, 9.0, 9.0], [2.0, 3.0, 12.0, 14.0], [0.0, 0.0, 6.0, 5.0]]])
    active = torch.tensor([[True, False, True]])
    feats = [torch.randn(1, 4, 16, 16, generator=g, requires_grad=True)]
    out = multilevel_roi_align(feats, boxes, 2, 2, 2, active=active)
    assert kernels.available(boxes)
    assert out[1].abs().sum() == 0 and out[0].abs().sum() > 0 and out[2].abs().sum() > 0
    upstream = torch.randn(out.shape, generator=g)
    out.backward(upstream)
    ref_feats = [feats[0].detach().clone().requires_grad_(True)]
    ref = multilevel_roi_align(ref_feats, boxes[:, [0, 2]], 2, 2, 2)
    assert torch.allclose(out[[0, 2]], ref)
    ref.backward(upstream[[0, 2]])
    assert torch.allclose(feats[0].grad, ref_feats[0].grad, atol=1e-6)


def test_roi_align_sets_pool_as_separate_calls_and_sum_their_gradients():
    """The box and mask heads' RoIs pooled in one node: each output as its own call's, the
    feature gradient the sum of both calls' (a set nobody reads adds nothing)."""
    g = torch.Generator().manual_seed(4)
    boxes = torch.tensor([[[1.0, 1.0, 9.0, 9.0], [2.0, 3.0, 30.0, 28.0], [0.0, 0.0, 6.0, 5.0]],
                          [[4.0, 2.0, 20.0, 11.0], [1.0, 1.0, 3.0, 3.0], [5.0, 6.0, 31.0, 31.0]]])
    active = torch.tensor([[True, False], [True, True]])
    feats = [torch.randn(2, 4, 32 // 2 ** i, 32 // 2 ** i, generator=g).contiguous(
        memory_format=torch.channels_last).requires_grad_(True) for i in range(2)]
    box, mask = multilevel_roi_align_sets(feats, [(boxes, 3, None), (boxes[:, :2], 4, active)],
                                          2, 3)
    up_box, up_mask = torch.randn(box.shape, generator=g), torch.randn(mask.shape, generator=g)
    (box * up_box).sum().backward(retain_graph=True)
    only_box = [f.grad.clone() for f in feats]
    (mask * up_mask).sum().backward()
    ref_feats = [f.detach().clone().requires_grad_(True) for f in feats]
    ref_box = multilevel_roi_align(ref_feats, boxes, 3, 2, 3)
    ref_mask = multilevel_roi_align(ref_feats, boxes[:, :2], 4, 2, 3, active=active)
    assert torch.equal(box, ref_box) and torch.equal(mask, ref_mask)
    ((ref_box * up_box).sum() + (ref_mask * up_mask).sum()).backward()
    for mine, ref in zip(feats, ref_feats):
        assert torch.allclose(mine.grad, ref.grad, atol=1e-5)
    ref_only = [f.detach().clone().requires_grad_(True) for f in feats]
    (multilevel_roi_align(ref_only, boxes, 3, 2, 3) * up_box).sum().backward()
    for mine, ref in zip(only_box, ref_only):
        assert torch.allclose(mine, ref.grad, atol=1e-5)


def _torchvision_keep(boxes, scores, candidate, groups, iou):
    """Which boxes torchvision's batched_nms keeps, row by row, among the candidates."""
    expected = torch.zeros_like(candidate)
    for r in range(candidate.shape[0]):
        sel = candidate[r].nonzero().squeeze(1)
        expected[r, sel[batched_nms(boxes[r, sel], scores[r, sel], groups[r, sel], iou)]] = True
    return expected


def test_greedy_nms_kernel_matches_torchvision():
    g = torch.Generator().manual_seed(1)
    rows, size = 4, 37
    xy = torch.rand(rows, size, 2, generator=g) * 40
    boxes = torch.cat([xy, xy + torch.rand(rows, size, 2, generator=g) * 25 + 0.5], dim=-1)
    scores = torch.rand(rows, size, generator=g)
    scores[:, 5:9] = 0.5  # ties
    candidate = torch.rand(rows, size, generator=g) > 0.25
    groups = torch.randint(0, 3, (rows, size), generator=g)
    expected = _torchvision_keep(boxes, scores, candidate, groups, 0.5)
    got = nms.nms_keep_mask(boxes, scores, candidate, 0.5, groups)
    assert torch.equal(got, expected)
    # The kernel alone, on rows already sorted: nothing but candidates can be kept.
    keep = greedy_nms_rows(boxes, groups, candidate, 0.5)
    assert not (keep & ~candidate).any() and keep[:, 0].eq(candidate[:, 0]).all()


def test_bitmask_nms_is_the_walk_and_torchvision():
    """The suppression-bits path against the walking kernel and torchvision, on rows sorted by
    score with interleaved non-candidates, three groups and long suppression chains (boxes
    crowded into a small area): sizes around the 32-box words (1, 31, 32, 33, 70)."""
    g = torch.Generator().manual_seed(3)
    for size in (1, 31, 32, 33, 70):
        rows = 3
        xy = torch.rand(rows, size, 2, generator=g) * 15
        boxes = torch.cat([xy, xy + torch.rand(rows, size, 2, generator=g) * 20 + 8], dim=-1)
        scores = torch.rand(rows, size, generator=g).sort(dim=1, descending=True).values
        candidate = torch.rand(rows, size, generator=g) > 0.2
        groups = torch.randint(0, 3, (rows, size), generator=g)
        expected = _torchvision_keep(boxes, scores, candidate, groups, 0.4)
        got = bitmask_nms_rows(boxes, groups, candidate, 0.4)
        assert torch.equal(got, expected), size
        assert torch.equal(walk_nms_rows(boxes, groups, candidate, 0.4), expected), size
        if size == 70:  # the case is not trivial: suppression happens, also across words
            assert 0.3 < (candidate & ~expected).float().mean() < 0.9
    with pytest.raises(ValueError, match="at most 2048"):
        bitmask_nms_rows(torch.zeros(1, 2049, 4), torch.zeros(1, 2049, dtype=torch.long),
                         torch.ones(1, 2049, dtype=torch.bool), 0.5)


def test_nms_keep_mask_with_the_bitmask_path_switched_on(monkeypatch):
    g = torch.Generator().manual_seed(4)
    boxes = torch.rand(2, 45, 4, generator=g) * 10
    boxes[..., 2:] += boxes[..., :2] + 1
    scores = torch.rand(2, 45, generator=g)
    candidate = torch.rand(2, 45, generator=g) > 0.1
    groups = torch.randint(0, 2, (2, 45), generator=g)
    walked = nms.nms_keep_mask(boxes, scores, candidate, 0.5, groups)
    monkeypatch.setattr(nms_kernels, "BITMASK", True)
    calls = []
    monkeypatch.setattr(nms_kernels, "bitmask_nms_rows",
                        lambda *a: calls.append(1) or bitmask_nms_rows(*a))
    assert torch.equal(nms.nms_keep_mask(boxes, scores, candidate, 0.5, groups), walked)
    assert calls == [1]


def test_stem_bias_relu_maxpool_is_bias_act_then_the_pool():
    """One pass of bias + ReLU + 3 x 3 stride-2 max pool against the two PyTorch steps,
    exactly, in fp32 and bf16, on odd and even sizes (the padded border) and channel counts
    that are and are not powers of two; the dispatcher takes the pass only when switched on and
    no gradient is needed."""
    g = torch.Generator().manual_seed(6)
    cl = torch.channels_last
    pool = torch.nn.MaxPool2d(3, 2, 1)
    for dtype, shape in ((torch.float32, (2, 64, 9, 12)), (torch.bfloat16, (1, 3, 10, 7)),
                         (torch.bfloat16, (2, 64, 16, 16))):
        x = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=cl)
        bias = torch.randn(shape[1], generator=g).to(dtype)
        # The interpreter rounds fp32 to bf16 its own way (not to nearest), so in bf16 the
        # reference is the bias_act kernel's rounding, then the pool (benchmarks/check_cuda.py
        # compares with PyTorch's composition on the GPU).
        want = pool(bias_act_triton(x, bias, True))
        got = bias_relu_maxpool_triton(x, bias)
        assert got.dtype == dtype and got.shape == want.shape, (got.shape, want.shape)
        assert got.is_contiguous(memory_format=cl) and torch.equal(got, want), shape
        torch_way = pool(F.relu(x + bias.view(1, -1, 1, 1)))
        assert (got.float() - torch_way.float()).abs().max() <= (
            0 if dtype == torch.float32 else 2 ** -6 * torch_way.float().abs().max())
        if shape[1] == 64:  # the ReLU and the maxima both matter (some biases are negative)
            assert (want == 0).any() and (want > 0).any()
    x = torch.randn(1, 8, 6, 6, generator=g).contiguous(memory_format=cl)
    bias = torch.randn(8, generator=g)
    calls = []
    old = bias_ops.STEM_POOL, bias_ops.bias_relu_maxpool_triton
    bias_ops.bias_relu_maxpool_triton = lambda *a: calls.append(1) or old[1](*a)
    try:
        for on, grad, expected_calls in ((False, False, 0), (True, True, 0), (True, False, 1)):
            bias_ops.STEM_POOL = on
            calls.clear()
            out = bias_ops.bias_relu_maxpool(x.clone().requires_grad_(grad), bias, pool)
            assert len(calls) == expected_calls, (on, grad)
            assert torch.equal(out, pool(F.relu(x + bias.view(1, -1, 1, 1))))
        calls.clear()  # another pool (no padding): PyTorch's
        bias_ops.bias_relu_maxpool(x, bias, torch.nn.MaxPool2d(3, 2, 0))
        assert not calls
    finally:
        bias_ops.STEM_POOL, bias_ops.bias_relu_maxpool_triton = old


def test_paste_kernel_matches_the_matrix_product_paste():
    g = torch.Generator().manual_seed(2)
    n, r, h, w = 5, 6, 23, 37
    masks = torch.rand(n, r, r, generator=g)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) - 4  # some partly outside
    wh = torch.rand(n, 2, generator=g) * 20 + 0.2
    boxes = torch.cat([xy, xy + wh], dim=1)
    expected = paste_masks_in_image(masks, boxes, h, w) >= 0.5
    got = paste_binary_masks(masks, boxes, h, w, 0.5)
    assert got.dtype == torch.bool and got.shape == (n, h, w)
    # Sums of the same products in another order: a pixel whose value is within rounding of the
    # threshold may flip; none else.
    probs = paste_masks_in_image(masks, boxes, h, w)
    differ = got != expected
    assert (probs[differ] - 0.5).abs().max().item() < 1e-5 if differ.any() else True
    assert differ.sum() <= 2 and got.any()


def test_anchor_matching_kernel_matches_the_iou_matrix_path():
    g = torch.Generator().manual_seed(3)
    a, b, m = 300, 3, 7
    xy = torch.rand(a, 2, generator=g) * 60
    anchors = torch.cat([xy, xy + torch.rand(a, 2, generator=g) * 30 + 1], dim=1)
    gxy = torch.rand(b, m, 2, generator=g) * 60
    gt = torch.cat([gxy, gxy + torch.rand(b, m, 2, generator=g) * 30 + 2], dim=-1)
    gt[0, 3] = anchors[10]  # an exact match (IoU 1), and a gt with no overlapping anchor
    gt[1, 2] = torch.tensor([500.0, 500.0, 510.0, 510.0])
    valid = torch.rand(b, m, generator=g) > 0.2
    valid[2] = False  # an image without ground truth
    valid[1, 0] = False  # padding rows first and in the middle (the kernels skip them)
    assert (~valid[:2]).sum() >= 3
    iou = box_ops.box_iou(anchors[None].expand(b, -1, -1), gt)
    want_labels, want_matched = label_rpn_anchors(iou, valid, 0.7, 0.3)
    labels, matched = match_rpn_anchors(anchors, gt, valid, 0.7, 0.3)
    assert torch.equal(labels, want_labels)
    assert torch.equal(matched, want_matched)  # also for the anchors that are not positive
    assert labels[0, 10] == 1 and (labels[2] != 1).all()
    assert (labels == 1).sum() > (labels[:, 10] == 1).sum()  # more than the planted match


def test_composite_kernel_matches_the_reference_blend():
    g = torch.Generator().manual_seed(4)
    b, n, h, w = 2, 6, 9, 37  # pixels not a multiple of the block
    frames = torch.randint(0, 256, (b, h, w, 3), generator=g, dtype=torch.uint8)
    masks = torch.rand(b, n, h, w, generator=g) > 0.4  # up to 6 masks deep
    drawn = torch.rand(b, n, generator=g) > 0.3
    drawn[1] = False  # a frame with nothing drawn stays as it was
    colors = class_colors(torch.randint(1, 30, (b, n), generator=g), "cpu")
    for alpha in (0.5, 0.3):
        got = composite_frames(frames, masks, drawn, colors, alpha)
        want = blend_masks_reference(frames, masks, drawn, colors, alpha)
        assert torch.equal(got, want), alpha
    assert torch.equal(got[1], frames[1]) and not torch.equal(got[0], frames[0])


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def test_bias_act_matches_add_and_relu_forward_and_backward():
    g = torch.Generator().manual_seed(5)
    shapes = [((2, 5, 7, 9), torch.channels_last), ((2, 5, 7, 9), torch.contiguous_format),
              ((3, 5, 11), torch.contiguous_format), ((37, 5), torch.contiguous_format)]
    for shape, memory_format in shapes:
        for relu in (False, True):
            x = torch.randn(shape, generator=g).contiguous(memory_format=memory_format)
            bias = torch.randn(shape[1], generator=g)
            grad = torch.randn(shape, generator=g)
            mine_x, mine_b, ref_x, ref_b = _leaf(x), _leaf(bias), _leaf(x), _leaf(bias)
            out = bias_act_triton(mine_x, mine_b, relu)
            ref = ref_x + ref_b.reshape((1, -1) + (1,) * (len(shape) - 2))
            ref = torch.relu(ref) if relu else ref
            assert out.stride() == x.stride()
            assert (out - ref).abs().max() < 1e-6, (shape, relu)
            out.backward(grad)
            ref.backward(grad)
            assert (mine_x.grad - ref_x.grad).abs().max() < 1e-6
            assert (mine_b.grad - ref_b.grad).abs().max() < 1e-4
    # bf16 maps with an fp32 bias: computed in fp32, rounded once (to nearest on the GPU; the
    # interpreter's bf16 conversion truncates, so within one bf16 step here)
    x = torch.randn(2, 4, 6, 8, generator=g).to(torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    bias = torch.randn(4, generator=g)
    out = bias_act_triton(x, bias, True)
    ref = torch.relu(x.float() + bias.reshape(1, -1, 1, 1))
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).abs() <= ref.abs() * 2 ** -7).all()


def test_top_down_merge_matches_upsample_and_add_forward_and_backward():
    g = torch.Generator().manual_seed(6)
    cl = torch.channels_last
    lateral = torch.randn(2, 6, 10, 14, generator=g).contiguous(memory_format=cl)
    top = torch.randn(2, 6, 5, 7, generator=g).contiguous(memory_format=cl)
    bias = torch.randn(6, generator=g)
    grad = torch.randn(2, 6, 10, 14, generator=g)
    leaves = [_leaf(t) for t in (lateral, bias, top)]
    refs = [_leaf(t) for t in (lateral, bias, top)]
    out = top_down_triton(*leaves)
    ref = (refs[0] + refs[1].reshape(1, -1, 1, 1)
           + torch.nn.functional.interpolate(refs[2], size=(10, 14), mode="nearest"))
    assert out.is_contiguous(memory_format=cl)
    assert (out - ref).abs().max() < 1e-6
    out.backward(grad)
    ref.backward(grad)
    for mine, theirs in zip(leaves, refs):
        assert mine.grad.shape == theirs.grad.shape
        assert (mine.grad - theirs.grad).abs().max() < 1e-4


def test_sum_2x2_is_the_gradient_of_a_nearest_upsample_in_any_layout():
    g = torch.Generator().manual_seed(8)
    for memory_format in (torch.channels_last, torch.contiguous_format):
        grad = torch.randn(2, 6, 10, 14, generator=g).contiguous(memory_format=memory_format)
        want = torch.nn.functional.avg_pool2d(grad, 2, divisor_override=1)
        got = sum_2x2(grad)
        assert got.shape == (2, 6, 5, 7) and got.is_contiguous(memory_format=torch.channels_last)
        assert (got - want).abs().max() < 1e-5, memory_format
    odd_view = torch.randn(2, 12, 10, 14, generator=g)[:, ::2]  # channel stride 2 * H * W
    assert (sum_2x2(odd_view) - torch.nn.functional.avg_pool2d(
        odd_view, 2, divisor_override=1)).abs().max() < 1e-5


def test_fpn_with_the_kernels_equals_torchvisions_forward_and_gradients():
    from torchvision.ops import FeaturePyramidNetwork
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    torch.manual_seed(7)
    fpn = FPN([4, 8, 16], 8, extra_blocks=LastLevelMaxPool())
    maps = {str(i): torch.randn(2, 4 * 2 ** i, 16 // 2 ** i, 24 // 2 ** i).contiguous(
        memory_format=torch.channels_last) for i in range(3)}
    assert kernels.available(maps["0"])
    mine = fpn(maps)
    theirs = FeaturePyramidNetwork.forward(fpn, maps)
    assert list(mine) == list(theirs) == ["0", "1", "2", "pool"]
    loss_mine = sum((v * (k + 1)).sum() for k, v in enumerate(mine.values()))
    grads_mine = torch.autograd.grad(loss_mine, list(fpn.parameters()))
    loss_theirs = sum((v * (k + 1)).sum() for k, v in enumerate(theirs.values()))
    grads_theirs = torch.autograd.grad(loss_theirs, list(fpn.parameters()))
    for name in mine:
        assert (mine[name] - theirs[name]).abs().max() < 1e-5, name
    for a, b in zip(grads_mine, grads_theirs):
        assert (a - b).abs().max() < 1e-3 * max(1.0, float(b.abs().max()))


def test_relu_grad_channel_sum_is_the_masked_gradient_and_its_channel_sums():
    """70 channels (a second, partial channel block) x 429 pixel rows (several row blocks per
    program, and a partial last one); the gradient arrives NCHW and is brought to y's layout."""
    g = torch.Generator().manual_seed(9)
    cl = torch.channels_last
    y = torch.relu(torch.randn(3, 70, 13, 11, generator=g)).contiguous(memory_format=cl)
    grad = torch.randn(3, 70, 13, 11, generator=g)
    want = torch.ops.aten.threshold_backward(grad, y, 0)
    assert 0.3 < (want == 0).float().mean() < 0.7  # the mask matters
    masked, sums = relu_grad_channel_sum(grad, y)
    assert masked.is_contiguous(memory_format=cl) and torch.equal(masked, want)
    assert sums.dtype == torch.float32 and sums.shape == (70,)
    assert (sums - want.sum((0, 2, 3))).abs().max() < 1e-4
    assert (channel_sum(grad.contiguous(memory_format=cl)) - grad.sum((0, 2, 3))).abs().max() < 1e-4
    # other launch configurations (what benchmarks/bench_channel_sum.py compares): same result
    for config in ((16, 128, 1, 4), (64, 32, 3, 8), (8, 256, 2, 4)):
        other, other_sums = channel_sums(grad.contiguous(memory_format=cl), y, config)
        assert torch.equal(other, want) and (other_sums - sums).abs().max() < 1e-4, config
    # bf16: the masked gradient exactly, the sums accumulated in fp32
    grad16, y16 = grad.to(torch.bfloat16), y.to(torch.bfloat16)
    masked, sums = relu_grad_channel_sum(grad16, y16)
    assert masked.dtype == torch.bfloat16
    assert torch.equal(masked, torch.ops.aten.threshold_backward(grad16, y16, 0))
    assert (sums - masked.float().sum((0, 2, 3))).abs().max() < 1e-3


def test_conv_bias_relu_backward_with_the_kernel_is_autograds():
    """fused_conv's backward on channels_last maps, where the mask and the bias sum are the
    kernel's one pass, against autograd of conv + bias (+ residual) + ReLU; a bias that does
    not train takes the threshold path (no sum)."""
    torch.manual_seed(10)
    cl = torch.channels_last
    for residual, bias_trains in ((False, True), (True, True), (True, False)):
        x = torch.randn(2, 5, 9, 12).contiguous(memory_format=cl).requires_grad_(True)
        w = torch.randn(66, 5, 3, 3).contiguous(memory_format=cl).requires_grad_(True)
        b = torch.randn(66).requires_grad_(bias_trains)
        r = torch.randn(2, 66, 9, 12).contiguous(memory_format=cl).requires_grad_(True)
        leaves = [x, w] + ([b] if bias_trains else []) + ([r] if residual else [])
        upstream = torch.randn(2, 66, 9, 12)
        out = conv_bias_relu(x, w, b, r if residual else None, padding=(1, 1))
        assert out.is_contiguous(memory_format=cl) and kernels.available(out)
        got = torch.autograd.grad(out, leaves, upstream)
        ref = torch.nn.functional.conv2d(x, w, b, padding=1)
        ref = torch.relu(ref + r if residual else ref)
        want = torch.autograd.grad(ref, leaves, upstream)
        for mine, theirs in zip(got, want, strict=True):
            assert mine.shape == theirs.shape
            assert (mine - theirs).abs().max() < 1e-3 * max(1.0, float(theirs.abs().max()))


def test_relu_grad_of_sum_is_the_masked_sum():
    g = torch.Generator().manual_seed(11)
    cl = torch.channels_last
    y = torch.relu(torch.randn(2, 6, 5, 7, generator=g)).contiguous(memory_format=cl)
    a = torch.randn(2, 6, 5, 7, generator=g)  # NCHW: brought to y's layout
    b = torch.randn(2, 6, 5, 7, generator=g).contiguous(memory_format=cl)
    got = relu_grad_of_sum(a, b, y)
    assert got.is_contiguous(memory_format=cl)
    assert torch.equal(got, torch.ops.aten.threshold_backward(a + b, y, 0))
    assert 0.3 < (got == 0).float().mean() < 0.7


def _stage_run(nlayers, freeze_blocks, fused, batched_fold=False):
    torch.manual_seed(12)
    backbone = ResNetFPN(nlayers, 2, 6, freeze_bn=True, freeze_blocks=freeze_blocks)
    for m in backbone.modules():
        if hasattr(m, "running_mean"):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    images = torch.randn(2, 3, 64, 96).contiguous(memory_format=torch.channels_last)
    calls = []
    old_enabled, old_forward = fused_stage.ENABLED, fused_stage.stage_forward
    old_use_fused, old_batched = backbone_module._use_fused, fused_stage.BATCHED_FOLD
    fused_stage.ENABLED, fused_stage.BATCHED_FOLD = fused, batched_fold
    fused_stage.stage_forward = lambda stage, x: calls.append(stage) or old_forward(stage, x)
    # The reference is the block-by-block fused path that CUDA runs (the same roundings: the
    # downsample's bias added in the last convolution); torchvision's blocks round that sum
    # differently, and near ReLU's kink such differences flip gradient mask entries.
    backbone_module._use_fused = lambda x, block: True
    try:
        features = backbone(images)
    finally:
        fused_stage.ENABLED, fused_stage.stage_forward = old_enabled, old_forward
        backbone_module._use_fused, fused_stage.BATCHED_FOLD = old_use_fused, old_batched
    loss = sum((f * (i + 1)).square().mean() for i, f in enumerate(features))
    params = [p for p in backbone.parameters() if p.requires_grad]
    return features, torch.autograd.grad(loss, params), len(calls)


def test_fused_stage_gives_the_block_by_block_features_and_gradients():
    """A stage of folded blocks as one node (fused_stage.py) against the blocks run one by one
    (each convolution its own fused node): Bottleneck and BasicBlock stages, with the stage
    inputs needing gradients (nothing frozen: the stem and layer1 train) and not
    (freeze_blocks 0, 1)."""
    for nlayers, freeze in ((50, (0, 1)), (50, ()), (18, ())):
        want_maps, want_grads, _ = _stage_run(nlayers, freeze, False)
        got_maps, got_grads, calls = _stage_run(nlayers, freeze, True)
        assert calls == 4 - len([b for b in freeze if b > 0]), (nlayers, freeze, calls)
        for a, b in zip(got_maps, want_maps, strict=True):
            assert (a - b).abs().max() < 1e-4 * max(1.0, float(b.abs().max()))
        assert len(got_grads) == len(want_grads)
        for a, b in zip(got_grads, want_grads, strict=True):
            assert b.abs().max() > 0
            assert (a - b).abs().max() < 1e-5 * float(b.abs().max()), (nlayers, freeze)
        if nlayers == 50 and freeze:
            # the trainable weights folded together (MRCNN_BATCHED_FOLD=1): the same, exactly
            batched_maps, batched_grads, _ = _stage_run(nlayers, freeze, True, batched_fold=True)
            assert all(torch.equal(a, b) for a, b in zip(batched_maps, got_maps, strict=True))
            assert all(torch.equal(a, b) for a, b in zip(batched_grads, got_grads, strict=True))


if __name__ == "__main__":
    import sys

    sys.exit(pytest.main([__file__, "-q", "-p", "no:cacheprovider"]))
