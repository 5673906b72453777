"""The stages of ``featurekit study`` (:mod:`featurekit.study`): each one call, or a few, of the
library's own commands, written into the stage's folder; and each stage's cost estimate.

A stage returns what the report needs (JSON-ready). Per-image correctness on the test split
(``correct``: 0/1 per test image, in the cache's row order) is kept for every approach, so that
the report can pair them (McNemar's test on the same images).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


# variant -> (weights: None = the study's, train_layers): the finetune issue's four set-ups
VARIANTS = {"scratch": ("none", "all"), "probe": (None, "fc"), "partial": (None, "layer4,fc"),
            "full": (None, "all")}
PROBE_HEADS = "logistic,knn"  # the layer-wise probe's default heads


@dataclass
class Context:
    """What every stage is given: the options, the study folder, where to run, what came before."""

    opts: Any
    out: Path
    device: str
    workers: int | None
    progress: bool
    results: dict[str, Any]
    source: str = ""  # what every stage reads: the study's source, or its subset's CSV

    def folder(self, stage: str) -> Path:
        return self.out / stage


def _quiet(message: str) -> None:
    """The study shows its own stage list; the commands inside it say nothing."""


def _extract(ctx: Context, out: Path, weights: str) -> dict[str, Any]:
    from featurekit.extraction import extract

    o = ctx.opts
    s = extract(ctx.source, out, model=o.model, weights=weights, layers="all", image_size=o.image_size,
                device=ctx.device, workers=ctx.workers, seed=o.seed, val_fraction=o.val_fraction,
                test_fraction=o.test_fraction, resume=True, progress=ctx.progress, log=_quiet)
    return {"cache": str(out), "extract": s.to_dict()}


def features(ctx: Context) -> dict[str, Any]:
    """Every layer of the study's weights."""
    return _extract(ctx, ctx.folder("features") / "cache.h5", ctx.opts.weights)


def _head_row(cache: str, head: str) -> dict[str, Any]:
    """One head on penultimate under the selection protocol, with its per-image correctness."""
    from featurekit.cache import open_cache
    from featurekit.fit import fit_head

    result = fit_head(cache, head, backend="auto")
    r = result.report
    with open_cache(cache) as c:
        X, y = c.features(r["eval_split"], r["layer"]), c.labels(r["eval_split"])
        X_train, y_train = c.features(r["train_split"], r["layer"]), c.labels(r["train_split"])
    pred = result.head.predict(X)
    r.pop("confusion_matrix", None)
    return {**r, "status": "ok", "approach": f"frozen features + {head}", "cache": "pretrained",
            "trainable": _head_parameters(result.head, head), "correct": (pred == y).astype(int).tolist(),
            "predicted_share": float(np.bincount(pred).max() / len(pred)),
            "train_accuracy": float(np.mean(result.head.predict(X_train) == y_train)),
            "train_classes": int(len(np.unique(y_train)))}


def _head_parameters(est, head: str) -> int | None:
    """Learned numbers of a fitted head (weights and intercepts, or support-vector
    coefficients); a k-NN head has none (it keeps its training rows)."""
    if head == "knn":
        return 0
    inner = getattr(est, "pipeline_", None)
    inner = inner[-1] if inner is not None else est
    inner = inner[-1] if hasattr(inner, "steps") else inner
    names = ("coef_", "intercept_", "dual_coef_")
    sizes = [np.size(getattr(inner, n)) for n in names if hasattr(inner, n)]
    return int(sum(sizes)) if sizes else None


