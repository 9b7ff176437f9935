"""A stand-in for a hosted OpenAI-compatible API: every reply comes after a fixed latency, as a hosted model's
would (about 1-2 s), and is shaped like a real chat reply to the request.

    python bench/stand_in_api.py --port 8123 --latency 1.0

The throughput benchmark (`bench/run.py --only throughput`) measures how many requests the client keeps in
flight and how many units an hour that gives, so what matters is the latency and that every reply parses;
the replies are made from the request, not by a model (the embedded 135M model on 2 cores would be the
bottleneck, and it rarely writes a value line per token in chat mode):

- an explainer request gets a short phrase naming a token of the prompt;
- a chat simulation request ("Rewrite the last excerpt ...") gets one ``token<TAB>value`` line per token, the
  values drawn from a hash of the request (the same request always gets the same reply);
- a judging request ("Reply with the digit only.") gets "1" or "0" with ``top_logprobs`` for both digits;
  one with several numbered items ("Answer each of the N texts") gets a line ``k: digit`` for each, the
  digit's token with ``top_logprobs`` for both digits.

The legacy completions endpoint answers 404 (hosted chat models have no prompt log-probabilities), so the
client simulates in chat mode. ``GET /stats`` returns the requests served and the most served at once;
``GET /reset`` starts counting both again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

UNKNOWN = "\tunknown"  # the placeholder of a chat simulation prompt's value column


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _digit(h: int) -> tuple[str, dict[str, Any]]:
    """A judging answer drawn from a hash: the digit and its reply token with both digits' log-probabilities."""
    p_yes = 0.2 + 0.6 * ((h % 1000) / 1000)
    digit = "1" if p_yes >= 0.5 else "0"
    alts = [{"token": "1", "logprob": math.log(p_yes)}, {"token": "0", "logprob": math.log(1 - p_yes)}]
    return digit, {"token": digit, "logprob": math.log(p_yes if digit == "1" else 1 - p_yes), "top_logprobs": alts}


def _plain(text: str) -> dict[str, Any]:
    return {"token": text, "logprob": 0.0, "top_logprobs": [{"token": text, "logprob": 0.0}]}


def reply_text(messages: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]] | None]:
    """The reply's content and, for a judging request, its first token's log-probabilities."""
    last = messages[-1]["content"]
    h = _hash(json.dumps(messages))
    if "Rewrite the last excerpt" in last:
        tokens = [line[: -len(UNKNOWN)] for line in last.split("\n") if line.endswith(UNKNOWN)]
        values = [(h >> (i % 56)) % 23 for i in range(len(tokens))]  # mostly zero, now and then high
        return "".join(f"{t}\t{v if v <= 10 else 0}\n" for t, v in zip(tokens, values)), None
    if "Reply with the digit only" in last:
        digit, token = _digit(h)
        return digit, [token]
    batch = re.search(r"Answer each of the (\d+) texts", last)
    if batch:
        tokens = []
        for k in range(1, int(batch.group(1)) + 1):
            digit, token = _digit(_hash(f"{h}:{k}"))
            tokens += [_plain(f"{k}: "), token, _plain("\n")]
        return "".join(t["token"] for t in tokens), tokens
    words = [w for w in last.replace("\t", " ").split() if w.isalpha()]
    word = words[h % len(words)] if words else "text"
    return f' the word "{word}" and words like it.', None


def completion(request: dict[str, Any]) -> dict[str, Any]:
    content, logprobs = reply_text(request["messages"])
    prompt_chars = sum(len(m["content"]) for m in request["messages"])
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
    if logprobs is not None and request.get("logprobs"):
        choice["logprobs"] = {"content": logprobs}
    return {
        "id": "stand-in",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.get("model", "stand-in"),
        "choices": [choice],
        "usage": {"prompt_tokens": prompt_chars // 4, "completion_tokens": len(content) // 4 + 1},
    }


class StandInServer:
    """The server (threads, so slow replies overlap); ``latency`` seconds are added to every POST."""

    def __init__(self, port: int, latency: float) -> None:
        self.port, self.latency = port, latency
        self.served = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()

    def serve(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.endswith("/reset"):
                    with server._lock:
                        server.served, server.max_in_flight = 0, server.in_flight
                if self.path.endswith(("/stats", "/reset")):
                    return self._send(200, {"served": server.served, "max_in_flight": server.max_in_flight})
                return self._send(200, {"object": "list", "data": [{"id": "stand-in", "object": "model"}]})

            def do_POST(self) -> None:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with server._lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    time.sleep(server.latency)
                    if not self.path.endswith("/chat/completions"):
                        return self._send(404, {"error": {"message": "only chat completions are served here"}})
                    return self._send(200, completion(request))
                finally:
                    with server._lock:
                        server.in_flight -= 1
                        server.served += 1

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 1024  # many clients connect at once

        Server(("127.0.0.1", self.port), Handler).serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--latency", type=float, default=1.0, help="seconds added to every reply")
    args = p.parse_args()
    StandInServer(args.port, args.latency).serve()


if __name__ == "__main__":
    main()
