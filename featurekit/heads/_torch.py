"""featurekit's own heads on torch (CPU or CUDA): logistic regression, linear SVM, Nystroem.

Always importable (torch is a dependency). Each head solves exactly its scikit-learn twin's
problem, on features standardised as scikit-learn's StandardScaler does:

* ``logistic``: multinomial (binomial for two classes) cross-entropy, mean over rows, plus
  ||W||^2 / (2 C n), intercept not penalised: scikit-learn's LogisticRegression objective;
* ``linearsvc``: squared hinge, one-vs-rest, ||w||^2 + b^2 penalised (intercept_scaling 1):
  liblinear's objective, divided by C n;
* ``nystroem``: scikit-learn's Nystroem map (same landmarks for the same ``random_state``,
  same normalisation K^-1/2, see :func:`nystroem_map`), then ``logistic``.

All of them go through one batched L-BFGS (:mod:`featurekit.heads._lbfgs`) with
scikit-learn's stopping rule. ``fit_grid`` runs a whole selection: per fold it standardises
(and, for nystroem, maps per gamma) once and solves every C of the grid; on a GPU all of them
in one batch (one GEMM per step, members leaving the batch as they converge), on the CPU one
after another. ``fit`` is the same code on one grid point, so a grid point scores in
``fit_grid`` exactly what fitting it alone scores (bitwise on the CPU). Fitted state is numpy,
so a head fitted on a GPU saves, loads and predicts on a machine without one.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch  # this module is the torch backend: loaded only when the registry loads it

from featurekit.heads import register
from featurekit.heads._base import Head

DTYPES = ("float32", "float64")

# scikit-learn conformance checks the torch heads fail, and why (featurekit's own list)
EXPECTED_FAILED_CHECKS: dict[str, str] = {}


def resolve_device(spec: str) -> str:
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu" or spec == "cuda" or (spec.startswith("cuda:") and spec[5:].isdigit()):
        if spec != "cpu" and not torch.cuda.is_available():
            raise ValueError(f"device={spec!r}: no CUDA device is available here")
        return spec
    raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {spec!r}")


class _TorchHead(Head):
    """Parameters common to the torch heads; validation and prediction."""

    backend = "torch"

    def __init__(self, C: float = 1.0, max_iter: int = 1000, tol: float = 1e-4,
                 device: str = "auto", dtype: str = "float32") -> None:
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.device = device
        self.dtype = dtype

    def _torch_setup(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        return resolve_device(self.device), getattr(torch, self.dtype)

    def _expected_failed_checks(self) -> dict[str, str]:
        return dict(EXPECTED_FAILED_CHECKS)

    # -- fitting: a single fit is fit_grid's code on one grid point and one "fold" of every row
    def _fit(self, X, y) -> None:
        classes = np.unique(y)
        if classes.size < 2:
            raise ValueError(
                f"This solver needs samples of at least 2 classes in the data, but the data "
                f"contains only one class: {classes[0]!r}"
            )
        device, dtype = self._torch_setup()
        Xt = _tensor(X, device, dtype)
        state, n_iter, converged = self._solve(Xt, y, classes, [self._grid_point()], None)[0]
        self.classes_ = classes
        for key, value in state.items():
            setattr(self, key, value)
        self.n_iter_ = np.atleast_1d(np.asarray(n_iter))
        self.converged_ = bool(converged)

    def fit_grid(self, X, y, grid: list[dict[str, Any]], folds, metric: Callable,
                 on_stop: Callable[[int], None] | None = None) -> tuple[np.ndarray, list[int]]:
        """Scores (len(grid), len(folds)) of every grid point on every fold's held-out rows,
        and the grid indices that did not converge on some fold. ``folds`` is [(train rows,
        held-out rows)]; ``metric(y_true, y_pred)``; ``on_stop(k)``: k more fits finished."""
        from sklearn.utils import check_array

        X = check_array(X, dtype=[np.float64, np.float32])
        y = np.asarray(y)
        device, dtype = self._torch_setup()
        Xt = _tensor(X, device, dtype)
        scores = np.empty((len(grid), len(folds)))
        failed: set[int] = set()
        for f, (train, held) in enumerate(folds):
            classes = np.unique(y[train])
            tr, ho = (torch.as_tensor(np.asarray(i), device=device) for i in (train, held))
            held_rows = Xt[ho]
            for g, (state, _, converged) in enumerate(self._solve(Xt[tr], y[train], classes, grid, on_stop)):
                scores[g, f] = metric(y[held], classes[self._predict_index(state, held_rows)])
                if not converged:
                    failed.add(g)
        return scores, sorted(failed)

    def _grid_point(self) -> dict[str, Any]:
        return {"C": self.C}

    # -- prediction
    def decision_function(self, X):
        X = self._checked(X)
        device, dtype = self._torch_setup()
        scores = self._decide(self.__dict__, _tensor(X, device, dtype))
        scores = scores.double().cpu().numpy()
        return scores[:, 0] if scores.shape[1] == 1 else scores

    def predict(self, X):
        X = self._checked(X)
        device, dtype = self._torch_setup()
        return self.classes_[self._predict_index(self.__dict__, _tensor(X, device, dtype))]

    def _predict_index(self, state: dict[str, Any], X) -> np.ndarray:
        """Class positions of rows ``X`` (a tensor) under a fitted ``state``."""
        return _winners(self._decide(state, X))

    def _decide(self, state: dict[str, Any], X):
        """Decision values (n, k') of rows ``X`` (a tensor) under a fitted ``state``; one column
        for two classes (positive: the second class)."""
        Z = self._features(state, X)
        coef = torch.as_tensor(state["coef_"], device=X.device, dtype=X.dtype)
        intercept = torch.as_tensor(state["intercept_"], device=X.device, dtype=X.dtype)
        return Z @ coef.T + intercept

    def _features(self, state: dict[str, Any], X):
        """Raw rows -> what the linear model sees (standardised; nystroem maps them further)."""
        mean = torch.as_tensor(state["mean_"], device=X.device, dtype=X.dtype)
        scale = torch.as_tensor(state["scale_"], device=X.device, dtype=X.dtype)
        return (X - mean) / scale

    def _solve(self, X, y, classes, grid, on_stop):
        """[(state, n_iter, converged)] per grid point, fitted on the rows of ``X`` (a tensor)."""
        mean, scale = standardise(X)
        Xs = (X - mean) / scale
        state = {"mean_": mean.double().cpu().numpy(), "scale_": scale.double().cpu().numpy()}
        return [({**state, **s}, it, ok) for s, it, ok in
                self._solve_linear(Xs, y, classes, [p["C"] for p in grid], on_stop)]

    def _solve_linear(self, Xs, y, classes, Cs, on_stop):
        """[(state, n_iter, converged)] for each C. On a GPU every C in one batch (one GEMM per
        step for all of them); on the CPU one C after another, each exactly as a single fit
        computes it: a batch would save no arithmetic there, and it would change the last bits
        (MKL and torch pick other kernels for other batch shapes), so that a weakly regularised
        fit in a batch could end elsewhere than the same fit alone."""
        from featurekit.heads import _lbfgs

        y_index = np.searchsorted(classes, y)
        batches = [list(range(len(Cs)))] if batch_on(Xs.device) else [[i] for i in range(len(Cs))]
        out: list[Any] = [None] * len(Cs)
        for members in batches:
            problem = _LinearProblem(Xs, y_index, classes.size, self._loss,
                                     torch.as_tensor([Cs[i] for i in members], device=Xs.device,
                                                     dtype=Xs.dtype))
            res = _lbfgs.minimize(problem, problem.start(len(members)), max_iter=self.max_iter,
                                  tol=self.tol, on_stop=on_stop)
            W, b = problem.unpack(res.theta)
            for j, i in enumerate(members):
                state = {"coef_": W[j].T.double().cpu().numpy(), "intercept_": b[j].double().cpu().numpy()}
                out[i] = (state, int(res.n_iter[j]), bool(res.converged[j]))
        return out


def batch_on(device) -> bool:
    """Whether the C values of a selection are solved as one batch on this device (a GPU)."""
    return torch.device(device).type == "cuda"


def _tensor(X, device: str, dtype):
    """A numpy array on the device (read-only arrays, e.g. joblib's memmaps, are copied first:
    torch does not take them)."""
    X = np.ascontiguousarray(X)
    if not X.flags.writeable:
        X = X.copy()
    return torch.from_numpy(X).to(device=device, dtype=dtype)


def _winners(scores) -> np.ndarray:
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


class _LinearProblem:
    """A batch of linear classifiers on the same rows, one C each; ``theta`` rows hold W (d x
    k') then b (k'), flattened. Objectives are scaled by 1 / (C n), so the gradient test means
    what scikit-learn's ``tol`` means."""

    def __init__(self, X, y_index: np.ndarray, n_classes: int, loss: str, Cs) -> None:
        self.X, self.loss = X, loss
        self.n, self.d = X.shape
        self.k = 1 if n_classes == 2 else n_classes  # two classes: one column, as scikit-learn
        y = torch.as_tensor(y_index, device=X.device)
        self.y_index = y[:, None, None]
        if loss == "squared_hinge":  # +1 for the column's class, -1 for the rest
            if self.k == 1:
                self.Y = (y[:, None] == 1).to(X.dtype) * 2 - 1
            else:
                self.Y = torch.nn.functional.one_hot(y, self.k).to(X.dtype) * 2 - 1
        elif self.k == 1:
            self.Y = (y == 1).to(X.dtype)[:, None]
        else:
            self.Y = torch.nn.functional.one_hot(y, self.k).to(X.dtype)
        self.reg = 1.0 / (Cs * self.n)  # (S,)

    def start(self, S: int):
        return torch.zeros(S, (self.d + 1) * self.k, dtype=self.X.dtype, device=self.X.device)

    def unpack(self, theta):
        A = theta.shape[0]
        W = theta[:, : self.d * self.k].reshape(A, self.d, self.k)
        return W, theta[:, self.d * self.k:]

    def __call__(self, theta, members):
        A, (n, d, k) = theta.shape[0], (self.n, self.d, self.k)
        W, b = self.unpack(theta)
        Z = (self.X @ W.permute(1, 0, 2).reshape(d, A * k)).reshape(n, A, k) + b[None]
        # objectives are summed in float64: in float32 the line search could not tell the last
        # decreases from rounding (gradients stay in the data's dtype)
        if self.loss == "squared_hinge":
            margin = torch.clamp(1 - self.Y[:, None, :] * Z, min=0)
            f = (margin * margin).double().sum((0, 2)) / n
            G = -2 * self.Y[:, None, :] * margin / n
        elif k == 1:  # binomial
            z = Z[..., 0]
            f = (torch.nn.functional.softplus(z) - self.Y * z).double().mean(0)
            G = (torch.sigmoid(z) - self.Y)[..., None] / n
        else:  # multinomial: one exp for the log-sum-exp and the softmax
            top = Z.amax(2, keepdim=True)
            E = torch.exp(Z - top)
            total = E.sum(2, keepdim=True)
            lse = (top + torch.log(total))[..., 0]
            f = (lse - Z.gather(2, self.y_index.expand(n, A, 1))[..., 0]).double().mean(0)
            G = (E / total - self.Y[:, None, :]) / n
        reg = self.reg[members]
        # X^T G as (G^T X)^T: a GEMM on the rows as stored (X.T's strided GEMM took twice as long)
        gW = (G.reshape(n, A * k).T @ self.X).reshape(A, k, d).permute(0, 2, 1) + reg[:, None, None] * W
        gb = G.sum(0)
        penalty = (W * W).double().sum((1, 2))
        if self.loss == "squared_hinge":  # liblinear penalises the intercept too
            gb = gb + reg[:, None] * b
            penalty = penalty + (b * b).double().sum(1)
        f = f + 0.5 * reg.double() * penalty
        return f, torch.cat([gW.reshape(A, d * k), gb], dim=1)


@register("logistic", "torch")
class TorchLogisticHead(_TorchHead):
    """Multinomial logistic regression (binomial for two classes) by batched L-BFGS."""

    _loss = "logistic"

    def predict_proba(self, X):
        scores = self.decision_function(X)
        if scores.ndim == 1:
            p = 1.0 / (1.0 + np.exp(-scores))
            return np.stack([1 - p, p], axis=1)
        e = np.exp(scores - scores.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)


@register("linearsvc", "torch")
class TorchLinearSVCHead(_TorchHead):
    """Linear SVM, squared hinge, one-vs-rest, intercept penalised (liblinear's problem)."""

    _loss = "squared_hinge"


@register("nystroem", "torch")
class TorchNystroemHead(TorchLogisticHead):
    """Nystroem RBF map (scikit-learn's landmarks and normalisation), then logistic
    regression; ``gamma=None`` is 1 / n_features of the standardised features."""

    def __init__(self, C: float = 1.0, gamma: float | None = None, n_components: int = 2048,
                 max_iter: int = 1000, tol: float = 1e-4, random_state: int = 0,
                 device: str = "auto", dtype: str = "float32") -> None:
        self.C = C
        self.gamma = gamma
        self.n_components = n_components
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.device = device
        self.dtype = dtype

    def _grid_point(self) -> dict[str, Any]:
        return {"C": self.C, "gamma": self.gamma}

    def _solve(self, X, y, classes, grid, on_stop):
        """Per gamma of the grid: one map, then every C of that gamma in one batch."""
        mean, scale = standardise(X)
        Xs = (X - mean) / scale
        base = {"mean_": mean.double().cpu().numpy(), "scale_": scale.double().cpu().numpy()}
        landmarks = self._landmarks(Xs.shape[0])
        out: list[Any] = [None] * len(grid)
        for gamma in dict.fromkeys(p.get("gamma") for p in grid):
            members = [i for i, p in enumerate(grid) if p.get("gamma") == gamma]
            g = 1.0 / Xs.shape[1] if gamma is None else float(gamma)
            components, normalization = nystroem_map(Xs[landmarks], g)
            Phi = rbf(Xs, components, g) @ normalization.T
            mapped = {**base, "gamma_": g, "components_": components.double().cpu().numpy(),
                      "normalization_": normalization.double().cpu().numpy()}
            solved = self._solve_linear(Phi, y, classes, [grid[i]["C"] for i in members], on_stop)
            for i, (state, it, ok) in zip(members, solved):
                out[i] = ({**mapped, **state}, it, ok)
        return out

    def _landmarks(self, n: int) -> np.ndarray:
        """The rows scikit-learn's Nystroem takes for this ``random_state``."""
        from sklearn.utils import check_random_state

        return check_random_state(self.random_state).permutation(n)[: min(n, self.n_components)]

    def _features(self, state: dict[str, Any], X):
        Xs = super()._features(state, X)
        components = torch.as_tensor(state["components_"], device=X.device, dtype=X.dtype)
        normalization = torch.as_tensor(state["normalization_"], device=X.device, dtype=X.dtype)
        return rbf(Xs, components, state["gamma_"]) @ normalization.T


def rbf(X, Y, gamma: float):
    """exp(-gamma ||x - y||^2) for every row pair, from one GEMM."""
    sq = (X * X).sum(1)[:, None] + (Y * Y).sum(1)[None, :] - 2 * (X @ Y.T)
    return torch.exp(-gamma * torch.clamp(sq, min=0))


def nystroem_map(components, gamma: float):
    """(components, normalisation): K_mm^(-1/2) as scikit-learn's Nystroem computes it (in
    float64, from the symmetric eigendecomposition K = Q diag(l) Q^T, which gives scikit-learn's
    U S^-1/2 V: Q diag(sign(l) / sqrt(|l|)) Q^T), except for the directions whose eigenvalue is
    below the rounding noise of the kernel values the map will be applied to (|l| <= m * eps *
    max l, eps of the data's dtype): those are dropped, as a pseudo-inverse drops them, where
    scikit-learn clips the eigenvalue at 1e-12 and multiplies rounding noise by up to 1e6. For
    a well-conditioned K (most gamma values) the two are the same; for a wide kernel the
    dropped directions made fits at weak regularisation depend on rounding alone."""
    K = rbf(components.double(), components.double(), gamma)
    # on the CPU, LAPACK's eigensolver and the float64 product round differently with the
    # number of threads: one thread here, so that a fit gives the same map in any process
    # (joblib's, a Dask worker's); on a GPU the kernels do not depend on it
    from featurekit._resources import torch_threads

    with torch_threads(1 if not K.is_cuda else None):
        lam, Q = torch.linalg.eigh(K)
        floor = lam.abs().max() * K.shape[0] * torch.finfo(components.dtype).eps
        kept = lam.abs() > floor
        scale = torch.where(kept, torch.sign(lam) / lam.abs().clamp(min=1e-300).sqrt(),
                            torch.zeros_like(lam))
        normalization = (Q * scale) @ Q.T
    return components, normalization.to(components.dtype)


from featurekit.heads import _svm  # noqa: E402,F401  (registers the torch svm, built on this module)
