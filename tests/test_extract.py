"""featurekit extract: the pass, the cache it writes, and its numbers."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from featurekit.cache import open_cache
from featurekit import extract
from featurekit.models import Preprocess, build_backbone, default_preprocess, resolve_weights
from tests.conftest import TINY, invoke


def test_digits_acceptance(tmp_path, runner):
    """The issue's acceptance command, at 64 px: rows, dims, classes, plain h5py, info --json."""
    out = tmp_path / "d.h5"
    r = invoke(runner, "extract", "digits", "--model", "resnet18", "--weights", "none",
               "--image-size", "64", "--layers", "penultimate,layer3", "--device", "cpu",
               "--out", out, "--no-progress")
    assert r.exit_code == 0, r.stderr
    assert "extracted 1797 images" in r.stderr
    with h5py.File(out, "r") as f:  # plain h5py, no featurekit
        assert f.attrs["format"] == "featurekit-cache"
        assert f.attrs["format_version"] == 1
        assert bool(f.attrs["complete"])
        assert json.loads(f.attrs["classes"]) == [str(i) for i in range(10)]
        assert set(f.keys()) == {"train", "val", "test"}
        total = sum(f[s]["labels"].shape[0] for s in f)
        assert total == 1797
        for s in f:
            n = f[s]["labels"].shape[0]
            assert f[s]["labels"].dtype == np.int64
            assert f[s]["features"]["penultimate"].shape == (n, 512)
            assert f[s]["features"]["layer3"].shape == (n, 256)
            assert f[s]["features"]["penultimate"].chunks[1] == 512
            assert f[s]["paths"].shape == (n,)
            assert f[s]["paths"][0].decode("utf-8").startswith("digits/")
            assert f[s]["skipped"]["path"].shape == (0,)
        assert all(0 <= int(v) <= 9 for v in f["train"]["labels"][:])
    r = invoke(runner, "info", out, "--json")
    assert r.exit_code == 0
    info = json.loads(r.stdout)  # stdout is one JSON object, nothing else
    assert info["layers"] == {"penultimate": 512, "layer3": 256}
    assert sum(s["rows"] for s in info["splits"].values()) == 1797
    assert info["complete"] is True and info["model"] == "resnet18"
    assert 0.0 <= info["zero_fraction"]["layer3"] <= 1.0


def test_seeded_split_is_stratified_and_recorded(tmp_path):
    out = tmp_path / "d.h5"
    extract("digits", out, model="resnet18", weights="none", image_size=32, device="cpu",
            workers=0, progress=False, val_fraction=0.2, test_fraction=0.1, seed=3)
    with open_cache(out) as c:
        src = c.attrs["source"]
        assert src["split_origin"] == "seeded" and c.attrs["seed"] == 3
        assert src["val_fraction"] == 0.2 and src["test_fraction"] == 0.1
        counts = {s: np.bincount(c.labels(s), minlength=10) for s in c.splits}
        # every class is in every split, in its proportion (±1 from rounding)
        total = sum(counts.values())
        assert np.all(np.abs(counts["val"] - np.floor(total * 0.2 + 0.5)) <= 1)
        assert np.all(np.abs(counts["test"] - np.floor(total * 0.1 + 0.5)) <= 1)
        # no image is in two splits
        paths = [p for s in c.splits for p in c.paths(s)]
        assert len(paths) == len(set(paths)) == 1797


def test_seeded_cpu_runs_are_identical(tmp_path, image_folder):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    for out in (a, b):
        extract(image_folder, out, model="resnet18", weights="none", image_size=32,
                layers="penultimate,layer2", device="cpu", workers=0, progress=False, seed=7)
    with open_cache(a) as ca, open_cache(b) as cb:
        assert ca.splits == cb.splits
        for s in ca.splits:
            assert ca.paths(s) == cb.paths(s)
            np.testing.assert_array_equal(ca.labels(s), cb.labels(s))
            for layer in ("penultimate", "layer2"):
                np.testing.assert_array_equal(ca.features(s, layer), cb.features(s, layer))


def test_workers_give_the_same_rows(tmp_path, image_folder):
    """Decoding in worker processes keeps source order and values."""
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    for out, workers in ((a, 0), (b, 2)):
        extract(image_folder, out, model="resnet18", weights="none", image_size=32,
                device="cpu", workers=workers, batch_size=4, progress=False)
    with open_cache(a) as ca, open_cache(b) as cb:
        for s in ca.splits:
            assert ca.paths(s) == cb.paths(s)
            np.testing.assert_array_equal(ca.features(s, "penultimate"), cb.features(s, "penultimate"))


