#!/usr/bin/env bash
# Set up everything chainfs needs on a fresh Debian machine: system packages
# (when missing), a virtualenv in .venv, and the package with all its extras.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

SYSTEM_PACKAGES=(fuse3 libfuse3-dev pkg-config etcd-server etcd-client postgresql iperf3 fio stress-ng rsync iproute2 git chromium chromium-driver)
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${CHAINFS_TORCH_VERSION:-2.13.0}

missing=()
for pkg in "${SYSTEM_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  cmd="apt-get install -y --no-install-recommends ${missing[*]}"
  if [ "$(id -u)" = 0 ]; then
    echo "bootstrap: installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -q --no-install-recommends "${missing[@]}"
  else
    echo "bootstrap: missing system packages; run as root:" >&2
    echo "  sudo apt-get update && sudo $cmd" >&2
    exit 1
  fi
fi

# The etcd package starts a system etcd on 2379; tests start their own on
# ephemeral ports, so the system one is stopped rather than left listening.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
  systemctl stop etcd || true
fi
# Likewise the postgresql package's cluster on 5432: chainfs.local.postgres
# starts its own servers (binaries from /usr/lib/postgresql/*/bin).
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet postgresql 2>/dev/null; then
  systemctl stop postgresql || true
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.chainfs-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ deploy/bootstrap.sh -nt "$stamp" ]; then
  "$VENV/bin/pip" install -q --upgrade pip
  # torch first, pinned to the CPU build this environment provides, so the
  # torch extra does not pull a multi-GB CUDA build.
  "$VENV/bin/pip" install -q "torch==$TORCH_VERSION"
  "$VENV/bin/pip" install -q -e ".[all,dev]"
  touch "$stamp"
fi
echo "bootstrap: ready ($VENV)"
