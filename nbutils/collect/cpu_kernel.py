"""The collector's CPU kernel (``cpu_kernel.cpp``): built once per machine with the system's C++ compiler, loaded
with ctypes, called by `nbutils.collect.collector.Collector` for float32 values on the CPU.

Why: on a CPU the torch path of the collector's update costs a fifth of the forward pass or more (statistics in
float64 over strided column blocks, then one merge per list in many small tensor operations); the kernel reads
each block of units once and merges the lists one candidate at a time (docs/performance.md). Where no compiler
is found or the build fails, `load` says why once and returns None, and the collector keeps its torch path:
results are the same either way (tests/test_collect.py).

The library is cached under ``$NBUTILS_KERNEL_DIR`` (default ``~/.cache/nbutils/kernels``), named by a hash of
the source and the compiler's flags, so an edited kernel is rebuilt and two versions never collide.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernel.cpp")
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-fno-math-errno"]
"""Portable flags: no -march=native (a VM can advertise instructions it does not grant; see docs/llama-cpp.md);
the kernel is bound by memory, and the baseline x86-64 build measured as fast as a native one."""

_I64, _I32, _U32, _P = ctypes.c_int64, ctypes.c_int32, ctypes.c_uint32, ctypes.c_void_p
_SIGNATURE = [_P, _I64, _I64, _I64, _I64, _I64, _P, _I32, _P, _P, _P, _P, _P, _P, _P, _I64, _P, _P, _P, _I64,
              _P, _P, _P, _I64, _I64, _P, _U32, _P, _P, _I32]  # fmt: skip


def _cache_dir() -> Path:
    return Path(os.environ.get("NBUTILS_KERNEL_DIR") or Path.home() / ".cache" / "nbutils" / "kernels")


def _build(compiler: str) -> Path:
    """Compile the kernel into the cache (atomically: a half-written library is never loaded)."""
    source = SOURCE.read_bytes()
    tag = hashlib.sha256(source + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"collector_{tag}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(out)], check=True, capture_output=True, text=True)
        os.replace(out, target)
    return target


@functools.cache
def load() -> ctypes.CDLL | None:
    """The kernel library, or None (said once) where it cannot be built here."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        print("collect: no C++ compiler found (g++, c++, clang++); the collector uses its slower torch path")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        print(f"collect: the collector's CPU kernel did not build ({detail.strip()[:300]}); using the torch path")
        return None
    lib.nbutils_collect_batch.argtypes = _SIGNATURE
    lib.nbutils_collect_batch.restype = None
    lib.nbutils_band_key.argtypes = [_U32, _U32, _U32, _U32]
    lib.nbutils_band_key.restype = ctypes.c_float
    return lib


def usable(x: torch.Tensor) -> bool:
    """Whether the kernel can take this batch: float32 values on the CPU, and the library loads."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and load() is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    if t is None:
        return None
    assert t.is_contiguous() and t.device.type == "cpu", "the kernel takes contiguous CPU tensors"
    return t.data_ptr()


def collect_batch(
    x: torch.Tensor,
    start: int,
    state: dict[str, torch.Tensor],
    signed: bool,
    edges: torch.Tensor | None,
    seed: int,
    layer_id: torch.Tensor,
    unit_id: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add the batch x [L, B, T, N] to ``state`` (the collector's stacked tensors: sums, active, the top, bottom
    and, where ``edges`` is given, band lists) and return each excerpt's max and min [L, B, N]."""
    lib = load()
    assert lib is not None
    x = x.contiguous()
    L, B, T, N = x.shape
    bmax, bmin = torch.empty(L, B, N), torch.empty(L, B, N)
    lists = []  # each list's key, index and activation tensors and its length (the keys' last dimension)
    for name in ("top", "bottom", "band"):
        key = state[f"{name}_key"]
        lists += [_ptr(key), _ptr(state[f"{name}_index"]), _ptr(state[f"{name}_acts"]), key.shape[-1]]
    nb = state["band_key"].shape[2]
    with torch.profiler.record_function("nbutils::collect_batch"):  # one operator call in a profile
        lib.nbutils_collect_batch(
            _ptr(x), L, B, T, N, start, _ptr(state["shift"]), int(signed), _ptr(state["sums"]),
            _ptr(state["active"]), _ptr(bmax), _ptr(bmin), *lists, nb, _ptr(edges), seed & 0xFFFFFFFF,
            _ptr(layer_id), _ptr(unit_id), torch.get_num_threads(),
        )  # fmt: skip
    return bmax, bmin
