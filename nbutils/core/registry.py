"""Registries of extension points (LLM backends, scorers, unit types): names mapped to classes.

An entry is a class, or ``"module:Class"`` imported the first time it is asked for, so a registry can list
the built-in implementations that live in higher-level modules without importing them.
"""

from __future__ import annotations

import importlib
from typing import Any

from nbutils.core.errors import UserError


class Registry(dict):
    """Names mapped to classes (or ``"module:Class"`` strings); `resolve` returns the class."""

    def __init__(self, what: str, entries: dict[str, Any]) -> None:
        super().__init__(entries)
        self.what = what
        """What the entries are, for error messages ("LLM backend", "scorer" ...)."""

    def resolve(self, name: str) -> Any:
        """The class registered under ``name`` (imported if needed); a clear error for an unknown name."""
        if name not in self:
            raise UserError(f"Unknown {self.what} {name!r}.", f"Use one of: {', '.join(self)}.")
        target = self[name]
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            target = self[name] = getattr(importlib.import_module(module), attr)
        return target
