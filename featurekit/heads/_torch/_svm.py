"""An exact RBF C-SVC in torch: libsvm's problem and answers, many subproblems at once.

scikit-learn's SVC is libsvm (Chang & Lin, 2011): one-vs-one over class pairs, and for each
pair the dual

    min_a  1/2 a^T Q a - e^T a,   0 <= a <= C,   y^T a = 0,   Q_st = y_s y_t K(x_s, x_t),

solved by SMO with the second-order working-set selection of Fan, Chen & Lin (2005, "WSS3"):
i maximises -y_t G_t over I_up(a), j minimises -(b_it^2 / a_it) over the t in I_low(a) that
violate with i (ties to the last index, as libsvm scans), then libsvm's analytic update of
(a_i, a_j) with its clipping, and G += Q_i da_i + Q_j da_j. A subproblem stops when its
maximal violation m(a) - M(a) < tol (libsvm's ``eps``, 1e-3); rho comes from the free
vectors (else the middle of the bounds) as libsvm's ``calculate_rho``; prediction is libsvm's
vote (ties to the lower class). Written by hand because no maintained GPU SVM speaks torch:
ThunderSVM (Wen et al., JMLR 2018) is CUDA C++, and cuML trains its one-vs-one pairs one
after another.

What runs differently from libsvm: many subproblems advance together (every class pair, and
every C of a selection: one SMO step for all unfinished ones per step); libsvm's shrinking
heuristic is not used (it changes the path, not the problem: the answers agree within the
stopping tolerance). Kernel values are float32, as libsvm's ``Qfloat``; a and G are float64.
The kernel blocks of the pairs are computed once per gamma and shared by every C; a batch
holds at most ``cache_bytes`` of them, and pairs too large for that get the two kernel rows
of each step computed on the fly from their feature rows, so memory grows with n x d, not n^2.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from featurekit.heads import register
from featurekit.heads._base import gamma_value
from featurekit.heads._torch._common import TorchHead, free_bytes, release, standardised, tensor
from featurekit.heads._torch._kernels import from_dots, rbf_blocks, rbf_cross

TAU = 1e-12  # libsvm's floor of the quadratic coefficient
INF = float("inf")


@dataclass
class Pair:
    """One one-vs-one subproblem: the training rows of class ``a`` (y = +1), then ``b`` (-1)."""

    a: int
    b: int
    rows: np.ndarray
    n_a: int


def pairs_of(y_index: np.ndarray, n_classes: int) -> list[Pair]:
    """libsvm's order (0, 1), (0, 2), ..., (1, 2), ...; rows in training order per class."""
    by_class = [np.flatnonzero(y_index == c) for c in range(n_classes)]
    return [Pair(a, b, np.concatenate([by_class[a], by_class[b]]), by_class[a].size)
            for a in range(n_classes) for b in range(a + 1, n_classes)]


@dataclass
class PairSolution:
    alpha: np.ndarray  # over the pair's rows, >= 0 (libsvm's alpha before multiplying by y)
    rho: float
    n_iter: int
    converged: bool
    objective: float  # 1/2 a^T Q a - e^T a


def solve(X, pairs: list[Pair], Cs: list[float], gamma: float, *, tol: float = 1e-3,
          max_iter: int = -1, cache_bytes: int = 1 << 30,
          on_stop: Callable[[int], None] | None = None) -> list[list[PairSolution]]:
    """Every pair at every C on the standardised rows ``X`` (a tensor): [C][pair] solutions.
    ``max_iter`` < 0: libsvm's own bound, max(10^7, 100 m) steps for a pair of m rows (then it
    has not converged). ``on_stop(1)`` each time every pair
    of some C has finished (a grid point done)."""
    out: list[list[Any]] = [[None] * len(pairs) for _ in Cs]
    left = [len(pairs)] * len(Cs)

    def finished(members) -> None:  # members of a batch: (pair, C) = divmod(s, len(Cs))
        for s in members:
            left[s % len(Cs)] -= 1
            if not left[s % len(Cs)] and on_stop is not None:
                on_stop(1)

    batch = None
    for group, blocks in _batches(pairs, X.shape[1], X.element_size(), cache_bytes):
        del batch  # one batch's blocks alive at a time: the last one's go before these are made
        batch = _Batch(X, [pairs[k] for k in group], Cs, gamma, blocks)
        n_iter, converged = _smo(batch, tol, max_iter, finished)
        rho, objective = batch.rho(), batch.objective()
        alpha = batch.alpha.cpu().numpy()
        for s in range(batch.S):
            p, c = divmod(s, len(Cs))
            pair = pairs[group[p]]
            out[c][group[p]] = PairSolution(alpha[s, : pair.rows.size].copy(), float(rho[s]),
                                            int(n_iter[s]), bool(converged[s]), float(objective[s]))
    return out


