"""The HDF5 feature cache: its writer, its reader, and ``pack``.

The format (constants, versions, attribute codec: :mod:`featurekit._h5format`) is written down
in ``docs/cache-format.md``. In short::

    /                          attrs: format, format_version, featurekit_version, created, model,
                                      weights, weights_sha256, layers (JSON), pool,
                                      preprocess (JSON), precision, dtype, classes (JSON),
                                      source (JSON), seed, complete, zero_fraction (JSON), ...
    /<split>/                  attrs: rows (committed rows), next_index (source items consumed),
                                      n_source (items of the split in the source)
    /<split>/labels            int64 (N,)
    /<split>/paths             UTF-8 strings (N,)
    /<split>/features/<layer>  float32|float16 (N, D), chunked by rows
    /<split>/skipped/path      UTF-8 strings
    /<split>/skipped/reason    UTF-8 strings

Rows are appended in source order and *committed* in blocks: data first, then the split's
``rows`` attribute, then a flush. A reader trusts ``rows``, never the dataset length.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from featurekit._h5format import (
    CHECKED,
    fletcher32,
    CHECKSUMS,
    JSON_ATTRS,
    FORMAT,
    SHARDED,
    SINGLE_VERSION,
    chunk_rows,
    decode_value,
    encode_attr,
    read_header,
    root_attrs,
    skipped_crc,
    str_dtype,
    strings_crc,
)
from featurekit._outputs import check_output, replacing
from featurekit.errors import CacheError, OutputError
from featurekit.options import SPLITS

__all__ = ["Cache", "CacheWriter", "WriteFailed", "open_cache", "pack", "read_header"]

# --------------------------------------------------------------------------- writer


class NonFiniteError(CacheError):
    """Features that are NaN, infinite, or past the storage type's range: never written, never
    read as data."""


class WriteFailed(OutputError):
    """A write to an open cache failed (full disk, file size limit). HDF5 cannot close such a
    file cleanly, and its exit handlers may crash the process: the CLI exits at once after
    printing the message (see cli._handles_errors)."""

    hard_exit = True


class CacheWriter:
    """Appends rows split by split, in order, committing every ``commit_rows`` rows.

    Never holds more than one commit block of features in memory.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        attrs: dict[str, Any],
        split_sizes: dict[str, int],
        layer_dims: dict[str, int],
        dtype: str = "float32",
        commit_rows: int = 512,
        commit_seconds: float = 2.0,
    ) -> None:
        import h5py

        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.layer_dims = dict(layer_dims)
        self.commit_rows = max(1, commit_rows)
        self.commit_seconds = commit_seconds
        self._last_commit = time.monotonic()
        # Made under a temporary name and renamed into place once the header is on disk: a run
        # killed before that never leaves a half-made file (or nothing) where the output goes,
        # and an old output replaced with --overwrite stays until then.
        # HDF5 1.8 file format: dense (large) attributes, and no superblock "open for write" flag,
        # which would make a killed file unopenable without h5clear (1.10+ formats set it)
        with replacing(self.path) as tmp:  # a half-made header is worth nothing
            self._f = h5py.File(tmp, "w", libver=("v108", "v108"))
            try:
                _create(self._f, attrs, split_sizes, self.layer_dims, self.dtype)
            except BaseException:
                self._f.close()
                raise
        self._buffers = {split: _Buffer() for split in split_sizes}

    @classmethod
    def reopen(cls, path: str | os.PathLike[str], commit_rows: int = 512,
               commit_seconds: float = 2.0) -> CacheWriter:
        """Continue an interrupted cache after its last commit; uncommitted data is dropped."""
        import h5py

        self = cls.__new__(cls)
        self.path = Path(path)
        self.commit_rows, self.commit_seconds = max(1, commit_rows), commit_seconds
        self._last_commit = time.monotonic()
        self._f = h5py.File(self.path, "r+")
        try:
            self.dtype = np.dtype(str(decode_value(self._f.attrs["dtype"])))
            self.layer_dims = {}
            self._buffers = {}
            for split in self._f:
                g = self._f[split]
                for layer, ds in g["features"].items():
                    self.layer_dims[layer] = int(ds.shape[1])
                _cut_to_commit(g)
                _check_committed_strings(self.path, split, g)
                self._buffers[split] = _Buffer(next_index=int(g.attrs["next_index"]))
            self._f.flush()
        except BaseException:
            self._f.close()
            raise
        return self

    def progress(self) -> dict[str, dict[str, Any]]:
        """Committed state per split: rows, skipped, next_index, n_source, and the split's
        ``extra`` attributes of its last commit (e.g. running zero counts)."""
        base = ("rows", "n_skipped", "next_index", "n_source")
        return {
            s: {"rows": int(g.attrs["rows"]), "skipped": int(g.attrs.get("n_skipped", 0)),
                "next_index": int(g.attrs["next_index"]), "n_source": int(g.attrs["n_source"]),
                **{k: v for k, v in g.attrs.items() if k not in base}}
            for s, g in self._f.items()
        }

    def attr(self, key: str, default: Any = None) -> Any:
        value = decode_value(self._f.attrs.get(key, default))
        if key in JSON_ATTRS and isinstance(value, str):
            return json.loads(value)
        return value

    def add(self, split: str, labels, paths, features: dict[str, np.ndarray], file_stats=None) -> None:
        """Queue rows of ``split`` (committed with the next :meth:`advance` past a block);
        ``file_stats``: (size, mtime_ns) of each row's file, for ``info --verify``. Rows that
        are not finite, or would not be in the storage type, are refused (nothing of them is
        queued): a cache holds finite features only."""
        for layer, arr in features.items():
            _check_finite(np.asarray(arr), self.dtype, layer, paths)
        b = self._buffers[split]
        b.labels.append(np.asarray(labels, dtype=np.int64))
        b.paths.extend(paths)
        b.stats.append(np.asarray(file_stats if file_stats is not None else [(0, 0)] * len(paths),
                                  dtype=np.int64).reshape(-1, 2))
        for layer, arr in features.items():
            b.features.setdefault(layer, []).append(np.asarray(arr))

    def skip(self, split: str, path: str, reason: str) -> None:
        """Queue a file that could not be decoded."""
        self._buffers[split].skipped.append((path, reason))

    def advance(self, split: str, index_end: int, extra: Callable[[], dict[str, Any]] | None = None) -> None:
        """Every source item before ``index_end`` is now queued (as a row or as skipped).

        Commits once ``commit_rows`` rows are queued, ``commit_seconds`` have passed, or the split
        is done; ``extra()`` gives split attributes (running statistics, fixed-size arrays)
        committed with the rows.
        Rows queued but not yet advanced over are never committed, so the committed rows always
        match ``next_index``.
        """
        b = self._buffers[split]
        b.next_index = index_end
        if (
            len(b.paths) >= self.commit_rows
            or time.monotonic() - self._last_commit >= self.commit_seconds
            or index_end >= int(self._f[split].attrs["n_source"])
        ):
            self.commit(split, extra() if extra else None)

    def commit(self, split: str, extra: dict[str, Any] | None = None) -> None:
        """Write the queued rows, then advance the split's committed counters, then flush."""
        try:
            self._commit(split, extra)
        except (OSError, RuntimeError) as exc:  # h5py reports a full disk as either
            raise WriteFailed(
                f"writing {self.path} failed ({exc}); the committed rows are kept and the cache "
                "stays marked incomplete: free space, then extract --resume"
            ) from None

    def _commit(self, split: str, extra: dict[str, Any] | None) -> None:
        b = self._buffers[split]
        g = self._f[split]
        start = int(g.attrs["rows"])
        n = len(b.paths)
        if n:
            end = start + n
            if end > g["labels"].shape[0]:  # more rows than planned: grow
                for ds in _row_datasets(g):
                    ds.resize(end, axis=0)
            g["labels"][start:end] = np.concatenate(b.labels)
            g["paths"][start:end] = b.paths
            if "file_stat" in g:
                g["file_stat"][start:end] = np.concatenate(b.stats)
            for layer in self.layer_dims:
                g["features"][layer][start:end] = np.concatenate(b.features[layer]).astype(
                    self.dtype, copy=False
                )
        if b.skipped:
            sg = g["skipped"]
            k = sg["path"].shape[0]
            for i, name in enumerate(("path", "reason")):
                sg[name].resize(k + len(b.skipped), axis=0)
                sg[name][k:] = [s[i] for s in b.skipped]
        # Two flushes: the rows (and their strings' heap objects) reach the disk before the
        # counters that make them count, so a kill inside a flush never commits missing data.
        self._f.flush()
        for key, value in (extra or {}).items():  # fixed-size values: rewritten in place, in
            g.attrs[key] = value  # the same object header as the counters below
        _advance_crcs(g, b)
        g.attrs["rows"] = start + n
        g.attrs["n_skipped"] = int(g["skipped"]["path"].shape[0])
        g.attrs["next_index"] = b.next_index
        self._f.flush()
        self._sync()  # committed means on the disk, not only in the page cache
        self._last_commit = time.monotonic()
        self._buffers[split] = _Buffer(next_index=b.next_index)

    def _sync(self) -> None:
        """fsync the file (HDF5's flush only hands the data to the operating system)."""
        os.fsync(self._f.id.get_vfd_handle())

    def set_attrs(self, **attrs: Any) -> None:
        for key, value in attrs.items():
            self._f.attrs[key] = encode_attr(key, value)

    def finish(self) -> None:
        """Commit what is queued, trim every split to its rows, mark the cache complete."""
        for split in self._buffers:
            self.commit(split)
        try:
            for split in self._buffers:
                g = self._f[split]
                rows = int(g.attrs["rows"])
                for ds in _row_datasets(g):
                    ds.resize(rows, axis=0)
            self._f.flush()
            self._sync()
            self._f.attrs["complete"] = True  # only once everything else is on disk
            self._f.flush()
            self._sync()
        except (OSError, RuntimeError) as exc:
            raise WriteFailed(f"finishing {self.path} failed ({exc}); it stays marked incomplete") from None

    def close(self) -> None:
        if self._f.id.valid:
            try:
                self._f.close()
            except Exception:  # a failed write (full disk) can make the close fail too;
                pass  # the file stays marked incomplete either way

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def from_arrays(path: str | os.PathLike[str], X: np.ndarray, y: np.ndarray,
                splits: dict[str, int], *, layer: str = "penultimate",
                classes: list[str] | None = None, model: str = "synthetic",
                source: str = "arrays") -> Path:
    """A complete cache of feature rows computed elsewhere (no backbone): the first rows are
    the first split's, then the next ones', ``splits`` giving each split's size; paths are
    ``<split>/<row>``. For features made to order (tests, benchmarks) and users' own."""
    classes = classes or [str(c) for c in range(int(np.max(y)) + 1)]
    attrs = {"model": model, "weights": "none", "weights_sha256": "", "layers": [layer],
             "pool": "avg", "preprocess": {}, "precision": "fp32", "dtype": "float32",
             "classes": classes, "source": {"spec": source}, "seed": 0}
    with CacheWriter(path, attrs, splits, {layer: X.shape[1]}) as w:
        start = 0
        for split, n in splits.items():
            rows = slice(start, start + n)
            w.add(split, y[rows], [f"{split}/{i:05d}" for i in range(n)], {layer: X[rows]})
            w.advance(split, n)
            start += n
        w.finish()
    return Path(path)


