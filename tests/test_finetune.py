"""featurekit finetune: freezing, resume, DDP, checkpoints, bad input."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from featurekit.finetune import build_model, finetune, load_checkpoint
from featurekit.models import build_backbone, resolve_weights
from tests.conftest import invoke

FAST = dict(model="resnet18", weights="none", image_size=32, device="cpu", workers=0,
            batch_size=8, progress=False, log=lambda *a: None)


def initial_state(n_classes: int, head: str = "linear", seed: int = 0) -> dict[str, torch.Tensor]:
    """The exact starting weights of a seeded run (backbone init, then the new head)."""
    backbone = build_backbone("resnet18", resolve_weights("none"), seed=seed, image_size=32)
    net = build_model(backbone.model, n_classes, head, 512, 0.2)
    return {k: v.clone() for k, v in net.state_dict().items()}


def changed(before, after, prefix: str) -> list[str]:
    return [k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k])]


@pytest.mark.parametrize(
    "layers, trained",
    [("fc", ["fc."]), ("layer4,fc", ["layer4.", "fc."]),
     ("all", ["conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.", "fc."])],
)
def test_train_layers_change_only_what_they_name(tmp_path, image_folder, layers, trained):
    before = initial_state(3)
    finetune(image_folder, tmp_path / "run", train_layers=layers, epochs=1, **FAST)
    after = load_checkpoint(tmp_path / "run" / "last.pt")["state_dict"]
    for k in before:
        if any(k.startswith(p) for p in trained):
            continue
        assert torch.equal(before[k], after[k]), f"{k} changed though frozen"  # BN stats too
    for prefix in trained:
        moved = changed(before, after, prefix)
        assert moved, f"{prefix} did not change"
        if layers == "all" and prefix.startswith("layer"):
            # every parameter and BatchNorm statistic of every trained stage moved
            assert all(k in moved for k in before if k.startswith(prefix) and "num_batches" not in k)


def test_mlp_head_and_param_counts(tmp_path, image_folder):
    lines = []
    finetune(image_folder, tmp_path / "run", **{**FAST, "log": lines.append}, train_layers="fc",
             head="mlp", hidden=32, epochs=1)
    assert any("trainable parameters 16,579 of 11,193,091" in line for line in lines), lines
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    assert ckpt["head"] == "mlp" and "fc.1.running_mean" in ckpt["state_dict"]


def test_resume_gives_the_same_weights(tmp_path, image_folder):
    """A seeded CPU run interrupted after epoch 1 and resumed == an uninterrupted run."""
    finetune(image_folder, tmp_path / "a", epochs=2, train_layers="layer4,fc", head="mlp",
             hidden=16, **FAST)

    def interrupt_after_epoch_1(msg):
        if msg.startswith("epoch 1/2"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(image_folder, tmp_path / "b", epochs=2, train_layers="layer4,fc", head="mlp",
                 hidden=16, **{**FAST, "log": interrupt_after_epoch_1})
    assert load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 1
    finetune(image_folder, tmp_path / "b", epochs=2, train_layers="layer4,fc", head="mlp",
             hidden=16, resume=True, **FAST)
    a = load_checkpoint(tmp_path / "a" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    rows_a = list(csv.DictReader(open(tmp_path / "a" / "metrics.csv")))
    rows_b = list(csv.DictReader(open(tmp_path / "b" / "metrics.csv")))
    assert [r["train_loss"] for r in rows_a] == [r["train_loss"] for r in rows_b]


def test_resume_refuses_other_options(tmp_path, image_folder, runner):
    finetune(image_folder, tmp_path / "run", epochs=1, train_layers="fc", **FAST)
    r = invoke(runner, "finetune", image_folder, "--out", tmp_path / "run", "--model", "resnet18",
               "--weights", "none", "--image-size", "32", "--device", "cpu", "--train-layers",
               "layer4,fc", "--resume", "--no-progress")
    assert r.exit_code == 2 and "options differ" in r.stderr and "train_layers" in r.stderr
    r = invoke(runner, "finetune", image_folder, "--out", tmp_path / "run", "--model", "resnet18",
               "--weights", "none", "--image-size", "32", "--device", "cpu", "--no-progress")
    assert r.exit_code == 2 and "--resume" in r.stderr


def test_killed_run_resumes_from_its_last_epoch(tmp_path, image_folder):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "featurekit", "finetune", str(image_folder), "--out", str(run),
           "--model", "resnet18", "--weights", "none", "--image-size", "32", "--device", "cpu",
           "--epochs", "3", "--batch-size", "8", "--workers", "0", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (run / "metrics.csv").exists():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # kill -9, mid-training of epoch 2
    proc.wait()
    done = load_checkpoint(run / "last.pt")["epoch"]
    assert done in (1, 2)  # killed after epoch 1 or 2 of 3
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"resuming {run} after epoch {done}" in r.stderr
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(x["epoch"]) for x in rows] == [1, 2, 3]
    assert list(rows[0]) == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]


def _torchrun(args: list, tmp_path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Two gloo ranks on this machine, each recording its weights and checkpoint reads."""
    import socket

    with socket.socket() as s:  # a free port for the rendezvous (port 0 makes torchrun hang)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--master_addr=127.0.0.1", f"--master_port={port}",
         str(Path(__file__).with_name("_ddp_rank.py")), str(tmp_path), *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=env,
    )


