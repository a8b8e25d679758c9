#!/usr/bin/env bash
# Fuzzes every decoder that reads bytes from the other daemon, on the machine's stable toolchain:
#   bash scripts/fuzz.sh [SECONDS] [TARGET...]
# SECONDS per target (default 60); targets default to all of them (header, status, frame).
# Prints, per target, the executions libFuzzer ran and whether it crashed; exits non-zero if any
# target crashed (the reproducer is saved under fuzz/artifacts/TARGET/).
#
# Environment:
#   FUZZ_SANITIZER      address (default) or none. ASan costs about 3x in speed; the decoders
#                       are safe Rust, so none finds the same logic bugs faster.
#   FUZZ_WORK           where new corpus entries go (default fuzz/target/corpus, ignored by git):
#                       the committed seeds in fuzz/corpus/TARGET are only read, and what a run
#                       learns is kept there for the next run on this machine.
#   FUZZ_FEATURES       features of the fuzz crate to enable (none yet).
#   FUZZ_CHECK_CORPUS=1 first check that the committed seeds are what fuzz/corpus-gen makes
#                       (a wire change can make them stale; costs one more build).
#
# cargo-fuzz drives nightly-only rustc flags (-Zsanitizer, sanitizer coverage); RUSTC_BOOTSTRAP=1
# lets the stable compiler accept them. fuzz/Cargo.lock pins every dependency; cargo fuzz has no
# --locked, so the lock file is checked with cargo metadata --locked before the build.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

CARGO_FUZZ_VERSION=0.13.2

secs=${1:-60}
if [ $# -gt 0 ]; then shift; fi
if ! [[ "$secs" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: bash scripts/fuzz.sh [SECONDS] [TARGET...]" >&2
    exit 2
fi
sanitizer=${FUZZ_SANITIZER:-address}
work=${FUZZ_WORK:-fuzz/target/corpus}
features=()
if [ -n "${FUZZ_FEATURES:-}" ]; then features=(--features "$FUZZ_FEATURES"); fi

ensure_cargo
export PATH="${CARGO_HOME:-${HOME:-/root}/.cargo}/bin:$PATH"
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
    stage "installing cargo-fuzz $CARGO_FUZZ_VERSION"
    t0=$SECONDS
    cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
    echo "cargo-fuzz installed in $((SECONDS - t0)) s"
fi
cargo fuzz --version

if ! cargo metadata --locked --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null; then
    echo "fuzz/Cargo.lock is out of date (did common's dependencies change?); refresh it with" >&2
    echo "  cargo metadata --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null" >&2
    exit 1
fi

all=$(cargo fuzz list)
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then mapfile -t targets <<<"$all"; fi
for t in "${targets[@]}"; do
    if ! grep -qx -- "$t" <<<"$all"; then
        echo "no fuzz target '$t'; there are: ${all//$'\n'/ }" >&2
        exit 2
    fi
done

if [ "${FUZZ_CHECK_CORPUS:-0}" = 1 ]; then
    stage "seed corpus is current"
    cargo run -q --locked --manifest-path fuzz/Cargo.toml -p enclave-net-fuzz-corpus -- check fuzz/corpus
fi

stage "build fuzz targets (sanitizer: $sanitizer)"
t0=$SECONDS
for t in "${targets[@]}"; do
    cargo fuzz build -s "$sanitizer" "${features[@]}" "$t"
done
echo "built in $((SECONDS - t0)) s"

mkdir -p fuzz/target/logs
summary=()
failed=0
for t in "${targets[@]}"; do
    stage "fuzz $t for $secs s"
    mkdir -p "$work/$t"
    log=fuzz/target/logs/$t.log
    t0=$SECONDS
    rc=0
    # New entries go to the first corpus directory (the scratch one); the seeds are only read.
    cargo fuzz run -s "$sanitizer" "${features[@]}" "$t" "$work/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -timeout=10 -print_final_stats=1 >"$log" 2>&1 || rc=$?
    took=$((SECONDS - t0))
    runs=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | tail -n 1)
    [ -n "$runs" ] || runs=$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$log" | tail -n 1)
    last=$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)
    if [ -n "$last" ]; then echo "$last"; fi
    # libFuzzer's own clock leaves out the build that cargo fuzz run may do first.
    fuzzed=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -n 1)
    if [ "$rc" -eq 0 ] && [ -n "$runs" ]; then
        fuzzed=${fuzzed:-$took}
        line="$t: ${runs} executions in ${fuzzed} s ($((runs / (fuzzed > 0 ? fuzzed : 1)))/s; ${took} s with the build), no crash"
    else
        failed=1
        artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
        line="$t: CRASHED after ${runs:-?} executions in ${took} s (exit $rc); reproducer: ${artifact:-none written}"
        grep -m 1 -A 12 -E 'panicked at|ERROR: (AddressSanitizer|libFuzzer)' "$log" || tail -n 40 "$log"
        if [ -n "$artifact" ]; then
            echo "reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run -s $sanitizer $t $artifact"
        fi
    fi
    echo "$line (log: $log)"
    summary+=("$line")
done

stage "fuzz summary"
printf '%s\n' "${summary[@]}"
exit "$failed"
