"""``featurekit study``: the whole comparison in one resumable command (scratch, linear probe,
frozen features + heads, partial and full fine-tuning; what changed inside), one report.

Every stage is a call of the library's own commands (extract, fit, bench, fewshot, finetune,
sparsity, similarity), all on one split, seed and preprocessing, recorded once in
``study.json``. A stage writes into its own folder and, when it is done, a stamp there
(``stage.json``: its result and seconds). A rerun with ``resume`` skips stamped stages, resumes
an unfinished one through its own resume (extract and finetune continue after their last
commit or epoch; the heads' fits are redone), and refuses with one line when the study's
options changed; so Ctrl-C or kill -9 loses at most the current stage's uncommitted work.

Stages, in order: ``features`` (every layer, the given weights), ``heads`` (each head on
penultimate, the layer-wise probe, the few-shot curve), ``finetune/<variant>`` and
``after/<variant>`` per variant (the fine-tuned checkpoint's layers, its own test accuracy
and the layer-wise probe), ``inside`` (dead activations and CKA, pretrained against every
fine-tuned checkpoint), ``report`` (:mod:`featurekit.report`).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from featurekit import _study_stages as steps
from featurekit._outputs import write_json, write_text
from featurekit._study_stages import PROBE_HEADS, VARIANTS, Context
from featurekit.errors import FeaturekitError, OutputError

STUDY_FORMAT = "featurekit-study"
DEFAULT_HEADS = "logistic,linearsvc,svm,knn"


@dataclass(frozen=True)
class StudyOptions:
    """What a study is: recorded once, compared on ``resume``."""

    source: str
    model: str | None
    weights: str
    variants: tuple[str, ...]
    epochs: int
    image_size: int | None
    heads: tuple[str, ...]
    probe_heads: tuple[str, ...]
    seed: int
    batch_size: int
    val_fraction: float
    test_fraction: float
    shots: str
    draws: int
    max_train_images: int | None = None

    def stamp(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class Stage:
    name: str  # also its folder under the study
    run: Callable[..., dict[str, Any]]
    cost: Callable[[StudyOptions, int, str], float]  # estimated seconds: n images, device


def check_options(source, *, model, weights, variants, epochs, image_size, heads, probe_heads,
                  seed, batch_size, val_fraction, test_fraction, shots, draws,
                  max_train_images=None) -> StudyOptions:
    """Every option a study can check before any stage runs: one line each."""
    from featurekit import models
    from featurekit import options as opt
    from featurekit.fewshot import parse_shots
    from featurekit.heads import check_names

    names = opt.comma_list(variants, list(VARIANTS))
    bad = [v for v in names if v not in VARIANTS]
    if bad or not names:
        raise FeaturekitError(f"unknown variant {bad[0] if bad else ''!r}; valid: {', '.join(VARIANTS)}")
    head_list = opt.comma_list(heads, DEFAULT_HEADS.split(","))
    probes = opt.comma_list(probe_heads, PROBE_HEADS.split(","))
    if not head_list or not probes:
        raise FeaturekitError("--heads and --probe-heads need at least one head each")
    for h in (*head_list, *probes):
        check_names(h)
    for name, rng, value in (("--epochs", opt.EPOCHS, epochs), ("--image-size", opt.IMAGE_SIZE, image_size),
                             ("--seed", opt.SEED, seed), ("--batch-size", opt.BATCH_SIZE, batch_size),
                             ("--val-fraction", opt.FRACTION, val_fraction),
                             ("--test-fraction", opt.FRACTION, test_fraction), ("--draws", opt.DRAWS, draws),
                             ("--max-train-images", opt.MAX_IMAGES, max_train_images)):
        rng.check(name, value)
    if max_train_images is not None and str(source) == "digits":
        raise FeaturekitError("--max-train-images needs a folder or CSV source (digits has no files to list)")
    parse_shots(shots)
    if model is not None:
        models.check_model(model)
    spec = models.resolve_weights(weights)  # a weights file that cannot load: refused now
    model = model or spec.model_name or models.DEFAULT_MODEL  # scratch trains the same model
    return StudyOptions(str(source), model, weights, tuple(dict.fromkeys(names)), epochs, image_size,
                        tuple(head_list), tuple(probes), seed, batch_size, val_fraction, test_fraction, shots, draws,
                        max_train_images)


def stages(opts: StudyOptions) -> list[Stage]:
    out = [Stage("features", steps.features, steps.extract_cost),
           Stage("heads", steps.heads, steps.heads_cost)]
    for v in opts.variants:
        out.append(Stage(f"finetune/{v}", steps.finetune_variant(v), steps.finetune_cost(v)))
        out.append(Stage(f"after/{v}", steps.after_variant(v), steps.after_cost))
    return out + [Stage("inside", steps.inside, steps.inside_cost),
                  Stage("report", steps.report, steps.report_cost)]


def prepare(out: Path, opts: StudyOptions, resume: bool, overwrite: bool) -> None:
    """The study folder: a new one; with ``resume`` one holding this study (its options
    unchanged); with ``overwrite`` any, its stage folders removed. Anything else is refused."""
    stamp = out / "study.json"
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; give a folder")
    if stamp.exists() and not (resume or overwrite):
        raise OutputError(f"{out} holds a study; pass --resume to continue it or --overwrite to redo it")
    if resume and stamp.exists():
        import json

        try:
            recorded = json.loads(stamp.read_text())
        except ValueError:
            raise OutputError(f"{stamp} is damaged; pass --overwrite to redo the study") from None
        differ = [k for k, v in opts.stamp().items() if recorded.get("options", {}).get(k) != v]
        if recorded.get("format") != STUDY_FORMAT or differ:
            raise OutputError(f"{out} holds a study with other options ({', '.join(differ) or 'format'}); "
                              "--resume continues only the same study (or pass --overwrite)")
        return
    if out.exists() and any(out.iterdir()) and not overwrite and not stamp.exists():
        raise OutputError(f"{out} is not empty and holds no study; choose another --out")
    if overwrite:
        for name in ("features", "heads", "finetune", "after", "inside", "report", "figures"):
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    write_json(stamp, {"format": STUDY_FORMAT, "options": opts.stamp(), "started": time.strftime("%Y-%m-%d %H:%M:%S")})


def run_stage(stage: Stage, ctx: Context) -> tuple[dict[str, Any], bool]:
    """(the stage's result, whether it ran now): a stamped stage is read back, any other runs
    (continuing its own partial work) and is stamped when done."""
    import json

    stamp = ctx.folder(stage.name) / "stage.json"
    if stamp.exists():
        return json.loads(stamp.read_text())["result"], False
    ctx.folder(stage.name).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = stage.run(ctx)
    result["seconds"] = time.perf_counter() - t0
    write_json(stamp, {"stage": stage.name, "result": result})
    return result, True


def listed(opts: StudyOptions):
    """The study's source, listed once (and checked: :func:`check_source`)."""
    from featurekit import data

    src = data.open_source(opts.source, seed=opts.seed, val_fraction=opts.val_fraction,
                           test_fraction=opts.test_fraction)
    check_source(src)
    classes = len({it.label for it in src.splits["train"]})
    if opts.max_train_images is not None and opts.max_train_images < classes:
        raise FeaturekitError(f"--max-train-images {opts.max_train_images} is fewer than the {classes} "
                              "classes of the training images; every class needs one")
    return src


def study_source(opts: StudyOptions, out: Path | None, src=None) -> str:
    """What every stage reads: the source itself, or with ``max_train_images`` a CSV in the
    study folder (``source.csv``) listing a seeded, stratified subset of its training images
    and all of its val and test images, with their splits (so every stage sees the same
    subset). ``out`` None: nothing is written (the plan), the source is returned. ``src``:
    the source as :func:`listed` gave it (default: listed here)."""
    import csv

    if opts.max_train_images is None or out is None:
        return opts.source
    src = src or listed(opts)
    train = src.splits["train"]
    if opts.max_train_images < len(train):
        from sklearn.model_selection import train_test_split

        labels = [it.label for it in train]
        kinds = set(labels)  # stratified where both parts can hold every class
        strat = labels if (min(labels.count(c) for c in kinds) >= 2
                           and len(train) - opts.max_train_images >= len(kinds)) else None
        train, _ = train_test_split(train, train_size=opts.max_train_images,
                                    random_state=opts.seed, stratify=strat)
        train = sorted(train, key=lambda it: it.path)
    import io

    rows = [(split, it) for split, items in (("train", train), *((k, v) for k, v in src.splits.items()
                                                                  if k != "train")) for it in items]
    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow(["path", "label", "split"])
    w.writerows((str(src.root / it.path), src.classes[it.label], split) for split, it in rows)
    path = out / "source.csv"
    if not path.exists() or path.read_text(encoding="utf-8") != text.getvalue():  # resume: as it was
        write_text(path, text.getvalue())
    return str(path)


def check_source(src) -> None:
    """Before any stage: two classes or more, and training and reported images of each."""
    if len(src.classes) < 2:
        raise FeaturekitError(f"{src.spec} holds {len(src.classes)} class(es); a study compares "
                              "classifiers of two or more")
    reported = "test" if src.splits.get("test") else "val"
    for split in ("train", reported):
        present = {it.label for it in src.splits.get(split, [])}
        missing = [src.classes[c] for c in range(len(src.classes)) if c not in present]
        if missing:
            raise FeaturekitError(f"{src.spec}: the {split} split has no image of class(es) "
                                  f"{', '.join(missing[:5])}; add images or change --val-fraction/"
                                  "--test-fraction")


def plan_of(opts: StudyOptions, device: str, src=None) -> list[dict[str, Any]]:
    """The stages with an estimate of their cost from the image count and device."""
    src = src or listed(opts)
    n = sum(len(items) for items in src.splits.values())
    if opts.max_train_images is not None:
        n -= max(0, len(src.splits.get("train", [])) - opts.max_train_images)
    return [{"stage": st.name, "estimate_seconds": st.cost(opts, n, device)} for st in stages(opts)]


def run_study(source, out, *, model: str | None = None, weights: str = "imagenet",
              variants: str = "scratch,probe,partial,full", epochs: int = 10,
              image_size: int | None = None, heads: str = DEFAULT_HEADS,
              probe_heads: str = PROBE_HEADS, seed: int = 0,
              batch_size: int = 64, val_fraction: float = 0.15, test_fraction: float = 0.15,
              shots: str = "1,2,5,10,20", draws: int = 20, max_train_images: int | None = None,
              device: str = "auto",
              workers: int | None = None, resume: bool = False, overwrite: bool = False,
              plan: bool = False, progress: bool = True, log=None) -> dict[str, Any]:
    """Run (or with ``plan`` only list) every stage; the report's summary, or the plan."""
    from featurekit._device import resolve_device

    opts = check_options(source, model=model, weights=weights, variants=variants, epochs=epochs,
                         image_size=image_size, heads=heads, probe_heads=probe_heads, seed=seed,
                         batch_size=batch_size,
                         val_fraction=val_fraction, test_fraction=test_fraction, shots=shots,
                         draws=draws, max_train_images=max_train_images)
    dev = resolve_device(device)
    src = listed(opts)  # checked before anything is written
    if plan:
        return {"plan": plan_of(opts, dev, src), "device": dev, "options": opts.stamp()}
    estimates = [row["estimate_seconds"] for row in plan_of(opts, dev, src)]
    out = Path(out)
    prepare(out, opts, resume, overwrite)
    ctx = Context(opts, out, dev, workers, progress, {}, study_source(opts, out, src))
    clock = _Clock(estimates, log)
    for i, stage in enumerate(stages(opts)):
        clock.start(i, stage.name)
        ctx.results[stage.name], ran = run_stage(stage, ctx)
        clock.done(i, stage.name, ran, ctx.results[stage.name].get("seconds", 0.0))
    return ctx.results["report"]


class _Clock:
    """The study's one progress display, a line per stage on stderr: the stage list's position,
    "done" or "already done", the stage's and the total seconds, and the time left (the plan's
    estimates of the stages to come, scaled by how the finished ones compared with theirs)."""

    def __init__(self, estimates: list[float], log) -> None:
        self.estimates, self.log = estimates, log or (lambda message: None)
        self.started, self.spent, self.estimated = time.perf_counter(), 0.0, 0.0

    def start(self, i: int, name: str) -> None:
        self.log(f"study [{i + 1}/{len(self.estimates)}] {name} ...")

    def done(self, i: int, name: str, ran: bool, seconds: float) -> None:
        if ran:  # stages done earlier tell nothing about this machine's speed now
            self.spent += seconds
            self.estimated += self.estimates[i]
        scale = self.spent / self.estimated if self.estimated else 1.0
        left = scale * sum(self.estimates[i + 1:])
        self.log(f"study [{i + 1}/{len(self.estimates)}] {name} "
                 f"{'done' if ran else 'already done'} ({seconds:.1f} s; "
                 f"{time.perf_counter() - self.started:.1f} s so far"
                 + (f"; about {left:.0f} s left)" if i + 1 < len(self.estimates) else ")"))
