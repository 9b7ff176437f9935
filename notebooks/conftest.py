"""nbval runs the notebooks in this folder with their default parameters. The walkthrough of one unit
(00_explore_a_unit) reads the run that the stage notebooks 01-05 write with theirs, so it runs after them."""

from __future__ import annotations

from pathlib import Path


def pytest_collection_modifyitems(items: list) -> None:
    items.sort(key=lambda item: Path(str(item.fspath)).name.startswith("00_"))  # stable: the rest keep order
