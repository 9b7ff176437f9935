"""Prompt formatting: normalisation, token/value lines, the zero-filtered repeat, parsing, shortening."""

from __future__ import annotations

import numpy as np
import pytest

from nbutils.core.errors import UserError
from nbutils.llm.prompts import (
    EXPLANATION_PREFIX,
    UNKNOWN,
    WORKED_EXAMPLES,
    ShownExcerpt,
    explanation_messages,
    fit_examples,
    normalise,
    parse_explanation,
    show_token,
    simulation_lines,
    simulation_prefix,
)


def test_normalise_to_0_10():
    got = normalise(np.array([0.0, 0.5, 0.99, 1.0, -3.0, 2.5]), 1.0)
    assert got.tolist() == [0, 5, 9, 10, 0, 10]
    assert normalise(np.array([-1.0, -2.0]), -1.0).tolist() == [0, 0]
    assert normalise(np.array([np.nan, 0.5, np.inf, -np.inf]), 1.0).tolist() == [0, 5, 10, 0]  # never -2**63


def test_explanation_messages_layout_and_zero_filter():
    dense = ShownExcerpt(("a", " b", "\n"), (3, 0, 10))
    msgs = explanation_messages([dense])
    assert msgs[0]["role"] == "system" and [m["role"] for m in msgs[1:]] == ["user", "assistant"] * 3 + ["user"]
    assert msgs[2]["content"].startswith(EXPLANATION_PREFIX)
    last = msgs[-1]["content"]
    assert "<start>\na\t3\n b\t0\n\u21b5\t10\n<end>\n" in last and "only the non-zero" not in last
    sparse = ShownExcerpt(tuple(f"t{i}" for i in range(12)), (0,) * 11 + (7,))
    assert "only the non-zero ones:\n<start>\nt11\t7\n<end>" in explanation_messages([sparse])[-1]["content"]
    # each neuron's strongest tokens are listed, and worked answers start by quoting their own
    assert 'Strongest tokens: "\u21b5", "a"\n' in last
    first = WORKED_EXAMPLES[0]
    assert msgs[2]["content"] == f'{EXPLANATION_PREFIX} "July", "March", "June": {first.explanation}.'


@pytest.mark.parametrize(
    "reply, want",
    [
        ("the main thing this neuron does is find rivers and lakes. It also fires on rain.", "rivers and lakes"),
        (" words about money.\nSecond line", "words about money"),
        ('"the main thing this neuron does is find dates"', "dates"),
        ("", ""),
        ("... !!! 123", ""),
        ('the main thing this neuron does is find "+"', '"+"'),  # a quoted token is an explanation
        ("U.S. state names", "U.S. state names"),
        ("e.g. and i.e.", "e.g. and i.e."),
        ("version numbers like 3. 5", "version numbers like 3. 5"),
        ("abbreviations such as etc. and vs. in lists. Then more", "abbreviations such as etc. and vs. in lists"),
        ("dates like Jan. 5 and Feb. 3. Also years", "dates like Jan. 5 and Feb. 3"),
        ("rivers. it also fires on lakes", "rivers"),
        ('the main thing this neuron does is find "March", "July": months.', '"March", "July": months'),
        ('the main thing this neuron does is find the word "the".', 'the word "the"'),
        ("the main thing this neuron does is find 'a', 'b', 'The main thing this neuron does is find 'c", "'a', 'b'"),
    ],
)
def test_parse_explanation(reply, want):
    assert parse_explanation(reply) == want


def test_simulation_prompt_pieces():
    prefix = simulation_prefix("rivers")
    assert prefix.endswith(f"Explanation: {EXPLANATION_PREFIX} rivers.\n<start>\n")
    assert f" moved\t{UNKNOWN}\n" in prefix and " March\t9\n" in prefix  # first third hidden, the rest shown
    assert simulation_lines(["a", "\t"]) == [("a\t", f"{UNKNOWN}\n"), ("\u21e5\t", f"{UNKNOWN}\n")]
    assert show_token("x\ny") == "x\u21b5y"


def test_fit_examples_drops_whole_excerpts_then_examples():
    def size(examples):
        return sum(len(e.excerpts) for e in examples) * 100 + 50

    full = fit_examples(size, 10_000)
    assert full == WORKED_EXAMPLES
    cut = fit_examples(size, 50 + 100 * 7)
    assert [len(e.excerpts) for e in cut] == [3, 3, 1]
    assert fit_examples(size, 60) == ()
    with pytest.raises(UserError, match="even without worked examples"):
        fit_examples(size, 10)


