"""The local backend: exact label probabilities (two-token labels included), prefix reuse, the contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nbutils.llm.local import LocalBackend
from nbutils.llm.prompts import EXPLANATION_PREFIX, LABELS, ShownExcerpt, explanation_messages, simulation_prefix
from nbutils.score.simulation import expected_values

pytestmark = pytest.mark.slow  # every test reads the embedded model's own probabilities

EXCERPTS = [
    ["The", " river", " ran", " dry", " after", " months", " without", " rain", "."],
    ["Tax", " forms", " are", " due", " in", " April", "."],
    ["<script>", "alert", "(", "1", ")", "</script>"],
]


@pytest.fixture(scope="module")
def backend():
    return LocalBackend("embedded", batch_size=2)


def test_prefix_reuse_equals_plain_per_excerpt_forward(backend):
    prefix = simulation_prefix("words about water, such as rivers and rain")
    reused = backend.simulate_prompt(prefix, EXCERPTS, reuse_prefix=True)
    plain = backend.simulate_prompt(prefix, EXCERPTS, reuse_prefix=False)
    for a, b, tokens in zip(reused, plain, EXCERPTS):
        assert a.shape == (len(tokens), len(LABELS))
        np.testing.assert_allclose(a.sum(1), 1.0, atol=1e-5)
        np.testing.assert_allclose(a, b, atol=1e-4)
    ev = expected_values(reused)
    assert all(((0 <= e) & (e <= 10)).all() for e in ev)


def test_label_probabilities_match_an_independent_plain_computation(backend):
    """Rebuild one slot's 11 probabilities from two ordinary forward passes, without masks or caches."""
    assert backend.labels.branch_tokens == [backend.tokenizer("1", add_special_tokens=False)["input_ids"][0]]
    prefix = simulation_prefix("words about water")
    tokens = EXCERPTS[0]
    dist = backend.simulate_prompt(prefix, [tokens])[0]
    ids, slots = backend._excerpt_ids(tokens)
    context = list(backend._encode(prefix)) + ids[: slots[3]]  # everything before the 4th value slot
    one = backend.tokenizer("1", add_special_tokens=False)["input_ids"][0]
    zero = backend.tokenizer("0", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        p = torch.softmax(backend.model(torch.tensor([context])).logits[0, -1].double(), -1)
        p_after_one = torch.softmax(backend.model(torch.tensor([context + [one]])).logits[0, -1].double(), -1)
    first = [backend.tokenizer(label, add_special_tokens=False)["input_ids"][0] for label in LABELS]
    want = [float(p[f]) for f in first[:10]] + [float(p[one] * p_after_one[zero])]
    want[1] = float(p[one] * (1 - p_after_one[zero]))
    want = np.array(want) / np.sum(want)
    np.testing.assert_allclose(dist[3], want, atol=1e-4)


def test_chat_replies_continue_the_explanation_prefix(backend):
    before = backend.usage.completion_tokens
    msgs = explanation_messages([ShownExcerpt(("The", " river", " ran"), (0, 9, 1))])
    replies = backend.chat(msgs, n=2, temperature=0.8, max_tokens=16, seed=1)
    assert len(replies) == 2 and all(r.startswith(EXPLANATION_PREFIX) for r in replies)
    assert all("\n" not in r.strip() for r in replies)
    assert backend.usage.completion_tokens > before
    assert backend.chat(msgs, n=1, temperature=0.0, max_tokens=8) == backend.chat(
        msgs, n=1, temperature=0.0, max_tokens=8
    )


def test_judge_probability_matches_a_plain_forward_pass(backend):
    """P("1") against P("0") at the answer slot, recomputed from one ordinary forward pass per item."""
    from nbutils.llm.prompts import WORKED_EXAMPLES, JudgeItem, judge_piece, judge_prefix

    prefix = judge_prefix("fuzzing", "words about water", WORKED_EXAMPLES[:1])
    items = [JudgeItem(tuple(t), tuple(i % 2 == 1 for i in range(len(t)))) for t in EXCERPTS]
    items.append(JudgeItem(tuple(EXCERPTS[0])))
    got = backend.judge_prompt(prefix, items)
    plain = backend.judge_prompt(prefix, items, reuse_prefix=False)
    one = backend.tokenizer("1", add_special_tokens=False)["input_ids"][0]
    zero = backend.tokenizer("0", add_special_tokens=False)["input_ids"][0]
    for item, p, q in zip(items, got, plain):
        ids = list(backend._encode(prefix)) + list(backend._encode(judge_piece(item)))
        with torch.no_grad():
            logits = backend.model(torch.tensor([ids])).logits[0, -1].double()
        want = float(torch.softmax(logits[[one, zero]], -1)[0])
        assert p == pytest.approx(want, abs=1e-4) and q == pytest.approx(want, abs=1e-4)
    assert got.shape == (4,) and ((0 < got) & (got < 1)).all()


def test_the_contract_renders_its_own_prompts(backend):
    """Structured requests give what the prompt-level calls give on the prompts the backend renders."""
    from nbutils.llm.contract import ExplainRequest, JudgeRequest, SimulationRequest
    from nbutils.llm.prompts import JudgeItem, judge_prefix

    request = SimulationRequest("words about water", tuple(tuple(t) for t in EXCERPTS[:2]))
    prefix = simulation_prefix(request.explanation, backend.simulation_examples(request))
    for a, b in zip(backend.simulate(request), backend.simulate_prompt(prefix, EXCERPTS[:2])):
        np.testing.assert_array_equal(a, b)
    items = (JudgeItem(tuple(EXCERPTS[0])), JudgeItem(tuple(EXCERPTS[1]), (True,) + (False,) * 6))
    jrequest = JudgeRequest("fuzzing", "words about water", items)
    judged = backend.judge(jrequest)
    jprefix = judge_prefix("fuzzing", "words about water", backend.judge_examples(jrequest))
    assert judged.probabilities and judged.p_yes.shape == (2,)
    np.testing.assert_allclose(judged.p_yes, backend.judge_prompt(jprefix, items))
    short = SimulationRequest("water", (tuple(EXCERPTS[0]),), max_prompt_tokens=400)
    assert len(backend.simulation_examples(short)) < len(request.examples)  # a cap drops worked examples
    (reply,) = backend.explain(ExplainRequest((ShownExcerpt(("The", " river"), (0, 9)),), seed=3))
    assert reply.startswith(EXPLANATION_PREFIX)
