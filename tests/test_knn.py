"""The k-NN head: torch and scikit-learn agree, the vote is DINO's, one search scores a grid."""

from __future__ import annotations

import numpy as np
import pytest

import featurekit
from featurekit import heads, select
from featurekit.cache import open_cache
from tests.conftest import invoke


def _digits(digits_cache):
    with open_cache(digits_cache) as c:
        return (c.features("train", "penultimate"), c.labels("train"),
                c.features("test", "penultimate"), c.labels("test"))


def _synthetic(n=5000, d=512, m=1000, classes=10, seed=0):
    """Clusters in 512-d with overlap (heads disagree somewhere), non-negative like ReLU
    features."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d))
    y = rng.integers(0, classes, n + m)
    X = np.maximum(centres[y] + 2.5 * rng.normal(size=(n + m, d)), 0)
    return X[:n], y[:n], X[n:], y[n:]


@pytest.fixture(scope="module")
def sets(digits_cache):
    return {"digits": _digits(digits_cache), "synthetic": _synthetic()}


def _same_neighbours_but_ties(sim_a, idx_a, sim_b, idx_b, tol=1e-6) -> float:
    """Share of rows whose neighbour lists are equal; where they differ, the similarities
    at those ranks must tie (within ``tol``) and the lists hold the same rows up to the last
    tied rank."""
    same = (idx_a == idx_b).all(1)
    for r in np.flatnonzero(~same):
        assert np.allclose(sim_a[r], sim_b[r], atol=tol)
        first = np.flatnonzero(idx_a[r] != idx_b[r])[0]
        assert abs(sim_a[r, first] - sim_a[r, first + 1 if first + 1 < sim_a.shape[1] else first]) < tol \
            or abs(sim_a[r, first] - sim_a[r, first - 1]) < tol
    return float(same.mean())


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_torch_and_sklearn_find_the_same_neighbours_and_predict_alike(sets, name):
    X, y, Xt, yt = sets[name]
    for k in (1, 20, 200):
        sk = featurekit.create_head("knn", "sklearn", k=k).fit(X.astype(np.float64), y)
        t64 = featurekit.create_head("knn", "torch", k=k, dtype="float64", device="cpu").fit(X, y)
        s_sk, i_sk = sk.neighbours(Xt.astype(np.float64))
        s_t, i_t = t64.neighbours(Xt)
        assert _same_neighbours_but_ties(s_sk, i_sk, s_t, i_t) > 0.99
        t32 = featurekit.create_head("knn", "torch", k=k, device="cpu").fit(X, y)  # the default
        agree = float(np.mean(t32.predict(Xt) == sk.predict(Xt)))
        assert agree >= 0.995, (k, agree)
        assert np.array_equal(t64.predict(Xt), sk.predict(Xt))


def _dino_vote(X, y, Q, k, T, n_classes):
    """DINO's k-NN vote (eval_knn.py's knn_classifier), in numpy: cosine similarity of
    L2-normalised rows, the top k, one-hot labels weighted by exp(s / T), summed."""
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    sims = Qn @ Xn.T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    s = np.take_along_axis(sims, top, 1)
    onehot = np.eye(n_classes)[y[top]]  # (m, k, classes)
    return (onehot * np.exp(s / T)[:, :, None]).sum(1)


@pytest.mark.parametrize("backend", ["torch", "sklearn"])
def test_the_vote_is_dinos_formula(sets, backend):
    X, y, Xt, yt = sets["digits"]
    X, Xt = X.astype(np.float64), Xt.astype(np.float64)
    for k, T in ((20, 0.07), (200, 0.03), (5, 0.2)):
        votes = _dino_vote(X, y, Xt, k, T, 10)
        head = featurekit.create_head("knn", backend, k=k, T=T,
                                      **({"dtype": "float64"} if backend == "torch" else {})).fit(X, y)
        np.testing.assert_allclose(head.predict_proba(Xt), votes / votes.sum(1, keepdims=True),
                                   rtol=1e-9, atol=1e-12)
        assert np.array_equal(head.predict(Xt), votes.argmax(1))
        # decision values: log shares of the vote (top-5 reads them)
        np.testing.assert_allclose(np.exp(head.decision_function(Xt)), head.predict_proba(Xt),
                                   rtol=1e-9, atol=2e-300)


def test_one_search_scores_the_grid_as_single_fits_do(sets):
    """fit_grid searches once per fold for the largest k; each (k, T) scores what fitting
    that point alone scores."""
    X, y, Xt, yt = sets["digits"]
    grid = heads.grid("knn", X.shape[1])
    assert len(grid) == 21 and {p["k"] for p in grid} == {1, 5, 10, 20, 50, 100, 200}
    folds, _ = select.folds(np.concatenate([y, yt]), len(yt), 0)
    from sklearn.metrics import accuracy_score

    head = featurekit.create_head("knn", "torch", device="cpu")
    table, failed = head.fit_grid(np.concatenate([X, Xt]), np.concatenate([y, yt]), grid, folds,
                                  accuracy_score)
    assert failed == []
    for g, p in enumerate(grid):
        alone = featurekit.create_head("knn", "torch", device="cpu", **p).fit(X, y)
        assert table[g, 0] == accuracy_score(yt, alone.predict(Xt)), p


def test_similarities_in_blocks_within_the_budget_change_nothing(sets):
    X, y, Xt, yt = sets["synthetic"]
    big = featurekit.create_head("knn", "torch", k=50, device="cpu").fit(X, y)
    small = featurekit.create_head("knn", "torch", k=50, device="cpu", memory_budget=0.05).fit(X, y)
    from featurekit.heads._torch import _knn

    calls = []
    real = _knn.top_neighbours
    _knn.top_neighbours = lambda Q, R, k, budget: calls.append(budget) or real(Q, R, k, budget)
    try:
        s_small, i_small = small.neighbours(Xt)
    finally:
        _knn.top_neighbours = real
    s_big, i_big = big.neighbours(Xt)
    assert calls == [int(0.05 * (1 << 20))]  # 52 KB: 100-row blocks of 512 x 50... merged top-k
    assert _same_neighbours_but_ties(s_big, i_big, s_small, i_small, tol=1e-5) > 0.99
    assert np.mean(big.predict(Xt) == small.predict(Xt)) >= 0.999


def test_queries_in_chunks_keep_their_neighbour_lists_within_the_budget(sets, monkeypatch):
    """A large k over many queries: predict and a selection search the queries in chunks whose
    neighbour lists (k similarities and indices a row) and votes fit memory_budget, with the
    answers of one search for all of them."""
    from sklearn.metrics import accuracy_score

    from featurekit.heads._torch import _knn

    X, y, Xt, yt = sets["synthetic"]
    budget = 0.05  # MiB: k = 200 lists of about 2.4 KB a row -> chunks of ~20 queries
    small = featurekit.create_head("knn", "torch", k=200, device="cpu", memory_budget=budget)
    big = featurekit.create_head("knn", "torch", k=200, device="cpu")
    seen, real = [], _knn.top_neighbours

    def search(Q, R, k, b):  # the bytes of the lists it returns
        sims, index = real(Q, R, k, b)
        seen.append(sims.numel() * sims.element_size() + index.numel() * index.element_size())
        return sims, index

    monkeypatch.setattr(_knn, "top_neighbours", search)
    p_small = small.fit(X, y).predict_proba(Xt)
    limit = int(budget * (1 << 20))
    assert len(seen) > 1 and max(seen) <= limit
    np.testing.assert_allclose(p_small, big.fit(X, y).predict_proba(Xt), atol=1e-5)
    grid = [{"k": k, "T": T} for k in (5, 200) for T in (0.07, 0.2)]
    folds = [(np.arange(len(y)), np.arange(len(y), len(y) + len(yt)))]
    Xa, ya = np.concatenate([X, Xt]), np.concatenate([y, yt])
    seen.clear()
    chunked = small.fit_grid(Xa, ya, grid, folds, accuracy_score)[0]
    assert len(seen) > 1 and max(seen) <= limit
    assert np.abs(chunked - big.fit_grid(Xa, ya, grid, folds, accuracy_score)[0]).max() <= 1 / len(yt)


def test_dead_rows_and_more_neighbours_than_rows():
    """A row of zeros (every activation dead) stays zero on both backends (similarity 0 to
    everything), and k larger than the training rows uses every row."""
    rng = np.random.default_rng(1)
    X = np.abs(rng.normal(size=(30, 8)))
    X[3] = 0
    y = np.arange(30) % 3
    Q = np.vstack([np.zeros(8), X[:5]])
    for backend in ("torch", "sklearn"):
        head = featurekit.create_head("knn", backend, k=200).fit(X, y)
        p = head.predict_proba(Q)
        assert np.isfinite(p).all() and np.allclose(p.sum(1), 1)
        np.testing.assert_allclose(p[0], [1 / 3] * 3, atol=1e-6)  # zero query: every row sim 0
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        featurekit.create_head("knn", "torch", k=0).fit(X, y)
    with pytest.raises(ValueError, match="T must be a number > 0"):
        featurekit.create_head("knn", "sklearn", T=-1.0).fit(X, y)


def test_fit_predict_and_bench_take_the_knn_head(digits_cache, tmp_path, runner):
    r = invoke(runner, *["fit", str(digits_cache), "--head", "knn", "--backend", "torch",
                        "--out", str(tmp_path / "knn.skops"), "--json"])
    assert r.exit_code == 0, r.output
    import json

    report = json.loads(r.stdout)
    assert set(report["params"]) == {"k", "T"} and report["selection"]["method"] == "val"
    assert len(report["selection"]["grid"]) == 21 and "top5_accuracy" in report
    r = invoke(runner, *["fit", str(digits_cache), "--head", "knn", "--k", "10", "--T", "0.07",
                        "--out", str(tmp_path / "k10.skops")])
    assert r.exit_code == 0 and "k=10" in r.stdout and "training rows" in r.stdout, r.output
    assert "MB" in r.stdout
    r = invoke(runner, *["predict", str(tmp_path / "k10.skops"), str(digits_cache),
                        "--out", str(tmp_path / "p.csv"), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["rows"] == 269, r.output
    for bad, why in ((["--head", "knn", "--C", "1"], "--C does not apply to the knn head"),
                     (["--head", "logistic", "--T", "0.1"], "--T does not apply"),
                     (["--head", "knn", "--k", "0"], "--k")):
        r = invoke(runner, *["fit", str(digits_cache), *bad, "--out", str(tmp_path / "x.skops")])
        assert r.exit_code == 2 and why in r.stderr and not (tmp_path / "x.skops").exists()
    r = invoke(runner, *["bench", str(digits_cache), "--heads", "knn:torch,knn:sklearn", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["results"]
    assert [row["backend"] for row in rows] == ["torch", "sklearn"]
    assert rows[0]["params"] == rows[1]["params"] and abs(rows[0]["accuracy"] - rows[1]["accuracy"]) <= 0.005


def test_a_best_k_beyond_the_grid_gets_chosen():
    """Labels of the training rows 46% flipped (the val rows clean): the more neighbours vote,
    the better; the grid's largest k (200) is on its edge, so selection scores k = 2,000 too
    and takes it (or more)."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(12000, 2))
    y = (X[:, 1] > 0).astype(int)
    noisy = np.where(rng.random(12000) < 0.46, 1 - y, y)
    args = ("knn", "torch", heads.grid("knn", 2, T=1.0), X[:10000], noisy[:10000], X[10000:], y[10000:])
    sel = select.select(*args)
    assert {"T": 1.0, "k": 2000} in sel.extended and sel.params["k"] >= 2000, sel
    no = select.select(*args, extend=False)
    assert no.params["k"] == 200 and no.edge == ["k"]
    # a tiny T neither overflows nor underflows the vote, on either backend
    for backend in ("torch", "sklearn"):
        p = featurekit.create_head("knn", backend, k=50, T=1e-4).fit(X[:3000], y[:3000]).predict_proba(X[10000:])
        assert np.isfinite(p).all() and np.allclose(p.sum(1), 1)
