#!/usr/bin/env bash
# Run this ON THE BOARD (Raspberry Pi 4/5 with a 64-bit OS, or any aarch64 Linux with Python >= 3.9).
# It installs the TVM runtime into a virtualenv and starts the TVM RPC server that edgeq talks to.
#
#   ./board-setup.sh --tracker 192.168.1.10:9190 --key rasp4 --host 192.168.1.23   # register with a tracker
#   ./board-setup.sh --port 9090                        # serve on 127.0.0.1:9090 (reach it through an ssh tunnel)
#   sudo ./board-setup.sh --tracker ... --key rasp4 --host ... --install-service   # keep it running (systemd)
#
# Options:
#   --host ADDR        address the server binds to (default 127.0.0.1). The TVM RPC server runs any code it is
#                      sent: bind it to a trusted LAN address only, never to a public network.
#   --port N           first port to try (default 9090; the next free one of the 100 after it is taken)
#   --tracker H:P      register with this RPC tracker (needs --key; clients then use --rpc-tracker H:P --rpc-key KEY)
#   --key KEY          the board's key at the tracker (default: rasp4 on aarch64, rasp4-32 on armv7)
#   --venv DIR         where to install (default ~/edgeq-board/venv)
#   --tvm-version V    pip requirement for apache-tvm (default "==0.27.*": must match the build machine's)
#   --install-service  install and start deploy/edgeq-rpc.service (run with sudo) instead of serving in foreground
#   --no-start         install only
set -euo pipefail

HOST=127.0.0.1
PORT=9090
TRACKER=""
KEY=""
VENV="${HOME}/edgeq-board/venv"
TVM_VERSION="==0.27.*"
SERVICE=0
START=1
HERE="$(cd "$(dirname "$0")" && pwd)"

while [ $# -gt 0 ]; do
  case "$1" in
    --host) HOST="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --tracker) TRACKER="$2"; shift 2 ;;
    --key) KEY="$2"; shift 2 ;;
    --venv) VENV="$2"; shift 2 ;;
    --tvm-version) TVM_VERSION="$2"; shift 2 ;;
    --install-service) SERVICE=1; shift ;;
    --no-start) START=0; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "board-setup: unknown option $1" >&2; exit 2 ;;
  esac
done

MACHINE="$(uname -m)"
case "$MACHINE" in
  aarch64|arm64) DEFAULT_KEY=rasp4 ;;
  armv7l|armv8l) DEFAULT_KEY=rasp4-32 ;;
  *) DEFAULT_KEY="$MACHINE" ;;
esac
KEY="${KEY:-$DEFAULT_KEY}"

if [ "$SERVICE" = 1 ] && [ -n "${SUDO_USER:-}" ]; then
  RUN_USER="$SUDO_USER"
  VENV="${VENV/#$HOME/$(getent passwd "$RUN_USER" | cut -d: -f6)}"
else
  RUN_USER="$(id -un)"
fi

# 1. Python and a virtualenv
if ! command -v python3 >/dev/null; then
  echo "board-setup: python3 missing; on Raspberry Pi OS: sudo apt-get install -y python3 python3-venv python3-pip" >&2
  exit 1
fi
if ! python3 -c "import sys; sys.exit(sys.version_info < (3, 9))"; then
  echo "board-setup: apache-tvm 0.27 needs Python >= 3.9 (this is $(python3 -V))" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  if ! python3 -m venv "$VENV" 2>/dev/null; then
    echo "board-setup: cannot create a virtualenv; install it with: sudo apt-get install -y python3-venv" >&2
    exit 1
  fi
fi
if [ "$SERVICE" = 1 ] && [ "$RUN_USER" != "$(id -un)" ]; then
  chown -R "$RUN_USER" "$(dirname "$VENV")"
fi
PY="$VENV/bin/python"

# 2. TVM runtime, numpy, and what the RPC server needs (cloudpickle for its worker, psutil for timing)
if ! "$PY" -c "import tvm" 2>/dev/null; then
  case "$MACHINE" in
    aarch64|arm64|x86_64)
      "$PY" -m pip install --quiet --upgrade pip
      "$PY" -m pip install --quiet "apache-tvm${TVM_VERSION}" numpy cloudpickle psutil
      ;;
    *)
      cat >&2 <<MSG
board-setup: PyPI has no apache-tvm wheel for $MACHINE. Build the TVM 0.27 runtime on the board:
  sudo apt-get install -y cmake g++ git python3-numpy
  git clone --recursive --branch v0.27.0 https://github.com/apache/tvm ~/tvm && cd ~/tvm
  mkdir -p build && cp cmake/config.cmake build/ && cd build
  cmake .. -DUSE_LLVM=OFF -DUSE_RPC=ON && make -j4 runtime
  $PY -m pip install -e ~/tvm/python cloudpickle psutil   # with TVM_LIBRARY_PATH=~/tvm/build
then rerun this script.
MSG
      exit 1
      ;;
  esac
fi
"$PY" -c "import tvm, numpy, cloudpickle; print('board-setup: TVM', tvm.__version__, 'numpy', numpy.__version__)"

ARGS="--host $HOST --port $PORT --port-end $((PORT + 100))"
if [ -n "$TRACKER" ]; then
  ARGS="$ARGS --tracker $TRACKER --key $KEY"
  if [ "$HOST" != "127.0.0.1" ] && [ "$HOST" != "0.0.0.0" ]; then
    ARGS="$ARGS --custom-addr $HOST"   # the address the tracker hands to clients
  fi
fi

# 3. Serve: as a systemd service, or in the foreground
if [ "$SERVICE" = 1 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "board-setup: --install-service needs root (sudo)" >&2
    exit 1
  fi
  printf 'EDGEQ_RPC_ARGS="%s"\n' "$ARGS" > /etc/default/edgeq-rpc
  sed -e "s|@USER@|$RUN_USER|g" -e "s|@PYTHON@|$PY|g" "$HERE/edgeq-rpc.service" > /etc/systemd/system/edgeq-rpc.service
  systemctl daemon-reload
  systemctl enable --now edgeq-rpc.service
  systemctl --no-pager status edgeq-rpc.service | head -5
  echo "board-setup: edgeq-rpc.service runs: $PY -m tvm.exec.rpc_server $ARGS"
elif [ "$START" = 1 ]; then
  echo "board-setup: starting $PY -m tvm.exec.rpc_server $ARGS (Ctrl-C stops it)"
  # shellcheck disable=SC2086
  exec "$PY" -m tvm.exec.rpc_server $ARGS
fi
