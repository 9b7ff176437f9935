"""Search at the paper's scale: ranked text search and search by meaning over 307,200 unit sides, each call in
a fresh process (its own peak RSS), and building the indexes.

    python bench/search.py                 # 307,200 explanations; vectors of 576 numbers (the embedded model's)

Text: a results store filled with 307,200 stage-02 entries (explanations drawn from a vocabulary of 2,000
words, a candidate and a baseline each) through the writer API, which keeps the full-text index as it writes
(the build time is that of the fill); then `ResultStore.text_search` for the best 50. Meaning: 307,200
unit-length float16 vectors as `nbutils.live.meaning` stores them (random here: no embeddings server embeds
307,200 texts in a benchmark's time; the search's cost does not depend on what the vectors say), then
`rank_by_cosine` for the nearest 50 of a query vector (the query's own embedding is one request, not timed).
Writes bench/results/search.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def _rss_mb() -> float:
    """This process's peak resident memory (VmHWM: getrusage's maximum carries over from the parent through exec,
    and the parent here held the vectors)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(root: Path, units: int, dim: int) -> list[dict]:
    from nbutils.core.store import ResultStore

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(2000)] + ["months", "dates", "brackets", "capitals", "numbers", "quoted"]
    rows = []
    start = time.perf_counter()
    store = ResultStore(root / "02_explain")

    def entries():
        for i in range(units):
            text = " ".join(rng.choice(words, 8))
            yield ({"layer": i // 6400, "neuron": i % 6400, "sign": "positive", "explanation": text,
                    "candidates": [{"explanation": text, "reply": text}],
                    "baseline": {"explanation": f"the tokens {rng.choice(words)}"}}, None, None)  # fmt: skip

    store.put_many(entries(), batch=5000)
    store.close()
    rows.append(
        {"what": f"fill a store of {units:,} entries with its text index", "wall_s": time.perf_counter() - start}
    )
    start = time.perf_counter()
    v = rng.standard_normal((units, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    np.save(root / "vectors.npy", v.astype(np.float16))
    rows.append({"what": f"{units:,} vectors of {dim} numbers, float16", "wall_s": time.perf_counter() - start,
                 "bytes": (root / "vectors.npy").stat().st_size})  # fmt: skip
    return rows


def child(what: str, root: Path) -> dict:
    from nbutils.core.store import ResultStore
    from nbutils.live.meaning import rank_by_cosine

    start = time.perf_counter()
    if what == "text search":
        found = ResultStore(root / "02_explain").text_search("months dates", 50)
    else:
        vectors = np.load(root / "vectors.npy", mmap_mode="r")
        query = np.random.default_rng(1).standard_normal(vectors.shape[1])
        found = rank_by_cosine(vectors, query, 50)
    return {"what": what, "wall_s": time.perf_counter() - start, "peak_rss_mb": _rss_mb(), "found": len(found)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--units", type=int, default=307_200)
    p.add_argument("--dim", type=int, default=576)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="nbutils-search-"))
    rows = build(root, args.units, args.dim)
    for what in ("text search", "meaning search"):
        for _ in range(args.repeats):
            res = subprocess.run([sys.executable, __file__, "--child", what, str(root)], capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(res.stderr[-2000:])
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print("| what | seconds | peak RSS MB |\n|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['wall_s']:.3f} | {r.get('peak_rss_mb', float('nan')):.0f} |")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "search.json").write_text(
        json.dumps({"units": args.units, "dim": args.dim, "rows": rows}, indent=1)
    )
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(child(sys.argv[2], Path(sys.argv[3]))))
        raise SystemExit(0)
    raise SystemExit(main())
