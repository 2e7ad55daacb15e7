#!/usr/bin/env bash
# Creates .venv with everything edgeq needs and installs edgeq into it (editable).
# Safe to rerun: pip does nothing when pyproject.toml has not changed since the last run, and the
# Debian packages are installed only when missing.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${EDGEQ_VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating the virtualenv $VENV with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.edgeq-installed"
want=$(sha256sum pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # what pyproject.toml asks for, so the next two quiet minutes are not a mystery
  deps=$("$VENV/bin/python" - <<'PY' 2>/dev/null || true
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
names = dict.fromkeys(re.split(r"[ ;=<>!~]", d, maxsplit=1)[0] for d in project["dependencies"])
print(", ".join(names))
PY
)
  echo "setup: installing edgeq (editable) and ${deps:-its dependencies} into $VENV; 1-3 min the first time"
  started=$SECONDS
  # pip's notes about configured-but-absent local package folders are noise here (pipefail keeps its status).
  quiet() { grep -v "is ignored: it is neither a file nor a directory" || true; }
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip 2>&1 | quiet
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[test]" 2>&1 | quiet
  echo "$want" > "$stamp"
  echo "setup: Python packages installed in $((SECONDS - started)) s"
else
  echo "setup: $VENV is up to date with pyproject.toml"
fi
echo "setup: checking the cross compilers and qemu (deploy/install-host-tools.sh)"
# Cross compilers for the boards, and qemu for the emulated aarch64 board (Debian packages; skipped when present).
deploy/install-host-tools.sh
echo "edgeq is installed in $VENV (run it as $VENV/bin/edgeq)"
