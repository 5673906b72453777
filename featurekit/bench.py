"""``featurekit bench``: head x backend x layer comparisons on one cache, tables and a plot.

Every combination runs under the selection protocol of :mod:`featurekit.fit`, as one unit of
work that reads its own rows from the cache (so units can run on other processes or machines).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featurekit._outputs import (
    check_output_folder,
    save_figure,
    write_csv,
    write_json,
    write_text,
)
from featurekit.errors import HeadError
from featurekit.options import comma_list

OUTPUT_FILES = ["results.csv", "results.json", "results.md", "results.png", "depth.png"]
COLUMNS = ["head", "backend", "layer", "status", "params", "accuracy", "balanced_accuracy",
           "macro_f1", "top5_accuracy", "fit_seconds", "predict_seconds", "selection_seconds",
           "n_train", "n_eval", "eval_split", "converged", "accuracy_low", "accuracy_high",
           "total_seconds", "cache"]
DEPTH = ("layer1", "layer2", "layer3", "layer4", "penultimate")  # --layers all, shallow first


@dataclass
class _Source:
    """One cache of a bench: its path, its label in every output, what is read from it."""

    path: str
    label: str
    req: Any
    layers: list[str]
    dims: dict[str, int]


def run_bench(
    cache_path: str | Path | list[str | Path],
    *,
    heads: str | list[str] | None = None,
    backends: str | list[str] | None = None,
    layers: str | list[str] | None = None,
    out: str | Path | None = None,
    train_split: str = "train",
    eval_split: str | None = None,
    allow_incomplete: bool = False,
    overwrite: bool = False,
    metric: str = "accuracy",
    refit: bool = True,
    jobs: int | None = None,
    progress: bool = False,
    scheduler: str | None = None,
    cv: int | None = None,
    extend: bool = True,
    log=None,
) -> dict[str, Any]:
    """Fit every cache x head x backend x layer; write results.{csv,json,md}, results.png and
    depth.png (accuracy against layer, a line per cache x head) in ``out`` (refusing to replace
    existing ones unless ``overwrite``). ``cache_path``: one cache or several of the same
    classes and model (pretrained and fine-tuned), each under the same protocol, every row
    tagged with its cache; ``layers``: a comma list or ``all`` (every cached layer, shallow
    first). Each combination is one unit of work: ``jobs`` processes here, or a Dask cluster
    (``scheduler``), whose workers read the cache themselves. Selection warnings are given
    here, one per combination that has any. ``progress``: a bar (the combination and grid
    point, and the time left for the whole bench); ``log``: a line per finished combination,
    with the time left (where no bar is shown); ``cv``/``extend``: as for
    :func:`featurekit.fit.fit_head`."""
    from featurekit.fit import check_request
    from featurekit.heads import HEADS

    backend_list = comma_list(backends, ["auto"])
    # a head is a name (run on every --backends entry) or name:backend (on that backend only)
    head_list = [(h.partition(":")[0], [h.partition(":")[2]] if ":" in h else backend_list)
                 for h in comma_list(heads, list(HEADS))]
    for h, bs in head_list:
        for b in bs:
            check_request(h, b, metric, cv=cv)
    out_dir = check_output_folder(out, OUTPUT_FILES, overwrite) if out is not None else None
    sources = _sources(cache_path, layers, train_split, eval_split, allow_incomplete)
    rows, units = _combinations(head_list, sources, allow_incomplete, metric, refit, cv, extend)
    dims = {(s.path, layer): d for s in sources for layer, d in s.dims.items()}
    estimates = {u[0]: _fits(u[1], dims[(u[3][0], u[3][2])], cv) for u in units}
    _run_all(rows, units, estimates, jobs, scheduler, progress, log)
    req = sources[0].req
    given = cache_path if isinstance(cache_path, (list, tuple)) else [cache_path]
    result = {"cache": ", ".join(str(p) for p in given), "caches": [str(p) for p in given],
              "train_split": req.train, "eval_split": req.evaluate,
              "selection": _protocol(req, cv, rows), "metric": metric,
              "refit": "train+val" if refit and req.select else "train", "results": rows}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        result["files"] = write_outputs(result, out_dir)
    return result


def _sources(cache_paths, layers, train_split: str, eval_split: str | None,
             allow_incomplete: bool) -> list[_Source]:
    """Every cache of a bench, read and checked: the layers asked for (``all``: every cached
    one, shallow first) and splits, and the same classes and model in all of them."""
    from featurekit.cache import open_cache
    from featurekit.fit import read_request

    paths = cache_paths if isinstance(cache_paths, (list, tuple)) else [cache_paths]
    names = [Path(p).name for p in paths]
    out: list[_Source] = []
    first: dict[str, Any] = {}
    for p, name in zip(paths, names):
        with open_cache(p, allow_incomplete=allow_incomplete) as cache:
            wanted = comma_list(layers, [None])
            if wanted == ["all"]:
                wanted = sorted(cache.layers, key=lambda x: DEPTH.index(x) if x in DEPTH else len(DEPTH))
            if not wanted:
                raise HeadError(f"--layers: no layer given; {p} has {', '.join(cache.layers)}")
            layer_list = [read_request(cache, layer, train_split, eval_split).layer for layer in wanted]
            req = read_request(cache, layer_list[0], train_split, eval_split)
            here = {"classes": list(cache.classes), "model": cache.attrs.get("model"),
                    "splits (train, reported, selection)": [req.train, req.evaluate, req.select]}
            dims = {layer: cache.dim(layer) for layer in layer_list}
        for key, value in here.items():
            if first and first[key] != value:
                raise HeadError(f"{p} holds other {key} than {out[0].path} "
                                f"({_short(value)} vs {_short(first[key])}); bench compares caches "
                                "of the same classes and model under one protocol")
        first = first or here
        label = name if names.count(name) == 1 else str(p)
        out.append(_Source(str(Path(p).resolve()), label, req, layer_list, dims))
    return out


def _short(value) -> str:
    text = ", ".join(str(v) for v in value) if isinstance(value, list) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fits(head: str, dim: int, cv: int | None) -> int:
    """Fits a combination's selection makes before any extension: grid points x folds."""
    from featurekit.heads import grid

    return len(grid(head, dim)) * (cv or 1)


