//! The listener, the tower stack, reloads and graceful shutdown.
//!
//! The request path, in order (outermost first):
//! 1. `RequestIdLayer` (here): takes the client's `x-request-id` or puts a new one in its
//!    place on the request; sets `x-request-id` on every response.
//! 2. `AccessLogLayer` (`telemetry/`): reads the request id and the `RequestFacts` response
//!    extension (set by the handler), and when the response body ends writes one log line
//!    and observes the request metrics (`switchyard_requests_total`, durations, TTFT).
//! 3. `handler::handle`: takes one config generation (`Runtime`) for the whole request, then
//!    classifies the path (`api::classify`), authenticates (`auth/`), reads the body within
//!    `server.max_body`, builds the `ApiRequest` (`api/`), resolves and checks the route,
//!    looks in the cache (`cache/`; a hit ends here), admits the request against rate limits
//!    and budgets (`policy/`, memory or Redis; a refusal ends here), and hands it to
//!    `route::dispatch`, which picks deployments (`route/`), tries them and the fallbacks
//!    through `provider/`. The answer streams back through `stream/` (SSE re-framed at event
//!    boundaries) and `ledger::Tap`, which reads usage on the side and, when the body ends,
//!    settles the reservation, writes the ledger row and stores the answer in the cache.
//!    The handler sets `RequestFacts` and the `x-switchyard-*` and `x-ratelimit-*` headers.
//!
//! Config generations: `Gateway::runtime` is swapped whole on reload; a request keeps the
//! `Arc<Runtime>` it started with, so it finishes on that config.

pub mod body;
mod handler;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tower::{Layer, Service, ServiceBuilder};

use crate::api::REQUEST_ID;
use crate::auth::KeyTable;
use crate::config::{self, Loaded, ProviderCfg};
use crate::ledger::store::Store;
use crate::ledger::{Accounting, LedgerWriter};
use crate::policy::{self, MemoryState, PolicyTable, RedisState};
use crate::provider::{self, Provider, Providers};
use crate::route::state::StateRegistry;
use crate::route::{self, Routes};
use crate::telemetry::clock::{Arrivals, Clocked};
use crate::telemetry::AccessLogLayer;
use body::ResponseBody;

/// One config generation, compiled: everything a request needs, built once at load.
pub struct Runtime {
    pub loaded: Loaded,
    pub generation: u64,
    pub loaded_at: u64,
    pub routes: Routes,
    pub providers: Providers,
    pub keys: KeyTable,
    pub policy: PolicyTable,
    pub max_body: u64,
    /// Active health checks of this generation's providers; stopped with it.
    health_checks: Vec<tokio::task::JoinHandle<()>>,
    /// Held by this generation and by each request it admits until the request is settled:
    /// a reload tells by it when the requests started before it have all ended.
    pub requests: Arc<()>,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        for h in &self.health_checks {
            h.abort();
        }
    }
}

/// Checks a provider every `interval`: a 2xx in time keeps its deployments in rotation.
/// One provider's active health check.
struct HealthCheck {
    provider: String,
    url: String,
    interval: Duration,
    timeout: Duration,
    /// The provider's key, as its requests carry it: an endpoint that wants it for every
    /// path (Azure serverless `/info`) answers 401 without it.
    auth: Option<(http::HeaderName, http::HeaderValue)>,
}

fn spawn_health_check(
    client: reqwest::Client,
    check: HealthCheck,
    states: Vec<Arc<crate::route::state::DeploymentState>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let HealthCheck {
            provider,
            url,
            interval,
            timeout,
            auth,
        } = check;
        let mut tick = tokio::time::interval(interval);
        let mut last = None;
        loop {
            tick.tick().await;
            let mut get = client.get(&url).timeout(timeout);
            if let Some((name, value)) = &auth {
                get = get.header(name, value);
            }
            // What it answered, for the log: a status, or why there was none.
            let said = match get.send().await {
                Ok(r) => Ok(r.status()),
                Err(e) if e.is_timeout() => Err("no answer in time"),
                Err(_) => Err("no connection"),
            };
            let healthy = said.is_ok_and(|s| s.is_success());
            if last != Some(healthy) {
                match said {
                    Ok(status) => tracing::info!(
                        provider = %provider, healthy, status = status.as_u16(), "health check"
                    ),
                    Err(why) => {
                        tracing::info!(provider = %provider, healthy, error = why, "health check")
                    }
                }
                last = Some(healthy);
            }
            for s in &states {
                s.set_checked(healthy);
            }
        }
    })
}

