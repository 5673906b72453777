"""``featurekit similarity A.h5 B.h5``: how much each layer's representation changed (linear
CKA, Kornblith et al. 2019), between every layer of one cache and every layer of another.

With X (n x p) and Y (n x q) the same n images' features, each column centred,

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)

(1 for the same representation up to a rotation and a scale, near 0 for unrelated ones). It is
computed exactly from X^T X, Y^T Y and Y^T X accumulated over row blocks, in float64 on the
device, so memory is O(p^2 + q^2 + pq), never O(n^2). Centring uses the sums accumulated beside
them, after a shift by the first block's mean (centring does not depend on it, and it keeps
the subtraction from cancelling digits where features have large means, as ReLU outputs do).

The rows compared are the images both caches hold: matched by split and path (caches of the same
source, e.g. pretrained and fine-tuned weights); fewer than ``MIN_SHARED`` shared rows is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featurekit._device import resolve_device
from featurekit._outputs import check_output_folder, save_figure, write_csv, write_json
from featurekit.errors import CacheError, FeaturekitError

MIN_SHARED = 100


class TooFewShared(CacheError):
    """Two caches hold fewer than ``MIN_SHARED`` images in common (a study skips CKA then)."""
OUTPUT_FILES = ("similarity.csv", "similarity.json", "similarity.png")


def linear_cka(X, Y) -> float:
    """The reference formula on two in-memory matrices (n x p, n x q): the numbers
    :func:`similarity` streams, for tests and small data."""
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    X, Y = X - X.mean(0), Y - Y.mean(0)
    cross = np.linalg.norm(Y.T @ X) ** 2
    return float(cross / (np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y)))


@dataclass
class _Moments:
    """Running sums of one layer's shifted rows: n, sum x, X^T X (float64, on the device)."""

    shift: Any = None
    n: int = 0
    total: Any = None
    gram: Any = None
    cross: dict[str, Any] = field(default_factory=dict)  # other layer -> Y^T X (B's layers)

    def add(self, x) -> Any:
        if self.shift is None:
            self.shift = x.mean(0)
            self.total = x.new_zeros(x.shape[1])
            self.gram = x.new_zeros(x.shape[1], x.shape[1])
        x = x - self.shift
        self.n += x.shape[0]
        self.total += x.sum(0)
        self.gram += x.T @ x
        return x

    def centred_gram(self):
        mean = self.total / self.n
        return self.gram - self.n * mean[:, None] * mean[None, :]


def cka_from_moments(a: _Moments, b: _Moments, cross) -> float:
    """CKA of two layers from their moments and the accumulated (shifted) Y^T X."""
    ma, mb = a.total / a.n, b.total / b.n
    yx = cross - a.n * mb[:, None] * ma[None, :]
    num = (yx * yx).sum()
    den = a.centred_gram().norm() * b.centred_gram().norm()
    return float(num / den) if float(den) > 0 else float("nan")


