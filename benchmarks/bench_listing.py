"""Listing and fingerprinting a folder source: ``featurekit.data.open_source`` (scan, stat,
split, fingerprint) against a bare ``os.walk`` + ``os.stat`` of the same files, in the same
run, interleaved, median of --repeats.

    python benchmarks/bench_listing.py                 # 16,384 files in 100 class folders

The files are small (their content does not matter to listing); the OS's dentry/inode cache is
warm for both, as it is after the first run on a real dataset. Goal (issue 15): open_source
<= 0.3 s for 16,384 files and <= 3x the bare walk. Results in
benchmarks/results/listing-<files>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def make_files(folder: Path, n: int, classes: int) -> Path:
    marker = folder.with_name(f"{folder.name}-{classes}.complete")
    if marker.exists():
        return folder
    for i in range(n):
        d = folder / f"class{i % classes:03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"img{i:06d}.jpg").write_bytes(b"\xff\xd8\xff" + i.to_bytes(4, "little"))
    marker.touch()
    return folder


def bare_walk(folder: Path) -> int:
    n = 0
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            os.stat(os.path.join(dirpath, name))
            n += 1
    return n


def listing(folder: Path) -> int:
    from featurekit.data import open_source

    src = open_source(folder)
    return sum(len(v) for v in src.splits.values())


def timed(fn, folder: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = fn(folder)
    return time.perf_counter() - t0, n


def main() -> None:
    from benchmarks.bench_extract import WORK, machine, record

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=16384)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--results", type=Path, default=HERE / "results")
    args = ap.parse_args()
    folder = make_files(WORK / f"listing-{args.files}", args.files, args.classes)
    listing(folder)  # warm the OS caches, the imports and numpy's first use
    runs: dict[str, list[float]] = {"bare_walk_stat": [], "open_source": []}
    for _ in range(args.repeats):
        for name, fn in (("bare_walk_stat", bare_walk), ("open_source", listing)):
            seconds, n = timed(fn, folder)
            if n != args.files:
                raise SystemExit(f"{name} found {n} files, expected {args.files}")
            runs[name].append(seconds)
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {"benchmark": "bench_listing", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": machine(), "files": args.files, "classes": args.classes, "runs": runs,
              "median_seconds": med, "open_source_over_bare": med["open_source"] / med["bare_walk_stat"],
              "goals": {"open_source_seconds_max": 0.3, "ratio_max": 3.0}}
    print(f"{args.files} files: open_source {med['open_source']:.3f} s, bare os.walk + os.stat "
          f"{med['bare_walk_stat']:.3f} s (ratio {result['open_source_over_bare']:.2f})")
    record(args, f"listing-{args.files}.json", result)


if __name__ == "__main__":
    main()