/// Every provider of the config, the HTTP ones over one new client with `connect_timeout`.
/// Given `shared` (the config's first set), the others (`kind: mock`, which connect to
/// nothing) are that set's own: one mock, one request count (`fail_every`, its ids), for
/// every route.
fn build_providers(
    loaded: &Loaded,
    connect_timeout: Duration,
    shared: Option<&Providers>,
) -> Result<Providers, String> {
    let client = provider::build_client(connect_timeout)?;
    let mut providers = Providers::new();
    for (name, cfg) in &loaded.config.providers {
        let p = match (shared.and_then(|s| s.get(name)), cfg) {
            (Some(p), ProviderCfg::Mock(_)) => p.clone(),
            _ => Arc::new(
                Provider::build(name, cfg, &client)
                    .map_err(|e| format!("provider `{name}`: {e}"))?,
            ),
        };
        providers.insert(name.clone(), p);
    }
    Ok(providers)
}

impl Runtime {
    pub fn build(
        loaded: Loaded,
        generation: u64,
        registry: &StateRegistry,
    ) -> Result<Runtime, String> {
        let connect_timeout = loaded.config.routing.connect_timeout.0;
        let providers = build_providers(&loaded, connect_timeout, None)?;
        // A route with a `connect_timeout` of its own gets the providers over a client (and a
        // connection pool) with that timeout: one such set per distinct value.
        let mut by_connect_timeout = HashMap::new();
        for r in loaded.config.models.values() {
            if let Some(t) = r.connect_timeout.map(|t| t.0) {
                if t != connect_timeout && !by_connect_timeout.contains_key(&t) {
                    by_connect_timeout.insert(t, build_providers(&loaded, t, Some(&providers))?);
                }
            }
        }
        let routes = route::build_routes(&loaded, &providers, &by_connect_timeout, registry)?;
        let keys = KeyTable::build(&loaded);
        let policy = PolicyTable::build(&loaded);
        let mut health_checks = Vec::new();
        // A deployment whose provider lost its health check (a reload) is back in rotation.
        for d in routes.values().flat_map(|r| r.deployments.iter()) {
            let checked = loaded
                .config
                .providers
                .get(&*d.provider.name)
                .is_some_and(|p| p.health_check().is_some());
            if !checked {
                d.state.set_checked(true);
            }
        }
        let checked = loaded
            .config
            .providers
            .values()
            .any(|p| p.health_check().is_some());
        if checked && tokio::runtime::Handle::try_current().is_ok() {
            let check_client = provider::build_check_client(&loaded.config.routing)?;
            for (name, cfg) in &loaded.config.providers {
                let Some((hc, origin)) = cfg.health_check() else {
                    continue;
                };
                let states: Vec<_> = routes
                    .values()
                    .flat_map(|r| r.deployments.iter())
                    .filter(|d| *d.provider.name == **name)
                    .map(|d| d.state.clone())
                    .collect();
                let path = if hc.path.starts_with('/') {
                    hc.path.clone()
                } else {
                    format!("/{}", hc.path)
                };
                let auth = match providers.get(name).map(|p| &p.kind) {
                    Some(provider::ProviderKind::Http(h)) => h.auth().cloned(),
                    _ => None,
                };
                let check = HealthCheck {
                    provider: name.clone(),
                    url: format!("{origin}{path}"),
                    interval: hc.interval.0,
                    timeout: hc.timeout.0,
                    auth,
                };
                health_checks.push(spawn_health_check(check_client.clone(), check, states));
            }
        }
        {
            let routes_labels: Vec<(&str, Vec<(&str, &str)>)> = routes
                .values()
                .map(|r| {
                    (
                        &*r.name,
                        r.deployments
                            .iter()
                            .map(|d| (&*d.label, &*d.provider.name))
                            .collect(),
                    )
                })
                .collect();
            let limits = policy.limit_ids();
            let limit_labels: Vec<(&str, &str)> = limits
                .iter()
                .map(|id| id.split_once(':').unwrap_or(("", id.as_ref())))
                .collect();
            let budgets: Vec<(&str, &str, &str)> = policy
                .all_budgets
                .iter()
                .map(|b| {
                    (
                        b.scope.kind(),
                        b.scope.name(),
                        policy::period_name(b.period),
                    )
                })
                .collect();
            crate::telemetry::metrics::init_series(&routes_labels, &limit_labels, &budgets);
        }
        Ok(Runtime {
            health_checks,
            requests: Arc::new(()),
            policy,
            max_body: loaded.config.server.max_body.0,
            generation,
            loaded_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            routes,
            providers,
            keys,
            loaded,
        })
    }
}

/// The gateway: the current config generation and how to replace it.
pub struct Gateway {
    runtime: ArcSwap<Runtime>,
    /// Deployment health, latency and quota: kept across reloads.
    registry: Arc<StateRegistry>,
    pub accounting: Accounting,
    /// The response cache: kept across reloads (its size is set at start).
    pub cache: Arc<crate::cache::Cache>,
    /// The ledger, for spend reports and rebuilding budgets.
    pub store: Store,
    /// Budgets whose spend was rebuilt from the ledger, and whether the config still has
    /// them (one a reload removed is rebuilt again when it comes back).
    seeded: Arc<std::sync::Mutex<std::collections::HashMap<String, bool>>>,
    /// The earlier generations' request tokens (`Runtime::requests`) not yet all gone.
    earlier: std::sync::Mutex<Vec<std::sync::Weak<()>>>,
    config_path: PathBuf,
    generation: AtomicU64,
    reload_lock: tokio::sync::Mutex<()>,
    /// The fields read only at start, as the process started with them: what they still
    /// hold whatever later reloads said (a reload is compared with this, not with the last).
    started: StartOnly,
}

