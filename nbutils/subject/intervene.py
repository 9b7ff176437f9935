"""Running the subject model with one unit's values set by hand, for scores of what a unit does to the output.

`UnitIntervention.kl_from_original` runs excerpts through the whole model as it is and with one unit's value
replaced at every position by given values, and returns how far each replacement moves the next-token
distributions (mean KL per excerpt), one batch at a time so that no [excerpts, tokens, vocab] tensor is kept.
For an MLP neuron the replaced value is the one that enters the output projection (`nbutils.subject.sites`),
so everything downstream of the neuron, and nothing else, sees the new value.

Hooks are process-wide state on the model's modules, so calls hold a lock: stage 03 may score several units
on threads at once.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from nbutils.core.errors import UserError
from nbutils.core.units import NEURON
from nbutils.subject.outputs import unembedding
from nbutils.subject.sites import site_module
from nbutils.subject.units import UnitType


class UnitIntervention:
    """One subject model and its unit type, run with a unit's values replaced (see the module docstring)."""

    def __init__(self, model: Any, unit: UnitType, batch_size: int = 8) -> None:
        if unit.kind != NEURON:
            raise UserError(
                f"Ablation is built for MLP neurons; this collection's units are {unit.kind!r}.",
                "Score these units without ablation (ablation=False).",
            )
        self.model, self.unit, self.batch_size = model, unit, batch_size
        self.site = unit.site(model)
        self._lock = threading.Lock()

    def _hook(self, index: int, values: torch.Tensor):  # noqa: ANN202
        def replace(x: torch.Tensor) -> torch.Tensor:
            x = x.clone()
            x[..., index] = values.to(x.dtype)
            return x

        if self.site.side == "input":
            return lambda module, args: (replace(args[0]), *args[1:])
        return lambda module, args, output: (
            (replace(output[0]), *output[1:]) if isinstance(output, tuple) else replace(output)
        )

    def _logprobs(self, batch: torch.Tensor, layer: int, index: int, values: torch.Tensor | None) -> torch.Tensor:
        """Next-token log-probabilities ``[batch, tokens, vocab]``, unit ``index`` of ``layer`` set to
        ``values`` ``[batch, tokens]`` (None: the model as it is)."""
        handle = None
        if values is not None:
            module, hook = site_module(self.model, self.site, layer), self._hook(index, values)
            if self.site.side == "input":
                handle = module.register_forward_pre_hook(hook)
            else:
                handle = module.register_forward_hook(hook)
        try:
            return torch.log_softmax(self.model(input_ids=batch, use_cache=False).logits.double(), dim=-1)
        finally:
            if handle is not None:
                handle.remove()

    @torch.inference_mode()
    def kl_from_original(
        self, layer: int, index: int, token_ids: Sequence[Sequence[int]], replacements: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """For each named replacement (values ``[excerpts, tokens]`` for unit ``index`` of ``layer``), the
        mean over positions of KL(original || replaced) per excerpt, in nats (computed in float64)."""
        ids = torch.as_tensor(np.asarray(token_ids), dtype=torch.long)
        device = next(self.model.parameters()).device
        out: dict[str, list[np.ndarray]] = {name: [] for name in replacements}
        with self._lock:
            for start in range(0, len(ids), self.batch_size):
                batch = ids[start : start + self.batch_size].to(device)
                original = self._logprobs(batch, layer, index, None)
                for name, values in replacements.items():
                    v = torch.as_tensor(np.asarray(values)[start : start + self.batch_size], device=device)
                    changed = self._logprobs(batch, layer, index, v)
                    kl = (original.exp() * (original - changed)).sum(-1).clamp_min(0.0)
                    out[name].append(kl.mean(-1).cpu().numpy())
        return {name: np.concatenate(v) if v else np.zeros(0) for name, v in out.items()}


def intervention_for(model_spec: str, unit: dict[str, Any], site: dict[str, Any] | None) -> UnitIntervention:
    """Load a collection's subject model (``collection.json``'s model, unit and site) for interventions."""
    from nbutils.subject.loading import load_subject_model
    from nbutils.subject.units import MLPNeurons

    if unit.get("kind", NEURON) != NEURON:
        raise UserError(
            f"Ablation is built for MLP neurons; this collection's units are {unit.get('kind')!r}.",
            "Score these units without ablation (ablation=False).",
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_subject_model(model_spec, device=device).model
    if unembedding(model) is None:
        raise UserError(
            f"The subject model {model_spec!r} predicts no next token (planted neurons have no language model head), "
            "so ablation has nothing to compare.",
            "Score it without ablation (ablation=False).",
        )
    return UnitIntervention(model, MLPNeurons(site))
