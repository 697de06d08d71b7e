#!/usr/bin/env bash
# Creates .venv with torch (CPU build unless one is already installed), builds the compiled kernels and installs
# rmi_fast with its test tools and the CPU bench peer torch-mist. Idempotent: re-running only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
. .venv/bin/activate
pip() { python -m pip --disable-pip-version-check -q "$@"; }

# A pinned torch: an unpinned requirement would pull a multi-GB CUDA build on a CPU machine. Where pip's own
# configuration offers no CPU build (PyPI's torch for Linux is the CUDA one), RMI_FAST_TORCH_INDEX names an index
# that has it, e.g. https://download.pytorch.org/whl/cpu.
python -c "import torch" 2>/dev/null ||
  pip install ${RMI_FAST_TORCH_INDEX:+--index-url "$RMI_FAST_TORCH_INDEX"} "torch==${RMI_FAST_TORCH_VERSION:-2.13.0}"
pip install setuptools wheel cmake ninja
# --no-build-isolation: the extension must be built against the torch installed above.
pip install --no-build-isolation -e ".[test]"
# torch-mist pins numpy<2 without needing it: its adapter is tested and benchmarked without that pin.
pip install --no-deps -r benchmarks/requirements-torch-mist.txt
python -m rmi_fast.cli info
