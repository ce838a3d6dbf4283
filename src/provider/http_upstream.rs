//! `kind: azure_openai` and `kind: openai`: both are an HTTP upstream that differ only in the
//! URL, the auth header and whether `model` in the body names the deployment. Errors come back
//! normalised to the OpenAI shape, with the upstream's key scrubbed from any message.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde_json::{json, Map, Value};

use super::scrub::Scrub;
use super::{AttemptError, Target, UpstreamQuota};
use crate::api::{ApiRequest, Operation};
use crate::config::ProviderCfg;
use crate::error::GatewayError;
use crate::server::body::ResponseBody;
use crate::stream::{guard_upstream_stream, StreamState};
use crate::telemetry::clock::UpstreamClock;

/// Largest error body read from an upstream; error bodies are small, a huge one is garbage.
const MAX_ERROR_BODY: usize = 1 << 20;

/// The upstream HTTP client: hyper's pooled client over rustls (HTTP/1.1, and HTTP/2 where
/// the upstream offers it by ALPN). One per config generation, shared by its providers.
pub type UpstreamClient =
    hyper_util::client::legacy::Client<HttpsConnector<super::proxy::Connector>, Full<Bytes>>;

/// Builds the upstream client: connect timeout, no Nagle delay, idle connections kept 90 s.
pub fn build_client(connect_timeout: Duration) -> Result<UpstreamClient, String> {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(super::tls::client_config()?)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(super::proxy::Connector::new(http, connect_timeout)?);
    Ok(
        hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_timer(TokioTimer::new())
            .build(https),
    )
}

pub struct HttpUpstream {
    flavor: Flavor,
    client: UpstreamClient,
    auth: Option<(HeaderName, HeaderValue)>,
    /// `Host` for every request: the URL's host, and its port when not the scheme's default.
    host: Option<HeaderValue>,
    stream_usage: bool,
    /// The upstream refused a `stream_options` the gateway added (Azure's API versions before
    /// 2024-09-01-preview, a serverless endpoint's `extra-parameters: error`): learned from
    /// its first refusal, so later streams go without (counted with the tokenizer).
    refuses_stream_options: AtomicBool,
    /// What an upstream's error must not carry to the client: its key and its address.
    scrub: Arc<Scrub>,
}

enum Flavor {
    Azure {
        endpoint: String,
        api_version: String,
    },
    OpenAi {
        base_url: String,
        /// `?api-version=…` when the provider sets one, else empty.
        query: String,
    },
}

impl HttpUpstream {
    pub fn new(cfg: &ProviderCfg, client: UpstreamClient) -> Result<HttpUpstream, String> {
        let stream_usage = match cfg {
            ProviderCfg::AzureOpenai(a) => a.stream_usage,
            ProviderCfg::Openai(o) => o.stream_usage,
            ProviderCfg::Mock(_) => false,
        };
        let (flavor, key, header) = match cfg {
            ProviderCfg::AzureOpenai(a) => (
                Flavor::Azure {
                    endpoint: a.endpoint.trim_end_matches('/').to_string(),
                    api_version: a.api_version.clone(),
                },
                a.api_key.as_ref(),
                HeaderName::from_static("api-key"),
            ),
            ProviderCfg::Openai(o) => (
                Flavor::OpenAi {
                    base_url: o.base_url.trim_end_matches('/').to_string(),
                    query: o
                        .api_version
                        .as_ref()
                        .map_or_else(String::new, |v| format!("?api-version={v}")),
                },
                o.api_key.as_ref(),
                http::header::AUTHORIZATION,
            ),
            ProviderCfg::Mock(_) => return Err("a mock provider is not an HTTP upstream".into()),
        };
        let key = key.filter(|k| !k.is_empty());
        let auth = match key {
            None => None,
            Some(k) => {
                let text = if header == http::header::AUTHORIZATION {
                    format!("Bearer {}", k.expose())
                } else {
                    k.expose().to_string()
                };
                let mut v = HeaderValue::from_str(&text).map_err(|_| {
                    "the api_key holds characters a header cannot carry".to_string()
                })?;
                v.set_sensitive(true);
                Some((header, v))
            }
        };
        let host = match &flavor {
            Flavor::Azure { endpoint, .. } => host_header(endpoint),
            Flavor::OpenAi { base_url, .. } => host_header(base_url),
        };
        let base = match &flavor {
            Flavor::Azure { endpoint, .. } => endpoint,
            Flavor::OpenAi { base_url, .. } => base_url,
        };
        let scrub = Arc::new(Scrub::new(key.map(|k| k.expose()), base));
        Ok(HttpUpstream {
            flavor,
            client,
            auth,
            host,
            stream_usage,
            refuses_stream_options: AtomicBool::new(false),
            scrub,
        })
    }

