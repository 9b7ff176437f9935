"""Refresh the recorded outputs of the notebooks' check cells (run after changing one or what it prints).

The notebooks in ``notebooks/`` are the source a researcher edits in JupyterLab and commits without outputs,
except the cells whose first line is ``# NBVAL_CHECK_OUTPUT``: nbval (``pytest --nbval-lax``) compares those
with what they print. This executes each notebook in order with its own parameters (as nbval does, in the
notebooks folder) and stores the outputs of those cells only; every other cell is left as it is, without
outputs.

    python tools/refresh_checks.py
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NB_DIR = Path(__file__).resolve().parent.parent / "notebooks"
CHECK = "# NBVAL_CHECK_OUTPUT"


def refresh(path: Path) -> None:
    nb = nbformat.read(path, 4)
    ran = nbformat.from_dict(nb)
    NotebookClient(ran, kernel_name="python3", resources={"metadata": {"path": str(NB_DIR)}}).execute()
    for cell, done in zip(nb.cells, ran.cells):
        if cell.cell_type != "code":
            continue
        checked = cell.source.startswith(CHECK)
        cell.outputs = done.outputs if checked else []
        cell.execution_count = done.execution_count if checked else None
    nbformat.write(nb, path)
    print("refreshed", path)


if __name__ == "__main__":
    for notebook in sorted(NB_DIR.glob("*.ipynb")):
        refresh(notebook)
