"""Real servers for tests: llama.cpp's OpenAI-compatible server with the embedded GGUF, and a fault-injecting
HTTP proxy that sits in front of it."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from nbutils.llm import llamacpp
from nbutils.subject.models import embedded_gguf_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cmd: list[str], port: int, log_path: Path, probe: bool = False) -> tuple[subprocess.Popen, str]:
    """Start a server process and wait until it answers on /v1/models (and, with ``probe``, one real
    completion request); a server that dies says why (`nbutils.llm.llamacpp.start_server`)."""
    server = llamacpp.start_server(cmd, f"http://127.0.0.1:{port}/v1", log_path, probe=probe)
    return server.process, server.url


def llama_server_command(port: int) -> list[str]:
    return llamacpp.server_command(embedded_gguf_path(), port, n_ctx=4096, n_threads=2, alias="smollm2")


FAULTS = ("429", "500", "503", "hang", "refuse", "truncate", "malformed", "no_logprobs", "short_logprobs", "garbage")


class FaultProxy:
    """Forwards HTTP requests to ``upstream`` and injects faults.

    ``queue``: faults for the next requests, one each, in order (``"ok"`` passes one through); ``rules``:
    (predicate on the request JSON, fault) applied to every matching request while the queue is empty.
    ``log`` records each request: path, JSON body, Authorization header, arrival (``time.monotonic``), fault
    and status sent.
    """

    def __init__(self, upstream: str, hang_s: float = 30.0, refuse_s: float = 2.0) -> None:
        self.upstream = upstream.rstrip("/")
        self.port = free_port()
        self.hang_s, self.refuse_s = hang_s, refuse_s
        self.queue: list[str] = []
        self.rules: list[tuple[Callable[[dict[str, Any]], bool], str]] = []
        self.log: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._forward(b"", None)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    request = json.loads(body)
                except json.JSONDecodeError:
                    request = {}
                self._forward(body, request)

            def _send(self, status: int, data: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _forward(self, body: bytes, request: dict[str, Any] | None) -> None:
                fault = proxy._choose(request) if request is not None else None
                entry = {"path": self.path, "request": request, "fault": fault,
                         "authorization": self.headers.get("Authorization"), "time": time.monotonic()}  # fmt: skip
                with proxy._lock:
                    proxy.log.append(entry)
                if fault in ("429", "500", "503"):
                    entry["status"] = int(fault)
                    headers = {"Retry-After": "1"} if fault == "429" else {}
                    return self._send(int(fault), b'{"error": {"message": "injected"}}', headers)
                if fault == "hang":
                    time.sleep(proxy.hang_s)
                    self.close_connection = True
                    return None
                if fault == "refuse":
                    entry["status"] = None
                    proxy.refuse(proxy.refuse_s)
                    self.close_connection = True
                    return None
                req = urllib.request.Request(proxy.upstream + self.path[len("/v1") :] if self.path.startswith("/v1")
                                             else proxy.upstream + self.path, data=body or None, method=self.command)  # fmt: skip
                req.add_header("Content-Type", "application/json")
                try:
                    with urllib.request.urlopen(req, timeout=600) as r:
                        status, data = r.status, r.read()
                except urllib.error.HTTPError as e:
                    status, data = e.code, e.read()
                entry["status"] = status
                if status == 200 and fault:
                    data = _corrupt(data, fault)
                self._send(status, data)
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def _choose(self, request: dict[str, Any]) -> str | None:
        with self._lock:
            if self.queue:
                fault = self.queue.pop(0)
                return None if fault == "ok" else fault
            for predicate, fault in self.rules:
                if predicate(request):
                    return fault
        return None

    def refuse(self, seconds: float) -> None:
        """Stop listening (connections are refused) for ``seconds``, then listen again on the same port."""
        server = self._server
        self._server = None

        def later() -> None:
            server.shutdown()
            server.server_close()
            time.sleep(seconds)
            self.start()

        threading.Thread(target=later, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def sent(self, fault: str | None = None) -> list[dict[str, Any]]:
        """Logged POST requests (optionally only those given ``fault``)."""
        return [e for e in self.log if e["request"] is not None and (fault is None or e["fault"] == fault)]


def _corrupt(data: bytes, fault: str) -> bytes:
    if fault == "truncate":
        return data[: len(data) // 2]
    if fault == "malformed":
        return b'{"choices": [{"text": "oops", "logprobs": ' + b"\x00garbage}"
    reply = json.loads(data)
    if fault == "garbage":  # a well-formed reply whose text is useless
        reply["choices"][0].setdefault("message", {})["content"] = "!!! ??? ..."
        reply["choices"][0]["text"] = "!!! ??? ..."
        return json.dumps(reply).encode()
    lp = reply["choices"][0].get("logprobs")
    if fault == "no_logprobs":
        reply["choices"][0]["logprobs"] = None
    elif fault == "short_logprobs" and lp:
        for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            if isinstance(lp.get(k), list):
                lp[k] = lp[k][: len(lp[k]) // 3]
    return json.dumps(reply).encode()
