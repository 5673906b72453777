"""Every GPU benchmark of featurekit in one call, in at most about 6 minutes on an H100/H200.

    python benchmarks/gpu_suite.py OUT_DIR                  # everything
    python benchmarks/gpu_suite.py OUT_DIR --budget 300     # a tighter time budget

Stages, in order (each writes its results into OUT_DIR/gpu-suite.json as soon as it ends, so a
run cut short keeps what it measured; a stage that would start past the budget is recorded as
skipped):

0. ``correctness`` (about 2 minutes, before anything is timed; ``benchmarks/gpu_correctness.py``):
   photo-sized JPEGs of six kinds through every decode path against the CPU path (minimum
   cosine per image), a stream-race probe of nvJPEG's own stream, the torch SVM and the batched
   L-BFGS near their memory budgets (peak memory), a two-epoch fp16 finetune, torch vs
   scikit-learn heads on one cache; PASS/FAIL per check with its figure.
1. ``agreement`` -- digits written as 64-px JPEGs, resnet18 ``--weights none``: extract with
   ``--decode cpu``, ``gpu`` (nvJPEG) and ``hw`` (nvImageCodec's JPEG engines, where they work);
   mean cosine of each GPU path's features against the CPU path's (goal >= 0.999) and an SVM
   fitted on the CPU cache scored on each (within 0.5 points), plus the awkward-file corpus
   (skipped files and their reasons per path).
2. ``ceilings`` -- 16,384 generated JPEGs of 300-640 px: decode ceilings from memory (4,096
   images; nvJPEG, the JPEG engines, each alone and with extract's batch preprocessing; one CPU
   core, extrapolated to all cores and marked so) and through extract's own pipeline without a
   model (after extract's own warm-up rule, and over the whole pass), for every decode path; bare forward bf16
   channels_last, eager for resnet50 and resnet18, compiled for resnet50 only (trimmed).
3. ``extract`` -- ``featurekit extract`` as whole processes over the 16,384 JPEGs: resnet50 and
   resnet18 with the default decode (``auto``: the JPEG engines where they work), resnet50 with
   ``--decode gpu``, resnet50 ``--compile`` twice (the second run shows what the compilation
   cache saves); and a process doing only the imports extract needs, so that "whole process
   minus interpreter start-up and imports" is measured in the same run (goal: <= 1.5 s +
   images / steady rate). Naive baseline (PIL DataLoader, fp32) on 2,048 images (trimmed).
4. ``heads`` -- ``bench_heads.py --setting gpu`` (50,000 x 2,048 x 100 classes) in the time
   left: torch rows in full, scikit-learn extrapolated from sampled grid points with a
   shortened per-fit budget (marked in its JSON); cut at the suite's budget. (Stage 4 runs
   after ``finetune``.)
5. ``finetune`` (issue 24) -- ``finetune``'s training throughput against a bare step on tensors
   in memory (``bench_finetune.py``), resnet18 batch 64 at 32 px (the set decoded into GPU
   memory, shifted by the batch) and 224 px (the DataLoader path); goal >= 0.8x.
6. ``study`` (issue 24, in the time left, about 3 minutes) -- ``featurekit study`` on 8,600
   generated JPEGs (about 6,000 training images, 8 classes) at 224 px, resnet50, variants probe
   and full, 1 epoch: seconds per stage.

The k-NN and few-shot settings of ``bench_probes.py --setting gpu`` are not in the suite (run
them alone when time is left); ``correctness`` checks their GPU code (``probes``).

Without a CUDA GPU the suite says so in one line and exits with status 2. Record the figures in
benchmarks/RESULTS.md with the machine block of the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

GOALS = {"resnet50_steady": 10_000, "resnet50_steady_moonshot": 14_000, "resnet18_steady": 14_000,
         "fixed_seconds_max": 1.5, "agreement_cosine_min": 0.999, "agreement_points_max": 0.5}
IMPORTS = ("import torch, torchvision, h5py, numpy; import featurekit.cli, featurekit.extraction, "
           "featurekit._decode, featurekit._resize, featurekit.models, featurekit.cache, "
           "featurekit._pipeline")  # CUDA initialisation is a fixed cost of extract, not an import


class Suite:
    """The results so far, written after every stage; the clock against the budget."""

    def __init__(self, out: Path, budget: float) -> None:
        self.out, self.budget, self.t0 = out, budget, time.perf_counter()
        self.path = out / "gpu-suite.json"
        self.results: dict = {"benchmark": "gpu_suite", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "budget_seconds": budget, "goals": GOALS, "stages": {}}

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def stage(self, name: str, needs: float, fn, *args) -> None:
        if self.left() < needs:
            self.results["stages"][name] = {"skipped": f"out of time ({self.left():.0f} s left, needs ~{needs:.0f} s)"}
        else:
            t = time.perf_counter()
            try:
                self.results["stages"][name] = fn(*args)
            except (Exception, SystemExit) as exc:  # one stage failing must not lose the others
                self.results["stages"][name] = {"failed": f"{type(exc).__name__}: {exc}"[:2000]}
            self.results["stages"][name]["stage_seconds"] = time.perf_counter() - t
        self.results["elapsed_seconds"] = time.perf_counter() - self.t0
        self.path.write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        print(f"[{self.results['elapsed_seconds']:6.1f} s] {name}: "
              f"{json.dumps(self.results['stages'][name], default=str)[:400]}", flush=True)


def _gpu_decodes(device: str) -> list[str]:
    """The GPU decode paths to compare with ``cpu`` (on the CPU, smoke mode: ``gpu``'s code
    with torchvision's CPU decoder)."""
    from benchmarks.bench_extract import decode_paths

    return [p for p in decode_paths(device) if p != "cpu"]


def agreement(work: Path, device: str) -> dict:
    """Each GPU decode path against the CPU path on digits-as-JPEG, and the awkward files."""
    import numpy as np

    from featurekit.cache import open_cache
    from featurekit import extract
    from featurekit.fit import fit_head

    folder = _digits_jpegs(work / "digits-jpeg")
    common = dict(model="resnet18", weights="none", image_size=64, device=device,
                  progress=False, overwrite=True)
    caches = {}
    for decode in ["cpu", *_gpu_decodes(device)]:
        caches[decode] = work / f"agree-{decode}.h5"
        extract(folder, caches[decode], decode=decode, **common)
    result = fit_head(caches["cpu"], "svm")
    out: dict = {"cpu_svm_accuracy": result.report["accuracy"]}
    with open_cache(caches["cpu"]) as ref:
        for decode, path in caches.items():
            with open_cache(path) as c:
                cos = []
                for s in ref.splits:
                    x, y = ref.features(s, "penultimate"), c.features(s, "penultimate")
                    cos.append((x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)))
                xt, yt = c.features("test", "penultimate"), c.labels("test")
                acc = float(np.mean(result.head.predict(xt) == yt))
                out[decode] = {"decode_attr": c.attrs["decode"],
                               "mean_cosine_vs_cpu": float(np.concatenate(cos).mean()),
                               "svm_accuracy": acc,
                               "points_vs_cpu": 100 * abs(acc - result.report["accuracy"])}
    out["awkward"] = _awkward(work, common)
    return out


