#!/usr/bin/env bash
# Builds (once) the emulated aarch64 board: a Debian bookworm arm64 sysroot with python3.11 and the aarch64 wheels
# of apache-tvm, numpy and friends, cached in ~/.cache/edgeq/emulated-board (or $EDGEQ_EMULATED_BOARD_DIR).
#   deploy/emulated/build-sysroot.sh [--force]
# Needs qemu-user, apt-get and dpkg (deploy/install-host-tools.sh) and network access to deb.debian.org and PyPI.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
exec "$PYTHON" -m edgeq.boards.emulated build "$@"
