"""featurekit's own linear heads on torch (CPU or CUDA): logistic regression, linear SVM,
Nystroem. Each solves exactly its scikit-learn twin's problem, on features standardised as
scikit-learn's StandardScaler does:

* ``logistic``: multinomial (binomial for two classes) cross-entropy, mean over rows, plus
  ||W||^2 / (2 C n), intercept not penalised: scikit-learn's LogisticRegression objective;
* ``linearsvc``: squared hinge, one-vs-rest, ||w||^2 + b^2 penalised (intercept_scaling 1):
  liblinear's objective, divided by C n;
* ``nystroem``: scikit-learn's Nystroem map (same landmarks for the same ``random_state``,
  same normalisation K^-1/2, see :func:`~featurekit.heads._torch._kernels.nystroem_map`), then
  ``logistic``.

All of them go through one batched L-BFGS (:mod:`featurekit.heads._torch._lbfgs`) with
scikit-learn's stopping rule. ``fit_grid`` runs a whole selection: per fold it standardises
(and, for nystroem, maps per gamma) once and solves every C of the grid; on a GPU all of them
in one batch (one GEMM per step, members leaving the batch as they converge), on the CPU one
after another. ``fit`` is the same code on one grid point, so a grid point scores in
``fit_grid`` exactly what fitting it alone scores (bitwise on the CPU).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from featurekit.heads import register
from featurekit.heads._base import gamma_value
from featurekit.heads._torch import _lbfgs
from featurekit.heads._torch._common import TorchHead, batch_on, budget_bytes, release, standardised
from featurekit.heads._torch._kernels import nystroem_map, rbf


class TorchLinearHead(TorchHead):
    """A linear model on the standardised rows, every C of a grid by batched L-BFGS.
    ``warm_path``: in a selection on the CPU each C starts from the solution of the C before
    it (the grid ascends, so from the more strongly regularised neighbour), as Kornblith et
    al.'s linear evaluation and scikit-learn's ``warm_start`` do, and the points within reach
    of the best are then solved again from zero (:meth:`_checked_path`), so that it chooses
    what the cold grid chooses: a warm and a cold solve both pass scikit-learn's stopping rule
    at different points, a few held-out rows apart. Off by default: measured here the path
    and its check cost more than the cold grid (docs/heads.md, benchmarks/RESULTS.md). A
    single fit always starts from zero."""

    def __init__(self, C: float = 1.0, max_iter: int = 1000, tol: float = 1e-4,
                 device: str = "auto", dtype: str = "float32", warm_path: bool = False,
                 memory_budget: float | None = None) -> None:
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.device = device
        self.dtype = dtype
        self.warm_path = warm_path
        self.memory_budget = memory_budget

    _memory_param = "memory_budget (MiB the C values solved together may use)"

    def _budget(self, device) -> int:
        """Bytes the members of one L-BFGS batch may use: ``memory_budget`` MiB, or on a GPU
        half of the memory free now (torch's cached blocks counted as free)."""
        return budget_bytes(getattr(self, "memory_budget", None), device)

    def _solve(self, X, y, classes, grid, on_stop):
        Xs, state = standardised(X)
        return [({**state, **s}, it, ok) for s, it, ok in
                self._solve_linear(Xs, y, classes, [p["C"] for p in grid], on_stop)]

    def _warm(self, problem, previous):
        """This C solved from the neighbouring C's solution (``warm_path``), or None: no
        neighbour yet, or a start the solver did not move from. Where the regularisation is
        weak, the neighbour's solution already passes scikit-learn's stopping rule for this C
        (its gradient changes by 1/(C n) times the weights; float32 objectives cannot see the
        decrease), while a solve from zero ends elsewhere: such a C is solved from zero, as the
        cold grid solves it."""
        if previous is None or not getattr(self, "warm_path", False):
            return None
        res = _lbfgs.minimize(problem, previous, max_iter=self.max_iter, tol=self.tol)
        return res if int(res.n_iter[0]) > 1 else None

    def _solve_linear(self, Xs, y, classes, Cs, on_stop):
        """[(state, n_iter, converged)] for each C. On a GPU every C in one batch (one GEMM per
        step for all of them); on the CPU one C after another, along the path (``warm_path``),
        each C alone: a batch would save no arithmetic there, and it would change the last bits
        (MKL and torch pick other kernels for other batch shapes)."""
        y_index = np.searchsorted(classes, y)
        if batch_on(Xs.device):  # as many C values together as the memory budget holds
            k = 1 if classes.size == 2 else classes.size
            per = members_per_batch(*Xs.shape, k, Xs.element_size(), self._budget(Xs.device))
            batches = [list(range(s, min(len(Cs), s + per))) for s in range(0, len(Cs), per)]
        else:
            batches = [[i] for i in range(len(Cs))]
        out: list[Any] = [None] * len(Cs)
        previous = None
        for members in batches:
            problem = _LinearProblem(Xs, y_index, classes.size, self._loss,
                                     torch.as_tensor([Cs[i] for i in members], device=Xs.device,
                                                     dtype=Xs.dtype))
            # warm starts along the path on the CPU only: a GPU's batches are the grid's
            res = self._warm(problem, previous) if not batch_on(Xs.device) else None
            warm = res is not None
            if res is None:
                res = _lbfgs.minimize(problem, problem.start(len(members)), max_iter=self.max_iter,
                                      tol=self.tol, on_stop=on_stop)
            elif on_stop is not None:
                on_stop(1)
            previous = res.theta
            W, b = problem.unpack(res.theta)
            for j, i in enumerate(members):
                state = {"coef_": W[j].T.double().cpu().numpy(), "intercept_": b[j].double().cpu().numpy(),
                         **({"warm_start_": True} if warm else {})}
                out[i] = (state, int(res.n_iter[j]), bool(res.converged[j]))
        return out


    # -- many small problems with rows of their own (few-shot draws): one batch for all
    fits_together = True  # fit_grid(together=True) and fit_predict_draws exist
    DRAWS_CPU_BUDGET_MIB = 512

    def solve_draws(self, X, y, draws: list[np.ndarray], Cs: list[float], on_stop=None):
        """[draw][C] -> (fitted state, n_iter, converged): the head fitted on the rows
        ``draws[j]`` of X (every draw the same size; its classes its own) at every C, all in
        one batched L-BFGS (one batched GEMM per step; on the CPU too: these problems are too
        small for a solve each to use the cores)."""
        from featurekit.heads._torch._common import standardise, tensor

        device, dtype = self._torch_setup()
        Xd = tensor(np.stack([X[r] for r in draws]), device, dtype)  # (D, m, d)
        scaling = [standardise(x) for x in Xd]
        Xs = torch.stack([(x - mean) / scale for x, (mean, scale) in zip(Xd, scaling)])
        classes = [np.unique(y[r]) for r in draws]
        index = np.stack([np.searchsorted(c, y[r]) for c, r in zip(classes, draws)])
        members = [(j, c) for j in range(len(draws)) for c in range(len(Cs))]
        k = 1 if classes[0].size == 2 else classes[0].size
        budget = budget_bytes(self.memory_budget, device, self.DRAWS_CPU_BUDGET_MIB)
        per = members_per_batch(*Xs.shape[1:], k, Xs.element_size(), budget, own_rows=True)
        out: list[list[Any]] = [[None] * len(Cs) for _ in draws]
        for start in range(0, len(members), per):
            batch = members[start:start + per]
            problem = _DrawsProblem(Xs, index, classes[0].size, self._loss,
                                    torch.as_tensor([Cs[c] for _, c in batch], device=device,
                                                    dtype=dtype), [j for j, _ in batch])
            with self.in_memory(Xs):
                res = _lbfgs.minimize(problem, problem.start(len(batch)), max_iter=self.max_iter,
                                      tol=self.tol, on_stop=on_stop)
            W, b = problem.unpack(res.theta)
            for i, (j, c) in enumerate(batch):
                mean, scale = scaling[j]
                out[j][c] = ({"mean_": mean.double().cpu().numpy(), "scale_": scale.double().cpu().numpy(),
                              "coef_": W[i].T.double().cpu().numpy(),
                              "intercept_": b[i].double().cpu().numpy(), "classes_": classes[j]},
                             int(res.n_iter[i]), bool(res.converged[i]))
        return out

    def fit_grid(self, X, y, grid, folds, metric, on_stop=None, together: bool = False):
        """As :meth:`TorchHead.fit_grid`; ``together``: every fold and C in one batch
        (:meth:`solve_draws`; folds of equal size, as few-shot draws are)."""
        if not (together and self.fits_together):
            if not getattr(self, "warm_path", False):
                return super().fit_grid(X, y, grid, folds, metric, on_stop)
            return self._checked_path(X, y, grid, folds, metric, on_stop)
        from featurekit.heads._torch._common import tensor

        device, dtype = self._torch_setup()
        solved = self.solve_draws(X, y, [tr for tr, _ in folds], [p["C"] for p in grid], on_stop)
        scores = np.empty((len(grid), len(folds)))
        failed: set[int] = set()
        for f, (_, held) in enumerate(folds):
            rows = tensor(X[held], device, dtype)
            for g, (state, _, ok) in enumerate(solved[f]):
                scores[g, f] = metric(y[held], state["classes_"][self._predict_index(state, rows)])
                failed.update([] if ok else [g])
        return scores, sorted(failed)

    # how far below the best a warm score is solved again from zero (the larger of the two,
    # plus the largest warm/cold gap seen): near the best, warm scores came up to 0.75 points
    # (15 of 2,000 rows) below their cold ones on a 10,000-row set, 5 rows on small hold-outs
    # (docs/heads.md)
    REACH, REACH_ROWS = 0.02, 5

    def _checked_path(self, X, y, grid, folds, metric, on_stop):
        """The warm-started path as a screen, checked by the cold one: every point whose
        warm score comes within reach of the best (``REACH`` of the score or ``REACH_ROWS``
        held-out rows, whichever is more, plus the largest gap between a warm and a cold score
        seen so far) is solved again from zero and scored as the cold grid scores it, until no
        unchecked point is within reach. The choice is then the cold grid's wherever no
        unchecked point's warm score lies below its cold score by more than that reach; points
        solved from zero on the path (the weakly regularised end, see :meth:`_warm`) are cold
        already. The checks are not counted by ``on_stop`` (the bar counts the grid once)."""
        table, failed, warmed = self._score_folds(X, y, grid, folds, metric, on_stop)
        from sklearn.base import clone

        cold = clone(self).set_params(warm_path=False)
        failed, unchecked = set(failed), set(warmed)
        row = 1.0 / min(len(held) for _, held in folds)  # one held-out row's worth of score
        gap = 0.0
        while True:
            mean = table.mean(axis=1)
            reach = max(self.REACH, self.REACH_ROWS * row) + gap
            todo = sorted(g for g in unchecked if mean[g] >= mean.max() - reach)
            if not todo:
                return table, sorted(failed)
            again, again_failed = cold.fit_grid(X, y, [grid[g] for g in todo], folds, metric)
            gap = max(gap, float(np.abs(again.mean(axis=1) - mean[todo]).max()))
            table[todo] = again
            failed = (failed - set(todo)) | {todo[i] for i in again_failed}
            unchecked -= set(todo)

    def fit_predict_draws(self, X, y, draws: list[np.ndarray], queries: list[np.ndarray]):
        """Predicted classes of ``queries[j]`` (rows of features) by the head fitted at its C
        on ``X[draws[j]]``, every draw in one batch."""
        from featurekit.heads._torch._common import tensor

        device, dtype = self._torch_setup()
        states = [per_c[0][0] for per_c in self.solve_draws(X, y, draws, [self.C])]
        return [state["classes_"][self._predict_index(state, tensor(q, device, dtype))]
                for state, q in zip(states, queries)]


def members_per_batch(n: int, d: int, k: int, itemsize: int, budget: int,
                      history: int = 10, own_rows: bool = False) -> int:
    """How many members (C values) of a linear problem on n x d rows with k columns fit in
    ``budget`` bytes at once (at least one): each holds up to eight n x k temporaries in the
    objective at its peak (logits, shifted logits, exponentials or margins, softmax, the
    gradient's factor and their intermediates; measured on the CPU, peak memory follows the
    budget within about 10%) and about 8 + 2 history vectors of its (d + 1) k parameters in
    L-BFGS (iterate, gradient, direction, trial, the (s, y) history); ``own_rows``: each also
    gathers its own n x d rows (few-shot draws, :class:`_DrawsProblem`)."""
    per_member = itemsize * (8 * n * k + (8 + 2 * history) * (d + 1) * k + (n * d if own_rows else 0))
    return max(1, int(budget // max(1, per_member)))


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
        self.Y = targets(y, self.k, loss, X.dtype)
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
        f, G = loss_terms(self.loss, Z, self.Y[:, None, :], self.y_index.expand(n, A, 1))
        # X^T G as (G^T X)^T: a GEMM on the rows as stored (X.T's strided GEMM took twice as long)
        gW = (G.reshape(n, A * k).T @ self.X).reshape(A, k, d).permute(0, 2, 1)
        return self.regularised(f, gW, G.sum(0), W, b, self.reg[members])

    def regularised(self, f, gW, gb, W, b, reg):
        """(objective, gradient) with the penalty ||W||^2 / (2 C n) (liblinear: b too)."""
        A, d, k = W.shape
        gW = gW + reg[:, None, None] * W
        penalty = (W * W).double().sum((1, 2))
        if self.loss == "squared_hinge":  # liblinear penalises the intercept too
            gb = gb + reg[:, None] * b
            penalty = penalty + (b * b).double().sum(1)
        f = f + 0.5 * reg.double() * penalty
        return f, torch.cat([gW.reshape(A, d * k), gb], dim=1)


def targets(y, k: int, loss: str, dtype):
    """The targets of class positions ``y`` (any shape) as (..., k) columns: one-hot (one
    column, the second class, for two classes), as +1 / -1 for the squared hinge (+1 for the
    column's class)."""
    Y = ((y[..., None] == 1) if k == 1 else torch.nn.functional.one_hot(y, k)).to(dtype)
    return Y * 2 - 1 if loss == "squared_hinge" else Y


def loss_terms(loss: str, Z, Y, y_index):
    """The data term of the objective, mean over rows, (A,) in float64, and its gradient with
    respect to the decision values Z (n, A, k); ``Y`` (targets: one-hot, or +-1 for the
    squared hinge) broadcasts against Z, ``y_index`` (n, A, 1) holds each row's class."""
    n, A, k = Z.shape
    # objectives are summed in float64: in float32 the line search could not tell the last
    # decreases from rounding (gradients stay in the data's dtype)
    if loss == "squared_hinge":
        margin = torch.clamp(1 - Y * Z, min=0)
        return (margin * margin).double().sum((0, 2)) / n, -2 * Y * margin / n
    if k == 1:  # binomial
        z, t = Z[..., 0], Y[..., 0]
        f = (torch.nn.functional.softplus(z) - t * z).double().mean(0)
        return f, (torch.sigmoid(z) - t)[..., None] / n
    top = Z.amax(2, keepdim=True)  # multinomial: one exp for the log-sum-exp and the softmax
    E = torch.exp(Z - top)
    total = E.sum(2, keepdim=True)
    lse = (top + torch.log(total))[..., 0]
    f = (lse - Z.gather(2, y_index)[..., 0]).double().mean(0)
    return f, (E / total - Y) / n


class _DrawsProblem(_LinearProblem):
    """Linear classifiers on rows of their own: draw j's rows X[j] (D, m, d), one member per
    (draw, C); a member's decision values are one batched GEMM with its draw's rows."""

    def __init__(self, X, y_index, n_classes: int, loss: str, Cs, draw_of) -> None:
        D, self.n, self.d = X.shape
        self.X, self.loss = X, loss
        self.k = 1 if n_classes == 2 else n_classes
        y = torch.as_tensor(y_index, device=X.device)  # (D, m)
        self.y_index = y[..., None]
        self.Y = targets(y, self.k, loss, X.dtype)
        self.draw_of = torch.as_tensor(draw_of, device=X.device)
        self.reg = 1.0 / (Cs * self.n)

    def __call__(self, theta, members):
        W, b = self.unpack(theta)
        draws = self.draw_of[members]
        X = self.X[draws]  # (A, m, d)
        Z = (torch.bmm(X, W) + b[:, None, :]).transpose(0, 1)  # (m, A, k)
        f, G = loss_terms(self.loss, Z, self.Y[draws].transpose(0, 1),
                          self.y_index[draws].transpose(0, 1))
        G = G.transpose(0, 1)  # (A, m, k)
        gW = torch.bmm(X.transpose(1, 2), G)
        return self.regularised(f, gW, G.sum(1), W, b, self.reg[members])


@register("logistic", "torch")
class TorchLogisticHead(TorchLinearHead):
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
class TorchLinearSVCHead(TorchLinearHead):
    """Linear SVM, squared hinge, one-vs-rest, intercept penalised (liblinear's problem)."""

    _loss = "squared_hinge"


@register("nystroem", "torch")
class TorchNystroemHead(TorchLogisticHead):
    """Nystroem RBF map (scikit-learn's landmarks and normalisation), then logistic
    regression; ``gamma=None`` is 1 / n_features of the standardised features."""

    def __init__(self, C: float = 1.0, gamma: float | None = None, n_components: int = 2048,
                 max_iter: int = 1000, tol: float = 1e-4, random_state: int = 0,
                 device: str = "auto", dtype: str = "float32", warm_path: bool = False,
                 memory_budget: float | None = None) -> None:
        self.C = C
        self.gamma = gamma
        self.n_components = n_components
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.device = device
        self.dtype = dtype
        self.warm_path = warm_path
        self.memory_budget = memory_budget

    fits_together = False  # a map per draw: solve_draws does not apply

    def _grid_point(self) -> dict[str, Any]:
        return {"C": self.C, "gamma": self.gamma}

    def _solve(self, X, y, classes, grid, on_stop):
        """Per gamma of the grid: one map, then every C of that gamma in one batch."""
        Xs, base = standardised(X)
        landmarks = self._landmarks(Xs.shape[0])
        out: list[Any] = [None] * len(grid)
        for gamma in dict.fromkeys(p.get("gamma") for p in grid):
            members = [i for i, p in enumerate(grid) if p.get("gamma") == gamma]
            g = gamma_value("auto" if gamma is None else gamma, Xs.shape[1])
            components, normalization = nystroem_map(Xs[landmarks], g)
            Phi = rbf(Xs, components, g) @ normalization.T
            mapped = {**base, "gamma_": g, "components_": components.double().cpu().numpy(),
                      "normalization_": normalization.double().cpu().numpy()}
            solved = self._solve_linear(Phi, y, classes, [grid[i]["C"] for i in members], on_stop)
            for i, (state, it, ok) in zip(members, solved):
                out[i] = ({**mapped, **state}, it, ok)
            del Phi, solved
            release(X.device)  # before the next gamma's map
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
