"""Image sources, splits, decoding and fingerprints.

A *source* is what the user points featurekit at: a class-folder tree (with or without
train/val/test split folders), a CSV of ``path,label[,split]``, or ``digits`` (scikit-learn's
bundled 8x8 digits, the offline default). :func:`open_source` turns it into a :class:`Source`:
sorted classes, and per split an ordered list of :class:`Item` — the order rows are written in.

This module imports neither torch nor scikit-learn at import time (digits needs scikit-learn
only when asked for).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featurekit._console import warn
from featurekit.errors import SourceError
from featurekit.options import SPLITS

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
DIGITS = "digits"


@dataclass(frozen=True, slots=True)
class Item:
    """One image of a split: its path relative to the source root, and its class index."""

    path: str
    label: int


@dataclass
class Source:
    """A resolved image source: classes, and the ordered items of each split."""

    kind: str  # "folder" | "csv" | "digits"
    spec: str  # as the user gave it
    root: Path | None
    classes: list[str]
    splits: dict[str, list[Item]]
    split_origin: str  # "given" (folders / CSV column) or "seeded"
    seed: int
    val_fraction: float
    test_fraction: float
    fingerprint: str
    stats: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)  # path -> (size, mtime_ns)
    _digits: np.ndarray | None = field(default=None, repr=False)

    @property
    def n_items(self) -> int:
        return sum(len(v) for v in self.splits.values())

    def describe(self) -> dict[str, Any]:
        """The JSON-able record of this source kept in a cache's ``source`` attribute."""
        return {
            "kind": self.kind,
            "spec": self.spec,
            "path": os.path.abspath(self.spec) if self.kind != DIGITS else None,
            "root": str(self.root) if self.root is not None else None,
            "split_origin": self.split_origin,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "n_items": self.n_items,
            "split_sizes": {k: len(v) for k, v in self.splits.items()},
            "fingerprint": self.fingerprint,
        }

    def load(self, item: Item):
        """Decode one item to an RGB PIL image (raises :class:`DecodeError` if it cannot)."""
        if self.kind == DIGITS:
            from PIL import Image

            index = int(item.path.rsplit("/", 1)[1])
            assert self._digits is not None
            return Image.fromarray(self._digits[index]).convert("RGB")
        assert self.root is not None
        return load_image(self.root / item.path)


class DecodeError(Exception):
    """An image that cannot be decoded; the message is the reason recorded in the cache."""


def load_image(path: str | os.PathLike[str]):
    """Decode a file to an RGB PIL image.

    Orientation rule: the EXIF orientation tag is applied, so the image is upright as a viewer
    shows it. Alpha is dropped (the colour under a transparent pixel is kept), greyscale is
    replicated to three channels, 16-bit images are scaled to 8 bits. Anything PIL cannot read,
    including files over PIL's decompression-bomb limit, raises :class:`DecodeError`.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    _quiet_bomb_warning()
    try:
        with Image.open(path) as im:  # the header only
            # PIL errors over 2x its pixel limit and only warns between 1x and 2x; featurekit
            # refuses both (checked here rather than with warnings.catch_warnings, which is not
            # thread-safe: extract's GPU path decodes fallbacks in a thread)
            check_pixel_limit(*im.size)
            im.load()
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im)
    except FileNotFoundError:
        raise DecodeError("file not found") from None
    except UnidentifiedImageError:
        raise DecodeError("not an image PIL can identify") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(f"image too large ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # PIL reports truncated and corrupt data as OSError/SyntaxError/ValueError.
        raise DecodeError(f"cannot decode: {exc}") from None


def check_pixel_limit(width: int, height: int) -> None:
    """Refuse an image over PIL's decompression-bomb limit (from its header, before decoding)."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise DecodeError(f"image too large ({width}x{height} pixels, over PIL's limit of {limit})")


@functools.cache
def _quiet_bomb_warning() -> None:
    """Once per process: silence PIL's decompression-bomb warning (load_image refuses such
    images with its own reason, recorded in the cache)."""
    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _to_rgb(im):
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = ((a - lo) / (hi - lo) * 255.0 + 0.5 if hi > lo else np.zeros_like(a)).astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode == "RGB":
        return im.copy()
    return im.convert("RGB")


