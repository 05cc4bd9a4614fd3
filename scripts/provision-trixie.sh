#!/usr/bin/env bash
# Provision Debian 13 ("trixie") NBD peers in a chroot tree, for the interop tests.
#
# Debian 12's peers (qemu 7.2, libnbd 1.14, nbdkit 1.32) do not speak the NBD extended
# headers extension; Debian 13's do (qemu 10, libnbd 1.22). The tests run both
# generations. This script builds a minbase trixie tree once (cached between runs:
# debootstrap takes 1-2 minutes and ~330 MB) and checks it on every later run.
#
# Usage: scripts/provision-trixie.sh [ROOT]   (default /var/cache/pynbd-trixie, or
#        $PYNBD_TRIXIE_ROOT). Needs root (or sudo). Exits non-zero if the tree cannot be
#        built: the tests fail loudly without their peers, they never skip.
#
# The mirror is read from the machine's own apt sources at run time (never hard-coded).
# The tree gets no mounts here: tests run chroot commands in a private mount namespace
# (tests/support/trixie.py) where /proc, /dev, /sys and /tmp are mounted and vanish with
# the process, so no bind mount can outlive a run or be deleted through.
set -euo pipefail

ROOT="${1:-${PYNBD_TRIXIE_ROOT:-/var/cache/pynbd-trixie}}"
SUITE=trixie
PACKAGES=(qemu-utils libnbd-bin python3-libnbd nbdkit fio python3 gnutls-bin procps file)
STAMP="$ROOT/.pynbd-provisioned"
# lock and log where a non-root user running through sudo can write them
SCRATCH="${TMPDIR:-/tmp}/$(basename "$ROOT")"
LOG="$SCRATCH.debootstrap.log"
WANT="suite=$SUITE packages=${PACKAGES[*]}"

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

log() { echo "== trixie peers: $*" >&2; }

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  log "cached in $ROOT"
  exit 0
fi

# the host mirror: first "URIs:" of a deb822 entry for a plain Debian suite, else the
# first "deb URI SUITE" line of sources.list
mirror() {
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    uri="$(awk '
      /^[[:space:]]*#/ {next}
      /^[[:space:]]*$/ {if (u != "" && s ~ /(^| )[a-z]+( |$)/) {print u; exit} u=""; s=""; next}
      tolower($1) == "uris:" {u=$2}
      tolower($1) == "suites:" {$1=""; s=$0}
      END {if (u != "" && s ~ /(^| )[a-z]+( |$)/) print u}
    ' "$f" | head -n1)"
    if [ -n "$uri" ]; then echo "$uri"; return 0; fi
  done
  if [ -f /etc/apt/sources.list ]; then
    uri="$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i !~ /^\[/) {print $i; exit}}' /etc/apt/sources.list)"
    if [ -n "$uri" ]; then echo "$uri"; return 0; fi
  fi
  return 1
}

# never delete a tree with something mounted in it (a live /dev bind would be wiped)
safe_remove() {
  local dir="$1"
  [ -e "$dir" ] || return 0
  local mounts
  mounts="$(findmnt -rno TARGET | awk -v d="$dir" 'index($0, d "/") == 1 || $0 == d')"
  if [ -n "$mounts" ]; then
    log "refusing to delete $dir: mounts inside it:"
    echo "$mounts" >&2
    exit 1
  fi
  $SUDO rm -rf --one-file-system "$dir"
}

if ! command -v debootstrap >/dev/null; then
  log "installing debootstrap"
  $SUDO apt-get -o DPkg::Lock::Timeout=900 update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends debootstrap
fi

MIRROR="$(mirror)" || { log "no Debian mirror found in /etc/apt/sources.list.d/*.sources"; exit 1; }

exec 9>"$SCRATCH.lock"
flock 9  # another worktree may be provisioning the same tree right now
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  log "cached in $ROOT (provisioned by a concurrent run)"
  exit 0
fi

start=$SECONDS
if [ -f "$ROOT/etc/debian_version" ] && [ -f "$ROOT/.pynbd-debootstrapped" ]; then
  # a finished tree with an older package list: add what is missing
  log "installing ${PACKAGES[*]} into $ROOT"
  $SUDO unshare --mount --propagation private sh -euc '
    root="$1"; shift
    mount -t proc proc "$root/proc"
    mount --bind /dev "$root/dev"
    mount -t sysfs sysfs "$root/sys"
    chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    chroot "$root" env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends "$@"
    chroot "$root" apt-get clean
  ' sh "$ROOT" "${PACKAGES[@]}"
else
  safe_remove "$ROOT"
  log "debootstrap $SUITE from $MIRROR into $ROOT (takes 1-2 minutes, once)"
  tmp="$ROOT.partial"
  safe_remove "$tmp"
  include="$(IFS=,; echo "${PACKAGES[*]}")"
  if ! $SUDO debootstrap --variant=minbase --include="$include" "$SUITE" "$tmp" "$MIRROR" \
      >"$LOG" 2>&1; then
    log "debootstrap failed; last lines of $LOG:"
    tail -n 30 "$LOG" >&2
    # debootstrap may leave /proc or /sys mounted in the partial tree
    for m in $(findmnt -rno TARGET | awk -v d="$tmp" 'index($0, d "/") == 1' | sort -r); do
      $SUDO umount -l "$m" || true
    done
    exit 1
  fi
  $SUDO chroot "$tmp" apt-get clean
  $SUDO touch "$tmp/.pynbd-debootstrapped"
  $SUDO mv "$tmp" "$ROOT"
fi

# every peer must run inside the tree before it is called provisioned
$SUDO unshare --mount --propagation private sh -euc '
  root="$1"
  mount -t proc proc "$root/proc"
  mount --bind /dev "$root/dev"
  chroot "$root" qemu-img --version | head -n1
  chroot "$root" nbdinfo --version | head -n1
  chroot "$root" nbdkit --version
  chroot "$root" fio --version
  chroot "$root" python3 -c "import nbd; print(\"python3-libnbd\", nbd.NBD().get_version())"
' sh "$ROOT" >&2
echo "$WANT" | $SUDO tee "$STAMP" >/dev/null
log "ready in $((SECONDS - start)) s"
