#!/usr/bin/env bash
# Creates .venv with everything edgeq needs and installs edgeq into it (editable).
# Safe to rerun: pip does nothing when pyproject.toml has not changed since the last run, and the
# Debian packages are installed only when missing.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${EDGEQ_VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.edgeq-installed"
want=$(sha256sum pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # pip's notes about configured-but-absent local package folders are noise here (pipefail keeps its status).
  quiet() { grep -v "is ignored: it is neither a file nor a directory" || true; }
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip 2>&1 | quiet
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[test]" 2>&1 | quiet
  echo "$want" > "$stamp"
fi
# Cross compilers for the boards, and qemu for the emulated aarch64 board (Debian packages; skipped when present).
deploy/install-host-tools.sh
echo "edgeq is installed in $VENV (run it as $VENV/bin/edgeq)"
