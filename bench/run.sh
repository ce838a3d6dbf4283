#!/usr/bin/env bash
# Switchyard load benchmark: direct to a mock upstream, nginx as a plain reverse proxy, and
# Switchyard with a bare pass-through config and a realistic one, side by side in one run.
# Run by hand (not in CI); see bench/README.md. Appends a section to bench/RESULTS.md.
#
#   bench/run.sh                     # full run, ~15 minutes (3 rounds)
#   LABEL=before bench/run.sh        # names the section in RESULTS.md
#   DURATION=5 TARGETS="nginx sy-real" bench/run.sh
#   EXTRA_BINS="fix=/tmp/fix/target/release/switchyard" bench/run.sh   # before and after, side by side
#
# Environment: DURATION (s per measurement, 10), WARMUP (s, 2), TARGETS
# ("direct nginx floor sy-bare sy-real", plus sy-bare@NAME sy-real@NAME for each EXTRA_BINS entry),
# EXTRA_BINS ("NAME=PATH ...": more Switchyard binaries measured with the same configs),
# SY_BIN (the main binary; target/release/switchyard), PROXY_CPU (0), LOAD_CPU (1),
# STREAMS (32), MANY_STREAMS (1000), SPREAD_MS (100: the stream connections' first requests
# spread over that long; 0 sends them all at once, as runs before session 9 did), CONC (64), REAL_CACHE_MAX (cache.max_bytes of the
# realistic config; 8MiB, full within the first second, as in the A/B tools), ROUNDS (3: each measurement taken that many times, the
# targets taking turns; the report gives the median), LABEL, OUT (bench/RESULTS.md; "-" prints
# to stdout), NO_BUILD=1 (use the binaries already built), KEEP=1 (keep the temp dir).
# Raw numbers of each run are kept in bench/out/ (not committed).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
declare -A BINS=()
EXTRA_TARGETS=""
for spec in ${EXTRA_BINS:-}; do
    BINS[${spec%%=*}]=${spec#*=}
    EXTRA_TARGETS+=" sy-bare@${spec%%=*} sy-real@${spec%%=*}"
done
TARGETS=${TARGETS:-"direct nginx floor sy-bare sy-real$EXTRA_TARGETS"}
STREAMS=${STREAMS:-32}
MANY_STREAMS=${MANY_STREAMS:-1000}
SPREAD_MS=${SPREAD_MS:-100}
LABEL=${LABEL:-}
OUT=${OUT:-$HERE/RESULTS.md}
ROUNDS=${ROUNDS:-3}

for tool in wrk nginx taskset python3 curl; do
    command -v "$tool" >/dev/null || { echo "missing: $tool (apt-get install -y wrk nginx util-linux python3 curl)" >&2; exit 1; }
done
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

[ "${NO_BUILD:-0}" = 1 ] || build_all

T=$(mktemp -d /tmp/switchyard-bench.XXXXXX)
RES=$T/results.txt
: >"$RES"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $T" >&2; else rm -rf "$T"; fi
}
trap cleanup EXIT

put() { echo "$1=$2" >>"$RES"; }
# ---- metadata
put meta.date "$(date -u +'%Y-%m-%d %H:%M UTC')"
put meta.rustc "$(rustc --version)"
put meta.nginx "$(nginx -v 2>&1 | sed 's/^nginx version: //')"
put meta.wrk "$(wrk -v 2>&1 | head -1 | awk '{print $1, $2}')"
put meta.cpu "$(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo) x $(nproc) cores"
put meta.kernel "$(uname -sr)"
put meta.commit "$(cd "$ROOT" && git rev-parse --short HEAD)$(cd "$ROOT" && git diff --quiet -- src Cargo.toml Cargo.lock || echo ' + uncommitted changes in src/')"
put meta.duration "$DURATION"
put meta.rounds "$ROUNDS"
put meta.label "$LABEL"
put meta.conc "$CONC"
put meta.streams "$STREAMS"
put meta.many_streams "$MANY_STREAMS"
put meta.spread_ms "$SPREAD_MS"
put meta.targets "$TARGETS"
put meta.real_cache_max "${REAL_CACHE_MAX:-256MiB, the gateway default}"
put meta.loadavg "$(cut -d' ' -f1-3 /proc/loadavg)"

# ---- the mock upstream, on the load core
taskset -c "$LOAD_CPU" "$UPSTREAM_BIN" --listen 127.0.0.1:0 --ready-file "$T/upstream.addr" \
    --chunks $CHUNKS --chunk-delay-ms $CHUNK_DELAY_MS 2>"$T/upstream.log" &