def _batches(pairs: list[Pair], d: int, itemsize: int, cache_bytes: int):
    """(pair indices, whether their kernel blocks are stored) per batch, largest pairs first,
    each batch within ``cache_bytes``: kernel blocks (P m^2 float32) where they fit, else the
    pairs' feature rows (P m d) with kernel rows computed per step."""
    order = sorted(range(len(pairs)), key=lambda k: -pairs[k].rows.size)
    group: list[int] = []
    for k in order:
        m = pairs[group[0]].rows.size if group else pairs[k].rows.size
        if (len(group) + 1) * m * m * 4 <= cache_bytes:
            group.append(k)
            continue
        if group:
            yield group, True
            group = []
        if pairs[k].rows.size ** 2 * 4 <= cache_bytes:
            group = [k]
        else:
            yield [k], False
    if group:
        yield group, True


class _Batch:
    """P pairs x nC values of C, padded to the longest pair: state (S, m), S = P * nC, member
    s = (pair s // nC, C s % nC)."""

    def __init__(self, X, pairs: list[Pair], Cs: list[float], gamma: float, blocks: bool) -> None:
        dev = X.device
        self.P, self.nC, self.S = len(pairs), len(Cs), len(pairs) * len(Cs)
        self.m = max(p.rows.size for p in pairs)
        rows = torch.zeros(self.P, self.m, dtype=torch.long, device=dev)
        y = torch.zeros(self.P, self.m, dtype=torch.float64, device=dev)
        for k, p in enumerate(pairs):
            rows[k, : p.rows.size] = torch.as_tensor(p.rows, device=dev)
            y[k, : p.n_a], y[k, p.n_a: p.rows.size] = 1.0, -1.0
        self.y = y.repeat_interleave(self.nC, dim=0)
        self.valid = self.y != 0
        self.C = torch.tensor(Cs, dtype=torch.float64, device=dev).repeat(self.P)[:, None]
        self.pair_of = torch.arange(self.P, device=dev).repeat_interleave(self.nC)
        self.gamma = gamma
        sq = (X * X).sum(1)
        self.sq = sq[rows]  # padding repeats row 0 and is masked out by ``valid``
        self.blocks = rbf_blocks(X, rows, self.sq, gamma) if blocks else None
        self.Xp = None if blocks else X[rows]  # (P, m, d) for the rows computed per step
        self.alpha = torch.zeros(self.S, self.m, dtype=torch.float64, device=dev)
        self.G = torch.where(self.valid, -1.0, 0.0).to(torch.float64)  # Qa - e at a = 0

    def kernel_rows(self, members, idx):
        """K(x_idx, x_t) for every t of each member's pair, float32: (len(members), m)."""
        pair = self.pair_of[members]
        if self.blocks is not None:  # one index_select on the blocks seen as (P m, m) rows
            return self.blocks.view(-1, self.m).index_select(0, pair * self.m + idx)
        # on the fly, every member of the batch (rows mode never compacts): the nC rows asked
        # of each pair in one (m, d) x (d, nC) product per pair
        P, nC, m, d = self.P, self.nC, self.m, self.Xp.shape[2]
        flat = self.Xp.reshape(P * m, d)
        xi = flat.index_select(0, pair * m + idx).reshape(P, nC, d)
        dots = torch.bmm(self.Xp, xi.transpose(1, 2)).transpose(1, 2).reshape(P * nC, m)
        sq_i = self.sq.reshape(-1).index_select(0, pair * m + idx)
        return from_dots(self.sq[pair], sq_i[:, None], dots, self.gamma).float()

    def rho(self):
        """libsvm's calculate_rho, per member."""
        y, a, C, yG = self.y, self.alpha, self.C, self.y * self.G
        upper, lower = self.valid & (a >= C), self.valid & (a <= 0)
        free = self.valid & ~upper & ~lower
        ub = torch.where((upper & (y < 0)) | (lower & (y > 0)), yG, INF).amin(1)
        lb = torch.where((upper & (y > 0)) | (lower & (y < 0)), yG, -INF).amax(1)
        n_free = free.sum(1)
        mean_free = torch.where(free, yG, 0.0).sum(1) / n_free.clamp(min=1)
        return torch.where(n_free > 0, mean_free, (ub + lb) / 2).cpu().numpy()

    def objective(self):
        """1/2 a^T Q a - e^T a = 1/2 sum a (G - 1), per member."""
        return (0.5 * torch.where(self.valid, self.alpha * (self.G - 1), 0.0).sum(1)).cpu().numpy()


