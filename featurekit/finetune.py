"""Training the network itself: from scratch, linear probe, partial or full fine-tuning.

``featurekit finetune SOURCE --out RUN_DIR`` writes, every epoch, a row of ``metrics.csv``,
``last.pt``, ``best.pt`` (by val accuracy) and ``curves.png``. Checkpoints load with
``torch.load(weights_only=True)`` and are valid ``--weights`` for ``extract`` and ``sparsity``.

Frozen parts stay bitwise unchanged: their parameters get no gradient and are not given to the
optimizer, and their BatchNorm layers are kept in eval mode, so running statistics do not move.

Determinism: every epoch reseeds torch from (seed, epoch) and shuffles with its own generator,
so a seeded CPU run resumed from ``last.pt`` ends with the same weights as an uninterrupted one.

Multi-process: under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DDP (NCCL on
CUDA, gloo on CPU), training batches come from a ``DistributedSampler``, val is split across
ranks and summed, and only rank 0 writes files.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from featurekit import _dist, _memset
from featurekit._version import __version__
from featurekit._console import log as _log
from featurekit._device import autocast
from featurekit._outputs import replacing, save_figure, write_csv
from featurekit.errors import FeaturekitError, ModelError, OutputError
from featurekit.models import PARTS, part_modules

TRAIN_LAYER_NAMES = ("layer1", "layer2", "layer3", "layer4", "fc")  # --train-layers (and all)
METRICS_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]
OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "step", "none")
AUGMENTS = ("standard", "none")
FC_HEADS = ("linear", "mlp")  # --head: what replaces the classifier


@dataclass
class FinetuneOptions:
    """Everything that defines a run; recorded in checkpoints and compared on resume."""

    model: str
    weights: str
    train_layers: list[str]
    head: str = "linear"
    hidden: int = 512
    dropout: float = 0.2
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.05
    scheduler: str = "cosine"
    augment: str = "standard"
    image_size: int | None = None
    precision: str = "fp32"
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    early_stop: int | None = None

    # what must match for --resume (epochs and early_stop may be raised)
    RESUME_KEYS = ("model", "weights", "train_layers", "head", "hidden", "dropout", "batch_size",
                   "lr", "optimizer", "weight_decay", "scheduler", "augment", "image_size",
                   "precision", "seed", "val_fraction", "test_fraction")


def parse_train_layers(spec: str) -> list[str]:
    """``all`` | ``fc`` | comma list of layer1..layer4, fc."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if names == ["all"]:
        return list(PARTS)
    bad = [n for n in names if n not in TRAIN_LAYER_NAMES]
    if not names or bad:
        raise ModelError(
            f"unknown --train-layers entry {bad[0] if bad else spec!r}; use all, fc, or a comma "
            f"list of {', '.join(TRAIN_LAYER_NAMES)}"
        )
    return [s for s in PARTS if s in names]


def default_lr(optimizer: str, weights: str, train_layers: list[str]) -> float:
    """AdamW 1e-3 from scratch or when only the head trains, 3e-4 when pretrained blocks are
    tuned; SGD ten times that. Chosen so a few epochs converge on small data."""
    base = 1e-3 if weights == "none" or train_layers == ["fc"] else 3e-4
    return base * (10 if optimizer == "sgd" else 1)


# --------------------------------------------------------------------------- model


def build_model(backbone_model, n_classes: int, head: str, hidden: int, dropout: float):
    import torch.nn as nn

    in_features = backbone_model.fc.in_features
    if head == "linear":
        backbone_model.fc = nn.Linear(in_features, n_classes)
    else:
        backbone_model.fc = nn.Sequential(
            nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(hidden, n_classes),
        )
    return backbone_model


def freeze(model, train_layers: list[str]) -> tuple[int, int]:
    """requires_grad only for the trained stages; returns (trainable, total) parameter counts."""
    for p in model.parameters():
        p.requires_grad_(False)
    for stage, modules in part_modules(model).items():
        if stage in train_layers:
            for m in modules:
                for p in m.parameters():
                    p.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def set_train_mode(model, train_layers: list[str]) -> None:
    """Train mode for the trained stages only: frozen BatchNorm statistics must not move."""
    model.eval()
    for stage, modules in part_modules(model).items():
        if stage in train_layers:
            for m in modules:
                m.train()