def collate(batch):
    """DataLoader collate for position -> (position, tensor or None, reason) datasets
    (``featurekit._decode.CpuDataset``): (positions, good positions, stacked
    tensor or None, [(position, reason)] of the failures)."""
    import torch

    good = [b for b in batch if b[1] is not None]
    x = torch.stack([b[1] for b in good]) if good else None
    return [b[0] for b in batch], [b[0] for b in good], x, [(b[0], b[2]) for b in batch if b[1] is None]


# --------------------------------------------------------------------------- discovery


def open_source(
    spec: str | os.PathLike[str],
    *,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
) -> Source:
    """Resolve SOURCE (folder, CSV or ``digits``) into classes and ordered splits."""
    _check_fractions(val_fraction, test_fraction)
    spec_s = os.fspath(spec)
    if spec_s == DIGITS:
        return _digits_source(seed, val_fraction, test_fraction)
    path = Path(spec_s)
    if not path.exists():
        raise SourceError(f"source not found: {spec_s} (give a folder, a CSV file or 'digits')")
    if path.is_dir():
        return _folder_source(spec_s, path, seed, val_fraction, test_fraction)
    if path.suffix.lower() == ".csv":
        return _csv_source(spec_s, path, seed, val_fraction, test_fraction)
    raise SourceError(
        f"source {spec_s} is a file but not a .csv; give a folder ROOT/<class>/<image>, "
        "a CSV with columns path,label[,split], or 'digits'"
    )


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, f in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise SourceError(f"{name} must be in [0, 1), got {f}")
    if val_fraction + test_fraction >= 1.0:
        raise SourceError(
            f"--val-fraction + --test-fraction must leave room for train (got "
            f"{val_fraction} + {test_fraction})"
        )


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _is_image_name(name: str) -> bool:
    return _visible(name) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _image_files(folder: str, prefix: str, stats: dict[str, tuple[int, int]]) -> list[str]:
    """Image files under ``folder`` (recursively, following symlinks once) as paths relative
    to the source root (``prefix`` is the folder's own), sorted; each file's (size, mtime_ns)
    goes into ``stats`` (size -1 when it cannot be read, e.g. a broken link). One ``os.scandir``
    per folder and one stat per file: no pathlib object per file."""
    found: list[str] = []
    seen: set[str] = set()
    todo = [(folder, prefix)]
    while todo:
        path, rel = todo.pop()
        real = os.path.realpath(path)
        if real in seen:  # a symlink loop
            continue
        seen.add(real)
        try:
            entries = list(os.scandir(path))
        except OSError:  # an unreadable subfolder is passed over, as os.walk does
            continue
        subdirs = []
        for e in entries:
            if not _visible(e.name):
                continue
            if _entry_is_dir(e):
                subdirs.append((e.path, f"{rel}{e.name}/"))
            elif _is_image_name(e.name):
                found.append(rel + e.name)
                stats[rel + e.name] = _stat(e.path)
        todo += sorted(subdirs, reverse=True)  # depth first in name order, as os.walk sorted
    found.sort()
    return found


def _entry_is_dir(e: os.DirEntry) -> bool:
    try:
        return e.is_dir()  # follows symlinks
    except OSError:
        return False


def _class_dirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and _visible(p.name))


