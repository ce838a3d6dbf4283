//! Streaming load generator for the benchmark: N keep-alive connections, each sending
//! streamed chat requests back to back for a while; per stream it measures the time to the
//! first body byte, the total time, and when each SSE event arrived, to tell chunks passed
//! through as they come from chunks held back and sent together (buffering).
//!
//!   sse-load --url http://127.0.0.1:8080/v1/chat/completions --connections 32 --duration 10 \
//!            [--header 'Authorization: Bearer sk-…'] [--body '{"…{n}…"}'] \
//!            [--expect-events 20] [--bunch-ms 2]
//!
//! `{n}` in the body is replaced by a counter, so no two requests are the same. Connections are
//! all opened (TCP and nothing else) before the clock starts; times exclude connecting.
//! Prints `key=value` lines (times in microseconds).

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

struct Args {
    url: String,
    connections: usize,
    duration: Duration,
    headers: Vec<(String, String)>,
    body: String,
    expect_events: usize,
    bunch: Duration,
    /// Connection i sends its first request i/N of this late (0: all at once).
    spread: Duration,
}

#[derive(Default)]
struct Results {
    streams: u64,
    errors: u64,
    statuses: std::collections::BTreeMap<u16, u64>,
    ttfb_us: Vec<f64>,
    total_us: Vec<f64>,
    /// Time from the first to the `expect_events`-th event of each stream.
    spread_us: Vec<f64>,
    /// Events per stream.
    events: Vec<usize>,
    /// Gaps between consecutive content events (first `expect_events`) that were shorter
    /// than `bunch`: arrived together.
    gaps: u64,
    bunched_gaps: u64,
    /// Streams whose content events all arrived within one `bunch` window.
    fully_bunched: u64,
    /// Largest number of streams open at once.
    peak_open: usize,
    open: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        url: String::new(),
        connections: 32,
        duration: Duration::from_secs(10),
        headers: Vec::new(),
        body: r#"{"model":"bench","stream":true,"messages":[{"role":"user","content":"stream {n}"}]}"#
            .to_string(),
        expect_events: 20,
        bunch: Duration::from_millis(2),
        spread: Duration::ZERO,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--url" => a.url = v(),
            "--connections" | "-c" => a.connections = v().parse().expect("--connections N"),
            "--duration" | "-d" => {
                a.duration = Duration::from_secs_f64(v().parse().expect("--duration SECONDS"))
            }
            "--header" | "-H" => {
                let h = v();
                let (n, val) = h.split_once(':').expect("--header 'Name: value'");
                a.headers.push((n.trim().to_string(), val.trim().to_string()));
            }
            "--body" => a.body = v(),
            "--expect-events" => a.expect_events = v().parse().expect("--expect-events N"),
            "--spread-ms" => {
                a.spread = Duration::from_secs_f64(v().parse::<f64>().expect("--spread-ms MS") / 1e3)
            }
            "--bunch-ms" => {
                a.bunch = Duration::from_secs_f64(v().parse::<f64>().expect("--bunch-ms MS") / 1e3)
            }
            _ => panic!("unknown argument {k}"),
        }
    }
    assert!(!a.url.is_empty(), "--url is required");
    a
}