# --------------------------------------------------------------------------- data


SMALL_CROP = 96  # crops below this: glyph-like small images (shifts, no resized crops or flips)


def shift_pad(size: int) -> int:
    """The reflect padding of a small image's random shift (RandomCrop's ``padding``)."""
    return max(1, size // 8)


def train_transform(preprocess, augment: str):
    """``standard``: for crops of 96 px and more, RandomResizedCrop(scale 0.5-1) + horizontal
    flip; below that (digits, CIFAR-sized images) only a random shift by up to 1/8 of the side
    (reflect padding), since aggressive crops and flips ruin glyph-like small images."""
    if augment == "none":
        return preprocess.transform()
    import torch
    from torchvision.transforms import InterpolationMode, v2

    interp = InterpolationMode(preprocess.interpolation)
    size = preprocess.crop_size
    if size >= SMALL_CROP:
        geo = [v2.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=interp, antialias=True),
               v2.RandomHorizontalFlip()]
    else:
        geo = [v2.Resize(preprocess.resize_size, interpolation=interp, antialias=True),
               v2.CenterCrop(size),
               v2.RandomCrop(size, padding=shift_pad(size), padding_mode="reflect")]
    return v2.Compose([
        *geo, v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(preprocess.mean), list(preprocess.std)),
    ])


class _Labelled:
    """(tensor, label) pairs of one split; undecodable files are dropped up front."""

    def __init__(self, source, items, transform) -> None:
        self.source, self.items, self.transform = source, items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        it = self.items[i]
        return self.transform(self.source.load(it)), it.label


class _Check:
    """index -> (index, reason or ""): whether one image decodes (run in DataLoader workers)."""

    def __init__(self, source, items) -> None:
        self.source, self.items = source, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, str]:
        from featurekit.data import DecodeError

        try:
            self.source.load(self.items[i])
            return i, ""
        except DecodeError as exc:
            return i, str(exc)


def _as_list(batch):
    return batch


def _decodable(source, items, workers: int, dist_info, bar=None) -> tuple[list, list[tuple[str, str]]]:
    """The items that decode, and (path, reason) for those that do not.

    Every image is decoded once before training, so that a damaged file is reported up front
    and every rank trains on the same list (DDP needs the same number of steps on each rank).
    The check is split across ranks and, within a rank, across DataLoader workers.
    """
    import torch

    mine = list(range(dist_info.rank, len(items), dist_info.world))
    loader = torch.utils.data.DataLoader(_Check(source, items), sampler=mine, batch_size=32,
                                         num_workers=workers, collate_fn=_as_list)
    task = bar.add_task("checking images", total=len(mine)) if bar is not None else None
    bad = []
    for batch in loader:
        bad.extend((i, reason) for i, reason in batch if reason)
        if task is not None:
            bar.advance(task, len(batch))
    bad = [b for part in _dist.all_gather(bad, dist_info) for b in part]
    reasons = dict(bad)
    return ([it for i, it in enumerate(items) if i not in reasons],
            [(items[i].path, reasons[i]) for i in sorted(reasons)])


# --------------------------------------------------------------------------- checkpoints


def _atomic_save(obj: Any, path: Path) -> None:
    import torch

    with replacing(path) as tmp:  # a kill never leaves a half-written checkpoint
        torch.save(obj, tmp)


# what best.pt holds: what extract/sparsity --weights need (weights, model, classes,
# preprocessing) and how it was chosen; last.pt holds everything a resume needs besides
BEST_KEYS = ("format", "format_version", "featurekit_version", "model", "state_dict", "classes",
             "preprocess", "train_layers", "head", "epoch", "best_acc", "best_by", "best_epoch",
             "val_split")


