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

import csv
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from featurekit import __version__
from featurekit.errors import FeaturekitError, ModelError, OutputError

STAGES = ("conv1", "layer1", "layer2", "layer3", "layer4", "fc")  # conv1 = stem (conv1 + bn1)
TRAIN_LAYER_NAMES = ("layer1", "layer2", "layer3", "layer4", "fc")
METRICS_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]
OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "step", "none")
AUGMENTS = ("standard", "none")
HEADS = ("linear", "mlp")


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
        return list(STAGES)
    bad = [n for n in names if n not in TRAIN_LAYER_NAMES]
    if not names or bad:
        raise ModelError(
            f"unknown --train-layers entry {bad[0] if bad else spec!r}; use all, fc, or a comma "
            f"list of {', '.join(TRAIN_LAYER_NAMES)}"
        )
    return [s for s in STAGES if s in names]


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


def _stage_modules(model) -> dict[str, list[Any]]:
    return {
        "conv1": [model.conv1, model.bn1],
        **{f"layer{i}": [getattr(model, f"layer{i}")] for i in range(1, 5)},
        "fc": [model.fc],
    }


def freeze(model, train_layers: list[str]) -> tuple[int, int]:
    """requires_grad only for the trained stages; returns (trainable, total) parameter counts."""
    for p in model.parameters():
        p.requires_grad_(False)
    for stage, modules in _stage_modules(model).items():
        if stage in train_layers:
            for m in modules:
                for p in m.parameters():
                    p.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def set_train_mode(model, train_layers: list[str]) -> None:
    """Train mode for the trained stages only: frozen BatchNorm statistics must not move."""
    model.eval()
    for stage, modules in _stage_modules(model).items():
        if stage in train_layers:
            for m in modules:
                m.train()


