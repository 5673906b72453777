"""Choosing C (and gamma): the linear-evaluation protocol, the same for ``fit`` and ``bench``
and on every backend.

* The grid is the registry's (:func:`featurekit.heads.grid`) unless C (and gamma) are given.
* With a held-out selection split (``val``, neither the training nor the reported split), each
  grid point is fitted on the training rows and scored on ``val``. Without one, a seeded,
  stratified 20% of the training rows is held out for the selection (Kornblith et al. 2019,
  "Do better ImageNet models transfer better?", as ssl-transfer's linear evaluation does; the
  chosen point is then refit on all of train). ``cv=K`` asks for stratified K-fold
  cross-validation instead, over train (and val, when there is one): for small caches.
* When the best point lies on the grid's edge, the grid is extended past it, a decade per step,
  at most three steps, every backend alike (``extend``); the added points are recorded.
* The score is ``accuracy`` or ``balanced_accuracy``; the best grid point wins, ties going to
  the earlier one: the smaller C (stronger regularisation), then the smaller gamma (k-NN: the
  smaller T, then the smaller k).
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
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np

from featurekit._parallel import CacheRows, Executor, arrays
from featurekit.errors import HeadError

METRICS = ("accuracy", "balanced_accuracy")
HOLDOUT = 0.2  # share of train held out where a cache has no val split (Kornblith et al. 2019)
EXTEND_STEPS = 3  # decades the grid may grow past an edge


@dataclass
class Selection:
    params: dict[str, Any]
    method: str  # "given" | "val" | "holdout" | "<k>-fold cv"
    metric: str
    grid: list[dict[str, Any]]  # every point scored (an extension's included), C then gamma ascending
    scores: list[float] = field(default_factory=list)  # per grid point, mean over folds
    seconds: float = 0.0
    edge: list[str] = field(default_factory=list)  # parameters chosen on the (final) grid's edge
    not_converged: list[dict[str, Any]] = field(default_factory=list)
    fraction: float | None = None  # "holdout": the share of train held out
    seed: int | None = None  # the seed of the hold-out or the folds
    extended: list[dict[str, Any]] = field(default_factory=list)  # points added past an edge

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe(selection: dict[str, Any]) -> str:
    """How a point was chosen, for people: "val", "20% of train held out (seed 0)", ..."""
    method = selection.get("method")
    if method == "holdout":
        return f"{selection['fraction']:.0%} of train held out (seed {selection['seed']})"
    if method and method.endswith("cv"):
        return f"{method} (seed {selection.get('seed')})"
    return str(method)


def params_text(params: dict[str, Any]) -> str:
    """A grid point for tables: ``C=3.162 gamma=0.001953``, ``T=0.07 k=20``."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def metric_function(name: str):
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    if name not in METRICS:
        raise HeadError(f"unknown --select-metric {name!r}; valid: {', '.join(METRICS)}")
    return accuracy_score if name == "accuracy" else balanced_accuracy_score


def folds(y, n_select: int, seed: int, cv: int | None = None
          ) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
    """(rows fitted, rows scored) of each fold over ``y`` (the training labels, then
    ``n_select`` selection labels appended), and the method's name: the selection split
    ("val"), else a stratified ``HOLDOUT`` of the rows ("holdout"), or with ``cv`` stratified
    K-fold over all the rows ("<K>-fold cv")."""
    from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit

    n = len(y) - n_select
    if n_select and cv is None:
        return [(np.arange(n), np.arange(n, n + n_select))], "val"
    smallest = int(np.bincount(np.searchsorted(np.unique(y), y)).min())
    if smallest < 2:
        raise HeadError(
            "cannot choose C: a class has a single row to select on; give --C (and --gamma), "
            "or re-extract with --val-fraction > 0"
        )
    classes = len(np.unique(y))
    if cv is None and min(int(np.ceil(HOLDOUT * len(y))), int(len(y) * (1 - HOLDOUT))) >= classes:
        split = StratifiedShuffleSplit(n_splits=1, test_size=HOLDOUT, random_state=seed)
        return [next(split.split(np.zeros(len(y)), y))], "holdout"
    # too few rows for a fifth to hold every class: cross-validation (5 folds, or as many as
    # the smallest class allows)
    k = int(min(cv or 5, smallest))
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(tr, te) for tr, te in splitter.split(np.zeros(len(y)), y)], f"{k}-fold cv"


