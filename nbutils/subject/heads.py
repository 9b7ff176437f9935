"""Attention heads as units: each head's activation per token, and where it looks for kept excerpts.

**The activation.** A head's value at a token is the norm of what it writes into the residual stream there:
``|| z_h W_O[h] ||``, where ``z_h`` is the head's slice of the input of the attention output projection (the
attention-weighted sum of its value vectors) and ``W_O[h]`` the projection's rows for that slice. It is the
per-query total of the Transformer Debugger's pair activation (the norm of what the head writes from one key
to one query; Mossing et al. 2024, OpenAI's ``transformer-debugger``): zero when the head adds nothing, large
when it moves a lot of information. It is exact and cheap in bulk: one hook on the output projection's input
(the same kind of hook as MLP neurons), and per token ``z_h^T (W_O[h] W_O[h]^T) z_h`` with the head's
``head_dim x head_dim`` Gram matrix computed once (``head_dim / d_model`` of the projection's own cost). The
projection's bias belongs to no head and is left out. In Gemma 2/3 the attention output is normalised again
(``post_attention_layernorm``) before it reaches the residual stream; the norm here is the one before that
norm, which is per head linear. Grouped-query attention changes nothing here: every query head has its own
slice of the projection's input.

**Where it looks** (``looks``, after the bulk pass, for the kept excerpts only): per token, the earlier position
(or the token itself) the head attends to most, that attention weight, and the norm of what the head writes
from that position to this token (``weight * || v_src W_O[h] ||``, the Transformer Debugger's pair activation).
It runs the excerpts again through the model's own eager attention, with a recording attention function
registered with transformers (`AttentionInterface`), so the weights are exactly the model's (sliding windows,
soft-capping and grouped-query attention included).

In results a head is ``layer`` and ``neuron`` = its index within the layer (`nbutils.core.units`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nbutils.core.errors import UserError
from nbutils.core.records import Looks
from nbutils.subject.sites import NeuronSite, check_layers, site_module
from nbutils.subject.units import UnitType

HEAD = "attention_head"
"""The kind of attention heads; ``-p units=attention_heads`` collects them."""
HEAD_UNITS = "attention_heads"

_LLAMA_LIKE = "model.layers.{layer}.self_attn.o_proj"
OUTPUT_PROJECTIONS = {
    "gpt2": "transformer.h.{layer}.attn.c_proj",
    "gpt_neox": "gpt_neox.layers.{layer}.attention.dense",
    **{arch: _LLAMA_LIKE for arch in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")},
}
"""The attention output projection by ``config.model_type``: its input is every head's ``z``, head-major."""

LOOKS = Looks.LOOKS_FILES
"""What `head_looks` returns per token (the collection's ``<list>_<name>.npy`` files)."""


def head_shape(model: Any) -> tuple[int, int]:
    """(heads per layer, head size) of a model."""
    c = model.config
    heads = int(getattr(c, "num_attention_heads", 0) or getattr(c, "n_head", 0))
    d_model = int(getattr(c, "hidden_size", 0) or getattr(c, "n_embd", 0))
    size = getattr(c, "head_dim", None) or d_model // heads
    return heads, int(size)


def _architecture(model: Any) -> str:
    arch = str(getattr(model.config, "model_type", type(model).__name__))
    if arch not in OUTPUT_PROJECTIONS:
        raise UserError(
            f"nbutils does not know where the attention heads of architecture {arch!r} write "
            f"(built in: {', '.join(sorted(OUTPUT_PROJECTIONS))}).",
            "Collect MLP neurons or SAE latents on this model, or register a unit type for its heads "
            "(docs/extensions.md).",
        )
    return arch


def head_out_weights(model: Any, layer: int) -> torch.Tensor:
    """``W_O`` per head, ``[heads, head_dim, d_model]``: the output projection's rows that each head's slice of
    its input multiplies (GPT-2's Conv1D stores ``[in, out]``; a Linear ``[out, in]``)."""
    module = site_module(model, NeuronSite(OUTPUT_PROJECTIONS[_architecture(model)]), layer)
    weight = module.weight.detach()
    heads, size = head_shape(model)
    w = weight.T if isinstance(module, torch.nn.Linear) else weight
    if w.shape[0] != heads * size:
        raise UserError(
            f"The attention output projection of layer {layer} reads {w.shape[0]} numbers, not heads x head size "
            f"= {heads} x {size}.",
            "This model's attention is laid out in a way nbutils does not read; collect MLP neurons instead.",
        )
    return w.reshape(heads, size, -1)


@dataclass(frozen=True)
class HeadSettings:
    looks: bool = True
    """Record where each head looks on its kept excerpts (one more pass over them after collection)."""


