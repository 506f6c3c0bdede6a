#!/usr/bin/env bash
# Builds docker/Dockerfile.cpu and proves the image serves: the container answers /readyz, the
# README's curl example as the README prints it, and the key-less metrics listener
# (scripts/check-served.py). CI runs it.
#
#   scripts/build-image.sh            # build clce:cpu, run it on loopback, check it, remove it
#
# It works on a bare Debian machine as well as on one with Docker already set up:
# - a Docker daemon is started if none answers, and only a daemon it started is stopped again;
# - the Dockerfile's base (debian:bookworm-slim) is pulled if a registry answers, else made with
#   debootstrap from the Debian mirror apt already uses, and imported under that tag;
# - the machine's locally added CA certificates go into such a base, so apt and pip inside the
#   build trust the same TLS interception the host does.
# The docker CLI from Debian's docker.io is preferred: it builds `RUN --mount` with
# DOCKER_BUILDKIT=1 without a buildx plugin, which some other CLIs need.
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=${CLCE_IMAGE_TAG:-clce:cpu}
BASE=debian:bookworm-slim
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
work=$(mktemp -d)
started_daemon=""
container=""

log() { printf '[build-image] %s\n' "$*" >&2; }

cleanup() {
    local rc=$?
    if [ -n "$container" ]; then
        if [ "$rc" != 0 ]; then log "container log:"; "$DOCKER" logs "$container" 2>&1 | tail -40 >&2 || true; fi
        "$DOCKER" rm -f "$container" >/dev/null 2>&1 || true
    fi
    if [ -n "$started_daemon" ]; then
        log "stopping the Docker daemon this script started (pid $started_daemon)"
        $SUDO kill "$started_daemon" 2>/dev/null || true
        for _ in $(seq 1 50); do $SUDO kill -0 "$started_daemon" 2>/dev/null || break; sleep 0.2; done
    fi
    $SUDO rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT

# --- Docker: the CLI and a daemon ---------------------------------------------------------------
if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1; then
    log "installing Debian's docker.io"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends docker.io
fi
if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER=$(command -v docker); fi
export DOCKER_BUILDKIT=1

if ! $SUDO "$DOCKER" info >/dev/null 2>&1; then
    log "no Docker daemon answers: starting one"
    $SUDO dockerd >"$work/dockerd.log" 2>&1 &
    started_daemon=$!
    for _ in $(seq 1 150); do
        $SUDO "$DOCKER" info >/dev/null 2>&1 && break
        if ! $SUDO kill -0 "$started_daemon" 2>/dev/null; then cat "$work/dockerd.log" >&2; exit 1; fi
        sleep 0.2
    done
    $SUDO "$DOCKER" info >/dev/null 2>&1 || { log "dockerd did not answer"; tail -20 "$work/dockerd.log" >&2; exit 1; }
fi
if [ -n "$SUDO" ]; then DOCKER="$SUDO $DOCKER"; fi

# --- The base image ------------------------------------------------------------------------------
debian_mirror() {
    # the first Debian archive URI apt is configured with (deb822 or one-line format)
    local uri
    uri=$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -1 || true)
    if [ -z "$uri" ]; then
        uri=$(grep -hE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
              | grep -v security | awk '{print $2}' | head -1 || true)
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

make_base() {
    command -v debootstrap >/dev/null 2>&1 || {
        $SUDO apt-get update -q
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends debootstrap
    }
    local mirror root="$work/rootfs"
    mirror=$(debian_mirror)
    log "making $BASE with debootstrap from $mirror"
    $SUDO debootstrap --variant=minbase bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 \
        || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
    # what a registry's slim image also drops: apt lists and caches
    $SUDO rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
    local changes=()
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        $SUDO mkdir -p "$root/usr/local/share/ca-certificates"
        $SUDO cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
        # The image installs ca-certificates, which folds these into the system bundle; pip reads
        # that bundle only when told to (its own is certifi's).
        changes+=(--change "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt")
    fi
    $SUDO tar -C "$root" -c . | $DOCKER import "${changes[@]}" --change 'CMD ["bash"]' - "$BASE" >/dev/null
}

if $DOCKER image inspect "$BASE" >/dev/null 2>&1; then
    log "$BASE is present"
elif timeout 60 $DOCKER pull -q "$BASE" >/dev/null 2>&1; then
    log "pulled $BASE"
else
    t0=$(date +%s)
    make_base
    log "made $BASE in $(( $(date +%s) - t0 )) s"
fi

# --- Build, run, check ---------------------------------------------------------------------------
t0=$(date +%s)
log "building $TAG from docker/Dockerfile.cpu"
$DOCKER build -q -f docker/Dockerfile.cpu -t "$TAG" . >/dev/null
log "built in $(( $(date +%s) - t0 )) s"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
metrics_port=$(free_port)
container=$($DOCKER run -d -p "127.0.0.1:$port:8000" -p "127.0.0.1:$metrics_port:9464" \
    -e CLCE_METRICS_BIND=0.0.0.0:9464 "$TAG")
python3 scripts/check-served.py --url "http://127.0.0.1:$port" --wait 180 \
    --metrics "http://127.0.0.1:$metrics_port"
echo "image $TAG: built, ready, the README's example exact, metrics served"
