#!/usr/bin/env python3
"""Helpers of bench/run.sh.

  report.py overhead BEFORE.prom AFTER.prom   switchyard_overhead_seconds between two scrapes
  report.py markdown RESULTS.txt              one run's section for RESULTS.md
  report.py insert RESULTS.md SECTION.md      puts a section at the top of the runs
"""

import math
import re
import sys

TARGETS = ["direct", "nginx", "floor", "sy-bare", "sy-real"]
NAMES = {
    "direct": "direct (no proxy)",
    "nginx": "nginx proxy_pass",
    "floor": "hyper floor (no gateway logic)",
    "sy-bare": "Switchyard, bare",
    "sy-real": "Switchyard, realistic",
}
MARKER = "<!-- runs: bench/run.sh inserts each new run below this line, newest first -->"


# ---------------------------------------------------------------- overhead histogram

def histogram(path, name="switchyard_overhead_seconds"):
    """Buckets (le -> cumulative count), sum and count, summed over every label set."""
    buckets, total, count = {}, 0.0, 0.0
    pat = re.compile(r"^" + name + r"_(bucket|sum|count)(\{[^}]*\})?\s+(\S+)")
    with open(path) as f:
        for line in f:
            m = pat.match(line)
            if not m:
                continue
            kind, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
            if kind == "bucket":
                le = re.search(r'le="([^"]+)"', labels).group(1)
                le = math.inf if le == "+Inf" else float(le)
                buckets[le] = buckets.get(le, 0.0) + value
            elif kind == "sum":
                total += value
            else:
                count += value
    return buckets, total, count


def quantile(buckets, q):
    """Prometheus-style histogram_quantile (linear within the bucket)."""
    les = sorted(buckets)
    if not les or buckets[les[-1]] <= 0:
        return math.nan
    rank = q * buckets[les[-1]]
    prev_le, prev_c = 0.0, 0.0
    for le in les:
        c = buckets[le]
        if c >= rank:
            if le == math.inf:
                return prev_le
            if c == prev_c:
                return le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return les[-1]


def overhead(before, after):
    b0, s0, c0 = histogram(before)
    b1, s1, c1 = histogram(after)
    delta = {le: b1.get(le, 0.0) - b0.get(le, 0.0) for le in b1}
    n = c1 - c0
    print(f"oh_count={int(n)}")
    if n > 0:
        print(f"oh_mean_us={(s1 - s0) / n * 1e6:.1f}")
        print(f"oh_p50_us={quantile(delta, 0.5) * 1e6:.1f}")
        print(f"oh_p99_us={quantile(delta, 0.99) * 1e6:.1f}")


# ---------------------------------------------------------------- markdown

ROUND = re.compile(r"^(?P<head>[^.]+\.[^.]+)\.r(?P<round>\d+)\.(?P<key>.+)$")


def load(path):
    r = {}
    rounds = {}
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if "=" in line:
                k, v = line.split("=", 1)
                m = ROUND.match(k)
                if m:
                    rounds.setdefault(f"{m['head']}.{m['key']}", []).append(v)
                else:
                    r[k] = v
    # Several rounds of a measurement: CPU ticks and counts add up (CPU per request is then
    # the mean over all rounds), peaks take the highest, everything else the median.
    for k, vs in rounds.items():
        try:
            xs = sorted(float(v) for v in vs)
        except ValueError:
            r[k] = vs[-1]
            continue
        last = k.rsplit(".", 1)[-1]
        if last in ("cpu_ticks", "user_ticks", "requests", "streams", "errors", "fully_bunched_streams"):
            v = sum(xs)
        elif last in ("hwm_kib", "peak_open"):
            v = xs[-1]
        else:
            n = len(xs)
            v = xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2
        r[k] = repr(v)
    return r


def num(r, key):
    try:
        v = float(r[key])
        return None if math.isnan(v) else v
    except (KeyError, ValueError):
        return None


def name(t):
    base, _, variant = t.partition("@")
    return NAMES.get(base, base) + (f" [{variant}]" if variant else "")


def fmt(v, digits=0, unit=""):
    if v is None:
        return "–"
    if digits == 0:
        return f"{v:,.0f}{unit}"
    return f"{v:,.{digits}f}{unit}"


