//! Usage, cost, budgets, rate limits and the ledger, black-box: the real binary, a recording
//! mock upstream, the ledger read back from SQLite and PostgreSQL after a clean shutdown.

#[path = "support/gateway.rs"]
mod gateway;
#[path = "support/upstream.rs"]
mod upstream;

use std::time::Duration;

use futures_util::future::join_all;
use futures_util::StreamExt;
use gateway::{not_near_a_minute_boundary, sha256_hex, Gateway};
use serde_json::{json, Value};
use switchyard::ledger::store::{LedgerRow, Store};
use upstream::{chat_chunk, sse, usage_chunk, MockUpstream, Scripted, StreamEnd};

const KEY: &str = "sk-cost-test";
const ADMIN: &str = "cost-admin";

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn post(gw: &Gateway, path: &str, body: Value) -> reqwest::Response {
    client()
        .post(gw.url(path))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// Stops the gateway cleanly (the ledger is flushed at shutdown) and reads every row.
async fn rows_after_shutdown(gw: &mut Gateway, url: &str) -> Vec<LedgerRow> {
    gw.signal("TERM");
    let status = gw
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("gateway exits");
    assert!(status.success(), "{}", gw.logs());
    let store = Store::open(url).await.unwrap();
    let rows = store.rows().await.unwrap();
    store.close().await;
    rows
}

/// `rows_after_shutdown` of the gateway's own SQLite ledger.
async fn sqlite_rows_after_shutdown(gw: &mut Gateway) -> Vec<LedgerRow> {
    let url = sqlite_url(gw);
    rows_after_shutdown(gw, &url).await
}

fn sqlite_url(gw: &Gateway) -> String {
    format!("sqlite://{}", gw.dir.path().join("switchyard.db").display())
}

fn config(up: &MockUpstream, extra: &str) -> String {
    format!(
        r#"
server: {{ admin_key: {ADMIN} }}
providers:
  up: {{ kind: openai, base_url: "{u}/v1" }}
  slow: {{ kind: mock, latency: 400ms, stream_chunks: 8 }}
models:
  gpt-4o:
    pricing: {{ input_per_1m: 2.50, cached_input_per_1m: 1.25, output_per_1m: 10.00 }}
    deployments: [ {{ provider: up, deployment: gpt-4o-up }} ]
  emb:
    pricing: {{ input_per_1m: 0.02, output_per_1m: 0 }}
    deployments: [ {{ provider: up, deployment: emb-up }} ]
  slow:
    pricing: {{ input_per_1m: 2.50, output_per_1m: 10.00 }}
    deployments: [ {{ provider: slow }} ]
routing: {{ allowed_fails: 100 }}
{extra}
"#,
        u = up.url()
    )
}

/// `config(up, tail)` with `routes` (YAML lines under `models:`) added to the others.
fn config_with_routes(up: &MockUpstream, routes: &str, tail: &str) -> String {
    config(up, tail).replace("routing:", &format!("{routes}routing:"))
}

/// The rows of `endpoint` as (status, cost, estimated) match `expected`, costs to 1e-12.
fn assert_rows(rows: &[LedgerRow], endpoint: &str, expected: &[(u16, f64, bool)]) {
    let got: Vec<(u16, f64, bool)> = rows
        .iter()
        .filter(|r| r.endpoint == endpoint)
        .map(|r| (r.status, r.cost_usd, r.estimated))
        .collect();
    assert_eq!(got.len(), expected.len(), "{got:?}");
    for ((status, cost, estimated), (s, c, e)) in got.iter().zip(expected) {
        assert_eq!((status, estimated), (s, e), "{got:?}");
        assert!((cost - c).abs() < 1e-12, "{got:?}");
    }
}

/// A chat completion that reports `prompt` and `completion` tokens.
fn answer_with_usage(prompt: u64, completion: u64) -> Scripted {
    Scripted::respond(
        200,
        json!({"id": "c", "object": "chat.completion", "created": 1, "model": "m",
               "choices": [{"index": 0, "message": {"role": "assistant", "content": "long"},
                            "finish_reason": "stop"}],
               "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                         "total_tokens": prompt + completion}})
        .to_string(),
    )
}

fn keys(extra_key_fields: &str) -> String {
    format!(
        "teams:\n  research: {{}}\nkeys:\n  - {{ name: app, key: \"sha256:{}\", team: research{extra_key_fields} }}\n",
        sha256_hex(KEY)
    )
}

fn usage_of(v: &Value) -> (u64, u64, u64) {
    let u = &v["usage"];
    (
        u["prompt_tokens"].as_u64().unwrap(),
        u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0),
        u["completion_tokens"].as_u64().unwrap(),
    )
}

fn cost(
    prompt: u64,
    cached: u64,
    completion: u64,
    input: f64,
    cached_price: f64,
    output: f64,
) -> f64 {
    ((prompt - cached) as f64 * input + cached as f64 * cached_price + completion as f64 * output)
        / 1e6
}

#[tokio::test]
async fn the_ledger_matches_the_upstreams_usage_to_the_micro_dollar() {
    let up = MockUpstream::start().await;
    let mut gw = Gateway::start(&config(&up, &keys(""))).await;
    let hello = json!([{"role": "user", "content": "Hello there, how are you today?"}]);
    let mut expected: Vec<(u64, u64, u64, f64)> = Vec::new();

    // Plain.
    let v: Value = post(
        &gw,
        "/v1/chat/completions",
        json!({"model": "gpt-4o", "messages": hello, "user": "alice"}),
    )
    .await
    .json()
    .await
    .unwrap();
    let (p, c, o) = usage_of(&v);
    expected.push((p, c, o, cost(p, c, o, 2.5, 1.25, 10.0)));

    // Streamed, the client asks for usage: it gets the usage chunk.
    let text = post(
        &gw,
        "/v1/chat/completions",
        json!({"model": "gpt-4o", "messages": hello, "stream": true,
        "stream_options": {"include_usage": true}}),
    )
    .await
    .text()
    .await
    .unwrap();
    let usage_event = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|v| v["usage"].is_object())
        .expect("the client asked for the usage chunk");
    let (p, c, o) = usage_of(&usage_event);
    expected.push((p, c, o, cost(p, c, o, 2.5, 1.25, 10.0)));

    // Streamed, the client does not ask: the gateway asks upstream and drops the chunk.
    let text = post(
        &gw,
        "/v1/chat/completions",
        json!({"model": "gpt-4o", "messages": hello, "stream": true}),
    )
    .await
    .text()
    .await
    .unwrap();
    assert!(
        !text.contains("\"usage\":{"),
        "the usage chunk reached a client that did not ask:\n{text}"
    );
    assert!(text.ends_with("data: [DONE]\n\n"));
    let sent: Value = up.requests().last().unwrap().json();
    assert_eq!(
        sent["stream_options"]["include_usage"], true,
        "the gateway asked upstream"
    );
    let p = upstream::prompt_tokens_for(upstream::messages_chars(&hello));
    expected.push((
        p,
        0,
        upstream::COMPLETION_TOKENS,
        cost(p, 0, upstream::COMPLETION_TOKENS, 2.5, 1.25, 10.0),
    ));

    // Cached prompt tokens at the cached price.
    up.script(Scripted::respond(200, json!({"id": "c", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100,
                  "prompt_tokens_details": {"cached_tokens": 400}}}).to_string()));
    let resp = post(
        &gw,
        "/v1/chat/completions",
        json!({"model": "gpt-4o", "messages": hello}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();
    expected.push((1000, 400, 100, 0.003));

    // A 500 that is retried: one row, for the answer that served.
    up.script(Scripted::server_error(500));
    let v: Value = post(
        &gw,
        "/v1/chat/completions",
        json!({"model": "gpt-4o", "messages": hello}),
    )
    .await
    .json()
    .await
    .unwrap();
    let (p, c, o) = usage_of(&v);
    expected.push((p, c, o, cost(p, c, o, 2.5, 1.25, 10.0)));

    // Embeddings.
    let v: Value = post(
        &gw,
        "/v1/embeddings",
        json!({"model": "emb", "input": ["one", "two"]}),
    )
    .await
    .json()
    .await
    .unwrap();
    let p = v["usage"]["prompt_tokens"].as_u64().unwrap();
    expected.push((p, 0, 0, p as f64 * 0.02 / 1e6));

    // A refusal of the request by the upstream costs nothing (Azure's content filter, which
    // Azure bills, excepted: `an_azure_content_filter_refusal_is_charged_for_its_prompt`).
    up.script(Scripted::vllm_error(400, "temperature must be at most 2"));
    let resp = post(
        &gw,
        "/v1/chat/completions",
        json!({"model": "gpt-4o", "messages": hello}),
    )
    .await;
    assert_eq!(resp.status(), 400);
    expected.push((0, 0, 0, 0.0));

    // An upstream that reports no usage: counted with the tokenizer, marked estimated.
    up.script(Scripted::respond(200, json!({"id": "c", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello world"}, "finish_reason": "stop"}]}).to_string()));
    let resp = post(
        &gw,
        "/v1/chat/completions",
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hello world"}]}),
    )
    .await;
    resp.bytes().await.unwrap();

    let rows = sqlite_rows_after_shutdown(&mut gw).await;
    assert_eq!(rows.len(), expected.len() + 1, "{rows:#?}");
    for (row, (p, c, o, usd)) in rows.iter().zip(&expected) {
        assert_eq!(
            (row.prompt_tokens, row.cached_tokens, row.completion_tokens),
            (*p, *c, *o),
            "{row:?}"
        );
        assert!(
            (row.cost_usd - usd).abs() < 1e-9,
            "cost {} != {usd}: {row:?}",
            row.cost_usd
        );
        assert!(!row.estimated);
        assert_eq!(&*row.key, "app");
        assert_eq!(&*row.team, "research");
    }
    assert_eq!(rows[0].user, "alice");
    assert_eq!(&*rows[0].deployment, "up/gpt-4o-up");
    assert_eq!(rows[6].status, 400);
    let est = rows.last().unwrap();
    assert!(est.estimated);
    assert_eq!(
        (est.prompt_tokens, est.completion_tokens),
        (2, 2),
        "o200k: `hello world` is two tokens"
    );
}

#[tokio::test]
async fn concurrent_requests_never_overspend_a_budget() {
    budget_holds_under_concurrency(false).await;
}

/// Given one core, the gateway runs its requests on the thread that drives the sockets
/// (no worker threads): the budget and the ledger hold as with a worker per core.
#[tokio::test]
async fn on_one_core_requests_run_on_one_thread_and_the_budget_still_holds() {
    budget_holds_under_concurrency(true).await;
}

async fn budget_holds_under_concurrency(one_core: bool) {
    let up = MockUpstream::start().await;
    // Worst case per request: ~20 prompt tokens × 2.5 + 1000 output × 10 ≈ 0.01 USD; the
    // budget holds about ten of them at once.
    let config = config(&up, &keys(", budget: { usd: 0.1, period: daily }"));
    let mut gw = if one_core {
        Gateway::start_on_one_core(&config).await
    } else {
        Gateway::start(&config).await
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let expected = if one_core || cores == 1 {
        "one thread"
    } else {
        "a worker per core"
    };
    // The log is written by a thread of its own: the line may come just after the port opens.
    let mut listening = None;
    for _ in 0..250 {
        listening = gw
            .logs()
            .lines()
            .find(|l| l.contains("switchyard listening"))
            .map(String::from);
        if listening.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let listening = listening.unwrap_or_else(|| panic!("no start line:\n{}", gw.logs()));
    assert!(listening.contains(expected), "{listening}");
    let body = json!({"model": "slow", "max_tokens": 1000, "messages": [{"role": "user", "content": "hi"}]});
    let results = join_all((0..50).map(|_| post(&gw, "/v1/chat/completions", body.clone()))).await;
    let mut ok = 0;
    let mut refused = 0;
    for r in results {
        match r.status().as_u16() {
            200 => {
                ok += 1;
                r.bytes().await.unwrap();
            }
            429 => {
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["error"]["code"], "budget_exceeded");
                refused += 1;
            }
            s => panic!("unexpected status {s}"),
        }
    }
    assert!((1..=10).contains(&ok), "{ok} admitted");
    assert_eq!(ok + refused, 50);
    let spend: Value = gw.get_json("/admin/spend?by=key", ADMIN).await;
    let budget = &spend["budgets"][0];
    assert_eq!(budget["budget"], "key:app");
    let rows = sqlite_rows_after_shutdown(&mut gw).await;
    let spent: f64 = rows.iter().map(|r| r.cost_usd).sum();
    assert!(spent <= 0.1, "spent {spent}");
    assert_eq!(rows.iter().filter(|r| r.status == 200).count(), ok);
    assert_eq!(rows.iter().filter(|r| r.status == 429).count(), refused);
}

#[tokio::test]
async fn max_parallel_and_rpm_refuse_with_openai_headers() {
    not_near_a_minute_boundary().await;
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&config(&up, &keys(", limits: { rpm: 6, max_parallel: 3 }"))).await;
    let body = json!({"model": "slow", "messages": [{"role": "user", "content": "hi"}]});
    let results = join_all((0..5).map(|_| post(&gw, "/v1/chat/completions", body.clone()))).await;
    let statuses: Vec<u16> = results.iter().map(|r| r.status().as_u16()).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        3,
        "{statuses:?}"
    );
    for r in results {
        if r.status() == 429 {
            assert!(r.headers().contains_key("retry-after"));
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["error"]["code"], "rate_limit_exceeded");
        }
    }
    // rpm 6: three used above; the refused ones took nothing. 2, 1, 0 left, then 429.
    let fast = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    let mut remaining = Vec::new();
    for _ in 0..3 {
        let r = post(&gw, "/v1/chat/completions", fast.clone()).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-ratelimit-limit-requests"], "6");
        remaining.push(
            r.headers()["x-ratelimit-remaining-requests"]
                .to_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(remaining, ["2", "1", "0"]);
    let r = post(&gw, "/v1/chat/completions", fast).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "0");
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait));
}

/// A route's own `limits:` (all keys together) and the key's apply to the same request: the
/// route's refuses first on its route, and what it admitted counts against the key too.
#[tokio::test]
async fn a_route_limit_and_the_key_limit_both_count_each_request() {
    not_near_a_minute_boundary().await;
    let up = MockUpstream::start().await;
    let cfg = format!(
        r#"
providers:
  up: {{ kind: openai, base_url: "{u}/v1" }}
models:
  capped:
    limits: {{ rpm: 3 }}
    deployments: [ {{ provider: up, deployment: gpt-4o-up }} ]
  open:
    deployments: [ {{ provider: up, deployment: gpt-4o-up }} ]
{keys}"#,
        u = up.url(),
        keys = keys(", limits: { rpm: 5 }")
    );
    let gw = Gateway::start(&cfg).await;
    // The statuses of `n` requests in a row to `model`.
    let statuses = |model: &'static str, n: usize| {
        let gw = &gw;
        async move {
            let body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
            let mut all = Vec::new();
            for _ in 0..n {
                let r = post(gw, "/v1/chat/completions", body.clone()).await;
                all.push(r.status().as_u16());
            }
            all
        }
    };
    assert_eq!(
        statuses("capped", 4).await,
        [200, 200, 200, 429],
        "the route's rpm 3"
    );
    // The key's rpm 5: three taken on `capped` (the refused one took nothing), two left.
    assert_eq!(
        statuses("open", 3).await,
        [200, 200, 429],
        "the key's rpm 5"
    );
    assert_eq!(up.request_count(), 5);
}

#[tokio::test]
async fn tokens_estimated_at_admission_are_corrected_by_real_usage() {
    not_near_a_minute_boundary().await;
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&config(&up, &keys(", limits: { tpm: 10000 }"))).await;
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    let text = body.to_string();
    let estimate = (text.len() as u64).div_ceil(4);
    up.script(Scripted::respond(200, json!({"id": "c", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 900, "completion_tokens": 100, "total_tokens": 1000}}).to_string()));
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .body(text.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["x-ratelimit-remaining-tokens"]
            .to_str()
            .unwrap(),
        (10000 - estimate).to_string()
    );
    r.bytes().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await; // settlement runs off the request path
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .body(text)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["x-ratelimit-remaining-tokens"]
            .to_str()
            .unwrap(),
        (10000 - 1000 - estimate).to_string(),
        "the first request's estimate was replaced by its 1000 real tokens"
    );
}

