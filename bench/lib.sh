# Shared by every bench script: settings, helpers, the configs of every target.
# Source it after setting HERE (bench/).

ROOT=$(dirname "$HERE")
# Settings all scripts share (the environment overrides them): the cores of the proxy under
# test and of the load side, the concurrency of the throughput runs, and cache.max_bytes of
# the realistic config (8MiB: full within the first second of load; "" for the gateway's own
# default, 256MiB).
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
CONC=${CONC:-64}
REAL_CACHE_MAX=${REAL_CACHE_MAX-8MiB}

CHUNKS=20
CHUNK_DELAY_MS=5
CLIENT_KEY="sk-sy-benchmark0000000000000000000000000000"
UPSTREAM_BIN=$HERE/upstream/target/release/bench-upstream
SSE_BIN=$HERE/sse-load/target/release/sse-load
FLOOR_BIN=$HERE/floor/target/release/bench-floor
SY_BIN=${SY_BIN:-$ROOT/target/release/switchyard}

build_all() {
    echo "== building (release)" >&2
    (cd "$ROOT" && cargo build --release -q)
    (cd "$HERE/upstream" && cargo build --release -q)
    (cd "$HERE/sse-load" && cargo build --release -q)
    (cd "$HERE/floor" && cargo build --release -q)
}

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_file() { for _ in $(seq 200); do [ -s "$1" ] && return 0; sleep 0.05; done; echo "timed out waiting for $1" >&2; return 1; }
wait_http() { for _ in $(seq 200); do curl -s -o /dev/null "$1" && return 0; sleep 0.05; done; echo "timed out waiting for $1" >&2; return 1; }
# utime+stime (clock ticks) of the given processes, all their threads, live and exited.
cpu_ticks() { local s=0 p; for p in "$@"; do s=$((s + $(awk '{sub(/.*\) /,""); print $12+$13}' "/proc/$p/stat"))); done; echo $s; }
# user_ticks PID...: the user-space part of cpu_ticks (the rest is the kernel's).
user_ticks() { local s=0 p; for p in "$@"; do s=$((s + $(awk '{sub(/.*\) /,""); print $12}' "/proc/$p/stat"))); done; echo $s; }
# Sum of VmHWM (peak resident set, KiB); reset_hwm starts a new peak.
hwm_kib() { local s=0 p; for p in "$@"; do s=$((s + $(awk '/^VmHWM/{print $2}' "/proc/$p/status"))); done; echo $s; }
reset_hwm() { local p; for p in "$@"; do echo 5 >"/proc/$p/clear_refs"; done; }


# bench_setup NAME: for the tools that run one gateway at a time (instructions.sh,
# allocations.sh, pairs.sh, profile.sh): a temp folder $T (OUTDIR when set; removed at exit
# unless KEEP=1, after every process in PIDS is stopped), the mock upstream on LOAD_CPU at
# $UP, and $auth, the client key's Authorization value for CONFIG=real (empty for bare).
bench_setup() {
    T=${OUTDIR:-$(mktemp -d "/tmp/switchyard-$1.XXXXXX")}
    mkdir -p "$T"
    PIDS=()
    trap bench_cleanup EXIT
    taskset -c "$LOAD_CPU" "$UPSTREAM_BIN" --listen 127.0.0.1:0 --ready-file "$T/upstream.addr" 2>/dev/null &
    PIDS+=($!)
    wait_file "$T/upstream.addr"
    UP=$(cat "$T/upstream.addr")
    auth=""
    if [ "${CONFIG:-bare}" = real ]; then auth="Bearer $CLIENT_KEY"; fi
}
bench_cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ "${KEEP:-0}" = 1 ]; then echo "kept: $T" >&2; else rm -rf "$T"; fi
}

