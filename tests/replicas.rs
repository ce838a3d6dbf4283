//! Several gateway processes sharing a real Redis (limits, budgets) and a real PostgreSQL
//! (the ledger). Each test starts a Redis of its own on a free port, so it can stop it.

#[path = "support/gateway.rs"]
mod gateway;
#[path = "support/pki.rs"]
mod pki;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use gateway::{not_near_a_minute_boundary, sha256_hex, Gateway};
use serde_json::{json, Value};
use switchyard::ledger::store::Store;

const KEY: &str = "sk-replica-budget";
const OPEN_KEY: &str = "sk-replica-rpm";

struct Redis {
    port: u16,
    child: Option<Child>,
    /// `--tls-port` and its certificate files: the port then speaks TLS only.
    tls: Vec<String>,
    /// Its working folder, where `SHUTDOWN SAVE` leaves the data a restart loads.
    dir: tempfile::TempDir,
}

impl Redis {
    fn start() -> Redis {
        Redis::launch(Vec::new())
    }

    /// A Redis that speaks only TLS, with a server certificate for 127.0.0.1 signed by a CA
    /// of the test's own; returns it and the CA's PEM file (in `dir`).
    fn start_tls(dir: &std::path::Path) -> (Redis, std::path::PathBuf) {
        let pki = pki::new_pki("Switchyard test Redis CA", &["127.0.0.1"]);
        let path = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p.display().to_string()
        };
        let ca_file = path("redis-ca.pem", &pki.ca_pem);
        let tls = vec![
            "--tls-cert-file".to_string(),
            path("redis-cert.pem", &pki.cert_pem),
            "--tls-key-file".to_string(),
            path("redis-key.pem", &pki.key_pem),
            "--tls-ca-cert-file".to_string(),
            ca_file.clone(),
            "--tls-auth-clients".to_string(),
            "no".to_string(),
        ];
        (Redis::launch(tls), ca_file.into())
    }

    fn launch(tls: Vec<String>) -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut r = Redis {
            port,
            child: None,
            tls,
            dir: tempfile::tempdir().unwrap(),
        };
        r.restart();
        r
    }

    fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(if self.tls.is_empty() {
                vec!["--port".to_string(), self.port.to_string()]
            } else {
                let mut a = vec!["--port".into(), "0".into(), "--tls-port".into()];
                a.push(self.port.to_string());
                a.extend(self.tls.iter().cloned());
                a
            })
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Freezes (`STOP`) or thaws (`CONT`) the server: a frozen Redis accepts connections
    /// and buffers what it is sent, and runs it when thawed, as a Redis stalled by a slow
    /// disk, a fork or an overloaded host does.
    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        let ok = Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(ok.success());
    }

    /// Stops the server with its data saved (a restart then loads it: a restart, or a
    /// failover to a replica, that keeps the data).
    fn stop_keeping_data(&mut self) {
        let ok = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "shutdown", "save"])
            .status()
            .unwrap();
        let _ = ok;
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A fresh PostgreSQL database, dropped at the end.
struct Pg {
    admin: String,
    name: String,
}

