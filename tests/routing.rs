//! Black-box tests of routing (docs/routing.md): the real binary on a real port, scripted
//! upstreams on other ports (one per deployment, so what each one received tells the
//! deployments apart) or built-in `mock` providers, reqwest as the client. Strategies,
//! retries with backoff, cooldowns with one probe, retry-after, timeouts, the three fallback
//! lists, upstream quotas, `/admin/routes`, `/readyz` and `503 no_deployment_available`.
//!
//! Statistical tests: the gateway's RNG cannot be seeded from outside, so each states its
//! sample size and tolerance and why a false failure is below 1 in 10,000.

#[path = "support/gateway.rs"]
mod gateway;
#[path = "support/upstream.rs"]
mod upstream;

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use gateway::Gateway;
use serde_json::{json, Value};
use upstream::{MockUpstream, Scripted, StreamEnd};

const ADMIN_KEY: &str = "routing-admin-key";

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// What the client got back.
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    text: String,
    elapsed: Duration,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// `x-switchyard-deployment`: what served (or last tried) the request.
    fn deployment(&self) -> &str {
        self.header("x-switchyard-deployment").unwrap_or("")
    }

    fn route(&self) -> &str {
        self.header("x-switchyard-route").unwrap_or("")
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    /// Asserts a 200 served by `route` on `deployment`.
    #[track_caller]
    fn served_by(&self, route: &str, deployment: &str) {
        assert_eq!(
            (self.status, self.route(), self.deployment()),
            (200, route, deployment),
            "{}",
            self.text
        );
    }
}

async fn send(c: &reqwest::Client, gw: &Gateway, body: &Value) -> Answer {
    send_to(c, gw, "/v1/chat/completions", body).await
}

async fn send_to(c: &reqwest::Client, gw: &Gateway, path: &str, body: &Value) -> Answer {
    let start = Instant::now();
    let resp = c.post(gw.url(path)).json(body).send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    Answer {
        status,
        headers,
        text,
        elapsed: start.elapsed(),
    }
}

fn chat_body(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
}

fn stream_body(model: &str) -> Value {
    json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "hi"}]})
}

async fn chat(gw: &Gateway, model: &str) -> Answer {
    send(&client(), gw, &chat_body(model)).await
}

