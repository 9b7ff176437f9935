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

__version__ = "0.1.0"
