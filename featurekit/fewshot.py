"""``featurekit fewshot``: how accuracy grows with labelled images per class.

For each shot count s and each of ``draws`` seeded draws, s training images per class are
drawn, a head is fitted on them and scored on the whole reported split (``test``, else
``val``); per head and shot count the mean, the standard deviation over draws and the 95%
confidence interval of the mean (Student's t with draws - 1 degrees of freedom: mean ± t·s/√n,
as Tian et al. 2020 report few-shot accuracy) are given.

* Draws are nested and seeded: draw d shuffles each class's training rows once (seed, d), and
  s shots are the first s of that order, so larger shot counts contain smaller ones and the
  same seed gives the same draws.
* A class with fewer than s training images is left out at that shot count (from training
  and from the reported rows, with a warning); fewer than two classes left is refused.
* The head's parameters (C; k and T) are chosen per shot count without the reported split:
  fitted on the first ``SELECTION_DRAWS`` draws of s shots and scored on ``val`` where the cache
  has one, else on the training rows outside that draw; the grid is the registry's, extended
  past an edge like every selection (:func:`featurekit.select.choose`). ``--C``/``--k``/``--T``
  fix them instead.
* ``ways``/``queries``: episodes instead (Vinyals et al. 2016): each draw also picks ``ways``
  classes and ``queries`` reported images of each, the head trained on those classes' s shots;
  parameters are still chosen per shot count on all classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featurekit._console import warn
from featurekit._outputs import check_output_folder, save_figure, write_csv, write_json, write_text
from featurekit.errors import HeadError

OUTPUT_FILES = ("fewshot.csv", "fewshot.json", "fewshot.md", "fewshot.png")
SELECTION_DRAWS = 5  # draws a shot count's parameters are chosen on
CSV_COLUMNS = ["head", "backend", "shots", "draws", "mean", "std", "ci_low", "ci_high", "params",
               "classes", "n_eval"]


@dataclass
class Data:
    """The rows a few-shot run reads: the training pool, the reported split, val (or None)."""

    X: np.ndarray
    y: np.ndarray
    X_eval: np.ndarray
    y_eval: np.ndarray
    X_val: np.ndarray | None
    y_val: np.ndarray | None


def parse_shots(shots: str | list[int]) -> list[int]:
    """``1,2,5`` -> [1, 2, 5] (sorted, unique), every count >= 1."""
    items = shots.split(",") if isinstance(shots, str) else list(shots)
    try:
        out = sorted({int(str(s).strip()) for s in items if str(s).strip()})
    except ValueError:
        raise HeadError(f"--shots must be a comma list of whole numbers, got {shots!r}") from None
    if not out or out[0] < 1:
        raise HeadError(f"--shots must be whole numbers >= 1, got {shots!r}")
    return out


def draw_order(y: np.ndarray, draws: int, seed: int) -> list[dict[int, np.ndarray]]:
    """Per draw, per class, that class's training rows in the draw's order (its first s are
    the s-shot rows): one permutation per (seed, draw, class), so shot counts nest."""
    out = []
    for d in range(draws):
        rng = np.random.default_rng([seed, d])
        out.append({int(c): rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)})
    return out


def shot_rows(order: dict[int, np.ndarray], shots: int, classes) -> np.ndarray:
    """The rows of ``shots`` images of each class in ``classes``, from one draw's order."""
    return np.concatenate([order[int(c)][:shots] for c in classes])


def kept_classes(y: np.ndarray, shots: list[int], names: list[str]) -> dict[int, np.ndarray]:
    """Per shot count the classes with at least that many training rows; a class left out is
    a warning, fewer than two left is refused."""
    counts = np.bincount(y, minlength=len(names))
    present = np.flatnonzero(counts)
    out = {}
    for s in shots:
        kept = present[counts[present] >= s]
        if kept.size < 2:
            raise HeadError(f"--shots {s}: fewer than two classes hold {s} training images "
                            f"(the largest holds {counts.max()}); use smaller shot counts")
        if kept.size < present.size:
            gone = [names[c] for c in present if counts[c] < s]
            warn(f"{s} shots: {len(gone)} class(es) hold fewer training images and are left "
                 f"out at this shot count ({', '.join(gone[:5])}{', ...' if len(gone) > 5 else ''})")
        out[s] = kept
    return out


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float, float]:
    """(mean, standard deviation, low, high): the mean's ``level`` confidence interval from
    Student's t with n - 1 degrees of freedom (scipy.stats.t.interval's numbers); one value
    has no interval (nan)."""
    from scipy import stats

    a = np.asarray(values, dtype=np.float64)
    mean = float(a.mean())
    if a.size < 2:
        return mean, float("nan"), float("nan"), float("nan")
    std = float(a.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, a.size - 1)) * std / np.sqrt(a.size)
    return mean, std, mean - half, mean + half


