"""k-nearest-neighbour vote on torch (CPU or CUDA): DINO's protocol (Caron et al. 2021; Wu et
al. 2018). Rows are L2-normalised (a zero row stays zero); the k training rows of highest cosine
similarity s vote for their class with weight exp(s / T); the class with the largest vote sum
wins (ties: the first class). ``predict_proba`` is each class's share of the vote.

Similarities are computed in blocks (query rows x training rows) within a memory budget and
merged into a running top-k, so no n x n matrix is ever held: a 1,000,000 x 2,048 training set
costs its rows plus the budget; queries are searched in chunks whose neighbour lists and votes
take at most the budget again (a peak of about three budgets with the blocks and topk's
temporaries). A selection (``fit_grid``) searches once per fold for the
largest k of the grid and scores every (k, T) from that one search: the top-k of a smaller k is
the first k of the larger one's. A fitted head's state is its training rows (normalised).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from featurekit.heads import register
from featurekit.heads._base import check_knn
from featurekit.heads._torch._common import TorchHead, budget_bytes, release, tensor

CPU_BUDGET_MIB = 256  # default similarity blocks on a CPU (a GPU: half of its free memory)


def normalised(X):
    """Rows scaled to unit length; a zero row (every activation dead) stays zero, as
    scikit-learn's cosine distance leaves it."""
    norms = torch.linalg.vector_norm(X, dim=1, keepdim=True)
    return X / torch.clamp(norms, min=torch.finfo(X.dtype).tiny)


