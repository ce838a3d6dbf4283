//! Upstreams over HTTPS (docs/config.md, "Upstreams over HTTPS"): the real binary calling a
//! mock upstream that speaks TLS on a real port with a certificate from a private CA made for
//! the test, over HTTP/1.1 and over HTTP/2 (ALPN `h2`, as Azure's front ends offer). The CA is
//! trusted only through `SSL_CERT_FILE`; without it the gateway must refuse the upstream and
//! say why, and a `SSL_CERT_FILE` it cannot read must stop it from starting. The company
//! proxy (`HTTPS_PROXY`, `NO_PROXY`) is a small `CONNECT` proxy on a real port.

#[path = "support/gateway.rs"]
mod gateway;
#[path = "support/pki.rs"]
mod pki;
#[path = "support/upstream.rs"]
mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use gateway::Gateway;
use pki::Pki;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{json, Value};
use upstream::{MockUpstream, Scripted, MOCK_TEXT};

const AZURE_SECRET: &str = "azure-tls-secret-3f9c";
const OPENAI_SECRET: &str = "openai-tls-secret-77d1";

fn new_pki() -> Pki {
    pki::new_pki("Switchyard test CA", &["127.0.0.1", "localhost"])
}

/// The mock's TLS settings: its certificate, and `h2` offered before `http/1.1` when `h2`.
fn server_tls(pki: &Pki, h2: bool) -> rustls::ServerConfig {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(pki.cert_der.clone())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.key_der.clone())),
        )
        .unwrap();
    cfg.alpn_protocols = if h2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    cfg
}

/// Writes the CA's PEM into a folder of its own; the folder lives as long as the guard.
fn ca_file(pki: &Pki) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("company-ca.pem");
    std::fs::write(&path, &pki.ca_pem).unwrap();
    (dir, path)
}

fn config(openai: &str, azure: &str) -> String {
    format!(
        r#"
server: {{ admin_key: tls-admin }}
providers:
  vllm: {{ kind: openai, base_url: "{openai}/v1", api_key: {OPENAI_SECRET} }}
  azure: {{ kind: azure_openai, endpoint: "{azure}", api_key: {AZURE_SECRET}, api_version: "2024-10-21" }}
models:
  llama: {{ retries: 0, deployments: [ {{ provider: vllm, deployment: llama-3-70b }} ] }}
  gpt-4o: {{ retries: 0, deployments: [ {{ provider: azure, deployment: my-azure-dep }} ] }}
"#
    )
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

async fn chat(gw: &Gateway, model: &str, stream: bool) -> (u16, String) {
    let mut body =
        json!({"model": model, "messages": [{"role": "user", "content": "hello over TLS"}]});
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// An OpenAI-shaped error body and its `error.message`.
fn error_of(text: &str) -> (Value, String) {
    let v: Value = serde_json::from_str(text).unwrap();
    let message = v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    (v, message)
}

/// The text of a streamed answer, from its `data:` events, and whether it ended with `[DONE]`.
fn streamed_text(body: &str) -> (String, bool) {
    let mut text = String::new();
    let mut done = false;
    for data in body.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        if let Some(piece) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(piece);
        }
    }
    (text, done)
}

