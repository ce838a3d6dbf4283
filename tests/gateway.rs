//! Black-box tests of the gateway: the real binary on a real port, a recording mock upstream
//! on another, reqwest as the client.

#[path = "support/gateway.rs"]
mod gateway;
#[path = "support/upstream.rs"]
mod upstream;

use std::time::Duration;

use futures_util::StreamExt;
use gateway::{sha256_hex, Gateway};
use serde_json::{json, Value};
use upstream::{chat_chunk, usage_chunk, MockUpstream, Scripted, StreamEnd};

const CLIENT_KEY: &str = "sk-client-test-key";
const OTHER_KEY: &str = "sk-client-limited";
const OPENAI_SECRET: &str = "upstream-secret-openai";
const AZURE_SECRET: &str = "upstream-secret-azure";

fn config(up: &MockUpstream, extra: &str) -> String {
    format!(
        r#"
server:
  admin_key: admin-secret
  max_body: 64KiB
  shutdown_grace: 10s
providers:
  up-openai: {{ kind: openai, base_url: "{u}/v1", api_key: {OPENAI_SECRET} }}
  up-azure: {{ kind: azure_openai, endpoint: "{u}", api_key: {AZURE_SECRET}, api_version: "2024-10-21" }}
  dead: {{ kind: openai, base_url: "http://127.0.0.1:9/v1" }}
  demo: {{ kind: mock, stream_chunks: 4 }}
models:
  gpt-4o: {{ deployments: [ {{ provider: up-openai, deployment: gpt-4o-upstream }} ] }}
  gpt-4o-azure: {{ deployments: [ {{ provider: up-azure, deployment: my-azure-dep }} ] }}
  whisper: {{ deployments: [ {{ provider: up-openai, deployment: whisper-1 }} ] }}
  flaky: {{ retries: 0, timeout: 700ms, deployments: [ {{ provider: up-openai, deployment: flaky-up }} ] }}
  with-fallback:
    retries: 0
    deployments: [ {{ provider: dead }} ]
    fallbacks: [gpt-4o]
  demo: {{ deployments: [ {{ provider: demo, deployment: demo-model }} ] }}
routing: {{ allowed_fails: 100 }}
keys:
  - {{ name: app, key: "sha256:{h1}" }}
  - {{ name: limited, key: "sha256:{h2}", models: [demo] }}
{extra}
"#,
        u = up.url(),
        h1 = sha256_hex(CLIENT_KEY),
        h2 = sha256_hex(OTHER_KEY),
    )
}

async fn setup() -> (MockUpstream, Gateway) {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&config(&up, "")).await;
    (up, gw)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

async fn post(gw: &Gateway, path: &str, body: &str) -> reqwest::Response {
    client()
        .post(gw.url(path))
        .bearer_auth(CLIENT_KEY)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

/// `POST /admin/reload` with the admin key.
async fn reload(c: &reqwest::Client, gw: &Gateway) -> reqwest::Response {
    c.post(gw.url("/admin/reload"))
        .bearer_auth("admin-secret")
        .send()
        .await
        .unwrap()
}

async fn error_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap();
    let e = &body["error"];
    assert!(e.get("message").is_some_and(Value::is_string), "{body}");
    assert!(e.get("type").is_some(), "{body}");
    assert!(e.get("param").is_some(), "{body}");
    assert!(e.get("code").is_some(), "{body}");
    (status, body)
}

#[tokio::test]
async fn openai_upstream_gets_the_body_byte_for_byte_with_only_model_rewritten() {
    let (up, gw) = setup().await;
    // Odd spacing and key order on purpose: the gateway must not re-serialise.
    let body = r#"{"messages": [{"role":"user","content":[{"type":"text","text":"what is this?"},{"type":"image_url","image_url":{"url":"data:image/png;base64,iVBORw0KGgo="}}]}],  "model":"gpt-4o", "temperature":0.25,"tools":[{"type":"function","function":{"name":"lookup","parameters":{"type":"object"}}}], "x_custom": {"keep": [1, 2.50, "3"]}}"#;
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(CLIENT_KEY)
        .header("x-request-id", "client-chosen-id-1")
        .header("x-stainless-retry-count", "0")
        // Hop-by-hop: named by `Connection`, and credentials of the client's own.
        .header("connection", "keep-alive, X-Secret-Hop")
        .header("x-secret-hop", "1")
        .header("cookie", "session=abc")
        // What the SDK sends from OPENAI_ORG_ID / OPENAI_PROJECT_ID: the client's own
        // account, not the gateway's upstream key's (OpenAI answers 401
        // mismatched_organization, which would count against the deployment).
        .header("openai-organization", "org-client")
        .header("openai-project", "proj_client")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "client-chosen-id-1");
    assert_eq!(resp.headers()["x-switchyard-route"], "gpt-4o");
    assert_eq!(
        resp.headers()["x-switchyard-deployment"],
        "up-openai/gpt-4o-upstream"
    );
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(
        answer["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
        "lookup"
    );

    let reqs = up.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.path, "/v1/chat/completions");
    assert_eq!(
        r.header("authorization"),
        Some(format!("Bearer {OPENAI_SECRET}").as_str())
    );
    assert_eq!(r.header("x-stainless-retry-count"), Some("0"));
    assert_eq!(r.header("x-request-id"), Some("client-chosen-id-1"));
    assert_eq!(r.header("x-secret-hop"), None);
    assert_eq!(r.header("cookie"), None);
    assert_eq!(r.header("openai-organization"), None);
    assert_eq!(r.header("openai-project"), None);
    let expected = body.replace(r#""model":"gpt-4o""#, r#""model":"gpt-4o-upstream""#);
    assert_eq!(std::str::from_utf8(&r.body).unwrap(), expected);
    for (name, value) in &r.headers {
        assert!(
            !value.contains(CLIENT_KEY),
            "client key leaked upstream in {name}"
        );
    }
}

/// An upstream that refuses the `stream_options` the gateway adds to ask for usage (Azure's
/// API versions before 2024-09-01-preview: "Unrecognized request argument supplied"; a
/// serverless endpoint: FastAPI's `{"detail": "Extra parameters ['stream_options'] are not
/// allowed"}`) gets the stream again without it, and every later stream without it; the
/// client's own `stream_options`, refused, is the client's error. Every stream failed with a
/// 400 about a field the client never sent, its reason lost in `detail`.
#[tokio::test]
async fn an_upstream_refusing_the_added_stream_options_streams_without_it() {
    let (up, gw) = setup().await;
    let stream = || {
        Scripted::stream(
            &[
                (
                    0,
                    &format!(
                        "data: {}\n\n",
                        chat_chunk(Some("assistant"), Some("hi"), None)
                    ),
                ),
                (0, "data: [DONE]\n\n"),
            ],
            StreamEnd::Finish,
        )
    };
    let body = r#"{"model":"ROUTE","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    for (route, refusal) in [
        (
            "gpt-4o-azure",
            json!({"error": {"message": "Unrecognized request argument supplied: stream_options",
                             "type": "invalid_request_error", "param": null, "code": null}}),
        ),
        (
            "gpt-4o",
            json!({"detail": "Extra parameters ['stream_options'] are not allowed when extra-parameters is not set or set to be 'error'."}),
        ),
    ] {
        up.reset();
        up.script(Scripted::respond(400, refusal.to_string()));
        up.script(stream());
        let r = post(&gw, "/v1/chat/completions", &body.replace("ROUTE", route)).await;
        assert_eq!(r.status(), 200, "{route}");
        let text = r.text().await.unwrap();
        assert!(
            text.contains("\"hi\"") && text.ends_with("data: [DONE]\n\n"),
            "{text}"
        );
        let sent = up.requests();
        assert_eq!(sent.len(), 2, "{route}");
        assert!(sent[0].json().get("stream_options").is_some());
        assert!(sent[1].json().get("stream_options").is_none(), "{route}");
        // Learned: the next stream goes without it at once.
        up.script(stream());
        let r = post(&gw, "/v1/chat/completions", &body.replace("ROUTE", route)).await;
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        assert!(up.requests()[2].json().get("stream_options").is_none());
    }
    // A refusal for another reason that only mentions it (a context-length error echoing
    // the request's parameters; a 400 the request gets without it too) teaches nothing:
    // the next stream still asks for usage (a gateway that has learned nothing yet).
    let fresh = Gateway::start(&config(&up, "")).await;
    up.reset();
    up.script(Scripted::respond(
        400,
        json!({"error": {"message": "This model's maximum context length is 4096 tokens. params: {'stream_options': {'include_usage': True}}", "type": "invalid_request_error"}}).to_string(),
    ));
    let r = post(
        &fresh,
        "/v1/chat/completions",
        &body.replace("ROUTE", "gpt-4o-azure"),
    )
    .await;
    assert_eq!(r.status(), 400);
    up.reset();
    up.script(Scripted::respond(
        400,
        json!({"error": {"message": "Invalid value for stream_options", "type": "invalid_request_error"}}).to_string(),
    ));
    up.script(Scripted::respond(
        400,
        json!({"error": {"message": "something else is wrong", "type": "invalid_request_error"}})
            .to_string(),
    ));
    up.script(stream());
    let r = post(
        &fresh,
        "/v1/chat/completions",
        &body.replace("ROUTE", "gpt-4o"),
    )
    .await;
    assert_eq!(r.status(), 400);
    r.bytes().await.unwrap();
    let r = post(
        &fresh,
        "/v1/chat/completions",
        &body.replace("ROUTE", "gpt-4o"),
    )
    .await;
    r.bytes().await.unwrap();
    assert!(
        up.requests()[2].json().get("stream_options").is_some(),
        "not learned"
    );
    // FastAPI's validation list naming it (only in `loc`): learned, its text the message.
    let gw2 = Gateway::start(&config(&up, "")).await;
    up.reset();
    up.script(Scripted::respond(
        422,
        json!({"detail": [{"loc": ["body", "stream_options"], "msg": "Extra inputs are not permitted", "type": "extra_forbidden"}]}).to_string(),
    ));
    up.script(stream());
    let r = post(
        &gw2,
        "/v1/chat/completions",
        &body.replace("ROUTE", "gpt-4o"),
    )
    .await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    assert!(up.requests()[1].json().get("stream_options").is_none());
    up.reset();
    up.script(Scripted::respond(
        422,
        json!({"detail": [{"loc": ["body", "temperature"], "msg": "Input should be a number"}]})
            .to_string(),
    ));
    let (status, e) = error_of(
        post(
            &gw2,
            "/v1/chat/completions",
            r#"{"model":"gpt-4o","messages":[]}"#,
        )
        .await,
    )
    .await;
    assert_eq!(status, 422);
    assert_eq!(
        e["error"]["message"], "body.temperature: Input should be a number",
        "{e}"
    );
    // The client's own `stream_options`, refused: its error, with the text of `detail`.
    up.reset();
    up.script(Scripted::respond(
        400,
        json!({"detail": "Extra parameters ['stream_options'] are not allowed."}).to_string(),
    ));
    let own =
        r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
    let (status, e) = error_of(post(&gw, "/v1/chat/completions", own).await).await;
    assert_eq!(status, 400);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Extra parameters"),
        "{e}"
    );
    assert_eq!(up.request_count(), 1);
}