def correctness(work: Path, device: str, smoke: bool) -> dict:
    """Stage 0: the GPU paths compute the right thing (see benchmarks/gpu_correctness.py)."""
    from benchmarks.gpu_correctness import run

    return run(work, device, smoke)


def _awkward(work: Path, common: dict) -> dict:
    """Damaged, empty, CMYK, PNG and EXIF-rotated files through every decode path: the files
    cached and the reasons of those skipped, per path (they should agree)."""
    import io

    import numpy as np
    from PIL import Image

    from featurekit.cache import open_cache
    from featurekit import extract

    root = work / "awkward"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for k in range(6):
            arr = np.random.default_rng(k).integers(0, 256, (48 + 8 * k, 64, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"ok{k}.jpg", quality=90)
    good = (root / "a" / "ok0.jpg").read_bytes()
    (root / "a" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "a" / "empty.jpg").write_bytes(b"")
    (root / "a" / "junk.jpg").write_bytes(b"\xff\xd8\xff" + os.urandom(200))
    Image.new("CMYK", (40, 30), (10, 20, 30, 40)).save(root / "b" / "cmyk.jpg")
    Image.new("RGB", (33, 44), (10, 200, 30)).save(root / "b" / "p.png")
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((20, 50, 3), np.uint8)).save(buf, "JPEG", exif=exif)
    (root / "b" / "rotated.jpg").write_bytes(buf.getvalue())
    out = {}
    for decode in ["cpu", *_gpu_decodes(common["device"])]:
        path = work / f"awkward-{decode}.h5"
        extract(root, path, decode=decode, val_fraction=0, test_fraction=0, **common)
        with open_cache(path) as c:
            out[decode] = {"rows": c.n_rows("train"), "skipped": c.skipped("train")}
    return out


