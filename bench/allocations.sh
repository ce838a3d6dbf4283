#!/usr/bin/env bash
# Heap allocations per request under valgrind's DHAT, for one or more Switchyard binaries,
# and the sites that allocate the most per request. Like instructions.sh, it does not move
# with the machine's noise: the same binary gives the same count within a fraction of one
# allocation per request (start-up allocations are spread over the requests; more requests,
# less of that).
#
#   bench/allocations.sh after=target/release/switchyard
#   CONFIG=real bench/allocations.sh before=/tmp/old/switchyard after=target/release/switchyard
#
# Each binary serves the bench config under `valgrind --tool=dhat`; `wrk -c4` runs for
# DURATION seconds; the gateway is stopped (SIGINT, so its ledger is written) and
# bench/dhat-sites.py reads the profile. Counts every thread (the SQLite ledger's included).
# Environment: CONFIG (bare | real; bare), DURATION (5), REAL_CACHE_MAX (8MiB), SITES (25:
# how many allocation sites to list; 0 for none), KEEP=1 (keeps the dhat files; open them in
# valgrind's dh_view.html for the full call trees).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
CONFIG=${CONFIG:-bare}
DURATION=${DURATION:-5}
SITES=${SITES:-25}
[ $# -gt 0 ] || { echo "usage: $0 NAME=PATH [NAME=PATH ...]" >&2; exit 2; }
for tool in wrk valgrind python3; do
    command -v "$tool" >/dev/null || { echo "missing: $tool (apt-get install -y wrk valgrind)" >&2; exit 1; }
done
[ -x "$UPSTREAM_BIN" ] || (cd "$HERE/upstream" && cargo build --release -q)

bench_setup allocations

for spec in "$@"; do
    name=${spec%%=*}
    bin=$(realpath "${spec#*=}")
    d=$T/$name
    mkdir -p "$d"
    write_configs "$d" "$UP" "$(free_port)"
    start_gateway "$d" "$bin" valgrind --tool=dhat --dhat-out-file="$d/dhat.json"
    pid=$GW_PID url=$GW_URL
    out=$(taskset -c 1 wrk -t1 -c4 -d"${DURATION}s" -s "$HERE/wrk/chat.lua" "$url" -- "$auth" "alloc-$name-$RANDOM")
    requests=$(echo "$out" | awk -F= '/^requests=/{print $2}')
    # Past one ledger flush, then a clean stop: the rows' inserts are in the count.
    sleep 0.6
    kill -INT "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    echo "== $name ($CONFIG): $requests requests"
    python3 "$HERE/dhat-sites.py" "$d/dhat.json" "$requests" "$SITES"
done
