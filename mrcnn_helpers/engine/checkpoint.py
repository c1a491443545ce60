"""Checkpoint files of a results directory: writing, safe loading, discovery, pruning and resume.

A training checkpoint is `RESULTS_DIR/model.step-<N>.pth`, a dict written with `torch.save`:

    {"format": "mrcnn-checkpoint", "version": 1, "step": int,
     "model": state_dict, "optimizer": state_dict, "scaler": state_dict (empty without fp16),
     "rng": capture_rng_state(), "spec_text": str (the spec in TLT text format),
     "model_fields": spec.network.network_fields(spec) (fields that define the network),
     "class_names": list[str] (index 0 = "background"), "category_ids": list[int]}

An inference weights file (`model.weights.pth`, see `save_inference_weights`) is the same dict
with "format": "mrcnn-weights", the floating tensors of "model" in fp16 and no "optimizer",
"scaler" or "rng": it serves evaluation, inference and export, not resuming.

Every value is a tensor, a plain container or a primitive, because files are loaded with
`torch.load(weights_only=True)`: a checkpoint is a file people download and share, and a full
unpickler would run whatever code a crafted file names. The spec therefore travels as text and the
RNG states as tensors.
"""

from __future__ import annotations

import io
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from mrcnn_helpers.engine.rng import capture_rng_state, restore_rng_state  # noqa: F401 (API)
from mrcnn_helpers.errors import CheckpointError
from mrcnn_helpers.fileio import (
    atomic_output,
    check_torch_file,
    describe_os_error,
    remove_temporaries,
    source_name,
)

CHECKPOINT_FORMAT = "mrcnn-checkpoint"
CHECKPOINT_VERSION = 1
WEIGHTS_FORMAT = "mrcnn-weights"
WEIGHTS_VERSION = 1
_VERSIONS = {CHECKPOINT_FORMAT: CHECKPOINT_VERSION, WEIGHTS_FORMAT: WEIGHTS_VERSION}
# Files of a results directory besides the step checkpoints; none matches _NAME_RE, so
# latest_checkpoint and pruning never see them.
BEST_CHECKPOINT = "model.best.pth"  # the checkpoint with the best evaluation (a hard link)
BEST_METRICS = "best.json"  # its step and metrics
INFERENCE_WEIGHTS = "model.weights.pth"  # fp16 weights of the best (or, without evaluation, last)
_NAME_RE = re.compile(r"^model\.step-(\d+)\.pth$")


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (e.g. the newest one is unreadable and an older one is used)."""


def checkpoint_path(results_dir: str | os.PathLike, step: int) -> Path:
    """Path of the checkpoint of global step `step` in `results_dir`: `model.step-<step>.pth`."""
    return Path(results_dir) / f"model.step-{int(step)}.pth"


def metrics_path(results_dir: str | os.PathLike, step: int) -> Path:
    """Path of the evaluation metrics of step `step`: `metrics_step-<step>.json`."""
    return Path(results_dir) / f"metrics_step-{int(step)}.json"


def read_metrics(results_dir: str | os.PathLike, step: int) -> dict | None:
    """The metrics JSON of step `step`, or None when that evaluation is not recorded."""
    path = metrics_path(results_dir, step)
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def list_checkpoints(results_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every `model.step-<N>.pth` in `results_dir`, oldest step first.

    Sorted by the step number in the name (numerically: step 10 comes after step 9). Temporary
    files of interrupted writes (`.model.step-<N>.pth.*.tmp`), model.best.pth and
    model.weights.pth never match. A missing directory gives an empty list.
    """
    root = Path(results_dir)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _NAME_RE.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(results_dir: str | os.PathLike) -> Path | None:
    """Path of the checkpoint with the highest step in `results_dir`, or None if there is none.

    Chosen by name only (files are not opened); see `load_latest_checkpoint` for the fallback to
    an older checkpoint when the newest one is unreadable.
    """
    found = list_checkpoints(results_dir)
    return found[-1][1] if found else None