def _folder_source(
    spec: str, root: Path, seed: int, val_fraction: float, test_fraction: float
) -> Source:
    try:
        top = _class_dirs(root)
    except PermissionError:
        raise SourceError(f"cannot read source folder {spec}: permission denied") from None
    if not top:
        raise SourceError(
            f"source folder {spec} has no class folders (expected ROOT/<class>/<image> or "
            "ROOT/<split>/<class>/<image>)"
        )
    split_layout = set(top) <= set(SPLITS)
    per_split: dict[str, list[tuple[str, str]]] = {}  # split -> [(relpath, class name)]
    stats: dict[str, tuple[int, int]] = {}
    base = os.fspath(root)
    if split_layout:
        classes_set: set[str] = set()
        for split in SPLITS:
            if split not in top:
                continue
            entries = []
            for cls in _class_dirs(root / split):
                classes_set.add(cls)
                entries += [(p, cls) for p in
                            _image_files(os.path.join(base, split, cls), f"{split}/{cls}/", stats)]
            per_split[split] = entries
        classes = sorted(classes_set)
    else:
        classes = top
        per_split["train"] = [
            (p, cls) for cls in classes
            for p in _image_files(os.path.join(base, cls), f"{cls}/", stats)
        ]
    counts = {c: 0 for c in classes}
    for entries in per_split.values():
        for _, cls in entries:
            counts[cls] += 1
    if sum(counts.values()) == 0:
        raise SourceError(
            f"no images found under {spec} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        warn(f"class folders with no images (kept in classes): {', '.join(empty)}")
    return _build(
        "folder", spec, root, classes, per_split, split_layout, seed, val_fraction, test_fraction,
        stats=stats,
    )


def _csv_source(spec: str, path: Path, seed: int, val_fraction: float, test_fraction: float) -> Source:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read CSV source {spec}: {exc}") from None
    try:
        return _parse_csv(spec, path, text, seed, val_fraction, test_fraction)
    except csv.Error as exc:
        raise SourceError(f"CSV source {spec} is not valid CSV: {exc}") from None


def _parse_csv(spec: str, path: Path, text: str, seed: int, val_fraction: float,
               test_fraction: float) -> Source:
    reader = csv.DictReader(io.StringIO(text))
    fields = [f.strip() for f in (reader.fieldnames or [])]
    if "path" not in fields or "label" not in fields:
        raise SourceError(
            f"CSV source {spec} needs a header with columns path,label[,split]; found "
            f"{','.join(fields) or 'no header'}"
        )
    reader.fieldnames = fields
    has_split = "split" in fields
    per_split: dict[str, list[tuple[str, str]]] = {}
    root = path.parent
    for lineno, row in enumerate(reader, start=2):
        p, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        if not p or not label:
            raise SourceError(f"CSV source {spec}, line {lineno}: empty path or label")
        if "\0" in p or "\0" in label:
            raise SourceError(f"CSV source {spec}, line {lineno}: a NUL character in path or label")
        split = (row.get("split") or "").strip() if has_split else "train"
        if split not in SPLITS:
            raise SourceError(
                f"CSV source {spec}, line {lineno}: split {split!r} is not one of "
                f"{', '.join(SPLITS)}"
            )
        rel = Path(p)
        if rel.is_absolute():
            rel_s = os.path.relpath(rel, root)
        else:
            rel_s = rel.as_posix()
        per_split.setdefault(split, []).append((Path(rel_s).as_posix(), label))
    if not per_split:
        raise SourceError(f"CSV source {spec} lists no images")
    for entries in per_split.values():
        entries.sort()
    classes = sorted({cls for entries in per_split.values() for _, cls in entries})
    return _build(
        "csv", spec, root, classes, per_split, has_split, seed, val_fraction, test_fraction
    )


def _digits_source(seed: int, val_fraction: float, test_fraction: float) -> Source:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # 0..16 intensities -> 0..255 uint8 greyscale; load() turns them into RGB.
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    classes = [str(c) for c in bunch.target_names]
    entries = [(f"digits/{i:05d}", classes[int(t)]) for i, t in enumerate(bunch.target)]
    source = _build(
        DIGITS, DIGITS, None, classes, {"train": entries}, False, seed, val_fraction,
        test_fraction, fingerprint=hashlib.sha256(images.tobytes() + bunch.target.tobytes()).hexdigest(),
    )
    source._digits = images
    return source


def _build(
    kind: str,
    spec: str,
    root: Path | None,
    classes: list[str],
    per_split: dict[str, list[tuple[str, str]]],
    splits_given: bool,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    fingerprint: str | None = None,
    stats: dict[str, tuple[int, int]] | None = None,
) -> Source:
    index = {c: i for i, c in enumerate(classes)}
    if splits_given:
        splits = {
            s: [Item(p, index[c]) for p, c in per_split[s]] for s in SPLITS if per_split.get(s)
        }
        origin = "given"
    else:
        items = [Item(p, index[c]) for p, c in per_split["train"]]
        splits = split_items(items, len(classes), val_fraction, test_fraction, seed)
        origin = "seeded"
    if fingerprint is None:
        fingerprint, stats = fingerprint_files(root, splits, stats)
    return Source(
        kind=kind, spec=spec, root=root, classes=classes, splits=splits, split_origin=origin,
        seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
        fingerprint=fingerprint, stats=stats or {},
    )


def split_items(
    items: list[Item], n_classes: int, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[Item]]:
    """Stratified, seeded split of one list of items into train/val/test.

    Each class gives ``round(n_c * fraction)`` items to val and test. Where that rounds to zero
    for a class that has items to spare (at least one must stay in train), the class gives one
    item instead, with a warning, so small splits still see every class. Items keep source order
    inside each split.
    """
    rng = np.random.default_rng(seed)
    labels = np.array([it.label for it in items], dtype=np.int64)
    assignment = np.zeros(len(items), dtype=np.int8)  # 0 train, 1 val, 2 test
    bumped: dict[str, int] = {"val": 0, "test": 0}
    absent: dict[str, list[int]] = {"val": [], "test": []}
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)
        if idx.size == 0:
            continue
        perm = rng.permutation(idx)
        n_test, n_val = _round_half_up(idx.size * test_fraction), _round_half_up(idx.size * val_fraction)
        spare = idx.size - 1
        wanted = []
        for name, frac, n in (("test", test_fraction, n_test), ("val", val_fraction, n_val)):
            if frac > 0 and n == 0:
                if spare >= 1:
                    n = 1
                    bumped[name] += 1
                else:
                    absent[name].append(c)
            n = min(n, spare)
            spare -= n
            wanted.append(n)
        n_test, n_val = wanted
        assignment[perm[:n_test]] = 2
        assignment[perm[n_test : n_test + n_val]] = 1
    for name in ("val", "test"):
        if bumped[name]:
            warn(f"the {name} split is too small for every class to appear by rounding; "
                 f"{bumped[name]} class(es) give it one image each")
        if absent[name]:
            warn(f"{len(absent[name])} class(es) have too few images to appear in {name}")
    out: dict[str, list[Item]] = {}
    for code, name in enumerate(SPLITS):
        chosen = [it for it, a in zip(items, assignment) if a == code]
        if chosen:
            out[name] = chosen
    return out


