//! Every Prometheus metric family of the gateway, defined once. Label values come only from
//! the config (route, deployment, provider, key and team names) or from fixed sets (status
//! codes, endpoints, kinds), so series stay bounded whatever clients send: a request for an
//! unknown model counts under `route="unknown"`.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

use crate::api::Operation;
use crate::Name;

use prometheus::{
    exponential_buckets, Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub time_to_first_token: HistogramVec,
    pub overhead: HistogramVec,
    pub tokens: IntCounterVec,
    pub cost: prometheus::CounterVec,
    pub budget_spent: GaugeVec,
    pub budget_limit: GaugeVec,
    pub ratelimited: IntCounterVec,
    pub budget_alerts: IntCounterVec,
    pub cache_requests: IntCounterVec,
    pub cache_saved: prometheus::CounterVec,
    pub cache_bytes: prometheus::IntGauge,
    pub cache_entries: prometheus::IntGauge,
    pub cache_declined: prometheus::IntCounter,
    pub upstream_errors: IntCounterVec,
    pub retries: IntCounterVec,
    pub fallbacks: IntCounterVec,
    pub deployment_up: IntGaugeVec,
    pub inflight: IntGaugeVec,
    pub config_reloads: IntCounterVec,
    pub state_errors: IntCounterVec,
}

/// A deployment's histograms, resolved from their label values once (on first use, so a
/// deployment never used adds no series) instead of on every request.
pub struct DeploymentMetrics {
    route: Name,
    deployment: Name,
    duration: [OnceLock<Histogram>; Operation::ALL.len()],
    time_to_first_token: OnceLock<Histogram>,
    overhead: OnceLock<Histogram>,
    /// The answer's `x-switchyard-route` and `x-switchyard-deployment` values, made once
    /// (a clone shares their bytes); `None` for a name no header can carry.
    route_header: Option<http::HeaderValue>,
    deployment_header: Option<http::HeaderValue>,
    /// The per-key series of the requests this deployment served (`KeyCounters`), by key
    /// name: made on a key's first request, looked up by one map read after that.
    keys: RwLock<HashMap<Name, Arc<KeyCounters>>>,
}

/// One key's series on one deployment: what `RequestRecord::finish` and the access log add
/// to on every request, resolved from their label values once (a `with_label_values` hashes
/// four to six labels and takes the family's lock each time), and looked up once per request
/// (`DeploymentMetrics::key_counters`).
pub struct KeyCounters {
    /// `switchyard_tokens_total`, `kind` `prompt` (uncached), `cached`, `completion`.
    pub prompt: prometheus::IntCounter,
    pub cached: prometheus::IntCounter,
    pub completion: prometheus::IntCounter,
    /// `switchyard_cost_usd_total`.
    pub cost: prometheus::Counter,
    /// `switchyard_requests_total{status="200"}`, per endpoint.
    ok: [OnceLock<prometheus::IntCounter>; Operation::ALL.len()],
    /// The labels: route, deployment, team, key.
    labels: [Name; 4],
}

impl std::fmt::Debug for KeyCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyCounters({:?})", self.labels)
    }
}

impl KeyCounters {
    /// `switchyard_requests_total` for a 200 on `op`.
    pub fn ok(&self, m: &Metrics, op: Operation) -> &prometheus::IntCounter {
        let [route, deployment, team, key] = &self.labels;
        self.ok[op as usize].get_or_init(|| {
            m.requests
                .with_label_values(&[route, deployment, op.path(), "200", team, key])
        })
    }
}

impl std::fmt::Debug for DeploymentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeploymentMetrics({}, {})", self.route, self.deployment)
    }
}

impl DeploymentMetrics {
    pub fn new(route: &str, deployment: &str) -> DeploymentMetrics {
        DeploymentMetrics {
            route: route.into(),
            deployment: deployment.into(),
            duration: Default::default(),
            time_to_first_token: OnceLock::new(),
            overhead: OnceLock::new(),
            route_header: http::HeaderValue::from_str(route).ok(),
            deployment_header: http::HeaderValue::from_str(deployment).ok(),
            keys: RwLock::default(),
        }
    }

