"""featurekit: run a ResNet once, compare classifiers on its cached features in seconds.

The package exports lazily: ``import featurekit`` costs nothing, and ``featurekit.open_cache``
imports h5py only when first used.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from featurekit._version import __version__

# public name -> module that defines it
_EXPORTS = {
    "FeaturekitError": "featurekit.errors",
    "open_cache": "featurekit.cache",
    "Cache": "featurekit.cache",
    "extract": "featurekit.extraction",  # the module is not named extract: never shadowed
    "open_source": "featurekit.data",
    "list_models": "featurekit.models",
    "create_head": "featurekit.heads",
    "list_heads": "featurekit.heads",
    "fit_head": "featurekit.fit",
    "predict": "featurekit.fit",
    "pack": "featurekit.cache",
    "run_bench": "featurekit.bench",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'featurekit' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
