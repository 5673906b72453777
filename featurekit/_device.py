"""Devices and numeric precision: the one place a ``--device``/``--precision`` is resolved and a
precision becomes an autocast (extract, sparsity, finetune and the torch heads share them)."""

from __future__ import annotations

import os
from pathlib import Path

from featurekit.errors import DeviceError, FeaturekitError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def on_cuda(device: str) -> bool:
    return device.startswith("cuda")


def resolve_device(spec: str, option: str = "--device") -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; a CUDA device that is absent is an
    error (:class:`DeviceError`, naming ``option``)."""
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return "cpu"
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"{option} {spec}: no CUDA device is available; use {option} cpu")
        index = spec.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise DeviceError(
                f"{option} {spec}: no such CUDA device ({torch.cuda.device_count()} present)"
            )
        return spec
    raise DeviceError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N")


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` -> bf16 on CUDA, fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise FeaturekitError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if on_cuda(device) else "fp32"
    return precision


def autocast(device: str, precision: str):
    """``torch.autocast`` for a pass in ``precision`` on ``device`` (disabled for fp32)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.split(":")[0], dtype=dtype or torch.float32,
                          enabled=dtype is not None)


def compile_cache_dir() -> Path:
    """Where ``--compile`` keeps torch inductor's cache unless $TORCHINDUCTOR_CACHE_DIR names
    another: $XDG_CACHE_HOME/featurekit/inductor (~/.cache/featurekit/inductor)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base, "featurekit", "inductor")


def compile_module(fn):
    """``torch.compile(fn)`` with inductor's compiled kernels and graphs kept across runs
    (torch's default is under /tmp, often lost): a second run of the same model and batch size
    skips most of the compilation."""
    import torch

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache_dir()))
    return torch.compile(fn)