/// Rebuilds what `b` spent in its current period from the ledger.
async fn rebuild_budget(
    store: &Store,
    policy: &dyn policy::PolicyState,
    b: &policy::BudgetRef,
    now: i64,
) {
    let (start, _) = policy::period_bounds(b.period, now);
    let read_ms = crate::ledger::store::ledger_read_ms();
    match store.spent_since(b.scope.ledger_scope(), start).await {
        Ok(spent) => {
            policy.seed_spent(b, start, spent, read_ms).await;
            tracing::info!(budget = %b.id, spent, limit = b.usd, "budget rebuilt from the ledger");
        }
        Err(e) => {
            tracing::error!(budget = %b.id, error = %e, "cannot read the ledger to rebuild a budget")
        }
    }
}

/// The config fields read only at start. Compared as values: their Debug text hides the
/// secrets, so a changed ledger or Redis URL would look the same.
#[derive(PartialEq)]
struct StartOnly {
    listen: String,
    shutdown_grace: config::Dur,
    watch_config: bool,
    client_timeout: config::Dur,
    state: config::StateCfg,
    cache_max_bytes: config::ByteSize,
    webhook: Option<config::Secret>,
}

impl StartOnly {
    fn of(c: &config::Config) -> StartOnly {
        StartOnly {
            listen: c.server.listen.clone(),
            shutdown_grace: c.server.shutdown_grace,
            watch_config: c.server.watch_config,
            client_timeout: c.server.client_timeout,
            state: c.state.clone(),
            cache_max_bytes: c.cache.max_bytes,
            webhook: c.alerts.webhook.clone(),
        }
    }

    /// The names of the fields whose value `new` changes.
    fn changed_in(&self, new: &config::Config) -> Vec<&'static str> {
        let new = StartOnly::of(new);
        [
            ("server.listen", self.listen != new.listen),
            (
                "server.shutdown_grace",
                self.shutdown_grace != new.shutdown_grace,
            ),
            ("server.watch_config", self.watch_config != new.watch_config),
            (
                "server.client_timeout",
                self.client_timeout != new.client_timeout,
            ),
            ("state", self.state != new.state),
            (
                "cache.max_bytes",
                self.cache_max_bytes != new.cache_max_bytes,
            ),
            ("alerts.webhook", self.webhook != new.webhook),
        ]
        .into_iter()
        .filter_map(|(field, changed)| changed.then_some(field))
        .collect()
    }
}

impl Gateway {
    pub fn new(
        runtime: Runtime,
        registry: Arc<StateRegistry>,
        accounting: Accounting,
        store: Store,
        cache: Arc<crate::cache::Cache>,
        config_path: PathBuf,
    ) -> Gateway {
        Gateway {
            cache,
            registry,
            accounting,
            store,
            seeded: Default::default(),
            earlier: Default::default(),
            started: StartOnly::of(&runtime.loaded.config),
            generation: AtomicU64::new(runtime.generation),
            runtime: ArcSwap::from_pointee(runtime),
            config_path,
            reload_lock: tokio::sync::Mutex::new(()),
        }
    }

    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    /// Rebuilds what each budget spent in its current period from the ledger, once per
    /// budget (a reload seeds only budgets it did not have: new ones, and ones an earlier
    /// reload removed, whose spend while they were away was counted nowhere). The state
    /// keeps the more of its own figure and the ledger's. Returns the budgets rebuilt.
    async fn seed_budgets(&self, rt: &Runtime) -> Vec<policy::BudgetRef> {
        let now = crate::ledger::now_ms();
        let todo: Vec<policy::BudgetRef> = match self.seeded.lock() {
            Ok(mut seeded) => {
                let todo: Vec<_> = rt
                    .policy
                    .all_budgets
                    .iter()
                    .filter(|b| seeded.get(&*b.id) != Some(&true))
                    .cloned()
                    .collect();
                seeded.values_mut().for_each(|present| *present = false);
                for b in &rt.policy.all_budgets {
                    seeded.insert(b.id.to_string(), true);
                }
                todo
            }
            Err(_) => Vec::new(),
        };
        for b in &todo {
            rebuild_budget(&self.store, &*self.accounting.policy, b, now).await;
        }
        todo
    }