/// An OpenAI-compatible server over HTTP/1.1 and an Azure one over HTTP/2, both behind the
/// private CA: plain and streamed answers come through whole, each upstream gets its own
/// key, and the HTTP/2 one really spoke HTTP/2.
#[tokio::test]
async fn https_upstreams_behind_a_private_ca_are_reached_over_http1_and_http2() {
    let pki = new_pki();
    let vllm = MockUpstream::start_tls(server_tls(&pki, false)).await;
    let azure = MockUpstream::start_tls(server_tls(&pki, true)).await;
    let (_dir, ca) = ca_file(&pki);
    let gw = Gateway::start_with_env(
        &config(&vllm.url(), &azure.url()),
        &[("SSL_CERT_FILE", ca.to_str().unwrap())],
    )
    .await;

    for model in ["llama", "gpt-4o"] {
        let (status, text) = chat(&gw, model, false).await;
        assert_eq!(status, 200, "{model}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], MOCK_TEXT, "{model}");
        let (status, text) = chat(&gw, model, true).await;
        assert_eq!(status, 200, "{model} streamed: {text}");
        assert_eq!(
            streamed_text(&text),
            (MOCK_TEXT.to_string(), true),
            "{model}"
        );
    }

    let seen = vllm.requests();
    assert_eq!(seen.len(), 2);
    for r in &seen {
        assert_eq!(r.version, "HTTP/1.1");
        assert_eq!(r.path, "/v1/chat/completions");
        let bearer = format!("Bearer {OPENAI_SECRET}");
        assert_eq!(r.header("authorization"), Some(bearer.as_str()));
        assert_eq!(r.json()["model"], "llama-3-70b");
    }
    let seen = azure.requests();
    assert_eq!(seen.len(), 2);
    for r in &seen {
        assert_eq!(r.version, "HTTP/2.0", "ALPN h2 offered by both sides");
        assert_eq!(r.path, "/openai/deployments/my-azure-dep/chat/completions");
        assert_eq!(r.query.as_deref(), Some("api-version=2024-10-21"));
        assert_eq!(r.header("api-key"), Some(AZURE_SECRET));
    }
    // Both streams' usage reached the books: 2 requests per route, with tokens.
    for (route, deployment) in [
        ("llama", "vllm/llama-3-70b"),
        ("gpt-4o", "azure/my-azure-dep"),
    ] {
        let n = gw
            .metric(
                "switchyard_requests_total",
                &[
                    ("route", route),
                    ("deployment", deployment),
                    ("status", "200"),
                ],
            )
            .await;
        assert_eq!(n, Some(2.0), "{route}");
    }
}

/// Without the CA (the machine's own roots only) the upstream's certificate is not trusted: no request reaches it, and the
/// client gets an OpenAI-shaped 502 that says it is the certificate, not a down server.
#[tokio::test]
async fn an_upstream_whose_certificate_is_not_trusted_is_refused_with_a_502_that_says_why() {
    let pki = new_pki();
    let vllm = MockUpstream::start_tls(server_tls(&pki, false)).await;
    let azure = MockUpstream::start_tls(server_tls(&pki, true)).await;
    // The machine's own trust (Mozilla's roots, the system store): the test CA is in neither.
    let gw = Gateway::start(&config(&vllm.url(), &azure.url())).await;
    for model in ["llama", "gpt-4o"] {
        let (status, text) = chat(&gw, model, false).await;
        assert_eq!(status, 502, "{model}: {text}");
        let (v, message) = error_of(&text);
        assert!(
            message.contains("certificate"),
            "{model}: the error names the certificate: {text}"
        );
        assert!(v["error"]["type"].is_string(), "{text}");
        assert!(!text.contains(AZURE_SECRET) && !text.contains(OPENAI_SECRET));
    }
    assert_eq!(vllm.request_count() + azure.request_count(), 0);
    let logs = gw.logs();
    assert!(!logs.contains(AZURE_SECRET) && !logs.contains(OPENAI_SECRET));
}

/// An active health check calls the upstream with the same trust: it reaches the HTTPS
/// upstream behind the private CA and keeps it in rotation.
#[tokio::test]
async fn a_health_check_reaches_an_https_upstream_behind_the_private_ca() {
    let pki = new_pki();
    let up = MockUpstream::start_tls(server_tls(&pki, true)).await;
    for _ in 0..500 {
        up.script(Scripted::respond(200, ""));
    }
    let (_dir, ca) = ca_file(&pki);
    let cfg = format!(
        r#"
server: {{ admin_key: tls-admin }}
providers:
  vllm: {{ kind: openai, base_url: "{u}/v1", health_check: {{ path: /health, interval: 100ms, timeout: 1s }} }}
models:
  llama: {{ deployments: [ {{ provider: vllm, deployment: llama-3-70b }} ] }}
"#,
        u = up.url()
    );
    let gw = Gateway::start_with_env(&cfg, &[("SSL_CERT_FILE", ca.to_str().unwrap())]).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let checks = || {
        up.requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path == "/health")
            .count()
    };
    while checks() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "no health check reached the HTTPS upstream:\n{}",
            gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let routes = gw.get_json("/admin/routes", "tls-admin").await;
    assert_eq!(
        routes["routes"][0]["deployments"][0]["up"], true,
        "{routes}"
    );
}

