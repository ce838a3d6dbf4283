//! Whom the gateway trusts when it calls out over HTTPS (upstreams, health checks, alert
//! webhooks): Mozilla's roots, built into the binary, plus the system's store, or instead of
//! the system's store the PEM file in `SSL_CERT_FILE` / the folder in `SSL_CERT_DIR` when set
//! (the variables OpenSSL, curl and the `openai` SDK's httpx honour), so an upstream behind a
//! private CA (a self-hosted vLLM, a company proxy) is reached by adding that CA, never by
//! turning verification off. Read once per process, at the first config load.

use std::sync::{Arc, OnceLock};

/// The environment variables that replace the system's store.
const CERT_VARS: [&str; 2] = ["SSL_CERT_FILE", "SSL_CERT_DIR"];

/// The TLS settings of every outgoing connection (no ALPN set: each client sets its own).
pub fn client_config() -> Result<rustls::ClientConfig, String> {
    static CONFIG: OnceLock<Result<rustls::ClientConfig, String>> = OnceLock::new();
    CONFIG.get_or_init(load).clone()
}

fn load() -> Result<rustls::ClientConfig, String> {
    let mut roots: rustls::RootCertStore = webpki_roots::TLS_SERVER_ROOTS.iter().cloned().collect();
    let builtin = roots.len();
    let native = rustls_native_certs::load_native_certs();
    let (added, unreadable) = roots.add_parsable_certificates(native.certs);
    let named: Vec<String> = CERT_VARS
        .iter()
        .filter_map(|v| std::env::var_os(v).map(|p| format!("{v}={}", p.to_string_lossy())))
        .collect();
    if named.is_empty() {
        // No system store (a scratch container) is not an error: Mozilla's roots remain.
        for e in &native.errors {
            tracing::debug!(error = %e, "system certificate store not read");
        }
    } else if added == 0 || !native.errors.is_empty() {
        // A CA named on purpose and not read would fail every call to that upstream later,
        // each with a certificate error: refuse to start instead, saying why.
        let why: Vec<String> = native.errors.iter().map(|e| e.to_string()).collect();
        return Err(if why.is_empty() {
            format!("{}: holds no certificate", named.join(", "))
        } else {
            format!("{}: cannot be read: {}", named.join(", "), why.join("; "))
        });
    }
    tracing::info!(
        builtin,
        added,
        unreadable,
        from = if named.is_empty() {
            "the system store"
        } else {
            "SSL_CERT_FILE/SSL_CERT_DIR"
        },
        "TLS roots for upstreams"
    );
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The Redis client for `state.redis`. Over TLS (`rediss://`) the redis crate trusts
/// Mozilla's roots, or, when `SSL_CERT_FILE` is set, the certificates in that file instead
/// (a Redis behind a company CA; the system bundle works too, it holds the public roots).
/// The file is read once per process, whichever of the Redis clients asks first.
pub fn redis_client(url: &str) -> Result<redis::Client, String> {
    let ca = if url.starts_with("rediss://") {
        redis_ca()?
    } else {
        None
    };
    let client = match ca {
        Some(pem) => {
            let certs = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.to_vec()),
            };
            redis::Client::build_with_tls(url, certs)
        }
        None => redis::Client::open(url),
    };
    client.map_err(|e| format!("bad state.redis URL: {e}"))
}

/// The PEM text of `SSL_CERT_FILE`, when set.
fn redis_ca() -> Result<Option<Arc<[u8]>>, String> {
    static PEM: OnceLock<Result<Option<Arc<[u8]>>, String>> = OnceLock::new();
    PEM.get_or_init(|| {
        let Some(path) = std::env::var_os("SSL_CERT_FILE").filter(|p| !p.is_empty()) else {
            return Ok(None);
        };
        std::fs::read(&path)
            .map(|pem| Some(pem.into()))
            .map_err(|e| {
                format!(
                    "SSL_CERT_FILE={}: cannot be read: {e}",
                    path.to_string_lossy()
                )
            })
    })
    .clone()
}
