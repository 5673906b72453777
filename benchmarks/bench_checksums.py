"""What the cache's checksums cost (issue 21): HDF5's Fletcher-32 on every numeric chunk and a
CRC-32 of the path strings, against the same code with both off, in turn (A B A B ...).

Three measures, each a median of per-pair ratios:

* ``extract``: the whole ``featurekit extract`` process (digits, resnet18 at 64 px, CPU);
* ``write``: the cache writer alone (``CacheWriter`` add/commit/finish of synthetic rows,
  no model: the worst case, all of the time is spent in the cache);
* ``read``: ``Cache.features`` + ``labels`` of every split of that cache (what ``fit`` reads).

Plus the throughput of ``featurekit info``'s full check (``Cache.require_intact``).

    python benchmarks/bench_checksums.py              # 7 pairs, 20,000 x 2,048 float32 rows
    python benchmarks/bench_checksums.py --runs 3 --rows 4000

Records machine, versions, every run and the medians in ``benchmarks/results/checksums-cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

RUN = ("import sys\n"
       "import featurekit.cache as cache\n"
       "if sys.argv[1] == 'off': cache.CHECKED, cache._CRCS = {}, ()\n"
       "from featurekit.cli import main\n"
       "sys.argv = ['featurekit', *sys.argv[2:]]\n"
       "main()\n")


def extract_once(mode: str, out: Path) -> float:
    args = ["extract", "digits", "--out", str(out), "--overwrite", "--model", "resnet18",
            "--weights", "none", "--image-size", "64", "--device", "cpu", "--no-progress"]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", RUN, mode, *args], check=True, capture_output=True)
    return time.perf_counter() - t0


def write_once(mode: str, out: Path, X: np.ndarray, y: np.ndarray) -> float:
    import featurekit.cache as cache

    saved = cache.CHECKED, cache._CRCS
    if mode == "off":  # no filter; no CRC attributes, so none is kept
        cache.CHECKED, cache._CRCS = {}, ()
    try:
        out.unlink(missing_ok=True)
        attrs = {"model": "synthetic", "weights": "none", "layers": ["penultimate"],
                 "classes": [str(c) for c in range(10)], "dtype": "float32"}
        t0 = time.perf_counter()
        with cache.CacheWriter(out, attrs, {"train": len(X)}, {"penultimate": X.shape[1]}) as w:
            for start in range(0, len(X), 256):
                rows = slice(start, start + 256)
                w.add("train", y[rows], [f"class{c}/img_{start + i:07d}.jpg"
                                         for i, c in enumerate(y[rows])], {"penultimate": X[rows]})
                w.advance("train", min(len(X), start + 256))
            w.finish()
        return time.perf_counter() - t0
    finally:
        cache.CHECKED, cache._CRCS = saved


def read_once(path: Path) -> float:
    from featurekit.cache import open_cache

    t0 = time.perf_counter()
    with open_cache(path) as c:
        c.features("train", "penultimate"), c.labels("train")
    return time.perf_counter() - t0


def pairs(fn_on, fn_off, runs: int) -> dict:
    fn_on()  # warm-up: imports, file caches
    on, off = [], []
    for _ in range(runs):
        on.append(fn_on())
        off.append(fn_off())
    ratios = [a / b for a, b in zip(on, off)]
    return {"seconds_with": on, "seconds_without": off, "ratios": ratios,
            "ratio_median": statistics.median(ratios)}


def main() -> None:
    from benchmarks.bench_extract import WORK, machine
    from featurekit.cache import open_cache

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--results", type=Path, default=HERE / "results")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    X = rng.random((args.rows, args.dim), dtype=np.float32)
    y = rng.integers(0, 10, args.rows)
    on, off = WORK / "checksums-on.h5", WORK / "checksums-off.h5"
    result = {"benchmark": "bench_checksums", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": machine(), "rows": args.rows, "dim": args.dim,
              "megabytes": round(X.nbytes / 1e6, 1)}
    result["write"] = pairs(lambda: write_once("on", on, X, y), lambda: write_once("off", off, X, y),
                            args.runs)
    result["read"] = pairs(lambda: read_once(on), lambda: read_once(off), args.runs)
    with open_cache(on) as c:
        t = [c.require_intact()["seconds"] for _ in range(3)]
    result["info_check"] = {"seconds": t, "megabytes_per_second": round(X.nbytes / 1e6 / min(t), 1)}
    result["extract"] = pairs(lambda: extract_once("on", WORK / "ck-on.h5"),
                              lambda: extract_once("off", WORK / "ck-off.h5"), args.runs)
    result["extract"]["command"] = ("featurekit extract digits --model resnet18 --weights none "
                                    "--image-size 64 --device cpu")
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / "checksums-cpu.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    for key in ("extract", "write", "read"):
        r = result[key]
        print(f"{key}: with {statistics.median(r['seconds_with']):.3f} s, without "
              f"{statistics.median(r['seconds_without']):.3f} s; ratio {r['ratio_median']:.4f}")
    print(f"info's full check: {result['info_check']['megabytes_per_second']} MB/s -> {path}")


if __name__ == "__main__":
    main()