@dataclass
class Episodes:
    """N-way episodes: ``ways`` classes and ``queries`` reported images of each per draw."""

    ways: int
    queries: int


def check_options(shots, draws: int, head_list: list[str], backends: str, metric: str,
                  fixed: dict[str, Any], ways: int | None, queries: int | None) -> list[int]:
    """Everything checked before a cache is read; the shot counts."""
    from featurekit.fit import check_request
    from featurekit.heads import parameters
    from featurekit.options import DRAWS, QUERIES, WAYS

    counts = parse_shots(shots)
    DRAWS.check("--draws", draws)
    WAYS.check("--ways", ways)
    QUERIES.check("--queries", queries)
    if queries is not None and ways is None:
        raise HeadError("--queries needs --ways (N-way episodes)")
    if not head_list:
        raise HeadError("--heads: no head given")
    for head in head_list:
        check_request(head, backends, metric)
    for name, value in fixed.items():
        if value is not None and not any(name in parameters(h) for h in head_list):
            raise HeadError(f"--{name} applies to none of the heads {', '.join(head_list)}")
    return counts


def read_data(cache_path, layer: str | None, train_split: str, eval_split: str | None,
              allow_incomplete: bool) -> tuple[Data, dict[str, Any]]:
    """The rows of a few-shot run and what describes them (layer, splits, classes, seed)."""
    from featurekit.cache import open_cache
    from featurekit.fit import read_request

    with open_cache(cache_path, allow_incomplete=allow_incomplete) as cache:
        req = read_request(cache, layer, train_split, eval_split)
        data = Data(cache.features(req.train, req.layer), cache.labels(req.train),
                    cache.features(req.evaluate, req.layer), cache.labels(req.evaluate),
                    *((cache.features(req.select, req.layer), cache.labels(req.select))
                      if req.select else (None, None)))
        info = {"cache": str(cache_path), "layer": req.layer, "train_split": req.train,
                "eval_split": req.evaluate, "select_split": req.select,
                "classes": list(cache.classes), "seed": req.seed}
    return data, info


def selection_splits(data: Data, orders, kept: np.ndarray, shots: int):
    """(X, y, splits) of a shot count's selection: each of the first draws' s-shot rows fitted
    and scored on val's rows of the kept classes, or without val on the training rows of the
    kept classes outside that draw."""
    in_train = np.flatnonzero(np.isin(data.y, kept))
    if data.X_val is not None:
        val = np.flatnonzero(np.isin(data.y_val, kept))
        X = np.concatenate([data.X, data.X_val[val]])
        y = np.concatenate([data.y, data.y_val[val]])
        held = np.arange(len(data.y), len(y))
        return X, y, [(shot_rows(o, shots, kept), held) for o in orders]
    splits = []
    for order in orders:
        rows = shot_rows(order, shots, kept)
        splits.append((rows, np.setdiff1d(in_train, rows)))
    return data.X, data.y, splits


def choose_params(head: str, backend: str, data: Data, orders, kept, shots: int,
                  fixed: dict[str, Any], metric: str, jobs, tracker) -> dict[str, Any]:
    """The selection of one head at one shot count (``Selection.to_dict``)."""
    from featurekit import heads, select

    grid = heads.grid(head, data.X.shape[1],
                      **{k: v for k, v in fixed.items() if k in heads.parameters(head)})
    if len(grid) == 1:
        return select.Selection(params=grid[0], method="given", metric=metric, grid=grid).to_dict()
    X, y, splits = selection_splits(data, orders[:SELECTION_DRAWS], kept, shots)
    if data.X_val is None:
        unseen = [c for c in kept if not any(np.any(y[held] == c) for _, held in splits)]
        if unseen and len(unseen) < len(kept):
            warn(f"{shots} shots: {len(unseen)} class(es) have no training image outside the draws "
                 "(and the cache no val split): parameters are chosen without them")
    if any(len(held) == 0 for _, held in splits):
        raise HeadError(f"{shots} shots use every training image of some class and the cache "
                        "has no val split to choose parameters on: fix them (--C, --k, --T) or "
                        "use fewer shots")
    method = (f"val, {len(splits)} draws of {shots} shots" if data.X_val is not None else
              f"training rows outside {len(splits)} draws of {shots} shots")
    return select.choose(head, backend, grid, X, y, splits, metric=metric, jobs=jobs,
                         tracker=tracker, method=method, together=True).to_dict()


