//! The response cache, black-box: the real binary on a real port, a recording mock upstream
//! that counts what reaches it, the ledger read back after a clean shutdown and `/metrics`.
//! Every default mock answer has its own id (`chatcmpl-mock-N`), so a hit is recognisable by
//! carrying the id of the answer it was stored from.
//!
//! Not here (the Redis tier is not built): two gateways sharing a Redis serve each other's
//! answers; Redis stopped mid-test makes misses, not errors.

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
use upstream::{MockUpstream, Scripted, StreamEnd};

/// Client keys by name: `red1`, `red2` (team red), `blue1` (team blue), `solo`, `solo2` (no
/// team), `narrow` (may only use the route `plain`), `metered` (team red, 1 request a minute).
const KEYS: [(&str, &str, &str); 7] = [
    ("red1", "sk-cache-red1", "team: red"),
    ("red2", "sk-cache-red2", "team: red"),
    ("blue1", "sk-cache-blue1", "team: blue"),
    ("solo", "sk-cache-solo", ""),
    ("solo2", "sk-cache-solo2", ""),
    ("narrow", "sk-cache-narrow", "models: [plain]"),
    (
        "metered",
        "sk-cache-metered",
        "team: red, limits: { rpm: 1 }",
    ),
];

fn secret(name: &str) -> &'static str {
    KEYS.iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, s, _)| *s)
        .expect("a known key")
}

/// `cache` is the top-level `cache:` section (YAML flow map).
fn config(up: &MockUpstream, cache: &str) -> String {
    let keys: String = KEYS
        .iter()
        .map(|(name, s, extra)| {
            let extra = if extra.is_empty() {
                String::new()
            } else {
                format!(", {extra}")
            };
            format!(
                "  - {{ name: {name}, key: \"sha256:{}\"{extra} }}\n",
                sha256_hex(s)
            )
        })
        .collect();
    format!(
        r#"
cache: {cache}
providers:
  up: {{ kind: openai, base_url: "{u}/v1" }}
models:
  m:
    cache: {{ ttl: 30s }}
    pricing: {{ input_per_1m: 2.50, output_per_1m: 10.00 }}
    deployments: [ {{ provider: up, deployment: m-up }} ]
  m2:
    cache: {{ ttl: 30s }}
    pricing: {{ input_per_1m: 2.50, output_per_1m: 10.00 }}
    deployments: [ {{ provider: up, deployment: m-up }} ]
  short:
    cache: {{ ttl: 1s }}
    pricing: {{ input_per_1m: 2.50, output_per_1m: 10.00 }}
    deployments: [ {{ provider: up, deployment: m-up }} ]
  ttl2:
    cache: {{ ttl: 2s }}
    pricing: {{ input_per_1m: 2.50, output_per_1m: 10.00 }}
    deployments: [ {{ provider: up, deployment: m-up }} ]
  plain:
    pricing: {{ input_per_1m: 2.50, output_per_1m: 10.00 }}
    deployments: [ {{ provider: up, deployment: m-up }} ]
  emb:
    cache: {{ ttl: 30s }}
    pricing: {{ input_per_1m: 0.02, output_per_1m: 0 }}
    deployments: [ {{ provider: up, deployment: emb-up }} ]
routing: {{ allowed_fails: 100, retries: 0 }}
teams:
  red: {{}}
  blue: {{}}
keys:
{keys}"#,
        u = up.url()
    )
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// One answer as the client saw it.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// `x-switchyard-cache`, when the gateway sent one.
    cache: Option<String>,
    deployment: Option<String>,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    fn cache(&self) -> &str {
        self.cache.as_deref().unwrap_or("<none>")
    }
}

async fn send(gw: &Gateway, key: &str, path: &str, body: &Value, cache_control: &str) -> Answer {
    let mut req = client()
        .post(gw.url(path))
        .bearer_auth(secret(key))
        .json(body);
    if !cache_control.is_empty() {
        req = req.header("cache-control", cache_control);
    }
    let resp = req.send().await.unwrap();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    let cache = header("x-switchyard-cache");
    let deployment = header("x-switchyard-deployment");
    let status = resp.status().as_u16();
    Answer {
        status,
        cache,
        deployment,
        body: resp.text().await.unwrap(),
    }
}

async fn chat(gw: &Gateway, key: &str, body: &Value) -> Answer {
    send(gw, key, "/v1/chat/completions", body, "").await
}

fn ask(route: &str, text: &str) -> Value {
    json!({"model": route, "messages": [{"role": "user", "content": text}]})
}

/// A streamed chat request asking for usage.
fn ask_stream(route: &str, text: &str) -> Value {
    let mut q = ask(route, text);
    q["stream"] = json!(true);
    q["stream_options"] = json!({"include_usage": true});
    q
}

/// Scripts the upstream's next answer: a chat stream of `pieces` with usage, its events
/// 100 ms apart (so that identical requests sent at once find it in flight).
fn script_slow_stream(up: &MockUpstream, pieces: &[&str]) {
    let mut events = vec![upstream::chat_chunk(Some("assistant"), Some(""), None)];
    events.extend(
        pieces
            .iter()
            .map(|p| upstream::chat_chunk(None, Some(p), None)),
    );
    events.push(upstream::chat_chunk(None, None, Some("stop")));
    events.push(upstream::usage_chunk(5, 2));
    events.push("data: [DONE]\n\n".to_string());
    script_events(up, &events, 100);
}

/// Scripts the upstream's next answer: a stream of these writes, `delay_ms` apart.
fn script_events(up: &MockUpstream, writes: &[String], delay_ms: u64) {
    let refs: Vec<(u64, &str)> = writes.iter().map(|e| (delay_ms, e.as_str())).collect();
    up.script(Scripted::stream(&refs, StreamEnd::Finish));
}

/// The JSON data of every SSE event but `[DONE]`.
fn events(body: &str) -> Vec<Value> {
    body.split("\n\n")
        .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("event {d}: {e}")))
        .collect()
}

/// The text a client reassembles from a chat stream (choice 0).
fn stream_text(body: &str) -> String {
    events(body)
        .iter()
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect()
}

/// The usage chunk's usage, if the stream had one.
fn stream_usage(body: &str) -> Option<Value> {
    events(body)
        .into_iter()
        .find(|v| v["usage"].is_object())
        .map(|v| v["usage"].clone())
}

fn stream_finish(body: &str) -> Option<String> {
    events(body)
        .iter()
        .find_map(|v| v["choices"][0]["finish_reason"].as_str().map(String::from))
}

/// A sample's value on `/metrics`: the line of `name` whose labels include all of `labels`.
async fn metric(gw: &Gateway, name: &str, labels: &[(&str, &str)]) -> f64 {
    gw.metric(name, labels)
        .await
        .unwrap_or_else(|| panic!("no {name} {labels:?} on /metrics"))
}

/// Stops the gateway cleanly (the ledger is flushed at shutdown) and reads every row.
async fn rows_after_shutdown(gw: &mut Gateway) -> Vec<LedgerRow> {
    gw.signal("TERM");
    let status = gw
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("gateway exits");
    assert!(status.success(), "{}", gw.logs());
    let url = format!("sqlite://{}", gw.dir.path().join("switchyard.db").display());
    let store = Store::open(&url).await.unwrap();
    let rows = store.rows().await.unwrap();
    store.close().await;
    rows
}

/// A complete chat answer with usage, `content` as its text.
fn chat_answer(id: &str, content: &str) -> String {
    json!({"id": id, "object": "chat.completion", "created": 1, "model": "m-up",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}})
    .to_string()
}

