"""One torchrun rank of ``featurekit finetune`` that records what the rank did: its final
weights (``rank<N>.pt``) and the checkpoints it read (``rank<N>-loads.json``), in OUT_DIR.

Usage: torchrun ... tests/_ddp_rank.py OUT_DIR finetune SOURCE --out RUN ...
"""

import json
import os
import sys

import torch

import featurekit.finetune as ft
from featurekit.cli import app

out_dir, args = sys.argv[1], sys.argv[2:]
rank = os.environ.get("RANK", "0")
loads: list[str] = []
nets: list[torch.nn.Module] = []
real_load, real_build = ft.load_checkpoint, ft.build_model


def counting_load(path, *a, **k):
    loads.append(str(path))
    return real_load(path, *a, **k)


def capturing_build(*a, **k):
    nets.append(real_build(*a, **k))
    return nets[-1]


ft.load_checkpoint, ft.build_model = counting_load, capturing_build
try:
    app(args)
finally:
    if nets:
        torch.save({k: v.detach().cpu() for k, v in nets[0].state_dict().items()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    with open(os.path.join(out_dir, f"rank{rank}-loads.json"), "w") as f:
        json.dump(loads, f)
