//! Upstreams: one module per kind. Each turns the gateway's `ApiRequest` into what its
//! upstream expects (URL, auth header, the few body fields that must change) and the answer
//! back into a response or a classified `AttemptError`. Nothing here decides where a request
//! goes; that is `route/`.

mod http_upstream;
pub use http_upstream::normalize_error;
pub mod mock;
pub mod proxy;
pub mod scrub;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;

use crate::api::ApiRequest;
use crate::config::{ProviderCfg, RoutingCfg};
use crate::error::GatewayError;
use crate::server::body::ResponseBody;
use crate::Name;

pub use http_upstream::{HttpUpstream, UpstreamClient};

/// A provider built from config: the client, URLs and header values ready for use.
pub struct Provider {
    pub name: Name,
    pub kind: ProviderKind,
}

pub enum ProviderKind {
    Http(Box<HttpUpstream>),
    Mock(mock::MockProvider),
}

impl Provider {
    pub fn build(
        name: &str,
        cfg: &ProviderCfg,
        client: &UpstreamClient,
    ) -> Result<Provider, String> {
        let kind = match cfg {
            ProviderCfg::Mock(m) => ProviderKind::Mock(mock::MockProvider::new(m.clone())),
            _ => ProviderKind::Http(Box::new(HttpUpstream::new(cfg, client.clone())?)),
        };
        Ok(Provider {
            name: name.into(),
            kind,
        })
    }

    pub fn kind_name(&self) -> &'static str {
        match &self.kind {
            ProviderKind::Http(h) => h.kind_name(),
            ProviderKind::Mock(_) => "mock",
        }
    }

    /// The upstream URL of `op` on `deployment`, for an HTTP provider whose URL parses.
    pub fn target(&self, op: crate::api::Operation, deployment: &str) -> Option<http::Uri> {
        match &self.kind {
            ProviderKind::Http(h) => h.target(op, deployment),
            ProviderKind::Mock(_) => None,
        }
    }

    /// One attempt of `req` against this provider.
    pub async fn send(
        &self,
        req: &ApiRequest,
        to: &Target<'_>,
    ) -> Result<http::Response<ResponseBody>, AttemptError> {
        match &self.kind {
            ProviderKind::Http(h) => h.send(req, to).await,
            ProviderKind::Mock(m) => m.send(req, to.deployment).await,
        }
    }

    /// A call on what this provider's upstream stores (`HttpUpstream::send_stored`);
    /// `None` for a mock, which stores none.
    pub async fn send_stored(
        &self,
        method: http::Method,
        rest: &str,
        query: Option<&str>,
        timeout: Duration,
    ) -> Option<Result<http::Response<ResponseBody>, AttemptError>> {
        match &self.kind {
            ProviderKind::Http(h) => Some(h.send_stored(method, rest, query, timeout).await),
            ProviderKind::Mock(_) => None,
        }
    }
}

/// Why one attempt failed, and whether another deployment may do better.
#[derive(Debug)]
pub enum AttemptError {
    /// No connection could be made, or it broke before an answer.
    Connect(String),
    /// No answer in time.
    Timeout(String),
    /// The upstream answered with an error status; `error` is its normalised body.
    Status {
        error: GatewayError,
        retry_after: Option<Duration>,
    },
}

impl AttemptError {
    /// Connect errors, timeouts, 408, 429 and every 5xx but 501 may succeed elsewhere (not
    /// only 500, 502, 503 and 504: a proxy in front of a server that is down answers 520 to
    /// 524, and the SDK retries them all), and so may a request whose deployment the
    /// upstream does not have (`deployment_missing`). They count against the deployment.
    pub fn retryable(&self) -> bool {
        match self {
            AttemptError::Connect(_) | AttemptError::Timeout(_) => true,
            AttemptError::Status { error, .. } => {
                matches!(error.status.as_u16(), 408 | 429 | 500 | 502..=599)
                    || self.deployment_missing()
            }
        }
    }

    /// The upstream does not have the deployment or model the config names (404
    /// `DeploymentNotFound`, `model_not_found`, vLLM's "The model `m` does not exist",
    /// Ollama's "model \"m\" not found"): the config's fault, which no request can cause
    /// (the model sent is the config's).
    pub fn deployment_missing(&self) -> bool {
        let AttemptError::Status { error, .. } = self else {
            return false;
        };
        if error.status != StatusCode::NOT_FOUND {
            return false;
        }
        let m = error.message.to_ascii_lowercase();
        matches!(
            error.code.as_str(),
            "DeploymentNotFound" | "model_not_found" | "ModelNotFound"
        ) || ((m.starts_with("the model ") || m.starts_with("model "))
            && (m.contains("not found") || m.contains("not exist")))
    }

    /// The upstream refused the gateway rather than the request, as far as a client can
    /// tell: its key (401), its access (403), or its deployment (`deployment_missing`). A
    /// client that gets it is told so (`into_client_error`), not that its own key or model
    /// name is wrong. (A 401 or 403 can also follow from what a request carries, a header
    /// an upstream proxy reads, a prompt a firewall blocks, an operation a restricted key may
    /// not use: it does not count against the deployment; see `held_elsewhere`.)
    pub fn refused_gateway(&self) -> bool {
        matches!(self, AttemptError::Status { error, .. } if matches!(error.status.as_u16(), 401 | 403))
            || self.deployment_missing()
    }