def markdown(path):
    r = load(path)
    tick_us = 1e6 / float(r.get("meta.clk_tck", "100"))
    conc, streams, many = r["meta.conc"], r["meta.streams"], r["meta.many_streams"]
    c_hi, s_lo, s_hi = f"c{conc}", f"s{streams}", f"s{many}"
    order = r.get("meta.targets", " ".join(TARGETS)).split()
    targets = [t for t in order if f"{t}.c1.requests" in r]
    out = []
    w = out.append

    def cpu_per(t, scen, count_key):
        ticks, n = num(r, f"{t}.{scen}.cpu_ticks"), num(r, f"{t}.{scen}.{count_key}")
        if ticks is None or not n:
            return None
        return ticks * tick_us / n

    def user_kernel(t, scen, count_key):
        """CPU per request split into user space and kernel, as "u + k" (older runs: –)."""
        user, total = num(r, f"{t}.{scen}.user_ticks"), cpu_per(t, scen, count_key)
        n = num(r, f"{t}.{scen}.{count_key}")
        if user is None or total is None or not n:
            return "–"
        u = user * tick_us / n
        return f"{u:.1f} + {total - u:.1f}"

    def mib(t, scen):
        v = num(r, f"{t}.{scen}.hwm_kib")
        return None if v is None else v / 1024

    def ms(v):
        return None if v is None else v / 1000

    label = f" — {r['meta.label']}" if r.get("meta.label") else ""
    w(f"## Run of {r['meta.date']}{label}\n")
    w(f"- Machine: {r['meta.cpu']}, {r['meta.kernel']}; load average at start {r['meta.loadavg']}")
    w(f"- Versions: {r['meta.rustc']}; nginx {r['meta.nginx']}; {r['meta.wrk']}; Switchyard at {r['meta.commit']}")
    rounds = r.get("meta.rounds", "1")
    w(f"- {r['meta.duration']} s per measurement, {rounds} round(s) with the targets taking turns "
      f"(median of the rounds; CPU per request over all of them); proxy on core 0, mock upstream and load generator on core 1; loopback")
    if "meta.real_cache_max" in r:
        w(f"- realistic config: `cache.max_bytes` {r['meta.real_cache_max']}")
    spread = r.get("meta.spread_ms", "0")
    w(f"- streams: the connections' first requests spread over {spread} ms"
      + (" (all at once: the streams stay in step, see bench/README.md)" if spread == "0" else ""))
    w("")

    # 1. latency at concurrency 1
    d50, d99 = num(r, "direct.c1.lat_p50_us"), num(r, "direct.c1.lat_p99_us")
    w("### Latency at concurrency 1 (`wrk -t1 -c1`, µs)\n")
    w("| | p50 | p99 | added p50 | added p99 | CPU per request | requests |")
    w("|---|---:|---:|---:|---:|---:|---:|")
    for t in targets:
        p50, p99 = num(r, f"{t}.c1.lat_p50_us"), num(r, f"{t}.c1.lat_p99_us")
        a50 = None if t == "direct" or d50 is None else p50 - d50
        a99 = None if t == "direct" or d99 is None else p99 - d99
        w(f"| {name(t)} | {fmt(p50)} | {fmt(p99)} | {fmt(a50)} | {fmt(a99)} | "
          f"{fmt(cpu_per(t, 'c1', 'requests'), 1)} | {fmt(num(r, f'{t}.c1.requests'))} |")
    w("")

    # 2. throughput
    w(f"### Throughput at concurrency {conc} (`wrk -t1 -c{conc}`)\n")
    w("| | requests/s | p50 µs | p99 µs | CPU per request µs | of it user + kernel µs | peak RSS MiB | errors |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|")
    for t in targets:
        w(f"| {name(t)} | {fmt(num(r, f'{t}.{c_hi}.rps'))} | {fmt(num(r, f'{t}.{c_hi}.lat_p50_us'))} | "
          f"{fmt(num(r, f'{t}.{c_hi}.lat_p99_us'))} | {fmt(cpu_per(t, c_hi, 'requests'), 1)} | "
          f"{user_kernel(t, c_hi, 'requests')} | {fmt(mib(t, c_hi), 1)} | {fmt(num(r, f'{t}.{c_hi}.errors'))} |")
    w("")

    # 3 and 4. streams
    for scen, title in [(s_lo, f"{streams} concurrent streams"), (s_hi, f"{many} concurrent streams")]:
        w(f"### {title} (20 chunks 5 ms apart; `sse-load -c {scen[1:]}`)\n")
        w("| | streams/s | TTFB p50 ms | TTFB p99 ms | total p50 ms | first→20th chunk p50 / p1 ms | "
          "chunk gaps < 2 ms | all 20 within 2 ms | CPU per stream µs | peak RSS MiB | peak open | errors |")
        w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for t in targets:
            g = num(r, f"{t}.{scen}.bunched_gap_frac")
            w(f"| {name(t)} | {fmt(num(r, f'{t}.{scen}.streams_per_s'))} | "
              f"{fmt(ms(num(r, f'{t}.{scen}.ttfb_p50_us')), 2)} | {fmt(ms(num(r, f'{t}.{scen}.ttfb_p99_us')), 2)} | "
              f"{fmt(ms(num(r, f'{t}.{scen}.total_p50_us')), 1)} | {fmt(ms(num(r, f'{t}.{scen}.spread_p50_us')), 1)} / "
              f"{fmt(ms(num(r, f'{t}.{scen}.spread_p1_us')), 1)} | "
              f"{'–' if g is None else f'{g * 100:.1f}%'} | {fmt(num(r, f'{t}.{scen}.fully_bunched_streams'))} | "
              f"{fmt(cpu_per(t, scen, 'streams'), 0)} | "
              f"{fmt(mib(t, scen), 1)} | {fmt(num(r, f'{t}.{scen}.peak_open'))} | {fmt(num(r, f'{t}.{scen}.errors'))} |")
        w("")

    # 5. overhead histogram
    sy = [t for t in targets if t.startswith("sy-")]
    if sy:
        w("### `switchyard_overhead_seconds` against the measured added latency (µs)\n")
        w(f"| | added p50 (c1) | histogram mean (c1) | histogram median (c1) | histogram mean (c{conc}) | histogram median (c{conc}) |")
        w("|---|---:|---:|---:|---:|---:|")
        for t in sy:
            a50 = None if d50 is None else num(r, f"{t}.c1.lat_p50_us") - d50
            w(f"| {name(t)} | {fmt(a50)} | {fmt(num(r, f'{t}.c1.oh_mean_us'))} | {fmt(num(r, f'{t}.c1.oh_p50_us'))} | "
              f"{fmt(num(r, f'{t}.{c_hi}.oh_mean_us'))} | {fmt(num(r, f'{t}.{c_hi}.oh_p50_us'))} |")
        w("")

    # 6. targets
    if "nginx" in targets and "direct" in targets and sy:
        n50 = num(r, "nginx.c1.lat_p50_us") - d50
        n99 = num(r, "nginx.c1.lat_p99_us") - d99
        ncpu = cpu_per("nginx", c_hi, "requests")
        nttfb50, nttfb99 = num(r, f"nginx.{s_lo}.ttfb_p50_us"), num(r, f"nginx.{s_lo}.ttfb_p99_us")
        expect_spread = 19 * 5000.0

        def verdict(v, limit, fmt_v, le=True):
            if v is None:
                return "–"
            ok = v <= limit if le else v >= limit
            return f"{fmt_v(v)} {'PASS' if ok else 'FAIL'}"

        ratio = lambda v: f"{v:.2f}×"
        rows = []
        rows.append(("added latency p50 vs nginx's", "≤ 1.5×",
                     lambda t: verdict((num(r, f"{t}.c1.lat_p50_us") - d50) / n50 if n50 > 0 else None, 1.5, ratio)))
        rows.append(("added latency p99 vs nginx's", "≤ 2×",
                     lambda t: verdict((num(r, f"{t}.c1.lat_p99_us") - d99) / n99 if n99 > 0 else None, 2.0, ratio)))
        rows.append((f"CPU per request vs nginx's (c{conc})", "≤ 1.5× (realistic)",
                     lambda t: verdict(cpu_per(t, c_hi, "requests") / ncpu if ncpu else None, 1.5, ratio)))
        rows.append((f"stream TTFB p50 vs nginx's (c{streams})", "≤ 1×",
                     lambda t: verdict(num(r, f"{t}.{s_lo}.ttfb_p50_us") / nttfb50 if nttfb50 else None, 1.0, ratio)))
        rows.append((f"stream TTFB p99 vs nginx's (c{streams})", "≤ 1×",
                     lambda t: verdict(num(r, f"{t}.{s_lo}.ttfb_p99_us") / nttfb99 if nttfb99 else None, 1.0, ratio)))

        def no_buffering(t):
            vals = []
            for s, allowed in ((s_lo, 0.0), (s_hi, 0.001)):
                sp = num(r, f"{t}.{s}.spread_p50_us")
                fb = num(r, f"{t}.{s}.fully_bunched_streams") or 0
                n = num(r, f"{t}.{s}.streams") or 1
                if sp is None:
                    continue
                vals.append(sp >= 0.8 * expect_spread and fb / n <= allowed)
            if not vals:
                return "–"
            sp = num(r, f"{t}.{s_lo}.spread_p50_us") / 1000
            return f"first→20th chunk {sp:.0f} ms {'PASS' if all(vals) else 'FAIL'}"

        rows.append(("no buffering of chunks", f"first→20th ≥ 76 ms (p50); all 20 within 2 ms: none at {streams}, ≤ 0.1% at {many}",
                     no_buffering))
        rows.append(("peak RSS at c1, c64, 32 streams", "< 30 MiB",
                     lambda t: verdict(max(filter(None, [mib(t, "c1"), mib(t, c_hi), mib(t, s_lo)]), default=None),
                                       30.0, lambda v: f"{v:.1f} MiB", le=True)))
        rows.append((f"peak RSS with {many} open streams", "< 200 MiB",
                     lambda t: verdict(mib(t, s_hi), 200.0, lambda v: f"{v:.1f} MiB")))
        def vs_bare(t):
            if not t.startswith("sy-real"):
                return "–"
            bare = cpu_per(t.replace("sy-real", "sy-bare"), c_hi, "requests")
            mine = cpu_per(t, c_hi, "requests")
            return verdict(mine / bare if bare and mine else None, 1.2, ratio)

        rows.append((f"CPU per request vs bare (c{conc})", "≤ 1.2× (realistic)", vs_bare))

        def agrees(t):
            a = num(r, f"{t}.c1.lat_p50_us") - d50
            m = num(r, f"{t}.c1.oh_mean_us")
            if m is None or a <= 0:
                return "–"
            return verdict(m / a, 1.5, lambda v: f"mean {m:.0f} µs = {v:.2f}× added") if m / a >= 0.5 \
                else f"mean {m:.0f} µs = {m / a:.2f}× added FAIL"

        rows.append(("overhead histogram agrees with added p50 (c1)", "mean within 0.5–1.5× of added", agrees))

        w(f"### Targets (nginx: added p50 {n50:.0f} µs, p99 {n99:.0f} µs; CPU {fmt(ncpu, 1)} µs per request)\n")
        fcpu = cpu_per("floor", c_hi, "requests") if "floor" in targets else None
        if fcpu and ncpu:
            f50 = num(r, "floor.c1.lat_p50_us") - d50
            w(f"The hyper floor (the same server and client crates with no gateway logic) uses {fcpu:.1f} µs "
              f"of CPU per request at c{conc} = {fcpu / ncpu:.2f}× nginx's, and adds {f50:.0f} µs at the median "
              f"= {f50 / n50:.2f}× nginx's: what is left under each target for the gateway's own work.\n")
        w("| check | target | " + " | ".join(name(t) for t in sy) + " |")
        w("|---|---|" + "---|" * len(sy))
        for check, target, f in rows:
            w(f"| {check} | {target} | " + " | ".join(f(t) for t in sy) + " |")
        w("")
    return "\n".join(out) + "\n"


HEADER = """# Benchmark results

Produced by `bench/run.sh` (see `bench/README.md` for what each number means). Every run is
one section: all targets measured side by side in that run, so compare ratios within a run,
not absolute numbers across runs (other work on the machine moves them).

""" + MARKER + "\n"


def insert(results_md, section_md):
    try:
        text = open(results_md).read()
    except FileNotFoundError:
        text = HEADER
    if MARKER not in text:
        text = text.rstrip("\n") + "\n\n" + MARKER + "\n"
    section = open(section_md).read()
    head, tail = text.split(MARKER, 1)
    text = head + MARKER + "\n\n" + section.rstrip("\n") + "\n" + tail
    open(results_md, "w").write(text)


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "overhead":
        overhead(sys.argv[2], sys.argv[3])
    elif cmd == "markdown":
        sys.stdout.write(markdown(sys.argv[2]))
    elif cmd == "insert":
        insert(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