async fn restart_keeps_spend(ledger: Option<String>) {
    let up = MockUpstream::start().await;
    let state = ledger
        .as_ref()
        .map(|l| format!("state: {{ ledger: \"{l}\" }}\n"))
        .unwrap_or_default();
    let cfg = config(
        &up,
        &format!(
            "{state}{}",
            keys(", budget: { usd: 0.015, period: monthly }")
        ),
    );
    let mut gw = Gateway::start(&cfg).await;
    let url = ledger.clone().unwrap_or_else(|| sqlite_url(&gw));
    let costly = || {
        Scripted::respond(200, json!({"id": "c", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3600, "completion_tokens": 100, "total_tokens": 3700}}).to_string())
    };
    up.script(costly());
    let body = json!({"model": "gpt-4o", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]});
    let r = post(&gw, "/v1/chat/completions", body.clone()).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    let rows = rows_after_shutdown(&mut gw, &url).await;
    let spent = 3600.0 * 2.5 / 1e6 + 100.0 * 10.0 / 1e6; // 0.01
    assert!((rows.iter().map(|r| r.cost_usd).sum::<f64>() - spent).abs() < 1e-9);

    // Same folder, same ledger: the budget knows what was spent.
    let dir = gw.take_dir();
    drop(gw);
    let gw = Gateway::start_in(&cfg, dir).await;
    let spend: Value = gw.get_json("/admin/spend", ADMIN).await;
    let b = &spend["budgets"][0];
    assert!(
        (b["spent_usd"].as_f64().unwrap() - spent).abs() < 1e-9,
        "{spend}"
    );
    // `switchyard spend` reads the same ledger (for reading only) beside the serving gateway.
    let (ok, stdout, stderr) = spend_cli(gw.dir.path(), &gw.config_path(), JSON_BY_MODEL);
    assert!(ok, "{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["rows"][0]["requests"], 1, "{report}");
    // 0.01 spent + a worst case of ~0.001 fits 0.015 once; after its real cost (0.01) no more.
    up.script(costly());
    let r = post(&gw, "/v1/chat/completions", body.clone()).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = post(&gw, "/v1/chat/completions", body).await;
    assert_eq!(r.status(), 429, "{}", r.text().await.unwrap());
}

#[tokio::test]
async fn spend_survives_a_restart_with_sqlite() {
    restart_keeps_spend(None).await;
}

#[tokio::test]
async fn spend_survives_a_restart_with_postgresql() {
    spend_survives_a_restart_on_postgresql("").await;
}

/// The ledger on a PostgreSQL that is reached over TLS (`sslmode=require`, as managed
/// PostgreSQL services demand; the local server's certificate is Debian's self-signed one, so
/// not `verify-full`). Fails on a build without sqlx's TLS: "TLS upgrade required".
#[tokio::test]
async fn spend_survives_a_restart_with_postgresql_over_tls() {
    spend_survives_a_restart_on_postgresql("?sslmode=require").await;
}

async fn spend_survives_a_restart_on_postgresql(params: &str) {
    use sqlx::Connection;
    let admin_url = std::env::var("SWITCHYARD_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string());
    let db = format!("switchyard_test_{}_{}", std::process::id(), rand_suffix());
    let mut conn = sqlx::PgConnection::connect(&admin_url)
        .await
        .expect("PostgreSQL must run for this test (scripts/test starts it)");
    sqlx::raw_sql(&format!("CREATE DATABASE {db}"))
        .execute(&mut conn)
        .await
        .unwrap();
    let base = admin_url.rsplit_once('/').unwrap().0;
    restart_keeps_spend(Some(format!("{base}/{db}{params}"))).await;
    sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .execute(&mut conn)
        .await
        .unwrap();
}

/// A name part no other test of this process takes (a counter) nor an earlier run (the clock).
fn rand_suffix() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{n}_{nanos}")
}

