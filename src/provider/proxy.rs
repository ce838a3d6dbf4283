//! The way out to `https://` upstreams: straight, or through the company's HTTP proxy named in
//! `HTTPS_PROXY` (else `ALL_PROXY`; lower-case names too) with an HTTP `CONNECT` tunnel, the
//! TLS session to the upstream inside it, except for the hosts in `NO_PROXY`. Plain-`http://`
//! upstreams (a vLLM or Ollama on the internal network) always go straight: `HTTP_PROXY` is
//! not used. Read once per process, like the TLS roots; the proxy URL (which may carry a
//! password) is never logged.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::telemetry::clock::{time_receipts, Clocked, Exchange};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The proxy settings read from the environment.
#[derive(Clone)]
pub struct ProxyEnv {
    /// The proxy for `https://` destinations, as a normalised URL (credentials
    /// percent-encoded), and the variable it came from.
    pub https: Option<(String, &'static str)>,
    pub no_proxy: String,
    /// The upstream connector's rules, made from the two above once per process.
    matcher: Option<Arc<Matcher>>,
}

/// The first of `names` set to something other than blanks: its trimmed value and its name.
fn first_env(names: &[&'static str]) -> Option<(String, &'static str)> {
    names.iter().find_map(|&n| {
        let v = std::env::var(n).ok()?;
        let v = v.trim();
        (!v.is_empty()).then(|| (v.to_string(), n))
    })
}

/// The environment's proxy for `https://` destinations, checked once: a proxy reached over TLS
/// itself (`https://` proxy URL) is refused at start, as is one that is not a URL. Error
/// messages name the variable, never its value (it may hold a password).
pub fn proxy_env() -> Result<ProxyEnv, String> {
    static ENV: OnceLock<Result<ProxyEnv, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let https = first_env(&["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"]);
        let no_proxy = first_env(&["NO_PROXY", "no_proxy"])
            .map(|(v, _)| v)
            .unwrap_or_default();
        let Some((raw, var)) = https else {
            return Ok(ProxyEnv {
                https: None,
                no_proxy,
                matcher: None,
            });
        };
        // Without a scheme the proxy is `http://` (curl's reading).
        let with_scheme = if raw.contains("://") {
            raw
        } else {
            format!("http://{raw}")
        };
        let url = match reqwest::Url::parse(&with_scheme) {
            Ok(u) if u.scheme() == "http" && u.host_str().is_some() => u,
            Ok(u) if u.scheme() == "https" => {
                return Err(format!(
                    "{var}: a proxy reached over TLS (https://) is not supported; give its \
                     http:// address"
                ))
            }
            _ => return Err(format!("{var} is not an http://host:port URL")),
        };
        // The normalised text (a password's `@`, spaces and the like percent-encoded) is what
        // both the upstream connector and reqwest read, so they agree on host and credentials.
        let normalised = url.as_str().to_string();
        let probe = Uri::from_static("https://switchyard.invalid/");
        if Matcher::builder()
            .https(normalised.clone())
            .build()
            .intercept(&probe)
            .is_none()
        {
            return Err(format!("{var} is not an http://host:port URL"));
        }
        tracing::info!(
            variable = var,
            no_proxy = %no_proxy,
            "https:// upstreams are reached through the proxy in {var}"
        );
        let matcher = Matcher::builder()
            .https(normalised.clone())
            .no(no_proxy.clone())
            .build();
        Ok(ProxyEnv {
            https: Some((normalised, var)),
            no_proxy,
            matcher: Some(Arc::new(matcher)),
        })
    })
    .clone()
}

/// The upstream client's connector: a TCP connection to the upstream, or to the proxy with a
/// `CONNECT` tunnel to the upstream. Only new connections come here, never pooled ones.
#[derive(Clone)]
pub struct Connector {
    direct: HttpConnector,
    proxy: Option<Arc<Matcher>>,
    /// `routing.connect_timeout`, for the whole tunnel: the TCP connection to the proxy and
    /// its answer to `CONNECT` (given once the proxy has reached the upstream).
    connect_timeout: Duration,
}

impl Connector {
    pub fn new(direct: HttpConnector, connect_timeout: Duration) -> Result<Connector, String> {
        Ok(Connector {
            direct,
            proxy: proxy_env()?.matcher,
            connect_timeout,
        })
    }
}

/// An upstream connection, clocked for `switchyard_overhead_seconds` (`telemetry::clock`).
pub type UpstreamIo = TokioIo<Clocked<TcpStream, Exchange>>;

fn clocked(io: TokioIo<TcpStream>) -> UpstreamIo {
    let stream = io.into_inner();
    time_receipts(&stream);
    TokioIo::new(Clocked::new(stream, Arc::new(Exchange::default())))
}

impl tower::Service<Uri> for Connector {
    type Response = UpstreamIo;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.direct.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let via = match &self.proxy {
            Some(m) if dst.scheme_str() == Some("https") => m.intercept(&dst),
            _ => None,
        };
        let Some(via) = via else {
            let connecting = self.direct.call(dst);
            return Box::pin(async move { connecting.await.map(clocked).map_err(Into::into) });
        };
        let mut tunnel = Tunnel::new(via.uri().clone(), self.direct.clone());
        if let Some(auth) = via.basic_auth() {
            tunnel = tunnel.with_auth(auth.clone());
        }
        let limit = self.connect_timeout;
        Box::pin(async move {
            let tunnelled = tokio::time::timeout(limit, tunnel.call(dst))
                .await
                .map_err(|_| {
                    BoxError::from(format!(
                        "through the HTTPS proxy: no tunnel within {}s",
                        limit.as_secs_f64()
                    ))
                })?;
            tunnelled.map(clocked).map_err(|e| {
                // One message that says it was the proxy (the innermost cause alone, say
                // "Connection refused", would not).
                let mut text = format!("through the HTTPS proxy: {e}");
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    text.push_str(&format!(": {c}"));
                    cause = c.source();
                }
                BoxError::from(text)
            })
        })
    }
}

/// A reqwest client builder (health checks, alert webhooks) with the same way out as the
/// upstream client: the same trusted roots, and the HTTPS proxy for `https://` URLs only
/// (reqwest would otherwise also send `http://` URLs to `HTTP_PROXY`).
pub fn reqwest_builder() -> Result<reqwest::ClientBuilder, String> {
    let env = proxy_env()?;
    let mut tls = super::tls::client_config()?;
    // reqwest leaves a preconfigured TLS config's ALPN as it is: offer HTTP/2 as it would.
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let mut b = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .no_proxy();
    if let Some((url, var)) = env.https {
        let proxy = reqwest::Proxy::https(&url)
            .map_err(|_| format!("{var} is not an http://host:port URL"))?
            .no_proxy(reqwest::NoProxy::from_string(&env.no_proxy));
        b = b.proxy(proxy);
    }
    Ok(b)
}