impl Pg {
    async fn create() -> Pg {
        use sqlx::Connection;
        let admin = std::env::var("SWITCHYARD_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string());
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        // The tests of this file run at once: a counter keeps two of them from taking the same
        // name when the clock reads the same (seen in CI: "database … already exists").
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("switchyard_replicas_{}_{n}_{nanos}", std::process::id());
        let mut c = sqlx::PgConnection::connect(&admin)
            .await
            .expect("PostgreSQL must run");
        sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
            .execute(&mut c)
            .await
            .unwrap();
        Pg { admin, name }
    }

    fn url(&self) -> String {
        format!("{}/{}", self.admin.rsplit_once('/').unwrap().0, self.name)
    }

    async fn drop_db(self) {
        use sqlx::Connection;
        if let Ok(mut c) = sqlx::PgConnection::connect(&self.admin).await {
            let _ = sqlx::raw_sql(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&mut c)
            .await;
        }
    }
}

fn config(redis: &Redis, ledger: &str, key_extra: &str, open_extra: &str) -> String {
    format!(
        r#"
server: {{ admin_key: admin }}
state:
  redis: "redis://127.0.0.1:{port}"
  ledger: "{ledger}"
providers:
  slow: {{ kind: mock, latency: 400ms, stream_chunks: 8 }}
  fast: {{ kind: mock, stream_chunks: 2 }}
  slower: {{ kind: mock, latency: 1500ms }}
  slowest: {{ kind: mock, latency: 5s }}
  longest: {{ kind: mock, latency: 20s }}
models:
  slow: {{ pricing: {{ input_per_1m: 2.5, output_per_1m: 10 }}, deployments: [ {{ provider: slow }} ] }}
  fast: {{ pricing: {{ input_per_1m: 2.5, output_per_1m: 10 }}, deployments: [ {{ provider: fast }} ] }}
  free: {{ pricing: {{ input_per_1m: 0, output_per_1m: 0 }}, deployments: [ {{ provider: fast }} ] }}
  slower: {{ pricing: {{ input_per_1m: 2.5, output_per_1m: 10 }}, deployments: [ {{ provider: slower }} ] }}
  tiny: {{ pricing: {{ input_per_1m: 0.01, output_per_1m: 0.01 }}, deployments: [ {{ provider: fast }} ] }}
  slowest: {{ pricing: {{ input_per_1m: 2.5, output_per_1m: 10 }}, deployments: [ {{ provider: slowest }} ] }}
  longest: {{ pricing: {{ input_per_1m: 2.5, output_per_1m: 10 }}, deployments: [ {{ provider: longest }} ] }}
keys:
  - {{ name: budgeted, key: "sha256:{h1}"{key_extra} }}
  - {{ name: limited, key: "sha256:{h2}"{open_extra} }}
"#,
        port = redis.port,
        h1 = sha256_hex(KEY),
        h2 = sha256_hex(OPEN_KEY),
    )
}

async fn post(gw: &Gateway, key: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(body)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .unwrap()
}

/// Posts `body` until it is admitted (a 200), within 20 s; the answer.
async fn post_until_admitted(gw: &Gateway, key: &str, body: &Value) -> reqwest::Response {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = post(gw, key, body).await;
        if r.status() == 200 {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "still refused: {}\n{}",
            r.text().await.unwrap(),
            gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn an_rpm_limit_holds_across_replicas() {
    not_near_a_minute_boundary().await;
    let redis = Redis::start();
    let pg = Pg::create().await;
    let cfg = config(&redis, &pg.url(), "", ", limits: { rpm: 20 }");
    let a = Gateway::start(&cfg).await;
    let b = Gateway::start(&cfg).await;
    let body = json!({"model": "fast", "messages": [{"role": "user", "content": "hi"}]});
    let mut ok = 0;
    let mut refused = 0;
    for i in 0..30 {
        let gw = if i % 2 == 0 { &a } else { &b };
        match post(gw, OPEN_KEY, &body).await.status().as_u16() {
            200 => ok += 1,
            429 => refused += 1,
            s => panic!("status {s}"),
        }
    }
    assert_eq!((ok, refused), (20, 10), "exactly rpm across both replicas");
    drop((a, b));
    pg.drop_db().await;
}

/// A fallback route's own limits are counted in Redis too: the replicas together let exactly
/// its `rpm` of requests through to it as a fallback.
#[tokio::test]
async fn a_fallback_routes_own_limits_hold_across_replicas() {
    not_near_a_minute_boundary().await;
    let redis = Redis::start();
    let pg = Pg::create().await;
    let cfg = config(&redis, &pg.url(), "", "")
        .replacen(
            "providers:\n",
            "providers:\n  dead: { kind: openai, base_url: \"http://127.0.0.1:9/v1\" }\n",
            1,
        )
        .replacen(
            "models:\n",
            "models:\n  main: { retries: 0, deployments: [ { provider: dead, deployment: m } ], fallbacks: [spare] }\n  spare: { deployments: [ { provider: fast } ], limits: { rpm: 3 } }\n",
            1,
        );
    let a = Gateway::start(&cfg).await;
    let b = Gateway::start(&cfg).await;
    let body = json!({"model": "main", "messages": [{"role": "user", "content": "hi"}]});
    let mut statuses = Vec::new();
    for i in 0..6 {
        let gw = if i % 2 == 0 { &a } else { &b };
        let r = post(gw, OPEN_KEY, &body).await;
        let route = r.headers()["x-switchyard-route"]
            .to_str()
            .unwrap()
            .to_string();
        statuses.push((r.status().as_u16(), route));
    }
    let served = statuses
        .iter()
        .filter(|s| **s == (200, "spare".to_string()))
        .count();
    let refused = statuses
        .iter()
        .filter(|s| **s == (502, "main".to_string()))
        .count();
    assert_eq!((served, refused), (3, 3), "{statuses:?}");
    drop((a, b));
    pg.drop_db().await;
}

#[tokio::test]
async fn a_budget_holds_across_replicas_and_the_shared_ledger_agrees() {
    let redis = Redis::start();
    let pg = Pg::create().await;
    // Worst case per request ≈ 0.01 USD (1000 output tokens at 10/1M): the budget holds ~15.
    let cfg = config(
        &redis,
        &pg.url(),
        ", budget: { usd: 0.15, period: daily }",
        "",
    );
    let mut a = Gateway::start(&cfg).await;
    let mut b = Gateway::start(&cfg).await;
    let body = json!({"model": "slow", "max_tokens": 1000, "messages": [{"role": "user", "content": "hi"}]});
    let results = join_all((0..60).map(|i| {
        let gw = if i % 2 == 0 { &a } else { &b };
        post(gw, KEY, &body)
    }))
    .await;
    let mut ok = 0;
    for r in results {
        match r.status().as_u16() {
            200 => {
                ok += 1;
                r.bytes().await.unwrap();
            }
            429 => {
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["error"]["code"], "budget_exceeded");
            }
            s => panic!("status {s}"),
        }
    }
    assert!((1..=15).contains(&ok), "{ok} admitted over both replicas");
    for gw in [&mut a, &mut b] {
        gw.signal("TERM");
        assert!(gw
            .wait_exit(Duration::from_secs(20))
            .await
            .expect("exit")
            .success());
    }
    let store = Store::open(&pg.url()).await.unwrap();
    let rows = store.rows().await.unwrap();
    store.close().await;
    assert_eq!(rows.len(), 60, "both replicas wrote the one ledger");
    assert_eq!(rows.iter().filter(|r| r.status == 200).count(), ok);
    let spent: f64 = rows.iter().map(|r| r.cost_usd).sum();
    assert!(spent <= 0.15, "spent {spent}");
    pg.drop_db().await;
}

#[tokio::test]
async fn redis_down_fails_budgets_closed_and_rate_limits_open_then_recovers() {
    let mut redis = Redis::start();
    let pg = Pg::create().await;
    let cfg = config(
        &redis,
        &pg.url(),
        ", budget: { usd: 100, period: daily }",
        ", limits: { rpm: 1000 }",
    );
    let gw = Gateway::start(&cfg).await;
    let body = json!({"model": "fast", "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(post(&gw, KEY, &body).await.status(), 200);

    redis.stop();
    let r = post(&gw, KEY, &body).await;
    assert_eq!(r.status(), 503, "a budget cannot be checked: closed");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "state_unavailable");
    assert_eq!(
        post(&gw, OPEN_KEY, &body).await.status(),
        200,
        "rate limits fail open"
    );
    let metrics = gw.metrics_text().await;
    assert!(metrics.contains("switchyard_state_errors_total"), "counted");
    // What the budget spent is unknown meanwhile: null in the spend report, and no sample
    // in the scrape (it read 0, as if nothing had been spent).
    let spend = gw.get_json("/admin/spend", "admin").await;
    let b = &spend["budgets"][0];
    assert!(
        b["spent_usd"].is_null() && b["reserved_usd"].is_null(),
        "{spend}"
    );
    assert_eq!(b["limit_usd"], 100.0);
    assert!(
        !metrics.contains("switchyard_budget_spent_usd{"),
        "{metrics}"
    );
    assert!(
        metrics.contains("switchyard_budget_limit_usd{"),
        "{metrics}"
    );

    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if post(&gw, KEY, &body).await.status() == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no recovery after Redis came back:\n{}",
            gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (spent, _) = budget_figures(&gw).await;
    assert!(spent > 0.0, "{spent}");
    drop(gw);
    pg.drop_db().await;
}

#[path = "support/upstream.rs"]
mod upstream;

#[tokio::test]
async fn a_cooldown_set_by_one_replica_is_honoured_by_the_others() {
    let redis = Redis::start();
    let pg = Pg::create().await;
    let primary = upstream::MockUpstream::start().await;
    let spare = upstream::MockUpstream::start().await;
    let cfg = format!(
        r#"
state: {{ redis: "redis://127.0.0.1:{port}", ledger: "{ledger}" }}
providers:
  primary: {{ kind: openai, base_url: "{p}/v1" }}
  spare: {{ kind: openai, base_url: "{s}/v1" }}
models:
  m:
    strategy: priority
    retries: 0
    deployments:
      - {{ provider: primary, deployment: gpt-4o, priority: 0 }}
      - {{ provider: spare, deployment: gpt-4o, priority: 1 }}
"#,
        port = redis.port,
        ledger = pg.url(),
        p = primary.url(),
        s = spare.url(),
    );
    let a = Gateway::start(&cfg).await;
    let b = Gateway::start(&cfg).await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let served_by = |r: &reqwest::Response| {
        r.headers()["x-switchyard-deployment"]
            .to_str()
            .unwrap()
            .to_string()
    };
    // Replica b uses the primary while it is healthy.
    let r = post(&b, KEY, &body).await;
    assert_eq!(served_by(&r), "primary/gpt-4o");
    // Replica a hears a 429 with retry-after-ms: the primary cools down for 5 s.
    primary.script(upstream::Scripted::rate_limited(5000));
    assert_eq!(post(&a, KEY, &body).await.status(), 429);
    // Within a sync interval or two, b steers away from the primary too.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let before = primary.request_count();
        let r = post(&b, KEY, &body).await;
        assert_eq!(r.status(), 200);
        if served_by(&r) == "spare/gpt-4o" {
            assert_eq!(primary.request_count(), before);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replica b never learned the cooldown:\n{}",
            b.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop((a, b));
    pg.drop_db().await;
}

#[tokio::test]
async fn replicas_serve_each_others_cached_answers_and_redis_down_is_a_miss() {
    let mut redis = Redis::start();
    let pg = Pg::create().await;
    let up = upstream::MockUpstream::start().await;
    let cfg = format!(
        r#"
state: {{ redis: "redis://127.0.0.1:{port}", ledger: "{ledger}" }}
providers:
  up: {{ kind: openai, base_url: "{u}/v1" }}
models:
  m: {{ cache: {{ ttl: 1m }}, deployments: [ {{ provider: up, deployment: gpt-4o }} ] }}
"#,
        port = redis.port,
        ledger = pg.url(),
        u = up.url(),
    );
    let a = Gateway::start(&cfg).await;
    let b = Gateway::start(&cfg).await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "cache me"}]});
    let r = post(&a, KEY, &body).await;
    assert_eq!(r.headers()["x-switchyard-cache"], "miss");
    let first: Value = r.json().await.unwrap();
    // The Redis write is off the request path: wait until a's answer is there.
    let client = redis::Client::open(format!("redis://127.0.0.1:{}", redis.port)).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("{switchyard}:cache:*")
            .query_async(&mut conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "a's answer never reached Redis");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = post(&b, KEY, &body).await;
    assert_eq!(
        r.headers()["x-switchyard-cache"],
        "hit",
        "b serves a's answer"
    );
    let second: Value = r.json().await.unwrap();
    assert_eq!(first, second);
    assert_eq!(up.request_count(), 1);
    let upstream_calls = up.request_count();

