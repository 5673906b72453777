"""Heads: registry, scikit-learn conformance, fit/predict/bench and their numbers."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

import featurekit
from featurekit import heads
from featurekit.cache import open_cache
from featurekit.errors import HeadError
from featurekit import extract
from featurekit.fit import metrics
from tests.conftest import invoke

# every registered (head, backend) that works on this machine
ALL_HEADS = [heads.create_head(h, b) for b in heads.list_backends() for h in heads.list_heads(b)]


@parametrize_with_checks(ALL_HEADS, expected_failed_checks=heads.expected_failed_checks)
def test_sklearn_conformance(estimator, check):
    check(estimator)


def test_expected_failures_are_sklearns_own():
    from sklearn.linear_model import LogisticRegression
    from sklearn.utils._test_common.instance_generator import _get_expected_failed_checks

    assert heads.expected_failed_checks("logistic") == _get_expected_failed_checks(LogisticRegression())
    assert set(heads.expected_failed_checks("svm")) <= {
        "check_sample_weight_equivalence_on_dense_data", "check_sample_weight_equivalence_on_sparse_data",
        "check_class_weight_classifiers"}


def test_registry_lists_and_refuses(monkeypatch):
    assert featurekit.list_heads() == ["knn", "linearsvc", "logistic", "nystroem", "svm"]
    assert {"sklearn", "torch"} <= set(heads.list_backends())
    h = featurekit.create_head("svm", C=3.0)
    assert h.get_params()["C"] == 3.0 and h.backend == "sklearn"
    with pytest.raises(HeadError, match="valid heads: logistic, linearsvc, svm"):
        featurekit.create_head("forest")
    with pytest.raises(HeadError, match="unknown backend 'tpu'"):
        featurekit.create_head("svm", backend="tpu")
    monkeypatch.setitem(heads._LOADED, "cuml", True)  # as if cuML worked: no cuML nystroem
    with pytest.raises(HeadError, match="head 'nystroem' has no 'cuml' backend"):
        featurekit.create_head("nystroem", backend="cuml")
    with pytest.raises(HeadError, match="bad parameters"):
        featurekit.create_head("logistic", gamma=1.0)


def test_auto_backend_selection(monkeypatch):
    """auto, per head and device class, by measured speed: featurekit's torch heads on the
    CPU and on CUDA (every head has one); a head without the chosen backend falls back to
    scikit-learn; cuML only when named, even where it works."""
    monkeypatch.setitem(heads._LOADED, "cuml", False)
    with pytest.raises(HeadError, match="not available here"):
        heads.resolve_backend("cuml")
    monkeypatch.setitem(heads._LOADED, "cuml", True)
    for cuda in (False, True):
        monkeypatch.setattr(heads, "cuda_available", lambda: cuda)
        assert [heads.resolve_backend("auto", h) for h in heads.HEADS] == ["torch"] * 5
    monkeypatch.setitem(heads._REGISTRY, ("forest", "sklearn"), object)  # a head torch lacks
    monkeypatch.setattr(heads, "HEADS", (*heads.HEADS, "forest"))
    assert heads.resolve_backend("auto", "forest") == "sklearn"
    assert heads.resolve_backend("cuml") == "cuml"


def _cuml_stand_in(monkeypatch, calls: list) -> None:
    """scikit-learn standing in for cuML's modules, accepting and recording cuML's own
    parameters and output-type contexts (the real cuML is tested by
    test_cuml_heads_when_available on GPU machines)."""
    import contextlib
    import sys
    import types

    import sklearn.linear_model
    import sklearn.preprocessing
    import sklearn.svm

    class LogisticRegression(sklearn.linear_model.LogisticRegression):
        def __init__(self, C=1.0, max_iter=100, tol=1e-4, output_type=None):
            super().__init__(C=C, max_iter=max_iter, tol=tol)
            self.output_type = output_type

        def fit(self, X, y):
            calls.append(("logistic", X.dtype, self.output_type))
            return super().fit(X, y)

    class LinearSVC(sklearn.svm.LinearSVC):
        def __init__(self, C=1.0, max_iter=1000, tol=1e-4, penalized_intercept=False, output_type=None):
            super().__init__(C=C, max_iter=max_iter, tol=tol)
            self.penalized_intercept, self.output_type = penalized_intercept, output_type

        def fit(self, X, y):
            calls.append(("linearsvc", X.dtype, self.output_type, self.penalized_intercept))
            return super().fit(X, y)

    class SVC(sklearn.svm.SVC):
        def __init__(self, C=1.0, kernel="rbf", gamma="scale", tol=1e-3, cache_size=200,
                     output_type=None):
            super().__init__(C=C, kernel=kernel, gamma=gamma, tol=tol, cache_size=cache_size)
            self.output_type = output_type

        def fit(self, X, y):
            calls.append(("svm", X.dtype, self.output_type, self.gamma))
            return super().fit(X, y)

    @contextlib.contextmanager
    def using_output_type(kind):
        calls.append(("context", kind))
        yield

    cuml = types.ModuleType("cuml")
    cuml.using_output_type = using_output_type
    modules = {
        "cuml": cuml,
        "cuml.linear_model": types.SimpleNamespace(LogisticRegression=LogisticRegression),
        "cuml.svm": types.SimpleNamespace(SVC=SVC, LinearSVC=LinearSVC),
        "cuml.preprocessing": types.SimpleNamespace(StandardScaler=sklearn.preprocessing.StandardScaler),
        "cupy": types.SimpleNamespace(cuda=types.SimpleNamespace(
            runtime=types.SimpleNamespace(getDeviceCount=lambda: 1))),
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "featurekit.heads._cuml", raising=False)
    monkeypatch.delitem(heads._LOADED, "cuml", raising=False)
    monkeypatch.setattr(heads, "_REGISTRY", dict(heads._REGISTRY))


def test_cuml_backend_wiring_with_a_stand_in(monkeypatch):
    """Registration, numpy outputs pinned, float32 after validation, gamma='scale' as
    scikit-learn computes it on all of X, liblinear's penalised intercept."""
    from sklearn.datasets import make_classification

    calls: list = []
    _cuml_stand_in(monkeypatch, calls)
    assert heads.list_backends() == ["sklearn", "torch", "cuml"]
    X, y = make_classification(300, 10, n_informative=5, n_classes=3, random_state=0)
    X[:, 3] = 7.0  # a constant column: scale must count it as zero variance, as scikit-learn does
    assert heads.list_heads("cuml") == ["linearsvc", "logistic", "svm"]
    for name in heads.list_heads("cuml"):
        h = heads.create_head(name, "cuml", C=0.5)
        assert h.backend == "cuml" and type(h).__module__ == "featurekit.heads._cuml"
        h.fit(X[:200].tolist(), y[:200])  # a list: validated first, then cast
        assert h.get_params()["C"] == 0.5 and h.decision_function(X[200:]).shape == (100, 3)
        assert np.mean(h.predict(X[200:]) == y[200:]) > 0.6
        with pytest.raises(ValueError):  # NaN is refused by the head, before cuML sees it
            h.fit(np.where(X[:50] > 1, np.nan, X[:50]), y[:50])
    fits = [c for c in calls if c[0] != "context"]
    assert all(c[1] == np.float32 and c[2] == "numpy" for c in fits)
    assert ("linearsvc", np.float32, "numpy", True) in fits
    from sklearn.preprocessing import StandardScaler

    Xs = StandardScaler().fit_transform(X[:200].astype(np.float32))
    gamma = [c[3] for c in fits if c[0] == "svm"][0]
    assert isinstance(gamma, float) and gamma == pytest.approx(1.0 / (10 * Xs.var()), rel=1e-5)
    assert {c for c in calls if c[0] == "context"} == {("context", "numpy")}
    assert set(heads.expected_failed_checks("svm", "cuml")) >= {"check_fit_idempotent"}
    assert all(heads.expected_failed_checks("logistic", "cuml").values())  # every one has a reason


