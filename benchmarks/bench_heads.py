"""Heads benchmark: every head x backend at a fixed C, fit and predict time, accuracy, memory.

Data sets:
* ``synthetic``: 5,000 train + 1,000 test rows of 512-d features, 20 classes (``--large``:
  20,000 + 4,000 rows of 2048-d, 100 classes, for GPU machines);
* ``digits``: the digits cache of the demo (resnet18, ``--weights none``, 64 px, penultimate),
  made on the fly.

Each combination runs in a fresh process; its peak memory is the peak RSS during fit + predict
above the RSS once the data is loaded (Linux ``clear_refs`` resets the peak first). Results go to ``benchmarks/results/heads-*.json`` and the table is printed.

    python benchmarks/bench_heads.py            # 2-core CPU setting
    python benchmarks/bench_heads.py --large    # GPU machines (with cuML installed)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"


def synthetic(large: bool):
    from sklearn.datasets import make_classification

    n_train, n_test, dim, classes = (20000, 4000, 2048, 100) if large else (5000, 1000, 512, 20)
    X, y = make_classification(
        n_samples=n_train + n_test, n_features=dim, n_informative=min(dim, 128), n_redundant=0,
        n_classes=classes, n_clusters_per_class=1, class_sep=1.5, random_state=0,
    )
    X = X.astype("float32")
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


def digits():
    from featurekit.cache import open_cache
    from featurekit.extract import extract

    cache = WORK / "digits-resnet18-64.h5"
    if not cache.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        extract("digits", cache, model="resnet18", weights="none", image_size=64, device="cpu",
                progress=False)
    with open_cache(cache) as c:
        return (c.features("train", "penultimate"), c.labels("train"),
                c.features("test", "penultimate"), c.labels("test"))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def one(args) -> None:
    """Child process: load the data, fit and predict one head, print one JSON line."""
    import numpy as np

    from featurekit.fit import timed_fit, timed_predict
    from featurekit.heads import create_head

    X, y, Xt, yt = synthetic(args.large) if args.data == "synthetic" else digits()
    import gc

    head = create_head(args.head, args.backend, C=1.0)  # imports the backend before the peak reset
    gc.collect()
    _reset_peak()
    base = _status_kib("VmRSS")
    fit_s = timed_fit(head, X, y)
    pred, predict_s = timed_predict(head, Xt)  # the same timing as `featurekit fit` reports
    peak = _status_kib("VmHWM")
    print(json.dumps({
        "data": args.data, "head": args.head, "backend": args.backend, "C": 1.0,
        "n_train": int(len(y)), "n_test": int(len(yt)), "dim": int(X.shape[1]),
        "classes": int(len(np.unique(y))), "fit_seconds": fit_s, "predict_seconds": predict_s,
        "accuracy": float(np.mean(pred == yt)), "peak_mib_above_data": max(0, peak - base) / 1024,
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large", action="store_true", help="20,000 x 2048, 100 classes (GPU machines)")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", default="synthetic", help=argparse.SUPPRESS)
    ap.add_argument("--head", help=argparse.SUPPRESS)
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(args)

    from featurekit.heads import BACKENDS, HEADS, list_backends

    sys.path.insert(0, str(HERE.parent))
    from benchmarks.bench_extract import machine

    available = list_backends()
    rows = []
    datasets = ["synthetic"] + ([] if args.large else ["digits"])
    if "digits" in datasets:
        digits()  # build the cache once, outside the timed children
    for data in datasets:
        for head in HEADS:
            for backend in BACKENDS:
                if backend not in available:
                    rows.append({"data": data, "head": head, "backend": backend,
                                 "status": f"skipped: {backend} not importable"})
                    continue
                cmd = [sys.executable, __file__, "--one", "--data", data, "--head", head,
                       "--backend", backend] + (["--large"] if args.large else [])
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode != 0:
                    rows.append({"data": data, "head": head, "backend": backend,
                                 "status": f"failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}"})
                    continue
                rows.append({**json.loads(r.stdout.strip().splitlines()[-1]), "status": "ok"})
                print(f"  {data} {head} {backend}: fit {rows[-1]['fit_seconds']:.2f} s, "
                      f"acc {rows[-1]['accuracy']:.4f}", file=sys.stderr)
    result = {"benchmark": "bench_heads", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "setting": "large" if args.large else "cpu", "machine": machine(), "results": rows}
    print(f"\n{'data':10s} {'head':10s} {'backend':8s} {'fit s':>8s} {'predict s':>10s} {'accuracy':>9s} {'peak MiB':>9s}  status")
    for r in rows:
        if r["status"] == "ok":
            print(f"{r['data']:10s} {r['head']:10s} {r['backend']:8s} {r['fit_seconds']:8.3f} "
                  f"{r['predict_seconds']:10.4f} {r['accuracy']:9.4f} {r['peak_mib_above_data']:9.1f}  ok")
        else:
            print(f"{r['data']:10s} {r['head']:10s} {r['backend']:8s} {'':8s} {'':10s} {'':9s} {'':9s}  {r['status']}")
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"heads-{result['setting']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"recorded in {path}")


if __name__ == "__main__":
    main()
