"""featurekit sparsity: exact numbers on a crafted model, streaming, CLI, agreement with extract."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from featurekit.sparsity import ChannelStats, collect, sparsity
from tests.conftest import TINY, invoke


class Crafted(nn.Module):
    """A fixed linear layer + ReLU: every activation is known in advance."""

    def __init__(self) -> None:
        super().__init__()
        lin = nn.Linear(3, 4, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.tensor([[1.0, 0, 0], [-1, 0, 0], [0, 1, 0], [0, 0, -1]]))
        self.layer1 = nn.Sequential(lin, nn.ReLU())

    def forward(self, x):
        return self.layer1(x)


def test_crafted_model_exact_fractions():
    # outputs: [1, 2, 3] -> relu([1, -1, 2, -3]) = [1, 0, 2, 0]; [-1, 0, 5] -> [0, 1, 0, 0]
    x = torch.tensor([[1.0, 2, 3], [-1, 0, 5]])
    r = collect(Crafted(), [x], {"layer1": "layer1"})["layer1"]
    assert r["zero_fraction"] == 5 / 8
    assert r["dead_channel_fraction"] == 1 / 4  # only channel 3 is zero on every sample
    assert r["mean_activation"] == 4 / 8
    # the dead-channel rule follows the threshold: at 50%, every channel here is "dead"
    r50 = collect(Crafted(), [x], {"layer1": "layer1"}, dead_threshold=0.5)["layer1"]
    assert r50["dead_channel_fraction"] == 1.0


def test_spatial_maps_count_every_position():
    t = torch.ones(2, 3, 4, 5)
    t[:, 0] = 0  # channel 0 dead everywhere
    t[0, 1, 0, 0] = 0  # channel 1: one zero among 2 x 20 positions
    s = ChannelStats()
    s.update(t)
    r = s.result()
    assert r["zero_fraction"] == (40 + 1) / 120
    assert r["dead_channel_fraction"] == 1 / 3
    assert r["channels"] == 3


def test_streaming_equals_whole_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(103, 3, generator=g)
    whole = collect(Crafted(), [x], {"layer1": "layer1"})["layer1"]
    streamed = collect(Crafted(), list(x.split(7)), {"layer1": "layer1"})["layer1"]
    assert whole["zero_fraction"] == streamed["zero_fraction"]
    assert whole["dead_channel_fraction"] == streamed["dead_channel_fraction"]
    assert whole["mean_activation"] == pytest.approx(streamed["mean_activation"], rel=1e-12)


def test_acceptance_json_shape(runner):
    r = invoke(runner, "sparsity", "digits", "--model", "resnet18", "--weights", "none",
               "--image-size", "32", "--json", "--no-progress", "--max-images", "150")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert set(d) == {"weights", "layers"} and d["weights"] == ["none"]
    assert [x["layer"] for x in d["layers"]] == ["layer1", "layer2", "layer3", "layer4"]
    for x in d["layers"]:
        assert set(x) == {"layer", "zero_fraction", "dead_channel_fraction", "mean_activation"}
        assert 0.0 < x["zero_fraction"]["none"] < 1.0
        assert 0.0 <= x["dead_channel_fraction"]["none"] <= 1.0


def test_compare_a_checkpoint_writes_two_columns(tmp_path, image_folder, runner):
    from featurekit.finetune import finetune

    finetune(image_folder, tmp_path / "run", model="resnet18", weights="none", image_size=32,
             device="cpu", workers=0, batch_size=8, epochs=1, progress=False, log=lambda *a: None)
    ckpt = str(tmp_path / "run" / "best.pt")
    out = tmp_path / "sp"
    r = invoke(runner, "sparsity", image_folder, *TINY, "--compare", ckpt, "--blocks",
               "--out", out, "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["weights"] == ["none", ckpt]
    names = [x["layer"] for x in d["layers"]]
    assert names[:3] == ["layer1.0", "layer1.1", "layer1"] and len(names) == 12
    assert all(set(x["zero_fraction"]) == {"none", ckpt} for x in d["layers"])
    for name in ("sparsity.csv", "sparsity.json", "sparsity.png"):
        assert (out / name).stat().st_size > 0
    assert d["files"] == {name: str(out / name) for name in ("sparsity.csv", "sparsity.json", "sparsity.png")}
    assert json.loads((out / "sparsity.json").read_text()) == {k: v for k, v in d.items() if k != "files"}
    from PIL import Image

    px = np.asarray(Image.open(out / "sparsity.png").convert("RGB")).reshape(-1, 3).astype(int)
    for colour in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):  # one bar colour per weights
        assert (np.abs(px - colour).sum(1) < 10).sum() > 50
    # without --out nothing is written
    r = invoke(runner, "sparsity", image_folder, *TINY, "--layers", "layer4")
    assert r.exit_code == 0 and "layer4" in r.stdout


def test_extract_records_the_same_zero_fraction(tmp_path, image_folder):
    from featurekit.cache import open_cache
    from featurekit import extract

    extract(image_folder, tmp_path / "c.h5", model="resnet18", weights="none", image_size=32,
            layers="layer2,layer4,penultimate", device="cpu", workers=0, progress=False,
            val_fraction=0, test_fraction=0)
    d = sparsity(image_folder, model="resnet18", weights="none", image_size=32,
                 layers="layer2,layer4,penultimate", device="cpu", workers=0, progress=False,
                 val_fraction=0, test_fraction=0, split="train")
    with open_cache(tmp_path / "c.h5") as c:
        recorded = c.attrs["zero_fraction"]
    for row in d["layers"]:
        assert row["zero_fraction"]["none"] == pytest.approx(recorded[row["layer"]], abs=1e-12)


def test_bad_input(tmp_path, image_folder, runner):
    r = invoke(runner, "sparsity", image_folder, *TINY, "--layers", "layer7")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "unknown layer 'layer7'" in r.stderr
    r = invoke(runner, "sparsity", tmp_path / "none", *TINY)
    assert r.exit_code == 2 and "source not found" in r.stderr
    r = invoke(runner, "sparsity", image_folder, *TINY, "--compare", tmp_path / "missing.pt")
    assert r.exit_code == 2 and "weights file not found" in r.stderr
    r = invoke(runner, "sparsity", image_folder, *TINY, "--dead-threshold", "0")
    assert r.exit_code == 2 and "--dead-threshold" in r.stderr
    r = invoke(runner, "sparsity", image_folder, *TINY, "--split", "holdout")
    assert r.exit_code == 2 and "no split 'holdout'" in r.stderr


def test_compared_weights_share_one_decoding_pass(tmp_path, image_folder, monkeypatch):
    """Weights with the same preprocessing are measured in one pass over the images: each image
    is decoded once, and every column equals that weights measured alone."""
    from torchvision.models import resnet18

    from featurekit import _decode

    torch.manual_seed(5)
    other = tmp_path / "other.pt"
    torch.save(resnet18().state_dict(), other)
    kw = dict(model="resnet18", image_size=32, device="cpu", workers=0, progress=False,
              layers="layer2,layer4", split="train", val_fraction=0, test_fraction=0)
    alone = {w: sparsity(image_folder, weights=w, **kw) for w in ("none", str(other))}
    calls = []
    real = _decode.CpuDataset.__getitem__
    monkeypatch.setattr(_decode.CpuDataset, "__getitem__",
                        lambda self, i: (calls.append(i), real(self, i))[1])
    both = sparsity(image_folder, weights="none", compare=[str(other)], **kw)
    assert sorted(calls) == list(range(18))  # 18 images, each decoded once
    for row in both["layers"]:
        for w, result in alone.items():
            (ref,) = [r for r in result["layers"] if r["layer"] == row["layer"]]
            for key in ("zero_fraction", "dead_channel_fraction", "mean_activation"):
                assert row[key][w] == pytest.approx(ref[key][w], rel=1e-12)
    assert both["layers"][0]["zero_fraction"]["none"] != both["layers"][0]["zero_fraction"][str(other)]


def test_blocks_need_one_model(tmp_path, image_folder, runner):
    from featurekit.finetune import finetune

    finetune(image_folder, tmp_path / "run", model="resnet34", weights="none", image_size=32,
             device="cpu", workers=0, batch_size=8, epochs=1, progress=False, log=lambda *a: None)
    ckpt = tmp_path / "run" / "best.pt"  # a checkpoint names its model: resnet34
    r = invoke(runner, "sparsity", image_folder, *TINY, "--compare", ckpt)  # TINY: --model resnet18
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "a resnet34 checkpoint, not resnet18" in r.stderr  # refused, as extract refuses it
    untied = [a for a in TINY if a not in ("--model", "resnet18")]  # each weights its own model
    r = invoke(runner, "sparsity", image_folder, *untied, "--compare", ckpt, "--blocks")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "same model" in r.stderr, r.stderr
    assert "resnet50, resnet34" in r.stderr
    r = invoke(runner, "sparsity", image_folder, *untied, "--compare", ckpt, "--json")
    assert r.exit_code == 0, r.stderr  # stage by stage, different models compare fine
