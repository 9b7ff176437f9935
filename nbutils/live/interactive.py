"""Working with a run live, one unit at a time (`nbutils.open_run` returns a `Run`):

- ``u = run.unit(layer, index[, sign])``: a collected unit side, shown in Jupyter as the viewer shows it;
- ``u.activations(text)``: its values on your text; ``run.top_units(text)``: the units that fire most on it;
- ``u.score(explanation)`` / ``u.compare([...])``: your explanation simulated and scored now, as stage 03
  scores (same excerpts, seed and scorers); ``u.explain()``: a new explanation, with the exact prompt and reply;
- ``u.steer(prompt, strength)``: continuations with and without the unit shifted (the intervention score's
  code); ``run.search(text)``: units whose explanations match a text, best first.

The subject model and the LLM backends load on first use, once per run, from the run's own records: the
collection's ``collection.json`` (model, unit type, site) and the parameters stages 02 and 03 ran with (their
``parameters.json``), overridden by keyword arguments to `nbutils.open_run` (``simulator_backend="openai"``,
``simulator_base_url=...``). Every result is a dataclass from `nbutils.live.findings`. Asking the same
question again is answered from the run's memory (HTTP backends also keep every reply in the request cache).
"""

from __future__ import annotations

import difflib
import html
import operator
from collections.abc import Sequence
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from nbutils.core.config import RunConfig, schema
from nbutils.core.errors import UserError
from nbutils.core.io import read_json
from nbutils.core.layout import MANIFEST
from nbutils.core.records import UnitRecord
from nbutils.core.results import ExplanationEntry
from nbutils.core.units import Key
from nbutils.explain.contract import Explainer, base_entry, explain_side, make_explainer
from nbutils.explain.stage import explainer_spec
from nbutils.live.findings import (
    Comparison,
    ExplanationScore,
    NewExplanation,
    SearchResults,
    Steering,
    TopUnits,
    UnitActivations,
)
from nbutils.live.models import Live
from nbutils.llm.contract import Backend, BackendSpec, make_backend
from nbutils.llm.reach import LIVE, check_llm_server
from nbutils.score.contract import Scorer, UnitScores
from nbutils.score.flags import explanation_notes
from nbutils.score.intervention import TARGET_KL
from nbutils.score.stage import chosen_scorers, score_entry, settings, simulator_spec
from nbutils.view.render import fragment, neuron_html
from nbutils.view.runview import RunView, result_notes
from nbutils.view.tables import neuron_scale

SIGNS = ("positive", "negative")


def _unreachable(role: str, failure: str, config: RunConfig) -> UserError:
    """A backend that did not answer, named with how to point the run at one that does."""
    prefix = "explainer" if role == "explainer" else "simulator"
    where = getattr(config, f"{prefix}_base_url") or "this machine"
    return UserError(
        f"The {role} ({getattr(config, f'{prefix}_backend')!r} at {where}) did not answer: {failure}",
        f"Start that server, or open the run with another: nbutils.open_run(run_dir, {prefix}_backend='openai', "
        f"{prefix}_base_url='http://host:port/v1') (or {prefix}_backend='local' for the embedded model).",
    )


