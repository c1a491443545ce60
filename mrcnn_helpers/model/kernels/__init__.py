"""GPU kernels written in Triton for the parts of the model PyTorch has no fast, sync-free op for.

Triton comes with PyTorch's CUDA builds; without it (or without a GPU) the model uses its
PyTorch formulations (torchvision's RoIAlign, the fixed-point NMS), so everything still runs on
the CPU. `available(tensor)` says whether the kernels serve a tensor's device.
"""

from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401 - optional: ships with PyTorch's CUDA builds
except ImportError:  # pragma: no cover - CPU-only installs without triton
    triton = None

# MRCNN_KERNELS=0 switches the kernels off (to compare with the PyTorch formulations); the
# tests set TRITON_INTERPRET=1 to run them on the CPU.
ENABLED = triton is not None and os.environ.get("MRCNN_KERNELS", "1") != "0"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(where) -> bool:
    """Whether the Triton kernels run for a tensor or a torch.device: on CUDA, or anywhere in
    interpreter mode."""
    device = where if isinstance(where, torch.device) else where.device
    return ENABLED and (device.type == "cuda" or INTERPRET)


def cache_dir() -> str:
    """Where Triton keeps the kernels it compiled (TRITON_CACHE_DIR, else ~/.triton/cache)."""
    return os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton",
                                                              "cache")


def first_use_note(seconds: float, threshold: float = 10.0) -> str:
    """What a slow first call is (for the notes of graph capture and the first step): on a
    machine whose kernel cache is empty, compiling the kernels takes about a minute on the H200
    machine (65-81 s for the seed model's inference, 1.6 s with the cache filled)."""
    if seconds < threshold or not ENABLED:
        return ""
    return (f"; most of it compiling the GPU kernels, once per machine: they are kept in "
            f"{cache_dir()} (in a container, keep that folder on a volume)")
