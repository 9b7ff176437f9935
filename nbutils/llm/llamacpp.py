"""llama.cpp's OpenAI-compatible server (``llama-cpp-python``), built portably and started with a real check.

Why this exists: ``llama-cpp-python`` compiles llama.cpp from source, and by default with ``-march=native``.
On a virtual machine whose CPU *advertises* Intel AMX (``amx_tile`` in ``/proc/cpuinfo``) without the kernel
granting it, the compiler emits AMX tile instructions (``tileloadd``, ...) and the server dies with SIGILL on
its first real matrix product, after answering ``GET /v1/models`` normally. pip also caches the wheel it
built, so a native build made on one machine is reused on another with fewer CPU features.

What this module gives:

- ``PORTABLE_CMAKE_ARGS``: the build configuration the project installs with: ``GGML_NATIVE=OFF`` and the
  instruction sets chosen explicitly: SSE4.2, AVX, AVX2, BMI2, FMA, F16C (x86-64-v3: every x86-64 server
  CPU since 2013), no AVX-VNNI, no AVX-512, no AMX. Its speed cost is measured in docs/llama-cpp.md.
- ``python -m nbutils.llm.llamacpp wheel``: builds the pinned ``llama-cpp-python`` with that configuration
  into a cache folder keyed by version and configuration (a wheel from another configuration is never
  picked up), scans the built libraries for instructions the configuration did not choose, and prints the
  wheel's path; ``tools/install.sh`` installs it. ``check`` scans the installed libraries the same way (CI
  runs it). Both need only the standard library and ``objdump`` (GNU binutils).
- `server_command`: ``python -m nbutils.llm.llamacpp_server``, which is ``llama_cpp.server`` with its top-k
  log-probabilities ranked by numpy (the same answers; a 600-token echo request in ~21 s instead of ~55 s
  here; see that module).
- `start_server`: starts a server command, waits for ``/v1/models`` and then sends one real
  completion with prompt log-probabilities; a server that dies on it raises a `UserError` that names the
  cause (the signal, and for SIGILL the fix: rebuild portably) with the last lines of its log.

To start the server portably by hand::

    bash tools/install.sh                # or: pip install "$(python -m nbutils.llm.llamacpp wheel)[server]"
    python -m nbutils.llm.llamacpp check # no instruction the build did not choose
    python -m nbutils.llm.llamacpp_server --model X.gguf --host 127.0.0.1 --port 8080
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

VERSION = "0.3.36"  # the llama-cpp-python release the project builds and tests against

# x86-64-v3 and nothing newer; every ggml instruction-set switch is named, so a change of ggml's defaults
# cannot turn one on behind our back (ggml/CMakeLists.txt: with GGML_NATIVE=OFF, SSE4.2..F16C default ON)
PORTABLE_CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
    "-DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF "
    "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
)

REBUILD = (
    "bash tools/install.sh (or: python -m nbutils.llm.llamacpp wheel, then pip install --force-reinstall that wheel)"
)

# Instruction families a build may contain, and how each shows in `objdump -d` (AT&T syntax). AVX-512 is
# recognised by what only EVEX encodings have: zmm registers, xmm/ymm 16-31, opmask registers, embedded
# broadcast and rounding, and mnemonics that exist only in AVX-512.
_AMX = re.compile(
    r"\b(ldtilecfg|sttilecfg|tileloadd\w*|tilestored|tilezero|tilerelease|tdp\w+|tcmmimfp16ps|tcmmrlfp16ps)\b"
)
_AVX512 = re.compile(
    r"%zmm\d|%[xy]mm(?:1[6-9]|2\d|3[01])\b|\{%k[1-7]\}|%k[0-7]\b|\{1to\d+\}|\{(?:rn|rd|ru|rz)-sae\}|\{sae\}"
    r"|\b(vpternlog[dq]|vperm[it]2\w+|v(?:p)?compress\w+|v(?:p)?expand\w+|vpmov[dqw][bdw]\w*|valign[dq]"
    r"|vrndscale\w+|vgetexp\w+|vgetmant\w+|vscalef\w+|vfixupimm\w+|vpconflict\w+|vplzcnt\w+|vpro[lr]v?[dq]"
    r"|vpsraq|vpabsq|vp(?:max|min)[su]q|vpmullq|vcvtne2ps2bf16|vdpbf16ps|vcvtu\w+|vcvt\w*2u\w+)\b"
)
_AVX_VNNI = re.compile(r"\{vex\}\s*vpdp(?:bu|ws)sds?\b")
FAMILIES = {"amx": _AMX, "avx512": _AVX512, "avx_vnni": _AVX_VNNI}
_SWITCHES = {  # the CMake switch that allows each family
    "amx": ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16"),
    "avx512": ("GGML_AVX512",),
    "avx_vnni": ("GGML_AVX_VNNI",),
}


@dataclass
class InstructionScan:
    """What `scan` found in a build's shared libraries: per family, the number of instructions and a few
    examples, and which families the build configuration allowed."""

    libraries: list[str]
    found: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    allowed: set[str] = field(default_factory=set)

    @property
    def unchosen(self) -> dict[str, int]:
        """Families present that the configuration did not choose (each one can crash another machine)."""
        return {f: n for f, n in self.found.items() if n and f not in self.allowed}

    def summary(self) -> str:
        counts = ", ".join(f"{f}: {self.found.get(f, 0)}" for f in FAMILIES)
        return f"{len(self.libraries)} libraries scanned; instructions by family: {counts}; allowed: " + (
            ", ".join(sorted(self.allowed)) or "none of these"
        )


def allowed_families(cmake_args: str) -> set[str]:
    """The instruction families a CMake configuration turns on (``-DGGML_AVX512=ON`` allows ``avx512``).
    ``GGML_NATIVE`` on (or not named: llama-cpp-python's default) allows whatever the build machine has."""
    on = {m.group(1) for m in re.finditer(r"-D(GGML_\w+)=(?:ON|1|TRUE|YES)\b", cmake_args, re.I)}
    off = {m.group(1) for m in re.finditer(r"-D(GGML_\w+)=(?:OFF|0|FALSE|NO)\b", cmake_args, re.I)}
    if "GGML_NATIVE" not in off:
        return set(FAMILIES)
    return {family for family, switches in _SWITCHES.items() if on & set(switches)}


def scan(libraries: Sequence[Path], cmake_args: str = PORTABLE_CMAKE_ARGS) -> InstructionScan:
    """Disassemble ``libraries`` with objdump and count instructions of each family in `FAMILIES`."""
    objdump = shutil.which("objdump")
    if objdump is None:
        raise RuntimeError("objdump is not installed. Fix: install GNU binutils (apt-get install binutils).")
    result = InstructionScan([str(p) for p in libraries], {f: 0 for f in FAMILIES}, {}, allowed_families(cmake_args))
    for lib in libraries:
        proc = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(lib)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"objdump could not read {lib}: {proc.stderr.strip()[:300]}")
        for line in proc.stdout.splitlines():
            if "\t" not in line:  # labels and headers; instructions are "addr:\tmnemonic operands"
                continue
            insn = line.split("\t", 1)[1]
            for family, pattern in FAMILIES.items():
                if pattern.search(insn):
                    result.found[family] += 1
                    examples = result.examples.setdefault(family, [])
                    if len(examples) < 3:
                        examples.append(f"{Path(lib).name}: {insn.strip()}")
    return result


