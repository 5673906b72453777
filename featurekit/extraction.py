"""``featurekit extract``: SOURCE -> HDF5 cache, in stages (plan, build, open the writer, the
pass, finish), and the sharded orchestration under torchrun.

The module is ``extraction`` so that ``featurekit.extract`` is always the function.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featurekit._version import __version__
from featurekit._console import log as _log
from featurekit._device import autocast, on_cuda, resolve_device, resolve_precision
from featurekit._outputs import check_output
from featurekit.errors import CacheError, FeaturekitError, OutputError

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
    rank: int = 0  # under torchrun, this process's rank: rank 0 reports for the run

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Plan:
    """Everything ``extract`` resolved before building anything: options checked, device,
    precision and decode path chosen, weights file loaded; the source is being listed
    (``listing``) and is in ``src`` once ``extract`` has waited for it."""

    src: Any
    out_path: Path
    spec: Any
    model: str | None
    layers: list[str]
    pool: str
    image_size: int | None
    batch_size: int
    workers: int
    device: str
    precision: str
    dtype: str
    decode: str  # a path of featurekit._decode.PATHS: cpu | gpu (nvJPEG) | hw (JPEG engines)
    compile: bool
    seed: int
    val_fraction: float
    test_fraction: float
    resume: bool
    overwrite: bool
    commit_seconds: float

    dist: Any = None  # featurekit._dist.Dist: this process under torchrun (or world 1)
    listing: Any = None  # the future of ``src`` (data.open_source in a thread)

    @property
    def on_cuda(self) -> bool:
        return on_cuda(self.device)


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
    path, weights file, source, whether a batch fits in memory. With ``resume``, an interrupted
    cache continues after its last commit (refused when the source or any option differs, or
    when the output is not a featurekit cache: it is never replaced without ``overwrite``); a
    complete one is left as it is.
    """
    log = log or _log
    plan = _plan(source, out, model=model, weights=weights, layers=layers, pool=pool,
                 image_size=image_size, batch_size=batch_size, workers=workers, device=device,
                 precision=precision, dtype=dtype, decode=decode, compile=compile, seed=seed,
                 val_fraction=val_fraction, test_fraction=test_fraction, overwrite=overwrite,
                 resume=resume, commit_seconds=commit_seconds, log=log)
    from featurekit.models import may_download

    if may_download(plan.model, plan.spec):  # download only for a source that lists
        plan.src = plan.listing.result()
    backbone, net, dims = _build(plan)  # while the source is listed, when nothing downloads
    plan.src = plan.listing.result()
    options, attrs = _records(plan, backbone)
    summary = ExtractSummary(
        out=str(plan.out_path), model=backbone.name, weights=backbone.weights, device=plan.device,
        precision=plan.precision, layers=dims, rank=plan.dist.rank,
    )
    if plan.dist.world > 1:
        return _extract_sharded(plan, backbone, net, options, attrs, summary, progress, log)
    seconds, seen = _write(plan, backbone, net, options, attrs, summary, plan.out_path,
                           progress, log)
    return _summarise(summary, plan.out_path, seconds, seen)


def _write(plan: _Plan, backbone, net, options, attrs, summary: ExtractSummary, path: Path,
           progress: bool, log, shard: dict[str, Any] | None = None) -> tuple[float, int]:
    """One cache file (the output, or this rank's shard): opened or resumed, the pass, the
    finish; (seconds, images read)."""
    writer = _open_writer(plan, path, options, attrs, summary.layers, log, shard)
    if writer == "complete":
        return 0.0, 0
    started = time.perf_counter()
    try:
        with writer:
            seen = _run_pass(plan, backbone, net, writer, summary, progress)
            summary.zero_fraction = net.zero_fraction()
            writer.set_attrs(zero_fraction=summary.zero_fraction, zero_counts=net.zero_counts())
            writer.finish()
    except KeyboardInterrupt:
        raise
    except OSError as exc:  # the writer reports its own failures as OutputError already
        raise OutputError(
            f"writing {path} failed: {exc}; the partial cache is marked incomplete"
        ) from None
    return time.perf_counter() - started, seen


