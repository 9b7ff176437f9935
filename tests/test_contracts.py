"""The extension points: a scorer, a backend and a unit type defined here (one class and one registration
each) flow through the stages and every view unchanged; and a run folder written in format 1 still opens."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_model

from nbutils.collect.collector import CollectConfig
from nbutils.collect.corpus import ExcerptSet
from nbutils.collect.stage import collect_activations
from nbutils.core.config import RunConfig
from nbutils.core.errors import UserError
from nbutils.core.io import read_json
from nbutils.core.records import RecordStore
from nbutils.core.results import to_json
from nbutils.core.units import UnitId
from nbutils.explain.stage import run_explain_stage
from nbutils.llm import contract as llm_contract
from nbutils.llm.contract import Backend, BackendSpec, Judgements, Usage
from nbutils.llm.prompts import EXPLANATION_PREFIX, LABELS
from nbutils.score import contract as score_contract
from nbutils.score.classification import JudgedItem
from nbutils.score.contract import Column, Scorer, UnitContext, UnitScores
from nbutils.score.metrics import Metric
from nbutils.score.simulation import SimulationResult
from nbutils.score.stage import run_score_stage
from nbutils.subject import units as unit_registry
from nbutils.subject.models import SubjectModel
from nbutils.subject.sites import NeuronCapture, resolve_site
from nbutils.subject.units import MLPNeurons
from nbutils.view import plots
from nbutils.view.render import neuron_html, run_html
from nbutils.view.runview import RunView

FORMAT1 = Path(__file__).resolve().parent / "data" / "run_format1"


@pytest.fixture
def old_run(tmp_path) -> Path:
    """A run folder written before scorers had names (results and simulations in format 1)."""
    shutil.copytree(FORMAT1, tmp_path / "run")
    return tmp_path / "run"


def _visible(html: str) -> str:
    import html as h
    import re

    return h.unescape(re.sub(r"<[^>]+>", "", html))


def test_a_run_written_in_format_1_still_opens(old_run, tmp_path):
    old = read_json(old_run / "03_score" / "neurons" / "L29_N0_positive.json")
    assert "format" not in old and "top_and_random" in old  # really the old layout
    view = RunView.open(old_run)
    (key,) = view.scores
    result = view.scores[key]
    assert isinstance(result, UnitScores) and isinstance(result.of("simulation"), SimulationResult)  # read typed
    assert to_json(result.of("simulation").top_and_random) == old["top_and_random"]
    assert to_json(result.baseline.of("simulation").random_only) == old["baseline"]["random_only"]
    assert result.to_dict()["format"] == 2
    assert [sc.name for sc in view.scorers] == ["simulation", "detection", "fuzzing"]
    shown = _visible(neuron_html(view, *key))
    assert f"{old['top_and_random']['correlation']['value']:.3f}" in shown and "True versus simulated" in shown
    assert "detection items" in shown and "detection balanced accuracy" in shown
    details = view.simulation(key)
    assert details.of("simulation").excerpts and isinstance(details.of("detection")[0], JudgedItem)
    stale = tmp_path / "report" / "figures" / "output_side_scores.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an earlier report's figure")
    paths = plots.write_report(view, tmp_path / "report")
    assert paths["simulated_vs_true"].is_file()
    # a figure with nothing to draw (no ablation or intervention scores in this run) is said, not drawn or saved
    assert "output_side_scores" not in paths and not stale.exists()
    empty = plots.output_side_scores(view)
    assert empty.is_empty and empty._repr_png_() is None and "No figure: no ablation" in empty._repr_html_()
    drawn = plots.simulated_vs_true(view)
    assert not drawn.is_empty and drawn._repr_png_()[:4] == b"\x89PNG" and drawn._repr_html_() is None
    assert any(r["scorer"] == "simulation" for r in plots.scorer_rows(view))


@dataclass
class WordCount:
    """The result type of the scorer below: one `Metric`."""

    words: Metric


class ExplanationLength(Scorer):
    """A scorer that needs no LLM: the number of words of the explanation (the baseline's too)."""

    name = "explanation_length"
    title = "length of the explanation in words"
    columns = (Column("words", ("words",), notes=lambda r: ["very short"] if r.words.value < 4 else []),)
    result_type = WordCount
    details_type = dict[str, str]

    def baseline(self, ctx: UnitContext) -> WordCount:
        return WordCount(Metric(float(len(ctx.entry.baseline.explanation.split()))))

    def explanation(self, ctx: UnitContext, llm: Backend) -> tuple[WordCount, dict[str, str]]:
        words = ctx.entry.explanation.split()
        return WordCount(Metric(float(len(words)))), {"first word": words[0]}


def test_a_scorer_defined_here_reaches_every_view(old_run, monkeypatch):
    monkeypatch.setitem(score_contract.SCORERS, "explanation_length", ExplanationLength)
    config = RunConfig(scorers=["explanation_length"], simulator_backend="oracle")  # the oracle is never asked
    (result,) = run_score_stage(old_run / "01_collect", old_run / "02_explain", old_run / "03_new", config)
    words = float(len(result.explanation.split()))
    assert result.of("explanation_length") == WordCount(Metric(words))
    baseline_words = float(len(result.baseline.explanation.split()))  # 'the tokens "a", "b", ...'
    assert result.baseline.of("explanation_length").words.value == baseline_words
    view = RunView.open(old_run, score_dir=old_run / "03_new")
    key = result.key
    assert view.scores[key] == result  # read back from the store as written
    assert view.simulation(key).of("explanation_length") == {"first word": result.explanation.split()[0]}
    assert [sc.name for sc in view.scorers] == ["explanation_length"]
    shown = _visible(neuron_html(view, *key))
    assert "words" in shown and f"{words:.3f}" in shown and f"{baseline_words:.3f}" in shown  # both
    page = _visible(run_html(view))
    assert "words" in page and f"{words:.3f}" in page  # the static page's index has its headline
    # no time of writing on the page: reopening the viewer later rewrites stage 04's checksummed page unchanged
    assert not re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d", page)
    rows = [r for r in plots.scorer_rows(view) if r["scorer"] == "explanation_length"]
    assert {(r["of"], r["mean"]) for r in rows} == {("explanation", words), ("baseline", baseline_words)}
    # scored without the simulation scorer, the run is sorted and summarised by its own scorer's headline
    assert view.headline is view.scorers[0] and view.ranked() == [(words, key)]
    assert view.neuron_ids("score: best first")[0] == key[:2]
    summary = {r["item"]: r["value"] for r in plots.run_summary(view)}
    assert summary["mean score, explanation, words"] == f"{words:.3f}"
    assert not [item for item in summary if "simulation" in item or "correlation" in item]
    assert [name for name, *_ in plots.series(view)] == ["explanation, words", "baseline, words"]
    assert not plots.score_distributions(view).is_empty and plots.simulated_vs_true(view).is_empty
    notes = [r for r in plots.note_rows(view) if r["result"] == "explanation explanation_length"]
    assert [n["note"] for n in notes] == (["very short"] if words < 4 else [])


class Parrot(Backend):
    """A backend that needs no model: it explains with the first token it is shown, simulates 10 wherever a
    token starts with the explanation's first letter, and judges by the same rule."""

    name = "parrot"

    @classmethod
    def from_spec(cls, spec: BackendSpec) -> Parrot:
        return cls()

    def __init__(self) -> None:
        self.usage = Usage()

    def explain(self, request):
        self.usage.add(Usage(requests=request.n))
        token = max((t for e in request.excerpts for t, v in zip(e.tokens, e.values) if v), key=len)
        return [f"{EXPLANATION_PREFIX} {token.strip() or 'spaces'}"] * request.n

    def _hits(self, explanation: str, tokens) -> np.ndarray:
        return np.array([t.strip()[:1].lower() == explanation[:1].lower() for t in tokens], dtype=float)

    def simulate(self, request):
        out = []
        for tokens in request.excerpts:
            hit = self._hits(request.explanation, tokens)
            dist = np.zeros((len(tokens), len(LABELS)))
            dist[:, 0], dist[:, 10] = 1 - hit, hit
            out.append(dist)
        return out

    def judge(self, request):
        return Judgements(np.array([self._hits(request.explanation, i.tokens).max() for i in request.items]))


def test_a_backend_defined_here_explains_simulates_and_judges(old_run, monkeypatch):
    monkeypatch.setitem(llm_contract.BACKENDS, "parrot", Parrot)
    config = RunConfig(
        explain_neurons=[[0, 1], [29, 0]], explainer_backend="parrot", simulator_backend="parrot", n_boot=20
    )
    entries = run_explain_stage(old_run / "01_collect", old_run / "02_new", config, progress=False)
    assert all(e.explanation and e.candidates[0].reply.startswith(EXPLANATION_PREFIX) for e in entries)
    results = run_score_stage(old_run / "01_collect", old_run / "02_new", old_run / "03_new", config, progress=False)
    for r in results:
        assert not r.failure and {"simulation", "detection", "fuzzing"} <= set(r.results)
    assert read_json(old_run / "03_new" / "usage.json")["requests"] == 0  # the parrot counts only explanations
    assert read_json(old_run / "02_new" / "usage.json")["requests"] == 2


class PairSums(MLPNeurons):
    """A unit type with its own transform and width: the sum of each neighbouring pair of MLP neurons."""

    kind = "neuron_pairs"
    noun = "pair"

    def width(self, model: Any) -> int:
        return super().width(model) // 2

    def transform(self, captured: torch.Tensor, layer: int) -> torch.Tensor:
        return captured[..., 0::2] + captured[..., 1::2]

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}


