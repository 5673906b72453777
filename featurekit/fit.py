"""Fitting heads on a cache: selection (:mod:`featurekit.select`), the refit, evaluation,
persistence.

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

from featurekit import __version__
from featurekit._atomic import replacing
from featurekit.errors import CacheError, HeadError

HEAD_FORMAT = "featurekit-head"
HEAD_FORMAT_VERSION = 1
# provenance keys that must match between a saved head and the cache it predicts on
PROVENANCE_KEYS = ("model", "weights_sha256", "layer", "pool", "preprocess", "classes")
# keys that may differ with a warning (the features move by rounding only)
SOFT_PROVENANCE_KEYS = ("precision", "decode")


@dataclass
class FitResult:
    head: Any
    report: dict[str, Any]
    provenance: dict[str, Any] = field(default_factory=dict)


def provenance_of(cache, layer: str) -> dict[str, Any]:
    a = cache.attrs
    return {
        "model": a.get("model"),
        "weights": a.get("weights"),
        "weights_sha256": a.get("weights_sha256") or f"{a.get('weights')}:seed={a.get('seed')}",
        "layer": layer,
        "pool": a.get("pool") if layer != "penultimate" else None,
        "preprocess": a.get("preprocess"),
        "classes": list(cache.classes),
        "precision": a.get("precision"),
        "decode": a.get("decode"),
        "cache": str(cache.path),
        "featurekit_version": __version__,
    }


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


GAMMA_HEADS = ("svm", "nystroem")  # heads with an RBF width


def fit_on_arrays(
    head: str, backend: str, X, y, X_eval, y_eval, n_classes: int, *, X_sel=None, y_sel=None,
    C: float | None = None, gamma: float | None = None, seed: int = 0,
    metric: str = "accuracy", refit: bool = True, jobs: int | None = None,
    progress: bool = False, head_params: dict[str, Any] | None = None,
    executor=None, rows=None,
) -> tuple[Any, dict[str, Any]]:
    """Select, refit, evaluate one head on arrays; the common core of ``fit`` and ``bench``.
    ``executor``/``rows``: where the selection's units run and read their rows
    (:mod:`featurekit.select`)."""
    from featurekit import heads, select

    if gamma is not None and head not in GAMMA_HEADS:
        raise HeadError(f"--gamma applies to the {' and '.join(GAMMA_HEADS)} heads only, not {head!r}")
    grid = heads.grid(head, X.shape[1], C, gamma)
    chosen = select.select(head, backend, grid, X, y, X_sel, y_sel, seed=seed, metric=metric,
                           jobs=jobs, progress=progress, head_params=head_params,
                           executor=executor, rows=rows)
    if refit and chosen.method == "val":  # val chose the point: train on train and val
        X, y = np.concatenate([X, X_sel]), np.concatenate([y, y_sel])
    est = heads.create_head(head, backend, **{**(head_params or {}), **chosen.params})
    fit_seconds = timed_fit(est, X, y)
    pred, predict_seconds = timed_predict(est, X_eval)
    scores = est.decision_function(X_eval)
    report = {
        "head": head,
        "backend": backend,
        "params": chosen.params,
        "selection": {**chosen.to_dict(), "refit": "train+val" if refit and chosen.method == "val" else "train"},
        "selection_seconds": chosen.seconds,
        **metrics(y_eval, pred, scores, n_classes, est.classes_),
        "fit_seconds": fit_seconds,
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
    backend: str = "sklearn",
    layer: str | None = None,
    C: float | None = None,
    gamma: float | None = None,
    train_split: str = "train",
    eval_split: str | None = None,
    allow_incomplete: bool = False,
    metric: str = "accuracy",
    refit: bool = True,
    jobs: int | None = None,
    progress: bool = False,
    head_params: dict[str, Any] | None = None,
    scheduler: str | None = None,
) -> FitResult:
    """Fit one head on a cache layer with the selection protocol (module docstring).
    ``scheduler``: a Dask scheduler's address to run the selection's units on (each reads the
    cache itself, so workers need to see ``cache_path``)."""
    from featurekit.cache import open_cache
    from featurekit.heads import HEADS, resolve_backend

    from featurekit.options import POSITIVE

    if head not in HEADS:
        raise HeadError(f"unknown head {head!r}; valid heads: {', '.join(HEADS)}")
    POSITIVE.check("--C", C)
    POSITIVE.check("--gamma", gamma)
    from featurekit.select import metric_function

    metric_function(metric)  # an unknown metric fails before the cache is read
    backend = resolve_backend(backend, head)
    with open_cache(cache_path, allow_incomplete=allow_incomplete) as cache:
        layer = layer or ("penultimate" if "penultimate" in cache.layers else cache.layers[0])
        train, evaluate, select = choose_splits(cache, train_split, eval_split)
        X, y = cache.features(train, layer), cache.labels(train)
        X_eval, y_eval = cache.features(evaluate, layer), cache.labels(evaluate)
        X_sel = y_sel = None
        if select and (C is None or (head in GAMMA_HEADS and gamma is None)):
            X_sel, y_sel = cache.features(select, layer), cache.labels(select)
        provenance = provenance_of(cache, layer)
        n_classes = len(cache.classes)
        seed = int(cache.attrs.get("seed", 0))
    if len(np.unique(y)) < 2:
        raise HeadError(f"the {train} split has a single class; a classifier needs two or more")
    from featurekit.select import CacheRows, Executor

    rows = CacheRows(str(Path(cache_path).resolve()), layer, train,
                     select if X_sel is not None else None, allow_incomplete)
    with Executor(jobs, scheduler) as executor:
        est, report = fit_on_arrays(head, backend, X, y, X_eval, y_eval, n_classes, X_sel=X_sel,
                                    y_sel=y_sel, C=C, gamma=gamma, seed=seed, metric=metric,
                                    refit=refit, progress=progress, head_params=head_params,
                                    executor=executor, rows=rows)
    report = {"head": head, "backend": backend, "layer": layer, "eval_split": evaluate,
              "train_split": train, **report}
    return FitResult(est, report, provenance)


# --------------------------------------------------------------------------- persistence
#
# The format follows the file name: ``.joblib`` is a joblib pickle (loading it runs whatever
# code it holds, so it loads only with ``trust=True``); any other name is a skops file, which
# loads only featurekit's, scikit-learn's and numpy's own classes and runs nothing else.

# module prefixes whose *classes* (never functions) a skops head file may hold
SKOPS_TRUSTED = ("featurekit.heads.", "sklearn.", "numpy.")


def head_format(path: str | Path) -> str:
    return "joblib" if Path(path).suffix.lower() == ".joblib" else "skops"


def check_head_output(path: str | Path, backend: str) -> None:
    """Before fitting: cuML heads hold GPU objects that skops cannot write."""
    if backend == "cuml" and head_format(path) == "skops":
        raise HeadError(
            f"cuML heads can be saved only as joblib files (skops cannot hold cuML's GPU "
            f"objects): use --out {Path(path).with_suffix('.joblib')}"
        )


def save_head(result: FitResult, path: str | Path) -> Path:
    """The head with its report and provenance, as skops or joblib by the file name; written
    under a temporary name and renamed, so an interrupted save leaves no half file."""
    from featurekit.errors import OutputError

    p = Path(path)
    if not p.parent.is_dir():
        raise OutputError(f"output folder {p.parent} does not exist")
    check_head_output(p, getattr(result.head, "backend", "sklearn"))
    payload = {"format": HEAD_FORMAT, "format_version": HEAD_FORMAT_VERSION, "head": result.head,
               "provenance": result.provenance, "report": result.report}
    with replacing(p) as tmp:
        if head_format(p) == "joblib":
            import joblib

            joblib.dump(payload, tmp)
        else:
            import skops.io

            skops.io.dump(payload, tmp)
    return p


def load_head(path: str | Path, trust: bool = False) -> dict[str, Any]:
    """A saved head. A skops file may hold only trusted classes (anything else is refused
    before it is built); a joblib file is a pickle and loads only with ``trust``."""
    p = Path(path)
    if not p.is_file():
        raise HeadError(f"head file not found: {p}")
    obj = _load_joblib(p, trust) if head_format(p) == "joblib" else _load_skops(p)
    if not isinstance(obj, dict) or obj.get("format") != HEAD_FORMAT:
        raise HeadError(f"{p} is not a featurekit head file")
    version = obj.get("format_version")
    if not isinstance(version, int) or version > HEAD_FORMAT_VERSION:
        raise HeadError(f"{p} was written by a newer featurekit (or is damaged); upgrade featurekit")
    from featurekit.heads._base import Head

    if not isinstance(obj.get("head"), Head) or not isinstance(obj.get("provenance"), dict) \
            or not isinstance(obj.get("report"), dict):
        raise HeadError(f"{p} is not a featurekit head file (no fitted head, provenance or report)")
    return obj


def _load_joblib(p: Path, trust: bool) -> Any:
    if not trust:
        raise HeadError(
            f"{p} is a joblib pickle, and loading one runs any code it holds: pass --trust only "
            "for a file you made yourself (or refit and save it as .skops)"
        )
    import joblib

    try:
        return joblib.load(p)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in ("cuml", "cupy", "rmm", "cudf"):
            raise HeadError(
                f"{p} holds a cuML head: loading it needs cuML and an NVIDIA GPU ({exc.name} is "
                "not importable here)"
            ) from None
        raise HeadError(f"cannot load head file {p}: {type(exc).__name__}: {exc}") from None
    except Exception as exc:  # unpickling arbitrary bytes fails in many ways
        raise HeadError(f"cannot load head file {p}: {type(exc).__name__}: {exc}") from None


def _load_skops(p: Path) -> Any:
    import skops.io

    try:
        untrusted = skops.io.get_untrusted_types(file=p)
    except Exception as exc:  # not a zip, no schema, damaged...
        raise HeadError(
            f"{p} is not a skops head file ({type(exc).__name__}: {exc}); joblib heads must be "
            "named .joblib"
        ) from None
    foreign = [t for t in untrusted if not _trusted_class(t)]
    if foreign:
        raise HeadError(
            f"{p} holds types featurekit does not trust ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); refused, nothing in it was run"
        )
    try:
        return skops.io.load(p, trusted=untrusted)
    except Exception as exc:
        raise HeadError(f"cannot load head file {p}: {type(exc).__name__}: {exc}") from None


def _trusted_class(name: str) -> bool:
    """A class (not a function) defined under featurekit.heads, scikit-learn or numpy."""
    import importlib

    if not name.startswith(SKOPS_TRUSTED):
        return False
    module, _, attr = name.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except Exception:
        return False
    return isinstance(obj, type)


def check_provenance(saved: dict[str, Any], cache, layer: str) -> list[str]:
    """Keys whose values differ between a saved head and this cache's layer."""
    here = provenance_of(cache, layer)
    return [k for k in PROVENANCE_KEYS if saved.get(k) != here.get(k)]


