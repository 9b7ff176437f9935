"""Prompts for the explainer and the simulator, written for this project.

Format facts follow Bills et al. (2023): an excerpt is shown as ``token<TAB>value`` lines between ``<start>``
and ``<end>``; values are the neuron's activation normalised per neuron to integers 0..10
(``floor(10 * max(x, 0) / max_activation)``); worked examples of other neurons come first; when under 20% of
the shown values are non-zero, the non-zero lines are repeated in a second list; and the explainer
completes "the main thing this neuron does is find ...". The worked examples below are invented for this
project. The simulator sees the explanation and the excerpt with every value written ``unknown``; its
probability of each label 0..10 at each value slot gives an expected value per token.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from nbutils.core.errors import UserError

MAX_LABEL = 10
LABELS = tuple(str(i) for i in range(MAX_LABEL + 1))
UNKNOWN = "unknown"
EXPLANATION_PREFIX = "the main thing this neuron does is find"
_ANY_PREFIX = re.compile(r"the main thing this [\w-]+ does is find")
"""`EXPLANATION_PREFIX` with any unit's noun (`explanation_prefix`), as replies repeat it."""


def explanation_prefix(noun: str = "neuron") -> str:
    """The sentence every explanation completes, naming the unit by its noun ("neuron", "feature")."""
    return EXPLANATION_PREFIX.replace("neuron", noun)


def speak_of(text: str, noun: str) -> str:
    """Instructions written about neurons, reworded for another kind of unit: every whole word "neuron",
    "Neuron", "neurons", "neuron's" names the unit by ``noun`` instead (SAE latents are "features")."""
    if noun == "neuron":
        return text
    return re.sub(r"\b([Nn])euron(s?)\b", lambda m: (noun.capitalize() if m[1] == "N" else noun) + m[2], text)


ZERO_FILTER_BELOW = 0.2


def normalise(activations: np.ndarray, max_activation: float) -> np.ndarray:
    """Integers 0..10: ``floor(10 * max(x, 0) / max_activation)``, clipped (all zero if the max is not positive).

    A NaN activation shows as 0 and an infinite one as 0 or 10 (a NaN cast to an integer would be a huge
    negative number in the prompt)."""
    a = np.nan_to_num(np.asarray(activations, dtype=np.float64), nan=0.0, posinf=np.inf, neginf=0.0)
    if not math.isfinite(max_activation) or max_activation <= 0:
        return np.zeros(a.shape, dtype=np.int64)
    return np.clip(np.floor(MAX_LABEL * np.maximum(a, 0.0) / max_activation), 0, MAX_LABEL).astype(np.int64)


@functools.lru_cache(maxsize=1 << 16)  # prompts show the same vocabulary tokens again and again
def show_token(token: str) -> str:
    """A token made safe for one ``token<TAB>value`` line: newlines and tabs become visible symbols."""
    return token.replace("\n", "\u21b5").replace("\t", "\u21e5").replace("\r", "")


def excerpt_block(tokens: Sequence[str], values: Sequence[object]) -> str:
    lines = "".join(f"{show_token(t)}\t{v}\n" for t, v in zip(tokens, values))
    return f"<start>\n{lines}<end>\n"


@dataclass(frozen=True)
class ShownExcerpt:
    """An excerpt as the explainer sees it: tokens and their 0..10 values."""

    tokens: tuple[str, ...]
    values: tuple[int, ...]


@dataclass(frozen=True)
class WorkedExample:
    """An invented neuron with a known explanation, shown before the real task."""

    explanation: str
    excerpts: tuple[ShownExcerpt, ...]


def _ex(pairs: str) -> ShownExcerpt:
    toks, vals = [], []
    for item in pairs.split("|"):
        tok, _, val = item.rpartition("=")
        toks.append(tok)
        vals.append(int(val))
    return ShownExcerpt(tuple(toks), tuple(vals))


