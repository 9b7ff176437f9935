"""Which units stage 02 explains: ``explain_neurons`` read against a collection ("all", a seeded sample per
layer, the strongest per layer, or a list), passing over dead and rare units."""

from __future__ import annotations

from typing import Any

import numpy as np

from nbutils.core.errors import UserError
from nbutils.core.records import RecordStore
from nbutils.core.units import UnitId
from nbutils.score.classification import has_silent_excerpts


def units_to_explain(
    store: RecordStore, spec: Any, seed: int = 0, skip: set[tuple[int, int]] | None = None
) -> list[UnitId]:
    """Which units to explain: "all"; an int (that many per collected layer, a seeded sample);
    "strongest:N" (per layer, the N with the largest max activation over standard deviation, the most
    selective ones, strongest first, passing over units active on every excerpt they kept: an always-on
    unit with a few spikes ranks high by that ratio, yet no explanation of it can be judged by detection or
    fuzzing, which need silent excerpts); or [[layer, index], ...]. ``skip``: (layer, index) of dead and rare
    units, which a sample or "strongest:N" passes over (a rare unit is often the "strongest"); "all" and a
    list still name them, and the stage lists them as skipped."""
    skip = skip or set()
    if spec == "all" or spec is None:
        return list(store.all_ids())
    if isinstance(spec, str) and spec.startswith("strongest:") and spec[len("strongest:") :].isdigit():
        n = int(spec[len("strongest:") :])
        ids = []
        for layer in store.layers:
            kept, always_on = [], []
            for x in store.strongest(layer, 10 * n + len(skip) + 16):  # a bounded look: records are read
                if len(kept) == n:
                    break
                if (layer, x) not in skip:
                    (kept if has_silent_excerpts(store.record(layer, x)) else always_on).append(x)
            kept += always_on[: n - len(kept)]  # only where too few others were found
            ids += [store.unit(layer, x) for x in kept]
        return ids
    if isinstance(spec, int):
        ids = []
        for layer in store.layers:
            neurons = store.neurons(layer)
            rng = np.random.default_rng([seed, layer])
            pick = set(rng.choice(len(neurons), min(spec, len(neurons)), replace=False).tolist())
            pick = {i for i in pick if (layer, int(neurons[i])) not in skip}
            # rare units drawn are replaced by a further draw from the rest (no rare unit: the same sample)
            rest = [i for i in range(len(neurons)) if i not in pick and (layer, int(neurons[i])) not in skip]
            more = min(spec - len(pick), len(rest))
            pick |= {rest[i] for i in rng.choice(len(rest), more, replace=False)} if more > 0 else set()
            ids += [store.unit(layer, int(neurons[i])) for i in sorted(pick)]
        return ids
    try:
        ids = [store.unit(int(layer), int(neuron)) for layer, neuron in spec]
    except (TypeError, ValueError):
        raise UserError(
            f"explain_neurons={spec!r} is not 'all', 'strongest:N', a number per layer, or a list of [layer, neuron] "
            "pairs.",
            "Write e.g. explain_neurons=4, explain_neurons=strongest:5 or explain_neurons=[[0, 12], [29, 700]].",
        ) from None
    for nid in ids:
        store.require(nid.layer, nid.index)
    return ids
