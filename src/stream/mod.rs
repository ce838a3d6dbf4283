//! Streams on their way to the client. SSE is re-framed at event boundaries: every complete
//! event goes out as soon as its blank line arrives, and a half-received event waits for its
//! end (so a client never sees an event cut in two). When an upstream stream breaks off, the
//! unfinished event is dropped and an SSE client gets a final OpenAI error event (the SDK
//! raises instead of hanging or taking a cut answer for a whole one); any other body is cut,
//! so the client sees an incomplete response.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use http_body::{Body, Frame, SizeHint};
use serde_json::json;
use tokio::time::Sleep;

use crate::provider::scrub::Scrub;
use crate::server::body::BoxError;

pub mod sse;
use sse::{ends_with_done, last_event_end, last_event_end_after};

pub struct UpstreamStream<B> {
    inner: B,
    is_sse: bool,
    /// When the attempt's time is up (its head and its whole body).
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
    done: bool,
    /// Whether any byte went on towards the client: before that, a broken stream is an
    /// error the route may still retry elsewhere; after it, the client gets an error event.
    sent_any: bool,
    /// SSE bytes after the last complete event, waiting for the rest of their event.
    pending: BytesMut,
    /// The last event that went out was the stream's `[DONE]`: a break or a time-out after
    /// it is the end, not an error (nothing a client reads comes after it).
    sent_done: bool,
    /// What happened to an event stream once it began, told to the route and the log.
    state: Option<Arc<StreamState>>,
    /// What its error events must not carry to the client (the upstream's key, address).
    scrub: Option<Arc<Scrub>>,
}

/// What happened to an upstream's event stream once it began, told by its guard
/// (`UpstreamStream`) to the route, which counts a failure against the deployment
/// (`route::TrackedBody`), and to the access log. Carried in the answer's extensions.
#[derive(Debug, Default)]
pub struct StreamState(AtomicU8);

const BROKE: u8 = 1;
const TIMED_OUT: u8 = 2;
const ERROR_EVENT: u8 = 4;
const DONE: u8 = 8;

impl StreamState {
    fn set(&self, bit: u8) {
        self.0.fetch_or(bit, Ordering::AcqRel);
    }

    /// How the stream failed after it began, the kind `switchyard_upstream_errors_total`
    /// counts it as: `broke_off`, `timeout`, or `error_event` (an error event of the
    /// upstream's own, such as vLLM's for an engine that died mid-answer).
    pub fn failure(&self) -> Option<&'static str> {
        let s = self.0.load(Ordering::Acquire);
        if s & BROKE != 0 {
            Some("broke_off")
        } else if s & TIMED_OUT != 0 {
            Some("timeout")
        } else if s & ERROR_EVENT != 0 {
            Some("error_event")
        } else {
            None
        }
    }

    /// The gateway broke it off (the upstream cut it or let it time out).
    pub fn broke_off(&self) -> bool {
        self.0.load(Ordering::Acquire) & (BROKE | TIMED_OUT) != 0
    }

    /// Its `[DONE]` went out: whole for its client (the SDKs close the response there),
    /// whenever the upstream's body ends.
    pub fn done(&self) -> bool {
        self.0.load(Ordering::Acquire) & DONE != 0
    }
}

/// The error a guarded body ends with when the attempt's time was up before its end (else
/// it broke off): told apart by type (`timed_out`), not by its words.
#[derive(Debug)]
struct TimedOut(String);

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TimedOut {}

/// Whether a guarded body's error says the attempt's time was up (`timeout`), not a break.
pub fn timed_out(e: &BoxError) -> bool {
    e.downcast_ref::<TimedOut>().is_some()
}

/// What an event holding `error` is.
#[derive(PartialEq)]
enum ErrorEvent {
    /// An error of the upstream's own: `{"error": …}` (OpenAI, Azure, vLLM, TGI), vLLM's
    /// older `{"object": "error", …}`, the Responses API's `{"type": "error", …}`, or any
    /// event named `error` (`event: error`, whatever its data).
    Error,
    /// The Responses API's `response.failed`: its error inside `response`.
    Failed,
    /// Anything else (a `response.created` with `"error": null`, a text about an error).
    No,
}

