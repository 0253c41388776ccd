#!/usr/bin/env bash
# The whole test suite, with its set-up: installs the real NBD peers the interop tests need
# when they are missing (Debian's packages, as root), says what to install when it cannot,
# then runs every test, one suite at a time. Extra arguments go to `swift test`
# (for example: scripts/test.sh --filter BackToBack).
#
#   scripts/test.sh --under-load [ARGS]   the tests step alone (every suite; not format, docs,
#                                         fuzz, TSan) with two CPU-bound processes beside it for
#                                         the whole run: what a loaded CI machine looks like.
set -euo pipefail
cd "$(dirname "$0")/.."

under_load=""
if [ "${1:-}" = "--under-load" ]; then
    under_load=yes
    shift
fi

# Each step prints a heading; a failing run ends with a line naming the step that failed, so
# that CI's log can be read from its tail.
current=""
step() {
    current=$1
    echo "=== step: $current ($(date -u +%H:%M:%S))"
}
# The load of --under-load, and the fuzzing begun beside the tests (a process group of its
# own: the fuzzers too), end with the run, however it ends.
load=()
groups=()
finish() {
    status=$?
    if [ ${#load[@]} -gt 0 ]; then kill "${load[@]}" 2>/dev/null || true; fi
    for group in "${groups[@]}"; do kill -- "-$group" 2>/dev/null || true; done
    if [ $status -ne 0 ] && [ -n "$current" ]; then echo "FAILED step: $current (exit $status)"; fi
}
trap finish EXIT

step "install the test peers"

# The peers, by the command each package gives.
declare -A packages=(
    [nbdkit]=nbdkit [qemu-nbd]=qemu-utils [nbd-server]=nbd-server
    [nbdinfo]=libnbd-bin [nbdsh]=python3-libnbd [socat]=socat [strace]=strace [ip]=iproute2
)
missing=()
for command in "${!packages[@]}"; do
    command -v "$command" >/dev/null 2>&1 || missing+=("${packages[$command]}")
done
# nbdsh needs the Python bindings too, which a command check does not see.
/usr/bin/python3 -c 'import nbd' 2>/dev/null || missing+=(python3-libnbd)

if [ ${#missing[@]} -gt 0 ]; then
    wanted=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing the test peers: $wanted"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # shellcheck disable=SC2086
        apt-get install -y -qq $wanted >/dev/null
    else
        echo "the interop tests need these Debian packages: $wanted" >&2
        echo "install them (as root: apt-get install $wanted) and run this again" >&2
        exit 1
    fi
fi

# The newer peers that speak extended headers (qemu 10, libnbd 1.22) live in a Debian trixie
# chroot, made once (about a minute) and reused. Each tool started there sees the host's /tmp
# through a bind mount in a mount namespace of its own (Tests/InteropTests/ServerProcess.swift),
# which ends with the tool: no mount outlives a run, however it ends. It is made while the
# tests are built: its time is downloads and unpacking.
step "build (and the trixie chroot beside it)"
if [ -n "$under_load" ]; then
    for _ in 1 2; do
        # Busy, and never ending on its own; killed by the trap.
        sh -c 'while :; do :; done' &
        load+=($!)
    done
    echo "under load: two CPU-bound processes (${load[*]}) run beside the build and the tests"
fi
chroot_log=$(mktemp)
# At the lowest priority: its unpacking takes the processor time the build leaves. Not under
# load: the busy loops would leave it none (a fresh clone's first run waited on it for half
# an hour after its build was done), and the load stands for other people's work, not ours.
chroot_priority=19
[ -z "$under_load" ] || chroot_priority=0
nice -n "$chroot_priority" scripts/chroot.sh >"$chroot_log" 2>&1 &
chroot_maker=$!
swift build --build-tests
if ! wait "$chroot_maker"; then
    cat "$chroot_log" >&2
    rm -f "$chroot_log"
    current="the trixie chroot"
    exit 1
fi
NBD_TRIXIE_ROOT=$(tail -1 "$chroot_log")
export NBD_TRIXIE_ROOT
rm -f "$chroot_log"

# The whole run (no arguments, no load) fuzzes every parser of a peer's bytes for 30 s each
# while the tests run, at the lowest priority: it takes only the time the tests leave idle
# (they wait on servers more than they compute), in a build folder of its own.
fuzzing=""
if [ $# -eq 0 ] && [ -z "$under_load" ]; then
    mkdir -p .build-fuzz
    setsid nice -n 19 scripts/fuzz.sh --all 30 >.build-fuzz/all.log 2>&1 &
    fuzzing=$!
    groups+=("$fuzzing")
fi

# One suite at a time: dozens of real servers started at once would starve a small machine.
step "tests"
swift test --skip-build --no-parallel "$@"
if [ -n "$under_load" ]; then
    current=""
    echo "=== the tests passed under load"
    exit 0
fi

# The whole run also checks the formatting, builds the documentation (warnings being errors),
# and runs the unit tests under TSan.
if [ $# -eq 0 ]; then
    step "fuzz (begun beside the tests)"
    status=0
    wait "$fuzzing" || status=$?
    groups=()
    cat .build-fuzz/all.log
    [ "$status" -eq 0 ] || exit "$status"
    step "format"
    swift format lint --strict -r Sources Tests Snippets Fuzz Package.swift
    long=$(git ls-files '*.swift' | xargs awk 'length > 140 { print FILENAME ":" FNR }')
    if [ -n "$long" ]; then
        echo "lines over 140 characters:" >&2
        echo "$long" >&2
        exit 1
    fi
    step "docs"
    for target in NBD NBDCopy; do
        docs=$(swift package --disable-sandbox generate-documentation --target "$target" 2>&1) || { echo "$docs" >&2; exit 1; }
        if grep -q '^warning' <<<"$docs"; then
            grep -A4 '^warning' <<<"$docs" >&2
            echo "the DocC catalog of $target has warnings" >&2
            exit 1
        fi
    done
    echo "formatting and documentation: fine"
    # The unit-test targets under ThreadSanitizer (the interop suite too would take 10 minutes
    # more), rebuilt in place: only the package's own modules are instrumented and compiled
    # again; SwiftNIO, swift-crypto and BoringSSL are the plain build's (about 2 minutes rather
    # than 4, or 9 with the C). NBD_UNIT_TESTS leaves the interop suite and the executables out
    # of the package: they are not compiled again.
    step "TSan"
    NBD_UNIT_TESTS=1 scripts/sanitize.sh thread --in-place
fi
current=""
echo "=== all steps passed"