def soft_differences(saved: dict[str, Any], cache, layer: str) -> list[str]:
    """How the cache's features were computed differently from the head's (precision, decode
    path): they move features by rounding only, so predict warns instead of refusing. Heads
    saved before these were recorded compare as equal."""
    here = provenance_of(cache, layer)
    return [f"{k} {saved[k]} vs {here[k]}" for k in SOFT_PROVENANCE_KEYS
            if saved.get(k) is not None and here.get(k) is not None and saved[k] != here[k]]


def predict_to_csv(
    head_path: str | Path, cache_path: str | Path, out: str | Path, *, split: str | None = None,
    force: bool = False, allow_incomplete: bool = False, trust: bool = False,
) -> dict[str, Any]:
    """Predict one split; write ``path,label,prediction,score`` (class names; score is the
    decision value of the predicted class)."""
    import csv

    from featurekit.cache import open_cache

    import warnings

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
            warnings.warn(f"{head_path} was fitted on features computed otherwise than "
                          f"{cache_path}'s ({'; '.join(soft)}): predictions may differ slightly",
                          stacklevel=2)
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
    out_p = Path(out)
    with open(out_p, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "prediction", "score"])
        for row in zip(paths, labels, predicted, (repr(float(v)) for v in chosen)):
            w.writerow(row)
    # by name, exactly as the CSV reads (also right under --force with other class lists)
    accuracy = float(np.mean([a == b for a, b in zip(labels, predicted)])) if labels else 0.0
    return {"split": split, "rows": int(len(y)), "accuracy": accuracy, "out": str(out_p),
            "forced": bool(differ)}