def heads(ctx: Context) -> dict[str, Any]:
    """Each head on penultimate (bench's outputs, plus per-image correctness), the layer-wise
    probe on every layer, the few-shot curve on penultimate."""
    from featurekit.bench import run_bench, write_outputs
    from featurekit.fewshot import run_fewshot

    cache, folder, o = ctx.results["features"]["cache"], ctx.folder("heads"), ctx.opts
    rows = [_head_row(cache, h) for h in o.heads]
    (folder / "bench").mkdir(exist_ok=True)
    write_outputs({"cache": cache, "caches": [cache], "train_split": "train",
                   "eval_split": rows[0]["eval_split"], "selection": rows[0]["selection"]["method"],
                   "metric": "accuracy", "refit": rows[0]["selection"]["refit"],
                   "results": [{k: v for k, v in r.items() if k != "correct"} for r in rows]},
                  folder / "bench")
    depth = run_bench(cache, heads=",".join(o.probe_heads), layers="all", out=folder / "depth",
                      overwrite=True)
    few = run_fewshot(cache, shots=o.shots, draws=o.draws, heads=",".join(o.probe_heads),
                      out=folder / "fewshot", overwrite=True)
    return {"folder": str(folder), "heads": rows, "depth": depth["results"],
            "fewshot": [{k: r[k] for k in ("head", "backend", "shots", "mean", "std", "ci_low",
                                          "ci_high", "params", "classes")} for r in few["results"]]}


def finetune_variant(variant: str):
    """The stage that fine-tunes ``variant`` (continuing its own run after a stop)."""

    def run(ctx: Context) -> dict[str, Any]:
        import csv

        from featurekit.finetune import finetune

        o = ctx.opts
        weights, layers = VARIANTS[variant]
        folder = ctx.folder(f"finetune/{variant}") / "run"
        s = finetune(ctx.source, folder, model=o.model, weights=weights or o.weights,
                     train_layers=layers, epochs=o.epochs, batch_size=o.batch_size,
                     image_size=o.image_size, device=ctx.device, workers=ctx.workers, seed=o.seed,
                     val_fraction=o.val_fraction, test_fraction=o.test_fraction, resume=True,
                     progress=ctx.progress, log=_quiet)
        with open(folder / "metrics.csv", newline="") as f:
            curve = [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()}
                     for row in csv.DictReader(f)]
        return {"variant": variant, "train_layers": layers, "weights": weights or o.weights,
                "best": str(folder / "best.pt"), "summary": s, "curve": curve}

    return run


def _network_row(cache: str, best: str, variant: str, trainable: int) -> dict[str, Any]:
    """The fine-tuned network's own test accuracy: its fc layer on its penultimate features
    (the cache of its checkpoint), exactly the network's output in eval mode."""
    from sklearn.metrics import balanced_accuracy_score

    from featurekit.cache import open_cache
    from featurekit.finetune import load_checkpoint
    from featurekit.fit import wilson

    state = load_checkpoint(best)["state_dict"]
    W, b = (state[k].double().numpy() for k in ("fc.weight", "fc.bias"))
    with open_cache(cache) as c:
        split = "test" if "test" in c.splits else "val"
        X, y = c.features(split, "penultimate").astype(np.float64), c.labels(split)
    pred = (X @ W.T + b).argmax(1)
    correct = (pred == y).astype(int)
    return {"approach": {"scratch": "from scratch", "probe": "linear probe (fc only)",
                         "partial": "partial fine-tuning (layer4 + fc)",
                         "full": "full fine-tuning"}[variant],
            "variant": variant, "eval_split": split, "accuracy": float(correct.mean()),
            "accuracy_ci95": wilson(int(correct.sum()), len(correct)),
            "balanced_accuracy": float(balanced_accuracy_score(y, pred)), "trainable": trainable,
            "status": "ok", "correct": correct.tolist(),
            "predicted_share": float(np.bincount(pred).max() / len(pred))}


def after_variant(variant: str):
    """The stage that extracts ``variant``'s checkpoint and probes its layers."""

    def run(ctx: Context) -> dict[str, Any]:
        from featurekit.bench import run_bench

        tuned = ctx.results[f"finetune/{variant}"]
        folder = ctx.folder(f"after/{variant}")
        extracted = _extract(ctx, folder / "cache.h5", tuned["best"])
        network = _network_row(extracted["cache"], tuned["best"], variant, tuned["summary"]["trainable"])
        network["seconds_training"] = sum(r.get("seconds") or 0.0 for r in tuned["curve"])
        network["curve"] = tuned["curve"]
        depth = run_bench(extracted["cache"], heads=",".join(ctx.opts.probe_heads), layers="all",
                          out=folder / "depth", overwrite=True)
        return {**extracted, "network": network, "depth": depth["results"]}

    return run


