"""Heads: classifiers on cached features, a registry keyed by (head, backend).

Every head is a scikit-learn estimator that standardises its input inside (``fit`` /
``predict`` / ``decision_function``, fitted state ending in ``_``). Backends register their
heads with :func:`register`; ``torch`` (featurekit's own, CPU or CUDA) always registers,
``cuml`` only when ``import cuml`` works and a GPU is usable, so a CPU install never breaks.
The registry also owns what selection needs to know about each head: its parameter grid
(:func:`grid`, the same on every backend) and, where a backend has one, a ``fit_grid`` that
runs a whole selection itself, every grid point and fold (:func:`batched`)::

    head = featurekit.create_head("svm", backend="sklearn", C=10.0)
    featurekit.list_heads()      # ['knn', 'linearsvc', 'logistic', 'nystroem', 'svm']
    featurekit.heads.list_backends()   # ['sklearn', 'torch'], plus 'cuml' where it works
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from featurekit.errors import HeadError

HEADS = ("logistic", "linearsvc", "svm", "nystroem", "knn")
BACKENDS = ("sklearn", "torch", "cuml")  # every backend featurekit knows; list_backends() says which work
_REGISTRY: dict[tuple[str, str], Callable[..., Any]] = {}
_LOADED: dict[str, bool] = {}
_BACKEND_MODULES = {"sklearn": "featurekit.heads._sklearn", "torch": "featurekit.heads._torch",
                    "cuml": "featurekit.heads._cuml"}

# The linear-evaluation protocol's grids (Kornblith et al. 2019; SimCLR), one per head and the
# same on every backend. gamma_scale multiplies 1 / n_features, the RBF width that
# gamma="scale" gives on standardised features.
GRIDS: dict[str, dict[str, list[float]]] = {
    "logistic": {"C": [10 ** (e / 2) for e in range(-12, 11)]},  # 23 values, 1e-6 .. 1e5
    "linearsvc": {"C": [10 ** (e / 2) for e in range(-10, 3)]},  # 13 values, 1e-5 .. 10
    "nystroem": {"C": [10.0 ** e for e in range(-3, 6)], "gamma_scale": [0.25, 1.0, 4.0]},
    "svm": {"C": [0.1, 1.0, 10.0, 100.0], "gamma_scale": [0.25, 1.0, 4.0]},
    # k-NN (DINO's protocol, Caron et al. 2021): every k of a T scored from one search
    "knn": {"T": [0.03, 0.07, 0.2], "k": [1, 5, 10, 20, 50, 100, 200]},
}
# parameter values that are a bound of their own, not the edge of a grid (no k below 1)
BOUNDS: dict[str, float] = {"k": 1}


# The parameters a selection may extend past the grid's edge (featurekit.select). Nystroem's
# gamma is not: below the grid the kernel is so wide that K_mm is near rank one and its map
# is rounding (nystroem_map drops those directions; which ones depends on the BLAS threads),
# so scores there changed with where the fit ran. k-NN's k extends upward only (k = 1 is a
# bound, BOUNDS), in whole numbers.
EXTENDS: dict[str, tuple[str, ...]] = {"logistic": ("C",), "linearsvc": ("C",),
                                       "nystroem": ("C",), "svm": ("C", "gamma"), "knn": ("k", "T")}


def grid(head: str, n_features: int, C: float | None = None, gamma: float | None = None,
         k: int | None = None, T: float | None = None) -> list[dict[str, float]]:
    """The grid points of ``head`` (the product of its parameters' values, in :data:`GRIDS`'
    order), a given value replacing its parameter's list."""
    import itertools

    given = {"C": C, "gamma": gamma, "k": k, "T": T}
    axes: dict[str, list] = {}
    for key, values in GRIDS[head].items():
        if key == "gamma_scale":
            axes["gamma"] = [gamma] if gamma is not None else [g / n_features for g in values]
        else:
            axes[key] = [given[key]] if given[key] is not None else list(values)
    return [dict(zip(axes, point)) for point in itertools.product(*axes.values())]


def parameters(head: str) -> list[str]:
    """The names of ``head``'s grid parameters (C, gamma, k, T)."""
    return ["gamma" if key == "gamma_scale" else key for key in GRIDS[head]]


def batched(head: Any) -> Callable[..., Any] | None:
    """The head's ``fit_grid`` (a whole selection: every grid point and fold), if it has one."""
    return getattr(head, "fit_grid", None)


