"""torch.distributed helpers for commands started under ``torchrun``: one GPU per rank, and
decisions made once (by rank 0) and shared, so that every rank does the same thing.

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) everything here is a no-op on one process.

Failing together: a rank that fails writes one line (its own error) and publishes the failure
in the process group's store (torchrun's rendezvous store, which outlives the workers), then
waits up to ``GRACE_SECONDS`` for the others to stop. The others look at the store at every
batch (:func:`check_peers`), at every barrier (:func:`barrier` waits on the store, never in a
collective, so a rank that finishes early can wait for the others as long as they live) and
when a collective breaks; each stops with one line ("stopped: rank 1 failed: ..."). torchrun's
SIGTERM to the survivors becomes the same line. A rank killed outright (SIGKILL, the OOM
killer) publishes nothing: torchrun stops the ranks of its node, and on other nodes a rank
waiting at a barrier stops once the dead rank's heartbeat (a thread counting in the store
every second) has not moved for ``FEATUREKIT_DIST_TIMEOUT`` seconds (default 1800, also the
process group's collective timeout).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from featurekit.errors import DeviceError, FeaturekitError

GRACE_SECONDS = 10.0  # a failing rank waits this long at most for the others to stop
CHECK_SECONDS = 0.2  # check_peers asks the store at most this often
HEARTBEAT_SECONDS = 1.0  # each rank's sign of life in the store
# keys in the store, under each run's prefix (Dist.prefix): torchrun keeps one store across
# --max-restarts attempts, and a Python caller may run several commands in one process
_FAILED, _ACKS, _BARRIER, _ALIVE = "failed", "stopped", "barrier/", "alive/"
_RUNS = [0]  # process groups this process joined (init calls): every rank counts the same


class PeerFailed(FeaturekitError):
    """Another rank failed: this one stops, in one line (the failing rank printed why)."""


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    prefix: str = "featurekit/"  # this run's keys in the store (attempt and run of the process)
    barriers: int = 0  # barriers passed, the same on every rank: each one's key in the store
    checked: float = 0.0  # when check_peers last asked the store
    stopping: bool = False  # this rank is on its way out: torchrun's SIGTERM changes nothing

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
        import datetime

        extra = {"device_id": torch.device(dev)} if on_cuda else {}
        dist.init_process_group(backend="nccl" if on_cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_seconds()), **extra)
    _RUNS[0] += 1
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    d = Dist(dist.get_rank(), dist.get_world_size(), local_rank,
             prefix=f"featurekit/{attempt}/{_RUNS[0]}/")
    _CURRENT.append(d)  # for failing_together and torchrun's SIGTERM
    _heartbeat(d)
    return d, dev


def _heartbeat(d: Dist) -> None:
    """A daemon thread that counts up this rank's ``alive/<rank>`` key in the store every
    second while the rank makes progress: what a rank waiting at a barrier watches. Progress
    is any of the process's threads at another place in its Python code than a second ago (a
    batch, a commit, a download); threads all stuck where they were for
    ``FEATUREKIT_DIST_TIMEOUT`` seconds (a hung read, a deadlock: polling loops waiting on
    them sit at the same place too), a frozen or killed process, stop the count. A failed
    store call is retried; the thread ends with the process group."""
    import sys
    import threading

    limit = timeout_seconds()

    def places() -> frozenset:
        me = threading.get_ident()
        return frozenset((t, f.f_code, f.f_lasti) for t, f in sys._current_frames().items() if t != me)

    def beat() -> None:
        import torch.distributed as dist

        where, moved = None, time.monotonic()
        while dist.is_initialized() and not stop.is_set():
            here, now = places(), time.monotonic()
            if here != where:
                where, moved = here, now
            if now - moved < limit:
                with contextlib.suppress(Exception):  # a transient store error: next second
                    _store().add(f"{d.prefix}{_ALIVE}{d.rank}", 1)
            stop.wait(HEARTBEAT_SECONDS)

    stop = threading.Event()
    thread = threading.Thread(target=beat, name="featurekit-heartbeat", daemon=True)
    if not _BEATS:
        import atexit

        atexit.register(stop_heartbeats)
    _BEATS.append((stop, thread))
    thread.start()


_BEATS: list = []  # (stop event, thread) of each heartbeat of this process


def stop_heartbeats() -> None:
    """End the heartbeat threads (at the end of a command, and at exit): a thread still in a
    store call while the interpreter and torch's C++ objects are torn down aborts the process
    ("terminate called without an active exception")."""
    for stop, _ in _BEATS:
        stop.set()
    for _, thread in _BEATS:
        thread.join(timeout=2 * HEARTBEAT_SECONDS + 1)
    _BEATS.clear()


def local_world(d: Dist) -> int:
    """Processes torchrun started on this host (LOCAL_WORLD_SIZE; 1 without torchrun): they
    share its cores (see :func:`featurekit._resources.share_cores`)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1) if d.world > 1 else 1