    /// After a reload that rebuilt `budgets`: the requests started before it were admitted
    /// without them, and their costs (and rows the writer had not written yet) reach the
    /// ledger only as they end. Once every one of them has ended (each holds its
    /// generation's token until it is settled), the queued rows are written and those
    /// budgets still in the config are rebuilt again (the more of the two figures).
    fn rebuild_after_earlier_requests(&self, old: &Runtime, budgets: Vec<policy::BudgetRef>) {
        let earlier = match self.earlier.lock() {
            Ok(mut earlier) => {
                earlier.retain(|w| w.strong_count() > 0);
                earlier.push(Arc::downgrade(&old.requests));
                earlier.clone()
            }
            Err(_) => return,
        };
        if budgets.is_empty() {
            return;
        }
        let (store, policy, ledger, seeded) = (
            self.store.clone(),
            self.accounting.policy.clone(),
            self.accounting.ledger.clone(),
            self.seeded.clone(),
        );
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(3600);
            while earlier.iter().any(|w| w.strong_count() > 0) {
                if tokio::time::Instant::now() >= deadline {
                    tracing::warn!("requests started before a reload still run after an hour: budgets it brought back are rebuilt again now");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            if tokio::time::timeout(Duration::from_secs(30), ledger.flush())
                .await
                .is_err()
            {
                tracing::warn!("the ledger's queued rows were not written within 30 s: budgets are rebuilt again without them");
            }
            let now = crate::ledger::now_ms();
            for b in &budgets {
                let present = seeded
                    .lock()
                    .is_ok_and(|s| s.get(&*b.id).copied() == Some(true));
                if present {
                    rebuild_budget(&store, &*policy, b, now).await;
                }
            }
        });
    }

    /// Reads, checks and swaps in the config file. A bad config is refused, logged, and the
    /// current one keeps serving.
    /// What a reload may not do, valid as the new config is: turn client authentication off
    /// (a file caught half-written before its `keys:`, or emptied, would do it silently), or
    /// leave no route at all. A restart may.
    fn refuse_unsafe(&self, new: &config::Config) -> Result<(), String> {
        let old = self.runtime.load();
        if !old.loaded.config.models.is_empty() && new.models.is_empty() {
            return Err(
                "the new config has no `models:` (an empty or half-written file?): a \
                 reload never leaves the gateway without routes (a restart does)"
                    .to_string(),
            );
        }
        if !old.loaded.config.keys.is_empty() && new.keys.is_empty() {
            return Err(
                "the new config has no `keys:`, so it would serve without client \
                 authentication: a reload never turns that off (a restart does)"
                    .to_string(),
            );
        }
        Ok(())
    }

    pub async fn reload(&self, trigger: &str) -> Result<u64, String> {
        self.reload_text(trigger, None).await
    }

    /// `reload`, from the file's `text` when the caller has just read it.
    async fn reload_text(&self, trigger: &str, text: Option<String>) -> Result<u64, String> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let path = self.config_path.clone();
        let result = tokio::task::spawn_blocking(move || match text {
            Some(text) => config::load_text(&path, &text),
            None => config::load_file(&path),
        })
        .await
        .map_err(|e| format!("reload task failed: {e}"))
        .and_then(|r| r.map_err(|e| e.to_string()))
        .and_then(|loaded| {
            self.refuse_unsafe(&loaded.config)?;
            let generation = self.generation.load(Ordering::SeqCst) + 1;
            Runtime::build(loaded, generation, &self.registry)
        });
        match result {
            Ok(rt) => {
                for field in self.started.changed_in(&rt.loaded.config) {
                    tracing::warn!(
                        field,
                        "changed in the config: it takes effect at the next restart"
                    );
                }
                for w in rt.loaded.warning_lines() {
                    tracing::warn!("{w}");
                }
                let generation = rt.generation;
                let rebuilt = self.seed_budgets(&rt).await;
                self.generation.store(generation, Ordering::SeqCst);
                let old = self.runtime.swap(Arc::new(rt));
                self.rebuild_after_earlier_requests(&old, rebuilt);
                drop(old);
                give_back_freed_memory();
                tracing::info!(trigger, generation, "config reloaded");
                if let Some(m) = crate::telemetry::metrics::metrics() {
                    m.config_reloads.with_label_values(&["ok"]).inc();
                }
                Ok(generation)
            }
            Err(e) => {
                tracing::error!(trigger, errors = %e, "config reload refused; the old config keeps serving");
                if let Some(m) = crate::telemetry::metrics::metrics() {
                    m.config_reloads.with_label_values(&["error"]).inc();
                }
                Err(e)
            }
        }
    }
}

/// The request's id, as `RequestIdService` left it in the request's own `x-request-id`: the
/// client's when it sent a sane one, else a new one. Kept as the header value it is sent as
/// (the response, the upstream request and the log line share its bytes), and carried in the
/// request's headers rather than in an extension (which would make a map for one entry).
pub fn request_id(headers: &http::HeaderMap) -> HeaderValue {
    headers
        .get(REQUEST_ID)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static(""))
}

