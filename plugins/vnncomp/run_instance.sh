#!/usr/bin/env bash
# VNN-COMP: run an instance.
# Usage: run_instance.sh v1 CATEGORY ONNX VNNLIB RESULTS_FILE TIMEOUT
# Writes sat (with the checked counterexample), unsat, unknown, timeout or error to RESULTS_FILE.
set -uo pipefail
VERSION="${1:-}"
if [ "$VERSION" != "v1" ] || [ "$#" -ne 6 ]; then
  echo "usage: run_instance.sh v1 CATEGORY ONNX VNNLIB RESULTS_FILE TIMEOUT" >&2
  exit 1
fi
CATEGORY="$2"; ONNX="$3"; VNNLIB="$4"; RESULTS="$5"; TIMEOUT="$(echo "$6" | xargs)"
LIPVERIFY_BIN="$("$(dirname "${BASH_SOURCE[0]}")/lipverify_path.sh")" || {
  echo "error" > "$RESULTS"; exit 1; }
exec "$LIPVERIFY_BIN" vnncomp "$ONNX" "$VNNLIB" --timeout "$TIMEOUT" --out "$RESULTS" \
  --category "$CATEGORY"
