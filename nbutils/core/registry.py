"""Registries of extension points (explainers, scorers, LLM backends, unit types): names mapped to classes,
the built-in ones and those other packages declare.

An entry is a class, or ``"module:Class"`` imported the first time it is asked for, so a registry can list
the built-in implementations that live in higher-level modules without importing them. Three sources fill
a registry, in this order (an earlier one keeps a name):

1. the built-ins, listed where the registry is made;
2. ``register_*`` calls in this process (a notebook trying an idea out);
3. **entry points** of installed packages, read the first time the registry is used, in every process that
   uses it (the command line, each stage's papermill kernel, Ray workers, ``nbutils.open_run``): a package
   declares, in its ``pyproject.toml``::

       [project.entry-points."nbutils.scorers"]
       keyword = "my_package.scoring:KeywordScorer"

   (groups: `GROUPS`). This is how pytest finds its plugins; see ``docs/extensions.md``.

An extension may declare its own settings: a dataclass as its ``settings_type`` (as SAELens pairs an SAE
class with its config class). A run gives them as ``-p <role>.<name>.<setting>=value`` (roles: `GROUPS`'s
keys) or a YAML section; `Registry.settings` checks them against the dataclass and makes the instance.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
import warnings
from collections.abc import Iterator, Mapping, MutableMapping
from importlib.metadata import entry_points
from typing import Any

from nbutils.core.checks import conforms, describe, did_you_mean, shown
from nbutils.core.errors import UserError

GROUPS = {
    "explainer": "nbutils.explainers",
    "scorer": "nbutils.scorers",
    "backend": "nbutils.backends",
    "unit_type": "nbutils.unit_types",
}
"""Each role's entry-point group: the role names settings on the command line (``-p scorer.keyword.x=1``)."""

BUILT_IN, IN_PROCESS = "built in", "registered in this process"


def settings_or_defaults(cls: type, settings: Any) -> Any:
    """What an extension's constructor keeps as ``self.settings``: the settings given, else its
    ``settings_type``'s defaults (None for an extension that declares no settings)."""
    tp = getattr(cls, "settings_type", None)
    return settings if settings is not None or tp is None else tp()


