"""One torchrun rank of a featurekit command, where rank 1 fails on purpose (tests of failing
together, issue 21).

Usage: torchrun ... tests/_failing_rank.py MODE featurekit-args...
MODE: ``none`` (no fault), ``writer`` (rank 1's third commit fails: "No space left on device").
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
app(args, prog_name="featurekit")