/// An answer a fallback route made (the route asked for failing) is not kept under the route
/// asked for: once that is back, the same request gets its answer, not the fallback's for
/// the whole `ttl` (it was served from the cache, labelled as the route asked for).
#[tokio::test]
async fn a_fallbacks_answer_is_not_kept_under_the_route_asked_for() {
    let (up, down) = (MockUpstream::start().await, MockUpstream::start().await);
    let cfg = config(&up, "{}")
        .replace(
            "providers:\n",
            &format!(
                "providers:\n  down: {{ kind: openai, base_url: \"{}/v1\" }}\n",
                down.url()
            ),
        )
        .replace(
            "routing:",
            "  main:\n    cache: { ttl: 30s }\n    fallbacks: [plain]\n    \
             deployments: [ { provider: down, deployment: main-up } ]\n  \
             small: { cache: { ttl: 30s }, context_window: 5, context_fallbacks: [plain], \
             deployments: [ { provider: down, deployment: small-up } ] }\nrouting:",
        );
    let gw = Gateway::start(&cfg).await;
    let q = ask("main", "What is the capital of France?");
    down.script(Scripted::server_error(503));
    let first = chat(&gw, "red1", &q).await;
    assert_eq!(
        (first.status, first.deployment.as_deref()),
        (200, Some("up/m-up")),
        "{}",
        first.body
    );
    let again = chat(&gw, "red1", &q).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(
        (again.cache(), again.deployment.as_deref()),
        ("miss", Some("down/main-up")),
        "the route's own answer: {}",
        again.body
    );
    // The route's own answer is kept.
    let hit = chat(&gw, "red1", &q).await;
    assert_eq!((hit.cache(), down.request_count()), ("hit", 2));
    // A context fallback serves a long request whenever it comes: its answer is kept.
    let long = ask("small", &"a long question ".repeat(20));
    let first = chat(&gw, "red1", &long).await;
    assert_eq!(
        (first.cache(), first.deployment.as_deref()),
        ("miss", Some("up/m-up"))
    );
    let again = chat(&gw, "red1", &long).await;
    assert_eq!(again.cache(), "hit", "{}", again.body);
}

#[tokio::test]
async fn a_hit_is_served_without_the_upstream_costs_nothing_and_its_saving_is_counted() {
    not_near_a_minute_boundary().await;
    let up = MockUpstream::start().await;
    let mut gw = Gateway::start(&config(&up, "{}")).await;
    let q = ask("m", "What is the capital of France?");

    let first = chat(&gw, "red1", &q).await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.cache(), "miss");
    assert_eq!(first.deployment.as_deref(), Some("up/m-up"));
    assert_eq!(up.request_count(), 1);

    let second = chat(&gw, "red1", &q).await;
    assert_eq!(second.status, 200, "{}", second.body);
    assert_eq!(second.cache(), "hit");
    assert_eq!(second.deployment.as_deref(), Some("cache"));
    assert_eq!(up.request_count(), 1, "a hit does not reach the upstream");
    assert_eq!(second.json(), first.json(), "the hit is the stored answer");
    assert_eq!(second.json()["id"], "chatcmpl-mock-1");

    // A route without `cache:` and an operation the cache does not keep: no header.
    let plain = chat(&gw, "red1", &ask("plain", "What is the capital of France?")).await;
    assert_eq!((plain.status, plain.cache.as_deref()), (200, None));
    let responses = send(
        &gw,
        "red1",
        "/v1/responses",
        &json!({"model": "m", "input": "hi"}),
        "",
    )
    .await;
    assert_eq!(responses.status, 200, "{}", responses.body);
    assert_eq!(responses.cache, None, "responses are not cached");
    let responses = send(
        &gw,
        "red1",
        "/v1/responses",
        &json!({"model": "m", "input": "hi"}),
        "",
    )
    .await;
    assert_eq!(responses.cache, None);
    assert_eq!(up.request_count(), 4);

    // Embeddings are kept too.
    let e = json!({"model": "emb", "input": "cache me"});
    let e1 = send(&gw, "red1", "/v1/embeddings", &e, "").await;
    let e2 = send(&gw, "red1", "/v1/embeddings", &e, "").await;
    assert_eq!((e1.cache(), e2.cache()), ("miss", "hit"));
    assert_eq!(e1.json(), e2.json());
    assert_eq!(up.request_count(), 5);

    // A hit takes nothing from limits: `metered` may make one request a minute.
    let m1 = chat(&gw, "metered", &ask("m", "metered question")).await;
    assert_eq!((m1.status, m1.cache()), (200, "miss"));
    for _ in 0..3 {
        let again = chat(&gw, "metered", &ask("m", "metered question")).await;
        assert_eq!(
            (again.status, again.cache()),
            (200, "hit"),
            "{}",
            again.body
        );
    }
    let other = chat(&gw, "metered", &ask("m", "another question")).await;
    assert_eq!(other.status, 429, "the minute's one request was the miss");
    assert_eq!(up.request_count(), 6);

    // A key that may not use the route gets no answer from the cache either.
    let denied = chat(&gw, "narrow", &q).await;
    assert_eq!(denied.status, 403, "{}", denied.body);
    assert_eq!(denied.cache, None);

    // Metrics: the hits and misses of `m`, and what the hits saved.
    let hits = metric(
        &gw,
        "switchyard_cache_requests_total",
        &[("route", "m"), ("result", "hit")],
    )
    .await;
    let misses = metric(
        &gw,
        "switchyard_cache_requests_total",
        &[("route", "m"), ("result", "miss")],
    )
    .await;
    assert_eq!((hits, misses), (4.0, 3.0));
    let saved = metric(&gw, "switchyard_cache_saved_usd_total", &[("route", "m")]).await;

    let rows = rows_after_shutdown(&mut gw).await;
    let m_rows: Vec<&LedgerRow> = rows
        .iter()
        .filter(|r| &*r.route == "m" && r.endpoint == "chat/completions" && r.status == 200)
        .collect();
    assert_eq!(m_rows.len(), 6, "{rows:#?}");
    let (hit_rows, miss_rows): (Vec<&LedgerRow>, Vec<&LedgerRow>) =
        m_rows.iter().partition(|r| r.cache_hit);
    assert_eq!((hit_rows.len(), miss_rows.len()), (4, 2), "{rows:#?}");
    for r in &hit_rows {
        assert_eq!(r.cost_usd, 0.0, "a hit costs nothing: {r:?}");
        assert_eq!(&*r.deployment, "cache");
        assert_eq!((r.prompt_tokens, r.completion_tokens), (0, 0));
    }
    let france = miss_rows.iter().find(|r| &*r.key == "red1").unwrap();
    let metered = miss_rows.iter().find(|r| &*r.key == "metered").unwrap();
    assert!(france.cost_usd > 0.0 && !france.cache_hit);
    // One hit of the first answer, three of the metered one.
    let expected = france.cost_usd + 3.0 * metered.cost_usd;
    assert!(
        (saved - expected).abs() < 1e-12,
        "saved {saved}, the misses cost {expected}"
    );
    let emb_hits = rows.iter().filter(|r| &*r.route == "emb" && r.cache_hit);
    assert_eq!(emb_hits.count(), 1);
}

