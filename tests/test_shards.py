"""Sharded extraction under torchrun (gloo, two ranks on this CPU): one logical cache equal to a
single-process run, pack, resume after a rank is killed, readers refusing a missing shard."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from featurekit.cache import open_cache
from tests.conftest import invoke, make_image

ARGS = ["--model", "resnet18", "--weights", "none", "--image-size", "64", "--device", "cpu",
        "--batch-size", "8", "--workers", "0", "--no-progress", "--commit-seconds", "0",
        "--layers", "penultimate,layer2"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    rng = np.random.default_rng(2)
    root = tmp_path_factory.mktemp("sh") / "imgs"
    for i in range(160):
        make_image(root / f"class{i % 4}" / f"{i:04d}.jpg", rng, size=(40, 36))
    for i in (5, 77, 141):  # undecodable files: skipped lists must match too
        (root / f"class{i % 4}" / f"{i:04d}.jpg").write_bytes(b"\xff\xd8\xff broken")
    return root


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory) -> Path:
    ref = tmp_path_factory.mktemp("ref") / "ref.h5"
    r = subprocess.run([sys.executable, "-m", "featurekit", "extract", str(folder), "--out",
                        str(ref), *ARGS], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return ref


def torchrun(args, nproc: int = 2, script: tuple[Path, str] | None = None,
             env: dict[str, str] | None = None, stderr=subprocess.PIPE) -> subprocess.Popen:
    """``torchrun -m featurekit ARGS`` (or ``SCRIPT MODE ARGS``) on two gloo ranks."""
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    target = ["-m", "featurekit"] if script is None else [str(script[0]), script[1]]
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
         "--master_addr=127.0.0.1", f"--master_port={port}", *target, *map(str, args)],
        stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def same_rows(a: Path, b: Path) -> None:
    """Labels, paths, file stats, features and skipped lists bitwise equal, per split."""
    with open_cache(a) as ca, open_cache(b) as cb:
        assert ca.splits == cb.splits and ca.layers == cb.layers and ca.classes == cb.classes
        assert ca.attrs["options"] == cb.attrs["options"]
        assert ca.attrs["zero_counts"] == cb.attrs["zero_counts"]
        for s in ca.splits:
            assert np.array_equal(ca.labels(s), cb.labels(s))
            assert ca.paths(s) == cb.paths(s) and ca.skipped(s) == cb.skipped(s)
            assert np.array_equal(ca.file_stats(s), cb.file_stats(s))
            for layer in ca.layers:
                x, y = ca.features(s, layer), cb.features(s, layer)
                assert x.dtype == y.dtype and np.array_equal(x, y), (s, layer)


def test_two_ranks_make_the_single_process_cache(folder, reference, tmp_path, runner):
    out = tmp_path / "sharded.h5"
    stale = tmp_path / "sharded.h5.shards" / "00002-of-00003.h5"  # an earlier 3-process run's
    stale.parent.mkdir()
    stale.write_bytes(b"an earlier run's shard")
    p = torchrun(["extract", folder, "--out", out, *ARGS])
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-3000:]
    assert stderr.count("extracted 157 images (3 skipped") == 1  # rank 0 alone reports
    assert sorted(x.name for x in (tmp_path / "sharded.h5.shards").iterdir()) == [
        "00000-of-00002.h5", "00001-of-00002.h5", "00002-of-00003.h5"]
    # the stale shard is neither used nor deleted: the user is told once
    assert stale.read_bytes() == b"an earlier run's shard"
    assert stderr.count("1 shard file(s) of an earlier run") == 1, stderr[-2000:]
    with h5py.File(out, "r") as f:
        assert f.attrs["layout"] == "sharded" and f.attrs["format_version"] == 2
        assert f["train/features/penultimate"].is_virtual
    for shard in (tmp_path / "sharded.h5.shards").glob("0000?-of-00002.h5"):
        with h5py.File(shard, "r") as f:  # every shard an ordinary format-1 cache
            assert f.attrs["format_version"] == 1 and "layout" not in f.attrs
    same_rows(reference, out)
    # the folder moves: shard paths are relative to the cache
    moved = tmp_path / "moved"
    moved.mkdir()
    os.rename(out, moved / out.name)
    os.rename(tmp_path / "sharded.h5.shards", moved / "sharded.h5.shards")
    same_rows(reference, moved / out.name)
    # pack: one ordinary file, the same rows, no shard needed any more
    packed = tmp_path / "one.h5"
    r = invoke(runner, "pack", moved / out.name, "--out", packed)
    assert r.exit_code == 0, r.stderr
    with h5py.File(packed, "r") as f:
        assert "layout" not in f.attrs and not f["train/features/penultimate"].is_virtual
        assert f.attrs["format_version"] == 1
    same_rows(reference, packed)
    r = invoke(runner, "fit", moved / out.name, "--head", "logistic", "--backend", "torch",
               "--out", tmp_path / "h.skops", "--json")
    assert r.exit_code == 0, r.stderr
    r = invoke(runner, "predict", tmp_path / "h.skops", packed, "--out", tmp_path / "p.csv")
    assert r.exit_code == 0, r.stderr  # a head fitted on the sharded cache predicts the packed one


@pytest.fixture(scope="module")
def sharded(folder, tmp_path_factory) -> Path:
    """A finished two-rank extraction (tests copy it before damaging it)."""
    out = tmp_path_factory.mktemp("sharded") / "c.h5"
    p = torchrun(["extract", folder, "--out", out, *ARGS])
    assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
    return out


@pytest.mark.parametrize("damage", ["delete", "replace", "truncate"])
def test_every_reader_refuses_a_missing_or_changed_shard(sharded, tmp_path, runner, damage):
    import shutil

    shutil.copytree(sharded.parent, tmp_path, dirs_exist_ok=True)  # copies keep id and size
    out = tmp_path / "c.h5"
    assert invoke(runner, "info", out).exit_code == 0
    shard = tmp_path / "c.h5.shards" / "00001-of-00002.h5"
    invoke(runner, "fit", out, "--head", "logistic", "--C", "1", "--backend", "torch",
           "--out", tmp_path / "h.skops")
    if damage == "delete":
        shard.unlink()
    elif damage == "replace":  # another run's shard of the same name
        shard.write_bytes((tmp_path / "c.h5.shards" / "00000-of-00002.h5").read_bytes())
    else:
        shard.write_bytes(shard.read_bytes()[:5000])
    needle = "missing" if damage == "delete" else "changed or replaced"
    for args in (["info", out], ["fit", out, "--head", "logistic", "--out", tmp_path / "h2.skops"],
                 ["bench", out], ["predict", tmp_path / "h.skops", out, "--out", tmp_path / "p.csv"],
                 ["pack", out, "--out", tmp_path / "one.h5"]):
        r = invoke(runner, *args)
        assert r.exit_code == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, lines


def test_a_reader_that_knows_only_format_1_refuses_the_logical_cache(sharded, tmp_path):
    """The logical cache is format 2: a reader of format 1 (the version gate of featurekit
    0.1, simulated by asking for format 1) refuses it with one line, shard there or not,
    instead of reading HDF5's fill values for a missing shard."""
    import shutil

    from featurekit._h5format import read_header
    from featurekit.errors import CacheError

    shutil.copytree(sharded.parent, tmp_path, dirs_exist_ok=True)
    out = tmp_path / "c.h5"
    assert read_header(out)["format_version"] == 2  # today's reader
    (tmp_path / "c.h5.shards" / "00001-of-00002.h5").unlink()
    with h5py.File(out, "r") as f:  # what a reader that skips the gate would see
        assert np.isnan(f["train/features/penultimate"][-1]).all()
    for readable in (1,):
        with pytest.raises(CacheError, match="format 2 .*newer than this featurekit reads") as e:
            read_header(out, readable=readable)
        assert "\n" not in str(e.value)
    with pytest.raises(CacheError, match="missing"):
        open_cache(out)


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(x) for x in (task / "children").read_text().split()]
    return kids


