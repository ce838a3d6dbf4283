//! Logs, defined once: the log setup and the one line each request writes when its response
//! body ends (so a stream is logged when it finishes, with its time to first byte). Secrets
//! are never fields of a log event.

pub mod clock;
pub mod metrics;

use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::io::Write as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tower::{Layer, Service};

use crate::server::body::{BoxError, ResponseBody};
use crate::server::request_id;
use crate::Name;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Sets up logging to stdout. Lines are gathered in memory and written by a thread of its
/// own every `LOG_FLUSH` (sooner past `LOG_HIGH_WATER` bytes), so no request waits on a
/// `write` to stdout or wakes a thread: at one request at a time, waking a log thread for
/// every line cost more CPU than formatting it. The returned guard writes what is gathered
/// when dropped (keep it until the process ends). Nothing is dropped: past `LOG_MAX` bytes
/// waiting, the logging thread writes them itself.
pub fn init_logging(format: LogFormat) -> LogGuard {
    let shared = Arc::new(LogShared::default());
    let flusher = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("switchyard-log".into())
            .spawn(move || shared.run())
            .ok()
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("SWITCHYARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(LogWriter(shared.clone()))
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
    let _ = REQUEST_LOG.set((shared.clone(), format));
    LogGuard { shared, flusher }
}

/// Where request lines go, and in which format: set by `init_logging` (without it, as in a
/// library user that sets up its own subscriber, no request lines are written).
static REQUEST_LOG: std::sync::OnceLock<(Arc<LogShared>, LogFormat)> = std::sync::OnceLock::new();

/// One request's log line: `<time>  INFO request k=v ...` or a flat JSON object, as
/// tracing's text and JSON formatters write events.
struct RequestLine {
    json: bool,
    out: String,
}

impl RequestLine {
    fn new(format: LogFormat) -> RequestLine {
        let json = format == LogFormat::Json;
        let mut out = String::with_capacity(384);
        if json {
            out.push_str("{\"timestamp\":\"");
            write_rfc3339_now(&mut out);
            out.push_str("\",\"level\":\"INFO\",\"message\":\"request\"");
        } else {
            write_rfc3339_now(&mut out);
            out.push_str("  INFO request");
        }
        RequestLine { json, out }
    }

    fn str(&mut self, name: &str, value: &str) {
        self.key(name);
        if self.json {
            json_string(&mut self.out, value);
        } else if value.is_empty() {
            // As tracing's text format shows a Display field: quoted only when it must be.
            self.out.push_str("\"\"");
        } else if value
            .bytes()
            .any(|b| b <= b' ' || b == b'"' || b == b'\\' || b == 0x7f)
        {
            let _ = write!(self.out, "{value:?}");
        } else {
            self.out.push_str(value);
        }
    }

    fn key(&mut self, name: &str) {
        if self.json {
            self.out.push_str(",\"");
            self.out.push_str(name);
            self.out.push_str("\":");
        } else {
            self.out.push(' ');
            self.out.push_str(name);
            self.out.push('=');
        }
    }

    fn int(&mut self, name: &str, value: u64) {
        self.key(name);
        self.out.push_str(itoa::Buffer::new().format(value));
    }

    fn flag(&mut self, name: &str, value: bool) {
        self.key(name);
        self.out.push_str(if value { "true" } else { "false" });
    }

    /// A duration in milliseconds, to the microsecond (`12.345`).
    fn ms(&mut self, name: &str, value: std::time::Duration) {
        self.key(name);
        let us = value.as_micros() as u64;
        self.out.push_str(itoa::Buffer::new().format(us / 1000));
        let frac = (us % 1000) as u32;
        self.out.push('.');
        push_digits(&mut self.out, frac, 3);
    }

    fn finish(mut self) -> Vec<u8> {
        if self.json {
            self.out.push('}');
        }
        self.out.push('\n');
        self.out.into_bytes()
    }
}

fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Writes now as `2026-11-28T21:42:16.279627Z` (UTC, microseconds), like tracing's
/// timestamps. The date and time to the second are formatted once per second per thread.
fn write_rfc3339_now(out: &mut String) {
    use std::cell::RefCell;
    thread_local! {
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let cached = SECOND.try_with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            c.1.clear();
            write_second(&mut c.1, secs);
            c.0 = secs;
        }
        out.push_str(&c.1);
    });
    if cached.is_err() {
        write_second(out, secs);
    }
    write_subsecond(out, since);
}