/// An error event in a stream is put in OpenAI's shape as an error answer is: TGI's
/// `{"error": "text", "error_type": "generation"}` (the SDK raised "An error occurred during
/// streaming", the text lost), vLLM's integer `code`, vLLM's older flat `{"object":
/// "error"}`; one already in OpenAI's shape goes as it came; the upstream's key is blanked.
#[tokio::test]
async fn error_events_in_a_stream_are_put_in_openais_shape() {
    let (up, gw) = setup().await;
    let body = r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    for (event, want) in [
        (
            json!({"error": format!("Request failed during generation: CUDA out of memory ({OPENAI_SECRET})"),
                   "error_type": "generation"}),
            json!({"message": "Request failed during generation: CUDA out of memory (***)",
                   "type": "generation", "param": null, "code": "upstream_error"}),
        ),
        (
            json!({"error": {"message": "engine dead", "type": "InternalServerError", "param": null, "code": 500}}),
            json!({"message": "engine dead", "type": "InternalServerError", "param": null, "code": "upstream_error"}),
        ),
        (
            json!({"object": "error", "message": "engine dead", "type": "InternalServerError", "param": null, "code": 500}),
            json!({"message": "engine dead", "type": "InternalServerError", "param": null, "code": "upstream_error"}),
        ),
        (
            json!({"error": {"message": "overloaded", "type": "server_error", "param": null, "code": "server_overloaded"}}),
            json!({"message": "overloaded", "type": "server_error", "param": null, "code": "server_overloaded"}),
        ),
    ] {
        up.script(Scripted::stream(
            &[
                (
                    0,
                    &format!(
                        "data: {}\n\n",
                        chat_chunk(Some("assistant"), Some("Hel"), None)
                    ),
                ),
                (0, &format!("data: {event}\n\n")),
            ],
            StreamEnd::Finish,
        ));
        let text = post(&gw, "/v1/chat/completions", body)
            .await
            .text()
            .await
            .unwrap();
        let last = text
            .split("\n\n")
            .filter(|e| !e.trim().is_empty())
            .last()
            .unwrap();
        let got: Value = serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(got["error"], want, "{text}");
    }
}

