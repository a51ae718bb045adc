#!/usr/bin/env bash
# The main job on the built-in sample model: set up, materialise SmolLM2-135M-Instruct,
# compress it, and chat with the factored checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
FACTORLM_SKIP_VLLM=${FACTORLM_SKIP_VLLM:-1} bash scripts/setup.sh
OUT=${OUT:-out/smollm2-factored}
KEEP=${KEEP:-0.9}
METHOD=${METHOD:-svd}
.venv/bin/factorlm sample-model
.venv/bin/factorlm compress sample --method "$METHOD" --keep "$KEEP" -o "$OUT" --overwrite
.venv/bin/factorlm generate "$OUT" --chat --prompt "What is the capital of France?" --max-new-tokens 48