/// `.279627Z`: the microseconds of `since` and the zone.
fn write_subsecond(out: &mut String, since: std::time::Duration) {
    out.push('.');
    push_digits(out, since.subsec_micros(), 6);
    out.push('Z');
}

/// `2026-11-28T21:42:16` for seconds since the epoch.
fn write_second(out: &mut String, secs: u64) {
    let secs = secs as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
}

/// `value` as exactly `width` decimal digits (zero-padded; `value` < 10^width).
fn push_digits(out: &mut String, value: u32, width: u32) {
    let mut div = 10u32.pow(width - 1);
    while div > 0 {
        out.push(char::from(b'0' + (value / div % 10) as u8));
        div /= 10;
    }
}

#[cfg(test)]
fn rfc3339(since: std::time::Duration) -> String {
    let mut out = String::new();
    write_second(&mut out, since.as_secs());
    write_subsecond(&mut out, since);
    out
}

/// How long a log line may wait in memory before it is written.
const LOG_FLUSH: std::time::Duration = std::time::Duration::from_millis(20);
/// Gathered bytes that wake the writing thread before its time.
const LOG_HIGH_WATER: usize = 256 << 10;
/// Gathered bytes past which a logging thread writes them itself.
const LOG_MAX: usize = 4 << 20;

#[derive(Default)]
struct LogShared {
    lines: Mutex<Vec<u8>>,
    wake: Condvar,
    /// Held while writing to stdout, taken before `lines`: batches go out in order.
    out: Mutex<()>,
    stop: AtomicBool,
}

impl LogShared {
    /// Adds formatted bytes; wakes the writing thread past the high-water mark, or writes
    /// them here when far too much is waiting.
    fn push(&self, buf: &[u8]) {
        let len = {
            let mut lines = self.lock_lines();
            lines.extend_from_slice(buf);
            lines.len()
        };
        if len >= LOG_MAX {
            self.write_out();
        } else if len >= LOG_HIGH_WATER && len - buf.len() < LOG_HIGH_WATER {
            self.wake.notify_one();
        }
    }

    fn lock_lines(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes everything gathered so far.
    fn write_out(&self) {
        let _out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let batch = std::mem::take(&mut *self.lock_lines());
        if !batch.is_empty() {
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(&batch);
            let _ = stdout.flush();
        }
    }

    fn run(&self) {
        loop {
            {
                let lines = self.lock_lines();
                if lines.len() < LOG_HIGH_WATER && !self.stop.load(Ordering::Acquire) {
                    let _ = self.wake.wait_timeout(lines, LOG_FLUSH);
                }
            }
            self.write_out();
            if self.stop.load(Ordering::Acquire) {
                return;
            }
        }
    }
}

/// Flushes the gathered log lines and stops the writing thread when dropped.
pub struct LogGuard {
    shared: Arc<LogShared>,
    flusher: Option<std::thread::JoinHandle<()>>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.notify_one();
        match self.flusher.take() {
            Some(t) => {
                let _ = t.join();
            }
            None => self.shared.write_out(),
        }
    }
}

#[derive(Clone)]
struct LogWriter(Arc<LogShared>);

/// One formatted event (tracing's fmt layer writes each event with one `write_all`).
struct LogLineWriter<'a>(&'a LogShared);

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogLineWriter<'a>;
    fn make_writer(&'a self) -> Self::Writer {
        LogLineWriter(&self.0)
    }
}

impl std::io::Write for LogLineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What the handler learned about a request, for its log line. Set as a response extension.
#[derive(Debug, Clone, Default)]
pub struct RequestFacts {
    pub endpoint: &'static str,
    pub route: Name,
    pub deployment: Name,
    pub provider: Name,
    pub key: Name,
    pub team: Name,
    pub attempts: u32,
    /// The route asked for, when a fallback route served.
    pub fallback_from: Name,
    pub error_code: String,
    pub stream: bool,
    /// For a request sent upstream: how long the upstream took to begin its answer. With one
    /// attempt over HTTP/1, from the request's last byte written to the answer's first byte
    /// read (`clock::Exchange`); else from the dispatch to the answer's head (retries and
    /// their backoff included). With the time the response body waited on upstream chunks,
    /// it is what `switchyard_overhead_seconds` leaves out.
    pub upstream_wait: Option<std::time::Duration>,
    /// The operation, and the serving deployment's metric handles, when one served.
    pub op: Option<crate::api::Operation>,
    pub metrics: Option<Arc<metrics::DeploymentMetrics>>,
    /// The key's series on the serving deployment (shared with the request's ledger record).
    pub key_counters: Option<Arc<metrics::KeyCounters>>,
}

