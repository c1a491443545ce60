"""Data-parallel training on torch.distributed: process-group setup, launching, collectives.

One process per GPU, started by torchrun (`mrcnn train --gpus N` runs it for you) or by SLURM's
srun. Each process reads its rank from the environment torchrun sets (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT); under srun without torchrun, SLURM_PROCID, SLURM_NTASKS and
SLURM_LOCALID stand in (MASTER_ADDR / MASTER_PORT must then be exported by the batch script).
Backend: NCCL on CUDA, gloo on CPU (what the CPU tests use).
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import TrainingError

# A rank that waits longer than this for the others (a dead or stuck rank) fails with an error
# naming the collective instead of hanging forever. Evaluation on rank 0 is waited for separately.
DEFAULT_TIMEOUT_MIN = float(os.environ.get("MRCNN_DIST_TIMEOUT_MIN", "30"))


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a data-parallel run (world_size 1: plain training)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    wait_group: object = None  # gloo group with a long timeout, for waiting on rank 0's evaluation

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.wait_group is not None


def _env_int(*names: str) -> int | None:
    for name in names:
        if os.environ.get(name, "").strip():
            return int(os.environ[name])
    return None


def init_distributed(device: torch.device) -> tuple[DistContext, torch.device]:
    """Join the process group when launched by torchrun or srun; returns (context, device).

    A launch with one process still takes the distributed path (DDP over one rank), so its cost
    can be compared with plain training.

    On CUDA each process takes GPU `local_rank`. Already-initialized groups are reused (a notebook
    or a caller may have set one up).
    """
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS")
    if world is None:  # not launched by torchrun / srun: plain single-process training
        return DistContext(), device
    rank = _env_int("RANK", "SLURM_PROCID") or 0
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise TrainingError(f"rank {rank} wants GPU {local_rank} but this node has "
                                f"{torch.cuda.device_count()}; start at most that many processes")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                    timeout=datetime.timedelta(minutes=DEFAULT_TIMEOUT_MIN))
        except Exception as exc:  # rendezvous failures come in many types
            raise TrainingError(f"rank {rank} of {world} could not join the process group "
                                f"({backend}, MASTER_ADDR={os.environ.get('MASTER_ADDR')}, "
                                f"MASTER_PORT={os.environ.get('MASTER_PORT')}): {exc}") from None
    wait_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=24))
    return DistContext(rank, world, local_rank, wait_group), device


def all_mean(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Average a small tensor over ranks (the logged loss terms); identity without a group."""
    if not ctx.enabled:
        return values
    values = values.clone()
    try:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    except Exception as exc:
        raise TrainingError(f"rank {ctx.rank}: all-reduce of the loss failed; another rank "
                            f"probably died or timed out ({exc})") from None
    return values / ctx.world_size


def all_min(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The smallest of `value` (an integer tensor) over ranks; identity without a group."""
    if not ctx.enabled:
        return value
    value = value.clone()
    try:
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    except Exception as exc:
        raise TrainingError(f"rank {ctx.rank}: all-reduce of the finiteness check failed; "
                            f"another rank probably died or timed out ({exc})") from None
    return value


def wait_for_main(ctx: DistContext) -> None:
    """Block until rank 0 reaches the same point (used while it writes or evaluates)."""
    if ctx.enabled:
        dist.barrier(group=ctx.wait_group)


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def launch_processes(nproc: int, argv: list[str]) -> int:
    """Run `python -m mrcnn_helpers <argv>` in `nproc` processes on this node through torchrun.

    Returns torchrun's exit status (non-zero when any rank failed; torchrun then stops the others
    and prints which rank died and why).
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "mrcnn_helpers", *argv]
    print("launching: " + " ".join(cmd), flush=True)
    return subprocess.call(cmd)