def iteration_limit(max_iter: int, rows: int) -> int:
    """SMO steps a pair may take: ``max_iter``, or where it is negative libsvm's own bound
    (Solver::Solve: max(10^7, 100 l) for l rows), past which it stops unconverged."""
    return max_iter if max_iter >= 0 else max(10_000_000, 100 * rows)


def _last(values, largest: bool):
    """Index of the last maximum (or minimum) in each row, as libsvm's >= / <= scans find it."""
    flipped = values.flip(1)
    first = flipped.argmax(1) if largest else flipped.argmin(1)
    return values.shape[1] - 1 - first


CHECK_EVERY = 32  # SMO steps between the host's looks at a batch on a GPU (each is a sync)


def _smo(batch: _Batch, tol: float, max_iter: int, on_stop) -> tuple[np.ndarray, np.ndarray]:
    """SMO steps for every unfinished member at once; (iterations, converged) per member;
    ``on_stop(members)`` as members finish.

    The state of the running members is worked on whole (gathers and scatters along rows, no
    indexing of members per step); finished members are masked, and the running ones are
    compacted once at most half of them are left. Nothing in a step waits for the device: the
    host looks at the batch (all finished? compact? progress) every ``CHECK_EVERY`` steps; a
    finished member's extra masked steps change nothing."""
    dev = batch.alpha.device
    n_iter = torch.zeros(batch.S, dtype=torch.long, device=dev)
    converged = torch.zeros(batch.S, dtype=torch.bool, device=dev)
    finished = torch.zeros(batch.S, dtype=torch.bool, device=dev)  # per member id
    reported = torch.zeros(batch.S, dtype=torch.bool, device=dev)
    members = torch.arange(batch.S, device=dev)
    a, G, y, C, valid = batch.alpha, batch.G, batch.y, batch.C, batch.valid
    running = torch.ones(batch.S, dtype=torch.bool, device=dev)
    steps = torch.zeros(batch.S, dtype=torch.long, device=dev)
    limit = iteration_limit(max_iter, batch.m)
    every = _check_every(dev)
    for step in itertools.count(1):
        upper, lower = a >= C, a <= 0
        up = valid & torch.where(y > 0, ~upper, ~lower)
        low = valid & torch.where(y > 0, ~lower, ~upper)
        yG = y * G
        v = torch.where(up, -yG, -INF)
        i = _last(v, largest=True)
        g_max = v.gather(1, i[:, None])[:, 0]
        g_max2 = torch.where(low, yG, -INF).amax(1)
        Ki = batch.kernel_rows(members, i).double()
        grad_diff = g_max[:, None] + yG
        quad = 2.0 - 2.0 * Ki  # K(x_i, x_i) + K(x_t, x_t) - 2 K(x_i, x_t), with K(x, x) = 1
        candidate = low & (grad_diff > 0)
        obj_diff = torch.where(candidate, -(grad_diff * grad_diff) / torch.where(quad > 0, quad, TAU), INF)
        j = _last(obj_diff, largest=False)
        optimal = (g_max + g_max2 < tol) | ~candidate.any(1)
        stop = running & (optimal | (steps >= limit))
        converged[members] = converged[members] | (stop & optimal)  # on the device: no sync
        n_iter[members] = torch.where(stop, steps, n_iter[members])
        running = running & ~stop
        finished[members] = ~running
        if step % every == 0 and _report(finished, reported, on_stop) == batch.S:
            break
        Kj = batch.kernel_rows(members, j).double()
        a_i, a_j = _update(a, G, y, C[:, 0], Ki, i, j)
        old_i, old_j = a.gather(1, i[:, None])[:, 0], a.gather(1, j[:, None])[:, 0]
        d_i = torch.where(running, a_i - old_i, 0.0)
        d_j = torch.where(running, a_j - old_j, 0.0)
        y_i, y_j = y.gather(1, i[:, None])[:, 0], y.gather(1, j[:, None])[:, 0]
        G = G + y * ((y_i * d_i)[:, None] * Ki + (y_j * d_j)[:, None] * Kj)  # Q_i da_i + Q_j da_j
        a = a.scatter(1, i[:, None], (old_i + d_i)[:, None]).scatter(1, j[:, None], (old_j + d_j)[:, None])
        steps = steps + running.long()
        if step % every == 0 and batch.blocks is not None and int(running.sum()) * 2 <= running.numel():
            # compact (block mode): write back, keep the running members
            batch.alpha[members], batch.G[members] = a, G
            keep = running
            members, a, G, y, C, valid = (t[keep] for t in (members, a, G, y, C, valid))
            steps, running = steps[keep], running[keep]
    batch.alpha[members], batch.G[members] = a, G
    return n_iter.cpu().numpy(), converged.cpu().numpy()


