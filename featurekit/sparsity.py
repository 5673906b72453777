"""Dead-activation statistics per layer: how much of each ResNet stage is exactly zero.

For each layer output (after its final ReLU) and each set of weights:

* ``zero_fraction``: exactly-zero activations / all activations (images x channels x positions);
* ``dead_channel_fraction``: share of channels that are zero on at least ``dead_threshold``
  (default 99%) of all (image, position) pairs;
* ``mean_activation``: mean over everything.

One streaming pass with forward hooks: per channel, a zero count and a sum are accumulated on
the device, so memory does not grow with the number of images.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from featurekit._console import log
from featurekit._device import autocast, resolve_device, resolve_precision
from featurekit._outputs import check_output_folder, save_figure, write_csv, write_json
from featurekit.errors import FeaturekitError, ModelError

@dataclass
class ChannelStats:
    """Streaming per-channel counts of one layer's output."""

    zeros: Any = None  # float64 tensor (C,): zero activations per channel
    sums: Any = None  # float64 tensor (C,): sum of activations per channel
    per_channel: int = 0  # activations seen per channel (images x positions)

    def update(self, t) -> None:
        """Add a batch: (N, C, H, W) or (N, C)."""
        import torch

        dims = (0, 2, 3) if t.ndim == 4 else (0,)
        z = (t == 0).sum(dim=dims, dtype=torch.float64)
        s = t.sum(dim=dims, dtype=torch.float64)
        self.zeros = z if self.zeros is None else self.zeros + z
        self.sums = s if self.sums is None else self.sums + s
        self.per_channel += t.numel() // t.shape[1]

    def result(self, dead_threshold: float = 0.99) -> dict[str, float]:
        if self.zeros is None or self.per_channel == 0:
            raise FeaturekitError("no activations were recorded (no images?)")
        zeros = self.zeros.cpu()
        total = self.per_channel * zeros.numel()
        return {
            "zero_fraction": float(zeros.sum()) / total,
            "dead_channel_fraction": float((zeros / self.per_channel >= dead_threshold).double().mean()),
            "mean_activation": float(self.sums.cpu().sum()) / total,
            "channels": int(zeros.numel()),
        }


@dataclass
class Recorder:
    """Forward hooks on named submodules, feeding one :class:`ChannelStats` each."""

    model: Any
    modules: dict[str, str]  # layer name -> submodule path
    stats: dict[str, ChannelStats] = field(default_factory=dict)

    def __enter__(self) -> Recorder:
        self._handles = []
        for name, path in self.modules.items():
            try:
                module = self.model.get_submodule(path)
            except AttributeError:
                raise ModelError(f"the model has no layer {name!r}") from None
            self.stats[name] = ChannelStats()
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def hook(module, inputs, output) -> None:
            self.stats[name].update(output.detach().float())

        return hook

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()


def collect(model, batches: Iterable[Any], modules: dict[str, str], dead_threshold: float = 0.99,
            forward=None) -> dict[str, dict[str, float]]:
    """Run ``model`` over ``batches`` once; statistics of each named submodule's output."""
    import torch

    with Recorder(model, modules) as rec, torch.inference_mode():
        for x in batches:
            (forward or model)(x)
    return {name: s.result(dead_threshold) for name, s in rec.stats.items()}


def _pick_split(source, split: str | None) -> str:
    if split is None:
        for s in ("test", "val", "train"):
            if s in source.splits:
                return s
    if split not in source.splits:
        raise FeaturekitError(f"the source has no split {split!r}; splits: {', '.join(source.splits)}")
    return split


@dataclass
class _Plan:
    """What ``sparsity`` resolved before building anything."""

    weights: list[str]  # as given, one column each
    specs: list[Any]  # models.WeightsSpec per weights
    layers: list[str] | None
    device: str
    precision: str
    decode: str
    workers: int