def test_a_cuml_that_fails_to_load_is_unavailable_not_a_crash(monkeypatch):
    import sys
    import types

    calls: list = []
    _cuml_stand_in(monkeypatch, calls)
    broken = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(
        getDeviceCount=lambda: (_ for _ in ()).throw(RuntimeError("cudaErrorNoDevice")))))
    monkeypatch.setitem(sys.modules, "cupy", broken)
    assert heads.list_backends() == ["sklearn", "torch"]
    with pytest.raises(HeadError, match="cudaErrorNoDevice"):
        heads.resolve_backend("cuml")
    assert heads.resolve_backend("auto") == "torch"  # never cuML, whatever it does


def test_cuml_heads_when_available():
    pytest.importorskip("cuml")
    from sklearn.datasets import make_classification

    X, y = make_classification(400, 20, n_informative=10, n_classes=3, random_state=0)
    for name in heads.list_heads("cuml"):
        h = heads.create_head(name, "cuml").fit(X[:300], y[:300])
        assert np.mean(h.predict(X[300:]) == y[300:]) > 0.6
        assert h.decision_function(X[300:]).shape[0] == 100


def test_metrics_agree_with_sklearn():
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, top_k_accuracy_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 7, 200)
    scores = rng.normal(size=(200, 7))
    scores[np.arange(200), y] += 1.0
    pred = scores.argmax(1)
    m = metrics(y, pred, scores, 7)
    assert m["accuracy"] == accuracy_score(y, pred)
    assert m["balanced_accuracy"] == balanced_accuracy_score(y, pred)
    assert m["macro_f1"] == f1_score(y, pred, average="macro")
    assert m["top5_accuracy"] == top_k_accuracy_score(y, scores, k=5)
    assert np.trace(np.array(m["confusion_matrix"])) == int((pred == y).sum())
    assert "top5_accuracy" not in metrics(y % 3, pred % 3, scores[:, :3], 3)


