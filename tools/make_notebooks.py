"""Write the stage notebooks from the cell sources below (run after editing; keeps notebooks output-free).

Cells whose first line is ``# NBVAL_CHECK_OUTPUT`` are compared by nbval (``pytest --nbval-lax``); their
outputs are filled by executing the notebook once with ``--execute-checks`` (after changing a check cell or
what it prints). Without that flag, check cells whose source is unchanged keep their recorded outputs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

NB_DIR = Path(__file__).resolve().parent.parent / "notebooks"

COLLECT = [
    (
        "markdown",
        """# 01 · Collect neuron activations

Runs the subject model over the corpus in fixed-length excerpts and keeps, for every MLP neuron of the chosen
layers, its top- and bottom-activating excerpts, a shared random sample, samples from quantile bands of its
activation distribution, and its activation statistics. The records land in `output_dir` (format: see
`nbutils.records`). Rerunning with the same parameters resumes an interrupted collection.""",
    ),
    (
        "parameters",
        """model = "embedded"  # "embedded", a Hugging Face id, a local model folder, or a .gguf file
corpus = "embedded"  # "embedded", a .txt/.jsonl file or folder, or a Hugging Face dataset name
corpus_text_field = "text"  # the field of .jsonl objects (or dataset rows) holding the text
layers = [0, 15, 29]  # layer indices, or None for every layer
neurons = None  # None for every neuron, an int for a seeded sample per layer, or a list of indices
site = None  # None: the architecture's built-in neuron site; else {"module": "...{layer}...", "side": "input"}
n_excerpts = 64  # how many excerpts to read (None for all)
excerpt_len = 64  # tokens per excerpt
top_k = 10  # top (and, for gated MLPs, bottom) excerpts kept per neuron
n_random = 10  # size of the random sample shared by all neurons
band_size = 3  # excerpts sampled per quantile band
batch_size = 16
seed = 0
output_dir = "../outputs/interactive/01_collect\"""",
    ),
    (
        "code",
        """from IPython.display import HTML, display

from nbutils.collect import CollectConfig, collect_activations
from nbutils.corpus import load_texts, make_excerpts
from nbutils.models import load_subject_model
from nbutils.summary import neuron_excerpts_html, strongest_neurons, table_html

subject = load_subject_model(model)
texts = load_texts(corpus, corpus_text_field)
excerpts = make_excerpts(subject.tokenizer, texts, excerpt_len, n_excerpts, seed, corpus=corpus)
print(f"{len(excerpts)} excerpts of {excerpt_len} tokens, from {excerpts.windows_available} available")""",
    ),
    (
        "code",
        """config = CollectConfig(
    layers=layers,
    neurons=neurons,
    top_k=top_k,
    n_random=n_random,
    band_size=band_size,
    batch_size=batch_size,
    seed=seed,
)
store = collect_activations(subject, excerpts, output_dir, config, site=site)""",
    ),
    (
        "code",
        """# NBVAL_CHECK_OUTPUT
meta = store.meta
print("layers:", meta.layers, "of", meta.n_model_layers)
print("neurons per layer:", meta.neurons_per_layer, "| signed:", meta.signed)
print("excerpts:", meta.n_excerpts, "| tokens read:", meta.tokens_seen)
print("kept per neuron: top", meta.top_k, "| bottom", meta.bottom_k, "| random", meta.n_random)""",
    ),
    ("markdown", "## Strongest neurons (largest max activation relative to standard deviation)"),
    (
        "code",
        """rows = strongest_neurons(store, n=10)
display(HTML(table_html(rows)))""",
    ),
    ("markdown", "## Top excerpts of the strongest neurons (hover a token for its activation)"),
    (
        "code",
        """for row in rows[:3]:
    display(HTML(neuron_excerpts_html(store, row["layer"], row["neuron"], n=3)))""",
    ),
]