def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def fingerprint_files(
    root: Path | None, splits: dict[str, list[Item]],
    known: dict[str, tuple[int, int]] | None = None,
) -> tuple[str, dict[str, tuple[int, int]]]:
    """sha256 over (split, path, label, size, mtime) of every listed file, and each file's
    (size, mtime_ns).

    Cheap (one stat per file, none for those in ``known``: a folder listing's stats) and
    changes when a file is added, removed, relabelled, resized or touched. A missing file is
    recorded with size -1.
    """
    known = known or {}
    base = os.fspath(root) if root is not None else None
    stats: dict[str, tuple[int, int]] = {}
    lines = []
    for split, items in splits.items():
        for it in items:
            path = it.path
            st = known.get(path)
            if st is None:
                st = _stat(os.path.join(base, path)) if base is not None else (0, 0)
            stats[path] = st
            lines.append(f"{split}\t{path}\t{it.label}\t{st[0]}\t{st[1]}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest(), stats


def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, 0


def verify(cache) -> dict[str, Any]:
    """Compare an open cache with its source as it is now: files added, removed or changed
    (size or modification time) since extraction. Split membership is not compared: a seeded
    split of a changed file list is a different split anyway."""
    rec = cache.attrs.get("source") or {}
    if rec.get("kind") == DIGITS:
        now = open_source(DIGITS, seed=int(cache.attrs.get("seed", 0)))
        same = now.fingerprint == rec.get("fingerprint")
        return {"source": DIGITS, "unchanged": same, "added": [], "removed": [],
                "changed": [] if same else ["digits data"]}
    path = rec.get("path") or rec.get("spec")
    if not path:
        raise SourceError(f"{cache.path} does not record where its source is")
    now = open_source(path, seed=int(cache.attrs.get("seed", 0)),
                      val_fraction=float(rec.get("val_fraction", 0.15)),
                      test_fraction=float(rec.get("test_fraction", 0.15)))
    recorded: dict[str, tuple[int, int] | None] = {}
    for split in cache.splits:
        stats = cache.file_stats(split)
        for i, p in enumerate(cache.paths(split)):
            recorded[p] = tuple(int(v) for v in stats[i]) if stats is not None else None
        for p, _ in cache.skipped(split):
            recorded.setdefault(p, None)
    added = sorted(set(now.stats) - set(recorded))
    removed = sorted(set(recorded) - set(now.stats))
    changed = sorted(
        p for p, st in recorded.items()
        if st is not None and p in now.stats and tuple(now.stats[p]) != st
    )
    return {"source": path, "unchanged": not (added or removed or changed)
            and now.fingerprint == rec.get("fingerprint"),
            "added": added, "removed": removed, "changed": changed}
