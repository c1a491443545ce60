"""The stem's 7 x 7 stride-2 convolution as a 4 x 4 convolution of 2 x 2 space-to-depth blocks
(model/stem.py): the same values and gradients as the plain convolution, where it applies."""

import torch
import torch.nn.functional as F
from torch import nn

from mrcnn_helpers.model import stem
from mrcnn_helpers.model.backbone import ResNetFPN


def test_space_to_depth_convolution_equals_the_stride_2_convolution_and_its_gradients():
    torch.manual_seed(0)
    for h, w in ((16, 20), (6, 2), (104, 168)):
        x = torch.randn(2, 3, h, w, dtype=torch.float64, requires_grad=True)
        weight = torch.randn(5, 3, 7, 7, dtype=torch.float64, requires_grad=True)
        want = F.conv2d(x, weight, stride=2, padding=3)
        got = stem.conv7x7_stride2_space_to_depth(x, weight)
        assert got.shape == want.shape == (2, 5, h // 2, w // 2)
        assert (got - want).abs().max() < 1e-10
        upstream = torch.randn(want.shape, dtype=torch.float64)
        for a, b in zip(torch.autograd.grad(got, (x, weight), upstream),
                        torch.autograd.grad(want, (x, weight), upstream), strict=True):
            assert (a - b).abs().max() < 1e-10


def test_the_rewritten_weight_puts_each_tap_where_its_block_reads_it():
    weight = torch.zeros(1, 3, 7, 7)
    weight[0, 2, 5, 2] = 1.0  # channel 2, row 5 = 2 * 2 + 1, column 2 = 2 * 1 + 0
    moved = stem.space_to_depth_weight(weight)
    assert moved.shape == (1, 12, 4, 4)
    assert moved.nonzero().tolist() == [[0, 2 * 4 + 1 * 2 + 0, 2, 1]]


def test_only_the_stem_shape_on_even_maps_is_rewritten():
    conv = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
    assert stem.is_stem_shape(conv, torch.zeros(1, 3, 8, 10))
    assert not stem.is_stem_shape(conv, torch.zeros(1, 3, 9, 10))  # odd height
    assert not stem.is_stem_shape(nn.Conv2d(3, 64, 3, stride=2, padding=1), torch.zeros(1, 3, 8, 8))
    assert not stem.applies(conv, torch.zeros(1, 3, 8, 10))  # CPU (and off unless asked)


def test_folded_stem_gives_the_same_features_with_the_rewrite(monkeypatch):
    """The backbone's folded stem (frozen BN, ConvWithFrozenBN), rewritten or not: the same FPN
    maps (the rewrite forced on for the CPU, where it is otherwise off)."""
    torch.manual_seed(1)
    backbone = ResNetFPN(18, 2, 6, freeze_bn=True, freeze_blocks=(0,)).eval().double()
    for m in backbone.modules():
        if hasattr(m, "running_mean"):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    images = torch.randn(1, 3, 64, 96, dtype=torch.float64)
    calls = []
    with torch.no_grad():
        want = backbone(images)
        monkeypatch.setattr(stem, "applies", lambda conv, x: stem.is_stem_shape(conv, x)
                            and not calls.append(conv))
        got = backbone(images)
    assert calls and all(c is backbone.body["conv1"] for c in calls)  # the stem only
    assert all((a - b).abs().max() < 1e-9 for a, b in zip(got, want, strict=True))