EXPLAIN = [
    (
        "markdown",
        """# 02 · Explain neurons

For each chosen neuron, an explainer LLM reads the neuron's training excerpts (activations scaled to 0..10)
and completes "the main thing this neuron does is find ...". With `n_samples > 1` each candidate is
simulated on a calibration split and the best is kept. Every neuron also gets a token-lookup baseline
explanation that needs no LLM. Results: `output_dir/explanations.jsonl` (rerunning continues).""",
    ),
    (
        "parameters",
        """collection_dir = "../outputs/interactive/01_collect"  # stage 01 output
explain_neurons = 1  # neurons per layer (an int, seeded), "strongest:N" per layer, "all", or [[layer, neuron], ...]
explainer_backend = "local"  # "local" (transformers in the kernel) or "openai" (any compatible server)
explainer_model = "embedded"  # local: "embedded", a Hugging Face id, folder or .gguf; openai: the model name
base_url = None  # for "openai": e.g. "http://127.0.0.1:8080/v1"; None means the OpenAI API
api_key_env = "OPENAI_API_KEY"  # name of the environment variable holding the key (never the key itself)
n_samples = 1  # candidate explanations per neuron (best-of-n when > 1)
temperature = 1.0
explain_negative = False  # also explain the negative side of signed (gated) neurons
split = "nbutils"  # "nbutils" (every collected excerpt) or "paper" (neuron-explainer's exact 1:1 split)
prices = None  # e.g. {"prompt": 0.15, "completion": 0.6} per million tokens, for a cost estimate in usage.json
fail_on_errors = False  # True: neurons that failed (recorded with their reason) make the run's exit code non-zero
seed = 0
output_dir = "../outputs/interactive/02_explain\"""",
    ),
    (
        "code",
        """from IPython.display import HTML, display

from nbutils.explain import check_failures, run_explain_stage
from nbutils.summary import explanation_rows, table_html, usage_line

entries = run_explain_stage(
    collection_dir,
    output_dir,
    neurons=explain_neurons,
    model=explainer_model,
    backend=explainer_backend,
    base_url=base_url,
    api_key_env=api_key_env,
    n_samples=n_samples,
    temperature=temperature,
    explain_negative=explain_negative,
    seed=seed,
    prices=prices,
    split=split,
)""",
    ),
    (
        "code",
        """# NBVAL_CHECK_OUTPUT
print("entries:", len(entries), "| signs:", sorted({e["sign"] for e in entries}))
print("every entry has a baseline:", all(e["baseline"]["explanation"] for e in entries))""",
    ),
    (
        "code",
        """display(HTML(table_html(explanation_rows(entries))))  # notes mark copies of the prompt's examples, duplicates
print(usage_line(output_dir))
print(check_failures(output_dir, fail_on_errors))  # failed neurons are retried when the same run is rerun""",
    ),
]