#[derive(Clone, Copy, Default)]
pub struct RequestIdLayer;

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestIdService<S>;
    fn layer(&self, inner: S) -> RequestIdService<S> {
        RequestIdService { inner }
    }
}

#[derive(Clone)]
pub struct RequestIdService<S> {
    inner: S,
}

fn new_request_id() -> HeaderValue {
    use rand::Rng;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n: u128 = rand::thread_rng().gen();
    let mut id = Vec::with_capacity(36);
    id.extend_from_slice(b"req_");
    for shift in (0..32).rev() {
        id.push(HEX[(n >> (shift * 4)) as usize & 0xf]);
    }
    // Hex digits: always a valid header value, taken without a copy.
    HeaderValue::from_maybe_shared(Bytes::from(id))
        .unwrap_or_else(|_| HeaderValue::from_static("req_unknown"))
}

impl<S, B> Service<Request<B>> for RequestIdService<S>
where
    S: Service<Request<B>, Response = Response<ResponseBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        // Printable, without spaces, quotes or backslashes (it goes into log lines, the
        // ledger and other systems' headers as it is), and not too long.
        let sane = |v: &HeaderValue| {
            let b = v.as_bytes();
            !b.is_empty()
                && b.len() <= 200
                && b.iter()
                    .all(|c| c.is_ascii_graphic() && !matches!(c, b'"' | b'\\'))
        };
        let id = match req.headers().get(REQUEST_ID).filter(|v| sane(v)) {
            Some(id) => id.clone(),
            None => {
                let id = new_request_id();
                req.headers_mut().insert(REQUEST_ID, id.clone());
                id
            }
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut resp = fut.await?;
            resp.headers_mut().insert(REQUEST_ID, id);
            Ok(resp)
        })
    }
}

pub struct ServeOptions {
    pub config_path: PathBuf,
    pub listen: Option<String>,
    pub ready_file: Option<PathBuf>,
}

/// Runs the gateway until SIGTERM or SIGINT.
/// Returns the heap's free pages to the system. Loading a config (a large one: thousands of
/// keys and routes) makes and frees many small blocks, which glibc keeps: without this a
/// gateway's memory grew to 2.5 times its size at start over a few reloads, and stayed.
fn give_back_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory the allocator holds free.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// How long a client may read nothing of an answer being written to it.
const SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// Every client connection's clock and task, listed at accept.
type Watched = Arc<std::sync::Mutex<Vec<(std::sync::Weak<Arrivals>, tokio::task::AbortHandle)>>>;

/// Closes the client connections that have waited `timeout` for a request's head (a
/// connection's `Arrivals` say since when it waits).
async fn sweep_idle_connections(connections: Watched, timeout: Duration) {
    use crate::telemetry::clock::TICKS;
    let tick = (timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let limit = timeout.as_nanos().div_ceil(tick.as_nanos()) as u64;
    // A peer that reads nothing of its answer for this long (nginx's `send_timeout`) is let
    // go too; one that reads slowly, but reads, is not.
    let send_limit = SEND_TIMEOUT
        .max(timeout)
        .as_nanos()
        .div_ceil(tick.as_nanos()) as u64;
    let mut every = tokio::time::interval(tick);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let now = TICKS.fetch_add(1, Ordering::Relaxed) + 1;
        let Ok(mut list) = connections.lock() else {
            return;
        };
        list.retain(|(arrivals, task)| match arrivals.upgrade() {
            None => false,
            // More than `limit` whole ticks: at least `timeout` (the tick it began in may
            // have been nearly over).
            Some(a)
                if a.waiting_ticks(now).is_some_and(|t| t > limit)
                    || a.blocked_ticks(now).is_some_and(|t| t > send_limit) =>
            {
                task.abort();
                false
            }
            Some(_) => true,
        });
    }
}

/// Raises the soft limit of open files to the hard one (as nginx's `worker_rlimit_nofile`):
/// each client connection is a file, and the usual soft default of 1,024 is reached by a
/// thousand idle clients.
fn raise_open_files_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::debug!(error = %e, "the open files limit could not be raised");
        }
    }
}

