"""``featurekit study`` on the digits, wall-clock per stage (issue 24).

The machines here cannot download ImageNet weights, so a short scratch run's checkpoint
(``finetune digits --weights none --epochs 2``) serves as the "pretrained" weights; then the
whole study (resnet18, 32 px, 1 epoch per variant, every variant, the default heads, the
layer-wise probe and few-shot curve) runs as one process. Recorded: each stage's seconds (from
its stamp), the whole process's, and the report's table.

    python benchmarks/bench_study.py                 # CPU
    python benchmarks/bench_study.py --device cuda --image-size 224 --model resnet50
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def featurekit(*args: str) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "featurekit", *args], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"failed: featurekit {' '.join(args)}\n{r.stderr[-2000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--image-size", default="32")
    ap.add_argument("--epochs", default="1")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    args = ap.parse_args()
    from benchmarks.bench_extract import machine, record

    common = ["--model", args.model, "--image-size", args.image_size, "--device", args.device,
              "--no-progress"]
    with tempfile.TemporaryDirectory() as tmp:
        pre, study = Path(tmp) / "pre", Path(tmp) / "study"
        pre_s = featurekit("finetune", "digits", "--out", str(pre), "--weights", "none",
                           "--epochs", "2", *common)
        total = featurekit("study", "digits", "--out", str(study), "--weights", str(pre / "best.pt"),
                           "--epochs", args.epochs, *common)
        stages = {}
        for stamp in sorted(study.rglob("stage.json")):
            rec = json.loads(stamp.read_text())
            stages[rec["stage"]] = round(rec["result"]["seconds"], 2)
        summary = json.loads((study / "summary.json").read_text())
    out = {"benchmark": "study", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
           "setting": {"source": "digits (1,797 images)", "model": args.model, "image_size": args.image_size,
                       "epochs": args.epochs, "device": args.device,
                       "weights": "a 2-epoch scratch run's best.pt"},
           "pretrained_run_seconds": round(pre_s, 1), "study_process_seconds": round(total, 1),
           "stages": stages,
           "table": [{k: r[k] for k in ("approach", "accuracy", "accuracy_ci95", "within_noise", "best")}
                     for r in summary["approaches"]],
           "checks": summary["checks"]}
    print(json.dumps({k: out[k] for k in ("study_process_seconds", "stages")}, indent=1))
    record(args, f"study-digits-{args.device.split(':')[0]}.json", out)


if __name__ == "__main__":
    main()
