"""Model maths against hand-computed tensors, and the model's contracts (shapes, losses, weights)."""

import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mrcnn_helpers.errors import CheckpointError
from mrcnn_helpers.model import (
    MaskRCNN,
    load_pretrained,
    paste_masks_in_image,
    project_masks_to_rois,
)
from mrcnn_helpers.model.anchors import cell_anchors, generate_anchors
from mrcnn_helpers.model.box_ops import box_iou, clip_boxes, decode_boxes, encode_boxes
from mrcnn_helpers.model.roi_heads import assign_roi_levels
from mrcnn_helpers.model.sampling import label_proposals, label_rpn_anchors, sample_balanced


def small_cfg(**overrides):
    cfg = dict(
        nlayers=10, arch="resnet", freeze_bn=False, freeze_blocks=(), gt_mask_size=28,
        rpn_positive_overlap=0.7, rpn_negative_overlap=0.3, rpn_batch_size_per_im=64,
        rpn_fg_fraction=0.5, rpn_min_size=0.0, batch_size_per_im=32, fg_fraction=0.25,
        fg_thresh=0.5, bg_thresh_hi=0.5, bg_thresh_lo=0.0, fast_rcnn_mlp_head_dim=64,
        bbox_reg_weights=(10.0, 10.0, 5.0, 5.0), include_mask=True, mrcnn_resolution=8,
        train_rpn_pre_nms_topn=200, train_rpn_post_nms_topn=50, train_rpn_nms_threshold=0.7,
        test_detections_per_image=10, test_nms=0.5, test_rpn_pre_nms_topn=100,
        test_rpn_post_nms_topn=30, test_rpn_nms_thresh=0.7, min_level=3, max_level=5,
        num_scales=1, aspect_ratios=((1.0, 1.0), (1.4, 0.7), (0.7, 1.4)), anchor_scale=2.0,
        rpn_box_loss_weight=1.0, fast_rcnn_box_loss_weight=1.0, mrcnn_weight_loss_mask=1.0,
        test_score_thresh=0.0)
    cfg.update(overrides)
    return SimpleNamespace(**cfg)


# ---------------- anchors ----------------
def test_cell_anchors_follow_tlt_sizes_and_aspects():
    # level 2: size = 8 * 4 = 32; (1.4, 0.7) -> 44.8 x 22.4, half-extents rounded.
    a = cell_anchors(4, 8.0, 1, ((1.0, 1.0), (1.4, 0.7)))
    assert a.tolist() == [[-16, -16, 16, 16], [-22, -11, 22, 11]]
    two_scales = cell_anchors(8, 2.0, 2, ((1.0, 1.0),))
    assert two_scales.tolist() == [[-8, -8, 8, 8], [-11, -11, 11, 11]]  # 16 and 16*sqrt(2)


def test_generate_anchors_order_matches_head_flattening():
    anchors = generate_anchors([(2, 3), (1, 2)], [4, 8], 1.0, 1, ((1.0, 1.0),))
    assert anchors.shape == (2 * 3 + 1 * 2, 4)
    # level 0, row 0: centres x = 0, 4, 8; row 1 starts at y = 4; anchors 4x4 -> half 2
    assert anchors[:4].tolist() == [[-2, -2, 2, 2], [2, -2, 6, 2], [6, -2, 10, 2], [-2, 2, 2, 6]]
    assert anchors[6].tolist() == [-4, -4, 4, 4] and anchors[7].tolist() == [4, -4, 12, 4]


# ---------------- box coding ----------------
def test_box_iou_hand_values():
    a = torch.tensor([[0.0, 0, 10, 10], [0, 0, 0, 0]])
    b = torch.tensor([[5.0, 5, 15, 15], [0, 0, 10, 10], [20, 20, 30, 30]])
    iou = box_iou(a, b)
    assert torch.allclose(iou[0], torch.tensor([25 / 175, 1.0, 0.0]))
    assert iou[1].tolist() == [0.0, 0.0, 0.0]  # empty box: 0, not NaN