SCORE = [
    (
        "markdown",
        """# 03 · Simulate and score

A simulator LLM predicts each neuron's activations from its explanation alone, on held-out excerpts, in one
forward pass per excerpt. Scores are pooled correlations on top-and-random, random-only, top-only and
stratified excerpts (the same number from each activation quantile band), with bootstrap 95% intervals.
Detection and fuzzing ask the same model yes/no questions instead: does this excerpt (detection), or do its
marked tokens (fuzzing), match the explanation? They report balanced accuracy, F1 and AUROC. Everything is
shown beside the token-lookup baseline. A score is *undefined*, with the reason, where it does not exist.
Results: `output_dir/scores.jsonl` and `output_dir/simulations/` (which also holds every judged item).""",
    ),
    (
        "parameters",
        """collection_dir = "../outputs/interactive/01_collect"  # stage 01 output
explanation_dir = "../outputs/interactive/02_explain"  # stage 02 output
simulator_backend = "local"  # "local" or "openai"
simulator_model = "embedded"
base_url = None  # for "openai"
api_key_env = "OPENAI_API_KEY"  # name of the environment variable holding the key
simulation_mode = "auto"  # for "openai": "echo" (prompt log-probabilities), "chat" (no log-probabilities), or "auto"
max_prompt_tokens = None  # cap on simulation prompt tokens (fewer worked examples, cheaper); None: the context
per_band = 2  # stratified score: excerpts from each quantile band (0 turns it off)
judges = ["detection", "fuzzing"]  # yes/no scorers run by the simulator model ([] for none)
judge_per_class = 5  # detection/fuzzing: at most this many positive and as many negative excerpts per neuron
split = "nbutils"  # must match stage 02: "nbutils" or "paper" (neuron-explainer's exact 1:1 split)
n_boot = 1000  # bootstrap resamples for the 95% intervals
prices = None  # e.g. {"prompt": 0.15, "completion": 0.6} per million tokens
fail_on_errors = False  # True: neurons that failed (recorded with their reason) make the run's exit code non-zero
seed = 0
output_dir = "../outputs/interactive/03_score\"""",
    ),
    (
        "code",
        """from IPython.display import HTML, display

from nbutils.explain import check_failures
from nbutils.simulate import run_score_stage
from nbutils.summary import score_rows, table_html, usage_line

results = run_score_stage(
    collection_dir,
    explanation_dir,
    output_dir,
    model=simulator_model,
    backend=simulator_backend,
    base_url=base_url,
    api_key_env=api_key_env,
    simulation=simulation_mode,
    max_prompt_tokens=max_prompt_tokens,
    per_band=per_band,
    judges=judges,
    judge_per_class=judge_per_class,
    n_boot=n_boot,
    seed=seed,
    prices=prices,
    split=split,
)""",
    ),
    (
        "code",
        """# NBVAL_CHECK_OUTPUT
print("scored:", len(results))
print("score sets:", sorted(k for k in results[0] if k.endswith(("_random", "_only", "stratified"))))
print("judges:", [t for t in ("detection", "fuzzing") if t in results[0]])
print("baseline scored:", all("top_and_random" in r["baseline"] for r in results))""",
    ),
    (
        "code",
        """display(HTML(table_html(score_rows(results))))
print(usage_line(output_dir))
print(check_failures(output_dir, fail_on_errors))  # failed neurons are retried when the same run is rerun""",
    ),
]

INSPECT = [
    (
        "markdown",
        """# 04 · Inspect neurons

The neuron viewer: pick a layer and neuron (or step with next/previous through the neurons ordered by score,
or filter by text in the explanations) to see the explanation candidates with their scores, the token-lookup
baseline, heatmaps of the top, most negative, quantile-band and random excerpts on one colour scale per neuron
(hover a token for its value), and true versus simulated activations on the scored excerpts. Neurons that are
not explained yet still show their excerpts. The cell below also writes a shareable, self-contained page of
the run's explained neurons to `output_dir/run.html`.""",
    ),
    (
        "parameters",
        """run_dir = "../outputs/interactive"  # a run folder (outputs/run-...): the one edit to open another run
collection_dir = None  # None: run_dir/01_collect; or a stage-01 folder elsewhere
explanation_dir = None  # None: run_dir/02_explain (may be missing)
score_dir = None  # None: run_dir/03_score (may be missing)
layer = None  # neuron to open first; None: the best-scored one
neuron = None
output_dir = None  # None: run_dir/04_inspect\"""",
    ),
    (
        "code",
        """from pathlib import Path

from nbutils.runview import RunView
from nbutils.viewer import NeuronViewer, export_html

view = RunView.open(run_dir, collection_dir, explanation_dir, score_dir)
viewer = NeuronViewer(view, layer, neuron)  # ordered by score when there are scores
page = export_html(view, Path(output_dir or Path(run_dir) / "04_inspect") / "run.html")
print("static page:", page.resolve())""",
    ),
    (
        "code",
        """# NBVAL_CHECK_OUTPUT
print("layers:", view.store.layers, "| explained:", len(view.explanations), "| scored:", len(view.scores))
print("viewer shows a neuron:", 'class="nbx-neuron"' in viewer.html.value)""",
    ),
    (
        "code",
        """viewer""",
    ),
]