def _check_finite(arr: np.ndarray, dtype: np.dtype, layer: str, names: list[str],
                  why: str = "the model's output (NaN in the weights?); nothing of this batch "
                             "was committed") -> None:
    """Refuse rows with NaN or infinity, or values past the storage type's range (float16
    stores anything beyond 65,504 as infinity), naming the first such row (``names``)."""
    bad = ~np.isfinite(arr).all(axis=1) if arr.ndim == 2 else ~np.isfinite(arr)
    if bad.any():
        more = f" (and {int(bad.sum()) - 1} more)" if bad.sum() > 1 else ""
        raise NonFiniteError(f"layer {layer} of {names[int(np.flatnonzero(bad)[0])]}{more} is NaN "
                             f"or infinite: {why}")
    limit = float(np.finfo(dtype).max)
    if arr.dtype.kind == "f" and limit < float(np.finfo(arr.dtype).max):
        over = np.abs(arr).max(axis=1) > limit if arr.ndim == 2 else np.abs(arr) > limit
        if over.any():
            first = int(np.flatnonzero(over)[0])
            raise NonFiniteError(
                f"layer {layer} of {names[first]} reaches {float(np.abs(arr[first]).max()):.4g}, past "
                f"--dtype {dtype.name}'s largest value {limit:g}; use --dtype float32 (nothing of "
                "this batch was committed)")


