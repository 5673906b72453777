"""What every torch head shares: the estimator shell (validation, a single fit as ``fit_grid``'s
code on one grid point, prediction), standardisation, tensors in and out.

Fitted state is numpy, so a head fitted on a GPU saves, loads and predicts on a machine
without one.
"""

from __future__ import annotations

from abc import abstractmethod
from contextlib import contextmanager
from typing import Any, Callable

import numpy as np
import torch

from featurekit.heads._base import Head

DTYPES = ("float32", "float64")

# scikit-learn conformance checks the torch heads fail, and why (featurekit's own list)
EXPECTED_FAILED_CHECKS: dict[str, str] = {}


def resolve_device(spec: str) -> str:
    """A head's ``device`` parameter: auto | cpu | cuda | cuda:N; a bad or absent device is a
    ValueError, as scikit-learn reports a bad parameter."""
    from featurekit._device import resolve_device as resolve
    from featurekit.errors import DeviceError

    try:
        return resolve(spec, option="device")
    except DeviceError as exc:
        raise ValueError(str(exc)) from None


def free_bytes(device) -> int:
    """Device memory this process can still use: the driver's free memory plus what torch's
    caching allocator holds but does not use (``mem_get_info`` counts that as taken)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return 0
    free = torch.cuda.mem_get_info(dev)[0]
    return int(free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev))


def budget_bytes(memory_budget, device, cpu_mib: int = 0) -> int:
    """A head's ``memory_budget`` (MiB) in bytes; unset: half the device's free memory on a
    GPU, ``cpu_mib`` on the CPU. Not a positive number is a ValueError, as scikit-learn
    reports a bad parameter."""
    if memory_budget is not None:
        if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)) \
                or not float(memory_budget) > 0:
            raise ValueError(f"memory_budget must be a positive number of MiB, got {memory_budget!r}")
        return int(float(memory_budget) * (1 << 20))
    return free_bytes(device) // 2 if torch.device(device).type == "cuda" else cpu_mib << 20


def release(device) -> None:
    """Hand torch's cached blocks back between independent solves (gammas, folds), so that
    the next one's budget, read from :func:`free_bytes`, sees them and the driver can too."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