#[tokio::test]
async fn the_key_ignores_key_order_number_spelling_user_and_stream_options() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&config(&up, "{}")).await;
    let stored = chat(
        &gw,
        "red1",
        &serde_json::from_str(
            r#"{"model":"m","temperature":0,"max_tokens":50,"top_p":1.0,
                "messages":[{"role":"user","content":"canonical"}],"user":"alice"}"#,
        )
        .unwrap(),
    )
    .await;
    assert_eq!(stored.cache(), "miss");
    let id = stored.json()["id"].clone();

    // The same request, spelled differently: all hits on the stored answer.
    for same in [
        r#"{"messages":[{"content":"canonical","role":"user"}],"max_tokens":50,"top_p":1,"temperature":0,"model":"m"}"#,
        r#"{"model":"m","temperature":0.0,"max_tokens":50,"top_p":1.0,"messages":[{"role":"user","content":"canonical"}],"user":"bob"}"#,
        r#"  { "model" : "m" , "temperature" : 0 , "max_tokens" : 50 , "top_p" : 1e0 ,
             "messages" : [ { "role" : "user" , "content" : "canonical" } ] }  "#,
        r#"{"model":"m","temperature":0,"max_tokens":50,"top_p":1,"messages":[{"role":"user","content":"canonical"}],"stream":false,"stream_options":{"include_usage":false}}"#,
    ] {
        let a = chat(&gw, "red1", &serde_json::from_str(same).unwrap()).await;
        assert_eq!((a.status, a.cache()), (200, "hit"), "{same}: {}", a.body);
        assert_eq!(a.json()["id"], id, "{same}");
    }
    assert_eq!(up.request_count(), 1);

    // Anything else that can change the answer is another entry.
    for different in [
        r#"{"model":"m","temperature":0,"max_tokens":50,"top_p":1,"messages":[{"role":"user","content":"Canonical"}]}"#,
        r#"{"model":"m","temperature":0.5,"max_tokens":50,"top_p":1,"messages":[{"role":"user","content":"canonical"}]}"#,
        r#"{"model":"m","temperature":0,"max_tokens":51,"top_p":1,"messages":[{"role":"user","content":"canonical"}]}"#,
        r#"{"model":"m","temperature":0,"max_tokens":50,"top_p":1,"messages":[{"role":"system","content":"canonical"}]}"#,
        r#"{"model":"m","temperature":0,"max_tokens":50,"top_p":1,"messages":[{"role":"user","content":"canonical"}],"seed":7}"#,
        // Another route on the same upstream.
        r#"{"model":"m2","temperature":0,"max_tokens":50,"top_p":1,"messages":[{"role":"user","content":"canonical"}]}"#,
    ] {
        let a = chat(&gw, "red1", &serde_json::from_str(different).unwrap()).await;
        assert_eq!(
            (a.status, a.cache()),
            (200, "miss"),
            "{different}: {}",
            a.body
        );
        assert_ne!(a.json()["id"], id, "{different}");
    }
    assert_eq!(up.request_count(), 7);

    // The same body on another operation is another entry: completions with a `prompt`.
    let p = json!({"model": "m", "prompt": "canonical", "max_tokens": 5});
    let c1 = send(&gw, "red1", "/v1/completions", &p, "").await;
    let c2 = send(&gw, "red1", "/v1/completions", &p, "").await;
    assert_eq!((c1.cache(), c2.cache()), ("miss", "hit"), "{}", c1.body);
    assert_eq!(c1.json(), c2.json());
}

#[tokio::test]
async fn scope_team_by_default_keeps_teams_apart_and_a_key_without_team_to_itself() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&config(&up, "{}")).await;
    let q = ask("m", "scoped question");
    let mut seen = Vec::new();
    for (key, expected) in [
        ("red1", "miss"),
        ("red2", "hit"), // same team
        ("blue1", "miss"),
        ("blue1", "hit"),
        ("solo", "miss"), // no team: scoped to itself
        ("solo", "hit"),
        ("solo2", "miss"),
        ("red1", "hit"),
    ] {
        let a = chat(&gw, key, &q).await;
        assert_eq!((a.status, a.cache()), (200, expected), "{key}: {}", a.body);
        seen.push((key, a.json()["id"].as_str().unwrap().to_string()));
    }
    assert_eq!(up.request_count(), 4);
    let id_of = |k: &str| {
        seen.iter()
            .find(|(key, _)| *key == k)
            .map(|(_, id)| id.clone())
            .unwrap()
    };
    assert_eq!(seen[1].1, id_of("red1"), "red2 got red1's answer");
    assert_ne!(id_of("blue1"), id_of("red1"));
    assert_ne!(id_of("solo"), id_of("solo2"));
}

#[tokio::test]
async fn scope_key_keeps_every_key_apart() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&config(&up, "{ scope: key }")).await;
    let q = ask("m", "per-key question");
    for (key, expected) in [
        ("red1", "miss"),
        ("red2", "miss"), // same team, another key
        ("red1", "hit"),
        ("red2", "hit"),
        ("solo", "miss"),
    ] {
        let a = chat(&gw, key, &q).await;
        assert_eq!((a.status, a.cache()), (200, expected), "{key}: {}", a.body);
    }
    assert_eq!(up.request_count(), 3);
}

#[tokio::test]
async fn scope_global_shares_answers_between_everyone() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&config(&up, "{ scope: global }")).await;
    let q = ask("m", "shared question");
    let first = chat(&gw, "red1", &q).await;
    assert_eq!(first.cache(), "miss");
    for key in ["red2", "blue1", "solo", "solo2"] {
        let a = chat(&gw, key, &q).await;
        assert_eq!((a.status, a.cache()), (200, "hit"), "{key}: {}", a.body);
        assert_eq!(a.json(), first.json());
    }
    assert_eq!(up.request_count(), 1);
}

#[tokio::test]
async fn entries_expire_after_their_routes_ttl() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&config(&up, "{}")).await;
    let short = ask("short", "ttl question");
    let long = ask("m", "ttl question");
    assert_eq!(chat(&gw, "red1", &short).await.cache(), "miss");
    assert_eq!(chat(&gw, "red1", &long).await.cache(), "miss");
    assert_eq!(chat(&gw, "red1", &short).await.cache(), "hit");
    assert_eq!(chat(&gw, "red1", &long).await.cache(), "hit");
    assert_eq!(up.request_count(), 2);

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let expired = chat(&gw, "red1", &short).await;
    assert_eq!(
        (expired.status, expired.cache()),
        (200, "miss"),
        "ttl 1s, 1.5s later"
    );
    assert_eq!(
        chat(&gw, "red1", &long).await.cache(),
        "hit",
        "ttl 30s: still there"
    );
    assert_eq!(up.request_count(), 3);
    // The fresh answer is stored again.
    let again = chat(&gw, "red1", &short).await;
    assert_eq!(again.cache(), "hit");
    assert_eq!(again.json(), expired.json());
}

// Fails: `PerEntryTtl` (src/cache/mod.rs) implements only `expire_after_create`; moka's default
// `expire_after_update` keeps the old entry's remaining time, so an answer stored over an
// existing one (`Cache-Control: no-cache`) expires when the one it replaced would have.
#[tokio::test]

async fn a_no_cache_refresh_lives_its_own_ttl() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&config(&up, "{}")).await;
    let q = ask("ttl2", "refreshed question");
    assert_eq!(chat(&gw, "red1", &q).await.cache(), "miss");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Replaces the stored answer: it is kept for the route's 2s from now.
    let fresh = send(&gw, "red1", "/v1/chat/completions", &q, "no-cache").await;
    assert_eq!(fresh.cache(), "skip");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // 2.4s after the first answer, 1.2s after the refresh.
    let a = chat(&gw, "red1", &q).await;
    assert_eq!(
        a.cache(),
        "hit",
        "the refreshed answer expired with the one it replaced"
    );
    assert_eq!(a.json(), fresh.json());
}

/// An embeddings request whose answer is about 2.3 KB (400 dimensions in base64).
fn big_embedding(input: &str) -> Value {
    json!({"model": "emb", "input": input, "dimensions": 400, "encoding_format": "base64"})
}

/// What an answer weighs in the cache: its JSON and 128 bytes.
fn weight(a: &Answer) -> usize {
    a.body.len() + 128
}

#[tokio::test]
async fn the_cache_holds_no_more_than_max_bytes() {
    const MAX: usize = 10 * 1024;
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&config(&up, "{ max_bytes: 10KiB }")).await;
    let get = |input: String| {
        let gw = &gw;
        async move { send(gw, "red1", "/v1/embeddings", &big_embedding(&input), "").await }
    };
    const N: usize = 12;
    for i in 0..N {
        let a = get(format!("text {i:02}")).await;
        assert_eq!((a.status, a.cache()), (200, "miss"), "{}", a.body);
        assert!((2200..2500).contains(&weight(&a)), "{}", weight(&a));
    }
    assert_eq!(up.request_count(), N);
    // The cache settles its size lazily, on its operations after a short while.
    for poke in ["poke 1", "poke 2"] {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let p = json!({"model": "emb", "input": poke});
        send(&gw, "red1", "/v1/embeddings", &p, "").await;
    }

    // Ask for the twelve again: only what fits in 10 KiB can still be there (four of them).
    // A miss here stores again, which can only push others out: the hits counted never
    // weigh more than the cache holds.
    let mut held = 0;
    let mut hits = Vec::new();
    for i in 0..N {
        let a = get(format!("text {i:02}")).await;
        assert_eq!(a.status, 200);
        if a.cache() == "hit" {
            held += weight(&a);
            hits.push(i);
        } else {
            assert_eq!(a.cache(), "miss");
        }
    }
    assert!(held <= MAX, "hits {hits:?} weigh {held} bytes > {MAX}");
    assert!(hits.len() <= 4, "{hits:?}");
    // What the cache says it holds, on /metrics: within the budget, and not nothing.
    let bytes = metric(&gw, "switchyard_cache_bytes", &[]).await;
    let entries = metric(&gw, "switchyard_cache_entries", &[]).await;
    assert!(
        bytes > 0.0 && bytes <= MAX as f64,
        "switchyard_cache_bytes {bytes}"
    );
    // (The two small pokes may be held too.)
    assert!(
        (1.0..=6.0).contains(&entries),
        "switchyard_cache_entries {entries}"
    );

    // When full, a new answer gets in by being asked for more often than what it pushes
    // out (moka's TinyLFU admission): ask one until it is kept.
    let mut in_a_row = 0;
    let mut newcomer = 0;
    for _ in 0..20 {
        let a = get("newcomer".to_string()).await;
        assert_eq!(a.status, 200);
        newcomer = weight(&a);
        in_a_row = if a.cache() == "hit" { in_a_row + 1 } else { 0 };
        if in_a_row == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert_eq!(
        in_a_row, 2,
        "the newcomer asked twenty times was never kept"
    );
    // It pushed older answers out: with it, at most three of the twelve still fit.
    let mut held = newcomer;
    let mut hits = Vec::new();
    for i in 0..N {
        let a = get(format!("text {i:02}")).await;
        if a.cache() == "hit" {
            held += weight(&a);
            hits.push(i);
        }
    }
    assert!(
        held <= MAX,
        "the newcomer and {hits:?} weigh {held} bytes > {MAX}"
    );
    assert!(hits.len() <= 3, "{hits:?}");
}

