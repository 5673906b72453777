"""Nothing silently wrong: finite features only, synced commits, a changed source refused on
resume, bounded solvers."""

from __future__ import annotations

import os
import shutil
import stat

import h5py
import numpy as np
import pytest
import torch

from featurekit import extract
from featurekit.cache import open_cache
from featurekit.errors import CacheError
from tests.conftest import TINY, invoke


def test_a_float16_overflow_is_refused_before_anything_is_committed(tmp_path, image_folder, runner):
    """Activations past float16's 65,504 would be stored as infinity: refused with one line
    (use float32); the same weights in float32 extract."""
    from torchvision.models import resnet18

    torch.manual_seed(0)
    state = resnet18().state_dict()
    state["layer4.1.bn2.weight"] *= 1e7  # the last block's output, so penultimate, past 65,504
    torch.save(state, tmp_path / "loud.pt")
    args = [a for a in TINY if a not in ("--weights", "none")]
    out = tmp_path / "c16.h5"
    r = invoke(runner, "extract", image_folder, "--out", out, *args, "--weights", tmp_path / "loud.pt",
               "--dtype", "float16")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "past --dtype float16's largest value 65504; use --dtype float32" in r.stderr
    with h5py.File(out, "r") as f:  # nothing committed; the cache says it is incomplete
        assert not f.attrs["complete"] and all(int(f[s].attrs["rows"]) == 0 for s in f)
    r = invoke(runner, "extract", image_folder, "--out", tmp_path / "c32.h5", *args, "--weights",
               tmp_path / "loud.pt")
    assert r.exit_code == 0, r.stderr
    with open_cache(tmp_path / "c32.h5") as c:
        assert c.features("train", "penultimate").max() > 65504


def test_non_finite_rows_are_refused_by_every_reader(digits_cache, tmp_path, runner):
    """A cache with a NaN row (written by hand) is data no reader returns: open_cache's
    features, fit, bench, predict and pack each stop with one line naming the split, layer
    and row."""
    head = tmp_path / "h.skops"
    assert invoke(runner, "fit", digits_cache, "--head", "logistic", "--C", "1", "--out", head).exit_code == 0
    bad = tmp_path / "nan.h5"
    shutil.copy(digits_cache, bad)
    with h5py.File(bad, "a") as f:
        f["test/features/penultimate"][7, 3] = np.nan
        f["train/features/penultimate"][2, 0] = np.inf
    with open_cache(bad) as c, pytest.raises(CacheError, match="'train', layer 'penultimate'.*rows 2"):
        c.features("train", "penultimate")
    for args in (["fit", bad, "--head", "logistic", "--out", tmp_path / "h2.skops"],
                 ["bench", bad, "--heads", "logistic"],
                 ["predict", head, bad, "--out", tmp_path / "p.csv"],
                 ["pack", bad, "--out", tmp_path / "packed.h5"]):
        r = invoke(runner, *args)
        assert r.exit_code == 2 and r.stderr.count("\n") == 1, (args, r.stderr)
        assert "NaN or infinite" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "packed.h5").exists() and not (tmp_path / "p.csv").exists()
    with open_cache(bad) as c:  # the layer3 rows are fine and still read
        assert np.isfinite(c.features("train", "layer3")).all()


def test_commits_and_renames_reach_the_disk(tmp_path, image_folder, monkeypatch):
    """fsync of the cache file at each commit and at the finish, of the new file before its
    rename and of its folder after it (counted by wrapping os.fsync)."""
    synced: list[tuple[bool, int]] = []
    real = os.fsync

    def counting(fd):
        st = os.fstat(fd)
        synced.append((stat.S_ISDIR(st.st_mode), st.st_ino))
        return real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    out = tmp_path / "c.h5"
    extract(image_folder, out, model="resnet18", weights="none", image_size=32, device="cpu",
            workers=0, progress=False, commit_seconds=0, batch_size=4)
    cache = out.stat().st_ino
    assert sum(1 for is_dir, ino in synced if ino == cache and not is_dir) >= 4  # commits + finish
    assert (True, tmp_path.stat().st_ino) in synced  # the folder, after the rename into it
    synced.clear()
    from featurekit._outputs import write_text

    write_text(tmp_path / "x.txt", "x")
    assert synced == [(False, (tmp_path / "x.txt").stat().st_ino), (True, tmp_path.stat().st_ino)]


def test_finetune_resume_refuses_a_changed_source(tmp_path, image_folder, runner):
    """An image added after the first epoch: --resume stops with one line, last.pt untouched."""
    src = tmp_path / "source"
    shutil.copytree(image_folder, src)
    base = [*TINY, "--batch-size", "8"]
    r = invoke(runner, "finetune", src, "--out", tmp_path / "run", *base, "--epochs", "1")
    assert r.exit_code == 0, r.stderr
    last = (tmp_path / "run" / "last.pt").read_bytes()
    shutil.copy(src / "cat" / "cat_1.jpg", src / "cat" / "cat_new.jpg")
    r = invoke(runner, "finetune", src, "--out", tmp_path / "run", *base, "--epochs", "2", "--resume")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "source changed" in r.stderr, r.stderr
    assert (tmp_path / "run" / "last.pt").read_bytes() == last


