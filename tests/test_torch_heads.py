"""featurekit's torch heads give scikit-learn's answers; batched selection equals the loop; the
linear-evaluation protocol (grids, refit, metric, warnings, jobs)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from sklearn.datasets import make_classification

from featurekit import heads, select
from featurekit.heads._sklearn import LinearSVCHead, LogisticHead, NystroemHead
from featurekit.heads._torch._linear import TorchLinearSVCHead, TorchLogisticHead, TorchNystroemHead
from tests.conftest import invoke


def _split(X, y, n_train):
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


@pytest.fixture(scope="module")
def datasets(digits_cache):
    from featurekit.cache import open_cache

    with open_cache(digits_cache) as c:  # float64, so that scikit-learn computes in float64
        digits = (c.features("train", "penultimate").astype(np.float64), c.labels("train"),
                  c.features("test", "penultimate").astype(np.float64), c.labels("test"))
    X, y = make_classification(900, 40, n_informative=12, n_classes=4, random_state=0)
    Xb, yb = make_classification(600, 30, n_informative=8, random_state=1)
    return {"digits": digits, "multiclass": _split(X, y, 600), "binary": _split(Xb, yb, 400)}


def _standardised(est, X):
    return est.pipeline_[0].transform(X)  # scikit-learn's own scaler, for both heads


def logistic_objective(Xs, y, classes, coef, intercept, C):
    """scikit-learn's: mean cross-entropy + ||W||^2 / (2 C n), intercept not penalised."""
    yi = np.searchsorted(classes, y)
    if coef.shape[0] == 1:  # binomial
        z = Xs @ coef[0] + intercept[0]
        loss = np.mean(np.logaddexp(0, z) - yi * z)
    else:
        Z = Xs @ coef.T + intercept
        loss = np.mean(logsumexp(Z, axis=1) - Z[np.arange(len(y)), yi])
    return loss + (coef**2).sum() / (2 * C * len(y))


def liblinear_objective(Xs, y, classes, coef, intercept, C):
    """liblinear's squared-hinge problem, one-vs-rest, intercept penalised: summed over the
    per-class problems, 1/2 (|w|^2 + b^2) + C sum max(0, 1 - y (w.x + b))^2."""
    yi = np.searchsorted(classes, y)
    Y = np.where(yi == 1, 1.0, -1.0)[:, None] if coef.shape[0] == 1 else \
        np.where(yi[:, None] == np.arange(len(classes)), 1.0, -1.0)
    margin = np.maximum(0, 1 - Y * (Xs @ coef.T + intercept))
    return 0.5 * ((coef**2).sum() + (intercept**2).sum()) + C * (margin**2).sum()


@pytest.mark.parametrize("name", ["digits", "multiclass", "binary"])
def test_logistic_matches_scikit_learn(datasets, name):
    X, y, Xt, yt = datasets[name]
    for C in (0.01, 1.0):
        ref = LogisticHead(C=C, tol=1e-10, max_iter=20000).fit(X, y)
        ours = TorchLogisticHead(C=C, tol=1e-10, max_iter=20000, dtype="float64").fit(X, y)
        Xs, lr = _standardised(ref, X), ref.pipeline_[-1]
        f_ref = logistic_objective(Xs, y, ref.classes_, lr.coef_, lr.intercept_, C)
        f_ours = logistic_objective(Xs, y, ours.classes_, ours.coef_, ours.intercept_, C)
        assert abs(f_ours - f_ref) <= 1e-6 * abs(f_ref), (C, f_ours, f_ref)
        assert abs(np.mean(ours.predict(Xt) == yt) - np.mean(ref.predict(Xt) == yt)) <= 0.005
        # default tolerance, float32: the same predictions (at least 99%)
        a, b = TorchLogisticHead(C=C).fit(X, y), LogisticHead(C=C).fit(X, y)
        assert np.mean(a.predict(Xt) == b.predict(Xt)) >= 0.99
        assert a.predict_proba(Xt).shape == b.predict_proba(Xt).shape
        assert np.abs(a.predict_proba(Xt) - b.predict_proba(Xt)).max() < 0.05


