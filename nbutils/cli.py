"""The ``nbutils`` command (also ``python -m nbutils``): run the stage chain, list parameters, export records."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from nbutils.errors import UserError


def _params(pairs: list[str]) -> dict[str, object]:
    from nbutils.pipeline import parse_value

    out: dict[str, object] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UserError(f"Parameter {pair!r} is not of the form name=value.", "Write e.g. -p n_excerpts=500.")
        out[name.strip()] = parse_value(value)
    return out


def _cmd_run(args: argparse.Namespace) -> int:
    from nbutils.pipeline import (
        MAIN_JOB,
        STAGES,
        StageFailed,
        declared_parameters,
        load_config,
        notebooks_dir,
        run_pipeline,
    )

    nb_dir = Path(args.notebooks) if args.notebooks else notebooks_dir()
    if args.list_params:
        for stage in STAGES:
            print(f"{stage.folder} ({stage.notebook}):")
            for name, info in declared_parameters(nb_dir / stage.notebook).items():
                default = MAIN_JOB.get(name, info["default"])
                print(f"  {name} = {default}   {info.get('help', '')}".rstrip())
        return 0
    params = load_config(args.config) if args.config else {}
    params.update(_params(args.param))
    stages = args.stages.split(",") if args.stages else None
    try:
        run_dir = run_pipeline(params, run_id=args.run_id, output_root=args.output_root, stages=stages, nb_dir=nb_dir)
    except StageFailed as e:
        print(f"error: stage {e.stage} failed: {e.reason}", file=sys.stderr)
        print(f"executed notebook with the error: {e.notebook}", file=sys.stderr)
        return 1
    print(f"run folder: {run_dir}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from nbutils.records import NeuronId, RecordStore, export_openai

    store = RecordStore(args.collection)
    ids = None
    if args.layer is not None:
        neurons = [args.neuron] if args.neuron is not None else store.neurons(args.layer).tolist()
        ids = [NeuronId(args.layer, int(n)) for n in neurons]
    count = export_openai(store, args.out, ids)
    print(f"wrote {count} NeuronRecord files under {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nbutils", description="Explain and score language-model neurons.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute the stage notebooks in order into outputs/<run_id>/")
    run.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE", help="a stage parameter")
    run.add_argument("--config", help="YAML file of parameters (command-line -p values win)")
    run.add_argument(
        "--run-id", help="run folder name (default: run-<hash of the parameters>, so rerunning a command resumes it)"
    )
    run.add_argument("--output-root", default="outputs", help="where run folders go (default: outputs)")
    run.add_argument("--stages", help="comma-separated stage numbers or names, e.g. 01")
    run.add_argument("--notebooks", help="notebooks folder (default: the repository's notebooks/)")
    run.add_argument("--list-params", action="store_true", help="print every stage's parameters and exit")
    run.set_defaults(func=_cmd_run)
    exp = sub.add_parser("export-openai", help="write OpenAI neuron-explainer NeuronRecord JSON files")
    exp.add_argument("collection", help="a stage-01 output folder")
    exp.add_argument("out", help="folder for <layer>/<neuron>.json files")
    exp.add_argument("--layer", type=int)
    exp.add_argument("--neuron", type=int)
    exp.set_defaults(func=_cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except UserError as e:
        print("error: " + textwrap.fill(f"{e.problem} Fix: {e.fix}", width=100), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command with the same --run-id to continue", file=sys.stderr)
        return 130