WORKED_EXAMPLES: tuple[WorkedExample, ...] = (
    WorkedExample(
        "names of months, most of all when a date follows",
        (
            _ex("The=0| meeting=0| moved=0| to=0| March=9| 14=2|,=0| after=0| the=0| storm=0|.=0"),
            _ex("Rent=0| is=0| due=0| on=0| the=0| first=1| of=0| every=0| month=3|:=0| June=8|,=0| July=10|.=0"),
            _ex("She=0| marched=1| into=0| the=0| office=0| and=0| may=0| stay=0| late=0|.=0"),
        ),
    ),
    WorkedExample(
        "closing brackets and parentheses, more strongly when deeply nested",
        (
            _ex("print=0|(=0|len=0|(=0|items=0|)=6|)=9| #=0| count=0"),
            _ex("The=0| results=0| (=0|see=0| Table=0| 2=0|)=7| were=0| clear=0|.=0"),
            _ex("x=0| ==0| [=0|a=0|,=0| [=0|b=0|]=8|]=10|;=0"),
        ),
    ),
    WorkedExample(
        "words about water, such as rivers, rain and the sea",
        (
            _ex("The=0| river=8| flooded=5| after=0| days=0| of=0| heavy=0| rain=9|.=0"),
            _ex("We=0| sailed=6| across=0| the=0| calm=1| sea=10| at=0| dawn=0|.=0"),
            _ex("Her=0| budget=0| spreadsheet=0| was=0| finally=0| done=0|.=0"),
        ),
    ),
)

EXPLAIN_SYSTEM = (
    "You are studying single neurons inside a language model. For each neuron you are shown short pieces of "
    "text, one token per line, each followed by a tab and the neuron's activation on that token, scaled from "
    "0 (silent) to 10 (its strongest response). Work out what the neuron responds to and answer with one "
    f'short phrase that completes the sentence "{EXPLANATION_PREFIX} ...". Name the tokens or contexts it '
    "fires on; be specific and brief."
)


def zero_filtered_block(excerpts: Sequence[ShownExcerpt]) -> str | None:
    """The non-zero lines again, when under 20% of all shown values are non-zero (else None)."""
    values = [v for e in excerpts for v in e.values]
    nonzero = [(t, v) for e in excerpts for t, v in zip(e.tokens, e.values) if v > 0]
    if not values or not nonzero or len(nonzero) / len(values) >= ZERO_FILTER_BELOW:
        return None
    return "The same activations, listing only the non-zero ones:\n" + excerpt_block(*zip(*nonzero))


def strongest_tokens(excerpts: Sequence[ShownExcerpt], n: int = 3) -> str:
    """The ``n`` distinct tokens with the highest shown values (first seen first among equals), quoted:
    ``"March", "July", "June"``."""
    best: dict[str, int] = {}
    for e in excerpts:
        for tok, value in zip(e.tokens, e.values):
            if value <= 0:
                continue
            shown = show_token(tok).strip() or show_token(tok)
            if value > best.get(shown, 0):
                best[shown] = value
    ranked = sorted(best, key=lambda t: -best[t])[:n]
    return ", ".join(json.dumps(t, ensure_ascii=False) for t in ranked)


WRITES_SHOWN = 8
"""Tokens listed on each side of what a neuron writes, in the output-aware explainer's prompt."""

EXPLAIN_OUTPUTS_NOTE = (
    " The real neuron also lists the tokens its activation makes more likely and less likely as the next "
    "token; a neuron may be best described by what it predicts, so use them where the activations leave "
    "it unclear."
)


EXPLAIN_RULE_NOTE = (
    " The real neuron also comes with a rule that an automatic search found by running the model on shortened "
    "excerpts: the tokens and contexts it fires on, with the values it predicts. The rule is often right about "
    "which tokens and less often about why; check it against the activations, and describe in plain words what "
    "the neuron responds to."
)


EXPLAIN_PAIRS_NOTE = (
    " The real neuron also lists, for its strongest tokens, the earlier token it attends to most "
    "(token <- source). Say where it looks (for example the previous token, the first token, an "
    "earlier copy of the current token or the token after one) as well as what it responds to."
)

PAIRS_SHOWN = 12
"""(token <- source) pairs listed for an attention head."""


def pairs_text(pairs: Sequence[tuple[str, str, int]]) -> str:
    """The lines of a head's prompt that list where it looks: ``"token" <- "source" (value)``, strongest first."""
    shown = [
        f"{json.dumps(show_token(t), ensure_ascii=False)} <- {json.dumps(show_token(s), ensure_ascii=False)} ({v})"
        for t, s, v in pairs[:PAIRS_SHOWN]
    ]
    return "Where it looks (token <- the token it attends to most):\n" + "\n".join(shown) + "\n"


