//! The one gateway error type: it knows its HTTP status, its OpenAI `type` and `code`, and
//! whether another deployment may help. It becomes the OpenAI JSON body in `into_response`
//! and nowhere else. Messages never hold an upstream URL or key.

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use serde_json::json;

use crate::server::body::{full, ResponseBody};

/// Boxed so that `Result<_, GatewayError>` stays one word wide on the hot path.
#[derive(Debug, Clone)]
pub struct GatewayError(Box<ErrorInner>);

#[derive(Debug, Clone)]
pub struct ErrorInner {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: String,
    pub message: String,
    pub param: Option<String>,
    /// Extra response headers (e.g. `retry-after`).
    pub headers: Vec<(&'static str, String)>,
    /// A verbatim OpenAI-shaped body from the upstream, passed through as it was.
    pub upstream_body: Option<Bytes>,
}

impl GatewayError {
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        GatewayError(Box::new(ErrorInner {
            status,
            kind,
            code: code.into(),
            message: message.into(),
            param: None,
            headers: Vec::new(),
            upstream_body: None,
        }))
    }

    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_request",
            message,
        )
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn too_large(limit: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("the request body is larger than the gateway's limit of {limit} bytes"),
        )
    }

    /// The client sent its request too slowly (`server.client_timeout`).
    pub fn request_timeout(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "request_timeout",
            message,
        )
    }

    /// The client went away before its request was read (recorded, never seen by it).
    pub fn client_closed(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::from_u16(crate::ledger::CLIENT_CLOSED).unwrap_or(StatusCode::BAD_REQUEST),
            "invalid_request_error",
            "client_closed",
            message,
        )
    }

    pub fn invalid_api_key(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            message,
        )
    }

    pub fn permission_denied(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "invalid_request_error",
            "permission_denied",
            message,
        )
    }

    pub fn model_not_found(route: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!("The model `{route}` does not exist or you do not have access to it."),
        )
        .with_param("model")
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "not_found",
            message,
        )
    }

    /// With the `allow` header a 405 must carry (RFC 9110 15.5.6).
    pub fn method_not_allowed(allow: &'static str) -> Self {
        let mut e = Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "method_not_allowed",
            format!("this endpoint takes {allow} only"),
        );
        e.headers.push(("allow", allow.to_string()));
        e
    }

    pub fn upstream_error(status: StatusCode, message: impl Into<String>) -> Self {
        Self::new(status, "api_error", "upstream_error", message)
    }

    pub fn upstream_timeout(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "api_error",
            "upstream_timeout",
            message,
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "api_error",
            "internal_error",
            message,
        )
    }

    /// A prompt too long for the model, in the words of OpenAI/Azure
    /// (`context_length_exceeded`), vLLM ("maximum context length"), TGI ("`inputs` must
    /// have less than N tokens", "`inputs` tokens + `max_new_tokens` must be <= N") or
    /// Ollama/llama.cpp ("context length", "context size").
    pub fn is_context_length(&self) -> bool {
        if !matches!(self.status.as_u16(), 400 | 413 | 422) {
            return false;
        }
        if self.code == "context_length_exceeded" || self.code == "string_above_max_length" {
            return true;
        }
        let m = self.message.to_ascii_lowercase();
        m.contains("maximum context length")
            || m.contains("context length")
            || m.contains("context window")
            || m.contains("context size")
            || (m.contains("tokens") && m.contains("must be <="))
            || (m.contains("tokens") && m.contains("must have less than"))
            || m.contains("too many tokens")
    }

    /// Azure's content-filter refusal of a prompt: 400 with code `content_filter`.
    pub fn is_content_filter(&self) -> bool {
        self.status == StatusCode::BAD_REQUEST && self.code == "content_filter"
    }

    /// The OpenAI error object (the value under `"error"`).
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        })
    }

    pub fn into_response(self) -> http::Response<ResponseBody> {
        let body = match &self.upstream_body {
            Some(b) => b.clone(),
            None => Bytes::from(json!({ "error": self.to_json() }).to_string()),
        };
        let mut resp = http::Response::new(full(body));
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        for (name, value) in &self.headers {
            if let Ok(v) = HeaderValue::from_str(value) {
                h.insert(*name, v);
            }
        }
        resp
    }
}

impl std::ops::Deref for GatewayError {
    type Target = ErrorInner;
    fn deref(&self) -> &ErrorInner {
        &self.0
    }
}

impl std::ops::DerefMut for GatewayError {
    fn deref_mut(&mut self) -> &mut ErrorInner {
        &mut self.0
    }
}

impl std::fmt::Display for GatewayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for GatewayError {}
