"""featurekit fewshot: nested seeded draws, Student's t intervals, selection off the reported
split, episodes, refusals."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from featurekit.fewshot import draw_order, run_fewshot, shot_rows, t_interval
from tests.conftest import array_cache, invoke


def _rows(n_per_class=(30,) * 6, d=48, seed=0, spread=2.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(n_per_class), d))
    y = np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)])
    rng.shuffle(y)
    return (centres[y] + spread * rng.normal(size=(len(y), d))).astype(np.float32), y


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """(with val, without val, each also with its test labels scrambled)."""
    root = tmp_path_factory.mktemp("fewshot")
    X, y = _rows((50,) * 6)
    out = {}
    for name, splits in (("val", {"train": 180, "val": 60, "test": 60}),
                         ("noval", {"train": 240, "test": 60})):
        path = array_cache(root / f"{name}.h5", X, y, splits)
        scrambled = root / f"{name}-s.h5"
        scrambled.write_bytes(path.read_bytes())
        with h5py.File(scrambled, "a") as f:
            f["test"]["labels"][:] = np.random.default_rng(1).permutation(f["test"]["labels"][:])
        out[name], out[f"{name}-s"] = path, scrambled
    return out


def test_draws_are_nested_and_seeded():
    y = np.repeat(np.arange(4), 12)
    a, b, c = draw_order(y, 3, 7), draw_order(y, 3, 7), draw_order(y, 3, 8)
    for d in range(3):
        assert all(np.array_equal(a[d][k], b[d][k]) for k in a[d])
        one, five, ten = (set(shot_rows(a[d], s, range(4))) for s in (1, 5, 10))
        assert one < five < ten and len(five) == 20
        assert all(set(np.flatnonzero(y == k)) >= set(a[d][k][:10]) for k in range(4))
    assert any(not np.array_equal(a[0][k], c[0][k]) for k in a[0])
    assert any(not np.array_equal(a[0][k], a[1][k]) for k in a[0])  # draws differ


def test_the_interval_is_scipys_student_t():
    from scipy import stats

    acc = [0.61, 0.58, 0.66, 0.63, 0.59, 0.7, 0.64]
    mean, std, low, high = t_interval(acc)
    ref = stats.t.interval(0.95, len(acc) - 1, loc=np.mean(acc), scale=stats.sem(acc))
    assert np.allclose([low, high], ref, rtol=0, atol=1e-12)
    assert std == pytest.approx(np.std(acc, ddof=1))
    assert np.isnan(t_interval([0.5])[2])  # one draw: no interval


@pytest.mark.parametrize("which", ["val", "noval"])
def test_the_reported_split_never_chooses(caches, which):
    """Test labels scrambled: the per-draw parameters and every selection score stay, the
    reported accuracies move; the result's interval is scipy's on its own accuracies."""
    from scipy import stats

    kw = dict(shots="1,3,10", draws=6, heads="logistic,knn", backend="torch")
    a, b = (run_fewshot(caches[k], **kw) for k in (which, f"{which}-s"))
    for ra, rb in zip(a["results"], b["results"]):
        assert ra["params"] == rb["params"] and ra["selection"]["scores"] == rb["selection"]["scores"]
        assert ("val" in ra["selection"]["method"]) == (which == "val")
        acc = ra["accuracies"]
        ref = stats.t.interval(0.95, len(acc) - 1, loc=np.mean(acc), scale=stats.sem(acc))
        assert np.allclose([ra["ci_low"], ra["ci_high"]], ref, atol=1e-12)
    assert [r["accuracies"] for r in a["results"]] != [r["accuracies"] for r in b["results"]]
    again = run_fewshot(caches[which], **kw)  # the same seed: the same draws and numbers
    assert [r["accuracies"] for r in again["results"]] == [r["accuracies"] for r in a["results"]]


def test_outputs_episodes_and_fixed_parameters(caches, tmp_path, runner):
    r = invoke(runner, "fewshot", caches["val"], "--shots", "1,5", "--draws", "3", "--heads",
               "logistic,knn", "--C", "1", "--k", "5", "--out", tmp_path / "fs", "--no-progress")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "fs").iterdir()) == [
        "fewshot.csv", "fewshot.json", "fewshot.md", "fewshot.png"]
    res = json.loads((tmp_path / "fs" / "fewshot.json").read_text())
    assert [(x["head"], x["shots"], x["params"].get("C"), x["params"].get("k"))
            for x in res["results"]] == [("logistic", 1, 1.0, None), ("logistic", 5, 1.0, None),
                                         ("knn", 1, None, 5), ("knn", 5, None, 5)]
    assert res["results"][0]["selection"]["method"] == "given"  # C fixed: nothing chosen
    assert res["results"][2]["selection"]["method"].startswith("val")  # T still chosen
    r = invoke(runner, "fewshot", caches["val"], "--out", tmp_path / "fs", "--draws", "2")
    assert r.exit_code == 2 and "--overwrite" in r.stderr
    res = run_fewshot(caches["val"], shots="2", draws=4, heads="knn", ways=3, queries=4, k=5, T=0.07)
    row = res["results"][0]
    assert row["n_eval"] == 12 and len(row["accuracies"]) == 4 and res["episodes"] == {"ways": 3, "queries": 4}


def test_bad_input_is_one_line(caches, tmp_path, runner):
    X, y = _rows((12, 12, 12, 3))  # the last class holds 3 training images at most
    small = array_cache(tmp_path / "small.h5", X, y, {"train": 30, "val": 4, "test": 5})
    with pytest.warns(UserWarning, match="left out at this shot count"):
        res = run_fewshot(small, shots="1,5", draws=2, heads="knn", k=3, T=0.07)
    assert [r["classes"] for r in res["results"]] == [4, 3]
    for args, why in ((["--shots", "40"], "fewer than two classes hold 40"),
                      (["--draws", "0"], "--draws"),
                      (["--shots", "0,2"], "--shots"),
                      (["--shots", "a"], "--shots"),
                      (["--queries", "5"], "--queries needs --ways"),
                      (["--heads", "knn", "--C", "1"], "--C applies to none of the heads"),
                      (["--shots", "2", "--ways", "9"], "--ways 9"),
                      (["--heads", "forest"], "unknown head")):
        r = invoke(runner, "fewshot", small, *args, "--out", tmp_path / "o")
        assert r.exit_code == 2 and why in r.stderr and r.stderr.count("\n") == 1, (args, r.stderr)
        assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("head", ["logistic", "linearsvc"])
def test_draws_in_one_batch_fit_what_single_fits_do(head):
    """solve_draws (every draw and C in one batched L-BFGS, rows of their own) reaches the
    optimum each draw's own fit reaches: the same predictions (but a near-tie)."""
    import featurekit

    X, y = _rows((40,) * 5, d=32)
    orders = draw_order(y, 6, 3)
    trains = [shot_rows(o, 4, range(5)) for o in orders]
    for C in (0.01, 1.0):
        est = featurekit.create_head(head, "torch", C=C, device="cpu")
        together = est.fit_predict_draws(X, y, trains, [X] * len(trains))
        for rows, pred in zip(trains, together):
            alone = featurekit.create_head(head, "torch", C=C, device="cpu").fit(X[rows], y[rows])
            assert np.mean(alone.predict(X) == pred) >= 0.99


def test_what_selection_found_is_said(tmp_path):
    """No val and a class with exactly s training images: a warning that parameters are chosen
    without it; one draw: no interval (null in the JSON, not NaN); --ways checked up front."""
    X, y = _rows((3, 20, 20), d=16)
    path = array_cache(tmp_path / "uneven.h5", X, y, {"train": 30, "test": 13})
    with h5py.File(path) as f:
        train = f["train"]["labels"][:]
    s = int(np.bincount(train).min())
    with pytest.warns(UserWarning, match="chosen without them"):
        res = run_fewshot(path, shots=str(s), draws=1, heads="knn", out=tmp_path / "o")
    assert res["results"][0]["ci_low"] is None
    assert "NaN" not in (tmp_path / "o" / "fewshot.json").read_text()
    with pytest.raises(Exception, match="--ways 3"):
        run_fewshot(path, shots="1", draws=2, heads="knn", k=1, T=0.1, ways=3, queries=50)
