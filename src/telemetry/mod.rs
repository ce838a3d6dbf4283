//! Logs, defined once: the log setup and the one line each request writes when its response
//! body ends (so a stream is logged when it finishes, with its time to first byte). Secrets
//! are never fields of a log event.

pub mod metrics;

use std::convert::Infallible;
use std::future::Future;
use std::io::Write as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tower::{Layer, Service};

use crate::server::body::{BoxError, ResponseBody};
use crate::server::RequestId;

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
    LogGuard { shared, flusher }
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
        let len = {
            let mut lines = self.0.lock_lines();
            lines.extend_from_slice(buf);
            lines.len()
        };
        if len >= LOG_MAX {
            self.0.write_out();
        } else if len >= LOG_HIGH_WATER && len - buf.len() < LOG_HIGH_WATER {
            self.0.wake.notify_one();
        }
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
    pub route: String,
    pub deployment: String,
    pub provider: String,
    pub key: String,
    pub team: String,
    pub attempts: u32,
    /// The route asked for, when a fallback route served.
    pub fallback_from: String,
    pub error_code: String,
    pub stream: bool,
    /// For a request sent upstream: how long the attempts took, from the dispatch to the
    /// answer's head (retries and their backoff included). With the time the response body
    /// waited on upstream chunks, it is what `switchyard_overhead_seconds` leaves out.
    pub upstream_wait: Option<std::time::Duration>,
}

/// Writes one structured line per request when its response body ends or is dropped.
#[derive(Clone, Copy, Default)]
pub struct AccessLogLayer;

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;
    fn layer(&self, inner: S) -> AccessLog<S> {
        AccessLog { inner }
    }
}

#[derive(Clone)]
pub struct AccessLog<S> {
    inner: S,
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
        let start = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let request_id = req
            .extensions()
            .get::<RequestId>()
            .map(|r| r.0.clone())
            .unwrap_or_default();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            let (mut parts, body) = resp.into_parts();
            let facts = parts
                .extensions
                .remove::<RequestFacts>()
                .unwrap_or_default();
            let line = LogLine {
                start,
                method,
                path,
                request_id,
                status: parts.status.as_u16(),
                facts,
                first_byte: None,
                bytes: 0,
                body_wait: std::time::Duration::ZERO,
                pending_since: None,
                logged: false,
            };
            let body = LoggedBody { inner: body, line }.boxed_unsync();
            Ok(Response::from_parts(parts, body))
        })
    }
}

struct LogLine {
    start: Instant,
    method: http::Method,
    path: String,
    request_id: String,
    status: u16,
    facts: RequestFacts,
    first_byte: Option<Instant>,
    bytes: u64,
    /// Time the response body spent waiting on its source (the upstream's chunks).
    body_wait: std::time::Duration,
    pending_since: Option<Instant>,
    logged: bool,
}

impl LogLine {
    fn emit(&mut self, outcome: &'static str) {
        if self.logged {
            return;
        }
        self.logged = true;
        let f = &self.facts;
        let elapsed = self.start.elapsed();
        let duration_ms = elapsed.as_secs_f64() * 1000.0;
        if let (Some(m), false) = (metrics::metrics(), f.endpoint.is_empty()) {
            let route = match (f.route.is_empty(), f.endpoint) {
                (false, _) => f.route.as_str(),
                // A model list names no route.
                (true, "models") => "none",
                (true, _) => "unknown",
            };
            let status = self.status.to_string();
            m.requests
                .with_label_values(&[route, &f.deployment, f.endpoint, &status, &f.team, &f.key])
                .inc();
            m.request_duration
                .with_label_values(&[route, &f.deployment, f.endpoint])
                .observe(elapsed.as_secs_f64());
            if let (true, Some(t)) = (f.stream, self.first_byte) {
                m.time_to_first_token
                    .with_label_values(&[route, &f.deployment])
                    .observe((t - self.start).as_secs_f64());
            }
            // The gateway's own time: the whole request minus the waits on the upstream.
            if let Some(upstream) = f.upstream_wait {
                let own = elapsed.saturating_sub(upstream + self.body_wait);
                m.overhead
                    .with_label_values(&[route])
                    .observe(own.as_secs_f64());
            }
        }
        let ttfb_ms = self
            .first_byte
            .map(|t| (t - self.start).as_secs_f64() * 1000.0);
        tracing::info!(
            target: "switchyard::request",
            request_id = %self.request_id,
            method = %self.method,
            path = %self.path,
            endpoint = f.endpoint,
            status = self.status,
            route = %f.route,
            deployment = %f.deployment,
            provider = %f.provider,
            key = %f.key,
            attempts = f.attempts,
            fallback_from = %f.fallback_from,
            stream = f.stream,
            error_code = %f.error_code,
            duration_ms,
            ttfb_ms,
            bytes = self.bytes,
            outcome,
            "request"
        );
    }
}

struct LoggedBody {
    inner: ResponseBody,
    line: LogLine,
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
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
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.line.emit("upstream_broke_off");
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.line.emit("complete");
                Poll::Ready(None)
            }
            Poll::Pending => {
                if this.line.facts.upstream_wait.is_some() {
                    this.line.pending_since = Some(Instant::now());
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        // hyper may drop a body whose end it already knows without polling it to `None`;
        // any other body dropped early means the client went away (or the server shut down).
        let outcome = if self.inner.is_end_stream() {
            "complete"
        } else {
            "client_closed"
        };
        self.line.emit(outcome);
    }
}