/// An OpenAI-compatible server that requires an `api-version` (Azure AI Foundry's model
/// inference endpoint, `…services.ai.azure.com/models`) gets the provider's on every request;
/// `check` refuses one that would change the URL.
#[tokio::test]
async fn an_openai_provider_with_an_api_version_sends_it_on_every_request() {
    let up = MockUpstream::start().await;
    let cfg = config(&up, "").replace(
        "  dead: {",
        &format!(
            "  foundry: {{ kind: openai, base_url: \"{}/models\", api_version: 2024-05-01-preview }}\n  dead: {{",
            up.url()
        ),
    ).replace(
        "  demo: { deployments:",
        "  phi: { deployments: [ { provider: foundry, deployment: Phi-4 } ] }\n  demo: { deployments:",
    );
    let gw = Gateway::start(&cfg).await;
    let r = post(
        &gw,
        "/v1/chat/completions",
        r#"{"model":"phi","messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    assert_eq!(r.status(), 200);
    let sent = &up.requests()[0];
    assert_eq!(
        (sent.path.as_str(), sent.query.as_deref()),
        (
            "/models/chat/completions",
            Some("api-version=2024-05-01-preview")
        )
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.yaml");
    std::fs::write(
        &path,
        cfg.replace("2024-05-01-preview", "\"2024-05-01&x=1\""),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("providers.foundry.api_version"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn azure_upstream_gets_deployment_path_api_version_and_api_key() {
    let (up, gw) = setup().await;
    let body = r#"{"model":"gpt-4o-azure","messages":[{"role":"user","content":"hi"}]}"#;
    let resp = post(&gw, "/v1/chat/completions", body).await;
    assert_eq!(resp.status(), 200);
    let r = &up.requests()[0];
    assert_eq!(r.path, "/openai/deployments/my-azure-dep/chat/completions");
    assert_eq!(r.query.as_deref(), Some("api-version=2024-10-21"));
    assert_eq!(r.header("api-key"), Some(AZURE_SECRET));
    assert_eq!(r.header("authorization"), None);
    assert_eq!(
        &r.body[..],
        body.as_bytes(),
        "Azure takes the deployment from the path"
    );
}

#[tokio::test]
async fn azure_shaped_clients_reach_any_upstream() {
    let (up, gw) = setup().await;
    // The AzureOpenAI SDK: route in the path, api-key header, its own api-version.
    let body = r#"{"messages":[{"role":"user","content":"hi"}]}"#;
    let resp = client()
        .post(gw.url("/openai/deployments/gpt-4o/chat/completions?api-version=2024-06-01"))
        .header("api-key", CLIENT_KEY)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-switchyard-route"], "gpt-4o");
    let r = &up.requests()[0];
    assert_eq!(r.path, "/v1/chat/completions");
    assert_eq!(
        r.query, None,
        "the client's api-version is not for an OpenAI upstream"
    );
    assert_eq!(
        std::str::from_utf8(&r.body).unwrap(),
        r#"{"model":"gpt-4o-upstream","messages":[{"role":"user","content":"hi"}]}"#
    );
    // And to an Azure upstream, the provider's api-version replaces the client's.
    let resp = client()
        .post(gw.url("/openai/deployments/gpt-4o-azure/embeddings?api-version=2023-05-15"))
        .header("api-key", CLIENT_KEY)
        .body(r#"{"input":"abc"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let r = &up.requests()[1];
    assert_eq!(r.path, "/openai/deployments/my-azure-dep/embeddings");
    assert_eq!(r.query.as_deref(), Some("api-version=2024-10-21"));
}

#[tokio::test]
async fn multipart_upload_keeps_the_file_and_rewrites_the_model_field() {
    let (up, gw) = setup().await;
    let audio: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(audio.clone()).file_name("speech.wav"),
        )
        .text("model", "whisper")
        .text("response_format", "text")
        .text("timestamp_granularities[]", "word")
        .text("timestamp_granularities[]", "segment");
    let resp = client()
        .post(gw.url("/v1/audio/transcriptions"))
        .bearer_auth(CLIENT_KEY)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = resp.text().await.unwrap();
    assert!(!text.is_empty());
    let r = &up.requests()[0];
    let parts = upstream::parse_multipart(r.header("content-type").unwrap(), &r.body).unwrap();
    let get = |n: &str| parts.iter().filter(|p| p.name == n).collect::<Vec<_>>();
    assert_eq!(get("model")[0].data, "whisper-1".as_bytes());
    assert_eq!(get("file")[0].data, audio);
    assert_eq!(get("timestamp_granularities[]").len(), 2);
}

#[tokio::test]
async fn streams_pass_through_chunk_by_chunk() {
    let (up, gw) = setup().await;
    let c1 = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"first\"},\"finish_reason\":null}]}\n\n";
    let c2 = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" second\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n";
    // The second chunk leaves the upstream long after the first.
    up.script(Scripted::stream(&[(0, c1), (1500, c2)], StreamEnd::Finish));
    let resp = post(
        &gw,
        "/v1/chat/completions",
        r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut body = resp.bytes_stream();
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("first") {
        got.extend_from_slice(&body.next().await.unwrap().unwrap());
    }
    // The first chunk reached the client while the upstream is still sending: not buffered.
    assert_eq!(
        up.in_flight(),
        1,
        "the first chunk arrived only after the upstream finished"
    );
    assert!(!String::from_utf8_lossy(&got).contains("second"));
    while let Some(chunk) = body.next().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(String::from_utf8(got).unwrap(), format!("{c1}{c2}"));
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_the_upstream_request() {
    let (up, gw) = setup().await;
    // Mid-stream.
    let c1 = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"}}]}\n\n";
    up.script(Scripted::stream(
        &[(0, c1), (30_000, c1)],
        StreamEnd::Finish,
    ));
    let resp = post(
        &gw,
        "/v1/chat/completions",
        r#"{"model":"gpt-4o","stream":true,"messages":[]}"#,
    )
    .await;
    let mut body = resp.bytes_stream();
    body.next().await.unwrap().unwrap();
    assert!(up.wait_in_flight(1, Duration::from_secs(5)).await);
    drop(body);
    assert!(
        up.wait_in_flight(0, Duration::from_secs(5)).await,
        "the upstream request outlived the client"
    );
    // Before any answer.
    up.script(Scripted::Hang);
    let c = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let err = c
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(CLIENT_KEY)
        .body(r#"{"model":"gpt-4o","messages":[]}"#)
        .send()
        .await;
    assert!(err.is_err());
    assert!(
        up.wait_in_flight(0, Duration::from_secs(5)).await,
        "a hanging upstream request outlived the client"
    );
    // The gateway keeps serving.
    let resp = post(
        &gw,
        "/v1/chat/completions",
        r#"{"model":"demo","messages":[]}"#,
    )
    .await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn client_errors_have_the_openai_shape_and_status() {
    let (_up, gw) = setup().await;
    let chat = r#"{"model":"gpt-4o","messages":[]}"#;
    let c = client();

    let resp = c
        .post(gw.url("/v1/chat/completions"))
        .body(chat)
        .send()
        .await
        .unwrap();
    let (status, body) = error_of(resp).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("invalid_api_key"))
    );

    let resp = c
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth("sk-wrong")
        .body(chat)
        .send()
        .await
        .unwrap();
    let (status, body) = error_of(resp).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("invalid_api_key"))
    );
    assert!(!body.to_string().contains("sk-wrong"));

    let resp = c
        .post(gw.url("/v1/chat/completions"))
        .header("api-key", OTHER_KEY)
        .body(chat)
        .send()
        .await
        .unwrap();
    let (status, body) = error_of(resp).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("permission_denied"))
    );

    let resp = post(
        &gw,
        "/v1/chat/completions",
        r#"{"model":"nope","messages":[]}"#,
    )
    .await;
    let (status, body) = error_of(resp).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );

    let resp = post(&gw, "/v1/chat/completions", "this is not json").await;
    let (status, body) = error_of(resp).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_request"))
    );

    let resp = post(
        &gw,
        "/v1/chat/completions",
        r#"{"model":"gpt-4o","messages":"hi"}"#,
    )
    .await;
    let (status, body) = error_of(resp).await;
    assert_eq!(status, 400);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("`messages` must be an array"));
    assert_eq!(body["error"]["param"], "messages");

    let resp = post(&gw, "/v1/embeddings", r#"{"input":"x"}"#).await;
    let (status, body) = error_of(resp).await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("model"))
    );

    let big = format!(
        r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(70_000)
    );
    let resp = post(&gw, "/v1/chat/completions", &big).await;
    let (status, body) = error_of(resp).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("request_too_large"))
    );

    let resp = c
        .get(gw.url("/v1/chat/completions"))
        .bearer_auth(CLIENT_KEY)
        .send()
        .await
        .unwrap();
    let (status, _) = error_of(resp).await;
    assert_eq!(status, 405);

    let resp = c
        .get(gw.url("/v1/files"))
        .bearer_auth(CLIENT_KEY)
        .send()
        .await
        .unwrap();
    let (status, _) = error_of(resp).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn upstream_failures_are_retried_normalised_and_never_leak_the_upstream_key() {
    let (up, gw) = setup().await;
    let chat = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;

    // 500 then success: retried, the client sees the success.
    up.script(Scripted::server_error(500));
    let resp = post(&gw, "/v1/chat/completions", chat).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(up.request_count(), 2);

    // A content-filter refusal is not retried and keeps its code and inner error.
    up.reset();
    up.script(Scripted::azure_content_filter());
    let (status, body) = error_of(post(&gw, "/v1/chat/completions", chat).await).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "content_filter");
    assert_eq!(
        body["error"]["innererror"]["code"],
        "ResponsibleAIPolicyViolation"
    );
    assert_eq!(up.request_count(), 1);

    // Every attempt fails: the upstream's last status and message.
    up.reset();
    for _ in 0..3 {
        up.script(Scripted::html(502));
    }
    let (status, body) = error_of(post(&gw, "/v1/chat/completions", chat).await).await;
    assert_eq!(status, 502);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Bad Gateway"));
    assert_eq!(up.request_count(), 3, "retries: 2 means three attempts");

    // vLLM's integer code and TGI's string error become the OpenAI shape.
    up.reset();
    up.script(Scripted::vllm_error(
        400,
        "This model's maximum context length is 4096 tokens",
    ));
    let (status, body) = error_of(post(&gw, "/v1/chat/completions", chat).await).await;
    assert_eq!(status, 400);
    assert!(body["error"]["code"].is_string());
    up.script(Scripted::tgi_error(
        422,
        "Input validation error",
        "validation",
    ));
    let (status, body) = error_of(post(&gw, "/v1/chat/completions", chat).await).await;
    assert_eq!(
        (status, body["error"]["type"].as_str()),
        (422, Some("validation"))
    );

    // An upstream that echoes its key: scrubbed.
    up.script(Scripted::respond(
        400,
        json!({"error": {"message": format!("bad key {OPENAI_SECRET}"), "code": "invalid_api_key"}}).to_string(),
    ));
    let (status, body) = error_of(post(&gw, "/v1/chat/completions", chat).await).await;
    assert_eq!(status, 400);
    assert!(!body.to_string().contains(OPENAI_SECRET));
    // Echoed URL-encoded (after `%20`), and in an HTML page where the 300 characters kept
    // of it end inside the key: none of it is left (18 of its characters were).
    up.script(Scripted::respond(
        400,
        json!({"error": {"message": format!("denied: Authorization=Bearer%20{OPENAI_SECRET}")}})
            .to_string(),
    ));
    let (_, body) = error_of(post(&gw, "/v1/chat/completions", chat).await).await;
    assert!(!body.to_string().contains(OPENAI_SECRET), "{body}");
    // A header passed on from the upstream, echoing its key: left behind.
    up.script(Scripted::Respond {
        status: 200,
        headers: vec![
            (
                "content-disposition".into(),
                format!("attachment; filename=\"{OPENAI_SECRET}.json\""),
            ),
            ("openai-processing-ms".into(), "12".into()),
            ("x-request-id".into(), "req_upstream1".into()),
            ("apim-request-id".into(), "0f8e-azure".into()),
            // Past any id's length: not passed.
            ("x-ms-region".into(), "r".repeat(2000)),
        ],
        body: json!({"id": "c", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).to_string(),
    });
    let r = post(&gw, "/v1/chat/completions", chat).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("content-disposition").is_none());
    assert_eq!(r.headers()["openai-processing-ms"], "12");
    // The upstream's ids of the request, which its support asks for, beside the gateway's.
    assert_eq!(r.headers()["x-upstream-request-id"], "req_upstream1");
    assert_eq!(r.headers()["apim-request-id"], "0f8e-azure");
    assert!(r.headers().get("x-ms-region").is_none());
    assert_ne!(r.headers()["x-request-id"], "req_upstream1");
    up.script(Scripted::Respond {
        status: 400,
        headers: vec![("x-request-id".into(), "req_upstream2".into())],
        body: json!({"error": {"message": "bad", "type": "invalid_request_error"}}).to_string(),
    });
    let r = post(&gw, "/v1/chat/completions", chat).await;
    assert_eq!(
        (
            r.status().as_u16(),
            r.headers()["x-upstream-request-id"].to_str().unwrap()
        ),
        (400, "req_upstream2")
    );
    let page = format!("<html>{} key {OPENAI_SECRET} end</html>", "x".repeat(278));
    up.script(Scripted::Respond {
        status: 400,
        headers: vec![("content-type".into(), "text/html".into())],
        body: page,
    });
    let (status, body) = error_of(post(&gw, "/v1/chat/completions", chat).await).await;
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        status == 400 && message.contains("non-JSON body: <html>xxx"),
        "{body}"
    );
    assert!(
        !message.contains("upstream-s") && message.contains("key ***"),
        "{message}"
    );

    // A hanging upstream: 504 upstream_timeout after the route's timeout.
    up.script(Scripted::Hang);
    let (status, body) = error_of(
        post(
            &gw,
            "/v1/chat/completions",
            r#"{"model":"flaky","messages":[]}"#,
        )
        .await,
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (504, Some("upstream_timeout"))
    );

    // Nothing listening: the fallback route serves.
    let resp = post(
        &gw,
        "/v1/chat/completions",
        r#"{"model":"with-fallback","messages":[]}"#,
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-switchyard-route"], "gpt-4o");

    let logs = gw.logs();
    assert!(
        !logs.contains(OPENAI_SECRET) && !logs.contains(AZURE_SECRET) && !logs.contains(CLIENT_KEY)
    );
}

#[tokio::test]
async fn a_stream_that_breaks_off_ends_with_an_error_event() {
    let (up, gw) = setup().await;
    let c1 = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"par\"},\"finish_reason\":null}]}\n\ndata: {\"id\":\"c1\",\"obj";
    up.script(Scripted::stream(&[(0, c1), (50, "")], StreamEnd::Abort));
    let resp = post(
        &gw,
        "/v1/chat/completions",
        r#"{"model":"gpt-4o","stream":true,"messages":[]}"#,
    )
    .await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(text.starts_with("data: {\"id\":\"c1\""), "{text}");
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    let last: Value = serde_json::from_str(last.trim().trim_start_matches("data:").trim())
        .unwrap_or_else(|e| panic!("last event is not JSON ({e}): {text}"));
    assert_eq!(last["error"]["code"], "upstream_error");
    assert!(!text.contains("[DONE]"));
    // Its log line says so.
    stream_logged(&gw, "upstream_broke_off").await;
    // An upstream whose own stream ends with such an error event (another gateway in front
    // of a broken one), then ends whole: passed on as it came, and complete here (the access
    // log told a broken stream by those bytes).
    let theirs = "data: {\"error\":{\"message\":\"the upstream stream broke off before its end\",\"type\":\"api_error\",\"param\":null,\"code\":\"upstream_error\"}}\n\n";
    up.script(Scripted::stream(
        &[(0, c1_whole()), (0, theirs)],
        StreamEnd::Finish,
    ));
    let text = post(
        &gw,
        "/v1/chat/completions",
        r#"{"model":"gpt-4o","stream":true,"messages":[]}"#,
    )
    .await
    .text()
    .await
    .unwrap();
    assert!(text.ends_with(theirs), "{text}");
    stream_logged(&gw, "complete").await;
}

