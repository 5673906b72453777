"""Background stages of ``extract``: a producer thread ahead of the forward pass and a writer
thread behind it, so the device never waits on decoding or on HDF5.

Hand-written because no kept library offers it for this case: DataLoader workers cannot touch
the GPU (nvJPEG decoding and host-to-device copies must happen in the main process), and the
writer must commit batches strictly in order for ``--resume``.

Threads are enough here: the slow parts release the GIL (nvJPEG's batched decode blocks in C++
until its stream is done, CUDA event waits, HDF5 writes of large blocks).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any

_END = object()


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put unless told to stop (never blocks forever on a consumer that has gone)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


class Prefetcher:
    """Iterates ``fn(item) for item in iterator`` in a thread, up to ``depth`` results ahead,
    in order; an exception in the thread is raised in the consumer.

    On CUDA the thread issues its work on a stream of its own; :meth:`__iter__` makes the
    consumer's current stream wait for each result and marks the result's tensors as used
    there (``record_stream``), so the caching allocator never hands their memory out early.
    """

    def __init__(self, iterator: Iterator[Any], fn: Callable[[Any], Any], device: str = "cpu",
                 depth: int = 2, name: str = "featurekit-prefetch") -> None:
        import torch

        self._torch = torch
        self._it, self._fn = iterator, fn
        self._cuda = device.startswith("cuda")
        self._device = device
        self._stream = torch.cuda.Stream(device=device) if self._cuda else None
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        torch = self._torch
        try:
            ctx = torch.cuda.stream(self._stream) if self._cuda else nullcontext()
            with ctx:
                for item in self._it:
                    if self._stop.is_set():
                        return
                    result = self._fn(item)
                    event = None
                    if self._cuda:
                        event = torch.cuda.Event()
                        event.record(self._stream)
                    if not _put(self._q, (result, event), self._stop):
                        return
            _put(self._q, _END, self._stop)
        except BaseException as exc:  # handed to the consumer, raised there
            _put(self._q, _Failed(exc), self._stop)

    def __iter__(self) -> Iterator[Any]:
        torch = self._torch
        while True:
            item = self._q.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.exc
            result, event = item
            if event is not None:
                current = torch.cuda.current_stream(self._device)
                current.wait_event(event)
                for t in _tensors(result):
                    if t.is_cuda:
                        t.record_stream(current)
            yield result

    def close(self, timeout: float = 30.0) -> None:
        self._stop.set()
        while self._thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                self._q.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)
            timeout -= 0.05
            if timeout <= 0:
                break  # a daemon thread stuck in a DataLoader worker: left behind
        if not self._thread.is_alive():
            self._it = None  # the caller's reference alone now keeps a DataLoader's workers

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def background(fn: Callable[..., Any], *args: Any, **kwargs: Any):
    """``fn(*args, **kwargs)`` started now in a daemon thread (an error elsewhere never waits
    for it at exit); the returned future's ``result()`` waits and re-raises its exception."""
    from concurrent.futures import Future

    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, name="featurekit-background", daemon=True).start()
    return future


class Consumer:
    """Runs ``fn(item)`` for every item :meth:`put`, in order, in one thread; ``depth`` items
    may wait. An exception in ``fn`` stops the thread and is raised by the next :meth:`put`
    or by :meth:`join`.

    :meth:`join` waits for everything put; :meth:`close` (also on an exception in the
    producer) lets the item in progress finish and drops the rest, so whatever ``fn`` writes is
    never cut in the middle.
    """

    def __init__(self, fn: Callable[[Any], None], depth: int = 4,
                 name: str = "featurekit-writer") -> None:
        self._fn = fn
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is _END or self._stop.is_set():
                return
            try:
                self._fn(item)
            except BaseException as exc:
                self._error = exc
                self._stop.set()
                return

    def _raise(self) -> None:
        if self._error is not None:
            exc, self._error = self._error, None
            raise exc

    def put(self, item: Any) -> None:
        self._raise()
        _put(self._q, item, self._stop)  # gives up only once stopped (an error, or closed)
        self._raise()

    def join(self) -> None:
        """Wait until every item put has been handled; raise what ``fn`` raised."""
        _put(self._q, _END, self._stop)
        self._thread.join()
        self._raise()

    def close(self) -> None:
        self._stop.set()
        try:  # wake a thread waiting on an empty queue (a full one wakes it anyway)
            self._q.put_nowait(_END)
        except queue.Full:
            pass
        interrupted = None
        while self._thread.is_alive():  # a signal (Ctrl-C, torchrun's SIGTERM) during the wait
            try:  # never leaves the item in progress cut off: the file would be closed under it
                self._thread.join()
            except BaseException as exc:
                interrupted = interrupted or exc
        if interrupted is not None:
            raise interrupted

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tensors(obj: Any):
    """Every tensor inside nested tuples / lists / dicts."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)