/// `GET /admin/routes`, as JSON.
async fn admin(gw: &Gateway) -> Value {
    let resp = client()
        .get(gw.url("/admin/routes"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

/// The first deployment called `label` in the admin view.
fn dep(admin: &Value, label: &str) -> Value {
    admin["routes"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["deployments"].as_array().unwrap().iter())
        .find(|d| d["deployment"] == label)
        .unwrap_or_else(|| panic!("no deployment {label} in {admin}"))
        .clone()
}

async fn dep_state(gw: &Gateway, label: &str) -> Value {
    dep(&admin(gw).await, label)
}

/// Polls the admin view until `cond` holds for deployment `label`.
async fn wait_dep(gw: &Gateway, label: &str, cond: impl Fn(&Value) -> bool, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let d = dep_state(gw, label).await;
        if cond(&d) {
            return;
        }
        assert!(Instant::now() < deadline, "{label} never got there: {d}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn readyz(gw: &Gateway) -> (u16, Value) {
    let resp = client().get(gw.url("/readyz")).send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

/// A provider line for `providers:` pointing at a scripted upstream.
fn openai(name: &str, up: &MockUpstream) -> String {
    format!(
        "  {name}: {{ kind: openai, base_url: \"{}/v1\", api_key: sk-upstream-{name} }}\n",
        up.url()
    )
}

fn config(providers: &str, rest: &str) -> String {
    format!("server: {{ admin_key: {ADMIN_KEY} }}\nproviders:\n{providers}{rest}")
}

/// A chat completion for scripted answers.
fn completion_json() -> String {
    json!({"id": "chatcmpl-scripted", "object": "chat.completion", "created": 1, "model": "m",
           "choices": [{"index": 0, "message": {"role": "assistant", "content": "scripted"},
                        "finish_reason": "stop"}],
           "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
    .to_string()
}

fn ok_after(ms: u64) -> Scripted {
    Scripted::Delay(
        Duration::from_millis(ms),
        Box::new(Scripted::respond(200, completion_json())),
    )
}

fn sse_chunk(text: &str) -> String {
    format!(
        "data: {}\n\n",
        json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
               "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]})
    )
}

/// Counts answers by `x-switchyard-deployment`.
fn tally<'a>(answers: impl IntoIterator<Item = &'a Answer>) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for a in answers {
        assert_eq!(a.status, 200, "{}", a.text);
        *m.entry(a.deployment().to_string()).or_insert(0) += 1;
    }
    m
}

/// Sends `n` copies of `body`, `parallel` at a time.
async fn many(gw: &Gateway, body: &Value, n: usize, parallel: usize) -> Vec<Answer> {
    let c = client();
    futures_util::stream::iter(0..n)
        .map(|_| send(&c, gw, body))
        .buffer_unordered(parallel)
        .collect()
        .await
}

fn minute_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 60
}

// ---------------------------------------------------------------------------------------------
// Scripted failures.

#[tokio::test]
async fn a_500_is_retried_on_an_untried_deployment_first_with_backoff_only_on_a_repeat() {
    let (a, b, c) = (
        MockUpstream::start().await,
        MockUpstream::start().await,
        MockUpstream::start().await,
    );
    let yaml = config(
        &(openai("a", &a) + &openai("b", &b) + &openai("c", &c)),
        r#"
models:
  two:
    strategy: priority
    retries: 3
    deployments:
      - { provider: a, deployment: m, priority: 0 }
      - { provider: b, deployment: m, priority: 1 }
  solo:
    retries: 2
    allowed_fails: 10
    deployments: [ { provider: c, deployment: solo } ]
"#,
    );
    let gw = Gateway::start(&yaml).await;

    // a (tier 0) fails, b has not been tried: b next, at once; b fails too: back to a, after
    // a backoff of 200 ms × [0.5, 1) (third attempt).
    a.script(Scripted::server_error(500));
    b.script(Scripted::server_error(500));
    let r = chat(&gw, "two").await;
    r.served_by("two", "a/m");
    assert_eq!((a.request_count(), b.request_count()), (2, 1));
    assert!(r.elapsed >= Duration::from_millis(100), "{:?}", r.elapsed);

    // One deployment: 500, 500, then success on the same one, backing off 100 ms × [0.5, 1)
    // then 200 ms × [0.5, 1) before the re-tries.
    c.script(Scripted::server_error(500));
    c.script(Scripted::server_error(500));
    let r = chat(&gw, "solo").await;
    r.served_by("solo", "c/solo");
    assert_eq!(c.request_count(), 3);
    assert!(r.elapsed >= Duration::from_millis(150), "{:?}", r.elapsed);
    let d = dep_state(&gw, "c/solo").await;
    assert_eq!(
        (d["up"].clone(), d["fails_in_row"].clone()),
        (json!(true), json!(0))
    );

    // `retries: 2` is three attempts at most; the client gets the last (normalised) 500.
    for _ in 0..4 {
        c.script(Scripted::server_error(500));
    }
    let r = chat(&gw, "solo").await;
    assert_eq!(r.status, 500, "{}", r.text);
    assert_eq!(r.json()["error"]["type"], "server_error");
    assert_eq!((r.route(), r.deployment()), ("solo", "c/solo"));
    assert_eq!(c.request_count(), 6);
    let d = dep_state(&gw, "c/solo").await;
    assert_eq!(d["fails_in_row"], 3);
    assert_eq!(d["up"], true, "allowed_fails 10: no cooldown yet");
}

/// 408 and every 5xx but 501 are retried (507 and a proxy's 520 to 524 were not); a 4xx that
/// is the request's own fault is not.
/// (429 is retried too, and cools the deployment down: see the next test; so are the
/// upstream's refusals of the gateway itself, 401, 403 and a 404 of its deployment: see
/// `an_upstream_that_refuses_the_gateway_is_a_failing_deployment`.)
#[tokio::test]
async fn the_retryable_statuses_are_retried_and_the_clients_errors_are_not() {
    let a = MockUpstream::start().await;
    let yaml = config(
        &openai("a", &a),
        r#"
models:
  solo: { retries: 1, allowed_fails: 100, deployments: [ { provider: a, deployment: solo } ] }
"#,
    );
    let gw = Gateway::start(&yaml).await;
    let mut sent = 0;
    for status in [408, 500, 502, 503, 504, 507, 520, 522, 524, 529] {
        a.script(Scripted::server_error(status));
        chat(&gw, "solo").await.served_by("solo", "a/solo");
        sent += 2;
        assert_eq!(a.request_count(), sent, "{status}: retried once");
    }
    // (501: an operation the server lacks is asked of the route's other deployments, none
    // here, and is no failure of this one.)
    for status in [400, 409, 413, 422, 501] {
        a.script(Scripted::server_error(status));
        let r = chat(&gw, "solo").await;
        assert_eq!(r.status, status, "{}", r.text);
        sent += 1;
        assert_eq!(a.request_count(), sent, "{status}: not retried");
    }
}

/// Route `pair`: deployment `a/m` first, `b/m` second (`strategy: priority`), with the
/// route's other fields `fields`, and the routes `more` beside it.
async fn priority_pair(fields: &str, more: &str) -> (MockUpstream, MockUpstream, Gateway) {
    let (a, b) = (MockUpstream::start().await, MockUpstream::start().await);
    let yaml = config(
        &format!("{}{}", openai("a", &a), openai("b", &b)),
        &format!(
            "models:\n  pair: {{ strategy: priority, {fields}, deployments: [ \
             {{ provider: a, deployment: m, priority: 0 }}, {{ provider: b, deployment: m, priority: 1 }} ] }}\n{more}\n"
        ),
    );
    let gw = Gateway::start(&yaml).await;
    (a, b, gw)
}

/// An upstream that refuses the gateway itself: its key rotated (401), key auth turned off
/// (403), the deployment deleted (Azure's 404 `DeploymentNotFound`, OpenAI's
/// `model_not_found`, vLLM's and Ollama's model not found). The route's other deployment
/// serves the request; a deployment that is not there counts against itself (cooldown),
/// which no request can cause; a 401 or 403, which a request can (a header an upstream
/// proxy reads, a prompt a firewall blocks, an operation a restricted key may not use),
/// counts nothing, and a client cannot take deployments out of rotation by what it sends.
/// A client that gets any of them sees a 502 naming what the upstream said, never a 401 or
/// 404 that would tell it that its own key or model name is wrong.
#[tokio::test]
async fn an_upstream_that_refuses_the_gateway_is_a_failing_deployment() {
    let (a, _b, gw) = priority_pair(
        "allowed_fails: 2, cooldown: 60s",
        "  solo: { retries: 1, allowed_fails: 100, deployments: [ { provider: a, deployment: solo } ] }",
    )
    .await;
    let refusals = [
        (401, json!({"error": {"message": "Incorrect API key provided: sk-upstream-a.",
                               "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}})
            .to_string()),
        (403, "<html>Sorry, you have been blocked</html>".to_string()),
        (404, json!({"error": {"code": "DeploymentNotFound",
                               "message": "The API deployment for this resource does not exist."}})
            .to_string()),
        (404, json!({"error": {"message": "The model `m` does not exist.", "type": "NotFoundError",
                               "param": null, "code": 404}})
            .to_string()),
        (404, json!({"error": {"message": "model \"m\" not found, try pulling it first",
                               "type": "api_error", "param": null, "code": null}})
            .to_string()),
    ];
    // 401 and 403: served by b, a counts nothing.
    for (status, body) in refusals.iter().take(2) {
        for _ in 0..3 {
            a.script(Scripted::respond(*status, body.clone()));
            chat(&gw, "pair").await.served_by("pair", "b/m");
        }
        let d = dep_state(&gw, "a/m").await;
        assert_eq!(
            (d["fails_in_row"].as_u64(), d["up"].as_bool()),
            (Some(0), Some(true)),
            "{status}: {d}"
        );
    }
    // Not there: served by b, a counts each (allowed_fails 2: cooling down at the second).
    a.script(Scripted::respond(refusals[2].0, refusals[2].1.clone()));
    chat(&gw, "pair").await.served_by("pair", "b/m");
    assert_eq!(dep_state(&gw, "a/m").await["fails_in_row"], 1);
    a.script(Scripted::respond(refusals[3].0, refusals[3].1.clone()));
    chat(&gw, "pair").await.served_by("pair", "b/m");
    assert_eq!(dep_state(&gw, "a/m").await["up"], false, "cooling down");
    let before = a.request_count();
    chat(&gw, "pair").await.served_by("pair", "b/m");
    assert_eq!(
        a.request_count(),
        before,
        "a cooling deployment is not asked"
    );

    // Alone on its route: a 502 that says what the upstream said, with the key it echoed
    // blanked (a deployment not there retried once, as a failure; a refused key not: it
    // said it would not).
    for (status, body) in &refusals {
        a.script(Scripted::respond(*status, body.clone()));
        a.script(Scripted::respond(*status, body.clone()));
        let sent = a.request_count();
        let r = chat(&gw, "solo").await;
        let tries = if *status == 404 { 2 } else { 1 };
        assert_eq!(a.request_count(), sent + tries, "{status}");
        let e = &r.json()["error"];
        assert_eq!(
            (r.status, e["code"].as_str()),
            (502, Some("upstream_error")),
            "{}",
            r.text
        );
        let message = e["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("refused the gateway ({status} ")),
            "{message}"
        );
        assert!(!r.text.contains("sk-upstream-a"), "{}", r.text);
        a.reset();
    }
    a.script(Scripted::respond(refusals[0].0, refusals[0].1.clone()));
    let e = chat(&gw, "solo").await.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(e.contains("Incorrect API key provided: ***."), "{e}");
}

/// A 404 for something the request names that is not the deployment (a conversation, a
/// file: stored where it was made) is asked of the route's other deployments, which may hold
/// it, and counts nothing against the one that said it: a client naming ids that do not
/// exist cannot take deployments out of rotation. Held nowhere: the client gets the 404.
#[tokio::test]
async fn a_404_for_what_the_request_names_is_looked_for_on_the_other_deployments() {
    let (a, b, gw) = priority_pair("allowed_fails: 1, retries: 0", "").await;
    let missing = || {
        Scripted::respond(
            404,
            json!({"error": {"message": "Conversation with id 'conv_1' not found.",
                             "type": "invalid_request_error", "param": "conversation", "code": null}})
            .to_string(),
        )
    };
    let body = json!({"model": "pair", "input": "hi", "conversation": "conv_1"});
    // Nor an operation a server lacks (Ollama's 404 page for speech, llama.cpp's 501 for
    // embeddings without `--embeddings`, FastAPI's `{"detail": "Not Found"}`), nor an id
    // whose name holds "model": asked of the other deployment, counting nothing.
    for lacks in [
        Scripted::respond(404, "404 page not found"),
        Scripted::respond(501, json!({"error": {"code": 501, "message": "This server does not support embeddings. Start it with `--embeddings`", "type": "not_supported_error"}}).to_string()),
        Scripted::respond(404, json!({"detail": "Not Found"}).to_string()),
        Scripted::respond(404, json!({"error": {"message": "Conversation with id 'conv_model42' not found.", "type": "invalid_request_error", "param": "conversation", "code": null}}).to_string()),
    ] {
        a.script(lacks);
        chat(&gw, "pair").await.served_by("pair", "b/m");
    }
    a.script(missing());
    b.script(Scripted::respond(
        200,
        json!({"id": "resp_1", "object": "response", "status": "completed",
        "output": [], "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}})
        .to_string(),
    ));
    let r = send_to(&client(), &gw, "/v1/responses", &body).await;
    r.served_by("pair", "b/m");
    for _ in 0..3 {
        a.script(missing());
        b.script(missing());
        let r = send_to(&client(), &gw, "/v1/responses", &body).await;
        assert_eq!(r.status, 404, "{}", r.text);
        assert_eq!(r.json()["error"]["param"], "conversation");
    }
    // Not found on one, the other's key refused (it may be the one holding it): the
    // refusal is the answer, whichever was asked last (it was the last one's).
    let refused = || {
        Scripted::respond(
            401,
            json!({"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}})
                .to_string(),
        )
    };
    for (first, second) in [(missing(), refused()), (refused(), missing())] {
        a.script(first);
        b.script(second);
        let r = send_to(&client(), &gw, "/v1/responses", &body).await;
        assert_eq!(r.status, 502, "{}", r.text);
    }
    let d = dep_state(&gw, "a/m").await;
    assert_eq!(
        (d["up"].as_bool(), d["fails_in_row"].as_u64()),
        (Some(true), Some(0)),
        "{d}"
    );
    assert_eq!(dep_state(&gw, "b/m").await["up"], true);
}

/// A plain answer whose body breaks off (its connection closed mid-body) is a failure of its
/// deployment, as a stream's is: counted (`broke_off`), and enough of them in a row cool it
/// down; a whole answer ends the run. It counted nothing: the deployment stayed up, every
/// client got a cut body.
#[tokio::test]
async fn a_plain_answer_cut_mid_body_counts_against_its_deployment() {
    let a = MockUpstream::start().await;
    let yaml = config(
        &openai("a", &a),
        "models:\n  solo: { allowed_fails: 2, cooldown: 60s, deployments: [ { provider: a, deployment: solo } ] }\n",
    );
    let gw = Gateway::start(&yaml).await;
    let cut = || {
        Scripted::JsonPartsCut(vec![(
            Duration::ZERO,
            r#"{"id":"c","object":"chat.comp"#.into(),
        )])
    };
    // The client's read fails (the body ends short).
    let cut_read = || async {
        let r = client()
            .post(gw.url("/v1/chat/completions"))
            .json(&chat_body("solo"))
            .send()
            .await
            .unwrap();
        assert!(r.bytes().await.is_err(), "a cut body");
    };
    a.script(cut());
    cut_read().await;
    wait_dep(
        &gw,
        "a/solo",
        |d| d["fails_in_row"] == 1,
        Duration::from_secs(5),
    )
    .await;
    // A whole answer ends the run.
    chat(&gw, "solo").await.served_by("solo", "a/solo");
    assert_eq!(dep_state(&gw, "a/solo").await["fails_in_row"], 0);
    for _ in 0..2 {
        a.script(cut());
        cut_read().await;
    }
    wait_dep(&gw, "a/solo", |d| d["up"] == false, Duration::from_secs(5)).await;
    let n = gw
        .metric(
            "switchyard_upstream_errors_total",
            &[
                ("route", "solo"),
                ("deployment", "a/solo"),
                ("kind", "broke_off"),
            ],
        )
        .await;
    assert_eq!(n, Some(3.0));
}

/// Azure's 429 (`code: "429"`, no `type`) reaches the client as Azure wrote it, in the
/// OpenAI shape: its code kept, the type OpenAI gives a rate limit, its `retry-after`.
#[tokio::test]
async fn an_azure_429_keeps_its_code_and_retry_after() {
    let (a, gw) = solo().await;
    a.script(Scripted::azure_rate_limited(6));
    let r = chat(&gw, "solo").await;
    assert_eq!(r.status, 429, "{}", r.text);
    assert_eq!(r.header("retry-after"), Some("6"));
    let e = r.json();
    assert_eq!(e["error"]["code"], "429", "{e}");
    assert_eq!(e["error"]["type"], "requests", "{e}");
    assert!(e["error"]["param"].is_null(), "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("retry after 6 seconds"),
        "{e}"
    );
}

/// A `retry-after` given as an HTTP date more than a day off cools the deployment down for a
/// day, as a figure does (it cooled it down until that date: 73 years, until a restart).
#[tokio::test]
async fn a_retry_after_date_far_off_cools_down_for_a_day() {
    let (a, gw) = solo().await;
    a.script(Scripted::Respond {
        status: 429,
        headers: vec![("retry-after".into(), "Wed, 21 Oct 2099 07:28:00 GMT".into())],
        body: json!({"error": {"message": "slow down", "code": "rate_limit_exceeded"}}).to_string(),
    });
    let r = chat(&gw, "solo").await;
    assert_eq!(r.status, 429, "{}", r.text);
    let ra: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((86_300..=86_400).contains(&ra), "retry-after {ra}");
}

#[tokio::test]
async fn a_429_with_retry_after_ms_cools_the_deployment_down_for_that_long_then_it_is_back() {
    let (a, b) = (MockUpstream::start().await, MockUpstream::start().await);
    let yaml = config(
        &(openai("a", &a) + &openai("b", &b)),
        r#"
models:
  r:
    strategy: priority
    deployments:
      - { provider: a, deployment: m, priority: 0 }
      - { provider: b, deployment: m, priority: 1 }
"#,
    );
    let gw = Gateway::start(&yaml).await;
    let t0 = Instant::now();
    a.script(Scripted::rate_limited(1500));
    chat(&gw, "r").await.served_by("r", "b/m");
    let d = dep_state(&gw, "a/m").await;
    assert_eq!(d["up"], false, "{d}");
    let left = d["cooling_down_seconds"].as_f64().unwrap();
    assert!(left > 0.0 && left <= 1.5, "{d}");
    assert_eq!(
        d["fails_in_row"], 1,
        "one 429 is enough: allowed_fails is not waited for"
    );
    // While a cools down, tier 0 is skipped; the route stays ready on b.
    for _ in 0..3 {
        chat(&gw, "r").await.served_by("r", "b/m");
    }
    assert_eq!(a.request_count(), 1);
    assert_eq!(readyz(&gw).await.0, 200);
    wait_dep(&gw, "a/m", |d| d["up"] == true, Duration::from_secs(5)).await;
    assert!(
        t0.elapsed() >= Duration::from_millis(1450),
        "back after {:?}, before its retry-after-ms",
        t0.elapsed()
    );
    // The next request is the probe; it succeeds and tier 0 serves again.
    chat(&gw, "r").await.served_by("r", "a/m");
    chat(&gw, "r").await.served_by("r", "a/m");
    let d = dep_state(&gw, "a/m").await;
    assert_eq!(
        (
            &d["up"],
            &d["fails_in_row"],
            &d["probing"],
            &d["cooling_down_seconds"]
        ),
        (&json!(true), &json!(0), &json!(false), &Value::Null)
    );
}

#[tokio::test]
async fn no_deployment_available_is_a_503_with_retry_after_and_readyz_follows() {
    let a = MockUpstream::start().await;
    let yaml = config(
        &(openai("a", &a) + "  demo: { kind: mock }\n"),
        r#"
models:
  solo: { deployments: [ { provider: a, deployment: solo } ] }
  # The same deployment (same provider/deployment, so the same state), with a fallback.
  guarded: { deployments: [ { provider: a, deployment: solo } ], fallbacks: [backup] }
  backup: { deployments: [ { provider: demo, deployment: backup } ] }
"#,
    );
    let gw = Gateway::start(&yaml).await;
    assert_eq!(readyz(&gw).await.0, 200);
    a.script(Scripted::rate_limited(2000));
    // The only deployment answers 429 and cools down: nothing left to retry on, so the
    // client gets the 429 with its retry-after.
    let r = chat(&gw, "solo").await;
    assert_eq!(r.status, 429, "{}", r.text);
    assert_eq!(r.header("retry-after-ms"), Some("2000"));
    assert_eq!(r.deployment(), "a/solo");
    // Now no deployment can take a request at all.
    let overhead = || gw.metric("switchyard_overhead_seconds_count", &[("route", "solo")]);
    let observed = overhead().await;
    let r = chat(&gw, "solo").await;
    assert_eq!(r.status, 503, "{}", r.text);
    // Not sent upstream: no overhead observed (the gateway's own time is that of requests
    // it sent).
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(overhead().await, observed);
    let e = r.json();
    assert_eq!(e["error"]["code"], "no_deployment_available", "{e}");
    assert_eq!(e["error"]["type"], "api_error", "{e}");
    let ra: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&ra), "retry-after {ra}");
    assert_eq!(r.route(), "solo");
    assert_eq!(r.header("x-switchyard-deployment"), None, "nothing served");
    assert_eq!(a.request_count(), 1);
    let (status, ready) = readyz(&gw).await;
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["status"], "not_ready");
    assert_eq!(
        ready["routes_without_deployment"],
        json!(["solo", "guarded"])
    );
    // A route with nothing available goes to its fallbacks.
    chat(&gw, "guarded")
        .await
        .served_by("backup", "demo/backup");
    assert_eq!(a.request_count(), 1);
    // After the retry-after, readiness comes back, and so does the deployment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while readyz(&gw).await.0 != 200 {
        assert!(Instant::now() < deadline, "never ready again");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    chat(&gw, "solo").await.served_by("solo", "a/solo");
}

#[tokio::test]
async fn a_hang_times_out_and_moves_to_another_deployment() {
    let (a, b, c) = (
        MockUpstream::start().await,
        MockUpstream::start().await,
        MockUpstream::start().await,
    );
    let yaml = config(
        &(openai("a", &a) + &openai("b", &b) + &openai("c", &c)),
        r#"
models:
  r:
    strategy: priority
    timeout: 600ms
    deployments:
      - { provider: a, deployment: m, priority: 0 }
      - { provider: b, deployment: m, priority: 1 }
  hung: { retries: 0, timeout: 400ms, deployments: [ { provider: c, deployment: hung } ] }
"#,
    );
    let gw = Gateway::start(&yaml).await;
    a.script(Scripted::Hang);
    let r = chat(&gw, "r").await;
    r.served_by("r", "b/m");
    assert!(r.elapsed >= Duration::from_millis(600), "{:?}", r.elapsed);
    assert!(r.elapsed < Duration::from_secs(5), "{:?}", r.elapsed);
    assert!(
        a.wait_in_flight(0, Duration::from_secs(5)).await,
        "the gateway kept the hanging upstream request open"
    );
    assert_eq!(dep_state(&gw, "a/m").await["fails_in_row"], 1);

    c.script(Scripted::Hang);
    let r = chat(&gw, "hung").await;
    assert_eq!(r.status, 504, "{}", r.text);
    assert_eq!(r.json()["error"]["code"], "upstream_timeout");
    assert_eq!(r.deployment(), "c/hung");
}

/// A stream that breaks off after its first chunk reached the client: the client gets the
/// error event, nothing is retried, and the break counts against the deployment (its
/// failures in a row, the cooldown, `switchyard_upstream_errors_total{kind="broke_off"}`),
/// as a failure before the first byte does (it counted nowhere: an engine dying
/// mid-generation stayed in rotation).
#[tokio::test]
async fn a_stream_reset_after_its_first_chunk_is_passed_on_and_not_retried() {
    let (a, b, gw) = primary_and_spare("allowed_fails: 2").await;
    let first = sse_chunk("par");
    a.script(Scripted::stream(&[(0, &first)], StreamEnd::Abort));
    let r = send(&client(), &gw, &stream_body("r")).await;
    r.served_by("r", "a/m");
    assert!(r.text.starts_with(&first), "{}", r.text);
    let last = r.text.trim_end().rsplit("\n\n").next().unwrap();
    let last: Value = serde_json::from_str(last.trim_start_matches("data:").trim()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_error", "{}", r.text);
    assert_eq!(
        b.request_count(),
        0,
        "a stream that reached the client is not retried"
    );
    wait_dep(
        &gw,
        "a/m",
        |d| d["fails_in_row"] == 1,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(dep_state(&gw, "a/m").await["up"], true);
    let broke = [("route", "r"), ("deployment", "a/m"), ("kind", "broke_off")];
    assert_eq!(
        gw.metric("switchyard_upstream_errors_total", &broke).await,
        Some(1.0)
    );
    // A whole stream ends the failures in a row; two breaks in a row cool `a` down.
    a.script(Scripted::stream(
        &[(0, &first), (0, "data: [DONE]\n\n")],
        StreamEnd::Finish,
    ));
    send(&client(), &gw, &stream_body("r"))
        .await
        .served_by("r", "a/m");
    wait_dep(
        &gw,
        "a/m",
        |d| d["fails_in_row"] == 0,
        Duration::from_secs(5),
    )
    .await;
    for _ in 0..2 {
        a.script(Scripted::stream(&[(0, &first)], StreamEnd::Abort));
        let r = send(&client(), &gw, &stream_body("r")).await;
        r.served_by("r", "a/m");
    }
    wait_dep(&gw, "a/m", |d| d["up"] == false, Duration::from_secs(5)).await;
    assert_eq!(
        gw.metric("switchyard_upstream_errors_total", &broke).await,
        Some(3.0)
    );
    chat(&gw, "r").await.served_by("r", "b/m");
}

/// A stream closed by its client at `[DONE]` (as the SDKs do) is whole, even when the
/// upstream's body ends later: it ends the failures in a row (it said nothing, so breaks
/// among whole SDK streams added up to a cooldown). An error event of the upstream's own
/// (vLLM's for an engine that died mid-answer, then `[DONE]`) is a failure of the
/// deployment, counted as `error_event`, and reaches the client without the upstream's
/// key or address.
#[tokio::test]
async fn a_stream_whole_at_done_ends_the_failures_and_an_upstream_error_event_counts() {
    let a = MockUpstream::start().await;
    let yaml = config(
        &openai("a", &a),
        r#"
models:
  r:
    allowed_fails: 2
    deployments: [ { provider: a, deployment: m } ]
"#,
    );
    let gw = Gateway::start(&yaml).await;
    let first = sse_chunk("par");
    a.script(Scripted::stream(&[(0, &first)], StreamEnd::Abort));
    send(&client(), &gw, &stream_body("r"))
        .await
        .served_by("r", "a/m");
    wait_dep(
        &gw,
        "a/m",
        |d| d["fails_in_row"] == 1,
        Duration::from_secs(5),
    )
    .await;

    // The client reads up to `[DONE]` and lets go; the upstream's body ends 1 s later.
    a.script(Scripted::stream(
        &[(0, &first), (0, "data: [DONE]\n\n"), (1000, "")],
        StreamEnd::Finish,
    ));
    let mut resp = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&stream_body("r"))
        .send()
        .await
        .unwrap();
    let mut text = String::new();
    while !text.contains("[DONE]") {
        let chunk = resp
            .chunk()
            .await
            .unwrap()
            .expect("the stream ends after [DONE]");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(resp);
    wait_dep(
        &gw,
        "a/m",
        |d| d["fails_in_row"] == 0,
        Duration::from_secs(5),
    )
    .await;

    // vLLM's error event mid-answer, echoing the upstream's key and address, then [DONE].
    let addr = a.url();
    let error = format!(
        "data: {{\"error\": {{\"object\": \"error\", \"message\": \"EngineDeadError at {addr}/v1 (key sk-upstream-a)\", \"type\": \"InternalServerError\", \"param\": null, \"code\": 500}}}}\n\n"
    );
    a.script(Scripted::stream(
        &[(0, &first), (0, &error), (0, "data: [DONE]\n\n")],
        StreamEnd::Finish,
    ));
    let r = send(&client(), &gw, &stream_body("r")).await;
    r.served_by("r", "a/m");
    assert!(
        r.text.contains("EngineDeadError at *** (key ***)"),
        "{}",
        r.text
    );
    assert!(
        !r.text.contains(&addr) && !r.text.contains("sk-upstream-a"),
        "{}",
        r.text
    );
    wait_dep(
        &gw,
        "a/m",
        |d| d["fails_in_row"] == 1,
        Duration::from_secs(5),
    )
    .await;
    let kind = [
        ("route", "r"),
        ("deployment", "a/m"),
        ("kind", "error_event"),
    ];
    assert_eq!(
        gw.metric("switchyard_upstream_errors_total", &kind).await,
        Some(1.0)
    );
}

/// Headers, then the connection breaks before the first byte of the stream: nothing reached
/// the client yet, so it is an attempt failure like any connection error, retried elsewhere.
#[tokio::test]
async fn a_stream_reset_before_its_first_byte_is_retried_elsewhere() {
    let (a, b) = (MockUpstream::start().await, MockUpstream::start().await);
    let yaml = config(
        &(openai("a", &a) + &openai("b", &b)),
        r#"
models:
  r:
    strategy: priority
    deployments:
      - { provider: a, deployment: m, priority: 0 }
      - { provider: b, deployment: m, priority: 1 }
"#,
    );
    let gw = Gateway::start(&yaml).await;
    a.script(Scripted::stream(&[], StreamEnd::Abort));
    let r = send(&client(), &gw, &stream_body("r")).await;
    r.served_by("r", "b/m");
    assert!(r.text.contains("[DONE]"), "{}", r.text);
    assert_eq!(dep_state(&gw, "a/m").await["fails_in_row"], 1);
}

#[tokio::test]
async fn a_slow_first_token_moves_the_stream_but_not_a_plain_request() {
    let (a, b) = (MockUpstream::start().await, MockUpstream::start().await);
    let yaml = config(
        &(openai("a", &a) + &openai("b", &b)),
        r#"
models:
  r:
    strategy: priority
    first_token_timeout: 500ms
    timeout: 10s
    deployments:
      - { provider: a, deployment: m, priority: 0 }
      - { provider: b, deployment: m, priority: 1 }
"#,
    );
    let gw = Gateway::start(&yaml).await;
    let c = client();
    // Headers at once, first chunk after 6 s. (Upper bounds on times here only say "did
    // not wait for the upstream"; they are loose because a loaded machine is slow.)
    let late = sse_chunk("late");
    a.script(Scripted::stream(
        &[(6000, &late), (0, "data: [DONE]\n\n")],
        StreamEnd::Finish,
    ));
    let r = send(&c, &gw, &stream_body("r")).await;
    r.served_by("r", "b/m");
    assert!(
        r.text.contains("[DONE]") && !r.text.contains("late"),
        "{}",
        r.text
    );
    assert!(
        r.elapsed >= Duration::from_millis(500) && r.elapsed < Duration::from_secs(5),
        "{:?}",
        r.elapsed
    );
    // Headers late too.
    a.script(Scripted::Delay(
        Duration::from_secs(6),
        Box::new(Scripted::stream(&[(0, &late)], StreamEnd::Finish)),
    ));
    let r = send(&c, &gw, &stream_body("r")).await;
    r.served_by("r", "b/m");
    assert!(r.elapsed < Duration::from_secs(5), "{:?}", r.elapsed);
    let d = dep_state(&gw, "a/m").await;
    assert_eq!(
        (&d["fails_in_row"], &d["in_flight"]),
        (&json!(2), &json!(0))
    );
    // first_token_timeout is for streams: a plain request may take longer (within timeout).
    a.script(ok_after(1000));
    let r = send(&c, &gw, &chat_body("r")).await;
    r.served_by("r", "a/m");
    assert!(r.elapsed >= Duration::from_millis(1000), "{:?}", r.elapsed);
    assert_eq!(b.request_count(), 2);

    // A comment (an upstream's `: ping`) is no token: it did not stop the clock (the
    // stream stayed on a, its token 6 s late, and its time to first token read 0).
    a.script(Scripted::stream(
        &[(0, ": ping\n\n"), (6000, &late), (0, "data: [DONE]\n\n")],
        StreamEnd::Finish,
    ));
    let r = send(&c, &gw, &stream_body("r")).await;
    r.served_by("r", "b/m");
    assert!(!r.text.contains("late"), "{}", r.text);
    // Within the time, the comment goes out with the first event; the time to first token
    // is the event's.
    a.script(Scripted::stream(
        &[(0, ": ping\n\n"), (300, &late), (0, "data: [DONE]\n\n")],
        StreamEnd::Finish,
    ));
    let r = send(&c, &gw, &stream_body("r")).await;
    r.served_by("r", "a/m");
    assert!(
        r.text.starts_with(": ping\n\n") && r.text.contains("late"),
        "{}",
        r.text
    );
    let ttft = gw
        .metric(
            "switchyard_time_to_first_token_seconds_sum",
            &[("route", "r"), ("deployment", "a/m")],
        )
        .await
        .unwrap();
    assert!(ttft >= 0.3, "time to first token {ttft}s");
    // A stream that ends before any event with data (comments only, or nothing) is no
    // answer: the next deployment serves (it went to the client as a 200 without `[DONE]`).
    for events in [&[(0, ": ping\n\n")][..], &[]] {
        a.script(Scripted::stream(events, StreamEnd::Finish));
        let r = send(&c, &gw, &stream_body("r")).await;
        r.served_by("r", "b/m");
        assert!(r.text.contains("[DONE]"), "{}", r.text);
    }
}

#[tokio::test]
async fn timeout_bounds_the_whole_stream() {
    let a = MockUpstream::start().await;
    let yaml = config(
        &openai("a", &a),
        r#"
models:
  r: { timeout: 800ms, first_token_timeout: 5s, deployments: [ { provider: a, deployment: m } ] }
"#,
    );
    let gw = Gateway::start(&yaml).await;
    let first = sse_chunk("one");
    a.script(Scripted::stream(
        &[(0, &first), (6000, &sse_chunk("two"))],
        StreamEnd::Finish,
    ));
    let r = send(&client(), &gw, &stream_body("r")).await;
    r.served_by("r", "a/m");
    assert!(r.text.starts_with(&first), "{}", r.text);
    assert!(r.text.contains("\"upstream_timeout\""), "{}", r.text);
    assert!(!r.text.contains("two"), "{}", r.text);
    assert!(
        r.elapsed >= Duration::from_millis(800) && r.elapsed < Duration::from_secs(5),
        "{:?}",
        r.elapsed
    );
}

/// Route `r`: deployment `a/m` first (priority 0), `b/m` behind it (priority 1), with the
/// route settings `settings` (a YAML flow map's members, such as `allowed_fails: 2`).
async fn primary_and_spare(settings: &str) -> (MockUpstream, MockUpstream, Gateway) {
    let (a, b) = (MockUpstream::start().await, MockUpstream::start().await);
    let yaml = config(
        &(openai("a", &a) + &openai("b", &b)),
        &format!(
            "models:\n  r: {{ strategy: priority, {settings}, deployments: [ \
             {{ provider: a, deployment: m, priority: 0 }}, {{ provider: b, deployment: m, priority: 1 }} ] }}\n"
        ),
    );
    let gw = Gateway::start(&yaml).await;
    (a, b, gw)
}

// ---------------------------------------------------------------------------------------------
// Fallbacks.

#[tokio::test]
async fn a_context_length_error_and_a_long_prompt_go_to_the_context_fallbacks() {
    let (a, b, c) = (
        MockUpstream::start().await,
        MockUpstream::start().await,
        MockUpstream::start().await,
    );
    let yaml = config(
        &(openai("a", &a) + &openai("b", &b) + &openai("c", &c)),
        r#"
models:
  small:
    context_window: 100
    deployments: [ { provider: a, deployment: small } ]
    context_fallbacks: [big]
    fallbacks: [other]
  # No context_fallbacks: the window is not checked, a context error goes to the client.
  small-alone:
    context_window: 100
    deployments: [ { provider: a, deployment: small-alone } ]
    fallbacks: [other]
  big: { deployments: [ { provider: b, deployment: big } ] }
  other: { deployments: [ { provider: c, deployment: other } ] }
"#,
    );
    let gw = Gateway::start(&yaml).await;
    let too_long = "This model's maximum context length is 4096 tokens. However, you requested \
                    5000 tokens (4900 in the messages, 100 in the completion). Please reduce the \
                    length of the messages or completion.";
    a.script(Scripted::vllm_error(400, too_long));
    chat(&gw, "small").await.served_by("big", "b/big");
    assert_eq!(a.request_count(), 1, "a 400 is not retried");
    assert_eq!(b.requests()[0].json()["model"], "big");
    // TGI's two: a prompt over `max_input_tokens` (the usual one for chat, TGI filling in
    // `max_new_tokens` itself), and prompt plus `max_new_tokens` over `max_total_tokens`.
    for message in [
        "Input validation error: `inputs` must have less than 4096 tokens. Given: 5000",
        "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. Given: 4000 `inputs` tokens and 200 `max_new_tokens`",
    ] {
        a.script(Scripted::tgi_error(422, message, "validation"));
        chat(&gw, "small").await.served_by("big", "b/big");
    }
    assert_eq!(a.request_count(), 3);

    // Estimated at ceil(bytes / 4) > 100 tokens: straight to the context fallback.
    let long =
        json!({"model": "small", "messages": [{"role": "user", "content": "x".repeat(500)}]});
    send(&client(), &gw, &long).await.served_by("big", "b/big");
    assert_eq!(
        a.request_count(),
        3,
        "the long prompt was not sent to `small`"
    );
    chat(&gw, "small").await.served_by("small", "a/small");

    let mut long = long;
    long["model"] = json!("small-alone");
    a.script(Scripted::vllm_error(400, too_long));
    let r = send(&client(), &gw, &long).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.text.contains("maximum context length"), "{}", r.text);
    assert_eq!(r.deployment(), "a/small-alone");
    assert_eq!(
        c.request_count(),
        0,
        "a context error does not go to `fallbacks`"
    );
}

#[tokio::test]
async fn an_azure_content_filter_400_goes_to_the_content_filter_fallbacks_only() {
    let (a, b, c) = (
        MockUpstream::start().await,
        MockUpstream::start().await,
        MockUpstream::start().await,
    );
    let providers = format!(
        "  az: {{ kind: azure_openai, endpoint: \"{}\", api_key: sk-upstream-az }}\n{}{}",
        a.url(),
        openai("lenient", &b),
        openai("c", &c)
    );
    let yaml = config(
        &providers,
        r#"
models:
  guarded:
    deployments: [ { provider: az, deployment: gpt-4o-eu } ]
    content_filter_fallbacks: [lenient]
    fallbacks: [other]
  strict:
    deployments: [ { provider: az, deployment: gpt-4o-strict } ]
    fallbacks: [other]
  lenient: { deployments: [ { provider: lenient, deployment: open-model } ] }
  other: { deployments: [ { provider: c, deployment: other } ] }
"#,
    );
    let gw = Gateway::start(&yaml).await;
    a.script(Scripted::azure_content_filter());
    chat(&gw, "guarded")
        .await
        .served_by("lenient", "lenient/open-model");
    assert_eq!(a.request_count(), 1);

    a.script(Scripted::azure_content_filter());
    let r = chat(&gw, "strict").await;
    assert_eq!(r.status, 400, "{}", r.text);
    let e = r.json();
    assert_eq!(e["error"]["code"], "content_filter", "{e}");
    assert_eq!(r.deployment(), "az/gpt-4o-strict");
    assert_eq!(a.request_count(), 2, "not retried");
    assert_eq!(c.request_count(), 0, "a refusal does not go to `fallbacks`");
}

#[tokio::test]
async fn fallbacks_are_tried_in_order_each_route_once_and_not_chained() {
    let (b, c, d) = (
        MockUpstream::start().await,
        MockUpstream::start().await,
        MockUpstream::start().await,
    );
    let providers = format!(
        "  dead: {{ kind: openai, base_url: \"http://127.0.0.1:9/v1\" }}\n{}{}{}",
        openai("b", &b),
        openai("c", &c),
        openai("d", &d)
    );
    let yaml = config(
        &providers,
        r#"
models:
  first: { retries: 0, deployments: [ { provider: dead, deployment: x } ], fallbacks: [second, second, third] }
  second: { retries: 1, deployments: [ { provider: b, deployment: second } ], fallbacks: [fourth] }
  third: { deployments: [ { provider: c, deployment: third } ] }
  fourth: { deployments: [ { provider: d, deployment: fourth } ] }
  picky: { deployments: [ { provider: b, deployment: picky } ], fallbacks: [third] }
"#,
    );
    let gw = Gateway::start(&yaml).await;
    b.script(Scripted::server_error(503));
    b.script(Scripted::server_error(503));
    chat(&gw, "first").await.served_by("third", "c/third");
    assert_eq!(
        b.request_count(),
        2,
        "`second` once, with its own retries: 1"
    );
    assert_eq!(
        d.request_count(),
        0,
        "the fallback's own fallbacks are not followed"
    );
    assert_eq!(dep_state(&gw, "dead/x").await["fails_in_row"], 1);

    // A 400 is the client's fault: no retry, no fallback.
    b.script(Scripted::respond(
        400,
        json!({"error": {"message": "bad temperature", "type": "invalid_request_error",
                         "param": "temperature", "code": null}})
        .to_string(),
    ));
    let r = chat(&gw, "picky").await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.json()["error"]["param"], "temperature");
    assert_eq!(c.request_count(), 1);
    assert_eq!(b.request_count(), 3);
}

/// Route `main` (one deployment on `a`, no retries) falling back to `spare` (one on `b`),
/// whose deployment has just answered 429 and cools down for 10 s.
async fn main_with_a_cooling_spare() -> (MockUpstream, MockUpstream, Gateway) {
    let (a, b) = (MockUpstream::start().await, MockUpstream::start().await);
    let yaml = config(
        &(openai("a", &a) + &openai("b", &b)),
        r#"
models:
  main: { retries: 0, deployments: [ { provider: a, deployment: main } ], fallbacks: [spare] }
  spare: { deployments: [ { provider: b, deployment: spare } ] }
"#,
    );
    let gw = Gateway::start(&yaml).await;
    b.script(Scripted::rate_limited(10_000));
    assert_eq!(chat(&gw, "spare").await.status, 429);
    (a, b, gw)
}

/// A fallback that cannot even try (every deployment cooling down) does not replace the
/// upstream's answer the route itself got; when no route could try, the 503 names them all.
#[tokio::test]
async fn a_fallback_that_cannot_try_leaves_the_upstreams_error_and_a_503_names_every_route() {
    let (a, b, gw) = main_with_a_cooling_spare().await;

    // `main`'s upstream fails; its fallback cannot try: the client gets the upstream's 503.
    a.script(Scripted::server_error(503));
    let r = chat(&gw, "main").await;
    assert_eq!(r.status, 503, "{}", r.text);
    let e = r.json();
    assert_eq!(
        e["error"]["message"], "The server had an error while processing your request.",
        "{e}"
    );
    assert_ne!(e["error"]["code"], "no_deployment_available", "{e}");
    assert_eq!((r.route(), r.deployment()), ("main", "a/main"));

    // A 429 likewise keeps its retry-after, and cools `main` down too.
    a.script(Scripted::rate_limited(3000));
    let r = chat(&gw, "main").await;
    assert_eq!(r.status, 429, "{}", r.text);
    assert_eq!(r.header("retry-after-ms"), Some("3000"));
    assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");

    // Now neither route can try: a 503 that names both, with the sooner retry-after
    // (`main`'s 3 s, not `spare`'s 10).
    let r = chat(&gw, "main").await;
    assert_eq!(r.status, 503, "{}", r.text);
    let e = r.json();
    assert_eq!(e["error"]["code"], "no_deployment_available", "{e}");
    let message = e["error"]["message"].as_str().unwrap();
    assert!(message.contains("`main`, `spare`"), "{message}");
    let ra: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=3).contains(&ra), "retry-after {ra}");
    assert_eq!((a.request_count(), b.request_count()), (2, 1));
}

/// An all-unavailable 503 says `retry-after: 1` when one of its routes has nothing cooling
/// down (its one deployment's probe is out): that route may take a request any moment, however
/// long its fallback's cooldown.
#[tokio::test]
async fn a_503_of_routes_that_cannot_try_says_1_s_when_one_only_waits_for_a_probe() {
    let (a, _spare, gw) = main_with_a_cooling_spare().await;
    // `main`'s deployment cools down briefly; then its probe is held out for 2 s.
    a.script(Scripted::rate_limited(300));
    assert_eq!(chat(&gw, "main").await.status, 429);
    wait_dep(&gw, "a/main", |d| d["up"] == true, Duration::from_secs(4)).await;
    a.script(ok_after(2000));
    let probe = tokio::spawn({
        let (c, url) = (client(), gw.url("/v1/chat/completions"));
        async move {
            c.post(url)
                .json(&chat_body("main"))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    });
    assert!(a.wait_in_flight(1, Duration::from_secs(5)).await);
    let r = chat(&gw, "main").await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(r.json()["error"]["code"], "no_deployment_available");
    assert_eq!(r.header("retry-after"), Some("1"), "not spare's 10 s");
    assert_eq!(probe.await.unwrap(), 200);
}

/// A fallback route's own `limits:` count the requests that reach it as a fallback, with its
/// own: past them, the fallback is not tried, and the client gets what the requested route
/// got (its upstream's error; a 429 when none of its deployments could take the request).
#[tokio::test]
async fn a_fallback_routes_own_limits_count_and_refuse_requests_reaching_it_as_a_fallback() {
    let (a, b) = (MockUpstream::start().await, MockUpstream::start().await);
    let yaml = config(
        &(openai("a", &a) + &openai("b", &b)),
        r#"
models:
  main: { retries: 0, deployments: [ { provider: a, deployment: main } ], fallbacks: [spare] }
  dry: { deployments: [ { provider: a, deployment: dry, rpm: 1 } ], fallbacks: [spare] }
  spare: { deployments: [ { provider: b, deployment: spare } ], limits: { rpm: 2 } }
"#,
    );
    let gw = Gateway::start(&yaml).await;
    gateway::not_near_a_minute_boundary().await;
    // Served by `spare`, its answers carry its figures.
    for left in ["1", "0"] {
        a.script(Scripted::server_error(503));
        let r = chat(&gw, "main").await;
        r.served_by("spare", "b/spare");
        assert_eq!(
            (
                r.header("x-ratelimit-limit-requests"),
                r.header("x-ratelimit-remaining-requests")
            ),
            (Some("2"), Some(left))
        );
    }
    // `spare`'s rpm is used up by the two fallbacks: not tried for a third.
    a.script(Scripted::server_error(503));
    let r = chat(&gw, "main").await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!((r.route(), r.deployment()), ("main", "a/main"));
    assert_eq!(b.request_count(), 2);
    // Nor asked directly.
    let r = chat(&gw, "spare").await;
    assert_eq!(r.status, 429, "{}", r.text);
    assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
    assert!(r.text.contains("route:spare"), "{}", r.text);

    // `dry` serves once, then its deployment is out of its upstream quota: the fallback's
    // refusal is what the client gets, a 429 with its retry-after.
    chat(&gw, "dry").await.served_by("dry", "a/dry");
    let r = chat(&gw, "dry").await;
    assert_eq!(r.status, 429, "{}", r.text);
    assert_eq!(
        r.json()["error"]["code"],
        "rate_limit_exceeded",
        "{}",
        r.text
    );
    assert!(r.text.contains("route:spare"), "{}", r.text);
    assert!(r.header("retry-after").is_some());
    assert_eq!(b.request_count(), 2);
    // Counted as refusals when the client got them (the direct request and `dry`'s), not
    // when the client got another answer (`main`'s third).
    assert_eq!(
        gw.metric(
            "switchyard_ratelimited_total",
            &[("scope", "route"), ("name", "spare"), ("kind", "rpm")]
        )
        .await,
        Some(2.0)
    );
    // Sent on to `spare` twice from `main` (its third was refused there, never sent) and
    // never from `dry`.
    assert_eq!(
        gw.metric(
            "switchyard_fallbacks_total",
            &[("route", "main"), ("kind", "fallbacks")]
        )
        .await,
        Some(2.0)
    );
    assert_eq!(
        gw.metric(
            "switchyard_fallbacks_total",
            &[("route", "dry"), ("kind", "fallbacks")]
        )
        .await
        .unwrap_or(0.0),
        0.0
    );
}

/// A fallback whose own attempt failed gives its `max_parallel` slot back at once, not when
/// the request ends (served by a later fallback, it held the slot for its whole answer).
#[tokio::test]
async fn a_fallback_that_failed_gives_its_parallel_slot_back_at_once() {
    let (a, b) = (MockUpstream::start().await, MockUpstream::start().await);
    let yaml = config(
        &(openai("a", &a) + &openai("b", &b)),
        r#"
routing: { retries: 0 }
models:
  main: { deployments: [ { provider: a, deployment: main } ], fallbacks: [tight, spare] }
  tight: { deployments: [ { provider: a, deployment: tight } ], limits: { max_parallel: 1 } }
  spare: { deployments: [ { provider: b, deployment: spare } ] }
"#,
    );
    let gw = Gateway::start(&yaml).await;
    a.script(Scripted::server_error(503));
    a.script(Scripted::server_error(503));
    b.script(ok_after(1500));
    let slow = tokio::spawn({
        let (c, url) = (client(), gw.url("/v1/chat/completions"));
        async move {
            let r = c.post(url).json(&chat_body("main")).send().await.unwrap();
            (
                r.status().as_u16(),
                r.headers()["x-switchyard-route"]
                    .to_str()
                    .unwrap()
                    .to_string(),
            )
        }
    });
    assert!(b.wait_in_flight(1, Duration::from_secs(5)).await);
    // `tight` failed for `main` and holds nothing: a request of its own is let through.
    chat(&gw, "tight").await.served_by("tight", "a/tight");
    assert_eq!(slow.await.unwrap(), (200, "spare".to_string()));
}

/// A listener that never accepts, its queue filled: a connection to it is never made (the
/// kernel drops the SYNs), so only a connect timeout ends the attempt. The streams are kept
/// to keep the queue full.
fn unanswered_listener() -> (
    std::net::SocketAddr,
    std::net::TcpListener,
    Vec<std::net::TcpStream>,
) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    let listener = socket.listen(1).unwrap().into_std().unwrap();
    let mut queued = Vec::new();
    while let Ok(s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
        queued.push(s);
        assert!(queued.len() < 64, "the listener's queue never filled");
    }
    (addr, listener, queued)
}

/// A route's own `connect_timeout` bounds the connection to its upstream; another route
/// keeps `routing.connect_timeout`.
#[tokio::test]
async fn a_routes_connect_timeout_overrides_the_routing_default() {
    let (addr, _listener, _queued) = unanswered_listener();
    let yaml = config(
        &format!("  silent: {{ kind: openai, base_url: \"http://{addr}/v1\" }}\n"),
        r#"
routing: { connect_timeout: 3s, retries: 0 }
models:
  quick: { connect_timeout: 200ms, deployments: [ { provider: silent, deployment: m } ] }
  patient: { deployments: [ { provider: silent, deployment: m } ] }
"#,
    );
    let gw = Gateway::start(&yaml).await;
    // A connection never made is a 502 (the route's `timeout`, 120 s, is far off).
    let r = chat(&gw, "quick").await;
    assert_eq!(r.status, 502, "{}", r.text);
    assert!(
        r.text.contains("within the route's connect_timeout"),
        "{}",
        r.text
    );
    assert!(
        r.elapsed >= Duration::from_millis(200) && r.elapsed < Duration::from_millis(2500),
        "the route's 200 ms: {:?}",
        r.elapsed
    );
    let r = chat(&gw, "patient").await;
    assert_eq!(r.status, 502, "{}", r.text);
    assert!(
        r.text.contains("within the route's connect_timeout"),
        "{}",
        r.text
    );
    assert!(
        r.elapsed >= Duration::from_millis(2900),
        "routing's 3 s: {:?}",
        r.elapsed
    );
}

/// A route with a `connect_timeout` of its own gets its HTTP providers over a client of its
/// own, but a `kind: mock` provider stays one: its `fail_every` counts every route's requests.
#[tokio::test]
async fn a_mock_provider_counts_the_requests_of_routes_with_their_own_connect_timeout() {
    let yaml = config(
        "  demo: { kind: mock, fail_every: 2 }\n",
        r#"
models:
  plain: { retries: 0, deployments: [ { provider: demo, deployment: x } ] }
  patient: { retries: 0, connect_timeout: 1s, deployments: [ { provider: demo, deployment: y } ] }
"#,
    );
    let gw = Gateway::start(&yaml).await;
    let mut statuses = Vec::new();
    for route in ["plain", "patient", "plain", "patient"] {
        statuses.push(chat(&gw, route).await.status);
    }
    assert_eq!(statuses, [200, 503, 200, 503], "one count for both routes");
}

// ---------------------------------------------------------------------------------------------
// Strategies.

/// 2,000 requests over weights 3 : 1 : 0. The count on the weight-3 deployment is
/// Binomial(2000, 0.75): mean 1500, σ = √(2000 · 0.75 · 0.25) ≈ 19.4. The tolerance ±90 is
/// 4.65σ; a false failure has probability 2·Φ(−4.65) ≈ 3.3·10⁻⁶. The weight-0 deployment
/// is never picked (exact).
#[tokio::test]
async fn weighted_splits_by_weight() {
    let yaml = config(
        "  m1: { kind: mock }\n  m2: { kind: mock }\n  m3: { kind: mock }\n",
        r#"
models:
  w:
    deployments:
      - { provider: m1, deployment: w, weight: 3 }
      - { provider: m2, deployment: w, weight: 1 }
      - { provider: m3, deployment: w, weight: 0 }
"#,
    );
    let gw = Gateway::start(&yaml).await;
    let answers = many(&gw, &chat_body("w"), 2000, 16).await;
    let t = tally(&answers);
    let heavy = t.get("m1/w").copied().unwrap_or(0);
    let light = t.get("m2/w").copied().unwrap_or(0);
    assert_eq!(t.get("m3/w"), None, "{t:?}");
    assert_eq!(heavy + light, 2000);
    assert!(heavy.abs_diff(1500) <= 90, "{t:?}");
}

/// Round robin keeps one counter per route and takes one turn per pick, so with no failures
/// the split is exact whatever the concurrency: tolerance 0.
#[tokio::test]
async fn round_robin_takes_turns() {
    let yaml = config(
        "  m1: { kind: mock }\n  m2: { kind: mock }\n  m3: { kind: mock }\n",
        r#"
models:
  rr:
    strategy: round_robin
    deployments:
      - { provider: m1, deployment: rr }
      - { provider: m2, deployment: rr }
      - { provider: m3, deployment: rr }
"#,
    );
    let gw = Gateway::start(&yaml).await;
    let mut order = Vec::new();
    for _ in 0..6 {
        order.push(chat(&gw, "rr").await.deployment().to_string());
    }
    assert_eq!(order[..3], order[3..], "{order:?}");
    assert_eq!(
        order[..3]
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len(),
        3,
        "{order:?}"
    );
    let answers = many(&gw, &chat_body("rr"), 594, 12).await;
    let t = tally(&answers);
    assert_eq!(
        t,
        HashMap::from([
            ("m1/rr".to_string(), 198),
            ("m2/rr".to_string(), 198),
            ("m3/rr".to_string(), 198),
        ])
    );
}

/// Power of two choices over two deployments always compares both, so while `a` holds
/// streams and `b` does not, every request goes to `b` (exact). Once `a` is idle again it
/// takes requests again: ties go to either at random, so it gets none of 40 with
/// probability at most 0.5⁴⁰ < 10⁻¹².
#[tokio::test]
async fn least_busy_avoids_a_deployment_holding_long_requests() {
    let (a, b) = (MockUpstream::start().await, MockUpstream::start().await);
    let yaml = config(
        &(openai("a", &a) + &openai("b", &b)),
        r#"
models:
  # Another route on the same deployment a/m: they share its state, in-flight count included.
  hold: { deployments: [ { provider: a, deployment: m } ] }
  chat:
    strategy: least_busy
    deployments:
      - { provider: a, deployment: m }
      - { provider: b, deployment: m }
"#,
    );
    let gw = Gateway::start(&yaml).await;
    let c = client();
    let first = sse_chunk("long");
    let mut held = Vec::new();
    for _ in 0..4 {
        a.script(Scripted::stream(
            &[(0, &first), (8000, "data: [DONE]\n\n")],
            StreamEnd::Finish,
        ));
        let resp = c
            .post(gw.url("/v1/chat/completions"))
            .json(&stream_body("hold"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        held.push(resp);
    }
    assert_eq!(dep_state(&gw, "a/m").await["in_flight"], 4);
    for _ in 0..20 {
        chat(&gw, "chat").await.served_by("chat", "b/m");
    }
    assert_eq!(a.request_count(), 4);

    drop(held);
    wait_dep(&gw, "a/m", |d| d["in_flight"] == 0, Duration::from_secs(5)).await;
    let mut to_a = 0;
    for _ in 0..40 {
        let r = chat(&gw, "chat").await;
        assert_eq!(r.status, 200);
        to_a += usize::from(r.deployment() == "a/m");
    }
    assert!(to_a > 0, "a never picked again once idle");
}

/// With equal in-flight counts a tie goes to either deployment at random: an even split (a
/// first version favoured the first one listed, 3 : 1). 400 sequential requests over two idle
/// deployments: Binomial(400, 0.5), σ = 10; ±45 is 4.5σ, P(false failure) ≈ 7·10⁻⁶.
#[tokio::test]
async fn least_busy_splits_evenly_between_idle_deployments() {
    let yaml = config(
        "  m1: { kind: mock }\n  m2: { kind: mock }\n",
        r#"
models:
  lb:
    strategy: least_busy
    deployments: [ { provider: m1, deployment: lb }, { provider: m2, deployment: lb } ]
"#,
    );
    let gw = Gateway::start(&yaml).await;
    let answers = many(&gw, &chat_body("lb"), 400, 1).await;
    let t = tally(&answers);
    let first = t.get("m1/lb").copied().unwrap_or(0);
    assert!(first.abs_diff(200) <= 45, "{t:?}");
}

/// `b` always answers in 40 ms; `a` in a few ms, then 300 ms for a while, then fast again.
/// Only exploration (10 % of picks, half of them to `a`) sends traffic to the slower one.
/// - While `a` is slow, `a` gets ≤ 6 of 20 requests: P(Binomial(20, 0.05) ≥ 7) ≈ 3·10⁻⁵.
/// - After `a` recovers, exploration notices: each fast answer cuts its moving average by
///   30 %. After at most 7 slow samples its average is under 300 ms, and six explorations
///   bring it under `b`'s 40 ms. The cap is 400 requests: fewer than six explorations hit `a`
///   in 400 with P(Binomial(400, 0.05) ≤ 5) ≈ 7·10⁻⁵. Typically `a` is back within about 60.
#[tokio::test]
async fn least_latency_moves_to_the_faster_deployment_and_comes_back_after_recovery() {
    let (a, b) = (MockUpstream::start().await, MockUpstream::start().await);
    let yaml = config(
        &(openai("a", &a) + &openai("b", &b)),
        r#"
models:
  r:
    strategy: least_latency
    deployments:
      - { provider: a, deployment: m }
      - { provider: b, deployment: m }
"#,
    );
    let gw = Gateway::start(&yaml).await;
    for _ in 0..1000 {
        b.script(ok_after(40));
    }
    let c = client();
    let body = chat_body("r");
    // Both get measured (an unmeasured deployment is picked first).
    for _ in 0..6 {
        assert_eq!(send(&c, &gw, &body).await.status, 200);
    }
    let admin_view = admin(&gw).await;
    assert!(dep(&admin_view, "a/m")["latency_ms"].is_number());
    assert!(dep(&admin_view, "b/m")["latency_ms"].as_f64().unwrap() >= 40.0);

    // `a` turns slow. Wait for its first slow answer, then count.
    for _ in 0..50 {
        a.script(ok_after(300));
    }
    let mut waited = 0;
    while send(&c, &gw, &body).await.deployment() != "a/m" {
        waited += 1;
        assert!(waited < 400, "a never picked");
    }
    let mut slow_phase = Vec::new();
    for _ in 0..20 {
        slow_phase.push(send(&c, &gw, &body).await);
    }
    let t = tally(&slow_phase);
    assert!(t.get("a/m").copied().unwrap_or(0) <= 6, "{t:?}");

    // `a` recovers (unscripted answers take a few ms): traffic comes back to it.
    a.reset();
    let mut streak = 0;
    let mut n = 0;
    while streak < 5 {
        n += 1;
        assert!(n <= 400, "a not back after 400 requests");
        let r = send(&c, &gw, &body).await;
        assert_eq!(r.status, 200);
        streak = if r.deployment() == "a/m" {
            streak + 1
        } else {
            0
        };
    }
    let d = dep_state(&gw, "a/m").await;
    let lat_a = d["latency_ms"].as_f64().unwrap();
    let lat_b = dep_state(&gw, "b/m").await["latency_ms"].as_f64().unwrap();
    assert!(lat_a < lat_b, "a {lat_a} ms, b {lat_b} ms");
}

#[tokio::test]
async fn lowest_cost_picks_the_cheapest_healthy_deployment() {
    let (b, c) = (MockUpstream::start().await, MockUpstream::start().await);
    let providers = format!(
        "  demo: {{ kind: mock }}\n{}{}",
        openai("b", &b),
        openai("c", &c)
    );
    let yaml = config(
        &providers,
        r#"
models:
  r:
    strategy: lowest_cost
    pricing: { input_per_1m: 2.5, output_per_1m: 10 }   # for deployments without their own
    deployments:
      - { provider: demo, deployment: dear }                                          # 12.5
      - { provider: b, deployment: cheap, pricing: { input_per_1m: 0.15, output_per_1m: 0.6 } } # 0.75
      - { provider: c, deployment: middle, pricing: { input_per_1m: 1, output_per_1m: 4 } }     # 5
"#,
    );
    let gw = Gateway::start(&yaml).await;
    for _ in 0..10 {
        chat(&gw, "r").await.served_by("r", "b/cheap");
    }
    // The cheapest cools down (429, retry-after 10 s): the next cheapest takes over, at once.
    b.script(Scripted::rate_limited(10_000));
    chat(&gw, "r").await.served_by("r", "c/middle");
    for _ in 0..5 {
        chat(&gw, "r").await.served_by("r", "c/middle");
    }
    assert_eq!(b.request_count(), 11);
    // The next cheapest cools down too: the dearest is the only healthy one left.
    c.script(Scripted::rate_limited(10_000));
    chat(&gw, "r").await.served_by("r", "demo/dear");
    chat(&gw, "r").await.served_by("r", "demo/dear");
    assert_eq!((b.request_count(), c.request_count()), (11, 7));
}

/// Deployments that cost nothing per token are told apart by what they are billed by: on a
/// speech route, `tts-1` (15 USD per 1M characters, built in) before `tts-1-hd` (30).
#[tokio::test]
async fn lowest_cost_tells_speech_deployments_apart_by_their_price_per_character() {
    let (b, c) = (MockUpstream::start().await, MockUpstream::start().await);
    let providers = format!("{}{}", openai("b", &b), openai("c", &c));
    let yaml = config(
        &providers,
        r#"
models:
  speech:
    strategy: lowest_cost
    deployments:
      - { provider: b, deployment: tts-1-hd }
      - { provider: c, deployment: tts-1 }
"#,
    );
    let gw = Gateway::start(&yaml).await;
    let body = json!({"model": "speech", "voice": "alloy", "input": "hello"});
    for _ in 0..6 {
        send_to(&client(), &gw, "/v1/audio/speech", &body)
            .await
            .served_by("speech", "c/tts-1");
    }
    assert_eq!((b.request_count(), c.request_count()), (0, 6));
}

/// Priority: the provisioned-throughput deployment (tier 0) takes requests until its tpm is
/// used up this minute, then pay-as-you-go (tier 1) until its rpm is, then 503. Quota windows
/// are wall-clock minutes: if the minute turns during a run, that run proves nothing and is
/// done again (it lasts well under a second, so the second run is in one minute).
#[tokio::test]
async fn priority_fills_tier_0_to_its_tpm_then_spills_to_tier_1_then_503() {
    let body = json!({"model": "gpt-4o", "max_tokens": 200,
                      "messages": [{"role": "user", "content": "Summarise our meeting notes."}]});
    let bytes = serde_json::to_vec(&body).unwrap().len() as u64;
    // The gateway's estimate: ceil(text bytes / 4) + max_tokens.
    let estimate = bytes.div_ceil(4) + 200;
    let fits = 1000 / estimate;
    assert!(fits >= 2, "estimate {estimate}");
    for _run in 0..2 {
        let (ptu, paygo) = (MockUpstream::start().await, MockUpstream::start().await);
        let providers = format!(
            "  ptu: {{ kind: azure_openai, endpoint: \"{}\", api_key: sk-ptu }}\n  paygo: {{ kind: azure_openai, endpoint: \"{}\", api_key: sk-paygo }}\n",
            ptu.url(),
            paygo.url()
        );
        let yaml = config(
            &providers,
            r#"
models:
  gpt-4o:
    strategy: priority
    deployments:
      - { provider: ptu, deployment: gpt-4o-ptu, priority: 0, tpm: 1000 }
      - { provider: paygo, deployment: gpt-4o-global, priority: 1, rpm: 3 }
"#,
        );
        let gw = Gateway::start(&yaml).await;
        let c = client();
        let minute = minute_now();
        let mut served = Vec::new();
        for _ in 0..(fits + 4) {
            served.push(send(&c, &gw, &body).await);
        }
        let view = admin(&gw).await;
        if minute_now() != minute {
            continue;
        }
        for (i, r) in served.iter().enumerate() {
            let want = if (i as u64) < fits {
                "ptu/gpt-4o-ptu"
            } else if (i as u64) < fits + 3 {
                "paygo/gpt-4o-global"
            } else {
                ""
            };
            if want.is_empty() {
                assert_eq!(r.status, 503, "request {i}: {}", r.text);
                assert_eq!(r.json()["error"]["code"], "no_deployment_available");
                assert!(r.header("retry-after").is_some());
            } else {
                r.served_by("gpt-4o", want);
            }
        }
        assert_eq!(ptu.request_count() as u64, fits);
        assert_eq!(paygo.request_count(), 3);
        let q = &dep(&view, "ptu/gpt-4o-ptu")["quota"];
        assert_eq!(q["tpm"], 1000);
        assert_eq!(q["tokens_this_minute"], fits * estimate, "{q}");
        assert_eq!(q["requests_this_minute"], fits);
        let q = &dep(&view, "paygo/gpt-4o-global")["quota"];
        assert_eq!(
            (&q["rpm"], &q["requests_this_minute"]),
            (&json!(3), &json!(3))
        );
        assert_eq!(q["tokens_this_minute"], 3 * estimate);
        return;
    }
    panic!("the minute turned during both runs");
}

/// `x-ratelimit-remaining-*` on a successful answer: a figure steers the next requests away
/// (counted down by each request sent until the upstream says again); Azure's `-1` is no
/// figure. Same wall-clock-minute rule as above.
#[tokio::test]
async fn x_ratelimit_remaining_is_learned_and_minus_one_ignored() {
    let body =
        json!({"model": "r", "max_tokens": 200, "messages": [{"role": "user", "content": "hi"}]});
    let estimate = (serde_json::to_vec(&body).unwrap().len() as u64).div_ceil(4) + 200;
    let limited = |headers: &[(&str, &str)]| Scripted::Respond {
        status: 200,
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        body: completion_json(),
    };
    for _run in 0..2 {
        let (a, b) = (MockUpstream::start().await, MockUpstream::start().await);
        let yaml = config(
            &(openai("a", &a) + &openai("b", &b)),
            r#"
models:
  r:
    strategy: priority
    deployments:
      - { provider: a, deployment: m, priority: 0 }
      - { provider: b, deployment: m, priority: 1 }
"#,
        );
        let gw = Gateway::start(&yaml).await;
        let c = client();
        let minute = minute_now();
        let mut got = Vec::new();
        let mut views = Vec::new();
        // -1 (Azure, some Responses calls): ignored, `a` keeps serving.
        a.script(limited(&[
            ("x-ratelimit-remaining-requests", "-1"),
            ("x-ratelimit-remaining-tokens", "-1"),
        ]));
        got.push(send(&c, &gw, &body).await);
        got.push(send(&c, &gw, &body).await);
        views.push(dep_state(&gw, "a/m").await);
        // One request left: it is taken, then `a` is skipped.
        a.script(limited(&[("x-ratelimit-remaining-requests", "1")]));
        got.push(send(&c, &gw, &body).await);
        views.push(dep_state(&gw, "a/m").await);
        got.push(send(&c, &gw, &body).await);
        got.push(send(&c, &gw, &body).await);
        views.push(dep_state(&gw, "a/m").await);
        if minute_now() != minute {
            continue;
        }
        let who: Vec<&str> = got.iter().map(Answer::deployment).collect();
        assert_eq!(who, ["a/m", "a/m", "a/m", "a/m", "b/m"]);
        assert_eq!(
            views[0]["quota"]["upstream_remaining_requests"],
            Value::Null
        );
        assert_eq!(views[0]["quota"]["upstream_remaining_tokens"], Value::Null);
        assert_eq!(views[1]["quota"]["upstream_remaining_requests"], 1);
        assert_eq!(views[2]["quota"]["upstream_remaining_requests"], 0);

        // Tokens: room for one more request of this size, not two.
        let room = (estimate + estimate / 2).to_string();
        b.script(limited(&[("x-ratelimit-remaining-tokens", &room)]));
        let before = b.request_count();
        let t = send(&c, &gw, &body).await;
        let u = send(&c, &gw, &body).await;
        let v = send(&c, &gw, &body).await;
        if minute_now() != minute {
            continue;
        }
        assert_eq!((t.deployment(), u.deployment()), ("b/m", "b/m"));
        assert_eq!(v.status, 503, "{}", v.text);
        assert_eq!(v.json()["error"]["code"], "no_deployment_available");
        assert_eq!(b.request_count(), before + 2);
        return;
    }
    panic!("the minute turned during both runs");
}

// ---------------------------------------------------------------------------------------------
// Cooldowns, the admin view and readiness.

#[tokio::test]
async fn allowed_fails_cool_a_deployment_down_then_exactly_one_probe_brings_it_back() {
    let (a, _b, gw) = primary_and_spare("allowed_fails: 2, cooldown: 1s").await;
    a.script(Scripted::server_error(500));
    a.script(Scripted::server_error(500));
    chat(&gw, "r").await.served_by("r", "b/m");
    let d = dep_state(&gw, "a/m").await;
    assert_eq!((&d["up"], &d["fails_in_row"]), (&json!(true), &json!(1)));
    chat(&gw, "r").await.served_by("r", "b/m");
    let d = dep_state(&gw, "a/m").await;
    assert_eq!((&d["up"], &d["fails_in_row"]), (&json!(false), &json!(2)));
    let left = d["cooling_down_seconds"].as_f64().unwrap();
    assert!(left > 0.0 && left <= 1.0, "{d}");
    chat(&gw, "r").await.served_by("r", "b/m");
    assert_eq!(a.request_count(), 2);
    assert_eq!(readyz(&gw).await.0, 200, "b is up");

    // The cooldown ends: up again, and the next request is the one probe.
    wait_dep(&gw, "a/m", |d| d["up"] == true, Duration::from_secs(4)).await;
    a.script(ok_after(800));
    let probe = tokio::spawn({
        let (c, url) = (client(), gw.url("/v1/chat/completions"));
        async move {
            let r = c.post(url).json(&chat_body("r")).send().await.unwrap();
            let who = r.headers()["x-switchyard-deployment"]
                .to_str()
                .unwrap()
                .to_string();
            (r.status().as_u16(), who)
        }
    });
    assert!(a.wait_in_flight(1, Duration::from_secs(5)).await);
    let d = dep_state(&gw, "a/m").await;
    assert_eq!(
        (&d["probing"], &d["up"], &d["in_flight"]),
        (&json!(true), &json!(false), &json!(1)),
        "{d}"
    );
    // While the probe is out, nothing else goes to `a`.
    for _ in 0..3 {
        chat(&gw, "r").await.served_by("r", "b/m");
    }
    assert_eq!(a.request_count(), 3);
    assert_eq!(probe.await.unwrap(), (200, "a/m".to_string()));
    let d = dep_state(&gw, "a/m").await;
    assert_eq!(
        (&d["up"], &d["probing"], &d["fails_in_row"]),
        (&json!(true), &json!(false), &json!(0))
    );
    assert!(d["latency_ms"].as_f64().unwrap() > 0.0);
    chat(&gw, "r").await.served_by("r", "a/m");
}

/// A refusal of the client's own request (a 400) says nothing of the deployment's health:
/// it neither counts nor resets its failures in a row, and a probe that gets one ends
/// without a verdict, so the next request probes again (a 400 reset the count and brought
/// a cooled deployment fully back, so one failing most requests stayed in rotation).
#[tokio::test]
async fn a_400_neither_counts_nor_resets_failures_nor_decides_a_probe() {
    let (a, _b, gw) = primary_and_spare("allowed_fails: 2, cooldown: 1s").await;
    let refusal = || Scripted::vllm_error(400, "temperature must be at most 2");
    a.script(Scripted::server_error(503));
    chat(&gw, "r").await.served_by("r", "b/m");
    a.script(refusal());
    let r = chat(&gw, "r").await;
    assert_eq!((r.status, r.deployment()), (400, "a/m"), "{}", r.text);
    assert_eq!(dep_state(&gw, "a/m").await["fails_in_row"], 1);
    a.script(Scripted::server_error(503));
    chat(&gw, "r").await.served_by("r", "b/m");
    let d = dep_state(&gw, "a/m").await;
    assert_eq!(
        (&d["up"], &d["fails_in_row"]),
        (&json!(false), &json!(2)),
        "{d}"
    );

    // The probe after the cooldown is refused: no verdict, the next request probes again,
    // and its failure cools the deployment down at once.
    wait_dep(&gw, "a/m", |d| d["up"] == true, Duration::from_secs(4)).await;
    a.script(refusal());
    let r = chat(&gw, "r").await;
    assert_eq!((r.status, r.deployment()), (400, "a/m"), "{}", r.text);
    let d = dep_state(&gw, "a/m").await;
    assert_eq!(
        (&d["probing"], &d["fails_in_row"]),
        (&json!(false), &json!(2)),
        "{d}"
    );
    a.script(Scripted::server_error(503));
    chat(&gw, "r").await.served_by("r", "b/m");
    let d = dep_state(&gw, "a/m").await;
    assert_eq!(
        d["up"], false,
        "the second probe failed: cooling down again: {d}"
    );
    assert_eq!(a.request_count(), 5);
}

#[tokio::test]
async fn admin_routes_shows_the_live_state_without_a_secret() {
    let a = MockUpstream::start().await;
    let yaml = format!(
        r#"
server: {{ admin_key: {ADMIN_KEY} }}
providers:
  a: {{ kind: openai, base_url: "{u}/v1", api_key: sk-upstream-very-secret }}
  az: {{ kind: azure_openai, endpoint: "{u}", api_key: azure-very-secret-key }}
  demo: {{ kind: mock, stream_chunks: 3 }}
models:
  r:
    strategy: least_latency
    retries: 1
    timeout: 30s
    fallbacks: [demo]
    content_filter_fallbacks: [demo]
    deployments:
      - {{ provider: a, deployment: m, model: gpt-4o-2024-08-06, weight: 2, tpm: 50000, rpm: 100 }}
      - {{ provider: az, deployment: eu, priority: 1 }}
  demo: {{ deployments: [ {{ provider: demo, deployment: demo }} ] }}
"#,
        u = a.url()
    );
    let gw = Gateway::start(&yaml).await;
    let c = client();
    let resp = c.get(gw.url("/admin/routes")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let resp = c
        .get(gw.url("/admin/routes"))
        .bearer_auth("sk-upstream-very-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    for _ in 0..4 {
        assert_eq!(chat(&gw, "r").await.status, 200);
    }
    let s = send(&c, &gw, &stream_body("demo")).await;
    s.served_by("demo", "demo/demo");

    let text = c
        .get(gw.url("/admin/routes"))
        .header("api-key", ADMIN_KEY)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for secret in [
        "sk-upstream-very-secret",
        "azure-very-secret-key",
        ADMIN_KEY,
    ] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
    let view: Value = serde_json::from_str(&text).unwrap();
    let r = &view["routes"][0];
    assert_eq!(r["route"], "r");
    assert_eq!(r["strategy"], "least_latency");
    assert_eq!(r["retries"], 1);
    assert_eq!(r["timeout_seconds"], 30.0);
    assert_eq!(r["fallbacks"], json!(["demo"]));
    assert_eq!(r["content_filter_fallbacks"], json!(["demo"]));
    assert_eq!(r["context_fallbacks"], json!([]));
    let d = dep(&view, "a/m");
    assert_eq!(d["provider"], "a");
    assert_eq!(d["kind"], "openai");
    assert_eq!(d["upstream"], "m");
    assert_eq!(d["model"], "gpt-4o-2024-08-06");
    assert_eq!(d["weight"], 2.0);
    assert_eq!(d["priority"], 0);
    assert_eq!(d["up"], true);
    assert_eq!(d["cooling_down_seconds"], Value::Null);
    assert_eq!(d["probing"], false);
    assert_eq!(d["fails_in_row"], 0);
    assert_eq!(d["in_flight"], 0);
    assert!(d["latency_ms"].as_f64().unwrap() > 0.0, "{d}");
    assert_eq!(d["quota"]["tpm"], 50000);
    assert_eq!(d["quota"]["rpm"], 100);
    let az = dep(&view, "az/eu");
    assert_eq!(
        (&az["kind"], &az["priority"]),
        (&json!("azure_openai"), &json!(1))
    );
    let sent = d["quota"]["requests_this_minute"].as_u64().unwrap()
        + az["quota"]["requests_this_minute"].as_u64().unwrap();
    // A minute may have turned between the requests and the view: never more than sent.
    assert!(sent <= 4, "{view}");
    let demo = dep(&view, "demo/demo");
    assert!(
        demo["time_to_first_token_ms"].as_f64().unwrap() > 0.0,
        "{demo}"
    );
}

/// Active health checks: a provider whose `/health` fails leaves rotation (even at priority 0)
/// and rejoins once it answers 2xx again. The check carries the provider's key, as its
/// requests do (an endpoint that wants it everywhere, Azure serverless's `/info`, answered
/// 401 to a check without it, and its deployments left rotation for good), and the log says
/// what the check got.
#[tokio::test]
async fn a_failing_health_check_takes_a_provider_out_of_rotation_and_back() {
    let primary = MockUpstream::start().await;
    let spare = MockUpstream::start().await;
    let cfg = format!(
        r#"
server: {{ admin_key: hc-admin }}
providers:
  primary: {{ kind: openai, base_url: "{p}/v1", api_key: sk-hc-primary, health_check: {{ path: /health, interval: 100ms, timeout: 1s }} }}
  spare: {{ kind: openai, base_url: "{s}/v1" }}
models:
  m:
    strategy: priority
    deployments:
      - {{ provider: primary, deployment: gpt-4o, priority: 0 }}
      - {{ provider: spare, deployment: gpt-4o, priority: 1 }}
"#,
        p = primary.url(),
        s = spare.url(),
    );
    let gw = Gateway::start(&cfg).await;
    let client = reqwest::Client::new();
    let ask = || async {
        let r = client
            .post(gw.url("/v1/chat/completions"))
            .json(
                &serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
            )
            .send()
            .await
            .unwrap();
        r.headers()["x-switchyard-deployment"]
            .to_str()
            .unwrap()
            .to_string()
    };
    // The mock has no /health: 404, so the primary goes out of rotation.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while ask().await != "spare/gpt-4o" {
        assert!(
            std::time::Instant::now() < deadline,
            "the failing check never took the primary out"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let checks: Vec<_> = primary
        .requests()
        .into_iter()
        .filter(|r| r.path == "/health" && r.method == "GET")
        .collect();
    assert!(
        !checks.is_empty(),
        "the check is GET {{origin}}/health, not under /v1"
    );
    for c in &checks {
        assert_eq!(c.header("authorization"), Some("Bearer sk-hc-primary"));
    }
    assert!(
        gw.logs().contains("healthy=false status=404"),
        "{}",
        gw.logs()
    );
    let routes: serde_json::Value = gw.get_json("/admin/routes", "hc-admin").await;
    assert_eq!(routes["routes"][0]["deployments"][0]["up"], false);
    // /health answers 200 from now on (each check takes one scripted answer).
    for _ in 0..200 {
        primary.script(Scripted::respond(200, ""));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while ask().await != "primary/gpt-4o" {
        assert!(
            std::time::Instant::now() < deadline,
            "the passing check never brought the primary back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `x-should-retry: false` (an account out of credit): the request fails over to another
/// deployment, but no deployment that already failed it is asked again.
#[tokio::test]
async fn a_deployment_that_says_a_retry_cannot_help_is_not_asked_again() {
    let (a, b) = (MockUpstream::start().await, MockUpstream::start().await);
    let providers = format!("{}{}", openai("a", &a), openai("b", &b));
    let yaml = config(
        &providers,
        r#"
routing: { allowed_fails: 100, retries: 3 }
models:
  r:
    strategy: priority
    deployments:
      - { provider: a, deployment: first, priority: 0 }
      - { provider: b, deployment: second, priority: 1 }
"#,
    );
    let gw = Gateway::start(&yaml).await;
    a.script(Scripted::insufficient_quota());
    chat(&gw, "r").await.served_by("r", "b/second");
    a.script(Scripted::insufficient_quota());
    b.script(Scripted::insufficient_quota());
    let r = chat(&gw, "r").await;
    assert_eq!(r.status, 429, "{}", r.text);
    assert_eq!(r.header("x-should-retry"), Some("false"));
    assert_eq!(
        (a.request_count(), b.request_count()),
        (2, 2),
        "each asked once"
    );
}

/// A Responses request continuing a stored response (`previous_response_id`) on a route of
/// several deployments: a deployment that does not hold it (400 `previous_response_not_found`)
/// is passed over for the others, whatever `retries` says, and counts nothing against it.
/// (The follow-up failed whenever the route picked another deployment than the first turn's.)
#[tokio::test]
async fn a_follow_up_response_is_looked_for_on_the_other_deployments() {
    let (a, b, c) = (
        MockUpstream::start().await,
        MockUpstream::start().await,
        MockUpstream::start().await,
    );
    let yaml = config(
        &(openai("a", &a) + &openai("b", &b) + &openai("c", &c)),
        r#"
routing: { retries: 0, allowed_fails: 1 }
models:
  multi:
    strategy: priority
    deployments:
      - { provider: a, deployment: m, priority: 0 }
      - { provider: b, deployment: m, priority: 1 }
      - { provider: c, deployment: m, priority: 2 }
"#,
    );
    let gw = Gateway::start(&yaml).await;
    let not_here = previous_response_not_found;
    let done = json!({"id": "resp_b2", "object": "response", "status": "completed", "model": "m",
        "output": [], "usage": {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7}})
    .to_string();
    a.script(not_here());
    b.script(Scripted::respond(200, done.clone()));
    let follow_up =
        json!({"model": "multi", "input": "and then?", "previous_response_id": "resp_b1"});
    let r = client()
        .post(gw.url("/v1/responses"))
        .json(&follow_up)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-switchyard-deployment"], "b/m");
    assert_eq!(
        (a.request_count(), b.request_count(), c.request_count()),
        (1, 1, 0)
    );
    // Held by none: the upstream's 400, each asked once; none of them cooled down.
    for up in [&a, &b, &c] {
        up.script(not_here());
    }
    let r = client()
        .post(gw.url("/v1/responses"))
        .json(&follow_up)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "previous_response_not_found", "{e}");
    assert_eq!(
        (a.request_count(), b.request_count(), c.request_count()),
        (2, 2, 1)
    );
    let (status, _) = readyz(&gw).await;
    assert_eq!(status, 200);
    // Any other 400 is the request's own: not tried elsewhere.
    a.script(Scripted::respond(
        400,
        json!({"error": {"message": "bad input", "type": "invalid_request_error", "code": "invalid_value"}}).to_string(),
    ));
    let r = client()
        .post(gw.url("/v1/responses"))
        .json(&follow_up)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        (a.request_count(), b.request_count(), c.request_count()),
        (3, 2, 1)
    );
}

/// A stored response is retrieved, cancelled, listed and deleted through the gateway: the
/// providers of the key's routes are asked in turn until one holds it (a 404 is "not here"),
/// with the provider's own key and path (Azure: `/openai/responses/{id}?api-version=`), the
/// client's query passed on. (Every such call was a 404 "unknown endpoint": a background
/// response could not be polled.)
#[tokio::test]
async fn stored_responses_are_looked_for_on_the_keys_providers() {
    let (a, b) = (MockUpstream::start().await, MockUpstream::start().await);
    let azure = format!(
        "  b: {{ kind: azure_openai, endpoint: \"{}\", api_key: sk-upstream-b, api_version: 2025-04-01-preview }}\n",
        b.url()
    );
    let yaml = config(
        &(openai("a", &a) + &azure + "  demo: { kind: mock }\n"),
        r#"
models:
  first: { deployments: [ { provider: demo }, { provider: a, deployment: m } ] }
  second: { deployments: [ { provider: a, deployment: m2 }, { provider: b, deployment: m } ] }
"#,
    );
    let gw = Gateway::start(&yaml).await;
    let not_found = || {
        Scripted::respond(
            404,
            json!({"error": {"message": "Response with id 'resp_b1' not found.", "type": "invalid_request_error",
                "param": null, "code": null}})
            .to_string(),
        )
    };
    let held = json!({"id": "resp_b1", "object": "response", "status": "completed", "output": [],
        "usage": {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7}})
    .to_string();
    // Retrieved: `a` (asked once, though two routes use it) has it not, `b` has it.
    a.script(not_found());
    b.script(Scripted::respond(200, held.clone()));
    let r = client()
        .get(gw.url("/v1/responses/resp_b1?include[]=reasoning.encrypted_content"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-switchyard-deployment"], "b/m");
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "completed");
    let asked = a.requests();
    assert_eq!(asked.len(), 1);
    assert_eq!(
        (asked[0].method.as_str(), asked[0].path.as_str()),
        ("GET", "/v1/responses/resp_b1")
    );
    assert_eq!(
        asked[0].header("authorization"),
        Some("Bearer sk-upstream-a")
    );
    let asked = b.requests();
    assert_eq!(asked[0].path, "/openai/responses/resp_b1");
    assert_eq!(
        asked[0].query.as_deref(),
        Some("api-version=2025-04-01-preview&include[]=reasoning.encrypted_content")
    );
    assert_eq!(asked[0].header("api-key"), Some("sk-upstream-b"));
    // Cancelled where it lives; a refusal there (400) is the answer, not asked further.
    a.script(Scripted::respond(
        400,
        json!({"error": {"message": "Only background responses can be cancelled.", "type": "invalid_request_error", "code": null}}).to_string(),
    ));
    let r = client()
        .post(gw.url("/v1/responses/resp_b1/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(b.request_count(), 1);
    assert_eq!(a.requests()[1].method, "POST");
    assert_eq!(a.requests()[1].path, "/v1/responses/resp_b1/cancel");
    // Its input items, and deleted.
    a.script(not_found());
    b.script(Scripted::respond(
        200,
        json!({"object": "list", "data": []}).to_string(),
    ));
    let r = client()
        .get(gw.url("/v1/responses/resp_b1/input_items?limit=5"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        b.requests()[1].path,
        "/openai/responses/resp_b1/input_items"
    );
    a.script(not_found());
    b.script(Scripted::respond(
        200,
        json!({"id": "resp_b1", "object": "response", "deleted": true}).to_string(),
    ));
    let r = client()
        .delete(gw.url("/v1/responses/resp_b1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(b.requests()[2].method, "DELETE");
    // Held by none: a 404 in the OpenAI shape.
    a.script(not_found());
    b.script(not_found());
    let r = client()
        .get(gw.url("/v1/responses/resp_b1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let e: Value = r.json().await.unwrap();
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not found"),
        "{e}"
    );
    // Not a response id: not sent anywhere, and a 404 (`input_tokens` and `compact` are
    // calls the gateway does not serve: they got a 405 naming GET and DELETE, and a GET was
    // sent upstream as a lookup).
    for (method, path) in [
        (reqwest::Method::GET, "/v1/responses/..%2Fmodels"),
        (reqwest::Method::POST, "/v1/responses/input_tokens"),
        (reqwest::Method::GET, "/v1/responses/input_tokens"),
        (reqwest::Method::POST, "/v1/responses/compact"),
    ] {
        let r = client().request(method, gw.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
    assert_eq!((a.request_count(), b.request_count()), (5, 4));
}

/// A follow-up's search leaves no cooldown probe claimed (a deployment due for its probe,
/// passed over because it does not hold the response, stayed "probing" until a restart and
/// served nothing more), and the holder's own error (busy: a 429) is the client's answer,
/// not the others' "not found" (a 400 the SDK does not retry).
#[tokio::test]
async fn a_follow_ups_search_leaves_no_probe_held_and_keeps_the_holders_error() {
    let (a, b) = (MockUpstream::start().await, MockUpstream::start().await);
    let yaml = config(
        &(openai("a", &a) + &openai("b", &b)),
        r#"
routing: { retries: 2, allowed_fails: 1 }
models:
  multi:
    strategy: priority
    deployments:
      - { provider: a, deployment: m, priority: 0 }
      - { provider: b, deployment: m, priority: 1 }
  pair:
    strategy: priority
    deployments:
      - { provider: b, deployment: p, priority: 0 }
      - { provider: a, deployment: p, priority: 1 }
"#,
    );
    let gw = Gateway::start(&yaml).await;
    let not_here = previous_response_not_found;
    let follow_up = |model: &str| json!({"model": model, "input": "and then?", "previous_response_id": "resp_x"});
    // `a` cools down for 0.5 s; `b` serves.
    a.script(Scripted::rate_limited(500));
    b.script(Scripted::respond(200, completion_json()));
    chat(&gw, "multi").await.served_by("multi", "b/m");
    tokio::time::sleep(Duration::from_millis(800)).await;
    // Its probe is due: the follow-up asks `a` (the probe), then `b`; neither holds it.
    a.script(not_here());
    b.script(not_here());
    let r = client()
        .post(gw.url("/v1/responses"))
        .json(&follow_up("multi"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // `a` is still asked, and its probe decides: back.
    a.script(Scripted::respond(200, completion_json()));
    chat(&gw, "multi").await.served_by("multi", "a/m");
    wait_dep(
        &gw,
        "a/m",
        |d| d["up"] == true && d["probing"] == false,
        Duration::from_secs(2),
    )
    .await;

    // `b` does not hold it; `a`, which does, is busy: its 429 (with its retry-after) is the
    // answer, and `b` is not asked again.
    b.script(not_here());
    a.script(Scripted::rate_limited(5000));
    let r = client()
        .post(gw.url("/v1/responses"))
        .json(&follow_up("pair"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().get("retry-after").is_some());
    assert_eq!(b.request_count(), 3);
}

/// OpenAI's answer to a follow-up (`previous_response_id`) a deployment does not hold.
fn previous_response_not_found() -> Scripted {
    Scripted::respond(
        400,
        json!({"error": {"message": "Previous response with id 'resp_x' not found.",
            "type": "invalid_request_error", "param": "previous_response_id",
            "code": "previous_response_not_found"}})
        .to_string(),
    )
}

/// A gateway with one route, `solo`, on one upstream.
async fn solo() -> (MockUpstream, Gateway) {
    let a = MockUpstream::start().await;
    let yaml = config(
        &openai("a", &a),
        r#"
models:
  solo: { deployments: [ { provider: a, deployment: solo } ] }
"#,
    );
    let gw = Gateway::start(&yaml).await;
    (a, gw)
}

/// A stored response made by a fallback of the key's route is found there too (the fallback
/// serves the key; its own fallbacks, which the key's requests never reach, are not asked),
/// and a provider refusing the call for reasons that say nothing of the
/// response (its key refused: 401; a method it does not serve: 405) does not end the search.
/// (The search stopped at the 401 and the client got it; a fallback's providers were not
/// asked.)
#[tokio::test]
async fn stored_responses_are_looked_for_past_refusals_and_on_fallbacks() {
    let (a, c, z) = (
        MockUpstream::start().await,
        MockUpstream::start().await,
        MockUpstream::start().await,
    );
    let yaml = config(
        &(openai("a", &a) + &openai("c", &c) + &openai("z", &z)),
        &format!(
            r#"
models:
  mine: {{ deployments: [ {{ provider: a, deployment: m }} ], fallbacks: [spare] }}
  spare: {{ deployments: [ {{ provider: c, deployment: m }} ], fallbacks: [beyond] }}
  beyond: {{ deployments: [ {{ provider: z, deployment: m }} ] }}
keys:
  - {{ name: app, key: "sha256:{}", models: [mine] }}
"#,
            gateway::sha256_hex("sk-stored")
        ),
    );
    let gw = Gateway::start(&yaml).await;
    let call = |method: reqwest::Method| {
        client()
            .request(method, gw.url("/v1/responses/resp_c1"))
            .bearer_auth("sk-stored")
            .send()
    };
    a.script(Scripted::respond(
        401,
        json!({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", "code": "invalid_api_key"}}).to_string(),
    ));
    c.script(Scripted::respond(
        200,
        json!({"id": "resp_c1", "object": "response", "status": "queued", "output": []})
            .to_string(),
    ));
    let r = call(reqwest::Method::GET).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-switchyard-route"], "spare");
    // Held nowhere, one provider refusing: the client gets the "not found".
    a.script(Scripted::respond(405, r#"{"detail":"Method Not Allowed"}"#));
    c.script(Scripted::respond(
        404,
        json!({"error": {"message": "Response with id 'resp_c1' not found.", "type": "invalid_request_error", "code": null}}).to_string(),
    ));
    let r = call(reqwest::Method::DELETE).await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!((a.request_count(), c.request_count()), (2, 2));
    // The fallback's own fallback, which no request of the key reaches, is never asked.
    assert_eq!(z.request_count(), 0);
    // Held nowhere, every provider refusing the gateway's key: a 502 that says so (the
    // SDK raised the upstream's 401 as `AuthenticationError` about the client's own key).
    for up in [&a, &c] {
        up.script(Scripted::respond(
            401,
            json!({"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}})
                .to_string(),
        ));
    }
    let r = call(reqwest::Method::GET).await.unwrap();
    assert_eq!(r.status(), 502);
    let e: Value = r.json().await.unwrap();
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("refused the gateway (401"),
        "{e}"
    );
}

/// A chat completion stored upstream (`store: true`) is retrieved, its messages listed and it
/// is deleted through the gateway, looked for as a stored response is. (Each was a 404
/// unknown endpoint; the completion could not be read back.)
#[tokio::test]
async fn stored_chat_completions_are_looked_for_on_the_keys_providers() {
    let (a, b) = (MockUpstream::start().await, MockUpstream::start().await);
    let azure = format!(
        "  b: {{ kind: azure_openai, endpoint: \"{}\", api_key: sk-upstream-b, api_version: 2025-04-01-preview }}\n",
        b.url()
    );
    let yaml = config(
        &(openai("a", &a) + &azure),
        r#"
models:
  first: { deployments: [ { provider: a, deployment: m } ] }
  second: { deployments: [ { provider: b, deployment: m } ] }
"#,
    );
    let gw = Gateway::start(&yaml).await;
    let not_found = || {
        Scripted::respond(
            404,
            json!({"error": {"message": "Completion with id 'chatcmpl-abc1' not found.", "type": "invalid_request_error", "code": null}}).to_string(),
        )
    };
    a.script(not_found());
    b.script(Scripted::respond(200, completion_json()));
    let r = client()
        .get(gw.url("/v1/chat/completions/chatcmpl-abc1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-switchyard-deployment"], "b/m");
    assert_eq!(a.requests()[0].path, "/v1/chat/completions/chatcmpl-abc1");
    assert_eq!(
        b.requests()[0].path,
        "/openai/chat/completions/chatcmpl-abc1"
    );
    a.script(Scripted::respond(
        200,
        json!({"object": "list", "data": []}).to_string(),
    ));
    let r = client()
        .get(gw.url("/v1/chat/completions/chatcmpl-abc1/messages?limit=2"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        a.requests()[1].path,
        "/v1/chat/completions/chatcmpl-abc1/messages"
    );
    assert_eq!(a.requests()[1].query.as_deref(), Some("limit=2"));
    a.script(Scripted::respond(
        200,
        json!({"object": "chat.completion.deleted", "id": "chatcmpl-abc1", "deleted": true})
            .to_string(),
    ));
    let r = client()
        .delete(gw.url("/v1/chat/completions/chatcmpl-abc1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(a.requests()[2].method, "DELETE");
    // An update (POST) is not served; nor is an id of another kind.
    let r = client()
        .post(gw.url("/v1/chat/completions/chatcmpl-abc1"))
        .json(&json!({"metadata": {"k": "v"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let r = client()
        .get(gw.url("/v1/chat/completions/resp_x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!((a.request_count(), b.request_count()), (3, 1));
    // Plain chat completions are as they were.
    a.script(Scripted::respond(200, completion_json()));
    chat(&gw, "first").await.served_by("first", "a/m");
}
