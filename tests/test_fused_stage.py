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