def test_the_torch_svm_stops_at_an_iteration_bound():
    """max_iter < 0 is libsvm's bound (max(10^7, 100 l)), not an endless loop; a fit that
    reaches its bound says so in one ConvergenceWarning and converged_ is False."""
    import warnings

    from sklearn.datasets import make_classification
    from sklearn.exceptions import ConvergenceWarning

    from featurekit.heads._torch._svm import TorchSVMHead, iteration_limit

    assert iteration_limit(-1, 50) == 10_000_000 and iteration_limit(-1, 200_000) == 20_000_000
    assert iteration_limit(7, 10**6) == 7
    X, y = make_classification(200, 10, random_state=0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        head = TorchSVMHead(C=100.0, max_iter=3).fit(X, y)
    assert not head.converged_
    lines = [str(w.message) for w in seen if issubclass(w.category, ConvergenceWarning)]
    assert len(lines) == 1 and "iteration limit" in lines[0] and "\n" not in lines[0]


def _flip(path, dataset: str, chunk: int = 0) -> None:
    """XOR 16 bytes in the middle of one chunk of ``dataset``, on disk (a bad sector)."""
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(chunk)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        raw = fh.read(16)
        fh.seek(info.byte_offset + info.size // 2)
        fh.write(bytes(b ^ 0xFF for b in raw))


@pytest.mark.parametrize("dataset,what", [("train/features/penultimate", "features of split 'train'"),
                                          ("train/labels", "labels of split 'train'"),
                                          ("train/paths", "paths of split 'train'")])
def test_a_damaged_chunk_is_refused_by_every_reader(digits_cache, tmp_path, runner, dataset, what):
    """16 bytes flipped in one chunk: info, info --verify, fit, bench, predict, pack and
    open_cache each stop with one line naming the file and what is damaged; nothing is
    written from it."""
    head = tmp_path / "h.skops"
    assert invoke(runner, "fit", digits_cache, "--head", "logistic", "--C", "1", "--out", head).exit_code == 0
    bad = tmp_path / "bad.h5"
    shutil.copy(digits_cache, bad)
    _flip(bad, dataset)
    for args in (["info", bad], ["info", bad, "--verify"],
                 ["fit", bad, "--head", "logistic", "--C", "1", "--out", tmp_path / "h2.skops"],
                 ["bench", bad, "--heads", "logistic", "--out", tmp_path / "b"],
                 ["predict", head, bad, "--split", "train", "--out", tmp_path / "p.csv"],
                 ["pack", bad, "--out", tmp_path / "packed.h5"]):
        r = invoke(runner, *args)
        assert r.exit_code == 2 and r.stderr.count("\n") == 1, (args, r.stderr)
        assert "bad.h5 is damaged: its " + what in r.stderr and "Traceback" not in r.stderr, r.stderr
    for made in ("h2.skops", "b", "p.csv", "packed.h5"):
        assert not (tmp_path / made).exists()
    with open_cache(bad) as c, pytest.raises(CacheError, match="is damaged: its " + what):
        c.features("train", "penultimate"), c.labels("train")


def test_changed_path_text_is_caught_by_its_checksum(digits_cache, tmp_path, runner):
    """A path's text lives outside the chunks (HDF5 strings cannot be filtered): its CRC-32,
    committed with the rows, catches a change there; readers of that split's rows refuse (fit
    on train and test reads no val row and works)."""
    bad = tmp_path / "text.h5"
    shutil.copy(digits_cache, bad)
    with h5py.File(bad, "a") as f:
        f["val/paths"][3] = "8/elsewhere.png"
    head = tmp_path / "h.skops"
    assert invoke(runner, "fit", bad, "--head", "logistic", "--C", "1", "--out", head).exit_code == 0
    for args in (["info", bad], ["predict", head, bad, "--split", "val", "--out", tmp_path / "p.csv"]):
        r = invoke(runner, *args)
        assert r.exit_code == 2 and "its paths of split 'val' do not match their checksum" in r.stderr, r.stderr
    with open_cache(bad) as c:
        assert len(c.labels("train")) == 1259  # the other splits still read
        with pytest.raises(CacheError, match="paths of split 'val'"):
            c.features("val", "layer3")


def test_info_reports_checksums_and_pack_adds_them_to_an_old_cache(digits_cache, tmp_path, runner):
    """info says intact (or, for a cache written before checksums, that it has none); pack
    writes a checksummed copy of an old cache, whose data is unchanged."""
    r = invoke(runner, "info", digits_cache)
    assert r.exit_code == 0 and "integrity: intact (fletcher32+crc32" in r.stdout, r.stdout
    old = tmp_path / "old.h5"
    with h5py.File(digits_cache, "r") as src, h5py.File(old, "w", libver=("v108", "v108")) as dst:
        for key, value in src.attrs.items():
            if key != "checksums":
                dst.attrs[key] = value
        def copy(name, obj):
            if isinstance(obj, h5py.Dataset):  # as featurekit 0.2 wrote it: no filter, no CRC
                dst.create_dataset(name, data=obj[()], dtype=obj.dtype, chunks=obj.chunks,
                                   maxshape=obj.maxshape)
            else:
                dst.require_group(name).attrs.update(
                    {k: v for k, v in obj.attrs.items() if not k.endswith("_crc32")})
        src.visititems(copy)
    r = invoke(runner, "info", old)
    assert r.exit_code == 0 and "this cache has no checksums" in r.stdout, r.stdout
    assert invoke(runner, "pack", old, "--out", tmp_path / "new.h5").exit_code == 0
    r = invoke(runner, "info", tmp_path / "new.h5", "--json")
    assert r.exit_code == 0 and '"checksums": "fletcher32+crc32"' in r.stdout
    with h5py.File(tmp_path / "new.h5", "r") as f, open_cache(digits_cache) as c:
        assert f["train/features/layer3"].fletcher32 and f["val/labels"].fletcher32
        assert (f["train/features/layer3"][()] == c.features("train", "layer3")).all()


def test_uncommitted_skipped_entries_never_count_and_a_damaged_index_is_not_resumed(tmp_path):
    """Skipped entries written after the last commit (a kill between the two flushes) are not
    read as the cache's; a resume refuses to continue CRC-32s over committed paths that no
    longer match them."""
    from featurekit.cache import CacheWriter
    from tests.conftest import array_cache

    rng = np.random.default_rng(0)
    path = array_cache(tmp_path / "a.h5", rng.normal(size=(30, 4)).astype(np.float32),
                       np.arange(30) % 3, {"train": 30})
    with h5py.File(path, "a") as f:  # as a kill after the data flush: an entry not counted
        f.attrs["complete"] = False
        sk = f["train/skipped"]
        for name, value in (("path", "late.jpg"), ("reason", "truncated")):
            sk[name].resize(1, axis=0)
            sk[name][0] = value
    with open_cache(path, allow_incomplete=True) as c:
        assert c.skipped("train") == [] and len(c.labels("train")) == 30
    with h5py.File(path, "a") as f:
        f["train/paths"][4] = "train/elsewhere"
    with pytest.raises(CacheError, match="committed paths of split 'train' do not match"):
        CacheWriter.reopen(path).close()


def test_a_resume_reseals_the_chunk_an_interrupted_commit_was_writing(tmp_path):
    """A power loss while a commit rewrites the chunk that also holds committed rows can
    leave the chunk's new part and its checksum out of step: the resume re-seals that one
    chunk (its committed rows unchanged), continues, and the finished cache is intact."""
    from featurekit.cache import CacheWriter
    from featurekit._h5format import fletcher32

    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 8)).astype(np.float32)
    attrs = {"model": "synthetic", "weights": "none", "layers": ["penultimate"], "classes": ["a", "b"],
             "dtype": "float32"}
    path = tmp_path / "p.h5"
    w = CacheWriter(path, attrs, {"train": 40}, {"penultimate": 8}, commit_rows=10)
    w.add("train", np.arange(10) % 2, [f"i{k}" for k in range(10)], {"penultimate": X[:10]})
    w.advance("train", 10)  # committed: rows 0-9, in the first chunk (40 rows)
    w.add("train", np.arange(10) % 2, [f"i{k}" for k in range(10, 20)], {"penultimate": X[10:20]})
    w._f.flush()  # the next commit's data reached the chunk ...
    w._f.close()  # ... and the power went
    with h5py.File(path, "r+") as f:  # the torn write: new bytes, the old checksum
        ds = f["train/features/penultimate"]
        mask, raw = ds.id.read_direct_chunk((0, 0))
        torn = bytearray(raw)
        torn[15 * 32: 15 * 32 + 8] = bytes(8 * [0x7F])  # inside row 15: not committed
        ds.id.write_direct_chunk((0, 0), bytes(torn), mask)
        assert fletcher32(bytes(torn[:-4])) != bytes(torn[-4:])
    w = CacheWriter.reopen(path, commit_rows=10)
    w.add("train", np.arange(30) % 2, [f"i{k}" for k in range(10, 40)], {"penultimate": X[10:]})
    w.advance("train", 40)
    w.finish()
    w.close()
    with open_cache(path) as c:
        assert c.require_intact()["rows"] == 40
        assert np.array_equal(c.features("train", "penultimate"), X)