def test_encode_decode_hand_values_and_round_trip():
    ref = torch.tensor([[0.0, 0, 10, 20]])
    tgt = torch.tensor([[5.0, 10, 25, 30]])
    d = encode_boxes(tgt, ref, (10.0, 10.0, 5.0, 5.0))
    # centres (5, 10) -> (15, 20): dx = 10 * 10/10, dy = 10 * 10/20; sizes 10x20 -> 20x20
    assert torch.allclose(d, torch.tensor([[10.0, 5.0, 5 * math.log(2), 0.0]]), atol=1e-6)
    assert torch.allclose(decode_boxes(d, ref, (10.0, 10.0, 5.0, 5.0)), tgt, atol=1e-4)


def test_decode_clamps_huge_deltas_and_clip():
    out = decode_boxes(torch.tensor([[0.0, 0, 100, 100]]), torch.tensor([[0.0, 0, 16, 16]]),
                       (1.0, 1.0, 1.0, 1.0))
    assert torch.isfinite(out).all() and (out[0, 2] - out[0, 0]).item() == pytest.approx(1000, rel=1e-3)
    assert clip_boxes(torch.tensor([[-5.0, 3, 50, 70]]), 60, 40).tolist() == [[0, 3, 40, 60]]


# ---------------- matching and sampling ----------------
def test_rpn_labels_thresholds_and_low_quality_match():
    iou = torch.tensor([[[0.8, 0.0], [0.5, 0.1], [0.1, 0.4], [0.2, 0.35], [0.1, 0.9]]])
    valid = torch.tensor([[True, False]])  # second gt is padding
    labels, matched = label_rpn_anchors(iou, valid, 0.7, 0.3)
    assert labels.tolist() == [[1, -1, 0, 0, 0]] and matched[0, 0] == 0
    # only 0.5 for the gt: the best anchor still becomes foreground
    iou2 = torch.tensor([[[0.5], [0.2], [0.5]]])
    labels2, _ = label_rpn_anchors(iou2, torch.tensor([[True]]), 0.7, 0.3)
    assert labels2.tolist() == [[1, 0, 1]]


def test_proposal_labels_and_image_without_objects():
    iou = torch.tensor([[[0.6], [0.45], [0.05]]])
    labels, _ = label_proposals(iou, torch.tensor([[True]]), 0.5, 0.5, 0.1)
    assert labels.tolist() == [[1, 0, -1]]
    empty, _ = label_proposals(torch.zeros(1, 3, 2), torch.zeros(1, 2, dtype=torch.bool), 0.5, 0.5, 0.0)
    assert empty.tolist() == [[0, 0, 0]]


def test_sampler_fixed_size_positives_first_and_quota():
    labels = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0, 0, 0, -1, -1], [0, 0, -1, -1, -1, -1, -1, -1, -1, -1, -1, 1]])
    gen = torch.Generator().manual_seed(0)
    idx, sampled = sample_balanced(labels, 6, 0.5, generator=gen)
    assert idx.shape == (2, 6)
    assert sampled[0].tolist() == [1, 1, 1, 0, 0, 0]  # quota of 3 positives
    assert all(labels[0, i] == 1 for i in idx[0, :3]) and all(labels[0, i] == 0 for i in idx[0, 3:])
    assert sampled[1].tolist() == [1, 0, 0, -1, -1, -1]  # not enough candidates: empty slots
    assert idx[1, 0] == 11 and set(idx[1, 1:3].tolist()) == {0, 1}
    assert len(set(idx[0].tolist())) == 6  # without replacement


def test_roi_level_assignment():
    boxes = torch.tensor([[0.0, 0, 224, 224], [0, 0, 112, 112], [0, 0, 10, 10], [0, 0, 900, 900]])
    assert assign_roi_levels(boxes, 2, 5).tolist() == [4, 3, 2, 5]


