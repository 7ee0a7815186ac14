#!/usr/bin/env bash
# Creates .venv and installs dllmq (editable) with its test tools.
# On a machine without an NVIDIA GPU it installs the CPU build of torch first: a bare `torch`
# requirement would otherwise make pip pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=2.13.0
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
pip() { .venv/bin/python -m pip "$@"; }

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip install -q "torch==${TORCH_VERSION}"
  else
    # A local wheel or mirror may already offer the +cpu build; otherwise use PyTorch's CPU index.
    pip install -q "torch==${TORCH_VERSION}+cpu" 2>/dev/null \
      || pip install -q "torch==${TORCH_VERSION}" --index-url "${TORCH_CPU_INDEX}"
  fi
fi
pip install -q -e ".[test]"