def top_neighbours(Q, X, k: int, budget: int):
    """(similarities, indices) (m, k) of the k rows of ``X`` most similar to each row of ``Q``
    (both normalised), most similar first. Blocks of query rows x training rows hold at most
    ``budget`` bytes of similarities (twice that with topk's temporaries)."""
    n, item = X.shape[0], Q.element_size()
    k = min(k, n)
    cols = int(min(n, max(k, budget // (item * 512))))  # training rows per block: >= 512 queries
    rows = int(max(1, min(Q.shape[0], budget // (item * cols))))
    sims_out, index_out = [], []
    for s in range(0, Q.shape[0], rows):
        q = Q[s:s + rows]
        best_s = best_i = None
        for c in range(0, n, cols):
            v, i = (q @ X[c:c + cols].T).topk(min(k, min(cols, n - c)), dim=1)
            if best_s is not None:  # merge with the running top-k
                v, j = torch.cat([best_s, v], 1).topk(k, dim=1)
                i = torch.cat([best_i, i + c], 1).gather(1, j)
            else:
                i = i + c
            best_s, best_i = v, i
        sims_out.append(best_s)
        index_out.append(best_i)
    return torch.cat(sims_out), torch.cat(index_out)


def query_chunks(m: int, k: int, n_classes: int, itemsize: int, budget: int) -> list[slice]:
    """Slices of ``m`` query rows whose neighbour lists (k similarities and int64 indices a
    row) and float64 votes take at most ``budget`` bytes: the results of a search are bounded
    as its similarity blocks are (k extended to thousands over many queries would not be)."""
    per_row = k * (itemsize + 8) + 2 * n_classes * 8
    rows = int(max(1, min(m, budget // per_row)))
    return [slice(s, min(m, s + rows)) for s in range(0, m, rows)]


def vote(sims, index, labels, n_classes: int, k: int, T: float):
    """Each class's vote (m, n_classes), float64: the sum of exp(s / T) over the first ``k``
    neighbours of that class (DINO's weighting), each row's scaled by exp(-s_max / T) (the
    same for all of its neighbours: the shares and the winner are DINO's, and no T makes it
    overflow)."""
    s = sims[:, :k].double()
    w = torch.exp((s - s[:, :1]) / T)  # the first neighbour is the most similar
    out = torch.zeros(sims.shape[0], n_classes, dtype=torch.float64, device=sims.device)
    return out.scatter_add_(1, labels[index[:, :k]], w)


def shares(votes):
    """Each class's share of the vote: ``predict_proba``."""
    return votes / votes.sum(1, keepdim=True)


def log_shares(votes):
    """The decision values: log shares (a class without votes at the float64 floor), one
    column (log p1 - log p0) for two classes, so that ranks follow ``predict_proba``."""
    logs = torch.log(torch.clamp(shares(votes), min=1e-300))
    return logs[:, 1:] - logs[:, :1] if logs.shape[1] == 2 else logs


@register("knn", "torch")
class TorchKNNHead(TorchHead):
    """k-NN vote on L2-normalised rows, weights exp(cos / T) (DINO's protocol); ``k`` larger
    than the training rows uses every row. ``memory_budget``: MiB of similarities held at once
    (default 256 on a CPU, half the free memory on a GPU)."""

    def __init__(self, k: int = 20, T: float = 0.07, device: str = "auto",
                 dtype: str = "float32", memory_budget: float | None = None) -> None:
        self.k = k
        self.T = T
        self.device = device
        self.dtype = dtype
        self.memory_budget = memory_budget

    _memory_param = "memory_budget (MiB of similarities held at once)"

    def _expected_failed_checks(self) -> dict[str, str]:
        return {**super()._expected_failed_checks(), "check_methods_subset_invariance":
                "similarities come from float32 GEMMs whose kernels follow the block's shape: "
                "a subset's vote shares differ from the whole batch's in the 7th digit"}

    def _grid_point(self) -> dict[str, Any]:
        return {"k": self.k, "T": self.T}

    def _check(self, point: dict[str, Any]) -> None:
        check_knn(point["k"], point["T"])

    def _budget(self, device) -> int:
        return budget_bytes(self.memory_budget, device, CPU_BUDGET_MIB)

    def _solve(self, X, y, classes, grid, on_stop):
        """The state of every grid point: the normalised training rows and their labels."""
        for point in grid:
            self._check(point)
        rows = normalised(X).cpu().numpy()
        labels = np.searchsorted(classes, y)
        return [({"fit_rows_": rows, "fit_labels_": labels, "k_": int(min(p["k"], len(y))),
                  "T_": float(p["T"])}, 0, True) for p in grid]

    def neighbours(self, X, k: int | None = None):
        """(cosine similarities, training-row indices) of each row's k nearest training rows,
        most similar first (numpy)."""
        X = self._checked(X)
        device, dtype = self._torch_setup()
        sims, index = top_neighbours(normalised(tensor(X, device, dtype)),
                                     tensor(self.fit_rows_, device, dtype), k or self.k_,
                                     self._budget(device))
        return sims.double().cpu().numpy(), index.cpu().numpy()

    def _votes(self, state: dict[str, Any], X):
        device, k, n_classes = X.device, state["k_"], len(state["classes_"])
        rows = tensor(state["fit_rows_"], device, X.dtype)
        labels = torch.as_tensor(state["fit_labels_"], device=device)
        budget = self._budget(device)
        out = []
        with self.in_memory(rows):
            for part in query_chunks(X.shape[0], min(k, rows.shape[0]), n_classes,
                                     X.element_size(), budget):
                sims, index = top_neighbours(normalised(X[part]), rows, k, budget)
                out.append(vote(sims, index, labels, n_classes, k, state["T_"]))
                del sims, index
        return torch.cat(out)

    def _decide(self, state: dict[str, Any], X):
        return log_shares(self._votes(state, X))

    def _predict_index(self, state: dict[str, Any], X) -> np.ndarray:
        return self._votes(state, X).argmax(1).cpu().numpy()

    def predict_proba(self, X):
        X = self._checked(X)
        device, dtype = self._torch_setup()
        return shares(self._votes(self.__dict__, tensor(X, device, dtype))).cpu().numpy()

    def fit_grid(self, X, y, grid: list[dict[str, Any]], folds, metric: Callable,
                 on_stop: Callable[[int], None] | None = None) -> tuple[np.ndarray, list[int]]:
        """Scores (len(grid), len(folds)): per fold one search for the grid's largest k, every
        (k, T) scored from it."""
        from sklearn.utils import check_array

        for point in grid:
            self._check(point)
        X = check_array(X, dtype=[np.float64, np.float32])
        y = np.asarray(y)
        device, dtype = self._torch_setup()
        Xn = normalised(tensor(X, device, dtype))
        scores = np.empty((len(grid), len(folds)))
        for f, (train, held) in enumerate(folds):
            pred = self._fold_predictions(Xn, y, train, held, grid)
            for g in range(len(grid)):
                scores[g, f] = metric(y[held], pred[g])
            if on_stop is not None:
                on_stop(len(grid))
            release(device)
        return scores, []

    def _fold_predictions(self, Xn, y, train, held, grid) -> np.ndarray:
        """(len(grid), len(held)) predicted classes of the held-out rows by every grid point,
        from one search for the grid's largest k per chunk of held-out rows (the chunk's
        neighbour lists within the memory budget)."""
        device = Xn.device
        classes = np.unique(y[train])
        labels = torch.as_tensor(np.searchsorted(classes, y[train]), device=device)
        tr, ho = (torch.as_tensor(np.asarray(i), device=device) for i in (train, held))
        k = int(min(max(p["k"] for p in grid), len(train)))
        budget = self._budget(device)
        pred = np.empty((len(grid), len(held)), dtype=classes.dtype)
        with self.in_memory(Xn):
            rows = Xn[tr]
            for part in query_chunks(len(held), k, classes.size, Xn.element_size(), budget):
                sims, index = top_neighbours(Xn[ho[part]], rows, k, budget)
                for g, p in enumerate(grid):
                    votes = vote(sims, index, labels, classes.size, min(p["k"], len(train)), p["T"])
                    pred[g, part] = classes[votes.argmax(1).cpu().numpy()]
                del sims, index
        return pred
