"""Training checkpoints: atomic writes, safe loads, discovery and pruning.

A checkpoint is `RESULTS_DIR/model.step-<N>.pth`, a dict written with `torch.save`:

    {"format": "mrcnn-checkpoint", "version": 1, "step": int,
     "model": state_dict, "optimizer": state_dict, "scaler": state_dict (empty without fp16),
     "rng": capture_rng_state(), "spec_text": str (the spec in TLT text format),
     "model_fields": {dotted spec field: plain value} (fields that define the network),
     "class_names": list[str] (index 0 = "background"), "category_ids": list[int]}

Every value is a tensor, a plain container or a primitive, because checkpoints are loaded with
`torch.load(weights_only=True)`: a checkpoint is a file people download and share, and a full
unpickler would run whatever code a crafted file names. The spec therefore travels as text and the
RNG states as tensors.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mrcnn_helpers.errors import CheckpointError

CHECKPOINT_FORMAT = "mrcnn-checkpoint"
CHECKPOINT_VERSION = 1
_NAME_RE = re.compile(r"^model\.step-(\d+)\.pth$")
# Temporary files of atomic writes into a results directory (`.<name>.<random>.tmp`).
_TEMPORARY_PATTERNS = (".model.step-*.pth.*.tmp", ".metrics_step-*.json.*.tmp", ".spec.txt.*.tmp")


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (e.g. the newest one is unreadable and an older one is used)."""


def checkpoint_path(results_dir: str | os.PathLike, step: int) -> Path:
    """Path of the checkpoint of global step `step` in `results_dir`: `model.step-<step>.pth`."""
    return Path(results_dir) / f"model.step-{int(step)}.pth"


def list_checkpoints(results_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every `model.step-<N>.pth` in `results_dir`, oldest step first.

    Sorted by the step number in the name (numerically: step 10 comes after step 9). Temporary
    files of interrupted writes (`.model.step-<N>.pth.*.tmp`) never match. A missing directory
    gives an empty list.
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
    """Delete all but the `keep` newest checkpoints (by step); `keep <= 0` keeps all.

    Also removes temporary files left by writes that were killed: of checkpoints and of the
    trainer's metrics JSON and spec.txt (see trainer.write_text_atomic). Returns the removed paths.
    """
    removed = []
    root = Path(results_dir)
    if root.is_dir():
        for pattern in _TEMPORARY_PATTERNS:
            for entry in root.glob(pattern):
                entry.unlink(missing_ok=True)
                removed.append(entry)
    found = list_checkpoints(results_dir)
    if keep > 0:
        for _, path in found[:-keep]:
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


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable (a crash right after os.replace could otherwise lose the
    # directory entry). Not possible on every platform (Windows): then the rename is as durable
    # as the file system makes it.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _find_os_error(exc: BaseException) -> OSError | None:
    # torch.save reports a failed write of its zip stream as a RuntimeError whose context is the
    # OSError raised by the file object (ENOSPC, EIO, ...): dig it out for the message.
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Write `state` to `path` atomically; returns the path.

    The bytes go to a temporary file in the same directory, which is flushed, fsynced and then
    renamed over `path` (os.replace is atomic within one file system). A crash or an error at any
    point leaves either the old file or the new one, never a truncated checkpoint. On failure the
    temporary file is removed and CheckpointError names the path and the OS error (disk full,
    permission denied, ...); a previous file at `path` is untouched.
    """
    path = Path(path)
    _check_plain(state, "state")
    directory = path.parent
    tmp_name = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
        _fsync_dir(directory)
    except Exception as exc:  # noqa: BLE001 - wrapped below, with the OS error when there is one
        os_error = _find_os_error(exc)
        reason = (
            f"{os_error.strerror or os_error} (errno {os_error.errno})"
            if os_error is not None
            else f"{type(exc).__name__}: {exc}"
        )
        raise CheckpointError(
            f"could not write checkpoint {path}: {reason}; "
            "the previous checkpoint, if any, is unchanged"
        ) from exc
    finally:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint written by `save_checkpoint` with `torch.load(weights_only=True)`.

    Raises CheckpointError naming `path` when the file is missing, truncated or corrupt, when it
    holds pickled objects other than plain weights (refused: loading them would run code), or when
    it is not a checkpoint of this toolkit (e.g. bare pretrained weights, which belong in the
    spec's `checkpoint` field instead).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        if "Weights only load failed" in str(exc):
            raise CheckpointError(
                f"checkpoint {path} refused: not a plain-weights checkpoint (weights_only); it "
                "contains pickled objects that would run code when loaded. Only load it with a "
                "full unpickler if you trust its source, and re-save its tensors."
            ) from None
        raise CheckpointError(
            f"checkpoint {path} is unreadable (corrupt or truncated): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no details'}"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a training checkpoint of this toolkit (no format "
            f"'{CHECKPOINT_FORMAT}'); pretrained weights go in the spec's `checkpoint` field"
        )
    version = state.get("version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version!r}; this version reads up to "
            f"{CHECKPOINT_VERSION}"
        )
    for key in ("step", "model"):
        if key not in state:
            raise CheckpointError(f"checkpoint {path} lacks the '{key}' entry")
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


# ---------------------------------------------------------------------------------------------
# Random number generator states, in a weights_only-safe form.


def capture_rng_state() -> dict:
    """States of torch (CPU and initialized CUDA devices), numpy and Python `random` as tensors.

    numpy's MT19937 key and Python's 625-word state are stored as int64 tensors (the words are
    < 2**32), the remaining scalars as int / float / None.
    """
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    py_version, py_words, py_gauss = random.getstate()
    cuda_states = []
    # Only read CUDA states when CUDA is already in use: querying them would otherwise start a
    # CUDA context in a CPU run.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda_states = list(torch.cuda.get_rng_state_all())
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda_states,
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "python": {
            "version": int(py_version),
            "state": torch.tensor(py_words, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
    }


def restore_rng_state(state: dict) -> None:
    """Inverse of `capture_rng_state`.

    CUDA states are restored only when the number of visible devices matches the saved one (a
    checkpoint moved to another machine continues with freshly seeded CUDA generators).
    """
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda_states):
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["name"],
            np_state["keys"].numpy().astype(np.uint32),
            int(np_state["pos"]),
            int(np_state["has_gauss"]),
            float(np_state["cached_gaussian"]),
        )
    )
    py_state = state["python"]
    random.setstate(
        (int(py_state["version"]), tuple(int(w) for w in py_state["state"].tolist()),
         py_state["gauss_next"])
    )