/// A full cache takes in only answers asked for before (TinyLFU's doorkeeper): one asked for
/// the first time is answered, counted as declined and not stored; asked for again, it is
/// stored (and served from the cache the time after).
#[tokio::test]
async fn a_full_cache_declines_an_answer_asked_for_once_and_keeps_one_asked_for_twice() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&config(&up, "{ max_bytes: 10KiB }")).await;
    let get = |input: String| {
        let gw = &gw;
        async move { send(gw, "red1", "/v1/embeddings", &big_embedding(&input), "").await }
    };
    for i in 0..6 {
        let a = get(format!("filler {i}")).await;
        assert_eq!((a.status, a.cache()), (200, "miss"), "{}", a.body);
    }
    // A scrape settles the cache's size: it is full now (three or four answers of ~2.5 KB).
    let entries = metric(&gw, "switchyard_cache_entries", &[]).await;
    assert!((3.0..=4.0).contains(&entries), "{entries} entries");
    let declined = metric(&gw, "switchyard_cache_declined_total", &[]).await;

    for i in 0..3 {
        let a = get(format!("once {i}")).await;
        assert_eq!((a.status, a.cache()), (200, "miss"), "{}", a.body);
        assert!(
            a.body.contains("\"embedding\""),
            "answered in full: {}",
            a.body
        );
    }
    assert_eq!(
        metric(&gw, "switchyard_cache_declined_total", &[]).await,
        declined + 3.0,
        "three answers asked for once, none stored"
    );
    let upstream_before = up.request_count();
    let again = get("once 1".to_string()).await;
    assert_eq!(again.cache(), "miss", "asked for once, it was not kept");
    assert_eq!(up.request_count(), upstream_before + 1);
    assert_eq!(
        metric(&gw, "switchyard_cache_declined_total", &[]).await,
        declined + 3.0,
        "asked for a second time, it is offered to the cache"
    );
    // Offered, it gets in by being asked for more often than what it pushes out (moka's
    // TinyLFU admission, settled lazily): it is served from the cache within a few asks.
    let mut asks = 0;
    loop {
        asks += 1;
        let a = get("once 1".to_string()).await;
        if a.cache() == "hit" {
            assert_eq!(a.json(), again.json());
            break;
        }
        assert!(asks < 10, "asked for {asks} times more, never kept");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `Cache-Control: no-cache` replaces the stored answer even when the cache is full and the
/// request is new to it (the doorkeeper has forgotten it): a refresh is never declined.
#[tokio::test]
async fn no_cache_refreshes_an_answer_in_a_full_cache_that_has_forgotten_the_request() {
    let up = MockUpstream::start().await;
    // 4 KiB: a few chat answers; the doorkeeper is cleared after 6 new requests.
    let gw = Gateway::start(&config(&up, "{ max_bytes: 4KiB }")).await;
    let first = chat(&gw, "red1", &ask("m", "kept")).await;
    assert_eq!(first.cache(), "miss");
    fill_until_it_declines(&gw).await;
    // More new requests than the doorkeeper remembers.
    for i in 0..8 {
        chat(&gw, "red1", &ask("m", &format!("more {i}"))).await;
    }
    let hit = chat(&gw, "red1", &ask("m", "kept")).await;
    assert_eq!(hit.cache(), "hit", "still held");
    assert_eq!(hit.json(), first.json());

    let path = "/v1/chat/completions";
    let fresh = send(&gw, "red1", path, &ask("m", "kept"), "no-cache").await;
    assert_eq!(fresh.cache(), "skip");
    assert_ne!(fresh.json()["id"], first.json()["id"], "a new answer");
    let after = chat(&gw, "red1", &ask("m", "kept")).await;
    assert_eq!(after.cache(), "hit");
    assert_eq!(
        after.json()["id"],
        fresh.json()["id"],
        "the fresh answer replaced the old one"
    );
}

/// Fills the route `m`'s cache with new answers, its size settled after each one (a scrape
/// settles it), until it declines one.
async fn fill_until_it_declines(gw: &Gateway) {
    let mut filler = 0;
    while metric(gw, "switchyard_cache_declined_total", &[]).await == 0.0 {
        assert!(filler < 30, "never full");
        let a = chat(gw, "red1", &ask("m", &format!("filler {filler}"))).await;
        assert_eq!((a.status, a.cache()), (200, "miss"));
        filler += 1;
    }
}

/// Streams in a full cache: one asked for the first time is answered in full and declined
/// (the gateway does not assemble an entry it would not keep); asked again, it is offered;
/// and identical streams waiting for one in flight still get it from the one upstream call,
/// though the full cache does not keep it.
#[tokio::test]
async fn a_full_cache_declines_a_new_stream_yet_hands_it_to_the_streams_waiting_for_it() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&config(&up, "{ max_bytes: 4KiB }")).await;
    let declined = || metric(&gw, "switchyard_cache_declined_total", &[]);
    fill_until_it_declines(&gw).await;

    let before = declined().await;
    let once = chat(&gw, "red1", &ask_stream("m", "streamed once")).await;
    assert_eq!((once.status, once.cache()), (200, "miss"));
    assert_eq!(stream_text(&once.body), upstream::MOCK_TEXT);
    assert!(stream_usage(&once.body).is_some());
    assert!(once.body.ends_with("data: [DONE]\n\n"));
    assert_eq!(declined().await, before + 1.0, "declined, not stored");
    let again = chat(&gw, "red1", &ask_stream("m", "streamed once")).await;
    assert_eq!(again.cache(), "miss", "it was not kept");
    assert_eq!(declined().await, before + 1.0, "asked again, it is offered");

    script_slow_stream(&up, &["Shar", "ed"]);
    let calls = up.request_count();
    let waited_for = ask_stream("m", "waited for");
    let answers = join_all((0..6).map(|_| chat(&gw, "red1", &waited_for))).await;
    assert_eq!(up.request_count(), calls + 1, "{answers:#?}");
    assert_eq!(answers.iter().filter(|a| a.cache() == "miss").count(), 1);
    for a in &answers {
        assert_eq!(a.status, 200);
        assert_eq!(stream_text(&a.body), "Shared");
        assert_eq!(a.body, answers[0].body);
    }
}