    /// The upstream does not have, or will not give, what the request asks, and another
    /// deployment of the route may: the response a Responses request continues
    /// (`previous_response_id`), an object the request names (a conversation, a file: a 404
    /// that is not `deployment_missing`), an operation its server does not serve (a 404
    /// page, Azure's "Resource not found", llama.cpp's 501 for embeddings without
    /// `--embeddings`), a refusal of its key (401, 403: rotated, or a key that may not use
    /// the operation, or a firewall before it). It is asked of the others, and says nothing
    /// of this deployment: no client can take deployments out of rotation by what it asks.
    pub fn held_elsewhere(&self) -> bool {
        matches!(self, AttemptError::Status { error, .. }
            if (matches!(error.status.as_u16(), 400 | 404) && error.code == "previous_response_not_found")
                || matches!(error.status.as_u16(), 401 | 403 | 501)
                || (error.status == StatusCode::NOT_FOUND && !self.deployment_missing()))
    }

    /// The upstream said a retry cannot help (`x-should-retry: false`, as OpenAI sends with a
    /// 429 of an account out of credit): not worth asking that deployment again.
    pub fn no_retry_here(&self) -> bool {
        matches!(self, AttemptError::Status { error, .. }
            if error.headers.iter().any(|(n, v)| *n == "x-should-retry" && v == "false"))
    }

    pub fn status(&self) -> Option<StatusCode> {
        match self {
            AttemptError::Status { error, .. } => Some(error.status),
            _ => None,
        }
    }

    /// The error a client gets when this was a request's last attempt: as the upstream
    /// wrote it, but for a refusal of the gateway itself (`refused_gateway`), which is a 502
    /// naming what the upstream said: a 401 or 404 passed on as it was would tell the
    /// client its own key or model name is wrong.
    pub fn into_client_error(self) -> GatewayError {
        if self.refused_gateway() {
            told_as_refusal(self.into_gateway_error())
        } else {
            self.into_gateway_error()
        }
    }

    pub fn into_gateway_error(self) -> GatewayError {
        match self {
            AttemptError::Connect(m) => GatewayError::upstream_error(StatusCode::BAD_GATEWAY, m),
            AttemptError::Timeout(m) => GatewayError::upstream_timeout(m),
            AttemptError::Status { error, .. } => error,
        }
    }
}

/// What the upstream said is left of its quota (`x-ratelimit-remaining-*`), put on a
/// successful response as an extension for the routing state to learn from.
#[derive(Debug, Clone, Copy, Default)]
pub struct UpstreamQuota {
    pub remaining_requests: Option<i64>,
    pub remaining_tokens: Option<i64>,
}

impl UpstreamQuota {
    pub fn from_headers(h: &http::HeaderMap) -> Option<UpstreamQuota> {
        let num = |n: &str| h.get(n)?.to_str().ok()?.trim().parse::<i64>().ok();
        let q = UpstreamQuota {
            remaining_requests: num("x-ratelimit-remaining-requests"),
            remaining_tokens: num("x-ratelimit-remaining-tokens"),
        };
        (q.remaining_requests.is_some() || q.remaining_tokens.is_some()).then_some(q)
    }
}

/// An upstream's refusal of the gateway (`AttemptError::refused_gateway`) as the client is
/// told it: a 502 naming what the upstream said, its headers kept.
pub fn told_as_refusal(mut e: GatewayError) -> GatewayError {
    let mut out = GatewayError::upstream_error(
        StatusCode::BAD_GATEWAY,
        format!(
            "the upstream refused the gateway ({} {}): the deployment's key, access or name \
             is misconfigured; its message: {}",
            e.status.as_u16(),
            e.status.canonical_reason().unwrap_or(""),
            e.message
        ),
    );
    out.headers = std::mem::take(&mut e.headers);
    out
}

/// Where one attempt goes, and how.
pub struct Target<'a> {
    /// The upstream's model or Azure deployment name.
    pub deployment: &'a str,
    /// The underlying model: the config's `model:`, else `deployment`.
    pub model: &'a str,
    /// The upstream URL for the request's operation, parsed at config load (`None`: it did
    /// not parse).
    pub url: Option<&'a http::Uri>,
    /// The whole attempt's deadline: the answer's head, then its body to the end.
    pub timeout: Duration,
    /// Whether the gateway's output cap goes in (`ApiRequest::upstream_body`).
    pub cap: bool,
}

/// Providers by name, shared by every route of one config generation.
pub type Providers = indexmap::IndexMap<String, Arc<Provider>>;

/// An upstream HTTP client (connection pool, connect timeout): one per config generation,
/// and one more per distinct `connect_timeout` of a route.
pub fn build_client(connect_timeout: std::time::Duration) -> Result<UpstreamClient, String> {
    http_upstream::build_client(connect_timeout)
}

/// The client of active health checks: off the request path, so reqwest's conveniences.
pub fn build_check_client(routing: &RoutingCfg) -> Result<reqwest::Client, String> {
    proxy::reqwest_builder()?
        .connect_timeout(routing.connect_timeout.0)
        .tcp_nodelay(true)
        .build()
        .map_err(|e| format!("cannot build the health-check HTTP client: {e}"))
}
