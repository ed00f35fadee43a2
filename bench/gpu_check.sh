#!/usr/bin/env bash
# One command for a lent GPU: the hf engine in bfloat16 on CUDA (bench/gpu_check.py), with the
# machine's own torch and transformers (no hub, no vLLM, no Ray needed). Results: a table on
# stdout and gpu_check.json in OUT (or the current folder).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONPATH=. PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out "${OUT:-.}/gpu_check.json" "$@"
# State changes at scale on the GPU: a 3-round magnitude and a 3-round wanda sparsify of every
# weight of the same 1.1 B model, per round time and peak memory (bench/scale_rehearsal.py).
for criterion in magnitude wanda; do
    PYTHONPATH=. PYTHONUNBUFFERED=1 python3 bench/scale_rehearsal.py --hidden 2048 --layers 22 \
        --intermediate 5632 --dtype bfloat16 --rounds 3 --criterion "$criterion" \
        --json "${OUT:-.}/scale_rehearsal_$criterion.json"
done
# Export speed: the dense checkpoint of a 2-round magnitude and a 2-round wanda state of the same
# model, replayed on every CPU core and on the GPU (bench/export_speed.py; seconds per GB).
PYTHONPATH=. PYTHONUNBUFFERED=1 python3 bench/export_speed.py --size 1b --dtype bfloat16 \
    --settings cpu,cuda --json "${OUT:-.}/export_speed.json"