/// Waits for a stream's access-log line with `outcome`.
async fn stream_logged(gw: &Gateway, outcome: &str) {
    let want = format!("outcome={outcome}");
    let logged = gw
        .wait_log(
            |log| {
                log.lines()
                    .any(|l| l.contains("stream=true") && l.contains(&want))
            },
            Duration::from_secs(2),
        )
        .await;
    assert!(logged, "no stream logged {want}: {}", gw.logs());
}

/// One whole chat chunk event.
fn c1_whole() -> &'static str {
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"par\"},\"finish_reason\":null}]}\n\n"
}

#[tokio::test]
async fn models_list_shows_the_routes_a_key_may_use() {
    let (_up, gw) = setup().await;
    let c = client();
    let list: Value = gw.get_json("/v1/models", CLIENT_KEY).await;
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "gpt-4o",
            "gpt-4o-azure",
            "whisper",
            "flaky",
            "with-fallback",
            "demo"
        ]
    );
    let list: Value = gw.get_json("/v1/models", OTHER_KEY).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    let one = c
        .get(gw.url("/v1/models/demo"))
        .bearer_auth(OTHER_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(one.status(), 200);
    let hidden = c
        .get(gw.url("/v1/models/gpt-4o"))
        .bearer_auth(OTHER_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(hidden.status(), 404);
    // Listed and looked up models are counted under `endpoint="models"`, `route="none"`.
    let text = gw.metrics_text().await;
    let count = |status: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with("switchyard_requests_total{"))
            .filter(|l| l.contains("endpoint=\"models\"") && l.contains("route=\"none\""))
            .filter(|l| l.contains(&format!("status=\"{status}\"")))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    };
    assert_eq!((count("200"), count("404")), (3.0, 1.0), "{text}");
}

