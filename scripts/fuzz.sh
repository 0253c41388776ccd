#!/usr/bin/env bash
# libFuzzer on every parser of a peer's bytes (see Fuzz/).
#
#   scripts/fuzz.sh --list            the targets, one per line
#   scripts/fuzz.sh TARGET SECONDS    build it if needed, then fuzz it for SECONDS
#   scripts/fuzz.sh --all SECONDS     every target, one after another
#
# Exits non-zero on a crash, a leak or a timeout; the input that caused it is kept in
# .build-fuzz/artifacts/. FUZZ_FLAGS adds libFuzzer options (for example -jobs=2). New inputs found go to .build-fuzz/corpus/TARGET; the committed seeds
# (Fuzz/TARGET/seeds) are read, never written.
set -euo pipefail
cd "$(dirname "$0")/.."
# The runtime's backtracer and AddressSanitizer trip over each other on a crash.
export SWIFT_BACKTRACE=enable=no

targets() { for dir in Fuzz/*/; do name=$(basename "$dir"); [ "$name" = Support ] || echo "$name"; done; }

usage() {
    echo "usage: scripts/fuzz.sh --list | TARGET SECONDS | --all SECONDS" >&2
    exit 2
}

fuzz() {
    local target=$1 seconds=$2
    [ -d "Fuzz/$target/seeds" ] && [ "$target" != Support ] || { echo "no fuzz target $target (scripts/fuzz.sh --list)" >&2; exit 2; }
    NBD_FUZZ=1 swift build --scratch-path .build-fuzz --product "Fuzz$target" \
        -Xswiftc -sanitize=fuzzer,address -Xswiftc -parse-as-library >/dev/null
    mkdir -p ".build-fuzz/corpus/$target" .build-fuzz/artifacts
    echo "fuzzing $target for $seconds s"
    local log=".build-fuzz/$target.log" status=0
    # shellcheck disable=SC2086
    ".build-fuzz/debug/Fuzz$target" ".build-fuzz/corpus/$target" "Fuzz/$target/seeds" \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
        -artifact_prefix=".build-fuzz/artifacts/$target-" -print_final_stats=1 ${FUZZ_FLAGS:-} >"$log" 2>&1 || status=$?
    grep -E "^#[0-9]+.*(INITED|DONE)|stat::number_of_executed_units|stat::average_exec_per_sec" "$log" || true
    if [ "$status" -ne 0 ]; then
        tail -40 "$log" >&2
        echo "fuzz target $target failed (exit $status); the input is in .build-fuzz/artifacts/" >&2
    fi
    return "$status"
}

case "${1:-}" in
    --list) targets ;;
    --all)
        [ $# -eq 2 ] || usage
        for target in $(targets); do fuzz "$target" "$2"; done
        ;;
    "" | -*) usage ;;
    *)
        [ $# -eq 2 ] || usage
        fuzz "$1" "$2"
        ;;
esac
