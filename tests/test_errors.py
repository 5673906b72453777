"""Bad input: one line on stderr, exit code 2, no traceback, nothing lost."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
from pathlib import Path

import h5py
import pytest

from featurekit.cache import open_cache
from featurekit.errors import CacheError
from featurekit import extract
from tests.conftest import TINY, invoke


def assert_user_error(r, *needles: str) -> None:
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in r.stderr + r.stdout
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_source(tmp_path, runner):
    r = invoke(runner, "extract", tmp_path / "nope", "--out", tmp_path / "x.h5", *TINY)
    assert_user_error(r, "source not found")
    assert not (tmp_path / "x.h5").exists()


def test_missing_source_as_a_real_process(tmp_path):
    """The installed console path too: one line, exit 2."""
    r = subprocess.run(
        [sys.executable, "-m", "featurekit", "extract", str(tmp_path / "nope"), "--out",
         str(tmp_path / "x.h5")], capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr


def test_empty_folder_and_folder_without_images(tmp_path, runner):
    (tmp_path / "empty").mkdir()
    r = invoke(runner, "extract", tmp_path / "empty", "--out", tmp_path / "x.h5", *TINY)
    assert_user_error(r, "no class folders")
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "readme.txt").write_text("hi")
    r = invoke(runner, "extract", tmp_path / "noimg", "--out", tmp_path / "x.h5", *TINY)
    assert_user_error(r, "no images found")


def test_unknown_model_lists_valid_ones(tmp_path, image_folder, runner):
    r = invoke(runner, "extract", image_folder, "--out", tmp_path / "x.h5", "--model", "resnet19",
               "--weights", "none")
    assert_user_error(r, "unknown model 'resnet19'", "resnet18", "resnet50", "wide_resnet50_2")


def test_unknown_layer(tmp_path, image_folder, runner):
    r = invoke(runner, "extract", image_folder, "--out", tmp_path / "x.h5", *TINY, "--layers",
               "penultimate,layer5")
    assert_user_error(r, "unknown layer 'layer5'", "layer4")


def test_unreadable_and_mismatched_weights(tmp_path, image_folder, runner):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage" * 10)
    args = ["--model", "resnet18", "--image-size", "32", "--device", "cpu", "--no-progress"]
    r = invoke(runner, "extract", image_folder, "--out", tmp_path / "x.h5", "--weights", bad, *args)
    assert_user_error(r, "cannot load weights file")
    bad.write_bytes(b"\x80\x1d" + bytes(range(40)))  # torch warns of pickle protocol 29, then fails
    r = invoke(runner, "extract", image_folder, "--out", tmp_path / "x.h5", "--weights", bad, *args)
    assert_user_error(r, "cannot load weights file")
    r = invoke(runner, "extract", image_folder, "--out", tmp_path / "x.h5", "--weights",
               tmp_path / "missing.pt", *args)
    assert_user_error(r, "weights file not found")
    import torch
    from torchvision.models import resnet34

    other = tmp_path / "r34.pt"
    torch.save(resnet34().state_dict(), other)
    r = invoke(runner, "extract", image_folder, "--out", tmp_path / "x.h5", "--weights", other, *args)
    assert_user_error(r, "do not fit resnet18")
    # a pickle that needs code execution is refused by weights_only=True
    evil = tmp_path / "evil.pt"
    torch.save({"fn": Path("x")}, evil)
    r = invoke(runner, "extract", image_folder, "--out", tmp_path / "x.h5", "--weights", evil, *args)
    assert_user_error(r, "cannot load weights file")


def test_a_bad_source_is_reported_before_any_download(tmp_path, runner, monkeypatch):
    """The source is listed in a thread while the model builds, but never while imagenet
    weights download: a source that does not list stops the run before any download."""
    from torchvision.models._api import WeightsEnum

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))  # nothing cached: would download
    tried = []
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *a, **k: tried.append(1))
    empty = tmp_path / "empty" / "cls"
    empty.mkdir(parents=True)
    r = invoke(runner, "extract", empty.parent, "--out", tmp_path / "x.h5", "--model", "resnet18",
               "--device", "cpu", "--no-progress")
    assert_user_error(r, "no images found")
    assert not tried


def test_offline_imagenet_download_says_what_to_do(tmp_path, image_folder, runner, monkeypatch):
    from torchvision.models._api import WeightsEnum

    def offline(self, *a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    r = invoke(runner, "extract", image_folder, "--out", tmp_path / "x.h5", "--model", "resnet18",
               "--device", "cpu", "--no-progress")
    assert_user_error(r, "could not download the imagenet weights", "--weights none")
    assert not (tmp_path / "x.h5").exists()


def test_existing_output_is_kept(tmp_path, image_folder, runner):
    out = tmp_path / "x.h5"
    out.write_bytes(b"precious")
    r = invoke(runner, "extract", image_folder, "--out", out, *TINY)
    assert_user_error(r, "exists", "--overwrite")
    assert out.read_bytes() == b"precious"
    # --overwrite with a failing run (bad layer) still keeps the old file
    r = invoke(runner, "extract", image_folder, "--out", out, *TINY, "--overwrite", "--layers", "x")
    assert r.exit_code == 2 and out.read_bytes() == b"precious"
    r = invoke(runner, "extract", image_folder, "--out", out, *TINY, "--overwrite")
    assert r.exit_code == 0
    with open_cache(out) as c:
        assert c.complete


def test_output_folder_problems(tmp_path, image_folder, runner):
    r = invoke(runner, "extract", image_folder, "--out", tmp_path / "no" / "x.h5", *TINY)
    assert_user_error(r, "does not exist")
    r = invoke(runner, "extract", image_folder, "--out", tmp_path, *TINY)
    assert_user_error(r, "is a folder")


def test_bad_options(tmp_path, image_folder, runner):
    for extra, needle in (
        (["--pool", "median"], "unknown pool"),
        (["--dtype", "int8"], "unknown --dtype"),
        (["--precision", "fp8"], "unknown precision"),
        (["--device", "tpu"], "unknown device"),
        (["--val-fraction", "0.6", "--test-fraction", "0.5"], "leave room for train"),
        (["--batch-size", "0"], "--batch-size"),
    ):
        r = invoke(runner, "extract", image_folder, "--out", tmp_path / "x.h5", *TINY, *extra)
        assert_user_error(r, needle)


def test_cuda_requested_without_cuda(tmp_path, image_folder, runner):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args = [a for a in TINY if a not in ("--device", "cpu")]
    r = invoke(runner, "extract", image_folder, "--out", tmp_path / "x.h5", *args, "--device", "cuda")
    assert_user_error(r, "no CUDA device")


def test_bad_csv_sources(tmp_path, runner):
    csv = tmp_path / "a.csv"
    csv.write_text("file,class\nx.jpg,a\n")
    r = invoke(runner, "extract", csv, "--out", tmp_path / "x.h5", *TINY)
    assert_user_error(r, "path,label")
    csv.write_text("path,label,split\nx.jpg,a,holdout\n")
    r = invoke(runner, "extract", csv, "--out", tmp_path / "x.h5", *TINY)
    assert_user_error(r, "holdout")
    (tmp_path / "a.txt").write_text("x")
    r = invoke(runner, "extract", tmp_path / "a.txt", "--out", tmp_path / "x.h5", *TINY)
    assert_user_error(r, "not a .csv")


def test_csv_listing_missing_files_records_them(tmp_path, image_folder):
    csv = image_folder / "l.csv"
    csv.write_text("path,label\ncat/cat_1.jpg,cat\ncat/gone.jpg,cat\ndog/dog_1.jpg,dog\n")
    out = tmp_path / "m.h5"
    extract(csv, out, model="resnet18", weights="none", image_size=32, device="cpu", workers=0,
            progress=False, val_fraction=0, test_fraction=0)
    with open_cache(out) as c:
        assert dict(c.skipped("train")) == {"cat/gone.jpg": "file not found"}
        assert c.n_rows("train") == 2


def _cache(tmp_path, image_folder) -> Path:
    out = tmp_path / "c.h5"
    extract(image_folder, out, model="resnet18", weights="none", image_size=32, device="cpu",
            workers=0, progress=False)
    return out


def test_cache_validation(tmp_path, image_folder, runner):
    out = _cache(tmp_path, image_folder)
    with h5py.File(out, "a") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(CacheError, match="newer than this featurekit reads"):
        open_cache(out)
    r = invoke(runner, "info", out)
    assert_user_error(r, "upgrade featurekit")

    with h5py.File(out, "a") as f:
        f.attrs["format_version"] = 1
        f.attrs["complete"] = False
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(out)
    with open_cache(out, allow_incomplete=True) as c:
        assert not c.complete
    r = invoke(runner, "info", out, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["complete"] is False

    with h5py.File(out, "a") as f:
        f.attrs["complete"] = True
        del f["train"]["paths"]
    with pytest.raises(CacheError, match="lacks /train/paths"):
        open_cache(out)


def test_cache_row_mismatch_and_garbage(tmp_path, image_folder, runner):
    out = _cache(tmp_path, image_folder)
    with h5py.File(out, "a") as f:
        f["train"]["labels"].resize(3, axis=0)
    r = invoke(runner, "info", out)
    assert_user_error(r, "mismatched row counts")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(out.read_bytes()[:2000])
    r = invoke(runner, "info", junk)
    assert_user_error(r, "not a readable HDF5 file")
    r = invoke(runner, "info", tmp_path / "none.h5")
    assert_user_error(r, "cache not found")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = [1, 2]
    r = invoke(runner, "info", tmp_path / "other.h5")
    assert_user_error(r, "not a featurekit cache")


# ---------------------------------------------------------------- memory: up front and at run time


def test_a_batch_that_cannot_fit_is_refused_before_any_work(tmp_path, runner):
    r = invoke(runner, "extract", "digits", "--out", tmp_path / "x.h5", "--model", "resnet18",
               "--weights", "none", "--device", "cpu", "--image-size", "8192", "--batch-size", "4096")
    assert_user_error(r, "--image-size 8192 with --batch-size 4096 needs at least", "GiB")
    assert not list(tmp_path.iterdir())


def test_memory_check_suggests_the_batch_that_fits(monkeypatch):
    from featurekit import _resources
    from featurekit.errors import ResourceError

    monkeypatch.setattr(_resources, "available_bytes", lambda device: 1 << 30)
    per_image = _resources.stem_bytes(224, False) + 2 * _resources.input_bytes(224)
    fits = (1 << 30) // per_image
    with pytest.raises(ResourceError, match=rf"--batch-size {fits} or less"):
        _resources.check_batch_fits(image_size=224, batch_size=fits + 1, device="cpu")
    _resources.check_batch_fits(image_size=224, batch_size=fits, device="cpu")  # fits: no error
    # the estimate is a lower bound: a real resnet18 pass at 64 px, batch 16, fits in it
    monkeypatch.setattr(_resources, "available_bytes", lambda device: None)  # unknown: no refusal
    _resources.check_batch_fits(image_size=8192, batch_size=65536, device="cpu")


def test_out_of_memory_mid_pass_is_one_line_and_resumable(tmp_path, image_folder, runner, monkeypatch):
    import torch

    from featurekit import models

    real, calls = models.FeatureNet.__call__, []

    def flaky(self, x, count_zeros=True):
        calls.append(count_zeros)  # count_zeros=False: the dry run that measures layer widths
        if calls.count(True) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(self, x, count_zeros)

    monkeypatch.setattr(models.FeatureNet, "__call__", flaky)
    out = tmp_path / "x.h5"
    r = invoke(runner, "extract", image_folder, "--out", out, *TINY, "--batch-size", "2",
               "--commit-seconds", "0")
    assert_user_error(r, "ran out of memory", "--batch-size", "--resume")
    with open_cache(out, allow_incomplete=True) as c:
        assert not c.complete and 0 < sum(c.n_rows(s) for s in c.splits) <= 4
    monkeypatch.setattr(models.FeatureNet, "__call__", real)
    r = invoke(runner, "extract", image_folder, "--out", out, *TINY, "--batch-size", "2",
               "--commit-seconds", "0", "--resume")
    assert r.exit_code == 0, r.stderr
    with open_cache(out) as c:
        assert sum(c.n_rows(s) for s in c.splits) == 18


def test_a_killed_decoding_worker_is_one_line(tmp_path, image_folder, runner, monkeypatch):
    import os
    import signal

    import torch

    from featurekit import _decode

    def die(self, i):
        if torch.utils.data.get_worker_info() is not None:  # in the worker: as the OOM killer does
            os.kill(os.getpid(), signal.SIGKILL)

    monkeypatch.setattr(_decode.CpuDataset, "__getitem__", die)
    args = [a for a in TINY if a not in ("--workers", "0")]
    r = invoke(runner, "extract", image_folder, "--out", tmp_path / "x.h5", *args, "--workers", "1")
    assert_user_error(r, "decoding worker died", "killed by signal", "--workers")


def test_runtime_errors_that_are_not_the_users_stay_tracebacks():
    from featurekit.errors import from_runtime

    assert from_runtime(ValueError("a bug")) is None
    assert from_runtime(RuntimeError("shape mismatch")) is None
    assert "GPU ran out of memory" in str(from_runtime(RuntimeError("CUDA out of memory. Tried")))
    assert "out of memory" in str(from_runtime(MemoryError()))


def test_folder_outputs_are_never_replaced_unasked(tmp_path, image_folder, runner):
    """bench, sparsity and demo refuse a folder that holds files of their names (before any
    work), and replace them only with --overwrite."""
    cache = _cache(tmp_path, image_folder)
    out = tmp_path / "out"
    out.mkdir()
    for name in ("results.csv", "sparsity.png", "digits.h5"):
        (out / name).write_text("mine\n")
    cases = (
        (["bench", cache, "--heads", "logistic", "--out", out], "results.csv"),
        (["sparsity", image_folder, "--model", "resnet18", "--weights", "none", "--image-size",
          "32", "--device", "cpu", "--workers", "0", "--no-progress", "--out", out], "sparsity.png"),
        (["demo", "--out", out], "digits.h5"),
    )
    for args, name in cases:
        r = invoke(runner, *args)
        assert_user_error(r, name, "--overwrite")
        assert (out / name).read_text() == "mine\n"
    for args, name in cases[:2]:
        r = invoke(runner, *args, "--overwrite")
        assert r.exit_code == 0, r.stderr
        assert (out / name).read_bytes() != b"mine\n"
    (tmp_path / "afile").write_text("x")
    assert_user_error(invoke(runner, "bench", cache, "--out", tmp_path / "afile"), "is a file")


@pytest.mark.parametrize("case", [
    ("fit", "--dask-scheduler", "", "needs the scheduler's address"),
    ("fit", "--dask-scheduler", "nonsense", "cannot reach the Dask scheduler"),
    ("bench", "--dask-scheduler", " ", "needs the scheduler's address"),
    ("bench", "--dask-scheduler", "tcp://127.0.0.1:9", "cannot reach the Dask scheduler"),
    ("extract", "--decode", "xyz", "unknown --decode"),
    ("extract", "--decode", "", "unknown --decode"),
    ("extract", "--decode", "hw", "needs a CUDA --device"),
    ("bench", "--layers", "", "no layer given"),
    ("bench", "--heads", "forest", "unknown head"),
    ("fit", "--head", "forest", "unknown head"),
    ("fewshot", "--shots", "a", "--shots"),
    ("fewshot", "--shots", "0,2", "--shots"),
    ("fewshot", "--heads", "forest", "unknown head"),
    ("fewshot", "--heads", " ", "no head given"),
    ("study", "--variants", "bogus", "unknown variant"),
    ("study", "--heads", "forest", "unknown head"),
    ("study", "--probe-heads", ",", "at least one head"),
    ("study", "--shots", "x", "--shots"),
], ids=lambda c: f"{c[0]}{c[1]}={c[2]!r}")
def test_bad_values_of_the_new_string_options(case, digits_cache, tmp_path, runner, monkeypatch):
    """--dask-scheduler (fit, bench), --decode, and the heads, layers, shots and variants of
    bench, fit, fewshot and study: one line, exit 2, nothing written."""
    from featurekit import _parallel

    monkeypatch.setattr(_parallel, "CONNECT_TIMEOUT", "2s")  # a refused port is retried until then
    command, flag, value, needle = case
    args = {"fit": [digits_cache, "--head", "logistic", "--out", tmp_path / "h.skops"],
            "bench": [digits_cache, "--heads", "logistic", "--out", tmp_path / "b"],
            "extract": ["digits", "--out", tmp_path / "x.h5", *TINY],
            "fewshot": [digits_cache, "--out", tmp_path / "f"],
            "study": ["digits", "--out", tmp_path / "s", "--weights", "none", *TINY[:2]]}[command]
    r = invoke(runner, command, *args, flag, value)
    assert_user_error(r, needle)
    assert not list(tmp_path.iterdir())


def test_pack_refuses_what_it_must_not_touch(digits_cache, tmp_path, runner):
    """A missing cache, --out being the cache itself, an existing --out without --overwrite:
    one line each, and no file changed."""
    before = digits_cache.read_bytes()
    assert_user_error(invoke(runner, "pack", tmp_path / "nope.h5", "--out", tmp_path / "o.h5"), "nope.h5")
    assert_user_error(invoke(runner, "pack", digits_cache, "--out", digits_cache, "--overwrite"),
                      "the cache itself")
    (tmp_path / "keep.h5").write_bytes(b"mine")
    assert_user_error(invoke(runner, "pack", digits_cache, "--out", tmp_path / "keep.h5"), "--overwrite")
    assert (tmp_path / "keep.h5").read_bytes() == b"mine" and digits_cache.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.h5"]
