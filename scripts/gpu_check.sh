#!/usr/bin/env bash
# The GPU checks in one run, for a machine with a CUDA GPU and torch/transformers installed
# (no registry needed): the gpu-marked tests, then the CUDA decode benchmark (bf16, static
# KV cache, CUDA graphs, CUDA-event timing) on random-weight pairs of published shapes, and a
# timed `compress --device cuda` (svd, bf16) of a random-weight Llama-3.2-1B-shape source.
# Results land in benchmarks/results/offline_<gpu>-<shape>-keep<k>.{json,md} and, when OUT
# is set, are copied there too with the test log.
#
#   bash scripts/gpu_check.sh                      # defaults below
#   SHAPES="llama-3.1-8b" KEEPS="0.5" BATCHES=1,16 bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
SHAPES=${SHAPES:-"llama-3.2-1b smollm2-135m"}
KEEPS=${KEEPS:-0.5}
BATCHES=${BATCHES:-1,16}
LOG=${OUT:-/tmp}/gpu_check.log
status=0

"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1 | tee "$LOG"
"$PY" -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee -a "$LOG" || status=1
for shape in $SHAPES; do
  "$PY" benchmarks/bench_offline.py --model "synthetic:$shape" --device cuda --engines torch --keep $KEEPS \
    --batch "$BATCHES" --prompt-tokens 128 --new-tokens 128 --repeats 5 --memory off 2>&1 | grep -v '^{' \
    | tee -a "$LOG" || status=1
done
"$PY" benchmarks/bench_scale.py --shape "${COMPRESS_SHAPE:-llama-3.2-1b}" --method svd --device cuda \
  --threads 4 2>&1 | tee -a "$LOG" || status=1
if [ -n "${OUT:-}" ]; then
  cp benchmarks/results/offline_nvidia-* benchmarks/results/scale_cuda-* "$OUT/" 2>/dev/null || true
fi
exit $status
