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


def array_cache(path: Path, X: np.ndarray, y: np.ndarray, splits: dict[str, int],
                layer: str = "penultimate") -> Path:
    """A complete featurekit cache of given feature rows (no backbone): the first rows are
    train, then the others, ``splits`` giving each split's size; for tests of the heads on
    data made to order."""
    from featurekit.cache import from_arrays

    return from_arrays(path, X, y, splits, layer=layer)


@pytest.fixture(scope="session")
def slow_linearsvc_cache(tmp_path_factory) -> Path:
    """Rows of a few underlying factors plus noise, more dims than rows, noisy labels: where
    liblinear's dual solver stops at max_iter for C >= 1 (about 1-2 s a fit)."""
    rng = np.random.default_rng(0)
    n, d, r = 320, 400, 10
    Z = rng.normal(size=(n, r))
    X = (Z @ rng.normal(size=(r, d)) + 0.05 * rng.normal(size=(n, d))).astype(np.float32)
    y = (Z[:, 0] > 0).astype(int) + (Z[:, 1] > 0.5)
    flip = rng.random(n) < 0.2
    y[flip] = rng.integers(0, 3, int(flip.sum()))
    return array_cache(tmp_path_factory.mktemp("slow") / "slow.h5", X, y,
                       {"train": 200, "val": 60, "test": 60})