def check_episodes(data: Data, kept: dict[int, np.ndarray], episodes: Episodes) -> None:
    """Before any fit: at every shot count, ``ways`` classes with enough training images and
    ``queries`` reported images each."""
    for shots, classes in kept.items():
        able = [c for c in classes if np.sum(data.y_eval == c) >= episodes.queries]
        if len(able) < episodes.ways:
            raise HeadError(f"--ways {episodes.ways}: at {shots} shots only {len(able)} classes have "
                            f"{shots} training and {episodes.queries} reported images; lower "
                            "--ways, --queries or --shots")


def episode_rows(data: Data, kept, episodes: Episodes | None, seed: int, draw: int):
    """(training classes, reported rows) of one draw: every kept class and every reported row
    of them, or an episode's ``ways`` classes and ``queries`` reported rows of each."""
    if episodes is None:
        return kept, np.flatnonzero(np.isin(data.y_eval, kept))
    rng = np.random.default_rng([seed, draw, 1])
    able = [c for c in kept if np.sum(data.y_eval == c) >= episodes.queries]
    if len(able) < episodes.ways:
        raise HeadError(f"--ways {episodes.ways}: only {len(able)} classes have {episodes.queries} "
                        "reported images and enough training images; lower --ways or --queries")
    classes = np.sort(rng.choice(able, episodes.ways, replace=False))
    rows = [rng.choice(np.flatnonzero(data.y_eval == c), episodes.queries, replace=False)
            for c in classes]
    return classes, np.concatenate(rows)