    /// The header that carries this upstream's key (`Authorization: Bearer …` or Azure's
    /// `api-key`), marked sensitive: what a health check sends too.
    pub fn auth(&self) -> Option<&(HeaderName, HeaderValue)> {
        self.auth.as_ref()
    }

    pub fn kind_name(&self) -> &'static str {
        match self.flavor {
            Flavor::Azure { .. } => "azure_openai",
            Flavor::OpenAi { .. } => "openai",
        }
    }

    /// The upstream's URL for `op` on `deployment`, parsed: made once per deployment and
    /// operation at config load (`route::Deployment::targets`), not per request.
    pub fn target(&self, op: Operation, deployment: &str) -> Option<http::Uri> {
        self.url(op, deployment).parse().ok()
    }

    fn url(&self, op: Operation, deployment: &str) -> String {
        match &self.flavor {
            Flavor::Azure {
                endpoint,
                api_version,
            } => {
                if op.azure_deployment_scoped() {
                    format!(
                        "{endpoint}/openai/deployments/{}/{}?api-version={api_version}",
                        path_escape(deployment),
                        op.path()
                    )
                } else {
                    format!("{endpoint}/openai/{}?api-version={api_version}", op.path())
                }
            }
            Flavor::OpenAi { base_url, query } => format!("{base_url}/{}{query}", op.path()),
        }
    }

    /// Azure takes the deployment from the path, so its body stays as the client sent it;
    /// everywhere else `model` must name what the upstream serves.
    /// `ask_usage`: whether `stream_options.include_usage` goes in.
    fn body(&self, req: &ApiRequest, to: &Target<'_>, ask_usage: bool) -> Bytes {
        match &self.flavor {
            Flavor::Azure { .. } if req.op.azure_deployment_scoped() => {
                req.upstream_body(None, ask_usage, to.model, to.cap)
            }
            _ => req.upstream_body(Some(to.deployment), ask_usage, to.model, to.cap),
        }
    }

    pub async fn send(
        &self,
        req: &ApiRequest,
        to: &Target<'_>,
    ) -> Result<http::Response<ResponseBody>, AttemptError> {
        let ask_usage = self.stream_usage && !self.refuses_stream_options.load(Ordering::Relaxed);
        let sent = self.send_once(req, to, ask_usage).await;
        match sent {
            // The `stream_options` the gateway added (the client sent none) named in a refusal
            // (its message, or a FastAPI `detail` listing it): the request again without
            // it, and, if that is taken, every later stream too. (A refusal for another
            // reason that only mentions it, a context-length error echoing the request's
            // parameters say, fails again without it, and teaches nothing.)
            Err(AttemptError::Status { error, .. })
                if ask_usage
                    && req.adds_stream_options()
                    && matches!(error.status.as_u16(), 400 | 422)
                    && !error.is_context_length()
                    && error
                        .upstream_body
                        .as_deref()
                        .is_some_and(|b| memchr::memmem::find(b, b"stream_options").is_some()) =>
            {
                let again = self.send_once(req, to, false).await;
                if again.is_ok() && !self.refuses_stream_options.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        upstream = self.kind_name(),
                        message = %error.message,
                        "the upstream refuses stream_options: its streams are sent without it \
                         from now on, and counted with the tokenizer (set `stream_usage: false` \
                         on the provider to say so)"
                    );
                }
                again
            }
            other => other,
        }
    }

    async fn send_once(
        &self,
        req: &ApiRequest,
        to: &Target<'_>,
        ask_usage: bool,
    ) -> Result<http::Response<ResponseBody>, AttemptError> {
        // One deadline for the whole attempt: the answer's head, then its body to the end.
        let deadline = Box::pin(tokio::time::sleep(to.timeout));
        // `None`: the URL did not parse when the config was loaded.
        let uri = to
            .url
            .cloned()
            .ok_or_else(|| AttemptError::Connect("the upstream URL is not valid".into()))?;
        let mut request = http::Request::new(Full::new(self.body(req, to, ask_usage)));
        *request.method_mut() = http::Method::POST;
        // Sized once for the client's headers, Host and the upstream's key (a clone of the
        // client's map would grow, and move, to take the two more).
        let headers = request.headers_mut();
        headers.reserve(req.upstream_headers.len() + 3);
        for (name, value) in &req.upstream_headers {
            headers.append(name.clone(), value.clone());
        }
        self.own_headers(headers);
        *request.uri_mut() = uri;
        self.answer(request, deadline, to.timeout).await
    }

    /// The headers every request to this upstream carries: uncompressed answers (the gateway
    /// reads usage from them as they pass; the client's own `accept-encoding` is not
    /// forwarded), `Host` as hyper's client would make it but made once, and the key.
    fn own_headers(&self, headers: &mut http::HeaderMap) {
        headers.insert(
            http::header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        if let Some(host) = &self.host {
            headers.insert(http::header::HOST, host.clone());
        }
        if let Some((name, value)) = &self.auth {
            headers.insert(name.clone(), value.clone());
        }
    }

    /// A call on what the upstream stores: `GET` or `DELETE /responses/{id}`, `POST
    /// /responses/{id}/cancel`, `GET /responses/{id}/input_items`, `GET` or `DELETE
    /// /chat/completions/{id}`, `GET /chat/completions/{id}/messages`. `rest` is that path
    /// (without its `/`), `query` the client's query string (Azure's `api-version` is the
    /// provider's).
    pub async fn send_stored(
        &self,
        method: http::Method,
        rest: &str,
        query: Option<&str>,
        timeout: Duration,
    ) -> Result<http::Response<ResponseBody>, AttemptError> {
        let deadline = Box::pin(tokio::time::sleep(timeout));
        let mut url = match &self.flavor {
            Flavor::Azure {
                endpoint,
                api_version,
            } => format!("{endpoint}/openai/{rest}?api-version={api_version}"),
            Flavor::OpenAi { base_url, query } => format!("{base_url}/{rest}{query}"),
        };
        let query = query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|p| !p.is_empty() && !p.starts_with("api-version="))
            .collect::<Vec<_>>()
            .join("&");
        if !query.is_empty() {
            url.push(if url.contains('?') { '&' } else { '?' });
            url.push_str(&query);
        }
        let uri: http::Uri = url
            .parse()
            .map_err(|_| AttemptError::Connect("the upstream URL is not valid".into()))?;
        let mut request = http::Request::new(Full::new(Bytes::new()));
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        self.own_headers(request.headers_mut());
        self.answer(request, deadline, timeout).await
    }

    /// Sends `request` and makes its answer the client's: a success passed on as it comes
    /// (a stream guarded and read for errors), an error normalised and scrubbed.
    async fn answer(
        &self,
        request: http::Request<Full<Bytes>>,
        mut deadline: Pin<Box<tokio::time::Sleep>>,
        timeout: Duration,
    ) -> Result<http::Response<ResponseBody>, AttemptError> {
        let resp = tokio::select! {
            biased;
            r = self.client.request(request) => r.map_err(|e| classify(&e))?,
            () = deadline.as_mut() => return Err(timed_out(timeout)),
        };
        let (mut parts, body) = resp.into_parts();
        if !parts.status.is_success() {
            return Err(self.error_from(&parts, body, deadline, timeout).await);
        }
        // The answer's extensions go on with it for the connection's clock (`UpstreamClock`),
        // which only an HTTP/1 connection keeps (one request at a time on it); hyper's
        // reason phrase stays behind (the gateway's answer has its own status line).
        let mut extensions = std::mem::take(&mut parts.extensions);
        extensions.remove::<hyper::ext::ReasonPhrase>();
        if parts.version > http::Version::HTTP_11 {
            extensions.remove::<UpstreamClock>();
        }
        let is_sse = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("text/event-stream"));
        let state = is_sse.then(Arc::<StreamState>::default);
        if let Some(s) = &state {
            extensions.insert(s.clone());
        }
        let scrub = is_sse.then(|| self.scrub.clone());
        let mut out = http::Response::new(
            guard_upstream_stream(body, is_sse, deadline, timeout, state, scrub).boxed_unsync(),
        );
        *out.status_mut() = parts.status;
        *out.extensions_mut() = extensions;
        for (name, value) in &parts.headers {
            // A value echoing the upstream's key or address stays behind with the rest.
            // Nor one past any id's length (an upstream's header is passed whole otherwise).
            if self.scrub.found_in(value.as_bytes()) || value.len() > MAX_PASSED_HEADER {
                continue;
            }
            if PASS_HEADERS.contains(&name.as_str()) {
                out.headers_mut().append(name.clone(), value.clone());
            } else if name == "x-request-id" {
                // The upstream's own id (OpenAI's `req_…`), which its support asks for: the
                // client's `x-request-id` is the gateway's.
                out.headers_mut().append(UPSTREAM_REQUEST_ID, value.clone());
            }
        }
        if let Some(q) = UpstreamQuota::from_headers(&parts.headers) {
            out.extensions_mut().insert(q);
        }
        Ok(out)
    }

    async fn error_from(
        &self,
        parts: &http::response::Parts,
        body: Incoming,
        deadline: Pin<Box<tokio::time::Sleep>>,
        timeout: Duration,
    ) -> AttemptError {
        let status = parts.status;
        let retry_after = retry_after(&parts.headers);
        let content_type = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let body = tokio::select! {
            biased;
            b = read_limited(body) => b,
            () = deadline => return timed_out(timeout),
        };
        let mut error = normalize_error(status, content_type, &body, &self.scrub);
        if let Some(ra) = retry_after {
            error
                .headers
                .push(("retry-after", ra.as_secs_f64().ceil().max(1.0).to_string()));
            error
                .headers
                .push(("retry-after-ms", ra.as_millis().to_string()));
        }
        // The upstream's ids of the request, which its support asks for.
        for (from, to) in [
            ("x-request-id", "x-upstream-request-id"),
            ("apim-request-id", "apim-request-id"),
        ] {
            if let Some(v) = parts.headers.get(from).and_then(|v| v.to_str().ok()) {
                if !self.scrub.found_in(v.as_bytes()) && v.len() <= MAX_PASSED_HEADER {
                    error.headers.push((to, v.to_string()));
                }
            }
        }
        // OpenAI's word to its SDKs on whether a retry can help (`false` for a 429 of an
        // account out of credit): the SDK reads it, so it goes on with the error.
        if let Some(v) = parts
            .headers
            .get("x-should-retry")
            .and_then(|v| v.to_str().ok())
            .filter(|v| matches!(*v, "true" | "false"))
        {
            error.headers.push(("x-should-retry", v.to_string()));
        }
        AttemptError::Status { error, retry_after }
    }
}

