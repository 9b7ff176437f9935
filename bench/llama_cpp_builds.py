"""Speed of llama.cpp builds: prompt log-probabilities per second (the echo simulator's work) per build.

    python bench/llama_cpp_builds.py --native            # the portable build installed vs a -march=native build
    python bench/llama_cpp_builds.py --build installed --build path/to/llama_cpp_python-...whl

Each build runs in its own process (a wheel is unpacked and put first on PYTHONPATH), loads the embedded
GGUF with 2 threads and times ``create_completion(prompt, echo=True, logprobs=5, max_tokens=1)`` on the same
prompt of ``--tokens`` tokens, the model's state reset first (no prompt cache), and, apart, the forward pass
alone (``eval`` with logits at every position: ggml's share, where the instruction sets matter). Builds alternate within each
repeat so machine noise hits them alike; medians with min-max. ``--native`` builds (once, cached by
`nbutils.llm.llamacpp.build_wheel`, about 5-10 minutes on 2 cores) the same version with ``GGML_NATIVE=ON``:
what pip builds by default on this machine. Writes bench/results/llama_cpp_builds.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

CHILD = r"""
import json, sys, time
from llama_cpp import Llama, llama_cpp
model, tokens, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = Llama(model_path=model, n_ctx=max(512, tokens + 64), n_threads=threads, logits_all=True, verbose=False)
words = " ".join(f"word{i % 97}\tunknown" for i in range(tokens))
ids = llm.tokenize(words.encode())[:tokens]
prompt = llm.detokenize(ids).decode(errors="ignore")
n = len(llm.tokenize(prompt.encode()))
def forward():  # ggml alone: the prompt's forward pass with logits at every position
    llm.reset()
    start = time.perf_counter()
    llm.eval(llm.tokenize(prompt.encode()))
    return time.perf_counter() - start
def echo():  # the server's path: the same forward, then llama-cpp-python's top-5 log-probabilities per token
    llm.reset()
    start = time.perf_counter()
    llm.create_completion(prompt, max_tokens=1, echo=True, logprobs=5, temperature=0)
    return time.perf_counter() - start
forward()  # warm-up
out = {"tokens": n, "forward": forward(), "seconds": echo()}
print(json.dumps({**out, "system_info": llama_cpp.llama_print_system_info().decode()}))
"""


def _site(build: str, tmp: Path) -> str | None:
    """PYTHONPATH for a build: None for the installed package, else the unpacked wheel's folder."""
    if build == "installed":
        return None
    folder = tmp / Path(build).stem
    if not folder.exists():
        with zipfile.ZipFile(build) as z:
            z.extractall(folder)
    return str(folder)


def _rates(tokens: int, seconds: list[float]) -> dict[str, float]:
    rates = [tokens / s for s in seconds]
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}


def _label(build: str) -> str:
    """A build's name in the table: its CMake arguments where `build_wheel` wrote them beside the wheel."""
    config = Path(build).parent / "config.json"
    if build != "installed" and config.exists():
        return "CMAKE_ARGS=" + (json.loads(config.read_text())["cmake_args"][:40] or "(none)")
    return build if build == "installed" else Path(build).name


def measure(builds: list[str], tokens: int, repeats: int, threads: int) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from nbutils.subject.models import embedded_gguf_path

    model = str(embedded_gguf_path())
    seconds: dict[str, list[float]] = {b: [] for b in builds}
    forward: dict[str, list[float]] = {b: [] for b in builds}
    info: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            for b in builds:
                site = _site(b, Path(tmp))
                env = {**os.environ, **({"PYTHONPATH": site} if site else {})}
                cmd = [sys.executable, "-c", CHILD, model, str(tokens), str(threads)]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
                info[b] = json.loads(out.strip().splitlines()[-1])
                seconds[b].append(info[b]["seconds"])
                forward[b].append(info[b]["forward"])
    base, base_forward = statistics.median(seconds[builds[0]]), statistics.median(forward[builds[0]])
    rows = []
    for b in builds:
        rows.append({
            "build": _label(b),
            "prompt_tokens": info[b]["tokens"],
            "forward_tokens_per_s": _rates(info[b]["tokens"], forward[b]),
            "forward_vs_first": base_forward / statistics.median(forward[b]),
            "echo_logprob_tokens_per_s": _rates(info[b]["tokens"], seconds[b]),
            "echo_vs_first": base / statistics.median(seconds[b]),
            "cpu_features": " ".join(f for f in info[b]["system_info"].split(" | ") if f.endswith("= 1")),
        })  # fmt: skip
    return {"benchmark": "llama_cpp", "model": "SmolLM2-135M-Instruct Q4_1 (embedded)", "threads": threads,
            "repeats": repeats, "rows": rows}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", action="append", help='"installed" or a wheel path (repeatable; the first is the base)')
    p.add_argument("--native", action="store_true", help="add a GGML_NATIVE=ON build of the same version")
    p.add_argument("--tokens", type=int, default=1024, help="prompt tokens per request")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args()
    builds = args.build or ["installed"]
    if args.native:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from nbutils.llm.llamacpp import build_wheel

        builds.append(str(build_wheel(cmake_args="-DGGML_NATIVE=ON")))
    result = measure(builds, args.tokens, args.repeats, args.threads)
    result["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count()}
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run import print_table

    print_table(result)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "llama_cpp_builds.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
