#!/usr/bin/env bash
# Instructions per request under callgrind, for one or more Switchyard binaries: a measure
# that does not move with the machine's noise (the same binary gives the same count within
# about 1%), for telling a small change apart where CPU seconds cannot (they move 5-10%
# between runs minutes apart). It counts user-space instructions of every thread (the
# SQLite ledger's included), not the kernel's work, cache misses or waiting.
#
#   bench/instructions.sh before=/tmp/old/switchyard after=target/release/switchyard
#   CONFIG=real bench/instructions.sh after=target/release/switchyard
#   STREAM=1 CONFIG=real bench/instructions.sh after=target/release/switchyard   # per stream
#
# Each binary serves the bench config under `valgrind --tool=callgrind`; after a warm-up
# the counters are zeroed, `wrk -c4` runs for DURATION seconds, and the counters are dumped.
# With STREAM=1 the load is `sse-load -c 4` (streamed chat requests of 20 chunks, the
# gateway asking the mock for usage) and the count is per stream.
# Environment: CONFIG (bare | real; bare), STREAM (0), DURATION (6), REAL_CACHE_MAX (8MiB), KEEP=1
# (keeps the callgrind files: `callgrind_annotate --inclusive=yes FILE` shows where).
# A note on SHA-256: valgrind hides the CPU's SHA extensions, so sha2 runs its portable
# code here (a few thousand instructions per hash) where a real run uses the CPU's.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
CONFIG=${CONFIG:-bare}
DURATION=${DURATION:-6}
[ $# -gt 0 ] || { echo "usage: $0 NAME=PATH [NAME=PATH ...]" >&2; exit 2; }
for tool in wrk valgrind callgrind_control; do
    command -v "$tool" >/dev/null || { echo "missing: $tool (apt-get install -y wrk valgrind)" >&2; exit 1; }
done
[ -x "$UPSTREAM_BIN" ] || (cd "$HERE/upstream" && cargo build --release -q)
STREAM=${STREAM:-0}
[ "$STREAM" = 0 ] || [ -x "$SSE_BIN" ] || (cd "$HERE/sse-load" && cargo build --release -q)

bench_setup instructions
# load URL SECONDS TAG: prints what the load generator reports (requests= or streams=).
load() {
    if [ "$STREAM" = 0 ]; then
        taskset -c 1 wrk -t1 -c4 -d"$2s" -s "$HERE/wrk/chat.lua" "$1" -- "$auth" "$3"
    else
        local args=()
        [ -n "$auth" ] && args=(--header "Authorization: $auth")
        taskset -c 1 "$SSE_BIN" --url "$1" --connections 4 --duration "$2" --expect-events 20 "${args[@]}" \
            --body "{\"model\":\"bench\",\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"stream $3-{n}\"}]}"
    fi
}
unit=request
[ "$STREAM" = 0 ] || unit=stream

for spec in "$@"; do
    name=${spec%%=*}
    bin=$(realpath "${spec#*=}")
    d=$T/$name
    mkdir -p "$d"
    write_configs "$d" "$UP" "$(free_port)"
    start_gateway "$d" "$bin" valgrind --tool=callgrind --callgrind-out-file="$d/callgrind.out"
    pid=$GW_PID url=$GW_URL
    load "$url" 3 "warm-$name-$RANDOM" >/dev/null
    sleep 0.5
    callgrind_control -z "$pid" >/dev/null 2>&1
    out=$(load "$url" "$DURATION" "run-$name-$RANDOM")
    # Past one ledger flush, so the rows of these requests are in the count.
    sleep 0.6
    callgrind_control -d "$pid" >/dev/null 2>&1
    sleep 1
    requests=$(echo "$out" | awk -F= '/^(requests|streams)=/{print $2}')
    dump=$(ls -t "$d"/callgrind.out.* | head -1)
    ir=$(awk '/^(summary|totals):/{print $2; exit}' "$dump")
    echo "$name ($CONFIG): $requests ${unit}s, $((ir / requests)) instructions per $unit${KEEP:+  [$dump]}"
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
done
