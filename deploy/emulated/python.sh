#!/usr/bin/env bash
# Runs the emulated board's aarch64 Python (under qemu-aarch64) with the given arguments, e.g.
#   deploy/emulated/python.sh -c "import platform, tvm; print(platform.machine(), tvm.__version__)"
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
exec "$PYTHON" -m edgeq.boards.emulated python "$@"