REPORT = [
    (
        "markdown",
        """# 05 · Report

How well the run's explanations predict their neurons: correlation score distributions (top+random,
random-only, stratified over activation quantiles) beside the token-lookup baseline, scores by layer with 95%
intervals, detection and fuzzing scores, simulated against true activations for the best and worst neurons,
tokens and estimated cost per stage, a summary of the run, and the results that flag themselves as weak.
Figures are shown here and saved as PNG in `output_dir/figures/`.""",
    ),
    (
        "parameters",
        """run_dir = "../outputs/interactive"  # a run folder (outputs/run-...): the one edit to report on another run
collection_dir = None  # None: run_dir/01_collect; or a stage folder elsewhere (likewise the next two)
explanation_dir = None
score_dir = None
output_dir = None  # None: run_dir/05_report (figures go to its figures/ folder)\"""",
    ),
    (
        "code",
        """from pathlib import Path

from IPython.display import HTML, display

from nbutils import plots
from nbutils.runview import RunView
from nbutils.summary import table_html

view = RunView.open(run_dir, collection_dir, explanation_dir, score_dir)
figures = plots.write_report(view, output_dir or Path(run_dir) / "05_report")""",
    ),
    (
        "code",
        """# NBVAL_CHECK_OUTPUT
print("figures:", sorted(p.name for p in figures.values()))
print("scored neurons:", len(view.scores), "| layers with scores:", sorted({k[0] for k in view.scores}))""",
    ),
    ("markdown", "## Run summary"),
    ("code", """display(HTML(table_html(plots.run_summary(view))))"""),
    ("markdown", "## Weak results (each note also stands next to its number in the viewer and the static page)"),
    ("code", """display(HTML(table_html(plots.note_rows(view))))"""),
    ("markdown", "## Tokens and cost per stage"),
    ("code", """display(HTML(table_html(plots.usage_rows(view))))"""),
    ("markdown", "## Scores"),
    (
        "code",
        """display(plots.score_distributions(view))
display(plots.score_by_layer(view))
display(HTML(table_html(plots.layer_rows(view))))""",
    ),
    ("markdown", "## Detection and fuzzing (0.5 is chance for balanced accuracy and AUROC; F1 beside its always-yes level)"),
    (
        "code",
        """display(plots.classification_scores(view))
display(HTML(table_html(plots.classification_rows(view))))""",
    ),
    ("markdown", "## Simulated versus true activations: best and worst neurons"),
    ("code", """display(plots.simulated_vs_true(view))"""),
]

NOTEBOOKS = {
    "01_collect_activations.ipynb": COLLECT,
    "02_explain_neurons.ipynb": EXPLAIN,
    "03_simulate_and_score.ipynb": SCORE,
    "04_inspect_neurons.ipynb": INSPECT,
    "05_report.ipynb": REPORT,
}


def build(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, (kind, source) in enumerate(cells):
        if kind == "markdown":
            cell = nbformat.v4.new_markdown_cell(source)
        else:
            cell = nbformat.v4.new_code_cell(source)
            if kind == "parameters":
                cell.metadata["tags"] = ["parameters"]
        cell.id = f"cell-{i:02d}"  # stable ids keep diffs small
        nb.cells.append(cell)
    return nb


def main() -> None:
    execute = "--execute-checks" in sys.argv
    for name, cells in NOTEBOOKS.items():
        nb = build(cells)
        if not execute and (NB_DIR / name).is_file():  # keep the checked outputs of unchanged check cells
            old = {c.source: c for c in nbformat.read(NB_DIR / name, 4).cells if c.cell_type == "code"}
            for cell in nb.cells:
                kept = old.get(cell.source)
                if cell.cell_type == "code" and cell.source.startswith("# NBVAL_CHECK_OUTPUT") and kept:
                    cell.outputs, cell.execution_count = kept.outputs, kept.execution_count
        if execute:
            from nbclient import NotebookClient

            ran = nbformat.from_dict(nb)
            NotebookClient(ran, kernel_name="python3", resources={"metadata": {"path": str(NB_DIR)}}).execute()
            for cell, done in zip(nb.cells, ran.cells):
                if cell.cell_type == "code" and cell.source.startswith("# NBVAL_CHECK_OUTPUT"):
                    cell.outputs = done.outputs
                    cell.execution_count = done.execution_count
        nbformat.write(nb, NB_DIR / name)
        print("wrote", NB_DIR / name)


if __name__ == "__main__":
    main()