/// Reads an event holding `error` as JSON.
fn read_error_event(event: &[u8]) -> ErrorEvent {
    if sse::is_named(event, b"error") {
        return ErrorEvent::Error;
    }
    let Some(data) = sse::event_data(event) else {
        return ErrorEvent::No;
    };
    match serde_json::from_slice::<serde_json::Value>(&data) {
        Ok(serde_json::Value::Object(m)) => {
            let kind = m.get("type").and_then(|t| t.as_str());
            if m.get("error").is_some_and(|e| !e.is_null())
                || m.get("object").and_then(|o| o.as_str()) == Some("error")
                || kind == Some("error")
            {
                ErrorEvent::Error
            } else if kind == Some("response.failed") {
                ErrorEvent::Failed
            } else {
                ErrorEvent::No
            }
        }
        _ => ErrorEvent::No,
    }
}

/// An error event whose data is not in OpenAI's shape, as a `data:` event in it: TGI's
/// `{"error": "text", "error_type": "…"}` (the SDK raised "An error occurred during
/// streaming", the text lost), vLLM's and llama.cpp's integer `code`, vLLM's older flat
/// `{"object": "error", …}`, as their plain error answers are normalised
/// (`normalize_error`). `None` for one already in OpenAI's shape, or not JSON.
fn normalized_error_event(event: &[u8], scrub: Option<&Scrub>) -> Option<Vec<u8>> {
    let data = sse::event_data(event)?;
    let serde_json::Value::Object(m) = serde_json::from_slice::<serde_json::Value>(&data).ok()?
    else {
        return None;
    };
    let odd = match m.get("error") {
        Some(serde_json::Value::String(_)) => true,
        Some(serde_json::Value::Object(e)) => e.get("code").is_some_and(|c| !c.is_string()),
        _ => m.get("object").and_then(|o| o.as_str()) == Some("error"),
    };
    if !odd {
        return None;
    }
    let none = Scrub::new(None, "");
    let e = crate::provider::normalize_error(
        http::StatusCode::INTERNAL_SERVER_ERROR,
        "application/json",
        &data,
        scrub.unwrap_or(&none),
    );
    let body = e.upstream_body.as_deref()?;
    let mut out = Vec::with_capacity(body.len() + 8);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(body);
    out.extend_from_slice(b"\n\n");
    Some(out)
}

/// The upstream's body as a stream of chunks for the client, cut off at `deadline`.
pub fn guard_upstream_stream<B>(
    inner: B,
    is_sse: bool,
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
    state: Option<Arc<StreamState>>,
    scrub: Option<Arc<Scrub>>,
) -> UpstreamStream<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    UpstreamStream {
        inner,
        is_sse,
        deadline,
        timeout,
        done: false,
        sent_any: false,
        pending: BytesMut::new(),
        sent_done: false,
        state,
        scrub,
    }
}

/// The SSE event that ends a broken stream.
pub fn error_event(code: &str, message: &str) -> Bytes {
    let body =
        json!({"error": {"message": message, "type": "api_error", "param": null, "code": code}});
    Bytes::from(format!("data: {body}\n\n"))
}

impl<B> Stream for UpstreamStream<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Item = Result<Bytes, BoxError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        loop {
            let chunk = match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(b) => b,
                    // Trailers: nothing the client needs.
                    Err(_) => continue,
                },
                Poll::Ready(Some(Err(_))) => return Poll::Ready(Some(self.broke_off(false))),
                Poll::Ready(None) => {
                    self.done = true;
                    // Whatever the upstream left unfinished goes out as it was.
                    if self.pending.is_empty() {
                        return Poll::Ready(None);
                    }
                    let rest = self.pending.split().freeze();
                    return Poll::Ready(Some(Ok(rest)));
                }
                Poll::Pending => {
                    if self.deadline.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Some(self.broke_off(true)));
                    }
                    return Poll::Pending;
                }
            };
            if !self.is_sse {
                self.sent_any = true;
                return Poll::Ready(Some(Ok(chunk)));
            }
            let ready = if self.pending.is_empty() {
                // The common case, a chunk of whole events, goes out without a copy; a chunk
                // that ends inside an event keeps only its unfinished part back.
                match last_event_end(&chunk) {
                    Some(end) if end == chunk.len() => chunk,
                    Some(end) => {
                        self.pending.extend_from_slice(&chunk[end..]);
                        chunk.slice(..end)
                    }
                    None => {
                        self.pending.extend_from_slice(&chunk);
                        continue;
                    }
                }
            } else {
                // Only the new bytes can end an event (and the 2 before them: a line end
                // split between two reads), so a long event arriving in many reads is not
                // read again at each.
                let from = self.pending.len().saturating_sub(2);
                self.pending.extend_from_slice(&chunk);
                match last_event_end_after(&self.pending, from) {
                    Some(end) => self.pending.split_to(end).freeze(),
                    None => continue,
                }
            };
            self.sent_any = true;
            let ready = self.read_errors(ready);
            self.sent_done = ends_with_done(&ready);
            if let (true, Some(state)) = (self.sent_done, &self.state) {
                state.set(DONE);
            }
            return Poll::Ready(Some(Ok(ready)));
        }
    }
}

