"""Files that appear whole or not at all: every output is written under a temporary name beside
its real one and renamed over it once complete, so a kill, an error or a full disk never leaves a
half-written file under the real name, and an old file replaced with ``--overwrite`` stays until
the new one is whole."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yields a hidden temporary path beside ``path`` to write; renamed over ``path`` when the
    block ends, removed if it raises."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
