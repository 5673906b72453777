"""Where units of work run, and how a unit gets its rows.

:class:`Executor` runs units on this machine's processes through joblib, or on a Dask cluster
through joblib's dask backend. A unit that runs elsewhere reads its rows itself
(:class:`CacheRows`: a cache path, a layer, splits), once per unit, and keeps nothing after
it returns: no module-level cache of feature matrices, so a cache replaced on disk is read
afresh by the next call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from featurekit.errors import HeadError

CONNECT_TIMEOUT = "15s"  # to a Dask scheduler


@dataclass(frozen=True)
class CacheRows:
    """The rows a unit reads itself: a cache's layer, the training split, then the selection
    split if any (the order :func:`featurekit.select.folds` numbers them in)."""

    path: str
    layer: str
    train: str
    select: str | None = None
    allow_incomplete: bool = False


def read_rows(rows: CacheRows) -> tuple[np.ndarray, np.ndarray]:
    """(X, y) of ``rows``, read now from the cache."""
    from featurekit.cache import open_cache

    with open_cache(rows.path, allow_incomplete=rows.allow_incomplete) as c:
        X, y = c.features(rows.train, rows.layer), c.labels(rows.train)
        if rows.select:
            X = np.concatenate([X, c.features(rows.select, rows.layer)])
            y = np.concatenate([y, c.labels(rows.select)])
    return X, y


def arrays(data: CacheRows | tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A unit's (X, y): given as arrays, or read from the cache."""
    return read_rows(data) if isinstance(data, CacheRows) else data


class Executor:
    """Where units of work run: this machine's processes through joblib (``jobs``; 1 runs them
    here), or a Dask cluster through joblib's dask backend (``scheduler``: its address;
    ``pip install "featurekit[dask]"``). Units come back in order."""

    def __init__(self, jobs: int | None = None, scheduler: str | None = None) -> None:
        from featurekit._resources import cpus

        if scheduler is not None and not scheduler.strip():
            raise HeadError("--dask-scheduler needs the scheduler's address, e.g. tcp://HOST:8786")
        self.jobs = jobs or cpus()
        self.scheduler = scheduler
        self.remote = scheduler is not None
        self._client = None
        self._depth = 0  # nested ``with``: the client lives until the outermost one ends

    def __enter__(self) -> Executor:
        if self.scheduler and self._client is None:
            try:
                from distributed import Client
            except ImportError:
                raise HeadError('--dask-scheduler needs Dask: pip install "featurekit[dask]"') from None
            try:
                self._client = Client(self.scheduler, timeout=CONNECT_TIMEOUT)
            except (OSError, TimeoutError, ValueError) as exc:
                raise HeadError(f"cannot reach the Dask scheduler at {self.scheduler}: "
                                f"{' '.join(str(exc).split())[:200]}") from None
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if not self._depth and self._client is not None:
            self._client.close()
            self._client = None

    def map(self, fn, arg_tuples: list[tuple]) -> Iterator[Any]:
        from joblib import Parallel, delayed, parallel_config

        calls = [delayed(fn)(*args) for args in arg_tuples]
        if self.remote:
            with parallel_config(backend="dask"):
                yield from Parallel(return_as="generator")(calls)
            return
        yield from Parallel(n_jobs=self.jobs, return_as="generator")(calls)
