"""``featurekit fit`` and ``predict``: selection (:mod:`featurekit.select`), the refit,
evaluation; head files are :mod:`featurekit.headfile`'s.

After the selection the chosen grid point is refit: on train and val together when val chose
it (the default; ``refit=False`` keeps train only), on all of train after cross-validation.
The saved head is that refit one, the reported metrics are its own, and ``n_train`` counts the
rows that trained it. The reported split (``test`` by default, else ``val``) never influences
anything before that.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featurekit._console import SelectionWarning, warn
from featurekit._outputs import check_output, write_csv
from featurekit.errors import CacheError, HeadError
from featurekit.headfile import (
    check_head_output,
    check_provenance,
    load_head,
    provenance_of,
    save_head,
    soft_differences,
)

PREDICTION_COLUMNS = ["path", "label", "prediction", "score"]


@dataclass
class FitResult:
    """A fitted head, its report (JSON-ready: the ``--json`` output of ``fit``) and the
    provenance of its features; ``out``: the head file, when one was written."""

    head: Any
    report: dict[str, Any]
    provenance: dict[str, Any] = field(default_factory=dict)
    out: str | None = None


@dataclass
class _Request:
    """What a fit or a bench reads from a cache: the layer and splits resolved and checked."""

    layer: str
    train: str
    evaluate: str
    select: str | None
    n_classes: int
    seed: int


def check_request(head: str, backend: str, metric: str, C: float | None = None,
                  gamma: float | None = None, cv: int | None = None, k: int | None = None,
                  T: float | None = None) -> None:
    """What ``fit`` and ``bench`` check before reading any cache: a known head and backend
    name, a known metric, C, gamma, k, T and the folds in range, each only for a head that has
    that parameter."""
    from featurekit.heads import check_names, parameters
    from featurekit.options import CV, NEIGHBOURS, POSITIVE
    from featurekit.select import metric_function

    check_names(head, backend)
    for name, value in (("--C", C), ("--gamma", gamma), ("--T", T)):
        POSITIVE.check(name, value)
    NEIGHBOURS.check("--k", k)
    CV.check("--cv", cv)
    for name, value in (("C", C), ("gamma", gamma), ("k", k), ("T", T)):
        if value is not None and name not in parameters(head):
            raise HeadError(f"--{name} does not apply to the {head} head (its parameters: "
                            f"{', '.join(parameters(head))})")
    metric_function(metric)


def read_request(cache, layer: str | None, train_split: str, eval_split: str | None) -> _Request:
    """The layer (default: penultimate, else the first cached one) and splits of a fit."""
    layer = layer or ("penultimate" if "penultimate" in cache.layers else cache.layers[0])
    cache.dim(layer)  # validates the name
    train, evaluate, select = choose_splits(cache, train_split, eval_split)
    return _Request(layer, train, evaluate, select, len(cache.classes),
                    int(cache.attrs.get("seed", 0)))


def choose_splits(cache, train_split: str, eval_split: str | None) -> tuple[str, str, str | None]:
    """(train, eval, selection split or None for CV); refuses to report on the training split."""
    splits = cache.splits
    if train_split not in splits:
        raise CacheError(f"{cache.path} has no split {train_split!r}; splits: {', '.join(splits)}")
    if eval_split is None:
        held = [s for s in ("test", "val") if s in splits and s != train_split]
        if not held:
            raise HeadError(
                f"{cache.path} has no held-out split (only {', '.join(splits)}); re-extract with "
                "--test-fraction > 0, or name one with --eval-split"
            )
        eval_split = held[0]
    elif eval_split not in splits:
        raise CacheError(f"{cache.path} has no split {eval_split!r}; splits: {', '.join(splits)}")
    if eval_split == train_split:
        raise HeadError(f"--eval-split {eval_split} is the training split; pick another")
    select = "val" if "val" in splits and "val" not in (train_split, eval_split) else None
    return train_split, eval_split, select


def timed_fit(est: Any, X, y) -> float:
    """Fit ``est`` in place; the seconds it took. A solver that stops at its iteration limit
    is reported once by the caller (``converged`` in the report), not by scikit-learn's
    warning per fit."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(X, y)
    return time.perf_counter() - t0


def timed_predict(est: Any, X) -> tuple[np.ndarray, float]:
    """Predictions of ``est`` on ``X`` and the seconds they took."""
    t0 = time.perf_counter()
    pred = est.predict(X)
    return pred, time.perf_counter() - t0