def _shared_libraries(folder: Path) -> list[Path]:
    """Each distinct shared library under ``folder`` once (a wheel holds libggml.so, .so.0 and .so.0.9 as copies)."""
    seen: dict[str, Path] = {}
    for p in sorted(folder.rglob("*.so*")):
        if p.is_file() and not p.is_symlink() and re.search(r"\.so(\.\d+)*$", p.name):
            seen.setdefault(hashlib.sha256(p.read_bytes()).hexdigest(), p)
    return sorted(seen.values())


def installed_libraries() -> list[Path]:
    """The shared libraries of the installed ``llama_cpp`` package, found through the distribution's record of
    its files (not the import path, where a script named ``llama_cpp.py`` could shadow the package)."""
    try:
        dist = importlib.metadata.distribution("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(f"llama-cpp-python is not installed. Fix: {REBUILD}.") from None
    init = next((f for f in dist.files or [] if f.parts[-2:] == ("llama_cpp", "__init__.py")), None)
    if init is None:
        raise RuntimeError(f"llama-cpp-python's record lists no llama_cpp package. Fix: {REBUILD}.")
    libs = _shared_libraries(Path(dist.locate_file(init)).parent)
    if not libs:
        raise RuntimeError(f"the installed llama_cpp package has no shared libraries. Fix: {REBUILD}.")
    return libs


def _config_key(version: str, cmake_args: str) -> str:
    return f"{version}-{hashlib.sha256(' '.join(cmake_args.split()).encode()).hexdigest()[:12]}"


def wheel_cache(version: str = VERSION, cmake_args: str = PORTABLE_CMAKE_ARGS) -> Path:
    """Where the wheel built for (version, configuration) is kept: ``$NBUTILS_LLAMA_WHEELS`` or the user's
    cache folder, one subfolder per key, with the configuration written beside the wheel."""
    root = os.environ.get("NBUTILS_LLAMA_WHEELS") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "nbutils", "llama-cpp-wheels"
    )
    return Path(root) / _config_key(version, cmake_args)


