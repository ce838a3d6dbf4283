//! Streams on their way to the client: chunks go through as they arrive, untouched. When an
//! upstream stream breaks off, an SSE client gets a final OpenAI error event (so the SDK
//! raises instead of hanging or taking a cut answer for a whole one); any other body is cut,
//! so the client sees an incomplete response.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use serde_json::json;

use crate::server::body::BoxError;

pub struct UpstreamStream<S> {
    inner: S,
    is_sse: bool,
    timeout: Duration,
    done: bool,
}

pub fn guard_upstream_stream<S>(inner: S, is_sse: bool, timeout: Duration) -> UpstreamStream<S>
where
    S: Stream<Item = Result<Bytes, reqwest::Error>> + Unpin,
{
    UpstreamStream {
        inner,
        is_sse,
        timeout,
        done: false,
    }
}

/// The SSE event that ends a broken stream.
pub fn error_event(code: &str, message: &str) -> Bytes {
    let body =
        json!({"error": {"message": message, "type": "api_error", "param": null, "code": code}});
    Bytes::from(format!("data: {body}\n\n"))
}

impl<S> Stream for UpstreamStream<S>
where
    S: Stream<Item = Result<Bytes, reqwest::Error>> + Unpin,
{
    type Item = Result<Bytes, BoxError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(b))) => Poll::Ready(Some(Ok(b))),
            Poll::Ready(Some(Err(e))) => {
                self.done = true;
                let (code, message) = if e.is_timeout() {
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
                if self.is_sse {
                    // A leading newline closes any event the upstream left half-written.
                    let mut ev = b"\n".to_vec();
                    ev.extend_from_slice(&error_event(code, &message));
                    Poll::Ready(Some(Ok(Bytes::from(ev))))
                } else {
                    Poll::Ready(Some(Err(message.into())))
                }
            }
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