def select(head: str, backend: str, grid: list[dict[str, Any]], X, y, X_sel=None, y_sel=None, *,
           seed: int = 0, metric: str = "accuracy", jobs: int | None = None,
           progress: bool = False, batched: bool = True,
           head_params: dict[str, Any] | None = None, executor: Executor | None = None,
           rows: CacheRows | None = None, cv: int | None = None, extend: bool = True,
           tracker=None) -> Selection:
    """Choose a grid point of ``head`` on ``backend``; never sees the reported split.

    ``executor``: where the units run (default: this machine, ``jobs`` processes); ``rows``:
    where a unit on a remote executor reads X, y itself (the cache, so that no arrays are
    shipped); units on this machine get the arrays (joblib maps large ones into memory once).
    ``tracker``: told of the fits to do and done (``grow(k)``, ``advance(k)``), instead of a
    progress bar of its own.
    """
    metric_function(metric)  # an unknown metric is refused even with a single point
    if len(grid) == 1:
        return Selection(params=grid[0], method="given", metric=metric, grid=grid)
    if X_sel is not None:
        X, y = np.concatenate([X, X_sel]), np.concatenate([y, y_sel])
    splits, method = folds(y, 0 if X_sel is None else len(y_sel), seed, cv)
    chosen = choose(head, backend, grid, X, y, splits, metric=metric, jobs=jobs,
                    progress=progress, batched=batched, head_params=head_params,
                    executor=executor, rows=rows, extend=extend, tracker=tracker)
    chosen.method = method
    chosen.fraction = HOLDOUT if method == "holdout" else None
    chosen.seed = seed if method != "val" else None
    return chosen


def choose(head: str, backend: str, grid: list[dict[str, Any]], X, y, splits, *,
           metric: str = "accuracy", jobs: int | None = None, progress: bool = False,
           batched: bool = True, head_params: dict[str, Any] | None = None,
           executor: Executor | None = None, rows: CacheRows | None = None,
           extend: bool = True, tracker=None, method: str = "given splits",
           together: bool = False) -> Selection:
    """The best grid point over given ``splits`` ([(rows fitted, rows scored)] of X, y): every
    point scored on every split, the grid extended past an edge (``extend``), the mean score
    deciding (ties: the earlier point). :func:`select` makes the protocol's splits; a caller
    with splits of its own (few-shot draws) comes here directly. ``together``: splits of equal
    size solved in one batch by a head that can (``fits_together``)."""
    from featurekit.heads import batched as batched_of
    from featurekit.heads import create_head

    score_fn = metric_function(metric)
    proto = create_head(head, backend, **(head_params or {}))  # imports the backend: not timed
    t0 = time.perf_counter()
    job = _Job(head, backend, head_params or {}, X, y, rows, splits, score_fn,
               batched_of(proto) if batched else None,
               together and getattr(proto, "fits_together", False))
    with _tracking(tracker, progress, f"selecting {head} ({backend})") as track, \
            (executor or Executor(jobs)) as ex:
        grid = sorted(grid, key=_order)
        table, failed = job.score(grid, ex, track)
        grid, table, failed, extended = _extend(job, grid, table, failed, ex, track,
                                                EXTEND_STEPS if extend else 0, _extends(head))
    scores = table.mean(axis=1)
    best = int(np.argmax(scores))  # the first maximum: grids ascend in C, then gamma
    return Selection(params=grid[best], method=method, metric=metric, grid=grid,
                     scores=[float(s) for s in scores], seconds=time.perf_counter() - t0,
                     edge=_on_edge(grid, best, scores), not_converged=failed, extended=extended)


ORDER = ("C", "gamma", "T", "k")  # how grid points sort, and so which of tied points wins


def _order(point: dict[str, Any]) -> tuple:
    return tuple(point.get(key) or 0.0 for key in ORDER)