def _extract_sharded(plan: _Plan, backbone, net, options, attrs, summary: ExtractSummary,
                     progress: bool, log) -> ExtractSummary:
    """Under torchrun: this rank writes its shard (a contiguous run of whole batches of every
    split, resumable like any cache); rank 0 then writes the logical cache over the shards."""
    import dataclasses

    from featurekit import _dist, shards
    from featurekit._h5format import read_header

    d, out = plan.dist, plan.out_path
    done = _dist.decide(d, lambda: bool(plan.resume and out.exists() and read_header(out).get("complete")))
    if done:
        if d.main:
            log(f"{out} is already complete; nothing to do")
        return _summarise(summary, out, 0.0, 0) if d.main else summary
    ranges = shards.rank_ranges({k: len(v) for k, v in plan.src.splits.items()}, plan.batch_size, d.world)
    mine = ranges[d.rank]
    src = dataclasses.replace(plan.src, splits={k: v[mine[k][0]:mine[k][1]] for k, v in plan.src.splits.items()})
    path = shards.shard_path(out, d.rank, d.world)
    if d.main:
        shards.shard_dir(out).mkdir(parents=True, exist_ok=True)
    _dist.barrier(d)
    check_output(path, plan.overwrite or plan.resume, resumable=True)
    seconds, seen = _write(dataclasses.replace(plan, src=src), backbone, net, options, attrs,
                           summary, path, progress and d.main, log,
                           shard=shards.identity(d.rank, d.world, mine, options))
    _dist.barrier(d)  # every shard complete
    _dist.decide(d, lambda: shards.finalise(out, d.world, options, attrs, ranges))
    stale = shards.stale_shards(out, d.world) if d.main else []
    if stale:
        log(f"note: {shards.shard_dir(out)} also holds {len(stale)} shard file(s) of an earlier "
            f"run with another number of processes (e.g. {stale[0].name}); they are not used "
            "and can be deleted")
    seen = int(_dist.all_sum([float(seen)], d, "cpu" if not plan.on_cuda else plan.device)[0])
    return _summarise(summary, out if d.main else path, seconds, seen)


