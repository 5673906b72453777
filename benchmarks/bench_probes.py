"""Probes benchmark (issue 23): the k-NN head and the few-shot curve, featurekit's torch backend
against scikit-learn in the same run, with the answers compared.

Settings:

* ``cpu`` (the 2-core machine):
  - ``knn``: synthetic 50,000 train / 10,000 test x 512 (100 classes, non-negative like ReLU
    features), k = 20, T = 0.07: fit + predict of the torch head (float32, similarities in
    blocks of its default 256 MiB) against scikit-learn's KNeighborsClassifier (brute force,
    cosine, weights exp(-d/T): the sklearn head). Goal: torch >= 2x faster, >= 99.5% identical
    predictions.
  - ``fewshot``: ``featurekit fewshot`` (5 shot counts 1,2,5,10,20 x 20 draws, heads logistic
    and knn, parameters chosen per shot count on val) on a synthetic cache of 4,000 train /
    1,000 val / 2,000 test x 512, 20 classes, backend torch against backend sklearn. Goal:
    torch >= 3x faster; the curves' means compared.
* ``gpu`` (an H100/H200; written, not yet measured): ``knn`` at 200,000 x 2,048 train / 20,000
  test (1,000 classes), torch on CUDA against scikit-learn on the host (timed on the first
  2,000 test rows and scaled by 10); ``fewshot`` on 50,000 train / 5,000 val / 10,000 test x
  2,048, 100 classes (every draw and C of the logistic head in one batched L-BFGS on the GPU).

    python benchmarks/bench_probes.py                      # cpu setting, both parts
    python benchmarks/bench_probes.py --part knn
    python benchmarks/bench_probes.py --setting gpu --results /tmp/out
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

SETTINGS = {
    "cpu": {"knn": dict(n=50_000, m=10_000, d=512, classes=100, sk_rows=None),
            "fewshot": dict(train=4_000, val=1_000, test=2_000, d=512, classes=20)},
    "gpu": {"knn": dict(n=200_000, m=20_000, d=2048, classes=1000, sk_rows=2_000),
            "fewshot": dict(train=50_000, val=5_000, test=10_000, d=2048, classes=100)},
}


def clusters(n: int, d: int, classes: int, seed: int = 0, spread: float = 3.0):
    """Class centres plus noise, clipped at zero (ReLU-like), float32."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d)).astype(np.float32)
    y = rng.integers(0, classes, n)
    X = centres[y] + spread * rng.standard_normal((n, d), dtype=np.float32)
    return np.maximum(X, 0, out=X), y


def bench_knn(cfg: dict, device: str) -> dict:
    import featurekit

    X, y = clusters(cfg["n"] + cfg["m"], cfg["d"], cfg["classes"])
    X, y, Q, yq = X[:cfg["n"]], y[:cfg["n"]], X[cfg["n"]:], y[cfg["n"]:]
    featurekit.create_head("knn", "torch", device=device).fit(X[:100], y[:100]).predict(Q[:10])  # warm
    t0 = time.perf_counter()
    torch_head = featurekit.create_head("knn", "torch", k=20, T=0.07, device=device).fit(X, y)
    pred_t = torch_head.predict(Q)
    torch_s = time.perf_counter() - t0
    rows = cfg["sk_rows"] or len(Q)
    t0 = time.perf_counter()
    sk = featurekit.create_head("knn", "sklearn", k=20, T=0.07).fit(X, y)
    pred_s = sk.predict(Q[:rows])
    sk_s = (time.perf_counter() - t0) * len(Q) / rows
    return {"train": list(X.shape), "test": len(Q), "classes": cfg["classes"], "k": 20, "T": 0.07,
            "torch_seconds": torch_s, "sklearn_seconds": sk_s,
            "sklearn_extrapolated_from_rows": rows if rows < len(Q) else None,
            "speedup": sk_s / torch_s,
            "same_predictions": float(np.mean(pred_t[:rows] == pred_s)),
            "accuracy_torch": float(np.mean(pred_t == yq)),
            "accuracy_sklearn": float(np.mean(pred_s == yq[:rows]))}


def bench_fewshot(cfg: dict, work: Path) -> dict:
    from featurekit.fewshot import run_fewshot
    from featurekit.cache import from_arrays

    n = cfg["train"] + cfg["val"] + cfg["test"]
    X, y = clusters(n, cfg["d"], cfg["classes"], seed=1, spread=6.0)
    work.mkdir(parents=True, exist_ok=True)
    cache = work / f"fewshot-{n}x{cfg['d']}.h5"
    cache.unlink(missing_ok=True)
    from_arrays(cache, X, y, {"train": cfg["train"], "val": cfg["val"], "test": cfg["test"]})
    kw = dict(shots="1,2,5,10,20", draws=20, heads="logistic,knn")
    run_fewshot(cache, shots="1", draws=2, heads="logistic,knn", backend="torch")  # warm
    out = {"cache": f"{cfg['train']}/{cfg['val']}/{cfg['test']} x {cfg['d']}, {cfg['classes']} classes",
           **{k: v for k, v in kw.items()}}
    for backend in ("torch", "sklearn"):
        t0 = time.perf_counter()
        res = run_fewshot(cache, backend=backend, jobs=None, **kw)
        out[f"{backend}_seconds"] = time.perf_counter() - t0
        out[f"{backend}_curves"] = [{k: r[k] for k in ("head", "shots", "mean", "ci_low", "ci_high", "params")}
                                    for r in res["results"]]
    out["speedup"] = out["sklearn_seconds"] / out["torch_seconds"]
    pairs = zip(out["torch_curves"], out["sklearn_curves"])
    out["max_mean_difference_points"] = max(abs(a["mean"] - b["mean"]) * 100 for a, b in pairs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="cpu")
    ap.add_argument("--part", choices=["knn", "fewshot", "all"], default="all")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    args = ap.parse_args()
    from benchmarks.bench_extract import machine, record

    device = "cuda" if args.setting == "gpu" else "cpu"
    cfg = SETTINGS[args.setting]
    out = {"benchmark": "probes", "setting": args.setting, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "machine": machine()}
    if args.part in ("knn", "all"):
        out["knn"] = bench_knn(cfg["knn"], device)
        print(json.dumps(out["knn"], indent=1), flush=True)
    if args.part in ("fewshot", "all"):
        out["fewshot"] = bench_fewshot(cfg["fewshot"], HERE / "_work")
        print(json.dumps({k: v for k, v in out["fewshot"].items() if not k.endswith("curves")}, indent=1))
    record(args, f"probes-{args.setting}{'' if args.part == 'all' else '-' + args.part}.json", out)


if __name__ == "__main__":
    main()