def test_two_process_gloo_run(tmp_path, image_folder):
    """torchrun with two ranks: undecodable files are found by both ranks together and reported
    once; both ranks end with identical weights; --resume reads last.pt once (rank 0) and
    shares it."""
    from featurekit.data import open_source

    run = tmp_path / "ddp"
    for k in range(6):
        (image_folder / ["cat", "dog", "owl"][k % 3] / f"broken{k}.jpg").write_bytes(b"\xff\xd8\xff no")
    src = open_source(image_folder)
    checked = [it.path for s in ("train", "val") for it in src.splits[s] if "broken" in it.path]
    assert checked  # some land in the splits finetune checks (test is not read)
    args = ["finetune", image_folder, "--out", run, "--model", "resnet18", "--weights", "none",
            "--image-size", "32", "--epochs", "1", "--device", "cpu", "--batch-size", "4",
            "--workers", "0", "--no-progress", "--json"]
    r = _torchrun(args, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count(f"skipping {len(checked)} undecodable file(s)") == 1, r.stderr[-3000:]
    summary = json.loads(r.stdout)  # rank 0 alone prints
    assert summary["epochs_run"] == 1
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert len(rows) == 1 and 0.0 <= float(rows[0]["val_acc"]) <= 1.0
    assert load_checkpoint(run / "best.pt")["epoch"] == 1

    def ranks_agree() -> None:
        a, b = (torch.load(tmp_path / f"rank{k}.pt", weights_only=True) for k in (0, 1))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        saved = load_checkpoint(run / "last.pt")["state_dict"]
        assert all(torch.equal(a[k], saved[k]) for k in a)

    ranks_agree()
    r = _torchrun([*args[:-1], "--epochs", "2", "--resume"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    loads = [json.loads((tmp_path / f"rank{k}-loads.json").read_text()) for k in (0, 1)]
    assert loads == [[str(run / "last.pt")], []]  # read once, by rank 0
    assert [int(x["epoch"]) for x in csv.DictReader(open(run / "metrics.csv"))] == [1, 2]
    ranks_agree()
    # a refusal decided by rank 0 is one line, printed once, and every rank stops
    r = _torchrun(args[:-1], tmp_path)
    assert r.returncode != 0
    assert r.stderr.count("already holds") == 1 and "Traceback" not in r.stderr.split("error:")[0]


def test_rank_device_binding_without_gpus(monkeypatch):
    from featurekit import _dist
    from featurekit.errors import DeviceError

    assert [_dist.rank_device("cuda", k, 4, 4) for k in range(4)] == [f"cuda:{k}" for k in range(4)]
    assert _dist.rank_device("cpu", 3, 4, 0) == "cpu"
    assert _dist.rank_device("cuda:1", 0, 1, 2) == "cuda:1"  # one process keeps its device
    with pytest.raises(DeviceError, match="--device cuda or auto"):
        _dist.rank_device("cuda:0", 1, 2, 2)  # every rank on cuda:0 is what this prevents
    with pytest.raises(DeviceError, match="--nproc_per_node"):
        _dist.rank_device("cuda", 2, 3, 2)
    # init binds the device before joining the group, and names it to the process group
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", str(d))))
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group",
                        lambda **kw: calls.append(("init", kw["backend"], str(kw.get("device_id")))))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    d, dev = _dist.init("cuda")
    assert dev == "cuda:1" and d.local_rank == 1 and not d.main
    assert calls == [("set_device", "cuda:1"), ("init", "nccl", "cuda:1")]


def test_val_is_held_out_of_train_when_there_is_no_val_folder(tmp_path, image_folder, runner):
    """A source with train/ and test/ only: val comes from train (seeded, stratified), test is
    untouched, every epoch has val_acc; --val-fraction 0 trains by train accuracy and says so."""
    import shutil

    root = tmp_path / "split"
    for split, picks in (("train", range(0, 5)), ("test", range(5, 6))):
        for cls in ("cat", "dog", "owl"):
            (root / split / cls).mkdir(parents=True)
            for i in picks:
                for f in (image_folder / cls).glob(f"{cls}_{i}.*"):
                    shutil.copy(f, root / split / cls / f.name)
    run = tmp_path / "run"
    base = ["--model", "resnet18", "--weights", "none", "--image-size", "32", "--device", "cpu",
            "--workers", "0", "--no-progress", "--batch-size", "4", "--epochs", "2"]
    r = invoke(runner, "finetune", root, "--out", run, *base, "--json")
    assert r.exit_code == 0, r.stderr
    assert "held out for val" in r.stderr
    summary = json.loads(r.stdout)
    assert summary["best_by"] == "val_acc" and summary["best_val_acc"] is not None
    assert summary["val_split"] == {"origin": "held out of train", "fraction": 0.15, "seed": 0,
                                    "images": 3}  # one per class: 5 x 0.15 rounds to 1
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert len(rows) == 2 and all(row["val_acc"] != "" for row in rows)
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt["val_split"]["origin"] == "held out of train" and ckpt["best_by"] == "val_acc"
    # same seed: the same held-out images (resume relies on it)
    r = invoke(runner, "finetune", root, "--out", run, *base, "--epochs", "3", "--resume", "--json")
    assert r.exit_code == 0, r.stderr
    # no val at all
    r = invoke(runner, "finetune", root, "--out", tmp_path / "r0", *base, "--val-fraction", "0")
    assert r.exit_code == 0, r.stderr
    assert "best.pt is chosen by train accuracy" in r.stderr
    assert "best by train accuracy (no val split)" in r.stderr
    rows = list(csv.DictReader(open(tmp_path / "r0" / "metrics.csv")))
    assert all(row["val_acc"] == "" for row in rows)


def test_files_of_a_run_are_never_replaced_unasked(tmp_path, image_folder, runner):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "metrics.csv").write_text("my own numbers\n")
    base = ["--model", "resnet18", "--weights", "none", "--image-size", "32", "--device", "cpu",
            "--workers", "0", "--no-progress", "--epochs", "1"]
    r = invoke(runner, "finetune", image_folder, "--out", out, *base)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "metrics.csv" in r.stderr
    r = invoke(runner, "finetune", image_folder, "--out", out, *base, "--resume")
    assert r.exit_code == 2 and "needs last.pt" in r.stderr
    assert (out / "metrics.csv").read_text() == "my own numbers\n"
    r = invoke(runner, "finetune", image_folder, "--out", out, *base, "--overwrite")
    assert r.exit_code == 0, r.stderr


def test_checkpoint_is_safe_and_feeds_extract(tmp_path, image_folder):
    finetune(image_folder, tmp_path / "run", epochs=1, train_layers="fc", **FAST)
    best = tmp_path / "run" / "best.pt"
    ckpt = torch.load(best, weights_only=True)  # no pickled code, numpy or RNG objects
    assert ckpt["classes"] == ["cat", "dog", "owl"] and ckpt["model"] == "resnet18"
    assert ckpt["preprocess"]["crop_size"] == 32
    # best.pt: what extract needs, not the optimizer's state (last.pt has that, and the RNG)
    from featurekit.finetune import BEST_KEYS

    assert set(ckpt) == set(BEST_KEYS) and "optimizer" not in ckpt
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert isinstance(last["rng"]["torch"], torch.Tensor) and "optimizer" in last
    assert "scale" in last["scaler"] or last["scaler"] == {}  # the GradScaler's state (off on CPU)
    assert best.stat().st_size < (tmp_path / "run" / "last.pt").stat().st_size
    from featurekit.cache import open_cache
    from featurekit import extract
    from featurekit.models import sha256_file

    extract(image_folder, tmp_path / "ft.h5", weights=str(best), device="cpu", workers=0,
            progress=False)  # model and preprocessing come from the checkpoint
    with open_cache(tmp_path / "ft.h5") as c:
        assert c.attrs["model"] == "resnet18" and c.attrs["preprocess"]["crop_size"] == 32
        assert c.attrs["weights_sha256"] == sha256_file(best)
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000


def test_bad_input(tmp_path, image_folder, runner):
    base = ["--model", "resnet18", "--image-size", "32", "--device", "cpu", "--no-progress"]
    r = invoke(runner, "finetune", image_folder, "--out", tmp_path / "r", "--weights", "none",
               "--train-layers", "layer5,fc", *base)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "unknown --train-layers entry 'layer5'" in r.stderr
    r = invoke(runner, "finetune", tmp_path / "nope", "--out", tmp_path / "r", "--weights", "none", *base)
    assert r.exit_code == 2 and "source not found" in r.stderr
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    r = invoke(runner, "finetune", image_folder, "--out", tmp_path / "r", "--weights", bad, *base)
    assert r.exit_code == 2 and "cannot load weights file" in r.stderr
    (tmp_path / "r2").mkdir()
    (tmp_path / "r2" / "last.pt").write_bytes(b"garbage")
    r = invoke(runner, "finetune", image_folder, "--out", tmp_path / "r2", "--weights", "none",
               "--resume", *base)
    assert r.exit_code == 2 and "cannot load checkpoint" in r.stderr
    assert "Traceback" not in r.stderr
    # a training batch that cannot fit: refused before any image is read
    r = invoke(runner, "finetune", image_folder, "--out", tmp_path / "r3", "--weights", "none",
               "--model", "resnet18", "--device", "cpu", "--image-size", "2048", "--batch-size", "512")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "for a training step" in r.stderr
    assert not (tmp_path / "r3").exists()


def test_digits_acceptance(tmp_path, runner):
    """From scratch on 32 px digits in 5 epochs: val >= 0.90; an svm on its features >= 0.93."""
    run = tmp_path / "run"
    r = invoke(runner, "finetune", "digits", "--model", "resnet18", "--weights", "none",
               "--image-size", "32", "--epochs", "5", "--device", "cpu", "--out", run,
               "--no-progress", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["best_val_acc"] >= 0.90
    r = invoke(runner, "extract", "digits", "--model", "resnet18", "--weights", run / "best.pt",
               "--image-size", "32", "--device", "cpu", "--out", tmp_path / "ft.h5", "--no-progress")
    assert r.exit_code == 0, r.stderr
    r = invoke(runner, "fit", tmp_path / "ft.h5", "--head", "svm", "--out", tmp_path / "h.skops", "--json")
    assert json.loads(r.stdout)["accuracy"] >= 0.93


def test_a_last_batch_of_one_image_is_left_out(tmp_path, image_folder, runner):
    """At 32 px layer4's output is 1x1: a batch of one image cannot train BatchNorm. The last
    batch of one is left out of that epoch (another image each epoch); --batch-size 1 is
    refused with one line where BatchNorm trains."""
    from featurekit.data import open_source

    n_train = len(open_source(image_folder).splits["train"])
    bs = n_train - 1  # epoch = one full batch + a batch of one
    s = finetune(image_folder, tmp_path / "run", model="resnet18", weights="none", image_size=32,
                 device="cpu", workers=0, batch_size=bs, epochs=2, progress=False,
                 log=lambda *a: None)
    assert s["epochs_run"] == 2  # (this raised BatchNorm's ValueError before)
    base = ["--model", "resnet18", "--weights", "none", "--image-size", "32", "--device", "cpu",
            "--workers", "0", "--no-progress", "--batch-size", "1", "--epochs", "1"]
    r = invoke(runner, "finetune", image_folder, "--out", tmp_path / "r1", *base)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "--batch-size 1" in r.stderr
    r = invoke(runner, "finetune", image_folder, "--out", tmp_path / "r2", *base, "--train-layers", "fc")
    assert r.exit_code == 0, r.stderr  # a linear head alone trains on single images


def test_a_rank_failing_mid_epoch_stops_both(tmp_path, image_folder):
    """Rank 1 runs out of memory in its third step while rank 0 waits in the step's
    all-reduce: both ranks exit within 60 s, rank 1 with its one line, rank 0 with one line
    saying it stopped because rank 1 failed; no traceback from featurekit."""
    import re
    import time

    from tests.test_shards import torchrun

    started = time.monotonic()
    p = torchrun(["finetune", image_folder, "--out", tmp_path / "run", "--model", "resnet18",
                  "--weights", "none", "--image-size", "32", "--epochs", "2", "--device", "cpu",
                  "--batch-size", "2", "--workers", "0", "--no-progress"],
                 script=(Path(__file__).with_name("_failing_rank.py"), "train"))
    out, err = p.communicate(timeout=120)
    r = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    assert r.returncode != 0 and time.monotonic() - started < 60, r.stderr[-3000:]
    ours = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 2 and sum("stopped: rank 1 failed" in line for line in ours) == 1, r.stderr[-3000:]
    assert all("out of memory" in line for line in ours), ours
    assert not re.search(r'File ".*featurekit[/\\\\]', r.stderr), r.stderr[-3000:]
