#!/usr/bin/env bash
# Creates (or refreshes) the project virtualenv outside the clone, so CI runs on the same
# machine reuse the ~6 GB of wheels. Never depended on: a missing or stale venv is rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TEMPER_VENV:-$HOME/.cache/temper/venv-py311}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
want=$(cat pyproject.toml hack/pyproject.toml | sha256sum | cut -c1-16)
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
  echo "[setup-venv] creating $VENV with $PYTHON" >&2
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
if [ "$(cat "$VENV/.temper-deps" 2>/dev/null)" != "$want" ]; then
  echo "[setup-venv] installing dependencies (first time: several minutes, torch is ~3 GB)" >&2
  "$VENV/bin/python" -m pip install -q --progress-bar off -e ".[dev]"
  "$VENV/bin/python" -m pip install -q --no-deps -e hack
  echo "$want" > "$VENV/.temper-deps"
else
  # Deps are current; only point the editable install at this checkout.
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null \
    || "$VENV/bin/python" -m pip install -q --no-deps -e .
  # The dev harness is its own distribution, so the product wheel never contains it.
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e hack 2>/dev/null \
    || "$VENV/bin/python" -m pip install -q --no-deps -e hack
fi
echo "$VENV"
