"""Stage folders written before the results store (`nbutils.core.store`): one JSON file per unit side, read
as they are; the store copies them in the first time a stage writes to the folder."""

from __future__ import annotations

import json
from typing import Any

from nbutils.core.layout import StoreLayout
from nbutils.core.units import Key


class LegacyFiles:
    """A stage folder written before the store: ``neurons/L{layer}_N{index}_{sign}.json`` per unit side and,
    for stage 03, ``simulations/`` files of the same names. Read only."""

    def __init__(self, layout: StoreLayout) -> None:
        self.layout = layout
        self._all: list[dict[str, Any]] | None = None

    def exists(self) -> bool:
        return self.layout.old_units.is_dir()

    def get(self, key: Key) -> dict[str, Any] | None:
        path = self.layout.old_unit(key)
        return json.loads(path.read_text()) if path.is_file() else None

    def details(self, key: Key) -> Any:
        path = self.layout.old_detail(key)
        return json.loads(path.read_text()) if path.is_file() else None

    def entries(self) -> list[dict[str, Any]]:
        if self._all is None:
            found = [json.loads(p.read_text()) for p in self.layout.old_units.glob("L*_N*_*.json")]
            self._all = sorted(found, key=lambda e: (e["layer"], e["neuron"], e["sign"] != "positive"))
        return self._all
