"""Random number generator states in a form `torch.load(weights_only=True)` reads back.

A checkpoint stores the states of torch (CPU and CUDA), numpy and Python `random`, so a resumed
run continues with exactly the random stream the interrupted one would have drawn.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and Python `random` from the spec's seed."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


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