def test_a_killed_rank_resumes_to_the_single_process_cache(folder, reference, tmp_path):
    out = tmp_path / "k.h5"
    shard = tmp_path / "k.h5.shards" / "00001-of-00002.h5"
    p = torchrun(["extract", folder, "--out", out, *ARGS])
    deadline, first = time.monotonic() + 240, None
    while p.poll() is None and time.monotonic() < deadline:  # a commit of rank 1, then kill it
        if shard.exists():
            first = first or shard.stat().st_mtime_ns
            if shard.stat().st_mtime_ns != first:
                break
        time.sleep(0.01)
    assert p.poll() is None, "finished before a rank could be killed"
    ranks = _children(p.pid)
    assert len(ranks) == 2, ranks
    os.kill(ranks[1], signal.SIGKILL)
    p.wait(timeout=120)
    assert p.returncode != 0 and not out.exists()
    with h5py.File(shard, "r") as f:
        assert not f.attrs["complete"]
    p = torchrun(["extract", folder, "--out", out, *ARGS, "--resume"])
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-3000:]
    same_rows(reference, out)


@pytest.mark.parametrize("when", ["start", "mid-pass"])
def test_when_one_rank_fails_every_rank_stops_with_one_line(folder, tmp_path, when):
    """Rank 1 alone fails: at the start (its shard path is a folder) or in its pass (its third
    commit: no space left). torchrun returns non-zero well within 60 s; rank 1 printed its
    error, rank 0 one line saying it stopped because rank 1 failed; no traceback from
    featurekit on any rank."""

    out = tmp_path / "f.h5"
    if when == "start":
        (tmp_path / "f.h5.shards" / "00001-of-00002.h5").mkdir(parents=True)
    script = Path(__file__).with_name("_failing_rank.py")
    started = time.monotonic()
    p = torchrun(["extract", folder, "--out", out, *ARGS], script=(script, "writer" if when != "start" else "none"))
    _, stderr = p.communicate(timeout=120)
    assert p.returncode != 0 and time.monotonic() - started < 60, stderr[-3000:]
    ours = [line for line in stderr.splitlines() if line.startswith(("error:", "[rank"))]
    assert len(ours) == 2, stderr[-3000:]
    assert sum(line.startswith("error: stopped: rank 1 failed: ") for line in ours) == 1, ours
    why = "is a folder" if when == "start" else "No space left on device"
    assert all(why in line for line in ours), ours
    assert not re.search(r'File ".*featurekit[/\\]', stderr), stderr[-3000:]
    assert not out.exists()


