"""Where an MLP neuron lives in each architecture, and capturing its values in a forward pass.

The neuron is the MLP's hidden unit: the value that enters the MLP's output projection (Bills et al. 2023).
For GPT-2 that is the GELU output after ``c_fc``; for GPT-NeoX the GELU output after ``dense_h_to_4h``; for
gated MLPs (Llama, Mistral, Qwen2, SmolLM2, Gemma 1/2/3) it is ``act(gate(x)) * up(x)``. In every case it
is the first input of the output projection, so a `NeuronSite` names that module (with ``{layer}`` in its
path) and the side of it to read. Gated neurons are signed: their negative values are real signal.

Capturing stops the forward pass right after the last requested layer's neurons are read, so no compute is
spent on later layers or the LM head.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from nbutils.core.errors import UserError


@dataclass(frozen=True)
class NeuronSite:
    """A hook point: a module path with ``{layer}`` in it, and which side of the module holds the neurons."""

    module: str
    side: str = "input"
    """``"input"``: the module's first positional input; ``"output"``: its output."""
    signed: bool = False
    """Whether negative values carry signal (gated MLPs); enables bottom-k collection."""

    def __post_init__(self) -> None:
        if self.side not in ("input", "output"):
            raise UserError(f"Neuron site side {self.side!r} is not 'input' or 'output'.", "Use one of those two.")
        if "{layer}" not in self.module:
            raise UserError(
                f"Neuron site module {self.module!r} has no '{{layer}}' placeholder.",
                "Write the path with {layer} where the layer number goes, e.g. 'model.layers.{layer}.mlp.down_proj'.",
            )

    def as_dict(self) -> dict[str, Any]:
        return {"module": self.module, "side": self.side, "signed": self.signed}


_LLAMA_LIKE = NeuronSite("model.layers.{layer}.mlp.down_proj", "input", signed=True)

SITES: dict[str, NeuronSite] = {
    "gpt2": NeuronSite("transformer.h.{layer}.mlp.c_proj", "input"),
    "gpt_neox": NeuronSite("gpt_neox.layers.{layer}.mlp.dense_4h_to_h", "input"),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "planted": NeuronSite("layers.{layer}.neurons", "input"),  # nbutils.subject.planted's synthetic neurons
}
"""Automatically resolved sites by ``config.model_type``. SmolLM2 reports ``llama``."""


def resolve_site(model: Any, site: NeuronSite | dict[str, Any] | None = None) -> NeuronSite:
    """The neuron site for a model: the given one, or the built-in one for its architecture."""
    if isinstance(site, dict):
        site = NeuronSite(**site)
    if site is not None:
        return site
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if model_type not in SITES:
        mlp_like = [n for n, _ in model.named_modules() if n.endswith(("mlp", "mlp.down_proj", "mlp.c_proj"))][:4]
        raise UserError(
            f"No built-in MLP neuron site for architecture {model_type!r}; built in: {', '.join(sorted(SITES))}.",
            'Name the module and side yourself, e.g. -p \'site={module: "model.layers.{layer}.mlp.down_proj", '
            "side: input, signed: true}' (in Python: collect_activations(..., site={...})), the input of the "
            "MLP's output projection. "
            f"Some module names in this model: {mlp_like}.",
        )
    return SITES[model_type]


def num_layers(model: Any) -> int:
    return int(model.config.num_hidden_layers)


def site_module(model: Any, site: NeuronSite, layer: int) -> torch.nn.Module:
    """The site's module at ``layer``. A model without its LM head (``GPT2Model``, ``LlamaModel``: the base
    model that the built-in sites' paths start with, ``transformer.`` or ``model.``) is found without that
    prefix, so the rules explainer's probe and the capture run on it too."""
    name = site.module.format(layer=layer)
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    names = [name] + ([name[len(prefix) :]] if prefix != "." and name.startswith(prefix) else [])
    for candidate in names:
        try:
            return model.get_submodule(candidate)
        except AttributeError:
            continue
    raise UserError(
        f"Module {name!r} (neuron site {site.module!r}, layer {layer}) does not exist in this model.",
        "Check the site's module path against model.named_modules().",
    )


