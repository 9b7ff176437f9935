"""Working with a run live, one unit at a time: a unit's values on your own text, and the units that fire on
a text. `nbutils.open_run` returns a `Run`; its subject model loads on first use, once per run, from the
collection's own ``collection.json`` (model, unit type and site), so live values are the collected ones.

Every result is a small dataclass with plain fields for code, ``to_frame()`` for a table, and a
``_repr_html_`` (tokens escaped) that Jupyter shows.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from nbutils.core.errors import UserError
from nbutils.core.records import UnitRecord
from nbutils.core.units import Key
from nbutils.view.render import fragment, neuron_html
from nbutils.view.runview import RunView
from nbutils.view.tables import EXCERPTS_STYLE, heatmap_html, neuron_scale, table_html

SIGNS = ("positive", "negative")


@dataclass
class Live:
    """The subject model of a run, loaded once, with its unit type resolved on it."""

    subject: Any
    units: Any
    site: Any

    @property
    def tokenizer(self) -> Any:
        return self.subject.tokenizer

    def token_ids(self, text: str | Sequence[int]) -> list[int]:
        """Token ids of a text as the corpus was tokenized (no special tokens added), or the ids given."""
        if isinstance(text, str):
            if not text.strip():
                raise UserError("The text is empty.", "Give a sentence, e.g. 'The meeting moved to March.'.")
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            ids = [int(i) for i in text]
        if not ids:
            raise UserError("The text has no tokens.", "Give a sentence or a list of token ids.")
        context = getattr(self.subject.model.config, "max_position_embeddings", None)
        if context is not None and len(ids) > context:
            raise UserError(
                f"The text is {len(ids)} tokens long, more than the model's context ({context}).",
                f"Shorten it to at most {context} tokens.",
            )
        return ids

    def values(self, ids: list[int], layers: Sequence[int]) -> dict[int, np.ndarray]:
        """Every unit's value on each token, per layer: ``{layer: [tokens, units]}`` (one forward pass that
        stops after the last layer asked for)."""
        import torch

        from nbutils.subject.sites import NeuronCapture

        device = next(self.subject.model.parameters()).device
        batch = torch.tensor([ids], dtype=torch.long, device=device)
        with NeuronCapture(self.subject.model, self.site, layers) as capture:
            captured = capture.run(batch)
        return {layer: self.units.transform(v, layer)[0].float().cpu().numpy() for layer, v in captured.items()}

    def tokens(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([i]) for i in ids]


@dataclass
class UnitActivations:
    """One unit side's value on each token of a text: ``values[i]`` on ``tokens[i]``. A negative side's
    values are the unit's values negated, as its excerpts are stored (so "fires" means a large value)."""

    key: Key
    tokens: list[str]
    token_ids: list[int]
    values: np.ndarray
    scale: float
    """The unit's largest absolute collected value: the heatmap's colour scale, shared with its excerpts."""

    @property
    def max(self) -> float:
        return float(self.values.max())

    def to_frame(self):
        """A pandas DataFrame: ``position``, ``token``, ``token_id``, ``value``."""
        import pandas as pd

        return pd.DataFrame(
            {
                "position": range(len(self.tokens)),
                "token": self.tokens,
                "token_id": self.token_ids,
                "value": self.values,
            }
        )

    def _repr_html_(self) -> str:
        layer, index, sign = self.key
        head = (
            f"<p>layer {layer}, unit {index} ({html.escape(sign)}): max {self.max:.4g} on this text; "
            f"colours on the unit's collected scale ({self.scale:.4g}); hover a token for its value</p>"
        )
        return (
            head + f'<div style="{EXCERPTS_STYLE}">{heatmap_html(self.tokens, self.values, self.scale, "live")}</div>'
        )


@dataclass
class TopUnits:
    """The collected units that fire most on a text, strongest first. Ranked by ``relative``: the unit's
    largest value on the text over its largest value in the whole collection (1.0: as strongly as anywhere in
    the corpus), so units of different scales compare; units that never fired in the collection are left out."""

    tokens: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)

    def to_frame(self):
        """A pandas DataFrame with one row per unit: ``layer``, ``unit``, ``relative``, ``value``,
        ``collected_max``, ``position``, ``token``, ``explanation``."""
        import pandas as pd

        names = ["layer", "unit", "relative", "value", "collected_max", "position", "token", "explanation"]
        return pd.DataFrame(self.rows, columns=names)

    def _repr_html_(self) -> str:
        return table_html(self.rows) if self.rows else "<p>No collected unit fires on this text.</p>"


