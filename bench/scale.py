"""A run of the paper's size end to end: what the stages write per unit, and how fast the views of a run of
307,200 units open (GPT-2 XL: 48 layers x 6,400 MLP neurons).

1. A GPT-2-XL-shaped collection: a narrow random-initialised GPT-2 (48 layers, 6,400 units each, width 32)
   with the embedded model's tokenizer, over a small slice of the embedded corpus.
2. Stages 02 and 03 run for real on one layer's units (``--stage-units``, default all 6,400) against an
   instant backend in this process (`InstantBackend`: it answers from the excerpts' tokens at no cost), so
   each stage's own cost per unit shows: client CPU ms per unit (besides the scorers' own calls, measured
   separately), peak RSS, bytes on disk per unit, files.
3. The stores are then filled to ``--units`` unit sides through the writer API (`ResultStore.put_many`)
   with copies of those results under the other layers' keys.
4. Each view, in a fresh process (its own peak RSS): open the run and show the first unit in the viewer,
   sort by a score, next unit, filter by text, the report's tables and figures, the static page, and the
   exports (``export-openai`` on one layer, as its output is one file per unit, so the time and disk scale
   linearly; ``export-neuronpedia``; ``export-jsonl``, both stages' entries as JSON lines).
5. The rules explainer (stage 02 with ``explainer_backend="rules"``) on ``--rules-units`` units of layer 1:
   its subject-model forward passes and client CPU per unit.

    python bench/run.py --only scale --units 307200
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from nbutils.core.store import ResultStore
from nbutils.llm.contract import Backend, BackendSpec, Judgements, Usage, register_backend
from nbutils.llm.prompts import MAX_LABEL

WIDTH = 6400
LAYERS = 48
HERE = Path(__file__).resolve().parent


class InstantBackend(Backend):
    """An explainer, simulator and judge that answer at once from the tokens they are shown: the explanation
    names the unit's strongest token; a token the explanation quotes is simulated at 10, any other at 0."""

    name = "instant"

    @classmethod
    def from_spec(cls, spec: BackendSpec) -> InstantBackend:
        return cls()

    def __init__(self) -> None:
        self.usage = Usage()
        self.model_name = "instant"

    def explain(self, request) -> list[str]:
        best = max(((v, t) for e in request.excerpts for t, v in zip(e.tokens, e.values)), default=(0, ""))
        return [f'the token "{best[1].strip() or best[1]}"'] * request.n

    def simulate(self, request) -> list[np.ndarray]:
        out = []
        for tokens in request.excerpts:
            d = np.zeros((len(tokens), MAX_LABEL + 1))
            hit = np.array([bool(t.strip()) and f'"{t.strip()}"' in request.explanation for t in tokens])
            d[hit, MAX_LABEL], d[~hit, 0] = 1.0, 1.0
            out.append(d)
        return out

    def judge(self, request) -> Judgements:
        said = [
            any(t.strip() and f'"{t.strip()}"' in request.explanation for t in item.tokens) for item in request.items
        ]
        return Judgements(np.array(said, dtype=float), probabilities=False)


register_backend("instant", InstantBackend)


