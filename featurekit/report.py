"""The study's report: ``summary.json`` (for machines), ``report.md`` and a self-contained
``report.html`` (figures embedded as data URIs, no external resource), ``figures/*.png``.

* **The table**: every approach (from scratch, linear probe, frozen features + each head,
  partial and full fine-tuning) with its test accuracy and 95% Wilson interval, balanced
  accuracy, trainable parameters, seconds and device; the best in bold, and each other one
  compared with it on the same test images by McNemar's exact test (two-sided binomial on the
  discordant images): p >= 0.05 is marked "within noise of the best".
* **Checks**: an approach whose accuracy interval reaches down to chance level (the largest
  class's share of the test images) is flagged with the causes its own run shows: one class
  predicted for most images, a parameter on its grid's edge, a solver stopped at its
  iteration limit, a class missing from training, a collapsed representation (most
  activations zero), training accuracy at chance too (labels that do not match the images).
* Figures: learning curves, accuracy by depth, dead activations, CKA per layer, heads'
  accuracy against cost, the few-shot curve. Provenance: versions, device, options, the
  source's fingerprint, seeds, and the command that reproduces each stage.
"""

from __future__ import annotations

import base64
import html
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from featurekit._outputs import save_figure, write_json, write_text

SUMMARY_FORMAT = "featurekit-study-summary"
SUMMARY_VERSION = 1
NOISE_P = 0.05
MOSTLY_ONE_CLASS = 0.9  # a classifier predicting one class for this share of images
COLLAPSED = 0.9  # share of zero activations of a collapsed representation


def mcnemar_p(a: list[int], b: list[int]) -> float:
    """Two-sided exact McNemar test of two classifiers' per-image correctness on the same
    images: the binomial test of the discordant pairs (scipy.stats.binomtest)."""
    from scipy.stats import binomtest

    a, b = np.asarray(a), np.asarray(b)
    only_a, only_b = int(np.sum((a == 1) & (b == 0))), int(np.sum((a == 0) & (b == 1)))
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(min(only_a, only_b), only_a + only_b, 0.5).pvalue)


def approaches(options: dict[str, Any], results: dict[str, Any], device: str = "cpu") -> list[dict[str, Any]]:
    """The table's rows in the study's order: scratch, probe, the heads, partial, full."""
    net = {v: results[f"after/{v}"]["network"] for v in options["variants"]}
    rows = [net[v] for v in ("scratch", "probe") if v in net]
    rows += results["heads"]["heads"]
    rows += [net[v] for v in ("partial", "full") if v in net]
    for r in rows:
        r.setdefault("seconds", r.get("total_seconds", r.get("seconds_training")))
        r["device"] = device
    best = max(rows, key=lambda r: r["accuracy"])
    for r in rows:
        r["best"] = r is best
        r["p_vs_best"] = None if r is best else mcnemar_p(best["correct"], r["correct"])
        r["within_noise"] = r is best or r["p_vs_best"] >= NOISE_P
    return rows


def checks(rows: list[dict[str, Any]], y_test: np.ndarray, context: dict[str, Any]) -> list[dict[str, Any]]:
    """Every approach at or below chance level, with the causes its run shows (module
    docstring); ``context``: ``zero_fraction`` (penultimate's share of zeros, per cache
    label), ``train_classes`` (classes in training), ``classes``."""
    chance = float(np.bincount(y_test).max() / len(y_test))
    out = []
    for r in rows:
        if r["accuracy_ci95"][0] > chance:
            continue
        out.append({"approach": r["approach"], "accuracy": r["accuracy"], "chance": chance,
                    "causes": causes(r, chance, context) or ["no cause found in the run: look at "
                                                             "the features and labels by hand"]})
    return out


def causes(row: dict[str, Any], chance: float, context: dict[str, Any]) -> list[str]:
    """The likely causes of one approach's chance-level accuracy, read from its run."""
    found = []
    if (row.get("predicted_share") or 0) >= MOSTLY_ONE_CLASS:
        found.append(f"it predicts one class for {row['predicted_share']:.0%} of the test images")
    sel = row.get("selection") or {}
    for key in sel.get("edge") or []:
        found.append(f"its {key} = {row['params'][key]:.3g} is on the edge of the grid searched "
                     "(a strongly regularised model predicts the most frequent class)")
    if row.get("converged") is False or sel.get("not_converged"):
        found.append("its solver stopped at its iteration limit before converging")
    missing = context.get("classes", 0) - context.get("train_classes", context.get("classes", 0))
    if missing > 0:
        found.append(f"{missing} class(es) have no training images")
    zeros = context.get("zero_fraction")
    if zeros is not None and zeros >= COLLAPSED:
        found.append(f"the representation collapsed: {zeros:.0%} of its activations are zero")
    curve = row.get("curve") or []
    train_acc = [c.get("train_acc") for c in curve if c.get("train_acc") is not None]
    if train_acc and max(train_acc) <= chance + 0.05:
        found.append(f"its training accuracy stayed at chance too ({max(train_acc):.3f}): the "
                     "labels may not match the images, or it did not learn")
    if row.get("train_accuracy") is not None and row["train_accuracy"] <= chance + 0.05:
        found.append(f"its accuracy on its own training rows is at chance too "
                     f"({row['train_accuracy']:.3f}): the labels may not match the images")
    return found