def writes_text(writes: tuple[Sequence[str], Sequence[str]]) -> str:
    """The lines of an output-aware prompt that list what a neuron writes: (raised tokens, lowered tokens)."""
    raised, lowered = (
        ", ".join(json.dumps(show_token(t), ensure_ascii=False) for t in side[:WRITES_SHOWN]) for side in writes
    )
    return f"Makes more likely as the next token: {raised}\nMakes less likely: {lowered}\n"


def _neuron_text(
    name: str, excerpts: Sequence[ShownExcerpt], writes: tuple[Sequence[str], Sequence[str]] | None = None,
    noun: str = "neuron", rule: str | None = None, pairs: Sequence[tuple[str, str, int]] | None = None,
) -> str:  # fmt: skip
    text = f"{noun.capitalize()} {name}\nActivations:\n" + "".join(excerpt_block(e.tokens, e.values) for e in excerpts)
    repeat = zero_filtered_block(excerpts)
    strongest = strongest_tokens(excerpts)
    listed = f"Strongest tokens: {strongest}\n" if strongest else ""
    outputs = writes_text(writes) if writes else ""
    found = f"Rule found by the search: {rule}\n" if rule else ""
    looks = pairs_text(pairs) if pairs else ""
    return text + (repeat or "") + listed + looks + outputs + found + f'\nComplete: "{explanation_prefix(noun)} ..."'


def explanation_messages(
    excerpts: Sequence[ShownExcerpt], examples: Sequence[WorkedExample] = WORKED_EXAMPLES,
    writes: tuple[Sequence[str], Sequence[str]] | None = None, noun: str = "neuron", rule: str | None = None,
    pairs: Sequence[tuple[str, str, int]] | None = None,
) -> list[dict[str, str]]:  # fmt: skip
    """Chat messages asking for an explanation; the reply should continue `explanation_prefix` (``noun``
    names the unit throughout: "feature" for SAE latents, see `speak_of`).

    Each neuron's message ends with its strongest tokens, and each worked answer starts by quoting its
    neuron's strongest tokens before the description ('... find "March", "July", "June": names of months,
    ...'). Without this, the embedded 135M explainer began all ten main-job explanations with the first
    worked example's "names of months"; with it, none (README, "Explanations that copy the prompt").
    ``writes`` (the output-aware explainer): the tokens the neuron raises and lowers as the next token, listed
    after its activations (`writes_text`). ``rule`` (``explain_with_rules``): the rule the rules explainer
    found, listed last (`EXPLAIN_RULE_NOTE`). ``pairs`` (attention heads): where the head looks from its
    strongest tokens (`pairs_text`, `EXPLAIN_PAIRS_NOTE`)."""
    notes = (EXPLAIN_OUTPUTS_NOTE if writes else "") + (EXPLAIN_RULE_NOTE if rule else "")
    notes += EXPLAIN_PAIRS_NOTE if pairs else ""
    system = speak_of(EXPLAIN_SYSTEM + notes, noun)
    messages = [{"role": "system", "content": system}]
    for i, ex in enumerate(examples):
        messages.append({"role": "user", "content": _neuron_text(chr(ord("A") + i), ex.excerpts, noun=noun)})
        answer = f"{explanation_prefix(noun)} {strongest_tokens(ex.excerpts)}: {ex.explanation}."
        messages.append({"role": "assistant", "content": answer})
    messages.append({"role": "user", "content": _neuron_text("X", excerpts, writes, noun, rule, pairs)})
    return messages


_ABBREVIATIONS = {"e.g", "i.e", "etc", "vs", "cf", "mr", "mrs", "ms", "dr", "st", "no", "fig", "approx", "incl"}
_ABBREVIATIONS |= {
    m.lower() for m in "Jan Feb Mar Apr Jun Jul Aug Sep Sept Oct Nov Dec Mon Tue Wed Thu Fri Sat Sun".split()
}