class Registry(MutableMapping):
    """Names mapped to classes (or ``"module:Class"`` strings) for one role; `resolve` returns the class."""

    def __init__(self, what: str, entries: dict[str, Any], role: str | None = None, name_attr: str = "name") -> None:
        self.what = what
        """What the entries are, for error messages ("LLM backend", "scorer" ...)."""
        self.role = role
        """The role's key in `GROUPS` (None: a registry no package extends)."""
        self.name_attr = name_attr
        """The class attribute that must equal an entry's name, where the class has it ("name", "kind")."""
        self._entries = dict(entries)
        self.origin = dict.fromkeys(entries, BUILT_IN)
        """Where each entry came from: built in, registered in this process, or ``package <distribution>``."""
        self._discovered = role is None

    # the mapping: every read first reads the installed packages' entry points
    def __getitem__(self, name: str) -> Any:
        self.discover()
        return self._entries[name]

    def __setitem__(self, name: str, target: Any) -> None:
        self._entries[name] = target
        self.origin[name] = IN_PROCESS

    def __delitem__(self, name: str) -> None:
        del self._entries[name]
        self.origin.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        self.discover()
        return iter(list(self._entries))

    def __len__(self) -> int:
        self.discover()
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        self.discover()
        return name in self._entries

    @property
    def group(self) -> str | None:
        """The entry-point group packages declare this role's extensions in."""
        return GROUPS.get(self.role or "")

    def discover(self, again: bool = False) -> None:
        """Read the entry points installed packages declare for this role (once; ``again``: read them again,
        after installing a package into a running kernel). A name already taken keeps its first owner."""
        if self._discovered and not again:
            return
        self._discovered = True
        for ep in entry_points(group=self.group):
            source = f"package {ep.dist.name if ep.dist else ep.value.partition(':')[0]}"
            if ep.name in self._entries and self.origin.get(ep.name) != source:
                if self.origin.get(ep.name) in (BUILT_IN, IN_PROCESS):
                    warnings.warn(
                        f"{source} declares a {self.what} named {ep.name!r}, which is {self.origin[ep.name]}; "
                        f"the {self.origin[ep.name]} one is kept. Rename the entry point in that package.",
                        stacklevel=2,
                    )
                continue
            self._entries[ep.name] = ep.value
            self.origin[ep.name] = source

    def sources(self) -> str:
        """Every name and where it came from, for messages: ``simulation (built in), keyword (package x)``."""
        return ", ".join(f"{n} ({self.origin.get(n, IN_PROCESS)})" for n in self)

    def where(self) -> str:
        """Where this role's extensions come from, for messages ("" for a registry no package extends)."""
        if not self.group:
            return ""
        return (
            f"Extensions come from built-ins, from packages declaring entry points in the group {self.group!r} "
            "(see docs/extensions.md; install the package into this environment), or from a register call in "
            "this process."
        )

    def unknown(self, name: str) -> UserError:
        """The error for a name no entry has: the closest name, every name with its source, and where
        extensions come from."""
        return UserError(
            f"Unknown {self.what} {name!r}.{did_you_mean(name, list(self))}",
            f"Use one of: {self.sources()}. {self.where()}".strip(),
        )

    def resolve(self, name: str) -> Any:
        """The class registered under ``name`` (imported if needed); a clear error for an unknown name, or for
        a package's entry that cannot be imported or names another class."""
        if name not in self:
            raise self.unknown(name)
        target = self._entries[name]
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            try:
                target = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as e:
                raise UserError(
                    f"The {self.what} {name!r} ({self.origin.get(name)}) points to {self._entries[name]!r}, which "
                    f"cannot be imported: {type(e).__name__}: {e}.",
                    "Reinstall that package into this environment (pip install -e <its folder>), or uninstall it.",
                ) from None
            self._entries[name] = target
        declared = getattr(target, self.name_attr, name)
        if str(self.origin.get(name)).startswith("package") and isinstance(declared, str) and declared != name:
            raise UserError(
                f"The {self.what} registered as {name!r} ({self.origin.get(name)}) calls itself {declared!r} "
                f"(its {self.name_attr} attribute).",
                f"Make the entry point's name and the class's {self.name_attr} the same.",
            )
        return target

    def settings_type(self, name: str) -> type | None:
        """The dataclass holding ``name``'s own settings (None where it declares none)."""
        return getattr(self.resolve(name), "settings_type", None)

    def settings(self, name: str, values: Mapping[str, Mapping[str, Any]] | None) -> Any:
        """``name``'s settings made from a run's extension settings (``{name: {setting: value}}`` for this
        role), every value checked against its declared type; None where ``name`` declares no settings."""
        given = dict((values or {}).get(name) or {})
        tp = self.settings_type(name)
        label = f"{self.role}.{name}"
        if tp is None:
            if given:
                raise UserError(
                    f"Settings {sorted(given)} were given for the {self.what} {name!r}, which declares none.",
                    f"Leave out -p {label}.<setting>=...; only extensions with a settings_type take settings.",
                )
            return None
        known = {f.name: f for f in dataclasses.fields(tp)}
        hints = typing.get_type_hints(tp)
        for key, value in given.items():
            if key not in known:
                raise UserError(
                    f"The {self.what} {name!r} has no setting {key!r}.{did_you_mean(key, list(known))}",
                    f"Its settings ({tp.__name__}): {', '.join(known) or 'none'}.",
                )
            if not conforms(value, hints[key]):
                raise UserError(
                    f"Setting {label}.{key}={value!r}: expected {describe(hints[key])}, got {shown(value)}.",
                    f"Give it as YAML, e.g. -p {label}.{key}=<{describe(hints[key])}>.",
                )
        try:
            return tp(**given)
        except (TypeError, ValueError) as e:  # a required setting left out, or the dataclass's own check
            raise UserError(
                f"The settings of the {self.what} {name!r} were refused: {e}.", f"Give them as -p {label}.<setting>=..."
            ) from None
