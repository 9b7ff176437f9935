"""Naming one unit (an MLP neuron today; a sparse-autoencoder latent or an attention head tomorrow).

A `UnitId` is a layer, an index within that layer's units, and the unit's *kind* (the name of its unit type,
see `nbutils.subject.units`). Results of stages 02 and 03 are keyed by `Key`, ``(layer, index, sign)``:
``sign`` is "positive", or "negative" for the negative side of a signed unit explained on its own. In JSON
the index is stored under ``"neuron"`` for every kind (the name format version 1 gave it), and a run's kind
is stated once, in its collection's ``collection.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

NEURON = "mlp_neuron"
"""The kind of the default unit type: the hidden unit of an MLP block."""
SIGNS = ("positive", "negative")

Key = tuple[int, int, str]
"""(layer, index, sign) of an explained unit side."""


@dataclass(frozen=True, order=True)
class UnitId:
    """A unit, addressed by layer and index within the layer, of a kind."""

    layer: int
    index: int
    kind: str = NEURON

    @property
    def neuron(self) -> int:
        """The index (the name results files use for it)."""
        return self.index

    def key(self, sign: str = "positive") -> Key:
        return (self.layer, self.index, sign)


def key_of(entry: Any) -> Key:
    """The key of a stage-02 or stage-03 entry (a typed result, or its JSON)."""
    if isinstance(entry, dict):
        return (int(entry["layer"]), int(entry["neuron"]), str(entry["sign"]))
    return (int(entry.layer), int(entry.neuron), str(entry.sign))


def unit_name(key: Key | UnitId) -> str:
    """Short text for a unit or unit side: ``L15 N955`` (``L15 N955 negative`` for a negative side)."""
    if isinstance(key, UnitId):
        return f"L{key.layer} N{key.index}"
    return f"L{key[0]} N{key[1]}" + (" negative" if key[2] == "negative" else "")
