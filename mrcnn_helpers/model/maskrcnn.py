"""Mask R-CNN: normalize -> backbone (ResNet + FPN) -> RPN -> RoI heads.

Parameter names are torchvision's `MaskRCNN` names (`backbone.body.*`, `backbone.fpn.*`,
`rpn.head.*`, `roi_heads.*`), so its weights load for transfer learning.
"""

import torch
from torch import Tensor, nn

from . import kernels
from .backbone import backbone_from_spec
from .fused_conv import fuse_conv_relu_layers
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

    # On CUDA the backbone runs in channels_last (NHWC) memory layout, which cuDNN's bf16/fp16
    # convolutions use natively (NCHW costs a layout conversion around every convolution).
    channels_last_on_cuda = True

    def __init__(self, cfg, num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.backbone = backbone_from_spec(cfg)
        self.rpn = RegionProposalNetwork(cfg, self.backbone.out_channels)
        self.roi_heads = RoIHeads(cfg, num_classes, self.backbone.out_channels)
        # The RPN head's and the mask head's conv + ReLU layers: one fused kernel each on CUDA.
        fuse_conv_relu_layers(self)
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: Tensor) -> Tensor:
        return (images.float() - self.pixel_mean) / self.pixel_std

    def forward(self, images: Tensor, targets: dict | None = None) -> dict:
        if self.training and targets is None:
            raise ValueError("MaskRCNN in training mode needs targets (boxes, classes, masks)")
        image_size = tuple(images.shape[-2:])
        if self.training:
            targets = trim_target_padding(targets)
        x = self.normalize(images)
        if x.is_cuda and self.channels_last_on_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        features = self.backbone(x)
        proposals, valid, rpn_losses = self.rpn(features, image_size, targets)
        detections, roi_losses = self.roi_heads(features, proposals, valid, image_size, targets)
        return {**rpn_losses, **roi_losses} if self.training else detections


def trim_target_padding(targets: dict) -> dict:
    """Drop the padding rows (class 0) that every image of the batch has at its end.

    The loader pads each image's instances to max_num_instances (100-200) for static shapes, but
    matching computes an IoU of every anchor against every row: ~280k anchors x 200 rows per image
    at 832x1344. Trimming to the batch's last used row costs one host sync and changes no result
    (padding rows are masked out everywhere). Only where the sync is allowed: not on the GPU
    kernels' path, whose steps stay free of host syncs (and are captured in CUDA graphs).
    """
    classes = targets["classes"]
    if torch.compiler.is_compiling() or kernels.available(classes) or classes.shape[1] <= 1:
        return targets
    rows = torch.arange(1, classes.shape[1] + 1, device=classes.device)
    used = max(1, int(((classes > 0) * rows).max()))
    return {key: value[:, :used] if key in ("boxes", "classes", "masks") else value
            for key, value in targets.items()}


def place_model(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Move `model` to `device`; on CUDA also lay its weights out channels_last (when the model
    runs channels_last), so weight gradients, optimizer state and DDP buckets share the
    activations' layout instead of being converted every step. Returns the model."""
    model.to(device)
    if torch.device(device).type == "cuda" and getattr(model, "channels_last_on_cuda", False):
        model.to(memory_format=torch.channels_last)
    return model


def build_model(spec) -> MaskRCNN:
    """Mask R-CNN for an ExperimentSpec (its maskrcnn_config and data_config.num_classes)."""
    return MaskRCNN(spec.maskrcnn_config, spec.data_config.num_classes)