class Unit:
    """One collected unit side of a run: its record, explanation and scores, and its values on any text."""

    def __init__(self, run: Run, layer: int, index: int, sign: str = "positive") -> None:
        if sign not in SIGNS:
            raise UserError(f"Unknown sign {sign!r}.", "Use 'positive' or 'negative'.")
        self.run, self.layer, self.index, self.sign = run, layer, index, sign
        self.record: UnitRecord = run.store.record(layer, index)  # names an uncollected unit, with the fix

    @property
    def key(self) -> Key:
        return (self.layer, self.index, self.sign)

    @property
    def explanation(self) -> str | None:
        return (self.run.explanations.get(self.key) or {}).get("explanation")

    @property
    def scores(self) -> dict[str, Any] | None:
        """This side's stage-03 result, if it was scored."""
        return self.run.scores.get(self.key)

    def activations(self, text: str | Sequence[int]) -> UnitActivations:
        """This unit's value on each token of ``text`` (a string, tokenized as the corpus was, or token ids)."""
        live = self.run.live
        ids = live.token_ids(text)
        values = live.values(ids, [self.layer])[self.layer][:, self.index].astype(np.float64)
        if self.sign == "negative":
            values = -values
        return UnitActivations(self.key, live.tokens(ids), ids, values, neuron_scale(self.record))

    def __repr__(self) -> str:
        return f"Unit(layer={self.layer}, index={self.index}, sign={self.sign!r}, explanation={self.explanation!r})"

    def _repr_html_(self) -> str:
        return fragment(neuron_html(self.run, self.layer, self.index, self.sign))


class Run(RunView):
    """A run opened for working with it live (`nbutils.open_run`): everything `RunView` reads, plus units
    and their values on your own text."""

    @cached_property
    def live(self) -> Live:
        """The collection's subject model and unit type, loaded on first use (on GPU when there is one)."""
        import torch

        from nbutils.subject.loading import load_subject_model
        from nbutils.subject.units import unit_type_class

        meta = self.store.meta
        subject = load_subject_model(meta.model, device="cuda" if torch.cuda.is_available() else "cpu")
        units = unit_type_class(meta.kind).from_dict(meta.unit, meta.site)
        return Live(subject, units, units.site(subject.model))

    def unit(self, layer: int, index: int, sign: str = "positive") -> Unit:
        """A collected unit side; an uncollected layer or unit is a `UserError` naming what was collected."""
        self._check_layer(layer)
        return Unit(self, layer, index, sign)

    def _check_layer(self, layer: int) -> None:
        if layer not in self.store.meta.layers:
            raise UserError(
                f"Layer {layer} was not collected (the collection holds layers {self.store.meta.layers}).",
                f"Pick one of those (layers=None: all of them), or re-run stage 01 with -p 'layers=[{layer}]'.",
            )

    def top_units(self, text: str | Sequence[int], k: int = 20, layers: Sequence[int] | None = None) -> TopUnits:
        """The ``k`` collected units (of ``layers``, default all collected) that fire most on ``text``, ranked
        by their largest value on it relative to their largest collected value (see `TopUnits`)."""
        layers = sorted(layers) if layers is not None else list(self.store.meta.layers)
        if not layers:
            raise UserError("No layer was asked for.", "Give layers=None for every collected layer.")
        for layer in layers:
            self._check_layer(layer)
        live = self.live
        ids = live.token_ids(text)
        tokens = live.tokens(ids)
        found = []
        for layer, values in live.values(ids, layers).items():
            collected = self.store.neurons(layer)
            mine = values[:, collected]  # [tokens, collected units]
            peak = self.store.stats(layer)["max"]
            best = mine.max(axis=0)
            where = mine.argmax(axis=0)
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
             "explanation": (self.explanations.get((layer, index, "positive")) or {}).get("explanation")}
            for rel, layer, index, value, peak, pos in found[:k]
        ]  # fmt: skip
        return TopUnits(tokens, rows)

    def _repr_html_(self) -> str:
        meta = self.store.meta
        return (
            f"<p>run of {html.escape(str(meta.model))}: layers {meta.layers}, {len(self.explanations)} explained and "
            f"{len(self.scores)} scored unit sides. Try <code>run.unit(layer, index)</code>, "
            "<code>run.top_units(text)</code>, <code>run.scores_frame()</code>.</p>"
        )


__all__ = ["Run", "TopUnits", "Unit", "UnitActivations"]
