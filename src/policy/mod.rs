//! Admission: rate limits (`rpm`, `tpm`, `max_parallel` on keys and teams; `rpm`, `tpm` on
//! routes) and budgets (keys, teams, `global`; daily, weekly, monthly, total). A request is
//! admitted only if every limit has room and every budget can hold spent + reserved + the
//! request's worst-case cost; the reservation is settled to the real cost when the request
//! ends. The counters live behind `PolicyState` (in process here; Redis for several
//! replicas), and one admission is one atomic step there, so no budget is ever overspent.

mod memory;
mod redis;

use std::sync::Arc;
use std::time::Duration;

use chrono::{Datelike, TimeZone, Utc};
use futures_util::future::BoxFuture;
use http::StatusCode;
use serde_json::json;

use crate::config::{BudgetCfg, LimitsCfg, Loaded, Period};
use crate::error::GatewayError;

pub use memory::{hard_alert, MemoryState};
pub use redis::RedisState;

/// One rate limit that applies to a request: `key:NAME`, `team:NAME` or `route:NAME`.
#[derive(Debug, Clone)]
pub struct LimitRef {
    pub id: Arc<str>,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub max_parallel: Option<u64>,
}

/// One budget that applies to a request: `key:NAME`, `team:NAME` or `global`.
#[derive(Debug, Clone)]
pub struct BudgetRef {
    pub id: Arc<str>,
    pub scope: BudgetScope,
    pub usd: f64,
    pub soft_usd: Option<f64>,
    pub period: Period,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BudgetScope {
    Global,
    Key(String),
    Team(String),
}

impl BudgetScope {
    /// The ledger rows this budget counts.
    pub fn ledger_scope(&self) -> crate::ledger::store::Scope<'_> {
        use crate::ledger::store::Scope;
        match self {
            BudgetScope::Global => Scope::Global,
            BudgetScope::Key(k) => Scope::Key(k),
            BudgetScope::Team(t) => Scope::Team(t),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            BudgetScope::Global => "global",
            BudgetScope::Key(_) => "key",
            BudgetScope::Team(_) => "team",
        }
    }
    pub fn name(&self) -> &str {
        match self {
            BudgetScope::Global => "global",
            BudgetScope::Key(n) | BudgetScope::Team(n) => n,
        }
    }
}

/// What one request asks of the limits and budgets.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Shared with the policy table (a copy is made only when a route adds its own limit).
    pub limits: Arc<[LimitRef]>,
    pub budgets: Arc<[BudgetRef]>,
    /// Prompt tokens estimated at admission (corrected with real usage at settlement).
    pub tokens: u64,
    /// The most the request can cost.
    pub worst_usd: f64,
}

/// What an admission reserved, to settle later, and the figures for the response headers.
#[derive(Debug, Clone, Default)]
pub struct Admitted {
    pub minute: u64,
    /// `(budget id, period start)` of each reservation.
    pub periods: Vec<(Arc<str>, i64)>,
    pub headers: LimitHeaders,
    /// Whether anything was counted (false when Redis was down and the policy is `open`):
    /// only what was counted is settled.
    pub counted: bool,
    /// Redis only: the admission's ticket, with which it is settled once.
    pub ticket: Option<Arc<str>>,
    /// When it was admitted (ms since the epoch): its settlement, finding the ticket gone
    /// with Redis's data, tells by it whether a budget was seeded again since.
    pub at_ms: i64,
}

/// The OpenAI rate-limit headers of the tightest limit (remaining counts after this request).
#[derive(Debug, Clone, Copy, Default)]
pub struct LimitHeaders {
    pub requests: Option<(u64, u64)>,
    pub tokens: Option<(u64, u64)>,
}

impl LimitHeaders {
    /// Each pair from the limit with the less left, of these and `other`.
    pub fn tightest(self, other: LimitHeaders) -> LimitHeaders {
        let least = |a: Option<(u64, u64)>, b: Option<(u64, u64)>| match (a, b) {
            (Some(a), Some(b)) => Some(if b.1 < a.1 { b } else { a }),
            (a, b) => a.or(b),
        };
        LimitHeaders {
            requests: least(self.requests, other.requests),
            tokens: least(self.tokens, other.tokens),
        }
    }

