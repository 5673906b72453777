"""Every file a command writes goes through here: refused when it exists (unless the user said
``--overwrite``), and written whole or not at all.

A file is written under a temporary name beside its real one and renamed over it once complete,
so a kill, an error or a full disk never leaves a half-written file under the real name, and an
old file replaced with ``--overwrite`` stays until the new one is whole.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from featurekit.errors import OutputError


def check_output(out: str | os.PathLike[str], overwrite: bool, resumable: bool = False,
                 example: str = "out") -> Path:
    """Refuse an existing output (unless ``overwrite``) or a folder we cannot write to;
    ``resumable``: the command has ``--resume`` (the refusal says so); ``example``: a file
    name to suggest when ``out`` is a folder."""
    p = Path(out)
    if p.is_dir():
        raise OutputError(f"output {p} is a folder; give a file name such as {p / example}")
    if p.exists() and not overwrite:
        also = " (or --resume to continue it)" if resumable else ", or choose another --out"
        raise OutputError(f"output {p} exists; pass --overwrite to replace it{also}")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output folder {parent} is not writable")
    return p


def check_output_folder(out: str | os.PathLike[str], names: Iterable[str], overwrite: bool) -> Path:
    """A folder a command writes ``names`` into: refuses a file in its place and, unless
    ``overwrite``, any of those names already there (the command never replaces files it was
    not asked to)."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--out {folder} is a file; give a folder")
    present = [n for n in names if (folder / n).exists()]
    if present and not overwrite:
        raise OutputError(
            f"{folder} already holds {', '.join(present)}; pass --overwrite to replace "
            f"{'them' if len(present) > 1 else 'it'}, or choose another --out"
        )
    return folder


@contextmanager
def replacing(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a hidden temporary path beside ``path`` to write; when the block ends it is
    synced to the disk, renamed over ``path``, and the folder synced (so that after a power
    loss the name holds the old file or the whole new one, never an empty one); removed if the
    block raises."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        sync_file(tmp)
        os.replace(tmp, path)
        sync_folder(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sync_file(path: str | os.PathLike[str]) -> None:
    """The file's data and size on the disk (fsync), not only in the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_folder(folder: str | os.PathLike[str]) -> None:
    """A folder's entries (a rename into it) on the disk; a no-op where folders cannot be
    opened for it (not POSIX)."""
    try:
        fd = os.open(folder if str(folder) else ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory: nothing more to do
        pass
    finally:
        os.close(fd)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_csv(path: str | os.PathLike[str], header: list[str], rows: Iterable[Iterable[Any]]) -> Path:
    with replacing(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return Path(path)


def save_figure(fig, path: str | os.PathLike[str]) -> Path:
    """A matplotlib figure as PNG, whole or not at all; the figure is closed."""
    import matplotlib.pyplot as plt

    try:
        with replacing(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return Path(path)
