"""User-facing errors.

Everything a user can cause (a missing folder, an unknown model, a cache from another version)
is a :class:`FeaturekitError`: one line that says what went wrong and what to do. Only the CLI
turns them into exit code 2; library callers catch them like any exception.
"""

from __future__ import annotations


class FeaturekitError(Exception):
    """An error the user can fix; its message is one line meant for them."""

    exit_code = 2


class SourceError(FeaturekitError):
    """The image source is missing, empty or malformed."""


class ModelError(FeaturekitError):
    """Unknown model or layer, or weights that cannot be loaded."""


class CacheError(FeaturekitError):
    """A cache file that is missing, corrupt, incomplete or from another version."""


class OutputError(FeaturekitError):
    """An output path that exists, cannot be written, or ran out of space."""


class HeadError(FeaturekitError):
    """Unknown head or backend, or a saved head that does not fit the cache."""


class DeviceError(FeaturekitError):
    """A device that is not there (CUDA asked for on a machine without it)."""


class ResourceError(FeaturekitError):
    """Not enough memory (host or GPU) for the options given."""


def from_runtime(exc: BaseException) -> FeaturekitError | None:
    """A failure that only shows at run time but is the user's to fix (too large a batch or
    image size for the memory there is) as one-line error; None for anything else (a bug)."""
    text = " ".join(str(exc).split())
    kept = ("whatever was committed is kept (extract: the cache stays incomplete; "
            "--resume continues it)")
    if type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in text:
        return ResourceError(f"the GPU ran out of memory; lower --batch-size or --image-size; {kept}")
    if isinstance(exc, MemoryError):
        return ResourceError(f"out of memory; lower --batch-size, --image-size or --workers; {kept}")
    if isinstance(exc, RuntimeError) and "DataLoader worker" in text:
        detail = text.split("DataLoader worker", 1)[1].split(".")[0]
        return ResourceError(
            f"a decoding worker died (DataLoader worker{detail}), most often for lack of memory; "
            f"lower --batch-size, --image-size or --workers; {kept}"
        )
    return None
