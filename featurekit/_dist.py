"""torch.distributed helpers for commands started under ``torchrun``: one GPU per rank, and
decisions made once (by rank 0) and shared, so that every rank does the same thing.

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) everything here is a no-op on one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from featurekit.errors import DeviceError, FeaturekitError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def rank_device(device: str, local_rank: int, world: int, device_count: int) -> str:
    """The device one process works on: under torchrun each rank takes ``cuda:LOCAL_RANK``
    (one GPU per rank); a single process keeps the device it was given."""
    if world <= 1 or not device.startswith("cuda"):
        return device
    if device != "cuda":
        raise DeviceError(
            f"--device {device}: under torchrun each process takes its own GPU "
            "(cuda:LOCAL_RANK); pass --device cuda or auto"
        )
    if local_rank >= device_count:
        raise DeviceError(
            f"LOCAL_RANK {local_rank} has no GPU of its own ({device_count} visible); start at "
            f"most {device_count} processes per node (--nproc_per_node)"
        )
    return f"cuda:{local_rank}"


def init(device: str) -> tuple[Dist, str]:
    """Join the process group torchrun set up, bound to this rank's device; returns the rank
    information and the device (``device`` already resolved: cpu, cuda or cuda:N)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_cuda = device.startswith("cuda")
    dev = rank_device(device, local_rank, world, torch.cuda.device_count() if on_cuda else 0)
    if on_cuda:
        # before any collective: NCCL's all_gather_object and barrier use the current device
        torch.cuda.set_device(torch.device(dev))
    if not dist.is_initialized():
        extra = {"device_id": torch.device(dev)} if on_cuda else {}
        dist.init_process_group(backend="nccl" if on_cuda else "gloo", **extra)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank), dev


def decide(d: Dist, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only and give every rank its result, or raise its user error on
    every rank (quietly on the others, so the line is printed once)."""
    outcome: tuple[str, Any] = ("ok", None)
    if d.main:
        try:
            outcome = ("ok", fn())
        except FeaturekitError as exc:
            outcome = ("error", (type(exc), str(exc)))
    if d.world > 1:
        import torch.distributed as dist

        box = [outcome]
        dist.broadcast_object_list(box, src=0)
        outcome = box[0]
    if outcome[0] == "error":
        cls, message = outcome[1]
        error = cls(message)
        error.quiet = not d.main  # type: ignore[attr-defined]
        raise error
    return outcome[1]


def all_sum(values: list[float], d: Dist, device) -> list[float]:
    if d.world == 1:
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather(obj: Any, d: Dist) -> list[Any]:
    if d.world == 1:
        return [obj]
    import torch.distributed as dist

    gathered: list[Any] = [None] * d.world
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_buffers(module, d: Dist) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics). DDP broadcasts them at
    the start of each forward pass, so after an epoch's last step every rank holds its own:
    evaluation would mix statistics, and the ranks would end with different weights."""
    if d.world == 1:
        return
    import torch.distributed as dist

    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()