/// `Host` for a base URL as hyper's client sets it: the host, with the port only when it is
/// not the scheme's default. `None` leaves it to the client (an unparsable URL fails later).
fn host_header(base: &str) -> Option<HeaderValue> {
    let uri: http::Uri = base.parse().ok()?;
    let host = uri.host()?;
    let default_port = match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    };
    let value = match uri.port_u16().filter(|p| *p != default_port) {
        Some(port) => HeaderValue::from_str(&format!("{host}:{port}")),
        None => HeaderValue::from_str(host),
    };
    value.ok()
}

/// Response headers of the upstream worth keeping; the rest (its rate-limit figures, cookies,
/// server names, lengths that no longer hold) stay behind.
const PASS_HEADERS: &[&str] = &[
    "content-type",
    "content-disposition",
    // The gateway asks for none (`accept-encoding: identity`); an upstream that compresses
    // anyway gets its answer to the client intact, with the header that says how to read it.
    "content-encoding",
    "openai-processing-ms",
    "openai-version",
    // Azure's id of the request and the region that served it, which its support asks for.
    "apim-request-id",
    "x-ms-region",
];

/// The longest upstream header value passed on (ids, types, durations are far shorter; a
/// `content-disposition` with a long file name fits).
const MAX_PASSED_HEADER: usize = 1024;

