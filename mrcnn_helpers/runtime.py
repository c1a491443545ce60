"""Where and at which precision the model runs: the one device and autocast resolver.

Training, evaluation, inference, export verification and deployment all ask here, so "cuda if
present", "bf16 where the GPU supports it, else fp16" and "autocast only on CUDA" mean the same
thing everywhere.
"""

from __future__ import annotations

import contextlib

import torch

from mrcnn_helpers.errors import MrcnnError

# --precision values of the commands; None = no autocast (fp32).
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`device` as a torch.device; None = "cuda" when a GPU is visible, else "cpu".

    Raises MrcnnError for a name torch does not know, or CUDA asked for where there is none.
    """
    if device is None or device == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise MrcnnError(f"unknown device {device!r}: use cpu, cuda or cuda:N ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MrcnnError(f"device {device} asked for, but no CUDA GPU is visible; use --device cpu")
    return device


def device_of(module, default: str | torch.device | None = None) -> torch.device:
    """The device of `module`'s first parameter; modules without parameters (exported backends)
    give resolve_device(default)."""
    parameters = getattr(module, "parameters", None)
    param = next(iter(parameters()), None) if callable(parameters) else None
    return param.device if param is not None else resolve_device(default)


def amp_dtype(use_amp: bool, device: torch.device) -> torch.dtype | None:
    """Autocast dtype of a spec's use_amp on `device`: bf16 (fp32's range, so activations cannot
    overflow and gradients need no scaling) where the GPU supports it, else fp16; None (fp32)
    off CUDA or without use_amp."""
    if not use_amp or torch.device(device).type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def precision_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype of a --precision value (fp32, fp16, bf16) on `device`; raises MrcnnError for
    an unknown value or reduced precision off CUDA."""
    if precision not in PRECISIONS:
        raise MrcnnError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is not None and torch.device(device).type != "cuda":
        raise MrcnnError(f"precision {precision} needs a CUDA device (got {device}); use fp32")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast on CUDA with `dtype`; a no-op context for None or off CUDA."""
    if dtype is None or torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)
