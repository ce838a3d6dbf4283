#!/usr/bin/env bash
# Profile Switchyard under load: the mock upstream and wrk on core 1, the gateway on core 0,
# sampled with perf (cpu-clock, DWARF call graphs), or run under callgrind when perf cannot
# sample. Prints the top functions by self time and by inclusive time.
#
#   bench/profile.sh                 # realistic config, wrk -c64, perf, 10 s
#   CONFIG=bare bench/profile.sh
#   TOOL=callgrind DURATION=5 bench/profile.sh
#
# Environment: CONFIG (real | bare), REAL_CACHE_MAX (8MiB, as in run.sh), TOOL (perf | callgrind; default perf when it can
# sample), CONC (64), DURATION (10), WARMUP (2), OUTDIR (a new /tmp folder; perf.data,
# reports and the gateway's log stay there), NO_BUILD=1.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
CONFIG=${CONFIG:-real}
CONC=${CONC:-64}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
REAL_CACHE_MAX=${REAL_CACHE_MAX:-8MiB}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
if [ -z "${TOOL:-}" ]; then
    if perf record -q -e cpu-clock -o /dev/null -- true >/dev/null 2>&1; then TOOL=perf; else TOOL=callgrind; fi
fi
ulimit -n 65536 2>/dev/null || true
[ "${NO_BUILD:-0}" = 1 ] || build_all

T=${OUTDIR:-$(mktemp -d /tmp/switchyard-profile.XXXXXX)}
mkdir -p "$T"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

taskset -c "$LOAD_CPU" "$UPSTREAM_BIN" --listen 127.0.0.1:0 --ready-file "$T/upstream.addr" 2>"$T/upstream.log" &
PIDS+=($!)
wait_file "$T/upstream.addr"
UP=$(cat "$T/upstream.addr")
write_configs "$T" "$UP" "$(free_port)"
target=sy-$CONFIG
auth=""
[ "$CONFIG" = real ] && auth="Bearer $CLIENT_KEY"

wrapper=()
if [ "$TOOL" = callgrind ]; then
    wrapper=(valgrind --tool=callgrind --callgrind-out-file="$T/callgrind.out" --dump-instr=no)
fi
(cd "$T/$target" && exec taskset -c "$PROXY_CPU" "${wrapper[@]}" "$SY_BIN" serve \
    --config "$T/$target/conf/routes.yaml" --listen 127.0.0.1:0 --ready-file "$T/$target/addr" \
    >"$T/$target/gateway.log" 2>&1) &
SY=$!
PIDS+=("$SY")
for _ in $(seq 600); do [ -s "$T/$target/addr" ] && break; sleep 0.1; done
[ -s "$T/$target/addr" ] || { echo "the gateway did not start; see $T/$target/gateway.log" >&2; exit 1; }
url=http://$(cat "$T/$target/addr")/v1/chat/completions
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
