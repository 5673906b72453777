"""Choosing C (and gamma): the linear-evaluation protocol, the same for ``fit`` and ``bench``
and on every backend.

* The grid is the registry's (:func:`featurekit.heads.grid`) unless C (and gamma) are given.
* With a held-out selection split (``val``, neither the training nor the reported split), each
  grid point is fitted on the training rows and scored on ``val``; otherwise by stratified
  k-fold cross-validation on the training rows (k = 5, fewer when a class has fewer rows).
* The score is ``accuracy`` or ``balanced_accuracy``; the best grid point wins, ties going to
  the earlier one: the smaller C (stronger regularisation), then the smaller gamma.
* A head with a ``fit_grid`` (featurekit's torch heads) runs the whole selection itself, in
  this process (batched on a GPU); any other head is fitted point by point, the (point, fold)
  fits spread over ``jobs`` processes through joblib. Each such fit is pinned to one
  BLAS/OpenMP thread, so the result never depends on ``jobs``.
* A choice on the grid's edge, and grid points whose solver stopped at its iteration limit,
  are reported (one warning line each, and in the report).
"""

from __future__ import annotations

import functools
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np

from featurekit.errors import HeadError

METRICS = ("accuracy", "balanced_accuracy")
CONNECT_TIMEOUT = "15s"  # to a Dask scheduler


@dataclass
class Selection:
    params: dict[str, Any]
    method: str  # "given" | "val" | "<k>-fold cv"
    metric: str
    grid: list[dict[str, Any]]
    scores: list[float] = field(default_factory=list)  # per grid point, mean over folds
    seconds: float = 0.0
    edge: list[str] = field(default_factory=list)  # parameters chosen on the grid's edge
    not_converged: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def metric_function(name: str):
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    if name not in METRICS:
        raise HeadError(f"unknown --select-metric {name!r}; valid: {', '.join(METRICS)}")
    return accuracy_score if name == "accuracy" else balanced_accuracy_score


def default_jobs() -> int:
    """Processes for point-by-point fits: every core (featurekit's torch heads run their whole
    selection in the main process instead, on the GPU or on every core)."""
    from featurekit._resources import cpus

    return cpus()


def folds(y, n_select: int, seed: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
    """(train rows, held-out rows) of each fold over ``y`` (the training labels, then
    ``n_select`` selection labels appended), and the method's name."""
    n = len(y) - n_select
    if n_select:
        return [(np.arange(n), np.arange(n, n + n_select))], "val"
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(np.searchsorted(np.unique(y), y))
    k = int(min(5, counts.min()))
    if k < 2:
        raise HeadError(
            "cannot choose C: no val split and a class has a single training row; give --C "
            "(and --gamma), or re-extract with --val-fraction > 0"
        )
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(tr, te) for tr, te in cv.split(np.zeros(n), y)], f"{k}-fold cv"


def select(head: str, backend: str, grid: list[dict[str, Any]], X, y, X_sel=None, y_sel=None, *,
           seed: int = 0, metric: str = "accuracy", jobs: int | None = None,
           progress: bool = False, batched: bool = True,
           head_params: dict[str, Any] | None = None, executor: Executor | None = None,
           rows: CacheRows | None = None) -> Selection:
    """Choose a grid point of ``head`` on ``backend``; never sees the reported split.

    ``executor``: where the units run (default: this machine, ``jobs`` processes); ``rows``:
    where a unit reads X, y itself (the cache, so that remote workers need no arrays shipped).
    """
    from featurekit._progress import progress_bar
    from featurekit.heads import batched as batched_of
    from featurekit.heads import create_head

    score_fn = metric_function(metric)
    if len(grid) == 1:
        return Selection(params=grid[0], method="given", metric=metric, grid=grid)
    proto = create_head(head, backend, **(head_params or {}))  # imports the backend: not timed
    fit_grid = batched_of(proto) if batched else None
    t0 = time.perf_counter()
    if X_sel is not None:
        X, y = np.concatenate([X, X_sel]), np.concatenate([y, y_sel])
    splits, method = folds(y, 0 if X_sel is None else len(y_sel), seed)
    data = rows if rows is not None else (X, y)
    with progress_bar(enabled=progress, unit="fit") as bar, \
            (executor or Executor(jobs)) as ex:
        task = bar.add_task(f"selecting {head} ({backend})", total=len(grid) * len(splits))
        if fit_grid is not None and not ex.remote:  # the whole selection here (GPU or cores)
            table, failed = fit_grid(X, y, grid, splits, score_fn,
                                     on_stop=lambda k: bar.advance(task, k))
        elif fit_grid is not None:  # one unit on a worker
            (table, failed), = ex.map(_grid_unit, [(head, backend, head_params or {}, grid, data,
                                                   splits, score_fn)])
            bar.advance(task, len(grid) * len(splits))
        else:
            table, failed = _point_by_point(head, backend, grid, data, splits, score_fn,
                                            head_params or {}, ex, lambda: bar.advance(task, 1))
    scores = table.mean(axis=1)
    best = int(np.argmax(scores))  # the first maximum: grids ascend in C, then gamma
    sel = Selection(params=grid[best], method=method, metric=metric, grid=grid,
                    scores=[float(s) for s in scores], seconds=time.perf_counter() - t0,
                    edge=_on_edge(grid, best), not_converged=[grid[i] for i in failed])
    _warn(head, backend, sel, proto)
    return sel