    pub fn apply(&self, h: &mut http::HeaderMap) {
        use http::HeaderName;
        // Names made once: a `&str` name is parsed and checked on every insert.
        const LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
        const REMAINING_REQUESTS: HeaderName =
            HeaderName::from_static("x-ratelimit-remaining-requests");
        const LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
        const REMAINING_TOKENS: HeaderName =
            HeaderName::from_static("x-ratelimit-remaining-tokens");
        let figures = [
            (LIMIT_REQUESTS, self.requests.map(|r| r.0)),
            (REMAINING_REQUESTS, self.requests.map(|r| r.1)),
            (LIMIT_TOKENS, self.tokens.map(|t| t.0)),
            (REMAINING_TOKENS, self.tokens.map(|t| t.1)),
        ];
        // The (up to four) numbers written side by side in one buffer, each header value a
        // slice of it: one allocation instead of two per value.
        let mut digits = Vec::with_capacity(4 * 20);
        let mut ends = [0usize; 4];
        for ((_, figure), end) in figures.iter().zip(&mut ends) {
            if let Some(n) = figure {
                digits.extend_from_slice(itoa::Buffer::new().format(*n).as_bytes());
            }
            *end = digits.len();
        }
        if digits.is_empty() {
            return;
        }
        let digits = bytes::Bytes::from(digits);
        let mut start = 0;
        for ((name, figure), end) in figures.into_iter().zip(ends) {
            // Decimal digits are always a valid header value.
            if let (Some(_), Ok(v)) = (
                figure,
                http::HeaderValue::from_maybe_shared(digits.slice(start..end)),
            ) {
                h.insert(name, v);
            }
            start = end;
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone)]
pub enum Refused {
    Rate {
        limit: Arc<str>,
        what: &'static str,
        retry_after: Duration,
        headers: LimitHeaders,
    },
    Budget {
        budget: BudgetRef,
        spent: f64,
        reserved: f64,
        retry_after: Option<Duration>,
        first_in_period: bool,
    },
    /// The shared state (Redis) is unreachable and `on_redis_error` says `closed`.
    Unavailable,
    /// A request no wait lets through (`Plan::never_admitted`): told so, not to retry.
    Never {
        limit: Arc<str>,
        /// `rpm`, `tpm`, `max_parallel` or `budget`.
        kind: &'static str,
        message: String,
    },
}

impl Refused {
    /// Counts the refusal in `switchyard_ratelimited_total{scope, name, kind}`.
    pub fn count(&self) {
        let Some(m) = crate::telemetry::metrics::metrics() else {
            return;
        };
        let (scope, name, kind) = match self {
            Refused::Rate { limit, what, .. } => {
                let (scope, name) = limit.split_once(':').unwrap_or(("", limit));
                let kind = match *what {
                    "requests per minute" => "rpm",
                    "tokens per minute" => "tpm",
                    "requests in parallel" => "max_parallel",
                    _ => "internal",
                };
                (scope, name, kind)
            }
            Refused::Budget { budget, .. } => (budget.scope.kind(), budget.scope.name(), "budget"),
            Refused::Unavailable => ("state", "redis", "unavailable"),
            // As the others name them: a budget `global` is scope and name `global`.
            Refused::Never { limit, kind, .. } => {
                let whole = if *kind == "budget" { limit } else { "" };
                let (scope, name) = limit.split_once(':').unwrap_or((whole, limit));
                (scope, name, *kind)
            }
        };
        m.ratelimited.with_label_values(&[scope, name, kind]).inc();
    }