def scan_wheel(wheel: Path, cmake_args: str = PORTABLE_CMAKE_ARGS) -> InstructionScan:
    """Unpack ``wheel`` to a temporary folder and `scan` its shared libraries."""
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(tmp)
        result = scan(_shared_libraries(Path(tmp)), cmake_args)
        result.libraries = [str(Path(p).relative_to(tmp)) for p in result.libraries]
        return result


def build_wheel(version: str = VERSION, cmake_args: str = PORTABLE_CMAKE_ARGS, force: bool = False) -> Path:
    """Build ``llama-cpp-python==version`` with ``cmake_args`` (about 10 minutes on 2 cores) unless a wheel
    of exactly that configuration is cached, scan it, and return its path. pip's own wheel cache is bypassed
    (it keys built wheels by source, not by ``CMAKE_ARGS``, so it would hand back a native build)."""
    folder = wheel_cache(version, cmake_args)
    wheels = sorted(folder.glob("llama_cpp_python-*.whl"))
    if force or not wheels:
        shutil.rmtree(folder, ignore_errors=True)
        building = folder.with_name(folder.name + ".partial")
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir(parents=True)
        env = {**os.environ, "CMAKE_ARGS": cmake_args, "FORCE_CMAKE": "1"}
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "--no-binary", "llama-cpp-python"]
        print(f"building llama-cpp-python=={version} with CMAKE_ARGS={cmake_args!r}", file=sys.stderr, flush=True)
        # pip's output goes to stderr: stdout carries only the wheel's path (`tools/install.sh` reads it)
        subprocess.run(
            [*cmd, "-w", str(building), f"llama-cpp-python=={version}"], env=env, check=True, stdout=sys.stderr
        )
        (building / "config.json").write_text(json.dumps({"version": version, "cmake_args": cmake_args}) + "\n")
        building.rename(folder)  # a build killed half-way leaves only the .partial folder, never a cached wheel
        wheels = sorted(folder.glob("llama_cpp_python-*.whl"))
    result = scan_wheel(wheels[-1], cmake_args)
    if result.unchosen:
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(_unchosen_message(result, f"the wheel built in {folder}"))
    print(result.summary(), file=sys.stderr)
    return wheels[-1]


def _unchosen_message(result: InstructionScan, what: str) -> str:
    examples = "; ".join(e for f in result.unchosen for e in result.examples.get(f, []))
    return (
        f"{what} contains instructions its configuration did not choose ({result.unchosen}; e.g. {examples}): "
        f"it can die with SIGILL on a machine without them. Fix: {REBUILD}."
    )


def check_installed(cmake_args: str = PORTABLE_CMAKE_ARGS) -> InstructionScan:
    """Scan the installed ``llama_cpp`` libraries; raise if they hold a family ``cmake_args`` did not choose."""
    result = scan(installed_libraries(), cmake_args)
    if result.unchosen:
        raise RuntimeError(_unchosen_message(result, "the installed llama-cpp-python"))
    return result


# -- the server ---------------------------------------------------------------------------------------------


@dataclass
class LlamaServer:
    """A running ``llama_cpp.server``: its process, its ``/v1`` URL and its log file."""

    process: subprocess.Popen
    url: str
    log_path: Path

    def stop(self, timeout: float = 30.0) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # still busy with queued requests
            self.process.kill()


def server_command(model: str | Path, port: int, *, n_ctx: int = 4096, n_threads: int = 2,
                   alias: str | None = None, host: str = "127.0.0.1") -> list[str]:  # fmt: skip
    """The command line of llama.cpp's OpenAI-compatible server for a GGUF model on ``host:port`` (through
    `nbutils.llm.llamacpp_server`, which ranks the per-token top-k log-probabilities with numpy)."""
    cmd = [sys.executable, "-m", "nbutils.llm.llamacpp_server", "--model", str(model)]
    cmd += ["--host", host, "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", str(n_threads)]
    return cmd + (["--model_alias", alias] if alias else [])