def _is_abbreviation(word: str) -> bool:
    """A word that ends with a full stop without ending a sentence: "U.S", "e.g", "etc", "Jan", "A"."""
    word = word.lower().strip("(\"'")
    return word in _ABBREVIATIONS or "." in word or (len(word) == 1 and word.isalpha())


def _first_sentence_end(text: str) -> int:
    """Where the first sentence of ``text`` ends: a full stop followed by a space and more text, or by a
    closing quote, unless the word before it is an abbreviation ("U.S.", "e.g.", "etc.") or the stop sits
    between numbers ("3. 5"); the whole text if there is none."""
    for i, ch in enumerate(text):
        after = text[i + 1 :]
        if ch != "." or not after.strip():
            continue
        if after.startswith('"'):
            return i
        if not after.startswith(" "):
            continue
        before = text[:i].split()[-1] if text[:i].split() else ""
        if _is_abbreviation(before) or (before[-1:].isdigit() and after.strip()[:1].isdigit()):
            continue
        return i
    return len(text)


def _unquoted(text: str) -> str:
    """The text without quotes around the whole of it, when it is a phrase (a quoted single token, '"+"',
    and quotes around a token inside stay)."""
    t = text.strip()
    if len(t) >= 2 and t[0] == t[-1] == '"' and t.count('"') == 2 and " " in t.strip('"').strip():
        return t[1:-1].strip()
    return t


def parse_explanation(text: str) -> str:
    """The explanation phrase from a model reply: repeated prefix removed, first line and sentence only.

    Returns "" when nothing usable is left (the caller records that as a failed explanation).
    """
    t = _unquoted(text)
    first = _ANY_PREFIX.search(t.lower())
    if first:
        t = t[first.end() :]
    again = _ANY_PREFIX.search(t.lower())  # a model that starts over has finished its first answer
    t = (t[: again.start()] if again else t).strip().split("\n")[0]
    t = _unquoted(t[: _first_sentence_end(t)])
    last = t[:-1].split()[-1].lower() if t[:-1].split() else ""
    if t.endswith(".") and not ("." in last or last in _ABBREVIATIONS):  # keep the stop of "i.e." or "etc."
        t = t[:-1].strip()
    t = t.rstrip(" ,;:")
    for quote in ("'", '"'):  # a quote left open where the reply was cut
        if t.endswith(quote) and t.count(quote) % 2:
            t = t[:-1].rstrip(" ,;:")
    quoted_token = re.search(r'"[^"\s][^"]*"', t)  # '"+"' names a token, letters or not
    if not (any(c.isalpha() for c in t) or quoted_token) or len(t) > 400:
        return ""
    return t


# ----------------------------------------------------------------------------------------------------------
# Simulation prompt: built from pieces so every value slot's position is known exactly
# ----------------------------------------------------------------------------------------------------------

SIMULATE_HEADER = (
    "Each neuron below responds to some tokens in text; its explanation says which. After the explanation, "
    "the text follows one token per line with the neuron's activation, from 0 (silent) to 10 (strongest). "
    f"Where an activation has not been measured yet it reads {UNKNOWN}.\n\n"
)


def _example_values(values: Sequence[int], hidden_until: int) -> list[str]:
    return [UNKNOWN if i < hidden_until else str(v) for i, v in enumerate(values)]