def _check_every(dev) -> int:
    """Steps between the host's looks: ``CHECK_EVERY`` on a GPU; on the CPU, where a look
    costs nothing, every step (no masked extra steps)."""
    return CHECK_EVERY if dev.type == "cuda" else 1


def _report(finished, reported, on_stop) -> int:
    """The host's look: members finished since the last one to ``on_stop``; how many are
    finished in all."""
    new = (finished & ~reported).nonzero()[:, 0].tolist()
    if new:
        reported[new] = True
        on_stop(new)
    return int(reported.sum())


def _update(a, G, y, C, Ki, i, j):
    """libsvm's two-variable update with its clipping (Solver::Solve), for equal C_i = C_j."""
    rows = torch.arange(a.shape[0], device=a.device)
    a_i, a_j, G_i, G_j = a[rows, i], a[rows, j], G[rows, i], G[rows, j]
    y_i, y_j = y[rows, i], y[rows, j]
    Q_ij = y_i * y_j * Ki[rows, j]
    # y_i != y_j: a_i - a_j is kept
    quad = 2.0 + 2.0 * Q_ij
    delta = (-G_i - G_j) / torch.where(quad > 0, quad, TAU)
    diff = a_i - a_j
    ni, nj = a_i + delta, a_j + delta
    fix = (diff > 0) & (nj < 0)
    ni, nj = torch.where(fix, diff, ni), torch.where(fix, 0.0, nj)
    fix = (diff <= 0) & (ni < 0)
    ni, nj = torch.where(fix, 0.0, ni), torch.where(fix, -diff, nj)
    fix = (diff > 0) & (ni > C)
    ni, nj = torch.where(fix, C, ni), torch.where(fix, C - diff, nj)
    fix = (diff <= 0) & (nj > C)
    ni, nj = torch.where(fix, C + diff, ni), torch.where(fix, C, nj)
    # y_i == y_j: a_i + a_j is kept
    quad = 2.0 - 2.0 * Q_ij
    delta = (G_i - G_j) / torch.where(quad > 0, quad, TAU)
    total = a_i + a_j
    si, sj = a_i - delta, a_j + delta
    fix = (total > C) & (si > C)
    si, sj = torch.where(fix, C, si), torch.where(fix, total - C, sj)
    fix = (total <= C) & (sj < 0)
    si, sj = torch.where(fix, total, si), torch.where(fix, 0.0, sj)
    fix = (total > C) & (sj > C)
    si, sj = torch.where(fix, total - C, si), torch.where(fix, C, sj)
    fix = (total <= C) & (si < 0)
    si, sj = torch.where(fix, 0.0, si), torch.where(fix, total, sj)
    same = y_i == y_j
    return torch.where(same, si, ni), torch.where(same, sj, nj)