pub async fn serve(opts: ServeOptions) -> Result<(), String> {
    // First of all: a SIGHUP's default action ends the process, and one sent while the
    // gateway starts (reading a large config, waiting for its database) must not. Received
    // then, it reloads once the gateway is up.
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    raise_open_files_limit();
    let (loaded, loaded_text) =
        config::load_file_and_text(&opts.config_path).map_err(|e| e.to_string())?;
    for w in loaded.warning_lines() {
        tracing::warn!("{w}");
    }
    if loaded.config.keys.is_empty() {
        tracing::warn!(
            "NO CLIENT KEYS CONFIGURED: the gateway serves anyone who can reach it. \
             Add `keys:` to {} (see `switchyard keys generate`).",
            opts.config_path.display()
        );
    }
    let listen = opts
        .listen
        .clone()
        .unwrap_or_else(|| loaded.config.server.listen.clone());
    let addr: SocketAddr = listen
        .parse()
        .map_err(|_| format!("`{listen}` is not an address like 0.0.0.0:8080"))?;
    let grace = loaded.config.server.shutdown_grace.0;
    let client_timeout = loaded.config.server.client_timeout.0;
    let watch = loaded.config.server.watch_config;
    let ledger_url = ledger_url(&loaded);
    let store = Store::open(&ledger_url).await?;
    let (writer, ledger_task) = LedgerWriter::start(store.clone());
    let policy_state: Arc<dyn policy::PolicyState> = match &loaded.config.state.redis {
        Some(url) if !url.is_empty() => {
            let on = loaded.config.state.on_redis_error;
            Arc::new(RedisState::start(
                url.expose(),
                on.budgets,
                on.rate_limits,
                loaded.config.state.replica_timeout(),
                store.clone(),
            )?)
        }
        _ => Arc::new(MemoryState::default()),
    };
    let accounting = Accounting {
        policy: policy_state,
        ledger: writer,
        // Alert webhooks go out as upstream calls do (a company's own CA, its proxy).
        http: provider::proxy::reqwest_builder()?
            .build()
            .map_err(|e| format!("cannot build the alerts HTTP client: {e}"))?,
        webhook: loaded
            .config
            .alerts
            .webhook
            .as_ref()
            .filter(|w| !w.is_empty())
            .map(|w| Arc::from(w.expose())),
    };
    let registry = Arc::new(StateRegistry::default());
    if let Some(url) = loaded.config.state.redis.as_ref().filter(|u| !u.is_empty()) {
        crate::route::shared::spawn_cooldown_sync(url.expose(), registry.clone())?;
    }
    let runtime = Runtime::build(loaded, 1, &registry)?;
    let routes = runtime.routes.len();
    let redis_url = runtime
        .loaded
        .config
        .state
        .redis
        .as_ref()
        .filter(|u| !u.is_empty())
        .map(|u| u.expose().to_string());
    let caching = runtime
        .loaded
        .config
        .models
        .values()
        .any(|r| r.cache.is_some());
    let cache = crate::cache::Cache::new(
        runtime.loaded.config.cache.max_bytes.0,
        redis_url.as_deref(),
        caching,
    )?;
    let gateway = Arc::new(Gateway::new(
        runtime,
        registry,
        accounting,
        store,
        cache,
        opts.config_path.clone(),
    ));
    gateway.seed_budgets(&gateway.runtime()).await;
    give_back_freed_memory();

    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let bound = listener
        .local_addr()
        .map_err(|e| format!("cannot read the bound address: {e}"))?;
    crate::telemetry::clock::time_receipts(&listener);
    let runtime = tokio::runtime::Handle::current();
    let threads = match runtime.runtime_flavor() {
        tokio::runtime::RuntimeFlavor::CurrentThread => "one thread",
        _ => "a worker per core",
    };
    tracing::info!(
        address = %bound,
        routes,
        config = %opts.config_path.display(),
        requests_run_on = threads,
        workers = runtime.metrics().num_workers(),
        "switchyard listening"
    );
    // Watched before the gateway says it is ready: a change made as soon as it is (a
    // deploy's next step, a test) is seen.
    spawn_reload_on_sighup(gateway.clone(), hup);
    if watch {
        spawn_reload_on_change(gateway.clone(), loaded_text);
    }
    if let Some(path) = &opts.ready_file {
        write_ready_file(path, bound).map_err(|e| format!("cannot write the ready file: {e}"))?;
    }

    let handler = handler::GatewayService::new(gateway.clone());

    let builder = auto::Builder::new(TokioExecutor::new());
    // A request's head must arrive within `client_timeout` of the connection starting to
    // wait for it (an idle kept-alive connection waits for its next one): a client that
    // sends nothing, or a byte now and then, is let go instead of holding a connection for
    // ever. One sweeper for every connection, not a timer per request.
    let waiting = Arc::new(std::sync::Mutex::new(Vec::new()));
    tokio::spawn(sweep_idle_connections(waiting.clone(), client_timeout));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown_signal());
    // Every connection's task, so those still open when the grace period ends can be ended
    // (their requests' rows recorded) before the ledger's last flush.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, _peer) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a moment, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                // The connection's clock: its requests' time starts as their bytes are read.
                let arrivals = Arc::new(Arrivals::default());
                let watched = Arc::downgrade(&arrivals);
                let stack = ServiceBuilder::new()
                    .layer(RequestIdLayer)
                    .layer(AccessLogLayer::clocked(arrivals.clone()))
                    .service(handler.clone());
                let io = TokioIo::new(Clocked::new(stream, arrivals));
                let conn = builder.serve_connection_with_upgrades(io, TowerToHyperService::new(stack));
                let conn = graceful.watch(conn.into_owned());
                let task = connections.spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
                if let Ok(mut w) = waiting.lock() {
                    w.push((watched, task));
                }
            }
            signal = &mut shutdown => {
                tracing::info!(signal, "shutting down: no new connections; waiting for requests in flight");
                break;
            }
        }
    }
    drop(listener);
    // A second SIGTERM or SIGINT ends the wait at once (an operator's second Ctrl-C).
    let closed = tokio::select! {
        waited = tokio::time::timeout(grace, graceful.shutdown()) => match waited {
            Ok(()) => true,
            Err(_) => {
                tracing::warn!(
                    grace_seconds = grace.as_secs_f64(),
                    "shutdown grace period over; closing the connections still open"
                );
                false
            }
        },
        signal = shutdown_signal() => {
            tracing::warn!(signal, "second signal: closing the connections still open now");
            false
        }
    };
    if closed {
        tracing::info!("all connections closed");
    } else {
        // Streams end with an error event, and their connections close (a graceful
        // shutdown closes each after its answer); a moment for that, then what is still
        // open is dropped. Dropping a connection drops its requests: each records its
        // row (a stream, what it sent so far) and settles its reservation as it goes.
        crate::telemetry::cutting_connections();
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        connections.abort_all();
    }
    // What is left to record, bounded. A further signal ends these waits, not the ledger's
    // write: the answers still being read stop with what they read and record their rows.
    let prepare = async {
        while connections.join_next().await.is_some() {}
        // Plain answers left by their clients are read to their end for their usage (the
        // upstream's timeout bounds each).
        crate::ledger::answers_read(Duration::from_secs(10)).await;
        // Let the settlements of the last requests queue their rows.
        tokio::time::sleep(Duration::from_millis(50)).await;
        // What Redis did not take in time (settlements, cancelled admissions), sent once more.
        gateway
            .accounting
            .policy
            .drain(Duration::from_secs(5))
            .await;
    };
    let interrupted = tokio::select! {
        () = prepare => false,
        signal = shutdown_signal() => {
            tracing::warn!(signal, "signal again: no more waiting for answers being read or for Redis; writing the ledger's last rows");
            true
        }
    };
    if interrupted {
        crate::ledger::answers_read(Duration::ZERO).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Then the rows are written (up to 30 s while the database fails); a signal during that
    // write exits without it.
    let written = tokio::select! {
        written = ledger_task.shutdown(Duration::from_secs(30)) => written,
        signal = shutdown_signal() => {
            tracing::error!(signal, "signal again: exiting before the ledger's last rows are written");
            false
        }
    };
    if !written {
        return Err("stopped with ledger rows not written (see the log above)".to_string());
    }
    tracing::info!("ledger flushed");
    Ok(())
}

