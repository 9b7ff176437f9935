"""The subject model of a run, loaded once and kept for live calls: a unit's values on any tokens, and the
same model with one unit shifted (`nbutils.subject.intervene`, the code the intervention score uses)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from nbutils.core.errors import UserError


@dataclass
class Live:
    """A collection's subject model with its unit type resolved on it (``collection.json``'s model, unit and
    site), so live values are the collected ones."""

    subject: Any
    units: Any
    site: Any
    unit_spec: dict[str, Any]

    @classmethod
    def load(cls, model: str, unit: dict[str, Any], site: dict[str, Any] | None) -> Live:
        """Load the model (on GPU when there is one) and resolve the unit type on it."""
        from nbutils.subject.loading import load_collected

        return cls(*load_collected(model, unit, site), unit)

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

    def looks(self, ids: list[int], layer: int, index: int) -> Any:
        """Where unit ``index`` of ``layer`` looks from each token (`nbutils.core.records.Looks`): attention
        heads only (None for other units, or a collection made with looks turned off)."""
        from nbutils.core.records import Looks

        found = self.units.looks(self.subject.model, np.asarray([ids], dtype=np.int64), [layer])
        if not found:
            return None
        return Looks(*(found[layer][name][0, index] for name in Looks.LOOKS_FILES))

    def tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.tokenizer.decode([i]) for i in ids]

    @cached_property
    def intervention(self) -> Any:
        """The model run with one unit set or shifted (`nbutils.subject.intervene.UnitIntervention`), on the
        already loaded model; a model or unit type that cannot be steered is a `UserError`."""
        from nbutils.subject.intervene import UnitIntervention, check_intervenable

        check_intervenable(self.subject.model, self.unit_spec, "steer it")
        return UnitIntervention(self.subject.model, self.units, self.tokenizer)


__all__ = ["Live"]
