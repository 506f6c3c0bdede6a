#!/usr/bin/env bash
# Installs clce on a fresh Debian or Ubuntu machine. The README, CI (.ci/run) and the Docker
# images all install through this one script, so the README's commands are always proven.
#
#   scripts/setup.sh server   # OpenCL runtime (Debian's PoCL CPU device) + clce[server] into .venv
#   scripts/setup.sh dev      # the above + torch (CPU build) and the test/bench tools
#   scripts/setup.sh system   # only the Debian packages (used by the Docker images)
#
# CLCE_VENV picks the virtual environment (default .venv; "none" installs into the current python).
set -euo pipefail
mode=${1:-server}
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

install_system() {
    # pocl-opencl-icd: the CPU OpenCL device. The PoCL bundled in pyopencl's wheel fails on some
    # CPUs ("unknown target CPU 'generic'"), Debian's works. ocl-icd-libopencl1 is the ICD loader.
    # dev adds chromium: the status page is tested in a real headless browser; haproxy and
    # prometheus (promtool): the compose stack's configs are checked by the real parsers; oclgrind:
    # the kernels run on a simulated device that reports races and uninitialised reads.
    local extra=""
    if [ "$mode" = dev ]; then extra="chromium haproxy prometheus oclgrind"; fi
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends \
        python3 python3-venv python3-pip ocl-icd-libopencl1 pocl-opencl-icd clinfo ca-certificates $extra
}

case "$mode" in
    system) install_system; exit 0 ;;
    server|dev) ;;
    *) echo "usage: $0 server|dev|system" >&2; exit 2 ;;
esac

if [ "${CLCE_SKIP_APT:-0}" != 1 ]; then install_system; fi

venv=${CLCE_VENV:-.venv}
if [ "$venv" = none ]; then
    py=python3
else
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    py="$venv/bin/python"
fi
"$py" -m pip install --upgrade --quiet pip

if [ "$mode" = server ]; then
    "$py" -m pip install --quiet ".[server]"
else
    # torch first, pinned to the CPU build: a bare `pip install torch` pulls a multi-GB CUDA build.
    "$py" -m pip install --quiet "torch==${CLCE_TORCH_VERSION:-2.13.0}"
    "$py" -m pip install --quiet -e ".[dev]"
fi
"$py" -c "import clce_server.rails.device as d; print(d.describe_devices())" || true
