"""The featurekit cache format's constants and versions, its attribute codec and the header check
every reader and ``--resume`` run first (``docs/cache-format.md`` writes the format down).

Versions: 1 is an ordinary cache (one HDF5 file in the 1.8 file format: every HDF5 reads it; a
shard of a sharded run and the output of ``pack`` are such caches); 2 is the logical cache of a
sharded run, whose row datasets are HDF5 virtual datasets over its shards (HDF5 >= 1.10). A
reader refuses a version newer than it knows, with one line: a format-1 reader never reads a
logical cache's fill values (NaN features, -1 labels) where a shard is missing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from featurekit.errors import CacheError

FORMAT = "featurekit-cache"
SINGLE_VERSION = 1  # one ordinary file
SHARDED_VERSION = 2  # virtual datasets over shard files
FORMAT_VERSION = SHARDED_VERSION  # the newest version this featurekit reads
SHARDED = "sharded"  # the ``layout`` attribute of a logical cache
JSON_ATTRS = ("layers", "preprocess", "classes", "source", "zero_fraction", "zero_counts", "options",
              "shard", "shards")
_STR = None  # h5py string dtype, made on first use
# How a cache's bytes are checked (root attribute ``checksums``): HDF5's Fletcher-32 filter on
# every numeric chunked dataset (checked by HDF5 on every read), and a CRC-32 of the decoded
# strings of each split's paths and skipped lists (split attributes, committed with the rows:
# HDF5 cannot filter variable-length strings, whose text lives outside the chunks). Caches
# written before featurekit 0.3 have neither and still read ("checksums: none" in info).
CHECKSUMS = "fletcher32+crc32"
CHECKED = {"fletcher32": True}  # create_dataset keywords of a checksummed numeric dataset


def str_dtype():
    global _STR
    if _STR is None:
        import h5py

        _STR = h5py.string_dtype("utf-8")
    return _STR


def chunk_rows(dim: int, itemsize: int) -> int:
    """Rows per HDF5 chunk: about 1 MiB per chunk, so row-block reads touch few chunks."""
    return max(1, min(4096, (1 << 20) // max(1, dim * itemsize)))


def fletcher32(data: bytes) -> bytes:
    """HDF5's Fletcher-32 of a chunk's bytes, as its filter stores it after them (H5checksum.c:
    16-bit big-endian words, sums folded mod 65535; stored little-endian). For re-sealing the
    one chunk an interrupted commit was writing (see ``cache._reseal``)."""
    a = np.frombuffer(data, dtype=np.uint8)
    if a.size % 2:
        a = np.concatenate([a, np.zeros(1, np.uint8)])
    w = (a[0::2].astype(np.int64) << 8) | a[1::2].astype(np.int64)
    if not w.any():
        return bytes(4)
    s1 = int(w.sum())
    s2 = int(np.dot(w, np.arange(w.size, 0, -1, dtype=np.int64)))
    fold = lambda v: (v - 1) % 65535 + 1 if v else 0  # noqa: E731  (HDF5 folds to 1..65535)
    return ((fold(s2) << 16) | fold(s1)).to_bytes(4, "little")


def strings_crc(values, crc: int = 0) -> int:
    """CRC-32 of strings in order (each UTF-8, NUL-terminated), continuing from ``crc``: one
    running value per list, updated at each commit."""
    import zlib

    data = b"".join((v if isinstance(v, bytes) else str(v).encode("utf-8")) + b"\0" for v in values)
    return zlib.crc32(data, crc)


def skipped_crc(paths, reasons, crc: int = 0) -> int:
    """The CRC-32 of a skipped list: path, reason, path, reason, ... (see :func:`strings_crc`)."""
    return strings_crc([v for pair in zip(paths, reasons) for v in pair], crc)


def encode_attr(key: str, value: Any) -> Any:
    """JSON for structured attributes; plain ``str`` for str subclasses (h5py rejects them)."""
    if key in JSON_ATTRS:
        return json.dumps(value)
    return str(value) if isinstance(value, str) else value


def decode_value(value: Any) -> Any:
    """An attribute or string element as Python: bytes -> str, numpy scalars -> Python."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_header(path: str | os.PathLike[str], readable: int = FORMAT_VERSION) -> dict[str, Any]:
    """The validated root attributes of a featurekit cache, read without opening the file for
    writing (``extract --resume`` checks a file this way before it may touch it)."""
    import h5py

    p = Path(path)
    try:
        f = h5py.File(p, "r")
    except OSError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CacheError(f"{p} is not a featurekit cache (it cannot be read as HDF5: {first})") from None
    try:
        with f:
            return root_attrs(p, f, readable)
    except CacheError:
        raise
    except Exception as exc:  # h5py raises many types on damaged files
        raise CacheError(f"{p} is damaged: {type(exc).__name__}: {exc}") from None


def root_attrs(p: Path, f: Any, readable: int = FORMAT_VERSION) -> dict[str, Any]:
    """Root attributes, decoded (JSON ones parsed); refuses other files and versions newer
    than ``readable`` (the newest this reader knows)."""
    attrs = {k: decode_value(v) for k, v in f.attrs.items()}
    if attrs.get("format") != FORMAT:
        raise CacheError(f"{p} is not a featurekit cache (no format={FORMAT!r} attribute)")
    check_version(p, attrs, readable)
    for key in JSON_ATTRS:
        if key in attrs and isinstance(attrs[key], str):
            try:
                attrs[key] = json.loads(attrs[key])
            except json.JSONDecodeError:
                raise CacheError(f"{p}: attribute {key!r} is not valid JSON") from None
    return attrs


def check_version(p: Path, attrs: dict[str, Any], readable: int = FORMAT_VERSION) -> int:
    """The cache's format version, or one line when this reader cannot read it."""
    version = attrs.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CacheError(f"{p} has no valid format_version")
    if version > readable:
        what = (" (the logical cache of a sharded extraction, HDF5 virtual datasets over its "
                "shards; featurekit pack makes one ordinary file of it)"
                if version == SHARDED_VERSION else "")
        raise CacheError(f"{p} has cache format {version}{what}, newer than this featurekit "
                         f"reads ({readable}); upgrade featurekit")
    return version
