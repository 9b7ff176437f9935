"""llama.cpp built portably: the instruction scan on real compiled code, the installed build, a server that
dies on its first real request, and a server that crashes mid-request as the backend reports it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from servers import free_port, llama_server_command

from nbutils.core.errors import UserError
from nbutils.llm import llamacpp
from nbutils.llm.contract import LLMFailed, SimulationRequest
from nbutils.llm.openai_compat import OpenAIBackend

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("objdump") is None, reason="gcc, objdump")


def test_configurations_allow_what_they_turn_on():
    assert llamacpp.allowed_families(llamacpp.PORTABLE_CMAKE_ARGS) == set()
    assert llamacpp.allowed_families("") == set(llamacpp.FAMILIES)  # llama-cpp-python's default: native
    assert llamacpp.allowed_families("-DGGML_NATIVE=ON") == set(llamacpp.FAMILIES)
    assert llamacpp.allowed_families("-DGGML_NATIVE=OFF -DGGML_AVX512=ON") == {"avx512"}
    assert llamacpp.allowed_families("-DGGML_NATIVE=OFF -DGGML_AMX_INT8=ON -DGGML_AVX512=OFF") == {"amx"}
    # the cache key follows the configuration: a wheel of another configuration is never picked up
    assert llamacpp.wheel_cache(cmake_args="-DGGML_NATIVE=ON") != llamacpp.wheel_cache()
    assert llamacpp.wheel_cache(version="0.3.7") != llamacpp.wheel_cache()


def _compile(tmp_path: Path, name: str, source: str, flags: list[str]) -> Path:
    src, lib = tmp_path / f"{name}.c", tmp_path / f"lib{name}.so"
    src.write_text(textwrap.dedent(source))
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", *flags, str(src), "-o", str(lib)], check=True)
    return lib


@needs_gcc
def test_scan_finds_amx_and_avx512_that_a_compiler_emitted_and_nothing_in_avx2_code(tmp_path):
    avx2 = _compile(tmp_path, "avx2", """
        #include <immintrin.h>
        float dot(const float *a, const float *b, int n) {
            __m256 acc = _mm256_setzero_ps();
            for (int i = 0; i + 8 <= n; i += 8)
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
            float out[8]; _mm256_storeu_ps(out, acc);
            return out[0] + out[1] + out[2] + out[3] + out[4] + out[5] + out[6] + out[7];
        }""", ["-mavx2", "-mfma", "-mf16c"])  # fmt: skip
    avx512 = _compile(tmp_path, "avx512", """
        #include <immintrin.h>
        float sum16(const float *a) { return _mm512_reduce_add_ps(_mm512_loadu_ps(a)); }
        """, ["-mavx512f"])  # fmt: skip
    amx = _compile(tmp_path, "amx", """
        #include <immintrin.h>
        void tiles(const void *a, const void *b, void *c, const void *cfg) {
            _tile_loadconfig(cfg);
            _tile_loadd(1, a, 64); _tile_loadd(2, b, 64); _tile_zero(0);
            _tile_dpbssd(0, 1, 2);
            _tile_stored(0, c, 64); _tile_release();
        }""", ["-mamx-tile", "-mamx-int8"])  # fmt: skip

    clean = llamacpp.scan([avx2])
    assert sum(clean.found.values()) == 0 and not clean.unchosen
    wide = llamacpp.scan([avx512])
    assert wide.found["avx512"] > 0 and wide.found["amx"] == 0 and "avx512" in wide.unchosen
    tiles = llamacpp.scan([amx])
    assert tiles.found["amx"] >= 5 and set(tiles.unchosen) == {"amx"}
    assert any("tileloadd" in e for e in tiles.examples["amx"])
    # allowed when the configuration chose it
    assert not llamacpp.scan([avx512], "-DGGML_NATIVE=OFF -DGGML_AVX512=ON").unchosen


@needs_gcc
def test_the_installed_llama_cpp_holds_no_instruction_its_portable_build_did_not_choose():
    pytest.importorskip("llama_cpp")
    libs = llamacpp.installed_libraries()
    assert any("ggml-cpu" in p.name for p in libs), libs
    result = llamacpp.check_installed()
    assert result.found["amx"] == 0 and result.found["avx512"] == 0, result.summary()


DIES_ON_FIRST_COMPLETION = """
import os, signal, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"{}")
    def do_POST(self):
        print("ggml_compute_forward: entering the matrix product", flush=True)
        os.kill(os.getpid(), signal.SIGILL)  # as an AMX instruction on a VM that cannot run it

print("server listening", flush=True)
HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def test_a_server_that_dies_on_its_first_real_request_is_named_with_the_cause_and_the_fix(tmp_path):
    script = tmp_path / "dies.py"
    script.write_text(DIES_ON_FIRST_COMPLETION)
    port = free_port()
    with pytest.raises(UserError) as err:
        llamacpp.start_server([sys.executable, str(script), str(port)], f"http://127.0.0.1:{port}/v1",
                              tmp_path / "server.log", start_timeout=30)  # fmt: skip
    message = str(err.value)
    assert "died on its first completion request with signal SIGILL" in message
    assert "illegal instruction" in message and "tools/install.sh" in message
    assert "entering the matrix product" in message and str(tmp_path / "server.log") in message
    # answering /models is not enough: without the probe the same server looks healthy
    server = llamacpp.start_server([sys.executable, str(script), str(port)], f"http://127.0.0.1:{port}/v1",
                                   tmp_path / "again.log", start_timeout=30, probe=False)  # fmt: skip
    assert server.process.poll() is None
    server.stop()


