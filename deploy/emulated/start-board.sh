#!/usr/bin/env bash
# Runs the emulated aarch64 board (the real aarch64 TVM RPC server under qemu-aarch64) on loopback until Ctrl-C.
#   deploy/emulated/start-board.sh                          # a free port on 127.0.0.1; prints {"rpc": "127.0.0.1:PORT", ...}
#   deploy/emulated/start-board.sh --port 9090
#   deploy/emulated/start-board.sh --tracker 127.0.0.1:9190 --key rasp4   # register with a local tracker
#   deploy/emulated/start-board.sh --full-tvm               # load TVM's compiler library too (starts in ~40 s, not ~15-20 s)
# Then, e.g.: python -c "from edgeq.boards.session import connect; print(connect(rpc='127.0.0.1:PORT').info())"
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
exec "$PYTHON" -m edgeq.boards.emulated start "$@"
