"""What a unit writes: the tokens its output direction most promotes and suppresses through the unembedding.

A unit's *output direction* is what one unit of its value adds to the residual stream (`UnitType.
output_directions`; for an MLP neuron, its column of the MLP's output projection). Read through the final
norm and the unembedding it gives a change in every vocabulary token's logit: a vocabulary projection,
which Gur-Arieh et al. (ACL 2025, "Enhancing automated interpretability with output-centric feature
descriptions") found a cheap and strong description of what a unit does to the output.

The final norm is handled as a linear map on the direction: its gain is applied elementwise (Gemma's norms
scale by ``1 + gain``), and a LayerNorm (GPT-2, GPT-NeoX) first centres the direction. Its division by the
residual stream's size is left out: that positive factor is the same for every token, so it changes the
logits' scale, not their order. Biases are left out too (they do not depend on the unit). A positive value
of the unit promotes the first list and suppresses the second; a negative value (gated MLPs) does the reverse.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

WRITES_K = 10
"""Promoted and suppressed tokens kept per unit."""

_FINAL_NORMS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.final_layernorm")
_ONE_PLUS_GAIN = ("gemma", "gemma2", "gemma3_text")


def final_norm(model: Any) -> tuple[torch.Tensor | None, bool]:
    """The final norm's effective gain (None where the model has no known final norm) and whether it centres
    its input (LayerNorm) rather than only rescaling it (RMSNorm)."""
    for name in _FINAL_NORMS:
        try:
            norm = model.get_submodule(name)
        except AttributeError:
            continue
        gain = getattr(norm, "weight", None)
        if gain is None:
            return None, False
        gain = gain.detach().float()
        if getattr(model.config, "model_type", "") in _ONE_PLUS_GAIN:
            gain = 1.0 + gain
        return gain, isinstance(norm, torch.nn.LayerNorm)
    return None, False


def unembedding(model: Any) -> torch.Tensor | None:
    """The unembedding matrix ``[vocab, d_model]`` (None for a model without one, such as planted neurons)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return None if weight is None else weight.detach().float()


def logit_effects(model: Any, directions: torch.Tensor) -> torch.Tensor | None:
    """Each direction's change in every token's logit, ``[directions, vocab]`` (see the module docstring)."""
    unembed = unembedding(model)
    if unembed is None:
        return None
    d = directions.float().to(unembed.device)
    gain, centres = final_norm(model)
    if centres:
        d = d - d.mean(dim=-1, keepdim=True)
    if gain is not None:
        d = d * gain.to(d.device)
    return d @ unembed.T


def written_tokens(
    model: Any, directions: torch.Tensor | None, k: int = WRITES_K, chunk: int = 256
) -> dict[str, np.ndarray] | None:
    """For each direction, the ``k`` tokens it most promotes and most suppresses, with their logit changes:
    ``{"promote_ids", "promote_logits", "suppress_ids", "suppress_logits"}``, each ``[directions, k]``
    (suppressed logits are negative). None where the model has no unembedding or the unit no direction."""
    if directions is None or unembedding(model) is None:
        return None
    parts: dict[str, list[np.ndarray]] = {
        n: [] for n in ("promote_ids", "promote_logits", "suppress_ids", "suppress_logits")
    }
    with torch.inference_mode():
        for start in range(0, len(directions), chunk):
            effects = logit_effects(model, directions[start : start + chunk])
            k_ = min(k, effects.shape[-1])
            up, down = effects.topk(k_, dim=-1), (-effects).topk(k_, dim=-1)
            parts["promote_ids"].append(up.indices.cpu().numpy().astype(np.int32))
            parts["promote_logits"].append(up.values.cpu().numpy().astype(np.float32))
            parts["suppress_ids"].append(down.indices.cpu().numpy().astype(np.int32))
            parts["suppress_logits"].append(-down.values.cpu().numpy().astype(np.float32))
    width = min(k, len(unembedding(model)))
    return {
        n: np.concatenate(v) if v else np.zeros((0, width), np.int32 if n.endswith("ids") else np.float32)
        for n, v in parts.items()
    }
