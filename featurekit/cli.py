"""The ``featurekit`` command line: each command parses, calls one library function, renders.

User errors (:class:`~featurekit.errors.FeaturekitError`) become one line on stderr and exit
code 2; warnings one ``warning: …`` line each. ``--json`` puts exactly one JSON object on
stdout; progress and logs go to stderr. Help is plain text (no markup: a ``[default: …]`` in a
help string is shown as written), wrapped to the terminal.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from typer.core import TyperGroup

from featurekit import options as opt
from featurekit._console import log as _err
from featurekit.errors import FeaturekitError


def _one_line(message: str) -> str:
    # typer >= 0.2x validates through pydantic, which prefixes a parser's ValueError
    return " ".join(message.replace("Value error, ", "").split())


class _OneLineErrors(TyperGroup):
    """The command-line parser's own errors (an option that does not parse, a missing argument)
    are one line on stderr and exit code 2, like every other user error."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _CLICK_ERROR as exc:
            if getattr(exc, "ctx", None) is not None and exc.ctx.command is not None:
                hint = f" (see {exc.ctx.command_path} --help)"
            else:
                hint = ""
            _err("error: " + _one_line(exc.format_message()) + hint)
            if not standalone_mode:
                raise
            sys.exit(exc.exit_code)
        except typer.Abort:
            _err("aborted")
            if not standalone_mode:
                raise
            sys.exit(1)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


# typer >= 0.2x carries its own copy of click: find its base exception through a public name
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