    /// The series of `key` (of `team`) on this deployment.
    pub fn key_counters(&self, m: &Metrics, key: &Name, team: &Name) -> Arc<KeyCounters> {
        {
            let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
            // A key keeps its team within a config generation (and so within one
            // `DeploymentMetrics`); the check keeps a wrong label out all the same.
            if let Some(c) = keys.get(key).filter(|c| c.labels[2] == *team) {
                return c.clone();
            }
        }
        let labels = |kind: &'static str| [&*self.route, &*self.deployment, &**team, &**key, kind];
        let made = Arc::new(KeyCounters {
            prompt: m.tokens.with_label_values(&labels("prompt")),
            cached: m.tokens.with_label_values(&labels("cached")),
            completion: m.tokens.with_label_values(&labels("completion")),
            cost: m
                .cost
                .with_label_values(&[&*self.route, &*self.deployment, &**team, &**key]),
            ok: Default::default(),
            labels: [
                self.route.clone(),
                self.deployment.clone(),
                team.clone(),
                key.clone(),
            ],
        });
        self.keys
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.clone(), made.clone());
        made
    }

    /// The `x-switchyard-route` and `x-switchyard-deployment` values of this deployment's
    /// answers.
    pub fn headers(&self) -> (Option<&http::HeaderValue>, Option<&http::HeaderValue>) {
        (self.route_header.as_ref(), self.deployment_header.as_ref())
    }

    /// `switchyard_request_duration_seconds{route, deployment, endpoint}`.
    pub fn duration(&self, m: &Metrics, op: Operation) -> &Histogram {
        self.duration[op as usize].get_or_init(|| {
            m.request_duration
                .with_label_values(&[&self.route, &self.deployment, op.path()])
        })
    }

    /// `switchyard_time_to_first_token_seconds{route, deployment}`.
    pub fn time_to_first_token(&self, m: &Metrics) -> &Histogram {
        self.time_to_first_token.get_or_init(|| {
            m.time_to_first_token
                .with_label_values(&[&self.route, &self.deployment])
        })
    }

    /// `switchyard_overhead_seconds{route}`.
    pub fn overhead(&self, m: &Metrics) -> &Histogram {
        self.overhead
            .get_or_init(|| m.overhead.with_label_values(&[&self.route]))
    }
}

/// Latency buckets for LLM calls: 10 ms to about 3 minutes.
fn latency_buckets() -> Vec<f64> {
    exponential_buckets(0.01, 2.0, 15).unwrap_or_default()
}

/// The gateway's own time: 10 µs to about 0.3 s.
fn overhead_buckets() -> Vec<f64> {
    exponential_buckets(0.00001, 2.0, 15).unwrap_or_default()
}

fn build() -> Result<Metrics, prometheus::Error> {
    let registry = Registry::new();
    macro_rules! reg {
        ($m:expr) => {{
            let m = $m;
            registry.register(Box::new(m.clone()))?;
            m
        }};
    }
    Ok(Metrics {
        requests: reg!(IntCounterVec::new(
            Opts::new("switchyard_requests_total", "Requests answered, by route, deployment, endpoint, status, team and key."),
            &["route", "deployment", "endpoint", "status", "team", "key"]
        )?),
        request_duration: reg!(HistogramVec::new(
            HistogramOpts::new("switchyard_request_duration_seconds", "Time from request to the end of the response body.")
                .buckets(latency_buckets()),
            &["route", "deployment", "endpoint"]
        )?),
        time_to_first_token: reg!(HistogramVec::new(
            HistogramOpts::new("switchyard_time_to_first_token_seconds", "Time from request to the first byte of a streamed answer.")
                .buckets(latency_buckets()),
            &["route", "deployment"]
        )?),
        overhead: reg!(HistogramVec::new(
            HistogramOpts::new("switchyard_overhead_seconds", "Time spent in the gateway itself: request time minus time waiting on the upstream.")
                .buckets(overhead_buckets()),
            &["route"]
        )?),
        tokens: reg!(IntCounterVec::new(
            Opts::new("switchyard_tokens_total", "Tokens by kind (prompt, cached, completion)."),
            &["route", "deployment", "team", "key", "kind"]
        )?),
        cost: reg!(prometheus::CounterVec::new(
            Opts::new("switchyard_cost_usd_total", "Cost in USD, as written to the ledger."),
            &["route", "deployment", "team", "key"]
        )?),
        budget_spent: reg!(GaugeVec::new(
            Opts::new("switchyard_budget_spent_usd", "Spent in the budget's current period."),
            &["scope", "name", "period"]
        )?),
        budget_limit: reg!(GaugeVec::new(
            Opts::new("switchyard_budget_limit_usd", "The budget's limit per period."),
            &["scope", "name", "period"]
        )?),
        ratelimited: reg!(IntCounterVec::new(
            Opts::new("switchyard_ratelimited_total", "Requests refused by a rate limit or a budget; kind: rpm, tpm, max_parallel, budget."),
            &["scope", "name", "kind"]
        )?),
        budget_alerts: reg!(IntCounterVec::new(
            Opts::new("switchyard_budget_alerts_total", "Budget alerts: kind soft (soft_usd crossed) or hard (first refusal of a period)."),
            &["scope", "name", "kind"]
        )?),
        cache_requests: reg!(IntCounterVec::new(
            Opts::new("switchyard_cache_requests_total", "Cache lookups by result (hit, miss, skip)."),
            &["route", "result"]
        )?),
        cache_saved: reg!(prometheus::CounterVec::new(
            Opts::new("switchyard_cache_saved_usd_total", "What cache hits would have cost upstream."),
            &["route"]
        )?),
        cache_bytes: reg!(prometheus::IntGauge::new(
            "switchyard_cache_bytes",
            "Bytes the in-process cache holds, as counted against cache.max_bytes."
        )?),
        cache_entries: reg!(prometheus::IntGauge::new(
            "switchyard_cache_entries",
            "Answers the in-process cache holds."
        )?),
        cache_declined: reg!(prometheus::IntCounter::new(
            "switchyard_cache_declined_total",
            "Answers not stored in process: the cache was full and the request had not been asked for before (a cache too small for its traffic declines most)."
        )?),
        upstream_errors: reg!(IntCounterVec::new(
            Opts::new("switchyard_upstream_errors_total", "Failed upstream attempts; kind: connect, timeout, or the status code."),
            &["route", "deployment", "provider", "kind"]
        )?),
        retries: reg!(IntCounterVec::new(
            Opts::new("switchyard_retries_total", "Attempts after the first, within a route."),
            &["route"]
        )?),
        fallbacks: reg!(IntCounterVec::new(
            Opts::new("switchyard_fallbacks_total", "Requests sent on to a fallback route; kind: fallbacks, context_fallbacks, content_filter_fallbacks."),
            &["route", "kind"]
        )?),
        deployment_up: reg!(IntGaugeVec::new(
            Opts::new("switchyard_deployment_up", "1 when the deployment takes requests, 0 while it cools down."),
            &["route", "deployment", "provider"]
        )?),
        inflight: reg!(IntGaugeVec::new(
            Opts::new("switchyard_inflight_requests", "Requests in flight to upstreams, by route."),
            &["route"]
        )?),
        config_reloads: reg!(IntCounterVec::new(
            Opts::new("switchyard_config_reloads_total", "Config reloads by result (ok, error)."),
            &["result"]
        )?),
        state_errors: reg!(IntCounterVec::new(
            Opts::new("switchyard_state_errors_total", "Failed calls to the shared state (Redis), by operation."),
            &["operation"]
        )?),
        registry,
    })
}