#[tokio::test]
async fn spend_reports_agree_between_cli_and_admin_api_and_soft_budgets_alert_once() {
    let up = MockUpstream::start().await;
    let hook = MockUpstream::start().await;
    let extra = format!(
        "alerts: {{ webhook: \"{}/hook\" }}\n{}",
        hook.url(),
        keys(", budget: { usd: 10, soft_usd: 0.000001, period: daily }")
    );
    let mut gw = Gateway::start(&config(&up, &extra)).await;
    for _ in 0..3 {
        let r = post(
            &gw,
            "/v1/chat/completions",
            json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
        r.bytes().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(800)).await; // one flush interval and the webhook
    let api: Value = gw
        .get_json("/admin/spend?by=model&format=json", ADMIN)
        .await;
    let hooks = hook.requests();
    assert_eq!(hooks.len(), 1, "one soft-budget alert per period");
    let alert = hooks[0].json();
    assert_eq!(
        (
            alert["kind"].as_str(),
            alert["scope"].as_str(),
            alert["name"].as_str()
        ),
        (Some("soft"), Some("key"), Some("app"))
    );
    let _ = sqlite_rows_after_shutdown(&mut gw).await;
    let (ok, stdout, stderr) = spend_cli(gw.dir.path(), &gw.config_path(), JSON_BY_MODEL);
    assert!(ok, "{stderr}");
    let cli: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(cli["rows"], api["rows"]);
    assert_eq!(cli["rows"][0]["name"], "gpt-4o");
    assert_eq!(cli["rows"][0]["requests"], 3);
    let (_, table, _) = spend_cli(gw.dir.path(), &gw.config_path(), &["--by", "key"]);
    assert!(table.lines().any(|l| l.starts_with("app ")), "{table}");
}

/// A chat request to `gpt-4o` with `key` asking for at most `max_tokens`: (status, body).
async fn chat_as(gw: &Gateway, key: &str, max_tokens: u64) -> (u16, Value) {
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": "gpt-4o", "max_tokens": max_tokens,
                      "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// A request no wait lets through (a prompt estimate above the key's `tpm`, `rpm: 0`, a worst
/// case above the budget's whole `usd`) is told so, without a `retry-after` and with
/// OpenAI's `x-should-retry: false`: it was told to retry after the minute (or the period),
/// and the SDK did, twice, for over a minute, each attempt a 429 row.
#[tokio::test]
async fn a_request_no_wait_lets_through_is_told_not_to_retry() {
    let up = MockUpstream::start().await;
    let long = "word ".repeat(500);
    for (fields, max_tokens, code, kind, starts) in [
        (
            ", limits: { tpm: 100 }",
            10,
            "rate_limit_exceeded",
            "tokens",
            "Request too large for key:app on tokens per minute: limit 100",
        ),
        (
            ", limits: { rpm: 0 }",
            10,
            "rate_limit_exceeded",
            "requests",
            "key:app admits no requests (rpm: 0)",
        ),
        (
            ", budget: { usd: 0.01, period: daily }",
            4096,
            "budget_exceeded",
            "insufficient_quota",
            "Request too large for key:app: it could cost up to 0.04",
        ),
    ] {
        let gw = Gateway::start(&config(&up, &keys(fields))).await;
        let r = post(
            &gw,
            "/v1/chat/completions",
            json!({"model": "gpt-4o", "max_tokens": max_tokens,
                   "messages": [{"role": "user", "content": long}]}),
        )
        .await;
        assert_eq!(r.status(), 429, "{fields}");
        assert_eq!(r.headers()["x-should-retry"], "false", "{fields}");
        assert!(r.headers().get("retry-after").is_none(), "{fields}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(
            (e["error"]["code"].as_str(), e["error"]["type"].as_str()),
            (Some(code), Some(kind)),
            "{e}"
        );
        assert!(
            e["error"]["message"].as_str().unwrap().starts_with(starts),
            "{e}"
        );
        assert_eq!(up.request_count(), 0);
    }
}

/// A team's budget is shared by the team's keys and refuses them all; the global budget
/// holds for a key of no team; each refuses with `budget_exceeded` naming itself, and each
/// sends one hard alert per period (webhook and counter), not one per refusal.
#[tokio::test]
async fn team_and_global_budgets_refuse_and_alert_hard_once_per_period() {
    let up = MockUpstream::start().await;
    let hook = MockUpstream::start().await;
    // gpt-4o: 2.50 in, 10.00 out per 1M. A request's worst case is about its max_tokens ×
    // 10 / 1M: 1,000 → 0.01 USD, 100 → 0.001; one that alone is over a budget's whole `usd`
    // is refused otherwise (see `a_request_no_wait_lets_through_is_told_not_to_retry`).
    let extra = format!(
        r#"alerts: {{ webhook: "{hook}/hook" }}
budget: {{ usd: 0.05, period: daily }}
teams:
  research: {{ budget: {{ usd: 0.025, period: daily }} }}
keys:
  - {{ name: alice, key: "sha256:{alice}", team: research }}
  - {{ name: bob, key: "sha256:{bob}", team: research }}
  - {{ name: solo, key: "sha256:{solo}" }}
"#,
        hook = hook.url(),
        alice = sha256_hex("sk-alice"),
        bob = sha256_hex("sk-bob"),
        solo = sha256_hex("sk-solo"),
    );
    let gw = Gateway::start(&config(&up, &extra)).await;
    let refused_by = |(status, body): (u16, Value)| {
        assert_eq!(status, 429, "{body}");
        assert_eq!(body["error"]["code"], "budget_exceeded", "{body}");
        body["error"]["message"].as_str().unwrap().to_string()
    };
    // 0.02 of the team's 0.025 (and of the global 0.05) spent: an answer of 2,000 tokens.
    up.script(answer_with_usage(1, 2000));
    assert_eq!(chat_as(&gw, "sk-alice", 2000).await.0, 200);
    for key in ["sk-alice", "sk-bob"] {
        assert_eq!(
            chat_as(&gw, key, 100).await.0,
            200,
            "within the team's budget"
        );
        let message = refused_by(chat_as(&gw, key, 1000).await);
        assert!(
            message.starts_with("Budget exceeded for team:research:"),
            "{message}"
        );
        assert!(
            message.contains(" USD of its 0.025 USD daily budget is spent or reserved"),
            "{message}"
        );
    }
    // The key of no team is held by the global budget only: 0.02 more fits, 0.03 does not.
    assert_eq!(chat_as(&gw, "sk-solo", 2000).await.0, 200);
    let message = refused_by(chat_as(&gw, "sk-solo", 3000).await);
    assert!(
        message.starts_with("Budget exceeded for global:"),
        "{message}"
    );
    let message = refused_by(chat_as(&gw, "sk-solo", 3000).await);
    assert!(
        message.starts_with("Budget exceeded for global:"),
        "{message}"
    );

    // One hard alert per budget: one for the team's two refusals (of two keys), one for the
    // global budget's two.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while hook.requests().len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            hook.requests().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await; // no third one on its way
    let mut alerts: Vec<(String, String, String, f64)> = hook
        .requests()
        .iter()
        .map(|r| {
            let a = r.json();
            let text = |f: &str| a[f].as_str().unwrap_or_default().to_string();
            (
                text("kind"),
                text("scope"),
                text("name"),
                a["limit"].as_f64().unwrap(),
            )
        })
        .collect();
    alerts.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(
        alerts,
        vec![
            ("hard".into(), "global".into(), "global".into(), 0.05),
            ("hard".into(), "team".into(), "research".into(), 0.025),
        ]
    );
    let metrics = gw.metrics_text().await;
    for (scope, name) in [("global", "global"), ("team", "research")] {
        let line = format!(
            "switchyard_budget_alerts_total{{kind=\"hard\",name=\"{name}\",scope=\"{scope}\"}} 1"
        );
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
}

/// The per-key series of a deployment count each key's own requests, tokens and cost, as
/// the answers reported them: two keys of two teams on one deployment.
#[tokio::test]
async fn tokens_cost_and_requests_are_counted_per_key_and_team() {
    let up = MockUpstream::start().await;
    let extra = format!(
        "teams:\n  research: {{}}\n  ops: {{}}\nkeys:\n  - {{ name: alice, key: \"sha256:{}\", team: research }}\n  - {{ name: bob, key: \"sha256:{}\", team: ops }}\n",
        sha256_hex("sk-alice"),
        sha256_hex("sk-bob"),
    );
    let gw = Gateway::start(&config(&up, &extra)).await;
    let mut expected = std::collections::HashMap::new();
    for (key, n) in [("alice", 3), ("bob", 2), ("alice", 1)] {
        for _ in 0..n {
            let (status, answer) = chat_as(&gw, &format!("sk-{key}"), 50).await;
            assert_eq!(status, 200, "{answer}");
            let (prompt, cached, completion) = usage_of(&answer);
            let e = expected
                .entry(key)
                .or_insert((0u64, 0u64, 0u64, 0.0f64, 0u64));
            e.0 += prompt - cached;
            e.1 += cached;
            e.2 += completion;
            e.3 += cost(prompt, cached, completion, 2.5, 1.25, 10.0);
            e.4 += 1;
        }
    }
    for (key, team) in [("alice", "research"), ("bob", "ops")] {
        let (uncached, cached, completion, usd, requests) = expected[key];
        let at = [
            ("route", "gpt-4o"),
            ("deployment", "up/gpt-4o-up"),
            ("key", key),
            ("team", team),
        ];
        let metric = |name: &'static str, extra: Option<(&'static str, &'static str)>| {
            let mut labels = at.to_vec();
            labels.extend(extra);
            let gw = &gw;
            async move { gw.metric(name, &labels).await.unwrap_or(-1.0) }
        };
        assert_eq!(
            metric("switchyard_tokens_total", Some(("kind", "prompt"))).await,
            uncached as f64,
            "{key}"
        );
        assert_eq!(
            metric("switchyard_tokens_total", Some(("kind", "cached"))).await,
            cached as f64,
            "{key}"
        );
        assert_eq!(
            metric("switchyard_tokens_total", Some(("kind", "completion"))).await,
            completion as f64,
            "{key}"
        );
        let counted = metric("switchyard_cost_usd_total", None).await;
        assert!(
            (counted - usd).abs() < 1e-12,
            "{key}: {counted} against {usd}"
        );
        assert_eq!(
            metric("switchyard_requests_total", Some(("status", "200"))).await,
            requests as f64,
            "{key}"
        );
    }
}

/// A request of a known key refused before it is routed (a model unknown or not the key's,
/// a body that is not JSON or too large) has its ledger row, at no cost; a request with no
/// valid key has none (there is no one to put it to).
#[tokio::test]
async fn requests_refused_before_routing_have_ledger_rows_and_unknown_keys_none() {
    let up = MockUpstream::start().await;
    let yaml = config(&up, &keys(", models: [gpt-4o, emb]")).replace(
        &format!("server: {{ admin_key: {ADMIN} }}"),
        &format!("server: {{ admin_key: {ADMIN}, max_body: 1KiB }}"),
    );
    assert!(yaml.contains("max_body"));
    let mut gw = Gateway::start(&yaml).await;
    let send = |body: reqwest::Body, key: &'static str| {
        client()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let chat = |model: &str| {
        json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}).to_string()
    };
    let mut statuses = Vec::new();
    for (body, key) in [
        (chat("no-such-model"), KEY),
        (chat("slow"), KEY),
        ("{not json".to_string(), KEY),
        (chat(&"x".repeat(2000)), KEY),
        (chat("gpt-4o"), "sk-not-a-key"),
        (chat("gpt-4o"), KEY),
    ] {
        let r = send(body.into(), key).await.unwrap();
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses, [404, 403, 400, 413, 401, 200]);
    // The Azure shape names the route in the path, checked before the body is read.
    let r = client()
        .post(gw.url("/openai/deployments/slow/chat/completions?api-version=2024-10-21"))
        .header("api-key", KEY)
        .json(&json!({"messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        r.headers()
            .get("x-switchyard-route")
            .map(|v| v.to_str().unwrap()),
        Some("slow"),
        "a refused request names its configured route as the ledger row does"
    );
    let rows = sqlite_rows_after_shutdown(&mut gw).await;
    let mut got: Vec<(u16, String, String, String, f64)> = rows
        .iter()
        .map(|r| {
            (
                r.status,
                r.key.to_string(),
                r.route.to_string(),
                r.endpoint.to_string(),
                r.cost_usd,
            )
        })
        .collect();
    got.sort_by_key(|g| g.0);
    let row = |status: u16, route: &str, cost: f64| {
        (
            status,
            "app".to_string(),
            route.to_string(),
            "chat/completions".to_string(),
            cost,
        )
    };
    let served = got.iter().find(|g| g.0 == 200).map_or(0.0, |g| g.4);
    assert!(served > 0.0, "{got:?}");
    assert_eq!(
        got,
        [
            row(200, "gpt-4o", served),
            row(400, "unknown", 0.0),
            row(403, "slow", 0.0),
            row(403, "slow", 0.0),
            row(404, "unknown", 0.0),
            row(413, "unknown", 0.0),
        ]
    );
    assert!(rows.iter().all(|r| !r.request_id.is_empty()), "{rows:?}");
}

/// `switchyard spend` over a ledger of known rows: the window is `[--since, --until)` in
/// every time form, each grouping adds up its rows, and the three formats print the same
/// lines (CSV quoting a name with a comma, the table naming an empty one `-`).
#[tokio::test]
async fn spend_windows_groupings_and_formats_over_known_rows() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let cfg = dir.path().join("routes.yaml");
    std::fs::write(
        &cfg,
        format!(
            "state: {{ ledger: \"{url}\" }}\nproviders:\n  p: {{ kind: mock }}\nmodels:\n  m1: {{ deployments: [ {{ provider: p }} ] }}\n"
        ),
    )
    .unwrap();
    let at = |t: &str| {
        chrono::DateTime::parse_from_rfc3339(t)
            .unwrap()
            .timestamp_millis()
    };
    let row = |ts: &str,
               key: &str,
               team: &str,
               route: &str,
               deployment: &str,
               tokens: (u64, u64, u64),
               cost: f64,
               hit: bool| LedgerRow {
        ts_ms: at(ts),
        request_id: format!("req-{ts}"),
        key: key.into(),
        team: team.into(),
        route: route.into(),
        deployment: deployment.into(),
        provider: "p".into(),
        endpoint: "chat/completions".into(),
        status: 200,
        prompt_tokens: tokens.0,
        cached_tokens: tokens.1,
        completion_tokens: tokens.2,
        cost_usd: cost,
        cache_hit: hit,
        ..Default::default()
    };
    let store = Store::open(&url).await.unwrap();
    let mut rows = vec![
        row(
            "2026-10-31T23:59:59Z",
            "a",
            "t1",
            "m1",
            "p/x",
            (10, 0, 5),
            1.0,
            false,
        ),
        row(
            "2026-11-01T00:00:00Z",
            "a",
            "t1",
            "m1",
            "p/x",
            (20, 5, 10),
            2.0,
            false,
        ),
        row(
            "2026-11-01T12:00:00Z",
            "b",
            "t2",
            "m2",
            "p/y",
            (0, 0, 0),
            0.0,
            true,
        ),
        row(
            "2026-11-01T13:00:00Z",
            "b,c",
            "",
            "m1",
            "p/y",
            (1, 0, 1),
            0.25,
            false,
        ),
        row(
            "2026-11-02T00:00:00Z",
            "a",
            "t1",
            "m1",
            "p/x",
            (100, 0, 100),
            8.0,
            false,
        ),
    ];
    store.write(&mut rows).await.unwrap();
    store.close().await;

    let spend = |args: &[&str]| {
        let (ok, stdout, stderr) = spend_cli(dir.path(), &cfg, args);
        assert!(ok, "{stderr}");
        stdout
    };
    // 1 November, as a date, RFC 3339 times and Unix seconds: the day's three rows, not
    // the second before it nor the midnight after it.
    let day = "team,requests,prompt_tokens,cached_tokens,completion_tokens,cost_usd,cache_hits\n\
               t1,1,20,5,10,2.000000,0\n\
               ,1,1,0,1,0.250000,0\n\
               t2,1,0,0,0,0.000000,1\n";
    for (since, until) in [
        ("2026-11-01", "2026-11-02"),
        ("2026-11-01T00:00:00Z", "2026-11-01T23:59:59.999Z"),
        ("1793491200", "1793577600"),
    ] {
        let csv = spend(&[
            "--by", "team", "--since", since, "--until", until, "--format", "csv",
        ]);
        assert_eq!(csv, day, "{since} .. {until}");
    }
    // By key, all time, CSV: a name with a comma is quoted.
    let csv = spend(&["--by", "key", "--format", "csv"]);
    assert_eq!(
        csv,
        "key,requests,prompt_tokens,cached_tokens,completion_tokens,cost_usd,cache_hits\n\
         a,3,130,5,115,11.000000,0\n\
         \"b,c\",1,1,0,1,0.250000,0\n\
         b,1,0,0,0,0.000000,1\n"
    );
    // By deployment, JSON: the same sums, and the total.
    let json: Value =
        serde_json::from_str(&spend(&["--by", "deployment", "--format", "json"])).unwrap();
    assert_eq!(json["by"], "deployment");
    assert_eq!(json["total_cost_usd"], 11.25);
    let lines: Vec<(String, i64)> = json["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_string(),
                r["requests"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(lines, [("p/x".to_string(), 3), ("p/y".to_string(), 2)]);
    // By team, the table (the default format): an empty team is `-`, and a total line.
    let table = spend(&[
        "--by",
        "team",
        "--since",
        "2026-11-01",
        "--until",
        "2026-11-02",
    ]);
    let words: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        words,
        [
            vec![
                "team",
                "requests",
                "prompt",
                "cached",
                "completion",
                "cost",
                "(USD)"
            ],
            vec!["t1", "1", "20", "5", "10", "2.000000"],
            vec!["-", "1", "1", "0", "1", "0.250000"],
            vec!["t2", "1", "0", "0", "0", "0.000000"],
            vec!["total", "3", "21", "5", "11", "2.250000"],
        ],
        "{table}"
    );
}

/// One small chat request to `gpt-4o`, its answer read to the end.
async fn say_hi(gw: &Gateway) {
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    let r = post(gw, "/v1/chat/completions", body).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
}

/// `switchyard spend ARGS` in `dir` with `config`: (success, stdout, stderr).
/// The report most tests read: by model, as JSON.
const JSON_BY_MODEL: &[&str] = &["--by", "model", "--format", "json"];

fn spend_cli(
    dir: &std::path::Path,
    config: &std::path::Path,
    args: &[&str],
) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("spend")
        .args(args)
        .arg("--config")
        .arg(config)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn spend_reads_the_ledger_and_never_makes_one() {
    let up = MockUpstream::start().await;
    // A wrong folder (no gateway ever ran there): an error naming the file, and no new,
    // empty ledger that would report nothing.
    let elsewhere = tempfile::tempdir().unwrap();
    let cfg = elsewhere.path().join("routes.yaml");
    std::fs::write(&cfg, config(&up, "")).unwrap();
    let (ok, stdout, stderr) = spend_cli(elsewhere.path(), &cfg, JSON_BY_MODEL);
    assert!(!ok, "{stdout}");
    assert!(stderr.contains("no ledger at switchyard.db"), "{stderr}");
    assert!(!elsewhere.path().join("switchyard.db").exists());
    // A SQLite file that is not a ledger: said so, and left as it was.
    let other = elsewhere.path().join("other.db");
    rusqlite::Connection::open(&other)
        .unwrap()
        .execute_batch("CREATE TABLE notes (x)")
        .unwrap();
    std::fs::write(
        &cfg,
        format!(
            "state: {{ ledger: \"sqlite://{}\" }}\n{}",
            other.display(),
            config(&up, "")
        ),
    )
    .unwrap();
    let (ok, _, stderr) = spend_cli(elsewhere.path(), &cfg, JSON_BY_MODEL);
    assert!(!ok);
    assert!(stderr.contains("holds no switchyard table"), "{stderr}");
    let conn = rusqlite::Connection::open(&other).unwrap();
    let tables: i64 = conn
        .query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| r.get(0))
        .unwrap();
    assert_eq!(tables, 1, "nothing made in a file that is not a ledger");

    // Beside a serving gateway: its rows, read while it writes.
    let gw = Gateway::start(&config(&up, "")).await;
    for _ in 0..2 {
        say_hi(&gw).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await; // past one flush
    let (ok, stdout, stderr) = spend_cli(gw.dir.path(), &gw.config_path(), JSON_BY_MODEL);
    assert!(ok, "{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["rows"][0]["name"], "gpt-4o", "{report}");
    assert_eq!(report["rows"][0]["requests"], 2, "{report}");
    // A window with no rows totals 0, not -0 (a float sum of nothing).
    let (ok, stdout, stderr) = spend_cli(
        gw.dir.path(),
        &gw.config_path(),
        &["--until", "2020-01-01", "--format", "json"],
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains(r#""total_cost_usd":0.0"#), "{stdout}");
    assert!(stdout.contains(r#""rows":[]"#), "{stdout}");
    let (_, table, _) = spend_cli(gw.dir.path(), &gw.config_path(), &["--until", "2020-01-01"]);
    assert!(!table.contains("-0"), "{table}");
}

/// On PostgreSQL a report needs no more than `SELECT`: a role that may only read the ledger
/// gets it (making or migrating the tables first, it was refused: "permission denied for
/// schema public").
#[tokio::test]
async fn spend_reports_as_a_postgresql_role_that_may_only_read() {
    use sqlx::Connection;
    let admin_url = std::env::var("SWITCHYARD_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string());
    let suffix = format!("{}_{}", std::process::id(), rand_suffix());
    let (db, role) = (
        format!("switchyard_ro_{suffix}"),
        format!("reporter_{suffix}"),
    );
    let mut admin = sqlx::PgConnection::connect(&admin_url)
        .await
        .expect("PostgreSQL must run for this test (scripts/test starts it)");
    for sql in [
        format!("CREATE DATABASE {db}"),
        format!("CREATE ROLE {role} LOGIN"),
    ] {
        sqlx::raw_sql(&sql).execute(&mut admin).await.unwrap();
    }
    let base = admin_url.rsplit_once('/').unwrap().0;
    let up = MockUpstream::start().await;
    let mut gw = Gateway::start(&config(
        &up,
        &format!("state: {{ ledger: \"{base}/{db}\" }}\n"),
    ))
    .await;
    say_hi(&gw).await;
    let rows = rows_after_shutdown(&mut gw, &format!("{base}/{db}")).await;
    assert_eq!(rows.len(), 1);
    let mut owner = sqlx::PgConnection::connect(&format!("{base}/{db}"))
        .await
        .unwrap();
    sqlx::raw_sql(&format!(
        "GRANT SELECT ON requests, ledger_schema TO {role}"
    ))
    .execute(&mut owner)
    .await
    .unwrap();
    owner.close().await.unwrap();
    // The reporter's URL: the admin's with the role's name instead.
    let (scheme, rest) = base.split_once("://").unwrap();
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let cfg = gw.dir.path().join("reporter.yaml");
    std::fs::write(
        &cfg,
        config(
            &up,
            &format!("state: {{ ledger: \"{scheme}://{role}@{host}/{db}\" }}\n"),
        ),
    )
    .unwrap();
    let (ok, stdout, stderr) = spend_cli(gw.dir.path(), &cfg, JSON_BY_MODEL);
    for sql in [
        format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
        format!("DROP ROLE IF EXISTS {role}"),
    ] {
        sqlx::raw_sql(&sql).execute(&mut admin).await.unwrap();
    }
    assert!(ok, "{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["rows"][0]["requests"], 1, "{report}");
}

/// A streamed chat answer of `words` content events (` word` each, ~190 bytes of SSE), then
/// (with `usage`) the usage chunk and `[DONE]`, which come `end_after_ms` later.
fn long_stream(words: usize, usage: bool, end_after_ms: u64) -> Scripted {
    let mut body = chat_chunk(Some("assistant"), Some(""), None);
    for _ in 0..words {
        body.push_str(&chat_chunk(None, Some(" word"), None));
    }
    let mut end = chat_chunk(None, None, Some("stop"));
    if usage {
        end.push_str(&usage_chunk(3, words as u64));
    }
    end.push_str("data: [DONE]\n\n");
    Scripted::stream(&[(0, &body), (end_after_ms, &end)], StreamEnd::Finish)
}

async fn stream_chat(gw: &Gateway) -> usize {
    let body = json!({"model": "gpt-4o", "stream": true,
        "messages": [{"role": "user", "content": "hello world"}]});
    let r = post(gw, "/v1/chat/completions", body).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap().len()
}

/// A figure of the gateway's /proc status, in KiB (`VmRSS`, `VmHWM`: the peak).
fn status_kib(gw: &Gateway, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", gw.pid())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// What `work` gives, and how far the gateway's peak RSS rose above its RSS before it (MiB).
async fn peak_growth_mib<T>(gw: &Gateway, work: impl std::future::Future<Output = T>) -> (T, u64) {
    let before = status_kib(gw, "VmRSS");
    let out = work.await;
    (out, status_kib(gw, "VmHWM").saturating_sub(before) / 1024)
}

/// An embeddings request for `input`; the answer's length.
async fn embed(gw: &Gateway, input: &str) -> usize {
    let r = post(
        gw,
        "/v1/embeddings",
        json!({"model": "emb", "input": input}),
    )
    .await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap().len()
}

/// Lines may end in `\r` alone, or in a mix of endings (the SSE rule the SDKs follow): the
/// usage chunk the gateway asked for is still found as its own event, so a client that did
/// not ask for usage never sees it, and the row has the upstream's usage, not an estimate.
#[tokio::test]
async fn streams_with_any_line_endings_are_read_for_usage_and_lose_the_extra_chunk() {
    let up = MockUpstream::start().await;
    let mut gw = Gateway::start(&config(&up, "")).await;
    let framings: [(&str, &str); 4] = [
        ("bare CR", "\r\r"),
        ("LF then CRLF", "\n\r\n"),
        ("CRLF then LF", "\r\n\n"),
        ("CR then CRLF", "\r\r\n"),
    ];
    for (i, (name, end)) in framings.iter().enumerate() {
        let frame = |e: String| e.replace("\n\n", end);
        let completion = 10 + i as u64;
        // The usage chunk arrives in the same write as the last content chunk.
        let writes = [
            frame(chat_chunk(Some("assistant"), Some(""), None))
                + &frame(chat_chunk(None, Some("Hi"), None)),
            frame(chat_chunk(None, None, Some("stop")))
                + &frame(usage_chunk(7, completion))
                + &frame("data: [DONE]\n\n".to_string()),
        ];
        let refs: Vec<(u64, &str)> = writes.iter().map(|w| (5, w.as_str())).collect();
        up.script(Scripted::stream(&refs, StreamEnd::Finish));
        let body = json!({"model": "gpt-4o", "stream": true,
            "messages": [{"role": "user", "content": name}]});
        let r = post(&gw, "/v1/chat/completions", body).await;
        assert_eq!(r.status(), 200, "{name}");
        let text = r.text().await.unwrap();
        assert!(text.contains("\"Hi\""), "{name}: {text:?}");
        assert!(!text.contains("\"usage\":{"), "{name}: {text:?}");
        assert!(text.contains("[DONE]"), "{name}: {text:?}");
        let sent = up.requests().last().unwrap().json();
        assert_eq!(sent["stream_options"]["include_usage"], true, "{sent}");
    }
    let rows = sqlite_rows_after_shutdown(&mut gw).await;
    let got: Vec<(u64, u64, bool)> = rows
        .iter()
        .map(|r| (r.prompt_tokens, r.completion_tokens, r.estimated))
        .collect();
    assert_eq!(
        got,
        [
            (7, 10, false),
            (7, 11, false),
            (7, 12, false),
            (7, 13, false)
        ]
    );
}

/// `"stream_options": null` (some clients send every option, unset ones as null) is a
/// stream that did not ask for usage: the upstream is asked, the client does not get it.
#[tokio::test]
async fn stream_options_null_is_asked_for_usage_like_none() {
    let up = MockUpstream::start().await;
    let mut gw = Gateway::start(&config(&up, "")).await;
    up.script(long_stream(3, true, 0));
    let body = json!({"model": "gpt-4o", "stream": true, "stream_options": null,
        "messages": [{"role": "user", "content": "hi"}]});
    let r = post(&gw, "/v1/chat/completions", body).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(!text.contains("\"usage\":{"), "{text}");
    let sent = up.requests().last().unwrap().json();
    assert_eq!(
        sent["stream_options"],
        json!({"include_usage": true}),
        "{sent}"
    );
    let rows = sqlite_rows_after_shutdown(&mut gw).await;
    let row = rows.last().unwrap();
    assert_eq!(
        (row.prompt_tokens, row.completion_tokens, row.estimated),
        (3, 3, false)
    );
}

/// A stream past what is kept whole (~380 KB of events) from an upstream that sends no
/// usage: its text, read in parts as it went, is counted whole.
#[tokio::test]
async fn a_long_stream_without_usage_is_estimated_from_all_of_its_text() {
    let up = MockUpstream::start().await;
    let mut gw = Gateway::start(&config(&up, "")).await;
    up.script(long_stream(2_000, false, 0));
    assert!(stream_chat(&gw).await > 300_000);
    let rows = sqlite_rows_after_shutdown(&mut gw).await;
    let row = rows.last().unwrap();
    assert!(row.estimated, "{row:?}");
    assert_eq!(row.completion_tokens, 2_000, "each ` word` once: {row:?}");
}

/// An answer without usage whose text is one long run of a letter is estimated in moments
/// (counted whole, 300 KB of it held the gateway's thread for minutes), while another
/// request is served.
#[tokio::test]
async fn a_long_run_of_one_letter_is_estimated_without_holding_the_gateway() {
    let up = MockUpstream::start().await;
    let mut gw = Gateway::start(&config(&up, "")).await;
    let text = "x".repeat(300_000);
    let answer = json!({"id": "c", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
        "finish_reason": "stop"}]});
    up.script(Scripted::respond(200, answer.to_string()));
    let chat = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    let r = post(&gw, "/v1/chat/completions", chat.clone()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().len(), answer.to_string().len());
    let r = post(&gw, "/v1/chat/completions", chat).await;
    assert_eq!(r.status(), 200);
    let rows = sqlite_rows_after_shutdown(&mut gw).await;
    assert!(
        rows[0].estimated && rows[0].completion_tokens > 0,
        "{:?}",
        rows[0]
    );
}

/// Many long streams at once (12 of ~3 MB, the usage at the end as OpenAI sends it): the
/// gateway keeps each one's text for a possible estimate, not its events. Held whole, they
/// were 36 MB more at the peak (54 MiB grown in all, against 20-22 now: the rest is the
/// connections' buffers, the same either way).
#[tokio::test]
async fn long_streams_are_not_held_whole_in_memory() {
    const STREAMS: usize = 12;
    const WORDS: usize = 16_000;
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&config(&up, "")).await;
    for _ in 0..STREAMS {
        // The end comes later, so all of them are open, their words passed, at once.
        up.script(long_stream(WORDS, true, 1_500));
    }
    let (sizes, grew_mib) =
        peak_growth_mib(&gw, join_all((0..STREAMS).map(|_| stream_chat(&gw)))).await;
    assert!(sizes.iter().all(|&n| n > WORDS * 150), "{sizes:?}");
    assert!(
        grew_mib < 36,
        "peak RSS grew {grew_mib} MiB for {STREAMS} streams"
    );
}

/// A large JSON answer (a batch of embeddings: one 40 MB base64 vector here) is held once
/// while it passes, for its usage at the end: kept as it came and then joined, it was held
/// twice at the end (the gateway's peak RSS grew by twice its size).
#[tokio::test]
async fn a_large_json_answer_is_held_once() {
    const SIZE: usize = 40 << 20;
    let up = MockUpstream::start().await;
    let mut gw = Gateway::start(&config(&up, "")).await;
    let answer = json!({"object": "list", "model": "emb-up",
        "data": [{"object": "embedding", "index": 0, "embedding": "A".repeat(SIZE)}],
        "usage": {"prompt_tokens": 7, "total_tokens": 7}});
    up.script(Scripted::respond(200, answer.to_string()));
    let (len, grew_mib) = peak_growth_mib(&gw, embed(&gw, "hi")).await;
    assert!(len > SIZE);
    assert!(
        grew_mib < 60,
        "peak RSS grew {grew_mib} MiB for a 40 MiB answer"
    );
    let rows = sqlite_rows_after_shutdown(&mut gw).await;
    let row = rows.last().unwrap();
    assert_eq!((row.prompt_tokens, row.estimated), (7, false), "{row:?}");
}

/// A large batch of float vectors from an upstream that reports no usage (some self-hosted
/// embedding servers): the input is counted, and the answer is not parsed into a JSON tree
/// (two million numbers: ~16 MB of text, a tree of several times that; the peak RSS grew
/// by more than 100 MiB when it was).
#[tokio::test]
async fn a_large_embeddings_answer_without_usage_is_not_parsed_whole() {
    let up = MockUpstream::start().await;
    let mut gw = Gateway::start(&config(&up, "")).await;
    let vector = vec!["0.0123456"; 2_000_000].join(",");
    let answer = format!(
        r#"{{"object":"list","model":"emb-up","data":[{{"object":"embedding","index":0,"embedding":[{vector}]}}]}}"#
    );
    // A small one first: the tokenizer's tables (~27 MiB, loaded once) are not the answer's.
    let small = r#"{"object":"list","model":"emb-up","data":[{"object":"embedding","index":0,"embedding":[0.1]}]}"#;
    up.script(Scripted::respond(200, small));
    embed(&gw, "hi").await;
    up.script(Scripted::respond(200, answer));
    let (len, grew_mib) = peak_growth_mib(&gw, embed(&gw, "hello world")).await;
    assert!(len > 19_000_000);
    assert!(
        grew_mib < 40,
        "peak RSS grew {grew_mib} MiB for a 19 MB answer"
    );
    let rows = sqlite_rows_after_shutdown(&mut gw).await;
    let row = rows.last().unwrap();
    assert_eq!(
        (row.prompt_tokens, row.completion_tokens, row.estimated),
        (2, 0, true),
        "o200k: `hello world` is two tokens: {row:?}"
    );
}

#[tokio::test]
async fn under_a_budget_a_request_without_max_tokens_gets_the_reserved_cap_upstream() {
    let up = MockUpstream::start().await;
    let extra = format!("{}\n", keys(", budget: { usd: 5, period: daily }"));
    let cfg = config(&up, &extra).replace(
        "  gpt-4o:\n    pricing:",
        "  gpt-4o:\n    max_output_tokens: 300\n    pricing:",
    );
    let gw = Gateway::start(&cfg).await;
    let r = post(
        &gw,
        "/v1/chat/completions",
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    let sent = up.requests()[0].json();
    assert_eq!(
        sent["max_tokens"], 300,
        "the cap the reservation assumed goes upstream"
    );
    // A client's own cap is left alone.
    let r = post(&gw, "/v1/chat/completions", json!({"model": "gpt-4o", "max_tokens": 7, "messages": [{"role": "user", "content": "hi"}]})).await;
    r.bytes().await.unwrap();
    let sent = up.requests()[1].json();
    assert_eq!(sent["max_tokens"], 7);
    assert!(sent.get("max_completion_tokens").is_none());

    // A deployment whose output is free (self-hosted, no price) takes the request as the
    // client wrote it: a cap protects nothing there, and a small-context server (vLLM with
    // `--max-model-len 4096`) refused the 4096 added to a prompt with a context-length error,
    // which sent every budgeted request to a paid `context_fallbacks` route. Not believed
    // past a cap either (it sent none): its usage is taken as reported.
    up.script(answer_with_usage(9, 5000));
    let r = post(
        &gw,
        "/v1/chat/completions",
        json!({"model": "emb", "messages": [{"role": "user", "content": "hi"}], "n_predict": -1}),
    )
    .await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    let sent = up.requests()[2].json();
    assert!(sent.get("max_tokens").is_none(), "{sent}");
    assert_eq!(sent["n_predict"], -1, "{sent}");

    // Without a budget, nothing is added.
    let up2 = MockUpstream::start().await;
    let gw2 = Gateway::start(&config(&up2, &keys(""))).await;
    let r = post(
        &gw2,
        "/v1/chat/completions",
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    r.bytes().await.unwrap();
    assert!(up2.requests()[0].json().get("max_tokens").is_none());
}

/// A cap that caps nothing upstream bounds no reservation: `"max_tokens": null` (what the
/// Python SDK sends for `max_tokens=None`) gets the reserved cap in its place (it went out
/// as `null`, the upstream generating without limit against a 4096-token reservation), a
/// cap field of another endpoint (`max_output_tokens` on a chat) is not taken for the
/// chat's (it reserved for 1 token and capped nothing), and a reasoning deployment's
/// `null` `max_tokens` becomes the `max_completion_tokens` such models take.
#[tokio::test]
async fn a_null_or_foreign_cap_field_gets_the_reserved_cap_upstream() {
    let up = MockUpstream::start().await;
    let extra = format!("{}\n", keys(", budget: { usd: 5, period: daily }"));
    let routes = "  o3:\n    pricing: { input_per_1m: 2, output_per_1m: 8 }\n    max_output_tokens: 250\n    deployments: [ { provider: up, deployment: o3-mini } ]\n";
    let cfg = config_with_routes(&up, routes, &extra).replace(
        "  gpt-4o:\n    pricing:",
        "  gpt-4o:\n    max_output_tokens: 300\n    pricing:",
    );
    let gw = Gateway::start(&cfg).await;
    let send = |body: &'static str| {
        client()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    for body in [
        r#"{"model":"gpt-4o","max_tokens":null,"messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"model":"gpt-4o","max_tokens" : null ,"messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"model":"gpt-4o","max_output_tokens":1,"messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"model":"o3","max_tokens":null,"messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"model":"o3","max_completion_tokens":null,"messages":[{"role":"user","content":"hi"}]}"#,
        // Both `null`: the one the deployment takes gets the cap, the other goes.
        r#"{"model":"o3","max_tokens":null,"max_completion_tokens":null,"messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"model":"gpt-4o","max_tokens":null,"messages":[{"role":"user","content":"hi"}],"max_completion_tokens" : null }"#,
    ] {
        let r = send(body).await.unwrap();
        assert_eq!(r.status(), 200, "{body}");
        r.bytes().await.unwrap();
    }
    let sent: Vec<String> = up
        .requests()
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect();
    assert_eq!(
        sent[0],
        r#"{"model":"gpt-4o-up","max_tokens":300,"messages":[{"role":"user","content":"hi"}]}"#
    );
    assert_eq!(
        sent[1],
        r#"{"model":"gpt-4o-up","max_tokens" : 300 ,"messages":[{"role":"user","content":"hi"}]}"#
    );
    let third: Value = serde_json::from_str(&sent[2]).unwrap();
    assert_eq!(
        (&third["max_tokens"], &third["max_output_tokens"]),
        (&json!(300), &json!(1)),
        "{}",
        sent[2]
    );
    assert_eq!(
        sent[3],
        r#"{"model":"o3-mini","max_completion_tokens":250,"messages":[{"role":"user","content":"hi"}]}"#
    );
    assert_eq!(
        sent[4],
        r#"{"model":"o3-mini","max_completion_tokens":250,"messages":[{"role":"user","content":"hi"}]}"#
    );
    assert_eq!(
        sent[5],
        r#"{"model":"o3-mini","max_completion_tokens":250,"messages":[{"role":"user","content":"hi"}]}"#
    );
    assert_eq!(
        sent[6],
        r#"{"model":"gpt-4o-up","max_tokens":300,"messages":[{"role":"user","content":"hi"}] }"#
    );
}

/// Legacy completions with `best_of` make (and bill) `best_of` answers upstream, whatever
/// `n` returns: the reservation counts them (it counted `n` only).
#[tokio::test]
async fn completions_reserve_for_every_answer_made_best_of_and_batches() {
    let up = MockUpstream::start().await;
    // 1,000 output tokens at 10 USD per 1M: 0.01 per answer made.
    let gw = Gateway::start(&config(
        &up,
        &keys(", budget: { usd: 0.03, period: daily }"),
    ))
    .await;
    let completion = |extra: Value| {
        let mut body = json!({"model": "gpt-4o", "prompt": "hi", "max_tokens": 1000});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    let r = post(&gw, "/v1/completions", completion(json!({"best_of": 5}))).await;
    assert_eq!(r.status(), 429, "5 answers of up to 1,000 tokens: 0.05 USD");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "budget_exceeded");
    assert!(up.requests().is_empty());
    let r = post(
        &gw,
        "/v1/completions",
        completion(json!({"best_of": 2, "n": 1})),
    )
    .await;
    assert_eq!(r.status(), 200, "2 answers: 0.02 USD fits");
    r.bytes().await.unwrap();
    // A batch of prompts is answered prompt by prompt: 3 strings (or token arrays) with
    // `best_of: 2` are 6 answers, 0.06; one array of tokens is one prompt.
    for batch in [json!(["a", "b", "c"]), json!([[1, 2], [3], [4, 5]])] {
        let r = post(
            &gw,
            "/v1/completions",
            completion(json!({"prompt": batch, "best_of": 2})),
        )
        .await;
        assert_eq!(r.status(), 429, "{batch}: 6 answers, 0.06 USD");
    }
    assert_eq!(up.requests().len(), 1);
    let r = post(
        &gw,
        "/v1/completions",
        completion(json!({"prompt": [1, 2, 3], "max_tokens": 500})),
    )
    .await;
    assert_eq!(r.status(), 200, "one prompt of tokens: 0.005 USD fits");
    r.bytes().await.unwrap();
}

/// An upstream that compresses its answer though asked not to: the answer reaches the
/// client as sent and is not read, and its row counts the prompt that was sent, marked
/// estimated, so a budget sees the request (it cost 0, and was not marked).
#[tokio::test]
async fn a_compressed_answer_counts_its_prompt_as_an_estimate() {
    let up = MockUpstream::start().await;
    let mut gw = Gateway::start(&config(&up, &keys(""))).await;
    up.script(Scripted::Respond {
        status: 200,
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("content-encoding".into(), "gzip".into()),
        ],
        body: "\u{1f}compressed".into(),
    });
    let r = post(
        &gw,
        "/v1/chat/completions",
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hello world, how are you"}]}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-encoding"], "gzip");
    assert_eq!(r.text().await.unwrap(), "\u{1f}compressed");
    let rows = sqlite_rows_after_shutdown(&mut gw).await;
    let row = &rows[0];
    assert!(
        row.estimated && row.prompt_tokens > 0 && row.completion_tokens == 0,
        "{row:?}"
    );
    assert!(
        (row.cost_usd - row.prompt_tokens as f64 * 2.5 / 1e6).abs() < 1e-12,
        "{row:?}"
    );
}

/// Azure bills a prompt its content filter refuses (a 400 with code `content_filter`), and
/// the refusal reports no usage: the row counts the prompt with the tokenizer, marked
/// estimated, at the input price, and the key's budget is charged it (it cost 0).
#[tokio::test]
async fn an_azure_content_filter_refusal_is_charged_for_its_prompt() {
    let up = MockUpstream::start().await;
    let routes = "  guarded:\n    pricing: { input_per_1m: 2.50, output_per_1m: 10.00 }\n    deployments: [ { provider: az, deployment: gpt-4o-eu } ]\n";
    let cfg = config_with_routes(&up, routes, &keys("")).replace(
        "providers:\n",
        &format!(
            "providers:\n  az: {{ kind: azure_openai, endpoint: \"{}\", api_key: sk-az, api_version: 2024-10-21 }}\n",
            up.url()
        ),
    );
    let mut gw = Gateway::start(&cfg).await;
    up.script(Scripted::azure_content_filter());
    let r = post(
        &gw,
        "/v1/chat/completions",
        json!({"model": "guarded", "messages": [{"role": "user", "content": "something the filter refuses"}]}),
    )
    .await;
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "content_filter");
    // Any other refusal costs nothing.
    up.script(Scripted::vllm_error(400, "temperature must be at most 2"));
    let r = post(
        &gw,
        "/v1/chat/completions",
        json!({"model": "guarded", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(r.status(), 400);
    let rows = sqlite_rows_after_shutdown(&mut gw).await;
    let row = &rows[0];
    assert_eq!(
        (row.status, row.estimated, row.completion_tokens),
        (400, true, 0),
        "{row:?}"
    );
    assert!(row.prompt_tokens > 0, "{row:?}");
    assert!(
        (row.cost_usd - row.prompt_tokens as f64 * 2.5 / 1e6).abs() < 1e-12,
        "{row:?}"
    );
    assert_eq!(
        (rows[1].status, rows[1].cost_usd, rows[1].prompt_tokens),
        (400, 0.0, 0)
    );
}

/// A prompt that merely starts with `data:` (or quotes it) counts whole, for the budget's
/// bound and the `tpm` estimate: only an inline data URL's base64 is left out (all the text
/// after `"data:` was, so such a prompt of 30,000 tokens went through a $1 budget and a
/// `tpm` of 2,000).
#[tokio::test]
async fn text_that_starts_with_data_counts_for_budgets_and_tpm() {
    let big = "hello world ".repeat(1000);
    let bodies = [
        json!({"model": "gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": format!("data:{big}")}]}),
        // Text that is a data URL is still text (only an image's or a file's member holds
        // one the upstream bills by what it holds).
        json!({"model": "gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": format!("data:text/plain;base64,{}", "QUJD".repeat(3000))}]}),
        json!({"model": "gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": format!("He wrote \"data: {big}\" and stopped")}]}),
    ];
    for (limit, code) in [
        (", limits: { tpm: 2000 }", "rate_limit_exceeded"),
        (", budget: { usd: 0.01, period: daily }", "budget_exceeded"),
    ] {
        let up = MockUpstream::start().await;
        let gw = Gateway::start(&config(&up, &keys(limit))).await;
        for body in &bodies {
            let r = post(&gw, "/v1/chat/completions", body.clone()).await;
            assert_eq!(r.status(), 429, "{limit}");
            let e: Value = r.json().await.unwrap();
            assert_eq!(e["error"]["code"], code, "{limit}: {e}");
            // OpenAI's types: `tokens` for a tokens-per-minute limit.
            let kind = if code == "budget_exceeded" {
                "insufficient_quota"
            } else {
                "tokens"
            };
            assert_eq!(e["error"]["type"], kind, "{limit}: {e}");
        }
        assert!(up.requests().is_empty());
        // An image's base64 is still not text.
        let image = format!("data:image/png;base64,{}", "A".repeat(40_000));
        let r = post(
            &gw,
            "/v1/chat/completions",
            json!({"model": "gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": image}}]}]}),
        )
        .await;
        assert_eq!(r.status(), 200, "{limit}");
    }
}

