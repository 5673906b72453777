"""One torchrun rank of a featurekit command, where rank 1 fails on purpose (tests of failing
together, issue 21).

Usage: torchrun ... tests/_failing_rank.py MODE featurekit-args...
MODE: ``none`` (no fault), ``writer`` (rank 1's third commit fails: "No space left on device"),
``train`` (rank 1 runs out of device memory in its third training step), ``slow`` (each of
rank 1's commits takes 0.5 s more: rank 0 waits for it at the barrier), ``freeze`` (rank 1
stops itself with SIGSTOP at its second commit: no sign of life, as a rank killed on another
node).
"""

import os
import sys

import featurekit.cache as cache
from featurekit.cli import app

mode, args = sys.argv[1], sys.argv[2:]
if mode == "writer" and os.environ.get("RANK") == "1":
    real, commits = cache.CacheWriter._commit, [0]

    def failing(self, split, extra):
        commits[0] += 1
        if commits[0] > 2:
            raise OSError(28, "No space left on device")
        return real(self, split, extra)

    cache.CacheWriter._commit = failing
if mode in ("slow", "freeze", "hang") and os.environ.get("RANK") == "1":
    import signal
    import time

    real_commit, seen = cache.CacheWriter._commit, [0]

    def late(self, split, extra):
        seen[0] += 1
        if mode == "slow":
            time.sleep(0.5)
        elif mode == "hang" and seen[0] == 2:
            time.sleep(120)  # a hung write: every thread of the rank waits where it is
        elif seen[0] == 2:
            os.kill(os.getpid(), signal.SIGSTOP)
        return real_commit(self, split, extra)

    cache.CacheWriter._commit = late
if mode == "train" and os.environ.get("RANK") == "1":
    import torch

    import featurekit.finetune as ft

    real_autocast, steps = ft._autocast, [0]

    def failing_autocast(run):  # entered once per training step
        steps[0] += 1
        if steps[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_autocast(run)

    ft._autocast = failing_autocast
app(args, prog_name="featurekit")