impl RequestFacts {
    /// The request's client key: its name and its team, for the log line and the metrics.
    pub fn of_key(&mut self, key: &crate::auth::ClientKey) {
        self.key.clone_from(&key.name);
        self.team = key.team.clone().unwrap_or_default();
    }
}

/// Writes one structured line per request when its response body ends or is dropped. Given
/// its connection's `Arrivals`, an HTTP/1 request's time starts at the read that brought its
/// first bytes; otherwise (HTTP/2's interleaved requests) as it is handed to the gateway.
#[derive(Clone, Default)]
pub struct AccessLogLayer {
    arrivals: Option<Arc<clock::Arrivals>>,
}

impl AccessLogLayer {
    /// For one client connection, read through `Clocked` with these `arrivals`.
    pub fn clocked(arrivals: Arc<clock::Arrivals>) -> Self {
        AccessLogLayer {
            arrivals: Some(arrivals),
        }
    }
}

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;
    fn layer(&self, inner: S) -> AccessLog<S> {
        AccessLog {
            inner,
            arrivals: self.arrivals.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AccessLog<S> {
    inner: S,
    arrivals: Option<Arc<clock::Arrivals>>,
}

impl<S, B> Service<Request<B>> for AccessLog<S>
where
    S: Service<Request<B>, Response = Response<ResponseBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let h1 = req.version() <= http::Version::HTTP_11;
        let start = match &self.arrivals {
            Some(a) if h1 => a.take(),
            // HTTP/2's requests interleave on the connection: none is timed by its reads.
            Some(a) => {
                a.opened();
                None
            }
            None => None,
        }
        .unwrap_or_else(Instant::now);
        let arrivals = self.arrivals.clone();
        let method = req.method().clone();
        let uri = req.uri().clone();
        let request_id = request_id(req.headers());
        let fut = self.inner.call(req);
        // Until the answer begins, a line for a request that never gets one: the client went
        // away (or the gateway shut down) and the handler was dropped, polled or not (so its
        // connection's clock is told it is done either way).
        let mut unanswered = Unanswered(Some(Pending {
            start,
            method,
            uri,
            request_id,
            arrivals,
        }));
        Box::pin(async move {
            let resp = fut.await?;
            let (mut parts, body) = resp.into_parts();
            let facts = parts
                .extensions
                .remove::<RequestFacts>()
                .unwrap_or_default();
            let Some(p) = unanswered.0.take() else {
                return Ok(Response::from_parts(parts, body.boxed_unsync()));
            };
            let line = p.line(parts.status.as_u16(), facts);
            let stream = parts.extensions.remove::<Arc<crate::stream::StreamState>>();
            let body = LoggedBody {
                inner: body,
                line,
                cut: None,
                ended: false,
                done: false,
                stream,
            }
            .boxed_unsync();
            Ok(Response::from_parts(parts, body))
        })
    }
}

struct LogLine {
    start: Instant,
    method: http::Method,
    /// The request's URI, kept for its path (a clone shares its bytes).
    uri: http::Uri,
    request_id: HeaderValue,
    status: u16,
    facts: RequestFacts,
    first_byte: Option<Instant>,
    bytes: u64,
    /// Time the response body spent waiting on its source (the upstream's chunks).
    body_wait: std::time::Duration,
    pending_since: Option<Instant>,
    logged: bool,
    /// The connection's clock, told when the answer is done.
    arrivals: Option<Arc<clock::Arrivals>>,
}