def load_checkpoint(path: str | os.PathLike[str], resumable: bool = False) -> dict[str, Any]:
    """A featurekit checkpoint (best.pt or last.pt); ``resumable``: it must hold what
    ``--resume`` needs (last.pt: optimizer, scheduler, options, metrics)."""
    from featurekit.models import CHECKPOINT_FORMAT, load_torch_file

    p = Path(path)
    if not p.is_file():
        raise ModelError(f"checkpoint not found: {p}")
    ckpt = load_torch_file(p, "checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(f"{p} is not a featurekit checkpoint")
    expected = {"state_dict": dict, "classes": list, "epoch": int, "best_epoch": int,
                "best_acc": (int, float)}
    if resumable:
        expected.update({"optimizer": dict, "scheduler": dict, "options": dict, "metrics": list})
    bad = [k for k, t in expected.items() if not isinstance(ckpt.get(k), t)]
    if bad:
        raise ModelError(f"{p} is a damaged featurekit checkpoint (no valid {', '.join(bad)})")
    return ckpt


def _write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    write_csv(path, METRICS_COLUMNS,
              ([("" if r[k] is None else r[k]) for k in METRICS_COLUMNS] for r in rows))


def plot_curves(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=100)
    for key, label, ax in (("train_loss", "train", a1), ("val_loss", "val", a1),
                           ("train_acc", "train", a2), ("val_acc", "val", a2)):
        ys = [r[key] for r in rows]
        if any(y is not None for y in ys):
            ax.plot(epochs, [math.nan if y is None else y for y in ys], marker="o", label=label)
    a1.set_title("loss")
    a2.set_title("accuracy")
    for ax in (a1, a2):
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


# --------------------------------------------------------------------------- the run

RUN_FILES = ("best.pt", "last.pt", "metrics.csv", "curves.png")


@dataclass
class _Run:
    """What a run resolved before building anything."""

    opts: FinetuneOptions
    src: Any
    val_split: dict[str, Any]  # where val comes from: given, seeded, held out of train, none
    run_dir: Path
    device: str
    dist: _dist.Dist
    spec: Any
    workers: int
    resume_from: dict[str, Any] | None
    log: Any

    @property
    def has_val(self) -> bool:
        return bool(self.src.splits.get("val"))


@dataclass
class _Progress:
    """The state carried from epoch to epoch (and through checkpoints)."""

    rows: list[dict[str, Any]]
    start_epoch: int = 1
    best_acc: float = -1.0
    best_epoch: int = 0
    stale: int = 0
    scaler: Any = None  # torch.amp.GradScaler (fp16 on CUDA; disabled elsewhere), checkpointed


def finetune(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    model: str | None = None,
    weights: str = "imagenet",
    train_layers: str = "all",
    head: str = "linear",
    hidden: int = 512,
    dropout: float = 0.2,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float | None = None,
    optimizer: str = "adamw",
    weight_decay: float | None = None,
    scheduler: str = "cosine",
    augment: str = "standard",
    image_size: int | None = None,
    precision: str = "auto",
    device: str = "auto",
    workers: int | None = None,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    resume: bool = False,
    overwrite: bool = False,
    early_stop: int | None = None,
    progress: bool = True,
    log=None,
) -> dict[str, Any]:
    """Train; returns a summary (best epoch and accuracy, what it was chosen by, files; under
    torchrun ``rank``: rank 0 reports for the run)."""
    log = log or _log
    run = _plan(source, out, model=model, weights=weights, train_layers=train_layers, head=head,
                hidden=hidden, dropout=dropout, epochs=epochs, batch_size=batch_size, lr=lr,
                optimizer=optimizer, weight_decay=weight_decay, scheduler=scheduler,
                augment=augment, image_size=image_size, precision=precision, device=device,
                workers=workers, seed=seed, val_fraction=val_fraction,
                test_fraction=test_fraction, resume=resume, overwrite=overwrite,
                early_stop=early_stop, log=log)
    backbone, net, counts = _build(run)
    train_ds, val_ds = _datasets(run, backbone, progress)
    opt, sched = _optimizer(run, net)
    state = _restore(run, net, opt, sched)
    if state.start_epoch > run.opts.epochs:
        if run.dist.main:
            log(f"{run.run_dir} already ran {run.opts.epochs} epochs; nothing to do")
        return _summary(run, state, counts, 0)
    if run.dist.main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
    epochs_run = _train(run, backbone, net, opt, sched, state, train_ds, val_ds, progress)
    _dist.barrier(run.dist)
    return _summary(run, state, counts, epochs_run)


def _plan(source, out, *, model, weights, train_layers, head, hidden, dropout, epochs,
          batch_size, lr, optimizer, weight_decay, scheduler, augment, image_size, precision,
          device, workers, seed, val_fraction, test_fraction, resume, overwrite, early_stop,
          log) -> _Run:
    """Check every option, join the process group (one GPU per rank), decide on resuming (rank
    0 reads last.pt once and shares it), list the source and its val split."""
    from featurekit import data, models
    from featurekit import options as opt
    from featurekit._device import resolve_device, resolve_precision
    from featurekit._resources import share_cores

    if model is not None:
        models.check_model(model)
    layers = parse_train_layers(train_layers)
    for name, value, valid in (("--head", head, FC_HEADS), ("--optimizer", optimizer, OPTIMIZERS),
                               ("--scheduler", scheduler, SCHEDULERS), ("--augment", augment, AUGMENTS)):
        if value not in valid:
            raise FeaturekitError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
    for name, rng, value in (
        ("--hidden", opt.HIDDEN, hidden), ("--dropout", opt.DROPOUT, dropout),
        ("--epochs", opt.EPOCHS, epochs), ("--batch-size", opt.BATCH_SIZE, batch_size),
        ("--lr", opt.LEARNING_RATE, lr), ("--weight-decay", opt.WEIGHT_DECAY, weight_decay),
        ("--image-size", opt.IMAGE_SIZE, image_size), ("--workers", opt.WORKERS, workers),
        ("--seed", opt.SEED, seed), ("--val-fraction", opt.FRACTION, val_fraction),
        ("--test-fraction", opt.FRACTION, test_fraction), ("--early-stop", opt.PATIENCE, early_stop),
    ):
        rng.check(name, value)
    if batch_size == 1 and (layers != ["fc"] or head == "mlp"):
        raise FeaturekitError("--batch-size 1 cannot train BatchNorm layers; use 2 or more "
                              "(or --train-layers fc with the linear head)")
    dist_info, dev = _dist.init(resolve_device(device))
    prec = resolve_precision(precision, dev)
    run_dir = Path(out)
    resume_from = _dist.decide(dist_info, lambda: _resume_checkpoint(run_dir, resume, overwrite))
    spec = models.resolve_weights(weights)
    name = model or spec.model_name or models.DEFAULT_MODEL
    size = models.preprocess_for(name, spec, image_size).crop_size
    # under torchrun the host's cores are shared by its ranks, as extract shares them
    n_workers = share_cores(dev, _dist.local_world(dist_info)) if workers is None else workers
    if workers is None and not dev.startswith("cuda"):
        # training on the CPU: the steps use every core, and a decoding worker takes them from
        # the steps (benchmarks/RESULTS.md: 2 cores, resnet18, 400x300 JPEGs at 64 px 192 vs
        # 97 images/s, at 128 px 75 vs 55; digits at 32 px 520 vs 384)
        n_workers = 0
    _check_memory(name, layers, size, batch_size, dev, prec, n_workers)
    src = data.open_source(source, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    if "train" not in src.splits:
        raise FeaturekitError(f"source {source} has no train split")
    val_split = _val_split(src, val_fraction, seed)
    opts = FinetuneOptions(
        model=name, weights=weights, train_layers=layers,
        head=head, hidden=hidden, dropout=dropout, epochs=epochs, batch_size=batch_size,
        lr=lr if lr is not None else default_lr(optimizer, weights, layers), optimizer=optimizer,
        weight_decay=weight_decay if weight_decay is not None else (0.05 if optimizer == "adamw" else 5e-4),
        scheduler=scheduler, augment=augment, image_size=image_size, precision=prec, seed=seed,
        val_fraction=val_fraction, test_fraction=test_fraction, early_stop=early_stop,
    )
    if resume_from is not None:
        _check_resume_options(resume_from, opts, src, run_dir)
    return _Run(opts=opts, src=src, val_split=val_split, run_dir=run_dir, device=dev,
                dist=dist_info, spec=spec, workers=n_workers, resume_from=resume_from, log=log)


def _resume_checkpoint(run_dir: Path, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """last.pt to continue from (``--resume``), or None to start; refuses a folder holding a
    run (or files of a run's names) unless --resume or --overwrite says what to do with it."""
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputError(f"--out {run_dir} is a file; give a folder")
    last = run_dir / "last.pt"
    if resume and last.exists():
        return load_checkpoint(last, resumable=True)
    present = [n for n in RUN_FILES if (run_dir / n).exists()]
    if present and not overwrite:
        raise OutputError(
            f"{run_dir} already holds {', '.join(present)}; pass --resume to continue the run "
            "(needs last.pt), --overwrite to replace them, or another --out"
        )
    return None


def _check_resume_options(resume_from: dict[str, Any], opts: FinetuneOptions, src, run_dir) -> None:
    saved = resume_from.get("options", {})
    differ = [k for k in FinetuneOptions.RESUME_KEYS if saved.get(k) != asdict(opts).get(k)]
    if differ:
        raise FeaturekitError(
            f"--resume: options differ from the run in {run_dir} ({', '.join(differ)}); use the "
            "same options, or a new --out"
        )
    if resume_from.get("classes") != src.classes:
        raise FeaturekitError(f"--resume: the source's classes differ from the run in {run_dir}")
    recorded = (resume_from.get("source") or {}).get("fingerprint")
    if recorded is not None and recorded != src.fingerprint:  # runs of 0.1 recorded none
        raise FeaturekitError(
            f"--resume: the source changed since the run in {run_dir} began (files added, "
            "removed or modified); resume on the same files, or start a new --out"
        )


def _val_split(src, val_fraction: float, seed: int) -> dict[str, Any]:
    """Where validation comes from. A source with split folders but no ``val/`` gives a seeded,
    stratified share of train (``--val-fraction``); ``test`` is never touched. Changes
    ``src.splits`` in place."""
    from featurekit.data import split_items

    if src.splits.get("val"):
        return {"origin": src.split_origin, "images": len(src.splits["val"])}
    if val_fraction == 0:
        return {"origin": "none", "images": 0}
    if src.split_origin == "given":  # seeded sources already hold val_fraction of their images
        held = split_items(src.splits["train"], len(src.classes), val_fraction, 0.0, seed)
        if held.get("val"):
            src.splits["train"], src.splits["val"] = held["train"], held["val"]
            return {"origin": "held out of train", "fraction": val_fraction, "seed": seed,
                    "images": len(held["val"])}
    return {"origin": "none", "images": 0}


def _check_memory(name: str, layers: list[str], size: int, batch_size: int, dev: str, prec: str,
                  workers: int) -> None:
    from featurekit import _resources, models

    half = prec != "fp32"
    trained = [s for s in layers if s != "fc"]  # frozen stages keep no activations for backward
    extra = models.training_bytes_per_image(name, size, half, trained) if trained else 0
    _resources.check_batch_fits(image_size=size, batch_size=batch_size, device=dev, half=half,
                                workers=workers, per_image_extra=extra, what="a training step")


def _build(run: _Run):
    """Backbone (with its preprocessing), the network with its head on the device, frozen
    where it does not train; (trainable, total) parameter counts."""
    import torch

    from featurekit import models

    opts = run.opts
    backbone = models.build_backbone(opts.model, run.spec, seed=opts.seed, image_size=opts.image_size)
    net = build_model(backbone.model, len(run.src.classes), opts.head, opts.hidden, opts.dropout)
    trainable, total = freeze(net, opts.train_layers)
    if run.dist.main:
        run.log(f"{opts.model}: training {', '.join(opts.train_layers)}; trainable parameters "
                f"{trainable:,} of {total:,} ({trainable / total:.1%})")
        origin = run.val_split["origin"]
        if origin == "none":
            run.log("no val split: best.pt is chosen by train accuracy (--val-fraction > 0 "
                    "holds out a share of train)")
        elif origin == "held out of train":
            run.log(f"no val/ folder: {run.val_split['images']} training images "
                    f"({opts.val_fraction:g} of each class, seed {opts.seed}) are held out for val")
    net.to(run.device, memory_format=torch.channels_last)
    return backbone, net, (trainable, total)


def _datasets(run: _Run, backbone, progress: bool):
    """Train and val datasets of the images that decode (checked once, up front, across ranks)."""
    from featurekit._console import progress_bar

    src = run.src
    with progress_bar(enabled=progress and run.dist.main, unit="img") as bar:
        train_items, bad_train = _decodable(src, src.splits["train"], run.workers, run.dist, bar)
        val_items, bad_val = _decodable(src, src.splits.get("val", []), run.workers, run.dist, bar)
    bad = bad_train + bad_val
    if run.dist.main and bad:
        run.log(f"skipping {len(bad)} undecodable file(s), e.g. {bad[0][0]}: {bad[0][1]}")
    if len(train_items) < 2:
        raise FeaturekitError(f"finetune needs at least 2 decodable training images, got {len(train_items)}")
    pre = backbone.preprocess
    if pre.crop_size < SMALL_CROP and _memset.fits(len(train_items) + len(val_items), pre.crop_size, run.device):
        # small images that fit: decoded once, shifted by the batch on the device (_memset)
        pad = shift_pad(pre.crop_size) if run.opts.augment == "standard" else 0
        return tuple(_memset.Decoded.build(_Labelled(src, items, pre.transform(as_uint8=True)),
                                           run.device, run.workers, pre.mean, pre.std, pad)
                     for items in (train_items, val_items))
    return (_Labelled(src, train_items, train_transform(pre, run.opts.augment)),
            _Labelled(src, val_items, pre.transform()))


def _optimizer(run: _Run, net):
    import torch

    o = run.opts
    params = [p for p in net.parameters() if p.requires_grad]
    if o.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=o.lr, momentum=0.9, weight_decay=o.weight_decay, nesterov=True)
    if o.scheduler == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=o.epochs)
    elif o.scheduler == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, o.epochs // 3), gamma=0.1)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)
    return opt, sched


def _restore(run: _Run, net, opt, sched) -> _Progress:
    """Weights, optimizer, scheduler and progress of the run being resumed (or a fresh start)."""
    import torch

    ckpt = run.resume_from
    scaler = torch.amp.GradScaler(enabled=run.opts.precision == "fp16" and run.device.startswith("cuda"))
    if ckpt is None:
        return _Progress(rows=[], scaler=scaler)
    try:
        net.load_state_dict(ckpt["state_dict"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"--resume: {run.run_dir / 'last.pt'} does not fit this run: "
                         f"{' '.join(str(exc).split())[:200]}") from None
    if isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR):
        sched.T_max = run.opts.epochs  # --epochs may be raised on resume
    state = _Progress(rows=list(ckpt["metrics"]), start_epoch=int(ckpt["epoch"]) + 1,
                      best_acc=float(ckpt["best_acc"]), best_epoch=int(ckpt["best_epoch"]),
                      stale=int(ckpt.get("stale", 0)), scaler=scaler)
    if run.dist.main:
        run.log(f"resuming {run.run_dir} after epoch {state.start_epoch - 1} "
                f"(best {state.best_acc:.4f} at epoch {state.best_epoch})")
    return state


def _loader(run: _Run, ds, sampler, drop_last: bool = False):
    import torch

    return torch.utils.data.DataLoader(
        ds, batch_size=run.opts.batch_size, sampler=sampler, num_workers=run.workers,
        pin_memory=run.device.startswith("cuda"), drop_last=drop_last,
        prefetch_factor=4 if run.workers else None,
    )


def _batches(run: _Run, ds, indices, drop_last: bool, train: bool):
    """(x, y) on the device, channels_last: from a set decoded in memory (shifted by the batch
    when training), else through the DataLoader (augmented per image in its workers)."""
    import torch

    if isinstance(ds, _memset.Decoded):
        yield from ds.batches(list(indices), run.opts.batch_size, train, drop_last)
        return
    for x, y in _loader(run, ds, indices, drop_last=drop_last):
        yield (x.to(run.device, non_blocking=True).contiguous(memory_format=torch.channels_last),
               y.to(run.device, non_blocking=True))


def _train(run: _Run, backbone, net, opt, sched, state: _Progress, train_ds, val_ds,
           progress: bool) -> int:
    """The epochs from ``state.start_epoch``; each ends with its checkpoint. Returns epochs run."""
    import torch
    from torch.utils.data.distributed import DistributedSampler

    o, d = run.opts, run.dist
    step_model = net
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        step_model = DDP(net, device_ids=[torch.device(run.device).index]
                         if run.device.startswith("cuda") else None)
    # shuffles by (seed, epoch); shards across ranks under torchrun (one rank: the whole set)
    sampler = DistributedSampler(train_ds, num_replicas=d.world, rank=d.rank, shuffle=True, seed=o.seed)
    val_shard = list(range(d.rank, len(val_ds), d.world))  # exact, no padding
    epochs_run = 0
    for epoch in range(state.start_epoch, o.epochs + 1):
        t0 = time.perf_counter()
        # reseed from (seed, epoch): augmentation, dropout and shuffling repeat exactly on resume
        torch.manual_seed(o.seed * 100_003 + epoch)
        random.seed(o.seed * 100_003 + epoch)
        sampler.set_epoch(epoch)
        lr_now = opt.param_groups[0]["lr"]
        train_loss, train_acc = _train_epoch(run, net, step_model, opt, train_ds, sampler, epoch,
                                             progress, state.scaler)
        _dist.broadcast_buffers(net, d)  # val and the checkpoint see rank 0's BatchNorm statistics
        sched.step()
        val_loss, val_acc = _evaluate(run, net, val_ds, val_shard) if len(val_ds) else (None, None)
        row = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
               "val_loss": val_loss, "val_acc": val_acc, "lr": lr_now,
               "seconds": time.perf_counter() - t0}
        _record(run, backbone, net, opt, sched, state, row)
        epochs_run += 1
        if o.early_stop and state.stale >= o.early_stop:
            if d.main:
                run.log(f"early stop: no {'val' if run.has_val else 'train'} improvement for "
                        f"{o.early_stop} epochs")
            break
    return epochs_run