def has(head: str, backend: str) -> bool:
    """Whether the registry holds ``head`` on ``backend`` (the backend loaded if it can be)."""
    return _load(backend) and (head, backend) in _REGISTRY


def entry(head: str, backend: str) -> Callable[..., Any]:
    """The registry's class for (head, backend), unconstructed."""
    _load(backend)
    return _REGISTRY[(head, backend)]


def register(head: str, backend: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Class decorator: make ``cls`` the (head, backend) entry of the registry."""

    def deco(cls: Callable[..., Any]) -> Callable[..., Any]:
        _REGISTRY[(head, backend)] = cls
        return cls

    return deco


_WHY: dict[str, str] = {}  # backend -> why it is not available here


def _load(backend: str) -> bool:
    """Import a backend's module once; False when it cannot work here. Any exception counts:
    a GPU library can fail with more than ImportError on a machine without a usable driver."""
    if backend not in _LOADED:
        try:
            importlib.import_module(_BACKEND_MODULES[backend])
            _LOADED[backend] = True
        except Exception as exc:
            _LOADED[backend] = False
            _WHY[backend] = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
    return _LOADED[backend]


def list_backends() -> list[str]:
    """Backends whose library imports on this machine."""
    return [b for b in BACKENDS if _load(b)]


def list_heads(backend: str | None = None) -> list[str]:
    """Head names, for one backend or any available one."""
    backends = [backend] if backend else list_backends()
    for b in backends:
        _load(b)
    return sorted({h for (h, b) in _REGISTRY if b in backends})


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # a broken CUDA install must not break the CPU path
        return False


# ``auto`` by measured speed at equal answers (benchmarks/RESULTS.md, docs/heads.md): the torch
# heads' whole default selection against scikit-learn's on a 2-core CPU, same choice and
# accuracy within 0.5 points: logistic 2.5-3.5x, linearsvc 22-64x, nystroem 6-7x, svm 1.8x
# faster; on CUDA the torch heads run batched on the GPU. cuML is never chosen by auto (it must
# be installed from NVIDIA's index, and its multiclass SVC trains its pairs one after another).
AUTO = {"cpu": "torch", "cuda": "torch"}


def resolve_backend(backend: str, head: str | None = None) -> str:
    """``auto``: per device class (:data:`AUTO`) the measured faster backend that has ``head``
    (featurekit's torch heads on the CPU and on CUDA), else scikit-learn."""
    if backend == "auto":
        chosen = AUTO["cuda" if cuda_available() else "cpu"]
        has_it = head is None or (_load(chosen) and (head, chosen) in _REGISTRY)
        return chosen if has_it else "sklearn"
    check_names(head or HEADS[0], backend)
    if not _load(backend):
        raise HeadError(
            f"backend {backend!r} is not available here ({_WHY.get(backend, 'it did not load')}); "
            f"available: {', '.join(list_backends())}"
        )
    return backend


def check_names(head: str, backend: str | None = None) -> None:
    """An unknown head or backend name is an error listing the valid ones (whether the backend
    works here is :func:`resolve_backend`'s question)."""
    if head not in HEADS:
        raise HeadError(f"unknown head {head!r}; valid heads: {', '.join(HEADS)}")
    if backend is not None and backend != "auto" and backend not in BACKENDS:
        raise HeadError(f"unknown backend {backend!r}; valid: auto, {', '.join(BACKENDS)}")


def create_head(name: str, backend: str = "sklearn", **params: Any) -> Any:
    """A new, unfitted head; an unknown head or backend is an error listing valid ones."""
    check_names(name)
    backend = resolve_backend(backend, name)
    cls = _REGISTRY.get((name, backend))
    if cls is None:
        raise HeadError(
            f"head {name!r} has no {backend!r} backend; it has: "
            f"{', '.join(b for (h, b) in _REGISTRY if h == name)}"
        )
    try:
        return cls(**params)
    except TypeError as exc:
        raise HeadError(f"bad parameters for head {name!r}: {exc}") from None


def expected_failed_checks(head: Any, backend: str = "sklearn") -> dict[str, str]:
    """The scikit-learn conformance checks a head may fail, with reasons: for scikit-learn's
    heads exactly those scikit-learn itself declares for the estimator the head wraps; for the
    other backends featurekit's own list (each backend module states it).

    Takes a head instance, or a name (with ``backend``); the dict fits ``check_estimator(...,
    expected_failed_checks=...)`` and ``parametrize_with_checks``.
    """
    if isinstance(head, str):
        head = create_head(head, backend)
    return head._expected_failed_checks()
