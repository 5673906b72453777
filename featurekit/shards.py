"""Sharded caches: the output of an extraction under torchrun, one logical cache over shards.

Each of W ranks writes an ordinary, resumable featurekit cache of a contiguous slice of every
split (``CACHE.h5.shards/RRRRR-of-WWWWW.h5``), cut on batch boundaries so that the ranks
together compute exactly the batches one process would. Rank 0 then checks every shard and
writes ``CACHE.h5``: the same groups, attributes and datasets as a single-process cache, its
row datasets (labels, paths, file_stat, features) HDF5 *virtual datasets* over the shards
(paths relative to the cache, so the folder can move), the short skipped lists copied.
Nothing is copied from the features: a million-image run is finalised in seconds.

HDF5 reads a virtual dataset whose source file is missing as fill values, without an error,
so every reader (:func:`featurekit.cache.open_cache`) checks that each shard is there, with
the identity (a random id the shard records) and size the cache recorded, and refuses with one
line. The logical cache is format version 2 (HDF5 1.10 or newer, h5py 2.9+, reads it; a reader
that knows only version 1 refuses it); :func:`featurekit.cache.pack` copies any cache into one
ordinary file.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from featurekit._h5format import (
    CHECKSUMS,
    FORMAT,
    SHARDED,
    SHARDED_VERSION,
    encode_attr,
    read_header,
    skipped_crc,
    str_dtype,
    strings_crc,
)
from featurekit._outputs import replacing
from featurekit.errors import CacheError
from featurekit.options import canonical_options


def shard_dir(out: Path) -> Path:
    return out.with_name(out.name + ".shards")


def shard_path(out: Path, rank: int, world: int) -> Path:
    return shard_dir(out) / f"{rank:05d}-of-{world:05d}.h5"


def stale_shards(out: Path, world: int) -> list[Path]:
    """Shard files in the folder that are not this run's (an earlier run with another number
    of processes): never read, never deleted unasked; the user is told once."""
    own = {shard_path(out, r, world).name for r in range(world)}
    folder = shard_dir(out)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*-of-*.h5") if p.name not in own)


def rank_ranges(split_sizes: dict[str, int], batch_size: int, world: int) -> list[dict[str, list[int]]]:
    """Per rank, [start, end) of each split in source order: whole batches of the
    single-process run, as evenly as they go (the last ranks may get none)."""
    out: list[dict[str, list[int]]] = [{} for _ in range(world)]
    for split, n in split_sizes.items():
        batches = -(-n // batch_size)
        for r in range(world):
            lo, hi = batches * r // world, batches * (r + 1) // world
            out[r][split] = [min(n, lo * batch_size), min(n, hi * batch_size)]
    return out


def identity(rank: int, world: int, ranges: dict[str, list[int]],
             options: dict[str, Any]) -> dict[str, Any]:
    """What a shard records about itself (``shard`` root attribute): its rank and slice, the
    run (a digest of the options and the number of ranks: the same for every shard of a run,
    resumed or not), and a ``uuid`` that tells a reader the file is still the one the logical
    cache was made from."""
    import hashlib
    import json

    run = hashlib.sha256(json.dumps([options, world], sort_keys=True).encode()).hexdigest()[:16]
    return {"rank": rank, "world": world, "ranges": ranges, "run": run, "uuid": uuid.uuid4().hex}


def finalise(out: Path, world: int, expected_options: dict[str, Any], attrs: dict[str, Any],
             ranges: list[dict[str, list[int]]]) -> None:
    """Check every shard, then write the logical cache ``out`` (temporary name, then rename)."""
    import h5py

    headers, files = [], []
    for r in range(world):
        p = shard_path(out, r, world)
        if not p.exists():
            raise CacheError(f"shard {p} is missing; every rank must write into a folder rank 0 "
                             "can read (a shared file system), then extract --resume")
        h = read_header(p)
        shard = h.get("shard") or {}
        if canonical_options(h.get("options")) != expected_options or shard.get("world") != world \
                or shard.get("rank") != r or shard.get("ranges") != ranges[r]:
            raise CacheError(f"shard {p} belongs to another run (other options or ranks); "
                             "re-run with --overwrite")
        if not h.get("complete"):
            raise CacheError(f"shard {p} is incomplete; re-run extract with --resume")
        headers.append(h)
        files.append(p)
    with replacing(out) as tmp, h5py.File(tmp, "w", libver=("v110", "v110")) as f:
        _write_logical(f, out, files, headers, attrs)
        f.attrs["format"], f.attrs["format_version"] = FORMAT, SHARDED_VERSION
        for key, value in attrs.items():
            f.attrs[key] = encode_attr(key, value)
        f.attrs["layout"] = SHARDED
        if all(h.get("checksums") == CHECKSUMS for h in headers):
            f.attrs["checksums"] = CHECKSUMS
        f.attrs["shards"] = encode_attr("shards", [_record(out, p, h) for p, h in zip(files, headers)])
        counts, fractions = _zero_totals(headers)
        f.attrs["zero_counts"] = encode_attr("zero_counts", counts)
        f.attrs["zero_fraction"] = encode_attr("zero_fraction", fractions)
        f.flush()
        f.attrs["complete"] = True


def _record(out: Path, p: Path, header: dict[str, Any]) -> dict[str, Any]:
    return {"path": os.path.relpath(p, out.parent), "uuid": header["shard"]["uuid"],
            "size": p.stat().st_size}


def _zero_totals(headers: list[dict[str, Any]]) -> tuple[dict, dict]:
    """Running zero counts summed over the shards, and the fractions from them."""
    totals: dict[str, list[int]] = {}
    for h in headers:
        for layer, (zeros, total) in (h.get("zero_counts") or {}).items():
            acc = totals.setdefault(layer, [0, 0])
            acc[0], acc[1] = acc[0] + int(zeros), acc[1] + int(total)
    fractions = {k: (z / t if t else float("nan")) for k, (z, t) in totals.items()}
    return totals, fractions


def _write_logical(f, out: Path, files: list[Path], headers, attrs) -> None:
    """Split groups of the logical cache: row datasets virtual over the shards, skipped lists
    copied, counters summed."""
    import h5py

    with contextlib.ExitStack() as stack:
        shards = [stack.enter_context(h5py.File(p, "r")) for p in files]
        for split in shards[0]:
            g = f.create_group(split)
            parts = [s[split] for s in shards]
            rows = [int(p.attrs["rows"]) for p in parts]
            g.attrs["rows"] = sum(rows)
            g.attrs["n_skipped"] = sum(int(p.attrs.get("n_skipped", 0)) for p in parts)
            g.attrs["n_source"] = int(headers[0]["options"]["split_sizes"][split])
            g.attrs["next_index"] = g.attrs["n_source"]
            for name in ("labels", "paths", "file_stat"):
                _virtual(g, name, out, files, parts, rows, split)
            fg = g.create_group("features")
            for layer in parts[0]["features"]:
                _virtual(fg, layer, out, files, [p["features"] for p in parts], rows,
                         f"{split}/features")
            sg = g.create_group("skipped")
            _check_skipped(files, parts)
            for name in ("path", "reason"):
                values = [v for p in parts for v in p["skipped"][name][()]]
                sg.create_dataset(name, data=np.array(values, dtype=object), dtype=str_dtype(),
                                  maxshape=(None,), chunks=(256,))
            if all("paths_crc32" in p.attrs for p in parts):
                g.attrs["paths_crc32"] = _paths_crc(files, parts, rows)
                g.attrs["skipped_crc32"] = skipped_crc(sg["path"][()], sg["reason"][()])


def _paths_crc(files: list[Path], parts, rows: list[int]) -> int:
    """The CRC-32 of the logical split's paths, each shard's checked on the way."""
    crc = 0
    for p, part, n in zip(files, parts, rows):
        values = part["paths"][:n]
        if strings_crc(values) != int(part.attrs["paths_crc32"]):
            raise CacheError(f"shard {p} is damaged: its paths of split {part.name.strip('/')!r} "
                             "do not match their checksum; re-run extract with --overwrite")
        crc = strings_crc(values, crc)
    return crc


def _check_skipped(files: list[Path], parts) -> None:
    """Each shard's skipped list matches its CRC-32 before it is copied."""
    for p, part in zip(files, parts):
        crc = skipped_crc(part["skipped"]["path"][()], part["skipped"]["reason"][()])
        if "skipped_crc32" in part.attrs and crc != int(part.attrs["skipped_crc32"]):
            raise CacheError(f"shard {p} is damaged: its list of skipped files of split "
                             f"{part.name.strip('/')!r} does not match its checksum; re-run "
                             "extract with --overwrite")