PIDS+=($!)
wait_file "$T/upstream.addr"
UP=$(cat "$T/upstream.addr")

# ---- configs
NGINX_PORT=$(free_port)
write_configs "$T" "$UP" "$NGINX_PORT"

# ---- the targets: all started first, then measured scenario by scenario, ROUNDS times
# each, taking turns (target A, B, C, then A, B, C again), so that a change in the machine's
# speed during the run (another VM on the host, a noisy neighbour) falls on every target
# alike instead of on whichever ran at that minute. report.py takes the median of the rounds.
declare -A URL=() AUTH=() TPIDS=() METRICS=()
start_target() {
    local target=$1 auth="" pids=() base metrics_url=""
    case $target in
    direct)
        base=http://$UP
        ;;
    nginx)
        taskset -c "$PROXY_CPU" nginx -p "$T/nginx" -c "$T/nginx/nginx.conf" 2>"$T/nginx/stderr.log" &
        local master=$!
        PIDS+=("$master")
        base=http://127.0.0.1:$NGINX_PORT
        wait_http "$base/"
        pids=("$master" $(pgrep -P "$master"))
        ;;
    floor)
        [ -x "$FLOOR_BIN" ] || (cd "$HERE/floor" && cargo build --release -q)
        rm -f "$T/floor.addr"
        taskset -c "$PROXY_CPU" "$FLOOR_BIN" --listen 127.0.0.1:0 --upstream "$UP" --ready-file "$T/floor.addr" &
        local floor=$!
        PIDS+=("$floor")
        wait_file "$T/floor.addr"
        base=http://$(cat "$T/floor.addr")
        pids=("$floor")
        ;;
    sy-bare* | sy-real*)
        local cfg=${target%@*} bin=$SY_BIN
        if [ "$cfg" != "$target" ]; then
            bin=${BINS[${target#*@}]:?"no EXTRA_BINS entry for $target"}
            # The same config, with a ledger of its own.
            mkdir -p "$T/$target/conf"
            sed "s|$T/$cfg/ledger.db|$T/$target/ledger.db|" "$T/$cfg/conf/routes.yaml" >"$T/$target/conf/routes.yaml"
        fi
        rm -f "$T/$target/addr"
        (cd "$T/$target" && exec taskset -c "$PROXY_CPU" "$bin" serve --config "$T/$target/conf/routes.yaml" \
            --listen 127.0.0.1:0 --ready-file "$T/$target/addr" >"$T/$target/gateway.log" 2>&1) &
        local sy=$!
        PIDS+=("$sy")
        wait_file "$T/$target/addr"
        base=http://$(cat "$T/$target/addr")
        pids=("$sy")
        metrics_url=$base/metrics
        [ "$cfg" = sy-real ] && auth="Bearer $CLIENT_KEY"
        put "$target.binary" "$bin"
        ;;
    esac
    URL[$target]=$base/v1/chat/completions
    AUTH[$target]=$auth
    TPIDS[$target]="${pids[*]}"
    METRICS[$target]=$metrics_url
    echo "== $target (${URL[$target]})" >&2
    # Warm up (connections, caches, the allocator), not measured.
    taskset -c "$LOAD_CPU" wrk -t1 -c8 -d"${WARMUP}s" -s "$HERE/wrk/chat.lua" "${URL[$target]}" -- "$auth" "$target-$(date +%s%N)-warm" >/dev/null
    [ ${#pids[@]} -gt 0 ] && put "$target.idle_rss_kib" "$(awk '/^VmRSS/{s+=$2} END{print s}' $(printf '/proc/%s/status ' "${pids[@]}"))"
    return 0
}

# measure TARGET SCENARIO ROUND: one measurement (c1 / cN with wrk, sN with sse-load); its
# figures go to TARGET.SCENARIO.KEY for one round, TARGET.SCENARIO.rROUND.KEY for more.
measure() {
    local target=$1 scen=$2 round=$3 url=${URL[$1]} auth=${AUTH[$1]} before after user0 out key
    local pids=(${TPIDS[$1]}) args=()
    local prefix="$target-$scen-r$round-$(date +%s%N)"
    key=$target.$scen
    [ "$ROUNDS" -gt 1 ] && key=$target.$scen.r$round
    [ ${#pids[@]} -gt 0 ] && reset_hwm "${pids[@]}"
    [ ${#pids[@]} -gt 0 ] && before=$(cpu_ticks "${pids[@]}") && user0=$(user_ticks "${pids[@]}")
    case $scen in
    c*)
        out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"${scen#c}" -d"${DURATION}s" --timeout 5s --latency \
            -s "$HERE/wrk/chat.lua" "$url" -- "$auth" "$prefix")
        echo "$out" >"$T/$target-$scen-r$round.wrk.txt"
        ;;
    s*)
        [ -n "$auth" ] && args=(--header "Authorization: $auth")
        out=$(taskset -c "$LOAD_CPU" "$SSE_BIN" --url "$url" --connections "${scen#s}" --duration "$DURATION" \
            --expect-events $CHUNKS --spread-ms "$SPREAD_MS" "${args[@]}" \
            --body "{\"model\":\"bench\",\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"stream $prefix-{n}\"}]}")
        echo "$out" >"$T/$target-$scen-r$round.sse.txt"
        ;;
    esac
    echo "$out" | grep -E '^[a-z_0-9]+=' | while IFS= read -r kv; do put "$key.${kv%%=*}" "${kv#*=}"; done
    if [ ${#pids[@]} -gt 0 ]; then
        after=$(cpu_ticks "${pids[@]}")
        put "$key.cpu_ticks" $((after - before))
        put "$key.user_ticks" $(($(user_ticks "${pids[@]}") - user0))
        put "$key.hwm_kib" "$(hwm_kib "${pids[@]}")"
    fi
    echo "   $target $scen r$round: $(echo "$out" | grep -E '^(rps|streams|errors|lat_p50_us|lat_p99_us|ttfb_p50_us|ttfb_p99_us)=' | tr '\n' ' ')" >&2
}

scrape() { [ -z "${METRICS[$1]}" ] || curl -s "${METRICS[$1]}" >"$T/$1-metrics-$2.txt"; }

# Each round takes the targets in another order (a stride prime to their number, and an
# offset: A B C D E, then C E B D A, then E C A D B, ...), so that no target always follows
# the same one. With one fixed order, two builds differed at c64 by ~15% one way in all
# three rounds of a session-6 run, while measured alone in alternating pairs they differed
# ~10% the other way. (A rotation alone keeps every target's neighbours.)
read -ra TLIST <<<"$TARGETS"
round_order() {
    local n=${#TLIST[@]} r=$1 coprime=() s a b t i
    for ((s = 1; s < n || s == 1; s++)); do
        a=$s b=$n
        while [ "$b" -ne 0 ]; do t=$((a % b)) a=$b b=$t; done
        if [ "$a" -eq 1 ]; then coprime+=("$s"); fi
    done
    s=${coprime[$(((r - 1) % ${#coprime[@]}))]}
    for ((i = 0; i < n; i++)); do echo "${TLIST[$(((i * s + (r - 1) * (n > 2 ? 2 : 1)) % n))]}"; done
}
for t in $TARGETS; do start_target "$t"; done
for t in $TARGETS; do scrape "$t" before; done
for scen in c1 c$CONC s$STREAMS s$MANY_STREAMS; do
    for round in $(seq "$ROUNDS"); do
        for t in $(round_order "$round"); do measure "$t" "$scen" "$round"; done
    done
    for t in $TARGETS; do scrape "$t" "$scen"; done
done
# The overhead histogram over all the c1 rounds, and over all the cN rounds.
for t in $TARGETS; do
    [ -n "${METRICS[$t]}" ] || continue
    python3 "$HERE/report.py" overhead "$T/$t-metrics-before.txt" "$T/$t-metrics-c1.txt" |
        while IFS= read -r kv; do put "$t.c1.${kv%%=*}" "${kv#*=}"; done
    python3 "$HERE/report.py" overhead "$T/$t-metrics-c1.txt" "$T/$t-metrics-c$CONC.txt" |
        while IFS= read -r kv; do put "$t.c$CONC.${kv%%=*}" "${kv#*=}"; done
done

put meta.clk_tck "$(getconf CLK_TCK)"
if [ "$OUT" = "-" ]; then
    python3 "$HERE/report.py" markdown "$RES"
else
    python3 "$HERE/report.py" markdown "$RES" >"$T/section.md"
    python3 "$HERE/report.py" insert "$OUT" "$T/section.md"
    echo "== results added to $OUT" >&2
    cat "$T/section.md"
fi
mkdir -p "$HERE/out"
cp "$RES" "$HERE/out/results-$(date -u +%Y%m%d-%H%M%S).txt"