def prune_checkpoints(results_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the `keep` newest step checkpoints; `keep <= 0` keeps all.

    Also removes the temporary files that killed atomic writes left in `results_dir`
    (fileio.remove_temporaries): the results directory has one writer, the run holding its lock.
    model.best.pth is a second name of its checkpoint's file, so it survives that checkpoint's
    pruning. Returns the removed paths.
    """
    removed = remove_temporaries(results_dir)
    if keep > 0:
        for _, path in list_checkpoints(results_dir)[:-keep]:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _check_plain(value: Any, where: str) -> None:
    """Raise CheckpointError if torch.load(weights_only=True) could not read `value` back."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise CheckpointError(f"checkpoint key {where}[{key!r}] is a {type(key).__name__}")
            _check_plain(item, f"{where}[{key!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    raise CheckpointError(
        f"checkpoint value {where} is a {type(value).__module__}.{type(value).__qualname__}; "
        "only tensors, dicts, lists, tuples, str, int, float, bool and None can be saved "
        "(checkpoints are loaded with weights_only=True)"
    )


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Write `state` to `path` atomically (fileio.atomic_output: fsynced, then renamed); returns
    the path.

    A crash or an error at any point leaves either the old file or the new one, never a truncated
    checkpoint. On failure no temporary file is left and CheckpointError names the path and the OS
    error (disk full, permission denied, ...); a previous file at `path` is untouched. A state
    that weights_only loading could not read back is refused before anything is written.
    """
    path = Path(path)
    _check_plain(state, "state")
    try:
        with atomic_output(path, "wb", error=CheckpointError, what="checkpoint") as handle:
            torch.save(state, handle)
    except CheckpointError as exc:
        if exc.__cause__ is None:
            raise
        raise CheckpointError(f"could not write checkpoint {path}: "
                              f"{describe_os_error(exc.__cause__)}; the previous checkpoint, if "
                              "any, is unchanged") from exc.__cause__
    return path


def _to_fp16(tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_floating_point():
        return tensor
    half = tensor.detach().to(torch.float16)
    # A value beyond fp16's range (65504) would turn into inf: such a tensor keeps its dtype.
    if not torch.isfinite(half).all() and torch.isfinite(tensor).all():
        return tensor.detach()
    return half


def save_inference_weights(path: str | os.PathLike, state: dict) -> Path:
    """Write the weights-only inference file of a checkpoint `state` to `path` atomically.

    state: a training checkpoint's dict (as written or loaded; "model" and "step" required).
    The file holds {"format": "mrcnn-weights", "version": 1, "step", "model" (floating tensors
    cast to fp16, except any that would overflow fp16; others as they are), "spec_text",
    "model_fields", "class_names", "category_ids"}: no optimizer, scaler or RNG state, so about a
    quarter of the checkpoint's size. `load_checkpoint` reads it. Raises CheckpointError as
    save_checkpoint does.
    """
    weights = {
        "format": WEIGHTS_FORMAT, "version": WEIGHTS_VERSION, "step": int(state["step"]),
        "model": {name: _to_fp16(t) for name, t in state["model"].items()},
    }
    for key in ("spec_text", "model_fields", "class_names", "category_ids"):
        if key in state:
            weights[key] = state[key]
    return save_checkpoint(path, weights)


def read_torch_file(source, name: str | None = None, map_location: Any = "cpu") -> Any:
    """The object in a torch.save file (a path, bytes or a seekable binary file; `name` in
    messages, default the path), read weights-only once fileio.check_torch_file has bounded
    what it may expand to. CheckpointError naming the file when it is refused so, holds pickled
    objects other than plain weights (they would run code), is corrupt or truncated, or needs
    more memory than there is."""
    name = name or source_name(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    check_torch_file(source, name, error=CheckpointError)
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except Exception as exc:
        text = str(exc)
        if "Weights only load failed" in text:
            raise CheckpointError(
                f"checkpoint {name} refused: not a plain-weights checkpoint (weights_only); it "
                "contains pickled objects that would run code when loaded. Only load it with a "
                "full unpickler if you trust its source, and re-save its tensors."
            ) from None
        if isinstance(exc, MemoryError) or "can't allocate memory" in text:
            raise CheckpointError(f"checkpoint {name} needs more memory than is available to "
                                  f"load it: {text.splitlines()[-1] if text else 'MemoryError'}"
                                  ) from None
        raise CheckpointError(
            f"checkpoint {name} is unreadable (corrupt or truncated): "
            f"{type(exc).__name__}: {text.splitlines()[0] if text else 'no details'}"
        ) from exc


def load_checkpoint(source, map_location: Any = "cpu", *, name: str | None = None) -> dict:
    """Load a training checkpoint or an inference weights file: a path, bytes (a decrypted
    file) or a seekable binary file, `name` in messages (read_torch_file: bounded, weights only).

    Returns the file's dict ("format" says which; both have "step" and "model"; a weights
    file's floating tensors are fp16). CheckpointError naming the file when it is missing,
    refused, unreadable, or not a file of this toolkit (checked_state; bare pretrained weights
    belong in the spec's `checkpoint` field).
    """
    if isinstance(source, (str, os.PathLike)):
        source = Path(source)
        if not source.is_file():
            raise CheckpointError(f"checkpoint not found: {source}")
    name = name or source_name(source)
    state = read_torch_file(source, name, map_location)
    return checked_state(state, name)


def checked_state(state: Any, name: str) -> dict:
    """`state` when it is a checkpoint or weights file of this toolkit (a known format, a
    version this code reads, "step" and "model"); CheckpointError naming `name` otherwise."""
    kind = state.get("format") if isinstance(state, dict) else None
    if kind not in _VERSIONS:
        raise CheckpointError(
            f"{name} is not a training checkpoint of this toolkit (no format "
            f"'{CHECKPOINT_FORMAT}' or '{WEIGHTS_FORMAT}'); pretrained weights go in the spec's "
            "`checkpoint` field"
        )
    version = state.get("version")
    if not isinstance(version, int) or version > _VERSIONS[kind]:
        raise CheckpointError(
            f"checkpoint {name} has format version {version!r}; this version reads up to "
            f"{_VERSIONS[kind]}"
        )
    for key in ("step", "model"):
        if key not in state:
            raise CheckpointError(f"checkpoint {name} lacks the '{key}' entry")
    return state


def require_training_state(state: dict, path: str | os.PathLike) -> dict:
    """`state` when it can resume training; CheckpointError for an inference weights file."""
    if state.get("format") == WEIGHTS_FORMAT:
        raise CheckpointError(
            f"{path} is an inference weights file ({WEIGHTS_FORMAT}: fp16 weights without "
            "optimizer or RNG state): training cannot resume from it. Resume from a "
            "model.step-<N>.pth checkpoint, or start a new results directory with this file as "
            "the spec's `checkpoint` (pretrained weights)."
        )
    for key in ("optimizer", "rng"):
        if key not in state:
            raise CheckpointError(f"checkpoint {path} lacks the '{key}' entry needed to resume")
    return state


def load_latest_checkpoint(
    results_dir: str | os.PathLike, map_location: Any = "cpu"
) -> tuple[Path, dict] | None:
    """Load the newest readable checkpoint of `results_dir`: (path, state), or None if none exist.

    If the newest file cannot be read (a run killed by the OS while a disk was failing, a file
    copied half-way), it is skipped with a CheckpointWarning and the previous one is tried.
    Raises CheckpointError if checkpoints exist but none can be read, rather than silently
    starting over and overwriting them.
    """
    found = list_checkpoints(results_dir)
    errors = []
    for _, path in reversed(found):
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointError as exc:
            errors.append(str(exc))
            warnings.warn(f"skipping {path}: {exc}", CheckpointWarning, stacklevel=2)
    if found:
        raise CheckpointError(
            f"no readable checkpoint in {results_dir}:\n  " + "\n  ".join(errors)
            + "\nMove them away to start over, or restore a good copy."
        )
    return None
