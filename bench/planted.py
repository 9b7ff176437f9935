"""Planted-neuron benchmark: score ground-truth, generated and baseline explanations of synthetic neurons.

    python bench/planted.py                                  # built-in rules, embedded model, 1000 excerpts
    python bench/planted.py --planted planted:my_rules.py    # your own rules (a file defining PLANTED)
    python bench/planted.py --backend openai --model gpt-4o-mini --base-url http://127.0.0.1:8000/v1
    python bench/planted.py --backend rules --planted planted:bench/planted_context.py   # no LLM
    python bench/planted.py --explain-with-rules --out outputs/planted-hint   # the rule listed in the LLM's prompt

Per planted neuron and on average: top+random correlation ("r") and detection / fuzzing balanced accuracy
of the ground-truth explanation ("truth": how good the simulator is), of the explainer's explanation
("generated": how good the explainer is), of the token-lookup baseline, and of the ground truth scored by
an oracle simulator that knows the rules ("oracle": must be 1.0). Prints Markdown tables and writes
bench/results/planted.json. The run folder (default outputs/planted-bench) resumes when rerun.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    from nbutils.core.errors import UserError
    from nbutils.run.planted_bench import explanations_table, markdown_table, run_planted_benchmark

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--planted", default="planted", help="'planted' (built-in rules) or 'planted:<file.py>'")
    p.add_argument("--excerpts", type=int, default=1000, help="excerpts of 64 tokens from the corpus")
    p.add_argument("--corpus", default="embedded")
    p.add_argument("--model", default="embedded", help="explainer and simulator model")
    p.add_argument("--backend", default="local", choices=["local", "openai", "rules"],
                   help="explainer (and simulator); rules: no LLM, its rules simulated exactly")  # fmt: skip
    p.add_argument("--base-url", default=None)
    p.add_argument("--judge-per-class", type=int, default=10, help="detection/fuzzing items per class")
    p.add_argument("--no-oracle", action="store_true", help="skip the oracle simulator")
    p.add_argument("--llm-when", default="always", help='"always" or "rule_below:X" (rules first; RunConfig.llm_when)')
    p.add_argument("--explain-with-rules", action="store_true", help="the LLM's prompt also lists the rule found")
    p.add_argument("--out", type=Path, default=Path("outputs/planted-bench"), help="run folder (resumable)")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder for planted.json")
    args = p.parse_args()
    try:
        result = run_planted_benchmark(
            args.out,
            spec=args.planted,
            corpus=args.corpus,
            n_excerpts=args.excerpts,
            model=args.model,
            backend=args.backend,
            base_url=args.base_url,
            oracle=not args.no_oracle,
            judge_per_class=args.judge_per_class,
            llm_when=args.llm_when,
            explain_with_rules=args.explain_with_rules,
        )
    except UserError as e:
        print(f"error: {e.problem} Fix: {e.fix}", file=sys.stderr)
        return 2
    print(f"planted neurons: {result['planted']} | {result['excerpts']} excerpts | {result['explainer_and_simulator']}")
    print(markdown_table(result))
    print()
    print(explanations_table(result))
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "planted.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
