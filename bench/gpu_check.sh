#!/usr/bin/env bash
# One command for a lent GPU: the hf engine in bfloat16 on CUDA (bench/gpu_check.py), with the
# machine's own torch and transformers (no hub, no vLLM, no Ray needed). Results: a table on
# stdout and gpu_check.json in OUT (or the current folder).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONPATH=. PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out "${OUT:-.}/gpu_check.json" "$@"
