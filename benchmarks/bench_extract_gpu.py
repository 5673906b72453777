"""GPU extraction benchmark: how close `featurekit extract` runs to the hardware's limits.

On one generated folder of ImageNet-like JPEGs (300-640 px a side, ~70 KB), in one run:

* decode ceilings: CPU workers (featurekit's CPU path, no model) and nvJPEG (featurekit's
  device path: workers read bytes, batched decode + resize on the GPU, no model);
* bare forward ceilings on pre-made tensors already on the GPU: eager and ``torch.compile``,
  bf16 autocast, channels_last;
* the tutorial-style naive baseline: PIL DataLoader, fp32, default layout, ``.cpu().numpy()``
  per batch;
* ``featurekit extract`` end to end, as a whole process (its own steady-state images/s after
  warm-up is reported beside the whole-process figure), for resnet50 and resnet18.

Images/s and ratios are printed and recorded in ``benchmarks/results/extract-gpu.json`` with the
GPU model, CPU count and versions. Goals (issue 7): resnet50 at 224 >= 8,000 images/s steady
state and >= 0.75 x the nvJPEG decode ceiling; resnet18 >= 9,000 images/s.

    python benchmarks/bench_extract_gpu.py                         # 16,384 images, CUDA
    python benchmarks/bench_extract_gpu.py --device cpu --images 64 --quick   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


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


def make_jpegs(folder: Path, n: int) -> Path:
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


def decode_ceilings(folder: Path, model: str, device: str, batch: int, workers: int) -> dict:
    import torch

    from featurekit import _decode, data
    from featurekit.models import default_preprocess

    src = data.open_source(folder, val_fraction=0, test_fraction=0)
    items, pre = src.splits["train"], default_preprocess(model)
    out = {}
    loader = torch.utils.data.DataLoader(_decode.CpuDataset(src, items, pre), batch_size=batch,
                                         num_workers=workers, collate_fn=data.collate)
    t = time.perf_counter()
    n = sum(len(b[0]) for b in loader)
    out["decode_cpu_workers"] = n / (time.perf_counter() - t)
    ds = _decode.BytesDataset(src, items, pre)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers,
                                         collate_fn=_decode.collate_list)
    tp = _decode.TensorPreprocess(pre)
    t = time.perf_counter()
    n = 0
    for b in loader:
        _, good, x, _ = _decode.device_batch(b, device, tp, ds.pil_transform)
        n += len(good)
    _sync(device)
    out["decode_device"] = n / (time.perf_counter() - t)
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


def extract_process(folder: Path, model: str, device: str, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "featurekit", "extract", str(folder), "--out", str(out),
           "--overwrite", "--model", model, "--weights", "none", "--device", device,
           "--val-fraction", "0", "--test-fraction", "0", "--no-progress", "--json", *extra]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"extract failed: {r.stderr[-2000:]}")
    s = json.loads(r.stdout)
    return {"process_seconds": wall, "process_images_per_second": s["images"] / wall,
            "pass_images_per_second": s["images_per_second"],
            "steady_images_per_second": s.get("steady_images_per_second")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16384)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--naive-images", type=int, default=4096, help="images for the slow naive baseline")
    ap.add_argument("--quick", action="store_true", help="no torch.compile, few iterations (smoke test)")
    ap.add_argument("--work", type=Path, default=HERE / "_work")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    args = ap.parse_args()

    import torch

    from benchmarks.bench_extract import machine

    folder = make_jpegs(args.work / f"gpu-jpegs-{args.images}", args.images)
    res: dict = {"benchmark": "bench_extract_gpu", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "images": args.images, "batch_size": args.batch_size, "workers": args.workers,
                 "device": args.device, "machine": machine(), "models": {}}
    for model in ("resnet50", "resnet18"):
        r = {}
        r.update(decode_ceilings(folder, model, args.device, args.batch_size, args.workers))
        r.update(forward_ceilings(model, args.device, args.batch_size, 5 if args.quick else 50,
                                  compile_too=not args.quick))
        r["naive"] = naive_baseline(folder, model, args.device, args.batch_size, args.workers,
                                    min(args.naive_images, args.images))
        r["extract"] = extract_process(folder, model, args.device, args.work / "gpu.h5", [])
        if not args.quick:
            r["extract_compiled"] = extract_process(folder, model, args.device, args.work / "gpu.h5",
                                                    ["--compile"])
        steady = r["extract"]["steady_images_per_second"] or r["extract"]["pass_images_per_second"]
        r["ratio_extract_over_naive"] = steady / r["naive"]
        r["ratio_extract_over_decode_device"] = steady / r["decode_device"]
        res["models"][model] = r
        print(f"\n{model}: images/s")
        for k, v in r.items():
            print(f"  {k:34s} {json.dumps(v) if isinstance(v, dict) else f'{v:,.1f}'}")
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"extract-gpu-{'cuda' if args.device.startswith('cuda') else 'smoke'}.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(f"recorded in {path}")
    del torch


if __name__ == "__main__":
    main()
