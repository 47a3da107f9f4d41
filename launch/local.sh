#!/usr/bin/env bash
# One process on this machine's devices (all local GPUs/TPU chips, or the CPU).
#
#   launch/local.sh --config=configs/default.py --workdir=runs/default [--config.FIELD=VALUE ...]
#
# Runs `python -m research.main ARGS` from the repository root with .venv's Python
# (or $PYTHON), and exits with its status.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "error: launch/local.sh needs Python: '$PYTHON' was not found. Run 'make test' once to" \
       "create .venv, or set PYTHON=/path/to/python." >&2
  exit 2
fi
exec "$PYTHON" -m research.main "$@"