/// A plain answer whose client leaves before its end was made whole upstream before its
/// first byte, and is billed whole: the rest is read for its usage, and the row has the
/// answer's tokens. (It had the prompt alone, estimated, and no completion.)
#[tokio::test]
async fn a_plain_answer_left_before_its_end_is_billed_whole() {
    let (up, mut gw) = answer_left_midway(Duration::from_millis(800)).await;
    // The rest arrives 0.8 s later, read by the gateway alone.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let row = the_chat_row(&mut gw).await;
    assert_eq!(
        (row.prompt_tokens, row.completion_tokens, row.estimated),
        (20, 1500, false),
        "{row:?}"
    );
    assert!((row.cost_usd - (20.0 * 2.5 + 1500.0 * 10.0) / 1e6).abs() < 1e-12);
    drop(up);
}

/// At shutdown, a plain answer its client left whose upstream is still sending the rest is
/// waited for 10 s, then finishes with what it read: the gateway exits cleanly and its row is
/// written. (Its reading, dropped with the runtime, started again without end: a stack
/// overflow, exit 134, and no row.)
#[tokio::test]
async fn a_left_answer_still_arriving_at_shutdown_keeps_its_row_and_a_clean_exit() {
    let (up, mut gw) = answer_left_midway(Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let row = the_chat_row(&mut gw).await;
    assert_eq!((row.status, row.estimated), (200, true), "{row:?}");
    drop(up);
}

/// A second SIGTERM while such an answer is still read ends that wait, not the ledger's
/// write: the row is written and the exit is clean. (The ledger's last write was skipped:
/// exit 1, every such row lost, with a healthy database.)
#[tokio::test]
async fn a_second_signal_while_left_answers_are_read_still_writes_their_rows() {
    let (up, mut gw) = answer_left_midway(Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.signal("TERM");
    tokio::time::sleep(Duration::from_millis(700)).await;
    gw.signal("TERM");
    let started = std::time::Instant::now();
    let status = gw
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("gateway exits");
    assert!(status.success(), "{}", gw.logs());
    // Well before the 10 s the first signal alone waits for such reads.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let store = Store::open(&sqlite_url(&gw)).await.unwrap();
    let rows = store.rows().await.unwrap();
    store.close().await;
    assert_eq!(rows.len(), 1, "{rows:?}\n{}", gw.logs());
    assert_eq!((rows[0].status, rows[0].estimated), (200, true), "{rows:?}");
    drop(up);
}

/// A gateway whose upstream sends half of a plain answer (20 + 1,500 tokens), and the rest
/// `rest_after` later; its client has read the first half and left.
async fn answer_left_midway(rest_after: Duration) -> (MockUpstream, Gateway) {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&config(&up, &keys(""))).await;
    let answer = json!({"id": "c", "object": "chat.completion", "created": 1, "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "x".repeat(2000)},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 1500, "total_tokens": 1520}})
    .to_string();
    let (head, tail) = answer.split_at(answer.len() / 2);
    up.script(Scripted::JsonParts(vec![
        (Duration::ZERO, head.to_string()),
        (rest_after, tail.to_string()),
    ]));
    let r = post(
        &gw,
        "/v1/chat/completions",
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    assert!(body.next().await.unwrap().is_ok());
    (up, gw)
}

/// The ledger's `chat/completions` row, once the gateway has stopped cleanly.
async fn the_chat_row(gw: &mut Gateway) -> LedgerRow {
    let rows = sqlite_rows_after_shutdown(gw).await;
    rows.iter()
        .find(|r| r.endpoint == "chat/completions")
        .unwrap_or_else(|| panic!("no row: {rows:?}\n{}", gw.logs()))
        .clone()
}

/// llama.cpp's server reads its own `n_predict` before `max_tokens`: under a budget, an
/// `n_predict` above the reservation's cap (or negative: no cap) goes upstream cut to it.
/// (It went as sent: `max_tokens: 10` reserved 10 tokens and llama.cpp made 5,000.)
#[tokio::test]
async fn llama_cpp_n_predict_is_cut_to_the_reserved_cap_under_a_budget() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&config(&up, &keys(", budget: { usd: 5, period: daily }"))).await;
    let chat = |extra: Value| {
        let mut body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    for (extra, sent) in [
        (json!({"max_tokens": 10, "n_predict": 5000}), json!(10)),
        (json!({"max_tokens": 10, "n_predict": 5}), json!(5)),
        (json!({"n_predict": -1}), json!(4096)),
        (json!({"max_tokens": 100, "n_predict": 1e4}), json!(100)),
    ] {
        let r = post(&gw, "/v1/chat/completions", chat(extra.clone())).await;
        assert_eq!(r.status(), 200, "{extra}");
        r.bytes().await.unwrap();
        let upstream = up.requests().last().unwrap().json();
        assert_eq!(upstream["n_predict"], sent, "{extra}: {upstream}");
    }
}

/// An image counts 1,600 tokens in a budget's prompt bound however its `image_url` member
/// is written: with whitespace before the colon, or with an escape in its name (40 images
/// so written went through a budget they cost 1.5-2.3x of).
#[tokio::test]
async fn images_count_for_budgets_however_their_member_is_written() {
    let up = MockUpstream::start().await;
    // 40 images: 64,000 tokens at 2.50 USD per 1M, 0.16 USD; 10 images: 0.04.
    let gw = Gateway::start(&config(&up, &keys(", budget: { usd: 0.1, period: daily }"))).await;
    // Beside escaped names, what a JSON parser refuses: nesting past its depth limit.
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    let body = |images: usize, key: &str| {
        let part =
            format!(r#"{{"type": "image_url", {key} {{"url": "https://example.com/a.png"}}}}"#);
        let parts = vec![part; images].join(", ");
        // (Only where the gateway refuses it: the test's upstream parses what it is sent.)
        let extra = if key.contains("\\u") && images == 40 {
            format!(r#", "x": {deep}"#)
        } else {
            String::new()
        };
        format!(
            r#"{{"model": "gpt-4o", "max_tokens": 5, "messages": [{{"role": "user", "content": [{parts}]}}]{extra}}}"#
        )
    };
    let send = |text: String| {
        client()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .header("content-type", "application/json")
            .body(text)
            .send()
    };
    for key in [
        r#""image_url":"#,
        "\"image_url\"\t:",
        r#""image\u005furl":"#,
    ] {
        let r = send(body(40, key)).await.unwrap();
        assert_eq!(r.status(), 429, "{key}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["code"], "budget_exceeded", "{key}: {e}");
        let r = send(body(10, key)).await.unwrap();
        assert_eq!(r.status(), 200, "{key}: {}", r.text().await.unwrap());
    }
    assert_eq!(up.requests().len(), 3);
}

/// In process, as in Redis, budgets count in nano-dollars, what is counted rounded up: a
/// request whose worst case is a fraction of a micro-dollar is refused by `usd: 0` (rounded
/// to the nearest micro-dollar, it was 0 and went through).
#[tokio::test]
async fn a_zero_budget_refuses_a_worst_case_below_a_micro_dollar() {
    let up = MockUpstream::start().await;
    let routes = "  tiny:\n    pricing: { input_per_1m: 0.01, output_per_1m: 0 }\n    deployments: [ { provider: up, deployment: emb-up } ]\n";
    let gw = Gateway::start(&config_with_routes(
        &up,
        routes,
        &keys(", budget: { usd: 0, period: daily }"),
    ))
    .await;
    // 29 bytes at 0.01 USD per 1M tokens: 2.9e-7 USD.
    let r = post(
        &gw,
        "/v1/embeddings",
        json!({"model": "tiny", "input": "hi"}),
    )
    .await;
    assert_eq!(r.status(), 429);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "budget_exceeded", "{e}");
    assert!(up.requests().is_empty());
}

/// A budget a reload removes and a later reload brings back counts what was spent while it
/// was away (it was rebuilt from the ledger only once, so it came back with its old spend
/// and admitted past its limit until a restart).
#[tokio::test]
async fn a_budget_brought_back_by_a_reload_counts_what_was_spent_without_it() {
    let up = MockUpstream::start().await;
    let with = config(&up, &keys(", budget: { usd: 5, period: daily }"));
    let without = config(&up, &keys(""));
    let gw = Gateway::start(&with).await;
    let chat = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    let spent = || async {
        let spend: Value = gw.get_json("/admin/spend", ADMIN).await;
        spend["budgets"][0]["spent_usd"].as_f64()
    };
    let reload = |yaml: String| {
        let gw = &gw;
        async move {
            std::fs::write(gw.config_path(), yaml).unwrap();
            let r = client()
                .post(gw.url("/admin/reload"))
                .bearer_auth(ADMIN)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        }
    };
    let r = post(&gw, "/v1/chat/completions", chat.clone()).await;
    r.bytes().await.unwrap();
    let one = gw_wait_spent(&gw).await;
    // Removed and brought back at once, before the ledger's writer has written that row:
    // what was counted stays.
    reload(without.clone()).await;
    reload(with.clone()).await;
    assert_eq!(spent().await, Some(one));
    reload(without.clone()).await;
    for _ in 0..3 {
        let r = post(&gw, "/v1/chat/completions", chat.clone()).await;
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    // Past a ledger flush, so that the rows of those three are in it.
    tokio::time::sleep(Duration::from_millis(800)).await;
    reload(with.clone()).await;
    let back = spent().await.unwrap();
    assert!((back - 4.0 * one).abs() < 1e-9, "{back} against 4 × {one}");

    // Removed again, and brought back while three requests run: admitted without it, they
    // end after it is back. Once they have, it is rebuilt again and counts them too. (They
    // were counted nowhere until a restart.)
    reload(without).await;
    let answer = json!({"id": "c", "object": "chat.completion", "created": 1, "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "late"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500}});
    for _ in 0..3 {
        up.script(Scripted::Delay(
            Duration::from_millis(1500),
            Box::new(Scripted::respond(200, answer.to_string())),
        ));
    }
    let running: Vec<_> = (0..3)
        .map(|_| tokio::spawn(post_owned(gw.url("/v1/chat/completions"), chat.clone())))
        .collect();
    assert!(up.wait_in_flight(3, Duration::from_secs(5)).await);
    reload(with).await;
    for r in running {
        assert_eq!(r.await.unwrap(), 200);
    }
    let late = 3.0 * (1000.0 * 2.5 + 500.0 * 10.0) / 1e6;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = spent().await.unwrap();
        if (now - (4.0 * one + late)).abs() < 1e-9 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{now} against 4 × {one} + {late}\n{}",
            gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// POSTs `body` to `url` with the test key; the answer's status, once its body is read.
async fn post_owned(url: String, body: Value) -> u16 {
    let r = client()
        .post(url)
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    r.bytes().await.unwrap();
    status
}

/// The first budget's spend, once a settlement has made it more than 0.
async fn gw_wait_spent(gw: &Gateway) -> f64 {
    for _ in 0..100 {
        let spend: Value = gw.get_json("/admin/spend", ADMIN).await;
        if let Some(s) = spend["budgets"][0]["spent_usd"]
            .as_f64()
            .filter(|s| *s > 0.0)
        {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nothing spent");
}

/// A canonical PCM WAV of `seconds` of silence, 16-bit mono at 8 kHz (16,000 bytes a second).
fn wav(seconds: f64) -> Vec<u8> {
    let data_len = (seconds * 8_000.0) as u32 * 2;
    let mut w = Vec::with_capacity(44 + data_len as usize);
    w.extend_from_slice(b"RIFF");
    w.extend_from_slice(&(36 + data_len).to_le_bytes());
    w.extend_from_slice(b"WAVEfmt ");
    for (v, n) in [
        (16u32, 4),
        (1, 2),
        (1, 2),
        (8_000, 4),
        (16_000, 4),
        (2, 2),
        (16, 2),
    ] {
        w.extend_from_slice(&v.to_le_bytes()[..n]);
    }
    w.extend_from_slice(b"data");
    w.extend_from_slice(&data_len.to_le_bytes());
    w.resize(44 + data_len as usize, 0);
    w
}

/// A transcription route at 0.0001 USD an audio second.
const WHISPER_ROUTE: &str = "  whisper:
    pricing: { input_per_1m: 0, output_per_1m: 0, per_audio_second: 0.0001 }
    deployments: [ { provider: up, deployment: whisper-1 } ]
";

async fn transcribe(gw: &Gateway, file: Vec<u8>, response_format: &str) -> (u16, String) {
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(file).file_name("speech.wav"),
        )
        .text("model", "whisper")
        .text("response_format", response_format.to_string());
    let r = client()
        .post(gw.url("/v1/audio/transcriptions"))
        .bearer_auth(KEY)
        .multipart(form)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// A transcription reserves for the length of its audio, read from the file and rounded up to
/// whole seconds as upstreams bill it, so a budget refuses the recording it cannot pay for;
/// and when the answer does not say how long the audio was (`text`), the ledger prices the
/// length read from the file, marked estimated, instead of nothing.
#[tokio::test]
async fn audio_reserves_for_its_length_and_is_priced_by_it_when_the_answer_does_not_say() {
    let up = MockUpstream::start().await;
    // 0.0001 USD an audio second; the key may spend 0.01 a day (100 s of audio). The mock
    // reports a WAV's length: rounded up in `json`'s `usage`, exact in `verbose_json`.
    let config = config_with_routes(
        &up,
        WHISPER_ROUTE,
        &keys(", budget: { usd: 0.01, period: daily }"),
    );
    let mut gw = Gateway::start(&config).await;

    // 60 s: 0.006 reserved; the `json` answer reports the duration, which is what is priced.
    let (status, body) = transcribe(&gw, wav(60.0), "json").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["usage"]["seconds"],
        60.0
    );
    // Another 60 s would make 0.012.
    let (status, body) = transcribe(&gw, wav(60.0), "text").await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("budget_exceeded"), "{body}");
    // 30.5 s fits (31 reserved); a `text` answer says nothing of the audio: priced from the
    // file, 0.00305. Spent: 0.00905.
    let (status, body) = transcribe(&gw, wav(30.5), "text").await;
    assert_eq!(status, 200, "{body}");
    // A file no reader knows counts as 6 kbit/s: 9,000 bytes → 12 s → 0.0012, over the
    // 0.00095 left.
    let (status, body) = transcribe(&gw, vec![b'x'; 9_000], "text").await;
    assert_eq!(status, 429, "{body}");
    // 9.5 s would be billed 10 (0.001), over what is left: refused, though 9.5 s (0.00095)
    // would fit.
    let (status, body) = transcribe(&gw, wav(9.5), "json").await;
    assert_eq!(status, 429, "{body}");
    // 4.5 s fits (5 reserved); `verbose_json` reports 4.5: 0.00045.
    let (status, body) = transcribe(&gw, wav(4.5), "verbose_json").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["duration"],
        4.5
    );
    // 3,000 unreadable bytes reserve 4 s (0.0004 of the 0.0005 left); the `text` answer says
    // nothing, and a length the gateway could not read is not priced.
    let (status, body) = transcribe(&gw, vec![b'x'; 3_000], "text").await;
    assert_eq!(status, 200, "{body}");

    let rows = sqlite_rows_after_shutdown(&mut gw).await;
    assert_rows(
        &rows,
        "audio/transcriptions",
        &[
            (200, 0.006, false),
            (429, 0.0, false),
            (200, 0.00305, true),
            (429, 0.0, false),
            (429, 0.0, false),
            (200, 0.00045, false),
            (200, 0.0, false),
        ],
    );
}

/// Speech is billed by the characters of its `input`, known before it goes upstream: the
/// reservation is the exact cost, so a budget refuses the text it cannot pay for, and the
/// ledger prices every answer (which carries no usage) by those characters. Characters are
/// code points, as OpenAI counts them ("é" is one, the escape `\u00e9` too).
#[tokio::test]
async fn speech_is_reserved_and_priced_by_its_characters() {
    let up = MockUpstream::start().await;
    // tts-1's built-in price: 15 USD per 1M characters. The key may spend 0.001 (66 characters).
    let config = config_with_routes(
        &up,
        "  tts: { deployments: [ { provider: up, deployment: tts-1 } ] }\n",
        &keys(", budget: { usd: 0.001, period: daily }"),
    );
    let mut gw = Gateway::start(&config).await;
    // `input` as written in the JSON body.
    let speak = |input: &'static str| {
        let gw = &gw;
        async move {
            let body = format!(r#"{{"model": "tts", "voice": "alloy", "input": "{input}"}}"#);
            let r = client()
                .post(gw.url("/v1/audio/speech"))
                .bearer_auth(KEY)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.bytes().await.unwrap())
        }
    };
    // 40 characters, 42 bytes (one "é" written as it is, one "î" escaped): 0.0006.
    let forty = r"Café au lait, s'il vous pla\u00eet, merci!!!!";
    let (status, body) = speak(forty).await;
    assert_eq!(status, 200, "{body:?}");
    // 40 more would make 0.0012.
    let (status, body) = speak(forty).await;
    assert_eq!(status, 429, "{body:?}");
    assert!(String::from_utf8_lossy(&body).contains("budget_exceeded"));
    // 26 fit exactly (0.00039 + 0.0006 = 0.00099).
    let (status, _) = speak("abcdefghijklmnopqrstuvwxyz").await;
    assert_eq!(status, 200);

    let rows = sqlite_rows_after_shutdown(&mut gw).await;
    assert_rows(
        &rows,
        "audio/speech",
        &[(200, 0.0006, true), (429, 0.0, false), (200, 0.00039, true)],
    );
}

/// A chat model that hears and speaks (`gpt-4o-audio-preview`) bills audio tokens at their
/// own prices; the usage says how many of the prompt and completion tokens were audio, and
/// the ledger prices each kind at its built-in price (2.50 / 10 text, 40 / 80 audio per 1M).
#[tokio::test]
async fn audio_tokens_of_a_chat_answer_are_priced_at_the_audio_prices() {
    let up = MockUpstream::start().await;
    let config = config_with_routes(
        &up,
        "  voice: { deployments: [ { provider: up, deployment: gpt-4o-audio-preview-2025-06-03 } ] }\n",
        &keys(""),
    );
    let mut gw = Gateway::start(&config).await;
    up.script(Scripted::respond(
        200,
        json!({"id": "chatcmpl-a", "object": "chat.completion", "created": 1,
               "model": "gpt-4o-audio-preview-2025-06-03",
               "choices": [{"index": 0, "finish_reason": "stop",
                            "message": {"role": "assistant", "content": null,
                                        "audio": {"id": "audio_1", "data": "UklGRg==",
                                                  "expires_at": 2, "transcript": "Hi!"}}}],
               "usage": {"prompt_tokens": 1000, "completion_tokens": 600, "total_tokens": 1600,
                         "prompt_tokens_details": {"cached_tokens": 100, "audio_tokens": 700},
                         "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 500,
                                                       "text_tokens": 100}}})
        .to_string(),
    ));
    let r = post(
        &gw,
        "/v1/chat/completions",
        json!({"model": "voice", "modalities": ["text", "audio"],
               "audio": {"voice": "alloy", "format": "wav"},
               "messages": [{"role": "user", "content": "Say hi"}]}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let rows = sqlite_rows_after_shutdown(&mut gw).await;
    let row = rows.iter().find(|r| &*r.route == "voice").expect("a row");
    assert_eq!(
        (row.prompt_tokens, row.cached_tokens, row.completion_tokens),
        (1000, 100, 600)
    );
    // 200 text × 2.50 + 100 cached × 2.50 (no cached price: the input price) + 700 audio × 40
    // + 100 text × 10 + 500 audio × 80 = 500 + 250 + 28,000 + 1,000 + 40,000 micro-dollars.
    assert!((row.cost_usd - 0.06975).abs() < 1e-12, "{}", row.cost_usd);
    assert!(!row.estimated);
}

/// A client that gives up before the answer begins takes nothing with it: its `max_parallel`
/// slot and its budget reservation are released (they were held until a restart and the
/// period's end, and the row was lost), and its ledger row says 499. The request was out
/// upstream, which may go on and bill it: the row is charged what its reservation assumed,
/// estimated (it cost 0, so that an SDK timing out and retrying spent without end).
#[tokio::test]
async fn a_request_whose_client_goes_away_before_the_answer_releases_its_slot_and_reservation() {
    let up = MockUpstream::start().await;
    // `slow` answers after 400 ms; the key may have one request in flight.
    let mut gw = Gateway::start(&config(
        &up,
        &keys(", limits: { max_parallel: 1 }, budget: { usd: 1, period: daily }"),
    ))
    .await;
    let body = json!({"model": "slow", "max_tokens": 100,
                      "messages": [{"role": "user", "content": "hi"}]});
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let gave_up = impatient
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await;
    assert!(gave_up.is_err(), "the client timed out");
    // Before the 400 ms the abandoned request would have taken, had it gone on.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let spend: Value = gw.get_json("/admin/spend", ADMIN).await;
    let budget = &spend["budgets"][0];
    assert_eq!(budget["reserved_usd"], 0.0, "{spend}");
    let r = post(&gw, "/v1/chat/completions", body).await;
    assert_eq!(r.status(), 200, "the slot is free");
    assert!(
        gw.logs().contains("status=499"),
        "the abandoned request has its log line:\n{}",
        gw.logs()
    );
    // And is counted, by its route, key and team (so is a model list, by its key's team).
    let listed = client()
        .get(gw.url("/v1/models"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), 200);
    for (endpoint, route, status) in [
        ("chat/completions", "slow", "499"),
        ("models", "none", "200"),
    ] {
        let labels = [
            ("endpoint", endpoint),
            ("route", route),
            ("status", status),
            ("key", "app"),
            ("team", "research"),
        ];
        let n = gw.metric("switchyard_requests_total", &labels).await;
        assert_eq!(n, Some(1.0), "{labels:?}\n{}", gw.metrics_text().await);
    }
    let spent = spend["budgets"][0]["spent_usd"].as_f64().unwrap();
    let rows = sqlite_rows_after_shutdown(&mut gw).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    // The abandoned row names the deployment it was waiting on (which one keeps clients
    // waiting is what on-call asks), and is charged its prompt and whole cap (100 tokens).
    let gone = rows.iter().find(|r| r.status == 499).unwrap();
    assert_eq!(
        (&*gone.route, &*gone.deployment, &*gone.provider),
        ("slow", "slow/slow", "slow"),
        "{gone:?}"
    );
    assert_eq!(
        (gone.completion_tokens, gone.estimated),
        (100, true),
        "{gone:?}"
    );
    let cost = gone.prompt_tokens as f64 * 2.5e-6 + 100.0 * 10e-6;
    assert!(
        gone.prompt_tokens > 0 && (gone.cost_usd - cost).abs() < 1e-12,
        "{gone:?}"
    );
    assert!((spent - cost).abs() < 1e-9, "spent {spent}, charged {cost}");
}

/// A request the route's `timeout` gives up on (504) was out upstream, which may go on and
/// bill it: a plain one is charged its prompt and whole cap, a stream (whose upstream stops
/// when its connection closes, here before its first token) its prompt, estimated. They
/// cost 0, and the SDK retries a 504 twice: a key spent without end on a slow upstream.
#[tokio::test]
async fn a_request_given_up_upstream_by_the_routes_timeout_is_charged_its_reservation() {
    let up = MockUpstream::start().await;
    let routes =
        "  hang:\n    timeout: 200ms\n    retries: 0\n    first_token_timeout: 200ms\n    \
                  pricing: { input_per_1m: 2.50, output_per_1m: 10.00 }\n    \
                  deployments: [ { provider: up, deployment: hang-up } ]\n  \
         hang-then: { timeout: 200ms, retries: 0, fallbacks: [gpt-4o], \
                  pricing: { input_per_1m: 2.50, output_per_1m: 10.00 }, \
                  deployments: [ { provider: up, deployment: hang-up } ] }\n";
    let mut gw = Gateway::start(&config_with_routes(
        &up,
        routes,
        &keys(", budget: { usd: 1, period: daily }"),
    ))
    .await;
    let ask = |route: &str, stream: bool, n: u64| {
        json!({"model": route, "max_tokens": 300, "stream": stream, "n": n,
               "messages": [{"role": "user", "content": "tell me a long story"}]})
    };
    for (stream, n) in [(false, 1), (true, 1), (false, 3)] {
        up.script(Scripted::Hang);
        let r = post(&gw, "/v1/chat/completions", ask("hang", stream, n)).await;
        assert_eq!(r.status(), 504);
    }
    // Given up on, then a fallback's refusal: charged still (it was free, and the SDK
    // retried it without end).
    up.script(Scripted::Hang);
    up.script(Scripted::rate_limited(1000));
    let r = post(&gw, "/v1/chat/completions", ask("hang-then", false, 1)).await;
    assert_eq!(r.status(), 429);
    // An upstream's own error saying `upstream_timeout` (another gateway in front): its
    // request was answered, not given up on: nothing.
    up.script(Scripted::respond(
        400,
        json!({"error": {"message": "x", "type": "api_error", "code": "upstream_timeout"}})
            .to_string(),
    ));
    let r = post(&gw, "/v1/chat/completions", ask("hang", false, 1)).await;
    assert_eq!(r.status(), 400);
    // A plain answer cut before its end (made whole upstream, and billed there): its
    // reservation, as the status it began with (it was charged its prompt alone).
    up.script(Scripted::JsonPartsCut(vec![(
        Duration::ZERO,
        r#"{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"content":"once upon"#.into(),
    )]));
    let r = post(&gw, "/v1/chat/completions", ask("hang", false, 1)).await;
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.is_err(), "a cut body");
    let spend: Value = gw.get_json("/admin/spend", ADMIN).await;
    let spent = spend["budgets"][0]["spent_usd"].as_f64().unwrap();
    let rows = sqlite_rows_after_shutdown(&mut gw).await;
    let got: Vec<_> = rows
        .iter()
        .map(|r| {
            (
                r.status,
                r.completion_tokens,
                r.estimated,
                r.prompt_tokens > 0,
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (504, 300, true, true),
            (504, 0, true, true),
            (504, 900, true, true),
            (429, 300, true, true),
            (400, 0, false, false),
            (200, 300, true, true)
        ],
        "{rows:?}"
    );
    let cost = |r: &LedgerRow| r.prompt_tokens as f64 * 2.5e-6 + r.completion_tokens as f64 * 10e-6;
    for r in &rows {
        assert!((r.cost_usd - cost(r)).abs() < 1e-12, "{r:?}");
    }
    let total: f64 = rows.iter().map(|r| r.cost_usd).sum();
    assert!((spent - total).abs() < 1e-9, "spent {spent}, rows {total}");
}

/// While the last ledger write at shutdown keeps failing, another SIGTERM stops waiting
/// for it, and the exit status says rows were not written. (The signal was ignored for the
/// ledger's 30 s, and the gateway exited 0 having lost them.)
#[tokio::test]
async fn a_signal_during_the_last_ledger_write_exits_at_once_and_says_rows_were_lost() {
    let up = MockUpstream::start().await;
    let mut gw = Gateway::start(&config(&up, &keys(""))).await;
    let path = gw.dir.path().join("switchyard.db");
    let db = rusqlite::Connection::open(&path).unwrap();
    db.execute_batch(
        "CREATE TRIGGER refuse BEFORE INSERT ON requests \
         BEGIN SELECT RAISE(FAIL, 'refused by a test'); END",
    )
    .unwrap();
    let r = post(
        &gw,
        "/v1/chat/completions",
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    gw.signal("TERM");
    assert!(
        gw.wait_log(
            |l| l.contains("ledger flushed") || l.contains("all connections closed"),
            Duration::from_secs(5)
        )
        .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let signalled = std::time::Instant::now();
    gw.signal("TERM");
    let status = gw.wait_exit(Duration::from_secs(10)).await.expect("exits");
    assert!(signalled.elapsed() < Duration::from_secs(5));
    assert!(!status.success(), "{}", gw.logs());
    assert!(gw.logs().contains("signal again"), "{}", gw.logs());
}

/// A stream still open when the shutdown's grace period ends is cut, and its row (what it
/// sent so far, estimated) is written before the ledger's last flush; it was lost ("ledger
/// writer is gone").
#[tokio::test]
async fn a_stream_cut_at_the_end_of_the_shutdown_grace_keeps_its_ledger_row() {
    stream_cut_at_shutdown("1s", false).await;
}

/// A second SIGTERM ends the grace period at once (it waited it out, a minute here): the
/// stream is cut as at its end, and keeps its row.
#[tokio::test]
async fn a_second_sigterm_cuts_the_grace_period_short() {
    let started = std::time::Instant::now();
    stream_cut_at_shutdown("60s", true).await;
    assert!(started.elapsed() < Duration::from_secs(20));
}

/// A 20-chunk stream 300 ms apart is running when the gateway (`shutdown_grace: grace`)
/// gets SIGTERM (and a second one 300 ms later when `twice`): it ends with the shutdown's
/// error event, cleanly, and its row holds what it sent.
async fn stream_cut_at_shutdown(grace: &str, twice: bool) {
    let up = MockUpstream::start().await;
    let config = config_with_routes(
        &up,
        "  drip:\n    pricing: { input_per_1m: 1000, output_per_1m: 1000 }\n    deployments: [ { provider: drip } ]\n",
        &keys(""),
    )
    .replace(
            &format!("server: {{ admin_key: {ADMIN} }}"),
            &format!("server: {{ admin_key: {ADMIN}, shutdown_grace: {grace} }}"),
        )
    .replace(
        "providers:\n",
        "providers:\n  drip: { kind: mock, stream_chunks: 20, chunk_delay: 300ms }\n",
    );
    let mut gw = Gateway::start(&config).await;
    let resp = post(
        &gw,
        "/v1/chat/completions",
        json!({"model": "drip", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("chat.completion.chunk"));
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        let mut clean = true;
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(c) => got.extend_from_slice(&c),
                Err(_) => {
                    clean = false;
                    break;
                }
            }
        }
        (String::from_utf8_lossy(&got).into_owned(), clean)
    });
    if twice {
        gw.signal("TERM");
        assert!(
            gw.wait_log(|l| l.contains("shutting down"), Duration::from_secs(5))
                .await
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let rows = sqlite_rows_after_shutdown(&mut gw).await;
    // The client's stream ends with an error event, and then ends cleanly: no silent cut.
    let (text, clean) = reader.await.unwrap();
    let last = text.trim_end().rsplit("\n\n").next().unwrap_or("");
    assert!(last.contains("\"code\":\"gateway_shutdown\""), "{text}");
    assert!(clean, "{text}");
    let drip: Vec<_> = rows.iter().filter(|r| &*r.route == "drip").collect();
    assert_eq!(drip.len(), 1, "{rows:?}\n{}", gw.logs());
    assert!(
        drip[0].completion_tokens > 0 && drip[0].cost_usd > 0.0,
        "{:?}",
        drip[0]
    );
    assert!(drip[0].estimated);
    assert!(gw.logs().contains("outcome=shutdown"), "{}", gw.logs());
    assert!(!gw.logs().contains("a row was lost"), "{}", gw.logs());
}

/// A server that sends its JSON answer as `text/plain` (some OpenAI-compatible servers do;
/// the SDK parses it) still has its usage read and priced.
#[tokio::test]
async fn usage_is_read_from_a_json_answer_labelled_text_plain() {
    let up = MockUpstream::start().await;
    let mut gw = Gateway::start(&config(&up, &keys(""))).await;
    up.script(Scripted::Respond {
        status: 200,
        headers: vec![("content-type".into(), "text/plain; charset=utf-8".into())],
        body: json!({"id": "c", "object": "chat.completion", "created": 1, "model": "m",
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": "ok"}}],
                     "usage": {"prompt_tokens": 300, "completion_tokens": 100, "total_tokens": 400}})
        .to_string(),
    });
    let r = post(
        &gw,
        "/v1/chat/completions",
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let rows = sqlite_rows_after_shutdown(&mut gw).await;
    let row = &rows[0];
    assert_eq!((row.prompt_tokens, row.completion_tokens), (300, 100));
    assert!(!row.estimated);
    // 300 × 2.50 + 100 × 10.00 micro-dollars.
    assert!((row.cost_usd - 0.00175).abs() < 1e-12, "{}", row.cost_usd);
}

/// Images are priced by their quality and size (`dall-e-3`'s built-in table: 0.04 standard
/// 1024x1024 … 0.12 hd 1792x1024), reserved at the most the request may cost, and a GPT Image
/// model by the tokens its answer reports (5 and 40 USD per 1M), reserved by its table.
#[tokio::test]
async fn images_are_priced_and_reserved_by_quality_and_size() {
    let up = MockUpstream::start().await;
    let config = config_with_routes(
        &up,
        "  dalle: { deployments: [ { provider: up, deployment: dall-e-3 } ] }\n  \
         img: { deployments: [ { provider: up, deployment: gpt-image-1 } ] }\n",
        &keys(", budget: { usd: 0.5, period: daily }"),
    );
    let mut gw = Gateway::start(&config).await;
    let image = |body: Value| {
        let gw = &gw;
        async move {
            let r = post(gw, "/v1/images/generations", body).await;
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    // Standard 1024x1024 by default: 0.04 (reserved 0.12: it could have been hd).
    let (status, v) = image(json!({"model": "dalle", "prompt": "a fox"})).await;
    assert_eq!(status, 200, "{v}");
    // Two hd 1792x1024: 0.24 (0.28 spent).
    let (status, v) = image(
        json!({"model": "dalle", "prompt": "a fox", "n": 2, "quality": "hd", "size": "1792x1024"}),
    )
    .await;
    assert_eq!(
        (status, v["data"].as_array().unwrap().len()),
        (200, 2),
        "{v}"
    );
    // A high 1024x1536 GPT image may cost 0.2496 and the prompt: more than the 0.22 left.
    let high = json!({"model": "img", "prompt": "a fox", "quality": "high", "size": "1024x1536"});
    let (status, v) = image(high).await;
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"]["code"], "budget_exceeded", "{v}");
    // A low one fits, and costs its tokens: 2 × 5 + 272 × 40 = 10,890 micro-dollars.
    let low = json!({"model": "img", "prompt": "a fox", "quality": "low", "size": "1024x1024"});
    let (status, v) = image(low).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["output_tokens"], 272, "{v}");
    // 0.21 left: a dall-e-3 request that sends no quality may be hd (0.12 each): two are
    // refused, two standard ones sent as such (0.08) are not.
    let (status, v) = image(json!({"model": "dalle", "prompt": "a fox", "n": 2})).await;
    assert_eq!(status, 429, "{v}");
    let (status, v) =
        image(json!({"model": "dalle", "prompt": "a fox", "n": 2, "quality": "standard", "size": "1024x1024"}))
            .await;
    assert_eq!(status, 200, "{v}");

    let rows = sqlite_rows_after_shutdown(&mut gw).await;
    let got: Vec<(String, u16, f64)> = rows
        .iter()
        .map(|r| (r.route.to_string(), r.status, r.cost_usd))
        .collect();
    let expected = [
        ("dalle", 200, 0.04),
        ("dalle", 200, 0.24),
        ("img", 429, 0.0),
        ("img", 200, 0.01089),
        ("dalle", 429, 0.0),
        ("dalle", 200, 0.08),
    ];
    assert_eq!(got.len(), expected.len(), "{got:?}");
    for ((route, status, cost), (r, s, c)) in got.iter().zip(expected) {
        assert_eq!((route.as_str(), *status), (r, s), "{got:?}");
        assert!((cost - c).abs() < 1e-12, "{got:?}");
    }
}

/// `images/edits` (a form with the image to edit): routed by its `model` field (sent
/// upstream as the deployment's name, the image untouched), in the Azure shape too; a GPT
/// Image edit priced by its tokens, the uploaded image's at 10 USD per 1M (the mock bills
/// 323 per image), and reserved at `IMAGE_INPUT_TOKENS` (10,000) per uploaded image; a DALL·E 2
/// edit priced per image by size; a GPT Image answer without usage by the image, its prompt
/// counted. A form without its image or prompt, or naming `model` twice (once as RFC 5987's
/// `name*=` with a language), is refused.
#[tokio::test]
async fn image_edits_are_routed_priced_and_reserved() {
    let up = MockUpstream::start().await;
    let config = config_with_routes(
        &up,
        "  dalle2: { deployments: [ { provider: up, deployment: dall-e-2 } ] }\n  \
         img: { deployments: [ { provider: up, deployment: gpt-image-1 } ] }\n",
        &keys(", budget: { usd: 0.2, period: daily }"),
    );
    let mut gw = Gateway::start(&config).await;
    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n-the-image-to-edit-";
    let edit =
        |path: &'static str, fields: &[(&'static str, &'static str)], files: &[&'static str]| {
            let mut form = reqwest::multipart::Form::new();
            for f in files {
                form = form.part(
                    *f,
                    reqwest::multipart::Part::bytes(PNG.to_vec())
                        .file_name("a.png")
                        .mime_str("image/png")
                        .unwrap(),
                );
            }
            for (k, v) in fields {
                form = form.text(*k, *v);
            }
            let req = client().post(gw.url(path)).bearer_auth(KEY).multipart(form);
            async move {
                let r = req.send().await.unwrap();
                let status = r.status().as_u16();
                (status, r.json::<Value>().await.unwrap())
            }
        };
    let low = [
        ("model", "img"),
        ("prompt", "a fox"),
        ("quality", "low"),
        ("size", "1024x1024"),
    ];
    // Reserved 10,005 × 10 + 0.01088 = 0.111 of the 0.2; costs 2 × 5 + 323 × 10 + 272 × 40 =
    // 14,120 micro-dollars.
    let (status, v) = edit("/v1/images/edits", &low, &["image"]).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["usage"]["input_tokens_details"]["image_tokens"], 323,
        "{v}"
    );
    let sent = up.requests().pop().unwrap();
    assert_eq!(sent.path, "/v1/images/edits");
    let form = String::from_utf8_lossy(&sent.body).into_owned();
    assert!(form.contains("\r\n\r\ngpt-image-1\r\n"), "{form}");
    assert!(
        sent.body.windows(PNG.len()).any(|w| w == PNG),
        "the image went upstream untouched"
    );
    // An image and a mask: 20,005 × 10 + 0.01088 = 0.21 is more than the 0.186 left.
    let (status, v) = edit("/v1/images/edits", &low, &["image", "mask"]).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (429, Some("budget_exceeded")),
        "{v}"
    );
    // DALL·E 2 in the Azure shape, two 512x512: 2 × 0.018.
    let (status, v) = edit(
        "/openai/deployments/dalle2/images/edits?api-version=2025-04-01-preview",
        &[("prompt", "a fox"), ("n", "2"), ("size", "512x512")],
        &["image"],
    )
    .await;
    assert_eq!(
        (status, v["data"].as_array().map(Vec::len)),
        (200, Some(2)),
        "{v}"
    );
    assert!(up.requests().pop().unwrap().path.contains("/images/edits"));
    // Refused: no image, no prompt, a non-number `n`.
    let (status, v) = edit(
        "/v1/images/edits",
        &[("model", "img"), ("prompt", "x")],
        &[],
    )
    .await;
    assert_eq!(
        (status, v["error"]["param"].as_str()),
        (400, Some("image")),
        "{v}"
    );
    let (status, v) = edit("/v1/images/edits", &[("model", "img")], &["image"]).await;
    assert_eq!(
        (status, v["error"]["param"].as_str()),
        (400, Some("prompt")),
        "{v}"
    );
    let (status, v) = edit(
        "/v1/images/edits",
        &[("model", "img"), ("prompt", "x"), ("n", "two")],
        &["image"],
    )
    .await;
    assert_eq!(
        (status, v["error"]["param"].as_str()),
        (400, Some("n")),
        "{v}"
    );
    // Raw forms (content type given whole), answered with (status, body).
    let raw = |content_type: &'static str, body: &'static str| {
        let req = client()
            .post(gw.url("/v1/images/edits"))
            .bearer_auth(KEY)
            .header("content-type", content_type)
            .body(body);
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    // `model` twice, the second spelled `name*=`: a parser upstream may take either.
    let (status, v) = raw(
        "multipart/form-data; Boundary=B",
        "--B\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nimg\r\n\
        --B\r\nContent-Disposition: form-data; name*=utf-8'en'model\r\n\r\ndalle2\r\n\
        --B\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nx\r\n\
        --B\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\nPNG\r\n--B--\r\n",
    )
    .await;
    assert_eq!(
        (status, v["error"]["param"].as_str()),
        (400, Some("model")),
        "{v}"
    );
    // A part whose headers end in a bare LF: read here as one part with the next, where a
    // lenient parser upstream sees a second `model`. Refused as malformed.
    let (status, v) = raw(
        "multipart/form-data; boundary=B",
        "--B\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nimg\r\n\
        --B\r\nContent-Disposition: form-data; name=\"note\"\n\nx\r\n\
        --B\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ndalle2\r\n\
        --B\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nx\r\n\
        --B\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\nPNG\r\n--B--\r\n",
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not well-formed"),
        "{v}"
    );
    // A second boundary given as `boundary*=`, which some parsers take: refused.
    let (status, v) = raw(
        "multipart/form-data; boundary=B; boundary*=utf-8''C",
        "--B\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nimg\r\n--B--\r\n",
    )
    .await;
    assert_eq!(status, 400, "{v}");
    // An answer without its tokens: the image at its price (0.01088), the prompt counted by
    // the tokenizer (2 tokens at 5 USD per 1M), the row estimated.
    up.script(Scripted::respond(
        200,
        r#"{"created":1,"data":[{"b64_json":"eA=="}]}"#,
    ));
    let (status, v) = edit("/v1/images/edits", &low, &["image"]).await;
    assert_eq!(status, 200, "{v}");

    let rows = sqlite_rows_after_shutdown(&mut gw).await;
    assert_rows(
        &rows,
        "images/edits",
        &[
            (200, 0.01412, false),
            (429, 0.0, false),
            (200, 0.036, false),
            (400, 0.0, false),
            (400, 0.0, false),
            (400, 0.0, false),
            (400, 0.0, false),
            (400, 0.0, false),
            (400, 0.0, false),
            (200, 0.01089, true),
        ],
    );
    assert_eq!(rows.last().unwrap().prompt_tokens, 2);
    assert_eq!(up.request_count(), 3);
}

/// `images/variations` (DALL·E 2, a form with the image and no prompt): routed by the form's
/// `model`, priced per image by size (2 × 0.016 at 256x256), reserved for `n` images at the
/// most their size may cost (three at 1024x1024, 0.06, are more than the 0.05 left); a form
/// without its image is refused.
#[tokio::test]
async fn image_variations_are_routed_priced_and_reserved() {
    let up = MockUpstream::start().await;
    let config = config_with_routes(
        &up,
        "  dalle2: { deployments: [ { provider: up, deployment: dall-e-2 } ] }\n",
        &keys(", budget: { usd: 0.082, period: daily }"),
    );
    let mut gw = Gateway::start(&config).await;
    let vary = |fields: &[(&'static str, &'static str)], with_image: bool| {
        let mut form = reqwest::multipart::Form::new();
        if with_image {
            form = form.part(
                "image",
                reqwest::multipart::Part::bytes(b"\x89PNG-a-picture".to_vec()).file_name("a.png"),
            );
        }
        for (k, v) in fields {
            form = form.text(*k, *v);
        }
        let req = client()
            .post(gw.url("/v1/images/variations"))
            .bearer_auth(KEY)
            .multipart(form);
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let (status, v) = vary(
        &[("model", "dalle2"), ("n", "2"), ("size", "256x256")],
        true,
    )
    .await;
    assert_eq!(
        (status, v["data"].as_array().map(Vec::len)),
        (200, Some(2)),
        "{v}"
    );
    let sent = up.requests().pop().unwrap();
    assert_eq!(sent.path, "/v1/images/variations");
    assert!(String::from_utf8_lossy(&sent.body).contains("\r\n\r\ndall-e-2\r\n"));
    // 0.05 left: three images without a size may each be 0.02.
    let (status, v) = vary(&[("model", "dalle2"), ("n", "3")], true).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (429, Some("budget_exceeded")),
        "{v}"
    );
    let (status, v) = vary(&[("model", "dalle2")], false).await;
    assert_eq!(
        (status, v["error"]["param"].as_str()),
        (400, Some("image")),
        "{v}"
    );

    let rows = sqlite_rows_after_shutdown(&mut gw).await;
    assert_rows(
        &rows,
        "images/variations",
        &[(200, 0.032, false), (429, 0.0, false), (400, 0.0, false)],
    );
}

/// A streamed GPT image's partial images are billed as 100 output tokens each: three of
/// them (0.012) with a low 1024x1024 image (0.01088) are more than a 0.02 budget.
#[tokio::test]
async fn partial_images_are_reserved() {
    let up = MockUpstream::start().await;
    let config = config_with_routes(
        &up,
        "  img: { deployments: [ { provider: up, deployment: gpt-image-1 } ] }\n",
        &keys(", budget: { usd: 0.02, period: daily }"),
    );
    let gw = Gateway::start(&config).await;
    let low = json!({"model": "img", "prompt": "a fox", "quality": "low", "size": "1024x1024",
        "stream": true, "partial_images": 3});
    let r = post(&gw, "/v1/images/generations", low).await;
    assert_eq!(r.status(), 429);
    // So many that their tokens overflow a u64: the most there is, refused.
    let absurd = json!({"model": "img", "prompt": "a fox", "stream": true,
        "partial_images": 184_467_440_737_095_517u64});
    let r = post(&gw, "/v1/images/generations", absurd).await;
    assert_eq!(r.status(), 429);
    let low = json!({"model": "img", "prompt": "a fox", "quality": "low", "size": "1024x1024"});
    let r = post(&gw, "/v1/images/generations", low).await;
    assert_eq!(r.status(), 200);
}

/// A streamed GPT image whose events report no usage is priced as a plain answer without
/// usage is: its image at its per-image price, each partial image as 100 output tokens, the
/// prompt counted, estimated; one whose client leaves after a partial image costs that
/// partial image and the prompt (both cost 0, so a budget never saw streamed images).
#[tokio::test]
async fn a_streamed_image_without_usage_is_priced_by_what_was_sent() {
    let up = MockUpstream::start().await;
    let config = config_with_routes(
        &up,
        "  img: { deployments: [ { provider: up, deployment: gpt-image-1 } ] }\n",
        &keys(""),
    );
    let mut gw = Gateway::start(&config).await;
    let partial = |i: u32| {
        format!(
            "event: image_generation.partial_image\ndata: {{\"type\":\"image_generation.partial_image\",\"b64_json\":\"QUJD\",\"partial_image_index\":{i}}}\n\n"
        )
    };
    let done = "event: image_generation.completed\ndata: {\"type\":\"image_generation.completed\",\"b64_json\":\"QUJDRA==\"}\n\n";
    let (p0, p1) = (partial(0), partial(1));
    up.script(Scripted::stream(
        &[(0, &p0), (0, &p1), (0, done)],
        StreamEnd::Finish,
    ));
    let body = json!({"model": "img", "prompt": "a fox", "quality": "low", "size": "1024x1024",
        "stream": true, "partial_images": 2});
    let r = post(&gw, "/v1/images/generations", body.clone()).await;
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().ends_with(done));
    // The client leaves after the first partial image.
    up.script(Scripted::stream(
        &[(0, &p0), (3000, &p1), (0, done)],
        StreamEnd::Finish,
    ));
    let mut r = post(&gw, "/v1/images/generations", body).await;
    let first = r.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("partial_image"));
    drop(r);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rows = sqlite_rows_after_shutdown(&mut gw).await;
    let prompt = rows[0].prompt_tokens;
    assert!(prompt > 0, "{rows:?}");
    // gpt-image-1: 5 USD per 1M text input tokens, 40 per 1M output, 0.01088 a low 1024x1024.
    let (whole, left) = (&rows[0], &rows[1]);
    assert_eq!(
        (whole.completion_tokens, whole.estimated),
        (200, true),
        "{whole:?}"
    );
    let want = 0.01088 + 200.0 * 40.0 / 1e6 + prompt as f64 * 5.0 / 1e6;
    assert!(
        (whole.cost_usd - want).abs() < 1e-9,
        "{} != {want}: {whole:?}",
        whole.cost_usd
    );
    assert_eq!(
        (left.completion_tokens, left.estimated),
        (100, true),
        "{left:?}"
    );
    let want = 100.0 * 40.0 / 1e6 + prompt as f64 * 5.0 / 1e6;
    assert!(
        (left.cost_usd - want).abs() < 1e-9,
        "{} != {want}: {left:?}",
        left.cost_usd
    );
}

/// A 200 that is no JSON (an HTML page from a misconfigured upstream) is passed on as it
/// came; its row estimates the prompt that was sent (it recorded no tokens, not estimated).
#[tokio::test]
async fn a_success_that_is_not_json_estimates_its_prompt() {
    let up = MockUpstream::start().await;
    let mut gw = Gateway::start(&config(&up, &keys(""))).await;
    up.script(Scripted::html(200));
    let r = post(
        &gw,
        "/v1/chat/completions",
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "a question of some words"}]}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("<html>"));
    let rows = sqlite_rows_after_shutdown(&mut gw).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(
        rows[0].estimated && rows[0].prompt_tokens > 0,
        "{:?}",
        rows[0]
    );
    assert_eq!(rows[0].completion_tokens, 0);
}

/// A worst case beyond any number (`max_tokens: 2^63 - 1`) is refused by the budget, and the
/// gateway goes on (the sum overflowed under the budgets' lock: the request's connection
/// dropped and every later request of every key was refused).
#[tokio::test]
async fn an_absurd_worst_case_is_refused_and_the_gateway_goes_on() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&config(&up, &keys(", budget: { usd: 1, period: total }"))).await;
    let chat = |max_tokens: u64| {
        json!({"model": "gpt-4o", "max_tokens": max_tokens,
               "messages": [{"role": "user", "content": "hi"}]})
    };
    assert_eq!(
        post(&gw, "/v1/chat/completions", chat(10)).await.status(),
        200
    );
    let r = post(&gw, "/v1/chat/completions", chat(i64::MAX as u64)).await;
    assert_eq!(r.status(), 429);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "budget_exceeded", "{v}");
    assert_eq!(
        post(&gw, "/v1/chat/completions", chat(10)).await.status(),
        200
    );
    // Without a budget, the largest `max_tokens` there is goes upstream as it is, on a
    // deployment that counts its tokens per minute (the sum overflowed there: the request's
    // connection dropped in a debug build).
    let up = MockUpstream::start().await;
    let cfg = config(&up, &keys("")).replace(
        "deployments: [ { provider: up, deployment: gpt-4o-up } ]",
        "deployments: [ { provider: up, deployment: gpt-4o-up, tpm: 100000 } ]",
    );
    let gw = Gateway::start(&cfg).await;
    let r = post(&gw, "/v1/chat/completions", chat(u64::MAX)).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    assert_eq!(up.requests()[0].json()["max_tokens"], u64::MAX);
    assert!(!gw.logs().contains("panicked"), "{}", gw.logs());
}

/// Usage an upstream reports that no model can produce (past 10^8 tokens, 2^64-1, negative,
/// a string) is not believed: the answer is counted with the tokenizer and marked
/// estimated, and the key's budget is charged that. (10^12 tokens were billed as reported,
/// $3M against a $50 budget, and 2^64-1 went into the ledger as -1 tokens; a negative or
/// string count was 0 tokens, cost 0, not marked.)
#[tokio::test]
async fn usage_no_model_can_produce_is_counted_by_the_gateway_instead() {
    let up = MockUpstream::start().await;
    let mut gw = Gateway::start(&config(&up, &keys(", budget: { usd: 50, period: daily }"))).await;
    let answer = |usage: &str| {
        format!(
            r#"{{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{{"index":0,"message":{{"role":"assistant","content":"Hello world"}},"finish_reason":"stop"}}],"usage":{usage}}}"#
        )
    };
    let hello =
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hello world"}]});
    for usage in [
        r#"{"prompt_tokens":1000000000000,"completion_tokens":1000000000000,"total_tokens":2000000000000}"#,
        r#"{"prompt_tokens":18446744073709551615,"completion_tokens":18446744073709551615}"#,
        r#"{"prompt_tokens":-5,"completion_tokens":-7}"#,
        r#"{"prompt_tokens":"8","completion_tokens":"9"}"#,
    ] {
        up.script(Scripted::respond(200, answer(usage)));
        let r = post(&gw, "/v1/chat/completions", hello.clone()).await;
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    // The same in a stream's usage chunk.
    let huge = sse(
        &json!({"id": "s", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1_000_000_000_000u64}}),
    );
    up.script(Scripted::Stream {
        chunks: vec![
            (
                Duration::ZERO,
                chat_chunk(Some("assistant"), Some("Hello world"), None),
            ),
            (Duration::ZERO, chat_chunk(None, None, Some("stop"))),
            (Duration::ZERO, huge),
            (Duration::ZERO, "data: [DONE]\n\n".to_string()),
        ],
        end: StreamEnd::Finish,
    });
    let mut streamed = hello.clone();
    streamed["stream"] = json!(true);
    let r = post(&gw, "/v1/chat/completions", streamed).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    // The key's budget still admits a request.
    up.script(Scripted::respond(
        200,
        answer(r#"{"prompt_tokens":2,"completion_tokens":2}"#),
    ));
    assert_eq!(
        post(&gw, "/v1/chat/completions", hello.clone())
            .await
            .status(),
        200
    );
    let rows = sqlite_rows_after_shutdown(&mut gw).await;
    assert_eq!(rows.len(), 6, "{rows:#?}");
    for row in &rows[..5] {
        assert!(row.estimated, "{row:?}");
        assert_eq!(
            (row.prompt_tokens, row.completion_tokens),
            (2, 2),
            "{row:?}"
        );
        assert!(row.cost_usd > 0.0 && row.cost_usd < 1e-4, "{row:?}");
    }
    assert!(!rows[5].estimated);
}

/// A Responses request run in the background (`background: true`) is answered at once,
/// `queued`, with no usage: it is charged what its reservation assumed (its prompt and its
/// whole output cap, estimated), so that background requests cannot overspend a budget.
/// (They were charged their prompt alone: six went through a $0.02 budget they cost 3x of.)
#[tokio::test]
async fn a_background_response_is_charged_its_reservation() {
    let up = MockUpstream::start().await;
    let mut gw = Gateway::start(&config(
        &up,
        &keys(", budget: { usd: 0.03, period: daily }"),
    ))
    .await;
    let queued = json!({"id": "resp_1", "object": "response", "created_at": 1, "status": "queued",
        "background": true, "model": "gpt-4o", "output": [], "usage": null, "error": null})
    .to_string();
    let ask =
        json!({"model": "gpt-4o", "input": "hi", "background": true, "max_output_tokens": 1000});
    let mut statuses = Vec::new();
    for _ in 0..3 {
        up.script(Scripted::respond(200, queued.clone()));
        let r = post(&gw, "/v1/responses", ask.clone()).await;
        statuses.push(r.status().as_u16());
        r.bytes().await.unwrap();
    }
    // 1000 output tokens at $10 per 1M: $0.01 and a little each; the third does not fit.
    assert_eq!(statuses, [200, 200, 429]);
    let rows = sqlite_rows_after_shutdown(&mut gw).await;
    let charged: Vec<_> = rows.iter().filter(|r| r.status == 200).collect();
    assert_eq!(charged.len(), 2, "{rows:?}");
    for r in charged {
        assert_eq!((r.completion_tokens, r.estimated), (1000, true), "{r:?}");
        assert!(r.cost_usd > 0.01 && r.cost_usd < 0.0101, "{r:?}");
    }
}

/// Estimates where the upstream reports no usage: a streamed Responses function call counts
/// its arguments (`response.function_call_arguments.delta`), and embeddings of token ids
/// count one token per id. (Both were 0: a stream of arguments cost its prompt alone, and
/// 1,000 token ids cost nothing.)
#[tokio::test]
async fn estimates_count_streamed_call_arguments_and_token_ids() {
    let up = MockUpstream::start().await;
    let mut gw = Gateway::start(&config(&up, &keys(""))).await;
    let event = |kind: &str, v: Value| format!("event: {kind}\ndata: {v}\n\n");
    let args = r#"{"city":"Paris","unit":"celsius","days":[1,2,3]}"#;
    let summary = "The user asks for the weather in Paris for three days.";
    let mut chunks = vec![(
        Duration::ZERO,
        event(
            "response.created",
            json!({"type": "response.created", "response": {"id": "r", "status": "in_progress", "error": null}}),
        ),
    )];
    for piece in args.as_bytes().chunks(8) {
        let piece = std::str::from_utf8(piece).unwrap();
        chunks.push((
            Duration::ZERO,
            event(
                "response.function_call_arguments.delta",
                json!({"type": "response.function_call_arguments.delta", "item_id": "fc", "output_index": 0, "delta": piece}),
            ),
        ));
    }
    chunks.push((
        Duration::ZERO,
        event(
            "response.reasoning_summary_text.delta",
            json!({"type": "response.reasoning_summary_text.delta", "item_id": "rs", "output_index": 0, "delta": summary}),
        ),
    ));
    // Broken off before `response.completed` (which carries the usage).
    up.script(Scripted::Stream {
        chunks,
        end: StreamEnd::Abort,
    });
    let r = post(
        &gw,
        "/v1/responses",
        json!({"model": "gpt-4o", "input": "weather?", "stream": true}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await;
    up.script(Scripted::respond(
        200,
        json!({"object": "list", "model": "emb", "data": [{"object": "embedding", "index": 0, "embedding": [0.1]},
            {"object": "embedding", "index": 1, "embedding": [0.2]}]})
        .to_string(),
    ));
    let ids: Vec<u64> = (0..1000).map(|i| 100 + i).collect();
    let r = post(
        &gw,
        "/v1/embeddings",
        json!({"model": "emb", "input": [ids, [1, 2, 3]]}),
    )
    .await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    let rows = sqlite_rows_after_shutdown(&mut gw).await;
    let resp = rows.iter().find(|r| r.endpoint == "responses").unwrap();
    // The arguments (~20 tokens) and the reasoning summary (12).
    assert!(resp.estimated && resp.completion_tokens >= 30, "{resp:?}");
    let emb = rows.iter().find(|r| r.endpoint == "embeddings").unwrap();
    assert_eq!((emb.prompt_tokens, emb.estimated), (1003, true), "{emb:?}");
}

/// A plain answer far larger than any real one (200 MB: a broken or hostile upstream) goes
/// through without the gateway keeping it: past 32 MiB only its tail is kept, and its usage
/// is read from there. (The gateway's memory grew with the answer: 1.9 GB in 20 s.)
#[tokio::test]
async fn a_huge_plain_answer_is_passed_on_without_being_kept_whole() {
    let up = MockUpstream::start().await;
    let mut gw = Gateway::start(&config(&up, "")).await;
    let text = "x".repeat(200 << 20);
    let answer = format!(
        r#"{{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{{"index":0,"message":{{"role":"assistant","content":"{text}"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":9,"completion_tokens":50000000,"total_tokens":50000009}}}}"#
    );
    drop(text);
    let sent = answer.len();
    up.script(Scripted::respond(200, answer));
    let (got, growth) = peak_growth_mib(&gw, async {
        let r = post(
            &gw,
            "/v1/chat/completions",
            json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
        assert_eq!(r.status(), 200);
        let mut body = r.bytes_stream();
        let mut got = 0;
        while let Some(chunk) = body.next().await {
            got += chunk.unwrap().len();
        }
        got
    })
    .await;
    assert_eq!(got, sent);
    assert!(growth < 100, "the gateway's peak RSS grew by {growth} MiB");
    let rows = sqlite_rows_after_shutdown(&mut gw).await;
    assert_eq!(
        (
            rows[0].prompt_tokens,
            rows[0].completion_tokens,
            rows[0].estimated
        ),
        (9, 50_000_000, false),
        "{rows:?}"
    );
}

/// Usage saying more completion tokens than the cap sent upstream allows (10 asked, 99,999,999
/// reported: under the 10^8 tokens no model makes, so believed before) is not believed: the
/// answer is counted instead, marked estimated, and the budget holds. (It cost $200 against
/// a $50 budget, the key refused for the rest of the day.)
#[tokio::test]
async fn completion_tokens_past_the_cap_sent_are_counted_by_the_gateway() {
    let up = MockUpstream::start().await;
    let mut gw = Gateway::start(&config(&up, &keys(", budget: { usd: 50, period: daily }"))).await;
    let answer = |content: &str, completion: u64| {
        json!({"id": "c", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 8, "completion_tokens": completion, "total_tokens": 8 + completion}})
        .to_string()
    };
    let ask = |n: u64| json!({"model": "gpt-4o", "max_tokens": 10, "n": n, "messages": [{"role": "user", "content": "hello world"}]});
    up.script(Scripted::respond(200, answer("Hello world", 99_999_999)));
    let r = post(&gw, "/v1/chat/completions", ask(1)).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    // Within the cap times the answers asked for: believed.
    up.script(Scripted::respond(200, answer("Hello world", 20)));
    let r = post(&gw, "/v1/chat/completions", ask(2)).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    let rows = sqlite_rows_after_shutdown(&mut gw).await;
    let got: Vec<_> = rows
        .iter()
        .map(|r| (r.prompt_tokens, r.completion_tokens, r.estimated))
        .collect();
    assert_eq!(got, [(2, 2, true), (8, 20, false)], "{rows:?}");
}

/// A background response streamed and cut before its `response.completed` (its client gone,
/// or the upstream's connection broken) runs on upstream, billed there: charged what its
/// reservation assumed, as a plain background request is, whatever its text or instructions
/// say (`response.failed` echoed in its instructions let it off). (It cost its prompt alone:
/// ten went through a $0.02 budget.)
#[tokio::test]
async fn a_background_stream_cut_before_its_end_is_charged_its_reservation() {
    let up = MockUpstream::start().await;
    let mut gw = Gateway::start(&config(
        &up,
        &keys(", budget: { usd: 0.03, period: daily }"),
    ))
    .await;
    let created = format!(
        "event: response.created\ndata: {}\n\n",
        json!({"type": "response.created", "response": {"id": "r", "status": "queued", "background": true, "error": null,
            "instructions": "response.failed", "metadata": {"type": "response.failed"}}})
    );
    let ask = json!({"model": "gpt-4o", "input": "hi", "background": true, "stream": true, "max_output_tokens": 1000});
    let mut statuses = Vec::new();
    for i in 0..3 {
        // Its client leaves; then the upstream's connection breaks off.
        up.script(Scripted::Stream {
            chunks: vec![
                (Duration::ZERO, created.clone()),
                (
                    Duration::from_secs(if i == 0 { 30 } else { 0 }),
                    created.clone(),
                ),
            ],
            end: if i == 0 {
                StreamEnd::Finish
            } else {
                StreamEnd::Abort
            },
        });
        let r = post(&gw, "/v1/responses", ask.clone()).await;
        statuses.push(r.status().as_u16());
        if r.status() == 200 && i == 0 {
            // The client reads the first event and leaves.
            let mut body = r.bytes_stream();
            assert!(body.next().await.unwrap().is_ok());
        } else if r.status() == 200 {
            // The client reads to the end: the gateway's error event after the break.
            let text = r.text().await.unwrap();
            assert!(text.contains("upstream_error"), "{text}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(statuses, [200, 200, 429]);
    let rows = sqlite_rows_after_shutdown(&mut gw).await;
    let charged: Vec<_> = rows.iter().filter(|r| r.status == 200).collect();
    assert_eq!(charged.len(), 2, "{rows:?}");
    for r in charged {
        assert_eq!((r.completion_tokens, r.estimated), (1000, true), "{r:?}");
    }
}

/// A transcription's usage whose `seconds` is not a number (`"30"`) is not believed: priced by
/// the length read from the file, marked estimated. (It cost 0, unmarked.)
#[tokio::test]
async fn a_transcription_whose_seconds_is_not_a_number_is_priced_by_the_file() {
    let up = MockUpstream::start().await;
    let config = config_with_routes(&up, WHISPER_ROUTE, &keys(""));
    let mut gw = Gateway::start(&config).await;
    up.script(Scripted::respond(
        200,
        json!({"text": "hi", "usage": {"type": "duration", "seconds": "30"}}).to_string(),
    ));
    let (status, body) = transcribe(&gw, wav(30.0), "json").await;
    assert_eq!(status, 200, "{body}");
    let rows = sqlite_rows_after_shutdown(&mut gw).await;
    assert_rows(&rows, "audio/transcriptions", &[(200, 0.003, true)]);
}

/// Honest usage is believed whatever cap field the upstream reads: llama.cpp reads
/// `n_predict` before `max_tokens`, so 150 tokens for `max_tokens: 10, n_predict: 150` (or
/// any number for `n_predict: -1`) is no more than was allowed. (It was disbelieved and
/// re-counted: 1 prompt token where the upstream said 5, marked estimated.) And a background
/// stream that ended (in `response.failed`) is counted as any stream, not charged its cap.
#[tokio::test]
async fn usage_within_n_predict_is_believed_and_an_ended_background_stream_is_not_charged_its_cap()
{
    let up = MockUpstream::start().await;
    let mut gw = Gateway::start(&config(&up, &keys(""))).await;
    let answer = json!({"id": "c", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "word ".repeat(150)}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 150, "total_tokens": 155}})
    .to_string();
    for n_predict in [150, -1] {
        up.script(Scripted::respond(200, answer.clone()));
        let r = post(
            &gw,
            "/v1/chat/completions",
            json!({"model": "gpt-4o", "max_tokens": 10, "n_predict": n_predict,
                "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    let event = |kind: &str, v: Value| format!("event: {kind}\ndata: {v}\n\n");
    up.script(Scripted::Stream {
        chunks: vec![
            (
                Duration::ZERO,
                event(
                    "response.created",
                    json!({"type": "response.created", "response": {"id": "r", "status": "queued", "error": null}}),
                ),
            ),
            (
                Duration::ZERO,
                event(
                    "response.failed",
                    json!({"type": "response.failed", "response": {"id": "r", "status": "failed", "usage": null,
                        "error": {"code": "server_error", "message": "failed"}}}),
                ),
            ),
        ],
        end: StreamEnd::Finish,
    });
    let r = post(
        &gw,
        "/v1/responses",
        json!({"model": "gpt-4o", "input": "hi", "background": true, "stream": true, "max_output_tokens": 4000}),
    )
    .await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    let rows = sqlite_rows_after_shutdown(&mut gw).await;
    let got: Vec<_> = rows
        .iter()
        .map(|r| (r.prompt_tokens, r.completion_tokens, r.estimated))
        .collect();
    assert_eq!(got[..2], [(5, 150, false), (5, 150, false)], "{rows:?}");
    assert!(got[2].1 < 4000 && got[2].2, "{rows:?}");
}