    pub fn into_error(self) -> GatewayError {
        match self {
            Refused::Rate {
                limit,
                what,
                retry_after,
                headers,
            } => {
                // OpenAI's own types: `tokens` for a tokens-per-minute limit, else `requests`.
                let kind = if what == "tokens per minute" {
                    "tokens"
                } else {
                    "requests"
                };
                let mut e = GatewayError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    kind,
                    "rate_limit_exceeded",
                    format!(
                        "Rate limit reached for {limit} on {what}. Please retry after {}s.",
                        secs_up(retry_after)
                    ),
                );
                e.headers
                    .push(("retry-after", secs_up(retry_after).to_string()));
                let mut h = http::HeaderMap::new();
                headers.apply(&mut h);
                for (name, value) in &h {
                    if let Ok(v) = value.to_str() {
                        e.headers
                            .push((header_static(name.as_str()), v.to_string()));
                    }
                }
                e
            }
            Refused::Unavailable => {
                let mut e = GatewayError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "api_error",
                    "state_unavailable",
                    "Limits and budgets cannot be checked right now (shared state unreachable); \
                     please retry.",
                );
                e.headers.push(("retry-after", "1".to_string()));
                e
            }
            Refused::Budget {
                budget,
                spent,
                reserved,
                retry_after,
                ..
            } => {
                let mut e = GatewayError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "insufficient_quota",
                    "budget_exceeded",
                    format!(
                        "Budget exceeded for {}: {} USD of its {} USD {} budget is spent \
                         or reserved, and this request could cost more than what is left.",
                        budget.id,
                        usd(spent + reserved),
                        usd(budget.usd),
                        period_name(budget.period)
                    ),
                );
                if let Some(ra) = retry_after {
                    e.headers.push(("retry-after", secs_up(ra).to_string()));
                }
                e
            }
            Refused::Never { kind, message, .. } => {
                let (kind, code) = match kind {
                    "budget" => ("insufficient_quota", "budget_exceeded"),
                    "tpm" => ("tokens", "rate_limit_exceeded"),
                    _ => ("requests", "rate_limit_exceeded"),
                };
                let mut e = GatewayError::new(StatusCode::TOO_MANY_REQUESTS, kind, code, message);
                // OpenAI's word to its SDKs that a retry cannot help (they retry a 429).
                e.headers.push(("x-should-retry", "false".to_string()));
                e
            }
        }
    }
}

impl Plan {
    /// A limit or budget this request can pass under no count, at no time: `rpm: 0` or
    /// `max_parallel: 0`, a prompt estimate above a `tpm`, a worst case above a budget's
    /// whole `usd`. Told at once that waiting will not help (it was told to retry after the
    /// minute or the period, and the SDK did, for minutes).
    pub fn never_admitted(&self) -> Option<Refused> {
        let never = |limit: &Arc<str>, kind, message| {
            Some(Refused::Never {
                limit: limit.clone(),
                kind,
                message,
            })
        };
        for l in self.limits.iter() {
            if l.rpm == Some(0) {
                return never(
                    &l.id,
                    "rpm",
                    format!("{} admits no requests (rpm: 0).", l.id),
                );
            }
            if l.max_parallel == Some(0) {
                return never(
                    &l.id,
                    "max_parallel",
                    format!("{} admits no requests (max_parallel: 0).", l.id),
                );
            }
            if let Some(tpm) = l.tpm.filter(|t| self.tokens > *t) {
                return never(
                    &l.id,
                    "tpm",
                    format!(
                        "Request too large for {} on tokens per minute: limit {tpm}, requested \
                         {} (the prompt's estimate). The input must be reduced in order to run \
                         successfully.",
                        l.id, self.tokens
                    ),
                );
            }
        }
        for b in self.budgets.iter() {
            if self.worst_usd.is_nan() || nanos_up(self.worst_usd) > nanos(b.usd) {
                return never(
                    &b.id,
                    "budget",
                    format!(
                        "Request too large for {}: it could cost up to {} USD, more than the \
                         whole {} USD {} budget. Lower its max_tokens (or its input) for it to \
                         run.",
                        b.id,
                        usd(self.worst_usd),
                        usd(b.usd),
                        period_name(b.period)
                    ),
                );
            }
        }
        None
    }
}

/// Budgets count in nano-dollars, in process and in Redis alike: a request can cost less
/// than a micro-dollar (ten tokens of an embedding model), and counted in micro-dollars it
/// either vanished (rounded down) or counted five times over (rounded up).
pub(crate) fn nanos(usd: f64) -> i64 {
    (usd * 1e9).round() as i64
}

/// Whole nano-dollars, rounded up (past a thousandth of one of float noise: 3 × 0.000001 is
/// 3.0000000000000004e-6), so rounding never lets a request through, nor a cost go uncounted.
pub(crate) fn nanos_up(usd: f64) -> i64 {
    (usd * 1e9 - 1e-3).ceil().max(0.0) as i64
}

/// Whole seconds, rounded up: a client that waits that long finds room.
fn secs_up(d: Duration) -> u64 {
    d.as_secs_f64().ceil().max(1.0) as u64
}

fn header_static(name: &str) -> &'static str {
    match name {
        "x-ratelimit-limit-requests" => "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests" => "x-ratelimit-remaining-requests",
        "x-ratelimit-limit-tokens" => "x-ratelimit-limit-tokens",
        _ => "x-ratelimit-remaining-tokens",
    }
}