def _rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ``ru_maxrss`` it is not inherited from the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _folder_bytes(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def build_collection(root: Path, layers: int, width: int, excerpts: int, excerpt_len: int) -> Path:
    """Collect every unit of a narrow random GPT-2 of ``layers`` x ``width`` MLP neurons into ``root/01_collect``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from nbutils.collect.collector import CollectConfig
    from nbutils.collect.corpus import load_texts, make_excerpts
    from nbutils.collect.stage import collect_activations
    from nbutils.subject.loading import load_subject_model
    from nbutils.subject.models import SubjectModel

    tokenizer = load_subject_model("embedded").tokenizer
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=excerpt_len, n_embd=32, n_layer=layers, n_head=2,
                        n_inner=width)  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # livelier activations than the default initialisation
        for p in model.parameters():
            p.mul_(3.0) if p.dim() == 2 else None
    folder = root / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    subject = SubjectModel(model, tokenizer, str(folder))
    ex = make_excerpts(tokenizer, load_texts("embedded"), excerpt_len, excerpts, seed=0, corpus="embedded")
    cfg = CollectConfig(layers=list(range(layers)), top_k=8, n_random=6, band_size=2, quantile_warmup=excerpts // 2)
    collect_activations(subject, ex, root / "01_collect", cfg, progress=False)
    return root / "01_collect"


class _Timed:
    """Wall and CPU seconds spent inside some functions (patched in place while the block runs)."""

    def __init__(self, targets: list[tuple[Any, str]]) -> None:
        self.targets, self.cpu, self.calls = targets, 0.0, 0

    def __enter__(self) -> _Timed:
        self.saved = [(obj, name, getattr(obj, name)) for obj, name in self.targets]
        for obj, name, fn in self.saved:
            setattr(obj, name, self._wrap(fn))
        return self

    def _wrap(self, fn):
        def timed(*a, **k):
            start = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                self.cpu += time.thread_time() - start
                self.calls += 1

        return timed

    def __exit__(self, *exc: object) -> None:
        for obj, name, fn in self.saved:
            setattr(obj, name, fn)


def run_stages(root: Path, layer: int, units: int, n_boot: int) -> list[dict[str, Any]]:
    """Stages 02 and 03 on the first ``units`` units of ``layer``; a row per stage."""
    from nbutils.core.config import RunConfig
    from nbutils.explain.stage import run_explain_stage
    from nbutils.score.contract import registered
    from nbutils.score.stage import run_score_stage

    config = RunConfig(
        explain_neurons=[[layer, i] for i in range(units)], explainer_backend="instant", simulator_backend="instant",
        n_boot=n_boot, min_active=1,
    )  # fmt: skip
    rows = []
    for name, run in (
        ("02 explain", lambda: run_explain_stage(root / "01_collect", root / "02_explain", config, progress=False)),
        (
            "03 score",
            lambda: run_score_stage(
                root / "01_collect", root / "02_explain", root / "03_score", config, progress=False
            ),
        ),  # fmt: skip
    ):
        scorers = [
            (type(sc), m) for sc in registered() if sc.name in config.scorers for m in ("baseline", "explanation")
        ]
        folder = root / ("02_explain" if name.startswith("02") else "03_score")
        with _Timed(scorers) as inside:
            start, cpu = time.perf_counter(), time.process_time()
            results = run()
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        n = len(results)
        size, files = _folder_bytes(folder)
        rows.append({
            "what": f"stage {name}, {n:,} units", "units": n, "wall_s": wall,
            "client_cpu_ms_per_unit": 1000 * (cpu - inside.cpu) / n, "scorers_cpu_ms_per_unit": 1000 * inside.cpu / n,
            "peak_rss_mb": _rss_mb(), "bytes_per_unit": size / n, "files": files,
        })  # fmt: skip
    return rows


def run_rules(root: Path, layer: int, units: int) -> dict[str, Any]:
    """Stage 02 with the rules explainer (``explainer_backend="rules"``: no LLM, the subject model probed on
    pruned contexts) on ``units`` units of ``layer``, into its own folder: the forward passes per unit."""
    from nbutils.core.config import RunConfig
    from nbutils.explain.stage import run_explain_stage

    config = RunConfig(explain_neurons=[[layer, i] for i in range(units)], explainer_backend="rules", min_active=1)
    start, cpu = time.perf_counter(), time.process_time()
    results = run_explain_stage(root / "01_collect", root / "02_rules", config, progress=False)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    passes = [e.rule["forward_passes"] for e in results if e.rule]
    sequences = [e.rule["sequences"] for e in results if e.rule]
    n = len(results)
    return {"what": f"stage 02 explain, rules explainer, {n:,} units", "units": n, "wall_s": wall,
            "client_cpu_ms_per_unit": 1000 * cpu / n, "peak_rss_mb": _rss_mb(),
            "forward_passes_per_unit": float(np.mean(passes)) if passes else 0.0,
            "forward_passes_max": max(passes, default=0), "sequences_per_unit": float(np.mean(sequences or [0]))}  # fmt: skip


def fill(root: Path, units: int) -> list[dict[str, Any]]:
    """Copy the stages' results onto the other collected units' keys, in order, until each store holds
    ``units`` unit sides (through `ResultStore.put_many`); a row per store."""
    from nbutils.core.records import RecordStore
    from nbutils.score.contract import UnitScores, number_notes, registered
    from nbutils.score.flags import explanation_notes
    from nbutils.score.stage import stored_numbers

    rows = []
    for stage in ("02_explain", "03_score"):
        store = ResultStore(root / stage)
        numbers = stored_numbers if stage == "03_score" else lambda e: None
        # stage 03 stores the notes on each side's numbers beside them (what the tables show)
        notes = (lambda e: number_notes(UnitScores.from_dict(e), registered())) if stage == "03_score" else (
            lambda e: None)  # fmt: skip
        template = [(e, store.details((e["layer"], e["neuron"], e["sign"])), numbers(e), notes(e))
                    for e in store.entries()]  # fmt: skip
        start = time.perf_counter()
        have = {(e["layer"], e["neuron"]) for e, *_ in template}
        free = [
            (n.layer, n.index) for n in RecordStore(root / "01_collect").all_ids() if (n.layer, n.index) not in have
        ]
        store.put_many(_copies(template, free[: max(units - len(template), 0)]))
        store.select(store.keys())  # what a stage asked for every unit records when it starts
        if stage == "02_explain":  # what stage 02 does when it finishes: the run-wide notes, for every view
            store.put_notes(explanation_notes(dict(store.explanations())))
        store.close()
        size, files = _folder_bytes(root / stage)
        n = len(ResultStore(root / stage))
        rows.append({"what": f"fill {stage} to {n:,} unit sides", "units": n, "wall_s": time.perf_counter() - start,
                     "bytes_per_unit": size / n, "files": files, "peak_rss_mb": _rss_mb()})  # fmt: skip
    return rows


def _copies(template: list[tuple[dict, Any, Any, Any]], targets: list[tuple[int, int]]):
    """The template's (entry, details, numbers, number notes) in turn, under each of the ``targets`` (layer,
    unit)."""
    for i, (layer, unit) in enumerate(targets):
        e, d, numbers, notes = template[i % len(template)]
        where = {"layer": layer, "neuron": unit}
        yield {**e, **where}, None if d is None else {**d, **where}, numbers, notes


VIEWS = ("open + first unit", "sort by a score", "next unit", "filter by text", "search text", "scores frame",
         "explanations frame", "top units (every layer)", "report", "page", "export-neuronpedia", "export-openai (one layer)",
         "export-jsonl")  # fmt: skip


def view_child(what: str, root: Path) -> dict[str, Any]:
    """One view of the run at ``root`` (in this process, which is fresh): seconds and peak RSS."""
    from nbutils.interop.neuron_explainer import export_openai
    from nbutils.interop.neuronpedia import export_neuronpedia
    from nbutils.live.widget import NeuronViewer, write_page
    from nbutils.view import plots
    from nbutils.view.runview import SORTS, RunView

    out = root / "views" / what.replace(" ", "_")
    start = time.perf_counter()  # after the imports: what is timed is the work on this run
    detail: dict[str, Any] = {}
    if what == "open + first unit":
        viewer = NeuronViewer(RunView.open(root))
        detail["shown"] = 'class="nbx-neuron"' in viewer.html.value
    else:
        view = RunView.open(root)
        if what == "sort by a score":
            detail["units"] = len(view.neuron_ids(SORTS[1]))
        elif what == "next unit":
            viewer = NeuronViewer(view)
            start = time.perf_counter()  # the step alone
            viewer.step(1)
        elif what == "filter by text":
            detail["units"] = len(view.neuron_ids(SORTS[1], "the token"))
        elif what == "search text":  # ranked full-text search, the best 50 (what run.search shows)
            detail["found"] = len(view.matching("tokens quoted", 50))
        elif what == "scores frame":
            detail["rows"] = len(view.scores_frame())
        elif what == "explanations frame":
            detail["rows"] = len(view.explanations_frame())
        elif what == "top units (every layer)":  # live: the run's model on a text, every collected layer ranked
            import nbutils

            run = nbutils.open_run(root)
            start = time.perf_counter()
            detail["rows"] = len(run.top_units("The meeting moved to March, after the review.", k=20).rows)
        elif what == "report":
            plots.write_report(view, out)
            detail["tables"] = sum(len(f(view)) for f in (plots.run_summary, plots.layer_rows, plots.scorer_rows))
        elif what == "page":
            detail["bytes"] = write_page(view, out).stat().st_size
        elif what == "export-neuronpedia":
            detail["files"] = len(export_neuronpedia(root, out))
        elif what.startswith("export-openai"):
            ids = [n for n in view.store.all_ids() if n.layer == 0]
            detail["files"] = export_openai(view.store, out, ids)
        elif what == "export-jsonl":  # what `nbutils export-jsonl` does: both stages' entries, streamed
            detail["lines"] = sum(
                ResultStore(root / s).export_jsonl(out / f"{s}.jsonl") for s in ("02_explain", "03_score")
            )
    return {"what": what, "wall_s": time.perf_counter() - start, "peak_rss_mb": _rss_mb(), **detail}


def bench_scale(
    units: int, stage_units: int, n_boot: int = 100, rules_units: int = 64, excerpts: int = 64, excerpt_len: int = 32
) -> dict:
    layers = LAYERS if units >= LAYERS * WIDTH else max(2, -(-units // WIDTH))
    width = WIDTH if units >= WIDTH else max(8, units // 2)
    root = Path(tempfile.mkdtemp(prefix="nbutils-scale-"))
    start = time.perf_counter()
    build_collection(root, layers, width, excerpts, excerpt_len)
    rows = [{"what": f"stage 01 collect, {layers} x {width:,} units", "units": layers * width,
             "wall_s": time.perf_counter() - start, "peak_rss_mb": _rss_mb()}]  # fmt: skip
    layer = 0
    rows += run_stages(root, layer, min(stage_units, width), n_boot)
    rows.append(run_rules(root, 1, min(rules_units, width)))
    rows += fill(root, units)
    for what in VIEWS:
        res = subprocess.run([sys.executable, __file__, "--view", what, str(root)], capture_output=True, text=True,
                             env={**os.environ, "NBUTILS_PLAIN_PROGRESS": "1"})  # fmt: skip
        if res.returncode != 0:
            raise RuntimeError(f"view {what!r} failed: {res.stderr[-3000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return {
        "benchmark": "scale",
        "model": f"random GPT-2, {layers} layers x {width:,} MLP neurons, width 32",
        "rows": rows,
        "units": units,
        "n_boot": n_boot,
        "run_dir": str(root),
    }


if __name__ == "__main__":
    if sys.argv[1:2] == ["--view"]:
        print(json.dumps(view_child(sys.argv[2], Path(sys.argv[3]))))
