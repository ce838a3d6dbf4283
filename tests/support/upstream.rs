//! A faithful, recording, scriptable mock upstream: an OpenAI-compatible HTTP server on a real
//! loopback port that answers like OpenAI / Azure OpenAI / vLLM would, records every request,
//! and can be told (FIFO) to answer the next requests with errors, raw SSE, hangs or delays.
//! It is test support only: shared by the Rust integration tests and `examples/mock_upstream.rs`.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

/// The fixed `created` timestamp of every default answer, so answers are deterministic.
pub const CREATED: u64 = 1_700_000_000;
/// The assistant text of every default chat / completions / responses answer.
pub const MOCK_TEXT: &str = "Hello from mock";
/// The pieces a default stream sends `MOCK_TEXT` in.
pub const MOCK_PIECES: [&str; 3] = ["Hello", " from", " mock"];
/// `completion_tokens` of every default answer.
pub const COMPLETION_TOKENS: u64 = 4;
/// Arguments of the default tool call.
pub const TOOL_ARGUMENTS: &str = r#"{"mock":true}"#;
/// A valid 1x1 PNG, base64, returned by `images/generations`.
pub const TINY_PNG_B64: &str =
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";
/// Size of the default `audio/speech` answer.
pub const SPEECH_BYTES: usize = 4096;
/// Delay between the events of a default (unscripted) stream, so they leave in separate writes.
const DEFAULT_STREAM_GAP: Duration = Duration::from_millis(2);

/// One request as the mock received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// Lowercase names, in arrival order; a repeated header appears once per value.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
}

impl Recorded {
    /// First value of the header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON (`Value::Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// The request as the control endpoint `GET /__mock/requests` shows it.
    pub fn to_json(&self) -> Value {
        let (body, is_base64) = match std::str::from_utf8(&self.body) {
            Ok(s) => (s.to_string(), false),
            Err(_) => (
                base64::engine::general_purpose::STANDARD.encode(&self.body),
                true,
            ),
        };
        json!({
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": self.headers.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
            "body": body,
            "body_base64": is_base64,
        })
    }
}