@pytest.mark.parametrize("head,backend", [("logistic", "sklearn"), ("logistic", "torch"),
                                          ("linearsvc", "torch"), ("svm", "sklearn"),
                                          ("nystroem", "torch")])
def test_fit_and_predict_on_digits(digits_cache, tmp_path, runner, head, backend):
    """Acceptance: >= 0.90 on the held-out split; predict's CSV reproduces the accuracy.
    (scikit-learn's LinearSVC takes ~50 s for the full grid here; it is checked at fixed C
    against the torch head in test_torch_heads.py.)"""
    model = tmp_path / "h.skops"
    r = invoke(runner, "fit", digits_cache, "--head", head, "--backend", backend, "--out", model,
               "--json")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["eval_split"] == "test" and rep["selection"]["method"] == "val"
    assert rep["accuracy"] >= 0.90
    for key in ("head", "backend", "layer", "params", "balanced_accuracy", "macro_f1",
                "top5_accuracy", "fit_seconds", "predict_seconds", "n_train", "n_eval",
                "confusion_matrix"):
        assert key in rep
    # refit on train + val (the default): the saved head, the reported numbers, n_train
    assert rep["n_train"] == 1259 + 269 and rep["n_eval"] == 269
    assert rep["selection"]["refit"] == "train+val"
    preds = tmp_path / "p.csv"
    r = invoke(runner, "predict", model, digits_cache, "--out", preds)
    assert r.exit_code == 0, r.stderr
    with open(preds, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "label", "prediction", "score"]
    assert len(rows) == rep["n_eval"]
    acc = np.mean([row["label"] == row["prediction"] for row in rows])
    assert acc == rep["accuracy"]
    assert np.trace(np.array(rep["confusion_matrix"])) == sum(row["label"] == row["prediction"] for row in rows)


