#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): temper's SFT stage vs stock TRL on a random-init
# Llama-3-8B-shaped model, printing one JSON object; --cpu runs the same matrix on a tiny model.
# Uses $TEMPER_VENV (default the repo's venv); bounded to 8 minutes on one H100/H200.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TEMPER_VENV:-$HOME/.cache/temper/venv-py311}
PY=$VENV/bin/python
[ -x "$PY" ] || PY=python3
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec timeout "${GPU_CHECK_TIMEOUT:-470}" "$PY" bench/gpu_check.py "$@"