@pytest.mark.parametrize("name", ["digits", "multiclass", "binary"])
def test_linearsvc_matches_liblinear(datasets, name):
    X, y, Xt, yt = datasets[name]
    for C in (0.001, 0.1):
        ref = LinearSVCHead(C=C, tol=1e-8, max_iter=200000).fit(X, y)
        ours = TorchLinearSVCHead(C=C, tol=1e-9, max_iter=20000, dtype="float64").fit(X, y)
        Xs, svc = _standardised(ref, X), ref.pipeline_[-1]
        f_ref = liblinear_objective(Xs, y, ref.classes_, svc.coef_, svc.intercept_, C)
        f_ours = liblinear_objective(Xs, y, ours.classes_, ours.coef_, ours.intercept_, C)
        assert abs(f_ours - f_ref) <= 1e-4 * abs(f_ref), (C, f_ours, f_ref)
        assert abs(np.mean(ours.predict(Xt) == yt) - np.mean(ref.predict(Xt) == yt)) <= 0.005
        a, b = TorchLinearSVCHead(C=C).fit(X, y), LinearSVCHead(C=C).fit(X, y)
        assert np.mean(a.predict(Xt) == b.predict(Xt)) >= 0.99
        assert a.decision_function(Xt).shape == b.decision_function(Xt).shape


@pytest.mark.parametrize("name", ["digits", "multiclass", "binary"])
def test_nystroem_matches_scikit_learn_with_the_same_landmarks(datasets, name):
    X, y, Xt, yt = datasets[name]
    m = 300 if name != "digits" else 2048  # digits: every training row is a landmark
    ref = NystroemHead(C=1.0, n_components=m, tol=1e-8).fit(X, y)
    ours = TorchNystroemHead(C=1.0, n_components=m, tol=1e-8, dtype="float64").fit(X, y)
    landmarks = ref.pipeline_[-1][0].component_indices_
    assert np.array_equal(ours._landmarks(len(X)), landmarks)
    assert np.allclose(ours.components_, _standardised(ref, X)[landmarks])
    acc_ref, acc_ours = np.mean(ref.predict(Xt) == yt), np.mean(ours.predict(Xt) == yt)
    assert abs(acc_ours - acc_ref) <= 0.005, (acc_ours, acc_ref)
    if name == "digits":  # defaults (float32 on the torch side) agree too
        ref, ours = NystroemHead(C=1.0).fit(X, y), TorchNystroemHead(C=1.0).fit(X, y)
        assert abs(np.mean(ours.predict(Xt) == yt) - np.mean(ref.predict(Xt) == yt)) <= 0.005