def sparsity(
    source: str | os.PathLike[str],
    *,
    model: str | None = None,
    weights: str = "imagenet",
    compare: list[str] | None = None,
    layers: str | list[str] | None = None,
    blocks: bool = False,
    split: str | None = None,
    max_images: int | None = None,
    dead_threshold: float = 0.99,
    image_size: int | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    device: str = "auto",
    precision: str = "fp32",
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Statistics per layer for each weights; the ``--json`` shape of ``featurekit sparsity``.
    With ``out``, also sparsity.csv/.json/.png there (existing ones only with ``overwrite``,
    checked before any pass; the result's ``files`` lists them)."""
    from featurekit import data

    if out is not None:
        check_output_folder(out, OUTPUT_FILES, overwrite)
    plan = _plan(model, weights, compare, layers, dead_threshold, max_images, image_size,
                 batch_size, workers, device, precision, seed, val_fraction, test_fraction)
    src = data.open_source(source, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    items = _subset(src.splits[_pick_split(src, split)], max_images, seed)
    nets, order = _build(plan, model, seed, image_size, blocks)
    per_weights = _measure(nets, src, items, plan, batch_size, dead_threshold, progress)
    result = {
        "weights": plan.weights,
        "layers": [
            {
                "layer": name,
                **{key: {w: per_weights[w][name][key] for w in plan.weights}
                   for key in ("zero_fraction", "dead_channel_fraction", "mean_activation")},
            }
            for name in order
        ],
    }
    if out is not None:
        result["files"] = write_outputs(result, out)
    return result


def _plan(model, weights, compare, layers, dead_threshold, max_images, image_size, batch_size,
          workers, device, precision, seed, val_fraction, test_fraction) -> _Plan:
    """Check every option and weights file, resolve device, precision, decode path and
    workers, and refuse a batch that cannot fit, before any model is built."""
    from featurekit import _decode, _resources, models
    from featurekit import options as opt

    if model is not None:
        models.check_model(model)
    layer_list = models.parse_layers(layers) if layers else None
    for name, rng, value in (
        ("--dead-threshold", opt.DEAD_THRESHOLD, dead_threshold),
        ("--max-images", opt.MAX_IMAGES, max_images), ("--image-size", opt.IMAGE_SIZE, image_size),
        ("--batch-size", opt.BATCH_SIZE, batch_size), ("--workers", opt.WORKERS, workers),
        ("--seed", opt.SEED, seed), ("--val-fraction", opt.FRACTION, val_fraction),
        ("--test-fraction", opt.FRACTION, test_fraction),
    ):
        rng.check(name, value)
    all_weights = [weights, *(compare or [])]
    if len(set(all_weights)) != len(all_weights):
        raise FeaturekitError("the same weights are given twice")
    specs = [models.resolve_weights(w) for w in all_weights]  # every file checked before any pass
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    decode = _decode.resolve("auto", dev, log)  # extract's decode paths and pipeline
    n_workers = _resources.default_workers(dev) if workers is None else workers
    for spec in specs:
        size = models.preprocess_for(model, spec, image_size).crop_size
        _resources.check_batch_fits(image_size=size, batch_size=batch_size, device=dev,
                                    half=prec != "fp32", workers=n_workers,
                                    decoded_on_host=decode == "cpu")
    return _Plan(all_weights, specs, layer_list, dev, prec, decode, n_workers)


def _subset(items: list[Any], max_images: int | None, seed: int) -> list[Any]:
    """A seeded random subset of at most ``max_images``, in source order."""
    if max_images is None or max_images >= len(items):
        return items
    import numpy as np

    keep = np.sort(np.random.default_rng(seed).choice(len(items), max_images, replace=False))
    return [items[i] for i in keep]


def _build(plan: _Plan, model, seed: int, image_size, blocks: bool):
    """Every model, on the device, with the submodules to hook ((given, preprocess, net,
    modules) each), before any pass: a bad checkpoint fails in seconds, not after a pass;
    and the layer names in order."""
    import torch

    from featurekit import models

    nets, names = [], []
    for given, spec in zip(plan.weights, plan.specs):
        backbone = models.build_backbone(model, spec,
                                         seed=seed, image_size=image_size)
        net = backbone.model.to(plan.device, memory_format=torch.channels_last).eval()
        nets.append((given, backbone.preprocess, net, models.layer_nodes(net, plan.layers, blocks)))
        names.append(backbone.name)
    order = list(nets[0][3])
    if any(list(m) != order for *_, m in nets) or (blocks and len(set(names)) > 1):
        raise FeaturekitError(
            "--blocks compares block by block, so every weights must be of the same model; "
            f"got {', '.join(dict.fromkeys(names))}"
        )
    return nets, order


def _measure(nets, src, items, plan: _Plan, batch_size: int, dead_threshold: float,
             progress: bool) -> dict[str, dict[str, dict[str, float]]]:
    """weights -> layer -> statistics; weights with the same preprocessing share one decoding
    pass."""
    from featurekit._console import progress_bar

    groups: dict[str, list[Any]] = {}
    for entry in nets:
        groups.setdefault(json.dumps(entry[1].to_dict(), sort_keys=True), []).append(entry)
    per_weights: dict[str, dict[str, dict[str, float]]] = {}
    with progress_bar(enabled=progress) as bar:
        for group in groups.values():
            task = bar.add_task(f"sparsity {', '.join(g[0] for g in group)}", total=len(items))
            recorders = _pass(group, src, items, plan.decode, plan.device, batch_size,
                              plan.workers, plan.precision, lambda n: bar.advance(task, n))
            for (given, *_), rec in zip(group, recorders):
                per_weights[given] = {name: st.result(dead_threshold) for name, st in rec.stats.items()}
    return per_weights


def _pass(group, src, items, decode: str, dev: str, batch_size: int, workers: int,
          precision: str, advance) -> list[Recorder]:
    """One pass of extract's batch pipeline (``_decode.device_batches``: decoding workers,
    prefetch thread, batch preprocessing on the device) over ``items``, every model of the
    group (weights sharing one preprocessing) run on each batch under its hooks."""
    import torch

    from featurekit import _decode

    sampler = [list(range(i, min(i + batch_size, len(items)))) for i in range(0, len(items), batch_size)]
    preprocess = group[0][1]
    with contextlib.ExitStack() as stack, torch.inference_mode():
        recorders = [stack.enter_context(Recorder(net, modules)) for _, _, net, modules in group]
        if dev.startswith("cuda"):
            stack.enter_context(torch.cuda.device(dev))
        ready = stack.enter_context(_decode.device_batches(src, items, preprocess, decode, dev,
                                                          sampler, workers, precision))
        for positions, _, x, _ in ready:
            advance(len(positions))
            if x is None:
                continue
            for _, _, net, _ in group:
                with autocast(dev, precision):
                    net(x)
    return recorders


OUTPUT_FILES = ["sparsity.csv", "sparsity.json", "sparsity.png"]


def write_outputs(result: dict[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, str]:
    """sparsity.csv, sparsity.json and sparsity.png (grouped bars, one colour per weights),
    each whole or not at all."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {n: out / n for n in OUTPUT_FILES}
    keys = ("zero_fraction", "dead_channel_fraction", "mean_activation")
    write_csv(files["sparsity.csv"], ["layer", "weights", *keys],
              ([row["layer"], weights, *(repr(row[k][weights]) for k in keys)]
               for row in result["layers"] for weights in result["weights"]))
    write_json(files["sparsity.json"], {k: v for k, v in result.items() if k != "files"})
    plot(result, files["sparsity.png"])
    return {k: str(v) for k, v in files.items()}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = [r["layer"] for r in result["layers"]]
    weights = result["weights"]
    x = np.arange(len(layers))
    width = 0.8 / len(weights)
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(layers) + 4), 4), dpi=100)
    for ax, key, title in ((axes[0], "zero_fraction", "zero activations"),
                           (axes[1], "dead_channel_fraction", "dead channels")):
        for i, w in enumerate(weights):
            ax.bar(x + (i - (len(weights) - 1) / 2) * width,
                   [r[key][w] for r in result["layers"]], width, label=w)
        ax.set_xticks(x, layers, rotation=45 if len(layers) > 6 else 0, ha="right" if len(layers) > 6 else "center")
        ax.set_ylim(0, 1)
        ax.set_title(f"share of {title}")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
