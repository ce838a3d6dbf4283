#!/usr/bin/env bash
# Two or more Switchyard binaries compared at concurrency 64, one at a time, in alternating
# order (A B, B A, A B, ...): CPU per request, context switches per request and peak RSS.
# Quicker than a full run.sh (about 20 s per measurement) and free of its other targets; the
# alternation spreads a slow minute over every binary.
#
#   bench/pairs.sh before=/tmp/old/switchyard after=target/release/switchyard
#   CONFIG=real PAIRS=4 bench/pairs.sh before=... after=...
#   SEDCONF='/cache: { ttl: 1m }/d' CONFIG=real bench/pairs.sh after=...   # the realistic config without its cache
#
# Environment: CONFIG (bare | real; bare), PAIRS (3: rounds, each measuring every binary
# once, in reversed order every other round), DURATION (8 s), CONC (64), REAL_CACHE_MAX
# (8MiB), SEDCONF (a sed script applied to the config, for what-if runs), PROXY_CPU (0),
# LOAD_CPU (1). Needs wrk; context switches need perf (left out without it).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
CONFIG=${CONFIG:-bare}
PAIRS=${PAIRS:-3}
DURATION=${DURATION:-8}
[ $# -gt 0 ] || { echo "usage: $0 NAME=PATH [NAME=PATH ...]" >&2; exit 2; }
command -v wrk >/dev/null || { echo "missing: wrk (apt-get install -y wrk)" >&2; exit 1; }
[ -x "$UPSTREAM_BIN" ] || (cd "$HERE/upstream" && cargo build --release -q)
PERF=0
perf stat -e context-switches -o /dev/null -- true >/dev/null 2>&1 && PERF=1

bench_setup pairs

# measure NAME PATH: a fresh gateway, warmed up, then CONC connections for DURATION seconds.
measure() {
    local name=$1 bin=$2 d pid before after requests out ctx="" stat=""
    d=$(mktemp -d "$T/$name.XXXX")
    write_configs "$d" "$UP" "$(free_port)"
    if [ -n "${SEDCONF:-}" ]; then sed -i "$SEDCONF" "$d/sy-$CONFIG/conf/routes.yaml"; fi
    start_gateway "$d" "$bin"
    pid=$GW_PID
    local url=$GW_URL
    taskset -c "$LOAD_CPU" wrk -t1 -c"$CONC" -d3s -s "$HERE/wrk/chat.lua" "$url" -- "$auth" "warm-$RANDOM" >/dev/null
    reset_hwm "$pid"
    before=$(cpu_ticks "$pid")
    if [ "$PERF" = 1 ]; then
        taskset -c "$LOAD_CPU" perf stat -e context-switches -p "$pid" -o "$d/stat.txt" -- sleep "$DURATION" &
        stat=$!
    fi
    out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONC" -d"${DURATION}s" -s "$HERE/wrk/chat.lua" "$url" -- "$auth" "run-$RANDOM")
    after=$(cpu_ticks "$pid")
    if [ -n "$stat" ]; then wait "$stat" 2>/dev/null || true; fi
    requests=$(echo "$out" | awk -F= '/^requests=/{print $2}')
    if [ "$PERF" = 1 ]; then
        ctx=$(awk -v n="$requests" '/context-switches/{gsub(",","",$1); printf "  %.3f switches/req", $1 / n}' "$d/stat.txt")
    fi
    printf '%-10s %8d requests  %6.1f µs CPU/req  peak RSS %5.1f MiB%s\n' "$name" "$requests" \
        "$(awk "BEGIN{print ($after - $before) * 1e6 / $(getconf CLK_TCK) / $requests}")" \
        "$(awk "BEGIN{print $(hwm_kib "$pid") / 1024}")" "$ctx"
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

specs=("$@")
echo "== $CONFIG config, wrk -c$CONC for ${DURATION}s each, $PAIRS rounds${SEDCONF:+, config edited: $SEDCONF}"
for round in $(seq "$PAIRS"); do
    order=("${specs[@]}")
    if [ $((round % 2)) = 0 ]; then
        order=()
        for ((i = ${#specs[@]} - 1; i >= 0; i--)); do order+=("${specs[$i]}"); done
    fi
    for spec in "${order[@]}"; do measure "${spec%%=*}" "$(realpath "${spec#*=}")"; done
done
