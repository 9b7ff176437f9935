"""The ``nbutils`` command (also ``python -m nbutils``): run the stage chain, list parameters, export records."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from nbutils.core.errors import UserError


def _params(pairs: list[str]) -> dict[str, object]:
    from nbutils.run.pipeline import parse_value

    out: dict[str, object] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UserError(f"Parameter {pair!r} is not of the form name=value.", "Write e.g. -p n_excerpts=500.")
        out[name.strip()] = parse_value(value)
    return out


def _cmd_run(args: argparse.Namespace) -> int:
    from nbutils.core.budget import BUDGET_EXIT, BudgetReached
    from nbutils.core.config import SECTIONS, defaults, schema
    from nbutils.core.registry import GROUPS
    from nbutils.run.params import PRESETS
    from nbutils.run.pipeline import StageFailed, run_pipeline, where_to_look

    if args.list_params:
        main = defaults()
        for section, names in SECTIONS.items():
            print(f"{section}:")
            for name in names:
                stages = ", ".join(schema()[name].metadata["stages"])
                print(f"  {name} = {main[name]!r}   [{stages}] {schema()[name].metadata['help']}".rstrip())
        roles = ", ".join(GROUPS)
        print(f"extension settings: -p <role>.<name>.<setting>=value, role one of {roles} (docs/extensions.md)")
        for name, values in PRESETS.items():
            print(f"--preset {name}: " + ", ".join(f"{k}={v!r}" for k, v in values.items()))
        return 0
    params = _run_params(args)
    stages = args.stages.split(",") if args.stages else None
    nb_dir = Path(args.notebooks) if args.notebooks else None
    try:
        run_dir = run_pipeline(
            params, run_id=args.run_id, output_root=args.output_root, stages=stages, nb_dir=nb_dir, preset=args.preset
        )
    except StageFailed as e:
        if e.error == BudgetReached.__name__:  # not a failure: the run stopped where it was told to
            print(e.reason.removeprefix(e.error + ": "), file=sys.stderr)  # it says where it stopped and why
            print(f"executed notebook: {e.notebook}", file=sys.stderr)
            return BUDGET_EXIT
        print(f"error: stage {e.stage} failed: {e.reason}", file=sys.stderr)
        print(f"executed notebook with the error: {e.notebook}", file=sys.stderr)
        return 1
    print("\n".join(where_to_look(run_dir)))
    return 0


def _run_params(args: argparse.Namespace) -> dict[str, object]:
    """A run's parameters from ``--config``, ``-p`` and the executor options (``run`` and ``plan``)."""
    from nbutils.run.pipeline import load_config

    params = load_config(args.config) if args.config else {}
    params.update(_params(args.param))
    if args.executor:
        params["executor"] = args.executor
    if args.ray_address:
        params["ray_address"] = args.ray_address
    return params


def _cmd_plan(args: argparse.Namespace) -> int:
    from nbutils.core.budget import PLAN_FILE
    from nbutils.run.plan import plan_run, plan_table

    plan = plan_run(_run_params(args), args.run_id, args.output_root, args.preset, sample=args.sample)
    print(plan_table(plan))
    print(f"wrote {Path(plan['run']) / PLAN_FILE}")
    error = plan.get("error")
    if error is not None:
        print(f"error: {error.problem} Fix: {error.fix}", file=sys.stderr)
        return 2
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from nbutils.core.progress import progress_bar
    from nbutils.core.records import RecordStore
    from nbutils.interop.neuron_explainer import export_openai

    if args.neuron is not None and args.layer is None:
        raise UserError("--neuron was given without --layer.", "Name the layer too, e.g. --layer 15 --neuron 955.")
    store = RecordStore(args.collection)
    if args.layer is not None:
        neurons = [args.neuron] if args.neuron is not None else store.neurons(args.layer).tolist()
        ids = [store.unit(args.layer, int(n)) for n in neurons]
    else:
        ids = list(store.all_ids())
    count = export_openai(store, args.out, progress_bar(iterable=ids, desc="export", unit="neuron"))
    print(f"wrote {count} NeuronRecord files under {Path(args.out) / '<layer>' / '<neuron>.json'}")
    return 0