def metrics(y_true: np.ndarray, y_pred: np.ndarray, scores: np.ndarray | None, n_classes: int,
            head_classes: np.ndarray | None = None) -> dict[str, Any]:
    """Unrounded fractions; ``scores`` columns follow ``head_classes`` (indices into classes)."""
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        top_k_accuracy_score,
    )

    labels = np.arange(n_classes)
    out: dict[str, Any] = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "accuracy_ci95": wilson(int(np.sum(y_true == y_pred)), len(y_true)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
    }
    if n_classes > 5 and scores is not None and scores.ndim == 2:
        full = np.full((len(y_true), n_classes), -np.inf)
        cols = head_classes if head_classes is not None else labels
        full[:, np.asarray(cols, dtype=int)] = scores
        full[np.isneginf(full)] = np.finfo(np.float64).min / 2  # classes unseen in training
        out["top5_accuracy"] = float(top_k_accuracy_score(y_true, full, k=5, labels=labels))
    out["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    return out


def wilson(k: int, n: int, z: float = 1.959964) -> list[float]:
    """The 95% Wilson score interval of a proportion k / n (Wilson 1927): [low, high]."""
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * float(np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)))
    return [0.0 if k == 0 else centre - half, 1.0 if k == n else centre + half]


def fit_on_arrays(
    head: str, backend: str, X, y, X_eval, y_eval, n_classes: int, *, X_sel=None, y_sel=None,
    C: float | None = None, gamma: float | None = None, k: int | None = None,
    T: float | None = None, seed: int = 0, metric: str = "accuracy", refit: bool = True,
    jobs: int | None = None,
    progress: bool = False, head_params: dict[str, Any] | None = None,
    executor=None, rows=None, cv: int | None = None, extend: bool = True, tracker=None,
) -> tuple[Any, dict[str, Any]]:
    """Select, refit, evaluate one head on arrays; the common core of ``fit`` and ``bench``.
    ``executor``/``rows``: where the selection's units run and read their rows;
    ``cv``/``extend``/``tracker``: as :func:`featurekit.select.select`. The chosen point is
    refit on all of train, and val too (``refit``) when the cache has one."""
    from featurekit import heads, select

    grid = heads.grid(head, X.shape[1], C, gamma, k, T)
    chosen = select.select(head, backend, grid, X, y, X_sel, y_sel, seed=seed, metric=metric,
                           jobs=jobs, progress=progress, head_params=head_params,
                           executor=executor, rows=rows, cv=cv, extend=extend, tracker=tracker)
    with_val = refit and X_sel is not None
    if with_val:  # val took part in the selection: train on train and val
        X, y = np.concatenate([X, X_sel]), np.concatenate([y, y_sel])
    est = heads.create_head(head, backend, **{**(head_params or {}), **chosen.params})
    fit_seconds = timed_fit(est, X, y)
    pred, predict_seconds = timed_predict(est, X_eval)
    scores = est.decision_function(X_eval)
    report = {
        "head": head,
        "backend": backend,
        "params": chosen.params,
        "selection": {**chosen.to_dict(), "refit": "train+val" if with_val else "train"},
        "selection_seconds": chosen.seconds,
        **metrics(y_eval, pred, scores, n_classes, est.classes_),
        "fit_seconds": fit_seconds,
        "total_seconds": chosen.seconds + fit_seconds,  # the head's whole cost: selection + refit
        "predict_seconds": predict_seconds,
        "converged": select.converged(est),
        "n_train": int(len(y)),
        "n_eval": int(len(y_eval)),
    }
    return est, report


