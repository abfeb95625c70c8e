#!/usr/bin/env bash
# VNN-COMP: prepare an instance. Usage: prepare_instance.sh v1 CATEGORY ONNX VNNLIB
# Checks that the network and property load and fit (which also warms the file caches). A
# problem is reported on stderr but the exit status stays 0: run_instance.sh then writes
# `error` to the result file with the same one-line reason.
set -uo pipefail
VERSION="${1:-}"
if [ "$VERSION" != "v1" ] || [ "$#" -ne 4 ]; then
  echo "usage: prepare_instance.sh v1 CATEGORY ONNX VNNLIB" >&2
  exit 1
fi
LIPVERIFY_BIN="$("$(dirname "${BASH_SOURCE[0]}")/lipverify_path.sh")" || exit 1
"$LIPVERIFY_BIN" vnncomp --prepare "$3" "$4" >&2 || \
  echo "prepare_instance.sh: $2: the instance will be reported as error" >&2
exit 0