/// A `SSL_CERT_FILE` that names no readable certificate, or a proxy the gateway cannot use,
/// stops the start, naming the variable, instead of failing every upstream call later.
#[test]
fn an_unreadable_ssl_cert_file_or_an_unusable_proxy_stops_the_start_and_says_which() {
    let dir = tempfile::tempdir().unwrap();
    let config = "providers:\n  up: { kind: openai, base_url: \"https://api.example.com/v1\" }\nmodels:\n  m: { deployments: [ { provider: up } ] }\n";
    let not_pem_path = dir.path().join("routes.yaml");
    std::fs::write(&not_pem_path, config).unwrap();
    let missing = dir.path().join("no-such-ca.pem").display().to_string();
    let not_pem = not_pem_path.display().to_string();
    let cases = [
        (
            "SSL_CERT_FILE",
            missing.as_str(),
            format!("SSL_CERT_FILE={missing}"),
        ),
        (
            "SSL_CERT_FILE",
            not_pem.as_str(),
            format!("SSL_CERT_FILE={not_pem}"),
        ),
        (
            "HTTPS_PROXY",
            "https://proxy.corp.example:3128",
            "HTTPS_PROXY: a proxy reached over TLS".to_string(),
        ),
        (
            "HTTPS_PROXY",
            "http://",
            "HTTPS_PROXY is not an http://host:port URL".to_string(),
        ),
    ];
    for (var, value, expected) in cases {
        // A gateway that started anyway would serve until killed (status `None`).
        let (status, text) = Gateway::start_expecting_exit(config, &[(var, value)]);
        assert!(
            status.is_some_and(|s| !s.success()),
            "started with {var}={value} ({status:?}): {text}"
        );
        assert!(text.contains(&expected), "the error names {var}: {text}");
    }
}

/// One `CONNECT` the proxy received: its target and its `Proxy-Authorization`.
type Connect = (String, Option<String>);

/// A company proxy on a real port: answers `CONNECT host:port` with `200` and then carries the
/// bytes both ways, or with `407` when `require` is set and the request's
/// `Proxy-Authorization` is not that value. Records every `CONNECT`.
async fn connect_proxy(require: Option<String>) -> (SocketAddr, Arc<Mutex<Vec<Connect>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let log = log.clone();
            let require = require.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if client.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).to_string();
                let mut lines = head.split("\r\n");
                let first: Vec<&str> = lines.next().unwrap_or("").split(' ').collect();
                let auth = lines.find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("proxy-authorization")
                        .then(|| value.trim().to_string())
                });
                let target = first.get(1).unwrap_or(&"").to_string();
                log.lock().unwrap().push((target.clone(), auth.clone()));
                if first.first() != Some(&"CONNECT") {
                    let _ = client
                        .write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                        .await;
                    return;
                }
                if require.is_some() && auth != require {
                    let _ = client
                        .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"corp\"\r\nContent-Length: 0\r\n\r\n")
                        .await;
                    return;
                }
                let Ok(mut upstream) = tokio::net::TcpStream::connect(&target).await else {
                    let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                };
                let _ = client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await;
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (addr, seen)
}