def _plan(source, out, *, model, weights, layers, pool, image_size, batch_size, workers, device,
          precision, dtype, decode, compile, seed, val_fraction, test_fraction, overwrite,
          resume, commit_seconds, log) -> _Plan:
    """Check every option, then resolve device, precision, decode path and batch size, load
    the weights file, and start listing the source; nothing is built or downloaded here."""
    from featurekit import _decode, _resources, data, models
    from featurekit import options as opt

    if model is not None:
        models.check_model(model)
    layer_list = models.parse_layers(layers)
    models.check_pool(pool)
    if dtype not in DTYPES:
        raise FeaturekitError(f"unknown --dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    _decode.check(decode)
    for name, rng, value in (
        ("--image-size", opt.IMAGE_SIZE, image_size), ("--batch-size", opt.BATCH_SIZE, batch_size),
        ("--workers", opt.WORKERS, workers), ("--seed", opt.SEED, seed),
        ("--val-fraction", opt.FRACTION, val_fraction), ("--test-fraction", opt.FRACTION, test_fraction),
        ("--commit-seconds", opt.COMMIT_SECONDS, commit_seconds),
    ):
        rng.check(name, value)
    from featurekit import _dist, _pipeline

    # listed in a thread meanwhile: CUDA initialisation, the decoder probes, the model build
    listing = _pipeline.background(data.open_source, source, seed=seed, val_fraction=val_fraction,
                                   test_fraction=test_fraction)
    dist_info, dev = _dist.init(resolve_device(device))  # under torchrun: this rank's GPU
    prec = resolve_precision(precision, dev)
    out_path = check_output(out, overwrite or resume, resumable=True, example="cache.h5")
    recorded = _recorded_decode(out_path, dist_info) if resume else None
    decode = _decode.choose(decode, dev, dist_info, recorded, log)
    batch_size = batch_size or (256 if on_cuda(dev) else 64)  # CPU gains nothing past 64
    workers = _resources.share_cores(dev, _dist.local_world(dist_info)) if workers is None else workers
    spec = models.resolve_weights(weights)
    size = models.preprocess_for(model, spec, image_size).crop_size
    _resources.check_batch_fits(image_size=size, batch_size=batch_size, device=dev,
                                half=prec != "fp32", workers=workers,
                                decoded_on_host=decode == "cpu")
    return _Plan(src=None, listing=listing, out_path=out_path, spec=spec, model=model, layers=layer_list, pool=pool,
                 image_size=image_size, batch_size=batch_size, workers=workers, device=dev,
                 precision=prec, dtype=dtype, decode=decode, compile=compile, seed=seed,
                 val_fraction=val_fraction, test_fraction=test_fraction, resume=resume,
                 overwrite=overwrite, commit_seconds=commit_seconds, dist=dist_info)


def _recorded_decode(out_path: Path, d) -> str | None:
    """The decode path recorded in the file this process would resume (its shard under
    torchrun), or None."""
    from featurekit import shards
    from featurekit._h5format import read_header

    path = shards.shard_path(out_path, d.rank, d.world) if d.world > 1 else out_path
    try:
        return (read_header(path).get("options") or {}).get("decode") if path.exists() else None
    except Exception:  # not a cache: --resume itself refuses it, with the reason
        return None


def _build(plan: _Plan):
    """The backbone with its provenance, the FeatureNet on the device, and each layer's width."""
    import torch

    from featurekit import models

    backbone = models.build_backbone(plan.model, plan.spec, seed=plan.seed, image_size=plan.image_size)
    net = models.FeatureNet(backbone.model, plan.layers, plan.pool)
    # channels_last: cuDNN's fast layout on GPUs, and oneDNN's on CPUs (about 1.8x faster for
    # resnet50 at 224 on 2 cores than the default layout; benchmarks/RESULTS.md)
    net.to(plan.device, memory_format=torch.channels_last)
    dims = net.dims()  # before compiling: the dry run's shape would be compiled too
    if plan.compile:
        net.compile()
    return backbone, net, dims


def _records(plan: _Plan, backbone) -> tuple[dict[str, Any], dict[str, Any]]:
    """(options that --resume compares, the cache's root attributes)."""
    import torch

    src = plan.src
    options = {
        "source_kind": src.kind, "source_fingerprint": src.fingerprint,
        "split_sizes": {k: len(v) for k, v in src.splits.items()}, "model": backbone.name,
        "weights": backbone.weights, "weights_sha256": backbone.weights_sha256,
        "layers": plan.layers, "pool": plan.pool, "preprocess": backbone.preprocess.to_dict(),
        "precision": plan.precision, "dtype": plan.dtype, "seed": plan.seed,
        "val_fraction": plan.val_fraction, "test_fraction": plan.test_fraction,
        "batch_size": plan.batch_size, "device_type": plan.device.split(":")[0],
        "decode": plan.decode,
    }
    attrs = {
        "featurekit_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": backbone.name,
        "weights": backbone.weights,
        "weights_sha256": backbone.weights_sha256,
        "layers": plan.layers,
        "pool": plan.pool,
        "preprocess": backbone.preprocess.to_dict(),
        "precision": plan.precision,
        "dtype": plan.dtype,
        "classes": src.classes,
        "source": src.describe(),
        "seed": plan.seed,
        "device": plan.device,
        "decode": plan.decode,
        "torch_version": str(torch.__version__),
        "options": options,
    }
    return options, attrs


def _open_writer(plan: _Plan, path: Path, options, attrs, dims, log, shard=None):
    """A writer positioned after the last commit (``--resume``), a new one, or "complete".
    ``shard``: this rank's identity, recorded in (and, on resume, compared with) the file."""
    from featurekit.cache import CacheWriter

    writer = _resumable(path, options, plan.commit_seconds, log, shard) if plan.resume else None
    if writer is not None:
        return writer
    if shard is not None:
        attrs = {**attrs, "shard": shard}
    try:  # written under a temporary name, renamed over the output once its header is on disk
        return CacheWriter(path, attrs, {s: len(v) for s, v in plan.src.splits.items()},
                           dims, plan.dtype, commit_seconds=plan.commit_seconds)
    except OSError as exc:
        raise OutputError(f"cannot create {path}: {exc}") from None


def _restore_zero_counts(plan: _Plan, net, done) -> None:
    """Running zero counts of the committed rows (kept by the split committed last), then on
    the device, where they grow without a sync per batch."""
    import torch

    started = [done[n] for n in plan.src.splits  # processing order, not HDF5's alphabetical
               if done[n]["next_index"] > 0 and "zero_counts" in done[n]]
    if started:
        for layer, (zeros, total) in zip(plan.layers, started[-1]["zero_counts"].tolist()):
            net.zeros[layer], net.total[layer] = int(zeros), int(total)
    net.zeros = {k: torch.tensor(int(v), dtype=torch.int64, device=plan.device)
                 for k, v in net.zeros.items()}


def _run_pass(plan: _Plan, backbone, net, writer, summary: ExtractSummary, progress: bool) -> int:
    """The batched forward pass over everything not yet committed; returns images read.

    Three stages side by side: DataLoader workers (and the prefetch thread) ready batches, this
    thread runs the model, a writer thread does the HDF5 work in batch order."""
    import torch

    from featurekit import _decode, _dist, _pipeline
    from featurekit._console import progress_bar

    src, dev, on_cuda = plan.src, plan.device, plan.on_cuda
    done = writer.progress()
    _restore_zero_counts(plan, net, done)
    names = list(src.splits)
    items = [it for n in names for it in src.splits[n]]
    sizes = [len(src.splits[n]) for n in names]
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    batches = [  # never straddle two splits; resume after the last commit
        list(range(starts[k] + i, starts[k] + min(i + plan.batch_size, sizes[k])))
        for k in range(len(names))
        for i in range(done[names[k]]["next_index"], sizes[k], plan.batch_size)
    ]

    def write(p) -> None:
        """Writer thread: one batch's rows and skipped files, then advance past it; what is
        committed (rows, skipped, zero counts) always ends at a batch boundary."""
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
    warm = max(2 * plan.batch_size, len(items) // 10)
    with progress_bar(enabled=progress) as bar, \
            (torch.cuda.device(dev) if on_cuda else contextlib.nullcontext()), \
            _decode.device_batches(src, items, backbone.preprocess, plan.decode, dev, batches,
                                   plan.workers, plan.precision) as ready, \
            _pipeline.Consumer(write) as writing:
        task = bar.add_task("extract", total=len(items),
                            completed=sum(d["next_index"] for d in done.values()))
        stream = torch.cuda.current_stream(dev) if on_cuda else None
        for positions, good, x, failures in ready:
            _dist.check_peers(plan.dist)  # another rank failed: stop too
            if mark is None and seen >= warm:
                mark = (seen, time.perf_counter())
            k = next(k for k in reversed(range(len(names))) if positions[0] >= starts[k])
            feats, event = {}, None
            if x is not None:
                with torch.inference_mode(), autocast(dev, plan.precision):
                    out = net(x)
                feats = {layer: t.float().to("cpu", non_blocking=on_cuda) for layer, t in out.items()}
            # counters as of this batch (the tensors are replaced, never changed, later)
            zeros = torch.stack([net.zeros[n] for n in plan.layers]).to("cpu", non_blocking=on_cuda)
            if on_cuda:
                event = torch.cuda.Event()
                event.record(stream)
            # the writer thread does the HDF5 work while the device runs the next batches
            writing.put((names[k], starts[k], good, failures, feats, zeros,
                         [net.total[n] for n in plan.layers], event, positions[-1] + 1))
            bar.update(task, advance=len(positions), description=f"extract {names[k]}")
            seen += len(positions)
        writing.join()
    if mark is not None and seen > mark[0]:
        summary.steady_images_per_second = (seen - mark[0]) / (time.perf_counter() - mark[1])
    return seen


def _resumable(out_path: Path, options: dict[str, Any], commit_seconds: float, log,
               shard: dict[str, Any] | None = None):
    """For --resume: a writer positioned after the last commit, "complete", or None (no output
    yet). Whatever else is at ``out_path`` is refused, and left byte-identical: the checks read
    the file read-only before it is opened for writing. A shard must also be this rank's slice
    of a run with as many ranks."""
    from featurekit.options import canonical_options
    from featurekit._h5format import read_header
    from featurekit.cache import CacheWriter

    if not out_path.exists():
        return None
    try:
        header = read_header(out_path)
    except CacheError as exc:
        raise OutputError(
            f"--resume: {exc}; it is left as it is: choose another --out, or pass --overwrite "
            "to replace it"
        ) from None
    recorded = canonical_options(header.get("options"))  # older caches' names for a path
    if recorded != options:
        keys = sorted(k for k in set(options) | set(recorded or {})
                      if (recorded or {}).get(k) != options.get(k))
        raise FeaturekitError(
            f"--resume: {out_path} was made from another source or options (different "
            f"{', '.join(keys)}); use the same ones, or --overwrite to start over"
        )
    recorded_shard = header.get("shard") or {}
    if shard is not None and any(recorded_shard.get(k) != shard[k] for k in ("rank", "world", "ranges")):
        raise FeaturekitError(
            f"--resume: {out_path} is a shard of a run with {recorded_shard.get('world')} "
            f"processes; resume with as many (--nproc_per_node x nodes), or --overwrite"
        )
    if header.get("complete"):
        if shard is None:
            log(f"{out_path} is already complete; nothing to do")
        return "complete"
    try:
        return CacheWriter.reopen(out_path, commit_seconds=commit_seconds)
    except Exception as exc:  # a damaged featurekit cache: say so, keep it
        raise CacheError(
            f"--resume: {out_path} is a damaged featurekit cache ({type(exc).__name__}: {exc}); "
            "it is left as it is: pass --overwrite to start over"
        ) from None


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
