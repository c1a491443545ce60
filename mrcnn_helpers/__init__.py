"""Mask R-CNN transfer-learning toolkit: spec -> data -> model -> train -> evaluate -> infer."""
