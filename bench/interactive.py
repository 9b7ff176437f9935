"""How fast the live calls of a run answer (`nbutils.open_run`), on the embedded model, beside what they are
measured against in the same process:

- ``u.activations`` on a 64-token text (after the first call, which loads the model), against 1 s;
- ``run.top_units`` over 5 collected layers, against 2 s;
- ``u.score`` of a new explanation with the run's local simulator, against stage 03's own time per unit
  on the same run (the same scorers: simulation, detection, fuzzing);
- ``u.score(..., scorers=["simulation"])``, the first answer a researcher trying a wording gets, against the
  same stage-03 time per unit.

    python bench/run.py --only interactive --excerpts 256 --repeats 3
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

LAYERS = [0, 7, 15, 22, 29]
TEXT = (
    "The committee met on a Tuesday in March to discuss the budget, the new library, and the roads; after two "
    "hours of argument they agreed to meet again in April, when the numbers would be ready for everyone. The "
    "mayor, who had said little, promised to publish the minutes by the first of May, and nobody believed her."
)


def _spread(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def bench_interactive(excerpts: int, repeats: int, model: str = "embedded") -> dict[str, Any]:
    import nbutils
    from nbutils.collect.collector import CollectConfig
    from nbutils.collect.corpus import load_texts, make_excerpts
    from nbutils.collect.stage import collect_activations
    from nbutils.core.config import RunConfig
    from nbutils.explain.stage import run_explain_stage
    from nbutils.score.stage import run_score_stage
    from nbutils.subject.loading import load_subject_model

    subject = load_subject_model(model)
    ex = make_excerpts(subject.tokenizer, load_texts("embedded"), 64, excerpts, seed=0)
    root = Path(tempfile.mkdtemp())
    cfg = CollectConfig(layers=LAYERS, quantile_warmup=min(1024, excerpts // 2))
    collect_activations(subject, ex, root / "01_collect", cfg, progress=False)
    smoke = excerpts < 64  # the test's smoke run: one unit, the simulation scorer only
    config = RunConfig(explain_neurons=[[15, 0]] if smoke else "strongest:1", min_active=1,
                       scorers=["simulation"] if smoke else ["simulation", "detection", "fuzzing"])  # fmt: skip
    run_explain_stage(root / "01_collect", root / "02_explain", config, progress=False)
    start = time.perf_counter()
    scored = run_score_stage(root / "01_collect", root / "02_explain", root / "03_score", config, progress=False)
    stage_per_unit = (time.perf_counter() - start) / max(len(scored), 1)

    run = nbutils.open_run(root)  # the parameters the stages recorded
    u = run.unit(*sorted(run.scores)[0])
    t0 = time.perf_counter()
    ids = run.live.tokenizer(TEXT, add_special_tokens=False)["input_ids"][:64]  # loads the subject model
    u.activations(ids)
    first = time.perf_counter() - t0
    assert len(ids) == 64, "the benchmark text is shorter than 64 tokens"
    acts, top, score, first_answer = [], [], [], []
    requests = []
    for i in range(repeats):
        t0 = time.perf_counter()
        u.activations(ids)
        acts.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run.top_units(ids, k=20)
        top.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        s = u.score(f"words about meetings and months, variant {i}")  # a new explanation each time: no memory
        score.append(time.perf_counter() - t0)
        requests.append(s.requests)
        t0 = time.perf_counter()
        u.score(f"words about meetings and dates, variant {i}", scorers=["simulation"])
        first_answer.append(time.perf_counter() - t0)
    rows = [
        {"variant": "u.activations, 64 tokens", "seconds": _spread(acts), "against": "1 s",
         "ratio": statistics.median(acts) / 1.0},
        {"variant": f"run.top_units, {len(LAYERS)} layers", "seconds": _spread(top), "against": "2 s",
         "ratio": statistics.median(top) / 2.0},
        {"variant": "u.score, local simulator", "seconds": _spread(score),
         "against": f"stage 03 per unit {stage_per_unit:.1f} s", "ratio": statistics.median(score) / stage_per_unit},
        {"variant": "u.score(scorers=['simulation']): the first answer", "seconds": _spread(first_answer),
         "against": f"stage 03 per unit {stage_per_unit:.1f} s",
         "ratio": statistics.median(first_answer) / stage_per_unit},
    ]  # fmt: skip
    return {
        "benchmark": "interactive",
        "model": model,
        "first_activations_call_seconds_with_model_load": first,
        "score_requests": statistics.median(requests),
        "stage_03_seconds_per_unit": stage_per_unit,
        "collected_units": len(LAYERS) * 1536,
        "rows": rows,
    }