def test_a_unit_type_defined_here_is_collected_and_named(tmp_path, monkeypatch):
    monkeypatch.setitem(unit_registry.UNIT_TYPES, "neuron_pairs", PairSums)
    model = tiny_model("llama")
    tok = type("Tok", (), {"decode": lambda self, ids: f"t{ids[0]}"})()
    subject = SubjectModel(model, tok, "tiny-llama")
    tokens = torch.randint(0, 512, (24, 8), generator=torch.Generator().manual_seed(0)).numpy().astype(np.int32)
    excerpts = ExcerptSet(tokens, np.zeros((24, 2), dtype=np.int64), "random", 0, 24)
    cfg = CollectConfig(layers=[1], top_k=3, n_random=4, band_size=1, quantile_warmup=8, batch_size=8)
    unit = unit_registry.unit_type_class("neuron_pairs")()
    store = collect_activations(subject, excerpts, tmp_path / "c", cfg, progress=False, unit=unit)
    assert store.meta.kind == "neuron_pairs" and store.meta.neurons_per_layer == 24  # 48 neurons, in pairs
    assert read_json(tmp_path / "c" / "collection.json")["unit"] == {"kind": "neuron_pairs"}
    assert store.unit(1, 5) == UnitId(1, 5, "neuron_pairs")
    with NeuronCapture(model, resolve_site(model), [1]) as cap:  # independent: hook the MLP, add pairs by hand
        mlp = cap.run(torch.from_numpy(tokens.astype(np.int64)))[1].numpy()
    pairs = mlp[..., 0::2] + mlp[..., 1::2]
    rec = store.record(1, 5)
    for e in rec.random:
        np.testing.assert_allclose(e.activations, pairs[e.index, :, 5], rtol=1e-5, atol=1e-6)
    assert rec.top[0].max == pytest.approx(pairs[:, :, 5].max(), rel=1e-5)
    neurons = RecordStore(collect_activations(subject, excerpts, tmp_path / "n", cfg, progress=False).path)
    assert neurons.meta.kind == "mlp_neuron" and "unit" not in read_json(tmp_path / "n" / "collection.json")