def _digits_jpegs(folder: Path) -> Path:
    from PIL import Image
    from sklearn.datasets import load_digits

    if (folder / ".done").exists():
        return folder
    d = load_digits()
    for i, (img, t) in enumerate(zip(d.images, d.target)):
        (folder / str(t)).mkdir(parents=True, exist_ok=True)
        im = Image.fromarray((img * 255 / 16).astype("uint8")).resize((64, 64), Image.BILINEAR)
        im.convert("RGB").save(folder / str(t) / f"{i:04d}.jpg", quality=95)
    (folder / ".done").touch()
    return folder


def ceilings(folder: Path, workers: int, device: str, smoke: bool) -> dict:
    from benchmarks.bench_extract import decode_ceilings, decode_from_memory, forward_ceilings

    out = {}
    batch = 8 if smoke else 256
    for model in ("resnet50", "resnet18"):
        r = {}
        if model == "resnet50":
            r.update(decode_from_memory(folder, model, device, batch, 32 if smoke else 4096))
            r.update(decode_ceilings(folder, model, device, batch, workers))
        r.update(forward_ceilings(model, device, batch, 2 if smoke else 30,
                                  compile_too=model == "resnet50" and not smoke))
        out[model] = r
    out["trimmed"] = ("decode ceilings for resnet50's preprocessing only (resnet18's is the same); "
                      "compiled forward for resnet50 only; CPU decode from one core x cores")
    return out


def extract_runs(folder: Path, work: Path, images: int, device: str, smoke: bool) -> dict:
    from benchmarks.bench_extract import extract_process, naive_baseline

    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", IMPORTS], check=True, cwd=HERE.parent)
    imports = time.perf_counter() - t
    out: dict = {"images": images, "imports_process_seconds": imports}
    out_h5 = work / "suite.h5"
    runs = {"resnet50": ("resnet50", []), "resnet18": ("resnet18", []),
            "resnet50_decode_gpu": ("resnet50", ["--decode", _gpu_decodes(device)[0]])}
    if not smoke:
        runs.update({"resnet50_compile_first": ("resnet50", ["--compile"]),
                     "resnet50_compile_second": ("resnet50", ["--compile"])})
    # --compile: a fresh inductor cache for this suite run, so the first run is a cold
    # compilation and the second shows what the cache saves
    env = {"TORCHINDUCTOR_CACHE_DIR": str(work / f"inductor-{os.getpid()}")}
    for name, (model, extra) in runs.items():
        try:
            r = extract_process(folder, model, device, out_h5, extra, env)
        except RuntimeError as exc:  # one variant failing (e.g. --compile) keeps the others
            out[name] = {"failed": str(exc)[:2000]}
            continue
        r["steady"] = r["steady_images_per_second"] or r["pass_images_per_second"]
        r["fixed_seconds"] = r["process_seconds"] - imports - images / r["steady"]
        out[name] = r
    out["naive_resnet50"] = naive_baseline(folder, "resnet50", device, 8 if smoke else 256,
                                           2 if smoke else 16, 16 if smoke else 2048)
    ok = {k: v for k, v in out.items() if isinstance(v, dict) and "steady" in v}
    out["goals_met"] = {
        "resnet50_steady": ok["resnet50"]["steady"] >= GOALS["resnet50_steady"] if "resnet50" in ok else None,
        "resnet18_steady": ok["resnet18"]["steady"] >= GOALS["resnet18_steady"] if "resnet18" in ok else None,
        "fixed_seconds": max((ok[k]["fixed_seconds"] for k in ("resnet50", "resnet18") if k in ok),
                             default=float("inf")) <= GOALS["fixed_seconds_max"],
    }
    return out