@pytest.mark.parametrize("head", ["logistic", "linearsvc", "nystroem"])
@pytest.mark.parametrize("with_val", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_batched_selection_equals_the_loop(datasets, head, with_val, dtype):
    """fit_grid's scores are those of fitting each grid point on each fold by itself."""
    from sklearn.metrics import accuracy_score

    X, y, Xt, yt = datasets["multiclass"]
    X_sel, y_sel = (Xt, yt) if with_val else (None, None)
    grid = heads.grid(head, X.shape[1])
    if head == "nystroem":
        grid = grid[::4]  # every C and gamma appears; fewer fits
    params = {"dtype": dtype, "warm_path": False,  # each C from zero, as a single fit
              **({"n_components": 200} if head == "nystroem" else {})}
    fast = select.select(head, "torch", grid, X, y, X_sel, y_sel, head_params=params, cv=None
                         if with_val else 5, extend=False)
    Xa, ya = (np.concatenate([X, Xt]), np.concatenate([y, yt])) if with_val else (X, y)
    splits, method = select.folds(ya, len(yt) if with_val else 0, seed=0, cv=None if with_val else 5)
    loop = [np.mean([accuracy_score(ya[te], heads.create_head(head, "torch", **params, **p)
                                    .fit(Xa[tr], ya[tr]).predict(Xa[te])) for tr, te in splits])
            for p in grid]
    assert fast.method == method == ("val" if with_val else "5-fold cv")
    assert fast.params == grid[int(np.argmax(loop))]
    assert np.allclose(fast.scores, loop, atol=1e-6, rtol=0)


@pytest.mark.parametrize("head", ["logistic", "linearsvc", "nystroem"])
def test_the_gpu_batched_path_on_the_cpu(datasets, head, monkeypatch):
    """What runs on a GPU (every C of a fold in one batch, members leaving as they converge)
    gives the one-at-a-time solutions up to the solver's tolerance."""
    from featurekit.heads._torch import _linear

    X, y, Xt, yt = datasets["multiclass"]
    grid = heads.grid(head, X.shape[1])[:: 3 if head == "nystroem" else 1]
    params = {"dtype": "float64", "tol": 1e-8, **({"n_components": 200} if head == "nystroem" else {})}
    params["warm_path"] = False
    alone = select.select(head, "torch", grid, X, y, Xt, yt, head_params=params, extend=False)
    monkeypatch.setattr(_linear, "batch_on", lambda device: True)
    batched = select.select(head, "torch", grid, X, y, Xt, yt, head_params=params, extend=False)
    assert batched.params == alone.params
    assert np.allclose(batched.scores, alone.scores, atol=2 / len(yt))  # a near-tie may flip


def test_grids_of_the_protocol():
    assert [len(heads.grid(h, 512)) for h in ("logistic", "linearsvc", "nystroem", "svm")] == [23, 13, 27, 12]
    C = [p["C"] for p in heads.grid("logistic", 512)]
    assert C[0] == pytest.approx(1e-6) and C[-1] == pytest.approx(1e5)
    assert np.allclose(np.diff(np.log10(C)), 0.5)
    C = [p["C"] for p in heads.grid("linearsvc", 512)]
    assert C[0] == pytest.approx(1e-5) and C[-1] == pytest.approx(10)
    nys = heads.grid("nystroem", 512)
    assert sorted({p["gamma"] for p in nys}) == [0.25 / 512, 1 / 512, 4 / 512]
    assert sorted({p["C"] for p in nys}) == pytest.approx([10.0**e for e in range(-3, 6)])


def test_refit_metric_and_report(digits_cache, tmp_path, runner):
    r = invoke(runner, "fit", digits_cache, "--head", "logistic", "--backend", "torch",
               "--out", tmp_path / "h.skops", "--json", "--no-refit", "--select-metric",
               "balanced_accuracy")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["backend"] == "torch" and rep["n_train"] == 1259
    assert rep["selection"]["refit"] == "train" and rep["selection"]["metric"] == "balanced_accuracy"
    assert rep["selection_seconds"] > 0 and len(rep["selection"]["scores"]) == 23
    r = invoke(runner, "fit", digits_cache, "--head", "logistic", "--backend", "torch",
               "--out", tmp_path / "h2.skops", "--json")
    rep2 = json.loads(r.stdout)
    assert rep2["n_train"] == 1259 + 269 and rep2["selection"]["refit"] == "train+val"
    r = invoke(runner, "fit", digits_cache, "--head", "logistic", "--out", tmp_path / "h3.skops",
               "--select-metric", "f1")
    assert r.exit_code == 2 and "--select-metric" in r.stderr


def test_a_choice_on_the_grids_edge_is_one_warning_line(datasets):
    """Selection records the edge (it never warns itself: it may run on a worker); the
    command that asked for it words it as one line (fit_head and bench warn with it)."""
    X, y, Xt, yt = datasets["multiclass"]
    flat = select.select("logistic", "torch", [{"C": 1e-6}, {"C": 1e-5}], X, y, Xt, yt, extend=False)
    assert flat.scores[0] == flat.scores[1] and not flat.edge  # C changed nothing: no edge
    grid = [{"C": 1e-6}, {"C": 1.0}]  # two points that score apart: the winner is on an edge
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sel = select.select("logistic", "torch", grid, X, y, Xt, yt, extend=False)
    assert not [w for w in caught if "edge" in str(w.message)]
    edge = select.warnings_of("logistic", "torch", sel.to_dict())
    assert len(edge) == 1 and "edge of the grid" in edge[0] and "\n" not in edge[0]
    assert sel.edge == ["C"]
    sel = select.select("logistic", "torch", [{"C": 1e-6}, {"C": 1.0}, {"C": 1e6}], X, y, Xt, yt,
                        extend=False)
    assert sel.params == {"C": 1.0} and not sel.edge  # the middle of three: no warning
    assert select.warnings_of("logistic", "torch", sel.to_dict()) == []


@pytest.mark.parametrize("backend", ["torch", "sklearn"])
def test_iteration_limit_is_one_warning_line_and_a_field(datasets, backend):
    X, y, Xt, yt = datasets["multiclass"]
    grid = heads.grid("logistic", X.shape[1])[-6:]  # weak regularisation: many iterations
    params = {"max_iter": 3, **({"warm_path": False} if backend == "torch" else {})}
    sel = select.select("logistic", backend, grid, X, y, Xt, yt, head_params=params, jobs=1,
                        extend=False)
    lines = select.warnings_of("logistic", backend, sel.to_dict(), params)
    lines = [line for line in lines if "max_iter" in line]
    assert len(lines) == 1 and "stopped at max_iter=3" in lines[0] and "\n" not in lines[0], lines
    assert sel.not_converged == grid


def test_results_do_not_depend_on_jobs(digits_cache, runner):
    runs = []
    for jobs in ("1", "2"):
        r = invoke(runner, "bench", digits_cache, "--heads", "logistic:torch,svm:sklearn",
                   "--jobs", jobs, "--json")
        assert r.exit_code == 0, r.stderr
        rows = json.loads(r.stdout)["results"]
        runs.append([{k: v for k, v in row.items() if "seconds" not in k and k != "selection"}
                     | {"scores": row["selection"]["scores"]} for row in rows])
    assert runs[0] == runs[1]


def test_a_torch_head_saves_and_predicts_on_the_cpu(datasets, tmp_path):
    from featurekit.fit import FitResult
    from featurekit.headfile import load_head, save_head

    X, y, Xt, yt = datasets["multiclass"]
    for cls in (TorchLogisticHead, TorchLinearSVCHead, TorchNystroemHead):
        est = cls(device="cpu").fit(X, y)
        import torch

        assert not any(isinstance(v, torch.Tensor) for v in vars(est).values())
        path = tmp_path / f"{cls.__name__}.skops"
        save_head(FitResult(est, {}, {}), path)
        again = load_head(path)["head"]
        assert np.array_equal(again.predict(Xt), est.predict(Xt))


def test_bad_head_parameters_are_value_errors(datasets):
    """As scikit-learn reports a bad parameter: a device that is not there, a gamma a head
    cannot take (one rule for every backend: heads.base.gamma_value)."""
    from featurekit.heads._base import gamma_value
    from featurekit.heads._torch._svm import TorchSVMHead

    X, y, _, _ = datasets["multiclass"]
    for device in ("bogus", "cuda:99" if torch.cuda.is_available() else "cuda"):
        with pytest.raises(ValueError, match="device"):
            heads.create_head("logistic", "torch", device=device).fit(X, y)
    with pytest.raises(ValueError, match="gamma must be 'auto' or a number, got 'scale'"):
        TorchNystroemHead(gamma="scale", n_components=20).fit(X, y)
    with pytest.raises(ValueError, match="gamma must be 'scale', 'auto' or a number"):
        TorchSVMHead(gamma="bogus").fit(X[:60], y[:60])
    assert gamma_value("auto", 40) == gamma_value(0.025, 40) == 0.025
    assert gamma_value("scale", 40, lambda: 2.0) == 1 / 80
    assert gamma_value("scale", 40, lambda: 0.0) == 1.0  # constant data
    with pytest.raises(ValueError):
        gamma_value(None, 40)


@pytest.mark.parametrize("head", ["logistic", "linearsvc", "nystroem"])
def test_a_warm_started_c_path_chooses_the_cold_grids_point(digits_cache, head):
    """warm_path=True starts each C from its neighbour's solution, then solves every point
    within reach of the best again from zero: the cold grid's choice, with its score bitwise
    (on these rows the unchecked warm path chose another point for logistic and nystroem: one
    image apart). Off by default (it costs more than it saves here, docs/heads.md)."""
    from sklearn.metrics import accuracy_score

    from featurekit.cache import open_cache

    with open_cache(digits_cache) as c:
        X, y = c.features("train", "penultimate"), c.labels("train")
        Xv, yv = c.features("val", "penultimate"), c.labels("val")
    grid = heads.grid(head, X.shape[1])
    params = {"n_components": 300} if head == "nystroem" else {}
    warm, cold = (select.select(head, "torch", grid, X, y, Xv, yv, extend=False,
                                head_params={**params, "warm_path": w}) for w in (True, False))
    assert heads.create_head(head, "torch").warm_path is False
    assert warm.params == cold.params
    assert max(warm.scores) == max(cold.scores)
    assert warm.not_converged == cold.not_converged
    # the path really started points from their neighbours
    Xa, ya = np.concatenate([X, Xv]), np.concatenate([y, yv])
    split = [(np.arange(len(y)), np.arange(len(y), len(ya)))]
    head_ = heads.create_head(head, "torch", **params, warm_path=True)
    assert head_._score_folds(Xa, ya, grid, split, accuracy_score, None)[2]


def test_the_cold_check_catches_what_a_warm_screen_misjudged(datasets, monkeypatch):
    """A screen that scores the cold grid's best point further below than the check's reach
    and the runner-up four rows above the best: the check solves the runner-up again, sees
    the gap, widens its reach and finds the best point -- solving again only the points
    within reach, not the whole grid."""
    from featurekit.heads._torch import _common
    from featurekit.heads._torch._linear import TorchLinearHead

    X, y, Xt, yt = datasets["multiclass"]
    grid = heads.grid("logistic", X.shape[1])
    cold = select.select("logistic", "torch", grid, X, y, Xt, yt, extend=False)
    best = grid.index(cold.params)
    other = int(np.argmax([s if g != best else -1 for g, s in enumerate(cold.scores)]))
    real, resolved = TorchLinearHead._score_folds, []

    def screen(self, X, y, points, folds, metric, on_stop):
        if not self.warm_path:
            resolved.extend(points)
            return real(self, X, y, points, folds, metric, on_stop)
        as_cold = type(self)(**{**self.get_params(), "warm_path": False})
        table, failed, _ = real(as_cold, X, y, points, folds, metric, on_stop)
        reach = max(TorchLinearHead.REACH, TorchLinearHead.REACH_ROWS / len(yt))
        table[other] = table[best] + 4 / len(yt)
        table[best] -= reach + 2 / len(yt)
        return table, failed, list(range(len(points)))

    monkeypatch.setattr(_common.TorchHead, "_score_folds", screen)
    warm = select.select("logistic", "torch", grid, X, y, Xt, yt, extend=False,
                         head_params={"warm_path": True})
    assert warm.params == cold.params and warm.scores == cold.scores
    assert grid[other] in resolved and len(resolved) < len(grid)


def test_a_best_point_beyond_the_default_grid_gets_chosen(tmp_path):
    """Rows with a linear boundary far from the centre: the RBF SVM's best point has a wider
    kernel (smaller gamma) than the default grid holds. Selection extends the grid past its
    edge (a decade a step) and chooses it; without the extension the edge is warned about."""
    import warnings

    from featurekit.fit import fit_head
    from tests.conftest import array_cache

    rng = np.random.default_rng(0)
    X = rng.normal(size=(7000, 5)).astype(np.float32)
    w = rng.normal(size=5)
    y = (X @ (w / np.linalg.norm(w)) > 2.0).astype(int)
    cache = array_cache(tmp_path / "far.h5", X, y, {"train": 3000, "val": 2000, "test": 2000})
    default = heads.grid("svm", 5)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        sel = fit_head(cache, "svm", backend="torch").report["selection"]
    assert sel["params"] not in default and sel["extended"]
    scores = dict(zip(map(str, sel["grid"]), sel["scores"]))
    assert scores[str(sel["params"])] > max(scores[str(p)] for p in default)
    assert not sel["edge"] and not [w for w in seen if "edge" in str(w.message)]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fixed = fit_head(cache, "svm", backend="torch", extend=False).report["selection"]
    assert fixed["params"] in default and fixed["edge"] and not fixed["extended"]
    assert [w for w in seen if "edge of the grid" in str(w.message)]