def test_a_server_that_exits_while_starting_says_so(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-c", "print('cannot open model file'); raise SystemExit(3)"]
    with pytest.raises(UserError, match=r"(?s)died while starting with exit status 3.*cannot open model file"):
        llamacpp.start_server(cmd, f"http://127.0.0.1:{port}/v1", tmp_path / "s.log", start_timeout=30)


@pytest.mark.slow
def test_a_server_killed_mid_request_is_reported_as_stopped_responding(tmp_path):
    pytest.importorskip("llama_cpp")
    port = free_port()
    server = llamacpp.start_server(llama_server_command(port), f"http://127.0.0.1:{port}/v1", tmp_path / "l.log")
    try:
        be = OpenAIBackend("smollm2", base_url=server.url, simulation="echo", max_retries=2, backoff=0.2, context=4096)
        long_excerpt = tuple(f" word{i % 97}" for i in range(400))  # ~3,000 prompt tokens: 10-50 s on 2 cores
        request = SimulationRequest("anything", (long_excerpt,))
        killer = threading.Timer(1.5, server.process.kill)  # SIGKILL while it evaluates the prompt
        killer.start()
        started = time.monotonic()
        with pytest.raises(LLMFailed) as err:
            be.simulate(request)
        killer.join()
    finally:
        server.stop()
    message = str(err.value)
    assert time.monotonic() - started < 60
    assert f"the server at {server.url} stopped responding (it may have crashed; see its log)" in message, message


def test_nothing_listening_is_named_as_such():
    url = f"http://127.0.0.1:{free_port()}/v1"  # a port nothing listens on
    be = OpenAIBackend("smollm2", base_url=url, simulation="chat", max_retries=1, backoff=0.05)
    with pytest.raises(LLMFailed, match=r"nothing answers at http://127\.0\.0\.1:\d+/v1 \(the server is not running"):
        be.chat([{"role": "user", "content": "hi"}])


def test_the_wheel_command_prints_only_a_path_on_stdout_and_a_failed_build_caches_nothing(tmp_path):
    """tools/install.sh reads the wheel's path from stdout: pip's own output must go to stderr."""
    env = {**os.environ, "NBUTILS_LLAMA_WHEELS": str(tmp_path), "PYTHONPATH": str(Path.cwd())}
    res = subprocess.run([sys.executable, "-m", "nbutils.llm.llamacpp", "wheel", "--version", "0.0.0"],
                         capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert res.returncode == 1 and res.stdout == "", res.stdout
    assert "llama-cpp-python==0.0.0" in res.stderr and "error:" in res.stderr
    assert not list(tmp_path.glob("*/llama_cpp_python-*.whl"))  # only a .partial folder, never a cached wheel


def test_numpy_ranking_gives_pythons_order_and_leaves_other_calls_alone():
    from nbutils.llm.llamacpp_server import _sorted, _zip

    rng = np.random.default_rng(0)
    for row in (
        np.log(rng.dirichlet(np.ones(4096))).astype(np.float32),
        np.round(rng.normal(size=3000), 1).astype(np.float32),  # many ties: broken by token id, descending
        np.concatenate([np.full(500, -np.inf), rng.normal(size=500)]),  # float64, -inf entries
    ):
        for values in (row, row.tolist()):
            want = sorted(zip(values, range(len(values))), reverse=True)
            got = _sorted(_zip(values, range(len(values))), reverse=True)
            assert [i for _, i in got] == [i for _, i in want]
            assert [v for v, _ in got] == [float(v) for v, _ in want]
    short, nan = [3.0, 1.0, 2.0], np.array([np.nan] * 300 + [1.0] * 300)
    assert _sorted(_zip(short, range(3)), reverse=True) == [(3.0, 0), (2.0, 2), (1.0, 1)]
    assert len(_sorted(_zip(nan, range(600)), reverse=True)) == 600  # NaN rows: the built-in sort
    assert _sorted(_zip(list(range(300)), range(300))) == [(i, i) for i in range(300)]  # not reversed: built-in
    assert list(_zip("ab", [1, 2])) == [("a", 1), ("b", 2)]


@pytest.mark.slow  # the embedded model in llama.cpp
def test_numpy_ranking_answers_echo_completions_as_llama_cpp_does():
    """The embedded model in process, one echo completion with top-20 prompt log-probabilities: the same
    answer with and without the replacement (only the ranking changed, not what is ranked)."""
    from llama_cpp import Llama

    from nbutils.llm.llamacpp_server import numpy_top_logprobs
    from nbutils.subject.models import embedded_gguf_path

    llm = Llama(str(embedded_gguf_path()), n_ctx=512, n_threads=2, verbose=False, logits_all=True)
    prompt = "The river ran dry.\tunknown\nTax forms are due in April, and the office is closed on Sunday."

    def complete() -> str:
        out = llm.create_completion(prompt, max_tokens=1, echo=True, logprobs=20, temperature=0, seed=0)
        return json.dumps(out["choices"][0], default=float)

    import llama_cpp.llama as module

    plain = complete()
    ranked_rows = []
    with numpy_top_logprobs():
        numpy_sorted = module.sorted
        module.sorted = lambda it, **kw: (ranked_rows.append(type(it).__name__), numpy_sorted(it, **kw))[1]
        ranked = complete()
        module.sorted = numpy_sorted
    assert ranked_rows and set(ranked_rows) == {"_VocabularyRow"}  # llama_cpp's ranking went through numpy
    assert "sorted" not in vars(module) and "zip" not in vars(module)  # restored: the built-ins again
    assert ranked == plain and json.loads(ranked)["logprobs"]["top_logprobs"][1]