/// An answer to give to the next request instead of the default faithful one.
#[derive(Clone, Debug)]
pub enum Scripted {
    /// A complete response. Without a `content-type` header, one is guessed from the body
    /// (`application/json` when it starts with `{` or `[`, else `text/plain`).
    Respond {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    /// A `200 text/event-stream` response whose body bytes are written exactly as given, each
    /// after its delay (a non-zero delay makes it a separate write).
    Stream {
        chunks: Vec<(Duration, String)>,
        end: StreamEnd,
    },
    /// Like `Stream`, with raw bytes, e.g. to split a multibyte UTF-8 character across writes.
    StreamBytes {
        chunks: Vec<(Duration, Bytes)>,
        end: StreamEnd,
    },
    /// A `200 application/json` answer written in parts, each after its delay.
    JsonParts(Vec<(Duration, String)>),
    /// As `JsonParts`, then the connection closed before the body's end.
    JsonPartsCut(Vec<(Duration, String)>),
    /// Accept the request and never answer, until the client goes away.
    Hang,
    /// Wait, then answer as the inner script says.
    Delay(Duration, Box<Scripted>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamEnd {
    /// End the chunked body properly.
    Finish,
    /// Close the connection without ending the chunked body: the client sees an error.
    Abort,
}

impl Scripted {
    /// Shorthand for a JSON (or any text) response without extra headers.
    pub fn respond(status: u16, body: impl Into<String>) -> Scripted {
        Scripted::Respond {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// Shorthand for a stream of `(delay_ms, raw bytes)` chunks.
    pub fn stream(chunks: &[(u64, &str)], end: StreamEnd) -> Scripted {
        Scripted::Stream {
            chunks: chunks
                .iter()
                .map(|(ms, s)| (Duration::from_millis(*ms), s.to_string()))
                .collect(),
            end,
        }
    }

    /// OpenAI's 429 with `retry-after-ms` (and `retry-after`, rounded up to seconds).
    pub fn rate_limited(retry_after_ms: u64) -> Scripted {
        Scripted::Respond {
            status: 429,
            headers: vec![
                ("retry-after-ms".into(), retry_after_ms.to_string()),
                (
                    "retry-after".into(),
                    retry_after_ms.div_ceil(1000).to_string(),
                ),
                ("x-ratelimit-remaining-requests".into(), "0".into()),
            ],
            body:
                json!({"error": {"message": "Rate limit reached for requests", "type": "requests",
                                   "param": null, "code": "rate_limit_exceeded"}})
                .to_string(),
        }
    }

    /// OpenAI's 429 of an account out of credit: `insufficient_quota`, `x-should-retry: false`.
    pub fn insufficient_quota() -> Scripted {
        Scripted::Respond {
            status: 429,
            headers: vec![
                ("content-type".into(), "application/json".into()),
                ("x-should-retry".into(), "false".into()),
            ],
            body: json!({"error": {"message": "You exceeded your current quota.",
                                   "type": "insufficient_quota", "param": null,
                                   "code": "insufficient_quota"}})
            .to_string(),
        }
    }

    /// Azure's 429: a string `code`, no `type`/`param`, the wait only in the message and headers.
    pub fn azure_rate_limited(retry_after_secs: u64) -> Scripted {
        Scripted::Respond {
            status: 429,
            headers: vec![
                ("retry-after".into(), retry_after_secs.to_string()),
                (
                    "retry-after-ms".into(),
                    (retry_after_secs * 1000).to_string(),
                ),
            ],
            body: json!({"error": {"code": "429", "message": format!(
                "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version \
                 2024-10-21 have exceeded token rate limit of your current OpenAI S0 pricing tier. \
                 Please retry after {retry_after_secs} seconds.")}})
            .to_string(),
        }
    }

    /// Azure's prompt content-filter refusal (wire-formats §3.3).
    pub fn azure_content_filter() -> Scripted {
        Scripted::respond(
            400,
            json!({"error": {
                "message": "The response was filtered due to the prompt triggering Azure OpenAI's \
                            content management policy. Please modify your prompt and retry.",
                "type": null, "param": "prompt", "code": "content_filter", "status": 400,
                "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": {
                    "hate": {"filtered": true, "severity": "high"},
                    "jailbreak": {"filtered": false, "detected": false}}}}})
            .to_string(),
        )
    }

    /// An OpenAI-shaped server error with the given status (500, 502, 503, ...).
    pub fn server_error(status: u16) -> Scripted {
        Scripted::respond(
            status,
            json!({"error": {"message": "The server had an error while processing your request.",
                             "type": "server_error", "param": null, "code": null}})
            .to_string(),
        )
    }

    /// vLLM's error: OpenAI-shaped but `code` is the integer status.
    pub fn vllm_error(status: u16, message: &str) -> Scripted {
        let kind = match status {
            404 => "NotFoundError",
            400..=499 => "BadRequestError",
            _ => "InternalServerError",
        };
        Scripted::respond(
            status,
            json!({"error": {"message": message, "type": kind, "param": null, "code": status}})
                .to_string(),
        )
    }

    /// TGI's flat error: `{"error": "<string>", "error_type": "..."}`.
    pub fn tgi_error(status: u16, message: &str, error_type: &str) -> Scripted {
        Scripted::respond(
            status,
            json!({"error": message, "error_type": error_type}).to_string(),
        )
    }

    /// A proxy's HTML error page.
    pub fn html(status: u16) -> Scripted {
        Scripted::Respond {
            status,
            headers: vec![("content-type".into(), "text/html".into())],
            body: format!("<html><head><title>{status}</title></head><body><h1>{status} Bad Gateway</h1></body></html>"),
        }
    }

    /// An Azure stream: the empty-metadata `prompt_filter_results` chunk first, an annotation
    /// chunk without `delta` in the middle, then the content, `finish_reason`, `[DONE]`.
    pub fn azure_stream(finish_reason: &str) -> Scripted {
        let filter = json!({"hate": {"filtered": false, "severity": "safe"},
                            "self_harm": {"filtered": false, "severity": "safe"},
                            "sexual": {"filtered": false, "severity": "safe"},
                            "violence": {"filtered": false, "severity": "safe"}});
        let mut events = vec![sse(&json!({
            "id": "", "object": "", "created": 0, "model": "", "choices": [],
            "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": filter}],
        }))];
        events.push(chat_chunk(Some("assistant"), Some(""), None));
        for piece in MOCK_PIECES {
            events.push(chat_chunk(None, Some(piece), None));
        }
        events.push(sse(&json!({
            "id": "", "object": "", "created": 0, "model": "",
            "choices": [{"index": 0, "finish_reason": null, "content_filter_results": filter,
                         "content_filter_offsets": {"check_offset": 0, "start_offset": 0, "end_offset": 15}}],
        })));
        events.push(chat_chunk(None, None, Some(finish_reason)));
        events.push("data: [DONE]\n\n".into());
        Scripted::Stream {
            chunks: events.into_iter().map(|e| (Duration::ZERO, e)).collect(),
            end: StreamEnd::Finish,
        }
    }

    /// Parses the JSON form used by `POST /__mock/script`:
    /// `{"respond":{"status":429,"headers":[["retry-after-ms","10"]],"body":"..."}}` (headers may
    /// also be an object; a non-string body is serialised), `{"stream":{"chunks":[[0,"data: ..."]],
    /// "end":"finish"|"abort"}}` (a chunk may be `[0,{"base64":"..."}]` for raw bytes, which
    /// gives `StreamBytes`), `{"hang":null}` (or `"hang"`), and
    /// `{"delay":{"ms":100,"then":{...}}}` (or `{"delay":[100,{...}]}`).
    pub fn from_json(v: &Value) -> Result<Scripted, String> {
        if v.as_str() == Some("hang") {
            return Ok(Scripted::Hang);
        }
        let obj = v
            .as_object()
            .filter(|o| o.len() == 1)
            .ok_or("a script is an object with exactly one of respond, stream, hang, delay")?;
        let (kind, body) = obj.iter().next().ok_or("empty script")?;
        match kind.as_str() {
            "respond" => {
                let status = body
                    .get("status")
                    .and_then(Value::as_u64)
                    .and_then(|s| u16::try_from(s).ok())
                    .ok_or("respond.status must be an HTTP status")?;
                let headers = match body.get("headers") {
                    None | Some(Value::Null) => Vec::new(),
                    Some(Value::Array(items)) => items
                        .iter()
                        .map(|h| match h.as_array().map(Vec::as_slice) {
                            Some([Value::String(k), Value::String(v)]) => {
                                Ok((k.clone(), v.clone()))
                            }
                            _ => Err("respond.headers items are [name, value] pairs".to_string()),
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                    Some(Value::Object(map)) => map
                        .iter()
                        .map(|(k, v)| match v {
                            Value::String(s) => Ok((k.clone(), s.clone())),
                            other => Ok((k.clone(), other.to_string())),
                        })
                        .collect::<Result<Vec<_>, String>>()?,
                    Some(_) => return Err("respond.headers must be a list or an object".into()),
                };
                let body = match body.get("body") {
                    None | Some(Value::Null) => String::new(),
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => other.to_string(),
                };
                Ok(Scripted::Respond {
                    status,
                    headers,
                    body,
                })
            }
            "stream" => {
                // Items are [delay_ms, "text"] or [delay_ms, {"base64": "..."}] for raw bytes.
                let mut raw = false;
                let chunks = body
                    .get("chunks")
                    .and_then(Value::as_array)
                    .ok_or("stream.chunks must be a list of [delay_ms, text]")?
                    .iter()
                    .map(|c| {
                        let (ms, data) = match c.as_array().map(Vec::as_slice) {
                            Some([ms, data]) if ms.is_u64() => (ms.as_u64().unwrap_or(0), data),
                            Some([data]) => (0, data),
                            _ => return Err("stream.chunks items are [delay_ms, text]".to_string()),
                        };
                        let bytes = match data {
                            Value::String(s) => Bytes::from(s.clone()),
                            Value::Object(o) => {
                                raw = true;
                                let b64 = o
                                    .get("base64")
                                    .and_then(Value::as_str)
                                    .ok_or("a stream chunk is a string or {\"base64\": \"...\"}")?;
                                Bytes::from(
                                    base64::engine::general_purpose::STANDARD
                                        .decode(b64)
                                        .map_err(|e| format!("stream chunk base64: {e}"))?,
                                )
                            }
                            _ => return Err("stream.chunks items are [delay_ms, text]".to_string()),
                        };
                        Ok((Duration::from_millis(ms), bytes))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let end = match body.get("end").and_then(Value::as_str) {
                    None | Some("finish") => StreamEnd::Finish,
                    Some("abort") => StreamEnd::Abort,
                    Some(other) => return Err(format!("stream.end {other:?}: finish or abort")),
                };
                if raw {
                    return Ok(Scripted::StreamBytes { chunks, end });
                }
                let chunks = chunks
                    .into_iter()
                    .map(|(d, b)| (d, String::from_utf8_lossy(&b).into_owned()))
                    .collect();
                Ok(Scripted::Stream { chunks, end })
            }
            "hang" => Ok(Scripted::Hang),
            "delay" => {
                let (ms, then) = match body {
                    Value::Array(a) if a.len() == 2 => (a[0].as_u64(), &a[1]),
                    Value::Object(o) => (o.get("ms").and_then(Value::as_u64), {
                        o.get("then").ok_or("delay.then is required")?
                    }),
                    _ => (None, &Value::Null),
                };
                let ms = ms.ok_or("delay needs ms (an integer) and then (a script)")?;
                Ok(Scripted::Delay(
                    Duration::from_millis(ms),
                    Box::new(Scripted::from_json(then)?),
                ))
            }
            other => Err(format!("unknown script kind {other:?}")),
        }
    }
}

struct Shared {
    requests: Mutex<Vec<Recorded>>,
    script: Mutex<VecDeque<Scripted>>,
    in_flight: AtomicUsize,
    seq: AtomicU64,
}

/// Counts a request as in flight until its response body has finished or been dropped.
struct InFlight(Arc<Shared>);

impl InFlight {
    fn new(shared: &Arc<Shared>) -> InFlight {
        shared.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(shared.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The response body: any boxed body, plus the in-flight guard that lives exactly as long.
pub struct MockBody {
    inner: BoxBody<Bytes, std::io::Error>,
    _guard: Option<InFlight>,
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A running mock upstream. Dropping it stops accepting and closes its connections.
pub struct MockUpstream {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: tokio::sync::watch::Sender<bool>,
    tls: bool,
}

impl MockUpstream {
    /// Binds 127.0.0.1:0 and serves on the current tokio runtime.
    pub async fn start() -> MockUpstream {
        Self::serve(None).await
    }

    /// Like `start`, over TLS with `tls` (its certificate and ALPN protocols): HTTP/1.1, or
    /// HTTP/2 when the client and `tls.alpn_protocols` agree on `h2`, as Azure's front ends
    /// offer. `url()` is then `https://127.0.0.1:PORT`.
    pub async fn start_tls(tls: rustls::ServerConfig) -> MockUpstream {
        Self::serve(Some(tokio_rustls::TlsAcceptor::from(Arc::new(tls)))).await
    }

    async fn serve(tls: Option<tokio_rustls::TlsAcceptor>) -> MockUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local_addr");
        let shared = Arc::new(Shared {
            requests: Mutex::new(Vec::new()),
            script: Mutex::new(VecDeque::new()),
            in_flight: AtomicUsize::new(0),
            seq: AtomicU64::new(0),
        });
        let (shutdown, rx) = tokio::sync::watch::channel(false);
        let is_tls = tls.is_some();
        tokio::spawn(accept_loop(listener, shared.clone(), rx, tls));
        MockUpstream {
            addr,
            shared,
            shutdown,
            tls: is_tls,
        }
    }

    /// `http://127.0.0.1:PORT` (`https://` when started with `start_tls`).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Every request received (control requests excepted), in order of arrival.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.shared.requests).clone()
    }

    pub fn request_count(&self) -> usize {
        lock(&self.shared.requests).len()
    }

    /// Queue an answer: the next request that arrives gets the first queued answer.
    pub fn script(&self, s: Scripted) {
        lock(&self.shared.script).push_back(s);
    }

    /// Forget recorded requests and queued scripts.
    pub fn reset(&self) {
        lock(&self.shared.requests).clear();
        lock(&self.shared.script).clear();
    }

    /// Requests whose response body has not finished or been dropped.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// Waits until `in_flight() == n` or the timeout passes; returns whether it got there.
    pub async fn wait_in_flight(&self, n: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.in_flight() == n {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking test thread must not make the mock unusable for the others.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let mut shutdown = shutdown.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(shared.clone(), req));
            let Some(tls) = tls else {
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc);
                tokio::select! {
                    _ = conn => {}
                    _ = shutdown.changed() => {}
                }
                return;
            };
            // A failed handshake (a client that does not trust the certificate) just ends
            // the connection, as a real server's would.
            let Ok(stream) = tls.accept(stream).await else {
                return;
            };
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = shutdown.changed() => {}
            }
        });
    }
}

/// What to send back, before it becomes a hyper response.
enum Reply {
    Full {
        status: u16,
        headers: Vec<(String, String)>,
        body: Bytes,
    },
    Stream {
        headers: Vec<(String, String)>,
        chunks: Vec<(Duration, Bytes)>,
        end: StreamEnd,
    },
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, Infallible> {
    let is_control = req.uri().path().starts_with("/__mock/");
    let guard = (!is_control).then(|| InFlight::new(&shared));
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let recorded = Recorded {
        method: parts.method.as_str().to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_ascii_lowercase(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body,
        version: format!("{:?}", parts.version),
    };
    if is_control {
        return Ok(build(control(&shared, &recorded), None));
    }
    lock(&shared.requests).push(recorded.clone());
    let mut next = lock(&shared.script).pop_front();
    loop {
        let reply = match next.take() {
            None => faithful(&shared, &recorded),
            Some(Scripted::Delay(d, inner)) => {
                tokio::time::sleep(d).await;
                next = Some(*inner);
                continue;
            }
            Some(Scripted::Hang) => {
                // Dropped by hyper when the client closes the connection; the guard goes with it.
                let never = std::future::pending::<Infallible>().await;
                match never {}
            }
            Some(Scripted::Respond {
                status,
                headers,
                body,
            }) => Reply::Full {
                status,
                headers,
                body: Bytes::from(body),
            },
            Some(Scripted::StreamBytes { chunks, end }) => Reply::Stream {
                headers: Vec::new(),
                chunks,
                end,
            },
            Some(Scripted::JsonParts(parts)) => json_parts(parts, StreamEnd::Finish),
            Some(Scripted::JsonPartsCut(parts)) => json_parts(parts, StreamEnd::Abort),
            Some(Scripted::Stream { chunks, end }) => Reply::Stream {
                headers: Vec::new(),
                chunks: chunks
                    .into_iter()
                    .map(|(d, s)| (d, Bytes::from(s)))
                    .collect(),
                end,
            },
        };
        return Ok(build(reply, guard));
    }
}

fn json_parts(parts: Vec<(Duration, String)>, end: StreamEnd) -> Reply {
    Reply::Stream {
        headers: vec![("content-type".into(), "application/json".into())],
        chunks: parts
            .into_iter()
            .map(|(d, s)| (d, Bytes::from(s)))
            .collect(),
        end,
    }
}

fn build(reply: Reply, guard: Option<InFlight>) -> Response<MockBody> {
    let (status, headers, inner, default_ct) = match reply {
        Reply::Full {
            status,
            headers,
            body,
        } => {
            let ct = if body.starts_with(b"{") || body.starts_with(b"[") {
                "application/json"
            } else {
                "text/plain; charset=utf-8"
            };
            let inner = Full::new(body).map_err(|never| match never {}).boxed();
            (status, headers, inner, ct)
        }
        Reply::Stream {
            headers,
            chunks,
            end,
        } => (200, headers, stream_body(chunks, end), "text/event-stream"),
    };
    let mut resp = Response::new(MockBody {
        inner,
        _guard: guard,
    });
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = resp.headers_mut();
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(&v),
        ) {
            h.append(k, v);
        }
    }
    if !h.contains_key(CONTENT_TYPE) {
        h.insert(CONTENT_TYPE, HeaderValue::from_static(default_ct));
    }
    if default_ct == "text/event-stream" && !h.contains_key("cache-control") {
        h.insert("cache-control", HeaderValue::from_static("no-cache"));
    }
    resp
}

fn stream_body(chunks: Vec<(Duration, Bytes)>, end: StreamEnd) -> BoxBody<Bytes, std::io::Error> {
    let state = (VecDeque::from(chunks), Some(end));
    let s = futures_util::stream::unfold(state, |(mut chunks, mut end)| async move {
        loop {
            if let Some((delay, bytes)) = chunks.pop_front() {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                if bytes.is_empty() {
                    continue; // an empty chunk would end a chunked body
                }
                return Some((Ok(Frame::data(bytes)), (chunks, end)));
            }
            return match end.take() {
                Some(StreamEnd::Abort) => {
                    // Let hyper flush what was written, then fail the body: hyper closes the
                    // connection without the terminating chunk.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let err = std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "mock upstream: scripted abort",
                    );
                    Some((Err(err), (chunks, end)))
                }
                _ => None,
            };
        }
    });
    BodyExt::boxed(StreamBody::new(s))
}

// ---------------------------------------------------------------------------------------------
// Control endpoints (`/__mock/...`), for tests that run the mock as a separate process.

fn control(shared: &Arc<Shared>, req: &Recorded) -> Reply {
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/__mock/requests") => {
            let list: Vec<Value> = lock(&shared.requests)
                .iter()
                .map(Recorded::to_json)
                .collect();
            json_reply(200, &Value::Array(list))
        }
        ("GET", "/__mock/in_flight") => json_reply(
            200,
            &json!({"in_flight": shared.in_flight.load(Ordering::SeqCst)}),
        ),
        ("POST", "/__mock/reset") => {
            lock(&shared.requests).clear();
            lock(&shared.script).clear();
            json_reply(200, &json!({"ok": true}))
        }
        ("POST", "/__mock/script") => {
            let v: Value = match serde_json::from_slice(&req.body) {
                Ok(v) => v,
                Err(e) => return error_reply(400, &format!("script is not JSON: {e}"), None),
            };
            let items = match v {
                Value::Array(items) => items,
                one => vec![one],
            };
            let parsed: Result<Vec<Scripted>, String> =
                items.iter().map(Scripted::from_json).collect();
            match parsed {
                Ok(list) => {
                    let n = list.len();
                    lock(&shared.script).extend(list);
                    json_reply(200, &json!({"ok": true, "queued": n}))
                }
                Err(e) => error_reply(400, &e, None),
            }
        }
        _ => error_reply(404, &format!("unknown control endpoint {}", req.path), None),
    }
}

// ---------------------------------------------------------------------------------------------
// Default faithful answers.

fn json_reply(status: u16, v: &Value) -> Reply {
    Reply::Full {
        status,
        headers: vec![("content-type".into(), "application/json".into())],
        body: Bytes::from(v.to_string()),
    }
}

fn error_reply(status: u16, message: &str, code: Option<&str>) -> Reply {
    let kind = if status == 404 {
        "not_found_error"
    } else {
        "invalid_request_error"
    };
    json_reply(
        status,
        &json!({"error": {"message": message, "type": kind, "param": null, "code": code}}),
    )
}

/// Prompt tokens the mock reports for `chars` characters of prompt text: ceil(chars / 4), at
/// least 1.
pub fn prompt_tokens_for(chars: usize) -> u64 {
    (chars as u64).div_ceil(4).max(1)
}

/// Characters of text in a chat `messages` array (string contents and `text` parts).
pub fn messages_chars(messages: &Value) -> usize {
    messages
        .as_array()
        .map(|ms| ms.iter().map(|m| content_chars(&m["content"])).sum())
        .unwrap_or(0)
}

fn content_chars(content: &Value) -> usize {
    match content {
        Value::String(s) => s.chars().count(),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match p {
                Value::String(s) => s.chars().count(),
                _ => p["text"].as_str().map_or(0, |t| t.chars().count()),
            })
            .sum(),
        _ => 0,
    }
}

