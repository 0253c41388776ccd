#!/usr/bin/env bash
# The test suite under a sanitizer, in its own build folder:
#
#   scripts/sanitize.sh thread  [swift test arguments]   ThreadSanitizer (data races)
#   scripts/sanitize.sh address [swift test arguments]   AddressSanitizer (memory errors, leaks)
#   scripts/sanitize.sh thread --in-place [...]          in .build, instrumenting the package's
#                                                        own code only: its dependencies (SwiftNIO,
#                                                        BoringSSL, swift-crypto) are the plain
#                                                        build's, not built again (what CI does;
#                                                        the next plain build compiles our code
#                                                        again). See Package.swift.
#
# For example: scripts/sanitize.sh thread --filter "NBDCoreTests|NBDTests|NBDServerTests".
# A report fails the run. Reports that are not ours are suppressed in scripts/tsan.supp, each
# with the reason (scripts/tsan.supp, scripts/asan.supp).
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:-}
case "$kind" in
    thread) export TSAN_OPTIONS="halt_on_error=1 suppressions=$PWD/scripts/tsan.supp ${TSAN_OPTIONS:-}" ;;
    address) export ASAN_OPTIONS="detect_leaks=0 suppressions=$PWD/scripts/asan.supp ${ASAN_OPTIONS:-}" ;;
    *)
        echo "usage: scripts/sanitize.sh thread|address [swift test arguments]" >&2
        exit 2
        ;;
esac
shift
scratch=(--sanitize="$kind" --scratch-path ".build-$kind")
if [ "${1:-}" = "--in-place" ]; then
    shift
    scratch=()
    export NBD_SANITIZE_OWN_CODE=$kind
fi
# The runtime's backtracer and the sanitizers trip over each other on a report.
export SWIFT_BACKTRACE=enable=no
# Everything runs several times slower: the tests' time bounds are scaled by this.
export NBD_TEST_TIME_SCALE=${NBD_TEST_TIME_SCALE:-5}
# The pool simulation's seeds are plain computation, each on one thread, where a sanitizer
# finds nothing new in the thousands: 100 of them (the plain run does 2,000).
export NBD_SIMULATION_SEEDS=${NBD_SIMULATION_SEEDS:-100}
# The test product alone: not the snippets and executables a plain build also makes.
swift build "${scratch[@]}" --product swift-nbdPackageTests
exec swift test "${scratch[@]}" --skip-build --no-parallel "$@"