#[tokio::test]
async fn cache_control_no_cache_skips_the_lookup_and_stores_no_store_does_neither() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&config(&up, "{}")).await;
    let q = ask("m", "directive question");
    let path = "/v1/chat/completions";

    let a = send(&gw, "red1", path, &q, "no-store").await;
    assert_eq!((a.status, a.cache()), (200, "skip"));
    let b = chat(&gw, "red1", &q).await;
    assert_eq!(b.cache(), "miss", "no-store stored nothing");
    assert_ne!(b.json()["id"], a.json()["id"]);
    let c = send(&gw, "red1", path, &q, "no-store").await;
    assert_eq!(c.cache(), "skip", "no-store does not read either");
    assert_ne!(c.json()["id"], b.json()["id"]);
    assert_eq!(
        chat(&gw, "red1", &q).await.json(),
        b.json(),
        "b still stored"
    );

    let d = send(&gw, "red1", path, &q, "no-cache").await;
    assert_eq!(d.cache(), "skip");
    assert_ne!(d.json()["id"], b.json()["id"], "no-cache went upstream");
    let e = chat(&gw, "red1", &q).await;
    assert_eq!(e.cache(), "hit");
    assert_eq!(e.json(), d.json(), "no-cache stored its fresh answer");

    // Directives are case-insensitive and may come with others.
    let f = send(&gw, "red1", path, &q, "max-age=0, No-Cache").await;
    assert_eq!(f.cache(), "skip");
    assert_eq!(up.request_count(), 5);
}

#[tokio::test]
async fn a_streamed_answer_is_stored_and_replayed_to_streams_and_plain_requests() {
    let up = MockUpstream::start().await;
    let mut gw = Gateway::start(&config(&up, "{}")).await;
    let mut stream_q = ask("m", "stream me");
    stream_q["stream"] = json!(true);
    stream_q["stream_options"] = json!({"include_usage": true});

    let original = chat(&gw, "red1", &stream_q).await;
    assert_eq!((original.status, original.cache()), (200, "miss"));
    let text = stream_text(&original.body);
    assert_eq!(text, upstream::MOCK_TEXT);
    let usage = stream_usage(&original.body).expect("the usage chunk");
    assert!(original.body.ends_with("data: [DONE]\n\n"));

    // Streamed again, with usage: the same events, byte for byte.
    let replay = chat(&gw, "red1", &stream_q).await;
    assert_eq!((replay.status, replay.cache()), (200, "hit"));
    assert_eq!(stream_text(&replay.body), text);
    assert_eq!(stream_usage(&replay.body), Some(usage.clone()));
    assert_eq!(stream_finish(&replay.body).as_deref(), Some("stop"));
    assert_eq!(replay.body, original.body);

    // Streamed without asking for usage: the usage chunk is left out.
    let mut no_usage_q = stream_q.clone();
    no_usage_q.as_object_mut().unwrap().remove("stream_options");
    let quiet = chat(&gw, "red1", &no_usage_q).await;
    assert_eq!(quiet.cache(), "hit");
    assert_eq!(stream_text(&quiet.body), text);
    assert_eq!(stream_usage(&quiet.body), None);
    assert!(quiet.body.ends_with("data: [DONE]\n\n"));
    assert_eq!(events(&quiet.body).len(), events(&original.body).len() - 1);

    // Asked as a plain request: one JSON answer with the same text, usage and id.
    let whole = chat(&gw, "red1", &ask("m", "stream me")).await;
    assert_eq!(
        (whole.status, whole.cache()),
        (200, "hit"),
        "{}",
        whole.body
    );
    let v = whole.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], text.as_str());
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"], usage);
    assert_eq!(v["id"], events(&original.body)[0]["id"]);
    assert_eq!(up.request_count(), 1);

    // The other way round: a plain answer replayed as a stream.
    let plain = chat(&gw, "red1", &ask("m", "plain first")).await;
    assert_eq!(plain.cache(), "miss");
    let pv = plain.json();
    let mut as_stream = ask("m", "plain first");
    as_stream["stream"] = json!(true);
    as_stream["stream_options"] = json!({"include_usage": true});
    let s = chat(&gw, "red1", &as_stream).await;
    assert_eq!((s.status, s.cache()), (200, "hit"));
    assert_eq!(stream_text(&s.body), pv["choices"][0]["message"]["content"]);
    assert_eq!(stream_usage(&s.body), Some(pv["usage"].clone()));
    assert_eq!(stream_finish(&s.body).as_deref(), Some("stop"));
    assert!(s.body.ends_with("data: [DONE]\n\n"));
    as_stream.as_object_mut().unwrap().remove("stream_options");
    let s = chat(&gw, "red1", &as_stream).await;
    assert_eq!(s.cache(), "hit");
    assert_eq!(stream_text(&s.body), pv["choices"][0]["message"]["content"]);
    assert_eq!(stream_usage(&s.body), None);

    // A stream whose client did not ask for usage is stored with the usage the gateway asked
    // for: a later client that asks gets it.
    let mut quiet_first = ask("m", "quiet first");
    quiet_first["stream"] = json!(true);
    let q1 = chat(&gw, "red1", &quiet_first).await;
    assert_eq!((q1.cache(), stream_usage(&q1.body)), ("miss", None));
    quiet_first["stream_options"] = json!({"include_usage": true});
    let q2 = chat(&gw, "red1", &quiet_first).await;
    assert_eq!(q2.cache(), "hit");
    assert_eq!(stream_text(&q2.body), stream_text(&q1.body));
    let q_usage = stream_usage(&q2.body).expect("the stored usage chunk");
    assert_eq!(q_usage["completion_tokens"], upstream::COMPLETION_TOKENS);
    assert_eq!(up.request_count(), 3);

    // The ledger: three misses that cost, six hits that cost nothing.
    let rows = rows_after_shutdown(&mut gw).await;
    let hits: Vec<&LedgerRow> = rows.iter().filter(|r| r.cache_hit).collect();
    let misses: Vec<&LedgerRow> = rows.iter().filter(|r| !r.cache_hit).collect();
    assert_eq!((hits.len(), misses.len()), (6, 3), "{rows:#?}");
    assert!(hits.iter().all(|r| r.cost_usd == 0.0 && r.status == 200));
    assert!(misses.iter().all(|r| r.cost_usd > 0.0));
}

#[tokio::test]
async fn a_stream_cut_into_odd_pieces_upstream_is_stored_whole() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&config(&up, "{}")).await;
    let all = [
        upstream::chat_chunk(Some("assistant"), Some(""), None),
        upstream::chat_chunk(None, Some("Pie"), None),
        upstream::chat_chunk(None, Some("ces"), None),
        upstream::chat_chunk(None, None, Some("stop")),
        upstream::usage_chunk(7, 3),
        "data: [DONE]\n\n".to_string(),
    ]
    .concat();
    // Writes that end in the middle of events.
    let cuts = [0, 17, 150, 151, 400, 401, 402, all.len() - 3, all.len()];
    let pieces: Vec<(u64, &str)> = cuts.windows(2).map(|w| (5, &all[w[0]..w[1]])).collect();
    up.script(Scripted::stream(&pieces, StreamEnd::Finish));
    let mut q = ask("m", "odd pieces");
    q["stream"] = json!(true);
    q["stream_options"] = json!({"include_usage": true});
    let first = chat(&gw, "red1", &q).await;
    assert_eq!((first.status, first.cache()), (200, "miss"));
    assert_eq!(stream_text(&first.body), "Pieces");
    let second = chat(&gw, "red1", &q).await;
    assert_eq!(second.cache(), "hit");
    assert_eq!(second.body, first.body);
    let whole = chat(&gw, "red1", &ask("m", "odd pieces")).await;
    assert_eq!(whole.cache(), "hit");
    assert_eq!(whole.json()["choices"][0]["message"]["content"], "Pieces");
    assert_eq!(whole.json()["usage"]["prompt_tokens"], 7);
    assert_eq!(up.request_count(), 1);
}