/// The deterministic embedding of `text`: `dims` multiples of 1/1024 in (-1, 1), which are
/// exact in f32 and in JSON, so float and base64 answers decode to the same numbers.
pub fn mock_embedding(text: &str, dims: usize) -> Vec<f32> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (0..dims as u64)
        .map(|i| {
            let mut x = h ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            x ^= x >> 31;
            ((x % 2001) as f32 - 1000.0) / 1024.0
        })
        .collect()
}

/// Little-endian f32 bytes, base64: what `encoding_format: "base64"` returns.
pub fn embedding_base64(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The deterministic bytes of the default `audio/speech` answer.
pub fn speech_bytes() -> Vec<u8> {
    let mut out = b"ID3\x04\x00\x00\x00\x00\x00\x00".to_vec();
    let mut i: u32 = 0;
    while out.len() < SPEECH_BYTES {
        out.push((i.wrapping_mul(31) % 251) as u8);
        i += 1;
    }
    out
}

/// The Azure deployment name in `/openai/deployments/{d}/...`, if the path has one.
pub fn deployment_of(path: &str) -> Option<&str> {
    let rest = path.split("/deployments/").nth(1)?;
    rest.split('/').next().filter(|d| !d.is_empty())
}

fn model_of(req: &Recorded, body: &Value, fallback: &str) -> String {
    body["model"]
        .as_str()
        .or_else(|| deployment_of(&req.path))
        .unwrap_or(fallback)
        .to_string()
}

fn usage(prompt: u64) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": COMPLETION_TOKENS,
        "total_tokens": prompt + COMPLETION_TOKENS,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    })
}

