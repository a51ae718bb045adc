#!/usr/bin/env bash
# Set up (idempotent) and run the default test suite: everything except slow and GPU tests.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
.venv/bin/python -m ruff check -q src tests benchmarks scripts || { echo "error: lint failed (ruff)" >&2; exit 1; }
.venv/bin/python -m pytest -m "not slow and not gpu" "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
fi
exit "$status"
