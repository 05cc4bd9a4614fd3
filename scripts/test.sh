#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian machine, then run every test.
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(
  python3 python3-venv python3-dev gcc
  nbdkit nbdkit-plugin-python qemu-utils libnbd-bin python3-libnbd nbd-server fio gnutls-bin
  ceph-mon ceph-osd ceph-common python3-rados python3-rbd
  systemd
)
# pynbd fuse (tests/fuse): libfuse 3 + fusermount3, and mkfs.ext4/e2fsck for the tests
DEBIAN_PACKAGES+=(fuse3 e2fsprogs)

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
missing=()
for p in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "== installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# --- Debian 13 ("trixie") NBD peers: qemu 10, libnbd 1.22, nbdkit 1.42, fio 3.39 ------
# Built once into a cached chroot tree (~70 s, ~330 MB), checked in well under a second
# afterwards; a tree that cannot be built fails the run here (the tests never skip).
echo "== Debian 13 peers"
trixie_start=$SECONDS
scripts/provision-trixie.sh
echo "== Debian 13 peers ready in $((SECONDS - trixie_start)) s"
# --- end of Debian 13 peers ---------------------------------------------------------

# Debian's python3-libnbd / python3-rbd are built for /usr/bin/python3: use a venv made
# from it that sees the system site-packages.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import nbd, rbd' 2>/dev/null; then
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'

echo "== ruff"
.venv/bin/ruff check src tests bench
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
exec .venv/bin/python -m pytest "$@"
