"""nbutils: collect, explain, simulate and score the MLP neurons of language models.

Modules, bottom to top (imports flow upward only; README's Layout section has one line per module):
    errors, records, config      the exception users see, data classes and on-disk format, the parameter schema
    models, hooks, corpus        subject model loading, neuron sites, text and excerpts
    collect                      stage 01: the streaming activation collector
    prompts, backends, ...       stages 02-03: prompts, LLM backends, explainers, simulation, scores
    flags, summary, runview      notes on weak results, notebook displays, read access to a run
    render, viewer, plots        the neuron view, the widget and export, the report
    pipeline, cli                the papermill chain and the `nbutils` command
"""

__version__ = "0.1.0"
