"""The two test tiers (docs/testing.md): what `-m "not slow"` leaves out, and the guard that fails an unmarked
fast-tier test which loads the embedded model or starts a server, before it does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CASES = """
import subprocess
import sys

import pytest


def test_loads_the_embedded_model():
    from nbutils.subject.loading import load_subject_model

    load_subject_model("embedded")


def test_starts_a_llama_cpp_server():
    subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--help"])


def test_plain():
    assert subprocess.run([sys.executable, "-c", "print(1)"], capture_output=True).stdout == b"1\\n"


@pytest.mark.slow
def test_marked():
    pass


def test_reaches_the_embedded_fixture(embedded):
    pass


def test_reaches_it_through_another_fixture(llama_url):
    pass


@pytest.fixture
def llama_url(llama_server):
    return llama_server
"""


def _pytest(folder: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "conftest",
        "-c",
        str(ROOT / "pyproject.toml"),
        "--rootdir",
        str(folder),
    ]
    return subprocess.run(
        [*cmd, "-q", "--durations=0", *args, str(folder / "test_cases.py")],
        capture_output=True, text=True, timeout=300, cwd=folder, env={**os.environ, "PYTHONPATH": str(ROOT / "tests")},
    )  # fmt: skip


def test_the_fast_tier_leaves_out_slow_fixtures_and_marks_and_fails_what_it_should_have_left_out(tmp_path):
    (tmp_path / "test_cases.py").write_text(CASES)
    res = _pytest(tmp_path, "-m", "not slow")
    out = res.stdout
    # the marked test and the two that reach a slow fixture (directly or through another) are left out
    assert "3 deselected" in out, out[-3000:]
    assert "2 failed, 1 passed" in out, out[-3000:]
    assert "test_loads_the_embedded_model loads the embedded model" in out and "mark it @pytest.mark.slow" in out
    assert "test_starts_a_llama_cpp_server starts llama_cpp.server" in out
    listed = _pytest(tmp_path, "-m", "slow", "--collect-only")
    assert "3/6 tests collected (3 deselected)" in listed.stdout, listed.stdout[-2000:]
    for name in ("test_marked", "test_reaches_the_embedded_fixture", "test_reaches_it_through_another_fixture"):
        assert name in listed.stdout
