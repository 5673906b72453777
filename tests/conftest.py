"""Shared fixtures: tiny image folders made on the fly, a CLI runner, small caches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from featurekit.cli import app


def make_image(path: Path, rng: np.random.Generator, size=(48, 40), fmt: str | None = None) -> Path:
    """A smooth random colour image (compresses like a photo, unlike white noise)."""
    w, h = size
    base = rng.uniform(0, 255, size=(3, 3, 3))
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.empty((h, w, 3))
    for c in range(3):
        img[..., c] = (base[0, c, 0] * xx / w + base[1, c, 1] * yy / h + base[2, c, 2]) / 2
    img += rng.normal(0, 8, size=img.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, format=fmt)
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """ROOT/<class>/<img>: 3 classes x 6 images, mixed JPEG and PNG, mixed sizes."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for ci, cls in enumerate(["cat", "dog", "owl"]):
        for i in range(6):
            ext = ".png" if i % 3 == 0 else ".jpg"
            make_image(root / cls / f"{cls}_{i}{ext}", rng, size=(40 + 8 * i, 36 + 4 * ci))
    return root


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, *args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


TINY = ["--model", "resnet18", "--weights", "none", "--image-size", "32", "--device", "cpu",
        "--workers", "0", "--no-progress"]


DIGITS = dict(model="resnet18", weights="none", image_size=32, device="cpu", workers=0,
              progress=False)


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory) -> Path:
    """The test run's one digits cache (untrained resnet18 at 32 px; penultimate and layer3;
    1,797 rows: train/val/test 1,259/269/269). Shared: read it, never change it (copy it to
    damage it)."""
    from featurekit import extract

    out = tmp_path_factory.mktemp("digits") / "digits.h5"
    extract("digits", out, layers="penultimate,layer3", **DIGITS)
    return out
