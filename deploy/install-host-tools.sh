#!/usr/bin/env bash
# Installs what the build machine (Debian/Ubuntu) needs to cross-compile for the boards and to run the emulated
# aarch64 board. Idempotent: installs only missing packages, and does nothing when all are present.
#
#   deploy/install-host-tools.sh                   # the Debian packages
#   deploy/install-host-tools.sh --emulated-board  # ... and build the emulated board's sysroot (~450 MB, 1-2 min)
#
# Packages:
#   gcc-aarch64-linux-gnu, libc6-dev-arm64-cross    link libraries for aarch64 boards (rasp4, rasp5, Jetson, Mali)
#   gcc-arm-linux-gnueabihf, libc6-dev-armhf-cross  link libraries for 32-bit ARM hard-float boards (rasp4-32)
#   qemu-user                                       qemu-aarch64, which runs the emulated board
#   file                                            tells which architecture a library is for
#   debian-archive-keyring                          verifies the arm64 packages fetched for the emulated board
#   llvm                                            llvm-mca, which predicts the ARM kernels' cycles (bench/arm_mca.py)
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  gcc-aarch64-linux-gnu libc6-dev-arm64-cross
  gcc-arm-linux-gnueabihf libc6-dev-armhf-cross
  qemu-user file debian-archive-keyring
  llvm
)

if ! command -v dpkg-query >/dev/null || ! command -v apt-get >/dev/null; then
  echo "install-host-tools: this script needs a Debian or Ubuntu machine (apt-get, dpkg)" >&2
  exit 1
fi

missing=()
for package in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done

if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
  fi
  echo "install-host-tools: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "install-host-tools: all packages present"
fi

if [ "${1:-}" = "--emulated-board" ]; then
  PYTHON=${PYTHON:-.venv/bin/python}
  "$PYTHON" -m edgeq.boards.emulated build
fi