def test_a_rank_waits_at_the_barrier_as_long_as_the_others_work(folder, reference, tmp_path):
    """FEATUREKIT_DIST_TIMEOUT compressed to 3 s: rank 0 finishes its shard and waits for
    rank 1, slowed to well past 3 s, at the barrier: the run completes (the wait is on the
    store, kept by rank 1's heartbeat, not a collective that times out). A rank frozen (no
    sign of life for 3 s: as one killed on another node) stops the other with one line."""
    out = tmp_path / "w.h5"
    script = Path(__file__).with_name("_failing_rank.py")
    started = time.monotonic()
    p = torchrun(["extract", folder, "--out", out, *ARGS], script=(script, "slow"),
                 env={"FEATUREKIT_DIST_TIMEOUT": "3"})
    _, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-3000:]
    assert time.monotonic() - started > 8  # rank 1's ten commits took 5 s more than rank 0's
    same_rows(reference, out)
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        p = torchrun(["extract", folder, "--out", tmp_path / "f.h5", *ARGS],
                     script=(script, "freeze"), env={"FEATUREKIT_DIST_TIMEOUT": "3"}, stderr=err)
        deadline = time.monotonic() + 120
        while "showed no sign of life" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in _children(p.pid):  # wake the frozen rank: torchrun's SIGTERM then ends it
            os.kill(pid, signal.SIGCONT)
        p.wait(timeout=120)
    stderr = log.read_text()
    assert p.returncode != 0, stderr[-3000:]
    assert "error: stopped: rank 1 showed no sign of life for 3 s" in stderr, stderr[-3000:]
    assert not re.search(r'File ".*featurekit[/\\]', stderr), stderr[-3000:]


