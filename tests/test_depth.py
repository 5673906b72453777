"""Accuracy by depth: spatial-grid pooling of early layers, bench over several caches with
--layers all and its depth plot."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest
import torch

from featurekit import extract
from featurekit.models import pooled
from tests.conftest import DIGITS, array_cache, invoke


def test_grid_pooling_is_the_mean_of_each_cell_channel_major():
    t = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    v = pooled(t, "avg2")
    assert v.shape == (2, 3 * 4)
    for c in range(3):
        for i in range(2):
            for j in range(2):
                cell = t[:, c, 2 * i:2 * i + 2, 3 * j:3 * j + 3].mean(dim=(1, 2))
                assert torch.allclose(v[:, c * 4 + i * 2 + j], cell)
    assert pooled(t, "avg3").shape == (2, 27)
    one = torch.rand(2, 5, 1, 1)  # a map smaller than the grid: its cells repeat
    assert torch.allclose(pooled(one, "avg3"), one.flatten(1).repeat_interleave(9, dim=1))
    assert torch.allclose(pooled(t, "avg"), t.mean(dim=(2, 3)))


def test_extract_writes_grid_pooled_layers_of_documented_width(tmp_path, runner):
    out = tmp_path / "g.h5"
    extract("digits", out, layers="layer1,layer2,penultimate", pool="avg3", **DIGITS)
    with h5py.File(out) as f:  # resnet18: 64 and 128 channels x 9 cells; penultimate stays 512
        assert f["train"]["features"]["layer1"].shape[1] == 576
        assert f["train"]["features"]["layer2"].shape[1] == 1152
        assert f["train"]["features"]["penultimate"].shape[1] == 512
        assert f.attrs["pool"] == "avg3"
    r = invoke(runner, "extract", "digits", "--out", tmp_path / "x.h5", "--pool", "avg5",
               "--weights", "none")
    assert r.exit_code == 2 and "unknown pool 'avg5'" in r.stderr and not (tmp_path / "x.h5").exists()


@pytest.fixture(scope="module")
def second_digits(tmp_path_factory):
    """The digits with other (seed 1) random weights: the same images, classes and model."""
    out = tmp_path_factory.mktemp("digits-b") / "digits-b.h5"
    extract("digits", out, layers="penultimate,layer3", seed=1, **DIGITS)
    return out


def test_bench_over_caches_by_depth(digits_cache, second_digits, tmp_path, runner):
    r = invoke(runner, "bench", digits_cache, second_digits, "--heads", "logistic:torch,knn:torch",
               "--layers", "all", "--out", tmp_path / "b", "--no-progress", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    got = [(x["cache"], x["layer"], x["head"]) for x in res["results"]]
    assert got == [(c, layer, h) for c in ("digits.h5", "digits-b.h5")
                   for layer in ("layer3", "penultimate") for h in ("logistic", "knn")]
    assert all(x["status"] == "ok" for x in res["results"])
    with open(tmp_path / "b" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["cache"] for row in rows] == [x["cache"] for x in res["results"]]
    assert (tmp_path / "b" / "depth.png").stat().st_size > 10_000
    assert "| digits-b.h5 | knn |" in (tmp_path / "b" / "results.md").read_text()
    # one cache alone: the same numbers as in the pair (each cache under the same protocol)
    alone = json.loads(invoke(runner, "bench", second_digits, "--heads", "knn:torch", "--layers",
                              "penultimate", "--json").stdout)["results"][0]
    pair = [x for x in res["results"] if x["cache"] == "digits-b.h5" and x["head"] == "knn"][-1]
    assert alone["accuracy"] == pair["accuracy"] and alone["params"] == pair["params"]


def test_bench_refuses_caches_of_other_classes_or_models(digits_cache, tmp_path, runner):
    rng = np.random.default_rng(0)
    other = array_cache(tmp_path / "three.h5", rng.normal(size=(90, 8)).astype(np.float32),
                        np.arange(90) % 3, {"train": 60, "test": 30})
    r = invoke(runner, "bench", digits_cache, other, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "holds other classes" in r.stderr and r.stderr.count("\n") == 1
    renamed = tmp_path / "renamed.h5"
    renamed.write_bytes(digits_cache.read_bytes())
    with h5py.File(renamed, "a") as f:
        f.attrs["model"] = "resnet50"
    r = invoke(runner, "bench", digits_cache, renamed, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "holds other model" in r.stderr, r.stderr
    X, y = rng.normal(size=(90, 8)).astype(np.float32), np.arange(90) % 3
    with_val = array_cache(tmp_path / "v.h5", X, y, {"train": 50, "val": 20, "test": 20})
    r = invoke(runner, "bench", other, with_val, "--out", tmp_path / "o")  # val chooses in one only
    assert r.exit_code == 2 and "holds other splits" in r.stderr and "one protocol" in r.stderr
    assert not (tmp_path / "o").exists()


def test_layers_all_is_every_layer_shallow_first():
    from featurekit.models import parse_layers

    assert parse_layers("all") == ["layer1", "layer2", "layer3", "layer4", "penultimate"]
    assert parse_layers("layer3,penultimate") == ["layer3", "penultimate"]