def _protocol(req, cv: int | None, rows: list[dict[str, Any]]) -> str:
    """How C was chosen in this bench, for its table's title."""
    from featurekit.select import describe

    done = [r["selection"] for r in rows if r.get("status") == "ok"]
    if done:
        return describe(done[0])
    return f"{cv}-fold cv" if cv else ("val split" if req.select else "hold-out of train")


def _run_all(rows, units, estimates, jobs, scheduler, progress: bool, log) -> None:
    """Every combination; each row gets its report, warnings are given as reports come in,
    and a line per combination goes to ``log``."""
    from featurekit._console import progress_bar
    from featurekit.fit import warn_selection

    with progress_bar(enabled=progress, unit="fit") as bar:
        clock = _Clock(bar, estimates)
        for k, (i, report) in enumerate(_run_combinations(units, jobs, scheduler, clock), 1):
            rows[i] = {**rows[i], **report, "status": "ok"}
            clock.finished(i, report)
            warn_selection(rows[i]["head"], rows[i]["backend"], report["selection"])
            if log is not None:
                r, lo_hi = rows[i], report["accuracy_ci95"]
                log(f"bench {k}/{len(units)}: {r['head']} ({r['backend']}) on {r['layer']}: "
                    f"accuracy {r['accuracy']:.4f} [{lo_hi[0]:.4f}, {lo_hi[1]:.4f}] in "
                    f"{r['total_seconds']:.1f} s{clock.left_text()}")