def test_a_stored_run_exports_to_neuronpedia_in_its_format(old_run, tmp_path):
    """The export read from a stored run (the fast tier's check of the format; the full suite also exports a
    fresh run through `nbutils export-neuronpedia` and a latent run, in test_pipeline and test_latent_chain)."""
    from test_latent_chain import check_neuronpedia_export

    from nbutils.interop.neuronpedia import export_neuronpedia

    written = export_neuronpedia(old_run, tmp_path / "np")
    source = tmp_path / "np" / "smollm2-135m-instruct" / "29-mlp-neurons"
    assert source / "features" / "batch-0.jsonl.gz" in written
    check_neuronpedia_export(tmp_path / "np", source, 1)  # every row valid against the schema, ids join up


def test_a_unit_named_by_text_or_numpy_integers_is_the_same_unit(old_run):
    """`run.unit("29", "0")` (a widget's text) and numpy integers (a data frame's cell) name unit (29, 0); a value
    that is no whole number is named, not reported as an uncollected layer."""
    import nbutils

    run = nbutils.open_run(old_run)
    want = run.unit(29, 0).key
    for layer, index in (("29", "0"), (np.int64(29), np.int32(0)), (" 29", 0)):
        got = run.unit(layer, index).key
        assert got == want and all(type(x) is int for x in got[:2])
    for layer, index in (("29.5", 0), (29.5, 0), (29, None)):
        with pytest.raises(UserError, match="is not a whole number"):
            run.unit(layer, index)


def test_live_calls_against_a_dead_server_are_refused_in_seconds_naming_it(old_run):
    """`open_run` with an HTTP explainer and simulator that nothing serves: ``u.score`` and ``u.explain`` probe
    the server first, as the command line does, instead of failing after the client's retries."""
    import time

    from servers import free_port

    import nbutils

    dead = {role: f"http://127.0.0.1:{free_port()}/v1" for role in ("explainer", "simulator")}
    roles = {f"{r}_{k}": v for r in dead for k, v in (("backend", "openai"), ("base_url", dead[r]))}
    u = nbutils.open_run(old_run, **roles).unit(29, 0)
    for role, call in (("simulator", lambda: u.score("the word of")), ("explainer", u.explain)):
        started = time.monotonic()
        with pytest.raises(UserError, match=re.escape(f"Nothing answers at {dead[role]} ({role}_base_url)")) as e:
            call()
        assert time.monotonic() - started < 5, role
        assert (
            "before the live call sent anything" in e.value.problem and f"open_run(run, {role}_base_url=" in e.value.fix
        )