# --------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_curves(results: dict[str, Any], variants: list[str], path: Path) -> None:
    """Every fine-tuning variant's learning curves overlaid: val accuracy and train loss."""
    plt = _plt()
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for v in variants:
        curve = results[f"finetune/{v}"]["curve"]
        epochs = [c["epoch"] for c in curve]
        acc.plot(epochs, [c.get("val_acc") for c in curve], "o-", label=v)
        loss.plot(epochs, [c.get("train_loss") for c in curve], "o-", label=v)
    acc.set(xlabel="epoch", ylabel="val accuracy", title="fine-tuning: val accuracy")
    loss.set(xlabel="epoch", ylabel="train loss", title="fine-tuning: train loss")
    for ax in (acc, loss):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def figure_sparsity(sp: dict[str, Any], names: dict[str, str], path: Path) -> None:
    """Share of zero activations per layer, the study's weights against each checkpoint."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4), dpi=110)
    layers = [row["layer"] for row in sp["layers"]]
    for w in sp["weights"]:
        ax.plot(range(len(layers)), [row["zero_fraction"][w] for row in sp["layers"]], "o-",
                label=names.get(w, Path(w).name))
    ax.set_xticks(range(len(layers)), layers, rotation=45, ha="right", fontsize=7)
    ax.set(ylabel="share of zero activations", title="dead activations per layer")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def figure_cka(cka: dict[str, dict[str, float]], path: Path) -> None:
    """Same-layer linear CKA, pretrained against each fine-tuned checkpoint."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for v, per_layer in cka.items():
        layers = list(per_layer)
        ax.plot(range(len(layers)), [per_layer[x] for x in layers], "o-", label=v)
        ax.set_xticks(range(len(layers)), layers)
    ax.set(ylim=(0, 1.05), ylabel="linear CKA with the pretrained layer",
           title="how much each layer moved (1: unchanged)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def figures(folder: Path, options: dict[str, Any], results: dict[str, Any], rows) -> dict[str, str]:
    """figures/*.png; name -> path."""
    from featurekit.bench import plot, plot_depth

    folder.mkdir(parents=True, exist_ok=True)
    variants = options["variants"]
    out = {name: folder / f"{name}.png" for name in ("curves", "depth", "sparsity", "cka", "heads",
                                                       "fewshot")}
    figure_curves(results, variants, out["curves"])
    depth = [{**r, "cache": "pretrained"} for r in results["heads"]["depth"]]
    depth += [{**r, "cache": v} for v in variants for r in results[f"after/{v}"]["depth"]]
    plot_depth(depth, out["depth"], title="")
    figure_sparsity(results["inside"]["sparsity"], results["inside"]["weights_names"], out["sparsity"])
    if results["inside"]["cka"]:
        figure_cka(results["inside"]["cka"], out["cka"])
    else:
        del out["cka"]
    plot([{**r, "layer": "penultimate"} for r in results["heads"]["heads"]], out["heads"])
    shutil.copyfile(Path(results["heads"]["folder"]) / "fewshot" / "fewshot.png", out["fewshot"])
    return {k: str(v) for k, v in out.items()}


# --------------------------------------------------------------------------- text


def provenance(options: dict[str, Any], results: dict[str, Any], device: str) -> dict[str, Any]:
    """Versions, device, options, the source's fingerprint, seeds, and per stage the command
    that reproduces it."""
    import torch
    import torchvision

    from featurekit._version import __version__
    from featurekit.cache import open_cache

    with open_cache(results["features"]["cache"]) as c:
        source = c.attrs.get("source")
    o = options
    common = (f"--seed {o['seed']} --val-fraction {o['val_fraction']} --test-fraction "
              f"{o['test_fraction']}" + (f" --image-size {o['image_size']}" if o["image_size"] else ""))
    commands = {"features": f"featurekit extract {o['source']} --out features/cache.h5 --model "
                            f"{o['model']} --weights {o['weights']} --layers all {common}",
                "heads": f"featurekit bench features/cache.h5 --heads {','.join(o['heads'])}; "
                         f"featurekit bench features/cache.h5 --heads {','.join(o['probe_heads'])} "
                         "--layers all; featurekit fewshot features/cache.h5 --heads "
                         f"{','.join(o['probe_heads'])} --shots {o['shots']} --draws {o['draws']}"}
    for v in o["variants"]:
        tuned = results[f"finetune/{v}"]
        commands[f"finetune/{v}"] = (f"featurekit finetune {o['source']} --out finetune/{v}/run --model "
                                     f"{o['model']} --weights {tuned['weights']} --train-layers "
                                     f"{tuned['train_layers']} --epochs {o['epochs']} --batch-size "
                                     f"{o['batch_size']} {common}")
        commands[f"after/{v}"] = (f"featurekit extract {o['source']} --out after/{v}/cache.h5 --weights "
                                  f"finetune/{v}/run/best.pt --layers all {common}")
    return {"featurekit": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "device": device, "options": options, "source": source, "seed": o["seed"],
            "commands": commands}


def _cell(r: dict[str, Any], key: str) -> str:
    v = r.get(key)
    if key == "accuracy":
        low, high = r["accuracy_ci95"]
        text = f"{v:.4f} [{low:.3f}, {high:.3f}]"
        return f"**{text}**" if r.get("best") else text
    if key == "noise":
        return "best" if r.get("best") else (f"within noise (p={r['p_vs_best']:.2g})" if r["within_noise"]
                                             else f"worse (p={r['p_vs_best']:.2g})")
    if isinstance(v, float):
        return f"{v:.4f}" if key != "seconds" else f"{v:.1f}"
    return "" if v is None else f"{v:,}" if isinstance(v, int) else str(v)


COLUMNS = [("approach", "approach"), ("accuracy", "test accuracy [95% CI]"),
           ("balanced_accuracy", "balanced acc."), ("noise", "vs the best (McNemar)"),
           ("trainable", "trainable parameters"), ("seconds", "seconds"), ("device", "device")]


def markdown(summary: dict[str, Any]) -> str:
    lines = [f"# featurekit study: {summary['provenance']['options']['source']}", "",
             f"Test images: {summary['n_test']}; chance (largest class): {summary['chance']:.3f}; "
             f"device: {summary['provenance']['device']}. Seconds: the approach's own (fine-tuning: "
             "training; heads: selection + refit, on features extracted once).", "",
             "| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r, k) for k, _ in COLUMNS) + " |" for r in summary["approaches"]]
    lines += ["", "## Checks", ""]
    lines += [f"- **{c['approach']}** is not above chance level (accuracy {c['accuracy']:.3f}, its 95% "
              f"interval reaches chance, {c['chance']:.3f}): " + "; ".join(c["causes"])
              for c in summary["checks"]] or ["- every approach is above chance level"]
    if summary.get("cka_skipped"):
        lines += ["", f"CKA was not computed: {summary['cka_skipped']}"]
    lines += ["", "## Figures", ""]
    lines += [f"![{name}](figures/{name}.png)" for name in summary["figures"]]
    lines += ["", "## Provenance", "", f"featurekit {summary['provenance']['featurekit']}, torch "
              f"{summary['provenance']['torch']}, torchvision {summary['provenance']['torchvision']}; "
              f"seed {summary['provenance']['seed']}.", ""]
    lines += [f"- `{stage}`: `{cmd}`" for stage, cmd in summary["provenance"]["commands"].items()]
    return "\n".join(lines) + "\n"


def to_html(md_text: str, folder: Path) -> str:
    """The markdown report as one HTML page: tables, lists, headings, and every figure
    embedded as a data URI (nothing outside the file is referenced)."""
    body, table = [], []
    for line in md_text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not set("".join(cells)) <= set("-:"):
                table.append(cells)
            continue
        if table:
            head, *rest = table
            body.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>"
                                  for row in rest) + "</table>")
            table = []
        if line.startswith("!["):
            name = line[line.index("(") + 1:-1]
            data = base64.b64encode((folder / name).read_bytes()).decode()
            body.append(f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(Path(name).stem)}</figcaption></figure>")
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line.lstrip('# '))}</h{level}>")
        elif line.startswith("- "):
            body.append(f"<ul><li>{_inline(line[2:])}</li></ul>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
             "img{max-width:100%}figure{margin:1em 0}code{background:#f4f4f4}")
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>featurekit study</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def _inline(text: str) -> str:
    import re

    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


