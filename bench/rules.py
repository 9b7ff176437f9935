"""The rules explainer against the token-lookup baseline on real neurons of the embedded model.

    python bench/rules.py                       # 4 neurons from each of layers 0, 4, 9, 14; 400 excerpts

For each sampled neuron: its 20 top and 20 random excerpts over the embedded corpus, split as stage 02 and
stage 03 split them (train = top[0::4]; scored = top[2::4] + random[1::3]); the rule found on the train
excerpts (`nbutils.explain.rules.find_rule`, probing the model, generalised on the calibration excerpts
top[1::4] + random[0::3]) and the token lookup built from them, each scored by its top-and-random
correlation on the scored excerpts; forward passes and seconds per unit (its cost). Prints a Markdown table and writes
bench/results/rules.json. (The planted-neuron rows: `python bench/planted.py --backend rules`.)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    import torch

    from nbutils.collect.corpus import load_texts, make_excerpts
    from nbutils.core.records import Excerpt
    from nbutils.explain.rules import UnitProbe, find_rule
    from nbutils.score.baseline import token_lookup_simulate, token_table
    from nbutils.subject.loading import load_subject_model
    from nbutils.subject.sites import NeuronCapture
    from nbutils.subject.units import MLPNeurons

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[0, 4, 9, 14])
    p.add_argument("--per-layer", type=int, default=4)
    p.add_argument("--excerpts", type=int, default=400)
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args()

    subject = load_subject_model("embedded")
    model, tok = subject.model, subject.tokenizer
    units = MLPNeurons()
    site = units.site(model)
    ex = make_excerpts(tok, load_texts("embedded"), 64, args.excerpts, seed=0)
    texts = [[tok.decode([int(i)]) for i in row] for row in ex.tokens]
    values: dict[int, list[np.ndarray]] = {layer: [] for layer in args.layers}
    with NeuronCapture(model, site, args.layers) as capture:
        for start in range(0, len(ex.tokens), 50):
            out = capture.run(torch.tensor(ex.tokens[start : start + 50], dtype=torch.long))
            for layer in args.layers:
                values[layer].append(out[layer].float().numpy())
    rng = np.random.default_rng(0)
    rows = []
    for layer in args.layers:
        acts = np.concatenate(values[layer])
        for unit in rng.choice(acts.shape[2], args.per_layer, replace=False).tolist():
            a = acts[:, :, unit]
            top_rows = np.argsort(-a.max(1), kind="stable")[:20]
            random_rows = np.random.default_rng(unit).choice(len(texts), 20, replace=False)

            def excerpt(k: int, a: np.ndarray = a) -> Excerpt:
                return Excerpt(texts[k], a[k].astype(float), [int(i) for i in ex.tokens[k]])

            top, rand = [excerpt(k) for k in top_rows], [excerpt(k) for k in random_rows]
            train, scored = top[0::4], top[2::4] + rand[1::3]
            held_out = top[1::4] + rand[0::3]  # stage 02's calibration excerpts: what the rule is generalised on
            probe = UnitProbe(model, site, units, layer, unit, neutral_id=tok.eos_token_id)
            t0 = time.perf_counter()
            found = find_rule(train, probe, held_out=held_out)
            seconds = time.perf_counter() - t0
            actual = np.concatenate([e.activations for e in scored])
            rule = np.concatenate([found.rule.apply(e.tokens) for e in scored])
            lookup = np.concatenate(token_lookup_simulate(token_table(train), scored))

            def r(pred: np.ndarray, actual: np.ndarray = actual) -> float:
                return float(np.corrcoef(actual, pred)[0, 1]) if pred.std() > 0 else 0.0

            rows.append({"unit": f"L{layer} N{unit}", "rules r": r(rule), "token lookup r": r(lookup),
                         "forward passes": found.forward_passes, "sequences": found.sequences,
                         "seconds": seconds, "rule": found.rule.describe()})  # fmt: skip
    print("| unit | rules r | token lookup r | forward passes | sequences | seconds | rule |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        rule = json.dumps(row["rule"][:90])[1:-1].replace("|", "\\|")
        print(f"| {row['unit']} | {row['rules r']:.3f} | {row['token lookup r']:.3f} | {row['forward passes']} | "
              f"{row['sequences']} | {row['seconds']:.1f} | {rule} |")  # fmt: skip
    mean = {
        k: float(np.mean([row[k] for row in rows])) for k in ("rules r", "token lookup r", "forward passes", "seconds")
    }
    wins = sum(row["rules r"] > row["token lookup r"] for row in rows)
    print(
        f"\nmean: rules {mean['rules r']:.3f}, token lookup {mean['token lookup r']:.3f}; rules ahead on {wins} of "
        f"{len(rows)}; per unit {mean['forward passes']:.1f} forward passes, {mean['seconds']:.2f} s"
    )
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "rules.json").write_text(json.dumps({"rows": rows, "mean": mean, "wins": wins}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