#[tokio::test]
async fn the_mock_provider_answers_every_endpoint() {
    let (_up, gw) = setup().await;
    let resp = post(
        &gw,
        "/v1/embeddings",
        r#"{"model":"demo","input":["a","b"],"dimensions":4}"#,
    )
    .await;
    let floats: Value = resp.json().await.unwrap();
    assert_eq!(floats["data"].as_array().unwrap().len(), 2);
    let v: Vec<f32> = serde_json::from_value(floats["data"][0]["embedding"].clone()).unwrap();
    assert_eq!(v.len(), 4);
    let resp = post(
        &gw,
        "/v1/embeddings",
        r#"{"model":"demo","input":["a"],"dimensions":4,"encoding_format":"base64"}"#,
    )
    .await;
    let b64: Value = resp.json().await.unwrap();
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(
        decoded, v,
        "deterministic, and base64 decodes to the same vector"
    );

    let resp = post(&gw, "/v1/chat/completions", r#"{"model":"demo","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hello there"}]}"#).await;
    let text = resp.text().await.unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    let usage: Value =
        serde_json::from_str(events[events.len() - 2].trim_start_matches("data: ")).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 4);
    assert!(usage["usage"]["prompt_tokens"].as_u64().unwrap() > 0);

    for (path, body) in [
        ("/v1/completions", r#"{"model":"demo","prompt":"say hi"}"#),
        (
            "/v1/images/generations",
            r#"{"model":"demo","prompt":"a cat"}"#,
        ),
        ("/v1/moderations", r#"{"model":"demo","input":"hello"}"#),
        ("/v1/responses", r#"{"model":"demo","input":"hello"}"#),
        (
            "/v1/audio/speech",
            r#"{"model":"demo","input":"hello","voice":"alloy"}"#,
        ),
    ] {
        let resp = post(&gw, path, body).await;
        assert_eq!(resp.status(), 200, "{path}");
        assert!(!resp.bytes().await.unwrap().is_empty(), "{path}");
    }
}

#[tokio::test]
async fn reload_by_admin_api_signal_and_file_change_and_bad_configs_are_refused() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&config(&up, "")).await;
    let c = client();
    let route_status = |name: &'static str| {
        let c = c.clone();
        let url = gw.url("/v1/chat/completions");
        async move {
            c.post(url)
                .bearer_auth(CLIENT_KEY)
                .body(format!(r#"{{"model":"{name}","messages":[]}}"#))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    // A slow stream on the old config, in flight across every reload below.
    up.script(Scripted::stream(
        &[(0, "data: {\"n\":1}\n\n"), (1500, "data: [DONE]\n\n")],
        StreamEnd::Finish,
    ));
    let slow = post(
        &gw,
        "/v1/chat/completions",
        r#"{"model":"gpt-4o","stream":true,"messages":[]}"#,
    )
    .await;
    assert_eq!(slow.status(), 200);

    // Admin API: wrong key refused; a bad config refused with its position; old one serves.
    let resp = c
        .post(gw.url("/admin/reload"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    let (status, body) = error_of(resp).await;
    assert_eq!(status, 401);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("Incorrect"));
    let resp = c.post(gw.url("/admin/reload")).send().await.unwrap();
    let (status, body) = error_of(resp).await;
    assert_eq!(status, 401);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("Missing admin key"));
    let original = std::fs::read_to_string(gw.config_path()).unwrap();
    std::fs::write(
        gw.config_path(),
        original.replace(
            "kind: mock, stream_chunks: 4",
            "kind: mock, stream_chunks: 4, bogus: 1",
        ),
    )
    .unwrap();
    let (status, body) = error_of(reload(&c, &gw).await).await;
    assert_eq!(status, 400);
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("routes.yaml:") && msg.contains("unknown field `bogus`"),
        "{msg}"
    );
    assert_eq!(route_status("demo").await, 200);
    // Nested aliases that would copy out a billion values: refused, the old config serves.
    let mut laughs = format!("{original}\nx-a:\n  a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..=9 {
        laughs += &format!(
            "  a{i}: &a{i} [{}]\n",
            vec![format!("*a{}", i - 1); 10].join(", ")
        );
    }
    std::fs::write(gw.config_path(), laughs).unwrap();
    let (status, body) = error_of(reload(&c, &gw).await).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("aliases"),
        "{body}"
    );
    assert_eq!(route_status("demo").await, 200);

    // A good config: a new route appears.
    let with_new = original.replace(
        "  demo: { deployments:",
        "  demo2: { deployments: [ { provider: demo } ] }\n  demo: { deployments:",
    );
    std::fs::write(gw.config_path(), &with_new).unwrap();
    let resp = c
        .post(gw.url("/admin/reload"))
        .bearer_auth("admin-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(route_status("demo2").await, 200);

    // SIGHUP: the route goes away again.
    std::fs::write(gw.config_path(), &original).unwrap();
    gw.signal("HUP");
    let mut gone = false;
    for _ in 0..100 {
        if route_status("demo2").await == 404 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "SIGHUP did not reload:\n{}", gw.logs());

    // A change of the file alone.
    std::fs::write(gw.config_path(), &with_new).unwrap();
    let mut back = false;
    for _ in 0..100 {
        if route_status("demo2").await == 200 {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(back, "a file change did not reload:\n{}", gw.logs());

    // The stream that started before all this finished on its config.
    let text = slow.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");

    // The admin view has no secret in it.
    let routes = c
        .get(gw.url("/admin/routes"))
        .bearer_auth("admin-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(routes.status(), 200);
    let text = routes.text().await.unwrap();
    assert!(text.contains("up-openai/gpt-4o-upstream"));
    for secret in [OPENAI_SECRET, AZURE_SECRET, "admin-secret", CLIENT_KEY] {
        assert!(!text.contains(secret));
    }
}

/// The file watcher loads a file once its writer is done with it: a file written in two
/// steps is not loaded at the first (valid YAML, without `keys:`, it turned client
/// authentication off between the two). And no reload turns authentication off or leaves no
/// route: not an emptied file, not a config without keys sent to `/admin/reload`.
#[tokio::test]
async fn a_half_written_or_emptied_config_is_not_loaded_and_no_reload_turns_auth_off() {
    use std::io::Write;
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&config(&up, "")).await;
    let c = client();
    let keyless = || {
        c.post(gw.url("/v1/chat/completions"))
            .body(r#"{"model":"demo","messages":[{"role":"user","content":"hi"}]}"#)
            .send()
    };
    assert_eq!(keyless().await.unwrap().status(), 401);
    let original = std::fs::read_to_string(gw.config_path()).unwrap();
    let with_new = original.replace(
        "  demo: { deployments:",
        "  demo2: { deployments: [ { provider: demo } ] }\n  demo: { deployments:",
    );
    let other = || {
        c.post(gw.url("/v1/chat/completions"))
            .bearer_auth(OTHER_KEY)
            .body(r#"{"model":"demo","messages":[{"role":"user","content":"hi"}]}"#)
            .send()
    };
    assert_eq!(other().await.unwrap().status(), 200);
    // Cut after the first key: valid, and without the second.
    let cut = with_new.find("  - { name: limited").unwrap();
    let mut f = std::fs::File::create(gw.config_path()).unwrap();
    f.write_all(&with_new.as_bytes()[..cut]).unwrap();
    f.flush().unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(other().await.unwrap().status(), 200, "{}", gw.logs());
    f.write_all(&with_new.as_bytes()[cut..]).unwrap();
    drop(f);
    let mut loaded = false;
    for _ in 0..100 {
        let r = c
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(CLIENT_KEY)
            .body(r#"{"model":"demo2","messages":[{"role":"user","content":"hi"}]}"#)
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            loaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(loaded, "the whole file was not loaded:\n{}", gw.logs());
    assert_eq!(keyless().await.unwrap().status(), 401);

    // Removed: nothing refused (a warning says so), then made again in two steps: not
    // loaded at its making either.
    let refused = gw.logs().matches("reload refused").count();
    std::fs::remove_file(gw.config_path()).unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let logs = gw.logs();
    assert!(logs.contains("the config file was removed"), "{logs}");
    assert_eq!(logs.matches("reload refused").count(), refused, "{logs}");
    let mut f = std::fs::File::create(gw.config_path()).unwrap();
    f.write_all(&with_new.as_bytes()[..cut]).unwrap();
    f.flush().unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(other().await.unwrap().status(), 200, "{}", gw.logs());
    f.write_all(&with_new.as_bytes()[cut..]).unwrap();
    drop(f);

    // Emptied: refused, the old config serves.
    std::fs::write(gw.config_path(), "").unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(gw.logs().contains("no `models:`"), "{}", gw.logs());
    assert_eq!(keyless().await.unwrap().status(), 401);

    // Without keys, asked for: refused with the reason.
    let no_keys = &with_new[..with_new.find("keys:").unwrap()];
    std::fs::write(gw.config_path(), no_keys).unwrap();
    let (status, body) = error_of(reload(&c, &gw).await).await;
    assert_eq!(status, 400);
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("without client authentication"), "{msg}");
    assert_eq!(keyless().await.unwrap().status(), 401);
}

/// A chat request with the client key as it goes on the wire (HTTP/1.1, kept alive).
fn raw_chat(body: &str) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {CLIENT_KEY}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Whether `route` answers 200 within 3 s (a reload of the config file may take a moment).
async fn comes_to_serve(gw: &Gateway, route: &str) -> bool {
    let c = client();
    for _ in 0..60 {
        let r = c
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(CLIENT_KEY)
            .body(format!(
                r#"{{"model":"{route}","messages":[{{"role":"user","content":"hi"}}]}}"#
            ))
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// The config text with a route `name` added before `demo`.
fn with_route(config: &str, name: &str) -> String {
    config.replace(
        "  demo: { deployments:",
        &format!("  {name}: {{ deployments: [ {{ provider: demo }} ] }}\n  demo: {{ deployments:"),
    )
}

/// A config file that is a symlink into another folder is reloaded when its target changes
/// there.
#[tokio::test]
async fn a_config_linked_from_another_folder_reloads_when_its_target_changes() {
    let up = MockUpstream::start().await;
    let real = tempfile::tempdir().unwrap();
    let target = real.path().join("switchyard.yaml");
    std::fs::write(&target, "").unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(&target, dir.path().join("routes.yaml")).unwrap();
    // Written through the link, to the target.
    let gw = Gateway::start_in(&config(&up, ""), dir).await;
    let original = std::fs::read_to_string(&target).unwrap();
    assert!(original.contains("models:"));
    std::fs::write(&target, with_route(&original, "demo2")).unwrap();
    assert!(
        comes_to_serve(&gw, "demo2").await,
        "the target's change did not reload:\n{}",
        gw.logs()
    );

    // `touch` (an open for writing and a close, nothing changed): no reload.
    let reloads = |gw: &Gateway| gw.logs().matches("config reloaded").count();
    // (Log lines are written within 20 ms of their event.)
    assert!(
        gw.wait_log(|l| l.contains("config reloaded"), Duration::from_secs(5))
            .await
    );
    let before = reloads(&gw);
    let touched = std::process::Command::new("touch")
        .arg(&target)
        .status()
        .unwrap();
    assert!(touched.success());
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(reloads(&gw), before, "{}", gw.logs());

    // The link pointed into a third folder: that folder is watched from then on.
    let other = tempfile::tempdir().unwrap();
    let moved = other.path().join("routes.yaml");
    let third = with_route(&std::fs::read_to_string(&target).unwrap(), "demo3");
    std::fs::write(&moved, &third).unwrap();
    let link = gw.config_path();
    let tmp_link = link.with_extension("new");
    std::os::unix::fs::symlink(&moved, &tmp_link).unwrap();
    std::fs::rename(&tmp_link, &link).unwrap();
    assert!(comes_to_serve(&gw, "demo3").await, "{}", gw.logs());
    std::fs::write(&moved, with_route(&third, "demo4")).unwrap();
    assert!(comes_to_serve(&gw, "demo4").await, "{}", gw.logs());
}

/// A reload that changes fields read only at start applies everything else and logs one
/// warning per such field, naming it; the old values stay in force (the ledger is not
/// reopened on the new URL).
#[tokio::test]
async fn a_reload_that_changes_start_only_fields_warns_for_each_and_applies_the_rest() {
    let cfg = |grace: &str,
               watch: bool,
               ledger: &str,
               cache: &str,
               hook: &str,
               extra_route: &str| {
        format!(
            r#"
server: {{ admin_key: reload-admin, listen: "127.0.0.1:0", shutdown_grace: {grace}, watch_config: {watch} }}
state: {{ ledger: "sqlite://{ledger}" }}
cache: {{ max_bytes: {cache} }}
alerts: {{ webhook: "{hook}" }}
providers:
  demo: {{ kind: mock }}
models:
  m: {{ deployments: [ {{ provider: demo }} ] }}
{extra_route}
"#
        )
    };
    let gw = Gateway::start(&cfg(
        "5s",
        false,
        "first.db",
        "1MiB",
        "http://127.0.0.1:9/a",
        "",
    ))
    .await;
    let c = client();
    let ask = |model: &'static str| {
        let c = c.clone();
        let url = gw.url("/v1/chat/completions");
        async move {
            c.post(url)
                .body(format!(r#"{{"model":"{model}","messages":[]}}"#))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(ask("m2").await, 404);
    let changed = cfg(
        "7s",
        true,
        "second.db",
        "2MiB",
        "http://127.0.0.1:9/b",
        "  m2: { deployments: [ { provider: demo } ] }",
    )
    .replace("listen: \"127.0.0.1:0\"", "listen: \"127.0.0.1:1\"");
    let fields = [
        "server.listen",
        "server.shutdown_grace",
        "server.watch_config",
        "state",
        "cache.max_bytes",
        "alerts.webhook",
    ];
    // Reloads `text` and returns how many restart warnings each field has had so far.
    let reload = |text: String, n: usize| {
        let c = c.clone();
        let gw = &gw;
        async move {
            std::fs::write(gw.config_path(), text).unwrap();
            let resp = c
                .post(gw.url("/admin/reload"))
                .bearer_auth("reload-admin")
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            // The log is written by a thread of its own: wait for the reload's line.
            let line = format!("generation={}", n + 1);
            assert!(
                gw.wait_log(
                    |l| l
                        .lines()
                        .any(|l| l.contains("config reloaded") && l.contains(&line)),
                    Duration::from_secs(5)
                )
                .await,
                "{}",
                gw.logs()
            );
            let logs = gw.logs();
            fields.map(|field| {
                logs.lines()
                    .filter(|l| {
                        l.contains("WARN")
                            && l.contains("takes effect at the next restart")
                            && (l.contains(&format!("field=\"{field}\""))
                                || l.ends_with(&format!("field={field}")))
                    })
                    .count()
            })
        }
    };
    assert_eq!(
        reload(changed.clone(), 1).await,
        [1; 6],
        "one warning per field:\n{}",
        gw.logs()
    );
    assert_eq!(ask("m2").await, 200, "the rest of the change applied");
    // The same file again: the running values are still the first ones, so it warns again.
    assert_eq!(reload(changed, 2).await, [2; 6], "{}", gw.logs());
    // Back to the values the gateway runs with: nothing to warn about.
    let original = cfg("5s", false, "first.db", "1MiB", "http://127.0.0.1:9/a", "");
    assert_eq!(reload(original, 3).await, [2; 6], "{}", gw.logs());
    let logs = gw.logs();
    // The ledger was not reopened on the new URL.
    assert!(!gw.dir.path().join("second.db").exists(), "{logs}");
}

#[tokio::test]
async fn sigterm_lets_streams_in_flight_finish() {
    let up = MockUpstream::start().await;
    let mut gw = Gateway::start(&config(&up, "")).await;
    up.script(Scripted::stream(
        &[
            (0, "data: {\"n\":1}\n\n"),
            (1000, "data: {\"n\":2}\n\n"),
            (200, "data: [DONE]\n\n"),
        ],
        StreamEnd::Finish,
    ));
    let resp = post(
        &gw,
        "/v1/chat/completions",
        r#"{"model":"gpt-4o","stream":true,"messages":[]}"#,
    )
    .await;
    let mut body = resp.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("\"n\":1"));
    gw.signal("TERM");
    assert!(
        gw.wait_log(|l| l.contains("shutting down"), Duration::from_secs(5))
            .await
    );
    // No new connections once shutting down.
    let refused = reqwest::Client::new().get(gw.url("/healthz")).send().await;
    assert!(
        refused.is_err(),
        "a new connection was accepted during shutdown"
    );
    let mut rest = Vec::new();
    while let Some(chunk) = body.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    assert!(String::from_utf8_lossy(&rest).ends_with("data: [DONE]\n\n"));
    let status = gw
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("gateway did not exit");
    assert!(status.success());
}

/// Also: a plain answer reaches the client with its length (the upstream's, not re-chunked),
/// and the log line counts it whole: with the length known, hyper stops reading the body at
/// its last byte, and the layers must still see it as complete.
#[tokio::test]
async fn json_logs_have_one_line_per_request_with_its_id_and_no_secret() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start_with(&config(&up, ""), &["--log-format", "json"]).await;
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(CLIENT_KEY)
        .header("x-request-id", "log-test-42")
        .body(r#"{"model":"gpt-4o","messages":[]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let length = resp.headers().get("content-length").cloned();
    let body = resp.bytes().await.unwrap();
    assert_eq!(length, Some(body.len().into()));
    assert!(
        gw.wait_log(|l| l.contains("log-test-42"), Duration::from_secs(5))
            .await
    );
    let logs = gw.logs();
    let lines: Vec<Value> = logs
        .lines()
        .filter(|l| l.contains("log-test-42"))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{logs}");
    let line = &lines[0];
    assert_eq!(line["status"], 200);
    assert_eq!(line["route"], "gpt-4o");
    assert_eq!(line["deployment"], "up-openai/gpt-4o-upstream");
    assert_eq!(line["key"], "app");
    assert_eq!(line["outcome"], "complete");
    assert_eq!(line["bytes"], body.len());
    for secret in [OPENAI_SECRET, AZURE_SECRET, "admin-secret", CLIENT_KEY] {
        assert!(!logs.contains(secret), "{secret} in the logs");
    }
}

/// A request without a sane `x-request-id` (none, one too long, one with spaces or quotes)
/// gets a new id, the same in
/// the response, in the one `x-request-id` the upstream sees, and in the log line.
#[tokio::test]
async fn a_request_without_a_sane_id_gets_one_id_everywhere() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start_with(&config(&up, ""), &["--log-format", "json"]).await;
    let too_long = "x".repeat(300);
    for (i, sent) in [None, Some(too_long.as_str()), Some(r#"a b "c""#)]
        .into_iter()
        .enumerate()
    {
        let mut req = client()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(CLIENT_KEY)
            .body(r#"{"model":"gpt-4o","messages":[]}"#);
        if let Some(id) = sent {
            req = req.header("x-request-id", id);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
        resp.bytes().await.unwrap();
        let hex = id
            .strip_prefix("req_")
            .unwrap_or_else(|| panic!("new id {id}"));
        assert!(
            hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
            "{id}"
        );

        let reqs = up.requests();
        let upstream_ids: Vec<&str> = reqs[i]
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("x-request-id"))
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(upstream_ids, [id.as_str()], "one id upstream, the same");

        assert!(
            gw.wait_log(|l| l.contains(&id), Duration::from_secs(5))
                .await,
            "{}",
            gw.logs()
        );
        let logs = gw.logs();
        let line: Value = logs
            .lines()
            .find(|l| l.contains(&id))
            .map(|l| serde_json::from_str(l).unwrap())
            .unwrap();
        assert_eq!(line["request_id"], id.as_str(), "{line}");
    }
}

#[tokio::test]
async fn health_and_readiness() {
    let (_up, gw) = setup().await;
    let c = client();
    assert_eq!(
        c.get(gw.url("/healthz")).send().await.unwrap().status(),
        200
    );
    let ready: Value = c
        .get(gw.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "ready");
    // HEAD, as load balancers and uptime checks send it: the GET's status and headers, no
    // body; a model list too. An endpoint that takes POST only says which method it takes.
    for path in ["/healthz", "/readyz"] {
        let r = c.head(gw.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert!(r.bytes().await.unwrap().is_empty(), "{path}");
    }
    let r = c
        .head(gw.url("/v1/models"))
        .bearer_auth(CLIENT_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    assert!(r.bytes().await.unwrap().is_empty());
    let r = c
        .head(gw.url("/v1/chat/completions"))
        .bearer_auth(CLIENT_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    // A HEAD answer is whole without its body: logged complete, not cut by its client.
    assert!(
        gw.wait_log(
            |l| l
                .lines()
                .any(|l| l.contains("method=HEAD path=/healthz") && l.contains("outcome=complete")),
            Duration::from_secs(5)
        )
        .await,
        "{}",
        gw.logs()
    );
    assert!(
        !gw.logs()
            .lines()
            .any(|l| l.contains("method=HEAD") && l.contains("outcome=client_closed")),
        "{}",
        gw.logs()
    );
}

/// `switchyard_overhead_seconds_{what}` of the test config's `gpt-4o` route (0 before its
/// first observation).
/// Posts a chat request saying `content` and reads its whole answer, a 200.
async fn chat_ok(gw: &Gateway, content: &str) {
    let body =
        format!(r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"{content}"}}]}}"#);
    let resp = post(gw, "/v1/chat/completions", &body).await;
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();
}

/// A chat answer of a few hundred bytes, with its usage.
const SMALL_ANSWER: &str = r#"{"id":"x","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;

async fn overhead_of(gw: &Gateway, what: &str) -> f64 {
    gw.metric(
        &format!("switchyard_overhead_seconds_{what}"),
        &[("route", "gpt-4o")],
    )
    .await
    .unwrap_or(0.0)
}

/// Waits for `n` more observations of the overhead histogram (made as the bodies end, just
/// after the client got their last byte) and returns their sum.
async fn overhead_sum_of(gw: &Gateway, n: f64, count_before: f64, sum_before: f64) -> f64 {
    for _ in 0..50 {
        if overhead_of(gw, "count").await - count_before >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(overhead_of(gw, "count").await - count_before, n);
    overhead_of(gw, "sum").await - sum_before
}

/// The gateway's own time is taken at its sockets (the read that completed a request's head
/// to its answer's end, less the upstream connection's wait): on a keep-alive connection,
/// neither the client's pause between two requests nor a client slow to send a head counts.
#[tokio::test]
async fn the_overhead_histogram_counts_neither_idle_connections_nor_slow_clients() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (up, gw) = setup().await;
    let overhead = |what: &'static str| overhead_of(&gw, what);
    let (count_before, sum_before) = (overhead("count").await, overhead("sum").await);
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {CLIENT_KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        gw.addr,
        body.len()
    );
    let mut conn = tokio::net::TcpStream::connect(&gw.addr).await.unwrap();
    conn.set_nodelay(true).unwrap();
    // Reads one whole answer (it has a Content-Length) off the connection.
    async fn answer_of(conn: &mut tokio::net::TcpStream) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "the gateway closed the connection");
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let len: usize = text[..end]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .expect("a content-length");
                if got.len() >= end + 4 + len {
                    return text;
                }
            }
        }
    }
    let started = std::time::Instant::now();
    for pause in [0, 400] {
        // The client pauses between two requests on the connection, then sends the next
        // head in two parts 400 ms apart.
        tokio::time::sleep(Duration::from_millis(pause)).await;
        up.script(Scripted::respond(200, SMALL_ANSWER));
        let (first, rest) = head.split_at(30);
        conn.write_all(first.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        conn.write_all(format!("{rest}\r\n{body}").as_bytes())
            .await
            .unwrap();
        let text = answer_of(&mut conn).await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    }
    let took = started.elapsed().as_secs_f64();
    assert!(took >= 1.2, "the two requests took {took}s");
    let own = overhead_sum_of(&gw, 2.0, count_before, sum_before).await;
    assert!(own > 0.0 && own < 0.25, "overhead sum {own}s of {took}s");
    // The request's duration in its log line is the gateway's share and the upstream's.
    let ours = |l: &str| l.contains("request_id") && l.contains("/v1/chat/completions");
    let logged = gw
        .wait_log(
            |logs| logs.lines().filter(|l| ours(l)).count() >= 2,
            Duration::from_secs(5),
        )
        .await;
    let logs = gw.logs();
    assert!(logged, "{logs}");
    let durations: Vec<f64> = logs
        .lines()
        .filter(|l| ours(l))
        .filter_map(|l| {
            let at = l.find("duration_ms")? + "duration_ms".len();
            let v: String = l[at..]
                .chars()
                .skip_while(|c| !c.is_ascii_digit())
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            v.parse().ok()
        })
        .collect();
    assert_eq!(durations.len(), 2, "{logs}");
    assert!(durations.iter().all(|d| *d < 250.0), "{durations:?}");
}

/// A request that waits in the gateway's socket while the gateway cannot run (stopped here;
/// in production saturated, or throttled by a CPU limit) waits on the gateway: on Linux its
/// time starts when the kernel received its bytes, not when the gateway read them.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_overhead_histogram_counts_a_request_waiting_for_a_stopped_gateway() {
    let (up, gw) = setup().await;
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
    // The gateway's first request, on its first connection.
    up.script(Scripted::respond(200, SMALL_ANSWER));
    gw.signal("STOP");
    // The kernel takes the connection and the request while the gateway is stopped.
    let url = gw.url("/v1/chat/completions");
    let sending = tokio::spawn(async move {
        client()
            .post(url)
            .bearer_auth(CLIENT_KEY)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .map(|r| r.status())
            .map_err(|e| e.to_string())
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    gw.signal("CONT");
    assert_eq!(sending.await.unwrap().unwrap(), 200);
    let own = overhead_sum_of(&gw, 1.0, 0.0, 0.0).await;
    assert!(
        (0.35..1.0).contains(&own),
        "overhead {own}s for a request that waited 0.4 s"
    );
}

/// A client speaking HTTP/2 (prior knowledge, as gRPC-style clients and some proxies do):
/// requests interleaved on one connection are served, logged and observed like others.
#[tokio::test]
async fn a_client_speaking_http2_is_served_on_one_connection() {
    let (up, gw) = setup().await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let send = |content: &'static str| {
        let req = h2
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(CLIENT_KEY)
            .header("content-type", "application/json")
            .body(format!(
                r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"{content}"}}]}}"#
            ));
        async move {
            let resp = req.send().await.unwrap();
            assert_eq!(resp.version(), reqwest::Version::HTTP_2);
            assert_eq!(resp.status(), 200);
            resp.text().await.unwrap()
        }
    };
    for _ in 0..3 {
        up.script(Scripted::respond(200, SMALL_ANSWER));
    }
    let (a, b) = tokio::join!(send("one"), send("two"));
    assert!(a.contains("chat.completion") && b.contains("chat.completion"));
    let c = send("three").await;
    assert!(c.contains("chat.completion"));
    let own = overhead_sum_of(&gw, 3.0, 0.0, 0.0).await;
    assert!(own > 0.0 && own < 1.0, "overhead {own}s");
}

/// `switchyard_overhead_seconds{route}`: the request's time minus its waits on the upstream
/// (for the answer's head and for every chunk of a stream), observed when the body ends.
#[tokio::test]
async fn the_overhead_histogram_leaves_out_the_wait_on_the_upstream() {
    let (up, gw) = setup().await;
    let overhead = |what: &'static str| overhead_of(&gw, what);
    // One request first, so that the two below go out on a pooled upstream connection, whose
    // own clock then tells the upstream's wait (on a connection made for the request, the
    // whole dispatch is taken as the upstream's).
    up.script(Scripted::respond(200, SMALL_ANSWER));
    chat_ok(&gw, "warm").await;
    // Its observation made (the route's first: the series starts from nothing).
    overhead_sum_of(&gw, 1.0, 0.0, 0.0).await;
    let (count_before, sum_before) = (overhead("count").await, overhead("sum").await);
    // 400 ms before the answer's head; then a stream whose head comes at once and its
    // events 300 ms apart, the first too (the wait for it was counted as the gateway's).
    up.script(Scripted::Delay(
        Duration::from_millis(400),
        Box::new(Scripted::respond(200, SMALL_ANSWER)),
    ));
    let started = std::time::Instant::now();
    chat_ok(&gw, "hi").await;
    let c = chat_chunk(None, Some("a"), None);
    // With its usage (so no tokenizer runs to estimate it).
    let usage = usage_chunk(1, 2) + "data: [DONE]\n\n";
    up.script(Scripted::stream(
        &[(300, &c), (300, &c), (300, &usage)],
        StreamEnd::Finish,
    ));
    let resp = post(
        &gw,
        "/v1/chat/completions",
        r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();
    let took = started.elapsed().as_secs_f64();
    assert!(took >= 1.3, "the two requests took {took}s");
    let own = overhead_sum_of(&gw, 2.0, count_before, sum_before).await;
    // Over 1.3 s of waiting on the upstream, of which the gateway's own share is a tiny part
    // (a debug build on a busy machine included).
    assert!(own > 0.0 && own < 0.25, "overhead sum {own}s of {took}s");
}

/// An upstream that echoes the key it was sent, or its own address, in its message and in any
/// other field of its error (an Azure AI inference `detail`, a nested object): the client
/// sees none of it (PRODUCT.md: "never its key or URL").
#[tokio::test]
async fn an_upstream_error_that_echoes_the_upstream_key_reaches_the_client_scrubbed() {
    let (up, gw) = setup().await;
    for (route, secret) in [("gpt-4o", OPENAI_SECRET), ("gpt-4o-azure", AZURE_SECRET)] {
        up.script(Scripted::respond(
            400,
            json!({"error": {"message": format!("Incorrect API key provided: {secret}."),
                             "code": "invalid_api_key", "key": format!("Bearer {secret}"),
                             "innererror": {"detail": [secret, {"seen": secret}]}}})
            .to_string(),
        ));
        let body =
            format!(r#"{{"model":"{route}","messages":[{{"role":"user","content":"hi"}}]}}"#);
        let resp = post(&gw, "/v1/chat/completions", &body).await;
        assert_eq!(resp.status(), 400);
        let text = resp.text().await.unwrap();
        assert!(!text.contains(secret), "{text}");
        let e: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            e["error"]["message"], "Incorrect API key provided: ***.",
            "{e}"
        );
        assert_eq!(e["error"]["key"], "Bearer ***", "{e}");
        assert_eq!(e["error"]["innererror"]["detail"][1]["seen"], "***", "{e}");
        // Flat (Azure AI inference) shape.
        up.script(Scripted::respond(
            400,
            json!({"status": 401, "code": "Unauthorized", "message": "no",
                   "detail": format!("key {secret} is not valid")})
            .to_string(),
        ));
        let text = post(&gw, "/v1/chat/completions", &body)
            .await
            .text()
            .await
            .unwrap();
        assert!(!text.contains(secret), "{text}");
        assert!(text.contains("key *** is not valid"), "{text}");
        // Its own address: the URL the provider is configured with, its host and port.
        let addr = up.url();
        let host_port = addr.trim_start_matches("http://");
        up.script(Scripted::respond(
            400,
            json!({"error": {"message": format!("Incorrect API key for {addr}/v1/chat/completions"),
                             "detail": format!("{host_port} refused it")}})
            .to_string(),
        ));
        let text = post(&gw, "/v1/chat/completions", &body)
            .await
            .text()
            .await
            .unwrap();
        assert!(!text.contains(host_port), "{text}");
        assert!(text.contains("*** refused it"), "{text}");
        // In a stream: an `event: error` whose data is plain text, and the Responses API's
        // `response.failed` (its error inside `response`), both went out as sent.
        up.script(Scripted::Stream {
            chunks: vec![
                (
                    Duration::ZERO,
                    chat_chunk(Some("assistant"), Some("Hel"), None),
                ),
                (
                    Duration::ZERO,
                    format!("event: error\ndata: upstream auth failed for {secret} at {addr}\n\n"),
                ),
                (
                    Duration::ZERO,
                    format!(
                        "event: response.failed\ndata: {}\n\n",
                        json!({"type": "response.failed", "response": {"id": "r", "status": "failed",
                               "error": {"code": "server_error", "message": format!("backend {addr}/v1 refused key {secret}")}}})
                    ),
                ),
            ],
            end: StreamEnd::Finish,
        });
        let streamed = format!(
            r#"{{"model":"{route}","stream":true,"messages":[{{"role":"user","content":"hi"}}]}}"#
        );
        let text = post(&gw, "/v1/chat/completions", &streamed)
            .await
            .text()
            .await
            .unwrap();
        assert!(
            text.contains("Hel")
                && text.contains("refused key ***")
                && text.contains("failed for *** at"),
            "{text}"
        );
        assert!(
            !text.contains(secret) && !text.contains(host_port),
            "{text}"
        );
        // Only errors are scrubbed: the model's text and the client's own instructions go
        // out as they came, `error` in them or not (a `response.created` holds `"error":
        // null`; they lost the upstream's address).
        let said = format!("if you see an error, check the server at {host_port}");
        up.script(Scripted::Stream {
            chunks: vec![
                (
                    Duration::ZERO,
                    format!(
                        "event: response.created\ndata: {}\n\n",
                        json!({"type": "response.created", "response": {"id": "r", "status": "in_progress",
                               "error": null, "instructions": format!("our DB runs on {host_port}")}})
                    ),
                ),
                (Duration::ZERO, chat_chunk(None, Some(&said), None)),
            ],
            end: StreamEnd::Finish,
        });
        let text = post(&gw, "/v1/chat/completions", &streamed)
            .await
            .text()
            .await
            .unwrap();
        assert!(
            text.contains(&format!("our DB runs on {host_port}")) && text.contains(&said),
            "{text}"
        );
    }
    assert!(!gw.logs().contains(OPENAI_SECRET) && !gw.logs().contains(AZURE_SECRET));
}

/// The gateway asks upstreams for uncompressed answers (it reads usage from them); one that
/// compresses anyway reaches the client as sent, with its `content-encoding`. An upstream's
/// `x-should-retry` reaches the client with its error, so the SDK does not retry an account
/// out of credit.
#[tokio::test]
async fn upstream_encodings_and_x_should_retry_reach_the_client() {
    let (up, gw) = setup().await;
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
    up.script(Scripted::Respond {
        status: 200,
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("content-encoding".into(), "br".into()),
        ],
        body: "\u{1b}compressed-bytes".into(),
    });
    let resp = post(&gw, "/v1/chat/completions", body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-encoding"], "br");
    assert_eq!(resp.text().await.unwrap(), "\u{1b}compressed-bytes");
    let sent = up.requests().pop().unwrap();
    assert_eq!(sent.header("accept-encoding"), Some("identity"));

    up.script(Scripted::insufficient_quota());
    // `gpt-4o` has one deployment and the default 2 retries: not asked again.
    let before = up.request_count();
    let resp = post(&gw, "/v1/chat/completions", body).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["x-should-retry"], "false");
    assert_eq!(up.request_count() - before, 1, "asked once");
    let (_, e) = error_of(resp).await;
    assert_eq!(e["error"]["code"], "insufficient_quota", "{e}");
}

/// An upstream that ignores `stream: true` and answers one JSON body with its length: the
/// client gets that answer whole (the connection died: the body's size hint broke an
/// assertion once the gateway had taken its first frame to time it).
#[tokio::test]
async fn a_streamed_request_answered_with_plain_json_gets_it_whole() {
    let (up, gw) = setup().await;
    let answer = r#"{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hello"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
    for _ in 0..2 {
        up.script(Scripted::respond(200, answer));
        let resp = post(
            &gw,
            "/v1/chat/completions",
            r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        )
        .await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), answer);
    }
    assert!(!gw.logs().contains("panicked"), "{}", gw.logs());
}

/// A field sent twice is refused: the gateway would read the first, most upstreams the last
/// (a key allowed only `demo` reached `gpt-4o`; a `max_tokens` reserved as 1 went out as 10^8).
#[tokio::test]
async fn a_field_sent_twice_is_refused() {
    let (up, gw) = setup().await;
    let limited = |body: &'static str| {
        client()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(OTHER_KEY)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    for (body, param) in [
        (
            r#"{"model":"demo","model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
            "model",
        ),
        (
            r#"{"model":"demo","max_tokens":1,"messages":[],"max_tokens":100000000}"#,
            "max_tokens",
        ),
        (
            r#"{"model":"demo","m\u006fdel":"gpt-4o","messages":[]}"#,
            "model",
        ),
    ] {
        let (status, v) = error_of(limited(body).await.unwrap()).await;
        assert_eq!(
            (status, v["error"]["param"].as_str()),
            (400, Some(param)),
            "{v}"
        );
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("more than once"),
            "{v}"
        );
    }
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(vec![0u8; 64]).file_name("a.wav"),
        )
        .text("model", "whisper")
        .text("model", "gpt-4o");
    let resp = client()
        .post(gw.url("/v1/audio/transcriptions"))
        .bearer_auth(CLIENT_KEY)
        .multipart(form)
        .send()
        .await
        .unwrap();
    let (status, v) = error_of(resp).await;
    assert_eq!(
        (status, v["error"]["param"].as_str()),
        (400, Some("model")),
        "{v}"
    );
    assert_eq!(up.request_count(), 0);
    // Once each is fine.
    let ok =
        limited(r#"{"model":"demo","max_tokens":1,"messages":[{"role":"user","content":"hi"}]}"#);
    assert_eq!(ok.await.unwrap().status(), 200);
}

/// A client that sends nothing, or its body's bytes too slowly, is let go after
/// `server.client_timeout` (it could hold a connection, and a file, for ever); one that closes
/// its connection in the middle of its body is recorded as 499 (it was a 400: "bad request").
#[tokio::test]
async fn slow_and_vanishing_clients_are_let_go_and_recorded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = MockUpstream::start().await;
    let cfg = config(&up, "").replace(
        "  shutdown_grace: 10s",
        "  shutdown_grace: 10s\n  client_timeout: 500ms",
    );
    let mut gw = Gateway::start(&cfg).await;
    let read_all = |mut conn: tokio::net::TcpStream| async move {
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut got))
            .await
            .expect("the gateway closed the connection")
            .ok();
        String::from_utf8_lossy(&got).into_owned()
    };
    // Half a head, then nothing: closed without an answer.
    let mut conn = tokio::net::TcpStream::connect(&gw.addr).await.unwrap();
    conn.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    assert_eq!(read_all(conn).await, "");
    // An HTTP/2 connection that never sends a request: closed too (after the server's
    // SETTINGS).
    let mut conn = tokio::net::TcpStream::connect(&gw.addr).await.unwrap();
    conn.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    read_all(conn).await;
    // A whole head, a tenth of the body, then nothing: 408.
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {CLIENT_KEY}\r\n\
         content-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"model\":"
    );
    let mut conn = tokio::net::TcpStream::connect(&gw.addr).await.unwrap();
    conn.write_all(head.as_bytes()).await.unwrap();
    let answer = read_all(conn).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    // A body that keeps coming, a byte every 200 ms (each within the timeout), but at less
    // than 1 KiB/s once it has taken client_timeout: 408.
    let mut conn = tokio::net::TcpStream::connect(&gw.addr).await.unwrap();
    conn.write_all(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {CLIENT_KEY}\r\n\
             content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let (mut rd, mut wr) = conn.into_split();
    let dripping = tokio::spawn(async move {
        for _ in 0..40 {
            if wr.write_all(b"1\r\n \r\n").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), rd.read_to_end(&mut got))
        .await
        .expect("answered and closed")
        .ok();
    dripping.abort();
    let answer = String::from_utf8_lossy(&got);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("bytes a second"), "{answer}");
    // A body framed wrong (a chunk size that is no number), the client still there: 400.
    let mut conn = tokio::net::TcpStream::connect(&gw.addr).await.unwrap();
    conn.write_all(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {CLIENT_KEY}\r\n\
             content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let answer = read_all(conn).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // The same, and the client closes: 499.
    let mut conn = tokio::net::TcpStream::connect(&gw.addr).await.unwrap();
    conn.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(conn);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A kept-alive connection left idle after its answer is closed too.
    let body = r#"{"model":"demo","messages":[{"role":"user","content":"hi"}]}"#;
    let mut conn = tokio::net::TcpStream::connect(&gw.addr).await.unwrap();
    conn.write_all(raw_chat(body).as_bytes()).await.unwrap();
    let answer = read_all(conn).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    gw.signal("TERM");
    assert!(gw
        .wait_exit(Duration::from_secs(20))
        .await
        .unwrap()
        .success());
    let store = switchyard::ledger::store::Store::open(&format!(
        "sqlite://{}",
        gw.dir.path().join("switchyard.db").display()
    ))
    .await
    .unwrap();
    let statuses: Vec<u16> = store
        .rows()
        .await
        .unwrap()
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, [408, 408, 400, 499, 200], "{}", gw.logs());
}

