"""``featurekit demo``: the whole workflow offline, on scikit-learn's bundled digits."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any


def run_demo(out: str | Path | None = None, progress: bool = True,
             overwrite: bool = False) -> dict[str, Any]:
    """Extract digits with an untrained resnet18 at 64 px into ``out``, describe the cache, and
    bench the five heads on it (results.{csv,json,md,png} in ``out/bench``). Files of an
    earlier demo in ``out`` are replaced only with ``overwrite``."""
    from featurekit._outputs import check_output_folder
    from featurekit.bench import OUTPUT_FILES, run_bench
    from featurekit.cache import open_cache
    from featurekit.extraction import extract

    folder = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="featurekit-demo-"))
    check_output_folder(folder, ["digits.h5", *(f"bench/{n}" for n in OUTPUT_FILES)], overwrite)
    folder.mkdir(parents=True, exist_ok=True)
    cache = folder / "digits.h5"
    extract(
        "digits", cache, model="resnet18", weights="none", image_size=64,
        layers="penultimate,layer3", device="cpu", overwrite=overwrite, progress=progress,
    )
    with open_cache(cache) as c:
        info = c.summary()
    # featurekit's own torch heads: on the GPU where there is one, and fast on the CPU too
    bench = run_bench(cache, heads="logistic,linearsvc,svm,nystroem,knn", backends="torch",
                      out=folder / "bench", overwrite=overwrite)
    return {"out": str(folder), "cache": str(cache), "info": info, "bench": bench}
