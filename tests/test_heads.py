"""Attention heads as units: each head's value equals its write norm computed by hand in float64 from the layer's
weights (eager attention recomputed here, grouped-query attention included), where each head looks equals the
model's own attention weights, the collection keeps both, and a head can be set (ablated, scaled)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from conftest import ARCHS, tiny_model

from nbutils.collect.collector import CollectConfig
from nbutils.collect.corpus import ExcerptSet
from nbutils.collect.stage import collect_activations
from nbutils.core.errors import UserError
from nbutils.subject.heads import AttentionHeads, head_looks
from nbutils.subject.intervene import UnitIntervention
from nbutils.subject.models import SubjectModel
from nbutils.subject.sites import capture_neurons
from nbutils.subject.units import unit_for


def attention_module(model, arch: str, layer: int):
    if arch == "gpt2":
        return model.transformer.h[layer].attn
    if arch == "gpt_neox":
        return model.gpt_neox.layers[layer].attention
    return model.model.layers[layer].self_attn


@contextlib.contextmanager
def float64_softmax():
    """Eager attention takes its softmax in float32 (most architectures): in float64 here."""
    softmax = torch.nn.functional.softmax

    def softmax64(x, dim=None, dtype=None, **kwargs):
        return softmax(x, dim=dim, **kwargs) if x.dtype == torch.float64 else softmax(x, dim, dtype=dtype, **kwargs)

    torch.nn.functional.softmax = softmax64
    try:
        yield
    finally:
        torch.nn.functional.softmax = softmax


@torch.no_grad()
def by_hand(model, arch: str, layer: int, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """In float64, from the weights: the attention module's input (hooked), the value vectors of every head
    (GQA: each key-value head serves its group of query heads), the attention weights (the model's eager ones),
    each head's write ``z_h W_O[h]`` and its norm. Also returns the module's own output, which the writes and
    the projection's bias must add up to."""
    model = model.double()
    model.set_attn_implementation("eager")
    attn = attention_module(model, arch, layer)
    seen = {}

    def keep_input(module, args, kwargs):
        seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach()

    def keep_output(module, args, output):
        seen["out"] = output[0].detach()

    hooks = [attn.register_forward_pre_hook(keep_input, with_kwargs=True), attn.register_forward_hook(keep_output)]
    try:
        with float64_softmax():
            weights = model(input_ids=ids, output_attentions=True).attentions[layer]  # [b, H, T, T]
    finally:
        for h in hooks:
            h.remove()
    x = seen["x"]
    b, T, d = x.shape
    H = weights.shape[1]
    if arch == "gpt2":
        v = (x @ attn.c_attn.weight + attn.c_attn.bias)[..., 2 * d :].view(b, T, H, -1)
        w_o, bias = attn.c_proj.weight, attn.c_proj.bias  # Conv1D: [in, out]
    elif arch == "gpt_neox":
        qkv = (x @ attn.query_key_value.weight.T + attn.query_key_value.bias).view(b, T, H, -1)
        v = qkv[..., 2 * qkv.shape[-1] // 3 :]
        w_o, bias = attn.dense.weight.T, attn.dense.bias
    else:
        lin = attn.v_proj
        v = x @ lin.weight.T + (lin.bias if lin.bias is not None else 0)
        kv = model.config.num_key_value_heads
        v = v.view(b, T, kv, -1).repeat_interleave(H // kv, dim=2)  # query head h reads key-value head h // group
        w_o, bias = attn.o_proj.weight.T, attn.o_proj.bias
    dh = v.shape[-1]
    z = torch.einsum("bhqk,bkhd->bqhd", weights, v)  # [b, T, H, dh]
    w_o = w_o.reshape(H, dh, -1)
    writes = torch.einsum("bqhd,hde->bqhe", z, w_o)
    value_writes = torch.einsum("bkhd,hde->bhke", v, w_o).norm(dim=-1)  # [b, H, T]
    return {"weights": weights, "writes": writes, "norms": writes.norm(dim=-1), "value_writes": value_writes,
            "out": seen["out"], "bias": bias if bias is not None else torch.zeros(())}  # fmt: skip


class Tok:
    def decode(self, ids):
        return f"t{ids[0]}"


def collect_heads(model, tmp, n: int = 16, length: int = 12, layers=(1,), top_k: int = 4, **settings):
    excerpts = _excerpts(model, n, length)
    tokens = excerpts.tokens
    unit = unit_for("attention_heads", settings={"attention_head": settings} if settings else None)
    config = CollectConfig(layers=list(layers), top_k=top_k, n_random=n, band_size=2, batch_size=8)
    subject = SubjectModel(model, Tok(), "tiny")
    return collect_activations(subject, excerpts, tmp, config, progress=False, unit=unit), tokens


@pytest.mark.parametrize("arch", ARCHS)
def test_head_values_equal_the_write_norm_by_hand_in_float64(arch, tmp_path):
    """The collector's values (float32 model, its default attention) equal the float64 hand computation on every
    architecture; the hand computation is checked first against the module's own output (the writes of all
    heads plus the projection's bias are the attention output), so a head-order mistake cannot pass."""
    model = tiny_model(arch)
    store, tokens = collect_heads(model, tmp_path / "col")
    assert store.meta.kind == "attention_head" and store.meta.noun == "attention head"
    heads = model.config.num_attention_heads
    assert list(store.neurons(1)) == list(range(heads))
    want = by_hand(tiny_model(arch), arch, 1, torch.from_numpy(tokens.astype(np.int64)))
    torch.testing.assert_close(want["writes"].sum(2) + want["bias"], want["out"], rtol=1e-10, atol=1e-10)
    got = np.stack([np.stack([e.activations for e in store.record(1, h).random]) for h in range(heads)], -1)
    np.testing.assert_allclose(got, want["norms"].numpy(), rtol=1e-4, atol=1e-5, err_msg=arch)
    # in float64 end to end (and the same attention: Gemma 2's default one leaves out its soft-capping), the
    # unit type's own arithmetic agrees to rounding
    model64 = tiny_model(arch).double()
    model64.set_attn_implementation("eager")
    unit = AttentionHeads()
    with float64_softmax():
        captured = capture_neurons(model64, torch.from_numpy(tokens.astype(np.int64)), [1], unit.site(model64))[1]
    exact = unit.transform(captured, 1)
    assert exact.dtype == torch.float64
    torch.testing.assert_close(exact, want["norms"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2"])
def test_where_each_head_looks_is_the_models_own_attention(arch):
    """Source, weight and pair write of every token equal the argmax of the model's eager attention weights and
    the write norm of the source's value times its weight (the hand computation above), and the model's
    attention implementation is restored afterwards."""
    model = tiny_model(arch)
    before = model.config._attn_implementation
    ids = torch.randint(0, 500, (3, 10), generator=torch.Generator().manual_seed(2))
    looks = head_looks(model, ids.numpy(), [0, 2])
    assert model.config._attn_implementation == before
    for layer in (0, 2):
        want = by_hand(tiny_model(arch), arch, layer, ids)
        weight, where = want["weights"].max(-1)
        got = looks[layer]
        assert (got["source"] <= np.arange(10)).all()  # itself or an earlier token
        np.testing.assert_array_equal(got["source"], where.numpy())
        np.testing.assert_allclose(got["source_weight"], weight.numpy(), rtol=1e-5, atol=1e-6)
        pair = weight * want["value_writes"].gather(-1, where)
        np.testing.assert_allclose(got["source_write"], pair.numpy(), rtol=1e-4, atol=1e-5)


def test_the_collection_keeps_where_each_head_looks_on_its_kept_excerpts(tmp_path):
    """Top and random excerpts carry `Looks` equal to `head_looks` on those excerpts; the setting turns it off."""
    model = tiny_model("llama")
    store, tokens = collect_heads(model, tmp_path / "col", layers=(0, 2))
    for layer in (0, 2):
        direct = head_looks(model, tokens, [layer])[layer]
        for h in store.neurons(layer):
            record = store.record(layer, int(h))
            for e in record.top + record.random:
                assert e.looks is not None
                np.testing.assert_array_equal(e.looks.source, direct["source"][e.index, h])
                np.testing.assert_allclose(e.looks.write, direct["source_write"][e.index, h], rtol=1e-6)
            i, src, w = record.top[0].looks.pairs(record.top[0].tokens, 1)[0]
            assert src <= i and 0 < w <= 1
    off, _ = collect_heads(model, tmp_path / "off", looks=False)
    assert off.record(1, 0).top[0].looks is None and off.meta.unit["settings"] == {"looks": False}


def test_setting_a_head_scales_its_write(tmp_path):
    """Setting a head to 0 removes its write from the attention output (the output changes by exactly that
    head's write); setting it to twice its value adds its write once more; other heads are untouched."""
    arch, layer, head = "llama", 1, 2
    model = tiny_model(arch).double()
    ids = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(3))
    want = by_hand(tiny_model(arch), arch, layer, ids)
    unit = AttentionHeads()
    seen = {}
    attn = attention_module(model, arch, layer)
    h = attn.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out[0].detach()))
    try:
        iv = UnitIntervention(model, unit)
        with iv._set(layer, head, 0.0), torch.no_grad():
            model(input_ids=ids)
        ablated = seen["out"]
        with iv._set(layer, head, want["norms"][..., head] * 2), torch.no_grad():
            model(input_ids=ids)
        doubled = seen["out"]
    finally:
        h.remove()
    torch.testing.assert_close(ablated, want["out"] - want["writes"][:, :, head], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(doubled, want["out"] + want["writes"][:, :, head], rtol=1e-9, atol=1e-9)


def test_a_model_without_known_heads_is_refused_with_the_fix():
    model = tiny_model("gpt2")
    model.config.model_type = "mystery"
    with pytest.raises(UserError, match="attention heads of architecture 'mystery'.*register a unit type"):
        AttentionHeads().site(model)


# ----------------------------------------------------------------------------------------------------------
# Look rules, the looks scorer, and a head planted by hand
# ----------------------------------------------------------------------------------------------------------


def test_every_look_rule_reads_back_and_simulates_like_a_brute_force_search():
    """`parse_look(describe())` is the rule itself (also inside a rule's clauses); `sources` equals a search
    written here from the definitions, on token sequences with repeats and classes."""
    from nbutils.llm.look_rules import candidates, parse_look
    from nbutils.llm.token_classes import TOKEN_CLASSES

    rng = np.random.default_rng(0)
    words = [" the", " Cat", ",", " 42", " sat", ".", " the", " Dog"]
    for rule in candidates():
        assert parse_look(rule.describe()) == rule
        assert parse_look(f'fires on " x" (1.0); {rule.describe()}') == rule
        for _ in range(20):
            toks = [words[i] for i in rng.integers(0, len(words), 12)]
            ids = [words.index(t) for t in toks]
            want = []
            for i in range(len(toks)):
                copies = [j for j in range(i) if ids[j] == ids[i]]
                members = [j for j in range(i) if TOKEN_CLASSES.get(rule.cls or "", lambda t: False)(toks[j])]
                target = {"previous": max(i - 1, 0), "first": 0, "self": i,
                          "copy": copies[-1] if copies else None,
                          "induction": copies[-1] + 1 if copies else None,
                          "class": members[-1] if members else None}[rule.target]  # fmt: skip
                want.append(
                    target if target is not None else {"previous": max(i - 1, 0), "first": 0, "self": i}[rule.otherwise]
                )
            assert rule.sources(toks, ids).tolist() == want, rule
    assert parse_look("attends to something vague") is None and parse_look("fires on nothing") is None


def planted_previous_token_head(head: int = 1, scale: float = 20.0):
    """A tiny Llama whose query head ``head`` of layer 1 attends to the previous token by construction: its
    query and key are constant (zero weights, biases only) and the key is the query rotated back by one
    position's rotary angle in every frequency pair, so the rotary score ``sum_d cos(theta_d (n - m + 1))``
    peaks where the key is one position before the query."""
    import transformers as tf

    config = tf.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=4, vocab_size=512, max_position_embeddings=128, attention_bias=True)  # fmt: skip
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    attn = model.model.layers[1].self_attn
    dh, half = 8, 4
    theta = config.rope_theta ** (-torch.arange(half, dtype=torch.float64) * 2 / dh)
    q = torch.zeros(dh, dtype=torch.float64)
    k = torch.zeros(dh, dtype=torch.float64)
    q[:half] = 1.0
    k[:half], k[half:] = torch.cos(theta), torch.sin(theta)
    rows = slice(head * dh, (head + 1) * dh)
    with torch.no_grad():
        for proj, vec in ((attn.q_proj, q), (attn.k_proj, k)):
            proj.weight[rows] = 0.0
            proj.bias[rows] = (vec * scale).float()
    return model


def test_a_planted_previous_token_head_is_found_and_scores_its_true_explanation(tmp_path):
    """The head built to look at the previous token: the rules explainer's look search names exactly that, and
    the looks scorer gives the true explanation >= 0.9 and a wrong one (the first token) < 0.3 on held-out
    excerpts; another head of the same layer is not explained as a previous-token head."""
    from nbutils.core.records import split_excerpts
    from nbutils.core.results import ExplanationEntry
    from nbutils.llm.look_rules import LookRule, best_look
    from nbutils.score.contract import ScoreSettings, UnitContext
    from nbutils.score.looks import LooksScorer

    model = planted_previous_token_head()
    store, _ = collect_heads(model, tmp_path / "col", n=48, length=16, layers=(1,))
    scorer = LooksScorer()
    record = store.record(1, 1)
    splits = split_excerpts(record)
    found, _ = best_look(splits["train"] + splits["calibration_top"] + splits["calibration_random"])
    assert found == LookRule("previous")
    scores = {}
    for text in ("attends to the previous token", "attends to the first token", "fires on nothing"):
        entry = ExplanationEntry(layer=1, neuron=1, sign="positive", explanation=text)
        ctx = UnitContext(record, entry, splits, {}, ScoreSettings())
        scores[text] = scorer.explanation(ctx, None)[0]
    assert scores["attends to the previous token"].agreement.value >= 0.9
    assert scores["attends to the first token"].agreement.value < 0.3
    low, high = (
        scores["attends to the previous token"].agreement.low,
        scores["attends to the previous token"].agreement.high,
    )
    assert low <= scores["attends to the previous token"].agreement.value <= high
    assert (
        scores["fires on nothing"].agreement.value is None
        and "no look rule" in scores["fires on nothing"].agreement.reason
    )
    other = split_excerpts(store.record(1, 3))
    assert best_look(other["train"] + other["calibration_top"])[0] != LookRule("previous")


def test_on_the_embedded_model_the_rules_find_previous_token_and_induction_heads(embedded, tmp_path):
    """Ground truth found independently: on repeated random token sequences (``r r``), the model's own eager
    attention weights (transformers' ``output_attentions``) mark previous-token heads (mean weight on the
    previous position > 0.6) and induction heads (weight on the token after the earlier copy > 0.6, second
    half). Collected over the embedded corpus, the rules explainer's look search names the previous token for
    every previous-token head and the induction target for most induction heads."""
    from nbutils.collect.corpus import load_texts, make_excerpts
    from nbutils.core.config import RunConfig
    from nbutils.core.records import split_excerpts
    from nbutils.llm.look_rules import best_look

    model = embedded.model
    n = 20
    r = torch.randint(1000, 20000, (8, n), generator=torch.Generator().manual_seed(0))
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = model(input_ids=torch.cat([r, r], 1), output_attentions=True).attentions
    finally:
        model.set_attn_implementation(before)
    kinds: dict[str, list[tuple[int, int]]] = {"previous": [], "induction": []}
    for layer, a in enumerate(attentions):
        i, j = torch.arange(1, 2 * n), torch.arange(n, 2 * n)
        previous, induction = a[:, :, i, i - 1].mean((0, 2)), a[:, :, j, j - n + 1].mean((0, 2))
        kinds["previous"] += [(layer, h) for h in range(a.shape[1]) if previous[h] > 0.6]
        kinds["induction"] += [(layer, h) for h in range(a.shape[1]) if induction[h] > 0.6]
    assert kinds["previous"] and kinds["induction"], kinds
    c = RunConfig()
    excerpts = make_excerpts(embedded.tokenizer, load_texts(c.corpus, c.corpus_text_field), 64, 200, 0, corpus=c.corpus)
    layers = sorted({layer for heads in kinds.values() for layer, _ in heads})
    config = CollectConfig(layers=layers, top_k=12, n_random=12, band_size=2, quantile_warmup=64)
    store = collect_activations(
        embedded, excerpts, tmp_path / "col", config, progress=False, unit=unit_for("attention_heads")
    )
    found = {}
    for heads in kinds.values():
        for layer, h in heads:
            s = split_excerpts(store.record(layer, h))
            found[(layer, h)] = best_look(s["train"] + s["calibration_top"] + s["calibration_random"])[0].target
    print({kind: [(head, found[head]) for head in heads] for kind, heads in kinds.items()})
    assert all(found[head] == "previous" for head in kinds["previous"])
    named = [found[head] == "induction" for head in kinds["induction"]]
    assert sum(named) > len(named) / 2


def test_a_heads_prompt_lists_where_it_looks_from_its_strongest_tokens(tmp_path):
    """The explainer's request for a head carries (token <- source, value) pairs read off the train excerpts'
    looks, strongest first, and the prompt lists them under its note; a neuron's request has none."""
    from nbutils.explain.contract import explainer_request
    from nbutils.llm.prompts import explanation_messages

    model = tiny_model("llama")
    store, _ = collect_heads(model, tmp_path / "col", layers=(1,))
    record = store.record(1, 0)
    request = explainer_request(record)
    assert request.pairs and [v for *_, v in request.pairs] == sorted((v for *_, v in request.pairs), reverse=True)
    train = record.top[0::4]
    expected = set()
    for e in train:
        for i in np.argsort(-e.activations, kind="stable")[:3]:
            expected.add((e.tokens[i], e.tokens[e.looks.source[i]]))
    assert {(t, s) for t, s, _ in request.pairs} <= expected
    messages = explanation_messages(request.excerpts, (), noun=request.noun, pairs=request.pairs)
    token, source, value = request.pairs[0]
    assert f'"{token}" <- "{source}" ({value})' in messages[-1]["content"]
    assert "attends to most" in messages[0]["content"] and "attention head" in messages[0]["content"]
    neurons = collect_activations(
        SubjectModel(model, Tok(), "tiny"), _excerpts(model),
        tmp_path / "neurons", CollectConfig(layers=[1], top_k=4, n_random=8, band_size=2, batch_size=8), progress=False,
    )  # fmt: skip
    assert explainer_request(neurons.record(1, 0)).pairs is None


def _excerpts(model, n: int = 16, length: int = 12) -> ExcerptSet:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.config.vocab_size, (n, length), generator=g).numpy().astype(np.int32)
    return ExcerptSet(tokens, np.zeros((n, 2), dtype=np.int64), "random", 0, n)


def test_pair_items_are_the_top_and_low_pairs_and_the_rules_judge_checks_the_source(tmp_path):
    """The pair scorer's items: a top pair per held-out top excerpt (the token with the largest pair write,
    marked with its source) and a low pair per held-out random excerpt (the smallest, from the second token);
    the rules judge says yes to a pair only where the explanation's look clause names its source."""
    from nbutils.llm.contract import JudgeRequest
    from nbutils.llm.prompts import JudgeItem
    from nbutils.llm.rule_language import RulesSimulator
    from nbutils.score.classification import pair_items

    model = planted_previous_token_head()
    store, _ = collect_heads(model, tmp_path / "col", n=48, length=16, layers=(1,), top_k=20)
    items = pair_items(store.record(1, 1), per_class=5)
    assert [j.label for j in items] == [True] * 5 + [False] * 5
    by_index = {e.index: e for e in store.record(1, 1).top + store.record(1, 1).random}
    for j in items:
        e = by_index[j.index]
        writes = np.asarray(e.looks.write)
        i = 1 + int(np.argmax(writes[1:]) if j.label else np.argmin(writes[1:]))
        assert [k for k, m in enumerate(j.item.marked) if m] == sorted({i, int(e.looks.source[i])})
        assert e.looks.source[i] == i - 1  # the planted head looks at the previous token
    assert pair_items(collect_plain_neurons(tmp_path).record(1, 0)) == []
    tokens = ("a", "b", "c", "d")
    pair = JudgeItem(tokens, (False, True, True, False))  # "c" <- "b"
    first = JudgeItem(tokens, (True, False, True, False))  # "c" <- "a"
    rules = RulesSimulator()
    yes = rules.judge(JudgeRequest("pairs", 'fires on "c" (1.0); attends to the previous token', (pair, first)))
    assert yes.p_yes.tolist() == [1.0, 0.0]
    no = rules.judge(JudgeRequest("pairs", 'fires on "c" (1.0); attends to the first token', (pair, first)))
    assert no.p_yes.tolist() == [0.0, 1.0]


def collect_plain_neurons(tmp_path):
    model = tiny_model("llama")
    config = CollectConfig(layers=[1], top_k=4, n_random=8, band_size=2, batch_size=8)
    return collect_activations(
        SubjectModel(model, Tok(), "tiny"), _excerpts(model), tmp_path / "n", config, progress=False
    )


def test_the_pair_auroc_interval_covers_the_true_area_about_95_percent_of_the_time():
    """Hanley and McNeil's interval, checked by simulation: scores of positives and negatives drawn from two
    normal distributions whose true AUROC is known in closed form (Phi(d / sqrt 2)); 2,000 draws of 20 + 20."""
    from math import erf, sqrt

    from nbutils.score.metrics import auroc, auroc_interval

    rng = np.random.default_rng(0)
    d = 1.0
    true = 0.5 * (1 + erf(d / sqrt(2) / sqrt(2)))
    covered = 0
    for _ in range(2000):
        pos, neg = rng.normal(d, 1, 20), rng.normal(0, 1, 20)
        m = auroc_interval(auroc(np.r_[np.ones(20, bool), np.zeros(20, bool)], np.r_[pos, neg]), 20, 20)
        covered += m.low <= true <= m.high
    assert 0.92 <= covered / 2000 <= 0.98


def test_the_preflight_refuses_heads_of_a_model_it_cannot_read_before_any_work(tmp_path):
    from nbutils.run.preflight import check_heads, model_architecture

    assert model_architecture("embedded") == "llama"
    with pytest.raises(UserError, match="planted neurons have no attention.*units=mlp_neurons"):
        check_heads("planted:rules.py")
    (tmp_path / "opt").mkdir()
    (tmp_path / "opt" / "config.json").write_text('{"model_type": "opt"}')
    with pytest.raises(UserError, match="architecture 'opt'"):
        check_heads(str(tmp_path / "opt"))


# ----------------------------------------------------------------------------------------------------------
# The whole chain, on the embedded model
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_heads_go_through_the_chain_on_ray_and_every_view(tmp_path):
    """``nbutils run -p units=attention_heads`` with the rules explainer and Ray shards: collection (with where
    each head looks), explanations with look clauses, the looks and pair scorers beside simulation, the static
    page and report, the Neuronpedia export as attention heads, and the run opened live: a head's values and
    sources on a kept excerpt's tokens equal the collected ones, and steering shifts its write."""
    import gzip
    import json
    import subprocess
    import sys

    import nbutils
    from nbutils.core.records import RecordStore

    args = ["--preset", "quick", "-p", "units=attention_heads", "-p", "layers=[1, 17]", "-p", "explainer=rules",
            "-p", "explain_neurons=strongest:2", "-p", "n_excerpts=256", "-p", "executor=ray", "-p", "shards=2",
            "--run-id", "heads", "--output-root", str(tmp_path)]  # fmt: skip
    res = subprocess.run([sys.executable, "-m", "nbutils", "run", *args], capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = tmp_path / "heads"
    store = RecordStore(run_dir / "01_collect")
    assert store.meta.kind == "attention_head" and store.meta.neurons_per_layer == 9 and store.layers == [1, 17]
    run = nbutils.open_run(run_dir)
    assert {"simulation", "looks", "pairs"} <= {sc.name for sc in run.scorers}
    explained = list(run.explanations)
    assert len(explained) == 4 and all("attends to " in run.explanations[k].explanation for k in explained)
    frame = run.scores_frame()
    assert frame["looks agreement"].notna().all() and frame["pairs AUROC"].notna().all()
    page = (run_dir / "04_inspect" / "run.html").read_text()
    assert "attention head" in page and "looks:" in page and "\u2190" in page
    assert (run_dir / "05_report" / "figures" / "score_by_layer.png").is_file()
    # Neuronpedia: heads as their own source set, each activation with the pair write from its source
    out = tmp_path / "np"
    res = subprocess.run([sys.executable, "-m", "nbutils", "export-neuronpedia", str(run_dir), str(out)],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    layer, head = explained[0][:2]
    source = out / "smollm2-135m-instruct" / f"{layer}-attn-heads"
    rows = [
        json.loads(x) for x in gzip.decompress((source / "activations" / "batch-0.jsonl.gz").read_bytes()).splitlines()
    ]
    rec = store.record(layer, head)
    first = next(r for r in rows if r["index"] == str(head) and r["tokens"] == rec.top[0].tokens)
    top = first["dfaTargetIndex"]
    assert first["dfaValues"][int(rec.top[0].looks.source[top])] == pytest.approx(float(rec.top[0].looks.write[top]))
    # live: the same values and sources on a kept excerpt's own tokens; steering moves the continuation
    unit = run.unit(layer, head)
    live = unit.activations(rec.top[0].token_ids)
    np.testing.assert_allclose(live.values, rec.top[0].activations, rtol=1e-3, atol=1e-3)
    assert (live.looks.source == rec.top[0].looks.source).mean() > 0.95
    assert "<svg" in live._repr_html_() and "source_token" in live.to_frame()
    steered = unit.steer("The cat sat on the", strength=3.0, tokens=6)
    assert steered.original and steered.steered