#[tokio::test]
async fn failures_cut_streams_and_answers_without_usage_are_not_stored() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&config(&up, "{}")).await;

    // An upstream error.
    up.script(Scripted::server_error(500));
    let q = ask("m", "fails first");
    let a = chat(&gw, "red1", &q).await;
    assert!(a.status >= 500, "{}", a.body);
    let b = chat(&gw, "red1", &q).await;
    assert_eq!((b.status, b.cache()), (200, "miss"), "{}", b.body);
    let c = chat(&gw, "red1", &q).await;
    assert_eq!(c.cache(), "hit");

    // A stream that breaks off: the client gets an error event, nothing is stored.
    up.script(Scripted::stream(
        &[
            (0, &upstream::chat_chunk(Some("assistant"), Some(""), None)),
            (5, &upstream::chat_chunk(None, Some("Half"), None)),
        ],
        StreamEnd::Abort,
    ));
    let mut s = ask("m", "breaks off");
    s["stream"] = json!(true);
    let cut = chat(&gw, "red1", &s).await;
    assert_eq!(cut.status, 200);
    assert!(cut.body.contains("\"error\""), "{}", cut.body);
    let whole = chat(&gw, "red1", &s).await;
    assert_eq!(whole.cache(), "miss");
    assert_eq!(stream_text(&whole.body), upstream::MOCK_TEXT);
    assert_eq!(chat(&gw, "red1", &s).await.cache(), "hit");

    // An answer without usage (the gateway would only estimate it) is not kept.
    let mut no_usage: Value = serde_json::from_str(&chat_answer("no-usage", "hi")).unwrap();
    no_usage.as_object_mut().unwrap().remove("usage");
    up.script(Scripted::respond(200, no_usage.to_string()));
    let n = ask("m", "no usage");
    let n1 = chat(&gw, "red1", &n).await;
    assert_eq!(
        (n1.cache(), n1.json()["id"].as_str()),
        ("miss", Some("no-usage"))
    );
    let n2 = chat(&gw, "red1", &n).await;
    assert_eq!(n2.cache(), "miss");
    assert_ne!(n2.json()["id"], "no-usage");
    assert_eq!(up.request_count(), 6);
}

/// A completed stream is stored as its events alone: one whose events add up to no JSON
/// answer (a choice that is not an object) is replayed to streams as it came, and a plain
/// request for it goes upstream (a miss, storing nothing over it). A stream with an error
/// event is not stored, even when `[DONE]` follows.
#[tokio::test]
async fn a_stored_stream_is_assembled_only_for_a_plain_request() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&config(&up, "{}")).await;
    let odd = [
        upstream::chat_chunk(Some("assistant"), Some(""), None),
        upstream::chat_chunk(None, Some("Hello"), None),
        "data: {\"id\":\"chatcmpl-odd\",\"object\":\"chat.completion.chunk\",\"choices\":[7]}\n\n"
            .to_string(),
        upstream::chat_chunk(None, None, Some("stop")),
        upstream::usage_chunk(5, 2),
        "data: [DONE]\n\n".to_string(),
    ];
    script_events(&up, &odd, 0);
    let s = ask_stream("m", "odd");
    let first = chat(&gw, "red1", &s).await;
    assert_eq!(
        (first.status, first.cache()),
        (200, "miss"),
        "{}",
        first.body
    );
    let again = chat(&gw, "red1", &s).await;
    assert_eq!(again.cache(), "hit");
    assert_eq!(again.body, first.body);
    let plain = ask("m", "odd");
    for _ in 0..2 {
        let p = chat(&gw, "red1", &plain).await;
        assert_eq!((p.status, p.cache()), (200, "miss"), "{}", p.body);
        assert_eq!(p.json()["object"], "chat.completion", "{}", p.body);
    }
    assert_eq!(chat(&gw, "red1", &s).await.cache(), "hit");
    assert_eq!(up.request_count(), 3);

    let failed = [
        upstream::chat_chunk(Some("assistant"), Some(""), None),
        upstream::chat_chunk(None, Some("Hel"), None),
        "data: {\"error\" : {\"message\":\"overloaded\",\"type\":\"server_error\"}}\n\n"
            .to_string(),
        upstream::usage_chunk(5, 1),
        "data: [DONE]\n\n".to_string(),
    ];
    script_events(&up, &failed, 0);
    let s = ask_stream("m", "fails midway");
    let first = chat(&gw, "red1", &s).await;
    assert!(first.body.contains("overloaded"), "{}", first.body);
    let second = chat(&gw, "red1", &s).await;
    assert_eq!(second.cache(), "miss");
    assert_eq!(stream_text(&second.body), upstream::MOCK_TEXT);
}

/// A stream framed with `\r\n` (as Python servers send it), with `\r` alone, or with each
/// JSON over several `data:` lines, several events to a write, is stored and replayed event
/// by event: a plain hit gets its whole text and usage, a streamed hit without
/// `include_usage` no usage chunk.
#[tokio::test]
async fn a_crlf_or_cr_stream_packed_in_few_writes_is_stored_event_by_event() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&config(&up, "{}")).await;
    // The third: each JSON over two `data:` lines (joined by a newline, it is the same).
    for (n, (end, split)) in [("\r\n\r\n", false), ("\r\r", false), ("\n\n", true)]
        .into_iter()
        .enumerate()
    {
        let prompt = format!("framed {end:?} {split}");
        let frame = |e: String| {
            let e = if split {
                e.replace("data: {", "data: {\ndata: ")
            } else {
                e
            };
            e.replace("\n\n", end)
        };
        let packed = [
            frame(upstream::chat_chunk(Some("assistant"), Some(""), None))
                + &frame(upstream::chat_chunk(None, Some("Hello"), None))
                + &frame(upstream::chat_chunk(None, Some(" world"), None)),
            frame(upstream::chat_chunk(None, None, Some("stop")))
                + &frame(upstream::usage_chunk(5, 2)),
            frame("data: [DONE]\n\n".to_string()),
        ];
        script_events(&up, &packed, 5);
        let first = chat(&gw, "red1", &ask_stream("m", &prompt)).await;
        assert_eq!(
            (first.status, first.cache()),
            (200, "miss"),
            "{}",
            first.body
        );
        let plain = chat(&gw, "red1", &ask("m", &prompt)).await;
        assert_eq!(plain.cache(), "hit", "{end:?}: {}", plain.body);
        let v = plain.json();
        assert_eq!(v["choices"][0]["message"]["content"], "Hello world", "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 2, "{v}");
        let mut quiet = ask("m", &prompt);
        quiet["stream"] = json!(true);
        let replay = chat(&gw, "red1", &quiet).await;
        assert_eq!(replay.cache(), "hit");
        assert_eq!(
            stream_text(&replay.body.replace(end, "\n\n").replace("{\ndata: ", "{")),
            "Hello world"
        );
        assert!(!replay.body.contains("\"usage\":{"), "{}", replay.body);
        assert_eq!(up.request_count(), n + 1);
    }
}

/// The OpenAI SDKs close a stream's response at its `[DONE]`, whether or not the upstream's
/// body has ended: such a stream is complete for its client, stored, and logged complete.
#[tokio::test]
async fn a_stream_its_client_leaves_at_done_is_stored() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&config(&up, "{}")).await;
    // The second `[DONE]` event has a `retry:` line after its data (sse-starlette's way).
    for (n, done) in ["data: [DONE]\n\n", "data: [DONE]\nretry: 3000\n\n"]
        .into_iter()
        .enumerate()
    {
        let mut writes: Vec<(u64, String)> = [
            upstream::chat_chunk(Some("assistant"), Some(""), None),
            upstream::chat_chunk(None, Some("Left at done"), None),
            upstream::chat_chunk(None, None, Some("stop")),
            upstream::usage_chunk(5, 3),
            done.to_string(),
        ]
        .into_iter()
        .map(|e| (5, e))
        .collect();
        // The upstream's body ends well after its `[DONE]`.
        writes.push((2_000, ": bye\n\n".to_string()));
        let refs: Vec<(u64, &str)> = writes.iter().map(|(d, e)| (*d, e.as_str())).collect();
        up.script(Scripted::stream(&refs, StreamEnd::Finish));
        let q = ask_stream("m", &format!("left at done {n}"));
        let resp = client()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(secret("red1"))
            .json(&q)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.bytes_stream();
        let mut got = String::new();
        while let Some(chunk) = body.next().await {
            got.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
            if got.contains(done) {
                break;
            }
        }
        drop(body);
        let complete = |l: &str| {
            l.lines()
                .filter(|l| l.contains("outcome=complete") && l.contains("stream=true"))
                .count()
        };
        assert!(
            // This miss, and each earlier round's miss and hit.
            gw.wait_log(|l| complete(l) == 2 * n + 1, Duration::from_secs(1))
                .await,
            "{}",
            gw.logs()
        );
        let again = chat(&gw, "red1", &q).await;
        assert_eq!(again.cache(), "hit", "{done:?}: {}", again.body);
        assert_eq!(stream_text(&again.body), "Left at done");
        assert_eq!(up.request_count(), n + 1);
    }
}