@dataclass
class _Job:
    """One selection's fixed parts: what to fit, on which rows, how to score."""

    head: str
    backend: str
    head_params: dict[str, Any]
    X: Any
    y: Any
    rows: CacheRows | None
    splits: list
    score_fn: Any
    fit_grid: Any  # the head's own whole-selection method, or None: point by point
    together: bool = False  # every split in one batch (fit_grid(together=True))

    def score(self, points: list[dict[str, Any]], ex: Executor, track
              ) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """(scores (points, folds), the points that did not converge on some fold)."""
        track.grow(len(points) * len(self.splits))
        data = self.rows if ex.remote and self.rows is not None else (self.X, self.y)
        if self.fit_grid is not None and not ex.remote:  # the whole selection here (GPU or cores)
            extra = {"together": True} if self.together else {}
            table, failed = self.fit_grid(self.X, self.y, points, self.splits, self.score_fn,
                                          on_stop=track.advance, **extra)
        elif self.fit_grid is not None:  # one unit on a worker
            (table, failed), = ex.map(_grid_unit, [(self.head, self.backend, self.head_params,
                                                   points, data, self.splits, self.score_fn)])
            track.advance(len(points) * len(self.splits))
        else:
            table, failed = _point_by_point(self.head, self.backend, points, data, self.splits,
                                            self.score_fn, self.head_params, ex,
                                            lambda: track.advance(1))
        return table, [points[i] for i in failed]


def _extends(head: str) -> tuple[str, ...]:
    from featurekit.heads import EXTENDS

    return EXTENDS.get(head, ("C",))


def _extend(job: _Job, grid, table, failed, ex, track, steps: int, keys: tuple[str, ...]):
    """While the best point is on the grid's edge in one of ``keys`` (at most ``steps`` times):
    score the next decade past it, for every value of the other parameters; (grid, table,
    failed, added)."""
    added: list[dict[str, Any]] = []
    for _ in range(steps):
        scores = table.mean(axis=1)
        new = _beyond(grid, int(np.argmax(scores)), keys, scores)
        if not new:
            break
        more, more_failed = job.score(new, ex, track)
        order = sorted(range(len(grid) + len(new)), key=lambda i: _order((grid + new)[i]))
        grid = [(grid + new)[i] for i in order]
        table = np.concatenate([table, more])[order]
        failed, added = failed + more_failed, added + new
    return grid, table, sorted(failed, key=_order), added


def _beyond(grid: list[dict[str, Any]], best: int, keys: tuple[str, ...], scores=None
            ) -> list[dict[str, Any]]:
    """The points a decade past the best one's value of each parameter (of ``keys``) on the
    grid's edge."""
    new: list[dict[str, Any]] = []
    for key in (k for k in _on_edge(grid, best, scores) if k in keys):
        values = sorted({p[key] for p in grid})
        value = grid[best][key]
        step = 10.0 if value == values[-1] else 0.1
        others = {tuple((k, v) for k, v in p.items() if k != key) for p in grid}
        beyond = max(1, int(round(value * step))) if isinstance(value, (int, np.integer)) else value * step
        new += [{k: beyond if k == key else dict(o)[k] for k in grid[best]} for o in others]
    unique = {tuple(sorted(p.items())): p for p in new}
    return sorted(unique.values(), key=_order)


class BarTracker:
    """A tracker that counts into a rich progress bar (or nothing)."""

    def __init__(self, bar, task) -> None:
        self.bar, self.task, self.total = bar, task, 0

    def grow(self, k: int) -> None:
        self.total += k
        self.bar.update(self.task, total=self.total)

    def advance(self, k: int) -> None:
        self.bar.advance(self.task, k)


@contextmanager
def _tracking(tracker, progress: bool, what: str) -> Iterator[Any]:
    if tracker is not None:
        yield tracker
        return
    from featurekit._console import progress_bar

    with progress_bar(enabled=progress, unit="fit") as bar:
        yield BarTracker(bar, bar.add_task(what, total=0))


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


def _on_edge(grid: list[dict[str, Any]], best: int, scores=None) -> list[str]:
    """The parameters whose chosen value is the first or last of the grid's. Not an edge: a
    value that bounds the parameter itself (k = 1: nothing lies beyond it), or, given the
    ``scores``, a parameter that changed nothing (every value of it, the others as chosen,
    scored the same: T where k = 1)."""
    from featurekit.heads import BOUNDS

    edge = []
    for key in grid[best]:
        values = sorted({p[key] for p in grid})
        if grid[best][key] == BOUNDS.get(key):
            continue
        line = [s for p, s in zip(grid, scores if scores is not None else [])
                if all(p[o] == grid[best][o] for o in p if o != key)]
        if len(line) > 1 and max(line) == min(line):
            continue
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