/// The real outcome of a request, for its settlement.
#[derive(Debug, Clone, Copy, Default)]
pub struct Actual {
    pub cost_usd: f64,
    /// Prompt + completion tokens, to correct the `tpm` estimate.
    pub tokens: u64,
    /// When the request ended and its row was queued for the ledger (ms since the epoch).
    pub ended_ms: i64,
}

/// A soft budget crossed (or a hard stop hit) for the first time this period.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Alert {
    pub kind: &'static str,
    pub scope: &'static str,
    pub name: String,
    pub spent: f64,
    pub limit: f64,
    pub period: &'static str,
}

/// Where limit counters, reservations and spend live.
pub trait PolicyState: Send + Sync {
    fn admit<'a>(&'a self, plan: &'a Plan, now_ms: i64)
        -> BoxFuture<'a, Result<Admitted, Refused>>;
    /// Settles a request in the minute and period it was admitted in (when it ended does
    /// not matter).
    fn settle<'a>(
        &'a self,
        plan: &'a Plan,
        admitted: &'a Admitted,
        actual: Actual,
    ) -> BoxFuture<'a, Vec<Alert>>;
    /// Seeds what a budget spent in its current period with the ledger's figure, read at
    /// `read_ms` (at start,
    /// and when a reload brings a budget in or back): the state keeps the more of what it
    /// counted and that figure (settlements the ledger's writers have not written yet, or
    /// costs the state missed).
    fn seed_spent<'a>(
        &'a self,
        budget: &'a BudgetRef,
        period_start: i64,
        spent: f64,
        read_ms: i64,
    ) -> BoxFuture<'a, ()>;
    /// Spent and reserved of a budget in the period starting at `period_start`; `None`
    /// when the shared state cannot be read (Redis unreachable): unknown, not 0.
    fn budget_status<'a>(
        &'a self,
        budget: &'a BudgetRef,
        period_start: i64,
    ) -> BoxFuture<'a, Option<(f64, f64)>>;
    /// At shutdown: what is still to be told to shared state, told within `within`.
    fn drain(&self, within: std::time::Duration) -> BoxFuture<'_, ()> {
        let _ = within;
        Box::pin(async {})
    }
}

/// Dollars to the micro-dollar, the precision budgets count in, without trailing zeros:
/// `19.91`, `20`, `0.000063`.
fn usd(v: f64) -> String {
    let s = format!("{v:.6}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.into()
    }
}

pub fn period_name(p: Period) -> &'static str {
    match p {
        Period::Daily => "daily",
        Period::Weekly => "weekly",
        Period::Monthly => "monthly",
        Period::Total => "total",
    }
}

/// Start of the calendar period (UTC) that holds `now_ms`, and of the next one.
pub fn period_bounds(p: Period, now_ms: i64) -> (i64, Option<i64>) {
    let now = Utc
        .timestamp_millis_opt(now_ms)
        .single()
        .unwrap_or_else(Utc::now);
    let day = now.date_naive();
    let midnight = |d: chrono::NaiveDate| {
        d.and_hms_opt(0, 0, 0)
            .map(|t| Utc.from_utc_datetime(&t).timestamp_millis())
            .unwrap_or(0)
    };
    match p {
        Period::Total => (0, None),
        Period::Daily => (midnight(day), day.succ_opt().map(midnight)),
        Period::Weekly => {
            let start = day - chrono::Duration::days(day.weekday().num_days_from_monday() as i64);
            (
                midnight(start),
                Some(midnight(start + chrono::Duration::days(7))),
            )
        }
        Period::Monthly => {
            let start = day.with_day(1).unwrap_or(day);
            let next = if start.month() == 12 {
                chrono::NaiveDate::from_ymd_opt(start.year() + 1, 1, 1)
            } else {
                chrono::NaiveDate::from_ymd_opt(start.year(), start.month() + 1, 1)
            };
            (midnight(start), next.map(midnight))
        }
    }
}