# --------------------------------------------------------------------------- the head


@register("svm", "torch")
class TorchSVMHead(TorchHead):
    """Exact RBF C-SVC (libsvm's problem, one-vs-one) on standardised features, by batched
    SMO. ``gamma="scale"`` is 1 / (n_features * X.var()) of the standardised X (scikit-learn's
    meaning); ``cache_size``: MiB of kernel blocks held at once (None: a quarter of the free
    GPU memory on CUDA, 1,024 on the CPU); ``max_iter`` < 0: libsvm's bound (scikit-learn's default).
    Fitted like scikit-learn's SVC: ``support_``, ``support_vectors_`` (standardised),
    ``n_support_``, ``dual_coef_`` and ``intercept_`` in libsvm's layout (scikit-learn's
    ``_dual_coef_`` / ``_intercept_``)."""

    def __init__(self, C: float = 1.0, gamma: float | str = "scale", tol: float = 1e-3,
                 cache_size: float | None = None, max_iter: int = -1, device: str = "auto",
                 dtype: str = "float32") -> None:
        self.C = C
        self.gamma = gamma
        self.tol = tol
        self.cache_size = cache_size
        self.max_iter = max_iter
        self.device = device
        self.dtype = dtype

    def _grid_point(self) -> dict[str, Any]:
        return {"C": self.C, "gamma": self.gamma}

    _memory_param = "cache_size (MiB of kernel blocks held at once)"

    def _cache_bytes(self, device) -> int:
        """Bytes of kernel blocks held at once: ``cache_size`` MiB, or on a GPU a quarter of
        the memory free now (torch's cached blocks counted as free); their build temporaries
        are bounded apart (:func:`rbf_blocks`)."""
        if self.cache_size is not None:
            return int(float(self.cache_size) * (1 << 20))
        if torch.device(device).type == "cuda":
            return free_bytes(device) // 4
        return 1 << 30

    def _solve(self, X, y, classes, grid, on_stop):
        """Per gamma of the grid: the pairs' kernel blocks once, every C of that gamma in the
        same batches."""
        Xs, base = standardised(X)
        y_index = np.searchsorted(classes, y)
        pairs = pairs_of(y_index, classes.size)
        out: list[Any] = [None] * len(grid)
        for gamma in dict.fromkeys(p.get("gamma", "scale") for p in grid):
            members = [i for i, p in enumerate(grid) if p.get("gamma", "scale") == gamma]
            g = gamma_value(gamma, Xs.shape[1], lambda: Xs.double().var(unbiased=False))
            solutions = solve(Xs, pairs, [grid[i]["C"] for i in members], g, tol=self.tol,
                              max_iter=self.max_iter, cache_bytes=self._cache_bytes(X.device),
                              on_stop=on_stop)
            for i, sols in zip(members, solutions):
                state = {**base, "gamma_": g, **_model(Xs, y_index, classes.size, pairs, sols)}
                out[i] = (state, np.array([s.n_iter for s in sols]), all(s.converged for s in sols))
            del solutions
            release(X.device)  # before the next gamma's blocks are sized and built
        return out

    def _decide(self, state: dict[str, Any], X, chunk: int = 4096):
        """libsvm's decision values (n, n_pairs), positive for the pair's first class; rows in
        chunks, so that the kernel against the support vectors stays chunk x n_SV."""
        sv = torch.as_tensor(state["support_vectors_"], device=X.device, dtype=X.dtype)
        coef = torch.as_tensor(state["dual_coef_"], device=X.device, dtype=torch.float64)
        intercept = torch.as_tensor(state["intercept_"], device=X.device, dtype=torch.float64)
        n_support = [int(v) for v in state["n_support_"]]
        starts = np.concatenate([[0], np.cumsum(n_support)])
        k = len(n_support)
        out = []
        for s in range(0, X.shape[0], chunk):
            K = rbf_cross(self._features(state, X[s:s + chunk]), sv, state["gamma_"]).double()
            # contribution of class c's vectors to each of its k - 1 pairs: (rows, k - 1)
            part = [K[:, starts[c]:starts[c + 1]] @ coef[:, starts[c]:starts[c + 1]].T
                    for c in range(k)]
            cols = [part[a][:, b - 1] + part[b][:, a] for a in range(k) for b in range(a + 1, k)]
            out.append(torch.stack(cols, dim=1) + intercept)
        return torch.cat(out) if out else X.new_zeros(0, len(intercept), dtype=torch.float64)

    def _predict_index(self, state: dict[str, Any], X) -> np.ndarray:
        """libsvm's vote: each pair's winner gets one; ties go to the lower class."""
        dec = self._decide(state, X)
        k = len(state["n_support_"])
        votes = torch.zeros(X.shape[0], k, dtype=torch.long, device=X.device)
        p = 0
        for a in range(k):
            for b in range(a + 1, k):
                votes[:, a] += (dec[:, p] > 0).long()
                votes[:, b] += (dec[:, p] <= 0).long()
                p += 1
        return votes.argmax(1).cpu().numpy()  # the first maximum: the lower class

    def decision_function(self, X):
        """scikit-learn's SVC(decision_function_shape="ovr"): votes plus bounded confidences
        (n, n_classes); for two classes the pair's value, positive for the second class."""
        from sklearn.utils.multiclass import _ovr_decision_function

        X = self._checked(X)
        device, dtype = self._torch_setup()
        dec = self._decide(self.__dict__, tensor(X, device, dtype)).cpu().numpy()
        if self.classes_.size == 2:
            return -dec[:, 0]
        return _ovr_decision_function(dec < 0, -dec, self.classes_.size)


