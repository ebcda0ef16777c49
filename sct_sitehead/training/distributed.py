"""Single-process or ``torchrun`` (DistributedDataParallel) execution: devices, process group, collectives.

``torchrun --nproc_per_node N`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in each worker; those are
torchrun's variables, read here only. The backend is gloo on CPU and nccl on CUDA. Rank 0 alone writes files.
"""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from sct_sitehead.errors import TrainingError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Context:
    """Where this process runs.

    Attributes:
        rank: global rank (0 without torchrun).
        world_size: number of processes.
        device: the torch device this process trains on.
    """

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0, the only one that writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1


def resolve_device(setting: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` (this process's local GPU) or ``"cuda:K"``.

    Raises:
        TrainingError: CUDA was asked for and is not available, or the name is unknown.
    """
    setting = str(setting or "auto").lower()
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cpu":
        return torch.device("cpu")
    if setting.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainingError(f"device {setting!r} asked for but torch sees no CUDA GPU; use device 'cpu' or 'auto'")
        index = int(setting.split(":", 1)[1]) if ":" in setting else local_rank
        return torch.device("cuda", index)
    raise TrainingError(f"unknown device {setting!r}; use 'auto', 'cpu', 'cuda' or 'cuda:K'")


def setup(device: str) -> Context:
    """Read torchrun's environment, pick the device and join (or reuse) the process group.

    Raises:
        TrainingError: inconsistent torchrun variables or a device that does not exist.
    """
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise TrainingError(f"torchrun variables RANK/WORLD_SIZE/LOCAL_RANK are not integers ({exc})") from exc
    if not 0 <= rank < world:
        raise TrainingError(f"RANK {rank} is outside WORLD_SIZE {world}; start workers with torchrun")
    resolved = resolve_device(device, local_rank)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if world == 1:
        return Context(0, 1, resolved)
    if not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        # Kept until exit: destroying and re-creating the default group on torchrun's store can race with
        # stale rendezvous keys and hang, and a process may train a backbone then a head.
        atexit.register(_destroy)
        logger.info("rank %d of %d joined the %s process group on %s", rank, world, backend, resolved)
    return Context(dist.get_rank(), dist.get_world_size(), resolved)


def _destroy() -> None:
    if dist.is_initialized():
        # Every rank leaves together: gloo aborts a process whose peer tears its connections down first.
        dist.barrier()
        dist.destroy_process_group()


def mean_over_ranks(value: float, ctx: Context) -> float:
    """The mean of a float across processes (itself without torchrun)."""
    if not ctx.distributed:
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / ctx.world_size


def gather(value: Any, ctx: Context) -> list[Any]:
    """Every rank's ``value`` (picklable builtins only), in rank order."""
    if not ctx.distributed:
        return [value]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, value)
    return out


def barrier(ctx: Context) -> None:
    """Wait for every rank (no-op without torchrun)."""
    if ctx.distributed:
        dist.barrier()
