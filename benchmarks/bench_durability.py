"""What durable commits cost: the whole ``featurekit extract`` process with its fsyncs (each
commit, the finish, every atomic replace and its folder) against the same process with
``os.fsync`` made a no-op, in turn (A B A B ...), the ratio per pair.

    python benchmarks/bench_durability.py            # digits, resnet18 at 64 px, CPU
    python benchmarks/bench_durability.py --runs 9

Records machine, versions, every run and the median ratio in
``benchmarks/results/durability-cpu.json``; the goal (issue 21) is a cost within 2%.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

RUN = ("import os, sys\n"
       "if sys.argv[1] == 'off': os.fsync = lambda fd: None\n"
       "from featurekit.cli import main\n"
       "sys.argv = ['featurekit', *sys.argv[2:]]\n"
       "main()\n")


def one(mode: str, out: Path, commit_seconds: float) -> float:
    args = ["extract", "digits", "--out", str(out), "--overwrite", "--model", "resnet18",
            "--weights", "none", "--image-size", "64", "--device", "cpu", "--no-progress",
            "--commit-seconds", str(commit_seconds)]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", RUN, mode, *args], check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    from benchmarks.bench_extract import WORK, machine

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--commit-seconds", type=float, default=2.0, help="extract's default: 2")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    out = WORK / "durability.h5"
    one("on", out, args.commit_seconds)  # warm-up: file caches, imports
    pairs = []
    for _ in range(args.runs):
        pairs.append((one("on", out, args.commit_seconds), one("off", out, args.commit_seconds)))
    ratios = [a / b for a, b in pairs]
    result = {"benchmark": "bench_durability", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": machine(), "commit_seconds": args.commit_seconds,
              "command": "featurekit extract digits --model resnet18 --weights none --image-size 64",
              "seconds_with_fsync": [a for a, _ in pairs], "seconds_without": [b for _, b in pairs],
              "ratio_median": statistics.median(ratios), "ratios": ratios}
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / "durability-cpu.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"with fsync {statistics.median(a for a, _ in pairs):.2f} s, without "
          f"{statistics.median(b for _, b in pairs):.2f} s (medians of {args.runs}); "
          f"ratio {result['ratio_median']:.4f} (median of pairs) -> {path}")


if __name__ == "__main__":
    main()
