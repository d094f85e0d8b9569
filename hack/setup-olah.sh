#!/usr/bin/env bash
# A private virtualenv for olah, the self-hosted Hugging Face Hub mirror the hub tests serve
# models from. olah pulls fastapi, uvicorn, gitpython...: kept apart from the trainer's venv.
# Cached outside the clone; rebuilt only when the pinned version changes.
set -euo pipefail
OLAH_VERSION=0.5.4
VENV=${TEMPER_OLAH_VENV:-$HOME/.cache/temper/olah-venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ "$(cat "$VENV/.temper-olah" 2>/dev/null)" != "$OLAH_VERSION" ]; then
  echo "[setup-olah] installing olah==$OLAH_VERSION into $VENV" >&2
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --progress-bar off "olah==$OLAH_VERSION"
  echo "$OLAH_VERSION" > "$VENV/.temper-olah"
fi
echo "$VENV"