# ---------------- masks ----------------
def test_project_masks_identity_and_half_box():
    gt_masks = torch.zeros(1, 1, 4, 4, dtype=torch.uint8)
    gt_masks[0, 0, :, :2] = 255  # left half of the gt box is object
    gt_boxes = torch.tensor([[[10.0, 10, 50, 50]]])
    rois = torch.tensor([[[10.0, 10, 50, 50], [10, 10, 30, 50], [50, 10, 90, 50]]])
    out = project_masks_to_rois(gt_masks, gt_boxes, rois, torch.zeros(1, 3, dtype=torch.long), 4)
    # Same box: the same mask, anti-aliased by 2x2 bilinear samples per bin (1, 1/2*(1+3/4), ...).
    assert torch.allclose(out[0, 0], torch.tensor([1.0, 0.875, 0.125, 0.0]).expand(4, 4))
    # RoI = left half: object, but for the last bin that reaches the blurred mask edge.
    assert torch.allclose(out[0, 1], torch.tensor([1.0, 1.0, 1.0, 0.75]).expand(4, 4))
    assert out[0, 2].max() == 0  # RoI beside the gt box: background


def test_paste_masks_hand_values():
    masks = torch.ones(2, 4, 4)
    masks[1, :, 2:] = 0  # right half empty
    boxes = torch.tensor([[2.0, 1, 6, 3], [0, 0, 8, 8]])
    out = paste_masks_in_image(masks, boxes, 8, 10)
    assert out.shape == (2, 8, 10)
    inside = out[0] > 0.5
    expected = torch.zeros(8, 10, dtype=torch.bool)
    expected[1:3, 2:6] = True
    assert torch.equal(inside, expected)
    assert (out[1, :, :3] > 0.5).all() and (out[1, :, 5:] < 0.5).all()
    assert paste_masks_in_image(torch.zeros(0, 4, 4), torch.zeros(0, 4), 5, 5).shape == (0, 5, 5)


def test_binary_paste_over_the_boxes_equals_the_whole_image_paste():
    """Without the Triton kernel, paste_binary_masks computes each mask over its box only: the
    same pixels as thresholding paste_masks_in_image, for boxes inside, across the edges, wholly
    outside, under one pixel, and not finite (pasted as nothing)."""
    from mrcnn_helpers.model.masks import paste_binary_masks

    g = torch.Generator().manual_seed(0)
    n, h, w = 40, 37, 53
    masks = torch.rand(n, 7, 7, generator=g)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w + 20.0, h + 20.0]) - 10
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 30], dim=1)
    boxes[:4, 2:] = boxes[:4, :2] + 0.2  # under one pixel
    boxes[4] = torch.tensor([float("nan"), 1.0, 5.0, 9.0])
    boxes[5] = torch.tensor([1.0, 1.0, float("inf"), 9.0])
    want = paste_masks_in_image(masks, boxes, h, w) >= 0.5
    got = paste_binary_masks(masks, boxes, h, w, 0.5)
    assert got.dtype == torch.bool and torch.equal(got, want)
    assert want.any() and not got[4].any() and not got[5].any()
    assert paste_binary_masks(masks[:0], boxes[:0], h, w).shape == (0, h, w)


# ---------------- whole model ----------------
def make_targets(batch, m=5, size=28, with_objects=True):
    boxes = torch.zeros(batch, m, 4)
    classes = torch.zeros(batch, m, dtype=torch.long)
    masks = torch.zeros(batch, m, size, size, dtype=torch.uint8)
    if with_objects:
        boxes[:, 0] = torch.tensor([8.0, 8, 40, 48])
        boxes[:, 1] = torch.tensor([30.0, 20, 60, 60])
        classes[:, 0], classes[:, 1] = 1, 2
        masks[:, :2] = 255
    return {"boxes": boxes, "classes": classes, "masks": masks}


