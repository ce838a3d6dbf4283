#!/usr/bin/env bash
# Profile Switchyard under load: the mock upstream and wrk on core 1, the gateway on core 0,
# sampled with perf (cpu-clock, DWARF call graphs), or run under callgrind when perf cannot
# sample. Prints the top functions by self time and by inclusive time.
#
#   bench/profile.sh                 # realistic config, wrk -c64, perf, 10 s
#   CONFIG=bare bench/profile.sh
#   TOOL=callgrind DURATION=5 bench/profile.sh
#
# Environment: CONFIG (real | bare), TOOL (perf | callgrind; default perf when it can
# sample), DURATION (10), WARMUP (2), OUTDIR (a new /tmp folder; perf.data, reports and
# the gateway's log stay there; KEEP=0 removes it), NO_BUILD=1, and those of lib.sh
# (CONC, REAL_CACHE_MAX, PROXY_CPU, LOAD_CPU).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
CONFIG=${CONFIG:-real}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
if [ -z "${TOOL:-}" ]; then
    if perf record -q -e cpu-clock -o /dev/null -- true >/dev/null 2>&1; then TOOL=perf; else TOOL=callgrind; fi
fi
ulimit -n 65536 2>/dev/null || true
[ "${NO_BUILD:-0}" = 1 ] || build_all

# The profile, its reports and the gateway's log stay in $T.
KEEP=${KEEP:-1}
bench_setup profile
write_configs "$T" "$UP" "$(free_port)"
target=sy-$CONFIG

wrapper=()
if [ "$TOOL" = callgrind ]; then
    wrapper=(valgrind --tool=callgrind --callgrind-out-file="$T/callgrind.out" --dump-instr=no)
fi
start_gateway "$T" "$SY_BIN" "${wrapper[@]}"
SY=$GW_PID
url=$GW_URL
prefix="profile-$(date +%s%N)"
echo "== $target at $url, $TOOL, wrk -c$CONC for ${DURATION}s; output in $T" >&2

taskset -c "$LOAD_CPU" wrk -t1 -c8 -d"${WARMUP}s" -s "$HERE/wrk/chat.lua" "$url" -- "$auth" "$prefix-warm" >/dev/null
if [ "$TOOL" = perf ]; then
    taskset -c "$LOAD_CPU" perf record -q -e cpu-clock -F "${FREQ:-1999}" --call-graph dwarf,16384 -p "$SY" \
        -o "$T/perf.data" -- sleep "$((DURATION + 1))" &
    PERF=$!
    sleep 0.5
    before=$(cpu_ticks "$SY")
    out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONC" -d"${DURATION}s" -s "$HERE/wrk/chat.lua" "$url" -- "$auth" "$prefix")
    after=$(cpu_ticks "$SY")
    echo "$out" | grep -E '^(requests|rps|errors)='
    requests=$(echo "$out" | awk -F= '/^requests=/{print $2}')
    cpu_s=$(awk "BEGIN{print ($after - $before) / $(getconf CLK_TCK)}")
    echo "gateway CPU: ${cpu_s} s for $requests requests = $(awk "BEGIN{printf \"%.1f\", $cpu_s * 1e6 / $requests}") µs per request (with perf attached)"
    wait "$PERF" || true
    perf script -i "$T/perf.data" -F comm,tid,ip,sym --no-inline 2>/dev/null >"$T/perf.script"
    python3 "$HERE/perf-buckets.py" "$requests" "$cpu_s" <"$T/perf.script" | tee "$T/buckets.txt"
    perf report -i "$T/perf.data" --no-children --sort symbol --stdio -g none --percent-limit 0.4 2>/dev/null |
        grep -v '^#' | grep -v '^$' | sed 's/  \+/ /g' | cut -c1-160 | head -60 >"$T/self.txt"
    perf report -i "$T/perf.data" --children --sort symbol --stdio -g none --percent-limit 1 2>/dev/null |
        grep -v '^#' | grep -v '^$' | sed 's/  \+/ /g' | grep -E 'switchyard::|reqwest::|sqlx|tracing_core::event|serde_json::de::from|moka::sync|hyper::proto::h1::dispatch::Dispatcher<D,Bs,I,T>::poll_(read|write)' |
        cut -c1-160 | head -80 >"$T/inclusive.txt"
    echo "--- self time, top symbols (perf report --no-children)"; cat "$T/self.txt"
    echo "--- inclusive time of the gateway's own functions (perf report --children)"; cat "$T/inclusive.txt"
    echo "(perf report -i $T/perf.data for the call graphs)"
else
    taskset -c "$LOAD_CPU" wrk -t1 -c"$CONC" -d"${DURATION}s" -s "$HERE/wrk/chat.lua" "$url" -- "$auth" "$prefix" | grep -E '^(requests|rps|errors)='
    kill -INT "$SY"
    wait "$SY" 2>/dev/null || true
    callgrind_annotate --inclusive=no "$T/callgrind.out" 2>/dev/null | head -60 >"$T/self.txt"
    callgrind_annotate --inclusive=yes "$T/callgrind.out" 2>/dev/null | head -80 >"$T/inclusive.txt"
    cat "$T/self.txt" "$T/inclusive.txt"
fi