# start_gateway DIR BIN [WRAPPER ...]: BIN serving DIR's config for CONFIG (written by
# write_configs), pinned to PROXY_CPU (0), under WRAPPER when given (valgrind ...); waits
# until it listens. Sets GW_PID (the gateway's process, also added to PIDS) and GW_URL.
start_gateway() {
    local d=$1 bin=$2
    shift 2
    (cd "$d/sy-$CONFIG" && exec taskset -c "$PROXY_CPU" "$@" "$bin" serve \
        --config "$d/sy-$CONFIG/conf/routes.yaml" --listen 127.0.0.1:0 --ready-file "$d/addr" \
        >"$d/gateway.log" 2>&1) &
    GW_PID=$!
    PIDS+=("$GW_PID")
    for _ in $(seq 600); do [ -s "$d/addr" ] && break; sleep 0.1; done
    [ -s "$d/addr" ] || { echo "the gateway did not start; see $d/gateway.log" >&2; exit 1; }
    GW_URL=http://$(cat "$d/addr")/v1/chat/completions
}

# write_configs DIR UPSTREAM_ADDR NGINX_PORT: DIR/nginx/nginx.conf, DIR/sy-bare/conf/routes.yaml,
# DIR/sy-real/conf/routes.yaml. Each config sits in a folder of its own (Switchyard watches
# its config's folder), apart from its ledger.
write_configs() {
    local T=$1 UP=$2 NGINX_PORT=$3 KEY_HASH
    mkdir -p "$T/nginx/tmp" "$T/sy-bare/conf" "$T/sy-real/conf"
    cat >"$T/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $T/nginx/nginx.pid;
error_log $T/nginx/error.log warn;
worker_rlimit_nofile 65536;
events { worker_connections 16384; }
http {
    access_log $T/nginx/access.log;
    client_body_temp_path $T/nginx/tmp/body;
    proxy_temp_path $T/nginx/tmp/proxy;
    fastcgi_temp_path $T/nginx/tmp/fastcgi;
    uwsgi_temp_path $T/nginx/tmp/uwsgi;
    scgi_temp_path $T/nginx/tmp/scgi;
    keepalive_requests 100000000;
    upstream mock {
        server $UP;
        keepalive 1024;
        keepalive_requests 100000000;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT backlog=4096;
        location / {
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }
    }
}
EOF

    cat >"$T/sy-bare/conf/routes.yaml" <<EOF
# bare: one route, one openai deployment on the mock, no keys.
state:
  ledger: sqlite://$T/sy-bare/ledger.db
providers:
  up:
    kind: openai
    base_url: http://$UP/v1
models:
  bench:
    deployments:
      - { provider: up, deployment: bench-model }
EOF

    KEY_HASH=$(printf '%s' "$CLIENT_KEY" | sha256sum | cut -d' ' -f1)
    cat >"$T/sy-real/conf/routes.yaml" <<EOF
# realistic: a client key with limits and a budget, a route with two deployments, prices,
# the ledger on SQLite, a cache on the route (every request misses), metrics (always on).
state:
  ledger: sqlite://$T/sy-real/ledger.db
providers:
  up-a:
    kind: openai
    base_url: http://$UP/v1
    api_key: sk-upstream-a
  up-b:
    kind: openai
    base_url: http://$UP/v1
    api_key: sk-upstream-b
models:
  bench:
    pricing: { input_per_1m: 2.5, output_per_1m: 10 }
    cache: { ttl: 1m }
    deployments:
      - { provider: up-a, deployment: bench-model }
      - { provider: up-b, deployment: bench-model }
keys:
  - name: bench-client
    key: "sha256:$KEY_HASH"
    limits: { rpm: 100000000, tpm: 10000000000 }
    budget: { usd: 1000000, period: daily }
EOF
    # REAL_CACHE_MAX: bound the cache of the realistic config (empty: the gateway's default).
    if [ -n "${REAL_CACHE_MAX:-}" ]; then
        printf 'cache:\n  max_bytes: %s\n' "$REAL_CACHE_MAX" >>"$T/sy-real/conf/routes.yaml"
    fi
    for c in sy-bare sy-real; do
        "$SY_BIN" check --config "$T/$c/conf/routes.yaml" >"$T/$c/check.txt" 2>&1 || { cat "$T/$c/check.txt" >&2; return 1; }
    done
}
