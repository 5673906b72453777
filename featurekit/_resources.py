"""Up-front memory checks: refuse a batch that cannot fit before any image is read.

The estimates are *lower bounds* (memory the pass needs at the very least), so a run that would
fit is never refused; what slips past them (a worker killed, CUDA out of memory) is turned into
one line by :func:`featurekit.errors.from_runtime`.
"""

from __future__ import annotations

import os
from pathlib import Path

from featurekit.errors import ResourceError

GiB = 1 << 30


def available_bytes(device: str) -> int | None:
    """Free memory for tensors on ``device`` (host: MemAvailable, capped by the cgroup limit);
    None when it cannot be known."""
    if device.startswith("cuda"):
        import torch

        try:
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except Exception:  # no driver details: do not guess
            return None
    return _host_available()


def _host_available() -> int | None:
    found = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:  # a container's own limit (cgroup v2) can be far below the machine's memory
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            room = int(limit) - used
            found = room if found is None else min(found, room)
    except (OSError, ValueError):
        pass
    return found


def stem_bytes(image_size: int, half: bool) -> int:
    """Per image, the least a ResNet forward pass holds at once: the stem's BatchNorm reads the
    64-channel stride-2 convolution output and writes one of the same size (every torchvision
    ResNet-family model has this stem)."""
    side = (image_size + 1) // 2
    return 2 * 64 * side * side * (2 if half else 4)


def input_bytes(image_size: int) -> int:
    """One preprocessed image: float32, 3 x N x N."""
    return 3 * image_size * image_size * 4


def check_batch_fits(
    *, image_size: int, batch_size: int, device: str, half: bool = False, workers: int = 0,
    per_image_extra: int = 0, what: str = "the forward pass", decoded_on_host: bool = True,
) -> None:
    """Refuse, with one line, a batch whose lower-bound footprint exceeds the free memory.

    On CUDA the activations go to the GPU and the decoded batches in flight to the host; on the
    CPU both go to the host. ``per_image_extra``: more bytes per image the caller knows it
    keeps (training keeps every activation for the backward pass). ``decoded_on_host=False``:
    workers hand over compressed bytes only (the device decode path), whose size is unknown.
    """
    per_image = stem_bytes(image_size, half) + input_bytes(image_size) + per_image_extra
    # DataLoader prefetch: 2 batches per worker, plus the one being handed over
    in_flight = (2 * workers + 1) * input_bytes(image_size) if decoded_on_host else 0
    on_cuda = device.startswith("cuda")
    if on_cuda:
        needs = {device: batch_size * per_image, "cpu": batch_size * in_flight}
    else:
        needs = {"cpu": batch_size * (per_image + in_flight)}
    for where, need in needs.items():
        free = available_bytes(where)
        if free is None or need <= free:
            continue
        per = need // batch_size
        fits = max(0, free // per) if per else 0
        hint = f"--batch-size {fits} or less" if fits else "a smaller --image-size"
        raise ResourceError(
            f"--image-size {image_size} with --batch-size {batch_size} needs at least "
            f"{need / GiB:.1f} GiB on {where} for {what}, but {free / GiB:.1f} GiB are free; "
            f"use {hint}"
        )


def default_workers(device: str) -> int:
    """Decoding workers: one per core on a GPU machine (cap 16); on the CPU the forward pass
    already uses every core, so one worker overlaps decoding with compute."""
    n = cpus()
    if device.startswith("cuda"):
        return max(1, min(16, n))
    return 1 if n > 1 else 0


def share_cores(device: str, local_ranks: int) -> int:
    """Decoding workers, and on the CPU torch threads, for one of ``local_ranks`` processes
    torchrun started on this host (LOCAL_WORLD_SIZE): the host's cores shared among them."""
    if local_ranks > 1 and not device.startswith("cuda"):
        import torch

        torch.set_num_threads(max(1, cpus() // local_ranks))
    workers = default_workers(device)
    return max(min(workers, 1), workers // max(1, local_ranks))


def cpus() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class torch_threads:
    """torch's intra-op threads set for a block, then restored (None, or torch not loaded:
    nothing changes)."""

    def __init__(self, n: int | None) -> None:
        self.n = n

    def __enter__(self) -> None:
        import sys

        self.torch = sys.modules.get("torch") if self.n is not None else None
        if self.torch is not None:
            self.before = self.torch.get_num_threads()
            self.torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        if self.torch is not None:
            self.torch.set_num_threads(self.before)