def _store():
    import torch.distributed as dist

    return dist.distributed_c10d._get_default_store()


def _peer_failure(d: Dist) -> str | None:
    """What another rank published about its failure, if it did."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return None
    try:
        store = _store()
        if store.check([d.prefix + _FAILED]):
            text = store.get(d.prefix + _FAILED).decode("utf-8", "replace")
            return None if text.startswith(f"rank {d.rank} ") else text
    except Exception:  # the store is gone: torchrun's agent ended the run
        return "lost contact with the other ranks (torchrun stopped the run)"
    return None


def _stop(d: Dist, failure: str) -> PeerFailed:
    """This rank stops because of another's failure: counted (the failing rank waits for
    that), and one line."""
    d.stopping = True
    with contextlib.suppress(Exception):
        _store().add(d.prefix + _ACKS, 1)
    error = PeerFailed(f"stopped: {failure}")
    error.shared = True  # type: ignore[attr-defined]
    return error


def check_peers(d: Dist, now: bool = False) -> None:
    """Stop (:class:`PeerFailed`) if another rank failed; cheap enough for every batch (asks
    the store at most every ``CHECK_SECONDS``)."""
    if d.world == 1 or (not now and time.monotonic() - d.checked < CHECK_SECONDS):
        return
    d.checked = time.monotonic()
    failure = _peer_failure(d)
    if failure:
        raise _stop(d, failure)


def _publish(d: Dist, exc: BaseException) -> None:
    """Tell the other ranks why this one fails (the first failure is kept), then give them up
    to ``GRACE_SECONDS`` to stop before this process exits (torchrun stops the others at
    once when a rank exits, before they could say anything)."""
    d.stopping = True
    if isinstance(exc, KeyboardInterrupt):
        why = "was interrupted"
    elif isinstance(exc, FeaturekitError):
        why = "failed: " + " ".join(str(exc).split())
    else:
        why = f"failed: {type(exc).__name__}: " + " ".join(str(exc).split())
    try:
        store = _store()
        store.compare_set(d.prefix + _FAILED, "", f"rank {d.rank} {why}"[:400])
        # Ctrl-C reaches every rank of a terminal's process group: nobody waits for anybody
        deadline = time.monotonic() + (0.0 if isinstance(exc, KeyboardInterrupt) else GRACE_SECONDS)
        while time.monotonic() < deadline and int(store.add(d.prefix + _ACKS, 0)) < d.world - 1:
            time.sleep(0.05)
    except Exception:
        pass


_CURRENT: list[Dist] = []  # this process's rank under torchrun, once init() joined the group


@contextlib.contextmanager
def failing_together() -> Iterator[None]:
    """Around a command: under torchrun, a failure of this rank is published (and the others
    given time to stop), and a failure caused by another rank's (a collective that broke)
    becomes that rank's line. Nothing happens on one process."""
    import signal
    import threading

    _CURRENT.clear()  # the rank this command joins as (init), if any
    installed, sigterm = False, None
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and \
            threading.current_thread() is threading.main_thread():
        sigterm, installed = signal.signal(signal.SIGTERM, _on_sigterm), True
    try:
        yield
    except BaseException as exc:
        d = _CURRENT[-1] if _CURRENT else None
        if d is None or getattr(exc, "shared", False) or isinstance(exc, SystemExit):
            raise
        if isinstance(exc, KeyboardInterrupt):  # every rank got the terminal's Ctrl-C: each
            _publish(d, exc)  # says "interrupted" (exit 130); a rank that missed it stops
            raise
        failure = _peer_failure(d)
        deadline = time.monotonic() + (2.0 if isinstance(exc, RuntimeError) else 0.0)
        while failure is None and time.monotonic() < deadline:  # a broken collective: the
            time.sleep(0.05)  # failing rank publishes before it exits
            failure = _peer_failure(d)
        if failure:
            raise _stop(d, failure) from None
        _publish(d, exc)
        raise
    finally:
        _CURRENT.clear()
        stop_heartbeats()
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if sigterm is None else sigterm)


