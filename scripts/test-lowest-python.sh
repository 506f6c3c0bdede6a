#!/usr/bin/env bash
# The lowest Python pyproject.toml admits (3.10: the NVIDIA image's Ubuntu 22.04 runs it) runs the
# server's tests that need no torch (the CPU build of torch on these machines is for 3.11 only):
# scheduler, request lease, tenants, limits, wire format and decoding, the auth table.
# CI (.ci/run) calls it; it fails when no Python 3.10 can be found, rather than skip the claim.
set -euo pipefail
cd "$(dirname "$0")/.."
# a pyenv install first (pyenv's python3.10 shim on PATH fails unless 3.10 is selected), then PATH
py=""
for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.10*/bin/python3.10 "$(command -v python3.10 || true)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null; then
        py=$candidate; break
    fi
done
if [ -z "$py" ]; then
    echo "test-lowest-python: no python3.10 found (PATH or pyenv): the >=3.10 claim is unproven" >&2
    exit 1
fi
venv=${CLCE_VENV310:-.venv310}
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet ".[server]" pytest pytest-timeout hypothesis psutil cryptography pyyaml
"$venv/bin/python" -m pytest -q -p no:cacheprovider \
    tests/rails/test_scheduler.py tests/rails/test_lease.py tests/rails/test_tenants.py tests/rails/test_limits.py \
    tests/rails/test_tenants_admin_key.py tests/wire/test_protocol.py tests/wire/test_fastpath.py \
    tests/wire/test_decode_hostile.py tests/rails/test_auth_table.py
