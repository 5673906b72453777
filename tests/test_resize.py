"""Batch-level resize + centre crop (featurekit._resize): equal to torchvision's resize and
center_crop of each image, to float rounding, for every interpolation torch tensors have."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from featurekit._resize import padded, resize_crop

MODES = [("bilinear", True), ("bilinear", False), ("bicubic", True), ("bicubic", False),
         ("nearest", False), ("nearest-exact", False)]


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    sizes = [tuple(int(v) for v in torch.randint(5, 90, (2,), generator=g)) for _ in range(24)]
    sizes += [(32, 32), (64, 48), (20, 100), (100, 20), (16, 16), (28, 28)]
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]


@pytest.mark.parametrize("mode,antialias", MODES)
@pytest.mark.parametrize("size,crop", [(32, 28), (24, 24), (20, 32), (64, 56)])
def test_equals_torchvision_per_image(images, mode, antialias, size, crop):
    """Shrinking and enlarging, crops inside and (20 -> 32) outside the resized image."""
    got = resize_crop(images, size, crop, mode, antialias, pixels=20_000)  # several chunks
    assert got.shape == (len(images), 3, crop, crop)
    for k, x in enumerate(images):
        ref = F.resize(x.float()[None], [size], interpolation=InterpolationMode(mode),
                       antialias=antialias)
        ref = F.center_crop(ref, [crop])[0]
        tol = 0 if mode.startswith("nearest") else 2e-3  # 0..255 values
        assert (ref - got[k]).abs().max() <= tol, (k, tuple(x.shape))


def test_padded_keeps_every_pixel_and_zero_fills(images):
    x = padded(images[:5])
    h = max(t.shape[-2] for t in images[:5])
    w = max(t.shape[-1] for t in images[:5])
    assert x.shape == (5, 3, h, w) and x.dtype == torch.float32
    for k, t in enumerate(images[:5]):
        assert torch.equal(x[k, :, : t.shape[-2], : t.shape[-1]], t.float())
        assert x[k, :, t.shape[-2]:, :].abs().sum() == 0 and x[k, :, :, t.shape[-1]:].abs().sum() == 0


def test_unknown_interpolation_is_refused(images):
    with pytest.raises(ValueError, match="lanczos"):
        resize_crop(images[:2], 32, 28, "lanczos", True)


def test_chunks_bound_the_padded_buffer_and_keep_the_order():
    from featurekit._resize import _chunks

    shapes = [(10, 10), (4000, 3000), (12, 9), (11, 11), (9, 12)]
    order = sorted(range(5), key=lambda k: shapes[k][0] * shapes[k][1])
    chunks = _chunks(order, shapes, pixels=500)
    assert sorted(k for c in chunks for k in c) == list(range(5))
    assert [1] in chunks  # the huge one alone, not padding the others to its size
    for c in chunks:
        if len(c) > 1:
            assert len(c) * max(shapes[k][0] for k in c) * max(shapes[k][1] for k in c) <= 500


def test_float16_products_stay_within_a_fraction_of_a_grey_level(images):
    """The GPU's bf16/fp16 passes resize with float16 matrix products (tensor cores): within
    0.1 of a grey level of float32 on average, under one level everywhere."""
    ref = resize_crop(images, 32, 28, "bilinear", True)
    half = resize_crop(images, 32, 28, "bilinear", True, dtype=torch.float16)
    assert half.dtype == torch.float32 and half.shape == ref.shape
    err = (half - ref).abs()
    assert err.max() < 1.0 and err.mean() < 0.1, (err.max(), err.mean())
