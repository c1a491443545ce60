"""Kept only for engine/inference.py until it moves: the network fields now live in
mrcnn_helpers.spec.network, the checkpoint's records of spec and data in engine.checkpoint.

The checkpoint key "model_fields" holds spec.network.network_fields(spec).
"""

from mrcnn_helpers.spec.network import network_fields as model_fields

__all__ = ["model_fields"]