def _create(f, attrs: dict[str, Any], split_sizes: dict[str, int], dims: dict[str, int],
            dtype: np.dtype) -> None:
    """A new cache's header, split groups and empty row datasets (sized for the source)."""
    root = f.attrs
    for key, value in attrs.items():
        root[key] = encode_attr(key, value)
    root["format"] = FORMAT
    root["format_version"] = SINGLE_VERSION
    root["checksums"] = CHECKSUMS
    root["complete"] = False
    for split, n in split_sizes.items():
        g = f.create_group(split)
        for key in ("rows", "next_index", "n_skipped", *_CRCS):
            g.attrs[key] = 0
        g.attrs["n_source"] = n
        cap = max(n, 1)
        g.create_dataset("labels", shape=(cap,), maxshape=(None,), dtype=np.int64,
                         chunks=(min(cap, 8192),), **CHECKED)
        g.create_dataset("paths", shape=(cap,), maxshape=(None,), dtype=str_dtype(),
                         chunks=(min(cap, 4096),))
        g.create_dataset("file_stat", shape=(cap, 2), maxshape=(None, 2), dtype=np.int64,
                         chunks=(min(cap, 8192), 2), **CHECKED)
        fg = g.create_group("features")
        for layer, dim in dims.items():
            fg.create_dataset(layer, shape=(cap, dim), maxshape=(None, dim), dtype=dtype,
                              chunks=(min(cap, chunk_rows(dim, dtype.itemsize)), dim), **CHECKED)
        sg = g.create_group("skipped")
        for name in ("path", "reason"):
            sg.create_dataset(name, shape=(0,), maxshape=(None,), dtype=str_dtype(), chunks=(256,))
    f.flush()