    redis.stop();
    let other = json!({"model": "m", "messages": [{"role": "user", "content": "not cached yet"}]});
    let r = post(&b, KEY, &other).await;
    assert_eq!(
        r.status(),
        200,
        "Redis down makes the cache a miss, never an error"
    );
    assert_eq!(r.headers()["x-switchyard-cache"], "miss");
    assert_eq!(up.request_count(), upstream_calls + 1);
    drop((a, b));
    pg.drop_db().await;
}

#[tokio::test]
async fn a_deployments_upstream_quota_is_counted_across_replicas() {
    not_near_a_minute_boundary().await;
    let redis = Redis::start();
    let pg = Pg::create().await;
    let primary = upstream::MockUpstream::start().await;
    let spare = upstream::MockUpstream::start().await;
    let cfg = format!(
        r#"
state: {{ redis: "redis://127.0.0.1:{port}", ledger: "{ledger}" }}
providers:
  primary: {{ kind: openai, base_url: "{p}/v1" }}
  spare: {{ kind: openai, base_url: "{s}/v1" }}
models:
  m:
    strategy: priority
    deployments:
      - {{ provider: primary, deployment: gpt-4o, priority: 0, rpm: 10 }}
      - {{ provider: spare, deployment: gpt-4o, priority: 1 }}
"#,
        port = redis.port,
        ledger = pg.url(),
        p = primary.url(),
        s = spare.url(),
    );
    let a = Gateway::start(&cfg).await;
    let b = Gateway::start(&cfg).await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..6 {
        assert_eq!(post(&a, KEY, &body).await.status(), 200);
    }
    // Two sync intervals: b learns that a sent 6 of the primary's 10 this minute.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for _ in 0..8 {
        assert_eq!(post(&b, KEY, &body).await.status(), 200);
    }
    assert_eq!(
        primary.request_count(),
        10,
        "the primary's rpm holds for the fleet"
    );
    assert_eq!(spare.request_count(), 4);
    drop((a, b));
    pg.drop_db().await;
}

/// `rediss://` with a Redis behind a company CA, trusted through `SSL_CERT_FILE`: the shared
/// rpm limit holds across two replicas (without the CA the TLS handshake fails, and with
/// `rate_limits: open` every request would pass).
#[tokio::test]
async fn an_rpm_limit_holds_across_replicas_over_redis_tls_with_a_company_ca() {
    not_near_a_minute_boundary().await;
    let dir = tempfile::tempdir().unwrap();
    let (redis, ca) = Redis::start_tls(dir.path());
    let cfg = config(&redis, "sqlite://switchyard.db", "", ", limits: { rpm: 4 }")
        .replace("redis://", "rediss://");
    let env = [("SSL_CERT_FILE", ca.to_str().unwrap())];
    let a = Gateway::start_with_env(&cfg, &env).await;
    let b = Gateway::start_with_env(&cfg, &env).await;
    let body = json!({"model": "fast", "messages": [{"role": "user", "content": "hi"}]});
    let mut statuses = Vec::new();
    for i in 0..6 {
        let gw = if i % 2 == 0 { &a } else { &b };
        statuses.push(post(gw, OPEN_KEY, &body).await.status().as_u16());
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 200, 429, 429],
        "the limit is shared over TLS:\n{}",
        a.logs()
    );
}