def test_batched_judging_prompt_and_its_answer_lines():
    from nbutils.llm.prompts import JudgeItem, judge_batch_answers, judge_batch_message

    items = [JudgeItem(("The", " river")), JudgeItem(("Tax", " day"), (False, True))]
    msg = judge_batch_message("BODY\n", items)
    assert msg.startswith("BODY\nText 1: The river\nText 2: Tax <<day>>\n") and "each of the 2 texts" in msg
    reply = "Text 2: 1\n1. 0\n2: 0\n7: 1\nsomething else\n"
    # numbered as "Text k:", "k." or "k:"; a repeated number keeps its first answer; out of range is dropped
    places = judge_batch_answers(reply, 2)
    assert places == {1: reply.index("1\n"), 0: reply.index("0\n")}
    assert {k: reply[v] for k, v in places.items()} == {1: "1", 0: "0"}
    assert judge_batch_answers("1\n0\n", 2) == {}  # bare digits are not matched to items


def test_prompts_about_latents_say_feature_and_keep_the_explanation_as_written():
    """For SAE latents (noun "feature") no instruction or worked example says "neuron", the explanation is
    inserted unchanged even when it says "neuron", and replies starting with either prefix parse."""
    import re

    from nbutils.llm.prompts import JUDGE_HEADERS, judge_prefix, speak_of

    ex = [ShownExcerpt(("a", " b"), (0, 10))]
    messages = explanation_messages(ex, noun="feature")
    text = "".join(m["content"] for m in messages)
    assert not re.search(r"\b[Nn]eurons?\b", text) and "Feature X" in text
    assert "the main thing this feature does is find" in messages[0]["content"]
    assert explanation_messages(ex) == explanation_messages(ex, noun="neuron")  # neurons: unchanged prompts
    sim = simulation_prefix("words like neuron", noun="feature")
    assert sim.endswith("Explanation: the main thing this feature does is find words like neuron.\n<start>\n")
    assert not re.search(r"\b[Nn]eurons?\b", sim.replace("words like neuron", ""))
    for task in JUDGE_HEADERS:
        assert not re.search(r"\b[Nn]eurons?\b", judge_prefix(task, "x", noun="feature")), task
    assert speak_of("Each neuron's value; neurons. Neuron A", "feature") == "Each feature's value; features. Feature A"
    assert parse_explanation("the main thing this feature does is find dates.") == "dates"
    assert parse_explanation(f"{EXPLANATION_PREFIX} years") == "years"


def test_the_explainer_is_asked_about_a_feature_when_the_unit_is_a_latent():
    """explain_unit passes the record's noun to the backend, whose prompt then speaks of features."""
    from nbutils.core.records import Excerpt, UnitRecord
    from nbutils.core.units import UnitId
    from nbutils.explain.explainer import explain_unit
    from nbutils.llm.contract import Backend

    seen = []

    class Recording(Backend):  # the contract's own prompt building, a canned reply instead of a model
        context = 4096

        @classmethod
        def from_spec(cls, spec):
            return cls()

        def count_tokens(self, text):
            return len(text) // 4

        def explain(self, request):
            seen.append(self.explanation_messages(request))
            return ["the main thing this feature does is find the letter b"]

        def simulate(self, request):
            raise NotImplementedError

        def judge(self, request):
            raise NotImplementedError

    def excerpt(i):
        return Excerpt(["a", " b", " c"], np.array([0.0, float(i + 1), 0.0], dtype=np.float32), [1, 2, 3], i, 0, 0)

    rec = UnitRecord(
        id=UnitId(3, 7, "sae_latent"), top=[excerpt(i) for i in range(8)], random=[excerpt(i) for i in range(8, 12)],
        bands=[], band_quantiles=[], band_edges=[], mean=0.1, variance=0.2, skewness=0, kurtosis=0, max=8, min=0,
        noun="feature",
    )  # fmt: skip
    entry = explain_unit(rec, Recording())
    assert entry.explanation == "the letter b"
    text = "".join(m["content"] for m in seen[0])
    assert "Feature X" in text and "neuron" not in text.lower()
