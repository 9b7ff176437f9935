"""Whether an OpenAI-compatible server can be used before work is sent to it: something accepts connections at
each URL and answers ``GET /models`` without refusing the key. Checked in seconds, by the command line before
any stage runs (`nbutils.run.preflight`) and by a run's live calls before their first request
(`nbutils.live.interactive`), so a dead server is named at once instead of after the client's retries."""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.parse
import urllib.request

from nbutils.core.errors import UserError

COMMAND = "before any stage ran, so nothing was collected or lost"
LIVE = "before the live call sent anything"


def check_llm_server(
    role: str, urls: str | list[str] | None, key_env: str, probe: bool = True, when: str = COMMAND
) -> None:
    """An HTTP backend's key (needed for api.openai.com, read from the environment variable ``key_env``) and
        each of its servers (``urls``; None: the OpenAI API) answering ``GET /models``, for the ``role``
        ("explainer" or "simulator") whose ``{role}_base_url`` names them; ``when``: the check's moment, in words
    (`COMMAND`, `LIVE`), and with it how the fix sets the parameter."""
    setting = f"-p {role}_base_url=..." if when == COMMAND else f"nbutils.open_run(run, {role}_base_url=...)"
    key = os.environ.get(key_env)
    if urls is None and not key:
        raise UserError(
            f"{role}_backend=openai with no {role}_base_url means the OpenAI API, which needs a key, and the "
            f"environment variable {key_env} is not set.",
            f"export {key_env}=... (keys are read from the environment only), or point {setting} at "
            "a local server such as `python -m nbutils.llm.llamacpp_server` (docs/llama-cpp.md).",
        )
    if not probe:
        return
    for url in [urls] if isinstance(urls, str) else urls or ["https://api.openai.com/v1"]:
        _check_answers(url, role, key, key_env, when, setting)


def _check_answers(url: str, role: str, key: str | None, key_env: str, when: str, setting: str) -> None:
    """Something accepts connections at ``url`` and, unless busy, answers ``GET /models`` without refusing
    the key. A server that accepts but is slow to answer (llama.cpp works through its queue one request at a
    time, and a killed run's requests may still be in it) passes: it is there."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "localhost", port), timeout=10).close()
    except OSError as e:
        raise UserError(
            f"Nothing answers at {url} ({role}_base_url): {e}. Checked {when}.",
            "Start the server first (e.g. python -m nbutils.llm.llamacpp_server --model X.gguf --port 8080), "
            f"or fix {setting} to the URL it listens on (ending in /v1).",
        ) from None
    request = urllib.request.Request(url.rstrip("/") + "/models")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        urllib.request.urlopen(request, timeout=10).close()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise UserError(f"The server at {url} ({role}_base_url) refused the key ({e.code}).",
                            f"Check the key in the environment variable {key_env}.") from None  # fmt: skip
        # other statuses: the server is there (some lack /models)
    except OSError:
        pass  # it accepted the connection but is busy or slow: the stage's own retries take over