class TorchHead(Head):
    """A torch head: ``_solve`` fits a list of grid points on the same rows (a tensor) and
    ``_decide`` gives decision values under a fitted state; the rest is shared."""

    backend = "torch"

    def _torch_setup(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        return resolve_device(self.device), getattr(torch, self.dtype)

    def _expected_failed_checks(self) -> dict[str, str]:
        return dict(EXPECTED_FAILED_CHECKS)

    def _grid_point(self) -> dict[str, Any]:
        return {"C": self.C}

    _memory_param = "the number of rows"  # what a user lowers when the device runs out

    def _solve_in_memory(self, X, y, classes, grid, on_stop):
        """:meth:`_solve`, a device out of memory as one line naming the parameter to lower."""
        with self.in_memory(X):
            return self._solve(X, y, classes, grid, on_stop)

    @contextmanager
    def in_memory(self, X):
        """A device out of memory inside the block as one line naming the parameter to lower
        (``X``: the rows the work is on, for the message)."""
        from featurekit.errors import ResourceError

        try:
            yield
        except torch.OutOfMemoryError:
            release(getattr(X, "device", "cpu"))
            raise ResourceError(
                f"{type(self).__name__} ran out of memory on {getattr(X, 'device', 'cpu')} "
                f"({X.shape[0]} rows x {X.shape[-1]}); lower its {self._memory_param}, or fit "
                "fewer rows") from None

    @abstractmethod
    def _solve(self, X, y, classes, grid, on_stop) -> list[tuple[dict[str, Any], Any, bool]]:
        """[(fitted state, n_iter, converged)] per grid point, fitted on the rows of ``X``."""

    # -- fitting: a single fit is fit_grid's code on one grid point and one "fold" of every row
    def _fit(self, X, y) -> None:
        classes = np.unique(y)
        if classes.size < 2:
            raise ValueError(
                f"This solver needs samples of at least 2 classes in the data, but the data "
                f"contains only one class: {classes[0]!r}"
            )
        device, dtype = self._torch_setup()
        Xt = tensor(X, device, dtype)
        state, n_iter, converged = self._solve_in_memory(Xt, y, classes, [self._grid_point()], None)[0]
        self.classes_ = classes
        for key, value in state.items():
            setattr(self, key, value)
        self.n_iter_ = np.atleast_1d(np.asarray(n_iter))
        self.converged_ = bool(converged)
        if not self.converged_:  # one line, as scikit-learn's solvers say it
            import warnings

            from sklearn.exceptions import ConvergenceWarning

            warnings.warn(f"{type(self).__name__}: the solver stopped at its iteration limit "
                          f"({int(np.max(self.n_iter_))} iterations) before converging",
                          ConvergenceWarning, stacklevel=3)

    def fit_grid(self, X, y, grid: list[dict[str, Any]], folds, metric: Callable,
                 on_stop: Callable[[int], None] | None = None) -> tuple[np.ndarray, list[int]]:
        """Scores (len(grid), len(folds)) of every grid point on every fold's held-out rows,
        and the grid indices that did not converge on some fold. ``folds`` is [(train rows,
        held-out rows)]; ``metric(y_true, y_pred)``; ``on_stop(k)``: k more fits finished."""
        scores, failed, _ = self._score_folds(X, y, grid, folds, metric, on_stop)
        return scores, failed

    def _score_folds(self, X, y, grid, folds, metric, on_stop):
        """:meth:`fit_grid`'s work: (scores, failed, the grid indices whose solve started from
        a neighbour's solution on some fold -- a state marked ``warm_start_``)."""
        from sklearn.utils import check_array

        X = check_array(X, dtype=[np.float64, np.float32])
        y = np.asarray(y)
        device, dtype = self._torch_setup()
        Xt = tensor(X, device, dtype)
        scores = np.empty((len(grid), len(folds)))
        failed: set[int] = set()
        warmed: set[int] = set()
        for f, (train, held) in enumerate(folds):
            classes = np.unique(y[train])
            tr, ho = (torch.as_tensor(np.asarray(i), device=device) for i in (train, held))
            held_rows = Xt[ho]
            solved = self._solve_in_memory(Xt[tr], y[train], classes, grid, on_stop)
            for g, (state, _, converged) in enumerate(solved):
                scores[g, f] = metric(y[held], classes[self._predict_index(state, held_rows)])
                if not converged:
                    failed.add(g)
                if state.get("warm_start_"):
                    warmed.add(g)
            del solved, held_rows
            release(device)  # the next fold's budgets see this one's memory
        return scores, sorted(failed), sorted(warmed)

    # -- prediction
    def decision_function(self, X):
        X = self._checked(X)
        device, dtype = self._torch_setup()
        scores = self._decide(self.__dict__, tensor(X, device, dtype))
        scores = scores.double().cpu().numpy()
        return scores[:, 0] if scores.shape[1] == 1 else scores

    def predict(self, X):
        X = self._checked(X)
        device, dtype = self._torch_setup()
        return self.classes_[self._predict_index(self.__dict__, tensor(X, device, dtype))]

    def _predict_index(self, state: dict[str, Any], X) -> np.ndarray:
        """Class positions of rows ``X`` (a tensor) under a fitted ``state``."""
        return winners(self._decide(state, X))

    def _decide(self, state: dict[str, Any], X):
        """Decision values (n, k') of rows ``X`` (a tensor) under a fitted ``state``; one column
        for two classes (positive: the second class)."""
        Z = self._features(state, X)
        coef = torch.as_tensor(state["coef_"], device=X.device, dtype=X.dtype)
        intercept = torch.as_tensor(state["intercept_"], device=X.device, dtype=X.dtype)
        return Z @ coef.T + intercept

    def _features(self, state: dict[str, Any], X):
        """Raw rows -> what the model sees (standardised; nystroem maps them further)."""
        mean = torch.as_tensor(state["mean_"], device=X.device, dtype=X.dtype)
        scale = torch.as_tensor(state["scale_"], device=X.device, dtype=X.dtype)
        return (X - mean) / scale


def batch_on(device) -> bool:
    """Whether the C values of a selection are solved as one batch on this device (a GPU)."""
    return torch.device(device).type == "cuda"


def tensor(X, device: str, dtype):
    """A numpy array on the device (read-only arrays, e.g. joblib's memmaps, are copied first:
    torch does not take them)."""
    X = np.ascontiguousarray(X)
    if not X.flags.writeable:
        X = X.copy()
    return torch.from_numpy(X).to(device=device, dtype=dtype)


def winners(scores) -> np.ndarray:
    """Class positions from decision values (n, k'), a tensor: the argmax, or for one column
    its sign (positive: the second class)."""
    if scores.shape[1] == 1:
        return (scores[:, 0] > 0).long().cpu().numpy()
    return scores.argmax(1).cpu().numpy()


def standardise(X):
    """Column mean and scale as scikit-learn's StandardScaler computes them (float64
    accumulators, population std, near-constant columns scaled by 1)."""
    n = X.shape[0]
    mean = torch.zeros(X.shape[1], dtype=torch.float64, device=X.device)
    for start in range(0, n, 8192):
        mean += X[start:start + 8192].double().sum(0)
    mean /= n
    var = torch.zeros_like(mean)
    for start in range(0, n, 8192):
        var += ((X[start:start + 8192].double() - mean) ** 2).sum(0)
    var /= n
    eps = torch.finfo(torch.float64).eps
    constant = var <= n * eps * var + (n * mean * eps) ** 2
    scale = torch.where(constant, torch.ones_like(var), var.sqrt())
    return mean.to(X.dtype), scale.to(X.dtype)


def standardised(X) -> tuple[Any, dict[str, np.ndarray]]:
    """The rows standardised, and the fitted state that standardises them (``mean_``,
    ``scale_``): the first step of every torch head."""
    mean, scale = standardise(X)
    state = {"mean_": mean.double().cpu().numpy(), "scale_": scale.double().cpu().numpy()}
    return (X - mean) / scale, state