def _point_by_point(head, backend, grid, data, splits, score_fn, head_params, ex, tick):
    """Every (grid point, fold) fit as a unit; (scores (G, F), grid points that did not
    converge)."""
    units = [(g, f) for g in range(len(grid)) for f in range(len(splits))]
    table = np.empty((len(grid), len(splits)))
    failed: set[int] = set()
    results = ex.map(_point_unit, [(head, backend, {**head_params, **grid[g]}, data, *splits[f],
                                    score_fn) for g, f in units])
    for (g, f), (score, converged) in zip(units, results):
        table[g, f] = score
        if not converged:
            failed.add(g)
        tick()
    return table, sorted(failed)


def _point_unit(head, backend, params, data, train, held, score_fn) -> tuple[float, bool]:
    """One grid point on one fold: (score on the held-out rows, converged). Pinned to one
    BLAS/OpenMP thread, here or in any worker, so the result does not depend on where it ran."""
    from threadpoolctl import threadpool_limits

    from featurekit.heads import create_head

    X, y = _arrays(data)
    est = create_head(head, backend, **params)
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reported once, by the caller, not per fit
        est.fit(X[train], y[train])
        pred = est.predict(X[held])
    return float(score_fn(y[held], pred)), converged(est)


def _grid_unit(head, backend, head_params, grid, data, splits, score_fn):
    """A whole fit_grid selection on a worker, with torch's threads a fresh process on that
    machine would have (Dask starts workers with one): the same numbers as in the caller."""
    from featurekit.heads import create_head

    from featurekit._resources import cpus, torch_threads

    X, y = _arrays(data)
    with torch_threads(cpus()):
        return create_head(head, backend, **head_params).fit_grid(X, y, grid, splits, score_fn)


# --------------------------------------------------------------------------- where units run


@dataclass(frozen=True)
class CacheRows:
    """The rows a unit reads itself: a cache's layer, the training split, then the selection
    split if any (the order :func:`folds` numbers them in). Each process reads them once."""

    path: str
    layer: str
    train: str
    select: str | None = None
    allow_incomplete: bool = False


@functools.lru_cache(maxsize=4)
def _read_rows(rows: CacheRows):
    from featurekit.cache import open_cache

    with open_cache(rows.path, allow_incomplete=rows.allow_incomplete) as c:
        X, y = c.features(rows.train, rows.layer), c.labels(rows.train)
        if rows.select:
            X = np.concatenate([X, c.features(rows.select, rows.layer)])
            y = np.concatenate([y, c.labels(rows.select)])
    return X, y


def _arrays(data):
    return _read_rows(data) if isinstance(data, CacheRows) else data


class Executor:
    """Where units of work run: this machine's processes through joblib (``jobs``; 1 runs them
    here), or a Dask cluster through joblib's dask backend (``scheduler``: its address;
    ``pip install "featurekit[dask]"``). Units come back in order."""

    def __init__(self, jobs: int | None = None, scheduler: str | None = None) -> None:
        if scheduler is not None and not scheduler.strip():
            raise HeadError("--dask-scheduler needs the scheduler's address, e.g. tcp://HOST:8786")
        self.jobs = jobs or default_jobs()
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


def converged(est) -> bool:
    """Whether a fitted head's solver stopped before its iteration limit."""
    if hasattr(est, "converged_"):
        return bool(est.converged_)
    n_iter, max_iter = getattr(est, "n_iter_", None), getattr(est, "max_iter", None)
    if n_iter is None or max_iter is None or max_iter < 0:
        return True
    return bool(np.max(n_iter) < max_iter)


def _on_edge(grid: list[dict[str, Any]], best: int) -> list[str]:
    edge = []
    for key in grid[best]:
        values = sorted({p[key] for p in grid})
        if len(values) > 1 and grid[best][key] in (values[0], values[-1]):
            edge.append(key)
    return edge


def _warn(head: str, backend: str, sel: Selection, proto) -> None:
    if sel.edge:
        chosen = ", ".join(f"{k}={sel.params[k]:.3g}" for k in sel.edge)
        ranges = ", ".join(f"{k} {min(p[k] for p in sel.grid):.3g}..{max(p[k] for p in sel.grid):.3g}"
                           for k in sel.edge)
        warnings.warn(f"{head} ({backend}): the best {chosen} is on the edge of the grid "
                      f"({ranges}); a better value may lie beyond it", stacklevel=3)
    if sel.not_converged:
        shown = ", ".join(" ".join(f"{k}={v:.3g}" for k, v in p.items()) for p in sel.not_converged[:4])
        warnings.warn(
            f"{head} ({backend}): {len(sel.not_converged)} of {len(sel.grid)} grid points stopped "
            f"at max_iter={getattr(proto, 'max_iter', '?')} before converging ({shown}"
            f"{', ...' if len(sel.not_converged) > 4 else ''}); their scores may be slightly off",
            stacklevel=3)