class Unit:
    """One collected unit side of a run: its record, explanation and scores; its values on any text; your
    explanations scored; a new explanation; steering."""

    def __init__(self, run: Run, layer: int, index: int, sign: str = "positive") -> None:
        if sign not in SIGNS:
            raise UserError(f"Unknown sign {sign!r}.", "Use 'positive' or 'negative'.")
        self.run, self.layer, self.index, self.sign = run, layer, index, sign
        self.record: UnitRecord = run.store.record(layer, index)  # names an uncollected unit, with the fix

    @property
    def key(self) -> Key:
        return (self.layer, self.index, self.sign)

    @property
    def negative(self) -> bool:
        return self.sign == "negative"

    @property
    def explanation(self) -> str | None:
        entry = self.run.explanations.get(self.key)
        return entry.explanation if entry else None

    @property
    def scores(self) -> UnitScores | None:
        """This side's stage-03 result, if it was scored."""
        return self.run.scores.get(self.key)

    def activations(self, text: str | Sequence[int]) -> UnitActivations:
        """This unit's value on each token of ``text`` (a string, tokenized as the corpus was, or token ids);
        for an attention head also where it looks from each token (drawn as arcs)."""
        live = self.run.live
        ids = live.token_ids(text)
        values = live.values(ids, [self.layer])[self.layer][:, self.index].astype(np.float64)
        if self.negative:
            values = -values
        looks = live.looks(ids, self.layer, self.index)
        return UnitActivations(self.key, live.tokens(ids), ids, values, neuron_scale(self.record), looks)

    def score(self, explanation: str, scorers: Sequence[str] | None = None) -> ExplanationScore:
        """``explanation`` simulated and scored now, on the same held-out excerpts with the same seed as stage
        03 (so the stage-02 explanation scores what stage 03 stored), beside the token-lookup baseline.
        ``scorers``: names among the run's stage-03 scorers (default: all of them, costing what stage 03 costs
        for one unit); ``scorers=["simulation"]`` answers first and fastest while a wording is tried, and
        detection and fuzzing can follow on request. The same question again costs nothing."""
        text = explanation.strip() if isinstance(explanation, str) else ""
        if not text:
            raise UserError("The explanation is empty.", "Give a sentence, e.g. u.score('dates and month names').")
        return self.run._score(self, text, scorers)

    def compare(self, explanations: Sequence[str]) -> Comparison:
        """Several explanations scored on the same excerpts (`score` each), side by side."""
        if isinstance(explanations, str) or not explanations:
            raise UserError(
                "compare takes a list of explanations.",
                "Write u.compare(['dates and month names', 'the token March']).",
            )
        return Comparison(self.key, [self.score(e) for e in explanations])

    def explain(self) -> NewExplanation:
        """A new explanation by the run's explainer, as stage 02 writes one (same excerpts and parameters):
        the exact chat sent and every raw reply. With a deterministic explainer and the run's seed it is
        stage 02's explanation again."""
        return self.run._explain(self)

    def steer(self, prompt: str, strength: float | None = None, tokens: int = 12, kl: float = TARGET_KL) -> Steering:
        """Greedy continuations of ``prompt`` (``tokens`` tokens) as the model is and with this unit shifted at
        every position: by ``strength`` x its largest collected value, or (``strength=None``) by the shift
        that moves the next-token distributions on the prompt by ``kl`` nats, as the intervention score
        steers. The negative side shifts the unit down."""
        if tokens < 1:
            raise UserError(f"tokens={tokens} asks for no continuation.", "Ask for one token or more (12 by default).")
        live = self.run.live
        steer = live.intervention
        ids = live.token_ids(prompt)
        scale = self.record.min if self.negative else self.record.max
        direction = -1.0 if self.negative else 1.0
        found_kl = None
        if strength is None:
            shift, found_kl = steer.steering_for(self.layer, self.index, [ids], kl, scale, direction)
        else:
            shift = float(strength) * abs(scale) * direction
        original = steer.continue_text(self.layer, self.index, [ids], tokens)[0]
        steered = steer.continue_text(self.layer, self.index, [ids], tokens, shift)[0]
        decode = live.tokenizer.decode
        return Steering(self.key, prompt, shift, strength, found_kl, decode(original), decode(steered))

    def __repr__(self) -> str:
        return f"Unit(layer={self.layer}, index={self.index}, sign={self.sign!r}, explanation={self.explanation!r})"

    def _repr_html_(self) -> str:
        return fragment(neuron_html(self.run, self.layer, self.index, self.sign))


SKIP_FIRST = 2
"""Positions at the start of a typed text that `Run.top_units` leaves out of its ranking by default."""


def _reachable(role: str, spec: BackendSpec) -> BackendSpec:
    """``spec``, once its servers answer (HTTP backends): a live call against a dead server is refused in
    seconds with the server named, as the command line refuses it, not after the client's retries."""
    if spec.kind == "openai":
        check_llm_server(role, spec.base_url, spec.api_key_env, when=LIVE)
    return spec