/// One SSE event carrying `v` as its data.
pub fn sse(v: &Value) -> String {
    format!("data: {v}\n\n")
}

/// One `chat.completion.chunk` SSE event (model "mock-model", choice 0), for building scripted
/// streams: `chat_chunk(Some("assistant"), Some(""), None)`, `chat_chunk(None, Some("Hi"), None)`,
/// `chat_chunk(None, None, Some("stop"))`.
pub fn chat_chunk(
    role: Option<&str>,
    content: Option<&str>,
    finish_reason: Option<&str>,
) -> String {
    let mut delta = serde_json::Map::new();
    if let Some(r) = role {
        delta.insert("role".into(), json!(r));
    }
    if let Some(c) = content {
        delta.insert("content".into(), json!(c));
    }
    sse(&json!({
        "id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": CREATED,
        "model": "mock-model",
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}],
    }))
}

/// The `include_usage` chunk: `choices: []` and the usage of the whole request.
pub fn usage_chunk(prompt_tokens: u64, completion_tokens: u64) -> String {
    sse(&json!({
        "id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": CREATED,
        "model": "mock-model", "choices": [],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }))
}

fn sse_reply(events: Vec<String>, request_id: &str) -> Reply {
    Reply::Stream {
        headers: vec![("x-request-id".into(), request_id.into())],
        chunks: events
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                let gap = if i == 0 {
                    Duration::ZERO
                } else {
                    DEFAULT_STREAM_GAP
                };
                (gap, Bytes::from(e))
            })
            .collect(),
        end: StreamEnd::Finish,
    }
}