/// Redis restarted without its data (or flushed): a budget's spend is read from the ledger
/// again at the next admission, not counted from 0. (The key was made again by the first
/// reservation, so the start-up seeding, which writes only a key not there, never ran again,
/// and a key could spend its budget once more.)
#[tokio::test]
async fn a_budget_is_seeded_again_from_the_ledger_when_redis_loses_its_data() {
    let redis = Redis::start();
    let pg = Pg::create().await;
    // The ledger already holds 0.995 of the key's 1 USD today; a request's worst case is
    // ~0.01 (1,000 output tokens at 10 per 1M).
    let store = Store::open(&pg.url()).await.unwrap();
    let mut rows = vec![switchyard::ledger::store::LedgerRow {
        ts_ms: switchyard::ledger::now_ms(),
        request_id: "earlier".into(),
        key: "budgeted".into(),
        route: "fast".into(),
        endpoint: "chat/completions".into(),
        status: 200,
        cost_usd: 0.995,
        ..Default::default()
    }];
    store.write(&mut rows).await.unwrap();
    store.close().await;
    let cfg = config(&redis, &pg.url(), ", budget: { usd: 1, period: daily }", "");
    let gw = Gateway::start(&cfg).await;
    let body = json!({"model": "fast", "max_tokens": 1000, "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(post(&gw, KEY, &body).await.status(), 429, "seeded at start");
    // Redis loses everything; the gateway's connection survives a FLUSHALL.
    let client = redis::Client::open(format!("redis://127.0.0.1:{}", redis.port)).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    let r = post(&gw, KEY, &body).await;
    assert_eq!(r.status(), 429, "seeded again from the ledger");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "budget_exceeded", "{v}");
    let spend = gw.get_json("/admin/spend", "admin").await;
    let spent = spend["budgets"][0]["spent_usd"].as_f64().unwrap();
    assert!((spent - 0.995).abs() < 1e-9, "{spend}");
    // A request that fits is still admitted.
    let small =
        json!({"model": "fast", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(post(&gw, KEY, &small).await.status(), 200);
    drop(gw);
    pg.drop_db().await;
}

/// A TCP proxy in front of the test's PostgreSQL that, while `cuts` is above 0, lets a
/// `COMMIT` through and then cuts the connection before the answer comes back: the commit is
/// applied and the gateway cannot know it (a failover or a network cut at the worst moment).
/// Returns `url` pointing at the proxy.
async fn commit_cutting_proxy(url: &str, cuts: Arc<AtomicUsize>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (head, rest) = url.split_once('@').unwrap();
    let (server, db) = rest.split_once('/').unwrap();
    let server = server.to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let (cuts, server) = (cuts.clone(), server.clone());
            tokio::spawn(async move {
                let upstream = tokio::net::TcpStream::connect(&server).await.unwrap();
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = upstream.into_split();
                let cutting = Arc::new(AtomicBool::new(false));
                let answers = tokio::spawn({
                    let cutting = cutting.clone();
                    async move {
                        let mut buf = vec![0u8; 65536];
                        while let Ok(n @ 1..) = server_read.read(&mut buf).await {
                            if cutting.load(Ordering::SeqCst)
                                || client_write.write_all(&buf[..n]).await.is_err()
                            {
                                break;
                            }
                        }
                    }
                });
                let mut buf = vec![0u8; 65536];
                while let Ok(n @ 1..) = client_read.read(&mut buf).await {
                    let commit = buf[..n].windows(7).any(|w| w == b"COMMIT\0");
                    if commit
                        && cuts
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| c.checked_sub(1))
                            .is_ok()
                    {
                        cutting.store(true, Ordering::SeqCst);
                        let _ = server_write.write_all(&buf[..n]).await;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        break;
                    }
                    if server_write.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                answers.abort();
            });
        }
    });
    // In the clear, so that the proxy can see the COMMIT.
    format!("{head}@{proxy}/{db}?sslmode=disable")
}