/// `HTTPS_PROXY` with credentials: an `https://` upstream is reached through a `CONNECT`
/// tunnel that carries them, a host in `NO_PROXY` and a plain-`http://` upstream (even with
/// `HTTP_PROXY` set) are reached straight, and the proxy's password is never logged.
#[tokio::test]
async fn https_upstreams_go_through_the_company_proxy_except_no_proxy_hosts_and_plain_http() {
    let pki = new_pki();
    let (_dir, ca) = ca_file(&pki);
    let proxied = MockUpstream::start_tls(server_tls(&pki, true)).await;
    let exempt = MockUpstream::start_tls(server_tls(&pki, false)).await;
    let plain = MockUpstream::start().await;
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("corp-user:corp-pass-91c2")
    );
    let (proxy, seen) = connect_proxy(Some(basic.clone())).await;
    let proxy_url = format!("http://corp-user:corp-pass-91c2@{proxy}");
    let cfg = format!(
        r#"
providers:
  proxied: {{ kind: openai, base_url: "{p}/v1", api_key: {OPENAI_SECRET} }}
  exempt: {{ kind: openai, base_url: "https://localhost:{e}/v1" }}
  plain: {{ kind: openai, base_url: "{h}/v1" }}
models:
  proxied: {{ retries: 0, deployments: [ {{ provider: proxied, deployment: m }} ] }}
  exempt: {{ retries: 0, deployments: [ {{ provider: exempt, deployment: m }} ] }}
  plain: {{ retries: 0, deployments: [ {{ provider: plain, deployment: m }} ] }}
"#,
        p = proxied.url(),
        e = exempt.addr.port(),
        h = plain.url(),
    );
    let gw = Gateway::start_with_env(
        &cfg,
        &[
            ("SSL_CERT_FILE", ca.to_str().unwrap()),
            ("HTTPS_PROXY", &proxy_url),
            ("HTTP_PROXY", &proxy_url),
            ("NO_PROXY", "localhost,.internal.example"),
        ],
    )
    .await;
    for model in ["proxied", "exempt", "plain"] {
        for stream in [false, true] {
            let (status, text) = chat(&gw, model, stream).await;
            assert_eq!(status, 200, "{model} (stream {stream}): {text}");
        }
    }
    assert_eq!(proxied.request_count(), 2);
    assert_eq!(exempt.request_count(), 2);
    assert_eq!(plain.request_count(), 2);
    let seen = seen.lock().unwrap().clone();
    assert!(!seen.is_empty(), "the proxy saw no CONNECT");
    for (target, auth) in &seen {
        assert_eq!(
            target,
            &proxied.addr.to_string(),
            "only the proxied upstream: {seen:?}"
        );
        assert_eq!(auth.as_deref(), Some(basic.as_str()));
    }
    let logs = gw.logs();
    assert!(logs.contains("through the proxy in HTTPS_PROXY"), "{logs}");
    assert!(
        !logs.contains("corp-pass-91c2"),
        "the proxy's password is in the log:\n{logs}"
    );
}

/// A proxy that refuses the tunnel (no credentials given): the client gets an OpenAI-shaped
/// 502 that names the proxy, and the upstream gets nothing.
#[tokio::test]
async fn a_proxy_that_refuses_the_tunnel_gives_a_502_that_names_the_proxy() {
    let pki = new_pki();
    let (_dir, ca) = ca_file(&pki);
    let up = MockUpstream::start_tls(server_tls(&pki, false)).await;
    let (proxy, seen) = connect_proxy(Some("Basic c29tZW9uZTplbHNl".into())).await;
    let gw = Gateway::start_with_env(
        &config(&up.url(), &up.url()),
        &[
            ("SSL_CERT_FILE", ca.to_str().unwrap()),
            ("HTTPS_PROXY", &format!("http://{proxy}")),
        ],
    )
    .await;
    let (status, text) = chat(&gw, "llama", false).await;
    assert_eq!(status, 502, "{text}");
    let (v, message) = error_of(&text);
    assert!(
        message.contains("proxy"),
        "the error names the proxy: {text}"
    );
    assert_eq!(v["error"]["code"], "upstream_error");
    assert_eq!(up.request_count(), 0);
    assert_eq!(seen.lock().unwrap().len(), 1);
}
