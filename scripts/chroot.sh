#!/usr/bin/env bash
# Makes the Debian trixie chroot that holds the newer peers the extended-header interop tests
# use (qemu-nbd, qemu-img and qemu-io 10.0; nbdinfo, nbdcopy and nbdsh from libnbd 1.22;
# nbdkit 1.42), in .chroot/trixie (gitignored), or reuses it when it is already there.
# The mirror is the one this machine's apt already uses, so no host name is written here.
# Prints the chroot's path. Needs root and debootstrap (installed when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
root=${NBD_TRIXIE_ROOT:-$PWD/.chroot/trixie}
packages=nbdkit,libnbd-bin,python3-libnbd,qemu-utils

if [ -x "$root/usr/bin/qemu-nbd" ] && [ -x "$root/usr/bin/nbdinfo" ] && [ -f "$root/.complete" ]; then
    echo "$root"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "the trixie chroot ($root) is missing and making it needs root" >&2
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
    echo "no Debian mirror found in apt's sources to make the trixie chroot from" >&2
    exit 1
fi
# Never through the bind mount of the host's /tmp that scripts/test.sh makes.
umount "$root/tmp" 2>/dev/null || true
rm -rf --one-file-system "$root"
mkdir -p "$(dirname "$root")"
echo "making the trixie chroot in $root (about two minutes)" >&2
debootstrap --variant=minbase --include="$packages" trixie "$root" "$mirror" >"$root.log" 2>&1 || {
    tail -20 "$root.log" >&2
    echo "debootstrap of trixie failed; its log is $root.log" >&2
    exit 1
}
touch "$root/.complete"
echo "$root"
