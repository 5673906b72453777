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
  are recorded in the selection; :func:`warnings_of` words them, and the command that asked
  for the selection warns with them in its own process (units on workers never warn).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from featurekit._parallel import CacheRows, Executor, arrays
from featurekit.errors import HeadError

METRICS = ("accuracy", "balanced_accuracy")


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
    where a unit on a remote executor reads X, y itself (the cache, so that no arrays are
    shipped); units on this machine get the arrays (joblib maps large ones into memory once).
    """
    from featurekit._console import progress_bar
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
    with progress_bar(enabled=progress, unit="fit") as bar, \
            (executor or Executor(jobs)) as ex:
        task = bar.add_task(f"selecting {head} ({backend})", total=len(grid) * len(splits))
        data = rows if ex.remote and rows is not None else (X, y)
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
    return Selection(params=grid[best], method=method, metric=metric, grid=grid,
                     scores=[float(s) for s in scores], seconds=time.perf_counter() - t0,
                     edge=_on_edge(grid, best), not_converged=[grid[i] for i in failed])


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

    X, y = arrays(data)
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

    X, y = arrays(data)
    with torch_threads(cpus()):
        return create_head(head, backend, **head_params).fit_grid(X, y, grid, splits, score_fn)


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


def warnings_of(head: str, backend: str, selection: dict[str, Any],
                head_params: dict[str, Any] | None = None) -> list[str]:
    """The selection's warnings, one line each: a choice on the grid's edge, grid points whose
    solver stopped at its iteration limit. ``selection``: :meth:`Selection.to_dict`."""
    out = []
    params, grid = selection["params"], selection["grid"]
    if selection.get("edge"):
        chosen = ", ".join(f"{k}={params[k]:.3g}" for k in selection["edge"])
        ranges = ", ".join(f"{k} {min(p[k] for p in grid):.3g}..{max(p[k] for p in grid):.3g}"
                           for k in selection["edge"])
        out.append(f"{head} ({backend}): the best {chosen} is on the edge of the grid "
                   f"({ranges}); a better value may lie beyond it")
    failed = selection.get("not_converged") or []
    if failed:
        from featurekit.heads import create_head

        max_iter = getattr(create_head(head, backend, **(head_params or {})), "max_iter", "?")
        shown = ", ".join(" ".join(f"{k}={v:.3g}" for k, v in p.items()) for p in failed[:4])
        out.append(f"{head} ({backend}): {len(failed)} of {len(grid)} grid points stopped at "
                   f"max_iter={max_iter} before converging ({shown}"
                   f"{', ...' if len(failed) > 4 else ''}); their scores may be slightly off")
    return out
