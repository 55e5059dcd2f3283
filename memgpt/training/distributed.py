"""Data-parallel training with ``torch.distributed`` (DDP), launched by ``torchrun``.

``torchrun --nproc_per_node N -m memgpt train ...`` starts N processes with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` in their environment. :func:`init_from_env` joins them in a
process group (NCCL on CUDA, gloo on CPU); the :class:`~memgpt.training.trainer.Trainer` sees the group,
wraps its loss module in ``DistributedDataParallel`` and gives every rank its own slice of the
global batch. Each rank's memory state is a value the model returns, never a module buffer, so
DDP's buffer broadcast cannot touch it: ranks keep different memories, and only gradients are
synchronised.

Nothing here runs at import: the entry point (the CLI, or your script) calls
:func:`init_from_env` and :func:`shutdown`; the library only reads the group it finds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["World", "world", "launched_by_torchrun", "init_from_env", "shutdown", "all_reduce_sum"]


@dataclass(frozen=True)
class World:
    """This process's place in the process group: ``rank`` in ``[0, size)``; ``size`` 1 when alone."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs and writes checkpoints."""
        return self.rank == 0


def world() -> World:
    """The initialised default process group's rank and size, or ``World(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def launched_by_torchrun() -> bool:
    """True when the environment describes more than one process (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None or not value.isdigit():
        raise ValueError(f"torchrun sets {name} to a non-negative integer; got {value!r}")
    return int(value)


def init_from_env(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun describes; returns this rank's World and its device.

    ``device`` is the device asked for (``resolve_device``'s result): a CUDA device without an
    index becomes ``cuda:LOCAL_RANK`` (one GPU per process) and uses NCCL; CPU uses gloo.
    Without torchrun (``WORLD_SIZE`` unset or 1) nothing is initialised: ``(World(), device)``.
    """
    if not launched_by_torchrun():
        return World(), device
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local_rank = _env_int("LOCAL_RANK")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"distributed training runs on cuda (nccl) or cpu (gloo), got device {device}")
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return world(), device


def shutdown() -> None:
    """Leave the process group (if any); call once at the end of the entry point."""
    if dist.is_available() and dist.is_initialized():
        # Wait for every rank first: a rank that tears its gloo sockets down while another is
        # still in a collective (or writing rank 0's checkpoint) makes that rank abort (seen
        # under load as SIGABRT right after rank 0's final save).
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over all ranks (identity without a process group)."""
    if world().size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()
