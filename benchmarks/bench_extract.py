"""Extraction benchmarks: how close `featurekit extract` runs to the machine's limits.

Two suites, on generated folders of ImageNet-like JPEGs:

``throughput`` (issue 7; the default on a CUDA machine) -- in one run, on one folder of JPEGs of
300-640 px a side (~70 KB), images/s of:

* decode ceilings, steady state: from bytes in memory (each batched GPU decoder -- nvJPEG, and
  nvImageCodec's JPEG engines where they work -- alone and with extract's batch preprocessing;
  one CPU core's decode, extrapolated to all cores) and through extract's own pipeline without
  the model (DataLoader workers, prefetch thread, decode, preprocessing) for every decode path,
  counted after the same warm-up as extract's own steady rate (like with like), and over the
  whole pass with worker start-up (a lower bound);
* bare forward ceilings on pre-made tensors on the device: eager and ``torch.compile``,
  channels_last, bf16 autocast on CUDA (fp32 on the CPU);
* the tutorial-style naive baseline: PIL DataLoader, fp32, default layout, ``.cpu().numpy()``
  per batch;
* ``featurekit extract`` end to end as a whole process, with and without ``--compile`` (its own
  steady-state images/s after warm-up beside the whole-process figure), for resnet50 and
  resnet18; ratios against the naive baseline and the decode ceiling.

``ratio`` (issue 2; CPU) -- whole processes, interleaved, ``--repeats`` times, 500x375 JPEGs:

* ``bare``     -- import torch, load pre-decoded tensors, build the model, run the forward
                 pass in batches (default memory layout; what a user would write);
* ``bare-cl``  -- the same with channels_last (the layout featurekit uses);
* ``extract``  -- ``python -m featurekit extract FOLDER ...`` (decoding, preprocessing, HDF5);
  goal: bare-cl / extract >= 0.9.

On the CPU the default runs both. Results are printed and recorded with the machine and
versions in ``benchmarks/results/``.

    python benchmarks/bench_extract.py                    # CUDA: throughput, 16,384 images
    python benchmarks/bench_extract.py --device cpu       # CPU: ratio (200) + throughput (256)
    python benchmarks/bench_extract.py --device cpu --suite throughput --images 64 --quick
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
from multiprocessing import Pool
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = Path(os.environ.get("FEATUREKIT_BENCH_WORK") or HERE / "_work")  # generated data
sys.path.insert(0, str(HERE.parent))  # featurekit from this checkout when not installed


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


def _one_jpeg(args):
    i, folder = args
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(i)
    w, h = (int(v) for v in rng.integers(300, 641, size=2))
    small = rng.uniform(0, 255, size=(max(2, h // 32), max(2, w // 32), 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.float32)
    img += rng.normal(0, 10, size=img.shape)
    out = Path(folder) / f"class{i % 8}" / f"img{i:06d}.jpg"
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(out, quality=85)


def make_varied_jpegs(folder: Path, n: int) -> Path:
    """n JPEGs of 300-640 px a side in 8 class folders, made in parallel."""
    done = folder / ".done"
    if done.exists() and done.read_text() == str(n):
        return folder
    for c in range(8):
        (folder / f"class{c}").mkdir(parents=True, exist_ok=True)
    with Pool(os.cpu_count()) as pool:
        pool.map(_one_jpeg, [(i, str(folder)) for i in range(n)], chunksize=64)
    done.write_text(str(n))
    return folder


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def decode_paths(device: str) -> list[str]:
    """The decode paths of ``extract`` that run on ``device``: cpu, gpu (nvJPEG on CUDA,
    torchvision's decoder elsewhere), and hw where nvImageCodec's JPEG engines work."""
    paths = ["cpu", "gpu"]
    if device.startswith("cuda"):
        from featurekit._decode import hw_problem

        if hw_problem(device) is None:
            paths.append("hw")
    return paths


def _precision(device: str) -> str:
    """extract's default precision on ``device`` (its batch preprocessing follows it)."""
    return "bf16" if device.startswith("cuda") else "fp32"


def decode_ceilings(folder: Path, model: str, device: str, batch: int, workers: int,
                    limit: int | None = None) -> dict:
    """Images/s of each decode path through extract's own pipeline
    (``featurekit._decode.device_batches``: DataLoader workers, the prefetch thread, batched
    decode and preprocessing; no model), the tensors ending on ``device`` ready to run.

    ``loader_<path>``: counted at the consumer after the same warm-up as extract's own steady
    rate (``max(2 batches, 10%)`` of the images), so the two compare like with like (both
    profit alike from batches the workers decoded ahead during the warm-up).
    ``loader_<path>_whole``: every image over the whole pass, worker start-up included (a
    lower bound). ``loader_<path>_first_batch_seconds``: start-up to the first batch."""
    from featurekit import _decode, data
    from featurekit.models import default_preprocess

    src = data.open_source(folder, val_fraction=0, test_fraction=0)
    items, pre = src.splits["train"][:limit], default_preprocess(model)
    sampler = [list(range(i, min(i + batch, len(items)))) for i in range(0, len(items), batch)]
    warm = max(2 * batch, len(items) // 10)  # extract._run_pass's rule
    out = {}
    for decode in decode_paths(device):
        t0 = time.perf_counter()
        seen, mark = 0, None
        with _decode.device_batches(src, items, pre, decode, device, sampler, workers,
                                    _precision(device)) as ready:
            for positions, _, _, _ in ready:
                if seen == 0:
                    out[f"loader_{decode}_first_batch_seconds"] = time.perf_counter() - t0
                if mark is None and seen >= warm:
                    _sync(device)
                    mark = (seen, time.perf_counter())
                seen += len(positions)
        _sync(device)
        end = time.perf_counter()
        out[f"loader_{decode}_whole"] = seen / (end - t0)
        if mark is not None and seen > mark[0]:
            out[f"loader_{decode}"] = (seen - mark[0]) / (end - mark[1])
    return out


def decode_from_memory(folder: Path, model: str, device: str, batch: int, limit: int) -> dict:
    """Decode ceilings from bytes already in memory, steady state (one warm-up batch): each
    batched GPU decoder alone, and with extract's batch preprocessing; on the CPU one core's
    torchvision decode (+ preprocessing), times the cores as ``*_all_cores_extrapolated``."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    from featurekit import _decode, data
    from featurekit.models import default_preprocess

    src = data.open_source(folder, val_fraction=0, test_fraction=0)
    blobs = [torch.frombuffer(bytearray((src.root / it.path).read_bytes()), dtype=torch.uint8)
             for it in src.splits["train"][:limit]]
    pre = default_preprocess(model)
    out: dict = {"memory_images": len(blobs)}
    decoders = {}
    if device.startswith("cuda"):
        decoders["nvjpeg"] = lambda chunk: decode_jpeg(chunk, mode=ImageReadMode.RGB, device=device)
        if "hw" in decode_paths(device):
            decoders["hw"] = _decode.HwDecoder.on(device)
    prep = _decode.BatchPreprocess(pre, device, _precision(device))
    chunks = [blobs[i:i + batch] for i in range(0, len(blobs), batch)]
    for name, dec in decoders.items():
        for with_prep in (False, True):
            def step(chunk):
                imgs = dec(chunk)
                if with_prep:
                    prep(_decode.DecodedBatch(list(range(len(imgs))), dict(enumerate(imgs)), {}, []))
            step(chunks[0])
            _sync(device)
            t = time.perf_counter()
            for chunk in chunks[1:]:
                step(chunk)
            _sync(device)
            n = sum(len(c) for c in chunks[1:])
            out[f"memory_{name}{'_preprocessed' if with_prep else ''}"] = n / (time.perf_counter() - t)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cpu_pre = _decode.TensorPreprocess(pre)
        sample = blobs[: min(len(blobs), 256)]
        for with_prep in (False, True):
            t = time.perf_counter()
            for b in sample:
                x = decode_jpeg(b, mode=ImageReadMode.RGB)
                if with_prep:
                    cpu_pre(x)
            rate = len(sample) / (time.perf_counter() - t)
            key = f"memory_cpu_one_core{'_preprocessed' if with_prep else ''}"
            out[key] = rate
            out[key.replace("one_core", "all_cores_extrapolated")] = rate * (os.cpu_count() or 1)
    finally:
        torch.set_num_threads(threads)
    return out


def forward_ceilings(model: str, device: str, batch: int, iters: int, compile_too: bool) -> dict:
    import torch
    from torchvision import models

    net = models.get_model(model, weights=None).eval().to(device, memory_format=torch.channels_last)
    net.fc = torch.nn.Identity()
    x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    out = {}
    variants = [("forward_eager", net)] + ([("forward_compiled", torch.compile(net))] if compile_too else [])
    for name, f in variants:
        with torch.inference_mode(), torch.autocast(device.split(":")[0], dtype=dtype,
                                                    enabled=dtype != torch.float32):
            for _ in range(3):  # warm-up (and compilation)
                f(x)
            _sync(device)
            t = time.perf_counter()
            for _ in range(iters):
                f(x)
            _sync(device)
        out[name] = iters * batch / (time.perf_counter() - t)
    return out


def naive_baseline(folder: Path, model: str, device: str, batch: int, workers: int, limit: int) -> float:
    """What tutorials write: PIL ImageFolder-style loader, fp32, .cpu().numpy() per batch."""
    import torch
    from torchvision import models

    from featurekit.data import load_image, open_source
    from featurekit.models import default_preprocess

    src = open_source(folder, val_fraction=0, test_fraction=0)
    items = src.splits["train"][:limit]
    tf = default_preprocess(model).transform()

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            return tf(load_image(src.root / items[i].path)), items[i].label

    net = models.get_model(model, weights=None).eval().to(device)
    net.fc = torch.nn.Identity()
    feats = []
    t = time.perf_counter()
    with torch.no_grad():
        for x, _ in torch.utils.data.DataLoader(DS(), batch_size=batch, num_workers=workers):
            feats.append(net(x.to(device)).cpu().numpy())
    return len(items) / (time.perf_counter() - t)


def extract_process(folder: Path, model: str, device: str, out: Path, extra: list[str],
                    env: dict[str, str] | None = None) -> dict:
    cmd = [sys.executable, "-m", "featurekit", "extract", str(folder), "--out", str(out),
           "--overwrite", "--model", model, "--weights", "none", "--device", device,
           "--val-fraction", "0", "--test-fraction", "0", "--no-progress", "--json", *extra]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"extract failed ({' '.join(extra) or 'defaults'}): {r.stderr[-2000:]}")
    s = json.loads(r.stdout)
    import h5py

    with h5py.File(out, "r") as f:  # which decode path really ran (nvJPEG may fall back)
        decode = f.attrs["decode"]
    return {"decode": decode, "precision": s["precision"], "process_seconds": wall, "process_images_per_second": s["images"] / wall,
            "pass_images_per_second": s["images_per_second"],
            "steady_images_per_second": s.get("steady_images_per_second")}


def ratio_suite(args: argparse.Namespace) -> dict:
    """Whole-process extract time against the whole-process bare forward pass (CPU goal)."""
    WORK.mkdir(parents=True, exist_ok=True)
    n = args.ratio_images
    folder = make_jpegs(WORK / f"jpegs-{n}", n)
    npy = predecode(folder, args.model, WORK / f"predecoded-{n}-{args.model}.npy")
    py = sys.executable
    bare = [py, __file__, "--bare", str(npy), "--model", args.model, "--batch-size", str(args.ratio_batch_size)]
    cache = WORK / "bench.h5"
    extract = [py, "-m", "featurekit", "extract", str(folder), "--out", str(cache), "--overwrite",
               "--model", args.model, "--weights", "none", "--device", "cpu",
               "--batch-size", str(args.ratio_batch_size), "--no-progress", "--json"]
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
            "process_images_per_second": n / med[k],
            "median_inner_seconds": statistics.median(inner[k]),
            "runs": walls[k],
        }
        for k in steps
    ]
    result = {
        "benchmark": "bench_extract ratio (CPU)",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model": args.model,
        "images": n,
        "image_size": "500x375 JPEG -> weights' preprocessing",
        "batch_size": args.ratio_batch_size,
        "repeats": args.repeats,
        "machine": machine(),
        "results": rows,
        "ratio_bare_over_extract": med["bare"] / med["extract"],
        "ratio_bare_cl_over_extract": med["bare-cl"] / med["extract"],
        "goal": "whole extract process <= 1/0.9 of the whole bare-forward process (ratio >= 0.9)",
    }
    print(f"\n{args.model}, {n} images, batch {args.ratio_batch_size}, median of {args.repeats} interleaved runs")
    print(f"{'variant':10s} {'process s':>10s} {'img/s':>8s} {'inner s':>8s}")
    for row in rows:
        print(f"{row['variant']:10s} {row['median_process_seconds']:10.2f} "
              f"{row['process_images_per_second']:8.1f} {row['median_inner_seconds']:8.2f}")
    print(f"ratio bare / extract    = {result['ratio_bare_over_extract']:.3f}")
    print(f"ratio bare-cl / extract = {result['ratio_bare_cl_over_extract']:.3f}  (goal >= 0.9)")
    record(args, f"extract-cpu-{args.model}-{n}.json", result)
    return result


def throughput_suite(args: argparse.Namespace) -> dict:
    """Decode and forward ceilings, the naive baseline and extract end to end, in one run."""
    folder = make_varied_jpegs(WORK / f"varied-jpegs-{args.images}", args.images)
    dev = args.device
    res: dict = {"benchmark": "bench_extract throughput", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "images": args.images, "image_size": "JPEG 300-640 px a side -> weights' preprocessing",
                 "batch_size": args.batch_size, "workers": args.workers, "device": dev,
                 "precision": "bf16 autocast" if dev.startswith("cuda") else "fp32",
                 "machine": machine(), "models": {}}
    compile_too = not (args.quick or args.no_compile)
    common = ["--batch-size", str(args.batch_size), "--workers", str(args.workers)]
    for model in args.models.split(","):
        r: dict = {}
        print(f"{model}: decode ceilings", file=sys.stderr)
        r.update(decode_from_memory(folder, model, dev, args.batch_size, min(4096, args.images)))
        r.update(decode_ceilings(folder, model, dev, args.batch_size, args.workers))
        print(f"{model}: forward ceilings", file=sys.stderr)
        r.update(forward_ceilings(model, dev, args.batch_size, 5 if args.quick else 50, compile_too))
        print(f"{model}: naive baseline", file=sys.stderr)
        r["naive"] = naive_baseline(folder, model, dev, args.batch_size, args.workers,
                                    min(args.naive_images, args.images))
        print(f"{model}: featurekit extract", file=sys.stderr)
        r["extract"] = extract_process(folder, model, dev, WORK / "throughput.h5", common)
        if compile_too:
            r["extract_compiled"] = extract_process(folder, model, dev, WORK / "throughput.h5",
                                                    common + ["--compile"])
        best = max((v for k, v in r.items() if k.startswith("extract")),
                   key=lambda v: v["steady_images_per_second"] or v["pass_images_per_second"])
        steady = best["steady_images_per_second"] or best["pass_images_per_second"]
        r["best_extract_steady"] = steady
        r["ratio_extract_over_naive"] = steady / r["naive"]
        r["ratio_extract_over_loader_device"] = steady / r["loader_device"] if r.get("loader_device") else None
        res["models"][model] = r
        print(f"\n{model}: images/s")
        for k, v in r.items():
            if isinstance(v, dict):
                v = (f"steady {v['steady_images_per_second'] or float('nan'):,.1f}, whole process "
                     f"{v['process_images_per_second']:,.1f} ({v['process_seconds']:.1f} s; "
                     f"{v['decode']}, {v['precision']})")
            elif v is None:
                v = "-"
            else:
                v = f"{v:,.3f}" if k.startswith("ratio") else f"{v:,.1f}"
            print(f"  {k:34s} {v}")
    record(args, f"extract-throughput-{'cuda' if dev.startswith('cuda') else 'cpu'}-{args.images}.json", res)
    return res


def record(args: argparse.Namespace, name: str, result: dict) -> None:
    """``result`` as JSON in ``args.results``/``name`` (every benchmark script records so)."""
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"recorded in {args.results / name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=("auto", "ratio", "throughput", "all"), default="auto",
                    help="auto: throughput on CUDA, both on the CPU")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    ap.add_argument("--images", type=int, help="throughput suite (default 16384 on CUDA, 256 on the CPU)")
    ap.add_argument("--models", default="resnet50,resnet18", help="throughput suite")
    ap.add_argument("--batch-size", type=int, help="throughput suite (default 256 on CUDA, 64 on the CPU)")
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--naive-images", type=int, default=4096, help="images for the slow naive baseline")
    ap.add_argument("--quick", action="store_true", help="few iterations, no torch.compile (smoke test)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    ap.add_argument("--model", default="resnet50", help="ratio suite")
    ap.add_argument("--ratio-images", type=int, default=200)
    ap.add_argument("--ratio-batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="ratio suite")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--bare", help=argparse.SUPPRESS)
    ap.add_argument("--channels-last", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare:
        return bare_main(args)

    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    if args.suite == "auto":
        args.suite = "throughput" if cuda else "all"
    args.images = args.images or (16384 if cuda else 256)
    args.batch_size = args.batch_size or (256 if cuda else 64)
    if args.suite in ("ratio", "all"):
        if cuda:
            sys.exit("the ratio suite times the CPU path; use --device cpu")
        ratio_suite(args)
    if args.suite in ("throughput", "all"):
        throughput_suite(args)


if __name__ == "__main__":
    main()