def start_server(cmd: Sequence[str], url: str, log_path: Path, *, start_timeout: float = 120.0,
                 probe: bool = True) -> LlamaServer:  # fmt: skip
    """Start an OpenAI-compatible server with ``cmd`` and return once it has answered a real request.

    Waits for ``GET {url}/models``; then (``probe``) sends one tiny completion with prompt log-probabilities,
    which runs the model's matrix products: a build with instructions this CPU cannot execute answers the
    first request and dies on the second. Any death or time-out raises `UserError` naming the cause, with
    the last lines of the log at ``log_path``; the process is never left running on failure.
    """
    from nbutils.core.errors import UserError

    log_path = Path(log_path)
    log = open(log_path, "w")  # the server writes to it for as long as it runs
    proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT)
    server = LlamaServer(proc, url.rstrip("/"), log_path)
    deadline = time.monotonic() + start_timeout
    try:
        while True:
            try:
                urllib.request.urlopen(server.url + "/models", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    raise UserError(*_death(server, "while starting")) from None
                if time.monotonic() > deadline:
                    raise UserError(
                        f"The server started with {' '.join(cmd[:4])} ... did not answer {server.url}/models "
                        f"within {start_timeout:.0f} s.{_log_tail(log_path)}",
                        "Check the command and the model path; a large model may need a longer start_timeout.",
                    ) from None
                time.sleep(0.5)
        if probe:
            body = {"prompt": "a b", "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
            request = urllib.request.Request(server.url + "/completions", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})  # fmt: skip
            try:
                with urllib.request.urlopen(request, timeout=max(5.0, deadline - time.monotonic())) as reply:
                    reply.read()
            except OSError as e:  # HTTPError included
                try:
                    proc.wait(timeout=3)  # a crash closes the connection a moment before the exit is seen
                except subprocess.TimeoutExpired:
                    pass
                if proc.poll() is not None:
                    raise UserError(*_death(server, "on its first completion request")) from None
                raise UserError(
                    f"The server at {server.url} answered /models but its first completion request failed: "
                    f"{type(e).__name__}: {e}.{_log_tail(log_path)}",
                    "Check the server's log above; the model may not support completions.",
                ) from None
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    return server


def _death(server: LlamaServer, when: str) -> tuple[str, str]:
    """(problem, fix) for a server process that exited."""
    code = server.process.returncode
    cause = f"exit status {code}"
    fix = "Read the log lines above: they name what the server could not do."
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"signal {-code}"
        cause = f"signal {name}"
        if -code == signal.SIGILL:
            cause += (
                " (an illegal instruction: llama.cpp was compiled for CPU features this machine cannot execute, "
                "such as AMX or AVX-512 from a -march=native build made elsewhere or on a VM that advertises them)"
            )
            fix = f"Rebuild llama-cpp-python portably: {REBUILD}; then `python -m nbutils.llm.llamacpp check`."
    problem = f"The server for {server.url} died {when} with {cause}.{_log_tail(server.log_path)}"
    return problem, fix


def _log_tail(log_path: Path, lines: int = 8) -> str:
    try:
        tail = Path(log_path).read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return (
        f" Last lines of its log ({log_path}):\n    " + "\n    ".join(tail)
        if tail
        else f" Its log ({log_path}) is empty."
    )


# -- command line ---------------------------------------------------------------------------------------------


def main(argv: Iterable[str] | None = None) -> int:
    """``wheel`` (build or reuse, scan, print the path), ``check`` (scan the installed package), ``cmake-args``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m nbutils.llm.llamacpp", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["wheel", "check", "cmake-args"])
    parser.add_argument("--cmake-args", default=PORTABLE_CMAKE_ARGS, help="the build configuration (default: portable)")
    parser.add_argument("--version", default=VERSION, help="the llama-cpp-python version to build")
    parser.add_argument("--force", action="store_true", help="rebuild even if a wheel of this configuration is cached")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        if args.command == "cmake-args":
            print(args.cmake_args)
        elif args.command == "wheel":
            print(build_wheel(args.version, args.cmake_args, args.force))
        else:
            print(check_installed(args.cmake_args).summary())
    except (RuntimeError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