def _autocast(run: _Run):
    return autocast(run.device, run.opts.precision)


def _train_epoch(run: _Run, net, step_model, opt, train_ds, sampler, epoch: int,
                 progress: bool, scaler) -> tuple[float, float]:
    """One pass over this rank's shard; (loss, accuracy) summed over every rank. ``scaler``:
    the run's GradScaler (its scale carries over epochs and resumes)."""
    import torch

    from featurekit._console import progress_bar

    o, dev = run.opts, run.device
    loss_fn = torch.nn.CrossEntropyLoss()
    # a last batch of one image cannot train BatchNorm (one value per channel after layer4 at
    # small sizes, or in the mlp head): leave that image out of this epoch (shuffled: another
    # one each epoch)
    drop_single = len(sampler) % o.batch_size == 1
    set_train_mode(net, o.train_layers)
    # loss*n and correct summed on the device: no host sync per step (one per epoch)
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    correct, n = torch.zeros((), dtype=torch.long, device=dev), 0
    with progress_bar(enabled=progress and run.dist.main, unit="img") as bar:
        task = bar.add_task(f"epoch {epoch}/{o.epochs}", total=len(sampler) - drop_single)
        for x, y in _batches(run, train_ds, sampler, drop_single, train=True):
            _dist.check_peers(run.dist)  # before the step's collectives: stop if a rank failed
            with _autocast(run):
                logits = step_model(x)
                loss = loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            loss_sum += loss.detach().double() * len(y)
            correct += (logits.argmax(1) == y).sum()
            n += len(y)
            bar.advance(task, len(y))
    total, right, seen = _dist.all_sum([float(loss_sum), float(correct), float(n)], run.dist, dev)
    return total / seen, right / seen