/// An HTTP/2 connection with no request open is closed after `server.client_timeout`, as
/// an idle HTTP/1.1 one is; one with a request open is not, however long its answer takes,
/// and another of its requests ending does not make it idle.
#[tokio::test]
async fn an_idle_http2_connection_is_closed_and_a_serving_one_is_not() {
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let up = MockUpstream::start().await;
    let cfg = config(&up, "").replace(
        "  shutdown_grace: 10s",
        "  shutdown_grace: 10s\n  client_timeout: 500ms",
    );
    let gw = Gateway::start(&cfg).await;
    let connect = || async {
        let tcp = tokio::net::TcpStream::connect(&gw.addr).await.unwrap();
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        (send, tokio::spawn(conn))
    };
    let chat = |model: &str| {
        hyper::Request::post("/v1/chat/completions")
            .header("authorization", format!("Bearer {CLIENT_KEY}"))
            .header("content-type", "application/json")
            .body(Full::new(bytes::Bytes::from(format!(
                r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#
            ))))
            .unwrap()
    };
    // A request answered 1.5 s after it was sent (three timeouts with nothing written), and
    // meanwhile another on the same connection, answered at once.
    up.script(Scripted::Delay(
        Duration::from_millis(1500),
        Box::new(Scripted::respond(200, SMALL_ANSWER)),
    ));
    let (mut send, conn) = connect().await;
    let slow = send.send_request(chat("gpt-4o"));
    let slow = tokio::spawn(async move {
        let resp = slow
            .await
            .expect("the connection stayed open for the slow answer");
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, body)
    });
    assert!(up.wait_in_flight(1, Duration::from_secs(5)).await);
    let quick = send.send_request(chat("demo")).await.unwrap();
    assert_eq!(quick.status(), 200);
    quick.into_body().collect().await.unwrap();
    let (status, body) = slow.await.unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("chat.completion"));
    // Then nothing: the gateway closes the connection.
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("an idle HTTP/2 connection is closed")
        .unwrap()
        .ok();
    assert!(send.send_request(chat("demo")).await.is_err());
}