def write_report(out: Path, options: dict[str, Any], results: dict[str, Any], device: str) -> dict[str, Any]:
    """summary.json, report.md, report.html and figures/ in the study folder ``out``; the summary."""
    from featurekit.cache import open_cache

    rows = approaches(options, results, device)
    with open_cache(results["features"]["cache"]) as c:
        split = rows[0]["eval_split"]
        y = c.labels(split)
        zeros = (c.attrs.get("zero_fraction") or {}).get("penultimate")
        classes = len(c.classes)
    context = {"zero_fraction": zeros, "classes": classes,
               "train_classes": min(r.get("train_classes", classes) for r in rows)}
    found = checks(rows, y, context)
    figs = figures(out / "figures", options, results, rows)
    summary = {"format": SUMMARY_FORMAT, "version": SUMMARY_VERSION, "n_test": int(len(y)),
               "chance": float(np.bincount(y).max() / len(y)),
               "approaches": [{k: v for k, v in r.items() if k not in ("correct", "curve", "selection",
                                                                       "confusion_matrix")} for r in rows],
               "checks": found, "cka": results["inside"]["cka"],
               "cka_skipped": results["inside"].get("cka_skipped"),
               "fewshot": results["heads"]["fewshot"],
               "stages": {k: v.get("seconds") for k, v in results.items()},
               "figures": list(figs), "provenance": provenance(options, results, device)}
    write_json(out / "summary.json", summary)
    md = markdown(summary)
    write_text(out / "report.md", md)
    write_text(out / "report.html", to_html(md, out))
    return summary
