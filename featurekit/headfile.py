"""Head files: a fitted head with its report and the provenance of its features.

The format follows the file name: ``.joblib`` is a joblib pickle (loading it runs whatever code
it holds, so it loads only with ``trust=True``); any other name is a skops file, which loads
only featurekit's, scikit-learn's and numpy's own classes and runs nothing else. A head
records where its features came from (:func:`provenance_of`); predicting on a cache whose
features were computed otherwise is refused (:data:`PROVENANCE_KEYS`) or warned about
(:data:`SOFT_PROVENANCE_KEYS`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from featurekit._version import __version__
from featurekit._outputs import replacing
from featurekit.errors import HeadError
from featurekit.options import canonical_decode

HEAD_FORMAT = "featurekit-head"
HEAD_FORMAT_VERSION = 1
# provenance keys that must match between a saved head and the cache it predicts on
PROVENANCE_KEYS = ("model", "weights_sha256", "layer", "pool", "preprocess", "classes")
# keys that may differ with a warning (the features move by rounding only)
SOFT_PROVENANCE_KEYS = ("precision", "decode")
# module prefixes whose *classes* (never functions) a skops head file may hold
SKOPS_TRUSTED = ("featurekit.heads.", "sklearn.", "numpy.")


def provenance_of(cache, layer: str) -> dict[str, Any]:
    a = cache.attrs
    return {
        "model": a.get("model"),
        "weights": a.get("weights"),
        "weights_sha256": a.get("weights_sha256") or f"{a.get('weights')}:seed={a.get('seed')}",
        "layer": layer,
        "pool": a.get("pool") if layer != "penultimate" else None,
        "preprocess": a.get("preprocess"),
        "classes": list(cache.classes),
        "precision": a.get("precision"),
        "decode": canonical_decode(a.get("decode")),
        "cache": str(cache.path),
        "featurekit_version": __version__,
    }


def head_format(path: str | Path) -> str:
    return "joblib" if Path(path).suffix.lower() == ".joblib" else "skops"


def check_head_output(path: str | Path, backend: str) -> None:
    """Before fitting: cuML heads hold GPU objects that skops cannot write."""
    if backend == "cuml" and head_format(path) == "skops":
        raise HeadError(
            f"cuML heads can be saved only as joblib files (skops cannot hold cuML's GPU "
            f"objects): use --out {Path(path).with_suffix('.joblib')}"
        )


def save_head(result, path: str | Path) -> Path:
    """A fit's result (its ``head``, ``report`` and ``provenance``), as skops or joblib by the
    file name; written under a temporary name and renamed, so an interrupted save leaves no
    half file."""
    from featurekit.errors import OutputError

    p = Path(path)
    if not p.parent.is_dir():
        raise OutputError(f"output folder {p.parent} does not exist")
    check_head_output(p, getattr(result.head, "backend", "sklearn"))
    payload = {"format": HEAD_FORMAT, "format_version": HEAD_FORMAT_VERSION, "head": result.head,
               "provenance": result.provenance, "report": result.report}
    with replacing(p) as tmp:
        if head_format(p) == "joblib":
            import joblib

            joblib.dump(payload, tmp)
        else:
            import skops.io

            skops.io.dump(payload, tmp)
    return p


# modules that held head classes in earlier featurekit versions -> where those classes are now
_MOVED = {"featurekit.heads._svm": "featurekit.heads._torch._svm"}  # featurekit 0.1


def _old_module_names(names: list[str] | None = None) -> None:
    """Make the modules head files of earlier versions name importable (as the modules that
    hold those classes now), so such files load as they did; ``names``: the types a file names
    (None: unknown, as for a pickle)."""
    import importlib
    import sys

    for old, new in _MOVED.items():
        wanted = names is None or any(n.startswith(old + ".") for n in names)
        if wanted and old not in sys.modules:
            sys.modules[old] = importlib.import_module(new)


def load_head(path: str | Path, trust: bool = False) -> dict[str, Any]:
    """A saved head. A skops file may hold only trusted classes (anything else is refused
    before it is built); a joblib file is a pickle and loads only with ``trust``."""
    p = Path(path)
    if not p.is_file():
        raise HeadError(f"head file not found: {p}")
    obj = _load_joblib(p, trust) if head_format(p) == "joblib" else _load_skops(p)
    if not isinstance(obj, dict) or obj.get("format") != HEAD_FORMAT:
        raise HeadError(f"{p} is not a featurekit head file")
    version = obj.get("format_version")
    if not isinstance(version, int) or version > HEAD_FORMAT_VERSION:
        raise HeadError(f"{p} was written by a newer featurekit (or is damaged); upgrade featurekit")
    from featurekit.heads._base import Head

    if not isinstance(obj.get("head"), Head) or not isinstance(obj.get("provenance"), dict) \
            or not isinstance(obj.get("report"), dict):
        raise HeadError(f"{p} is not a featurekit head file (no fitted head, provenance or report)")
    return obj


def _load_joblib(p: Path, trust: bool) -> Any:
    if not trust:
        raise HeadError(
            f"{p} is a joblib pickle, and loading one runs any code it holds: pass --trust only "
            "for a file you made yourself (or refit and save it as .skops)"
        )
    import joblib

    _old_module_names()
    try:
        return joblib.load(p)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in ("cuml", "cupy", "rmm", "cudf"):
            raise HeadError(
                f"{p} holds a cuML head: loading it needs cuML and an NVIDIA GPU ({exc.name} is "
                "not importable here)"
            ) from None
        raise HeadError(f"cannot load head file {p}: {type(exc).__name__}: {exc}") from None
    except Exception as exc:  # unpickling arbitrary bytes fails in many ways
        raise HeadError(f"cannot load head file {p}: {type(exc).__name__}: {exc}") from None


def _load_skops(p: Path) -> Any:
    import skops.io

    try:
        untrusted = skops.io.get_untrusted_types(file=p)
    except Exception as exc:  # not a zip, no schema, damaged...
        raise HeadError(
            f"{p} is not a skops head file ({type(exc).__name__}: {exc}); joblib heads must be "
            "named .joblib"
        ) from None
    _old_module_names(untrusted)
    foreign = [t for t in untrusted if not _trusted_class(t)]
    if foreign:
        raise HeadError(
            f"{p} holds types featurekit does not trust ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); refused, nothing in it was run"
        )
    try:
        return skops.io.load(p, trusted=untrusted)
    except Exception as exc:
        raise HeadError(f"cannot load head file {p}: {type(exc).__name__}: {exc}") from None


def _trusted_class(name: str) -> bool:
    """A class (not a function) defined under featurekit.heads, scikit-learn or numpy."""
    import importlib

    if not name.startswith(SKOPS_TRUSTED):
        return False
    module, _, attr = name.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except Exception:
        return False
    return isinstance(obj, type)


def check_provenance(saved: dict[str, Any], cache, layer: str) -> list[str]:
    """Keys whose values differ between a saved head and this cache's layer."""
    here = provenance_of(cache, layer)
    return [k for k in PROVENANCE_KEYS if saved.get(k) != here.get(k)]


def soft_differences(saved: dict[str, Any], cache, layer: str) -> list[str]:
    """How the cache's features were computed differently from the head's (precision, decode
    path): they move features by rounding only, so predict warns instead of refusing. Heads
    saved before these were recorded compare as equal."""
    here = provenance_of(cache, layer)
    saved = {**saved, "decode": canonical_decode(saved.get("decode"))}
    return [f"{k} {saved[k]} vs {here[k]}" for k in SOFT_PROVENANCE_KEYS
            if saved.get(k) is not None and here.get(k) is not None and saved[k] != here[k]]