def _model(Xs, y_index: np.ndarray, n_classes: int, pairs: list[Pair],
           sols: list[PairSolution]) -> dict[str, Any]:
    """libsvm's model from the pairs' solutions: the support vectors (every row with a > 0 in
    some pair) by class, then by row; their coefficients a y per pair in the (k-1, n_SV)
    layout; intercepts -rho."""
    n = y_index.size
    is_sv = np.zeros(n, dtype=bool)
    for p, s in zip(pairs, sols):
        is_sv[p.rows[s.alpha > 0]] = True
    support = np.concatenate([np.flatnonzero(is_sv & (y_index == c)) for c in range(n_classes)])
    position = np.full(n, -1)
    position[support] = np.arange(support.size)
    coef = np.zeros((n_classes - 1, support.size))
    for p, s in zip(pairs, sols):
        nz = s.alpha > 0
        rows, signed = p.rows[nz], (s.alpha * np.where(np.arange(p.rows.size) < p.n_a, 1.0, -1.0))[nz]
        first = np.arange(p.rows.size)[nz] < p.n_a
        coef[p.b - 1, position[rows[first]]] = signed[first]  # class a's vectors: row b - 1
        coef[p.a, position[rows[~first]]] = signed[~first]  # class b's vectors: row a
    n_support = np.array([int(np.sum(y_index[support] == c)) for c in range(n_classes)], dtype=np.int32)
    sv = Xs[torch.as_tensor(support, device=Xs.device, dtype=torch.long)]
    return {"support_": support.astype(np.int32), "support_vectors_": sv.double().cpu().numpy(),
            "n_support_": n_support, "dual_coef_": coef,
            "intercept_": np.array([-s.rho for s in sols]),
            "dual_objective_": np.array([s.objective for s in sols])}
