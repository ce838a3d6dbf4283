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

use http::Uri;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The proxy settings read from the environment: `(HTTPS proxy URL, NO_PROXY list)`.
#[derive(Clone)]
pub struct ProxyEnv {
    pub https: Option<String>,
    pub no_proxy: String,
}

fn first_env(names: &[&str]) -> Option<String> {
    names
        .iter()
        .find_map(|n| std::env::var(n).ok())
        .filter(|v| !v.trim().is_empty())
}

/// The environment's proxy for `https://` destinations, checked once: a proxy reached over TLS
/// itself (`https://` proxy URL) is refused at start, as is one that is not a URL.
pub fn proxy_env() -> Result<ProxyEnv, String> {
    static ENV: OnceLock<Result<ProxyEnv, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let https = first_env(&["HTTPS_PROXY", "https_proxy"])
            .or_else(|| first_env(&["ALL_PROXY", "all_proxy"]));
        let no_proxy = first_env(&["NO_PROXY", "no_proxy"]).unwrap_or_default();
        if let Some(url) = &https {
            // Without a scheme the proxy is `http://` (curl's reading).
            let parsed = if url.contains("://") {
                url.clone()
            } else {
                format!("http://{url}")
            };
            match reqwest::Url::parse(&parsed) {
                Ok(u) if u.scheme() == "http" && u.host_str().is_some() => {}
                Ok(u) if u.scheme() == "https" => {
                    return Err("HTTPS_PROXY: a proxy reached over TLS (https://) is not \
                                supported; give its http:// address"
                        .to_string())
                }
                _ => {
                    return Err(
                        "HTTPS_PROXY (or ALL_PROXY) is not an http://host:port URL".to_string()
                    )
                }
            }
            tracing::info!(
                no_proxy = %no_proxy,
                "https:// upstreams are reached through the proxy in HTTPS_PROXY"
            );
        }
        Ok(ProxyEnv { https, no_proxy })
    })
    .clone()
}

/// The upstream client's connector: a TCP connection to the upstream, or to the proxy with a
/// `CONNECT` tunnel to the upstream. Only new connections come here, never pooled ones.
#[derive(Clone)]
pub struct Connector {
    direct: HttpConnector,
    proxy: Option<Arc<Matcher>>,
}

impl Connector {
    pub fn new(direct: HttpConnector) -> Result<Connector, String> {
        let env = proxy_env()?;
        let proxy = env.https.map(|url| {
            Arc::new(
                Matcher::builder()
                    .https(url)
                    .no(env.no_proxy.clone())
                    .build(),
            )
        });
        Ok(Connector { direct, proxy })
    }
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<TcpStream>;
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
            return Box::pin(async move { connecting.await.map_err(Into::into) });
        };
        let mut tunnel = Tunnel::new(via.uri().clone(), self.direct.clone());
        if let Some(auth) = via.basic_auth() {
            tunnel = tunnel.with_auth(auth.clone());
        }
        Box::pin(async move {
            tunnel.call(dst).await.map_err(|e| {
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
    let mut b = reqwest::Client::builder()
        .use_preconfigured_tls(super::tls::client_config()?)
        .no_proxy();
    if let Some(url) = env.https {
        let proxy = reqwest::Proxy::https(&url)
            .map_err(|_| "HTTPS_PROXY (or ALL_PROXY) is not an http://host:port URL".to_string())?
            .no_proxy(reqwest::NoProxy::from_string(&env.no_proxy));
        b = b.proxy(proxy);
    }
    Ok(b)
}