impl LogLine {
    fn emit(&mut self, outcome: &'static str) {
        if self.logged {
            return;
        }
        self.logged = true;
        if let Some(a) = &self.arrivals {
            a.done();
        }
        let f = &self.facts;
        let elapsed = self.start.elapsed();
        if let (Some(m), false) = (metrics::metrics(), f.endpoint.is_empty()) {
            let route = match (f.route.is_empty(), f.endpoint) {
                (false, _) => &f.route,
                // A model list names no route.
                (true, "models") => "none",
                (true, _) => "unknown",
            };
            // A deployment's own series are resolved once (`DeploymentMetrics`); the rest
            // (cache hits, errors before routing, other statuses) by their label values.
            let handles = match (&f.metrics, f.op) {
                (Some(d), Some(op)) => Some((d, op)),
                _ => None,
            };
            match (&f.key_counters, f.op) {
                (Some(c), Some(op)) if self.status == 200 => c.ok(m, op).inc(),
                _ => {
                    let mut status = itoa::Buffer::new();
                    let status = status.format(self.status);
                    m.requests
                        .with_label_values(&[
                            route,
                            &f.deployment,
                            f.endpoint,
                            status,
                            &f.team,
                            &f.key,
                        ])
                        .inc();
                }
            }
            match handles {
                Some((d, op)) => d.duration(m, op).observe(elapsed.as_secs_f64()),
                None => m
                    .request_duration
                    .with_label_values(&[route, &f.deployment, f.endpoint])
                    .observe(elapsed.as_secs_f64()),
            }
            if let (true, Some(t)) = (f.stream, self.first_byte) {
                let ttft = (t - self.start).as_secs_f64();
                match handles {
                    Some((d, _)) => d.time_to_first_token(m).observe(ttft),
                    None => m
                        .time_to_first_token
                        .with_label_values(&[route, &f.deployment])
                        .observe(ttft),
                }
            }
            // The gateway's own time: the whole request minus the waits on the upstream.
            if let Some(upstream) = f.upstream_wait {
                let own = elapsed
                    .saturating_sub(upstream + self.body_wait)
                    .as_secs_f64();
                match handles {
                    Some((d, _)) => d.overhead(m).observe(own),
                    None => m.overhead.with_label_values(&[route]).observe(own),
                }
            }
        }
        // Written straight into the gathered log bytes, in the shape tracing's formatter
        // gives other lines: formatting 18 fields through tracing's visitors cost more than
        // the rest of the access log.
        if let Some((shared, format)) = REQUEST_LOG.get() {
            if tracing::enabled!(target: "switchyard::request", tracing::Level::INFO) {
                let mut line = RequestLine::new(*format);
                line.str("request_id", self.request_id.to_str().unwrap_or(""));
                line.str("method", self.method.as_str());
                line.str("path", self.uri.path());
                line.str("endpoint", f.endpoint);
                line.int("status", u64::from(self.status));
                line.str("route", &f.route);
                line.str("deployment", &f.deployment);
                line.str("provider", &f.provider);
                line.str("key", &f.key);
                line.int("attempts", u64::from(f.attempts));
                line.str("fallback_from", &f.fallback_from);
                line.flag("stream", f.stream);
                line.str("error_code", &f.error_code);
                line.ms("duration_ms", elapsed);
                if let Some(t) = self.first_byte {
                    line.ms("ttfb_ms", t - self.start);
                }
                line.int("bytes", self.bytes);
                line.str("outcome", outcome);
                shared.push(&line.finish());
            }
        }
    }
}

struct LoggedBody {
    inner: ResponseBody,
    line: LogLine,
    /// A stream's wait for the shutdown's end of grace, made at its first wait.
    cut: Option<Pin<Box<tokio::sync::futures::Notified<'static>>>>,
    /// Ended by the gateway (the shutdown's error event sent): nothing more.
    ended: bool,
    /// A stream's last chunk sent ended with its `[DONE]`.
    done: bool,
    /// What happened to an upstream's event stream once it began.
    stream: Option<Arc<crate::stream::StreamState>>,
}