def similarity(cache_a: str | os.PathLike[str], cache_b: str | os.PathLike[str], *,
               layers: str | list[str] | None = None, split: str | None = None,
               device: str = "auto", block_rows: int = 8192,
               out: str | os.PathLike[str] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Linear CKA between every layer of ``cache_a`` and every layer of ``cache_b`` on the rows
    both hold (matched by split and path; ``split``: one split only); writes similarity.csv,
    .json and .png into ``out``."""
    from featurekit.cache import open_cache

    if out is not None:
        check_output_folder(out, OUTPUT_FILES, overwrite)
    dev = resolve_device(device)
    with open_cache(cache_a) as a, open_cache(cache_b) as b:
        la, lb = _layers(a, layers), _layers(b, layers)
        pairs = _shared_rows(a, b, split)
        moments, n = _accumulate(a, b, la, lb, pairs, dev, max(1, block_rows))
    matrix = [[cka_from_moments(moments["a", x], moments["b", y], moments["a", x].cross[y])
               for y in lb] for x in la]
    result = {"cache_a": str(cache_a), "cache_b": str(cache_b), "rows": n,
              "splits": {s: len(ia) for s, (ia, _) in pairs.items()}, "layers_a": la,
              "layers_b": lb, "cka": matrix,
              "same_layer": {x: matrix[i][lb.index(x)] for i, x in enumerate(la) if x in lb}}
    if out is not None:
        result["files"] = write_outputs(result, out)
    return result


def _layers(cache, layers: str | list[str] | None) -> list[str]:
    if layers is None:
        return cache.layers
    wanted = [s.strip() for s in (layers.split(",") if isinstance(layers, str) else layers) if s.strip()]
    if not wanted:
        raise FeaturekitError("--layers is empty; give a comma list of layer names")
    missing = [x for x in wanted if x not in cache.layers]
    if missing:
        raise CacheError(f"{cache.path} has no layer {missing[0]!r}; layers: {', '.join(cache.layers)}")
    return wanted


def _shared_rows(a, b, split: str | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per split both hold: the row indices of the images both hold (A's order)."""
    splits = [s for s in a.splits if s in b.splits]
    if split is not None:
        if split not in splits:
            raise CacheError(f"split {split!r} is not in both caches; both have: {', '.join(splits) or 'none'}")
        splits = [split]
    out, total = {}, 0
    for s in splits:
        where = {p: i for i, p in enumerate(b.paths(s))}
        ia, ib = [], []
        for i, p in enumerate(a.paths(s)):
            if p in where:
                ia.append(i)
                ib.append(where[p])
        if ia:
            out[s] = (np.asarray(ia), np.asarray(ib))
            total += len(ia)
    if total < MIN_SHARED:
        raise TooFewShared(f"{a.path} and {b.path} share {total} image(s) (matched by split and "
                         f"path); CKA needs at least {MIN_SHARED}: compare caches of one source")
    return out


def _accumulate(a, b, la, lb, pairs, dev: str, block_rows: int):
    """Moments of every layer and Y^T X of every pair, over blocks of shared rows."""
    import torch

    moments = {("a", x): _Moments() for x in la} | {("b", y): _Moments() for y in lb}
    n = 0
    for s, (ia, ib) in pairs.items():
        for start in range(0, len(ia), block_rows):
            ra, rb = ia[start:start + block_rows], ib[start:start + block_rows]
            xs = {x: moments["a", x].add(_rows(a, s, x, ra, dev)) for x in la}
            for y in lb:
                yb = moments["b", y].add(_rows(b, s, y, rb, dev))
                for x in la:
                    m = moments["a", x]
                    m.cross[y] = m.cross.get(y, 0) + yb.T @ xs[x]
            n += len(ra)
            del xs
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    return moments, n


def _rows(cache, split: str, layer: str, index: np.ndarray, dev: str):
    """Rows ``index`` of one split and layer as float64 on the device (read in increasing
    order, as HDF5 wants, then put back in the order asked)."""
    import torch

    order = np.argsort(index, kind="stable")
    block = cache.rows(split, layer, index[order])
    back = np.empty_like(order)
    back[order] = np.arange(len(order))
    return torch.as_tensor(block[back], dtype=torch.float64, device=dev)


def write_outputs(result: dict[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, str]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {n: out / n for n in OUTPUT_FILES}
    write_csv(files["similarity.csv"], ["layer_a", "layer_b", "cka"],
              ([x, y, repr(result["cka"][i][j])] for i, x in enumerate(result["layers_a"])
               for j, y in enumerate(result["layers_b"])))
    write_json(files["similarity.json"], {k: v for k, v in result.items() if k != "files"})
    plot(result, files["similarity.png"])
    return {k: str(v) for k, v in files.items()}


def plot(result: dict[str, Any], path: Path) -> None:
    """The CKA matrix as a heatmap and, for layers both caches have, the diagonal as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    la, lb, m = result["layers_a"], result["layers_b"], np.asarray(result["cka"], dtype=float)
    same = result["same_layer"]
    fig, axes = plt.subplots(1, 2 if same else 1, figsize=(11 if same else 6, 4.5), dpi=100,
                             squeeze=False)
    ax = axes[0][0]
    im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(lb)), lb, rotation=45, ha="right")
    ax.set_yticks(range(len(la)), la)
    ax.set_xlabel(Path(result["cache_b"]).name)
    ax.set_ylabel(Path(result["cache_a"]).name)
    ax.set_title(f"linear CKA ({result['rows']} images)")
    for i in range(len(la)):
        for j in range(len(lb)):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(im, ax=ax, fraction=0.046)
    if same:
        bars = axes[0][1]
        bars.bar(range(len(same)), list(same.values()))
        bars.set_xticks(range(len(same)), list(same), rotation=45, ha="right")
        bars.set_ylim(0, 1)
        bars.set_title("same layer, A vs B")
        bars.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
