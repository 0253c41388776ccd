#!/usr/bin/env bash
# Makes a Debian chroot of newer peers, or reuses it when it is already there:
#
#   scripts/chroot.sh          trixie, in .chroot/trixie (or NBD_TRIXIE_ROOT): qemu-nbd,
#                              qemu-img and qemu-io 10.0; nbdinfo, nbdcopy and nbdsh from libnbd
#                              1.22; nbdkit 1.42. The extended-header interop tests use it.
#   scripts/chroot.sh sid      sid, in .chroot/sid: libnbd 1.24 (nbdcopy --blkhash, nbdzero,
#                              nbddiscard) and nbdkit 1.48. Not needed by the tests: the blkhash
#                              known answers in Tests/InteropTests/BlockHashTests.swift were
#                              computed with its nbdcopy.
#
# The mirror is the one this machine's apt already uses, so no host name is written here.
# .chroot is gitignored. Prints the chroot's path. Needs root and debootstrap (installed when
# missing).
set -euo pipefail
cd "$(dirname "$0")/.."
suite=${1:-trixie}
case "$suite" in
trixie)
    root=${NBD_TRIXIE_ROOT:-$PWD/.chroot/trixie}
    packages=nbdkit,libnbd-bin,python3-libnbd,qemu-utils
    check=usr/bin/qemu-nbd
    ;;
sid)
    root=$PWD/.chroot/sid
    packages=nbdkit,libnbd-bin
    check=usr/bin/nbdcopy
    ;;
*)
    echo "usage: scripts/chroot.sh [trixie|sid]" >&2
    exit 2
    ;;
esac

if [ -x "$root/$check" ] && [ -x "$root/usr/bin/nbdinfo" ] && [ -f "$root/.complete" ]; then
    echo "$root"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "the $suite chroot ($root) is missing and making it needs root" >&2
    exit 1
fi
command -v debootstrap >/dev/null 2>&1 || {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null
}
# The first URIs line of apt's deb822 sources, or the first deb line of sources.list.
mirror=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
if [ -z "$mirror" ]; then
    mirror=$(awk '/^deb / { print $2; exit }' /etc/apt/sources.list 2>/dev/null || true)
fi
if [ -z "$mirror" ]; then
    echo "no Debian mirror found in apt's sources to make the $suite chroot from" >&2
    exit 1
fi
# Never through a bind mount of the host's /tmp (older versions of scripts/test.sh made one).
umount "$root/tmp" 2>/dev/null || true
rm -rf --one-file-system "$root"
mkdir -p "$(dirname "$root")"
echo "making the $suite chroot in $root (about a minute or two)" >&2
debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$mirror" >"$root.log" 2>&1 || {
    tail -20 "$root.log" >&2
    echo "debootstrap of $suite failed; its log is $root.log" >&2
    exit 1
}
touch "$root/.complete"
echo "$root"