def score_draws(head: str, backend: str, params: dict[str, Any], data: Data, orders, kept,
                shots: int, episodes: Episodes | None, seed: int, tick) -> list[dict[str, Any]]:
    """Each draw's accuracy on its reported rows, the head fitted on its s shots (all draws in
    one batch where the head can: ``fits_together``); ``tick(n)``: n more draws done."""
    import warnings

    from featurekit.heads import create_head

    plan = [episode_rows(data, kept, episodes, seed, d) for d in range(len(orders))]
    trains = [shot_rows(order, shots, classes) for order, (classes, _) in zip(orders, plan)]
    est = create_head(head, backend, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a non-converged fit shows in the selection
        if getattr(est, "fits_together", False):  # every draw in one batch
            preds = est.fit_predict_draws(data.X, data.y, trains, [data.X_eval[r] for _, r in plan])
            tick(len(plan))
        else:
            preds = []
            for train, (_, rows) in zip(trains, plan):
                est = create_head(head, backend, **params).fit(data.X[train], data.y[train])
                preds.append(est.predict(data.X_eval[rows]))
                tick(1)
    return [{"accuracy": float(np.mean(pred == data.y_eval[rows])), "n_eval": int(len(rows))}
            for pred, (_, rows) in zip(preds, plan)]


def run_fewshot(
    cache_path: str | Path, *, shots: str | list[int] = "1,2,5,10,20", draws: int = 20,
    heads: str | list[str] = "logistic,knn", backend: str = "auto", layer: str | None = None,
    C: float | None = None, k: int | None = None, T: float | None = None,
    ways: int | None = None, queries: int | None = None, seed: int | None = None,
    train_split: str = "train", eval_split: str | None = None, metric: str = "accuracy",
    jobs: int | None = None, out: str | Path | None = None, overwrite: bool = False,
    allow_incomplete: bool = False, progress: bool = False,
) -> dict[str, Any]:
    """The few-shot curve of each head (module docstring); fewshot.{csv,json,md,png} in
    ``out`` when given (existing ones replaced only with ``overwrite``). ``seed``: the draws'
    (default: the cache's)."""
    from featurekit.options import comma_list

    head_list = comma_list(heads, [])
    fixed = {"C": C, "k": k, "T": T}
    counts = check_options(shots, draws, head_list, backend, metric, fixed, ways, queries)
    episodes = Episodes(ways, queries or 15) if ways else None
    out_dir = check_output_folder(out, OUTPUT_FILES, overwrite) if out is not None else None
    data, info = read_data(cache_path, layer, train_split, eval_split, allow_incomplete)
    seed = info["seed"] if seed is None else seed
    kept = kept_classes(data.y, counts, info["classes"])
    if episodes is not None:
        check_episodes(data, kept, episodes)
    orders = draw_order(data.y, draws, seed)
    rows = _curves(head_list, backend, data, orders, kept, counts, fixed, metric, jobs,
                   episodes, seed, progress)
    result = {**info, "seed": seed, "shots": counts, "draws": draws, "metric": metric,
              "episodes": None if episodes is None else vars(episodes),
              "selection_draws": min(draws, SELECTION_DRAWS), "results": rows}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        result["files"] = write_outputs(result, out_dir)
    return result


def _curves(head_list, backend, data, orders, kept, counts, fixed, metric, jobs, episodes,
            seed, progress) -> list[dict[str, Any]]:
    """One row per head and shot count: its parameters' selection, the per-draw accuracies and
    their summary."""
    from featurekit._console import SelectionWarning, progress_bar
    from featurekit.heads import resolve_backend
    from featurekit.select import BarTracker, warnings_of

    rows = []
    with progress_bar(enabled=progress, unit="fit") as bar:
        for head in head_list:
            b = resolve_backend(backend, head)
            for s in counts:
                task = bar.add_task(f"{head} ({b}), {s} shot(s)", total=0)
                tracker = BarTracker(bar, task)
                sel = choose_params(head, b, data, orders, kept[s], s, fixed, metric, jobs, tracker)
                for message in warnings_of(head, b, sel):
                    warn(f"{s} shots: {message}", SelectionWarning)
                tracker.grow(len(orders))
                scored = score_draws(head, b, sel["params"], data, orders, kept[s], s, episodes,
                                     seed, tracker.advance)
                bar.update(task, visible=False)
                mean, std, low, high = t_interval([r["accuracy"] for r in scored])
                rows.append({"head": head, "backend": b, "shots": s, "draws": len(orders),
                             "mean": mean, "std": _finite(std), "ci_low": _finite(low),
                             "ci_high": _finite(high), "params": sel["params"],
                             "classes": episodes.ways if episodes else int(kept[s].size),
                             "n_eval": float(np.mean([r["n_eval"] for r in scored])),
                             "accuracies": [r["accuracy"] for r in scored], "selection": sel})
    return rows


def _finite(value: float) -> float | None:
    """nan (one draw: no spread, no interval) as None: JSON's null."""
    return None if np.isnan(value) else value


def write_outputs(result: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """fewshot.csv, .json, .md and .png, each whole or not at all."""
    files = {name: out_dir / name for name in OUTPUT_FILES}
    write_csv(files["fewshot.csv"], CSV_COLUMNS,
              ([_cell(r, c) for c in CSV_COLUMNS] for r in result["results"]))
    write_json(files["fewshot.json"], result)
    write_text(files["fewshot.md"], markdown(result) + "\n")
    plot(result, files["fewshot.png"])
    return {k: str(v) for k, v in files.items()}


def _cell(row: dict[str, Any], col: str) -> str:
    from featurekit.select import params_text

    value = row[col]
    return params_text(value) if col == "params" else str(value)


def markdown(result: dict[str, Any]) -> str:
    ep = result["episodes"]
    task = (f"{ep['ways']}-way episodes, {ep['queries']} queries per class" if ep else
            f"all classes, every `{result['eval_split']}` image")
    lines = [f"Few-shot accuracy on `{result['cache']}` ({result['layer']}; {task}): mean over "
             f"{result['draws']} seeded, nested draws (seed {result['seed']}) with the 95% "
             "confidence interval of the mean (Student's t). Parameters: chosen per shot count "
             f"without the reported split ({SELECTION_DRAWS} draws scored on val, else on the "
             "training rows outside the draw), or given.",
             "", "| head | backend | shots | mean | std | 95% CI | params (how chosen) | classes |",
             "|---|---|---:|---:|---:|---|---|---:|"]
    from featurekit.select import params_text

    for r in result["results"]:
        ci = "" if r["ci_low"] is None else f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}]"
        std = "" if r["std"] is None else f"{r['std']:.4f}"
        how = r["selection"]["method"].split(",")[0]
        lines.append(f"| {r['head']} | {r['backend']} | {r['shots']} | {r['mean']:.4f} | {std} "
                     f"| {ci} | {params_text(r['params'])} ({how}) | {r['classes']} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Accuracy against shots per class (log x), the 95% interval as error bars, a line per
    head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for head in dict.fromkeys((r["head"], r["backend"]) for r in result["results"]):
        rs = [r for r in result["results"] if (r["head"], r["backend"]) == head]
        x = [r["shots"] for r in rs]
        y = np.array([r["mean"] for r in rs])
        err = np.array([[m - r["ci_low"], r["ci_high"] - m] if r["ci_low"] is not None else [0, 0]
                        for m, r in zip(y, rs)]).T
        ax.errorbar(x, y, yerr=np.nan_to_num(err), fmt="o-", capsize=3, label=f"{head[0]} ({head[1]})")
    ax.set_xscale("log")
    ax.set_xticks(result["shots"], [str(s) for s in result["shots"]])
    ax.set_xlabel("labelled images per class (shots)")
    ax.set_ylabel(f"accuracy on {result['eval_split']} (mean, 95% CI)")
    ax.set_title(f"featurekit fewshot {Path(result['cache']).name}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