def _evaluate(run: _Run, net, val_ds, shard) -> tuple[float, float]:
    """(loss, accuracy) on val, each rank on its share, summed."""
    import torch

    dev = run.device
    loss_fn = torch.nn.CrossEntropyLoss()
    net.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)  # summed on the device
    correct, n = torch.zeros((), dtype=torch.long, device=dev), 0
    with torch.inference_mode():
        for x, y in _batches(run, val_ds, shard, False, train=False):
            _dist.check_peers(run.dist)
            with _autocast(run):
                logits = net(x).float()
            loss_sum += loss_fn(logits, y).double() * len(y)
            correct += (logits.argmax(1) == y).sum()
            n += len(y)
    total, right, seen = _dist.all_sum([float(loss_sum), float(correct), float(n)], run.dist, dev)
    return total / seen, right / seen


def _record(run: _Run, backbone, net, opt, sched, state: _Progress, row: dict[str, Any]) -> None:
    """Fold an epoch into the progress; rank 0 writes last.pt (best.pt when it improved),
    metrics.csv and curves.png, each replaced atomically."""
    import torch

    state.rows.append(row)
    score = row["val_acc"] if row["val_acc"] is not None else row["train_acc"]  # no val: by train
    improved = score > state.best_acc
    if improved:
        state.best_acc, state.best_epoch, state.stale = score, row["epoch"], 0
    else:
        state.stale += 1
    if not run.dist.main:
        return
    ckpt = {
        "format": "featurekit-checkpoint", "format_version": 1,
        "featurekit_version": __version__, "model": run.opts.model,
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "classes": list(run.src.classes), "preprocess": backbone.preprocess.to_dict(),
        "train_layers": run.opts.train_layers, "head": run.opts.head, "epoch": row["epoch"],
        "best_acc": state.best_acc, "best_by": "val_acc" if run.has_val else "train_acc",
        "best_epoch": state.best_epoch, "stale": state.stale, "options": asdict(run.opts),
        "val_split": run.val_split, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
        "rng": {"torch": torch.get_rng_state()}, "metrics": state.rows,
        "scaler": state.scaler.state_dict() if state.scaler is not None else {},
        "source": {"fingerprint": run.src.fingerprint, "spec": run.src.spec},
    }
    # best.pt before last.pt: a kill between the two must not leave a last.pt whose record says
    # this epoch is the best while best.pt does not hold it (a resume would never write it)
    if improved:  # the weights and what extract needs, not the optimizer's state
        _atomic_save({k: ckpt[k] for k in BEST_KEYS}, run.run_dir / "best.pt")
    _atomic_save(ckpt, run.run_dir / "last.pt")
    _write_metrics(run.run_dir / "metrics.csv", state.rows)
    plot_curves(state.rows, run.run_dir / "curves.png")
    va = "-" if row["val_acc"] is None else f"{row['val_acc']:.4f}"
    run.log(f"epoch {row['epoch']}/{run.opts.epochs}: train loss {row['train_loss']:.4f} acc "
            f"{row['train_acc']:.4f}, val acc {va}, lr {row['lr']:.2e}, {row['seconds']:.1f} s"
            + ("  * best" if improved else ""))


def _summary(run: _Run, state: _Progress, counts: tuple[int, int], epochs_run: int) -> dict[str, Any]:
    by_val = run.has_val
    return {
        "run_dir": str(run.run_dir), "epochs_run": epochs_run, "best_epoch": state.best_epoch,
        "best_acc": state.best_acc, "best_by": "val_acc" if by_val else "train_acc",
        "best_val_acc": state.best_acc if by_val else None, "val_split": run.val_split,
        "trainable": counts[0], "total": counts[1],
        "files": [str(run.run_dir / n) for n in RUN_FILES], "rank": run.dist.rank,
    }
