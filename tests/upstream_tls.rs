//! Upstreams over HTTPS (docs/config.md, "Upstreams over HTTPS"): the real binary calling a
//! mock upstream that speaks TLS on a real port with a certificate from a private CA made for
//! the test, over HTTP/1.1 and over HTTP/2 (ALPN `h2`, as Azure's front ends offer). The CA is
//! trusted only through `SSL_CERT_FILE`; without it the gateway must refuse the upstream and
//! say why, and a `SSL_CERT_FILE` it cannot read must stop it from starting.

#[path = "support/gateway.rs"]
mod gateway;
#[path = "support/upstream.rs"]
mod upstream;

use std::path::PathBuf;
use std::time::Duration;

use gateway::Gateway;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{json, Value};
use upstream::{MockUpstream, Scripted, MOCK_TEXT};

const AZURE_SECRET: &str = "azure-tls-secret-3f9c";
const OPENAI_SECRET: &str = "openai-tls-secret-77d1";

/// A CA of the test's own and a server certificate it signed for `127.0.0.1` and `localhost`.
struct Pki {
    ca_pem: String,
    cert: CertificateDer<'static>,
    key: Vec<u8>,
}

fn new_pki() -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "Switchyard test CA");
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    Pki {
        ca_pem: ca.pem(),
        cert: leaf.der().clone(),
        key: key.serialize_der(),
    }
}

/// The mock's TLS settings: its certificate, and `h2` offered before `http/1.1` when `h2`.
fn server_tls(pki: &Pki, h2: bool) -> rustls::ServerConfig {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![pki.cert.clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.key.clone())),
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
        let v: Value = serde_json::from_str(&text).unwrap();
        let message = v["error"]["message"].as_str().unwrap_or_default();
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

/// A `SSL_CERT_FILE` that names no readable certificate stops the start, naming the variable,
/// instead of failing every upstream call later with a certificate error.
#[test]
fn an_unreadable_ssl_cert_file_stops_the_start_and_says_which() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("routes.yaml");
    std::fs::write(
        &config,
        "providers:\n  up: { kind: openai, base_url: \"https://api.example.com/v1\" }\nmodels:\n  m: { deployments: [ { provider: up } ] }\n",
    )
    .unwrap();
    let missing = dir.path().join("no-such-ca.pem");
    for bad in [missing.clone(), config.clone()] {
        let log = dir.path().join("gateway.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&config)
            .env("SSL_CERT_FILE", &bad)
            .env_remove("SSL_CERT_DIR")
            .current_dir(dir.path())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap();
        // A gateway that started anyway would serve until killed.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            status.is_some_and(|s| !s.success()),
            "started with SSL_CERT_FILE={bad:?} ({status:?}): {text}"
        );
        assert!(
            text.contains(&format!("SSL_CERT_FILE={}", bad.display())),
            "the error names the variable and its value: {text}"
        );
    }
}