def test_class_names_round_trip(tmp_path, image_folder, runner):
    """Labels and predictions are class names; the label column equals the folder name."""
    cache = tmp_path / "c.h5"
    extract(image_folder, cache, model="resnet18", weights="none", image_size=32, device="cpu",
            workers=0, progress=False, val_fraction=0.0, test_fraction=0.34)
    model, preds = tmp_path / "h.skops", tmp_path / "p.csv"
    r = invoke(runner, "fit", cache, "--head", "logistic", "--C", "1.0", "--out", model, "--json")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["selection"]["method"] == "given" and "top5_accuracy" not in rep
    invoke(runner, "predict", model, cache, "--out", preds)
    with open(preds, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(row["path"].split("/")[0] == row["label"] for row in rows)
    assert {row["prediction"] for row in rows} <= {"cat", "dog", "owl"}
    assert np.mean([r["label"] == r["prediction"] for r in rows]) == rep["accuracy"]


def test_selection_never_sees_the_reported_split(digits_cache, tmp_path):
    """Scrambling the test labels changes the reported accuracy, never the chosen C/gamma."""
    from featurekit.fit import fit_head

    scrambled = tmp_path / "s.h5"
    scrambled.write_bytes(digits_cache.read_bytes())
    with h5py.File(scrambled, "a") as f:
        lab = f["test"]["labels"][:]
        f["test"]["labels"][:] = np.random.default_rng(0).permutation(lab)
    for head in ("logistic", "svm"):
        a = fit_head(digits_cache, head).report
        b = fit_head(scrambled, head).report
        assert a["params"] == b["params"] and a["selection"]["scores"] == b["selection"]["scores"]
        assert a["accuracy"] != b["accuracy"]


def test_the_hold_out_never_sees_the_reported_split(tmp_path, runner):
    """A cache without val (so the 20% hold-out of train chooses): scrambling the test labels
    changes the reported accuracy, never the chosen point nor any grid point's score, in fit
    and in bench."""
    from featurekit.fit import fit_head

    cache, scrambled = tmp_path / "nv.h5", tmp_path / "s.h5"
    extract("digits", cache, model="resnet18", weights="none", image_size=32, device="cpu",
            workers=0, progress=False, val_fraction=0.0, test_fraction=0.2)
    scrambled.write_bytes(cache.read_bytes())
    with h5py.File(scrambled, "a") as f:
        f["test"]["labels"][:] = np.random.default_rng(0).permutation(f["test"]["labels"][:])
    for head in ("logistic", "svm"):
        a, b = (fit_head(c, head, backend="torch").report for c in (cache, scrambled))
        assert a["selection"]["method"] == "holdout"
        assert a["params"] == b["params"] and a["selection"]["scores"] == b["selection"]["scores"]
        assert a["accuracy"] != b["accuracy"]
    benches = [json.loads(invoke(runner, "bench", c, "--heads", "logistic,nystroem", "--json").stdout)
               for c in (cache, scrambled)]
    for a, b in zip(benches[0]["results"], benches[1]["results"]):
        assert a["selection"]["method"] == "holdout" and a["params"] == b["params"]
        assert a["selection"]["scores"] == b["selection"]["scores"] and a["accuracy"] != b["accuracy"]


def test_selection_without_val_holds_out_a_fifth_of_train(tmp_path):
    """No val split: a seeded, stratified 20% of train chooses C (the same rows for the same
    seed), the chosen point is refit on all of train; --cv K asks for K-fold instead."""
    from featurekit import select
    from featurekit.fit import fit_head

    cache = tmp_path / "nv.h5"
    extract("digits", cache, model="resnet18", weights="none", image_size=32, device="cpu",
            progress=False, val_fraction=0.0, test_fraction=0.2)
    rep = fit_head(cache, "logistic", backend="torch").report
    sel = rep["selection"]
    assert (sel["method"], sel["fraction"], sel["seed"]) == ("holdout", 0.2, 0)
    assert rep["eval_split"] == "test" and sel["refit"] == "train" and len(sel["scores"]) >= 23
    with open_cache(cache) as c:
        assert rep["n_train"] == c.n_rows("train")  # all of train, the held-out fifth included
    y = np.arange(1000) % 7
    (tr, held), = select.folds(y, 0, seed=3)[0]
    (tr2, held2), = select.folds(y, 0, seed=3)[0]
    assert np.array_equal(held, held2) and len(held) == 200 and not set(tr) & set(held)
    assert np.bincount(y[held]).min() >= 28  # stratified: each class's fifth
    assert not np.array_equal(held, select.folds(y, 0, seed=4)[0][0][1])
    rep = fit_head(cache, "logistic", backend="torch", cv=3).report
    assert rep["selection"]["method"] == "3-fold cv" and rep["selection"]["seed"] == 0
    # too few rows for a fifth to hold every class: cross-validation, as folds allow
    assert select.folds(np.repeat(np.arange(5), 4), 0, seed=0)[1] == "4-fold cv"
    with pytest.raises(HeadError, match="single row"):
        select.folds(np.array([0, 0, 1]), 0, seed=0)


def test_predict_refuses_another_backbone(tmp_path, image_folder, runner):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    extract(image_folder, a, model="resnet18", weights="none", image_size=32, device="cpu",
            workers=0, progress=False)
    extract(image_folder, b, model="resnet34", weights="none", image_size=32, device="cpu",
            workers=0, progress=False)
    model = tmp_path / "h.skops"
    assert invoke(runner, "fit", a, "--head", "svm", "--C", "1", "--gamma", "0.01", "--out", model).exit_code == 0
    r = invoke(runner, "predict", model, b, "--out", tmp_path / "p.csv")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "different model" in r.stderr
    assert not (tmp_path / "p.csv").exists()
    # same model, another seed of random init: other weights
    c = tmp_path / "c.h5"
    extract(image_folder, c, model="resnet18", weights="none", seed=1, image_size=32, device="cpu",
            workers=0, progress=False)
    r = invoke(runner, "predict", model, c, "--out", tmp_path / "p.csv")
    assert r.exit_code == 2 and "weights_sha256" in r.stderr
    r = invoke(runner, "predict", model, c, "--out", tmp_path / "p.csv", "--force")
    assert r.exit_code == 0


def test_fit_errors(digits_cache, tmp_path, runner):
    r = invoke(runner, "fit", digits_cache, "--head", "forest", "--out", tmp_path / "h.skops")
    assert r.exit_code == 2 and "valid heads" in r.stderr
    r = invoke(runner, "fit", digits_cache, "--head", "svm", "--layer", "layer9", "--out", tmp_path / "h.skops")
    assert r.exit_code == 2 and "no layer 'layer9'" in r.stderr
    r = invoke(runner, "fit", digits_cache, "--head", "svm", "--eval-split", "train", "--out", tmp_path / "h.skops")
    assert r.exit_code == 2 and "training split" in r.stderr
    r = invoke(runner, "predict", tmp_path / "missing.skops", digits_cache, "--out", tmp_path / "p.csv")
    assert r.exit_code == 2 and "head file not found" in r.stderr
    junk = tmp_path / "junk.joblib"
    junk.write_bytes(b"not a pickle")
    r = invoke(runner, "predict", junk, digits_cache, "--out", tmp_path / "p.csv", "--trust")
    assert r.exit_code == 2 and "cannot load head file" in r.stderr
    junk = tmp_path / "junk.skops"
    junk.write_bytes(b"not a zip")
    r = invoke(runner, "predict", junk, digits_cache, "--out", tmp_path / "p.csv")
    assert r.exit_code == 2 and "not a skops head file" in r.stderr


def test_bench_writes_tables_and_plot(digits_cache, tmp_path, runner, monkeypatch):
    monkeypatch.setitem(heads._LOADED, "cuml", False)  # reported as skipped, whatever the machine
    out = tmp_path / "bench"
    r = invoke(runner, "bench", digits_cache, "--heads", "logistic,svm", "--backends", "sklearn,cuml",
               "--layers", "penultimate,layer3", "--out", out, "--json")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    rows = res["results"]
    assert len(rows) == 8
    ok = [x for x in rows if x["status"] == "ok"]
    assert len(ok) == 4 and all(x["accuracy"] > 0.5 for x in ok)
    assert all(x["status"].startswith("skipped") for x in rows if x["backend"] == "cuml")
    for name in ("results.csv", "results.json", "results.md", "results.png"):
        assert (out / name).stat().st_size > 0
    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 8 and float(table[0]["accuracy"]) == rows[0]["accuracy"]
    assert "| svm | sklearn | layer3 |" in (out / "results.md").read_text()
    # the plot shows one marker per combination that ran: matplotlib's first colours are there
    from PIL import Image

    px = np.asarray(Image.open(out / "results.png").convert("RGB")).reshape(-1, 3).astype(int)
    for colour in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E), (0x2C, 0xA0, 0x2C), (0xD6, 0x27, 0x28)):
        assert (np.abs(px - colour).sum(1) < 10).sum() > 20, colour


