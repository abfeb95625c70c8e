#!/usr/bin/env bash
# Print the lipverify console script to run: LIPVERIFY if set, else the one `make install`
# put in the checkout's venv (VENV, default .venv), else the one on PATH.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV_DIR="${VENV:-.venv}"
case "$VENV_DIR" in /*) ;; *) VENV_DIR="$REPO/$VENV_DIR" ;; esac
if [ -n "${LIPVERIFY:-}" ]; then
  echo "$LIPVERIFY"
elif [ -x "$VENV_DIR/bin/lipverify" ]; then
  echo "$VENV_DIR/bin/lipverify"
elif command -v lipverify >/dev/null 2>&1; then
  command -v lipverify
else
  echo "lipverify is not installed: run install_tool.sh v1" >&2
  exit 1
fi