class _Clock:
    """A bench's fits: estimated per combination up front (grid x folds), an extension's
    added as it comes. Drives the bar (combination, grid point, time left) and the time-left
    estimate of the log lines (time so far per fit done, times the fits left)."""

    def __init__(self, bar, estimates: dict[int, int]) -> None:
        self.bar, self.estimates = bar, dict(estimates)
        self.total, self.done, self.started = sum(estimates.values()), 0, time.perf_counter()
        self.task = bar.add_task("bench", total=self.total)
        self.unit, self.unit_done, self.first, self.what = None, 0, True, ""

    def begin(self, i: int, what: str) -> None:
        self.unit, self.unit_done, self.first, self.what = i, 0, True, what
        self.bar.update(self.task, description=what)

    def grow(self, k: int) -> None:  # select: fits to do (the first call is the estimate's)
        if self.first:
            self.first = False
            return
        self.total += k
        self.estimates[self.unit] = self.estimates.get(self.unit, 0) + k
        self.bar.update(self.task, total=self.total)

    def advance(self, k: int) -> None:  # select: fits done
        self.unit_done += k
        self.done += k
        point = f"{self.what}: fit {self.unit_done}/{self.estimates.get(self.unit, '?')}"
        self.bar.update(self.task, advance=k, description=point)

    def finished(self, i: int, report: dict[str, Any]) -> None:
        """A combination is done: count what ran elsewhere (or what was not told)."""
        if self.unit != i:  # ran in a worker: its extension, then all of its fits
            extra = len(report["selection"].get("extended") or [])
            self.total += extra
            self.estimates[i] = self.estimates.get(i, 0) + extra
            self.unit_done = 0
        rest = self.estimates.get(i, 0) - (self.unit_done if self.unit == i else 0)
        self.done += max(0, rest)
        self.bar.update(self.task, total=self.total, advance=max(0, rest))

    def left_text(self) -> str:
        if not self.done or self.done >= self.total:
            return ""
        seconds = (time.perf_counter() - self.started) / self.done * (self.total - self.done)
        return f"; about {_duration(seconds)} left"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _combinations(head_list, sources: list[_Source], allow_incomplete: bool, metric: str,
                  refit: bool, cv: int | None, extend: bool
                  ) -> tuple[list[dict[str, Any]], list[tuple]]:
    """A row per cache x layer x head x backend (a backend that is not available here, or that
    lacks the head, is a skipped row), and the units that run: (row index, head, backend,
    args)."""
    from featurekit.heads import has, list_backends, resolve_backend

    available = list_backends()
    rows: list[dict[str, Any]] = []
    units: list[tuple[int, str, str, tuple]] = []
    for src in sources:
        req = src.req
        for layer in src.layers:
            for head, head_backends in head_list:
                for backend in dict.fromkeys(resolve_backend(b, head) if b == "auto" else b
                                             for b in head_backends):
                    base = {"head": head, "backend": backend, "layer": layer,
                            "eval_split": req.evaluate, "cache": src.label}
                    if backend not in available:
                        rows.append({**base, "status": f"skipped: {backend} is not available here"})
                    elif not has(head, backend):
                        rows.append({**base, "status": f"skipped: {head} has no {backend} backend"})
                    else:
                        rows.append(base)
                        units.append((len(rows) - 1, head, backend, (
                            src.path, allow_incomplete, layer, req.train, req.evaluate,
                            req.select, head, backend, req.n_classes, req.seed, metric, refit,
                            cv, extend)))
    return rows, units


def _run_combinations(units, jobs, scheduler, clock):
    """(row index, report) of every combination, each one unit of work that reads the cache
    itself: on a Dask cluster all of them; on this machine the heads that run a whole
    selection themselves (featurekit's torch heads: GPU, or every core) here one after
    another (``clock`` told of their fits), the others in ``jobs`` processes at once (each of
    their fits on one thread)."""
    from featurekit._parallel import Executor
    from featurekit.heads import batched, entry

    with Executor(jobs, scheduler) as ex:
        here = [] if ex.remote else [u for u in units if batched(entry(u[1], u[2]))]
        away = [u for u in units if u not in here]
        for i, head, backend, args in here:
            clock.begin(i, f"{head} ({backend}) on {args[2]}")
            yield i, _combination(*args, tracker=clock)
        if away:
            clock.begin(-1, f"{len(away)} combination(s) in {ex.jobs if not ex.remote else 'Dask'} "
                            f"worker(s)")
        for (i, *_), report in zip(away, ex.map(_combination, [u[3] for u in away])):
            yield i, report


def _combination(cache_path, allow_incomplete, layer, train, evaluate, select, head, backend,
                 n_classes, seed, metric, refit, cv=None, extend=True, tracker=None
                 ) -> dict[str, Any]:
    """One head x backend x layer: selection, refit, evaluation, reading its rows from the
    cache (nothing kept after it returns); its own fits run one after another here."""
    from featurekit._parallel import CacheRows, Executor, read_rows
    from featurekit._resources import cpus, torch_threads
    from featurekit.fit import fit_on_arrays

    X, y = read_rows(CacheRows(cache_path, layer, train, None, allow_incomplete))
    Xe, ye = read_rows(CacheRows(cache_path, layer, evaluate, None, allow_incomplete))
    Xs, ys = (read_rows(CacheRows(cache_path, layer, select, None, allow_incomplete))
              if select else (None, None))
    with torch_threads(cpus()):  # as in a fresh process on this machine, wherever it runs
        _, report = fit_on_arrays(head, backend, X, y, Xe, ye, n_classes, X_sel=Xs, y_sel=ys,
                                  seed=seed, metric=metric, refit=refit, executor=Executor(1),
                                  cv=cv, extend=extend, tracker=tracker)
    report.pop("confusion_matrix", None)
    return report


def cell(row: dict[str, Any], col: str) -> str:
    """A result's value as table text (``accuracy_low``/``_high``: its 95% Wilson interval)."""
    if col in ("accuracy_low", "accuracy_high") and row.get("accuracy_ci95"):
        return str(row["accuracy_ci95"][col == "accuracy_high"])
    v = row.get(col, "")
    if col == "params" and isinstance(v, dict):
        from featurekit.select import params_text

        return params_text(v)
    return "" if v is None else str(v)


