"""nbutils: collect, explain, simulate and score the units (MLP neurons today) of language models.

Subpackages by role, bottom to top; a module imports only from its own subpackage and those below it
(tests/test_style.py checks the import graph):

    core       errors, units, records and their on-disk format, run-folder layout, the parameter schema, files
    subject    loading subject models, where units live (sites), unit types, planted neurons
    collect    corpus and excerpts, the streaming collector, stage 01
    llm        the backend contract and registry, prompts, local / OpenAI-compatible / oracle backends, cache
    score      the scorer contract and registry, metrics, baseline, simulation, detection and fuzzing, notes,
               stage 03
    explain    the explainer, stage 02
    interop    OpenAI neuron-explainer JSON
    view       read access to a run, tables, the neuron view, the widget and static page, the report
    run        parameter checks and presets, executors, manifests, the papermill chain, the command line
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nbutils.live.interactive import Run

__version__ = "0.1.0"


def open_run(run_dir: str | os.PathLike, **overrides: Any) -> Run:
    """Open a run folder (``outputs/<run_id>``, or ``outputs/latest``: the newest run): its units' records,
    explanations and scores, tables of them (``scores_frame()``, ``explanations_frame()``), and its units live
    (``unit(layer, index)`` with ``activations``, ``score``, ``compare``, ``explain``, ``steer``;
    ``top_units(text)``, ``search(text)``; `nbutils.live.interactive`). ``overrides``: parameters to use
    instead of the ones the run's stages ran with, e.g. ``simulator_backend="openai", simulator_base_url=...``."""
    from nbutils.core.layout import find_run
    from nbutils.live.interactive import Run

    return Run.open(find_run(run_dir)).configure(**overrides)