def simulation_body(explanation: str, examples: Sequence[WorkedExample] = WORKED_EXAMPLES, noun: str = "neuron") -> str:
    """The worked examples and the unit's explanation, up to its excerpt's ``<start>`` line (the simulation
    prompt after `SIMULATE_HEADER`).

    In each worked example the first third of the values read ``unknown`` and the rest are numbers, so the
    model has seen ``unknown`` slots filled in.
    """
    parts = []
    for i, ex in enumerate(examples):
        parts.append(_explained(chr(ord("A") + i), ex.explanation, noun))
        for e in ex.excerpts:
            parts.append(excerpt_block(e.tokens, _example_values(e.values, len(e.values) // 3)))
        parts.append("\n")
    parts.append(_explained("X", explanation, noun) + "<start>\n")
    return "".join(parts)


def _explained(name: str, explanation: str, noun: str) -> str:
    return f"{noun.capitalize()} {name}\nExplanation: {explanation_prefix(noun)} {explanation}.\n"


def simulation_prefix(
    explanation: str, examples: Sequence[WorkedExample] = WORKED_EXAMPLES, noun: str = "neuron"
) -> str:
    """The whole simulation prompt before the excerpt's lines: instructions, worked examples, explanation."""
    return speak_of(SIMULATE_HEADER, noun) + simulation_body(explanation, examples, noun)


def simulation_lines(tokens: Sequence[str]) -> list[tuple[str, str]]:
    """Per token, the text before its value slot (``token<TAB>``) and after it (``unknown`` and newline)."""
    return [(f"{show_token(t)}\t", f"{UNKNOWN}\n") for t in tokens]


def fit_examples(
    build: Callable[[Sequence[WorkedExample]], int], limit: int, examples: Sequence[WorkedExample] = WORKED_EXAMPLES
) -> tuple[WorkedExample, ...]:
    """The worked examples that fit a token limit: whole excerpts, then whole examples, dropped from the end.

    ``build(examples)`` returns the prompt's token count with those examples. Raises when even no examples
    leave the prompt over the limit.
    """
    kept = [WorkedExample(e.explanation, tuple(e.excerpts)) for e in examples]
    while (over := build(kept) > limit) and kept:  # each candidate is measured once
        last = kept[-1]
        if len(last.excerpts) > 1:
            kept[-1] = WorkedExample(last.explanation, last.excerpts[:-1])
        else:
            kept.pop()
    if over:
        raise UserError(
            f"The prompt is longer than the model's context ({limit} tokens) even without worked examples.",
            "Use shorter excerpts (excerpt_len), fewer excerpts per prompt, or a model with a longer context.",
        )
    return tuple(kept)


# ----------------------------------------------------------------------------------------------------------
# Detection and fuzzing prompts: a yes/no judgement per excerpt, read as P("1") against P("0")
# ----------------------------------------------------------------------------------------------------------

TASKS = ("detection", "fuzzing", "intervention", "pairs")
ANSWER = "Match:\t"
"""The text just before the answer slot; the judge's next token is "1" (yes) or "0" (no)."""

JUDGE_HEADERS = {
    "detection": (
        "Each neuron below responds to some tokens in text; its explanation says which. After the explanation "
        "come pieces of text. For each piece, answer 1 if the neuron would respond somewhere in it, going by "
        "the explanation, or 0 if it would stay silent.\n\n"
    ),
    "fuzzing": (
        "Each neuron below responds to some tokens in text; its explanation says which. After the explanation "
        "come pieces of text in which some tokens are marked <<like this>>. For each piece, answer 1 if the "
        "marked tokens are the ones the explanation describes, or 0 if they are not.\n\n"
    ),
    "intervention": (
        "Each neuron below responds to some tokens in text; its explanation says which. After the explanation "
        "come pieces of text, each followed by two continuations written by the model, [A] and [B]: in one of "
        "them the neuron was turned up. For each piece, answer 1 if the neuron was turned up in [A], or 0 if "
        "in [B], going by the explanation.\n\n"
    ),
    "pairs": (
        "Each neuron below responds to some tokens in text; its explanation says which, and for an attention head "
        "also which earlier token it looks at from there. After the explanation come pieces of text in which a "
        "token and the earlier token it attends to most are marked <<like this>> (one mark where it attends to "
        "itself). For each piece, answer 1 if the marked pair is what the explanation describes, or 0 if it is "
        "not.\n\n"
    ),
}
"""The judge's instructions per task. ``pairs`` is the Transformer Debugger's attention-head scoring (a judge
asked whether each top and low (token, attended token) pair fits the explanation), in this judge's format."""


@dataclass(frozen=True)
class JudgeItem:
    """An excerpt to judge: its tokens and, for fuzzing, which tokens are marked."""

    tokens: tuple[str, ...]
    marked: tuple[bool, ...] | None = None


def marked_text(tokens: Sequence[str], marked: Sequence[bool] | None = None) -> str:
    """An excerpt as one line of text, runs of marked tokens wrapped in ``<<`` ``>>`` (leading spaces outside)."""
    out, open_run = [], False
    flags = list(marked) if marked is not None else [False] * len(tokens)
    for tok, mark in zip(tokens, flags):
        tok = show_token(tok)
        if mark and not open_run:
            lead = tok[: len(tok) - len(tok.lstrip())]
            out.append(lead + "<<" + tok[len(lead) :])
            open_run = True
            continue
        if not mark and open_run:
            out.append(">>")
            open_run = False
        out.append(tok)
    if open_run:
        out.append(">>")
    return "".join(out)


def judge_piece(item: JudgeItem) -> str:
    """The text of one item up to its answer slot."""
    return f"Text: {marked_text(item.tokens, item.marked)}\n{ANSWER}"


def steering_pair(prompt: str, first: str, second: str) -> JudgeItem:
    """An intervention item: a prompt and two continuations, shown as one line of text."""
    return JudgeItem((f"{prompt} [A]{first} [B]{second}",))


def _example_items(task: str, ex: WorkedExample) -> list[tuple[JudgeItem, int]]:
    """Worked items for one invented neuron: strong excerpts (value >= 5) are positives; for fuzzing, an
    excerpt's strong tokens are marked, and one negative marks the tokens just before them instead."""
    items = []
    for i, e in enumerate(ex.excerpts):
        strong = tuple(v >= 5 for v in e.values)
        if task == "detection":
            items.append((JudgeItem(e.tokens), int(any(strong))))  # pairs: worked items as fuzzing's (marks)
        elif any(strong) and i % 2 == 1:  # a wrong marking of a strong excerpt
            shifted = tuple(strong[j + 1] and not strong[j] for j in range(len(strong) - 1)) + (False,)
            items.append((JudgeItem(e.tokens, shifted), 0))
        elif any(strong):
            items.append((JudgeItem(e.tokens, strong), 1))
        else:
            items.append((JudgeItem(e.tokens, tuple(j in (1, 4) for j in range(len(e.tokens)))), 0))
    return items


def judge_body(
    task: str, explanation: str, examples: Sequence[WorkedExample] = WORKED_EXAMPLES, noun: str = "neuron"
) -> str:
    """Worked examples with answers and the unit's explanation (the judging prompt after its header)."""
    if task not in TASKS:
        raise UserError(f"Unknown judging task {task!r}.", f"Use one of: {', '.join(TASKS)}.")
    parts = []
    for i, ex in enumerate(examples):
        parts.append(_explained(chr(ord("A") + i), ex.explanation, noun))
        parts += [f"{judge_piece(item)}{answer}\n" for item, answer in _example_items(task, ex)]
        parts.append("\n")
    parts.append(_explained("X", explanation, noun))
    return "".join(parts)


def judge_prefix(
    task: str, explanation: str, examples: Sequence[WorkedExample] = WORKED_EXAMPLES, noun: str = "neuron"
) -> str:
    """Instructions, worked examples with answers, and the unit's explanation; items follow it."""
    body = judge_body(task, explanation, examples, noun)
    return speak_of(JUDGE_HEADERS[task], noun) + body


# Several items in one chat request (``judge_items_per_request`` > 1): fewer requests per unit against a
# hosted API, at the price of answers that may lean on the other items of the request. delphi shows several
# examples per prompt in the same way (its classifier scorers' batch size); here the default stays 1.

_BATCH_LINE = re.compile(r"^[ \t]*(?:Text[ \t]*)?(\d+)[ \t]*[:.)][ \t]*([01])", re.MULTILINE)


def judge_batch_message(body: str, items: Sequence[JudgeItem]) -> str:
    """A chat user message asking for one answer per numbered item, after the worked examples and explanation."""
    pieces = "".join(f"Text {i + 1}: {marked_text(it.tokens, it.marked)}\n" for i, it in enumerate(items))
    return (
        f"{body}{pieces}\nAnswer each of the {len(items)} texts above on its own line, written as the text's "
        f"number, a colon and the digit, and nothing else."
    )


def judge_batch_answers(reply: str, n: int) -> dict[int, int]:
    """Where each item's answer digit sits in a reply to `judge_batch_message`: {item index: character offset}.
    Items the reply skips, numbers out of range and repeated numbers (after the first) are left out."""
    found: dict[int, int] = {}
    for m in _BATCH_LINE.finditer(reply):
        k = int(m.group(1)) - 1
        if 0 <= k < n and k not in found:
            found[k] = m.start(2)
    return found
