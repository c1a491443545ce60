"""When a ResNet stage runs as one autograd node (model/fused_stage.py): only when switched on
and where the Triton kernels serve the input; its values and gradients are checked against the
block-by-block path in tests/interpreted/kernel_checks.py (Triton's interpreter)."""

import torch

from mrcnn_helpers.model import fused_stage, kernels
from mrcnn_helpers.model.backbone import ResNetFPN, stage_is_folded


def _backbone():
    return ResNetFPN(18, 2, 6, freeze_bn=True, freeze_blocks=(0,))


def test_switch_and_the_cpu(monkeypatch):
    backbone = _backbone()
    x = torch.randn(1, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(fused_stage, "ENABLED", False)  # MRCNN_FUSED_STAGE=0
    assert not fused_stage.applies(backbone.body["layer2"], x)
    monkeypatch.setattr(fused_stage, "ENABLED", True)  # the default
    assert kernels.available(x) == kernels.INTERPRET
    assert fused_stage.applies(backbone.body["layer2"], x) == kernels.INTERPRET


def test_not_for_inference_nchw_or_a_frozen_stage_without_input_gradient(monkeypatch):
    monkeypatch.setattr(fused_stage, "ENABLED", True)
    monkeypatch.setattr(kernels, "available", lambda where: True)  # as on CUDA
    backbone = ResNetFPN(18, 2, 6, freeze_bn=True, freeze_blocks=(0, 1))
    x = torch.randn(1, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    assert fused_stage.applies(backbone.body["layer2"], x)
    assert not fused_stage.applies(backbone.body["layer2"], x.contiguous())  # NCHW
    assert not fused_stage.applies(backbone.body["layer1"], x)  # frozen, x without gradient
    assert fused_stage.applies(backbone.body["layer1"], x.requires_grad_(True))
    with torch.no_grad():
        assert not fused_stage.applies(backbone.body["layer2"], x)
    # The backbone asks for a stage of folded convolutions only (trainable BatchNorm2d is not).
    assert stage_is_folded(backbone.body["layer2"]) and stage_is_folded(backbone.body["layer1"])
    unfolded = ResNetFPN(18, 2, 6, freeze_bn=False, freeze_blocks=())
    assert not stage_is_folded(unfolded.body["layer2"])


def _trainable_convs(backbone, layer="layer2"):
    stage = backbone.body[layer]
    return stage, [conv for block in stage for conv in fused_stage.block_convs(block)
                   if conv.weight.requires_grad]


def _with_random_bn(backbone):
    g = torch.Generator().manual_seed(4)
    for module in backbone.modules():
        if hasattr(module, "running_var") and module.running_var is not None:
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=g) + 0.5)
            module.weight.copy_(torch.randn(module.weight.shape, generator=g))
    return backbone


def test_batched_fold_gives_each_convolutions_folded_weights_and_gradients():
    """fold_weights (one multiplication over the concatenated weights) against each
    convolution's own folding: the same values and weight gradients, bit for bit, in fp32 and
    bf16, with the weights' channels_last layout kept (outputs and gradients)."""
    cl = torch.channels_last
    for dtype in (torch.float32, torch.bfloat16):
        backbone = _with_random_bn(_backbone()).to(memory_format=cl)
        stage, convs = _trainable_convs(backbone)
        assert len(convs) == 5 and any(c.kernel_size == (3, 3) for c in convs)
        x = torch.randn(1, 64, 6, 6)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not torch.float32):
            mine = fused_stage.fold_weights(stage, convs, dtype)
            theirs = [conv._weights(x)[0] for conv in convs]
        g = torch.Generator().manual_seed(5)
        upstream = [torch.randn(w.shape, generator=g).to(dtype) for w in theirs]
        for a, b in zip(mine, theirs):
            assert a.dtype == dtype and torch.equal(a, b)
            assert a.is_contiguous(memory_format=cl) == b.is_contiguous(memory_format=cl)
        grads_mine = torch.autograd.grad(mine, [c.weight for c in convs], upstream)
        grads_theirs = torch.autograd.grad(theirs, [c.weight for c in convs], upstream)
        for a, b, conv in zip(grads_mine, grads_theirs, convs):
            assert a.dtype == torch.float32 and torch.equal(a, b)
            assert a.stride() == conv.weight.stride()  # AccumulateGrad can keep it as is


def test_batched_fold_scales_follow_the_bn_statistics():
    """The cached per-element scales are rebuilt when a BN tensor changes in place."""
    backbone = _with_random_bn(_backbone())
    stage, convs = _trainable_convs(backbone)
    before = fused_stage.fold_weights(stage, convs, torch.float32)[0].detach().clone()
    bn = convs[0].folded_bn[0]
    with torch.no_grad():
        bn.weight.mul_(2)
    after = fused_stage.fold_weights(stage, convs, torch.float32)[0]
    assert torch.allclose(after, 2 * before) and not torch.allclose(after, before)
    assert torch.equal(after, convs[0]._weights(torch.randn(1, 64, 6, 6))[0])