def inside(ctx: Context) -> dict[str, Any]:
    """Dead activations per layer (the study's weights and every fine-tuned checkpoint) and
    linear CKA per layer (pretrained features against each fine-tuned checkpoint's)."""
    from featurekit.similarity import TooFewShared, similarity
    from featurekit.sparsity import sparsity

    o, folder = ctx.opts, ctx.folder("inside")
    bests = [ctx.results[f"finetune/{v}"]["best"] for v in o.variants]
    sp = sparsity(ctx.source, model=o.model, weights=o.weights, compare=bests, image_size=o.image_size,
                  device=ctx.device, workers=ctx.workers, seed=o.seed, val_fraction=o.val_fraction,
                  test_fraction=o.test_fraction, out=folder / "sparsity", overwrite=True,
                  progress=False)
    base, cka, why = ctx.results["features"]["cache"], {}, None
    for v in o.variants:
        try:
            cka[v] = similarity(base, ctx.results[f"after/{v}"]["cache"], out=folder / f"cka-{v}",
                                overwrite=True, device=ctx.device)["same_layer"]
        except TooFewShared as exc:  # too few shared images for CKA: the report says so
            why = str(exc)
            break
    names = {w: v for w, v in zip(bests, o.variants)}
    return {"sparsity": sp, "weights_names": {o.weights: "pretrained", **names},
            "cka": cka if why is None else {}, "cka_skipped": why}


def report(ctx: Context) -> dict[str, Any]:
    from featurekit.report import write_report

    return write_report(ctx.out, {**ctx.opts.stamp(), "source": ctx.source}, ctx.results, ctx.device)


# --------------------------------------------------------------------------- cost estimates
# Rough: forward GFLOPs per 224-px image (torchvision's figures) times the images, over an
# effective rate per device (measured here: resnet18 at 32 px about 1,800 images/s on the
# 2-core CPU, about 40 GFLOP/s); a training step is about three forward passes.
GFLOPS = {"resnet18": 1.8, "resnet34": 3.7, "resnet50": 4.1, "resnet101": 7.8, "resnet152": 11.5}
RATE = {"cpu": 40.0, "cuda": 20_000.0}  # effective GFLOP/s


def _pass_seconds(opts, n: int, device: str, factor: float = 1.0) -> float:
    size = opts.image_size or 224
    gflops = GFLOPS.get(opts.model or "resnet50", 4.1) * (size / 224) ** 2
    return factor * n * gflops / RATE["cuda" if device.startswith("cuda") else "cpu"]


def extract_cost(opts, n: int, device: str) -> float:
    return 1.0 + _pass_seconds(opts, n, device)


def heads_cost(opts, n: int, device: str) -> float:
    return 5.0 * len(opts.heads) + 10.0 + n * 0.002  # selections, layer-wise probe, few-shot


def finetune_cost(variant: str):
    def cost(opts, n: int, device: str) -> float:
        train = n * (1 - opts.val_fraction - opts.test_fraction)
        factor = 1.3 if VARIANTS[variant][1] == "fc" else 3.0
        return opts.epochs * (_pass_seconds(opts, train, device, factor)
                              + _pass_seconds(opts, n * opts.val_fraction, device))

    return cost


def after_cost(opts, n: int, device: str) -> float:
    return extract_cost(opts, n, device) + 10.0


def inside_cost(opts, n: int, device: str) -> float:
    return _pass_seconds(opts, n * opts.test_fraction, device, 1 + len(opts.variants)) + 2.0


def report_cost(opts, n: int, device: str) -> float:
    return 5.0