impl LoggedBody {
    /// The gateway ended the stream with its error event: the upstream cut it or let it
    /// time out.
    fn broke(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| s.broke_off())
    }
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        if let Some(since) = this.line.pending_since.take() {
            this.line.body_wait += since.elapsed();
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if this.line.first_byte.is_none() {
                        this.line.first_byte = Some(Instant::now());
                    }
                    this.line.bytes += data.len() as u64;
                    if this.line.facts.stream && !data.is_empty() {
                        this.done = crate::stream::sse::ends_with_done(data);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.line.emit("upstream_broke_off");
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                // A stream the upstream broke off ends with the gateway's error event.
                this.line.emit(if this.broke() {
                    "upstream_broke_off"
                } else {
                    "complete"
                });
                Poll::Ready(None)
            }
            Poll::Pending => {
                // A stream that has begun is ended with an error event when the shutdown's
                // grace runs out (its client's SDK raises instead of taking a cut answer for
                // a whole one); its ledger row is written as its body is dropped.
                if this.line.facts.stream && this.line.first_byte.is_some() {
                    // Polled once, to leave this task's waker with the notification; from
                    // then on the flag says (polling again would take the notification's
                    // lock at every pause of every stream).
                    let first_wait = this.cut.is_none();
                    let cut = this
                        .cut
                        .get_or_insert_with(|| Box::pin(SHUTDOWN_CUT.notified()));
                    if CUTTING.load(std::sync::atomic::Ordering::Relaxed)
                        || (first_wait && cut.as_mut().poll(cx).is_ready())
                    {
                        this.ended = true;
                        this.line.emit("shutdown");
                        return Poll::Ready(Some(Ok(Frame::data(crate::stream::error_event(
                            "gateway_shutdown",
                            "the gateway is shutting down and ended this stream before its end; retry the request",
                        )))));
                    }
                }
                if this.line.facts.upstream_wait.is_some() {
                    this.line.pending_since = Some(Instant::now());
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Set when the shutdown's grace period is over and the connections still open are being
/// closed: what is dropped then was cut by the gateway, not left by its client.
static CUTTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Woken when the grace period is over: the streams still open end with an error event.
static SHUTDOWN_CUT: tokio::sync::Notify = tokio::sync::Notify::const_new();

pub fn cutting_connections() {
    CUTTING.store(true, std::sync::atomic::Ordering::Relaxed);
    SHUTDOWN_CUT.notify_waiters();
}

/// The outcome of a request that ended before its answer did.
fn cut_short() -> &'static str {
    if CUTTING.load(std::sync::atomic::Ordering::Relaxed) {
        "shutdown"
    } else {
        "client_closed"
    }
}

/// What a request's log line starts from, held while the handler works.
struct Pending {
    start: Instant,
    method: http::Method,
    uri: http::Uri,
    request_id: HeaderValue,
    arrivals: Option<Arc<clock::Arrivals>>,
}

impl Pending {
    fn line(self, status: u16, facts: RequestFacts) -> LogLine {
        LogLine {
            start: self.start,
            method: self.method,
            uri: self.uri,
            request_id: self.request_id,
            status,
            facts,
            first_byte: None,
            bytes: 0,
            body_wait: std::time::Duration::ZERO,
            pending_since: None,
            logged: false,
            arrivals: self.arrivals,
        }
    }
}

/// Writes the log line of a request whose handler is dropped before it answers.
struct Unanswered(Option<Pending>);

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            p.line(crate::ledger::CLIENT_CLOSED, RequestFacts::default())
                .emit(cut_short());
        }
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        // hyper may drop a body whose end it already knows without polling it to `None`;
        // any other body dropped early means the client went away (or the server shut down).
        // A stream whose `[DONE]` was the last it sent is complete for its client (the SDKs
        // close the response there, before the upstream's body may have ended).
        let outcome = if self.broke() {
            "upstream_broke_off"
        } else if self.inner.is_end_stream() || self.done || self.line.method == http::Method::HEAD
        {
            // A HEAD answer's body is never sent: whole without it.
            "complete"
        } else {
            cut_short()
        };
        self.line.emit(outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_in_both_formats() {
        use std::time::Duration;
        assert_eq!(rfc3339(Duration::ZERO), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339(Duration::from_micros(1_795_902_136_279_627)),
            "2026-11-28T21:42:16.279627Z"
        );
        assert_eq!(
            rfc3339(Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000000Z"
        );
        let mut l = RequestLine::new(LogFormat::Json);
        l.str("request_id", "a\"b\\c\n\u{1}");
        l.int("status", 200);
        l.flag("stream", false);
        l.ms("duration_ms", Duration::from_micros(250));
        let line = l.finish();
        assert_eq!(line.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["request_id"], "a\"b\\c\n\u{1}");
        assert_eq!(v["status"], 200);
        assert_eq!(v["stream"], false);
        assert_eq!(v["duration_ms"], 0.25);
        assert_eq!(v["level"], "INFO");
        let ts = v["timestamp"].as_str().unwrap();
        assert!(
            ts.len() == 27 && ts.ends_with('Z') && ts.as_bytes()[19] == b'.',
            "{ts}"
        );
        assert_eq!(v["message"], "request");
        let mut l = RequestLine::new(LogFormat::Text);
        l.str("route", "gpt-4o");
        l.str("key", "");
        l.str("path", "/v1/a b");
        l.int("status", 429);
        l.ms("ttfb_ms", Duration::from_micros(12_345_678));
        let text = String::from_utf8(l.finish()).unwrap();
        assert!(
            text.ends_with("Z  INFO request route=gpt-4o key=\"\" path=\"/v1/a b\" status=429 ttfb_ms=12345.678\n"),
            "{text}"
        );
    }
}