/// The upstream's `x-request-id`, as the client gets it.
const UPSTREAM_REQUEST_ID: HeaderName = HeaderName::from_static("x-upstream-request-id");

fn path_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn timed_out(timeout: Duration) -> AttemptError {
    AttemptError::Timeout(format!(
        "the upstream did not answer within {}s",
        timeout.as_secs_f64()
    ))
}

fn classify(e: &hyper_util::client::legacy::Error) -> AttemptError {
    let what = if e.is_connect() {
        "could not connect to the upstream"
    } else {
        "the connection to the upstream failed before an answer"
    };
    AttemptError::Connect(match root_cause(e) {
        // The connector's own time limit (tokio's words for it say nothing of which).
        Some(cause) if e.is_connect() && cause == "deadline has elapsed" => {
            format!("{what} within the route's connect_timeout")
        }
        Some(cause) => format!("{what}: {cause}"),
        None => what.to_string(),
    })
}

/// The innermost error's text (`Connection refused (os error 111)`, `invalid peer
/// certificate: UnknownIssuer`, `connection closed before message completed`): what tells a
/// down upstream from an untrusted one. These errors carry no URL or header, so no secret.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cause = e.source()?;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    Some(cause.to_string())
}

async fn read_limited(mut body: Incoming) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(Ok(frame)) = body.frame().await {
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        let room = MAX_ERROR_BODY.saturating_sub(out.len());
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if out.len() >= MAX_ERROR_BODY {
            break;
        }
    }
    out
}

