#!/usr/bin/env bash
# VNN-COMP: install lipverify from this checkout (the Makefile's `install`: a venv in the repo).
# Usage: install_tool.sh v1
# PYTHON (the interpreter that creates the venv) and TORCH_SPEC pass through to make.
set -euo pipefail
VERSION="${1:-}"
if [ "$VERSION" != "v1" ]; then
  echo "install_tool.sh: expected version v1, got '$VERSION'" >&2
  exit 1
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
make -C "$REPO" install
"$("$(dirname "${BASH_SOURCE[0]}")/lipverify_path.sh")" --help >/dev/null
echo "lipverify installed in $REPO"