def test_a_cache_replaced_in_the_same_process_is_read_afresh(tmp_path):
    """extract -> fit (its selection's fits in worker processes) -> another cache extracted to
    the same path (overwrite) -> fit: equal to a fresh process's fit of that file. Nothing
    keeps rows between calls (featurekit 0.1's per-process row cache chose C on the old
    rows here)."""
    import subprocess
    import sys

    from featurekit.fit import fit_head

    cache = tmp_path / "c.h5"
    common = dict(model="resnet18", weights="none", image_size=32, device="cpu", workers=0,
                  progress=False)

    def report(r):
        return {k: v for k, v in r.items() if "seconds" not in k and k != "selection"} | {
            "scores": r["selection"]["scores"]}

    extract("digits", cache, seed=0, **common)
    first = report(fit_head(cache, "logistic", backend="sklearn", jobs=2).report)
    extract("digits", cache, seed=1, overwrite=True, **common)
    again = report(fit_head(cache, "logistic", backend="sklearn", jobs=2).report)
    r = subprocess.run([sys.executable, "-m", "featurekit", "fit", str(cache), "--head", "logistic",
                        "--backend", "sklearn", "--jobs", "2", "--out", str(tmp_path / "h.skops"),
                        "--json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert again == report(json.loads(r.stdout))
    assert again["scores"] != first["scores"]  # the two caches do differ


def test_bench_without_a_layer_is_one_error(digits_cache, runner):
    r = invoke(runner, "bench", digits_cache, "--layers", ",", "--heads", "logistic:torch")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "no layer given" in r.stderr
    assert "penultimate, layer3" in r.stderr


def test_wilson_interval():
    from featurekit.fit import wilson

    low, high = wilson(80, 100)  # the textbook case: 0.7112 .. 0.8666
    assert abs(low - 0.7112) < 1e-4 and abs(high - 0.8666) < 1e-4
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0 and wilson(0, 0) == [0.0, 1.0]


def test_bench_tells_where_it_is_and_what_is_left(digits_cache, runner, tmp_path):
    """Without a bar (not a terminal, or --no-progress): a line per finished head with its
    accuracy, interval, cost and the time left; results carry the interval and the cost."""
    r = invoke(runner, "bench", digits_cache, "--heads", "logistic,linearsvc", "--no-progress",
               "--out", tmp_path / "b")
    assert r.exit_code == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("bench ")]
    assert len(lines) == 2 and lines[0].startswith("bench 1/2: logistic (torch) on penultimate")
    assert "left" in lines[0] and "[" in lines[0] and "left" not in lines[1]
    rows = json.loads((tmp_path / "b" / "results.json").read_text())["results"]
    for row in rows:
        low, high = row["accuracy_ci95"]
        assert low < row["accuracy"] < high
        assert row["total_seconds"] == row["selection_seconds"] + row["fit_seconds"]
    with open(tmp_path / "b" / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert float(table[0]["accuracy_low"]) == rows[0]["accuracy_ci95"][0]
    assert "accuracy [95% CI]" in (tmp_path / "b" / "results.md").read_text()