_CRCS = ("paths_crc32", "skipped_crc32")  # split attributes: CRC-32 of the committed strings


def _advance_crcs(g, b: _Buffer) -> None:
    """The split's string checksums, continued over the rows being committed (a cache written
    before featurekit 0.3 has none, and a resumed one does not start them halfway)."""
    if "paths_crc32" in g.attrs:
        g.attrs["paths_crc32"] = strings_crc(b.paths, int(g.attrs["paths_crc32"]))
    if "skipped_crc32" in g.attrs:
        g.attrs["skipped_crc32"] = skipped_crc([p for p, _ in b.skipped], [r for _, r in b.skipped],
                                               int(g.attrs["skipped_crc32"]))


def _cut_to_commit(g) -> None:
    """Cut every dataset of a split group back to what was committed.

    Rows past it may hold data that reached the disk before the kill, its strings referring to
    heap objects that never did: overwriting such a string makes HDF5 free a missing heap
    object ("bad heap index"). Shrinking resets those slots to the fill value. Strings:
    shrinking clears a partly kept chunk only in memory; a kill during the flush of an earlier
    resume could leave the shape cut on disk but the chunk's tail stale (reproduced by the kill
    test), so the tails are cleared on disk, every time (this also cuts skipped entries written
    after the last commit)."""
    rows = int(g.attrs["rows"])
    for ds in _row_datasets(g):
        if ds.shape[0] != rows:
            _reseal(ds, rows)
            ds.resize(rows, axis=0)
    _clear_strings_past(g["paths"], rows)
    sg, k = g["skipped"], int(g.attrs.get("n_skipped", 0))
    for name in ("path", "reason"):
        _clear_strings_past(sg[name], k)