fn with_request_id(mut reply: Reply, id: &str) -> Reply {
    if let Reply::Full { headers, .. } = &mut reply {
        headers.push(("x-request-id".into(), id.into()));
    }
    reply
}

fn faithful(shared: &Arc<Shared>, req: &Recorded) -> Reply {
    let n = shared.seq.fetch_add(1, Ordering::SeqCst) + 1;
    let rid = format!("req_mock_{n}");
    let path = req.path.trim_end_matches('/');
    let op = [
        "chat/completions",
        "completions",
        "embeddings",
        "images/generations",
        "images/edits",
        "images/variations",
    ]
    .into_iter()
    .chain([
        "audio/transcriptions",
        "audio/translations",
        "audio/speech",
        "moderations",
        "responses",
        "models",
    ])
    .find(|op| path.ends_with(&format!("/{op}")));
    let is_json_op = !matches!(
        op,
        Some(
            "audio/transcriptions"
                | "audio/translations"
                | "images/edits"
                | "images/variations"
                | "models"
        ) | None
    );
    let body = if is_json_op {
        match serde_json::from_slice::<Value>(&req.body) {
            Ok(v) if v.is_object() => v,
            _ => {
                return with_request_id(
                    error_reply(
                        400,
                        "We could not parse the JSON body of your request.",
                        None,
                    ),
                    &rid,
                )
            }
        }
    } else {
        Value::Null
    };
    let method_ok = match op {
        Some("models") => req.method == "GET",
        Some(_) => req.method == "POST",
        None => false,
    };
    // GET .../models/{id}
    if op.is_none() && req.method == "GET" {
        if let Some(id) = path.rsplit_once("/models/").map(|(_, id)| id) {
            return with_request_id(json_reply(200, &model_object(id)), &rid);
        }
    }
    if !method_ok {
        return with_request_id(
            error_reply(
                404,
                &format!("Invalid URL ({} {})", req.method, req.path),
                Some("unknown_url"),
            ),
            &rid,
        );
    }
    let reply = match op.unwrap_or_default() {
        "chat/completions" => chat(req, &body, n, &rid),
        "completions" => completions(req, &body, n, &rid),
        "embeddings" => embeddings(req, &body),
        "images/generations" => images(&body, 0),
        "images/edits" => image_edits(req),
        "images/variations" => image_variations(req),
        "audio/transcriptions" => transcription(req, "transcript"),
        "audio/translations" => transcription(req, "translation"),
        "audio/speech" => speech(&body),
        "moderations" => moderations(req, &body, n),
        "responses" => responses(req, &body, n, &rid),
        _ => json_reply(
            200,
            &json!({"object": "list", "data": [model_object("upstream-model")]}),
        ),
    };
    with_request_id(reply, &rid)
}

fn model_object(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": "vllm"})
}

fn include_usage(body: &Value) -> bool {
    body["stream_options"]["include_usage"].as_bool() == Some(true)
}

/// The function the default answer calls: the named one of `tool_choice`, else the first tool.
fn called_tool(body: &Value) -> Option<String> {
    let tools = body["tools"].as_array().filter(|t| !t.is_empty())?;
    if body["tool_choice"].as_str() == Some("none") {
        return None;
    }
    body["tool_choice"]["function"]["name"]
        .as_str()
        .or_else(|| tools[0]["function"]["name"].as_str())
        .map(str::to_string)
}

