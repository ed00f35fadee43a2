#!/usr/bin/env bash
# One command for a lent GPU, under 8 minutes on one H100: what has never run on a GPU first.
# Results: tables on stdout, NAME.md and NAME.json files in OUT (default bench/results). No hub,
# no Ray; vLLM only for the first step, which is skipped where vLLM does not import.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-bench/results}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# The vllm engine on CUDA (graphs with and without batch invariance, eager): noise floor, scoring
# hook, probes per hour, layer skip, state changes, workers vs reference bits. Needs vLLM.
if python3 -c "import vllm" 2>/dev/null; then
    timeout 300 python3 -m bench.checks.gpu_vllm_check --out "$out" || true
else
    echo "vLLM is not installed here: the vllm engine's GPU check is skipped"
fi
# The hf engine in bfloat16 on CUDA (bench/checks/gpu_check.py), with the machine's own torch.
python3 -m bench.checks.gpu_check --out "$out" "$@"
# State changes at scale on the GPU: a 3-round magnitude sparsify of every weight of the same
# 1.1 B model, per round time and peak memory (bench/scale_rehearsal.py).
python3 -m bench.scale_rehearsal --size 1b --dtype bfloat16 --rounds 3 --criterion magnitude \
    --out "$out"
# Export speed: the dense checkpoint of a 2-round magnitude and a 2-round wanda state of the same
# model, replayed on every CPU core and on the GPU (bench/export_speed.py; seconds per GB).
python3 -m bench.export_speed --size 1b --dtype bfloat16 --settings cpu,cuda --out "$out"
