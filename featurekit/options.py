"""The documented range of every numeric option, and the names shared by several commands, in
one place.

The CLI parses each numeric option with one of these ranges (``typer.Option(parser=...)``), so
a value out of range, NaN, infinity or text that is no number is one line and exit code 2 before
any work starts; the library checks the same ranges for callers from Python. A test walks the
CLI's own parameter list and fails for a numeric option that has no range here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from featurekit.errors import FeaturekitError


@dataclass(frozen=True)
class Range:
    """A closed or half-open interval of ints or finite floats; ``None`` bounds are open-ended."""

    kind: type  # int or float
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # the low bound itself is not allowed
    high_open: bool = False

    @property
    def __name__(self) -> str:  # older typer/click name a parser's type after the callable
        return "integer" if self.kind is int else "number"

    def describe(self) -> str:
        noun = "an integer" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            if not (self.low_open or self.high_open):
                return f"{noun} from {_fmt(self.low)} to {_fmt(self.high)}"
            return (f"{noun} in {'(' if self.low_open else '['}{_fmt(self.low)}, "
                    f"{_fmt(self.high)}{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{noun} {'>' if self.low_open else '>='} {_fmt(self.low)}"
        if self.high is not None:
            return f"{noun} {'<' if self.high_open else '<='} {_fmt(self.high)}"
        return f"a finite {noun.split()[-1]}"

    def contains(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return False
        return True

    def __call__(self, text: Any) -> int | float:
        """The CLI's parser: text -> number, or ValueError with the reason (one line)."""
        if isinstance(text, (int, float)) and not isinstance(text, bool):
            value: int | float = text
        else:
            try:
                value = self.kind(str(text).strip())
            except ValueError:
                raise ValueError(f"must be {self.describe()}, got {str(text)!r}") from None
        if self.kind is int and isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"must be {self.describe()}, got {value!r}")
            value = int(value)
        if not self.contains(value):
            raise ValueError(f"must be {self.describe()}, got {value!r}")
        return self.kind(value)

    def check(self, option: str, value: Any) -> Any:
        """For library callers: ``value`` unchanged (``None`` passes), or one-line error naming
        the option."""
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FeaturekitError(f"{option} must be {self.describe()}, got {value!r}")
        try:
            return self(value)
        except ValueError as exc:
            raise FeaturekitError(f"{option} {exc}") from None


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


# -- the table (README documents the same ranges)
IMAGE_SIZE = Range(int, 16, 8192)  # pixels; bigger batches are also checked against memory
BATCH_SIZE = Range(int, 1, 65536)
WORKERS = Range(int, 0, 1024)
SEED = Range(int, 0, 2**32 - 1)  # numpy's and torch's seed range
FRACTION = Range(float, 0.0, 1.0, high_open=True)  # --val-fraction, --test-fraction
COMMIT_SECONDS = Range(float, 0.0, 86400.0)  # 0: commit after every batch
POSITIVE = Range(float, 0.0, None, low_open=True)  # C, gamma, T
LEARNING_RATE = Range(float, 0.0, 10.0, low_open=True)
WEIGHT_DECAY = Range(float, 0.0, 10.0)
DROPOUT = Range(float, 0.0, 1.0, high_open=True)
HIDDEN = Range(int, 1, 65536)
EPOCHS = Range(int, 1, 100000)
PATIENCE = Range(int, 1, 100000)  # --early-stop
MAX_IMAGES = Range(int, 1, None)
DEAD_THRESHOLD = Range(float, 0.0, 1.0, low_open=True)
JOBS = Range(int, 1, 4096)
CV = Range(int, 2, 1000)  # --cv: folds
NEIGHBOURS = Range(int, 1, None)  # --k: the k-NN head's neighbours
DRAWS = Range(int, 1, 100000)  # fewshot --draws
WAYS = Range(int, 2, None)  # fewshot --ways (classes per episode)
QUERIES = Range(int, 1, None)  # fewshot --queries (reported images per class and episode)

# -- names several commands share
SPLITS = ("train", "val", "test")  # split folders of a source, split groups of a cache
DECODES = ("auto", "cpu", "gpu", "hw")  # --decode
DECODE_PATHS = ("cpu", "gpu", "hw")  # what auto resolves to, from the most widely available
_LEGACY_DECODE = {"device": "gpu", "nvjpeg": "gpu", "nvimgcodec-hw": "hw"}  # older caches' names


def canonical_decode(name: Any) -> Any:
    """A decode path's name in today's vocabulary (older caches' names mapped; others as given)."""
    return _LEGACY_DECODE.get(name, name) if isinstance(name, str) else name


def canonical_options(options: Any) -> Any:
    """Recorded extraction options in today's vocabulary (what ``--resume`` and the shards'
    check compare): an older cache's decode path under its current name."""
    if isinstance(options, dict) and "decode" in options:
        return {**options, "decode": canonical_decode(options["decode"])}
    return options


def comma_list(value: str | list[str] | None, default: list[str]) -> list[str]:
    """``a, b,c`` (or a list) -> ['a', 'b', 'c'], empty items dropped; None -> ``default``."""
    if value is None:
        return list(default)
    items = value.split(",") if isinstance(value, str) else list(value)
    return [v.strip() for v in items if v.strip()]
