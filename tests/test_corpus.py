"""Corpus sources and excerpt cutting."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nbutils.collect.corpus import load_texts, make_excerpts
from nbutils.core.errors import UserError


def test_embedded_corpus_is_real_prose_of_useful_size():
    texts = load_texts("embedded")
    assert len(texts) > 1000
    assert sum(len(t) for t in texts) > 1_000_000
    words = " ".join(texts[:50]).split()
    assert sum(w.lower() in {"the", "a", "of", "is", "to"} for w in words) / len(words) > 0.05  # English


def test_the_embedded_corpus_is_parsed_once_then_read_from_the_cache_unchanged(tmp_path, monkeypatch):
    from nbutils.collect import corpus

    parsed = list(corpus._parse_embedded_texts(corpus._stdlib_sources()))  # the standard library read afresh
    monkeypatch.setenv("NBUTILS_CACHE", str(tmp_path))
    for step in ("parsed", "read from the cache", "damaged in the cache"):
        corpus._embedded_texts.cache_clear()  # as a new process would
        (cached,) = list((tmp_path / "corpus").glob("embedded-*.json")) or [None]
        assert (cached is None) == (step == "parsed"), step
        if step == "damaged in the cache":  # a damaged cached copy is parsed again and rewritten
            cached.write_text('["trunc')
            monkeypatch.undo()
            monkeypatch.setenv("NBUTILS_CACHE", str(tmp_path))
        elif step == "read from the cache":  # not parsed again
            monkeypatch.setattr(corpus, "_parse_embedded_texts", lambda sources: pytest.fail("parsed again"))
        got = load_texts("embedded")
        assert got == parsed, step
        got.append("a caller's change")  # the next caller gets its own copy
        assert load_texts("embedded") == parsed
    assert json.loads(cached.read_text()) == parsed


def test_local_files_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("first document " * 20, encoding="utf-8")
    lines = [json.dumps({"text": f"line {i} " * 10, "id": i}) for i in range(3)] + [json.dumps("plain string")]
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    assert load_texts(str(tmp_path / "a.txt")) == ["first document " * 20]
    assert len(load_texts(str(tmp_path / "b.jsonl"))) == 4
    assert len(load_texts(str(tmp_path))) == 5
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(UserError, match="no 'text' field"):
        load_texts(str(tmp_path / "c.jsonl"))
    assert load_texts(str(tmp_path / "c.jsonl"), text_field="body") == ["x"]


def test_bad_sources_are_user_errors(tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8.*byte 3"):
        load_texts(str(latin))
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(UserError, match="holds no text"):
        load_texts(str(tmp_path / "empty.txt"))
    with pytest.raises(UserError, match="does not exist"):
        load_texts(str(tmp_path / "missing.txt"))
    with pytest.raises(UserError, match="Hugging Face dataset"):
        load_texts("no-such-user/no-such-dataset")


def test_excerpts_are_fixed_length_deterministic_and_traceable(embedded_tokenizer):
    tok = embedded_tokenizer
    texts = load_texts("embedded")[:100]
    a = make_excerpts(tok, texts, 32, 50, seed=7)
    b = make_excerpts(tok, texts, 32, 50, seed=7)
    c = make_excerpts(tok, texts, 32, 50, seed=8)
    assert a.tokens.shape == (50, 32) and a.tokens.dtype == np.int32
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.places, b.places)
    assert not np.array_equal(a.tokens, c.tokens)
    for row, (doc, offset) in zip(a.tokens[:10], a.places[:10]):
        ids = tok(texts[doc], add_special_tokens=False)["input_ids"]
        assert offset % 32 == 0 and ids[offset : offset + 32] == row.tolist()
    everything = make_excerpts(tok, texts, 32, None, seed=7)
    assert len(everything) == everything.windows_available > 50


def test_too_short_text_and_bad_lengths(embedded_tokenizer):
    tok = embedded_tokenizer
    with pytest.raises(UserError, match="no document of at least 64 tokens"):
        make_excerpts(tok, ["just a few words"], 64)
    with pytest.raises(UserError, match="longer than the model's context"):
        make_excerpts(tok, ["text " * 100], 64, max_context=32)
    with pytest.raises(UserError, match="not positive"):
        make_excerpts(tok, ["text " * 100], 0)