app = typer.Typer(
    cls=_OneLineErrors,
    help="Run a ResNet once, compare classifiers on its cached features in seconds.\n\n"
         "\b\nExample (offline, on scikit-learn's digits):\n"
         "  featurekit demo --out demo/\n"
         "  featurekit extract ./birds --model resnet50 --out birds.h5\n"
         "  featurekit bench birds.h5 --out bench/",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _console():
    """Rich console on stdout; wide enough for tables when stdout is a file or pipe."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)


def _handles_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one line and exit code 2; Ctrl-C into exit code 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from featurekit._console import one_line_warnings, quiet_hdf5_noise
        from featurekit._dist import failing_together

        quiet_hdf5_noise()
        try:
            with one_line_warnings(), failing_together():  # under torchrun: stop together
                return fn(*args, **kwargs)
        except FeaturekitError as exc:
            if not getattr(exc, "quiet", False):  # under torchrun, rank 0 alone says it
                _err("error: " + " ".join(str(exc).split()))  # one line, whatever a library said
            if getattr(exc, "hard_exit", False):  # a broken HDF5 file: skip its exit handlers
                import os

                sys.stdout.flush()
                os._exit(exc.exit_code)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            _err("interrupted: committed rows are kept; the output is marked incomplete")
            raise typer.Exit(130) from None
        except Exception as exc:  # out of memory and the like: the user's to fix, not a bug
            from featurekit.errors import from_runtime

            error = from_runtime(exc)
            if error is None:
                raise
            _err("error: " + " ".join(str(error).split()))
            raise typer.Exit(error.exit_code) from None

    return wrapper


def _live(progress: bool) -> bool:
    """Selection progress bars only where someone watches (a terminal): their last frame would
    otherwise land in logs between the result lines."""
    return progress and sys.stderr.isatty()


def _print_json(obj: Any) -> None:
    """The library's results are JSON-ready: nothing is converted here."""
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- extract

_SOURCE_HELP = "A folder ROOT/<class>/<img> or ROOT/<split>/<class>/<img>, a CSV path,label[,split], or 'digits'."


@app.command()
@_handles_errors
def extract(
    source: str = typer.Argument(..., metavar="SOURCE", help=_SOURCE_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="The HDF5 cache to write."),
    model: Optional[str] = typer.Option(
        None, help="torchvision ResNet-family model [default: resnet50, or the checkpoint's]."
    ),
    weights: str = typer.Option("imagenet", help="imagenet | none (seeded random init) | PATH to a state dict or checkpoint."),
    layers: str = typer.Option("penultimate", help="Comma list of penultimate, layer1..layer4, or all."),
    pool: str = typer.Option("avg", help="Pooling of spatial maps (layer1..layer4): avg | max (C dims) | avg2 | avg3 (mean over a 2x2 / 3x3 grid: C*4 / C*9 dims)."),
    image_size: Optional[int] = typer.Option(None, parser=opt.IMAGE_SIZE, help="Resize shorter side to N and centre-crop N x N (16-8192) [default: the weights' own preprocessing]."),
    batch_size: Optional[int] = typer.Option(None, parser=opt.BATCH_SIZE, help="Images per forward pass [default: 64 on CPU, 256 on CUDA]."),
    workers: Optional[int] = typer.Option(None, parser=opt.WORKERS, help="DataLoader decoding workers [default: 1 on CPU, one per core (max 16) on CUDA]."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    precision: str = typer.Option("auto", help="auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16."),
    dtype: str = typer.Option("float32", help="Storage type of features: float32 | float16."),
    decode: str = typer.Option("auto", help="auto (hw, else gpu, on CUDA) | cpu (workers decode) | gpu (batched nvJPEG on the GPU) | hw (the GPU's JPEG engines via nvImageCodec: featurekit[nvimgcodec]; falls back to gpu, then cpu, with a warning)."),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the forward pass (GPU, long runs) [default: off]."),
    seed: int = typer.Option(0, parser=opt.SEED, help="Seed of the split and of random init."),
    val_fraction: float = typer.Option(0.15, parser=opt.FRACTION, help="Share of each class for val, for sources without split folders (0: none)."),
    test_fraction: float = typer.Option(0.15, parser=opt.FRACTION, help="Share of each class for test, for sources without split folders (0: none)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output."),
    resume: bool = typer.Option(False, help="Continue an interrupted cache after its last commit (same source and options)."),
    commit_seconds: float = typer.Option(2.0, parser=opt.COMMIT_SECONDS, help="Commit rows to disk at least this often (a kill loses at most this much work)."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as one JSON object on stdout [default: off]."),
    progress: bool = typer.Option(True, help="Show a progress bar on stderr."),
) -> None:
    """Run a ResNet over SOURCE once and write its activations to an HDF5 cache.

    \b
    Example:
      featurekit extract ./birds --model resnet50 --layers penultimate,layer3 \\
          --out birds.h5
    """
    from featurekit.extraction import extract as run

    summary = run(
        source, out, model=model, weights=weights, layers=layers, pool=pool,
        image_size=image_size, batch_size=batch_size, workers=workers, device=device,
        precision=precision, dtype=dtype, decode=decode, compile=compile_model, seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction, overwrite=overwrite, resume=resume,
        commit_seconds=commit_seconds, progress=progress, log=_err,
    )
    if summary.rank != 0:  # under torchrun only rank 0 reports
        return
    if json_out:
        _print_json(summary.to_dict())
        return
    dims = ", ".join(f"{k} {v}-d" for k, v in summary.layers.items())
    resumed = f"; {summary.processed} read in this run" if summary.processed < summary.images else ""
    _err(
        f"extracted {summary.rows} images ({summary.skipped} skipped{resumed}) with {summary.model} "
        f"[{summary.weights}, {summary.device}, {summary.precision}] in {summary.seconds:.1f} s "
        f"({summary.images_per_second:.1f} img/s): {dims} -> {summary.out}"
    )
    for split, s in summary.splits.items():
        if s["skipped"]:
            _err(f"  {split}: {s['skipped']} file(s) skipped; `featurekit info {summary.out}` lists them")


# --------------------------------------------------------------------------- info


@app.command()
@_handles_errors
def info(
    cache: Path = typer.Argument(..., metavar="CACHE", help="A featurekit HDF5 cache."),
    verify: bool = typer.Option(False, help="Compare with the source now: files added, removed or changed since extraction."),
    quick: bool = typer.Option(False, help="Header and counts only: skip reading every row (checksums, finite features) [default: read them]."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout [default: off]."),
) -> None:
    """Describe a cache: splits, rows, layers, classes, model, weights, skipped files.

    Reads every row to check it: each chunk against its checksum, every feature finite; a
    damaged cache is one line naming what is damaged (exit 2). An interrupted cache is
    described too, clearly marked incomplete.

    \b
    Example: featurekit info birds.h5 --json
    """
    from featurekit.cache import open_cache

    with open_cache(cache, allow_incomplete=True) as c:
        summary = c.summary()
        if not quick:
            summary["integrity"] = c.require_intact()
        if verify:
            from featurekit.data import verify as check

            summary["verify"] = check(c)
    if json_out:
        _print_json(summary)
        return
    _render_info(summary)
    if not quick:
        _render_integrity(summary["integrity"])
    if verify:
        v = summary["verify"]
        if v["unchanged"]:
            print(f"verify: the source {v['source']} is unchanged since extraction")
        else:
            print(f"verify: the source {v['source']} changed since extraction: {len(v['added'])} "
                  f"added, {len(v['removed'])} removed, {len(v['changed'])} changed")
            for key in ("added", "removed", "changed"):
                for p in v[key][:20]:
                    print(f"  {key}: {p}")
                if len(v[key]) > 20:
                    print(f"  … and {len(v[key]) - 20} more {key} (see --json)")


def _render_integrity(i: dict[str, Any]) -> None:
    if i["checksums"] == "none":
        print(f"integrity: all {i['rows']} rows read, finite ({i['seconds']:.1f} s); this cache has "
              "no checksums (written before featurekit 0.3): `featurekit pack` writes a copy with them")
    else:
        print(f"integrity: intact ({i['checksums']}: every chunk of {i['rows']} rows matched its "
              f"checksum, every feature finite; {i['seconds']:.1f} s)")


def _render_info(s: dict[str, Any]) -> None:
    from rich.table import Table

    console = _console()
    state = "complete" if s["complete"] else "[bold red]INCOMPLETE[/] (interrupted; extract --resume)"
    layout = f", sharded over {len(s['shards'])} shards" if s.get("layout") == "sharded" else ""
    console.print(f"[bold]{s['path']}[/]  featurekit cache v{s['format_version']}, {state}{layout}")
    console.print(
        f"model {s['model']}  weights {s['weights']}"
        + (f" (sha256 {s['weights_sha256'][:12]}…)" if s["weights_sha256"] else "")
        + f"  pool {s['pool']}  precision {s['precision']}  dtype {s['dtype']}"
    )
    pre = s.get("preprocess") or {}
    console.print(
        f"preprocess: resize {pre.get('resize_size')} crop {pre.get('crop_size')} "
        f"{pre.get('interpolation')}  source: {(s.get('source') or {}).get('spec')}"
        f" (splits {(s.get('source') or {}).get('split_origin')}, seed {s['seed']})"
    )
    classes = s["classes"]
    shown = ", ".join(classes[:20]) + (f", … ({len(classes)} in all)" if len(classes) > 20 else "")
    console.print(f"classes ({len(classes)}): {shown}")
    t = Table(title=None)
    t.add_column("split")
    t.add_column("rows", justify="right")
    t.add_column("skipped", justify="right")
    for split, d in s["splits"].items():
        t.add_row(split, str(d["rows"]), str(len(d["skipped"])))
    console.print(t)
    lt = Table()
    lt.add_column("layer")
    lt.add_column("dim", justify="right")
    lt.add_column("zero fraction", justify="right")
    zf = s.get("zero_fraction") or {}
    for layer, dim in s["layers"].items():
        z = zf.get(layer)
        lt.add_row(layer, str(dim), "" if z is None else f"{z:.4f}")
    console.print(lt)
    for split, d in s["splits"].items():
        for item in d["skipped"][:20]:
            console.print(f"skipped [{split}] {item['path']}: {item['reason']}", markup=False)
        if len(d["skipped"]) > 20:
            console.print(f"… and {len(d['skipped']) - 20} more in {split} (see --json)")


@app.command()
@_handles_errors
def pack(
    cache: Path = typer.Argument(..., metavar="CACHE", help="A featurekit cache, sharded or not."),
    out: Path = typer.Option(..., "--out", "-o", help="The single-file cache to write."),
    overwrite: bool = typer.Option(False, help="Replace an existing output."),
) -> None:
    """Copy a cache into one ordinary file (the logical cache of a sharded extraction too).

    \b
    Example: featurekit pack birds.h5 --out birds-one.h5
    """
    from featurekit.cache import pack as run

    written = run(cache, out, overwrite=overwrite)
    _err(f"packed {cache} -> {written}")


# --------------------------------------------------------------------------- heads


@app.command()
@_handles_errors
def fit(
    cache: Path = typer.Argument(..., metavar="CACHE", help="A featurekit HDF5 cache."),
    head: str = typer.Option(..., help="logistic | linearsvc | svm (RBF SVC) | nystroem (RBF approximation + logistic) | knn (k nearest neighbours, cosine, DINO's vote)."),
    out: Path = typer.Option(..., "--out", "-o", help="The head file: NAME.skops (safe to load, shareable) or NAME.joblib (a pickle; cuML heads)."),
    backend: str = typer.Option("auto", help="auto (torch on a CUDA GPU where the head has it, else sklearn) | sklearn | torch | cuml."),
    layer: Optional[str] = typer.Option(None, help="Cached layer to fit on [default: penultimate]."),
    c: Optional[float] = typer.Option(None, "--C", parser=opt.POSITIVE, help="Fix C (> 0) instead of choosing it [default: chosen on the grid]."),
    gamma: Optional[float] = typer.Option(None, parser=opt.POSITIVE, help="Fix the RBF gamma (> 0; svm, nystroem) instead of choosing it [default: chosen on the grid]."),
    k: Optional[int] = typer.Option(None, "--k", parser=opt.NEIGHBOURS, help="Fix the neighbours k (>= 1; knn) instead of choosing it [default: chosen on the grid]."),
    t: Optional[float] = typer.Option(None, "--T", parser=opt.POSITIVE, help="Fix the vote's temperature T (> 0; knn) instead of choosing it [default: chosen on the grid]."),
    train_split: str = typer.Option("train", help="Split to train on."),
    eval_split: Optional[str] = typer.Option(None, help="Split to report [default: test, else val]."),
    select_metric: str = typer.Option("accuracy", help="What selection maximises: accuracy | balanced_accuracy."),
    refit: bool = typer.Option(True, help="Refit the chosen point on train + val (--no-refit: train only)."),
    jobs: Optional[int] = typer.Option(None, parser=opt.JOBS, help="Processes for point-by-point fits [default: every core]."),
    dask_scheduler: Optional[str] = typer.Option(None, help="Run the selection's units on this Dask scheduler (tcp://HOST:PORT); workers read the cache themselves [default: none, processes here]."),
    cv: Optional[int] = typer.Option(None, "--cv", parser=opt.CV, help="Choose by K-fold cross-validation over train (and val) [default: on val, else on 20% of train held out]."),
    extend_grid: bool = typer.Option(True, help="Extend the grid past its edge (a decade a step, at most 3) when the best point lies there."),
    overwrite: bool = typer.Option(False, help="Replace an existing output."),
    allow_incomplete: bool = typer.Option(False, help="Use the committed rows of an interrupted cache."),
    progress: bool = typer.Option(True, help="Show the selection's progress on stderr (on a terminal)."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as one JSON object on stdout [default: off]."),
) -> None:
    """Fit a head on cached features; C (gamma; knn: k, T) are chosen without touching the reported split.

    \b
    Example: featurekit fit birds.h5 --head svm --out birds-svm.skops --json
    """
    from featurekit.fit import fit_head

    result = fit_head(cache, head, out=out, overwrite=overwrite, backend=backend, layer=layer,
                      C=c, gamma=gamma, k=k, T=t, train_split=train_split, eval_split=eval_split,
                      allow_incomplete=allow_incomplete, metric=select_metric, refit=refit,
                      jobs=jobs, progress=_live(progress), scheduler=dask_scheduler, cv=cv,
                      extend=extend_grid)
    r = result.report
    if json_out:
        _print_json(r)
        return
    from featurekit.select import describe, params_text

    params = params_text(r["params"]).replace(" ", ", ")

    sel = r["selection"]
    grown = f", grid extended by {len(sel['extended'])} point(s)" if sel.get("extended") else ""
    print(f"{r['head']} ({r['backend']}) on {r['layer']}: {params} chosen by {describe(sel)}"
          + (f" ({sel['metric']}, {r['selection_seconds']:.2f} s{grown}), refit on {sel['refit']}"
             if sel["method"] != "given" else ""))
    low, high = r["accuracy_ci95"]
    line = (f"{r['eval_split']}: accuracy {r['accuracy']:.4f} (95% CI {low:.4f}-{high:.4f}), "
            f"balanced accuracy {r['balanced_accuracy']:.4f}, macro F1 {r['macro_f1']:.4f}")
    if "top5_accuracy" in r:
        line += f", top-5 {r['top5_accuracy']:.4f}"
    print(line)
    print(f"trained on {r['n_train']} rows in {r['fit_seconds']:.3f} s; predicted {r['n_eval']} "
          f"rows in {r['predict_seconds']:.3f} s -> {out}")
    if r["head"] == "knn":  # a k-NN head has no weights: it keeps the rows it votes with
        size = Path(result.out).stat().st_size / 1e6
        print(f"a knn head's state is its training rows: {out} holds all {r['n_train']} of them "
              f"({size:.1f} MB)")


@app.command()
@_handles_errors
def predict(
    head_file: Path = typer.Argument(..., metavar="HEAD", help="A head saved by featurekit fit."),
    cache: Path = typer.Argument(..., metavar="CACHE", help="A featurekit cache with the same backbone and layer."),
    out: Path = typer.Option(..., "--out", "-o", help="CSV to write: path,label,prediction,score."),
    split: Optional[str] = typer.Option(None, help="Split to predict [default: the head's reported split]."),
    force: bool = typer.Option(False, help="Predict even if the cache's backbone/layer/preprocessing differ."),
    trust: bool = typer.Option(False, help="Load a .joblib head: a pickle, which runs the code it holds; only for files you made."),
    overwrite: bool = typer.Option(False, help="Replace an existing output."),
    allow_incomplete: bool = typer.Option(False, help="Use the committed rows of an interrupted cache."),
    json_out: bool = typer.Option(False, "--json", help="Print a summary as one JSON object on stdout [default: off]."),
) -> None:
    """Predict a cache split with a saved head; writes one CSV row per sample.

    \b
    Example:
      featurekit predict birds-svm.skops birds.h5 --split test --out preds.csv
    """
    from featurekit.fit import predict as run

    summary = run(head_file, cache, out, split=split, force=force,
                  allow_incomplete=allow_incomplete, trust=trust, overwrite=overwrite)
    if json_out:
        _print_json(summary)
        return
    print(f"{summary['rows']} predictions for split {summary['split']} -> {summary['out']} "
          f"(accuracy {summary['accuracy']:.4f})")


@app.command()
@_handles_errors
def bench(
    caches: List[Path] = typer.Argument(..., metavar="CACHE...", help="One featurekit cache, or several of the same classes and model (e.g. pretrained and fine-tuned), each under the same protocol."),
    heads: str = typer.Option("logistic,linearsvc,svm,nystroem,knn", help="Comma list of heads (NAME or NAME:BACKEND)."),
    backends: str = typer.Option("auto", help="Comma list of backends: auto (per head the measured fastest: torch), sklearn, torch, cuml."),
    layers: Optional[str] = typer.Option(None, help="Comma list of cached layers, or all (every cached layer, shallow first) [default: penultimate]."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for results.{csv,json,md,png} and depth.png [default: none, print only]."),
    train_split: str = typer.Option("train", help="Split to train on."),
    eval_split: Optional[str] = typer.Option(None, help="Split to report [default: test, else val]."),
    allow_incomplete: bool = typer.Option(False, help="Use the committed rows of an interrupted cache."),
    select_metric: str = typer.Option("accuracy", help="What selection maximises: accuracy | balanced_accuracy."),
    refit: bool = typer.Option(True, help="Refit the chosen point on train + val (--no-refit: train only)."),
    jobs: Optional[int] = typer.Option(None, parser=opt.JOBS, help="Processes for the combinations [default: every core]."),
    dask_scheduler: Optional[str] = typer.Option(None, help="Run the combinations on this Dask scheduler (tcp://HOST:PORT); workers read the cache themselves [default: none, processes here]."),
    cv: Optional[int] = typer.Option(None, "--cv", parser=opt.CV, help="Choose by K-fold cross-validation over train (and val) [default: on val, else on 20% of train held out]."),
    extend_grid: bool = typer.Option(True, help="Extend a grid past its edge (a decade a step, at most 3) when the best point lies there."),
    overwrite: bool = typer.Option(False, help="Replace results.* already in --out."),
    progress: bool = typer.Option(True, help="A progress bar on stderr (on a terminal): the head, its fits and the time left; else a line per finished head."),
    json_out: bool = typer.Option(False, "--json", help="Print the results as one JSON object on stdout [default: off]."),
) -> None:
    """Compare every head x backend x layer under the same selection protocol.

    \b
    Example:
      featurekit bench birds.h5 --heads logistic,svm --layers penultimate,layer3 \\
          --out bench/
      featurekit bench pre.h5 ft.h5 --heads logistic,knn --layers all --out depth/
    """
    from featurekit.bench import run_bench

    result = run_bench(list(caches), heads=heads, backends=backends, layers=layers, out=out,
                       train_split=train_split, eval_split=eval_split,
                       allow_incomplete=allow_incomplete, overwrite=overwrite,
                       metric=select_metric, refit=refit, jobs=jobs, progress=_live(progress),
                       scheduler=dask_scheduler, cv=cv, extend=extend_grid,
                       log=None if _live(progress) else _err)
    if json_out:
        _print_json(result)
        return
    _render_bench(result)


@app.command()
@_handles_errors
def fewshot(
    cache: Path = typer.Argument(..., metavar="CACHE", help="A featurekit HDF5 cache."),
    shots: str = typer.Option("1,2,5,10,20", help="Comma list of labelled images per class."),
    draws: int = typer.Option(20, parser=opt.DRAWS, help="Seeded, nested draws per shot count (>= 1; the interval needs 2)."),
    heads: str = typer.Option("logistic,knn", help="Comma list of heads."),
    backend: str = typer.Option("auto", help="auto (per head the measured fastest: torch) | sklearn | torch | cuml."),
    layer: Optional[str] = typer.Option(None, help="Cached layer [default: penultimate]."),
    c: Optional[float] = typer.Option(None, "--C", parser=opt.POSITIVE, help="Fix C (> 0) [default: chosen per shot count]."),
    k: Optional[int] = typer.Option(None, "--k", parser=opt.NEIGHBOURS, help="Fix knn's k (>= 1) [default: chosen per shot count]."),
    t: Optional[float] = typer.Option(None, "--T", parser=opt.POSITIVE, help="Fix knn's temperature T (> 0) [default: chosen per shot count]."),
    ways: Optional[int] = typer.Option(None, parser=opt.WAYS, help="N-way episodes: N classes per draw [default: every class]."),
    queries: Optional[int] = typer.Option(None, parser=opt.QUERIES, help="Reported images per class and episode (with --ways) [default: 15]."),
    seed: Optional[int] = typer.Option(None, parser=opt.SEED, help="Seed of the draws [default: the cache's]."),
    train_split: str = typer.Option("train", help="Split the shots are drawn from."),
    eval_split: Optional[str] = typer.Option(None, help="Split to report [default: test, else val]."),
    select_metric: str = typer.Option("accuracy", help="What selection maximises: accuracy | balanced_accuracy."),
    jobs: Optional[int] = typer.Option(None, parser=opt.JOBS, help="Processes for point-by-point selection fits [default: every core]."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for fewshot.{csv,json,md,png} [default: none, print only]."),
    overwrite: bool = typer.Option(False, help="Replace fewshot.* already in --out."),
    allow_incomplete: bool = typer.Option(False, help="Use the committed rows of an interrupted cache."),
    progress: bool = typer.Option(True, help="A progress bar on stderr (on a terminal)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as one JSON object on stdout [default: off]."),
) -> None:
    """Accuracy against labelled images per class: mean and 95% interval over seeded draws.

    Parameters (C; k, T) are chosen per shot count on val, or on the training rows outside
    the draw, never on the reported split.

    \b
    Example: featurekit fewshot birds.h5 --shots 1,5,20 --draws 20 --out fs/
    """
    from featurekit.fewshot import run_fewshot

    result = run_fewshot(cache, shots=shots, draws=draws, heads=heads, backend=backend,
                         layer=layer, C=c, k=k, T=t, ways=ways, queries=queries, seed=seed,
                         train_split=train_split, eval_split=eval_split, metric=select_metric,
                         jobs=jobs, out=out, overwrite=overwrite,
                         allow_incomplete=allow_incomplete, progress=_live(progress))
    if json_out:
        _print_json(result)
        return
    from featurekit.fewshot import markdown

    print(markdown(result))
    for path in (result.get("files") or {}).values():
        _err(f"wrote {path}")


def _render_bench(result: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title=f"{result['cache']}: reported on {result['eval_split']}, "
                    f"parameters chosen by {result['selection']}",
              caption="accuracy with its 95% Wilson interval; cost: selection + refit")
    numeric = ("accuracy [95% CI]", "bal. acc.", "macro F1", "select s", "fit s", "cost s")
    several = len(result.get("caches") or []) > 1
    for col in ("cache",) * several + ("head", "backend", "layer", "params", *numeric, "status"):
        t.add_column(col, justify="right" if col in numeric else "left")
    from featurekit.bench import cell, interval

    for r in result["results"]:
        f = lambda k: f"{r[k]:.4f}" if isinstance(r.get(k), float) else ""  # noqa: E731
        s = lambda k: f"{r[k]:.2f}" if isinstance(r.get(k), float) else ""  # noqa: E731
        t.add_row(*(r["cache"],) * several, r["head"], r["backend"], r["layer"], cell(r, "params"), interval(r),
                  f("balanced_accuracy"), f("macro_f1"), s("selection_seconds"), s("fit_seconds"),
                  s("total_seconds"),
                  r["status"] if r.get("converged", True) else "ok (not converged)")
    _console().print(t)
    for name, path in (result.get("files") or {}).items():
        _err(f"wrote {path}")


# --------------------------------------------------------------------------- finetune


@app.command()
@_handles_errors
def finetune(
    source: str = typer.Argument(..., metavar="SOURCE", help=_SOURCE_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: best.pt, last.pt, metrics.csv, curves.png."),
    model: Optional[str] = typer.Option(None, help="torchvision ResNet-family model [default: resnet50, or the checkpoint's]."),
    weights: str = typer.Option("imagenet", help="imagenet | none (train from scratch) | PATH."),
    train_layers: str = typer.Option("all", help="all | fc (linear probe) | comma list of layer1..layer4,fc."),
    head: str = typer.Option("linear", help="linear | mlp (hidden layer + BatchNorm + dropout)."),
    hidden: int = typer.Option(512, parser=opt.HIDDEN, help="Hidden width of the mlp head."),
    dropout: float = typer.Option(0.2, parser=opt.DROPOUT, help="Dropout of the mlp head, in [0, 1)."),
    epochs: int = typer.Option(10, parser=opt.EPOCHS, help="Epochs in all (also when resuming)."),
    batch_size: int = typer.Option(64, parser=opt.BATCH_SIZE, help="Images per step (per process under torchrun)."),
    lr: Optional[float] = typer.Option(None, parser=opt.LEARNING_RATE, help="Learning rate [default: adamw 1e-3 from scratch or for fc only, 3e-4 when tuning pretrained blocks; sgd x10]."),
    optimizer: str = typer.Option("adamw", help="adamw | sgd (momentum 0.9, Nesterov)."),
    weight_decay: Optional[float] = typer.Option(None, parser=opt.WEIGHT_DECAY, help="Weight decay, 0-10 [default: 0.05 adamw, 5e-4 sgd]."),
    scheduler: str = typer.Option("cosine", help="cosine | step (x0.1 every epochs/3) | none."),
    augment: str = typer.Option("standard", help="standard | none (see docs/finetune.md)."),
    image_size: Optional[int] = typer.Option(None, parser=opt.IMAGE_SIZE, help="Resize shorter side to N and centre-crop N x N (16-8192) [default: the weights' own]."),
    precision: str = typer.Option("auto", help="auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    workers: Optional[int] = typer.Option(None, parser=opt.WORKERS, help="DataLoader workers [default: 0 on CPU (the steps use every core), one per core (max 16) on CUDA]."),
    seed: int = typer.Option(0, parser=opt.SEED, help="Seed of the split, the init and the data order."),
    val_fraction: float = typer.Option(0.15, parser=opt.FRACTION, help="As for extract; with split folders but no val/, the share of train held out for val (0: no val; best.pt by train accuracy)."),
    test_fraction: float = typer.Option(0.15, parser=opt.FRACTION, help="As for extract (test is never used here)."),
    resume: bool = typer.Option(False, help="Continue the run in --out from last.pt."),
    overwrite: bool = typer.Option(False, help="Start over in a folder that holds a run."),
    early_stop: Optional[int] = typer.Option(None, parser=opt.PATIENCE, help="Stop after N epochs without val improvement [default: off]."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as one JSON object on stdout [default: off]."),
    progress: bool = typer.Option(True, help="Show progress bars on stderr."),
) -> None:
    """Train a ResNet on SOURCE: from scratch, linear probe, partial or full fine-tuning.

    \b
    Example:
      featurekit finetune ./birds --model resnet50 --train-layers layer4,fc \\
          --out runs/r50
    Multi-GPU:
      torchrun --nproc_per_node=4 -m featurekit finetune ./birds --out runs/r50
    """
    from featurekit.finetune import finetune as run

    summary = run(
        source, out, model=model, weights=weights, train_layers=train_layers, head=head,
        hidden=hidden, dropout=dropout, epochs=epochs, batch_size=batch_size, lr=lr,
        optimizer=optimizer, weight_decay=weight_decay, scheduler=scheduler, augment=augment,
        image_size=image_size, precision=precision, device=device, workers=workers, seed=seed,
        val_fraction=val_fraction, test_fraction=test_fraction, resume=resume,
        overwrite=overwrite, early_stop=early_stop, progress=progress, log=_err,
    )
    if summary["rank"] != 0:  # under torchrun only rank 0 reports
        return
    if json_out:
        _print_json(summary)
        return
    if summary["best_by"] == "val_acc":
        _err(f"best val accuracy {summary['best_acc']:.4f} at epoch {summary['best_epoch']} -> {out}/best.pt")
    else:
        _err(f"best by train accuracy (no val split): {summary['best_acc']:.4f} at epoch "
             f"{summary['best_epoch']} -> {out}/best.pt")


# --------------------------------------------------------------------------- sparsity


@app.command()
@_handles_errors
def sparsity(
    source: str = typer.Argument(..., metavar="SOURCE", help=_SOURCE_HELP),
    model: Optional[str] = typer.Option(None, help="torchvision ResNet-family model [default: resnet50, or the checkpoint's]."),
    weights: str = typer.Option("imagenet", help="imagenet | none | PATH (state dict or finetune checkpoint)."),
    compare: Optional[List[str]] = typer.Option(None, help="More weights to compare (repeat, or a comma list) [default: none]."),
    layers: Optional[str] = typer.Option(None, help="Comma list of layer1..layer4, penultimate [default: layer1..layer4]."),
    blocks: bool = typer.Option(False, help="Also every residual block's output (after its ReLU)."),
    split: Optional[str] = typer.Option(None, help="Split to measure [default: test, else val, else train]."),
    max_images: Optional[int] = typer.Option(None, parser=opt.MAX_IMAGES, help="A seeded random subset of at most N images [default: all]."),
    dead_threshold: float = typer.Option(0.99, parser=opt.DEAD_THRESHOLD, help="A channel is dead when zero on at least this share of images x positions, in (0, 1]."),
    image_size: Optional[int] = typer.Option(None, parser=opt.IMAGE_SIZE, help="Resize shorter side to N and centre-crop N x N (16-8192), for every weights [default: each weights' own]."),
    batch_size: int = typer.Option(64, parser=opt.BATCH_SIZE, help="Images per forward pass."),
    workers: Optional[int] = typer.Option(None, parser=opt.WORKERS, help="DataLoader decoding workers [default: 1 on CPU, one per core (max 16) on CUDA]."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    seed: int = typer.Option(0, parser=opt.SEED, help="Seed of the split, random init and --max-images subset."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for sparsity.csv/.json/.png [default: write nothing]."),
    overwrite: bool = typer.Option(False, help="Replace sparsity.* already in --out."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as one JSON object on stdout [default: off]."),
    progress: bool = typer.Option(True, help="Show a progress bar on stderr."),
) -> None:
    """Dead-activation share per layer: exact zeros, dead channels, mean activation; one column per weights.

    \b
    Example:
      featurekit sparsity ./birds --weights imagenet --compare runs/r50/best.pt \\
          --out sparsity/
    """
    from featurekit.sparsity import sparsity as run

    extra = [w.strip() for item in (compare or []) for w in item.split(",") if w.strip()]
    result = run(source, model=model, weights=weights, compare=extra, layers=layers, blocks=blocks,
                 split=split, max_images=max_images, dead_threshold=dead_threshold,
                 image_size=image_size, batch_size=batch_size, workers=workers, device=device,
                 seed=seed, out=out, overwrite=overwrite, progress=progress)
    files = result.get("files") or {}
    if json_out:
        _print_json(result)
        return
    from rich.table import Table

    t = Table(title="share of exactly-zero activations / dead channels / mean activation")
    t.add_column("layer")
    for w in result["weights"]:
        t.add_column(f"{w}\nzero", justify="right")
        t.add_column("dead ch.", justify="right")
        t.add_column("mean", justify="right")
    for row in result["layers"]:
        cells = [row["layer"]]
        for w in result["weights"]:
            cells += [f"{row['zero_fraction'][w]:.4f}", f"{row['dead_channel_fraction'][w]:.4f}",
                      f"{row['mean_activation'][w]:.4g}"]
        t.add_row(*cells)
    _console().print(t)
    for path in files.values():
        _err(f"wrote {path}")


@app.command()
@_handles_errors
def similarity(
    cache_a: Path = typer.Argument(..., metavar="A", help="A featurekit cache (e.g. pretrained weights)."),
    cache_b: Path = typer.Argument(..., metavar="B", help="Another cache of the same images (e.g. fine-tuned)."),
    layers: Optional[str] = typer.Option(None, help="Comma list of layers, in both caches [default: every layer of each]."),
    split: Optional[str] = typer.Option(None, help="Compare one split's images [default: every split both hold]."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for similarity.csv/.json/.png [default: write nothing]."),
    overwrite: bool = typer.Option(False, help="Replace similarity.* already in --out."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as one JSON object on stdout [default: off]."),
) -> None:
    """Linear CKA between every layer of A and every layer of B, on the images both hold.

    1: the same representation up to rotation and scale; near 0: unrelated. Rows are matched
    by split and path (at least 100 shared).

    \b
    Example: featurekit similarity birds.h5 birds-ft.h5 --out cka/
    """
    from featurekit.similarity import similarity as run

    result = run(cache_a, cache_b, layers=layers, split=split, device=device, out=out,
                 overwrite=overwrite)
    if json_out:
        _print_json(result)
        return
    from rich.table import Table

    t = Table(title=f"linear CKA, {result['rows']} shared images")
    t.add_column("A \\ B")
    for y in result["layers_b"]:
        t.add_column(y, justify="right")
    for x, row in zip(result["layers_a"], result["cka"]):
        t.add_row(x, *(f"{v:.4f}" for v in row))
    _console().print(t)
    for path in (result.get("files") or {}).values():
        _err(f"wrote {path}")


# --------------------------------------------------------------------------- study


@app.command()
@_handles_errors
def study(
    source: str = typer.Argument(..., metavar="SOURCE", help=_SOURCE_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Study folder: a folder per stage, summary.json, report.md, report.html, figures/."),
    model: Optional[str] = typer.Option(None, help="torchvision ResNet [default: the weights' model, else resnet50]."),
    weights: str = typer.Option("imagenet", help="Pretrained weights of the frozen features and of probe/partial/full: imagenet | none | a .pt file."),
    variants: str = typer.Option("scratch,probe,partial,full", help="Fine-tuning variants to run: scratch, probe, partial, full."),
    epochs: int = typer.Option(10, parser=opt.EPOCHS, help="Epochs of every fine-tuning variant (>= 1)."),
    image_size: Optional[int] = typer.Option(None, parser=opt.IMAGE_SIZE, help="Input size in pixels [default: the weights' preprocessing]."),
    heads: str = typer.Option("logistic,linearsvc,svm,knn", help="Heads on the frozen penultimate features."),
    probe_heads: str = typer.Option("logistic,knn", help="Heads of the layer-wise probe (every layer) and the few-shot curve."),
    shots: str = typer.Option("1,2,5,10,20", help="Few-shot curve: images per class."),
    draws: int = typer.Option(20, parser=opt.DRAWS, help="Few-shot curve: draws per shot count."),
    batch_size: int = typer.Option(64, parser=opt.BATCH_SIZE, help="Fine-tuning batch size."),
    max_train_images: Optional[int] = typer.Option(None, parser=opt.MAX_IMAGES, help="A seeded, stratified subset of this many training images for every stage (folder or CSV sources) [default: all]."),
    seed: int = typer.Option(0, parser=opt.SEED, help="One seed for splits, draws and training."),
    val_fraction: float = typer.Option(0.15, parser=opt.FRACTION, help="Share of images held out for val."),
    test_fraction: float = typer.Option(0.15, parser=opt.FRACTION, help="Share of images held out for test."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    workers: Optional[int] = typer.Option(None, parser=opt.WORKERS, help="Decoding processes [default: by cores]."),
    resume: bool = typer.Option(False, help="Continue a stopped study: finished stages are kept, the stopped one continues."),
    overwrite: bool = typer.Option(False, help="Redo the study in --out (its stage folders are removed)."),
    plan: bool = typer.Option(False, help="List the stages with a cost estimate; run nothing."),
    progress: bool = typer.Option(True, help="Progress of the stages inside (on a terminal)."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary (or the plan) as one JSON object on stdout [default: off]."),
) -> None:
    """The whole comparison in one resumable command and one report.

    Scratch, linear probe, frozen features + heads, partial and full fine-tuning, on one
    split, seed and preprocessing; dead activations, CKA, accuracy by depth, few-shot curve.

    \b
    Example: featurekit study birds/ --out study/ --model resnet50 --epochs 10
    """
    from featurekit.study import run_study

    result = run_study(source, out, model=model, weights=weights, variants=variants, epochs=epochs,
                       image_size=image_size, heads=heads, probe_heads=probe_heads, shots=shots, draws=draws,
                       batch_size=batch_size, max_train_images=max_train_images, seed=seed,
                       val_fraction=val_fraction,
                       test_fraction=test_fraction, device=device, workers=workers, resume=resume,
                       overwrite=overwrite, plan=plan, progress=_live(progress), log=_err)
    if json_out:
        _print_json(result)
        return
    if plan:
        for row in result["plan"]:
            print(f"{row['stage']:<20} about {row['estimate_seconds']:.0f} s")
        print(f"total about {sum(r['estimate_seconds'] for r in result['plan']):.0f} s on {result['device']}")
        return
    for r in result["approaches"]:
        low, high = r["accuracy_ci95"]
        print(f"{r['approach']:<40} {r['accuracy']:.4f} [{low:.3f}, {high:.3f}]"
              + ("  best" if r["best"] else "" if r["within_noise"] else "  worse than the best"))
    for c in result["checks"]:
        print(f"check: {c['approach']} is not above chance level: {'; '.join(c['causes'])}")
    _err(f"report: {Path(out) / 'report.html'}")


# --------------------------------------------------------------------------- demo


@app.command()
@_handles_errors
def demo(
    out: Optional[Path] = typer.Option(None, help="Folder for the demo's files [default: a new temporary folder]."),
    overwrite: bool = typer.Option(False, help="Replace the files of an earlier demo in --out."),
) -> None:
    """Offline end-to-end run: extract scikit-learn's digits with an untrained resnet18, bench five heads.

    \b
    Example: featurekit demo --out demo/
    """
    from featurekit.demo import run_demo

    result = run_demo(out, overwrite=overwrite)
    _render_info(result["info"])
    _render_bench(result["bench"])
    _err(f"demo files are in {result['out']}")


def main() -> None:
    app()
