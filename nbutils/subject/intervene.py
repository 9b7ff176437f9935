"""Running the subject model with one unit's values set or shifted by hand, for scores of what a unit does to
the output (`nbutils.score.ablation`, `nbutils.score.intervention`).

- `UnitIntervention.kl_from_original`: excerpts through the whole model as it is and with one unit's value
  replaced at every position by given values; how far each replacement moves the next-token distributions
  (mean KL per excerpt), one batch at a time so that no ``[excerpts, tokens, vocab]`` tensor is kept.
- `UnitIntervention.steering_for`: how much to add to a unit's value at every position so that the
  next-token distributions move by a target KL (bisection), and `UnitIntervention.continue_text`: greedy
  continuations with that shift applied (or without).

For an MLP neuron the value set is the one that enters the output projection (`nbutils.subject.sites`), so
everything downstream of the neuron, and nothing else, sees the new value; for an SAE latent the hooked
activation moves along the latent's decoder row by the change in its value, the SAE's reconstruction error
kept (`UnitType.edit`). Hooks are process-wide state on
the model's modules, so calls hold a lock: stage 03 may score several units on threads at once.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from nbutils.core.errors import UserError
from nbutils.core.units import NEURON
from nbutils.subject.outputs import unembedding
from nbutils.subject.sites import site_module
from nbutils.subject.units import UnitType


class UnitIntervention:
    """One subject model and its unit type, run with a unit's values set or shifted (module docstring)."""

    def __init__(self, model: Any, unit: UnitType, tokenizer: Any = None, batch_size: int = 8) -> None:
        self.model, self.unit, self.tokenizer, self.batch_size = model, unit, tokenizer, batch_size
        self.site = unit.site(model)
        self.device = next(model.parameters()).device
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _set(self, layer: int, index: int, values: torch.Tensor | float | None, add: bool = False) -> Iterator[None]:
        """Within the block, unit ``index`` of ``layer`` is set to ``values`` (or shifted by them, ``add``):
        a tensor ``[batch, tokens]`` or one number for every position. None: the model as it is."""
        if values is None:
            yield
            return

        def change(x: torch.Tensor) -> torch.Tensor:
            return self.unit.edit(x, layer, index, values, add)

        module = site_module(self.model, self.site, layer)
        if self.site.side == "input":
            handle = module.register_forward_pre_hook(lambda m, args: (change(args[0]), *args[1:]))
        else:
            handle = module.register_forward_hook(
                lambda m, args, out: (change(out[0]), *out[1:]) if isinstance(out, tuple) else change(out)
            )
        try:
            yield
        finally:
            handle.remove()

    def _logprobs(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.model(input_ids=batch, use_cache=False).logits.double(), dim=-1)

    def _batches(self, token_ids: Sequence[Sequence[int]]) -> Iterator[tuple[int, torch.Tensor]]:
        ids = torch.as_tensor(np.asarray(token_ids), dtype=torch.long)
        for start in range(0, len(ids), self.batch_size):
            yield start, ids[start : start + self.batch_size].to(self.device)

    @staticmethod
    def _kl(original: torch.Tensor, changed: torch.Tensor) -> np.ndarray:
        """Mean over positions of KL(original || changed) per excerpt (log-probabilities in)."""
        return (original.exp() * (original - changed)).sum(-1).clamp_min(0.0).mean(-1).cpu().numpy()

    @torch.inference_mode()
    def kl_from_original(
        self, layer: int, index: int, token_ids: Sequence[Sequence[int]], replacements: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """For each named replacement (values ``[excerpts, tokens]`` for unit ``index`` of ``layer``), the
        mean over positions of KL(original || replaced) per excerpt, in nats (computed in float64)."""
        out: dict[str, list[np.ndarray]] = {name: [] for name in replacements}
        with self._lock:
            for start, batch in self._batches(token_ids):
                original = self._logprobs(batch)
                for name, values in replacements.items():
                    v = torch.as_tensor(np.asarray(values)[start : start + len(batch)], device=self.device)
                    with self._set(layer, index, v):
                        out[name].append(self._kl(original, self._logprobs(batch)))
        return {name: np.concatenate(v) if v else np.zeros(0) for name, v in out.items()}

    @torch.inference_mode()
    def steering_for(
        self, layer: int, index: int, token_ids: Sequence[Sequence[int]], target_kl: float, scale: float,
        direction: float = 1.0, steps: int = 6,
    ) -> tuple[float, float]:  # fmt: skip
        """The shift (in ``direction``, a multiple of ``scale``) whose mean KL(original || shifted) over every
        position of the excerpts is closest to ``target_kl``: doubled from ``scale`` until it passes the
        target (at most 2^12 x ``scale``), then bisected ``steps`` times. Returns (shift, its KL)."""
        with self._lock:
            batches = [batch for _, batch in self._batches(token_ids)]
            originals = [self._logprobs(batch) for batch in batches]

            def kl_of(shift: float) -> float:
                kls = []
                for batch, original in zip(batches, originals):
                    with self._set(layer, index, direction * shift, add=True):
                        kls.append(self._kl(original, self._logprobs(batch)))
                return float(np.concatenate(kls).mean()) if kls else 0.0

            lo, hi = 0.0, abs(scale) if scale else 1.0
            kl_hi = kl_of(hi)
            for _ in range(12):
                if kl_hi >= target_kl:
                    break
                lo, hi = hi, hi * 2
                kl_hi = kl_of(hi)
            best = (hi, kl_hi)
            for _ in range(steps if kl_hi >= target_kl else 0):
                mid = (lo + hi) / 2
                kl = kl_of(mid)
                lo, hi = (mid, hi) if kl < target_kl else (lo, mid)
                if abs(kl - target_kl) < abs(best[1] - target_kl):
                    best = (mid, kl)
        return direction * best[0], best[1]

    @torch.inference_mode()
    def continue_text(
        self, layer: int, index: int, token_ids: Sequence[Sequence[int]], n_tokens: int, shift: float | None = None
    ) -> list[list[int]]:
        """Greedy continuations of ``n_tokens`` tokens for each prompt (all of one length), with ``shift``
        added to the unit at every position, prompt and continuation (None: the model as it is)."""
        out: list[list[int]] = []
        with self._lock:
            for _, batch in self._batches(token_ids):
                with self._set(layer, index, shift, add=True):  # with the key/value cache, each step's new
                    ids, past = batch, None  # position is shifted as it is computed, like the prompt's
                    for _ in range(n_tokens):
                        step = self.model(
                            input_ids=ids if past is None else ids[:, -1:], past_key_values=past, use_cache=True
                        )
                        past = step.past_key_values
                        ids = torch.cat([ids, step.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
                out += ids[:, batch.shape[1] :].cpu().tolist()
        return out


def check_intervenable(model: Any, unit: dict[str, Any], what: str = "score it") -> None:
    """Refuse, with the fix, a unit that nbutils cannot set (a transcoder's latent) or a model whose output
    there is nothing to compare (no language-model head). ``what``: the task named in the fix."""
    if unit.get("transcoder"):
        raise UserError(
            f"Setting a transcoder's latent ({unit['path']}) would change the MLP's output, which nbutils does not "
            "hook yet.",
            f"To {what}, use an SAE's or a neuron's unit; score transcoder latents without ablation and intervention "
            "(ablation=False, intervention=False).",
        )
    if unembedding(model) is None:
        raise UserError(
            "The subject model predicts no next token (planted neurons have no language model head), so there is "
            "no output to compare.",
            f"To {what}, use a language model; score planted neurons without ablation or intervention "
            "(ablation=False, intervention=False).",
        )


def intervention_for(model_spec: str, unit: dict[str, Any], site: dict[str, Any] | None) -> UnitIntervention:
    """Load a collection's subject model (``collection.json``'s model, unit and site) for interventions."""
    from nbutils.subject.loading import load_subject_model
    from nbutils.subject.units import unit_type_class

    if unit.get("transcoder"):
        check_intervenable(None, unit)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    subject = load_subject_model(model_spec, device=device)
    check_intervenable(subject.model, unit)
    units = unit_type_class(unit.get("kind", NEURON)).from_dict(unit, site)
    units.site(subject.model)  # resolves (and for latents loads) the unit type on this model
    return UnitIntervention(subject.model, units, subject.tokenizer)
