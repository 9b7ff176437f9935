"""Planted neurons whose rule depends on context, for the rules explainer's benchmark and tests.

    python bench/planted.py --planted planted:bench/planted_context.py --backend rules

The token-lookup baseline cannot describe any of them (the same token fires in one place and not another).
"""

from nbutils.subject.planted import BUILT_IN, PlantedNeuron, per_token


def _inside_quotes(tokens):
    """1 on every token after an odd number of double quotes in the excerpt."""
    open_, out = False, []
    for tok in tokens:
        out.append(float(open_))
        open_ ^= tok.count('"') % 2 == 1
    return out


def _repeated(tokens):
    """1 on a non-blank token seen earlier in the excerpt (case and spaces ignored)."""
    seen, out = set(), []
    for tok in tokens:
        word = tok.strip().lower()
        out.append(float(bool(word) and word in seen))
        seen.add(word)
    return out


PLANTED = [
    *[n for n in BUILT_IN if n.name in ("sentence start", "parentheses")],
    PlantedNeuron("quoted", "text inside double quotes", _inside_quotes),
    PlantedNeuron("repeat", "a word that already occurred earlier in the text", _repeated),
    PlantedNeuron(
        "after of", 'the word right after "of"', per_token(lambda t, i: i > 0 and t[i - 1].strip().lower() == "of")
    ),
    PlantedNeuron(
        "comma after number",
        "a comma that follows a number",
        per_token(lambda t, i: t[i].strip() == "," and i > 0 and any(c.isdigit() for c in t[i - 1])),
    ),
]