def _cmd_train_sae(args: argparse.Namespace) -> int:
    from nbutils.collect.sae_training import SAETraining, train_sae

    cfg = SAETraining(
        layer=args.layer, hook=args.hook, expansion=args.expansion, k=args.k, n_excerpts=args.n_excerpts,
        epochs=args.epochs, seed=args.seed, model=args.model, corpus=args.corpus,
    )  # fmt: skip
    report = train_sae(args.out, cfg)
    print(
        f"wrote a TopK SAE ({report['d_sae']} latents, k={cfg.k}) on {report['hook_name']} to {args.out} in "
        f"{report['seconds']:.0f} s: fraction of variance explained {report['fraction_variance_explained']:.3f} "
        f"on {report['held_out_tokens']} held-out tokens ({report['fraction_variance_explained_without_top_5_dims']:.3f} "
        f"without the 5 largest-variance dimensions; the largest holds "
        f"{report['largest_dimension_variance_share']:.0%} of the variance), {report['dead_fraction']:.1%} of "
        f"latents dead there.\n"
        f"Explain its features: nbutils run -p units={args.out}"
    )
    return 0


def _cmd_export_neuronpedia(args: argparse.Namespace) -> int:
    from nbutils.interop.neuronpedia import export_neuronpedia

    written = export_neuronpedia(args.run, args.out, model_name=args.model_id, set_name=args.source_set)
    print(f"wrote {len(written)} files under {args.out}: " + ", ".join(str(p) for p in written[:4]) + " ...")
    return 0


