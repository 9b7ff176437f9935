"""nbutils: collect, explain, simulate and score the MLP neurons of language models.

Modules, bottom to top (imports flow upward only):
    errors, records              data classes, on-disk format, OpenAI neuron-explainer JSON
    models, hooks, corpus        subject model loading, neuron sites, text and excerpts
    collect                      stage 01: the streaming activation collector
    summary                      tables and escaped HTML for notebook displays
    pipeline, cli                the papermill chain and the `nbutils` command
"""

__version__ = "0.1.0"
