"""Planted neurons that fire on a class of tokens a reader names in two words, for the rules explainer's
benchmark (issue: rules that generalise; docs/rules-explainer.md):

    python bench/planted.py --planted planted:bench/planted_classes.py --backend rules

A list of the member tokens seen in the train excerpts describes each of them only in part; the class (as a
clause of the rule language) describes it whole. None of these rules was used to tune the rules explainer's
search: they were written before it was changed, from classes the issue names.
"""

from nbutils.subject.planted import PlantedNeuron, per_token


def _letters(token: str) -> str:
    return token.strip()


def _all_capitals(t, i):
    w = _letters(t[i])
    return len(w) >= 2 and w.isalpha() and w.isupper()


def _lower_case(t, i):
    w = _letters(t[i])
    return len(w) >= 2 and w.isalpha() and w.islower()


def _repeated(tokens):
    """1 on a token whose exact text occurred earlier in the excerpt (blank tokens never)."""
    seen, out = set(), []
    for tok in tokens:
        out.append(float(bool(tok.strip()) and tok in seen))
        seen.add(tok)
    return out


def _after_repeated(tokens):
    """1 on the token right after a token whose text occurred earlier (the next-token variant)."""
    rep = _repeated(tokens)
    return [0.0] + [float(rep[i - 1] > 0) for i in range(1, len(tokens))]


PLANTED = [
    PlantedNeuron("all capitals", "words in all capitals", per_token(_all_capitals)),
    PlantedNeuron("lower case", "lower-case words", per_token(_lower_case)),
    PlantedNeuron("digits", "tokens with digits", per_token(lambda t, i: any(c.isdigit() for c in t[i]))),
    PlantedNeuron("closing brackets", "closing brackets", per_token(lambda t, i: any(c in ")]}" for c in t[i]))),
    PlantedNeuron(
        "sentence ends", "sentence-ending punctuation", per_token(lambda t, i: t[i].strip() in {".", "!", "?"})
    ),
    PlantedNeuron(
        "line starts", "line-starting tokens", per_token(lambda t, i: i > 0 and "\n" in t[i - 1] and bool(t[i].strip()))
    ),
    PlantedNeuron("repeats", "repeated tokens", _repeated),
    PlantedNeuron("after repeats", "after repeated tokens", _after_repeated),
    PlantedNeuron(
        "after capitals", "after all-capitals words", per_token(lambda t, i: i > 0 and _all_capitals(t, i - 1))
    ),
    PlantedNeuron("early tokens", "the first tokens", per_token(lambda t, i: i < 4)),
]