/// `state.ledger`, or the embedded default: SQLite in the working folder.
pub fn ledger_url(loaded: &Loaded) -> String {
    loaded
        .config
        .state
        .ledger
        .as_ref()
        .map(|l| l.expose().to_string())
        .unwrap_or_else(|| "sqlite://switchyard.db".to_string())
}

fn write_ready_file(path: &Path, addr: SocketAddr) -> std::io::Result<()> {
    // Write then rename, so a reader never sees half an address.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, addr.to_string())?;
    std::fs::rename(&tmp, path)
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => tokio::select! {
            _ = t.recv() => "SIGTERM",
            _ = i.recv() => "SIGINT",
        },
        _ => {
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}

fn spawn_reload_on_sighup(
    gateway: Arc<Gateway>,
    hup: std::io::Result<tokio::signal::unix::Signal>,
) {
    let Ok(mut hup) = hup else {
        tracing::warn!("cannot listen for SIGHUP; reload with POST /admin/reload");
        return;
    };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let _ = gateway.reload("SIGHUP").await;
        }
    });
}

/// Watches the config file's folder (editors and Kubernetes ConfigMaps replace the file
/// rather than write into it) and reloads shortly after the file changes from `loaded`, the
/// text the gateway started with (changed before the watch began, it is reloaded at once).
fn spawn_reload_on_change(gateway: Arc<Gateway>, loaded: String) {
    use notify::{RecursiveMode, Watcher};
    let path = gateway.config_path.clone();
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path.file_name().map(|f| f.to_os_string());
    // A config that is a symlink (not a ConfigMap's, whose swap shows in this folder)
    // changes where it points: that file's folder is watched too, for its name, and found
    // again after each change (the link may have been pointed elsewhere).
    let link_target = {
        let path = path.clone();
        move || {
            std::fs::canonicalize(&path).ok().filter(|t| {
                t.as_path() != path.as_path()
                    && !t
                        .components()
                        .any(|c| c.as_os_str().to_string_lossy().starts_with(".."))
            })
        }
    };
    let home = std::fs::canonicalize(&dir).ok();
    let mut target = link_target();
    let target_name = Arc::new(std::sync::Mutex::new(
        target
            .as_ref()
            .and_then(|t| t.file_name())
            .map(|f| f.to_os_string()),
    ));
    // true: the file is whole (closed after writing, renamed or linked into place); false:
    // it was written to, and may be whole once the writes stop.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<bool>();
    let changed_before = tx.clone();
    let watcher = notify::recommended_watcher({
        let target_name = target_name.clone();
        move |ev: notify::Result<notify::Event>| {
            use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
            let Ok(ev) = ev else { return };
            // A file is whole when its writer closes it, or when it is renamed or linked
            // into place (sed -i, vim, a ConfigMap's `..data` swap): a write alone may be
            // half of one, and a half-written file can be valid YAML. A write counts only
            // once writes have stopped for a while with no close reported (some mounts and
            // systems report none).
            let whole = match ev.kind {
                EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
                EventKind::Access(_) => return,
                EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any | ModifyKind::Other) => {
                    false
                }
                EventKind::Modify(ModifyKind::Metadata(_)) => return,
                // A file made is empty until written (its close says when); a link made
                // points at a whole one.
                EventKind::Create(_) => ev.paths.iter().any(|p| {
                    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink())
                }),
                _ => true,
            };
            let linked = target_name.lock().ok().and_then(|n| n.clone());
            let ours = ev.paths.iter().any(|p| {
                let name = p.file_name().map(|f| f.to_os_string());
                name == file_name
                    || (linked.is_some() && name == linked)
                    // ConfigMaps swap a `..data` symlink; the file name itself never changes.
                    || p.file_name().is_some_and(|f| f == "..data")
            });
            if ours {
                let _ = tx.send(whole);
            }
        }
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the config file; reload with SIGHUP or POST /admin/reload");
            return;
        }
    };
    if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
        tracing::warn!(error = %e, "cannot watch the config folder; reload with SIGHUP or POST /admin/reload");
        return;
    }
    // The link's folder, unless it is the config's own (watched already).
    let other_folder = move |target: &Option<PathBuf>| {
        target
            .as_deref()
            .and_then(Path::parent)
            .filter(|f| Some(*f) != home.as_deref())
            .map(Path::to_path_buf)
    };
    let watch_folder_of = {
        let other_folder = other_folder.clone();
        move |watcher: &mut notify::RecommendedWatcher, target: &Option<PathBuf>| {
            if let Some(folder) = other_folder(target) {
                if let Err(e) = watcher.watch(&folder, RecursiveMode::NonRecursive) {
                    tracing::warn!(error = %e, "cannot watch the folder the config file links to; reload with SIGHUP or POST /admin/reload");
                }
            }
        }
    };
    watch_folder_of(&mut watcher, &target);
    // What the file held when it was last read here: a close that changed nothing (`touch`
    // opens the file for writing) is no reason to reload.
    let read = {
        let path = path.clone();
        move || std::fs::read_to_string(&path)
    };
    let mut last = Some(loaded);
    if read().ok() != last {
        let _ = changed_before.send(true);
    }
    drop(changed_before);
    tokio::spawn(async move {
        while let Some(whole) = rx.recv().await {
            if !whole {
                // Written to, no close yet: the close, or 5 s without another write.
                loop {
                    match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
                        Ok(Some(true)) | Err(_) => break,
                        Ok(Some(false)) => continue,
                        Ok(None) => return,
                    }
                }
            }
            // Editors write in several steps: wait for them to settle, then reload once.
            tokio::time::sleep(Duration::from_millis(200)).await;
            while rx.try_recv().is_ok() {}
            let now = link_target();
            if now != target {
                if let Some(folder) = other_folder(&target) {
                    let _ = watcher.unwatch(&folder);
                }
                watch_folder_of(&mut watcher, &now);
                if let Ok(mut n) = target_name.lock() {
                    *n = now
                        .as_ref()
                        .and_then(|t| t.file_name())
                        .map(|f| f.to_os_string());
                }
                target = now;
            }
            let text = match read() {
                // Removed (a deploy that replaces it in two steps, a mistake): nothing to
                // reload, nothing refused; it loads when it is back.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if last.is_some() {
                        tracing::warn!(
                            config = %path.display(),
                            "the config file was removed; the loaded config keeps serving and the file is read again when it is back"
                        );
                    }
                    last = None;
                    continue;
                }
                r => r.ok(),
            };
            if text.is_some() && text == last {
                continue;
            }
            // Kept only when it loaded: after a refusal, the same text may load the next
            // time (an environment variable it needs was set meanwhile).
            last = match gateway.reload_text("file change", text.clone()).await {
                Ok(_) => text,
                Err(_) => None,
            };
        }
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_ids_are_req_and_32_hex_digits() {
        let a = super::new_request_id();
        let b = super::new_request_id();
        for id in [a.to_str().unwrap(), b.to_str().unwrap()] {
            let hex = id.strip_prefix("req_").expect(id);
            assert_eq!(hex.len(), 32, "{id}");
            assert!(
                hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')),
                "{id}"
            );
        }
        assert_ne!(a, b);
    }
}
