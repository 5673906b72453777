"""What a person sees on stderr (stdout is reserved for ``--json``): log lines, progress bars and
warnings, each warning one line.

The library warns with real :mod:`warnings` categories (:class:`FeaturekitWarning` and its
subclasses), so a library user can filter them; :func:`one_line_warnings` (the CLI's) prints
every warning as ``warning: <message>``, never Python's file path and source line.
"""

from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

stderr = Console(stderr=True)


def log(message: str) -> None:
    """One line on stderr, at once."""
    print(message, file=sys.stderr, flush=True)


class FeaturekitWarning(UserWarning):
    """Something a user should know that does not stop the command."""


class SelectionWarning(FeaturekitWarning):
    """Selection chose a grid point on the grid's edge, or grid points did not converge."""


def warn(message: str, category: type[Warning] = FeaturekitWarning) -> None:
    """Warn as featurekit does: a real warning of ``category`` (filterable by library users),
    attributed to the caller of featurekit."""
    warnings.warn(message, category, stacklevel=_outside_featurekit())


def _outside_featurekit() -> int:
    """The stack level of the first frame outside featurekit (so that a library user's filter
    by module sees their own code, and the message names no featurekit file)."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_globals.get("__name__", "").startswith("featurekit"):
        frame, level = frame.f_back, level + 1
    return level


def _show_one_line(message, category, filename, lineno, file=None, line=None) -> None:
    log(f"warning: {' '.join(str(message).split())}")


@contextmanager
def one_line_warnings() -> Iterator[None]:
    """Every warning shown in the block printed as one ``warning: …`` line on stderr (the
    CLI's setting). featurekit's own are shown each time, whatever the process's filters say
    (a filter that stays: it concerns featurekit's categories only); other libraries' follow
    the process's filters, which this leaves as they are."""
    warnings.filterwarnings("always", category=FeaturekitWarning)
    previous, warnings.showwarning = warnings.showwarning, _show_one_line
    try:
        yield
    finally:
        warnings.showwarning = previous


def quiet_hdf5_noise() -> None:
    """After a failed write (a full disk), h5py's object finalizers report "Can't decrement id
    ref count" (Cython prints them through sys.excepthook, or sys.unraisablehook), some before
    the failure reaches any handler; they say nothing the user's one line does not. The CLI
    drops exactly those, process-wide, once (a library leaves the hooks alone)."""
    def is_noise(exc: BaseException | None) -> bool:
        return isinstance(exc, RuntimeError) and "ref count" in str(exc)

    if getattr(sys.excepthook, "_featurekit_quiet", False):
        return
    previous_except, previous_unraisable = sys.excepthook, sys.unraisablehook

    def excepthook(exc_type, exc, tb) -> None:
        if not is_noise(exc):
            previous_except(exc_type, exc, tb)

    def unraisablehook(unraisable) -> None:
        if not is_noise(unraisable.exc_value):
            previous_unraisable(unraisable)

    excepthook._featurekit_quiet = True  # type: ignore[attr-defined]
    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook


class RateColumn(ProgressColumn):
    """Items per second, e.g. ``143.2 img/s``."""

    def __init__(self, unit: str = "img") -> None:
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.1f} {self.unit}/s", style="progress.data.speed")


class _NullProgress:
    def add_task(self, *args, **kwargs) -> int:
        return 0

    def advance(self, *args, **kwargs) -> None:
        pass

    def update(self, *args, **kwargs) -> None:
        pass


@contextmanager
def progress_bar(enabled: bool = True, unit: str = "img") -> Iterator[Progress | _NullProgress]:
    """A rich progress bar on stderr with a rate column; a no-op when disabled."""
    if not enabled:
        yield _NullProgress()
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        transient=False,
    ) as bar:
        yield bar
