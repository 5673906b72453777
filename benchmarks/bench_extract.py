"""Extraction benchmark: `featurekit extract` end to end against the bare forward pass.

Generates a folder of ImageNet-like JPEGs (500x375, ~75 KB), pre-decodes them once with
featurekit's own preprocessing, then times *whole processes*, interleaved, ``--repeats`` times:

* ``bare``     — import torch, load the pre-decoded tensors, build the model, run the forward
                 pass in batches (default memory layout; what a user would write);
* ``bare-cl``  — the same with channels_last (the layout featurekit uses);
* ``extract``  — ``python -m featurekit extract FOLDER ...`` (decoding, preprocessing, HDF5).

It prints a table (median seconds, images/s, ratio = bare time / extract time) and records it
with the machine and versions in ``benchmarks/results/``. Start-up counts in every process.

    python benchmarks/bench_extract.py                      # resnet50 @224, 200 images, CPU
    python benchmarks/bench_extract.py --model resnet18 --images 64 --repeats 1   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"


def make_jpegs(folder: Path, n: int, seed: int = 0) -> Path:
    """n JPEGs of 500x375 in 4 class folders: smooth colour fields plus sensor-like noise."""
    import numpy as np
    from PIL import Image

    done = folder / ".done"
    if done.exists() and done.read_text() == str(n):
        return folder
    rng = np.random.default_rng(seed)
    for i in range(n):
        cls = folder / f"class{i % 4}"
        cls.mkdir(parents=True, exist_ok=True)
        small = rng.uniform(0, 255, size=(12, 16, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(small).resize((500, 375), Image.BICUBIC), dtype=np.float32)
        img = img + rng.normal(0, 12, size=img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(cls / f"img{i:05d}.jpg", quality=90)
    done.write_text(str(n))
    return folder


def predecode(folder: Path, model: str, out: Path) -> Path:
    """Decode + preprocess every JPEG once, in featurekit's row order, into one .npy file."""
    import numpy as np

    from featurekit.data import open_source
    from featurekit.models import default_preprocess

    if out.exists():
        return out
    src = open_source(folder, val_fraction=0, test_fraction=0)
    tf = default_preprocess(model).transform()
    arr = np.stack([tf(src.load(it)).numpy() for it in src.splits["train"]])
    np.save(out, arr)
    return out


def bare_main(args: argparse.Namespace) -> None:
    """The baseline process: pre-decoded tensors through the bare model, same batch/precision."""
    import numpy as np
    import torch
    from torchvision import models

    x = torch.from_numpy(np.load(args.bare))
    torch.manual_seed(0)
    net = models.get_model(args.model, weights=None)
    net.fc = torch.nn.Identity()
    net.eval()
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    t = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(x), args.batch_size):
            b = x[i : i + args.batch_size]
            if args.channels_last:
                b = b.contiguous(memory_format=torch.channels_last)
            net(b).numpy()
    print(json.dumps({"forward_seconds": time.perf_counter() - t}))


def run(cmd: list[str]) -> tuple[float, dict]:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"benchmark step failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-2000:]}")
    out = r.stdout.strip()
    return wall, json.loads(out) if out.startswith("{") else {}


def machine() -> dict:
    import h5py
    import PIL
    import torch
    import torchvision

    import featurekit

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "h5py": h5py.__version__,
        "pillow": PIL.__version__,
        "featurekit": featurekit.__version__,
        "platform": platform.platform(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--bare", help=argparse.SUPPRESS)
    ap.add_argument("--channels-last", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare:
        return bare_main(args)
    if args.device != "cpu":
        sys.exit("this benchmark times the CPU path; the GPU benchmark is bench_extract_gpu.py")

    WORK.mkdir(parents=True, exist_ok=True)
    folder = make_jpegs(WORK / f"jpegs-{args.images}", args.images)
    npy = predecode(folder, args.model, WORK / f"predecoded-{args.images}-{args.model}.npy")
    py = sys.executable
    bare = [py, __file__, "--bare", str(npy), "--model", args.model, "--batch-size", str(args.batch_size)]
    cache = WORK / "bench.h5"
    extract = [py, "-m", "featurekit", "extract", str(folder), "--out", str(cache), "--overwrite",
               "--model", args.model, "--weights", "none", "--device", "cpu",
               "--batch-size", str(args.batch_size), "--no-progress", "--json"]
    steps = {"bare": bare, "bare-cl": bare + ["--channels-last"], "extract": extract}
    walls: dict[str, list[float]] = {k: [] for k in steps}
    inner: dict[str, list[float]] = {k: [] for k in steps}
    run(extract)  # warm the page cache and any lazy state once, untimed
    for r in range(args.repeats):
        for name, cmd in steps.items():  # interleaved: machine noise hits every variant alike
            wall, out = run(cmd)
            walls[name].append(wall)
            inner[name].append(out.get("forward_seconds", out.get("seconds", float("nan"))))
            print(f"  run {r + 1}/{args.repeats} {name:8s} {wall:7.2f} s", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in walls.items()}
    rows = [
        {
            "variant": k,
            "median_process_seconds": med[k],
            "process_images_per_second": args.images / med[k],
            "median_inner_seconds": statistics.median(inner[k]),
            "runs": walls[k],
        }
        for k in steps
    ]
    result = {
        "benchmark": "bench_extract (CPU)",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model": args.model,
        "images": args.images,
        "image_size": "500x375 JPEG -> weights' preprocessing",
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "machine": machine(),
        "results": rows,
        "ratio_bare_over_extract": med["bare"] / med["extract"],
        "ratio_bare_cl_over_extract": med["bare-cl"] / med["extract"],
        "goal": "whole extract process <= 1/0.9 of the whole bare-forward process (ratio >= 0.9)",
    }
    print(f"\n{args.model}, {args.images} images, batch {args.batch_size}, median of {args.repeats} interleaved runs")
    print(f"{'variant':10s} {'process s':>10s} {'img/s':>8s} {'inner s':>8s}")
    for row in rows:
        print(f"{row['variant']:10s} {row['median_process_seconds']:10.2f} "
              f"{row['process_images_per_second']:8.1f} {row['median_inner_seconds']:8.2f}")
    print(f"ratio bare / extract    = {result['ratio_bare_over_extract']:.3f}")
    print(f"ratio bare-cl / extract = {result['ratio_bare_cl_over_extract']:.3f}  (goal >= 0.9)")
    args.results.mkdir(parents=True, exist_ok=True)
    name = f"extract-cpu-{args.model}-{args.images}.json"
    (args.results / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"recorded in {args.results / name}")


if __name__ == "__main__":
    main()
