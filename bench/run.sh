#!/usr/bin/env bash
# Switchyard load benchmark: direct to a mock upstream, nginx as a plain reverse proxy, and
# Switchyard with a bare pass-through config and a realistic one, side by side in one run.
# Run by hand (not in CI); see bench/README.md. Appends a section to bench/RESULTS.md.
#
#   bench/run.sh                     # full run, ~3-4 minutes
#   LABEL=before bench/run.sh        # names the section in RESULTS.md
#   DURATION=5 TARGETS="nginx sy-real" bench/run.sh
#   EXTRA_BINS="fix=/tmp/fix/target/release/switchyard" bench/run.sh   # before and after, side by side
#
# Environment: DURATION (s per measurement, 10), WARMUP (s, 2), TARGETS
# ("direct nginx floor sy-bare sy-real", plus sy-bare@NAME sy-real@NAME for each EXTRA_BINS entry),
# EXTRA_BINS ("NAME=PATH ...": more Switchyard binaries measured with the same configs),
# SY_BIN (the main binary; target/release/switchyard), PROXY_CPU (0), LOAD_CPU (1),
# STREAMS (32), MANY_STREAMS (1000), CONC (64), REAL_CACHE_MAX (cache.max_bytes of the
# realistic config; default 256MiB), LABEL, OUT (bench/RESULTS.md; "-" prints
# to stdout), NO_BUILD=1 (use the binaries already built), KEEP=1 (keep the temp dir).
# Raw numbers of each run are kept in bench/out/ (not committed).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
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
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
STREAMS=${STREAMS:-32}
MANY_STREAMS=${MANY_STREAMS:-1000}
CONC=${CONC:-64}
LABEL=${LABEL:-}
OUT=${OUT:-$HERE/RESULTS.md}

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
put meta.label "$LABEL"
put meta.conc "$CONC"
put meta.streams "$STREAMS"
put meta.many_streams "$MANY_STREAMS"
put meta.targets "$TARGETS"
put meta.real_cache_max "${REAL_CACHE_MAX:-256MiB (default)}"
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

# ---- one target
run_target() {
    local target=$1 url auth="" pids=() base metrics_url=""
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
    url=$base/v1/chat/completions
    echo "== $target ($url)" >&2
    local prefix="$target-$(date +%s%N)"

    # wrk NAME CONNECTIONS
    wrk_scenario() {
        local name=$1 c=$2 before after out
        [ ${#pids[@]} -gt 0 ] && reset_hwm "${pids[@]}"
        [ ${#pids[@]} -gt 0 ] && before=$(cpu_ticks "${pids[@]}")
        out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$c" -d"${DURATION}s" --timeout 5s --latency \
            -s "$HERE/wrk/chat.lua" "$url" -- "$auth" "$prefix-$name")
        echo "$out" >"$T/$target-$name.wrk.txt"
        echo "$out" | grep -E '^[a-z_0-9]+=' | while IFS= read -r kv; do put "$target.$name.${kv%%=*}" "${kv#*=}"; done
        if [ ${#pids[@]} -gt 0 ]; then
            after=$(cpu_ticks "${pids[@]}")
            put "$target.$name.cpu_ticks" $((after - before))
            put "$target.$name.hwm_kib" "$(hwm_kib "${pids[@]}")"
        fi
        echo "   $name: $(echo "$out" | grep -E '^(rps|lat_p50_us|lat_p99_us|errors)=' | tr '\n' ' ')" >&2
    }
    # sse NAME CONNECTIONS
    sse_scenario() {
        local name=$1 c=$2 before after out args=()
        [ -n "$auth" ] && args=(--header "Authorization: $auth")
        [ ${#pids[@]} -gt 0 ] && reset_hwm "${pids[@]}"
        [ ${#pids[@]} -gt 0 ] && before=$(cpu_ticks "${pids[@]}")
        out=$(taskset -c "$LOAD_CPU" "$SSE_BIN" --url "$url" --connections "$c" --duration "$DURATION" \
            --expect-events $CHUNKS "${args[@]}" \
            --body "{\"model\":\"bench\",\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"stream $prefix-$name-{n}\"}]}")
        echo "$out" >"$T/$target-$name.sse.txt"
        echo "$out" | grep -E '^[a-z_0-9]+=' | while IFS= read -r kv; do put "$target.$name.${kv%%=*}" "${kv#*=}"; done
        if [ ${#pids[@]} -gt 0 ]; then
            after=$(cpu_ticks "${pids[@]}")
            put "$target.$name.cpu_ticks" $((after - before))
            put "$target.$name.hwm_kib" "$(hwm_kib "${pids[@]}")"
        fi
        echo "   $name: $(echo "$out" | grep -E '^(streams|errors|ttfb_p50_us|ttfb_p99_us|bunched_gap_frac)=' | tr '\n' ' ')" >&2
    }

    # Warm up (connections, caches, the allocator), not measured.
    taskset -c "$LOAD_CPU" wrk -t1 -c8 -d"${WARMUP}s" -s "$HERE/wrk/chat.lua" "$url" -- "$auth" "$prefix-warm" >/dev/null
    [ ${#pids[@]} -gt 0 ] && put "$target.idle_rss_kib" "$(awk '/^VmRSS/{s+=$2} END{print s}' $(printf '/proc/%s/status ' "${pids[@]}"))"

    [ -n "$metrics_url" ] && curl -s "$metrics_url" >"$T/$target-metrics-before.txt"
    wrk_scenario c1 1
    [ -n "$metrics_url" ] && curl -s "$metrics_url" >"$T/$target-metrics-c1.txt"
    wrk_scenario c$CONC "$CONC"
    [ -n "$metrics_url" ] && curl -s "$metrics_url" >"$T/$target-metrics-c$CONC.txt"
    sse_scenario s$STREAMS "$STREAMS"
    sse_scenario s$MANY_STREAMS "$MANY_STREAMS"

    if [ -n "$metrics_url" ]; then
        python3 "$HERE/report.py" overhead "$T/$target-metrics-before.txt" "$T/$target-metrics-c1.txt" |
            while IFS= read -r kv; do put "$target.c1.${kv%%=*}" "${kv#*=}"; done
        python3 "$HERE/report.py" overhead "$T/$target-metrics-c1.txt" "$T/$target-metrics-c$CONC.txt" |
            while IFS= read -r kv; do put "$target.c$CONC.${kv%%=*}" "${kv#*=}"; done
    fi
    if [ ${#pids[@]} -gt 0 ]; then
        kill "${pids[0]}"
        wait "${pids[0]}" 2>/dev/null || true
    fi
}

for t in $TARGETS; do run_target "$t"; done

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