class AttentionHeads(UnitType):
    """Every attention head of the chosen layers; its value is the norm of its write (module docstring)."""

    kind = HEAD
    noun = "attention head"
    settings_type = HeadSettings

    def __init__(self, settings: HeadSettings | None = None) -> None:
        super().__init__(settings)
        self._grams: dict[int, torch.Tensor] = {}

    def site(self, model: Any) -> NeuronSite:
        """The output projection's input; reads every layer's per-head Gram matrix ``W_O[h] W_O[h]^T`` (in float64;
        `transform` casts it to the values' precision once) for `transform`, as an SAE's encoder is read with its site."""
        site = NeuronSite(OUTPUT_PROJECTIONS[_architecture(model)], "input", signed=False)
        if not self._grams:
            for layer in range(int(model.config.num_hidden_layers)):
                w = head_out_weights(model, layer).double()
                self._grams[layer] = w @ w.transpose(1, 2)
        return site

    def width(self, model: Any) -> int:
        return head_shape(model)[0]

    def signed(self, model: Any) -> bool:
        return False  # a norm

    def transform(self, captured: torch.Tensor, layer: int) -> torch.Tensor:
        """Each head's write norm ``[batch, tokens, heads]``, in float32 (float64 for a float64 model)."""
        gram = self._grams.get(layer)
        if gram is None:
            raise RuntimeError("AttentionHeads.transform before site(model) read the heads' weights")
        dtype = torch.float64 if captured.dtype == torch.float64 else torch.float32
        if gram.device != captured.device or gram.dtype != dtype:
            gram = self._grams[layer] = gram.to(captured.device, dtype)
        z = captured.to(dtype).unflatten(-1, (gram.shape[0], gram.shape[1]))
        squared = (torch.einsum("...hi,hij->...hj", z, gram) * z).sum(-1)
        return squared.clamp_min(0).sqrt()

    def edit(
        self, captured: torch.Tensor, layer: int, index: int, values: torch.Tensor | float, add: bool = False
    ) -> torch.Tensor:
        """The projection's input with head ``index``'s slice scaled so that its write norm becomes ``values``
        (or its norm plus ``values``): 0 ablates the head, twice its value doubles what it writes. Where the
        head writes nothing it stays at nothing (there is no direction to scale)."""
        old = self.transform(captured, layer)[..., index]
        heads = self._grams[layer].shape[0]
        v = values.to(old) if isinstance(values, torch.Tensor) else torch.full_like(old, float(values))
        new = (old + v if add else v).clamp_min(0)
        scale = torch.where(old > 0, new / old.clamp_min(1e-30), torch.zeros_like(old))
        x = captured.clone().unflatten(-1, (heads, -1))
        x[..., index, :] = x[..., index, :] * scale.unsqueeze(-1).to(x.dtype)
        return x.flatten(-2)

    def looks(self, model: Any, tokens: np.ndarray, layers: Sequence[int]) -> dict[int, dict[str, np.ndarray]] | None:
        return head_looks(model, tokens, layers) if self.settings.looks else None


# ----------------------------------------------------------------------------------------------------------
# Where each head looks
# ----------------------------------------------------------------------------------------------------------

_RECORDING = "nbutils_looks"


class _Stop(Exception):
    pass


class _Recorder:
    """The attention function `head_looks` runs the model with: the architecture's own eager attention, and a
    copy of each wanted layer's weights and value vectors."""

    def __init__(self) -> None:
        self.layers: set[int] = set()
        self.last = -1
        self.seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any) -> Any:
        eager = sys.modules[type(module).__module__].eager_attention_forward
        out, weights = eager(module, query, key, value, attention_mask, **kwargs)
        layer = int(module.layer_idx)
        if layer in self.layers:
            self.seen[layer] = (weights.detach(), value.detach())
            if layer == self.last:
                raise _Stop
        return out, weights


_RECORDER = _Recorder()


def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    AttentionInterface.register(_RECORDING, _RECORDER)
    AttentionMaskInterface.register(_RECORDING, eager_mask)


@torch.inference_mode()
def head_looks(
    model: Any, tokens: np.ndarray, layers: Sequence[int], batch_size: int = 16
) -> dict[int, dict[str, np.ndarray]]:
    """For each excerpt (``tokens [n, T]``), layer, head and token: the position attended most (ties: the
    earliest), its weight, and the norm of what the head writes from there (`LOOKS`): ``{layer: {name:
    [n, heads, T]}}``. The model runs with its own eager attention, recorded (the module docstring)."""
    layers = check_layers(model, layers)
    _architecture(model)
    _register()
    heads, size = head_shape(model)
    w_out = {layer: head_out_weights(model, layer).float() for layer in layers}
    n, T = tokens.shape
    out = {
        layer: {name: np.zeros((n, heads, T), np.int32 if name == "source" else np.float32) for name in LOOKS}
        for layer in layers
    }
    before = model.config._attn_implementation
    device = next(model.parameters()).device
    _RECORDER.layers, _RECORDER.last = set(layers), max(layers)
    model.set_attn_implementation(_RECORDING)
    try:
        for start in range(0, n, batch_size):
            ids = torch.from_numpy(np.asarray(tokens[start : start + batch_size], dtype=np.int64)).to(device)
            _RECORDER.seen = {}
            try:
                model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
            for layer in layers:
                weights, value = _RECORDER.seen[layer]
                weights = weights.float()  # [b, heads, T, T]
                value = value.float()  # [b, kv heads, T, head_dim]
                value = value.repeat_interleave(heads // value.shape[1], dim=1)
                wo = w_out[layer].to(value.device)
                writes = torch.einsum("bhtd,hde->bhte", value, wo).norm(dim=-1)  # [b, heads, T]
                best, where = weights.max(dim=-1)  # earliest position among equal weights
                pair = best * writes.gather(-1, where)
                stop = start + len(ids)
                out[layer]["source"][start:stop] = where.cpu().numpy()
                out[layer]["source_weight"][start:stop] = best.cpu().numpy()
                out[layer]["source_write"][start:stop] = pair.cpu().numpy()
    finally:
        model.set_attn_implementation(before)
        _RECORDER.seen = {}
    return out