/// A body of many fields is checked for a field sent twice in linear time (compared
/// pairwise, 300,000 fields would have taken hours of the gateway's CPU).
#[tokio::test]
async fn a_body_of_many_fields_is_checked_at_once() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&config(&up, "").replace("max_body: 64KiB", "max_body: 8MiB")).await;
    let mut many = String::from(r#"{"model":"demo","messages":[]"#);
    for i in 0..300_000 {
        many.push_str(&format!(r#","f{i}":0"#));
    }
    many.push_str(r#","f7":1}"#);
    let resp = post(&gw, "/v1/chat/completions", &many).await;
    let (status, v) = error_of(resp).await;
    assert_eq!(
        (status, v["error"]["param"].as_str()),
        (400, Some("f7")),
        "{v}"
    );
}

/// A large answer to a slow reader goes out whole: the wait for the connection's next
/// request starts at its last write, not when the answer's body ended (the idle sweeper cut
/// answers still being written: a cache hit is one frame, taken at once).
#[tokio::test]
async fn a_slow_reader_gets_a_large_answer_whole() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = MockUpstream::start().await;
    let cfg = config(&up, "")
        .replace(
            "  shutdown_grace: 10s",
            "  shutdown_grace: 10s\n  client_timeout: 300ms",
        )
        .replace(
            "  gpt-4o: { deployments:",
            "  gpt-4o: { cache: { ttl: 1m }, deployments:",
        );
    let gw = Gateway::start(&cfg).await;
    let text = "y".repeat(6 << 20);
    let answer = json!({"id": "c", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
        "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
    .to_string();
    up.script(Scripted::respond(200, answer.clone()));
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
    // Stored, then served from the cache.
    let first = post(&gw, "/v1/chat/completions", body).await;
    assert_eq!(first.bytes().await.unwrap().len(), answer.len());
    // A small receive buffer, read 32 KiB every 20 ms (1.6 MB/s): the gateway's writes find
    // the socket full for longer than client_timeout at a time.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 << 10).unwrap();
    let mut conn = socket.connect(gw.addr.parse().unwrap()).await.unwrap();
    conn.write_all(raw_chat(body).as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 32 << 10];
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
        if got.len() > answer.len() && got.ends_with(b"}") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{}",
        &text[..200.min(text.len())]
    );
    assert!(
        text.ends_with(&answer[answer.len() - 100..]),
        "got {} bytes",
        got.len()
    );
}

/// A config that is a symlink to another file of its own folder (`routes.yaml ->
/// routes-v2.yaml`) is reloaded when that file changes.
#[tokio::test]
async fn a_config_linked_within_its_folder_reloads_when_its_target_changes() {
    let up = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("routes-v2.yaml");
    std::fs::write(&target, "").unwrap();
    std::os::unix::fs::symlink("routes-v2.yaml", dir.path().join("routes.yaml")).unwrap();
    let gw = Gateway::start_in(&config(&up, ""), dir).await;
    let original = std::fs::read_to_string(&target).unwrap();
    std::fs::write(&target, with_route(&original, "demo2")).unwrap();
    assert!(
        comes_to_serve(&gw, "demo2").await,
        "the target's change did not reload:\n{}",
        gw.logs()
    );
}
