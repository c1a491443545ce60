"""Our predictor against stock torchvision MaskRCNN on the same weights: the same detections.

With torchvision's anchors spelled in TLT's terms (anchor_scale 8 on levels 2..6, aspect ratios
(x, y) = (sqrt 2, 1/sqrt 2), (1, 1), (1/sqrt 2, sqrt 2)) and its default RPN / RoI settings, both
models compute the same function; only floating-point summation order differs.
"""

import math

import pytest
import torch
from test_model import small_cfg
from torchvision.models.detection import maskrcnn_resnet50_fpn

from mrcnn_helpers.model import MaskRCNN, load_pretrained, paste_masks_in_image

R = math.sqrt(2.0)


def torchvision_equivalent_cfg():
    return small_cfg(
        nlayers=50, freeze_bn=True, freeze_blocks=(0, 1), min_level=2, max_level=6,
        anchor_scale=8.0, aspect_ratios=((R, 1 / R), (1.0, 1.0), (1 / R, R)),
        fast_rcnn_mlp_head_dim=1024, mrcnn_resolution=28, test_rpn_pre_nms_topn=1000,
        test_rpn_post_nms_topn=1000, test_rpn_nms_thresh=0.7, test_nms=0.5,
        test_detections_per_image=100, test_score_thresh=0.05)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    stock = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3,
                                  min_size=256, max_size=256).eval()
    # Random FrozenBN-free weights explode through 50 layers; give BN realistic statistics so
    # activations stay in range (and so both models see identical, sane features).
    for m in stock.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.fill_(0.5)
            m.running_var.fill_(1.0)
    path = tmp_path_factory.mktemp("parity") / "stock.pth"
    torch.save(stock.state_dict(), path)
    ours = MaskRCNN(torchvision_equivalent_cfg(), num_classes=3)
    report = load_pretrained(ours, str(path))
    assert not report.skipped_shape and not report.missing
    return stock, ours.eval()


def compare_detections(stock, ours, device):
    torch.manual_seed(1)
    images = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8, device=device)
    with torch.no_grad():
        expected = stock([im.float() / 255 for im in images])
        got = ours(images)
    for i, exp in enumerate(expected):
        n = int(got["num_detections"][i])
        assert n == len(exp["boxes"]) and n > 10
        assert torch.allclose(got["boxes"][i, :n], exp["boxes"], atol=1e-3)
        assert torch.allclose(got["scores"][i, :n], exp["scores"], atol=1e-5)
        assert torch.equal(got["classes"][i, :n], exp["labels"])
        pasted = paste_masks_in_image(got["masks"][i, :n], got["boxes"][i, :n], 256, 256)
        # Pasting differs by design at box borders (torchvision pads the 28x28 mask by one
        # pixel and resamples with its own rounding); inside, the probabilities agree.
        agree = ((pasted > 0.5) == (exp["masks"][:, 0] > 0.5)).float().mean()
        assert agree > 0.99


def test_same_detections_as_torchvision(models):
    compare_detections(*models, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_same_detections_as_torchvision_on_cuda(models, monkeypatch):
    """On CUDA our NMS is the batched fixed point and the backbone runs channels_last."""
    from mrcnn_helpers.model import place_model

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    stock, ours = models
    try:
        compare_detections(stock.cuda(), place_model(ours, "cuda"), "cuda")
    finally:
        stock.cpu(), ours.cpu().to(memory_format=torch.contiguous_format)
