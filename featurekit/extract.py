"""The batched forward pass and its writer: SOURCE -> HDF5 cache."""

from __future__ import annotations

import datetime as _dt
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from featurekit import __version__
from featurekit.errors import FeaturekitError, OutputError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = ("float32", "float16")


@dataclass
class ExtractSummary:
    """What an extraction did; ``to_dict`` is the ``--json`` output of ``extract``."""

    out: str
    model: str
    weights: str
    device: str
    precision: str
    layers: dict[str, int]
    splits: dict[str, dict[str, int]] = field(default_factory=dict)
    images: int = 0
    rows: int = 0
    skipped: int = 0
    seconds: float = 0.0
    images_per_second: float = 0.0
    zero_fraction: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DeviceError(FeaturekitError):
    """A device that is not there."""


def resolve_device(spec: str) -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; a CUDA device that is absent is an error."""
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return "cpu"
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {spec}: no CUDA device is available; use --device cpu")
        index = spec.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise DeviceError(
                f"--device {spec}: no such CUDA device ({torch.cuda.device_count()} present)"
            )
        return spec
    raise DeviceError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N")


def resolve_precision(precision: str, device: str) -> str:
    if precision not in PRECISIONS:
        raise FeaturekitError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.startswith("cuda") else "fp32"
    return precision


def check_output(out: str | os.PathLike[str], overwrite: bool) -> Path:
    """Refuse an existing output (unless ``overwrite``) or a folder we cannot write to."""
    p = Path(out)
    if p.is_dir():
        raise OutputError(f"output {p} is a folder; give a file name such as {p / 'cache.h5'}")
    if p.exists() and not overwrite:
        raise OutputError(f"output {p} exists; pass --overwrite to replace it")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output folder {parent} is not writable")
    return p


def default_workers(device: str) -> int:
    """Decoding workers: one per core on a GPU machine (cap 16); on the CPU the forward pass
    already uses every core, so one worker overlaps decoding with compute."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.startswith("cuda"):
        return max(1, min(16, cpus))
    return 1 if cpus > 1 else 0


def _split_batches(split_sizes: list[int], batch_size: int) -> list[list[int]]:
    """Batches of global positions that never straddle two splits."""
    batches, offset = [], 0
    for n in split_sizes:
        batches += [list(range(offset + s, offset + min(s + batch_size, n))) for s in range(0, n, batch_size)]
        offset += n
    return batches


def extract(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    model: str | None = None,
    weights: str = "imagenet",
    layers: str | list[str] = "penultimate",
    pool: str = "avg",
    image_size: int | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    dtype: str = "float32",
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    overwrite: bool = False,
    progress: bool = True,
) -> ExtractSummary:
    """Run the backbone once over SOURCE and write the cache ``out``.

    Everything a user can get wrong is checked before the model is built: options, output
    path, weights file, source.
    """
    from featurekit import data, models

    # -- cheap checks first: nothing is built or downloaded until these pass
    if model is not None:
        models.check_model(model)
    layer_list = models.parse_layers(layers)
    models.check_pool(pool)
    if dtype not in DTYPES:
        raise FeaturekitError(f"unknown --dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    if batch_size < 1:
        raise FeaturekitError(f"--batch-size must be positive, got {batch_size}")
    if workers is not None and workers < 0:
        raise FeaturekitError(f"--workers must be 0 or more, got {workers}")
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    out_path = check_output(out, overwrite)
    spec = models.resolve_weights(weights)
    src = data.open_source(source, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)

    # -- build
    import torch

    backbone = models.build_backbone(model, spec, seed=seed, image_size=image_size)
    net = models.FeatureNet(backbone.model, layer_list, pool)
    on_cuda = dev.startswith("cuda")
    # channels_last: cuDNN's fast layout on GPUs, and oneDNN's on CPUs (about 1.8x faster for
    # resnet50 at 224 on 2 cores than the default layout; benchmarks/RESULTS.md)
    net.to(dev, memory_format=torch.channels_last)
    dims = net.dims()
    workers = default_workers(dev) if workers is None else workers
    transform = backbone.preprocess.transform()
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec)

    attrs = {
        "featurekit_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": backbone.name,
        "weights": backbone.weights,
        "weights_sha256": backbone.weights_sha256,
        "layers": layer_list,
        "pool": pool,
        "preprocess": backbone.preprocess.to_dict(),
        "precision": prec,
        "dtype": dtype,
        "classes": src.classes,
        "source": src.describe(),
        "seed": seed,
        "device": dev,
        "decode": "cpu",
        "torch_version": torch.__version__,
    }
    summary = ExtractSummary(
        out=str(out_path), model=backbone.name, weights=backbone.weights, device=dev,
        precision=prec, layers=dims,
    )
    from featurekit.cache import CacheWriter
    from featurekit._progress import progress_bar

    if out_path.exists():  # --overwrite: the old file goes only now that the new run can start
        out_path.unlink()
    try:
        writer = CacheWriter(out_path, attrs, {s: len(v) for s, v in src.splits.items()}, dims, dtype)
    except OSError as exc:
        raise OutputError(f"cannot create {out_path}: {exc}") from None

    started = time.perf_counter()
    try:
        with writer, progress_bar(enabled=progress) as bar:
            dataset = data.ImageDataset(src, [it for v in src.splits.values() for it in v], transform)
            names = list(src.splits)
            sizes = [len(src.splits[n]) for n in names]
            starts = [sum(sizes[:k]) for k in range(len(sizes))]
            loader = torch.utils.data.DataLoader(
                dataset,
                batch_sampler=_split_batches(sizes, batch_size),
                num_workers=workers,
                collate_fn=data.collate,
                pin_memory=on_cuda,
                prefetch_factor=4 if workers else None,
            )
            summary.splits = {n: {"rows": 0, "skipped": 0} for n in names}
            task = bar.add_task("extract", total=len(dataset))
            for positions, good, x, failures in loader:
                k = next(k for k in reversed(range(len(names))) if positions[0] >= starts[k])
                split, start, counts = names[k], starts[k], summary.splits[names[k]]
                for i, reason in failures:
                    writer.skip(split, dataset.items[i].path, reason)
                counts["skipped"] += len(failures)
                if x is not None:
                    x = x.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
                    with torch.inference_mode(), torch.autocast(
                        dev.split(":")[0], dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None,
                    ):
                        feats = net(x)
                    writer.add(
                        split,
                        [dataset.items[i].label for i in good],
                        [dataset.items[i].path for i in good],
                        {layer: t.float().cpu().numpy() for layer, t in feats.items()},
                    )
                    counts["rows"] += len(good)
                writer.advance(split, positions[-1] + 1 - start)
                bar.update(task, advance=len(positions), description=f"extract {split}")
            summary.zero_fraction = net.zero_fraction()
            writer.set_attrs(zero_fraction=summary.zero_fraction)
            writer.finish()
    except KeyboardInterrupt:
        raise
    except OSError as exc:
        raise OutputError(f"writing {out_path} failed: {exc}; the partial cache is marked incomplete") from None
    summary.seconds = time.perf_counter() - started
    summary.rows = sum(s["rows"] for s in summary.splits.values())
    summary.skipped = sum(s["skipped"] for s in summary.splits.values())
    summary.images = summary.rows + summary.skipped
    summary.images_per_second = summary.images / summary.seconds if summary.seconds > 0 else 0.0
    return summary