def test_penultimate_equals_torchvision_pooled_output(tmp_path, image_folder):
    """Stored penultimate rows == torchvision's own avgpool+flatten output on the same batch."""
    out = tmp_path / "c.h5"
    extract(image_folder, out, model="resnet18", weights="none", image_size=40, device="cpu",
            workers=0, progress=False, seed=11, val_fraction=0, test_fraction=0)
    backbone = build_backbone("resnet18", resolve_weights("none"), seed=11, image_size=40)
    net = backbone.model.eval()
    net.fc = torch.nn.Identity()  # torchvision's forward now ends at flatten(avgpool(layer4))
    from featurekit._decode import CpuDataset
    from featurekit.data import open_source

    src = open_source(image_folder, val_fraction=0, test_fraction=0)
    with open_cache(out) as c:
        paths = c.paths("train")
        stored = c.features("train", "penultimate")
    ds = CpuDataset(src, src.splits["train"], backbone.preprocess)  # extract's own decoding
    assert [it.path for it in ds.items] == paths
    batch = torch.stack([ds[i][1] for i in range(len(ds))])
    with torch.inference_mode():
        ref = net(batch).numpy()
    assert stored.shape == ref.shape == (18, 512)
    assert np.max(np.abs(stored - ref)) <= 1e-5


