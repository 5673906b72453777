"""featurekit study: every stage on the CPU, a report with every section, resume after kill -9,
the checks section, refusals."""

from __future__ import annotations

import html.parser
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from tests.conftest import invoke

SMALL = ["--model", "resnet18", "--weights", "none", "--image-size", "32", "--epochs", "2",
         "--heads", "logistic,knn", "--probe-heads", "knn", "--shots", "1,2", "--draws", "2",
         "--device", "cpu", "--workers", "0", "--no-progress", "--variants", "scratch,partial"]


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    """3 classes x 40 small images whose colour follows the class (plus noise): 120 images,
    enough for CKA's 100 shared rows, learnable from frozen random features."""
    root = tmp_path_factory.mktemp("colours") / "imgs"
    rng = np.random.default_rng(0)
    for c, tint in enumerate([(200, 60, 60), (60, 200, 60), (60, 60, 200)]):
        for i in range(40):
            img = np.clip(np.array(tint) + rng.normal(0, 40, size=(36, 36, 3)), 0, 255).astype(np.uint8)
            (root / f"c{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / f"c{c}" / f"{i:02d}.png")
    return root


def _study(args, cwd=None):
    return subprocess.Popen([sys.executable, "-m", "featurekit", "study", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)


def _comparable(summary: dict) -> dict:
    """A summary without what differs between two identical runs: times and paths."""
    drop = {"seconds", "fit_seconds", "predict_seconds", "selection_seconds", "total_seconds",
            "seconds_training", "stages", "provenance", "cache"}

    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if k not in drop}
        return [clean(v) for v in x] if isinstance(x, list) else x

    return clean(summary)


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.images, self.tags = [], 0, set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        for name, value in attrs:
            if name in ("src", "href") and value:
                if value.startswith("data:image/png;base64,"):
                    self.images += 1
                else:
                    self.refs.append(value)


def test_a_study_killed_in_partial_fine_tuning_resumes_to_the_same_report(colours, tmp_path):
    whole = _study([colours, "--out", tmp_path / "a", *SMALL])
    out, err = whole.communicate(timeout=600)
    assert whole.returncode == 0, err[-3000:]
    a = tmp_path / "a"
    summary = json.loads((a / "summary.json").read_text())
    assert [r["approach"] for r in summary["approaches"]] == [
        "from scratch", "frozen features + logistic", "frozen features + knn",
        "partial fine-tuning (layer4 + fc)"]
    assert sum(r["best"] for r in summary["approaches"]) == 1
    assert set(summary["cka"]) == {"scratch", "partial"} and summary["fewshot"]
    assert set(summary["figures"]) == {"curves", "depth", "sparsity", "cka", "heads", "fewshot"}
    import jsonschema

    schema = Path(__file__).resolve().parent.parent / "docs" / "study-summary.schema.json"
    jsonschema.validate(summary, json.loads(schema.read_text()))
    md = (a / "report.md").read_text()
    for section in ("| approach |", "## Checks", "## Figures", "## Provenance", "featurekit extract"):
        assert section in md
    page = _Page()
    page.feed((a / "report.html").read_text())
    assert page.images == 6 and page.refs == [] and {"table", "h1", "img"} <= page.tags

    # the same study killed (kill -9) once partial fine-tuning has committed its first epoch
    b = tmp_path / "b"
    run = _study([colours, "--out", b, *SMALL])
    last = b / "finetune" / "partial" / "run" / "last.pt"
    deadline = time.time() + 600
    while not last.exists() and run.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert run.poll() is None, "the study ended before it could be killed"
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    assert not (b / "finetune" / "partial" / "stage.json").exists()
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in
              (b / "features" / "cache.h5", b / "heads" / "stage.json",
               b / "finetune" / "scratch" / "run" / "best.pt", b / "after" / "scratch" / "cache.h5")}
    again = _study([colours, "--out", b, *SMALL])
    assert again.communicate(timeout=600) and again.returncode == 2  # refused: the study exists
    resumed = _study([colours, "--out", b, *SMALL, "--resume"])
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert "features already done" in err and "finetune/partial done" in err
    for p, (mtime, data) in before.items():
        assert p.stat().st_mtime_ns == mtime and p.read_bytes() == data, p
    assert _comparable(json.loads((b / "summary.json").read_text())) == _comparable(summary)


