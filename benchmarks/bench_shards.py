"""Sharded extraction: whole-process time of `featurekit extract` as one process and under
torchrun with N processes, over the same folder of JPEGs, interleaved, median of --repeats.

    python benchmarks/bench_shards.py                          # CPU: 400 JPEGs, 1 vs 2 processes
    python benchmarks/bench_shards.py --device cuda --nproc 1  # GPU: plain vs torchrun with 1 rank

Whole processes (start-up, imports, model build and, under torchrun, the rendezvous and rank
0's finalising included), so the numbers are what a user waits. On a 2-core machine two CPU
ranks split the same two cores (each gets one thread and half the decoding workers): expect
no gain there; the point of sharding is more GPUs and nodes. Results and machine in
benchmarks/results/shards-<device>-<images>.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(kind: str, folder: Path, out: Path, args: argparse.Namespace) -> list[str]:
    extract = ["-m", "featurekit", "extract", str(folder), "--out", str(out), "--model",
               args.model, "--weights", "none", "--device", args.device, "--no-progress"]
    if kind == "plain":
        return [sys.executable, *extract]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
            "--master_addr=127.0.0.1", f"--master_port={_port()}", *extract]


def timed(cmd: list[str], out: Path) -> float:
    for p in (out, out.with_name(out.name + ".shards")):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return seconds


def main() -> None:
    from benchmarks.bench_extract import machine, make_jpegs, record

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--nproc", type=int, default=2, help="processes under torchrun")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--results", type=Path, default=HERE / "results")
    args = ap.parse_args()
    work = HERE / "_work"
    folder = make_jpegs(work / f"jpegs-{args.images}", args.images)
    out = work / "shards-bench.h5"
    runs: dict[str, list[float]] = {"plain": [], "torchrun": []}
    for _ in range(args.repeats):  # interleaved: drifts of the machine hit both alike
        for kind in runs:
            runs[kind].append(timed(command(kind, folder, out, args), out))
            print(f"  {kind}: {runs[kind][-1]:.2f} s", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {"benchmark": "bench_shards", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": machine(), "images": args.images, "model": args.model,
              "device": args.device, "nproc": args.nproc, "runs": runs, "median_seconds": med,
              "torchrun_over_plain": med["torchrun"] / med["plain"]}
    print(f"{args.images} images, {args.model} on {args.device}: one process {med['plain']:.2f} s, "
          f"torchrun x{args.nproc} {med['torchrun']:.2f} s (ratio {result['torchrun_over_plain']:.3f})")
    record(args, f"shards-{args.device}-{args.images}.json", result)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    main()