def interval(row: dict[str, Any]) -> str:
    """``0.9628 [0.934, 0.979]``: accuracy and its 95% interval over the reported images."""
    if not isinstance(row.get("accuracy"), float):
        return ""
    low, high = row["accuracy_ci95"]
    return f"{row['accuracy']:.4f} [{low:.3f}, {high:.3f}]"


def write_outputs(result: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """results.csv, .json, .md and .png and depth.png, each whole or not at all."""
    rows = result["results"]
    files = {name: out_dir / name for name in OUTPUT_FILES}
    write_csv(files["results.csv"], COLUMNS, ([cell(r, c) for c in COLUMNS] for r in rows))
    write_json(files["results.json"], result)
    write_text(files["results.md"], markdown_table(result) + "\n")
    title = ", ".join(Path(c).name for c in result["caches"])
    plot(rows, files["results.png"], title=title)
    plot_depth(rows, files["depth.png"], title=title)
    return {k: str(v) for k, v in files.items()}


def plot_depth(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Accuracy (95% interval) against layer, shallow to deep, one line per cache x head x
    backend: where in the network the classes become separable, and what fine-tuning moved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    layers = sorted({r["layer"] for r in ok}, key=lambda x: DEPTH.index(x) if x in DEPTH else len(DEPTH))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for key in dict.fromkeys((r["cache"], r["head"], r["backend"]) for r in ok):
        line = sorted((r for r in ok if (r["cache"], r["head"], r["backend"]) == key),
                      key=lambda r: layers.index(r["layer"]))
        x = [layers.index(r["layer"]) for r in line]
        y = [r["accuracy"] for r in line]
        err = [[a - r["accuracy_ci95"][0] for a, r in zip(y, line)],
               [r["accuracy_ci95"][1] - a for a, r in zip(y, line)]]
        ax.errorbar(x, y, yerr=err, fmt="o-", capsize=3, label=f"{key[0]}: {key[1]} ({key[2]})")
    ax.set_xticks(range(len(layers)), layers)
    ax.set_xlabel("layer (shallow to deep)")
    ax.set_ylabel(f"accuracy on {ok[0]['eval_split'] if ok else 'eval'} split (95% CI)")
    ax.set_title(f"featurekit bench by depth {title}".strip())
    ax.grid(True, alpha=0.3)
    if ok:
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def markdown_table(result: dict[str, Any]) -> str:
    lines = [
        f"Cache `{result['cache']}`: trained on `{result['train_split']}`, reported on "
        f"`{result['eval_split']}`, parameters chosen by {result['selection']}.",
        "",
        "Accuracy with its 95% Wilson interval over the reported images; cost: selection + "
        "refit seconds.",
        "",
        "| cache | head | backend | layer | params | accuracy [95% CI] | balanced acc. | macro F1 "
        "| select s | fit s | cost s | status |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["results"]:
        num = lambda k: f"{r[k]:.4f}" if isinstance(r.get(k), float) else ""  # noqa: E731
        sec = lambda k: f"{r[k]:.2f}" if isinstance(r.get(k), float) else ""  # noqa: E731
        lines.append(
            f"| {r.get('cache', '')} | {r['head']} | {r['backend']} | {r['layer']} | {cell(r, 'params')} | {interval(r)} "
            f"| {num('balanced_accuracy')} | {num('macro_f1')} | {sec('selection_seconds')} "
            f"| {sec('fit_seconds')} | {sec('total_seconds')} | {r['status']} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Accuracy (with its 95% interval) against the head's whole cost (selection + refit),
    one labelled point per combination that ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for r in ok:
        low, high = r["accuracy_ci95"]
        ax.errorbar(r["total_seconds"], r["accuracy"], yerr=[[r["accuracy"] - low], [high - r["accuracy"]]],
                    fmt="o", ms=6, capsize=3)
        ax.annotate(f"{r['head']}/{r['backend']}/{r['layer']}", (r["total_seconds"], r["accuracy"]),
                    textcoords="offset points", xytext=(5, 4), fontsize=8)
    if ok and max(r["total_seconds"] for r in ok) / max(min(r["total_seconds"] for r in ok), 1e-9) > 20:
        ax.set_xscale("log")
    ax.margins(x=0.3, y=0.15)  # room for the labels
    ax.set_xlabel("cost: selection + refit (s)")
    ax.set_ylabel(f"accuracy on {ok[0]['eval_split'] if ok else 'eval'} split (95% CI)")
    ax.set_title(f"featurekit bench {title}".strip())
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
