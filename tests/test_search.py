"""Search by meaning against a real embeddings server: llama.cpp's server (llama-cpp-python) on the embedded
GGUF with embeddings on, over HTTP. The ranking equals a cosine computed here from the server's own vectors
(fetched without nbutils); each explanation is embedded once; a server whose vectors change size, and one
that does not answer, are handled with a message."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest
from servers import free_port

from nbutils.core.errors import UserError
from nbutils.live.meaning import MeaningIndex, server_model

pytestmark = pytest.mark.slow  # starts a server

TEXTS = [
    ((0, 1, "positive"), "names of the months"),
    ((0, 2, "positive"), "closing brackets in code"),
    ((1, 0, "positive"), "the word transfer"),
    ((1, 3, "positive"), "numbers with several digits"),
    ((2, 5, "positive"), "words in all capitals"),
    ((2, 6, "negative"), "a comma after a number"),
]


@pytest.fixture(scope="module")
def embeddings_url(tmp_path_factory):
    from nbutils.llm import llamacpp
    from nbutils.subject.models import embedded_gguf_path

    port = free_port()
    cmd = llamacpp.server_command(embedded_gguf_path(), port, n_ctx=512, n_threads=2, alias="smollm2")
    log = tmp_path_factory.mktemp("emb") / "server.log"
    server = llamacpp.start_server([*cmd, "--embedding", "true"], f"http://127.0.0.1:{port}/v1", log, probe=False)
    yield server.url
    server.stop()


def plain_embedding(url: str, text: str) -> np.ndarray:
    """The server's vector for a text, read here without nbutils (mean of its per-token vectors)."""
    body = json.dumps({"model": "smollm2", "input": [text]}).encode()
    req = urllib.request.Request(url + "/embeddings", data=body, headers={"Content-Type": "application/json"})
    v = np.asarray(json.loads(urllib.request.urlopen(req, timeout=120).read())["data"][0]["embedding"], dtype=float)
    return v.mean(axis=0) if v.ndim == 2 else v


def test_meaning_search_ranks_by_the_servers_own_vectors_and_embeds_each_text_once(embeddings_url, tmp_path):
    index = MeaningIndex(tmp_path, embeddings_url, None)
    assert index.model == server_model(embeddings_url) == "smollm2"
    query = "calendar periods of the year"
    found = index.nearest(query, TEXTS, k=None)
    q = plain_embedding(embeddings_url, query)
    want = []
    for key, text in TEXTS:
        v = plain_embedding(embeddings_url, text)
        v = (v / np.linalg.norm(v)).astype(np.float16).astype(np.float64)  # stored unit-length, as float16
        want.append((key, float(v @ q / np.linalg.norm(v) / np.linalg.norm(q))))
    want.sort(key=lambda kv: -kv[1])
    assert [k for k, _ in found] == [k for k, _ in want]
    np.testing.assert_allclose([s for _, s in found], [s for _, s in want], atol=2e-3)
    assert np.load(index.vectors_path).dtype == np.float16 and len(np.load(index.vectors_path)) == len(TEXTS)
    rank = [k for k, _ in found].index((0, 1, "positive")) + 1
    print(f"'{query}' ranks 'names of the months' at {rank} of {len(TEXTS)} with the embedded model")
    # a second index on the same folder embeds nothing again; a changed explanation is embedded alone
    again = MeaningIndex(tmp_path, embeddings_url, None)
    again.update(TEXTS)
    assert again.transport.usage.requests == 0
    changed = [*TEXTS[:-1], ((2, 6, "negative"), "a comma after a digit")]
    keys, vectors = again.update(changed)
    assert again.transport.usage.requests + again.transport.usage.cache_hits == 1
    assert keys == [k for k, _ in changed] and len(vectors) == len(changed)


def test_vectors_of_another_size_are_embedded_again_with_a_message(embeddings_url, tmp_path, capsys):
    index = MeaningIndex(tmp_path, embeddings_url, None)
    index.update(TEXTS[:2])
    rows = json.loads(index.rows_path.read_text())
    np.save(index.vectors_path, np.ones((len(rows["rows"]), 7), np.float16))  # as if another server made them
    keys, vectors = MeaningIndex(tmp_path, embeddings_url, None).update(TEXTS)
    assert vectors.shape[1] != 7 and len(keys) == len(TEXTS)
    assert "embedding every explanation again" in capsys.readouterr().err


def test_a_server_that_does_not_answer_is_named_with_the_fix(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(UserError, match="did not answer /models.*embedding_base_url"):
        MeaningIndex(tmp_path, url, None)