class Run(RunView):
    """A run opened for working with it live (`nbutils.open_run`): everything `RunView` reads, plus units
    and their live calls (module docstring)."""

    _overrides: dict[str, Any] = {}

    _llm_options: dict[str, Any] = {}

    def configure(self, llm_options: dict[str, Any] | None = None, **overrides: Any) -> Run:
        """Use these parameters (``RunConfig`` names) instead of the ones the run's stages ran with, e.g.
        ``simulator_backend="openai", simulator_base_url="http://host:port/v1"``; ``llm_options``: keyword
        arguments for the HTTP backend (``timeout``, ``max_retries``, ``backoff``). Returns the run."""
        known = schema()
        unknown = [name for name in overrides if name not in known]
        if unknown:
            near = {n: difflib.get_close_matches(n, known, 1) for n in unknown}
            hint = ", ".join(f"{n} (did you mean {m[0]}?)" if m else n for n, m in near.items())
            raise UserError(
                f"Unknown parameters: {hint}.",
                "Use names of nbutils.core.config.RunConfig (`nbutils run --list-params` lists them).",
            )
        self._overrides, self._llm_options = dict(overrides), dict(llm_options or {})
        for name in ("config", "simulator", "explainer", "_memo"):
            self.__dict__.pop(name, None)
        return self

    @property
    def _recorded(self) -> list[Path]:
        """Files with the parameters the run's stages 02 and 03 ran with: each stage's ``parameters.json``, or
        for runs written before it existed, the chain's ``manifest.json``."""
        folders = [self.explanation_summary.parent if self.explanation_summary else None,
                   self.score_layout.root if self.score_layout else None]  # fmt: skip
        found = []
        for folder in (Path(f) for f in folders if f is not None):
            found += [p for p in (folder / "parameters.json", folder / MANIFEST) if p.is_file()][:1]
        return found

    @cached_property
    def config(self) -> RunConfig:
        """The parameters live calls use: the defaults, then what stage 02 and stage 03 ran with (`config_from`),
        then the overrides given to `nbutils.open_run`."""
        values: dict[str, Any] = {}
        for path in self._recorded:
            data = read_json(path) or {}
            values.update((data.get("parameters") or {}) if path.name == MANIFEST else data)
        return RunConfig.pick({**values, **self._overrides})

    @property
    def config_from(self) -> str:
        """Where `config` came from, in words."""
        found = [f"{p.parent.name}/{p.name}" for p in self._recorded]
        source = " and ".join(found) if found else "the defaults (the run records no parameters of stages 02-03)"
        return source + (f", overridden by {sorted(self._overrides)}" if self._overrides else "")

    @cached_property
    def live(self) -> Live:
        """The collection's subject model and unit type, loaded on first use (on GPU when there is one)."""
        meta = self.store.meta
        return Live.load(meta.model, meta.unit, meta.site)

    @cached_property
    def simulator(self) -> Backend:
        """The run's simulator (it also judges detection and fuzzing items), made on first use."""
        return make_backend(replace(_reachable("simulator", simulator_spec(self.config)), options=self._llm_options))

    @cached_property
    def explainer(self) -> Explainer:
        """The run's explainer (`nbutils.explain.contract`), made on first use; its LLM backend, where it has
        one, is the simulator itself when both are the same model."""
        return make_explainer(self.config, self._explainer_backend, self.store.meta)

    def _explainer_backend(self) -> Backend:
        spec = explainer_spec(self.config)
        same = simulator_spec(self.config)
        if (spec.kind, spec.model, spec.base_url) == (same.kind, same.model, same.base_url):
            return self.simulator
        return make_backend(replace(_reachable("explainer", spec), options=self._llm_options))

    @cached_property
    def _memo(self) -> dict[tuple[Any, ...], Any]:
        return {}

    @property
    def scorers_live(self) -> list[Scorer]:
        """The scorers live scores run: those of the run's stage 03 (``scorers``, ablation, intervention)."""
        return chosen_scorers(self.config, self.store.meta.kind)

    def best_unit(self) -> Unit:
        """The unit side with the best top-and-random score; else the first explained one; else the first
        collected unit."""
        ranked = self.ranked()
        if ranked:
            return self.unit(*ranked[0][1])
        if self.explanations:
            return self.unit(*min(self.explanations))
        first = next(self.store.all_ids())
        return self.unit(first.layer, first.index)

    def unit(self, layer: int, index: int, sign: str = "positive") -> Unit:
        """A collected unit side; an uncollected layer or unit is a `UserError` naming what was collected.
        ``layer`` and ``index`` may come as text or numpy integers (a widget's value, a data frame's cell)."""
        layer, index = _whole("layer", layer), _whole("index", index)
        self._check_layer(layer)
        return Unit(self, layer, index, sign)

    def _check_layer(self, layer: int) -> None:
        if layer not in self.store.meta.layers:
            raise UserError(
                f"Layer {layer} was not collected (the collection holds layers {self.store.meta.layers}).",
                f"Pick one of those (layers=None: all of them), or re-run stage 01 with -p 'layers=[{layer}]'.",
            )

    def _chosen_live(self, names: Sequence[str] | None) -> list[Scorer]:
        """The run's live scorers named in ``names`` (None: all), refused by name when one is not among them."""
        live = self.scorers_live
        if names is None:
            return live
        names = [names] if isinstance(names, str) else list(names)
        known = [sc.name for sc in live]
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise UserError(
                f"scorers={names}: {'none given' if not names else f'{unknown} not among'} the run's scorers {known}.",
                f"Name some of {known} (e.g. scorers=['{known[0]}']), or leave scorers out for all of them."
                if known
                else "The run scores with no scorer: set scorers in open_run(run, scorers=[...]).",
            )
        return [sc for sc in live if sc.name in names]

    def _score(self, u: Unit, explanation: str, names: Sequence[str] | None = None) -> ExplanationScore:
        config, scorers = self.config, self._chosen_live(names)
        memo = ("score", u.key, explanation, tuple(sc.name for sc in scorers))
        if memo in self._memo:
            return self._memo[memo]
        stored = self.explanations.get(u.key) or base_entry(u.record, u.negative, config.split)
        # the exact simulator an explainer named simulates its own explanation, not a text typed in its place
        exact = stored.simulator if stored.explanation == explanation else None
        entry = replace(stored, explanation=explanation, failure=None, simulator=exact)
        subject = self.live.intervention if any(sc.needs_subject for sc in scorers) else None
        llm = self.simulator
        before = llm.usage.requests
        result, details = score_entry(entry, self.store, llm, scorers, settings(config), subject)
        if result.retryable:
            raise _unreachable("simulator", result.failure, config)
        own = explanation_notes({u.key: explanation}).get(u.key, [])
        found = ExplanationScore(
            u.key, explanation, result, details, scorers, neuron_scale(u.record), result_notes(result, scorers, own),
            llm.usage.requests - before, self.scores.get(u.key),
        )  # fmt: skip
        self._memo[memo] = found
        return found

    def _explain(self, u: Unit) -> NewExplanation:
        memo = ("explain", u.key)
        if memo in self._memo:
            return self._memo[memo]
        c, explainer = self.config, self.explainer
        before = explainer.usage.requests
        ctx = explain_side(u.record, explainer, u.negative)
        entry = ctx.entry
        messages = explainer.llm.explanation_messages(ctx.sent) if ctx.sent is not None else []
        if entry.retryable and not entry.explanation:
            raise _unreachable("explainer", entry.failure, c)
        found = NewExplanation(u.key, messages, entry, explainer.usage.requests - before)
        self._memo[memo] = found
        return found

    def top_units(
        self, text: str | Sequence[int], k: int = 20, layers: Sequence[int] | None = None, skip_first: int = SKIP_FIRST
    ) -> TopUnits:
        """The ``k`` collected units (of ``layers``, default all collected) that fire most on ``text``, ranked
        by their largest value on it relative to their largest collected value (see `TopUnits`).

        ``skip_first``: the text's first positions left out of the ranking (default 2). The collection read
        windows from the middle of documents, so no unit's collected maximum covers a text's opening tokens, where
        many units take values tens of times beyond it (attention-sink positions): ranked in, they crowd out
        every other hit. 0 ranks every position; a text no longer than ``skip_first`` is ranked whole."""
        layers = sorted(layers) if layers is not None else list(self.store.meta.layers)
        if not layers:
            raise UserError("No layer was asked for.", "Give layers=None for every collected layer.")
        if not isinstance(skip_first, (int, np.integer)) or skip_first < 0:
            raise UserError(
                f"skip_first={skip_first!r} is not a whole number >= 0.",
                "Give the positions to leave out, e.g. 2 (0: none).",
            )
        for layer in layers:
            self._check_layer(layer)
        live = self.live
        ids = live.token_ids(text)
        tokens = live.tokens(ids)
        start = int(skip_first) if len(ids) > skip_first else 0
        found = []
        for layer, values in live.values(ids, layers).items():
            collected = self.store.neurons(layer)
            mine = values[start:, collected]  # [ranked tokens, collected units]
            peak = self.store.stats(layer)["max"]
            best = mine.max(axis=0)
            where = mine.argmax(axis=0) + start
            with np.errstate(divide="ignore", invalid="ignore"):
                relative = np.where(peak > 0, best / peak, -np.inf)
            for i in np.argsort(-relative)[:k]:
                if np.isfinite(relative[i]):
                    found.append(
                        (float(relative[i]), layer, int(collected[i]), float(best[i]), float(peak[i]), int(where[i]))
                    )
        found.sort(key=lambda f: -f[0])
        rows = [
            {"layer": layer, "unit": index, "relative": rel, "value": value, "collected_max": peak,
             "position": pos, "token": tokens[pos],
             "explanation": _text(self.explanations.get((layer, index, "positive")))}
            for rel, layer, index, value, peak, pos in found[:k]
        ]  # fmt: skip
        return TopUnits(tokens, rows, skipped=start)

    def search(self, text: str, k: int = 50, by: str = "words") -> SearchResults:
        """Up to ``k`` unit sides that match ``text``, best first, each with its score. ``by="words"``: their
        explanation, candidates, rule or strongest tokens hold words of ``text`` (BM25 over the results store's
        full-text index, words stemmed: "months" finds "month"; ``matched`` lists them, ``relevance`` is
        BM25's). ``by="meaning"``: their explanations are nearest in meaning (the cosine of embeddings from
        ``embedding_base_url``, `nbutils.live.meaning`; ``relevance`` is the cosine), for words the
        explanation did not use. ``by="both"``: the two rankings fused (reciprocal rank, k=60)."""
        if not isinstance(text, str) or not text.split():
            raise UserError("The search text is empty.", "Give a word or two, e.g. run.search('month').")
        if by not in ("words", "meaning", "both"):
            raise UserError(
                f"by={by!r} is not a way to search.",
                'Search with one of: "words", "meaning", "both" (the by argument).',
            )
        words = self.matching(text, None if by == "both" else k) if by != "meaning" else []
        near = (
            self._meaning().nearest(text, self.explanation_texts(), None if by == "both" else k)
            if by != "words"
            else []
        )
        if by == "both":
            fused: dict[Key, float] = {}
            for ranking in ([key for key, _, _ in words], [key for key, _ in near]):
                for rank, key in enumerate(ranking):
                    fused[key] = fused.get(key, 0.0) + 1.0 / (60 + rank + 1)
            matched = {key: w for key, _, w in words}
            found = [(key, value, matched.get(key, [])) for key, value in sorted(fused.items(), key=lambda kv: -kv[1])]
        else:
            found = words if by == "words" else [(key, value, []) for key, value in near]
        score = {key: value for value, key in self.ranked()}  # the store's index, not every result
        rows = [
            {"layer": key[0], "neuron": key[1], "sign": key[2], "matched": ", ".join(matched),
             "relevance": round(relevance, 4), "explanation": _text(self.explanations.get(key)),
             "score": score.get(key)}
            for key, relevance, matched in found[:k]
        ]  # fmt: skip
        return SearchResults(text, rows)

    def _meaning(self) -> Any:
        """The run's explanations by meaning (`nbutils.live.meaning.MeaningIndex`), on ``embedding_base_url``."""
        from nbutils.live.meaning import MeaningIndex

        c = self.config
        if not c.embedding_base_url:
            raise UserError(
                "Search by meaning needs an embeddings server, and embedding_base_url is not set.",
                "Open the run with one: nbutils.open_run(run, embedding_base_url='http://host:port/v1', "
                "embedding_model=...) (OpenAI, vLLM, or llama.cpp's server with embeddings on); or search by words.",
            )
        check_llm_server("embeddings", c.embedding_base_url, c.embedding_api_key_env, when=LIVE)
        folder = self.explanation_summary.parent if self.explanation_summary else None
        if folder is None:
            raise UserError("This run has no explanations (stage 02) to search.", "Run stage 02 first.")
        return MeaningIndex(folder, c.embedding_base_url, c.embedding_model, c.embedding_api_key_env)

    def _repr_html_(self) -> str:
        meta = self.store.meta
        return (
            f"<p>run of {html.escape(str(meta.model))}: layers {meta.layers}, {len(self.explanations)} explained and "
            f"{len(self.scores)} scored unit sides; live calls use the parameters of "
            f"{html.escape(self.config_from)}. Try <code>run.unit(layer, index)</code>, "
            "<code>run.top_units(text)</code>, <code>run.search(text)</code>, <code>run.scores_frame()</code>; "
            "on a unit: <code>activations(text)</code>, <code>score(explanation)</code>, <code>explain()</code>, "
            "<code>steer(prompt)</code>.</p>"
        )


__all__ = ["Run", "Unit"]


def _text(entry: ExplanationEntry | None) -> str | None:
    """An entry's explanation (None where the side has no entry)."""
    return entry.explanation if entry else None


def _whole(name: str, value: Any) -> int:
    """``value`` as a Python int: an int, a numpy integer or the text of one; anything else is named."""
    try:
        return int(value.strip()) if isinstance(value, str) else operator.index(value)
    except (TypeError, ValueError):
        raise UserError(
            f"The unit's {name} {value!r} is not a whole number.", "Pass whole numbers: run.unit(15, 938)."
        ) from None