/// An upstream whose connection breaks after its `[DONE]` (before the body's proper end)
/// has sent a whole stream: its client gets no error event, and it is stored.
#[tokio::test]
async fn a_break_after_done_ends_the_stream_cleanly() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&config(&up, "{}")).await;
    let events = [
        upstream::chat_chunk(Some("assistant"), Some(""), None),
        upstream::chat_chunk(None, Some("Whole"), None),
        upstream::chat_chunk(None, None, Some("stop")),
        upstream::usage_chunk(5, 1),
        "data: [DONE]\n\n".to_string(),
    ];
    let refs: Vec<(u64, &str)> = events.iter().map(|e| (2, e.as_str())).collect();
    up.script(Scripted::stream(&refs, StreamEnd::Abort));
    let q = ask_stream("m", "broken after done");
    let first = chat(&gw, "red1", &q).await;
    assert_eq!((first.status, first.cache()), (200, "miss"));
    assert!(
        first.body.trim_end().ends_with("data: [DONE]"),
        "{}",
        first.body
    );
    assert!(!first.body.contains("\"error\""), "{}", first.body);
    let again = chat(&gw, "red1", &q).await;
    assert_eq!(again.cache(), "hit", "{}", again.body);
    assert_eq!(stream_text(&again.body), "Whole");
    assert_eq!(up.request_count(), 1);
}

/// A plain request served from a stored Azure stream gets what Azure's plain answer has
/// beside the text: the prompt's filter results, each choice's, its logprobs.
#[tokio::test]
async fn a_plain_hit_from_a_stored_stream_keeps_filter_results_and_logprobs() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&config(&up, "{}")).await;
    let events = [
        r#"{"id":"","object":"","created":0,"model":"","choices":[],"prompt_filter_results":[{"prompt_index":0,"content_filter_results":{"hate":{"filtered":false,"severity":"safe"}}}]}"#,
        r#"{"id":"chatcmpl-az","object":"chat.completion.chunk","created":9,"model":"gpt-4o","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":{"content":[],"refusal":null},"finish_reason":null}]}"#,
        r#"{"id":"chatcmpl-az","object":"chat.completion.chunk","created":9,"model":"gpt-4o","choices":[{"index":0,"delta":{"content":"Hi"},"logprobs":{"content":[{"token":"Hi","logprob":-0.5,"bytes":[72,105],"top_logprobs":[]}],"refusal":null},"finish_reason":"stop","content_filter_results":{"hate":{"filtered":false,"severity":"safe"}}}]}"#,
        r#"{"id":"chatcmpl-az","object":"chat.completion.chunk","created":9,"model":"gpt-4o","choices":[],"usage":{"prompt_tokens":4,"completion_tokens":1,"total_tokens":5}}"#,
        "[DONE]",
    ]
    .map(|e| format!("data: {e}\n\n"));
    script_events(&up, &events, 2);
    let mut q = ask_stream("m", "azure with logprobs");
    q["logprobs"] = json!(true);
    let first = chat(&gw, "red1", &q).await;
    assert_eq!(
        (first.status, first.cache()),
        (200, "miss"),
        "{}",
        first.body
    );
    let mut plain = ask("m", "azure with logprobs");
    plain["logprobs"] = json!(true);
    let hit = chat(&gw, "red1", &plain).await;
    assert_eq!(hit.cache(), "hit", "{}", hit.body);
    let v = hit.json();
    assert_eq!(
        (&v["id"], &v["created"], &v["model"]),
        (&json!("chatcmpl-az"), &json!(9), &json!("gpt-4o")),
        "{v}"
    );
    assert_eq!(
        v["prompt_filter_results"][0]["content_filter_results"]["hate"]["severity"], "safe",
        "{v}"
    );
    let c = &v["choices"][0];
    assert_eq!(
        c["message"],
        json!({"role": "assistant", "content": "Hi", "refusal": null})
    );
    assert_eq!(c["logprobs"]["content"][0]["token"], "Hi", "{v}");
    assert_eq!(
        c["content_filter_results"]["hate"]["filtered"], false,
        "{v}"
    );
    assert_eq!(v["usage"]["total_tokens"], 5);
    assert_eq!(up.request_count(), 1);
}

#[tokio::test]
async fn ten_concurrent_identical_requests_reach_the_upstream_once() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&config(&up, "{}")).await;
    up.script(Scripted::Delay(
        Duration::from_millis(600),
        Box::new(Scripted::respond(200, chat_answer("the-one", "together"))),
    ));
    let q = ask("m", "all at once");
    let answers = join_all((0..10).map(|_| chat(&gw, "red1", &q))).await;
    assert_eq!(up.request_count(), 1, "{answers:#?}");
    let mut results: Vec<&str> = answers.iter().map(Answer::cache).collect();
    results.sort();
    assert_eq!(results, [vec!["hit"; 9], vec!["miss"]].concat());
    for a in &answers {
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.json()["id"], "the-one");
    }

    // Streams wait the same way, and are replayed the stream they waited for.
    let s = ask_stream("m", "stream all at once");
    script_slow_stream(&up, &["Toge", "ther"]);
    let answers = join_all((0..10).map(|_| chat(&gw, "red1", &s))).await;
    assert_eq!(up.request_count(), 2);
    let misses = answers.iter().filter(|a| a.cache() == "miss").count();
    assert_eq!(misses, 1);
    for a in &answers {
        assert_eq!(a.status, 200);
        assert_eq!(stream_text(&a.body), "Together");
        assert_eq!(a.body, answers[0].body);
    }
}

/// A client that leaves while its request waits for another's answer to the same question
/// still has its row (a `499`, at no cost), as every request of a known key has. (None was
/// written: the request was dropped before its record was made.)
#[tokio::test]
async fn a_client_gone_while_waiting_for_another_requests_answer_has_its_row() {
    let up = MockUpstream::start().await;
    let mut gw = Gateway::start(&config(&up, "{}")).await;
    up.script(Scripted::Delay(
        Duration::from_millis(800),
        Box::new(Scripted::respond(200, chat_answer("slow", "ok"))),
    ));
    let q = ask("m", "asked twice");
    let leader = chat(&gw, "red1", &q);
    let waiter = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let gone = reqwest::Client::new()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(secret("red2"))
            .json(&q)
            .timeout(Duration::from_millis(200))
            .send()
            .await;
        assert!(gone.is_err(), "the waiter's client gives up first");
    };
    let (answer, ()) = tokio::join!(leader, waiter);
    assert_eq!(answer.status, 200);
    assert_eq!(up.request_count(), 1);
    let rows = rows_after_shutdown(&mut gw).await;
    let red2: Vec<_> = rows.iter().filter(|r| &*r.key == "red2").collect();
    assert_eq!(red2.len(), 1, "{rows:#?}");
    assert_eq!(
        (red2[0].status, &*red2[0].route, red2[0].cost_usd),
        (499, "m", 0.0)
    );
}

#[tokio::test]
async fn when_the_leading_request_fails_one_waiter_fetches_for_the_others() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&config(&up, "{}")).await;
    up.script(Scripted::Delay(
        Duration::from_millis(500),
        Box::new(Scripted::server_error(500)),
    ));
    up.script(Scripted::Delay(
        Duration::from_millis(300),
        Box::new(Scripted::respond(200, chat_answer("second-try", "ok"))),
    ));
    let q = ask("m", "first one fails");
    let answers = join_all((0..10).map(|_| chat(&gw, "red1", &q))).await;
    assert_eq!(up.request_count(), 2, "{answers:#?}");
    let failed = answers.iter().filter(|a| a.status != 200).count();
    assert_eq!(failed, 1, "only the leader's client sees the failure");
    let ok: Vec<&Answer> = answers.iter().filter(|a| a.status == 200).collect();
    assert!(ok.iter().all(|a| a.json()["id"] == "second-try"));
    assert_eq!(ok.iter().filter(|a| a.cache() == "miss").count(), 1);
}

// Fails: `Leader`'s `Drop` (src/cache/mod.rs) removes the key's in-flight entry whoever put
// it there. A `no-cache` request (its leader from `store_only`, no channel) whose answer fails
// removes the entry of the request already fetching, so the next identical request does not
// wait for that one and goes upstream too. (A waiter that gave up after the route's timeout
// leads the same way.)
#[tokio::test]

