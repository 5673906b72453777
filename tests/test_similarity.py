"""featurekit similarity: linear CKA between the layers of two caches, streamed over row blocks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from featurekit.errors import CacheError
from featurekit.similarity import linear_cka, similarity
from tests.conftest import array_cache, invoke


def _pair(tmp_path, XA, XB, n_train=None):
    """Two caches of the same images (same splits and paths), features XA and XB."""
    n = len(XA)
    y = np.arange(n) % 3
    splits = {"train": n} if n_train is None else {"train": n_train, "test": n - n_train}
    a = array_cache(tmp_path / "a.h5", XA.astype(np.float32), y, splits)
    b = array_cache(tmp_path / "b.h5", XB.astype(np.float32), y, splits)
    return a, b


@pytest.mark.parametrize("d", [64, 2048])
def test_streamed_cka_equals_the_gram_formula(tmp_path, d):
    """n = 500 rows of ReLU-like features with large means (where a naive uncentred sum would
    cancel digits): the streamed CKA over blocks of 64 rows equals the reference formula within
    1e-6, and the in-memory (one block) result."""
    rng = np.random.default_rng(d)
    X = np.maximum(rng.normal(5, 1, size=(500, d)), 0)
    Y = np.maximum(X[:, : d // 2] @ rng.normal(size=(d // 2, 48)) + rng.normal(size=(500, 48)), 0)
    a, b = _pair(tmp_path, X, Y, n_train=400)
    ref = linear_cka(X.astype(np.float32), Y.astype(np.float32))  # the values the caches hold
    streamed = similarity(a, b, block_rows=64, device="cpu")
    whole = similarity(a, b, block_rows=10_000, device="cpu")
    assert streamed["rows"] == 500 and streamed["splits"] == {"train": 400, "test": 100}
    assert abs(streamed["cka"][0][0] - ref) < 1e-6, (streamed["cka"][0][0], ref)
    assert abs(streamed["cka"][0][0] - whole["cka"][0][0]) < 1e-9


def test_cka_is_one_for_the_same_rotated_or_scaled_representation(tmp_path):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 32))
    Q, _ = np.linalg.qr(rng.normal(size=(32, 32)))
    for k, Y in enumerate((X, X @ Q, 3.5 * X)):
        (tmp_path / str(k)).mkdir()
        a, b = _pair(tmp_path / str(k), X, Y)
        assert abs(similarity(a, b, device="cpu")["cka"][0][0] - 1) < 1e-6
    a, b = _pair(tmp_path, X, rng.normal(size=(300, 32)))
    assert similarity(a, b, device="cpu")["cka"][0][0] < 0.3  # unrelated


def test_the_command_writes_its_files_and_refuses_caches_without_shared_images(tmp_path, digits_cache, runner):
    out = tmp_path / "cka"
    r = invoke(runner, "similarity", digits_cache, digits_cache, "--out", out, "--json")
    assert r.exit_code == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["rows"] == 1797 and result["layers_a"] == ["penultimate", "layer3"]
    assert abs(result["same_layer"]["penultimate"] - 1) < 1e-6
    assert {p.name for p in out.iterdir()} == {"similarity.csv", "similarity.json", "similarity.png"}
    r = invoke(runner, "similarity", digits_cache, digits_cache, "--out", out)
    assert r.exit_code == 2 and "--overwrite" in r.stderr and r.stderr.count("\n") == 1
    rng = np.random.default_rng(0)
    other = array_cache(tmp_path / "o.h5", rng.normal(size=(150, 8)).astype(np.float32),
                        np.arange(150) % 3, {"train": 150})
    r = invoke(runner, "similarity", digits_cache, other)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "share 0 image(s)" in r.stderr, r.stderr
    with pytest.raises(CacheError, match="no layer 'layer9'"):
        similarity(digits_cache, digits_cache, layers="layer9")


@pytest.mark.parametrize("which", [0, 1])
def test_a_missing_or_junk_cache_is_one_line(tmp_path, digits_cache, runner, which):
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"\x89HDF\r\n" + bytes(range(256)) * 8)
    for bad in (tmp_path / "missing.h5", junk):
        args = [digits_cache, digits_cache]
        args[which] = bad
        r = invoke(runner, "similarity", *args, "--out", tmp_path / "o")
        assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / "o").exists()
    r = invoke(runner, "similarity", digits_cache, digits_cache, "--layers", " , ")
    assert r.exit_code == 2 and "--layers is empty" in r.stderr