def heads(out: Path, seconds: float) -> dict:
    cmd = [sys.executable, str(HERE / "bench_heads.py"), "--setting", "gpu", "--budget", "20",
           "--backends", "torch,sklearn", "--results", str(out)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(10.0, seconds), cwd=HERE.parent)
        return {"returncode": r.returncode, "tail": r.stdout[-3000:] + r.stderr[-1500:],
                "trimmed": "scikit-learn fits cut at 20 s each (extrapolated, marked in its JSON)"}
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")[-3000:]
        partial = out / "heads-gpu.json"  # bench_heads writes its rows as they end
        return {"cut": f"at the suite's budget ({seconds:.0f} s); rows so far in {partial}",
                "tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}


def finetune_throughput(device: str, smoke: bool) -> dict:
    """finetune's training throughput against a bare step on tensors in memory
    (benchmarks/bench_finetune.py): 32 px (the set decoded into GPU memory) and 224 px (the
    DataLoader path); goal >= 0.8x on a GPU."""
    from benchmarks.bench_finetune import bare_rate, featurekit_train_rate

    out: dict = {"goal": 0.8 if device.startswith("cuda") else 0.9}
    for size in ([32] if smoke else [32, 224]):
        fk = featurekit_train_rate(size, 64, device, None)
        bare = bare_rate(size, 64, device)
        out[f"{size}px"] = {"featurekit_images_per_second": fk, "bare_images_per_second": bare,
                            "ratio": fk / bare}
    out["goal_met"] = all(v["ratio"] >= out["goal"] for k, v in out.items() if k.endswith("px"))
    return out


def study_stage(work: Path, device: str) -> dict:
    """featurekit study at a seed-like scale: 8,600 JPEGs (about 6,000 training images) in 8
    classes at 224 px, resnet50, variants probe and full, 1 epoch each; seconds per stage."""
    import json as _json
    import subprocess

    from benchmarks.bench_extract import make_varied_jpegs

    folder = make_varied_jpegs(work.parent / "varied-jpegs-8600", 8600)
    out = work / "study"
    args = [sys.executable, "-m", "featurekit", "study", str(folder), "--out", str(out), "--overwrite",
            "--model", "resnet50", "--weights", "none", "--image-size", "224", "--epochs", "1",
            "--variants", "probe,full", "--heads", "logistic,knn", "--draws", "5",
            "--device", device, "--no-progress"]
    t0 = time.perf_counter()
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr[-1500:])
    stages = {_json.loads(p.read_text())["stage"]: _json.loads(p.read_text())["result"]["seconds"]
              for p in out.rglob("stage.json")}
    return {"process_seconds": time.perf_counter() - t0, "stages": stages}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="folder for gpu-suite.json (and the heads' JSON)")
    ap.add_argument("--budget", type=float, default=350.0, help="seconds for the whole suite")
    ap.add_argument("--images", type=int, default=16384)
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--overwrite", action="store_true",
                    help="replace gpu-suite.json / heads-gpu.json already in OUT_DIR")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="check the script's code without a GPU: tiny data on the CPU, no heads; "
                         "its figures mean nothing")
    args = ap.parse_args()
    import torch

    if args.cpu_smoke:
        args.images, args.workers = min(args.images, 48), min(args.workers, 1)
    elif not torch.cuda.is_available():
        print("gpu_suite: no CUDA GPU here (torch.cuda.is_available() is False); run it on a "
              "machine with an NVIDIA GPU", file=sys.stderr)
        raise SystemExit(2)
    from benchmarks.bench_extract import WORK, machine, make_varied_jpegs
    from featurekit.errors import OutputError
    from featurekit._outputs import check_output_folder

    try:  # results of an earlier run are never replaced unasked
        check_output_folder(args.out, ["gpu-suite.json", "heads-gpu.json"], args.overwrite)
    except OutputError as exc:
        print(f"gpu_suite: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    args.out.mkdir(parents=True, exist_ok=True)
    suite = Suite(args.out, args.budget)
    suite.results["machine"] = machine()
    work = WORK / "gpu-suite"
    work.mkdir(parents=True, exist_ok=True)
    folder = make_varied_jpegs(WORK / f"varied-jpegs-{args.images}", args.images)
    suite.results["data_seconds"] = time.perf_counter() - suite.t0
    dev = "cpu" if args.cpu_smoke else "cuda"
    suite.results["cpu_smoke"] = args.cpu_smoke
    suite.stage("correctness", 10, correctness, work, dev, args.cpu_smoke)
    suite.stage("agreement", 20, agreement, work, dev)
    suite.stage("ceilings", 40, ceilings, folder, args.workers, dev, args.cpu_smoke)
    suite.stage("extract", 90, extract_runs, folder, work, args.images, dev, args.cpu_smoke)
    suite.stage("finetune", 30, finetune_throughput, dev, args.cpu_smoke)
    if not args.cpu_smoke:
        suite.stage("heads", 30, heads, args.out, suite.left() - 5)
        suite.stage("study", 180, study_stage, work, dev)
    failed = [k for k, v in suite.results["stages"].items()
              if "failed" in v or v.get("passed") is False]
    print(f"results in {suite.path}")
    if failed:
        raise SystemExit(f"gpu_suite: stage(s) failed: {', '.join(failed)} (see the JSON)")


if __name__ == "__main__":
    main()
