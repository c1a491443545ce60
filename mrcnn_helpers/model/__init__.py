"""Mask R-CNN model: ResNet-FPN backbone, RPN and RoI heads with static per-image sizes."""

from .maskrcnn import MaskRCNN, build_model, place_model
from .masks import paste_binary_masks, paste_masks_in_image, project_masks_to_rois
from .weights import load_pretrained

__all__ = ["MaskRCNN", "build_model", "load_pretrained", "paste_binary_masks", "paste_masks_in_image",
           "place_model",
           "project_masks_to_rois"]