fn split_url(url: &str) -> (String, String) {
    let rest = url.strip_prefix("http://").expect("--url must be http://");
    match rest.find('/') {
        Some(i) => (rest[..i].to_string(), rest[i..].to_string()),
        None => (rest.to_string(), "/".to_string()),
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn main() {
    let args = Rc::new(parse_args());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    let results = Rc::new(RefCell::new(Results::default()));
    let counter = Rc::new(RefCell::new(0u64));
    local.block_on(&rt, async {
        let (authority, path) = split_url(&args.url);
        // Connect everything first.
        let mut senders = Vec::with_capacity(args.connections);
        for _ in 0..args.connections {
            let tcp = TcpStream::connect(&authority).await.expect("connect");
            let _ = tcp.set_nodelay(true);
            let (sender, conn) = http1::handshake::<_, Full<Bytes>>(TokioIo::new(tcp))
                .await
                .expect("handshake");
            tokio::task::spawn_local(async move {
                let _ = conn.await;
            });
            senders.push(sender);
        }
        let start = Instant::now();
        let deadline = start + args.duration;
        let mut tasks = Vec::new();
        let n_conns = senders.len() as u32;
        for (i, mut sender) in senders.into_iter().enumerate() {
            let (args, results, counter) = (args.clone(), results.clone(), counter.clone());
            let (authority, path) = (authority.clone(), path.clone());
            tasks.push(tokio::task::spawn_local(async move {
                // Connection i starts i/N of the spread late, so that the streams do not
                // all begin (and end, and begin again) at the same moment.
                tokio::time::sleep(args.spread * i as u32 / n_conns).await;
                while Instant::now() < deadline {
                    if sender.ready().await.is_err() {
                        results.borrow_mut().errors += 1;
                        return;
                    }
                    let n = {
                        let mut c = counter.borrow_mut();
                        *c += 1;
                        *c
                    };
                    let body = args.body.replace("{n}", &n.to_string());
                    let mut req = Request::post(path.as_str())
                        .header("host", authority.as_str())
                        .header("content-type", "application/json")
                        .header("accept", "text/event-stream");
                    for (k, v) in &args.headers {
                        req = req.header(k.as_str(), v.as_str());
                    }
                    let req = req.body(Full::new(Bytes::from(body))).expect("request");
                    let sent = Instant::now();
                    {
                        let mut r = results.borrow_mut();
                        r.open += 1;
                        r.peak_open = r.peak_open.max(r.open);
                    }
                    let outcome = run_one(&mut sender, req, sent, &args).await;
                    let mut r = results.borrow_mut();
                    r.open -= 1;
                    match outcome {
                        Err(_) => {
                            r.errors += 1;
                            return;
                        }
                        Ok(s) => {
                            *r.statuses.entry(s.status).or_default() += 1;
                            if s.status != 200 {
                                r.errors += 1;
                                continue;
                            }
                            r.streams += 1;
                            if let Some(t) = s.ttfb {
                                r.ttfb_us.push(t.as_secs_f64() * 1e6);
                            }
                            r.total_us.push(s.total.as_secs_f64() * 1e6);
                            r.events.push(s.event_times.len());
                            let content = &s.event_times[..s.event_times.len().min(args.expect_events)];
                            if content.len() >= 2 {
                                let spread = content[content.len() - 1] - content[0];
                                r.spread_us.push(spread.as_secs_f64() * 1e6);
                                if spread < args.bunch {
                                    r.fully_bunched += 1;
                                }
                                for w in content.windows(2) {
                                    r.gaps += 1;
                                    if w[1] - w[0] < args.bunch {
                                        r.bunched_gaps += 1;
                                    }
                                }
                            }
                        }
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let mut r = results.borrow_mut();
        let streams = r.streams;
        println!("streams={streams}");
        println!("errors={}", r.errors);
        println!(
            "statuses={}",
            r.statuses
                .iter()
                .map(|(s, n)| format!("{s}:{n}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        println!("elapsed_s={elapsed:.3}");
        println!("streams_per_s={:.1}", streams as f64 / elapsed);
        println!("peak_open={}", r.peak_open);
        for (name, p) in [("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("max", 100.0)] {
            println!("ttfb_{name}_us={:.0}", pct(&mut r.ttfb_us, p));
        }
        for (name, p) in [("p50", 50.0), ("p99", 99.0)] {
            println!("total_{name}_us={:.0}", pct(&mut r.total_us, p));
        }
        for (name, p) in [("p1", 1.0), ("p50", 50.0)] {
            println!("spread_{name}_us={:.0}", pct(&mut r.spread_us, p));
        }
        let mut ev: Vec<f64> = r.events.iter().map(|&e| e as f64).collect();
        println!("events_p50={:.0}", pct(&mut ev, 50.0));
        println!("events_min={:.0}", pct(&mut ev, 0.0));
        println!(
            "bunched_gap_frac={:.4}",
            if r.gaps == 0 { 0.0 } else { r.bunched_gaps as f64 / r.gaps as f64 }
        );
        println!("fully_bunched_streams={}", r.fully_bunched);
    });
}

struct StreamResult {
    status: u16,
    ttfb: Option<Duration>,
    total: Duration,
    /// When each SSE event (a `\n\n`-terminated block) was complete, from `sent`.
    event_times: Vec<Duration>,
}

async fn run_one(
    sender: &mut http1::SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
    sent: Instant,
    _args: &Args,
) -> Result<StreamResult, hyper::Error> {
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut ttfb = None;
    let mut event_times = Vec::with_capacity(24);
    let mut prev_nl = false;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        let Some(data) = frame.data_ref() else { continue };
        if data.is_empty() {
            continue;
        }
        let now = Instant::now() - sent;
        if ttfb.is_none() {
            ttfb = Some(now);
        }
        for &b in data.iter() {
            if b == b'\n' {
                if prev_nl {
                    event_times.push(now);
                    prev_nl = false;
                } else {
                    prev_nl = true;
                }
            } else if b != b'\r' {
                prev_nl = false;
            }
        }
    }
    Ok(StreamResult {
        status,
        ttfb,
        total: Instant::now() - sent,
        event_times,
    })
}
