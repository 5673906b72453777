"""The exact RBF SVM on torch gives libsvm's answers (scikit-learn's SVC)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import make_classification

from featurekit import heads, select
from featurekit.heads._sklearn import SVMHead
from featurekit.heads._torch._kernels import rbf_cross
from featurekit.heads._torch._svm import TorchSVMHead


@pytest.fixture(scope="module")
def datasets(digits_cache):
    from featurekit.cache import open_cache

    digits = []
    with open_cache(digits_cache) as c:
        for split in ("train", "val", "test"):
            digits += [c.features(split, "penultimate").astype(np.float64), c.labels(split)]
    X, y = make_classification(3600, 256, n_informative=64, n_classes=10, n_clusters_per_class=1,
                               random_state=0)
    Xb, yb = make_classification(700, 30, n_informative=8, random_state=1)
    return {"digits": tuple(digits),
            "synthetic": (X[:3000], y[:3000], None, None, X[3000:], y[3000:]),
            "binary": (Xb[:500], yb[:500], None, None, Xb[500:], yb[500:])}


def libsvm_objective(svc, Xs) -> float:
    """Sum over the one-vs-one pairs of 1/2 c^T K c - sum |c|, c = a y, from scikit-learn's
    fitted SVC (its libsvm layout ``_dual_coef_``)."""
    sv, coef, n_sv = svc.support_vectors_, svc._dual_coef_, svc.n_support_
    K = np.exp(-svc._gamma * np.maximum(
        (sv**2).sum(1)[:, None] + (sv**2).sum(1)[None] - 2 * sv @ sv.T, 0))
    starts = np.concatenate([[0], np.cumsum(n_sv)])
    total = 0.0
    k = len(n_sv)
    for a in range(k):
        for b in range(a + 1, k):
            ia, ib = np.arange(starts[a], starts[a + 1]), np.arange(starts[b], starts[b + 1])
            idx = np.concatenate([ia, ib])
            c = np.concatenate([coef[b - 1, ia], coef[a, ib]])
            total += 0.5 * c @ K[np.ix_(idx, idx)] @ c - np.abs(c).sum()
    return total


@pytest.mark.parametrize("name", ["digits", "synthetic", "binary"])
def test_same_answers_as_libsvm(datasets, name):
    X, y, _, _, Xt, yt = datasets[name]
    gamma = 1.0 / X.shape[1]
    for C in (1.0, 10.0):
        ref = SVMHead(C=C, gamma=gamma).fit(X, y)
        ours = TorchSVMHead(C=C, gamma=gamma).fit(X, y)  # float32 kernels, as libsvm's cache
        svc = ref.pipeline_[-1]
        assert np.mean(ours.predict(Xt) == ref.predict(Xt)) >= 0.99
        f_ref = libsvm_objective(svc, ref.pipeline_[0].transform(X)[svc.support_])
        f_ours = float(ours.dual_objective_.sum())
        assert abs(f_ours - f_ref) <= 1e-3 * abs(f_ref), (f_ours, f_ref)
        assert abs(len(ours.support_) - len(svc.support_)) <= 0.02 * len(svc.support_)
        assert ours.n_support_.sum() == len(ours.support_) and len(ours.n_support_) == len(ref.classes_)
        assert ours.decision_function(Xt).shape == ref.decision_function(Xt).shape
        assert np.corrcoef(ours.decision_function(Xt).ravel(), ref.decision_function(Xt).ravel())[0, 1] > 0.999


def test_binary_sign_and_values(datasets):
    X, y, _, _, Xt, yt = datasets["binary"]
    ref = SVMHead(C=1.0, gamma=0.05).fit(X, y)
    ours = TorchSVMHead(C=1.0, gamma=0.05, dtype="float64").fit(X, y)
    d_ref, d_ours = ref.decision_function(Xt), ours.decision_function(Xt)
    assert d_ours.shape == (len(Xt),) and np.abs(d_ours - d_ref).max() < 1e-6
    assert np.array_equal(ours.predict(Xt), ref.predict(Xt))
    assert np.array_equal(ours.predict(Xt), ours.classes_[(d_ours > 0).astype(int)])


def test_selection_picks_the_same_grid_point(datasets):
    X, y, Xv, yv, _, _ = datasets["digits"]
    grid = heads.grid("svm", X.shape[1])
    ours = select.select("svm", "torch", grid, X, y, Xv, yv)
    ref = select.select("svm", "sklearn", grid, X, y, Xv, yv, jobs=1)
    assert ours.params == ref.params
    assert np.abs(np.array(ours.scores) - np.array(ref.scores)).max() <= 2 / len(yv)


def test_batched_selection_equals_fitting_each_point(datasets):
    from sklearn.metrics import accuracy_score

    X, y, _, _, Xt, yt = datasets["synthetic"]
    X, y = X[:900], y[:900]
    grid = heads.grid("svm", X.shape[1])[::2]
    fast = select.select("svm", "torch", grid, X, y, Xt, yt, extend=False)
    loop = [accuracy_score(yt, TorchSVMHead(**p).fit(X, y).predict(Xt)) for p in grid]
    assert np.allclose(fast.scores, loop, atol=1e-6, rtol=0)


def test_a_small_cache_computes_kernel_rows_on_the_fly(datasets):
    """Pairs whose kernel blocks exceed cache_size get their two kernel rows per step from
    the feature rows: the same answers, memory n x d instead of n^2."""
    X, y, _, _, Xt, yt = datasets["synthetic"]
    X, y = X[:900], y[:900]
    big = TorchSVMHead(C=10.0, dtype="float64").fit(X, y)
    small = TorchSVMHead(C=10.0, dtype="float64", cache_size=0.1).fit(X, y)  # 100 KiB: rows
    assert np.array_equal(big.support_, small.support_)
    assert np.allclose(big.dual_coef_, small.dual_coef_, atol=1e-8)
    assert np.array_equal(big.predict(Xt), small.predict(Xt))


def test_fitted_state_is_numpy_and_round_trips(datasets, tmp_path):
    import torch

    from featurekit.fit import FitResult
    from featurekit.headfile import load_head, save_head

    X, y, _, _, Xt, _ = datasets["binary"]
    est = TorchSVMHead(C=1.0).fit(X, y)
    assert not any(isinstance(v, torch.Tensor) for v in vars(est).values())
    save_head(FitResult(est, {}, {}), tmp_path / "s.skops")
    again = load_head(tmp_path / "s.skops")["head"]
    assert np.array_equal(again.predict(Xt), est.predict(Xt))


def test_rbf_cross_matches_scikit_learn():
    import torch
    from sklearn.metrics.pairwise import rbf_kernel

    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(50, 7)), rng.normal(size=(30, 7))
    ours = rbf_cross(torch.tensor(A), torch.tensor(B), 0.3, chunk=16).numpy()
    assert np.allclose(ours, rbf_kernel(A, B, gamma=0.3))


def test_kernel_blocks_and_decisions_in_chunks_equal_whole():
    """Blocks are built a few pairs at a time and decisions a few rows at a time (memory):
    the same numbers as at once."""
    import torch

    from featurekit.heads._torch._kernels import rbf_blocks

    rng = np.random.default_rng(0)
    X = torch.tensor(rng.normal(size=(60, 5)))
    rows = torch.tensor(rng.integers(0, 60, size=(4, 9)))
    sq = (X * X).sum(1)[rows]
    whole, pieces = rbf_blocks(X, rows, sq, 0.2), rbf_blocks(X, rows, sq, 0.2, chunk_bytes=1)
    assert torch.equal(whole, pieces)
    ref = np.exp(-0.2 * ((X[rows][:, :, None] - X[rows][:, None]) ** 2).sum(-1).numpy())
    assert np.allclose(whole.numpy(), ref, atol=1e-6)
    Xc, yc = make_classification(300, 10, n_classes=3, n_informative=5, random_state=0)
    head = TorchSVMHead(dtype="float64").fit(Xc, yc)
    Xt = torch.tensor(Xc)
    assert torch.allclose(head._decide(head.__dict__, Xt, chunk=7), head._decide(head.__dict__, Xt))