def _reseal(ds, rows: int) -> None:
    """The chunk holding both committed rows and rows of the interrupted commit gets a
    checksum of its bytes as they are. Its committed part is what the last commit wrote (the
    interrupted one rewrote the same values), but a power loss during that rewrite can leave
    the chunk's new part and its checksum out of step, and HDF5 reads the chunk to cut the
    dataset. Only this chunk, only on a resume; every other chunk keeps its checksum."""
    if not ds.fletcher32 or rows % ds.chunks[0] == 0 or rows >= ds.shape[0]:
        return
    coord = ((rows // ds.chunks[0]) * ds.chunks[0],) + (0,) * (ds.ndim - 1)
    if ds.id.get_chunk_info_by_coord(coord).byte_offset is None:
        return  # never written
    mask, raw = ds.id.read_direct_chunk(coord)
    if not mask and raw[-4:] != fletcher32(raw[:-4]):
        ds.id.write_direct_chunk(coord, raw[:-4] + fletcher32(raw[:-4]), mask)


def _clear_strings_past(ds, keep: int) -> None:
    """Cut a string dataset to ``keep`` elements, and zero, in the file, the string references
    of elements ``keep`` and after in the chunk that holds element ``keep`` (chunks wholly past
    the cut are dropped by the cut).

    Written as raw chunk bytes on purpose: an ordinary write converts strings and first frees
    the heap objects the old references name, which after a kill may never have reached the
    disk ("bad heap index"). A zeroed reference is an empty string, HDF5's fill value.
    """
    c = ds.chunks[0]
    first = (keep // c) * c
    if ds.shape[0] < first + c:  # the chunk API only reaches chunks inside the extent
        ds.resize(first + c, axis=0)
    try:
        if ds.id.get_chunk_info_by_coord((first,)).byte_offset is None:
            return  # not in the file
        mask, raw = ds.id.read_direct_chunk((first,))
        if mask:  # a filtered chunk: not how featurekit writes strings; leave it to HDF5
            return
        cut = (keep - first) * (len(raw) // c)
        if any(raw[cut:]):
            ds.id.write_direct_chunk((first,), raw[:cut] + bytes(len(raw) - cut))
    finally:
        if ds.shape[0] != keep:
            ds.resize(keep, axis=0)


def _check_committed_strings(path: Path, split: str, g) -> None:
    """Before a resume continues a split's running CRC-32s: its committed strings match them
    (a resume must never carry damage into a cache that then says it is intact)."""
    committed = {"paths_crc32": strings_crc(g["paths"][: int(g.attrs["rows"])]),
                 "skipped_crc32": skipped_crc(g["skipped"]["path"][()], g["skipped"]["reason"][()])}
    for key, crc in committed.items():
        if key in g.attrs and crc != int(g.attrs[key]):
            raise CacheError(f"{path} is damaged: the committed {key[:-6]} of split {split!r} do "
                             "not match their checksum; it cannot be resumed: extract again with "
                             "--overwrite")


def _row_datasets(g) -> list[Any]:
    """Every dataset of a split group with one row per cached image."""
    return [g["labels"], g["paths"], *([g["file_stat"]] if "file_stat" in g else []),
            *g["features"].values()]


@dataclass
class _Buffer:
    next_index: int = 0

    def __post_init__(self) -> None:
        self.labels: list[np.ndarray] = []
        self.paths: list[str] = []
        self.features: dict[str, list[np.ndarray]] = {}
        self.stats: list[np.ndarray] = []
        self.skipped: list[tuple[str, str]] = []


# --------------------------------------------------------------------------- reader


def _guarded(fn):
    """Reading a damaged file can fail deep in h5py with many exception types (a checksum
    that does not match, a chunk that does not decompress, a truncated file); users get one
    CacheError line naming what is damaged instead."""
    import functools

    what = {"labels": "labels", "paths": "paths", "_block": "features", "file_stats": "file stats",
            "skipped": "list of skipped files", "n_rows": "row count", "dim": "layer widths"}

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except CacheError:
            raise
        except Exception as exc:
            where = what.get(fn.__name__, "header")
            if args and fn.__name__ != "dim":
                where += f" of split {args[0]!r}"
            if fn.__name__ == "_block":
                where += f", layer {args[1]!r} (rows {args[2]}..{args[3] - 1})"
            raise CacheError(f"{self.path} is damaged: its {where} cannot be read "
                             f"({_read_failure(exc)}); re-extract it, or restore the file") from None

    return wrapper


def _read_failure(exc: BaseException) -> str:
    """What went wrong reading a chunk, in a user's words where HDF5's are cryptic."""
    detail = " ".join(str(exc).split())[:200]
    if "filter returned failure" in detail:  # the Fletcher-32 filter refuses a changed chunk
        return "a chunk's checksum does not match its bytes"
    return detail


class Cache:
    """A validated, read-only featurekit cache. Use :func:`open_cache`."""

    def __init__(self, path: Path, f: Any, attrs: dict[str, Any]) -> None:
        self.path = path
        self._f = f
        self.attrs = attrs
        self._indexed: set[str] = set()  # splits whose row index (paths, skipped) was checked

    # -- metadata
    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    @property
    def classes(self) -> list[str]:
        return list(self.attrs["classes"])

    @property
    def layers(self) -> list[str]:
        return list(self.attrs["layers"])

    @property
    def splits(self) -> list[str]:
        return [s for s in SPLITS if s in self._f] + sorted(
            s for s in self._f if s not in SPLITS
        )

    @_guarded
    def n_rows(self, split: str) -> int:
        return int(self._group(split).attrs["rows"])

    @_guarded
    def dim(self, layer: str) -> int:
        self._check_layer(layer)
        return int(self._f[self.splits[0]]["features"][layer].shape[1])

    # -- data
    @property
    def checksums(self) -> str:
        """How this cache's bytes are checked (``fletcher32+crc32``), or ``none`` for a cache
        written before featurekit 0.3."""
        return str(self.attrs.get("checksums") or "none")

    @_guarded
    def labels(self, split: str) -> np.ndarray:
        self._check_index(split)
        return self._group(split)["labels"][: self.n_rows(split)]

    @_guarded
    def paths(self, split: str) -> list[str]:
        g = self._group(split)
        raw = g["paths"][: self.n_rows(split)]
        self._check_crc(g, "paths_crc32", strings_crc(raw), f"paths of split {split!r}")
        return [decode_value(p) for p in raw]

    @_guarded
    def features(self, split: str, layer: str, block_rows: int = 8192) -> np.ndarray:
        """All committed rows of one split and layer as float32, read in row blocks."""
        self._check_layer(layer)
        n = self.n_rows(split)
        ds = self._group(split)["features"][layer]
        out = np.empty((n, ds.shape[1]), dtype=np.float32)
        for start, block in self.iter_features(split, layer, block_rows):
            out[start : start + len(block)] = block
        return out

    def iter_features(self, split: str, layer: str, block_rows: int = 8192) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_row, block)`` of float32 rows, never reading more than a block;
        rows that are not finite are refused (:class:`NonFiniteError`), before anyone sees
        them."""
        self._check_layer(layer)
        n = self.n_rows(split)
        for start in range(0, n, block_rows):
            yield start, self._block(split, layer, start, min(n, start + block_rows))

    @_guarded
    def _block(self, split: str, layer: str, start: int, stop: int) -> np.ndarray:
        self._check_index(split)
        block = self._group(split)["features"][layer][start:stop].astype(np.float32, copy=False)
        return self._finite(block, split, layer, np.arange(start, stop))

    def _finite(self, block: np.ndarray, split: str, layer: str, row_ids: np.ndarray) -> np.ndarray:
        """``block`` (rows ``row_ids``), or :class:`NonFiniteError` naming its rows that are not
        finite: no reader ever returns them."""
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            rows = row_ids[bad].tolist()
            raise NonFiniteError(
                f"{self.path}: split {split!r}, layer {layer!r}: {len(rows)} row(s) are NaN or "
                f"infinite (rows {', '.join(map(str, rows[:5]))}{', ...' if len(rows) > 5 else ''}); "
                "a damaged or hand-made cache: re-extract it")
        return block

    @_guarded
    def rows(self, split: str, layer: str, index) -> np.ndarray:
        """Rows ``index`` (strictly increasing) of one split and layer as float32, checked as
        :meth:`iter_features` checks its blocks."""
        self._check_layer(layer)
        self._check_index(split)
        index = np.asarray(index, dtype=np.int64)
        if not index.size:
            return np.empty((0, self.dim(layer)), dtype=np.float32)
        if index[0] < 0 or index[-1] >= self.n_rows(split) or np.any(np.diff(index) <= 0):
            raise CacheError(f"{self.path}: rows of split {split!r} must be increasing and below "
                             f"{self.n_rows(split)}")
        if index[-1] - index[0] + 1 == index.size:  # a run of rows: one slice
            return self._block(split, layer, int(index[0]), int(index[-1]) + 1)
        block = self._group(split)["features"][layer][index].astype(np.float32, copy=False)
        return self._finite(block, split, layer, index)

    @_guarded
    def file_stats(self, split: str) -> np.ndarray | None:
        """(size, mtime_ns) of each row's file at extraction (None for caches without it)."""
        g = self._group(split)
        return g["file_stat"][: self.n_rows(split)] if "file_stat" in g else None

    @_guarded
    def skipped(self, split: str) -> list[tuple[str, str]]:
        g = self._group(split)
        k = int(g.attrs.get("n_skipped", g["skipped"]["path"].shape[0]))  # the committed ones
        paths, reasons = g["skipped"]["path"][:k], g["skipped"]["reason"][:k]
        self._check_crc(g, "skipped_crc32", skipped_crc(paths, reasons),
                        f"list of skipped files of split {split!r}")
        return [(decode_value(p), decode_value(r)) for p, r in zip(paths, reasons)]

    def check(self) -> list[tuple[str, str]]:
        """Read every byte of the cache's rows: HDF5 checks each chunk's Fletcher-32, the
        strings are checked against their CRC-32 and the features for finiteness. Returns
        ``(part, message)`` per damaged part (empty: intact); a cache without checksums is read
        the same way (then only what fails to read, or is not finite, shows)."""
        damaged: list[tuple[str, str]] = []

        def attempt(part: str, read: Callable[[], Any]) -> None:
            try:
                read()
            except CacheError as exc:
                damaged.append((part, str(exc)))

        for split in self.splits:
            before = len(damaged)
            attempt(f"{split}/paths", lambda: self.paths(split))
            attempt(f"{split}/skipped", lambda: self.skipped(split))
            self._indexed.add(split)  # reported above; every row is read regardless
            attempt(f"{split}/labels", lambda: self.labels(split))
            attempt(f"{split}/file_stat", lambda: self.file_stats(split))
            for layer in self.layers:
                attempt(f"{split}/features/{layer}",
                        lambda: [None for _ in self.iter_features(split, layer)])  # noqa: B023
            if len(damaged) > before:
                self._indexed.discard(split)
        return damaged

    def require_intact(self) -> dict[str, Any]:
        """:meth:`check` as one :class:`CacheError` line (the first damage, naming the other
        damaged parts); else what was checked: ``checksums``, ``rows``, ``seconds``."""
        t = time.perf_counter()
        damaged = self.check()
        if damaged:
            more = (f" (also damaged: {', '.join(part for part, _ in damaged[1:])})"
                    if len(damaged) > 1 else "")
            raise CacheError(damaged[0][1] + more)
        return {"checksums": self.checksums, "rows": sum(self.n_rows(s) for s in self.splits),
                "seconds": round(time.perf_counter() - t, 3)}

    @_guarded
    def summary(self) -> dict[str, Any]:
        """Everything ``featurekit info`` shows, JSON-able."""
        a = self.attrs
        return {
            "path": str(self.path),
            "format_version": a.get("format_version"),
            "featurekit_version": a.get("featurekit_version"),
            "created": a.get("created"),
            "complete": self.complete,
            "model": a.get("model"),
            "weights": a.get("weights"),
            "weights_sha256": a.get("weights_sha256"),
            "pool": a.get("pool"),
            "precision": a.get("precision"),
            "dtype": a.get("dtype"),
            "seed": a.get("seed"),
            "preprocess": a.get("preprocess"),
            "source": a.get("source"),
            "classes": self.classes,
            "layers": {layer: self.dim(layer) for layer in self.layers},
            "zero_fraction": a.get("zero_fraction"),
            "splits": {
                s: {
                    "rows": self.n_rows(s),
                    "n_source": int(self._group(s).attrs.get("n_source", self.n_rows(s))),
                    "skipped": [{"path": p, "reason": r} for p, r in self.skipped(s)],
                }
                for s in self.splits
            },
            "stats": a.get("stats"),
            "layout": a.get("layout") or "single",
            "checksums": self.checksums,
            "shards": [r.get("path") for r in a.get("shards") or []],
        }

    # -- internals
    def _check_index(self, split: str) -> None:
        """Before a split's rows are read: its row index (paths, skipped files) matches its
        checksums, so no reader uses rows of a damaged cache (once per split and reader)."""
        if split not in self._indexed:
            self.paths(split)
            self.skipped(split)
            self._indexed.add(split)

    def _check_crc(self, g, key: str, crc: int, what: str) -> None:
        if key in g.attrs and crc != int(g.attrs[key]):
            raise CacheError(f"{self.path} is damaged: its {what} do not match their checksum; "
                             "re-extract it, or restore the file")

    def _group(self, split: str):
        if split not in self._f:
            raise CacheError(
                f"{self.path} has no split {split!r}; splits: {', '.join(self.splits)}"
            )
        return self._f[split]

    def _check_layer(self, layer: str) -> None:
        if layer not in self.layers:
            raise CacheError(
                f"{self.path} has no layer {layer!r}; layers: {', '.join(self.layers)}"
            )

    def close(self) -> None:
        if self._f.id.valid:
            self._f.close()

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_cache(path: str | os.PathLike[str], allow_incomplete: bool = False) -> Cache:
    """Open and validate a cache; any problem is one-line :class:`CacheError`."""
    import h5py

    p = Path(path)
    if not p.exists():
        raise CacheError(f"cache not found: {p}")
    try:
        f = h5py.File(p, "r")
    except OSError as exc:
        raise CacheError(f"{p} is not a readable HDF5 file (truncated or corrupt?): {exc}") from None
    try:
        attrs = _validate(p, f, allow_incomplete)
    except CacheError:
        f.close()
        raise
    except Exception as exc:  # h5py raises many types on damaged files
        f.close()
        raise CacheError(f"{p} is damaged: {type(exc).__name__}: {exc}") from None
    return Cache(p, f, attrs)


def _validate(p: Path, f: Any, allow_incomplete: bool) -> dict[str, Any]:
    attrs = root_attrs(p, f)
    sharded = attrs.get("layout") == SHARDED
    if attrs["format_version"] > SINGLE_VERSION and not sharded:
        raise CacheError(f"{p} is damaged: format {attrs['format_version']} without its shards' list")
    if sharded:  # its row data live in the shards: they must be there
        from featurekit.shards import check

        check(p, attrs)
    for key in ("classes", "layers", "model"):
        if key not in attrs:
            raise CacheError(f"{p} lacks the {key!r} attribute")
    for key in ("classes", "layers"):
        if not isinstance(attrs[key], list) or not all(isinstance(v, str) for v in attrs[key]):
            raise CacheError(f"{p}: attribute {key!r} is not a list of names")
    if not bool(attrs.get("complete")) and not allow_incomplete:
        raise CacheError(
            f"{p} is incomplete (extraction was interrupted); rerun extract with --resume, "
            "or pass --allow-incomplete to read the committed rows"
        )
    if not list(f.keys()):
        raise CacheError(f"{p} holds no split groups")
    for split in f.keys():
        _check_split(p, f[split], split, attrs)
    return attrs


def _check_split(p: Path, g: Any, s: str, attrs: dict[str, Any]) -> None:
    """A split group has its datasets, a committed row count, and rows for every layer."""
    import h5py

    if not isinstance(g, h5py.Group):
        raise CacheError(f"{p}: /{s} is not a split group")
    for name in ("labels", "paths", "features", "skipped"):
        if name not in g:
            raise CacheError(f"{p}: split {s!r} lacks /{s}/{name}")
    rows = g.attrs.get("rows")
    if rows is None:
        raise CacheError(f"{p}: split {s!r} lacks its 'rows' attribute")
    rows = int(rows)
    sizes = [g["labels"].shape[0], g["paths"].shape[0]]
    if "file_stat" in g:
        sizes.append(g["file_stat"].shape[0])
    for layer in attrs["layers"]:
        if layer not in g["features"]:
            raise CacheError(f"{p}: split {s!r} lacks features for layer {layer!r}")
        sizes.append(g["features"][layer].shape[0])
    if any(n < rows for n in sizes) or (bool(attrs.get("complete")) and any(n != rows for n in sizes)):
        raise CacheError(
            f"{p}: split {s!r} has mismatched row counts (rows={rows}, datasets {sizes})"
        )
    if g["skipped"]["path"].shape != g["skipped"]["reason"].shape:
        raise CacheError(f"{p}: split {s!r} has mismatched skipped path/reason lists")


# --------------------------------------------------------------------------- pack


def pack(src: str | os.PathLike[str], out: str | os.PathLike[str], *,
         overwrite: bool = False) -> Path:
    """Copy any cache (sharded or not) into one ordinary file (format 1): the same groups,
    attributes and data, in HDF5's 1.8 format, with checksums (a cache written before
    featurekit 0.3 gains them), under a temporary name and renamed when complete. Every row
    read is checked first: a damaged or non-finite source packs nothing."""
    import h5py

    src, out = Path(src), check_output(out, overwrite, example="cache.h5")
    if src.exists() and src.resolve() == out.resolve():
        raise OutputError("pack: --out is the cache itself; give another file")
    with open_cache(src) as cache, replacing(out) as tmp:
        f_in = cache._f
        with h5py.File(tmp, "w", libver=("v108", "v108")) as f:
            for key, value in f_in.attrs.items():
                if key not in ("layout", "shards", "complete"):
                    f.attrs[key] = value
            f.attrs["format_version"] = SINGLE_VERSION
            f.attrs["checksums"] = CHECKSUMS
            f.attrs["complete"] = False
            for split in cache.splits:
                cache.skipped(split)  # the row index (paths, skipped) matches its checksums
                _copy_split(cache, split, f.create_group(split))
            f.flush()
            f.attrs["complete"] = True
    return out


def _copy_split(cache: Cache, split: str, g, block: int = 8192) -> None:
    """A split group's attributes and datasets, read in row blocks (virtual or not; each
    block checked as :class:`Cache` reads it), written with featurekit's chunking and
    checksums."""
    g_in = cache._group(split)
    for key, value in g_in.attrs.items():
        g.attrs[key] = value
    for name, ds in _walk(g_in):
        target = g.require_group(os.path.dirname(name)) if "/" in name else g
        n, text = ds.shape[0], ds.dtype.kind == "O"
        rows = chunk_rows(ds.shape[1], ds.dtype.itemsize) if ds.ndim == 2 else 8192
        out = target.create_dataset(os.path.basename(name), shape=ds.shape, dtype=ds.dtype,
                                    maxshape=(None, *ds.shape[1:]),
                                    chunks=(max(1, min(n, rows)), *ds.shape[1:]),
                                    **({} if text else CHECKED))
        layer = name.split("/", 1)[1] if name.startswith("features/") else None
        for start in range(0, n, block):
            stop = min(n, start + block)
            out[start:stop] = (cache._block(split, layer, start, stop).astype(ds.dtype)
                               if layer else _read_rows(cache, ds, name, split, start, stop))
    g.attrs["paths_crc32"] = strings_crc(g["paths"][:])
    g.attrs["skipped_crc32"] = skipped_crc(g["skipped"]["path"][:], g["skipped"]["reason"][:])


def _read_rows(cache: Cache, ds, name: str, split: str, start: int, stop: int) -> np.ndarray:
    try:
        return ds[start:stop]
    except Exception as exc:  # a checksum that does not match, a chunk that does not read
        raise CacheError(f"{cache.path} is damaged: its {name} of split {split!r} cannot be read "
                         f"({_read_failure(exc)}); nothing was packed") from None


def _walk(group, prefix: str = ""):
    import h5py

    for key, item in group.items():
        if isinstance(item, h5py.Dataset):
            yield prefix + key, item
        else:
            yield from _walk(item, prefix + key + "/")