def test_preprocess_matches_the_weights_own_transforms(image_folder):
    """Default preprocessing is exactly torchvision's weights.transforms()."""
    from torchvision.models import ResNet50_Weights

    from featurekit.data import load_image

    ours = default_preprocess("resnet50")
    assert (ours.resize_size, ours.crop_size) == (232, 224)
    theirs = ResNet50_Weights.DEFAULT.transforms()
    img = load_image(next(image_folder.glob("cat/*.jpg")))
    # same pixels; float rounding of the [0, 1] scaling may differ by an ulp
    np.testing.assert_allclose(ours.transform()(img).numpy(), theirs(img).numpy(), atol=1e-6)
    assert Preprocess.from_dict(json.loads(json.dumps(ours.to_dict()))) == ours


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_pooled_intermediate_shapes(tmp_path, image_folder, pool):
    out = tmp_path / f"{pool}.h5"
    extract(image_folder, out, model="resnet18", weights="none", image_size=64,
            layers="layer1,layer2,layer3,layer4,penultimate", pool=pool, device="cpu",
            workers=0, progress=False, seed=1)
    with open_cache(out) as c:
        assert {layer: c.dim(layer) for layer in c.layers} == {
            "layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512, "penultimate": 512}
        l4 = c.features("train", "layer4")
        pen = c.features("train", "penultimate")
    if pool == "avg":  # penultimate is the average pool of layer4
        np.testing.assert_allclose(l4, pen, atol=1e-5)
    else:  # layer4 is 2x2 at 64 px: max over positions >= their mean, strictly somewhere
        assert np.all(l4 >= pen - 1e-5) and np.any(l4 > pen + 1e-3)


def test_float16_storage_and_block_reads(tmp_path, image_folder):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    extract(image_folder, a, model="resnet18", weights="none", image_size=32, device="cpu",
            workers=0, progress=False)
    extract(image_folder, b, model="resnet18", weights="none", image_size=32, device="cpu",
            workers=0, progress=False, dtype="float16")
    with open_cache(a) as ca, open_cache(b) as cb, h5py.File(b) as raw:
        assert raw["train"]["features"]["penultimate"].dtype == np.float16
        x32, x16 = ca.features("train", "penultimate"), cb.features("train", "penultimate")
        assert x16.dtype == np.float32
        np.testing.assert_allclose(x16, x32, rtol=2e-3, atol=1e-3)
        # reading in small row blocks gives the same array as one read
        np.testing.assert_array_equal(ca.features("train", "penultimate", block_rows=5), x32)


def test_split_folders_and_csv_sources(tmp_path, image_folder):
    rng_root = tmp_path / "split"
    for split in ("train", "test"):
        for cls in ("cat", "owl"):
            for img in sorted((image_folder / cls).iterdir())[:3]:
                (rng_root / split / cls).mkdir(parents=True, exist_ok=True)
                (rng_root / split / cls / img.name).write_bytes(img.read_bytes())
    out = tmp_path / "s.h5"
    extract(rng_root, out, model="resnet18", weights="none", image_size=32, device="cpu",
            workers=0, progress=False)
    with open_cache(out) as c:
        assert c.splits == ["train", "test"] and c.classes == ["cat", "owl"]
        assert c.attrs["source"]["split_origin"] == "given"
        assert c.paths("test")[0].startswith("test/cat/")
        assert c.n_rows("train") == c.n_rows("test") == 6

    csv = image_folder / "list.csv"
    rows = ["path,label,split"] + [
        f"{p.relative_to(image_folder).as_posix()},{p.parent.name},{'val' if i % 2 else 'train'}"
        for i, p in enumerate(sorted(image_folder.rglob("*.jpg")))
    ]
    csv.write_text("\n".join(rows) + "\n")
    out2 = tmp_path / "csv.h5"
    extract(csv, out2, model="resnet18", weights="none", image_size=32, device="cpu",
            workers=0, progress=False)
    with open_cache(out2) as c:
        assert c.splits == ["train", "val"]
        assert c.n_rows("train") + c.n_rows("val") == 12
        assert c.attrs["source"]["kind"] == "csv"


def test_state_dict_weights_are_loaded_and_hashed(tmp_path, image_folder):
    """--weights PATH loads with weights_only=True; same tensors -> same features; sha recorded."""
    torch.manual_seed(5)
    from torchvision.models import resnet18

    path = tmp_path / "w.pt"
    torch.save(resnet18().state_dict(), path)
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    one_split = dict(val_fraction=0, test_fraction=0)
    extract(image_folder, a, model="resnet18", weights=str(path), image_size=32, device="cpu",
            workers=0, progress=False, **one_split)
    extract(image_folder, b, model="resnet18", weights="none", seed=5, image_size=32,
            device="cpu", workers=0, progress=False, **one_split)
    import hashlib

    with open_cache(a) as ca, open_cache(b) as cb:
        assert ca.attrs["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        np.testing.assert_array_equal(ca.features("train", "penultimate"), cb.features("train", "penultimate"))


def test_corrupt_files_are_skipped_not_fatal(tmp_path, image_folder, runner):
    good = next((image_folder / "dog").glob("*.jpg")).read_bytes()
    (image_folder / "dog" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (image_folder / "dog" / "notes.jpg").write_text("this is not an image\n")
    out = tmp_path / "bad.h5"
    r = invoke(runner, "extract", image_folder, "--out", out, *TINY, "--val-fraction", "0",
               "--test-fraction", "0")
    assert r.exit_code == 0, r.stderr
    assert "2 skipped" in r.stderr
    with open_cache(out) as c:
        skipped = dict(c.skipped("train"))
        assert set(skipped) == {"dog/truncated.jpg", "dog/notes.jpg"}
        assert all(reason for reason in skipped.values())
        assert c.n_rows("train") == 18
        assert "dog/truncated.jpg" not in c.paths("train")
    r = invoke(runner, "info", out)
    assert "dog/notes.jpg" in r.stdout


def test_extract_json_is_the_only_stdout(tmp_path, image_folder, runner):
    r = invoke(runner, "extract", image_folder, "--out", tmp_path / "j.h5", *TINY, "--json")
    assert r.exit_code == 0
    summary = json.loads(r.stdout)
    assert summary["rows"] == 18 and summary["skipped"] == 0
    assert summary["layers"] == {"penultimate": 512}


def test_extract_path_imports_no_sklearn_or_matplotlib(tmp_path, image_folder):
    """Start-up is part of extract's cost: the folder path must not pay for sklearn/matplotlib."""
    code = (
        "import sys\n"
        "from featurekit.cli import main\n"
        f"sys.argv = ['featurekit', 'extract', {str(image_folder)!r}, '--out', "
        f"{str(tmp_path / 'x.h5')!r}, " + ", ".join(repr(a) for a in TINY) + "]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "bad = [m for m in ('sklearn', 'matplotlib', 'scipy') if m in sys.modules]\n"
        "print('HEAVY', bad)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout


def test_package_exports_lazily():
    code = "import sys, featurekit; print('h5py' in sys.modules, 'torch' in sys.modules); print(featurekit.open_cache.__module__)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["False", "False", "featurekit.cache"]


def test_module_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "featurekit", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "extract" in r.stdout


def test_demo_runs_offline(tmp_path, runner):
    r = invoke(runner, "demo", "--out", tmp_path / "demo")
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "demo" / "digits.h5").is_file()
    with open_cache(tmp_path / "demo" / "digits.h5") as c:
        assert sum(c.n_rows(s) for s in c.splits) == 1797
        assert c.attrs["preprocess"]["crop_size"] == 64
    assert "complete" in r.stdout


@pytest.fixture(scope="module")
def digits_jpegs(tmp_path_factory):
    """scikit-learn's digits as 24 x 24 JPEGs in class folders (a JPEG source with 10 classes)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("dj") / "digits"
    d = load_digits()
    for i, (img, t) in enumerate(zip(d.images, d.target)):
        (root / str(t)).mkdir(parents=True, exist_ok=True)
        im = Image.fromarray((img * 255 / 16).astype("uint8")).resize((24, 24), Image.BILINEAR)
        im.convert("RGB").save(root / str(t) / f"{i:04d}.jpg", quality=95)
    return root


def test_decode_paths_agree(tmp_path, digits_jpegs):
    """torchvision-on-CPU (cpu path), batched decode on the device ('gpu' path, run here on
    the CPU with the code the GPU runs) and PIL give the same features (mean cosine >= 0.999),
    and a head fitted on one cache scores within 0.5 points on the other."""
    from featurekit.fit import fit_head
    from featurekit.headfile import load_head, save_head

    common = dict(model="resnet18", weights="none", image_size=32, device="cpu", workers=0,
                  progress=False)
    a, b = tmp_path / "cpu.h5", tmp_path / "dev.h5"
    extract(digits_jpegs, a, decode="cpu", **common)
    extract(digits_jpegs, b, decode="gpu", **common)
    with open_cache(a) as ca, open_cache(b) as cb:
        assert ca.attrs["decode"] == "cpu" and cb.attrs["decode"] == "gpu"
        for s in ca.splits:
            assert ca.paths(s) == cb.paths(s)
            x, y = ca.features(s, "penultimate"), cb.features(s, "penultimate")
            cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
            assert cos.mean() >= 0.999, cos.mean()
        yt, xt = cb.labels("test"), cb.features("test", "penultimate")
    result = fit_head(a, "svm")
    head = tmp_path / "h.skops"
    save_head(result, head)
    other = float(np.mean(load_head(head)["head"].predict(xt) == yt))
    assert abs(other - result.report["accuracy"]) <= 0.005, (other, result.report["accuracy"])


def test_gpu_suite_help_and_no_gpu():
    """benchmarks/gpu_suite.py: --help works anywhere; without a GPU one line, exit 2."""
    import subprocess
    import sys
    from pathlib import Path

    import torch

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_suite.py"
    r = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "OUT_DIR" in r.stdout
    if torch.cuda.is_available():
        return
    r = subprocess.run([sys.executable, str(script), "/nonexistent-out"], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "no CUDA GPU" in r.stderr
    assert not Path("/nonexistent-out").exists()


def test_gpu_suite_code_runs_in_cpu_smoke_mode(tmp_path):
    """The GPU suite's stages (correctness checks, agreement, ceilings, extract processes) run
    end to end on tiny data on the CPU, so a GPU session's few minutes are not lost to a broken
    script."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_suite.py"
    env = {**os.environ, "FEATUREKIT_BENCH_WORK": str(tmp_path / "work")}
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "out"), "--cpu-smoke",
                        "--images", "24", "--budget", "900"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((tmp_path / "out" / "gpu-suite.json").read_text())
    stages = res["stages"]
    assert set(stages) == {"correctness", "agreement", "ceilings", "extract", "finetune"}
    assert stages["finetune"]["32px"]["ratio"] > 0
    assert not any("failed" in v or "skipped" in v for v in stages.values())
    checks = stages["correctness"]["checks"]
    assert set(checks) == {"photos", "stream_race", "svm_budget", "lbfgs_budget", "finetune_fp16",
                           "torch_vs_sklearn", "probes"}
    assert stages["correctness"]["passed"] and all(c["passed"] for c in checks.values()), checks
    assert checks["photos"]["paths"]["gpu"]["min_cosine"] >= 0.999
    assert all(f"PASS {name}:" in r.stdout for name in checks)
    agree = stages["agreement"]
    assert agree["gpu"]["mean_cosine_vs_cpu"] >= 0.999 and agree["gpu"]["points_vs_cpu"] <= 0.5
    assert agree["awkward"]["cpu"]["skipped"] == agree["awkward"]["gpu"]["skipped"]
    # both measured (no comparison of the two: wall times on a loaded 2-core machine cross)
    assert stages["extract"]["resnet18"]["process_seconds"] > 0 < stages["extract"]["imports_process_seconds"]
    # a second run into the same folder never replaces the first one's results unasked
    before = (tmp_path / "out" / "gpu-suite.json").read_bytes()
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "out"), "--cpu-smoke"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "--overwrite" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (tmp_path / "out" / "gpu-suite.json").read_bytes() == before
