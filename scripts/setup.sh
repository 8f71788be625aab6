#!/usr/bin/env bash
# Installs everything kv-lifecycle needs on a fresh Debian machine, then builds the extension.
# Idempotent: a second run only checks.  torch first, so nixl-cu12 does not pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pipi() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
"$PY" -c "import torch" 2>/dev/null || pipi torch==2.13.0
pipi -r requirements.txt
# nixl-cu12's UCX handles CUDA memory only when libcudart.so.12 loads (lifecycle.transport.cuda12_runtime)
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  if ! "$PY" -c "import nvidia.cuda_runtime" 2>/dev/null; then
    cudart=$("$PY" scripts/requirement.py nvidia-cuda-runtime-cu12)
    pipi "$cudart"
  fi
fi
need_apt=()
command -v c++ >/dev/null || command -v g++ >/dev/null || need_apt+=(g++)  # C++20: GCC 10 or newer
command -v dot >/dev/null || need_apt+=(graphviz)
command -v chromium >/dev/null || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
make -s build PYTHON="$PY"
