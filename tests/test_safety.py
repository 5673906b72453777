"""Files from elsewhere: safe head files (skops), trusted pickles only, arbitrary bytes as any
input file, provenance warnings."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import invoke


def _predict(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "featurekit", "predict", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_skops_and_joblib_heads_predict_the_same_in_a_fresh_process(digits_cache, tmp_path, runner):
    for name in ("h.skops", "h.joblib"):
        r = invoke(runner, "fit", digits_cache, "--head", "svm", "--C", "10", "--gamma", "0.002",
                   "--out", tmp_path / name)
        assert r.exit_code == 0, r.stderr
    a = _predict(tmp_path / "h.skops", digits_cache, "--out", tmp_path / "a.csv")
    b = _predict(tmp_path / "h.joblib", digits_cache, "--out", tmp_path / "b.csv", "--trust")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    rows = [list(csv.DictReader(open(tmp_path / n, newline=""))) for n in ("a.csv", "b.csv")]
    assert len(rows[0]) == 269 and rows[0] == rows[1]


def test_joblib_head_needs_trust(digits_cache, tmp_path, runner):
    assert invoke(runner, "fit", digits_cache, "--head", "logistic", "--C", "1",
                  "--out", tmp_path / "h.joblib").exit_code == 0
    r = invoke(runner, "predict", tmp_path / "h.joblib", digits_cache, "--out", tmp_path / "p.csv")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert "pickle" in r.stderr and "--trust" in r.stderr
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize("where", ["head", "report"])
def test_skops_head_with_a_foreign_type_is_refused_and_never_built(digits_cache, tmp_path, runner,
                                                                   where):
    import skops.io

    from featurekit.fit import fit_head
    from featurekit.headfile import save_head
    from tests._payload import Payload

    good = tmp_path / "good.skops"
    save_head(fit_head(digits_cache, "logistic", C=1.0), good)
    payload = skops.io.load(good, trusted=skops.io.get_untrusted_types(file=good))
    marker = tmp_path / "marker"
    if where == "head":
        payload["head"] = Payload(str(marker))
    else:
        payload["report"]["extra"] = Payload(str(marker))
    evil = tmp_path / "evil.skops"
    skops.io.dump(payload, evil)
    r = invoke(runner, "predict", evil, digits_cache, "--out", tmp_path / "p.csv")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert "does not trust" in r.stderr and "tests._payload.Payload" in r.stderr
    assert not marker.exists() and not (tmp_path / "p.csv").exists()
    # the payload is real: loading it trusted does run it
    skops.io.load(evil, trusted=["tests._payload.Payload", *skops.io.get_untrusted_types(file=good)])
    assert marker.read_text() == "the payload ran"


def test_skops_head_with_a_function_reference_is_refused(digits_cache, tmp_path, runner):
    """numpy/scikit-learn *functions* are not trusted, only their classes."""
    import skops.io
    from sklearn.preprocessing import FunctionTransformer

    from featurekit.fit import fit_head
    from featurekit.headfile import save_head

    good = tmp_path / "good.skops"
    save_head(fit_head(digits_cache, "logistic", C=1.0), good)
    payload = skops.io.load(good, trusted=skops.io.get_untrusted_types(file=good))
    payload["head"].pipeline_.steps.insert(0, ("f", FunctionTransformer(func=np.savetxt)))
    evil = tmp_path / "evil.skops"
    skops.io.dump(payload, evil)
    r = invoke(runner, "predict", evil, digits_cache, "--out", tmp_path / "p.csv")
    assert r.exit_code == 2 and "numpy.savetxt" in r.stderr


def test_cuml_heads_are_joblib_only(digits_cache, tmp_path):
    from featurekit.errors import HeadError
    from featurekit.headfile import check_head_output

    with pytest.raises(HeadError, match=r"joblib"):
        check_head_output(tmp_path / "h.skops", "cuml")
    check_head_output(tmp_path / "h.joblib", "cuml")
    check_head_output(tmp_path / "h.skops", "sklearn")


def test_a_saved_cuml_head_without_cuml_is_one_line(digits_cache, tmp_path, runner):
    head = tmp_path / "cuml-head.joblib"
    # a pickle that needs cuml's SVC class, as a head saved on a GPU machine does
    head.write_bytes(b"\x80\x02ccuml.svm\nSVC\n)\x81.")
    r = invoke(runner, "predict", head, digits_cache, "--out", tmp_path / "p.csv", "--trust")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert "cuML" in r.stderr and "NVIDIA GPU" in r.stderr


def test_predict_warns_on_other_precision_or_decode(digits_cache, tmp_path, runner):
    import h5py

    head = tmp_path / "h.skops"
    assert invoke(runner, "fit", digits_cache, "--head", "logistic", "--C", "1", "--out", head).exit_code == 0
    other = tmp_path / "bf16.h5"
    other.write_bytes(digits_cache.read_bytes())
    with h5py.File(other, "a") as f:
        f.attrs["precision"] = "bf16"
        f.attrs["decode"] = "nvjpeg"
    r = invoke(runner, "predict", head, other, "--out", tmp_path / "p.csv", "--json")
    assert r.exit_code == 0, r.stderr
    warn = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    # featurekit 0.1 recorded nvJPEG's path as "nvjpeg": read as today's name for it, gpu
    assert len(warn) == 1 and "precision fp32 vs bf16" in warn[0] and "decode cpu vs gpu" in warn[0]
    assert r.stdout.strip().startswith("{")  # --json stdout stays one object
    r = invoke(runner, "predict", head, digits_cache, "--out", tmp_path / "q.csv")
    assert r.exit_code == 0 and "warning" not in r.stderr


# ------------------------------------------------------------------ arbitrary bytes (hypothesis)

def _args(kind: str, tmp, cache) -> list:
    f = {"weights": tmp / "w.pt", "checkpoint": tmp / "run" / "last.pt", "skops": tmp / "h.skops",
         "joblib": tmp / "h.joblib", "cache": tmp / "c.h5", "pack": tmp / "c.h5",
         "csv": tmp / "s.csv"}[kind]
    tiny = ["--model", "resnet18", "--image-size", "32", "--device", "cpu", "--no-progress"]
    return f, {
        "weights": ["extract", "digits", "--out", tmp / "x.h5", "--weights", f, *tiny],
        "checkpoint": ["finetune", "digits", "--out", tmp / "run", "--resume", "--weights", "none",
                       *tiny],
        "skops": ["predict", f, cache, "--out", tmp / "p.csv"],
        "joblib": ["predict", f, cache, "--out", tmp / "p.csv"],
        "cache": ["fit", f, "--head", "logistic", "--out", tmp / "h2.skops"],
        "pack": ["pack", f, "--out", tmp / "one.h5"],
        "csv": ["extract", f, "--out", tmp / "x.h5", "--weights", "none", *tiny],
    }[kind]


@pytest.mark.parametrize("kind", ["weights", "checkpoint", "skops", "joblib", "cache", "pack", "csv"])
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(blob=st.one_of(st.binary(max_size=64), st.binary(min_size=64, max_size=4096),
                      st.just(b""), st.just(b"PK\x03\x04"), st.just(b"\x89HDF\r\n\x1a\n")))
def test_arbitrary_bytes_as_any_input_file(kind, blob, digits_cache, tmp_path_factory, runner):
    tmp = tmp_path_factory.mktemp(kind)
    path, args = _args(kind, tmp, digits_cache)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    r = invoke(runner, *args)
    assert r.exit_code == 2, (r.exit_code, r.stderr[-500:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert path.read_bytes() == blob  # the file given is never changed
    assert not (tmp / "one.h5").exists()  # and pack wrote nothing


def test_trusted_junk_pickles_are_one_line(digits_cache, tmp_path, runner):
    for blob in (b"", b"\x80\x05junk", b"garbage", b"\x80\x02}q\x00."):
        (tmp_path / "h.joblib").write_bytes(blob)
        r = invoke(runner, "predict", tmp_path / "h.joblib", digits_cache, "--out", tmp_path / "p.csv",
                   "--trust")
        assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.stderr
