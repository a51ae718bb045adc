#!/usr/bin/env bash
# The main job on the built-in sample model: set up, materialise SmolLM2-135M-Instruct,
# compress it (SAES-SVD, greedy rank allocation, calibrated on the built-in text), and chat
# with the factored checkpoint. Override with METHOD=, ALLOCATION=, KEEP=, OUT=, EXTRA=.
set -euo pipefail
cd "$(dirname "$0")/.."
FACTORLM_SKIP_VLLM=${FACTORLM_SKIP_VLLM:-1} bash scripts/setup.sh
OUT=${OUT:-out/smollm2-factored}
KEEP=${KEEP:-0.9}
METHOD=${METHOD:-saes}
ALLOCATION=${ALLOCATION:-greedy}
.venv/bin/factorlm sample-model
# shellcheck disable=SC2086
.venv/bin/factorlm compress sample --method "$METHOD" --allocation "$ALLOCATION" --keep "$KEEP" \
  --calib sample --calib-samples 16 --calib-len 256 -o "$OUT" --overwrite ${EXTRA:-}
.venv/bin/factorlm inspect "$OUT" | tail -n 8
.venv/bin/factorlm generate "$OUT" --chat --prompt "What is the capital of France?" --max-new-tokens 48