/// `retry-after-ms` (milliseconds) first, then `retry-after` (seconds, or an HTTP date as
/// RFC 9110 allows: the time until then, 0 if it has passed).
pub fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let num = |name: &str| -> Option<f64> {
        headers
            .get(name)?
            .to_str()
            .ok()?
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v >= 0.0)
    };
    // Longer than a day is a day: a figure no upstream means (and one `Duration` cannot hold).
    const MOST: f64 = 86_400.0;
    if let Some(ms) = num("retry-after-ms") {
        return Some(Duration::from_secs_f64((ms / 1000.0).min(MOST)));
    }
    num("retry-after")
        .map(|s| Duration::from_secs_f64(s.min(MOST)))
        .or_else(|| {
            let date =
                httpdate::parse_http_date(headers.get("retry-after")?.to_str().ok()?).ok()?;
            Some(
                date.duration_since(std::time::SystemTime::now())
                    .unwrap_or_default()
                    .min(Duration::from_secs_f64(MOST)),
            )
        })
}

/// Blanks out what `scrub` names in every string of `v`, keys of objects included.
fn scrub_strings(v: &mut Value, scrub: &Scrub) {
    match v {
        Value::String(s) => {
            if let Some(clean) = scrub.text(s) {
                *s = clean;
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| scrub_strings(x, scrub)),
        Value::Object(m) => scrub_map(m, scrub),
        _ => {}
    }
}

fn scrub_map(m: &mut Map<String, Value>, scrub: &Scrub) {
    if m.keys().any(|k| scrub.text(k).is_some()) {
        *m = std::mem::take(m)
            .into_iter()
            .map(|(k, v)| (scrub.text(&k).unwrap_or(k), v))
            .collect();
    }
    m.values_mut().for_each(|x| scrub_strings(x, scrub));
}

/// Any upstream error body, in the shapes of OpenAI, Azure, vLLM, TGI, Ollama, llama.cpp
/// and Azure AI inference, to `{"error":{"message","type","param","code"}}`. Extra fields of
/// the upstream's error object (Azure's `innererror`) are kept.
pub fn normalize_error(
    status: StatusCode,
    content_type: &str,
    body: &[u8],
    scrub: &Scrub,
) -> GatewayError {
    // OpenAI's own types: `requests` for a rate limit (as the gateway's own 429s say).
    let default_type = if status.is_server_error() {
        "api_error"
    } else if status == StatusCode::TOO_MANY_REQUESTS {
        "requests"
    } else {
        "invalid_request_error"
    };
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let mut obj: Map<String, Value> = match parsed {
        // OpenAI, Azure, vLLM, Ollama, llama.cpp: {"error": {...}}
        Some(Value::Object(mut top)) => match top.remove("error") {
            Some(Value::Object(inner)) => inner,
            // TGI: {"error": "...", "error_type": "..."}
            Some(Value::String(message)) => {
                let mut m = Map::new();
                m.insert("message".into(), Value::String(message));
                if let Some(t) = top.remove("error_type") {
                    m.insert("type".into(), t);
                }
                m
            }
            // Flat shapes: old vLLM {"object":"error",...}, Azure AI inference {status,code,detail,message}
            _ => top,
        },
        _ => {
            let text = String::from_utf8_lossy(body);
            // Blanked before it is cut: a key cut short by the cut no longer matches.
            let text = scrub.text(&text).map_or(text, Into::into);
            let text = text.trim();
            let snippet: String = text.chars().take(300).collect();
            let mut m = Map::new();
            let message = if snippet.is_empty() {
                format!(
                    "the upstream answered {} with an empty body",
                    status.as_u16()
                )
            } else if content_type.contains("html") || !content_type.contains("json") {
                format!(
                    "the upstream answered {} with a non-JSON body: {snippet}",
                    status.as_u16()
                )
            } else {
                snippet
            };
            m.insert("message".into(), Value::String(message));
            m
        }
    };
    // Every string the upstream wrote, not only its message: an upstream may echo the key it
    // was sent, or its own address, in any field (a `detail`, a `key`, an `innererror`).
    if !scrub.is_empty() {
        scrub_map(&mut obj, scrub);
    }
    // FastAPI's `{"detail": "..."}` (an Azure serverless endpoint refusing a field, vLLM's
    // router): its text is the message (the detail stays beside it).
    let message = match obj.remove("message") {
        None => match obj.get("detail") {
            Some(Value::String(d)) => d.clone(),
            // FastAPI's validation errors: `[{"loc": ["body", "x"], "msg": "…"}, …]`.
            Some(Value::Array(items)) if items.iter().any(|i| i.get("msg").is_some()) => items
                .iter()
                .filter_map(|i| {
                    let msg = i.get("msg")?.as_str()?;
                    let loc: Vec<String> = i
                        .get("loc")
                        .and_then(Value::as_array)
                        .map(|l| {
                            l.iter()
                                .map(|p| p.as_str().map_or_else(|| p.to_string(), str::to_string))
                                .collect()
                        })
                        .unwrap_or_default();
                    Some(if loc.is_empty() {
                        msg.to_string()
                    } else {
                        format!("{}: {msg}", loc.join("."))
                    })
                })
                .collect::<Vec<_>>()
                .join("; "),
            _ => format!("the upstream answered {}", status.as_u16()),
        },
        Some(Value::String(s)) => s,
        Some(Value::Null) => format!("the upstream answered {}", status.as_u16()),
        Some(other) => other.to_string(),
    };
    let kind = match obj.remove("type") {
        Some(Value::String(s)) if !s.is_empty() => s,
        _ => default_type.to_string(),
    };
    // OpenAI's code is a string, kept as the upstream wrote it (Azure's `"429"` too: a
    // client may test for it); vLLM and llama.cpp send the status as an integer, which is
    // no code of OpenAI's shape: `upstream_error`.
    let code = match obj.remove("code") {
        Some(Value::String(s)) if !s.is_empty() => s,
        _ => "upstream_error".to_string(),
    };
    let param = match obj.remove("param") {
        Some(Value::String(s)) => Some(s),
        _ => None,
    };
    obj.remove("object");
    let mut error_obj = json!({
        "message": message,
        "type": kind,
        "param": param,
        "code": code,
    });
    if let Value::Object(m) = &mut error_obj {
        for (k, v) in obj {
            m.entry(k).or_insert(v);
        }
    }
    let mut e = GatewayError::new(status, "api_error", code, message);
    e.param = param;
    e.upstream_body = Some(Bytes::from(json!({ "error": error_obj }).to_string()));
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(status: u16, ct: &str, body: &str) -> Value {
        let e = normalize_error(
            StatusCode::from_u16(status).unwrap(),
            ct,
            body.as_bytes(),
            &Scrub::new(Some("sekrit-key"), "https://east.example.com:8443/v1"),
        );
        serde_json::from_slice(e.upstream_body.as_ref().unwrap()).unwrap()
    }

    #[test]
    fn host_headers_as_the_client_would_send_them() {
        let h = |base: &str| host_header(base).map(|v| v.to_str().unwrap().to_string());
        assert_eq!(
            h("http://127.0.0.1:8000/v1").as_deref(),
            Some("127.0.0.1:8000")
        );
        assert_eq!(
            h("https://x.openai.azure.com").as_deref(),
            Some("x.openai.azure.com")
        );
        assert_eq!(h("https://x.example:443/v1").as_deref(), Some("x.example"));
        assert_eq!(h("http://x.example:80").as_deref(), Some("x.example"));
        assert_eq!(h("http://[::1]:11434/v1").as_deref(), Some("[::1]:11434"));
        assert_eq!(h("not a url"), None);
    }

    #[test]
    fn shapes_are_normalised() {
        let v = norm(
            400,
            "application/json",
            r#"{"error":{"message":"filtered","type":null,"param":"prompt","code":"content_filter","status":400,"innererror":{"code":"ResponsibleAIPolicyViolation"}}}"#,
        );
        assert_eq!(v["error"]["code"], "content_filter");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(
            v["error"]["innererror"]["code"],
            "ResponsibleAIPolicyViolation"
        );
        let v = norm(
            422,
            "application/json",
            r#"{"error":"Input validation error","error_type":"validation"}"#,
        );
        assert_eq!(v["error"]["message"], "Input validation error");
        assert_eq!(v["error"]["type"], "validation");
        let v = norm(
            400,
            "application/json",
            r#"{"error":{"message":"bad","type":"BadRequestError","param":null,"code":400}}"#,
        );
        assert_eq!(v["error"]["code"], "upstream_error");
        let v = norm(
            422,
            "application/json",
            r#"{"status":422,"code":"parameter_not_supported","detail":{"loc":["body"]},"message":"nope"}"#,
        );
        assert_eq!(v["error"]["code"], "parameter_not_supported");
        assert_eq!(v["error"]["message"], "nope");
        let v = norm(502, "text/html", "<html>Bad Gateway</html>");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("non-JSON body: <html>Bad Gateway"));
        assert_eq!(v["error"]["type"], "api_error");
        let v = norm(
            401,
            "application/json",
            r#"{"error":{"message":"key sekrit-key is wrong"}}"#,
        );
        assert_eq!(v["error"]["message"], "key *** is wrong");
        // The upstream's own address, whole or its host, with or without the port.
        let v = norm(
            401,
            "application/json",
            r#"{"error":{"message":"bad key for https://east.example.com:8443/v1/chat/completions","detail":"east.example.com:8443 and east.example.com refused"}}"#,
        );
        assert_eq!(v["error"]["message"], "bad key for ***/chat/completions");
        assert_eq!(v["error"]["detail"], "*** and *** refused");
        // Azure's 429: its code kept as written, the type OpenAI's for a rate limit.
        let v = norm(
            429,
            "application/json",
            r#"{"error":{"code":"429","message":"Requests to the ChatCompletions_Create Operation have exceeded token rate limit. Please retry after 6 seconds."}}"#,
        );
        assert_eq!(v["error"]["code"], "429");
        assert_eq!(v["error"]["type"], "requests");
        assert!(v["error"]["param"].is_null());
    }

    #[test]
    fn retry_after_headers() {
        let mut h = http::HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("2"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", HeaderValue::from_static("1500"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
        // An HTTP date: the time until then.
        let mut h = http::HeaderMap::new();
        let at = std::time::SystemTime::now() + Duration::from_secs(30);
        h.insert(
            "retry-after",
            HeaderValue::from_str(&httpdate::fmt_http_date(at)).unwrap(),
        );
        let left = retry_after(&h).unwrap();
        assert!(
            left > Duration::from_secs(28) && left <= Duration::from_secs(30),
            "{left:?}"
        );
        h.insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        // A date past a day from now is a day (it was the whole time: 73 years).
        h.insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2099 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), Some(Duration::from_secs(86_400)));
        h.insert("retry-after", HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
        // A figure too large for a `Duration` is a day.
        h.insert("retry-after", HeaderValue::from_static("1e300"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(86_400)));
        h.insert("retry-after-ms", HeaderValue::from_static("1e300"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(86_400)));
    }
}