def neurons_per_layer(model: Any, site: NeuronSite) -> int:
    """Width of the site, read off the module's weight (Linear or GPT-2's transposed Conv1D)."""
    module = site_module(model, site, 0)
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != 2:
        raise UserError(
            f"Cannot tell the neuron count of {site.module!r}: the module has no 2-D weight.",
            "Point the site at a linear layer (the MLP's output projection) or its input/output.",
        )
    if isinstance(module, torch.nn.Linear):
        return int(module.in_features if site.side == "input" else module.out_features)
    # transformers' Conv1D stores weight as [in, out]
    return int(weight.shape[0] if site.side == "input" else weight.shape[1])


def check_layers(model: Any, layers: Iterable[int] | None) -> list[int]:
    """Validate requested layer indices (None = all) and return them sorted without repeats."""
    n = num_layers(model)
    if layers is None:
        return list(range(n))
    layers = sorted({int(x) for x in layers})
    bad = [x for x in layers if not 0 <= x < n]
    if bad or not layers:
        raise UserError(
            f"Layer indices {bad or '[]'} are out of range: this model has layers 0..{n - 1}.",
            f"Choose layers between 0 and {n - 1}, or None for all of them.",
        )
    return layers


class _StopForward(Exception):
    pass


class NeuronCapture:
    """Context manager that records a site's values for some layers on every forward pass.

    ``capture.run(input_ids)`` runs the model and returns ``{layer: tensor [batch, tokens, neurons]}``,
    stopping the forward pass after the last requested layer.
    """

    def __init__(
        self, model: Any, site: NeuronSite, layers: Iterable[int], stop_early: bool = True, stacked: bool = False
    ) -> None:
        """``stacked``: copy each layer's values into one reused [layers, batch, tokens, neurons] buffer, whose
        rows ``run`` returns (valid until the next ``run``): the model's own tensors are freed as it goes, and
        the collector reads every layer as one tensor (``buffer``, in the order of ``layers``)."""
        self.model = model
        self.site = site
        self.layers = sorted(layers)
        self.stop_early = stop_early
        self.stacked = stacked
        self.buffer: torch.Tensor | None = None
        self.values: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []

    def _hook(self, layer: int):  # noqa: ANN202
        last = layer == self.layers[-1]
        row = self.layers.index(layer)

        def keep(value: Any) -> None:
            if isinstance(value, tuple):
                value = value[0]
            if self.stacked:
                shape = (len(self.layers), *value.shape)
                if self.buffer is None or self.buffer.shape != shape or self.buffer.dtype != value.dtype:
                    self.buffer = torch.empty(shape, dtype=value.dtype, device=value.device)
                self.buffer[row].copy_(value)
                self.values[layer] = self.buffer[row]
            else:
                self.values[layer] = value.detach()
            if last and self.stop_early:
                raise _StopForward

        if self.site.side == "input":
            return lambda module, args: keep(args[0])
        return lambda module, args, output: keep(output)

    def __enter__(self) -> NeuronCapture:
        for layer in self.layers:
            module = site_module(self.model, self.site, layer)
            hook = self._hook(layer)
            if self.site.side == "input":
                self._handles.append(module.register_forward_pre_hook(hook))
            else:
                self._handles.append(module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
        self.values = {}
        try:
            self.model(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass
        missing = [x for x in self.layers if x not in self.values]
        if missing:
            raise RuntimeError(f"the forward pass never reached the neuron site of layers {missing}")
        out, self.values = self.values, {}
        return out


def capture_neurons(
    model: Any, input_ids: torch.Tensor, layers: Iterable[int], site: NeuronSite | None = None
) -> dict[int, torch.Tensor]:
    """One-shot helper: the neuron values of some layers for a batch of token ids."""
    site = resolve_site(model, site)
    with NeuronCapture(model, site, check_layers(model, layers)) as cap:
        return cap.run(input_ids)
