"""What a unit is: the contract of a unit type, the MLP neuron (the default), and the registry of types.

A unit type says where in the subject model a layer's units come from and how to turn what a forward hook
captures there into unit values:

- `UnitType.site`: the hook point (a module path with ``{layer}``, and which side of it to read);
- `UnitType.width`: how many units a layer has;
- `UnitType.transform`: captured ``[batch, tokens, d]`` -> unit values ``[batch, tokens, units]`` (the
  identity for MLP neurons; an SAE encoder for latents; a reshape for attention heads);
- `UnitType.signed`: whether negative values carry signal (bottom-k excerpts are then collected too);
- `UnitType.as_dict`: what ``collection.json`` records about it, so a collection names its units;
- `UnitType.output_directions`: what a unit adds to the residual stream, for what it writes
  (`nbutils.subject.outputs`; optional).

Adding a unit type is one module with a `UnitType` subclass and one line in `UNIT_TYPES` (or a call to
`register_unit_type`); collection, explanation, scoring and every view then work on it.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from nbutils.core.registry import Registry, settings_or_defaults
from nbutils.core.units import NEURON
from nbutils.subject.sites import NeuronSite, neurons_per_layer, resolve_site, site_module


class UnitType(ABC):
    """How one kind of unit is read off a model (see the module docstring)."""

    kind: ClassVar[str]
    noun: ClassVar[str] = "unit"
    """What one unit is called in prompts and views."""
    settings_type: ClassVar[type | None] = None
    """Its own settings: a dataclass whose every field has a default (``-p unit_type.<kind>.<setting>=...``),
    or None. The instance is ``self.settings``; ``collection.json`` records it (`as_dict`)."""

    def __init__(self, settings: Any = None) -> None:
        self.settings = settings_or_defaults(type(self), settings)

    @abstractmethod
    def site(self, model: Any) -> NeuronSite: ...

    @abstractmethod
    def width(self, model: Any) -> int: ...

    def signed(self, model: Any) -> bool:
        return self.site(model).signed

    def transform(self, captured: torch.Tensor, layer: int) -> torch.Tensor:
        """Unit values ``[batch, tokens, units]`` from what the site's hook captured."""
        return captured

    def as_dict(self) -> dict[str, Any]:
        settings = getattr(self, "settings", None)
        noun = {"noun": self.noun} if self.noun != "neuron" else {}  # what views call a unit (default "neuron")
        return {
            "kind": self.kind,
            **noun,
            **({"settings": dataclasses.asdict(settings)} if settings is not None else {}),
        }

    @classmethod
    def from_dict(cls, unit: dict[str, Any], site: dict[str, Any] | None = None) -> UnitType:
        """The unit type a collection recorded (`as_dict`, and the collection's site), made again."""
        given = unit.get("settings")
        return cls(cls.settings_type(**given) if cls.settings_type and given is not None else None)

    def edit(
        self, captured: torch.Tensor, layer: int, index: int, values: torch.Tensor | float, add: bool = False
    ) -> torch.Tensor:
        """What the site's hook should pass on so that unit ``index`` has ``values`` (``[batch, tokens]`` or one
        number; added to its value when ``add``) and nothing else changes: for units that are a coordinate of
        the captured activation (the default, MLP neurons), that coordinate."""
        x = captured.clone()
        v = values.to(x.dtype) if isinstance(values, torch.Tensor) else values
        x[..., index] = x[..., index] + v if add else v
        return x

    def own_layers(self, model: Any) -> list[int] | None:
        """The layers this unit type is defined at (an SAE's hook points), or None: the ``layers`` asked for."""
        return None

    def output_directions(self, model: Any, layer: int, indices: Sequence[int]) -> torch.Tensor | None:
        """What one unit of each unit's value adds to the residual stream, ``[units, d_model]``, read by
        `nbutils.subject.outputs`; None where the unit type has no single such direction."""
        return None

    def looks(self, model: Any, tokens: np.ndarray, layers: Sequence[int]) -> dict[int, dict[str, np.ndarray]] | None:
        """Where each unit looks on some excerpts (``tokens [n, T]``), computed after the bulk pass for the
        kept ones: ``{layer: {name: [n, units, T]}}`` with the names of `nbutils.core.records.Looks`; None for
        unit types that look nowhere (all but attention heads)."""
        return None