def _cmd_export_jsonl(args: argparse.Namespace) -> int:
    from nbutils.core.layout import RunLayout, find_run
    from nbutils.core.store import ResultStore

    run = RunLayout(find_run(args.run))
    out = Path(args.out) if args.out else run.exports
    wrote = []
    for stage in (run.explain, run.score):
        with ResultStore(stage.root) as store:
            if len(store):
                count = store.export_jsonl(out / stage.jsonl.name)
                wrote.append(f"{count} entries to {out / stage.jsonl.name}")
    if not wrote:
        raise UserError(
            f"{run.root} holds no stage-02 or stage-03 results to export.",
            "Name a run folder (outputs/<run_id>) whose stages 02-03 ran: python -m nbutils run.",
        )
    print("wrote " + "; ".join(wrote))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from nbutils.core.integrity import repair_fix
    from nbutils.run.repair import check_run, repair_run

    found = check_run(args.run)
    for check in found:
        print(check.line())
    if all(c.ok for c in found):
        unverified = [c.stage for c in found if not c.finished]
        print("every stage's files are as their stage wrote them" if not unverified else
              f"no damage found ({', '.join(unverified)}: no manifest to compare with, so SQLite's own check only)")  # fmt: skip
        return 0
    if not args.repair:
        print(f"to repair: {repair_fix(args.run)}")
        return 1
    for line in repair_run(args.run):
        print("repaired " + line)
    print("now rerun the same `nbutils run` command: it recomputes only what was removed")
    return 0


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments ``run`` and ``plan`` share: a run's parameters and where it goes."""
    parser.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE", help="a stage parameter")
    parser.add_argument("--config", help="YAML file of parameters (command-line -p values win)")
    parser.add_argument("--preset", help="a named set of parameters, e.g. quick (a first look in a few minutes)")
    parser.add_argument(
        "--run-id",
        help="run folder name (default: run-<hash of the parameters>, so rerunning a command resumes it)",
    )
    parser.add_argument("--output-root", default="outputs", help="where run folders go (default: outputs)")
    parser.add_argument("--executor", choices=("local", "ray"), help="where stages 01-03 run (same as -p executor=...)")
    parser.add_argument(
        "--ray-address", help="with --executor ray: the Ray cluster's address (default: start one here)"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nbutils", description="Explain and score language-model neurons.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute the stage notebooks in order into outputs/<run_id>/")
    plan = sub.add_parser("plan", help="measure a sample of a run's units and forecast its requests, tokens, cost, "
                          "wall time and disk (writes plan.json in the run folder; same parameters as run)")  # fmt: skip
    for parser in (run, plan):
        _run_arguments(parser)
    run.add_argument("--stages", help="comma-separated stage numbers or names, e.g. 01")
    run.add_argument("--notebooks", help="notebooks folder (default: the stage notebooks installed with nbutils)")
    run.add_argument("--list-params", action="store_true", help="print every stage's parameters and exit")
    run.set_defaults(func=_cmd_run)
    plan.add_argument("--sample", type=int, default=8, help="unit sides to measure (default 8; kept for the run "
                      "where its stage 01 has finished)")  # fmt: skip
    plan.set_defaults(func=_cmd_plan)
    exp = sub.add_parser("export-openai", help="write OpenAI neuron-explainer NeuronRecord JSON files")
    exp.add_argument("collection", help="a stage-01 output folder")
    exp.add_argument("out", help="folder for <layer>/<neuron>.json files")
    exp.add_argument("--layer", type=int, help="only this layer (default: every collected layer)")
    exp.add_argument("--neuron", type=int, help="only this neuron of --layer")
    exp.set_defaults(func=_cmd_export)
    sae = sub.add_parser("train-sae", help="train a small TopK SAE on one hook point and save it in SAELens format")
    sae.add_argument("out", help="folder to write the SAE to (then: nbutils run -p units=OUT)")
    sae.add_argument("--layer", type=int, default=15, help="block index (default 15)")
    sae.add_argument(
        "--hook", default="hook_resid_post", help="TransformerLens hook of the block (default hook_resid_post)"
    )
    sae.add_argument("--expansion", type=int, default=8, help="latents per model dimension (default 8)")
    sae.add_argument("--k", type=int, default=32, help="latents active per token (default 32)")
    sae.add_argument("--n-excerpts", type=int, default=3000, help="64-token excerpts to train on (default 3000)")
    sae.add_argument("--epochs", type=int, default=4, help="passes over them (default 4)")
    sae.add_argument("--seed", type=int, default=0)
    sae.add_argument("--model", default="embedded", help="subject model (default: the embedded one)")
    sae.add_argument("--corpus", default="embedded", help="corpus (default: the embedded one)")
    sae.set_defaults(func=_cmd_train_sae)
    npx = sub.add_parser("export-neuronpedia", help="write a run's features, activations, explanations and scores "
                         "in Neuronpedia's export format")  # fmt: skip
    npx.add_argument("run", help="a run folder (outputs/<run_id>), of neurons or of SAE latents")
    npx.add_argument("out", help="folder to write <model_id>/<source_id>/... under")
    npx.add_argument("--model-id", help="Neuronpedia model id (default: from the run's model)")
    npx.add_argument("--source-set", help="Neuronpedia source set name (default: from the unit type)")
    npx.set_defaults(func=_cmd_export_neuronpedia)
    chk = sub.add_parser("check", help="verify a run's files against their stages' manifests and SQLite's own check; "
                         "--repair keeps what is intact and leaves the rest to a rerun")  # fmt: skip
    chk.add_argument("run", help="a run folder (outputs/<run_id>, or outputs/latest)")
    chk.add_argument("--repair", action="store_true", help="rebuild damaged stores from their intact units, remove "
                     "altered files, so the same `nbutils run` recomputes only those")  # fmt: skip
    chk.set_defaults(func=_cmd_check)
    jl = sub.add_parser("export-jsonl", help="write a run's explanations and scores as JSON lines (one entry a line)")
    jl.add_argument("run", help="a run folder (outputs/<run_id>, or outputs/latest)")
    jl.add_argument("--out", help="folder for explanations.jsonl and scores.jsonl (default: <run>/exports)")
    jl.set_defaults(func=_cmd_export_jsonl)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except UserError as e:
        print(
            "error: "
            + textwrap.fill(f"{e.problem} Fix: {e.fix}", width=100, break_on_hyphens=False, break_long_words=False),
            file=sys.stderr,
        )  # a path stays whole
        return 2
    except KeyboardInterrupt:  # the run id is a hash of the parameters: the same command finds the same folder
        same = " (with the same --run-id)" if getattr(args, "run_id", None) else ""
        print(f"interrupted; rerun the same command{same} to continue", file=sys.stderr)
        return 130