def fit_head(
    cache_path: str | Path,
    head: str,
    *,
    out: str | Path | None = None,
    overwrite: bool = False,
    backend: str = "sklearn",
    layer: str | None = None,
    C: float | None = None,
    gamma: float | None = None,
    k: int | None = None,
    T: float | None = None,
    train_split: str = "train",
    eval_split: str | None = None,
    allow_incomplete: bool = False,
    metric: str = "accuracy",
    refit: bool = True,
    jobs: int | None = None,
    progress: bool = False,
    head_params: dict[str, Any] | None = None,
    scheduler: str | None = None,
    cv: int | None = None,
    extend: bool = True,
) -> FitResult:
    """Fit one head on a cache layer with the selection protocol (module docstring), and save
    it to ``out`` when given (an existing file only with ``overwrite``; checked before any
    work). ``scheduler``: a Dask scheduler's address to run the selection's units on (each
    reads the cache itself, so workers need to see ``cache_path``); ``cv``: K-fold
    cross-validation instead of val or the 20% hold-out; ``extend``: grow the grid past an
    edge. A choice still on the grid's edge or grid points that did not converge are warned
    about (:class:`SelectionWarning`)."""
    from featurekit._parallel import CacheRows, Executor
    from featurekit.cache import open_cache
    from featurekit.heads import resolve_backend

    check_request(head, backend, metric, C, gamma, cv, k, T)
    backend = resolve_backend(backend, head)
    if out is not None:
        check_output(out, overwrite, example="head.skops")
        check_head_output(out, backend)
    with open_cache(cache_path, allow_incomplete=allow_incomplete) as cache:
        req = read_request(cache, layer, train_split, eval_split)
        X, y = cache.features(req.train, req.layer), cache.labels(req.train)
        X_eval, y_eval = cache.features(req.evaluate, req.layer), cache.labels(req.evaluate)
        from featurekit.heads import grid

        selecting = req.select and len(grid(head, 1, C, gamma, k, T)) > 1
        X_sel, y_sel = ((cache.features(req.select, req.layer), cache.labels(req.select))
                        if selecting else (None, None))
        provenance = provenance_of(cache, req.layer)
    if len(np.unique(y)) < 2:
        raise HeadError(f"the {req.train} split has a single class; a classifier needs two or more")
    rows = CacheRows(str(Path(cache_path).resolve()), req.layer, req.train,
                     req.select if selecting else None, allow_incomplete)
    with Executor(jobs, scheduler) as executor:
        est, report = fit_on_arrays(head, backend, X, y, X_eval, y_eval, req.n_classes, X_sel=X_sel,
                                    y_sel=y_sel, C=C, gamma=gamma, k=k, T=T, seed=req.seed, metric=metric,
                                    refit=refit, progress=progress, head_params=head_params,
                                    executor=executor, rows=rows, cv=cv, extend=extend)
    warn_selection(head, backend, report["selection"], head_params)
    report = {"head": head, "backend": backend, "layer": req.layer, "eval_split": req.evaluate,
              "train_split": req.train, **report}
    result = FitResult(est, report, provenance)
    if out is not None:
        result.out = str(save_head(result, out))
    return result


def warn_selection(head: str, backend: str, selection: dict[str, Any],
                   head_params: dict[str, Any] | None = None) -> None:
    """One warning per thing the selection found wrong (edge, convergence), in this process."""
    from featurekit.select import warnings_of

    for message in warnings_of(head, backend, selection, head_params):
        warn(message, SelectionWarning)


def predict(
    head_path: str | Path, cache_path: str | Path, out: str | Path, *, split: str | None = None,
    force: bool = False, allow_incomplete: bool = False, trust: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Predict one split with a saved head; write ``path,label,prediction,score`` to ``out``
    (class names; score is the decision value of the predicted class), an existing file only
    with ``overwrite``."""
    from featurekit.cache import open_cache

    check_output(out, overwrite, example="predictions.csv")
    saved = load_head(head_path, trust=trust)
    est, prov = saved["head"], saved["provenance"]
    layer = prov.get("layer")
    with open_cache(cache_path, allow_incomplete=allow_incomplete) as cache:
        if layer not in cache.layers:
            raise HeadError(f"the head was fitted on layer {layer!r}, which {cache_path} lacks")
        differ = check_provenance(prov, cache, layer)
        if differ and not force:
            raise HeadError(
                f"{head_path} was fitted on other features than {cache_path} "
                f"(different {', '.join(differ)}); pass --force to predict anyway"
            )
        soft = soft_differences(prov, cache, layer)
        if soft:
            warn(f"{head_path} was fitted on features computed otherwise than "
                 f"{cache_path}'s ({'; '.join(soft)}): predictions may differ slightly")
        split = split or saved["report"].get("eval_split") or cache.splits[-1]
        X, y = cache.features(split, layer), cache.labels(split)
        paths, classes = cache.paths(split), cache.classes
    pred = est.predict(X)
    scores = est.decision_function(X)
    if scores.ndim == 1:  # binary: positive score means classes_[1]
        chosen = np.where(pred == est.classes_[1], scores, -scores)
    else:
        col = np.searchsorted(est.classes_, pred)
        chosen = scores[np.arange(len(pred)), col]
    labels = [classes[int(t)] for t in y]
    predicted = [prov["classes"][int(q)] for q in pred]  # the head's own class names
    out_p = write_csv(out, PREDICTION_COLUMNS,
                      zip(paths, labels, predicted, (repr(float(v)) for v in chosen)))
    # by name, exactly as the CSV reads (also right under --force with other class lists)
    accuracy = float(np.mean([a == b for a, b in zip(labels, predicted)])) if labels else 0.0
    return {"split": split, "rows": int(len(y)), "accuracy": accuracy, "out": str(out_p),
            "forced": bool(differ)}
