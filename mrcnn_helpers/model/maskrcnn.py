"""Mask R-CNN: normalize -> backbone (ResNet + FPN) -> RPN -> RoI heads.

Parameter names are torchvision's `MaskRCNN` names (`backbone.body.*`, `backbone.fpn.*`,
`rpn.head.*`, `roi_heads.*`), so its weights load for transfer learning.
"""

import torch
from torch import Tensor, nn

from .backbone import backbone_from_spec
from .roi_heads import RoIHeads
from .rpn import RegionProposalNetwork

# ImageNet statistics in 0..255 pixel units: torchvision's ResNets were trained with them.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class MaskRCNN(nn.Module):
    """images uint8/float Tensor[B, 3, H, W] (0..255 RGB, padded to the spec's image_size).

    Training (`model.train()`, targets given): returns the weighted losses
    {rpn_score_loss, rpn_box_loss, fast_rcnn_class_loss, fast_rcnn_box_loss, mask_loss}.
    Inference: returns {boxes [B, D, 4] input pixels, scores [B, D], classes [B, D] (0 = padding),
    masks [B, D, R, R] probabilities of the predicted class, num_detections [B]} with
    D = test_detections_per_image and R = mrcnn_resolution.
    """

    def __init__(self, cfg, num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.backbone = backbone_from_spec(cfg)
        self.rpn = RegionProposalNetwork(cfg, self.backbone.out_channels)
        self.roi_heads = RoIHeads(cfg, num_classes, self.backbone.out_channels)
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: Tensor) -> Tensor:
        return (images.float() - self.pixel_mean) / self.pixel_std

    def forward(self, images: Tensor, targets: dict | None = None) -> dict:
        if self.training and targets is None:
            raise ValueError("MaskRCNN in training mode needs targets (boxes, classes, masks)")
        image_size = tuple(images.shape[-2:])
        features = self.backbone(self.normalize(images))
        proposals, valid, rpn_losses = self.rpn(features, image_size, targets)
        detections, roi_losses = self.roi_heads(features, proposals, valid, image_size, targets)
        return {**rpn_losses, **roi_losses} if self.training else detections


def build_model(spec) -> MaskRCNN:
    """Mask R-CNN for an ExperimentSpec (its maskrcnn_config and data_config.num_classes)."""
    return MaskRCNN(spec.maskrcnn_config, spec.data_config.num_classes)