/// Limits and budgets compiled from the config, by key and by route.
#[derive(Debug, Default)]
pub struct PolicyTable {
    /// By key name: the key's own and its team's limits.
    key_limits: std::collections::HashMap<String, Arc<[LimitRef]>>,
    /// By key name: the key's, its team's and the global budget.
    key_budgets: std::collections::HashMap<String, Arc<[BudgetRef]>>,
    /// By route name, for routes with their own `limits:`: that limit alone (a caller without
    /// a key), and by key name the key's limits followed by it. Made at load, so that a plan
    /// is only shared slices.
    route_limits: std::collections::HashMap<String, RouteLimits>,
    /// Budgets when the gateway runs without keys: only the global one.
    global: Arc<[BudgetRef]>,
    pub all_budgets: Vec<BudgetRef>,
}

#[derive(Debug)]
struct RouteLimits {
    alone: Arc<[LimitRef]>,
    by_key: std::collections::HashMap<String, Arc<[LimitRef]>>,
}

fn limit(id: String, l: &LimitsCfg) -> LimitRef {
    LimitRef {
        id: id.into(),
        rpm: l.rpm,
        tpm: l.tpm,
        max_parallel: l.max_parallel,
    }
}

fn budget(id: String, scope: BudgetScope, b: &BudgetCfg) -> BudgetRef {
    BudgetRef {
        id: id.into(),
        scope,
        usd: b.usd,
        soft_usd: b.soft_usd,
        period: b.period,
    }
}

impl PolicyTable {
    pub fn build(loaded: &Loaded) -> PolicyTable {
        let c = &loaded.config;
        let global: Vec<BudgetRef> = c
            .budget
            .iter()
            .map(|b| budget("global".into(), BudgetScope::Global, b))
            .collect();
        let team_budgets: std::collections::HashMap<&str, BudgetRef> = c
            .teams
            .iter()
            .filter_map(|(n, t)| {
                t.budget.as_ref().map(|b| {
                    (
                        n.as_str(),
                        budget(format!("team:{n}"), BudgetScope::Team(n.clone()), b),
                    )
                })
            })
            .collect();
        let mut t = PolicyTable {
            global: global.as_slice().into(),
            ..Default::default()
        };
        t.all_budgets.extend(global.iter().cloned());
        t.all_budgets.extend(team_budgets.values().cloned());
        for k in &c.keys {
            let mut limits = Vec::new();
            if let Some(l) = &k.limits {
                limits.push(limit(format!("key:{}", k.name), l));
            }
            let team = k
                .team
                .as_deref()
                .and_then(|n| c.teams.get(n).map(|t| (n, t)));
            if let Some((n, tc)) = team {
                if let Some(l) = &tc.limits {
                    limits.push(limit(format!("team:{n}"), l));
                }
            }
            let mut budgets = Vec::new();
            if let Some(b) = &k.budget {
                let r = budget(
                    format!("key:{}", k.name),
                    BudgetScope::Key(k.name.clone()),
                    b,
                );
                t.all_budgets.push(r.clone());
                budgets.push(r);
            }
            if let Some((n, _)) = team {
                budgets.extend(team_budgets.get(n).cloned());
            }
            budgets.extend(global.iter().cloned());
            t.key_limits.insert(k.name.clone(), limits.into());
            t.key_budgets.insert(k.name.clone(), budgets.into());
        }
        for (name, r) in &c.models {
            if let Some(l) = &r.limits {
                let route = limit(format!("route:{name}"), l);
                let by_key = t
                    .key_limits
                    .iter()
                    .map(|(k, own)| {
                        let all = own.iter().chain([&route]).cloned().collect();
                        (k.clone(), all)
                    })
                    .collect();
                let alone = Arc::new([route]);
                t.route_limits
                    .insert(name.clone(), RouteLimits { alone, by_key });
            }
        }
        t
    }