fn chat(req: &Recorded, body: &Value, n: u64, rid: &str) -> Reply {
    if !body["messages"].is_array() {
        return error_reply(400, "'messages' is a required property", None);
    }
    let model = model_of(req, body, "mock-model");
    let prompt = prompt_tokens_for(messages_chars(&body["messages"]));
    let choices = body["n"].as_u64().unwrap_or(1).clamp(1, 16);
    let tool = called_tool(body);
    let id = format!("chatcmpl-mock-{n}");
    let call_id = format!("call_mock_{n}");
    if body["stream"].as_bool() == Some(true) {
        let with_usage = include_usage(body);
        let chunk = |index: u64, delta: Value, finish: Value| {
            let mut c = json!({
                "id": id, "object": "chat.completion.chunk", "created": CREATED, "model": model,
                "system_fingerprint": "fp_mock",
                "choices": [{"index": index, "delta": delta, "logprobs": null, "finish_reason": finish}],
            });
            if with_usage {
                c["usage"] = Value::Null;
            }
            sse(&c)
        };
        let mut events = Vec::new();
        for i in 0..choices {
            let first = match &tool {
                None => json!({"role": "assistant", "content": "", "refusal": null}),
                Some(name) => json!({"role": "assistant", "content": null, "tool_calls": [
                    {"index": 0, "id": call_id, "type": "function",
                     "function": {"name": name, "arguments": ""}}]}),
            };
            events.push(chunk(i, first, Value::Null));
        }
        let pieces: Vec<&str> = if tool.is_some() {
            vec![r#"{"mo"#, r#"ck":"#, "true}"]
        } else {
            MOCK_PIECES.to_vec()
        };
        for piece in pieces {
            for i in 0..choices {
                let delta = if tool.is_some() {
                    json!({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
                } else {
                    json!({"content": piece})
                };
                events.push(chunk(i, delta, Value::Null));
            }
        }
        let finish = if tool.is_some() { "tool_calls" } else { "stop" };
        for i in 0..choices {
            events.push(chunk(i, json!({}), json!(finish)));
        }
        if with_usage {
            let mut u = usage(prompt);
            u["completion_tokens"] = json!(COMPLETION_TOKENS * choices);
            u["total_tokens"] = json!(prompt + COMPLETION_TOKENS * choices);
            events.push(sse(&json!({
                "id": id, "object": "chat.completion.chunk", "created": CREATED, "model": model,
                "system_fingerprint": "fp_mock", "choices": [], "usage": u,
            })));
        }
        events.push("data: [DONE]\n\n".to_string());
        return sse_reply(events, rid);
    }
    let message = match &tool {
        None => {
            json!({"role": "assistant", "content": MOCK_TEXT, "refusal": null, "annotations": []})
        }
        Some(name) => json!({"role": "assistant", "content": null, "refusal": null, "tool_calls": [
            {"id": call_id, "type": "function",
             "function": {"name": name, "arguments": TOOL_ARGUMENTS}}]}),
    };
    let finish = if tool.is_some() { "tool_calls" } else { "stop" };
    let mut u = usage(prompt);
    u["completion_tokens"] = json!(COMPLETION_TOKENS * choices);
    u["total_tokens"] = json!(prompt + COMPLETION_TOKENS * choices);
    json_reply(
        200,
        &json!({
            "id": id, "object": "chat.completion", "created": CREATED, "model": model,
            "system_fingerprint": "fp_mock",
            "choices": (0..choices).map(|i| json!({
                "index": i, "finish_reason": finish, "logprobs": null, "message": message,
            })).collect::<Vec<_>>(),
            "usage": u,
        }),
    )
}

fn prompt_chars(prompt: &Value) -> usize {
    match prompt {
        Value::String(s) => s.chars().count(),
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => s.chars().count(),
                Value::Number(_) => 4, // one token id counts as one token
                Value::Array(ids) => ids.len() * 4,
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

fn completions(req: &Recorded, body: &Value, n: u64, rid: &str) -> Reply {
    if body["prompt"].is_null() {
        return error_reply(400, "'prompt' is a required property", None);
    }
    let model = model_of(req, body, "mock-model");
    let prompt = prompt_tokens_for(prompt_chars(&body["prompt"]));
    let id = format!("cmpl-mock-{n}");
    if body["stream"].as_bool() == Some(true) {
        let with_usage = include_usage(body);
        let chunk = |text: &str, finish: Value| {
            let mut c = json!({
                "id": id, "object": "text_completion", "created": CREATED, "model": model,
                "system_fingerprint": "fp_mock",
                "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": finish}],
            });
            if with_usage {
                c["usage"] = Value::Null;
            }
            sse(&c)
        };
        let mut events: Vec<String> = MOCK_PIECES.iter().map(|p| chunk(p, Value::Null)).collect();
        events.push(chunk("", json!("stop")));
        if with_usage {
            events.push(sse(&json!({
                "id": id, "object": "text_completion", "created": CREATED, "model": model,
                "system_fingerprint": "fp_mock", "choices": [], "usage": usage(prompt),
            })));
        }
        events.push("data: [DONE]\n\n".to_string());
        return sse_reply(events, rid);
    }
    json_reply(
        200,
        &json!({
            "id": id, "object": "text_completion", "created": CREATED, "model": model,
            "system_fingerprint": "fp_mock",
            "choices": [{"text": MOCK_TEXT, "index": 0, "logprobs": null, "finish_reason": "stop"}],
            "usage": usage(prompt),
        }),
    )
}

fn embeddings(req: &Recorded, body: &Value) -> Reply {
    // The texts to embed: a string, a list of strings, a token list, or a list of token lists.
    let inputs: Vec<String> = match &body["input"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) if items.iter().all(Value::is_number) && !items.is_empty() => {
            vec![Value::Array(items.clone()).to_string()]
        }
        Value::Array(items) if !items.is_empty() => items
            .iter()
            .map(|i| match i {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect(),
        _ => return error_reply(400, "'input' is a required property", Some("invalid_input")),
    };
    let dims = body["dimensions"]
        .as_u64()
        .filter(|d| *d > 0)
        .unwrap_or(8)
        .min(4096) as usize;
    let base64 = body["encoding_format"].as_str() == Some("base64");
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let v = mock_embedding(text, dims);
            let embedding = if base64 {
                json!(embedding_base64(&v))
            } else {
                json!(v.iter().map(|f| f64::from(*f)).collect::<Vec<_>>())
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let tokens: u64 = inputs
        .iter()
        .map(|t| prompt_tokens_for(t.chars().count()))
        .sum();
    json_reply(
        200,
        &json!({
            "object": "list", "data": data, "model": model_of(req, body, "mock-embedding"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }),
    )
}

/// An edit, as OpenAI answers it: the form's fields read as `images/generations` reads its
/// body; each uploaded image (and mask) billed as `EDIT_IMAGE_TOKENS` input tokens by GPT
/// Image models.
fn image_edits(req: &Recorded) -> Reply {
    let ct = req.header("content-type").unwrap_or_default();
    let Some(parts) = parse_multipart(ct, &req.body) else {
        return error_reply(400, "Expected a multipart/form-data body", None);
    };
    let uploaded = parts
        .iter()
        .filter(|p| matches!(p.name.as_str(), "image" | "image[]" | "mask") && p.filename.is_some())
        .count() as u64;
    if uploaded == 0 {
        return error_reply(400, "Missing required parameter: 'image'.", Some("image"));
    }
    let mut body = serde_json::Map::new();
    for p in parts.iter().filter(|p| p.filename.is_none()) {
        let v = String::from_utf8_lossy(&p.data).into_owned();
        let v = v.parse::<u64>().map_or(Value::String(v), Value::from);
        body.insert(p.name.clone(), v);
    }
    images(&Value::Object(body), uploaded)
}

/// A variation (DALL·E 2): `n` images of the form's `image`, by `size`; no usage.
fn image_variations(req: &Recorded) -> Reply {
    let ct = req.header("content-type").unwrap_or_default();
    let Some(parts) = parse_multipart(ct, &req.body) else {
        return error_reply(400, "Expected a multipart/form-data body", None);
    };
    let field = |n: &str| {
        parts
            .iter()
            .find(|p| p.name == n && p.filename.is_none())
            .map(|p| String::from_utf8_lossy(&p.data).into_owned())
    };
    if !parts
        .iter()
        .any(|p| p.name == "image" && p.filename.is_some())
    {
        return error_reply(400, "Missing required parameter: 'image'.", Some("image"));
    }
    let n = field("n")
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(1)
        .clamp(1, 10);
    let url = field("response_format").as_deref() == Some("url");
    let data: Vec<Value> = (0..n)
        .map(|i| {
            if url {
                json!({"url": format!("https://images.mock.invalid/v{i}.png")})
            } else {
                json!({"b64_json": TINY_PNG_B64})
            }
        })
        .collect();
    json_reply(200, &json!({"created": CREATED, "data": data}))
}

/// What the mock bills each uploaded image of an edit as (a 1024x1024 image at low fidelity).
pub const EDIT_IMAGE_TOKENS: u64 = 323;

fn images(body: &Value, uploaded: u64) -> Reply {
    let Some(prompt) = body["prompt"].as_str() else {
        return error_reply(400, "'prompt' is a required property", None);
    };
    let n = body["n"].as_u64().unwrap_or(1).clamp(1, 10);
    // GPT Image models answer base64 only, with their size and quality and the tokens they
    // bill: the prompt's, and a fixed count per image by quality and size (OpenAI's table).
    if let Some(model) = body["model"]
        .as_str()
        .filter(|m| m.starts_with("gpt-image"))
    {
        let quality = match body["quality"].as_str() {
            None | Some("auto") => "medium",
            Some(q) => q,
        };
        let size = match body["size"].as_str() {
            None | Some("auto") => "1024x1024",
            Some(s) => s,
        };
        let per_image = match (quality, size) {
            ("low", "1024x1024") => 272,
            ("low", "1024x1536") => 408,
            ("low", "1536x1024") => 400,
            ("medium", "1024x1024") => 1056,
            ("medium", "1024x1536") => 1584,
            ("medium", "1536x1024") => 1568,
            ("high", "1024x1024") => 4160,
            ("high", "1024x1536") => 6240,
            ("high", "1536x1024") => 6208,
            _ => {
                return error_reply(
                    400,
                    &format!("Invalid value for quality/size: '{quality}' '{size}' ({model})"),
                    Some("quality"),
                )
            }
        };
        let text = (prompt.len() as u64).div_ceil(4);
        let image_tokens = uploaded * EDIT_IMAGE_TOKENS;
        let input = text + image_tokens;
        let output = per_image * n;
        let data: Vec<Value> = (0..n).map(|_| json!({"b64_json": TINY_PNG_B64})).collect();
        return json_reply(
            200,
            &json!({
                "created": CREATED, "data": data, "background": "opaque",
                "output_format": "png", "quality": quality, "size": size,
                "usage": {
                    "input_tokens": input, "output_tokens": output,
                    "total_tokens": input + output,
                    "input_tokens_details": {"text_tokens": text, "image_tokens": image_tokens},
                },
            }),
        );
    }
    let url = body["response_format"].as_str() == Some("url");
    let data: Vec<Value> = (0..n)
        .map(|i| {
            if url {
                json!({"url": format!("https://images.mock.invalid/{i}.png"), "revised_prompt": prompt})
            } else {
                json!({"b64_json": TINY_PNG_B64, "revised_prompt": prompt})
            }
        })
        .collect();
    json_reply(200, &json!({"created": CREATED, "data": data}))
}

/// One part of a multipart/form-data body.
pub struct Part {
    pub name: String,
    pub filename: Option<String>,
    pub content_type: Option<String>,
    pub data: Bytes,
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if from > hay.len() || needle.is_empty() {
        return None;
    }
    hay[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// A small multipart/form-data parser (enough for what the OpenAI SDK sends).
pub fn parse_multipart(content_type: &str, body: &Bytes) -> Option<Vec<Part>> {
    let boundary = content_type
        .split(';')
        .map(str::trim)
        .find_map(|p| p.strip_prefix("boundary="))?
        .trim_matches('"');
    let delim = format!("--{boundary}").into_bytes();
    let next_delim = format!("\r\n--{boundary}").into_bytes();
    let mut pos = find(body, &delim, 0)? + delim.len();
    let mut parts = Vec::new();
    loop {
        if body[pos..].starts_with(b"--") {
            return Some(parts);
        }
        if body[pos..].starts_with(b"\r\n") {
            pos += 2;
        }
        let end = find(body, &next_delim, pos)?;
        let part = &body[pos..end];
        let head_end = find(part, b"\r\n\r\n", 0)?;
        let head = String::from_utf8_lossy(&part[..head_end]);
        let mut name = None;
        let mut filename = None;
        let mut ctype = None;
        for line in head.split("\r\n") {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            match k.trim().to_ascii_lowercase().as_str() {
                "content-disposition" => {
                    for param in v.split(';').map(str::trim) {
                        if let Some(n) = param.strip_prefix("name=") {
                            name = Some(n.trim_matches('"').to_string());
                        } else if let Some(f) = param.strip_prefix("filename=") {
                            filename = Some(f.trim_matches('"').to_string());
                        }
                    }
                }
                "content-type" => ctype = Some(v.trim().to_string()),
                _ => {}
            }
        }
        parts.push(Part {
            name: name?,
            filename,
            content_type: ctype,
            data: body.slice(pos + head_end + 4..end),
        });
        pos = end + next_delim.len();
    }
}

/// The length of a canonical PCM WAV (a 44-byte header: byte rate at 28, data length at 40),
/// as the upstream hears it; any other file is 1.5 s of audio to this mock.
fn wav_seconds(file: &[u8]) -> Option<f64> {
    let u32_at = |at: usize| Some(u32::from_le_bytes(file.get(at..at + 4)?.try_into().ok()?));
    if file.get(..4)? != b"RIFF" || file.get(8..12)? != b"WAVE" || file.get(36..40)? != b"data" {
        return None;
    }
    let (rate, len) = (u32_at(28)?, u32_at(40)?);
    (rate > 0).then(|| f64::from(len) / f64::from(rate))
}

/// `hh:mm:ss,mmm` (SRT) or `hh:mm:ss.mmm` (WebVTT).
fn clock(seconds: f64, sep: char) -> String {
    let ms = (seconds * 1000.0).round() as u64;
    format!(
        "{:02}:{:02}:{:02}{sep}{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

fn transcription(req: &Recorded, what: &str) -> Reply {
    let ct = req.header("content-type").unwrap_or_default();
    let Some(parts) = parse_multipart(ct, &req.body) else {
        return error_reply(
            400,
            "Expected a multipart/form-data body with 'file' and 'model'",
            None,
        );
    };
    let field = |n: &str| {
        parts
            .iter()
            .find(|p| p.name == n)
            .map(|p| String::from_utf8_lossy(&p.data).into_owned())
    };
    if field("model").is_none() {
        return error_reply(400, "you must provide a model parameter", None);
    }
    let Some(file) = parts.iter().find(|p| p.name == "file") else {
        return error_reply(400, "you must provide a file parameter", None);
    };
    let text = format!("mock {what} of {} bytes", file.data.len());
    let seconds = wav_seconds(&file.data).unwrap_or(1.5);
    let task = if what == "translation" {
        "translate"
    } else {
        "transcribe"
    };
    let text_reply = |ct: &str, body: String| Reply::Full {
        status: 200,
        headers: vec![("content-type".into(), ct.into())],
        body: Bytes::from(body),
    };
    match field("response_format").as_deref().unwrap_or("json") {
        "text" => text_reply("text/plain; charset=utf-8", format!("{text}\n")),
        "srt" => text_reply(
            "text/plain; charset=utf-8",
            format!("1\n00:00:00,000 --> {}\n{text}\n\n", clock(seconds, ',')),
        ),
        "vtt" => text_reply(
            "text/plain; charset=utf-8",
            format!(
                "WEBVTT\n\n00:00:00.000 --> {}\n{text}\n\n",
                clock(seconds, '.')
            ),
        ),
        "verbose_json" => json_reply(
            200,
            &json!({
                "task": task, "language": "english", "duration": seconds, "text": text,
                "segments": [{"id": 0, "seek": 0, "start": 0.0, "end": seconds, "text": text,
                              "tokens": [1, 2, 3], "temperature": 0.0, "avg_logprob": -0.1,
                              "compression_ratio": 1.0, "no_speech_prob": 0.0}],
            }),
        ),
        _ => json_reply(
            200,
            &json!({"text": text, "usage": {"type": "duration", "seconds": seconds.ceil()}}),
        ),
    }
}

fn speech(body: &Value) -> Reply {
    if body["input"].as_str().is_none() {
        return error_reply(400, "'input' is a required property", None);
    }
    let ct = match body["response_format"].as_str().unwrap_or("mp3") {
        "wav" => "audio/wav",
        "opus" => "audio/ogg",
        "aac" => "audio/aac",
        "flac" => "audio/flac",
        "pcm" => "audio/pcm",
        _ => "audio/mpeg",
    };
    Reply::Full {
        status: 200,
        headers: vec![("content-type".into(), ct.into())],
        body: Bytes::from(speech_bytes()),
    }
}

const MODERATION_CATEGORIES: [&str; 13] = [
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/instructions",
    "self-harm/intent",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
];

fn moderations(req: &Recorded, body: &Value, n: u64) -> Reply {
    let count = match &body["input"] {
        Value::String(_) => 1,
        Value::Array(items) if !items.is_empty() => {
            // A list of strings is several inputs; a list of content parts is one.
            if items.iter().all(Value::is_string) {
                items.len()
            } else {
                1
            }
        }
        _ => return error_reply(400, "'input' is a required property", None),
    };
    let result = json!({
        "flagged": false,
        "categories": MODERATION_CATEGORIES.iter().map(|c| (c.to_string(), json!(false))).collect::<serde_json::Map<_, _>>(),
        "category_scores": MODERATION_CATEGORIES.iter().map(|c| (c.to_string(), json!(0.0001))).collect::<serde_json::Map<_, _>>(),
        "category_applied_input_types": MODERATION_CATEGORIES.iter().map(|c| (c.to_string(), json!(["text"]))).collect::<serde_json::Map<_, _>>(),
    });
    json_reply(
        200,
        &json!({
            "id": format!("modr-mock-{n}"),
            "model": model_of(req, body, "omni-moderation-latest"),
            "results": vec![result; count],
        }),
    )
}

fn responses_input_chars(body: &Value) -> usize {
    let input = match &body["input"] {
        Value::String(s) => s.chars().count(),
        Value::Array(items) => items.iter().map(|i| content_chars(&i["content"])).sum(),
        _ => 0,
    };
    input
        + body["instructions"]
            .as_str()
            .map_or(0, |s| s.chars().count())
}

fn responses(req: &Recorded, body: &Value, n: u64, rid: &str) -> Reply {
    if body["input"].is_null() {
        return error_reply(400, "'input' is a required property", None);
    }
    let model = model_of(req, body, "mock-model");
    let input_tokens = prompt_tokens_for(responses_input_chars(body));
    let id = format!("resp_mock_{n}");
    let msg_id = format!("msg_mock_{n}");
    let usage = json!({
        "input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": COMPLETION_TOKENS, "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + COMPLETION_TOKENS,
    });
    let part = json!({"type": "output_text", "text": MOCK_TEXT, "annotations": []});
    let item = json!({
        "type": "message", "id": msg_id, "status": "completed", "role": "assistant",
        "content": [part],
    });
    let response = |status: &str, output: Value, usage: Value| {
        json!({
            "id": id, "object": "response", "created_at": CREATED, "status": status,
            "model": model, "output": output, "usage": usage,
            "error": null, "incomplete_details": null,
            "instructions": body.get("instructions").cloned().unwrap_or(Value::Null),
            "metadata": {}, "parallel_tool_calls": true, "temperature": 1.0, "top_p": 1.0,
            "tool_choice": "auto", "tools": [], "text": {"format": {"type": "text"}},
        })
    };
    if body["stream"].as_bool() != Some(true) {
        return json_reply(200, &response("completed", json!([item]), usage));
    }
    let mut events: Vec<(&str, Value)> = vec![
        (
            "response.created",
            json!({"response": response("in_progress", json!([]), Value::Null)}),
        ),
        (
            "response.in_progress",
            json!({"response": response("in_progress", json!([]), Value::Null)}),
        ),
        (
            "response.output_item.added",
            json!({"output_index": 0, "item": {"type": "message", "id": msg_id,
                "status": "in_progress", "role": "assistant", "content": []}}),
        ),
        (
            "response.content_part.added",
            json!({"item_id": msg_id, "output_index": 0, "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": []}}),
        ),
    ];
    for piece in MOCK_PIECES {
        events.push((
            "response.output_text.delta",
            json!({"item_id": msg_id, "output_index": 0, "content_index": 0, "delta": piece}),
        ));
    }
    events.push((
        "response.output_text.done",
        json!({"item_id": msg_id, "output_index": 0, "content_index": 0, "text": MOCK_TEXT}),
    ));
    events.push((
        "response.content_part.done",
        json!({"item_id": msg_id, "output_index": 0, "content_index": 0, "part": part}),
    ));
    events.push((
        "response.output_item.done",
        json!({"output_index": 0, "item": item}),
    ));
    events.push((
        "response.completed",
        json!({"response": response("completed", json!([item]), usage)}),
    ));
    let events = events
        .into_iter()
        .enumerate()
        .map(|(seq, (kind, mut data))| {
            data["type"] = json!(kind);
            data["sequence_number"] = json!(seq);
            format!("event: {kind}\ndata: {data}\n\n")
        })
        .collect();
    sse_reply(events, rid)
}
