//! The response body type every stage returns: a boxed stream of frames, so a whole JSON
//! answer, an upstream stream and a replay all travel the same way.

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> ResponseBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body fed chunk by chunk from a stream, each chunk sent as it arrives.
pub fn streaming<S>(s: S) -> ResponseBody
where
    S: Stream<Item = Result<Bytes, BoxError>> + Send + 'static,
{
    StreamBody::new(s.map(|r| r.map(Frame::data))).boxed_unsync()
}

/// A JSON response.
pub fn json_response(
    status: http::StatusCode,
    value: &serde_json::Value,
) -> http::Response<ResponseBody> {
    let mut resp = http::Response::new(full(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}