    /// Every rate limit's id (`key:NAME`, `team:NAME`, `route:NAME`).
    pub fn limit_ids(&self) -> Vec<Arc<str>> {
        let mut ids: Vec<Arc<str>> = self
            .key_limits
            .values()
            .flat_map(|l| l.iter())
            .map(|l| l.id.clone())
            .chain(
                self.route_limits
                    .values()
                    .flat_map(|r| r.alone.iter())
                    .map(|l| l.id.clone()),
            )
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// The plan of a request reaching `route` as a fallback: the route's own `limits:` alone
    /// (the key's and its budgets were admitted with the route it named). `None` when the
    /// route has none.
    pub fn fallback_plan(&self, route: &str, tokens: u64) -> Option<Plan> {
        self.route_limits.get(route).map(|r| Plan {
            limits: r.alone.clone(),
            tokens,
            ..Default::default()
        })
    }

    pub fn plan(&self, key: &str, route: &str, tokens: u64, worst_usd: f64) -> Plan {
        let limits = match self.route_limits.get(route) {
            None => self.key_limits.get(key).cloned().unwrap_or_default(),
            Some(r) => r.by_key.get(key).unwrap_or(&r.alone).clone(),
        };
        let budgets = self
            .key_budgets
            .get(key)
            .cloned()
            .unwrap_or_else(|| self.global.clone());
        Plan {
            limits,
            budgets,
            tokens,
            worst_usd,
        }
    }
}

/// Posts alerts to `alerts.webhook`, off the request path.
pub fn send_alerts(client: &reqwest::Client, webhook: Option<&str>, alerts: Vec<Alert>) {
    for a in alerts {
        if let Some(m) = crate::telemetry::metrics::metrics() {
            m.budget_alerts
                .with_label_values(&[a.scope, &a.name, a.kind])
                .inc();
        }
        tracing::warn!(kind = a.kind, scope = a.scope, name = %a.name, spent = a.spent, limit = a.limit,
            period = a.period, "budget alert");
        let Some(url) = webhook else { continue };
        let client = client.clone();
        let url = url.to_string();
        tokio::spawn(async move {
            let body = json!({"kind": a.kind, "scope": a.scope, "name": a.name, "spent": a.spent,
                              "limit": a.limit, "period": a.period});
            let sent = client
                .post(&url)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(body.to_string())
                .send()
                .await;
            if let Err(e) = sent {
                tracing::warn!(error = %e.without_url(), "budget alert webhook failed");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollars_are_printed_to_the_micro_dollar_without_trailing_zeros() {
        let all: Vec<String> = [19.91, 20.0, 0.0000625, 0.0, -0.0, 1e-9, 1234.5000004]
            .into_iter()
            .map(usd)
            .collect();
        assert_eq!(all, ["19.91", "20", "0.000063", "0", "0", "0", "1234.5"]);
    }

    #[test]
    fn limit_headers_carry_each_figure() {
        let show = |h: LimitHeaders| {
            let mut map = http::HeaderMap::new();
            h.apply(&mut map);
            let mut all: Vec<String> = map
                .iter()
                .map(|(n, v)| format!("{n}={}", v.to_str().unwrap()))
                .collect();
            all.sort();
            all
        };
        assert!(show(LimitHeaders::default()).is_empty());
        assert_eq!(
            show(LimitHeaders {
                requests: None,
                tokens: Some((30_000, 0)),
            }),
            [
                "x-ratelimit-limit-tokens=30000",
                "x-ratelimit-remaining-tokens=0"
            ]
        );
        assert_eq!(
            show(LimitHeaders {
                requests: Some((u64::MAX, 7)),
                tokens: Some((10, 9)),
            }),
            [
                "x-ratelimit-limit-requests=18446744073709551615",
                "x-ratelimit-limit-tokens=10",
                "x-ratelimit-remaining-requests=7",
                "x-ratelimit-remaining-tokens=9",
            ]
        );
    }

    #[test]
    fn calendar_periods() {
        // 2026-11-28 (a Saturday) 13:00 UTC
        let now = Utc
            .with_ymd_and_hms(2026, 11, 28, 13, 0, 0)
            .unwrap()
            .timestamp_millis();
        let at = |y, m, d| {
            Utc.with_ymd_and_hms(y, m, d, 0, 0, 0)
                .unwrap()
                .timestamp_millis()
        };
        assert_eq!(
            period_bounds(Period::Daily, now),
            (at(2026, 11, 28), Some(at(2026, 11, 29)))
        );
        assert_eq!(
            period_bounds(Period::Weekly, now),
            (at(2026, 11, 23), Some(at(2026, 11, 30)))
        );
        assert_eq!(
            period_bounds(Period::Monthly, now),
            (at(2026, 11, 1), Some(at(2026, 12, 1)))
        );
        let dec = Utc
            .with_ymd_and_hms(2026, 12, 31, 23, 0, 0)
            .unwrap()
            .timestamp_millis();
        assert_eq!(
            period_bounds(Period::Monthly, dec),
            (at(2026, 12, 1), Some(at(2027, 1, 1)))
        );
        assert_eq!(period_bounds(Period::Total, now), (0, None));
    }
}