async fn a_no_cache_request_does_not_undo_the_wait_for_one_in_flight() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&config(&up, "{}")).await;
    up.script(Scripted::Delay(
        Duration::from_millis(1000),
        Box::new(Scripted::respond(200, chat_answer("slow-leader", "ok"))),
    ));
    up.script(Scripted::server_error(500));
    let q = ask("m", "in flight");
    let leader = chat(&gw, "red1", &q);
    let refresh = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        send(&gw, "red1", "/v1/chat/completions", &q, "no-cache").await
    };
    let follower = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        chat(&gw, "red1", &q).await
    };
    let (leader, refresh, follower) = tokio::join!(leader, refresh, follower);
    assert_eq!((leader.status, leader.cache()), (200, "miss"));
    assert!(refresh.status >= 500, "{}", refresh.body);
    assert_eq!(follower.status, 200);
    assert_eq!(
        (follower.cache(), follower.json()["id"].as_str()),
        ("hit", Some("slow-leader")),
        "the follower should have waited for the request in flight"
    );
    assert_eq!(up.request_count(), 2);
}

// Slow, not wrong: when the leader's answer is not stored (an upstream error, or an answer
// without usage), `Cache::lookup` (src/cache/mod.rs) makes one waiter the next leader and the
// others wait for it again, so identical requests whose answers are never stored go upstream
// one after another: ten of them take ten upstream round trips end to end.
#[tokio::test]

async fn identical_requests_whose_answers_are_not_stored_are_not_serialised() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&config(&up, "{}")).await;
    let mut no_usage: Value = serde_json::from_str(&chat_answer("no-usage", "hi")).unwrap();
    no_usage.as_object_mut().unwrap().remove("usage");
    for _ in 0..11 {
        up.script(Scripted::Delay(
            Duration::from_millis(300),
            Box::new(Scripted::respond(200, no_usage.to_string())),
        ));
    }
    // An answer without usage is counted with the tokenizer, loaded at its first use (over a
    // second in a debug build on a slow machine): loaded here, outside the timed part.
    assert_eq!(chat(&gw, "red1", &ask("m", "warm-up")).await.status, 200);
    let q = ask("m", "never stored");
    let started = std::time::Instant::now();
    let answers = join_all((0..10).map(|_| chat(&gw, "red1", &q))).await;
    let took = started.elapsed();
    assert!(answers.iter().all(|a| a.status == 200));
    assert_eq!(up.request_count(), 11);
    assert!(
        took < Duration::from_millis(1500),
        "ten 300 ms requests took {took:?}: they went upstream one at a time"
    );
}

/// A body nested deeper than serde_json's 128 levels is not cached (its key would take a
/// call per level: 10,000 levels overflowed the stack and aborted the gateway); it goes on
/// as any other request, and the gateway keeps serving.
#[tokio::test]
async fn a_deeply_nested_body_is_not_cached_and_does_not_bring_the_gateway_down() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&config(&up, "{}")).await;
    let nested = |depth: usize| {
        format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],"x":{}{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        )
    };
    let mut seen = Vec::new();
    for depth in [100, 100, 100_000, 1_000_000] {
        let resp = client()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(secret("solo"))
            .header("content-type", "application/json")
            .body(nested(depth))
            .send()
            .await
            .unwrap_or_else(|e| panic!("depth {depth}: {e}\n{}", gw.logs()));
        let cache = resp
            .headers()
            .get("x-switchyard-cache")
            .map(|v| v.to_str().unwrap().to_string());
        seen.push((depth, resp.status().as_u16(), cache));
    }
    // 100 levels are cached as usual. The deeper bodies go upstream uncached (the mock
    // upstream, like serde_json, refuses them: 400).
    assert_eq!(
        seen,
        [
            (100, 200, Some("miss".to_string())),
            (100, 200, Some("hit".to_string())),
            (100_000, 400, None),
            (1_000_000, 400, None),
        ],
        "{}",
        gw.logs()
    );
    // Nor on a route without a cache (the body's other readers do not recurse per level).
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(secret("solo"))
        .header("content-type", "application/json")
        .body(nested(1_000_000).replace(r#""model":"m""#, r#""model":"plain""#))
        .send()
        .await
        .unwrap_or_else(|e| panic!("uncached route: {e}\n{}", gw.logs()));
    assert_eq!(resp.status(), 400);
    let ok = send(
        &gw,
        "solo",
        "/v1/chat/completions",
        &json!({"model": "m", "messages": [{"role": "user", "content": "still here?"}]}),
        "",
    )
    .await;
    assert_eq!(ok.status, 200, "{ok:?}");
}

/// An answer that weighs more than all of `max_bytes` is not kept: asked for again and
/// again (so the cache would admit it), it is fetched each time. (It was taken in and pushed
/// out a while later, and served as a hit in between, for seconds.)
#[tokio::test]
async fn an_answer_bigger_than_the_whole_cache_is_never_a_hit() {
    let up = MockUpstream::start().await;
    let gw = Gateway::start(&config(&up, "{ max_bytes: 4KiB }")).await;
    // 1,200 base64 dimensions: ~6.5 KB of JSON.
    let big =
        json!({"model": "emb", "input": "big", "dimensions": 1200, "encoding_format": "base64"});
    let mut seen = Vec::new();
    for _ in 0..4 {
        let a = send(&gw, "red1", "/v1/embeddings", &big, "").await;
        assert_eq!(a.status, 200);
        assert!(weight(&a) > 4096, "{}", weight(&a));
        seen.push(a.cache().to_string());
    }
    assert_eq!(seen, ["miss"; 4]);
    assert_eq!(up.request_count(), 4);
    // One that fits is kept as before.
    let small = big_embedding("small");
    assert_eq!(
        send(&gw, "red1", "/v1/embeddings", &small, "")
            .await
            .cache(),
        "miss"
    );
    assert_eq!(
        send(&gw, "red1", "/v1/embeddings", &small, "")
            .await
            .cache(),
        "hit"
    );
}

/// The cap the gateway adds upstream under a budget is part of the key: an answer cut at a
/// budget's cap is not served to a key under no budget, whose request goes uncapped (it was,
/// to every key of the team). And a key without a team under the `team` scope has entries of
/// its own, apart from its entries under the `key` scope: a change of scope finds none of
/// the old ones (the two were the same).
#[tokio::test]
async fn a_budgets_cap_is_in_the_key_and_a_scope_change_finds_no_old_entry() {
    let up = MockUpstream::start().await;
    let red2 = format!(
        "name: red2, key: \"sha256:{}\", team: red }}",
        sha256_hex(secret("red2"))
    );
    let team = format!(
        "server: {{ admin_key: adm }}\n{}",
        config(&up, "{ scope: team }").replace(
            &red2,
            &red2.replace(" }", ", budget: { usd: 100, period: daily } }"),
        )
    );
    let gw = Gateway::start(&team).await;
    let q = ask("m", "a long story");
    let capped = chat(&gw, "red2", &q).await;
    assert_eq!((capped.status, capped.cache()), (200, "miss"));
    assert_eq!(up.requests()[0].json()["max_tokens"], 4096);
    let uncapped = chat(&gw, "red1", &q).await;
    assert_eq!(
        (uncapped.status, uncapped.cache()),
        (200, "miss"),
        "the budget's cap changed the answer: {}",
        uncapped.body
    );
    assert!(up.requests()[1].json().get("max_tokens").is_none());
    assert_eq!(chat(&gw, "red2", &q).await.cache(), "hit");
    assert_eq!(chat(&gw, "red1", &q).await.cache(), "hit");
    assert_eq!(up.request_count(), 2);

    // A key without a team: stored under `team`, not found under `key`.
    assert_eq!(chat(&gw, "solo", &q).await.cache(), "miss");
    assert_eq!(chat(&gw, "solo", &q).await.cache(), "hit");
    std::fs::write(
        gw.config_path(),
        team.replace("{ scope: team }", "{ scope: key }"),
    )
    .unwrap();
    let r = client()
        .post(gw.url("/admin/reload"))
        .bearer_auth("adm")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(chat(&gw, "solo", &q).await.cache(), "miss");
}