def _virtual(group, name: str, out: Path, files: list[Path], parts, rows: list[int], where: str) -> None:
    import h5py

    first = parts[0][name]
    shape = (sum(rows), *first.shape[1:])
    layout = h5py.VirtualLayout(shape=shape, dtype=first.dtype)
    start = 0
    for p, part, n in zip(files, parts, rows):
        if n:
            src = h5py.VirtualSource(os.path.relpath(p, out.parent), f"{where}/{name}",
                                     shape=part[name].shape, dtype=first.dtype)
            layout[start:start + n] = src[:n]
        start += n
    group.create_virtual_dataset(name, layout, fillvalue=_fill(first.dtype))


def _fill(dtype):
    if dtype.kind == "f":
        return np.nan
    if dtype.kind in "iu":
        return -1
    return None


def check(path: Path, attrs: dict[str, Any]) -> None:
    """For readers of a sharded cache: every shard where the cache recorded it, the same file
    (its identity and size; a copy that keeps both, e.g. of the whole folder, is fine)."""
    records = attrs.get("shards")
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
        raise CacheError(f"{path} is a sharded cache that lists no shards")
    for rec in records:
        p = path.parent / str(rec.get("path"))
        try:
            size = p.stat().st_size
        except OSError:
            raise CacheError(f"{path}: its shard {p} is missing; restore it (the cache reads "
                             "its rows from it), or re-run extract") from None
        try:
            same = (read_header(p).get("shard") or {}).get("uuid") == rec.get("uuid")
        except CacheError:
            same = False
        if not same or size != rec.get("size"):
            raise CacheError(f"{path}: its shard {p} was changed or replaced since the cache "
                             "was made; restore it, or re-run extract")