/// Counts a failed call to the shared state.
pub fn state_error(operation: &str) {
    if let Some(m) = metrics() {
        m.state_errors.with_label_values(&[operation]).inc();
    }
}

/// The gateway's metrics. Built on first use; if building fails (it cannot with these
/// static definitions), metrics are simply absent rather than a crash.
pub fn metrics() -> Option<&'static Metrics> {
    static M: OnceLock<Option<Metrics>> = OnceLock::new();
    M.get_or_init(|| match build() {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::error!(error = %e, "metrics unavailable");
            None
        }
    })
    .as_ref()
}

pub fn encode() -> String {
    let Some(m) = metrics() else {
        return String::new();
    };
    let mut buf = Vec::new();
    if TextEncoder::new()
        .encode(&m.registry.gather(), &mut buf)
        .is_err()
    {
        return String::new();
    }
    String::from_utf8(buf).unwrap_or_default()
}

/// Creates the series every configured name will have, at zero, so dashboards and alerts
/// see a 0 rather than nothing before the first retry, refusal or reload.
pub fn init_series(
    routes: &[(&str, Vec<(&str, &str)>)],
    limits: &[(&str, &str)],
    budgets: &[(&str, &str, &str)],
) {
    let Some(m) = metrics() else { return };
    for result in ["ok", "error"] {
        m.config_reloads.with_label_values(&[result]);
    }
    for (route, deployments) in routes {
        m.retries.with_label_values(&[route]);
        m.cache_saved.with_label_values(&[route]);
        for kind in ["fallbacks", "context_fallbacks", "content_filter_fallbacks"] {
            m.fallbacks.with_label_values(&[route, kind]);
        }
        for result in ["hit", "miss", "skip"] {
            m.cache_requests.with_label_values(&[route, result]);
        }
        for (deployment, provider) in deployments {
            for kind in ["connect", "timeout", "429", "500", "502", "503", "504"] {
                m.upstream_errors
                    .with_label_values(&[route, deployment, provider, kind]);
            }
        }
    }
    for (scope, name) in limits {
        for kind in ["rpm", "tpm", "max_parallel"] {
            m.ratelimited.with_label_values(&[scope, name, kind]);
        }
    }
    for (scope, name, _period) in budgets {
        m.ratelimited.with_label_values(&[scope, name, "budget"]);
        for kind in ["soft", "hard"] {
            m.budget_alerts.with_label_values(&[scope, name, kind]);
        }
    }
    for operation in [
        "connect",
        "admit",
        "settle",
        "cooldown_sync",
        "cache_get",
        "cache_set",
    ] {
        m.state_errors.with_label_values(&[operation]);
    }
}