/// A ledger batch whose COMMIT PostgreSQL applied but whose answer never reached the gateway
/// is written again (the gateway cannot know it was committed) but not twice: every request
/// has one row. (Every row of such a batch was there twice.)
#[tokio::test]
async fn a_ledger_batch_committed_without_its_answer_is_not_written_twice() {
    let redis = Redis::start();
    let pg = Pg::create().await;
    let cuts = Arc::new(AtomicUsize::new(0));
    let url = commit_cutting_proxy(&pg.url(), cuts.clone()).await;
    let mut gw = Gateway::start(&config(&redis, &url, "", "")).await;
    cuts.store(2, Ordering::SeqCst);
    let body = json!({"model": "fast", "messages": [{"role": "user", "content": "hi"}]});
    let mut ids = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while cuts.load(Ordering::SeqCst) > 0 || ids.len() < 20 {
        assert!(Instant::now() < deadline, "no batch was cut\n{}", gw.logs());
        for _ in 0..4 {
            let r = post(&gw, OPEN_KEY, &body).await;
            assert_eq!(r.status(), 200);
            ids.push(r.headers()["x-request-id"].to_str().unwrap().to_string());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    gw.signal("TERM");
    assert!(gw.wait_exit(Duration::from_secs(20)).await.is_some());
    let store = Store::open(&pg.url()).await.unwrap();
    let mut written: Vec<String> = store
        .rows()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.request_id)
        .collect();
    store.close().await;
    written.sort();
    ids.sort();
    assert_eq!(written, ids, "one row per request");
    assert!(
        gw.logs().contains("not written twice"),
        "a cut batch was written again: {}",
        gw.logs()
    );
    pg.drop_db().await;
}

/// Redis losing its data while a request runs: its reservation and ticket are gone, and the
/// key is seeded again from a ledger that has no row of it yet. Its settlement, finding no
/// ticket in a key seeded after its admission, still counts its cost there. (It counted
/// nothing: the cost was in the ledger and missing from the budget's spend until the period
/// ended.)
#[tokio::test]
async fn a_request_running_while_redis_loses_its_data_still_counts_its_cost() {
    let redis = Redis::start();
    let pg = Pg::create().await;
    let cfg = config(&redis, &pg.url(), ", budget: { usd: 2, period: total }", "");
    let gw = Gateway::start(&cfg).await;
    let running = spawn_big(&gw, "slower");
    wait_reserved(&gw, 0.0).await;
    let client = redis::Client::open(format!("redis://127.0.0.1:{}", redis.port)).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    // The next admission seeds the key again, from the ledger (nothing in it yet).
    let small =
        json!({"model": "fast", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});
    let small_cost = answer_cost(post(&gw, KEY, &small).await).await;
    let big_cost = answer_cost(running.await.unwrap().unwrap()).await;
    let spent = settled_figures(&gw).await;
    assert!(
        (spent - (small_cost + big_cost)).abs() < 1e-8,
        "spent {spent}, the two requests cost {small_cost} + {big_cost}\n{}",
        gw.logs()
    );
    drop(gw);
    pg.drop_db().await;
}

/// A request that ends while Redis is down has its row written to the ledger; Redis comes
/// back empty and the next admission seeds the budget from that ledger, row included. The
/// settlement, sent again once Redis is back, finds its ticket gone and counts nothing: the
/// cost is counted once. (A first version of the rule above counted it twice.)
#[tokio::test]
async fn a_request_ending_while_redis_is_down_is_counted_once_when_redis_comes_back_empty() {
    counted_once_when_redis_comes_back_empty(false).await;
}

/// The same, with the ledger's writes held up (PostgreSQL slow to take them): the request's
/// row is still queued when the budget is seeded again, so the figure read lacks it, and its
/// settlement, sent again, counts its cost. (Counted nowhere: the seeding's time was taken
/// as holding every row of requests ended before it.)
#[tokio::test]
async fn a_request_whose_row_waits_while_redis_comes_back_empty_is_counted_once() {
    counted_once_when_redis_comes_back_empty(true).await;
}

/// A request runs; Redis stops, and (with `hold_inserts`) PostgreSQL's inserts wait; the
/// request ends; Redis comes back empty, a request is admitted (seeding the budget again),
/// the inserts go on: the budget has spent what both requests cost, once.
async fn counted_once_when_redis_comes_back_empty(hold_inserts: bool) {
    use sqlx::Connection;
    let mut redis = Redis::start();
    let pg = Pg::create().await;
    let cfg = config(&redis, &pg.url(), ", budget: { usd: 2, period: total }", "");
    let gw = Gateway::start(&cfg).await;
    let running = spawn_big(&gw, "slower");
    wait_reserved(&gw, 0.0).await;
    redis.stop();
    let mut lock = sqlx::PgConnection::connect(&pg.url()).await.unwrap();
    let mut tx = lock.begin().await.unwrap();
    if hold_inserts {
        // Inserts wait (reads go on) until this transaction ends.
        sqlx::query("LOCK TABLE requests IN SHARE MODE")
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    let big_cost = answer_cost(running.await.unwrap().unwrap()).await;
    // Past a ledger flush, and long enough for the settlement's next sending to come after
    // the next admission (it may come before: both orders count it once).
    tokio::time::sleep(Duration::from_secs(3)).await;
    redis.restart();
    let small =
        json!({"model": "fast", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});
    let small_cost = answer_cost(post_until_admitted(&gw, KEY, &small).await).await;
    tx.commit().await.unwrap();
    // Once the settlement sent again has been taken (and nothing more is counted after).
    assert!(
        gw.wait_log(
            |l| l.contains("Redis call sent again: done"),
            Duration::from_secs(20)
        )
        .await,
        "{}",
        gw.logs()
    );
    spent_comes_to(&gw, big_cost + small_cost).await;
    drop(gw);
    pg.drop_db().await;
}

/// With Redis too, a budget a reload removes and a later one brings back counts what was
/// spent while it was away: its key in Redis, seeded before, is seeded again with the more
/// of its figure and the ledger's (it kept its old spend).
#[tokio::test]
async fn a_budget_brought_back_by_a_reload_is_seeded_again_in_redis() {
    let redis = Redis::start();
    let pg = Pg::create().await;
    let with = config(&redis, &pg.url(), ", budget: { usd: 5, period: daily }", "");
    let without = config(&redis, &pg.url(), "", "");
    let gw = Gateway::start(&with).await;
    let body = json!({"model": "fast", "messages": [{"role": "user", "content": "hi"}]});
    let reload = |yaml: &str| {
        std::fs::write(gw.config_path(), yaml).unwrap();
        reqwest::Client::new()
            .post(gw.url("/admin/reload"))
            .bearer_auth("admin")
            .send()
    };
    let one = answer_cost(post(&gw, KEY, &body).await).await;
    assert!((settled_figures(&gw).await - one).abs() < 1e-9);
    assert_eq!(reload(&without).await.unwrap().status(), 200);
    for _ in 0..3 {
        assert_eq!(post(&gw, KEY, &body).await.status(), 200);
    }
    // Past a ledger flush, so that the rows of those three are in it.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(reload(&with).await.unwrap().status(), 200);
    let back = settled_figures(&gw).await;
    assert!((back - 4.0 * one).abs() < 1e-8, "{back} against 4 × {one}");

    // Redis missing some of it (costs it never got): a restart takes the ledger's figure,
    // the more of the two. (It kept Redis's, seeded already, until the period ended.)
    let mut gw = gw;
    gw.signal("TERM");
    assert!(gw.wait_exit(Duration::from_secs(20)).await.is_some());
    let client = redis::Client::open(format!("redis://127.0.0.1:{}", redis.port)).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let budget_keys: Vec<String> = redis::cmd("KEYS")
        .arg("{switchyard}:bn:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(budget_keys.len(), 1, "{budget_keys:?}");
    let _: () = redis::cmd("HSET")
        .arg(&budget_keys[0])
        .arg("s")
        .arg(0)
        .query_async(&mut conn)
        .await
        .unwrap();
    let gw = Gateway::start(&with).await;
    let again = settled_figures(&gw).await;
    assert!(
        (again - 4.0 * one).abs() < 1e-8,
        "{again} against 4 × {one}"
    );
    drop(gw);
    pg.drop_db().await;
}

/// A `max_tokens` beyond what Redis's HINCRBY takes (a signed 64-bit step) on a deployment
/// with a `tpm` quota: the quota sync goes on (the pipeline failed, and the replica stopped
/// reading the others' cooldowns and counts while such requests came).
#[tokio::test]
async fn a_huge_max_tokens_leaves_the_quota_sync_working() {
    let redis = Redis::start();
    let pg = Pg::create().await;
    let cfg = config(&redis, &pg.url(), "", "").replace(
        "fast: {{ pricing: {{ input_per_1m: 2.5, output_per_1m: 10 }}, deployments: [ {{ provider: fast }} ] }}"
            .replace("{{", "{")
            .replace("}}", "}")
            .as_str(),
        "fast: { pricing: { input_per_1m: 2.5, output_per_1m: 10 }, deployments: [ { provider: fast, tpm: 1000000 } ] }",
    );
    assert!(cfg.contains("tpm: 1000000"), "{cfg}");
    let gw = Gateway::start(&cfg).await;
    let body = json!({"model": "fast", "max_tokens": u64::MAX, "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(post(&gw, OPEN_KEY, &body).await.status(), 200);
    // Two syncs (twice a second).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let failed = gw
        .metric(
            "switchyard_state_errors_total",
            &[("operation", "cooldown_sync")],
        )
        .await
        .unwrap_or(0.0);
    assert_eq!(failed, 0.0, "{}", gw.logs());
    drop(gw);
    pg.drop_db().await;
}

/// A request on a route priced at 0 under a budget reserves and costs 0: its settlement
/// works like any other (it failed, and the reconnect that followed refused requests with
/// 503 `state_unavailable`).
#[tokio::test]
async fn a_free_request_under_a_budget_settles() {
    let redis = Redis::start();
    let pg = Pg::create().await;
    let cfg = config(&redis, &pg.url(), ", budget: { usd: 1, period: daily }", "");
    let gw = Gateway::start(&cfg).await;
    let body = json!({"model": "free", "messages": [{"role": "user", "content": "hi"}]});
    for round in 0..5 {
        let results = join_all((0..8).map(|_| post(&gw, KEY, &body))).await;
        for r in results {
            assert_eq!(
                r.status(),
                200,
                "round {round}: {}",
                r.text().await.unwrap()
            );
        }
    }
    let metrics = reqwest::get(gw.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("switchyard_state_errors_total{operation=\"settle\"} 0\n"),
        "{metrics}"
    );
    assert!(!gw.logs().contains("settlement failed"), "{}", gw.logs());
    // A cost below a micro-dollar is counted as it is (Redis counts whole nano-dollars,
    // each request's rounded up): not lost, not made a micro-dollar.
    let tiny = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..3 {
        assert_eq!(post(&gw, KEY, &tiny).await.status(), 200);
    }
    // The ledger's rows are written within 250 ms.
    let mut spend = gw.get_json("/admin/spend", "admin").await;
    for _ in 0..40 {
        if spend["rows"].as_array().is_some_and(|r| !r.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        spend = gw.get_json("/admin/spend", "admin").await;
    }
    let spent = spend["budgets"][0]["spent_usd"].as_f64().unwrap();
    let ledger = spend["total_cost_usd"].as_f64().unwrap();
    assert!(ledger > 0.0 && ledger < 3e-6, "{spend}");
    assert!(
        spent >= ledger - 1e-12 && spent <= ledger + 3e-9 + 1e-12,
        "{spend}"
    );
    drop(gw);
    pg.drop_db().await;
}

/// Waits until the budget's settled spend is `want` (within 10 s), then checks it stays so.
async fn spent_comes_to(gw: &Gateway, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let spent = settled_figures(gw).await;
        if (spent - want).abs() < 1e-8 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "spent {spent}, not {want}\n{}",
            gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spent = settled_figures(gw).await;
    assert!((spent - want).abs() < 1e-8, "spent {spent}, then {want}");
}

/// The budget's `(spent_usd, reserved_usd)` as `/admin/spend` reads them from Redis (null
/// while the gateway cannot read Redis, as while it connects again after a stall: read
/// again).
async fn budget_figures(gw: &Gateway) -> (f64, f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let spend = gw.get_json("/admin/spend", "admin").await;
        let b = &spend["budgets"][0];
        if let (Some(s), Some(r)) = (b["spent_usd"].as_f64(), b["reserved_usd"].as_f64()) {
            return (s, r);
        }
        assert!(Instant::now() < deadline, "Redis not read: {spend}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The budget's figures once nothing is reserved: a request's settlement runs after its
/// answer's last byte is sent, so a client can read the answer before Redis counts it.
async fn settled_figures(gw: &Gateway) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (spent, reserved) = budget_figures(gw).await;
        if reserved == 0.0 {
            return spent;
        }
        assert!(
            Instant::now() < deadline,
            "reservation still held: {reserved}\n{}",
            gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client that leaves while its admission waits on a slow Redis leaves nothing held: the
/// admission, which Redis runs after the request was dropped, is cancelled. (Its budget
/// reservation and its `max_parallel` slot stayed held until the replica exited.)
#[tokio::test]
async fn a_client_gone_while_redis_admits_leaves_nothing_held() {
    let redis = Redis::start();
    let pg = Pg::create().await;
    // A worst case of ~0.6 USD against a 1 USD total, and one request at a time.
    let cfg = config(
        &redis,
        &pg.url(),
        ", budget: { usd: 1, period: total }, limits: { max_parallel: 1 }",
        "",
    );
    let gw = Gateway::start(&cfg).await;
    let big = json!({"model": "fast", "max_tokens": 60000, "messages": [{"role": "user", "content": "hi"}]});
    // A first request, so that the next reaches Redis at once (the first of a process loads
    // what it needs lazily).
    assert_eq!(post(&gw, KEY, &big).await.status(), 200);
    let spent = settled_figures(&gw).await;
    let client = redis::Client::open(format!("redis://127.0.0.1:{}", redis.port)).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    // Redis holds every command for 400 ms (less than the gateway's 500 ms limit on a call);
    // the client gives up after 200.
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(400)
        .arg("ALL")
        .query_async(&mut conn)
        .await
        .unwrap();
    let gone = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&big)
        .timeout(Duration::from_millis(200))
        .send()
        .await;
    assert!(gone.is_err(), "the client gives up before Redis answers");
    // The dropped request's admission did reach Redis, and was cancelled: its ticket is the
    // one left, marked `c` (a settled request's ticket is deleted).
    let mut tickets: Vec<String> = Vec::new();
    for _ in 0..100 {
        tickets = redis::cmd("KEYS")
            .arg("{switchyard}:t:*")
            .query_async(&mut conn)
            .await
            .unwrap();
        if !tickets.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(tickets.len(), 1, "{tickets:?}");
    let mut mark = String::new();
    for _ in 0..100 {
        mark = redis::cmd("GET")
            .arg(&tickets[0])
            .query_async(&mut conn)
            .await
            .unwrap();
        if mark == "c" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(mark, "c", "the dropped admission is marked cancelled");
    // Admitted only once nothing of the dropped request is held: 0.6 + 0.6 > 1, and one
    // request at a time.
    post_until_admitted(&gw, KEY, &big).await;
    let after = settled_figures(&gw).await;
    assert!((after - 2.0 * spent).abs() < 1e-9, "{after} vs 2 × {spent}");
    drop(gw);
    pg.drop_db().await;
}

/// A Redis that stalls past the call timeout: the admission is refused (503), and what the
/// stalled call takes once Redis runs it is given back; a settlement that timed out is sent
/// again and counted once. A request that fits the budget is then admitted.
#[tokio::test]
async fn a_stalled_redis_leaves_no_reservation_behind_and_settles_once() {
    let redis = Redis::start();
    let pg = Pg::create().await;
    // A worst case of ~0.6 USD (60,000 output tokens at 10 per 1M) against a 1 USD total.
    let cfg = config(&redis, &pg.url(), ", budget: { usd: 1, period: total }", "");
    let gw = Gateway::start(&cfg).await;
    let big = json!({"model": "fast", "max_tokens": 60000, "messages": [{"role": "user", "content": "hi"}]});
    let r = post(&gw, KEY, &big).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let spent = settled_figures(&gw).await;
    assert!(spent > 0.0 && spent < 0.001, "{spent}");

    // The admission times out while Redis is frozen; Redis runs it when thawed.
    redis.signal("-STOP");
    let r = post(&gw, KEY, &big).await;
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "state_unavailable", "{v}");
    tokio::time::sleep(Duration::from_millis(700)).await;
    redis.signal("-CONT");
    // Admitted only once nothing of the refused request is held: 0.6 + 0.6 > 1.
    post_until_admitted(&gw, KEY, &big).await;
    let after_two = settled_figures(&gw).await;
    assert!(
        (after_two - 2.0 * spent).abs() < 1e-9,
        "{after_two} vs 2 × {spent}"
    );

    // Settlements while Redis is frozen (it froze while the upstream answered): the first
    // times out, the others find no connection (the gateway is making a new one); each is
    // sent again and counted once, however its first sending ends.
    let ask = |model: &str| json!({"model": model, "max_tokens": 20000, "messages": [{"role": "user", "content": "hi"}]});
    let (slow, slower) = (ask("slow"), ask("slower"));
    // `slower` answers after the first settlement timed out and dropped the connection.
    let pending = join_all([
        post(&gw, KEY, &slow),
        post(&gw, KEY, &slow),
        post(&gw, KEY, &slower),
    ]);
    let freeze = async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        redis.signal("-STOP");
    };
    let (answers, ()) = tokio::join!(pending, freeze);
    let mut cost = 0.0;
    for r in answers {
        cost += answer_cost(r).await;
    }
    tokio::time::sleep(Duration::from_millis(900)).await;
    redis.signal("-CONT");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (spent_now, reserved) = budget_figures(&gw).await;
        if reserved == 0.0 {
            assert!(
                (spent_now - after_two - cost).abs() < 1e-8,
                "{spent_now} vs {after_two} + {cost}: counted once\n{}",
                gw.logs()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "reservation still held: {reserved}\n{}",
            gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (spent_later, _) = budget_figures(&gw).await;
    assert!(
        (spent_later - after_two - cost).abs() < 1e-8,
        "{spent_later}"
    );
    assert!(gw.logs().contains("sent again"), "{}", gw.logs());
    drop(gw);
    pg.drop_db().await;
}

/// A settlement Redis did not take in time, or has not answered yet, is still sent at
/// shutdown (within a few seconds): the gateway stops while Redis is frozen, Redis thaws,
/// and the other replica finds the request counted and nothing reserved.
#[tokio::test]
async fn a_settlement_waiting_for_redis_is_sent_before_the_gateway_exits() {
    let redis = Redis::start();
    let pg = Pg::create().await;
    let cfg = config(&redis, &pg.url(), ", budget: { usd: 1, period: total }", "");
    let b = Gateway::start(&cfg).await;
    let slow = json!({"model": "slow", "max_tokens": 20000, "messages": [{"role": "user", "content": "hi"}]});
    let mut counted = 0.0;
    // Told to stop once the settlement has timed out (500 ms) and waits to be sent again, and
    // while it is still in its first sending.
    for delay in [700, 0] {
        let mut a = Gateway::start(&cfg).await;
        let pending = post(&a, KEY, &slow);
        let freeze = async {
            tokio::time::sleep(Duration::from_millis(150)).await;
            redis.signal("-STOP");
        };
        let (r, ()) = tokio::join!(pending, freeze);
        counted += answer_cost(r).await;
        tokio::time::sleep(Duration::from_millis(delay)).await;
        a.signal("TERM");
        tokio::time::sleep(Duration::from_millis(1000)).await;
        redis.signal("-CONT");
        let status = a.wait_exit(Duration::from_secs(20)).await.expect("exits");
        assert!(status.success(), "{}", a.logs());
        let (spent, reserved) = budget_figures(&b).await;
        assert_eq!(reserved, 0.0, "after {delay} ms: {}", a.logs());
        assert!(
            (spent - counted).abs() < 1e-8,
            "after {delay} ms: {spent} vs {counted}\n{}",
            a.logs()
        );
    }
    // It left the list of replicas as it exited (else the others would look for what it
    // held once it had been silent for `replica_timeout`): B alone is on it.
    let listed = Command::new("redis-cli")
        .args([
            "-p",
            &redis.port.to_string(),
            "zrange",
            "{switchyard}:replicas",
            "0",
            "-1",
        ])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert_eq!(listed.lines().count(), 1, "{listed}");
    drop(b);
    pg.drop_db().await;
}

/// Two replicas, taken for stopped after 5 s of silence, the key under a 2 USD `total` budget.
async fn two_quick_replicas() -> (Redis, Pg, Gateway, Gateway) {
    let redis = Redis::start();
    let pg = Pg::create().await;
    let cfg = quick_to_reap(config(
        &redis,
        &pg.url(),
        ", budget: { usd: 2, period: total }",
        "",
    ));
    let a = Gateway::start(&cfg).await;
    let b = Gateway::start(&cfg).await;
    (redis, pg, a, b)
}

/// The config with replicas taken for stopped after 5 s of silence (the least; 30 s by default).
fn quick_to_reap(cfg: String) -> String {
    cfg.replacen("state:\n", "state:\n  replica_timeout: 5s\n", 1)
}

/// A request of up to 60,000 output tokens (a worst case of ~0.6 USD) on its own task, so
/// the test can stop the replica meanwhile.
fn spawn_big(
    gw: &Gateway,
    model: &str,
) -> tokio::task::JoinHandle<reqwest::Result<reqwest::Response>> {
    tokio::spawn(
        reqwest::Client::new()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(&json!({"model": model, "max_tokens": 60000, "messages": [{"role": "user", "content": "hi"}]}))
            .timeout(Duration::from_secs(60))
            .send(),
    )
}

/// The cost of an answer at the test's price (2.5 / 10 USD per 1M tokens).
async fn answer_cost(r: reqwest::Response) -> f64 {
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().await.unwrap();
    let u = &answer["usage"];
    (u["prompt_tokens"].as_f64().unwrap() * 2.5 + u["completion_tokens"].as_f64().unwrap() * 10.0)
        / 1e6
}

/// Waits until the budget holds more than `at_least` USD in reservations.
async fn wait_reserved(gw: &Gateway, at_least: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while budget_figures(gw).await.1 <= at_least {
        assert!(Instant::now() < deadline, "nothing reserved\n{}", gw.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A replica killed while its request runs (an OOM kill, a lost node) never settles it: the
/// other replicas give back its budget reservation and its `max_parallel` slot once it has
/// been silent for `state.replica_timeout`. (Before, they stayed: the reservation until the
/// period's end, for good on a `total` budget.)
#[tokio::test]
async fn what_a_killed_replica_held_is_given_back_by_the_others() {
    let redis = Redis::start();
    let pg = Pg::create().await;
    let cfg = quick_to_reap(config(
        &redis,
        &pg.url(),
        ", limits: { max_parallel: 1 }, budget: { usd: 1, period: total }",
        "",
    ));
    let mut a = Gateway::start(&cfg).await;
    let b = Gateway::start(&cfg).await;
    // A worst case of ~0.6 USD against 1 USD: two cannot be held at once.
    let big = |model: &str| json!({"model": model, "max_tokens": 60000, "messages": [{"role": "user", "content": "hi"}]});
    let on_a = spawn_big(&a, "slowest");
    wait_reserved(&b, 0.5).await;
    a.signal("KILL");
    a.wait_exit(Duration::from_secs(10)).await.expect("killed");
    assert!(on_a.await.unwrap().is_err(), "the killed replica answered");

    // Held still: the slot (429) and the reservation.
    let r = post(&b, KEY, &big("fast")).await;
    assert_eq!(r.status(), 429, "{}", r.text().await.unwrap());
    assert!(budget_figures(&b).await.1 > 0.5);

    // Given back: the same request is admitted, and counted alone.
    let cost = answer_cost(post_until_admitted(&b, KEY, &big("fast")).await).await;
    let spent = settled_figures(&b).await;
    assert!((spent - cost).abs() < 1e-8, "{spent} vs {cost}");
    assert!(
        b.logs().contains("a replica stopped reaching Redis"),
        "{}",
        b.logs()
    );
    drop((a, b));
    pg.drop_db().await;
}

/// A replica cut off from Redis longer than `state.replica_timeout` (here: frozen) is taken
/// for stopped and what it held is given back; when it comes back and its request ends, the
/// request's cost is still counted, once, and no other reservation is given back with it.
#[tokio::test]
async fn a_replica_taken_for_stopped_still_counts_its_cost_when_it_comes_back() {
    let (_redis, pg, a, b) = two_quick_replicas().await;
    let on_a = spawn_big(&a, "slower");
    wait_reserved(&b, 0.5).await;
    a.signal("STOP");
    // B gives back A's reservation once A has been silent for 5 s.
    let deadline = Instant::now() + Duration::from_secs(20);
    while budget_figures(&b).await.1 > 0.0 {
        assert!(Instant::now() < deadline, "not given back\n{}", b.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A request of B's own holds ~0.6 while A comes back and settles.
    let on_b = spawn_big(&b, "slowest");
    wait_reserved(&b, 0.5).await;
    a.signal("CONT");
    let cost_a = answer_cost(on_a.await.unwrap().unwrap()).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (spent, reserved) = budget_figures(&b).await;
        if (spent - cost_a).abs() < 1e-8 {
            // Counted; B's reservation is still held (not given back a second time).
            assert!(reserved > 0.5, "{spent} {reserved}\n{}", a.logs());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A's cost not counted: {spent} vs {cost_a}\n{}",
            a.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cost_b = answer_cost(on_b.await.unwrap().unwrap()).await;
    let spent = settled_figures(&b).await;
    assert!(
        (spent - cost_a - cost_b).abs() < 1e-8,
        "{spent} vs {cost_a} + {cost_b}"
    );
    drop((a, b));
    pg.drop_db().await;
}

/// A replica that stopped holding many requests (20,000, as many budgets' worth of tickets)
/// is given back in batches, while every live replica keeps saying it is alive: the live
/// replica's own request keeps its reservation throughout (giving back one at a time, the
/// replicas stopped beating for longer than `replica_timeout` and took each other for
/// stopped).
#[tokio::test]
async fn giving_back_a_large_holding_takes_no_live_replica_for_stopped() {
    const N: usize = 60_000;
    const WORST: i64 = 1_000;
    let (redis, pg, a, b) = two_quick_replicas().await;
    // What a replica that crashed left: its tickets, what each took from a budget of its own,
    // and its last beat a minute ago.
    let client = redis::Client::open(format!("redis://127.0.0.1:{}", redis.port)).unwrap();
    let mut r = client.get_multiplexed_async_connection().await.unwrap();
    let dummy = "{switchyard}:bn:key:gone:0";
    let held = "{switchyard}:held:dead0";
    let mut pipe = redis::pipe();
    for i in 0..N {
        let ticket = format!("{{switchyard}}:t:dead0-{i}");
        pipe.cmd("SET").arg(&ticket).arg("a").ignore();
        let entry = json!(["0", "1", "0", WORST.to_string(), [dummy]]).to_string();
        pipe.cmd("HSET").arg(held).arg(&ticket).arg(entry).ignore();
    }
    pipe.cmd("HSET")
        .arg(dummy)
        .arg("r")
        .arg(N as i64 * WORST)
        .ignore();
    let (secs, _): (i64, i64) = redis::cmd("TIME").query_async(&mut r).await.unwrap();
    pipe.cmd("ZADD")
        .arg("{switchyard}:replicas")
        .arg((secs - 60) * 1000)
        .arg("dead0")
        .ignore();
    let () = pipe.query_async(&mut r).await.unwrap();

    let on_a = spawn_big(&a, "longest");
    wait_reserved(&b, 0.5).await;
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let left: i64 = redis::cmd("HGET")
            .arg(dummy)
            .arg("r")
            .query_async::<Option<i64>>(&mut r)
            .await
            .unwrap()
            .unwrap_or(0);
        let (_, reserved) = budget_figures(&b).await;
        assert!(
            reserved > 0.5,
            "the live replica's reservation was given back ({left} of the stopped one's left)\nA: {}\nB: {}",
            a.logs(),
            b.logs()
        );
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{left} still held");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let still: i64 = redis::cmd("HLEN")
        .arg(held)
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(still, 0);
    // Each ticket given back once, by one replica or the other: the counts add up (a
    // replica logs its count once it is done with the stopped one).
    let given = || {
        [a.logs(), b.logs()]
            .iter()
            .flat_map(|l| l.lines().map(str::to_string).collect::<Vec<_>>())
            .filter(|l| l.contains("a replica stopped reaching Redis"))
            .map(|l| {
                assert!(l.contains("replica=dead0"), "{l}");
                l.split("requests=")
                    .nth(1)
                    .unwrap()
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .parse::<usize>()
                    .unwrap()
            })
            .sum::<usize>()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while given() < N && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(given(), N);
    // The live request is still counted as usual when it ends.
    let cost = answer_cost(on_a.await.unwrap().unwrap()).await;
    let spent = settled_figures(&b).await;
    assert!((spent - cost).abs() < 1e-8, "{spent} vs {cost}");
    drop((a, b));
    pg.drop_db().await;
}

/// After Redis was away (restarted with its data), a replica that admits requests before it
/// beats again does not take the others for stopped before they had their turn to say they
/// are alive (here one needs 3 s): their requests keep their reservations. (Its admissions
/// refresh its place on the list, which its beat read as its own last beat: it gave back the
/// others' holdings ~1.5 s after Redis came back.)
#[tokio::test]
async fn after_redis_comes_back_no_live_replica_is_taken_for_stopped() {
    let (mut redis, pg, a, b) = two_quick_replicas().await;
    // Both beat for longer than `replica_timeout` before Redis goes.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let on_b = spawn_big(&b, "longest");
    wait_reserved(&a, 0.5).await;
    // A keeps admitting while Redis is away and as soon as it is back.
    let busy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let traffic = {
        let (url, busy) = (a.url("/v1/chat/completions"), busy.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let small = json!({"model": "fast", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});
            while busy.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = client.post(&url).bearer_auth(KEY).json(&small).send().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    redis.stop_keeping_data();
    tokio::time::sleep(Duration::from_secs(8)).await;
    redis.restart();
    // B is slow to come back (3 s, within what `replica_timeout` allows for connecting
    // again): A, admitting at once, must not take it for stopped meanwhile.
    b.signal("STOP");
    let thaw = {
        let pid = b.pid().to_string();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            Command::new("kill").args(["-CONT", &pid]).status().unwrap();
        })
    };
    // Longer than `replica_timeout` after Redis is back: B's reservation stays (read from
    // Redis itself: the gateways may not be connected again yet).
    let client = redis::Client::open(format!("redis://127.0.0.1:{}", redis.port)).unwrap();
    let mut r = client.get_multiplexed_async_connection().await.unwrap();
    let until = Instant::now() + Duration::from_secs(7);
    while Instant::now() < until {
        let reserved: Option<i64> = redis::cmd("HGET")
            .arg("{switchyard}:bn:key:budgeted:0")
            .arg("r")
            .query_async(&mut r)
            .await
            .unwrap();
        assert!(
            reserved.unwrap_or(0) > 500_000_000,
            "B's reservation was given back: {reserved:?}\nA: {}",
            a.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    busy.store(false, std::sync::atomic::Ordering::Relaxed);
    traffic.await.unwrap();
    thaw.await.unwrap();
    assert!(
        !a.logs().contains("a replica stopped reaching Redis"),
        "{}",
        a.logs()
    );
    assert_eq!(on_b.await.unwrap().unwrap().status(), 200);
    drop((a, b));
    pg.drop_db().await;
}