class MLPNeurons(UnitType):
    """The MLP's hidden units, read where they enter the output projection (`nbutils.subject.sites`)."""

    kind = NEURON
    noun = "neuron"

    def __init__(self, site: NeuronSite | dict[str, Any] | None = None) -> None:
        """``site``: the architecture's built-in site when None."""
        self.settings = None
        self._site = NeuronSite(**site) if isinstance(site, dict) else site

    @classmethod
    def from_dict(cls, unit: dict[str, Any], site: dict[str, Any] | None = None) -> MLPNeurons:
        return cls(site)

    def site(self, model: Any) -> NeuronSite:
        return resolve_site(model, self._site)

    def width(self, model: Any) -> int:
        return neurons_per_layer(model, self.site(model))

    def output_directions(self, model: Any, layer: int, indices: Sequence[int]) -> torch.Tensor | None:
        """The neurons' columns of the output projection (rows of GPT-2's transposed Conv1D weight)."""
        site = self.site(model)
        module = site_module(model, site, layer)
        weight = getattr(module, "weight", None)
        if site.side != "input" or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            return None
        idx = torch.as_tensor(list(indices), dtype=torch.long, device=weight.device)
        return weight.detach()[:, idx].T if isinstance(module, torch.nn.Linear) else weight.detach()[idx, :]


UNIT_TYPES = Registry(
    "unit type",
    {
        NEURON: MLPNeurons,
        "sae_latent": "nbutils.subject.latents:SAELatents",
        "attention_head": "nbutils.subject.heads:AttentionHeads",
    },
    "unit_type",
    "kind",
)
"""Unit types by kind: a class, or ``"module:Class"`` imported when first asked for."""

NEURON_UNITS = "mlp_neurons"
"""The ``units`` parameter's value for MLP neurons (the default)."""

PLURALS = {"attention_heads": "attention_head"}
"""``units`` values that name a built-in kind in the plural (``-p units=attention_heads``)."""


def kind_named(units: str) -> str:
    """The unit-type kind a ``units`` value names (itself, unless it is one of `PLURALS`)."""
    return PLURALS.get(units, units)


def unit_for(
    units: str, site: NeuronSite | dict[str, Any] | None = None, settings: dict[str, Any] | None = None
) -> UnitType:
    """The unit type the ``units`` parameter names: "mlp_neurons" (at ``site``), "attention_heads", another
    registered unit type
    (with its settings from ``settings``, the run's ``{kind: {setting: value}}``), or a folder holding an SAE or
    transcoder (SAELens or sparsify format, `nbutils.subject.latents`)."""
    if units == NEURON_UNITS:
        return MLPNeurons(site)
    if is_registered_kind(units):
        kind = kind_named(units)
        return unit_type_class(kind)(UNIT_TYPES.settings(kind, settings))
    return unit_type_class("sae_latent")(units)


def is_registered_kind(units: str) -> bool:
    """Whether the ``units`` parameter names a registered unit type made without a folder (not MLP neurons'
    own kind, nor SAE latents, which are named by their folder)."""
    kind = kind_named(units)
    return kind not in (NEURON, "sae_latent") and "/" not in kind and kind in UNIT_TYPES


def register_unit_type(kind: str, unit_type: str | type[UnitType]) -> None:
    """Make a unit type available by kind."""
    UNIT_TYPES[kind] = unit_type


def unit_type_class(kind: str) -> type[UnitType]:
    return UNIT_TYPES.resolve(kind)