# --------------------------------------------------------------------------- data


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
    if size >= 96:
        geo = [v2.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=interp, antialias=True),
               v2.RandomHorizontalFlip()]
    else:
        geo = [v2.Resize(preprocess.resize_size, interpolation=interp, antialias=True),
               v2.CenterCrop(size),
               v2.RandomCrop(size, padding=max(1, size // 8), padding_mode="reflect")]
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


def _decodable(source, items, workers: int, dist_info: _Dist, bar=None) -> tuple[list, list[tuple[str, str]]]:
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
    if dist_info.world > 1:
        import torch.distributed as dist

        gathered: list[Any] = [None] * dist_info.world
        dist.all_gather_object(gathered, bad)
        bad = [b for part in gathered for b in part]
    reasons = dict(bad)
    return ([it for i, it in enumerate(items) if i not in reasons],
            [(items[i].path, reasons[i]) for i in sorted(reasons)])


# --------------------------------------------------------------------------- distributed


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _all_sum(values: list[float], dist_info: _Dist, device) -> list[float]:
    if dist_info.world == 1:
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# --------------------------------------------------------------------------- checkpoints


def _atomic_save(obj: Any, path: Path) -> None:
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a kill never leaves a half-written checkpoint under the real name


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    from featurekit.models import CHECKPOINT_FORMAT, load_torch_file

    p = Path(path)
    if not p.is_file():
        raise ModelError(f"checkpoint not found: {p}")
    ckpt = load_torch_file(p, "checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(f"{p} is not a featurekit checkpoint")
    return ckpt


def _write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRICS_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r[k] is None else r[k]) for k in METRICS_COLUMNS})
    os.replace(tmp, path)


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
    tmp = path.with_name("tmp-" + path.name)
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the run


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
    log=print,
) -> dict[str, Any]:
    """Train; returns a summary (best epoch and val accuracy, files written)."""
    from featurekit import data, models
    from featurekit.extract import default_workers, resolve_device, resolve_precision

    # -- cheap checks first
    if model is not None:
        models.check_model(model)
    layers = parse_train_layers(train_layers)
    for name, value, valid in (("--head", head, HEADS), ("--optimizer", optimizer, OPTIMIZERS),
                               ("--scheduler", scheduler, SCHEDULERS), ("--augment", augment, AUGMENTS)):
        if value not in valid:
            raise FeaturekitError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
    if epochs < 1 or batch_size < 1:
        raise FeaturekitError("--epochs and --batch-size must be positive")
    if batch_size == 1 and (layers != ["fc"] or head == "mlp"):
        raise FeaturekitError("--batch-size 1 cannot train BatchNorm layers; use 2 or more "
                              "(or --train-layers fc with the linear head)")
    dev = resolve_device(device)
    dist_info = _init_distributed(dev)
    if dev == "cuda" and dist_info.world > 1:
        dev = f"cuda:{dist_info.local_rank}"
    prec = resolve_precision(precision, dev)
    run_dir = Path(out)
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    resume_from = None
    if resume and last_path.exists():
        resume_from = load_checkpoint(last_path)
    elif last_path.exists() and not overwrite:
        raise OutputError(f"{run_dir} already holds a run; pass --resume to continue it or --overwrite")
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputError(f"--out {run_dir} is a file; give a folder")
    spec = models.resolve_weights(weights)
    src = data.open_source(source, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    if "train" not in src.splits:
        raise FeaturekitError(f"source {source} has no train split")

    import torch

    opts = FinetuneOptions(
        model=model or spec.model_name or models.DEFAULT_MODEL, weights=weights, train_layers=layers,
        head=head, hidden=hidden, dropout=dropout, epochs=epochs, batch_size=batch_size,
        lr=lr if lr is not None else default_lr(optimizer, weights, layers), optimizer=optimizer,
        weight_decay=weight_decay if weight_decay is not None else (0.05 if optimizer == "adamw" else 5e-4),
        scheduler=scheduler, augment=augment, image_size=image_size, precision=prec, seed=seed,
        val_fraction=val_fraction, test_fraction=test_fraction, early_stop=early_stop,
    )
    if resume_from is not None:
        saved = resume_from.get("options", {})
        differ = [k for k in FinetuneOptions.RESUME_KEYS if saved.get(k) != asdict(opts).get(k)]
        if differ:
            raise FeaturekitError(
                f"--resume: options differ from the run in {run_dir} ({', '.join(differ)}); use the "
                "same options, or a new --out"
            )
        if resume_from.get("classes") != src.classes:
            raise FeaturekitError(f"--resume: the source's classes differ from the run in {run_dir}")

    # -- build
    backbone = models.build_backbone(opts.model, spec, seed=seed, image_size=image_size)
    net = build_model(backbone.model, len(src.classes), head, hidden, dropout)
    trainable, total = freeze(net, layers)
    if dist_info.main:
        log(f"{opts.model}: training {', '.join(layers)}; trainable parameters {trainable:,} of "
            f"{total:,} ({trainable / total:.1%})")
    net.to(dev, memory_format=torch.channels_last)
    n_workers = default_workers(dev) if workers is None else workers
    from featurekit._progress import progress_bar

    with progress_bar(enabled=progress and dist_info.main, unit="img") as bar:
        train_items, bad_train = _decodable(src, src.splits["train"], n_workers, dist_info, bar)
        val_items, bad_val = _decodable(src, src.splits.get("val", []), n_workers, dist_info, bar)
    if dist_info.main and (bad_train or bad_val):
        log(f"skipping {len(bad_train) + len(bad_val)} undecodable file(s), e.g. "
            f"{(bad_train + bad_val)[0][0]}: {(bad_train + bad_val)[0][1]}")
    if len(train_items) < 2:
        raise FeaturekitError(f"finetune needs at least 2 decodable training images, got {len(train_items)}")
    train_ds = _Labelled(src, train_items, train_transform(backbone.preprocess, augment))
    val_ds = _Labelled(src, val_items, backbone.preprocess.transform())
    params = [p for p in net.parameters() if p.requires_grad]
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=opts.lr, momentum=0.9, weight_decay=opts.weight_decay, nesterov=True)
    if scheduler == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    elif scheduler == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, epochs // 3), gamma=0.1)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)
    rows: list[dict[str, Any]] = []
    start_epoch, best_acc, best_epoch, stale = 1, -1.0, 0, 0
    if resume_from is not None:
        net.load_state_dict(resume_from["state_dict"])
        opt.load_state_dict(resume_from["optimizer"])
        sched.load_state_dict(resume_from["scheduler"])
        if isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR):
            sched.T_max = epochs  # --epochs may be raised on resume
        rows = list(resume_from.get("metrics", []))
        start_epoch = int(resume_from["epoch"]) + 1
        best_acc, best_epoch = float(resume_from["best_acc"]), int(resume_from["best_epoch"])
        stale = int(resume_from.get("stale", 0))
        if dist_info.main:
            log(f"resuming {run_dir} after epoch {start_epoch - 1} (best {best_acc:.4f} at epoch {best_epoch})")
        if start_epoch > epochs:
            if dist_info.main:
                log(f"{run_dir} already ran {epochs} epochs; nothing to do")
            return {"run_dir": str(run_dir), "epochs_run": 0, "best_epoch": best_epoch,
                    "best_val_acc": best_acc, "trainable": trainable, "total": total}
    if dist_info.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    model_for_step = net
    if dist_info.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model_for_step = DDP(net, device_ids=[dist_info.local_rank] if dev.startswith("cuda") else None)

    on_cuda = dev.startswith("cuda")
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec)
    scaler = torch.amp.GradScaler(enabled=prec == "fp16" and on_cuda)
    loss_fn = torch.nn.CrossEntropyLoss()

    def batches(ds, sampler, drop_last=False):
        return torch.utils.data.DataLoader(
            ds, batch_size=batch_size, sampler=sampler, num_workers=n_workers,
            pin_memory=on_cuda, drop_last=drop_last, prefetch_factor=4 if n_workers else None,
        )

    from torch.utils.data.distributed import DistributedSampler

    # shuffles by (seed, epoch); shards across ranks under torchrun (one rank: the whole set)
    train_sampler = DistributedSampler(train_ds, num_replicas=dist_info.world, rank=dist_info.rank,
                                       shuffle=True, seed=seed)
    val_shard = list(range(dist_info.rank, len(val_ds), dist_info.world))  # exact, no padding
    # a last batch of one image cannot train BatchNorm (one value per channel after layer4 at
    # small sizes, or in the mlp head): leave that image out of this epoch (shuffled: another
    # one each epoch)
    drop_single = len(train_sampler) % batch_size == 1

    epochs_run = 0
    for epoch in range(start_epoch, epochs + 1):
        t0 = time.perf_counter()
        # reseed from (seed, epoch): augmentation, dropout and shuffling repeat exactly on resume
        torch.manual_seed(seed * 100_003 + epoch)
        random.seed(seed * 100_003 + epoch)
        train_sampler.set_epoch(epoch)
        set_train_mode(net, layers)
        sums = [0.0, 0.0, 0.0]  # loss*n, correct, n
        with progress_bar(enabled=progress and dist_info.main, unit="img") as bar:
            task = bar.add_task(f"epoch {epoch}/{epochs}", total=len(train_sampler) - drop_single)
            for x, y in batches(train_ds, train_sampler, drop_last=drop_single):
                x = x.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
                y = y.to(dev, non_blocking=True)
                with torch.autocast(dev.split(":")[0], dtype=autocast_dtype or torch.float32,
                                    enabled=autocast_dtype is not None):
                    logits = model_for_step(x)
                    loss = loss_fn(logits.float(), y)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sums[0] += float(loss.detach()) * len(y)
                sums[1] += float((logits.argmax(1) == y).sum())
                sums[2] += len(y)
                bar.advance(task, len(y))
        lr_now = opt.param_groups[0]["lr"]
        sched.step()
        tl, tc, tn = _all_sum(sums, dist_info, dev)
        val_loss = val_acc = None
        if len(val_ds):
            net.eval()
            vs = [0.0, 0.0, 0.0]
            with torch.inference_mode():
                for x, y in batches(val_ds, val_shard):
                    x = x.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
                    y = y.to(dev, non_blocking=True)
                    with torch.autocast(dev.split(":")[0], dtype=autocast_dtype or torch.float32,
                                        enabled=autocast_dtype is not None):
                        logits = net(x).float()
                    vs[0] += float(loss_fn(logits, y)) * len(y)
                    vs[1] += float((logits.argmax(1) == y).sum())
                    vs[2] += len(y)
            vl, vc, vn = _all_sum(vs, dist_info, dev)
            val_loss, val_acc = vl / vn, vc / vn
        row = {"epoch": epoch, "train_loss": tl / tn, "train_acc": tc / tn, "val_loss": val_loss,
               "val_acc": val_acc, "lr": lr_now, "seconds": time.perf_counter() - t0}
        rows.append(row)
        score = val_acc if val_acc is not None else row["train_acc"]  # no val split: by train
        improved = score > best_acc
        if improved:
            best_acc, best_epoch, stale = score, epoch, 0
        else:
            stale += 1
        epochs_run += 1
        if dist_info.main:
            ckpt = {
                "format": "featurekit-checkpoint", "format_version": 1,
                "featurekit_version": __version__, "model": opts.model,
                "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                "classes": list(src.classes), "preprocess": backbone.preprocess.to_dict(),
                "train_layers": layers, "head": head, "epoch": epoch, "best_acc": best_acc,
                "best_epoch": best_epoch, "stale": stale, "options": asdict(opts),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "rng": {"torch": torch.get_rng_state()}, "metrics": rows,
            }
            _atomic_save(ckpt, last_path)
            if improved:
                _atomic_save(ckpt, best_path)
            _write_metrics(run_dir / "metrics.csv", rows)
            plot_curves(rows, run_dir / "curves.png")
            va = "-" if val_acc is None else f"{val_acc:.4f}"
            log(f"epoch {epoch}/{epochs}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}, "
                f"val acc {va}, lr {lr_now:.2e}, {row['seconds']:.1f} s" + ("  * best" if improved else ""))
        if early_stop and stale >= early_stop:
            if dist_info.main:
                log(f"early stop: no val improvement for {early_stop} epochs")
            break
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.barrier()
    return {"run_dir": str(run_dir), "epochs_run": epochs_run, "best_epoch": best_epoch,
            "best_val_acc": best_acc, "trainable": trainable, "total": total,
            "files": [str(run_dir / n) for n in ("best.pt", "last.pt", "metrics.csv", "curves.png")]}