def test_checks_flag_a_broken_head_with_its_causes(digits_cache, tmp_path):
    """An SVM with C = 1e-6 on train labels shuffled: below chance, with what its run shows."""
    from featurekit.cache import open_cache
    from featurekit.fit import fit_head
    from featurekit.report import checks

    broken = tmp_path / "shuffled.h5"
    broken.write_bytes(digits_cache.read_bytes())
    with h5py.File(broken, "a") as f:
        f["train"]["labels"][:] = np.random.default_rng(0).permutation(f["train"]["labels"][:])
    result = fit_head(broken, "svm", backend="torch", C=1e-6, train_split="train")
    with open_cache(broken) as c:
        X, y = c.features("test", "penultimate"), c.labels("test")
        Xt, yt = c.features("train", "penultimate"), c.labels("train")
    pred = result.head.predict(X)
    row = {**result.report, "approach": "frozen features + svm",
           "predicted_share": float(np.bincount(pred).max() / len(pred)),
           "train_accuracy": float(np.mean(result.head.predict(Xt) == yt))}
    found = checks([row], y, {"classes": 10, "train_classes": 10})
    assert len(found) == 1 and found[0]["approach"] == "frozen features + svm"
    text = " ".join(found[0]["causes"])
    assert "training rows is at chance too" in text, text


def test_plan_and_refusals(colours, tmp_path, runner):
    r = invoke(runner, "study", colours, "--out", tmp_path / "p", *SMALL, "--plan")
    assert r.exit_code == 0 and "finetune/partial" in r.stdout and "total about" in r.stdout
    assert not (tmp_path / "p").exists()
    for args, why in ((["--variants", "scratch,bogus"], "unknown variant 'bogus'"),
                      (["--epochs", "0"], "--epochs"),
                      (["--weights", str(tmp_path / "missing.pt")], "missing.pt"),
                      (["--heads", "forest"], "unknown head")):
        r = invoke(runner, "study", colours, "--out", tmp_path / "o", *SMALL, *args)
        assert r.exit_code == 2 and why in r.stderr and r.stderr.count("\n") == 1, (args, r.stderr)
        assert not (tmp_path / "o").exists()
    from tests.conftest import make_image

    rng = np.random.default_rng(0)
    for i in range(8):
        make_image(tmp_path / "one" / "only" / f"{i}.png", rng, size=(36, 36))
    r = invoke(runner, "study", tmp_path / "one", "--out", tmp_path / "o", *SMALL)
    assert r.exit_code == 2 and "1 class(es)" in r.stderr and not (tmp_path / "o").exists()
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "study.json").write_text(json.dumps(
        {"format": "featurekit-study", "options": {"source": "elsewhere"}}))
    r = invoke(runner, "study", colours, "--out", tmp_path / "s", *SMALL, "--resume")
    assert r.exit_code == 2 and "other options" in r.stderr
    r = invoke(runner, "study", colours, "--out", tmp_path / "s", *SMALL)
    assert r.exit_code == 2 and "--resume" in r.stderr
    (tmp_path / "s2").mkdir()
    (tmp_path / "s2" / "mine.txt").write_text("keep")
    r = invoke(runner, "study", colours, "--out", tmp_path / "s2", *SMALL)
    assert r.exit_code == 2 and "not empty" in r.stderr and (tmp_path / "s2" / "mine.txt").exists()


def test_max_train_images_is_one_stratified_subset_for_every_stage(colours, tmp_path, runner):
    import csv

    from featurekit import data
    from featurekit.study import check_options, study_source

    kw = dict(model="resnet18", weights="none", variants="probe", epochs=1, image_size=32,
              heads="knn", probe_heads="knn", seed=3, batch_size=8, val_fraction=0.15,
              test_fraction=0.15, shots="1", draws=2)
    opts = check_options(colours, max_train_images=30, **kw)
    (tmp_path / "s").mkdir()
    path = study_source(opts, tmp_path / "s")
    rows = list(csv.DictReader(open(path)))
    full = data.open_source(colours, seed=3)
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == 30 and sorted({r["label"] for r in train}) == ["c0", "c1", "c2"]
    assert {r["label"]: sum(x["label"] == r["label"] for x in train) for r in train} == {"c0": 10, "c1": 10, "c2": 10}
    for split in ("val", "test"):
        assert sum(r["split"] == split for r in rows) == len(full.splits[split])
    sub = data.open_source(path)
    assert len(sub.splits["train"]) == 30 and study_source(opts, tmp_path / "s") == path
    assert check_options(colours, **kw).max_train_images is None
    r = invoke(runner, "study", "digits", "--out", tmp_path / "d", "--weights", "none",
               "--max-train-images", "40")
    assert r.exit_code == 2 and "folder or CSV source" in r.stderr
    r = invoke(runner, "study", colours, "--out", tmp_path / "few", *SMALL, "--max-train-images", "2")
    assert r.exit_code == 2 and "fewer than the 3 classes" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "few").exists()
    from dataclasses import replace

    n = len(full.splits["train"])  # one image left out: too few to hold every class, unstratified
    (tmp_path / "s2").mkdir()
    path = study_source(replace(opts, max_train_images=n - 1), tmp_path / "s2")
    assert sum(r["split"] == "train" for r in csv.DictReader(open(path))) == n - 1