# ---------------------------------------------------------------- head sweeps on a Dask cluster


def test_bench_and_fit_on_a_dask_cluster_equal_one_job(tmp_path, runner, monkeypatch, digits_cache):
    """Two worker processes of a LocalCluster, each reading the cache itself: the same results
    (scores of every grid point, chosen parameters, accuracies) as --jobs 1."""
    import json

    distributed = pytest.importorskip("distributed")
    cache = digits_cache
    heads = "logistic:torch,nystroem:torch,svm:sklearn"

    def rows(r):
        assert r.exit_code == 0, r.stderr
        return [{k: v for k, v in row.items() if "seconds" not in k and k != "selection"}
                | {"scores": row["selection"]["scores"]} for row in json.loads(r.stdout)["results"]]

    here = rows(invoke(runner, "bench", cache, "--heads", heads, "--jobs", "1", "--json"))
    fit_here = json.loads(invoke(runner, "fit", cache, "--head", "svm", "--backend", "sklearn",
                                 "--jobs", "1", "--json", "--out", tmp_path / "a.skops").stdout)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster:
        address = cluster.scheduler_address
        away = rows(invoke(runner, "bench", cache, "--heads", heads, "--dask-scheduler", address,
                           "--json"))
        r = invoke(runner, "fit", cache, "--head", "svm", "--backend", "sklearn",
                   "--dask-scheduler", address, "--json", "--out", tmp_path / "b.skops")
        assert r.exit_code == 0, r.stderr
        fit_away = json.loads(r.stdout)
    assert here == away and [row["status"] for row in here] == ["ok"] * 3
    assert fit_here["selection"]["scores"] == fit_away["selection"]["scores"]
    assert fit_here["params"] == fit_away["params"] and fit_here["accuracy"] == fit_away["accuracy"]
    from featurekit import _parallel

    monkeypatch.setattr(_parallel, "CONNECT_TIMEOUT", "2s")
    r = invoke(runner, "bench", cache, "--dask-scheduler", "tcp://127.0.0.1:9", "--heads", "logistic")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "Dask scheduler" in r.stderr


def test_shards_recording_an_older_name_of_the_decode_path_still_finalise(tmp_path, digits_cache):
    """A sharded run begun by featurekit 0.1 on nvJPEG recorded its decode path as "device";
    resumed today (as "gpu"), its shards are still this run's and the logical cache is made."""
    import json
    import shutil

    from featurekit import shards
    from featurekit._h5format import read_header

    out = tmp_path / "c.h5"
    shard = shards.shard_path(out, 0, 1)
    shard.parent.mkdir()
    shutil.copy(digits_cache, shard)
    header = read_header(shard)
    options = {**header["options"], "decode": "gpu"}
    ranges = shards.rank_ranges(options["split_sizes"], options["batch_size"], 1)
    with h5py.File(shard, "a") as f:
        f.attrs["options"] = json.dumps({**header["options"], "decode": "device"})
        f.attrs["shard"] = json.dumps(shards.identity(0, 1, ranges[0], options))
    attrs = {k: v for k, v in header.items()
             if k not in ("format", "format_version", "complete", "options")}
    shards.finalise(out, 1, options, {**attrs, "options": options}, ranges)
    with open_cache(out) as a, open_cache(digits_cache) as b:
        assert a.attrs["format_version"] == 2
        for s in b.splits:
            assert np.array_equal(a.features(s, "penultimate"), b.features(s, "penultimate"))
            assert a.paths(s) == b.paths(s)
    with h5py.File(shard, "a") as f:  # another run's options are still refused
        f.attrs["options"] = json.dumps({**header["options"], "decode": "hw"})
    with pytest.raises(Exception, match="belongs to another run"):
        shards.finalise(out, 1, options, {**attrs, "options": options}, ranges)
