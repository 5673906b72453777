"""The GPU suite's first stage (issue 22): is what the GPU paths compute right, before anything
is timed. Each check prints ``PASS``/``FAIL`` with its figure and goes into the suite's JSON:

* ``photos`` -- photo-sized JPEGs (1024 x 768: baseline 4:2:0, progressive, 4:4:4, EXIF
  orientation 6, greyscale, CMYK) through ``extract`` with every decode path; per image the
  cosine of its features against the CPU path's (the minimum must be >= 0.999, not the mean),
  and the path each cache says ran;
* ``stream_race`` -- memory a queued kernel still reads is freed and a large batch is decoded
  at once (nvJPEG writes on its own stream): the decoded images must equal the same images
  decoded in isolation, and the kernel's result its result in isolation, every round (also run
  without ``stream_safe``, to show whether the race shows on this GPU: informative);
* ``svm_budget`` / ``lbfgs_budget`` -- the torch SVM and the batched L-BFGS at sizes near their
  memory budgets: peak memory (``max_memory_allocated``) within budget + data + a margin, and
  the budgeted L-BFGS equal to one batch;
* ``finetune_fp16`` -- two epochs in fp16 (GradScaler): finite losses, a val accuracy;
* ``torch_vs_sklearn`` -- logistic regression by both backends on the same cache: within 0.5
  points of accuracy;
* ``probes`` (issue 23) -- the k-NN head on the device against scikit-learn's (>= 99.5% same
  predictions; similarities in blocks under a budget that forces several) and the few-shot
  batch (every draw in one batched L-BFGS on the device) against each draw fitted alone
  (>= 99% same predictions per draw).

``--cpu-smoke`` runs the same code on the CPU with tiny sizes (its figures mean nothing).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

PHOTO = (1024, 768)
COSINE_MIN = 0.999


def run(work: Path, device: str, smoke: bool) -> dict:
    """Every check; ``passed``: all of them passed."""
    checks = {}
    for name, fn in (("photos", photos), ("stream_race", stream_race), ("svm_budget", svm_budget),
                     ("lbfgs_budget", lbfgs_budget), ("finetune_fp16", finetune_fp16),
                     ("torch_vs_sklearn", torch_vs_sklearn), ("probes", probes)):
        t = time.perf_counter()
        try:
            checks[name] = fn(work, device, smoke)
        except Exception as exc:  # a check that cannot run is a FAIL with its reason
            checks[name] = {"passed": False, "error": f"{type(exc).__name__}: {exc}"[:1000]}
        checks[name]["seconds"] = round(time.perf_counter() - t, 2)
        verdict = "PASS" if checks[name].get("passed") else "FAIL"
        print(f"  {verdict} {name}: {checks[name].get('figure', checks[name].get('error', ''))}",
              flush=True)
    return {"passed": all(c.get("passed") for c in checks.values()), "checks": checks}


def _photo_folder(root: Path, size: tuple[int, int]) -> Path:
    """Six kinds of photo-sized JPEG, four of each, in two classes."""
    from PIL import Image

    if (root / ".done").exists():
        return root
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for k in range(4):
        rng = np.random.default_rng(k)
        base = np.stack([(xx * (k + 1)) % 256, (yy * 3 + k * 40) % 256, (xx + yy) % 256], -1)
        arr = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        im = Image.fromarray(arr)
        cls = root / ("a" if k % 2 else "b")
        cls.mkdir(parents=True, exist_ok=True)
        im.save(cls / f"baseline{k}.jpg", quality=90)
        im.save(cls / f"progressive{k}.jpg", quality=90, progressive=True)
        im.save(cls / f"s444_{k}.jpg", quality=92, subsampling=0)
        exif = Image.Exif()
        exif[0x0112] = 6
        im.save(cls / f"exif6_{k}.jpg", quality=90, exif=exif)
        im.convert("L").save(cls / f"grey{k}.jpg", quality=90)
        im.convert("CMYK").save(cls / f"cmyk{k}.jpg", quality=90)
    (root / ".done").touch()
    return root


def photos(work: Path, device: str, smoke: bool) -> dict:
    from benchmarks.bench_extract import decode_paths
    from featurekit import extract
    from featurekit.cache import open_cache

    folder = _photo_folder(work / ("photos-smoke" if smoke else "photos"), (256, 192) if smoke else PHOTO)
    common = dict(model="resnet18", weights="none", image_size=224, device=device, progress=False,
                  overwrite=True, val_fraction=0, test_fraction=0)
    caches = {}
    for decode in decode_paths(device):
        caches[decode] = work / f"photos-{decode}.h5"
        extract(folder, caches[decode], decode=decode, **common)
    out: dict = {}
    with open_cache(caches["cpu"]) as ref:
        x, paths = ref.features("train", "penultimate"), ref.paths("train")
        for decode, path in caches.items():
            if decode == "cpu":
                continue
            with open_cache(path) as c:
                assert c.paths("train") == paths, "the paths differ from the CPU path's"
                y = c.features("train", "penultimate")
                cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
                worst = int(np.argmin(cos))
                out[decode] = {"ran": c.attrs["decode"], "min_cosine": float(cos[worst]),
                               "worst_image": paths[worst], "skipped": len(c.skipped("train"))}
    passed = all(v["min_cosine"] >= COSINE_MIN and v["skipped"] == 0 for v in out.values())
    figure = ", ".join(f"{k} (ran {v['ran']}): min cosine {v['min_cosine']:.5f} at {v['worst_image']}"
                       for k, v in out.items()) or "no GPU decode path here"
    return {"passed": passed, "figure": figure, "paths": out, "goal": f"min cosine >= {COSINE_MIN}"}


def stream_race(work: Path, device: str, smoke: bool, rounds: int = 20) -> dict:
    """A queued kernel reads a tensor; the tensor is freed; a batch of large JPEGs is decoded
    at once on the same (current) stream's allocator. Guarded (featurekit's path) and raw."""
    import torch
    from torchvision.io import encode_jpeg

    from featurekit import _decode

    g = torch.Generator().manual_seed(0)
    h, w = (192, 256) if smoke else (PHOTO[1], PHOTO[0])
    jpegs = [encode_jpeg(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g), quality=95)
             for _ in range(8)]
    reference = _decode._decode_batch(jpegs, device, None)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    base = torch.randn(2048 if not smoke else 128, 2048 if not smoke else 128, device=device, generator=None)
    out = {}
    for guarded in (True, False):
        bad_images = bad_sums = 0
        for _ in range(rounds):
            a = base.clone()
            total = a @ a  # queued on the current stream, reading a
            for _ in range(8):
                total = total @ a / a.shape[0]  # a long queue of kernels reading a
            del a  # its memory may now go to the decoder's outputs
            if guarded:
                images = _decode._decode_batch(jpegs, device, None)
            else:
                from torchvision.io import ImageReadMode, decode_jpeg

                images = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
            bad_images += sum(not torch.equal(x, r) for x, r in zip(images, reference))
            check = base.clone()
            again = check @ check
            for _ in range(8):
                again = again @ check / check.shape[0]
            bad_sums += int(not torch.allclose(total, again))
        out["guarded" if guarded else "raw"] = {"rounds": rounds, "images_differing": bad_images,
                                                "kernel_results_differing": bad_sums}
    passed = out["guarded"]["images_differing"] == 0 and out["guarded"]["kernel_results_differing"] == 0
    figure = (f"guarded: {out['guarded']['images_differing']} image(s) and "
              f"{out['guarded']['kernel_results_differing']} result(s) differ in {rounds} rounds; "
              f"raw decode_jpeg (informative): {out['raw']['images_differing']} and "
              f"{out['raw']['kernel_results_differing']}")
    return {"passed": passed, "figure": figure, **out}


def _mib(n) -> str:
    return "not measured (CPU)" if n is None else f"{n / 2**20:.0f} MiB"


def _peak(device: str):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return None


def _reset_peak(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return 0


def svm_budget(work: Path, device: str, smoke: bool) -> dict:
    """A binary problem whose kernel block is about the budget: peak within budget + rows +
    the solver's per-step state (margin: 25% of the budget)."""
    from featurekit.heads._torch._svm import TorchSVMHead

    n, d = (600, 32) if smoke else (16_000, 256)
    budget_mib = (n * n * 4 * 1.1) / (1 << 20)  # the block fits, with 10% to spare
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, d)).astype(np.float32)
    y = (X[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(int)
    start = _reset_peak(device)
    head = TorchSVMHead(C=1.0, device=device, cache_size=budget_mib, max_iter=200_000).fit(X, y)
    peak = _peak(device)
    allowed = start + budget_mib * (1 << 20) * 1.25 + 4 * X.nbytes
    passed = peak is None or peak <= allowed
    acc = float(np.mean(head.predict(X) == y))
    return {"passed": passed and acc > 0.8, "peak_bytes": peak, "allowed_bytes": int(allowed),
            "train_accuracy": acc, "rows": n,
            "figure": f"{n} rows: peak {_mib(peak)} (allowed {_mib(allowed)}), "
                      f"train accuracy {acc:.3f}"}


def lbfgs_budget(work: Path, device: str, smoke: bool) -> dict:
    """Six C values of a 100-class logistic regression under a budget that holds two at a
    time: peak within budget + rows (+25%), answers equal to the unbudgeted batch."""
    import torch

    from featurekit.heads._torch import _linear

    n, d, k = (400, 16, 10) if smoke else (20_000, 512, 100)
    rng = np.random.default_rng(1)
    X = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(0, k, n)
    grid = [{"C": c} for c in (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)]
    Xt = torch.as_tensor(X, device=device)
    per_member = 4 * (8 * n * k + 28 * (d + 1) * k)  # as members_per_batch counts them
    budget_mib = 2.2 * per_member / (1 << 20)  # two members at a time
    real = _linear.batch_on
    _linear.batch_on = lambda dev: True  # the GPU's batching, also in smoke mode
    try:
        one = _linear.TorchLogisticHead(device=device, memory_budget=1e7)._solve(
            Xt, y, np.unique(y), grid, None)
        start = _reset_peak(device)
        split = _linear.TorchLogisticHead(device=device, memory_budget=budget_mib)._solve(
            Xt, y, np.unique(y), grid, None)
        peak = _peak(device)
    finally:
        _linear.batch_on = real
    allowed = start + budget_mib * (1 << 20) * 1.25 + 4 * X.nbytes
    worst = max(float(np.abs(a["coef_"] - b["coef_"]).max()) for (a, _, _), (b, _, _) in zip(one, split))
    passed = (peak is None or peak <= allowed) and worst < 1e-3
    return {"passed": passed, "peak_bytes": peak, "allowed_bytes": int(allowed),
            "max_coef_difference": worst,
            "figure": f"peak {_mib(peak)} (allowed {_mib(allowed)}); "
                      f"coefficients vs one batch: max |diff| {worst:.2e}"}


def _digits_folder(work: Path) -> Path:
    from benchmarks.gpu_suite import _digits_jpegs

    return _digits_jpegs(work / "digits-jpeg")


def finetune_fp16(work: Path, device: str, smoke: bool) -> dict:
    import csv
    import math

    from featurekit.finetune import finetune

    run_dir = work / "ft-fp16"
    source = _photo_folder(work / "photos-smoke", (256, 192)) if smoke else _digits_folder(work)
    finetune(source, run_dir, model="resnet18", weights="none", image_size=64,
             epochs=1 if smoke else 2, device=device,
             precision="fp32" if not device.startswith("cuda") else "fp16",
             batch_size=64, progress=False, overwrite=True)
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    losses = [float(r["train_loss"]) for r in rows]
    acc = float(rows[-1]["val_acc"])
    passed = all(math.isfinite(v) for v in losses) and 0 <= acc <= 1
    return {"passed": passed, "train_losses": losses, "val_acc": acc,
            "figure": f"losses {', '.join(f'{v:.3f}' for v in losses)}; val accuracy {acc:.3f}"}


def torch_vs_sklearn(work: Path, device: str, smoke: bool) -> dict:
    from featurekit import extract
    from featurekit.fit import fit_head

    cache = work / "heads-agree.h5"
    extract(_digits_folder(work), cache, model="resnet18", weights="none", image_size=64,
            device=device, progress=False, overwrite=True)
    acc = {b: fit_head(cache, "logistic", backend=b, C=1.0).report["accuracy"]
           for b in ("torch", "sklearn")}
    gap = 100 * abs(acc["torch"] - acc["sklearn"])
    return {"passed": gap <= 0.5, "accuracy": acc, "points_apart": gap,
            "figure": f"logistic C=1: torch {acc['torch']:.4f}, scikit-learn {acc['sklearn']:.4f} "
                      f"({gap:.2f} points apart; goal <= 0.5)"}



def probes(work: Path, device: str, smoke: bool) -> dict:
    import featurekit
    from featurekit.fewshot import draw_order, shot_rows

    n, m, d, k = (600, 200, 32, 5) if smoke else (50_000, 5_000, 512, 100)
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(k, d)).astype(np.float32)
    y = rng.integers(0, k, n + m)
    X = np.maximum(centres[y] + 2.5 * rng.standard_normal((n + m, d), dtype=np.float32), 0)
    budget = 4 * m * 4096 / (1 << 20)  # MiB: blocks of 4,096 training rows at most
    gpu = featurekit.create_head("knn", "torch", k=20, device=device, memory_budget=budget)
    same_knn = float(np.mean(gpu.fit(X[:n], y[:n]).predict(X[n:]) ==
                             featurekit.create_head("knn", "sklearn", k=20).fit(X[:n], y[:n]).predict(X[n:])))
    orders = draw_order(y[:n], 10, 0)
    trains = [shot_rows(o, 5, range(k)) for o in orders]
    head = featurekit.create_head("logistic", "torch", C=0.1, device=device)
    together = head.fit_predict_draws(X[:n], y[:n], trains, [X[n:]] * len(trains))
    alone = [featurekit.create_head("logistic", "torch", C=0.1, device=device)
             .fit(X[r], y[r]).predict(X[n:]) for r in trains]
    same_draws = min(float(np.mean(a == b)) for a, b in zip(together, alone))
    passed = same_knn >= 0.995 and same_draws >= 0.99
    return {"passed": passed, "knn_same_predictions": same_knn, "draws_min_same_predictions": same_draws,
            "figure": f"knn on {device} vs scikit-learn: {same_knn:.2%} same predictions; "
                      f"10 draws in one batch vs alone: >= {same_draws:.2%} same"}