def _on_sigterm(signum, frame) -> None:
    """torchrun sends SIGTERM to the other ranks when one exits: stop with one line (before
    this rank joined the group: SIGTERM's default, the end of the process)."""
    d = _CURRENT[-1] if _CURRENT else None
    if d is None:
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    if not d.stopping:  # already stopping: its own line is on its way
        raise _stop(d, _peer_failure(d) or "terminated (SIGTERM)")


def decide(d: Dist, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only and give every rank its result, or raise its user error on
    every rank (quietly on the others, so the line is printed once)."""
    outcome: tuple[str, Any] = ("ok", None)
    if d.main:
        try:
            outcome = ("ok", fn())
        except FeaturekitError as exc:
            outcome = ("error", (type(exc), str(exc)))
    check_peers(d, now=True)
    if d.world > 1:
        import torch.distributed as dist

        box = [outcome]
        dist.broadcast_object_list(box, src=0)
        outcome = box[0]
    if outcome[0] == "error":
        cls, message = outcome[1]
        error = cls(message)
        error.quiet = not d.main  # type: ignore[attr-defined]
        error.shared = True  # every rank raises it: nothing to publish  # type: ignore[attr-defined]
        raise error
    return outcome[1]


def all_sum(values: list[float], d: Dist, device) -> list[float]:
    if d.world == 1:
        return values
    check_peers(d, now=True)
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather(obj: Any, d: Dist) -> list[Any]:
    if d.world == 1:
        return [obj]
    check_peers(d, now=True)
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

    check_peers(d, now=True)
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def barrier(d: Dist) -> None:
    """Wait until every rank got here, on the store rather than in a collective: a rank with
    less to do waits as long as the others live (their heartbeats), and stops as soon as one
    fails, or once one has shown no sign of life for ``FEATUREKIT_DIST_TIMEOUT`` seconds
    (killed outright or frozen, e.g. on another node)."""
    if d.world == 1:
        return
    d.barriers += 1
    key = f"{d.prefix}{_BARRIER}{d.barriers}/"
    store = _store()
    store.set(f"{key}{d.rank}", "1")
    limit = timeout_seconds()
    seen: dict[int, tuple[int, float]] = {}  # rank -> (its heartbeat count, when it last moved)
    pause = 0.01
    while True:
        missing = [r for r in range(d.world) if not store.check([f"{key}{r}"])]
        if not missing:
            return
        check_peers(d, now=True)
        now = time.monotonic()
        for r in missing:
            beat = int(store.add(f"{d.prefix}{_ALIVE}{r}", 0))
            if seen.get(r, (None, 0.0))[0] != beat:
                seen[r] = (beat, now)
            elif now - seen[r][1] > limit:
                raise _stop(d, f"rank {r} showed no sign of life for {limit:.0f} s "
                               "(FEATUREKIT_DIST_TIMEOUT); it was killed, is frozen or hangs")
        time.sleep(pause)
        pause = min(0.5, pause * 1.5)


def timeout_seconds() -> float:
    """How long a rank waits on another that shows no sign of life, and the process group's
    collective timeout: ``FEATUREKIT_DIST_TIMEOUT`` seconds, default 1800."""
    try:
        value = float(os.environ.get("FEATUREKIT_DIST_TIMEOUT", "1800"))
    except ValueError:
        raise DeviceError("FEATUREKIT_DIST_TIMEOUT must be a number of seconds") from None
    if not value > 0:
        raise DeviceError("FEATUREKIT_DIST_TIMEOUT must be a positive number of seconds")
    return value
