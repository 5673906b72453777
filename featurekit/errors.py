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