/// As a body, an answer that is not an event stream keeps the upstream's length (so its
/// `Content-Length` reaches the client, and the ledger's copy is sized once): an error event
/// is only ever added to an event stream.
impl<B> Body for UpstreamStream<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.poll_next(cx)
            .map(|chunk| chunk.map(|r| r.map(Frame::data)))
    }

    /// At the end once the upstream's body is and nothing waits to go out: with a known
    /// length hyper stops polling after the last byte, and the layers above (the ledger's,
    /// the access log's) tell a complete answer from a cut one by this.
    fn is_end_stream(&self) -> bool {
        self.done || (self.inner.is_end_stream() && self.pending.is_empty())
    }

    fn size_hint(&self) -> SizeHint {
        if self.is_sse || self.done {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

impl<B> UpstreamStream<B> {
    /// Whole events on their way out: an error event of the upstream's own is told to the
    /// route (a failure of the deployment), and it and the Responses API's
    /// `response.failed` go out without the upstream's key or address. Found by `error` in
    /// the chunk first, which most chunks lack.
    fn read_errors(&self, ready: Bytes) -> Bytes {
        // One searcher, made once: building it per chunk cost more than the search.
        static ERROR: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
            std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"error"));
        if ERROR.find(&ready).is_none() {
            return ready;
        }
        let mut out: Option<BytesMut> = None;
        let mut start = 0;
        for end in sse::event_ends(&ready) {
            let event = &ready[start..end];
            let kind = if ERROR.find(event).is_some() {
                read_error_event(event)
            } else {
                ErrorEvent::No
            };
            if kind == ErrorEvent::Error {
                if let Some(state) = &self.state {
                    state.set(ERROR_EVENT);
                }
            }
            // Only errors are scrubbed: the text of other events is the model's, passed on
            // as it came, whatever it says. An error in a shape of its own is put in
            // OpenAI's (scrubbed on the way).
            let clean = match kind {
                ErrorEvent::No => None,
                ErrorEvent::Error => normalized_error_event(event, self.scrub.as_deref())
                    .or_else(|| self.scrub.as_ref().and_then(|s| s.bytes(event))),
                ErrorEvent::Failed => self.scrub.as_ref().and_then(|s| s.bytes(event)),
            };
            match (&mut out, clean) {
                (None, Some(clean)) => {
                    let mut b = BytesMut::with_capacity(ready.len());
                    b.extend_from_slice(&ready[..start]);
                    b.extend_from_slice(&clean);
                    out = Some(b);
                }
                (Some(b), clean) => b.extend_from_slice(clean.as_deref().unwrap_or(event)),
                (None, None) => {}
            }
            start = end;
        }
        match out {
            Some(mut b) => {
                b.extend_from_slice(&ready[start..]);
                b.freeze()
            }
            None => ready,
        }
    }

    fn broke_off(&mut self, timed_out: bool) -> Result<Bytes, BoxError> {
        self.done = true;
        self.pending.clear();
        if self.sent_done {
            // Whole for its client, whatever the upstream's connection did after.
            return Ok(Bytes::new());
        }
        let (code, message) = if timed_out {
            (
                "upstream_timeout",
                format!(
                    "the upstream did not finish within {}s",
                    self.timeout.as_secs_f64()
                ),
            )
        } else {
            (
                "upstream_error",
                "the upstream stream broke off before its end".to_string(),
            )
        };
        tracing::warn!(code, "upstream stream ended with an error");
        if let (Some(state), true) = (&self.state, self.sent_any) {
            state.set(if timed_out { TIMED_OUT } else { BROKE });
        }
        if self.is_sse && self.sent_any {
            Ok(error_event(code, &message))
        } else if timed_out {
            Err(Box::new(TimedOut(message)))
        } else {
            Err(message.into())
        }
    }
}
