"""Fine-tuning throughput (issue 24): ``featurekit finetune``'s training part of an epoch against
a bare training step on tensors already in memory (same model, batch size, precision, optimizer,
memory format), in the same process, interleaved, median of ``--repeats``.

* ``featurekit``: ``finetune`` on the digits (1,259 training images at ``--image-size``), its
  ``_train_epoch`` timed (decoding, augmentation, the DataLoader, the steps; not validation);
* ``bare``: the same number of images as random tensors already in memory, in the same batches
  (full ones, then the remainder), the same steps (resnet18, AdamW, channels_last,
  cross-entropy, fp32 on the CPU).

Goal (CPU): featurekit >= 0.9x the bare step's images/s. On a GPU (``--device cuda``, the GPU
suite's setting: 32 and 224 px) the goal is >= 0.8x; not measured until a GPU is lent.

    python benchmarks/bench_finetune.py                    # CPU, 32 px, batch 64
    python benchmarks/bench_finetune.py --device cuda --image-size 224
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def featurekit_train_rate(image_size: int, batch: int, device: str, workers: int | None) -> float:
    """Images per second over finetune's training part of one epoch (the second epoch: the
    first pays the workers' start and the allocator's warm-up)."""
    from featurekit import finetune as ft

    timings: list[tuple[float, int]] = []
    real = ft._train_epoch

    def timed(run, net, step_model, opt, train_ds, sampler, epoch, progress, scaler):
        t0 = time.perf_counter()
        out = real(run, net, step_model, opt, train_ds, sampler, epoch, progress, scaler)
        if device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
        timings.append((time.perf_counter() - t0, len(sampler)))
        return out

    ft._train_epoch = timed
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ft.finetune("digits", Path(tmp) / "run", model="resnet18", weights="none", epochs=2,
                        batch_size=batch, image_size=image_size, device=device, workers=workers,
                        precision="fp32", progress=False, log=lambda m: None)
    finally:
        ft._train_epoch = real
    seconds, images = timings[-1]
    return images / seconds


def bare_rate(image_size: int, batch: int, device: str, images: int = 1259) -> float:
    """Images per second of the same steps on tensors already in memory."""
    import torch
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    x = torch.randn(batch, 3, image_size, image_size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    net.train()
    # the epoch's batches as finetune runs them: full ones, then the remainder
    sizes = [batch] * (images // batch) + ([images % batch] if images % batch > 1 else [])
    for _ in range(2):  # warm-up
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for n in sizes:
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x[:n]).float(), y[:n]).backward()
        opt.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return sum(sizes) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--results", type=Path, default=HERE / "results")
    args = ap.parse_args()
    from benchmarks.bench_extract import machine, record

    rows = []
    for r in range(args.repeats):  # interleaved: the machine's drift hits both alike
        fk = featurekit_train_rate(args.image_size, args.batch_size, args.device, args.workers)
        bare = bare_rate(args.image_size, args.batch_size, args.device)
        rows.append({"repeat": r, "featurekit_images_per_second": fk, "bare_images_per_second": bare,
                     "ratio": fk / bare})
        print(json.dumps(rows[-1]), flush=True)
    out = {"benchmark": "finetune_throughput", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "setting": {"model": "resnet18", "image_size": args.image_size, "batch_size": args.batch_size,
                       "device": args.device, "precision": "fp32", "source": "digits (1,259 training images)",
                       "workers": args.workers},
           "machine": machine(), "runs": rows,
           "median_ratio": statistics.median(r["ratio"] for r in rows), "goal": 0.9 if args.device == "cpu" else 0.8}
    record(args, f"finetune-throughput-{args.device.split(':')[0]}-{args.image_size}.json", out)
    print(f"median ratio {out['median_ratio']:.3f} (goal >= {out['goal']})")


if __name__ == "__main__":
    main()
