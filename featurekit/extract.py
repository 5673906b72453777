"""The batched forward pass and its writer: SOURCE -> HDF5 cache."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featurekit import __version__
from featurekit.errors import DeviceError, FeaturekitError, OutputError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DECODES = ("auto", "cpu", "gpu", "device")  # "device": batched decode on the compute device
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
    images: int = 0  # in the cache (rows + skipped), earlier runs' included after --resume
    processed: int = 0  # images this run read; images_per_second is over these
    rows: int = 0
    skipped: int = 0
    seconds: float = 0.0
    images_per_second: float = 0.0
    steady_images_per_second: float | None = None  # after warm-up (first 10% or 2 batches)
    zero_fraction: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
        raise OutputError(f"output {p} exists; pass --overwrite to replace it (or --resume to continue it)")
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


def extract(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    model: str | None = None,
    weights: str = "imagenet",
    layers: str | list[str] = "penultimate",
    pool: str = "avg",
    image_size: int | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    dtype: str = "float32",
    decode: str = "auto",
    compile: bool = False,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    overwrite: bool = False,
    resume: bool = False,
    commit_seconds: float = 2.0,
    progress: bool = True,
    log=None,
) -> ExtractSummary:
    """Run the backbone once over SOURCE and write the cache ``out``.

    Everything a user can get wrong is checked before the model is built: options, output
    path, weights file, source. With ``resume``, an interrupted cache continues after its last
    commit (refused when the source or any option differs); a complete one is left as it is.
    """
    from featurekit import data, models

    # -- cheap checks first: nothing is built or downloaded until these pass
    if model is not None:
        models.check_model(model)
    layer_list = models.parse_layers(layers)
    models.check_pool(pool)
    if dtype not in DTYPES:
        raise FeaturekitError(f"unknown --dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    if batch_size is not None and batch_size < 1:
        raise FeaturekitError(f"--batch-size must be positive, got {batch_size}")
    if workers is not None and workers < 0:
        raise FeaturekitError(f"--workers must be 0 or more, got {workers}")
    if decode not in DECODES:
        raise FeaturekitError(f"unknown --decode {decode!r}; valid: auto, cpu, gpu")
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    on_cuda = dev.startswith("cuda")
    if decode == "gpu" and not on_cuda:
        raise FeaturekitError("--decode gpu needs a CUDA --device; use --decode cpu")
    if on_cuda and decode in ("auto", "gpu"):
        from featurekit._decode import nvjpeg_problem

        problem = nvjpeg_problem(dev)
        if problem and decode == "gpu":
            raise DeviceError(f"--decode gpu: nvJPEG does not work here ({problem}); use --decode cpu")
        if problem:
            (log or _stderr)(f"warning: nvJPEG does not work here ({problem}); decoding on the CPU")
            decode = "cpu"
    decode = ("device" if on_cuda else "cpu") if decode == "auto" else ("device" if decode == "gpu" else decode)
    batch_size = batch_size or (256 if on_cuda else 64)  # fill the GPU; CPU gains nothing past 64
    out_path = check_output(out, overwrite or resume)
    spec = models.resolve_weights(weights)
    src = data.open_source(source, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)

    # -- build
    import torch

    backbone = models.build_backbone(model, spec, seed=seed, image_size=image_size)
    net = models.FeatureNet(backbone.model, layer_list, pool)
    # channels_last: cuDNN's fast layout on GPUs, and oneDNN's on CPUs (about 1.8x faster for
    # resnet50 at 224 on 2 cores than the default layout; benchmarks/RESULTS.md)
    net.to(dev, memory_format=torch.channels_last)
    dims = net.dims()
    if compile:
        net.compile()
    workers = default_workers(dev) if workers is None else workers
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec)

    options = {
        "source_kind": src.kind, "source_fingerprint": src.fingerprint,
        "split_sizes": {k: len(v) for k, v in src.splits.items()}, "model": backbone.name,
        "weights": backbone.weights, "weights_sha256": backbone.weights_sha256,
        "layers": layer_list, "pool": pool, "preprocess": backbone.preprocess.to_dict(),
        "precision": prec, "dtype": dtype, "seed": seed, "val_fraction": val_fraction,
        "test_fraction": test_fraction, "batch_size": batch_size, "device_type": dev.split(":")[0],
        "decode": decode,
    }
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
        "decode": "nvjpeg" if decode == "device" and on_cuda else decode,
        "torch_version": str(torch.__version__),
        "options": options,
    }
    summary = ExtractSummary(
        out=str(out_path), model=backbone.name, weights=backbone.weights, device=dev,
        precision=prec, layers=dims,
    )
    from featurekit.cache import CacheWriter
    from featurekit._progress import progress_bar

    writer = _resumable(out_path, options, commit_seconds, log) if resume else None
    if writer == "complete":
        return _summarise(summary, out_path, 0.0, 0)
    if writer is None:
        if out_path.exists():  # --overwrite: the old file goes only now that the run can start
            out_path.unlink()
        try:
            writer = CacheWriter(out_path, attrs, {s: len(v) for s, v in src.splits.items()}, dims,
                                 dtype, commit_seconds=commit_seconds)
        except OSError as exc:
            raise OutputError(f"cannot create {out_path}: {exc}") from None
    done = writer.progress()
    # running zero counts of the committed rows: kept by the split committed last
    started_splits = [done[n] for n in src.splits  # processing order, not HDF5's alphabetical
                      if done[n]["next_index"] > 0 and "zero_counts" in done[n]]
    if started_splits:
        for layer, (zeros, total) in zip(layer_list, started_splits[-1]["zero_counts"].tolist()):
            net.zeros[layer], net.total[layer] = int(zeros), int(total)

    # running zero counts live on the device (no sync per batch); snapshots go back with features
    net.zeros = {k: torch.tensor(int(v), dtype=torch.int64, device=dev) for k, v in net.zeros.items()}

    started = time.perf_counter()
    try:
        with writer, progress_bar(enabled=progress) as bar, \
                (torch.cuda.device(dev) if on_cuda else contextlib.nullcontext()):
            names = list(src.splits)
            items = [it for n in names for it in src.splits[n]]
            sizes = [len(src.splits[n]) for n in names]
            starts = [sum(sizes[:k]) for k in range(len(sizes))]
            batches = [
                list(range(starts[k] + i, starts[k] + min(i + batch_size, sizes[k])))
                for k in range(len(names))
                for i in range(done[names[k]]["next_index"], sizes[k], batch_size)
            ]
            from featurekit import _decode, _pipeline

            task = bar.add_task("extract", total=len(items),
                                completed=sum(d["next_index"] for d in done.values()))

            def write(p) -> None:
                """Writer thread: one batch's rows and skipped files, then advance past it; what
                is committed (rows, skipped, zero counts) always ends at a batch boundary."""
                split, start, good, failures, feats, zeros, totals, event, end = p
                if event is not None:
                    event.synchronize()  # the batch's copies back to the host are done
                for i, reason in failures:
                    writer.skip(split, items[i].path, reason)
                writer.add(split, [items[i].label for i in good], [items[i].path for i in good],
                           {layer: t.numpy() for layer, t in feats.items()},
                           [src.stats.get(items[i].path, (0, 0)) for i in good])
                writer.advance(split, end - start, extra=lambda: {"zero_counts": np.array(
                    [[int(z), int(t)] for z, t in zip(zeros.tolist(), totals)], dtype=np.int64)})

            seen, mark = 0, None  # for the steady-state rate, after warm-up
            warm = max(2 * batch_size, len(items) // 10)
            stream = torch.cuda.current_stream(dev) if on_cuda else None
            with _decode.device_batches(
                src, items, backbone.preprocess, decode, dev,
                batches,  # never straddle two splits; resume after the last commit
                workers,
            ) as ready, _pipeline.Consumer(write) as writing:
                for positions, good, x, failures in ready:
                    if mark is None and seen >= warm:
                        mark = (seen, time.perf_counter())
                    k = next(k for k in reversed(range(len(names))) if positions[0] >= starts[k])
                    split, start = names[k], starts[k]
                    feats, event = {}, None
                    if x is not None:
                        with torch.inference_mode(), torch.autocast(
                            dev.split(":")[0], dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None,
                        ):
                            out = net(x)
                        feats = {layer: t.float().to("cpu", non_blocking=on_cuda)
                                 for layer, t in out.items()}
                    # counters as of this batch (the tensors are replaced, never changed, later)
                    zeros = torch.stack([net.zeros[k] for k in layer_list]).to("cpu", non_blocking=on_cuda)
                    if on_cuda:
                        event = torch.cuda.Event()
                        event.record(stream)
                    # the writer thread does the HDF5 work while the device runs the next batches
                    writing.put((split, start, good, failures, feats, zeros,
                                 [net.total[k] for k in layer_list], event, positions[-1] + 1))
                    bar.update(task, advance=len(positions), description=f"extract {split}")
                    seen += len(positions)
                writing.join()
            if mark is not None and seen > mark[0]:
                summary.steady_images_per_second = (seen - mark[0]) / (time.perf_counter() - mark[1])
            summary.zero_fraction = net.zero_fraction()
            writer.set_attrs(zero_fraction=summary.zero_fraction, zero_counts=net.zero_counts())
            writer.finish()
    except KeyboardInterrupt:
        raise
    except OSError as exc:  # the writer reports its own failures as OutputError already
        raise OutputError(f"writing {out_path} failed: {exc}; the partial cache is marked incomplete") from None
    return _summarise(summary, out_path, time.perf_counter() - started, seen)


def _resumable(out_path: Path, options: dict[str, Any], commit_seconds: float, log):
    """For --resume: a writer positioned after the last commit, "complete", or None (start over)."""
    import warnings

    from featurekit.cache import CacheWriter

    if not out_path.exists():
        return None
    try:
        writer = CacheWriter.reopen(out_path, commit_seconds=commit_seconds)
        recorded = writer.attr("options")
        complete = bool(writer.attr("complete"))
    except Exception as exc:  # unreadable partial: nothing in it can be trusted
        warnings.warn(f"{out_path} cannot be resumed ({type(exc).__name__}); starting from scratch",
                      stacklevel=2)
        return None
    if recorded != options:
        writer.close()
        keys = sorted(k for k in set(options) | set(recorded or {})
                      if (recorded or {}).get(k) != options.get(k))
        raise FeaturekitError(
            f"--resume: {out_path} was made from another source or options (different "
            f"{', '.join(keys)}); use the same ones, or --overwrite to start over"
        )
    if complete:
        writer.close()
        (log or _stderr)(f"{out_path} is already complete; nothing to do")
        return "complete"
    return writer


def _stderr(message: str) -> None:
    import sys

    print(message, file=sys.stderr, flush=True)


def _summarise(summary: ExtractSummary, out_path: Path, seconds: float, processed: int) -> ExtractSummary:
    """Fill the summary's counts from the cache itself (a resumed run's included); the rate is
    over the ``processed`` images of this run."""
    from featurekit.cache import open_cache

    with open_cache(out_path) as c:
        summary.splits = {s: {"rows": c.n_rows(s), "skipped": len(c.skipped(s))} for s in c.splits}
        summary.zero_fraction = dict(c.attrs.get("zero_fraction") or {})
    summary.seconds = seconds
    summary.rows = sum(v["rows"] for v in summary.splits.values())
    summary.skipped = sum(v["skipped"] for v in summary.splits.values())
    summary.images = summary.rows + summary.skipped
    summary.processed = processed
    summary.images_per_second = processed / seconds if seconds > 0 else 0.0
    return summary
