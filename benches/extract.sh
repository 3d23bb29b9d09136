#!/usr/bin/env bash
# Extract, verify-extract, audit and dump on large logs: wall time, peak resident memory
# and peak anonymous memory of each, and extract sizes against the same events as JSON lines.
#
#   benches/extract.sh [EVENTS] [WORKDIR]        (default 1000000 events, /tmp/tally-xb)
#   BASE=/path/to/older/tally benches/extract.sh  also runs the older binary's extract and
#                                                 verify-extract on the same logs
#
# Two logs of EVENTS events with 256-byte JSON payloads (tally bench --json-payload): A, one
# stream (bench-0) whose events all share correlation id corr-all; B, 100 streams written
# round robin, so each stream (bench-7 here) holds one record in a hundred. Needs about
# 4 GB of disk at 1M events. Memory is sampled from /proc every 20 ms: peak_rss is VmHWM
# (file pages mapped from the log included), peak_anon the largest RssAnon seen.
set -euo pipefail
N=${1:-1000000}
W=${2:-/tmp/tally-xb}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cargo build --release -p tally-tools --manifest-path "$ROOT/Cargo.toml" >&2
T="$ROOT/target/release/tally"
rm -rf "$W" && mkdir -p "$W" && cd "$W"
"$T" bench --data A --streams 1 --events "$N" --batch 1000 --durability none \
    --json-payload --correlation corr-all > /dev/null
"$T" bench --data B --streams 100 --events "$N" --batch 1 --durability none \
    --json-payload > /dev/null
"$T" pubkey A > A.pub
"$T" pubkey B > B.pub
# The first writable open catches up the Merkle tree and heads: not part of any figure.
"$T" checkpoint A > /dev/null
"$T" checkpoint B > /dev/null

# run NAME CMD...: prints NAME, seconds, peak RSS MB, peak anonymous MB.
run() {
    local name=$1; shift
    local start pa=0 a hwm=0 pid rc
    start=$(date +%s.%N)
    "$@" > /dev/null &
    pid=$!
    while kill -0 "$pid" 2> /dev/null; do
        a=$(awk '/RssAnon/{print $2}' "/proc/$pid/status" 2> /dev/null || echo 0)
        [ "${a:-0}" -gt "$pa" ] && pa=$a
        h=$(awk '/VmHWM/{print $2}' "/proc/$pid/status" 2> /dev/null || echo 0)
        [ "${h:-0}" -gt "$hwm" ] && hwm=$h
        sleep 0.02
    done
    rc=0; wait "$pid" || rc=$?
    printf "%-34s %8.2f s %8d MB %8d MB  rc=%d\n" "$name" \
        "$(echo "$(date +%s.%N) - $start" | bc)" $((hwm / 1024)) $((pa / 1024)) "$rc"
}

printf "%-34s %10s %11s %11s\n" "run ($N events)" "wall" "peak_rss" "peak_anon"
run "extract stream A"               "$T" extract A --stream bench-0 --out a.tex
run "verify-extract stream A"        "$T" verify-extract a.tex --pubkey A.pub
run "verify-extract stream A, 1 thr" "$T" verify-extract a.tex --pubkey A.pub --threads 1
run "extract stream A --lines"       "$T" extract A --stream bench-0 --lines --out a.jsonl
run "verify-extract A lines"         "$T" verify-extract a.jsonl --pubkey A.pub
run "extract correlation A"          "$T" extract A --correlation corr-all --out c.tex
run "verify-extract correlation A"   "$T" verify-extract c.tex --pubkey A.pub
run "extract window A (all)"         "$T" extract A --from-time 0 --to-time 18446744073709551614 --out w.tex
run "verify-extract window A"        "$T" verify-extract w.tex --pubkey A.pub
run "extract stream B (1 in 100)"    "$T" extract B --stream bench-7 --out b.tex
run "verify-extract stream B"        "$T" verify-extract b.tex --pubkey B.pub
run "audit stream A --json"          "$T" audit A --stream bench-0 --json
run "dump A jsonl"                   "$T" dump A --format jsonl
"$T" dump A --format jsonl > a.dump.jsonl
"$T" dump B --stream bench-7 --format jsonl > b.dump.jsonl
if [ -n "${BASE:-}" ]; then
    run "BASE extract stream A"      "$BASE" extract A --stream bench-0 --out a.v2.json
    run "BASE verify-extract A"      "$BASE" verify-extract a.v2.json --pubkey A.pub
    run "BASE extract stream B"      "$BASE" extract B --stream bench-7 --out b.v2.json
    run "BASE verify-extract B"      "$BASE" verify-extract b.v2.json --pubkey B.pub
fi
echo
size() { stat -c %s "$1"; }
for pair in "a.tex a.dump.jsonl" "a.jsonl a.dump.jsonl" "b.tex b.dump.jsonl" \
            "a.v2.json a.dump.jsonl" "b.v2.json b.dump.jsonl"; do
    set -- $pair
    [ -f "$1" ] || continue
    printf "%-12s %12d bytes  %.3fx the events as JSON lines (%s, %d bytes)\n" "$1" \
        "$(size "$1")" "$(echo "$(size "$1") / $(size "$2")" | bc -l)" "$2" "$(size "$2")"
done
