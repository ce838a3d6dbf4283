#!/usr/bin/env python3
"""Attributes perf samples of the gateway to parts of the request path.

  perf script -i perf.data -F comm,tid,ip,sym --no-inline | bench/perf-buckets.py [REQUESTS] [CPU_SECONDS]

Each sample (with its DWARF call chain) goes to the first bucket below whose pattern appears
in its stack (innermost-first rules are listed first), so the buckets add up to 100%. With
REQUESTS and the gateway's CPU seconds over the recording, each bucket is also shown in
microseconds of CPU per request.
"""

import re
import sys
from collections import Counter

# (bucket, thread-name regex or None, stack regex or None). First match wins.
RULES = [
    ("ledger: SQLite writer thread (rusqlite)", r"^switchyard-ledg", None),
    ("ledger: sqlx-sqlite worker threads (reads)", r"^sqlx-sqlite", None),
    ("ledger: writer task (batches, paces the writer thread)", None, r"LedgerWriter::start|ledger::store::Store::write|SqliteWriter::write"),
    ("access log line and per-request metrics (LogLine::emit)", None, r"telemetry::LogLine::emit"),
    ("metrics (prometheus label lookups, observe)", None, r"prometheus::|MetricVec"),
    ("cache: key (canonical JSON + sha256)", None, r"switchyard::cache::key|switchyard::cache::write_canonical"),
    ("cache: store answer (moka insert)", None, r"switchyard::cache::Leader::store|cache::Leader::finish|moka::sync::cache::Cache<K,V,S>::insert"),
    ("cache: lookup", None, r"switchyard::cache::Cache::lookup|moka::"),
    ("usage/cost: parse the answer (serde_json Value)", None, r"Usage::from_answer|ledger::event_json|ledger::Tap::sse_chunk"),
    ("ledger: Tap::finish / RequestRecord::finish (pricing, settle)", None, r"ledger::Tap::finish|RequestRecord::finish|policy::.*settle"),
    ("admission: limits + budget (policy)", None, r"switchyard::policy::"),
    ("auth: key lookup (sha256)", None, r"switchyard::auth::"),
    ("request parse (ApiRequest::parse, body edits)", None, r"ApiRequest::parse|ApiRequest::upstream_body|api::body::"),
    ("route pick + bookkeeping", None, r"switchyard::route::(?!Route::send_once|Route::attempt)|route::state::"),
    ("upstream client: request building (URL, headers, body)", None, r"reqwest::async_impl::request|reqwest::async_impl::client::Client::(execute_request|request|post)|into_url|url::parser|HttpUpstream::url|HttpUpstream::body|http::uri::Uri::from_shared"),
    ("upstream client: hyper client connection (read/write syscalls)", None, r"hyper::client::|hyper_util::client::legacy::client::Client|reqwest::connect|PendingRequest|HttpUpstream::send"),
    ("response body passing (Tap/LoggedBody/guard)", None, r"ledger::Tap as http_body|LoggedBody|UpstreamStream|stream::guard"),
    ("request id (rand + format)", None, r"new_request_id"),
    ("handler: other (headers, body collect, responses)", None, r"switchyard::server::handler|switchyard::telemetry::AccessLog|RequestIdService"),
    ("server: hyper server connection (parse, write syscalls)", None, r"hyper::proto::h1|hyper::server|serve::\{\{closure\}\}"),
    ("tokio scheduler / epoll / park", None, r"tokio::runtime|mio::|epoll"),
    ("malloc/free (unattributed)", None, r"malloc|free|_int_"),
]


def main():
    requests = float(sys.argv[1]) if len(sys.argv) > 1 else None
    cpu_s = float(sys.argv[2]) if len(sys.argv) > 2 else None
    compiled = [(n, re.compile(t) if t else None, re.compile(s) if s else None) for n, t, s in RULES]
    import os
    debug = os.environ.get("BUCKET")
    leaves = Counter()
    counts = Counter()
    kernel = Counter()
    total = 0
    comm, frames = None, []

    def flush():
        nonlocal total
        if comm is None:
            return
        total += 1
        stack = "\n".join(frames)
        bucket = "other"
        for name, t, s in compiled:
            if t is not None and not t.search(comm):
                continue
            if s is not None and not s.search(stack):
                continue
            bucket = name
            break
        counts[bucket] += 1
        if debug and debug in bucket:
            user = [f for f in frames if not f.startswith("[k]")]
            leaves[(user[0] if user else frames[0])[:150]] += 1
        if frames and frames[0].startswith("[k]"):
            kernel[bucket] += 1

    for line in sys.stdin:
        if not line.strip():
            flush()
            comm, frames = None, []
            continue
        if not line[0].isspace():
            flush()
            comm, frames = line.split()[0], []
            continue
        parts = line.strip().split(None, 1)
        if len(parts) == 2:
            addr, sym = parts
            frames.append(("[k] " if addr.startswith("ffffffff") else "") + sym)
    flush()

    per_req = (cpu_s * 1e6 / requests / total) if (requests and cpu_s and total) else None
    print(f"{'share':>6} {'kernel':>6} " + (f"{'µs/req':>7} " if per_req else "") + "part of the request path")
    for name, n in counts.most_common():
        line = f"{100 * n / total:5.1f}% {100 * kernel[name] / max(n, 1):5.0f}% "
        if per_req:
            line += f"{n * per_req:7.1f} "
        print(line + name)
    for leaf, n in leaves.most_common(40):
        print(f"   {100 * n / total:5.2f}% {leaf}")
    print(f"({total} samples; 'kernel' is the part of each bucket's samples spent in the kernel)")


if __name__ == "__main__":
    main()
