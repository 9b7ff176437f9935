"""Stage 01 on a local Ray instance with 1 and with 2 workers (one CPU each), beside the single-process run.

Each variant runs in a fresh child process (a process starts Ray once): load the embedded model, cut the
excerpts, and time the collection only (every layer, the same excerpt shards for both Ray variants: 4, or
``--ray-shards``; each Ray task loads the model itself, as on a cluster). The collections are checked equal to
the single-process one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def child(workers: int, excerpts: int, out: str, shards: int = 4) -> dict[str, Any]:
    """One variant, in this process: ``workers`` 0 means the single-process collector (all cores)."""
    from nbutils.collect.collector import CollectConfig
    from nbutils.collect.corpus import load_texts, make_excerpts
    from nbutils.collect.stage import collect_activations, collect_sharded
    from nbutils.subject.loading import load_subject_model
    from nbutils.subject.units import MLPNeurons

    subject = load_subject_model("embedded")
    ex = make_excerpts(subject.tokenizer, load_texts("embedded"), 64, excerpts, seed=0, corpus="embedded")
    cfg = CollectConfig(quantile_warmup=max(32, excerpts // 8), batch_size=16)
    start = time.perf_counter()
    if workers == 0:
        collect_activations(subject, ex, out, cfg, progress=False)
    else:
        import ray

        ray.init(num_cpus=workers, include_dashboard=False, logging_level="ERROR")
        collect_sharded(subject, ex, out, cfg, MLPNeurons(None), shards, executor="ray")
    return {"seconds": time.perf_counter() - start, "tokens": int(ex.tokens.size)}


def bench_ray(excerpts: int, repeats: int, shards: int = 4) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="nbutils-ray-"))
    rows = []
    for workers, label in ((0, "single process (2 torch threads)"), (1, "Ray, 1 worker"), (2, "Ray, 2 workers")):
        out = tmp / f"w{workers}"
        cmd = [sys.executable, __file__, str(workers), str(excerpts), str(out), str(shards)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if res.returncode != 0:
            raise RuntimeError(res.stderr[-3000:])
        row = {"variant": label, **json.loads(res.stdout.strip().splitlines()[-1])}
        row["tokens_per_s"] = row["tokens"] / row["seconds"]
        rows.append(row)
    one = rows[1]["seconds"]
    for row in rows:
        row["speedup_vs_1_worker"] = one / row["seconds"]
    same = _same(tmp / "w0", tmp / "w1") and _same(tmp / "w0", tmp / "w2")
    return {"benchmark": "ray", "model": "embedded, every layer", "excerpts": excerpts, "shards": shards,
            "collections_equal": same, "rows": rows}  # fmt: skip


def _same(a: Path, b: Path) -> bool:
    """Whether two collections hold the same excerpts in every list (indices; the numbers themselves differ
    in the last bits between torch thread counts)."""
    import numpy as np

    names = [p.relative_to(a) for p in a.rglob("*_index.npy")]
    return bool(names) and all(np.array_equal(np.load(a / n), np.load(b / n)) for n in names)


if __name__ == "__main__":
    print(json.dumps(child(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))))
