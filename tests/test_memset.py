"""Fine-tuning sets decoded once into memory: the same images as the per-image path, the
small-image shift as RandomCrop(padding, reflect) draws it, and the DataLoader path where a
set does not fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featurekit import _memset
from featurekit.models import default_preprocess


def _images(n=6, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_each_shift_is_a_reflect_padded_crop_and_every_offset_occurs():
    x = _images(16, size=12)
    d = _memset.Decoded(x, torch.zeros(len(x), dtype=torch.long), (0.5,) * 3, (0.5,) * 3, pad=4)
    padded = torch.nn.functional.pad(x.float(), (4, 4, 4, 4), mode="reflect")
    seen = set()
    torch.manual_seed(0)
    for _ in range(80):  # 1,280 draws over 81 offsets
        out = d.shifted(x)
        assert out.dtype == torch.uint8 and out.shape == x.shape
        for i in range(len(x)):
            hits = [(dy, dx) for dy in range(9) for dx in range(9)
                    if torch.equal(padded[i, :, dy:dy + 12, dx:dx + 12].to(torch.uint8), out[i])]
            assert hits, "not a crop of the reflect-padded image"
            seen.update(hits)
    assert seen == {(dy, dx) for dy in range(9) for dx in range(9)}  # uniform over 0..2p


def test_unshifted_batches_are_the_per_image_preprocessing():
    """Decoded once as uint8, then scaled and normalised by the batch: the same tensors as
    the per-image transform (resize, crop, scale, normalise)."""
    from PIL import Image

    pre = default_preprocess("resnet18")
    pre = type(pre)(**{**pre.__dict__, "resize_size": 36, "crop_size": 32})
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (40, 44, 3), dtype=np.uint8)) for _ in range(5)]

    class Items:
        def __init__(self, transform):
            self.t = transform

        def __len__(self):
            return len(imgs)

        def __getitem__(self, i):
            return self.t(imgs[i]), i

    d = _memset.Decoded.build(Items(pre.transform(as_uint8=True)), "cpu", 0, pre.mean, pre.std, pad=4)
    (x, y), = d.batches(list(range(5)), 8, train=False)
    ref = torch.stack([pre.transform()(im) for im in imgs])
    assert torch.allclose(x, ref, atol=1e-6) and y.tolist() == list(range(5))
    assert x.is_contiguous(memory_format=torch.channels_last)
    batches = list(d.batches([4, 0, 2, 1, 3], 2, train=True, drop_last=True))
    assert [b[1].tolist() for b in batches] == [[4, 0], [2, 1]]


@pytest.mark.parametrize("fits", [True, False])
def test_finetune_runs_on_either_path_and_resumes_alike(tmp_path, monkeypatch, fits):
    """With the set in memory or through the DataLoader: a run stopped after epoch 1 and
    resumed ends with the weights of an uninterrupted one (seeded, CPU)."""
    from featurekit.finetune import finetune, load_checkpoint

    monkeypatch.setattr(_memset, "fits", lambda n, size, device: fits)
    kw = dict(model="resnet18", weights="none", image_size=32, device="cpu", workers=0,
              batch_size=32, progress=False, val_fraction=0.5, test_fraction=0.2)
    from tests.conftest import make_image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for i in range(12):
            make_image(tmp_path / "imgs" / c / f"{i}.png", rng, size=(36, 36))
    import featurekit.finetune as ft

    finetune(tmp_path / "imgs", tmp_path / "whole", epochs=2, **kw)
    real = ft._record

    def stop_after_first(run, backbone, net, opt, sched, state, row):
        real(run, backbone, net, opt, sched, state, row)
        raise KeyboardInterrupt  # as if stopped once epoch 1 was committed

    monkeypatch.setattr(ft, "_record", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        finetune(tmp_path / "imgs", tmp_path / "cut", epochs=2, **kw)
    monkeypatch.setattr(ft, "_record", real)
    finetune(tmp_path / "imgs", tmp_path / "cut", epochs=2, resume=True, **kw)
    a = load_checkpoint(tmp_path / "whole" / "last.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "cut" / "last.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