def test_target_class_mask_logits_equal_the_full_predictor_and_its_gradients():
    from mrcnn_helpers.model.roi_heads import RoIHeads, multilevel_roi_align

    torch.manual_seed(0)
    heads = RoIHeads(small_cfg(), num_classes=5, in_channels=8).double()
    features = [torch.randn(2, 8, 32 // 2 ** i, 32 // 2 ** i, dtype=torch.double)
                for i in range(3)]
    boxes = torch.tensor([[[1.0, 2, 30, 40], [50, 60, 90, 100]], [[3, 3, 100, 80], [0, 0, 9, 9]]],
                         dtype=torch.double)
    classes = torch.tensor([1, 4, 2, 4])
    grad = torch.randn(4, 8, 8, dtype=torch.double)

    def grads_of(logits):
        heads.zero_grad()
        (logits * grad).sum().backward()
        return {n: p.grad.clone() for n, p in heads.named_parameters() if p.grad is not None}

    pooled = multilevel_roi_align(features, boxes, heads.mask_pool_size, *heads.roi_levels)
    selected = heads.target_class_mask_logits(pooled, classes)
    full = heads.mask_forward(features, boxes)[torch.arange(4), classes]
    assert selected.shape == (4, 8, 8)
    assert torch.allclose(selected, full, atol=1e-12)
    mine, reference = grads_of(selected), grads_of(full)
    assert set(mine) == set(reference) and "mask_predictor.mask_fcn_logits.weight" in mine
    for name, value in reference.items():
        assert torch.allclose(mine[name], value, atol=1e-12), name
    # Class 3 has no RoI: its weight row and bias get no gradient.
    assert mine["mask_predictor.mask_fcn_logits.bias"][3] == 0


def test_box_head_on_channels_last_maps_equals_torchvisions_and_its_gradients():
    from mrcnn_helpers.model.roi_heads import RoIHeads

    torch.manual_seed(0)
    heads = RoIHeads(small_cfg(), num_classes=5, in_channels=8).double()
    pooled = torch.randn(6, 8, 7, 7, dtype=torch.double)
    mine_in = pooled.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    ref_in = pooled.clone().requires_grad_(True)
    mine, ref = heads.box_features(mine_in), heads.box_head(ref_in)
    weight = heads.box_head.fc6.weight
    grad = torch.randn(mine.shape, dtype=torch.double)
    mine_grads = torch.autograd.grad((mine * grad).sum(), [mine_in, weight])
    ref_grads = torch.autograd.grad((ref * grad).sum(), [ref_in, weight])
    assert torch.allclose(mine, ref, atol=1e-12)
    for a, b in zip(mine_grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-12)


def test_training_losses_finite_and_empty_image_gives_zero_mask_loss():
    torch.manual_seed(0)
    model = MaskRCNN(small_cfg(), num_classes=3).train()
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    losses = model(images, make_targets(2))
    assert set(losses) == {"rpn_score_loss", "rpn_box_loss", "fast_rcnn_class_loss",
                           "fast_rcnn_box_loss", "mask_loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["mask_loss"] > 0
    sum(losses.values()).backward()
    empty = model(images, make_targets(2, with_objects=False))
    assert empty["mask_loss"].item() == 0.0 and empty["rpn_box_loss"].item() == 0.0
    assert torch.isfinite(empty["rpn_score_loss"]) and empty["rpn_score_loss"] > 0


def test_inference_outputs_fixed_shapes_and_padding():
    torch.manual_seed(0)
    model = MaskRCNN(small_cfg(), num_classes=3).eval()
    with torch.no_grad():
        out = model(torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8))
    assert out["boxes"].shape == (2, 10, 4) and out["masks"].shape == (2, 10, 8, 8)
    for i in range(2):
        n = int(out["num_detections"][i])
        assert (out["classes"][i, n:] == 0).all() and (out["scores"][i, n:] == 0).all()
        assert (out["classes"][i, :n] > 0).all()
        assert (out["scores"][i, :n].diff() <= 1e-6).all()  # sorted descending


def test_freeze_blocks_and_frozen_bn():
    model = MaskRCNN(small_cfg(freeze_blocks=(0, 1), freeze_bn=True, nlayers=18), num_classes=3)
    body = model.backbone.body
    assert not any(p.requires_grad for p in body["conv1"].parameters())
    assert not any(p.requires_grad for p in body["layer1"].parameters())
    assert all(p.requires_grad for p in body["layer2"].parameters())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    trainable_bn = MaskRCNN(small_cfg(freeze_blocks=(1,)), num_classes=3).train()
    assert not trainable_bn.backbone.body["layer1"][0].bn1.training  # frozen block keeps BN stats
    assert trainable_bn.backbone.body["layer2"][0].bn1.training


def test_torchvision_maskrcnn_weights_load_by_name(tmp_path):
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    path = tmp_path / "tv.pth"
    torch.save(tv.state_dict(), path)
    ours = MaskRCNN(small_cfg(nlayers=50, min_level=2, max_level=6, fast_rcnn_mlp_head_dim=1024,
                              mrcnn_resolution=28, freeze_bn=True, anchor_scale=8.0), num_classes=5)
    report = load_pretrained(ours, str(path))
    # everything but the four class-specific tensors transfers
    assert sorted(report.skipped_shape) == sorted([
        "roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias",
        "roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias",
        "roi_heads.mask_predictor.mask_fcn_logits.weight", "roi_heads.mask_predictor.mask_fcn_logits.bias"])
    assert not report.unexpected
    assert torch.equal(ours.state_dict()["rpn.head.conv.0.0.weight"], tv.state_dict()["rpn.head.conv.0.0.weight"])
    assert len(report.missing) == 6  # the skipped heads stay initialized


def test_legacy_torchvision_names_and_imagenet_backbone(tmp_path, monkeypatch):
    ours = MaskRCNN(small_cfg(nlayers=18, min_level=2, max_level=6), num_classes=3)
    legacy = {"backbone.fpn.inner_blocks.0.weight": torch.ones(256, 64, 1, 1),
              "rpn.head.conv.weight": torch.ones(256, 256, 3, 3)}
    torch.save(legacy, tmp_path / "legacy.pth")
    report = load_pretrained(ours, str(tmp_path / "legacy.pth"))
    assert set(report.loaded) == {"backbone.fpn.inner_blocks.0.0.weight", "rpn.head.conv.0.0.weight"}
    assert ours.state_dict()["rpn.head.conv.0.0.weight"].eq(1).all()

    from torchvision.models import resnet18
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    with pytest.raises(CheckpointError, match="not available offline"):
        load_pretrained(ours, "torchvision://resnet18_imagenet")
    from mrcnn_helpers.model.weights import torchvision_weights_file
    path = torchvision_weights_file("resnet18_imagenet")
    os.makedirs(os.path.dirname(path))
    torch.save(resnet18().state_dict(), path)
    report = load_pretrained(ours, "torchvision://resnet18_imagenet")
    assert len(report.loaded) == len([k for k in resnet18().state_dict() if not k.startswith("fc.")])
    with pytest.raises(CheckpointError, match="valid"):
        load_pretrained(ours, "torchvision://resnet77_imagenet")


def test_untrusted_or_unrelated_files_are_refused(tmp_path):
    ours = MaskRCNN(small_cfg(), num_classes=3)

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    torch.save({"model": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="weights-only"):
        load_pretrained(ours, str(tmp_path / "evil.pth"))
    assert not (tmp_path / "pwned").exists()
    torch.save({"x.weight": torch.ones(3)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no tensor matches"):
        load_pretrained(ours, str(tmp_path / "other.pth"))
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained(ours, str(tmp_path / "missing.pth"))


def test_frozen_bn_folded_into_convolutions_gives_same_outputs_and_gradients():
    import copy

    from torchvision.models.resnet import resnet18
    from torchvision.ops import FrozenBatchNorm2d as TvFrozenBN

    from mrcnn_helpers.model.backbone import (
        ConvWithFrozenBN,
        FoldedFrozenBatchNorm2d,
        fold_frozen_bn,
    )

    torch.manual_seed(0)
    reference = resnet18(norm_layer=TvFrozenBN)
    for m in reference.modules():
        if isinstance(m, TvFrozenBN):
            m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
    folded = copy.deepcopy(reference)
    fold_frozen_bn(folded)
    assert isinstance(folded.layer2[0].downsample[0], ConvWithFrozenBN)
    assert isinstance(folded.layer2[0].downsample[1], FoldedFrozenBatchNorm2d)
    assert folded.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(2, 3, 64, 64)
    out_ref, out = reference(x), folded(x)
    assert torch.allclose(out, out_ref, rtol=1e-4, atol=1e-4)
    out_ref.square().sum().backward()
    out.square().sum().backward()
    for (name, p_ref), p in zip(reference.named_parameters(), folded.parameters()):
        assert torch.allclose(p.grad, p_ref.grad, rtol=1e-3, atol=1e-4), name
    # A deep copy keeps each folded conv pointing at its own copy's BN.
    clone = copy.deepcopy(folded)
    assert clone.conv1.folded_bn[0] is clone.bn1


def test_folded_convolution_inference_cache_follows_weight_changes():
    from mrcnn_helpers.model.backbone import ConvWithFrozenBN, FrozenBatchNorm2d

    conv, bn = torch.nn.Conv2d(2, 3, 1, bias=False), FrozenBatchNorm2d(3)
    conv.__class__, conv.folded_bn = ConvWithFrozenBN, [bn]
    x = torch.rand(1, 2, 4, 4)

    def reference():
        scale = bn.weight / (bn.running_var + bn.eps).sqrt()
        return F.conv2d(x, conv.weight) * scale.view(1, -1, 1, 1) + (
            bn.bias - bn.running_mean * scale).view(1, -1, 1, 1)

    with torch.no_grad():
        assert torch.allclose(conv(x), reference(), atol=1e-6)
        conv.weight.mul_(2)  # an optimizer step or load_state_dict: in place
        bn.running_var.fill_(4.0)
        assert torch.allclose(conv(x), reference(), atol=1e-6)
    assert conv(x).requires_grad  # training computes the fold in the graph


def test_folded_convolution_training_keeps_bn_constants_until_they_change(monkeypatch):
    """In training the frozen BN's scale and shift are computed once (not per step) and follow
    in-place changes of the BN tensors; the weight keeps its gradient through the scaling."""
    from mrcnn_helpers.model import backbone
    from mrcnn_helpers.model.backbone import ConvWithFrozenBN, FrozenBatchNorm2d

    torch.manual_seed(3)
    conv, bn = torch.nn.Conv2d(2, 3, 1, bias=False), FrozenBatchNorm2d(3)
    bn.running_var.uniform_(0.5, 2.0), bn.running_mean.uniform_(-0.5, 0.5)
    conv.__class__, conv.folded_bn = ConvWithFrozenBN, [bn]
    x = torch.rand(1, 2, 4, 4)
    calls = []
    original = backbone.frozen_bn_scale_shift
    monkeypatch.setattr(backbone, "frozen_bn_scale_shift",
                        lambda m: calls.append(m) or original(m))
    for _ in range(3):
        weight, bias = conv._weights(x)
        want_weight, want_bias = conv.folded()
        assert torch.equal(weight, want_weight) and torch.equal(bias, want_bias)
    assert len(calls) == 1 + 3  # one for the cache, three by folded() above
    (grad,) = torch.autograd.grad(weight.sum(), conv.weight)
    assert torch.equal(grad, original(bn)[0].view(-1, 1, 1, 1).expand_as(grad))
    with torch.no_grad():
        bn.running_var.fill_(4.0)  # load_state_dict: in place
    weight, bias = conv._weights(x)
    assert torch.equal(weight, conv.folded()[0]) and torch.equal(bias, conv.folded()[1])


def test_losses_are_free_functions_with_hand_computed_values():
    import math

    from mrcnn_helpers.model.roi_heads import fastrcnn_loss, maskrcnn_loss

    # Uniform class logits over 3 classes: cross-entropy log(3) on every valid slot.
    logits = torch.zeros(4, 3)
    deltas = torch.zeros(4, 12)
    deltas.view(4, 3, 4)[1, 2] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # slot 1's class-2 deltas
    target_classes = torch.tensor([[0, 2, 0, 0]])
    box_targets = torch.zeros(1, 4, 4)
    valid = torch.tensor([[True, True, True, False]])
    positive = torch.tensor([[False, True, False, False]])
    class_loss, box_loss = fastrcnn_loss(logits, deltas, target_classes, box_targets, valid,
                                         positive)
    assert class_loss.item() == pytest.approx(math.log(3))
    # smooth-L1 (beta 1/9) of a delta of 1 is 1 - 0.5/9, over 3 valid slots.
    assert box_loss.item() == pytest.approx((1 - 0.5 / 9) / 3)
    # Mask: zero logits against all-ones targets give log(2) per pixel; no positive gives 0.
    masks = torch.zeros(2, 4, 4)
    assert maskrcnn_loss(masks, torch.ones(2, 4, 4), torch.tensor([True, False])).item() == \
        pytest.approx(math.log(2))
    assert maskrcnn_loss(masks, torch.ones(2, 4, 4), torch.tensor([False, False])).item() == 0.0


def _backbone_with_random_frozen_statistics(nlayers, freeze_blocks):
    from mrcnn_helpers.model import backbone as bb

    torch.manual_seed(0)
    net = bb.ResNetFPN(nlayers, 2, 6, freeze_bn=True, freeze_blocks=freeze_blocks)
    for m in net.modules():  # non-trivial frozen statistics
        if isinstance(m, bb.FrozenBatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.3, 0.3)
    return net.double()  # float64: the paths agree to rounding, not to fp32's (outputs ~200)


@pytest.mark.parametrize("nlayers", [18, 50])
def test_fused_inference_blocks_compute_the_unfused_forward(nlayers, monkeypatch):
    """The inference path of FoldedBottleneck / FoldedBasicBlock (one cuDNN conv + bias + ReLU
    (+ residual) kernel per convolution on CUDA; here its reference composition on the CPU) gives
    the features of torchvision's block forward (the downsample's bias, added in the last
    convolution's kernel instead, changes the rounding only)."""
    from mrcnn_helpers.model import backbone as bb

    net = _backbone_with_random_frozen_statistics(nlayers, (0, 1)).eval()
    blocks = [m for m in net.modules() if isinstance(m, (bb.FoldedBottleneck, bb.FoldedBasicBlock))]
    assert len(blocks) == {18: 8, 50: 16}[nlayers]
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        monkeypatch.setattr(bb, "_use_fused", lambda x, block: False)
        expected = net(x)
        monkeypatch.setattr(bb, "_use_fused", lambda x, block: True)
        got = net(x)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("nlayers", [18, 50])
def test_fused_blocks_train_like_the_unfused_ones(nlayers, monkeypatch):
    """In training every folded block takes the fused path (frozen and trainable alike): the
    features, and the gradients of the trainable convolution weights, of the BN parameters
    (none: frozen) and of the input are those of torchvision's block forward under autograd."""
    from mrcnn_helpers.model import backbone as bb

    net = _backbone_with_random_frozen_statistics(nlayers, (0,)).train()
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    params = [net.body["layer1"][0].conv1.weight, net.body["layer2"][0].downsample[0].weight,
              net.body["layer4"][-1].conv2.weight]
    calls = []

    def results(fused):
        monkeypatch.setattr(bb, "_use_fused", lambda x, block: calls.append(block) or fused)
        inp = x.clone().requires_grad_(True)
        features = net(inp)
        loss = sum((f * torch.linspace(-1, 1, f.shape[1], dtype=f.dtype).view(1, -1, 1, 1)).sum()
                   for f in features)
        return features, torch.autograd.grad(loss, params + [inp])

    want, want_grads = results(False)
    features, grads = results(True)
    assert len(calls) == 2 * sum(len(net.body[f"layer{i}"]) for i in range(1, 5))
    for e, g in zip(want, features, strict=True):
        torch.testing.assert_close(g, e)
    for e, g in zip(want_grads, grads, strict=True):
        assert e.abs().max() > 0
        torch.testing.assert_close(g, e)


def test_conv_bias_relu_gradients_are_autograds():
    """fused_conv.conv_bias_relu's hand-written backward (ReLU mask, cuDNN's data/weight
    gradients, bias = sum, residual = masked gradient) against autograd of the composition, in
    float64, strided and padded, with and without a residual."""
    from mrcnn_helpers.model.fused_conv import conv_bias_relu

    torch.manual_seed(0)
    for residual_shape in (None, (2, 6, 4, 5)):
        x = torch.randn(2, 3, 8, 9, dtype=torch.float64, requires_grad=True)
        w = torch.randn(6, 3, 3, 3, dtype=torch.float64, requires_grad=True)
        b = torch.randn(6, dtype=torch.float64, requires_grad=True)
        leaves = [x, w, b]
        r = None
        if residual_shape:
            r = torch.randn(residual_shape, dtype=torch.float64, requires_grad=True)
            leaves.append(r)
        upstream = torch.randn(2, 6, 4, 5, dtype=torch.float64)
        out = conv_bias_relu(x, w, b, r, stride=(2, 2), padding=(1, 1))
        got = torch.autograd.grad(out, leaves, upstream)
        ref = F.conv2d(x, w, b, stride=2, padding=1)
        ref = torch.relu(ref if r is None else ref + r)
        want = torch.autograd.grad(ref, leaves, upstream)
        torch.testing.assert_close(out, ref)
        assert 0 < (out > 0).float().mean() < 1  # the ReLU mask matters
        for g, e in zip(got, want, strict=True):
            torch.testing.assert_close(g, e)


def test_head_conv_relu_layers_are_fused_with_their_gradients(monkeypatch):
    """The RPN head's conv and the mask head's four convs (torchvision's conv + ReLU layers) become
    fused_conv.ConvReLU (state_dict keys unchanged); where the fused path is taken (CUDA; forced
    here on the CPU, whose composition stands in for cuDNN's kernel) outputs and the weight and
    bias gradients equal the module's own forward."""
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads

    from mrcnn_helpers.model import fused_conv

    head = MaskRCNNHeads(8, [8, 8], dilation=1).double()
    keys = list(head.state_dict())
    assert fused_conv.fuse_conv_relu_layers(head) == 2
    assert list(head.state_dict()) == keys and all(type(m) is fused_conv.ConvReLU for m in head)
    torch.manual_seed(0)
    for m in head.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.bias, std=0.5)
    x = torch.randn(3, 8, 7, 7, dtype=torch.float64)

    def run(fused):
        monkeypatch.setattr(fused_conv, "enabled_for", lambda x: fused)
        out = head(x)
        return [out] + list(torch.autograd.grad((out * out).sum(), list(head.parameters())))

    for e, g in zip(run(False), run(True), strict=True):
        assert e.abs().max() > 0
        torch.testing.assert_close(g, e)
    spec_model = MaskRCNN(small_cfg(), num_classes=3)
    fused = [name for name, m in spec_model.named_modules() if type(m) is fused_conv.ConvReLU]
    assert fused == ["rpn.head.conv.0"] + [f"roi_heads.mask_head.{i}" for i in range(4)]

