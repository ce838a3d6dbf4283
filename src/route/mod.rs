//! Where a request goes: the compiled route table, the strategies that pick among a route's
//! deployments (skipping those cooling down or out of upstream quota), retries on another
//! deployment, cooldowns with a single probe, first-token timeouts, and the three kinds of
//! fallback. Deployment state (`state.rs`) outlives config generations.

pub mod shared;
pub mod state;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::StatusCode;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use indexmap::IndexMap;
use rand::Rng;

use crate::api::ApiRequest;
use crate::config::{Loaded, Pricing, Strategy};
use crate::error::GatewayError;
use crate::ledger::cost::{builtin_pricing, builtin_pricing_by_name, ImagePrices, Media, Price};
use crate::policy::{Admitted, Plan, PolicyState, PolicyTable, Refused};
use crate::provider::{AttemptError, Provider, Providers, UpstreamQuota};
use crate::server::body::{BoxError, ResponseBody};
use crate::telemetry::metrics;
use crate::Name;
use state::{now_ms, DeploymentState, Health, StateRegistry};

/// Share of `least_latency` picks that go to a random deployment, so a deployment that got
/// faster (or recovered) is noticed.
const EXPLORE: f64 = 0.1;
/// Backoff before an attempt on a deployment already tried in this request.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(2);

pub struct Deployment {
    pub provider: Arc<Provider>,
    /// What the upstream calls it: the Azure deployment, or the model name sent upstream.
    pub upstream: String,
    /// `provider/deployment`, as shown in headers, logs and the admin API.
    pub label: Name,
    pub model: Option<String>,
    /// The model whose tokenizer counts this deployment's tokens: `model`, else `upstream`.
    pub tokenizer_model: Name,
    pub weight: f64,
    pub priority: u32,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    /// From `pricing:` (deployment, else route), else the built-in table; zero when none.
    pub price: Price,
    /// Whether `price` came from anywhere (an unpriced deployment is never "cheapest").
    pub priced: bool,
    /// Per-image prices by quality and size, where the pricing has `image_sizes`.
    pub image_prices: Option<Arc<ImagePrices>>,
    pub state: Arc<DeploymentState>,
    /// The upstream URL of each operation (by `Operation as usize`), made at load.
    pub targets: Box<[Option<http::Uri>]>,
    pub metrics: Arc<crate::telemetry::metrics::DeploymentMetrics>,
}

pub struct Route {
    pub name: Name,
    pub strategy: Strategy,
    pub deployments: Vec<Deployment>,
    pub fallbacks: Vec<String>,
    pub context_fallbacks: Vec<String>,
    pub content_filter_fallbacks: Vec<String>,
    pub context_window: Option<u64>,
    pub max_output_tokens: Option<u64>,
    /// `cache: { ttl }`: answers of this route are cached for that long.
    pub cache_ttl: Option<Duration>,
    pub retries: u32,
    pub timeout: Duration,
    pub first_token_timeout: Duration,
    pub cooldown: Duration,
    pub allowed_fails: u32,
    round_robin: AtomicUsize,
}

pub type Routes = IndexMap<String, Arc<Route>>;

/// The price of a deployment: its `pricing:`, the route's, or the built-in table by the
/// underlying `model:`, else (no `model:`) by the deployment name.
fn resolve_price<'a>(
    deployment: Option<&'a Pricing>,
    route: Option<&'a Pricing>,
    model: Option<&str>,
    upstream: &str,
) -> Option<&'a Pricing> {
    // With `model:` set, the table by it alone: a deployment named as its model (an Azure
    // habit) would otherwise take, by the looser name rule, the price of another model.
    deployment.or(route).or_else(|| match model {
        Some(m) => builtin_pricing(m),
        None => builtin_pricing_by_name(upstream),
    })
}

/// `by_connect_timeout`: the providers over a client with another connect timeout, for the
/// routes that set theirs (`providers` otherwise).
pub fn build_routes(
    loaded: &Loaded,
    providers: &Providers,
    by_connect_timeout: &HashMap<Duration, Providers>,
    registry: &StateRegistry,
) -> Result<Routes, String> {
    let c = &loaded.config;
    let mut routes = IndexMap::new();
    let mut labels = HashSet::new();
    for (name, r) in &c.models {
        let providers = r
            .connect_timeout
            .and_then(|t| by_connect_timeout.get(&t.0))
            .unwrap_or(providers);
        let mut deployments = Vec::with_capacity(r.deployments.len());
        for d in &r.deployments {
            let provider = providers
                .get(&d.provider)
                .cloned()
                .ok_or_else(|| format!("route `{name}`: unknown provider `{}`", d.provider))?;
            let upstream = d.deployment.clone().unwrap_or_else(|| name.clone());
            let label = format!("{}/{}", d.provider, upstream);
            labels.insert(label.clone());
            let price = resolve_price(
                d.pricing.as_ref(),
                r.pricing.as_ref(),
                d.model.as_deref(),
                &upstream,
            );
            let targets = crate::api::Operation::ALL
                .iter()
                .map(|op| provider.target(*op, &upstream))
                .collect();
            deployments.push(Deployment {
                targets,
                metrics: Arc::new(crate::telemetry::metrics::DeploymentMetrics::new(
                    name, &label,
                )),
                state: registry.get(&label),
                label: label.into(),
                tokenizer_model: d.model.as_deref().unwrap_or(&upstream).into(),
                provider,
                upstream,
                model: d.model.clone(),
                weight: d.weight,
                priority: d.priority,
                rpm: d.rpm,
                tpm: d.tpm,
                price: price.map(Price::from).unwrap_or_default(),
                priced: price.is_some(),
                image_prices: price
                    .and_then(|p| p.image_sizes.as_ref())
                    .and_then(ImagePrices::new)
                    .map(Arc::new),
            });
        }
        let routing = &c.routing;
        routes.insert(
            name.clone(),
            Arc::new(Route {
                name: name.as_str().into(),
                strategy: r.strategy,
                deployments,
                fallbacks: r.fallbacks.clone(),
                context_fallbacks: r.context_fallbacks.clone(),
                content_filter_fallbacks: r.content_filter_fallbacks.clone(),
                context_window: r.context_window,
                max_output_tokens: r.max_output_tokens,
                cache_ttl: r.cache.as_ref().map(|c| c.ttl.0),
                retries: r.retries.unwrap_or(routing.retries),
                timeout: r.timeout.unwrap_or(routing.timeout).0,
                first_token_timeout: r
                    .first_token_timeout
                    .unwrap_or(routing.first_token_timeout)
                    .0,
                cooldown: r.cooldown.unwrap_or(routing.cooldown).0,
                allowed_fails: r.allowed_fails.unwrap_or(routing.allowed_fails),
                round_robin: AtomicUsize::new(0),
            }),
        );
    }
    registry.retain(&labels);
    Ok(routes)
}

/// What served a request: put on the response for headers and the log line.
#[derive(Debug, Clone, Default)]
pub struct Served {
    pub route: Name,
    pub deployment: Name,
    pub provider: Name,
    pub attempts: u32,
    /// An attempt is out upstream now (set when one starts, cleared when it fails): a
    /// request dropped meanwhile (its client gone) may be billed there.
    pub out: bool,
    /// An attempt was given up on upstream by a timeout (the route's `timeout` or
    /// `first_token_timeout`): the upstream may go on and bill it, whatever came after.
    pub abandoned: bool,
    /// The route the client asked for, when a fallback route served instead.
    pub fallback_from: Option<Name>,
    /// A route of `fallbacks` served because the route asked for failed (not one of its
    /// context or content-filter fallbacks, which serve such a request whenever it comes):
    /// its answer is not the route's, and is not cached as the route's.
    pub failed_over: bool,
    /// The serving deployment's price, and the model whose tokenizer counts its tokens.
    pub price: Price,
    pub tokenizer_model: Name,
    /// The serving deployment's metric handles.
    pub metrics: Option<Arc<crate::telemetry::metrics::DeploymentMetrics>>,
    /// What fallback routes with `limits:` of their own admitted, settled with the request.
    pub admissions: Vec<FallbackAdmitted>,
}

/// A fallback route's own limits, admitted for a request that reached it.
#[derive(Debug, Clone)]
pub struct FallbackAdmitted {
    pub route: Name,
    pub plan: Plan,
    pub admitted: Admitted,
}

/// What admits a request to a fallback route with `limits:` of its own.
#[derive(Clone, Copy)]
pub struct Admission<'a> {
    pub table: &'a PolicyTable,
    pub state: &'a dyn PolicyState,
}

/// Why a route could not serve.
enum RouteError {
    /// Every attempt failed; the last failure.
    Failed(AttemptError),
    /// No deployment could take the request (cooling down, probing, out of quota).
    Unavailable { retry_after: Option<Duration> },
    /// A fallback route's own `limits:` refused it.
    Limited(Refused),
}

impl RouteError {
    /// `routes`: the route (or routes, joined by "`, `") none of whose deployments could
    /// take the request, named by the `Unavailable` message.
    fn into_gateway_error(self, routes: &str) -> GatewayError {
        match self {
            RouteError::Failed(e) => e.into_client_error(),
            RouteError::Limited(refused) => refused.into_error(),
            RouteError::Unavailable { retry_after } => {
                let mut e = GatewayError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "api_error",
                    "no_deployment_available",
                    format!(
                        "no deployment of `{routes}` can take the request now: every one is \
                         cooling down, out of its upstream quota or failing its health check"
                    ),
                );
                let secs = retry_after.map_or(1, |d| d.as_secs_f64().ceil().max(1.0) as u64);
                e.headers.push(("retry-after", secs.to_string()));
                e
            }
        }
    }

    /// Whether the route's `fallbacks` may do better.
    fn falls_back(&self) -> bool {
        match self {
            RouteError::Unavailable { .. } | RouteError::Limited(_) => true,
            // Refused for the route's own config (its keys, its deployments): another route
            // may serve it.
            RouteError::Failed(e) => e.retryable() || e.refused_gateway(),
        }
    }
}

/// Keeps a deployment's in-flight count up while its response body is alive.
struct InFlight(Arc<DeploymentState>);

impl InFlight {
    fn new(state: &Arc<DeploymentState>) -> InFlight {
        state.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Releases a claimed probe if its request ends without a verdict (cancelled mid-way).
struct ProbeGuard(Option<Arc<DeploymentState>>);

impl Drop for ProbeGuard {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.release_probe();
        }
    }
}

/// How long a stream's attempt waited for its first frame after the answer's head: the
/// upstream's time, which the connection's clock (head to head) does not see.
#[derive(Clone, Copy)]
pub struct FirstFrameWait(pub Duration);

/// The response body after the gateway took its first frame (to time the first token),
/// holding the deployment's in-flight count until it ends.
struct TrackedBody {
    first: Option<Frame<Bytes>>,
    rest: ResponseBody,
    /// Its deployment's in-flight count, and its state for `watch`.
    in_flight: InFlight,
    watch: BreakWatch,
    /// How a plain answer's body failed (`broke_off`, `timeout`), when it did.
    broke: Option<&'static str>,
}

/// A stream that fails after its first event (`stream::StreamState`: broken off, timed out,
/// or ended by an error event of the upstream's own) is a failure of its deployment, as one
/// before the first byte is: counted when its body is dropped (its failures in a row, the
/// cooldown, `switchyard_upstream_errors_total`). Its first event said the deployment is up
/// (a probe's verdict, its time to first token); its failures in a row end only with the
/// stream, whole (its `[DONE]` sent, or its body's end), so a deployment whose streams all
/// die after their first event cools down like any failing one.
/// A plain answer whose body breaks off (its connection cut, or the attempt's time up,
/// mid-body) is one too: counted as `broke_off` (or `timeout`) when its body is dropped.
struct BreakWatch {
    /// An event stream's state; `None` for a plain answer (`TrackedBody::broke` tells).
    stream: Option<Arc<crate::stream::StreamState>>,
    allowed_fails: u32,
    cooldown: Duration,
    route: Name,
    deployment: Name,
    provider: Name,
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        let w = &self.watch;
        let state = &self.in_flight.0;
        let failure = match &w.stream {
            Some(s) => s.failure(),
            None => self.broke,
        };
        let Some(kind) = failure else {
            // Whole (else its client left: nothing said either way).
            if w.stream.as_ref().is_some_and(|s| s.done())
                || (self.first.is_none() && self.rest.is_end_stream())
            {
                state.stream_ended();
            }
            return;
        };
        let cooled = state.failure(w.allowed_fails, w.cooldown, None);
        if let Some(m) = metrics::metrics() {
            m.upstream_errors
                .with_label_values(&[&*w.route, &*w.deployment, &*w.provider, kind])
                .inc();
        }
        tracing::warn!(
            route = %w.route,
            deployment = %w.deployment,
            kind,
            cooling_down = cooled,
            "upstream answer failed after it began"
        );
    }
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(f) = self.first.take() {
            return std::task::Poll::Ready(Some(Ok(f)));
        }
        let polled = std::pin::Pin::new(&mut self.rest).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Err(e))) = &polled {
            // A plain answer's guard ends a broken body with an error (an event stream's
            // with an error event, told by its state).
            self.broke = Some(if crate::stream::timed_out(e) {
                "timeout"
            } else {
                "broke_off"
            });
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut h = self.rest.size_hint();
        if let Some(len) = self
            .first
            .as_ref()
            .and_then(|f| f.data_ref())
            .map(|d| d.len() as u64)
        {
            // Upper first: each setter asserts the two stay in order (an exact hint has
            // lower = upper).
            if let Some(u) = h.upper() {
                h.set_upper(u + len);
            }
            h.set_lower(h.lower() + len);
        }
        h
    }
}

impl Route {
    /// The output tokens a request may produce: its `max_tokens`, else the route's
    /// `max_output_tokens`, else 4096 for chat, completions and responses.
    pub fn output_cap(&self, req: &ApiRequest) -> u64 {
        use crate::api::Operation as Op;
        let default_cap = match req.op {
            Op::ChatCompletions | Op::Completions | Op::Responses => 4096,
            _ => 0,
        };
        if default_cap == 0 {
            return req.max_tokens.unwrap_or(0);
        }
        req.max_tokens
            .or(self.max_output_tokens)
            .unwrap_or(default_cap)
    }

    /// The most a request can cost: an upper bound of its prompt and its output cap (times
    /// `n`), its audio's length and the characters it has spoken, on the most expensive deployment of this route and of every route it may fall
    /// back to.
    pub fn worst_case_usd(&self, req: &ApiRequest, routes: &Routes) -> f64 {
        // A streamed image's partial images are billed as 100 output tokens each.
        let partial = req
            .image
            .as_ref()
            .map_or(0, |a| a.partial_images.saturating_mul(100));
        let out = self
            .output_cap(req)
            .saturating_add(partial)
            .saturating_mul(req.choices);
        let media = Media {
            audio_seconds: req.audio.bound_seconds,
            characters: req.speech_characters,
        };
        let fallbacks = self
            .fallbacks
            .iter()
            .chain(&self.context_fallbacks)
            .chain(&self.content_filter_fallbacks)
            .filter_map(|n| routes.get(n));
        std::iter::once(self)
            .chain(fallbacks.map(|r| r.as_ref()))
            .flat_map(|r| r.deployments.iter())
            .map(|d| {
                let mut p = d.price;
                if let (Some(t), Some(ask)) = (&d.image_prices, &req.image) {
                    p.per_image = t.bound(ask, p.per_image);
                }
                p.worst_case(req.prompt_bound, out, &media)
                    + p.per_image * (req.choices.saturating_sub(1)) as f64
            })
            .fold(0.0, f64::max)
    }

    /// Picks a deployment for one attempt: among those not tried yet, else among all;
    /// always skipping those cooling down or out of quota. `Err` carries the shortest
    /// remaining cooldown when nothing can take the request.
    fn pick(
        &self,
        tried: &[bool],
        tokens: u64,
        stream: bool,
    ) -> Result<(usize, bool), Option<Duration>> {
        let now = now_ms();
        let mut wait: Option<Duration> = None;
        let mut usable = Vec::with_capacity(self.deployments.len());
        for (i, d) in self.deployments.iter().enumerate() {
            match d.state.health(now) {
                Health::Up | Health::ProbeDue => {}
                Health::CoolingDown(left) => {
                    wait = Some(wait.map_or(left, |w| w.min(left)));
                    continue;
                }
                Health::Probing | Health::Down => continue,
            }
            if d.weight <= 0.0 && self.strategy == Strategy::Weighted {
                continue;
            }
            if !d.state.quota_fits(tokens, d.rpm, d.tpm) {
                // Out of quota until the minute turns.
                let left = state::until_next_minute();
                wait = Some(wait.map_or(left, |w| w.min(left)));
                continue;
            }
            usable.push(i);
        }
        // Those not tried yet, when there are any (in place: no second list per attempt).
        if usable.iter().any(|i| !tried[*i]) {
            usable.retain(|i| !tried[*i]);
        }
        let mut candidates = usable;
        while !candidates.is_empty() {
            let chosen = self.choose(&candidates, stream);
            let d = &self.deployments[chosen];
            let probe = d.state.health(now) == Health::ProbeDue;
            if probe && !d.state.claim_probe() {
                // Another request took the probe first.
                candidates.retain(|c| *c != chosen);
                continue;
            }
            return Ok((chosen, probe));
        }
        Err(wait)
    }

    fn choose(&self, candidates: &[usize], stream: bool) -> usize {
        let mut rng = rand::thread_rng();
        let d = |i: usize| &self.deployments[i];
        match self.strategy {
            Strategy::Weighted => weighted(candidates, |i| d(i).weight, &mut rng),
            Strategy::RoundRobin => {
                let n = self.round_robin.fetch_add(1, Ordering::Relaxed);
                candidates[n % candidates.len()]
            }
            Strategy::LeastBusy => {
                // Power of two choices: two different ones at random, the one with fewer in
                // flight (a tie goes to either, at random).
                if candidates.len() == 1 {
                    return candidates[0];
                }
                let i = rng.gen_range(0..candidates.len());
                let j = (i + rng.gen_range(1..candidates.len())) % candidates.len();
                let (a, b) = (candidates[i], candidates[j]);
                let busy = |i: usize| d(i).state.in_flight.load(Ordering::Acquire);
                if busy(b) < busy(a) {
                    b
                } else {
                    a
                }
            }
            Strategy::LeastLatency => {
                if rng.gen_bool(EXPLORE) {
                    return candidates[rng.gen_range(0..candidates.len())];
                }
                // Not measured yet: measure it.
                if let Some(i) = candidates
                    .iter()
                    .find(|i| d(**i).state.latency(stream).is_none())
                {
                    return *i;
                }
                let lat = |i: usize| d(i).state.latency(stream).unwrap_or(f64::MAX);
                candidates
                    .iter()
                    .copied()
                    .min_by(|a, b| lat(*a).total_cmp(&lat(*b)))
                    .unwrap_or(candidates[0])
            }
            Strategy::LowestCost => {
                // Tokens first; then the units a route of images, audio or speech is billed by
                // (0 on a chat route, so they only part deployments whose token prices tie).
                let price = |i: usize| {
                    let p = &d(i).price;
                    if d(i).priced {
                        [
                            p.input_per_1m + p.output_per_1m,
                            p.per_image,
                            p.per_audio_second,
                            p.per_1m_characters,
                        ]
                    } else {
                        [f64::MAX; 4]
                    }
                };
                let best = candidates
                    .iter()
                    .map(|i| price(*i))
                    .min_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal))
                    .unwrap_or([f64::MAX; 4]);
                let cheapest: Vec<usize> = candidates
                    .iter()
                    .copied()
                    .filter(|i| price(*i) == best)
                    .collect();
                weighted(&cheapest, |i| d(i).weight, &mut rng)
            }
            Strategy::Priority => {
                let tier = candidates.iter().map(|i| d(*i).priority).min().unwrap_or(0);
                let in_tier: Vec<usize> = candidates
                    .iter()
                    .copied()
                    .filter(|i| d(*i).priority == tier)
                    .collect();
                weighted(&in_tier, |i| d(i).weight, &mut rng)
            }
        }
    }

    /// Up to `retries + 1` attempts over this route's deployments.
    async fn attempt(
        &self,
        req: &ApiRequest,
        served: &mut Served,
    ) -> Result<http::Response<ResponseBody>, RouteError> {
        let tokens = req
            .estimated_prompt_tokens
            .saturating_add(req.max_tokens.unwrap_or(0));
        let mut tried = vec![false; self.deployments.len()];
        // The deployments that said they do not hold the response a follow-up continues
        // (made when one says so: no allocation on the common path).
        let mut not_holding: Vec<bool> = Vec::new();
        let mut last: Option<AttemptError> = None;
        // Attempts allowed: `retries` more than the first, and one more for each deployment
        // that did not hold the response a Responses request continues (`held_elsewhere`).
        let mut allowed = self.retries;
        for attempt in 0.. {
            if attempt > allowed {
                break;
            }
            let (i, probe) = match self.pick(&tried, tokens, req.stream) {
                Ok(p) => p,
                Err(wait) => {
                    return Err(match last {
                        Some(e) => RouteError::Failed(e),
                        None => RouteError::Unavailable { retry_after: wait },
                    })
                }
            };
            if not_holding.get(i).copied().unwrap_or(false)
                || (tried[i] && last.as_ref().is_some_and(AttemptError::no_retry_here))
            {
                // Only deployments already tried are left, and a retry cannot help: the
                // last said so, or this one does not hold the response asked for. Its
                // probe, if the pick claimed one, is given back (no attempt, no verdict).
                if probe {
                    self.deployments[i].state.release_probe();
                }
                break;
            }
            if tried[i] && attempt > 0 {
                // Again on a deployment that already failed this request: back off first.
                let exp = BACKOFF_BASE.saturating_mul(1 << (attempt - 1).min(6));
                let jitter = rand::thread_rng().gen_range(0.5..1.0);
                tokio::time::sleep(exp.min(BACKOFF_CAP).mul_f64(jitter)).await;
            }
            tried[i] = true;
            let d = &self.deployments[i];
            if attempt > 0 {
                if let Some(m) = metrics::metrics() {
                    m.retries.with_label_values(&[&self.name]).inc();
                }
            }
            served.route.clone_from(&self.name);
            served.deployment.clone_from(&d.label);
            served.provider.clone_from(&d.provider.name);
            served.attempts += 1;
            served.out = true;
            served.price = d.price;
            if let (Some(t), Some(ask)) = (&d.image_prices, &req.image) {
                served.price.per_image = t.unit(ask, d.price.per_image);
            }
            served.metrics = Some(d.metrics.clone());
            served.tokenizer_model.clone_from(&d.tokenizer_model);
            d.state.take_quota(tokens);
            let _probe = ProbeGuard(probe.then(|| d.state.clone()));
            match self.send_once(req, d).await {
                Ok(resp) => return Ok(resp),
                Err(e) => {
                    served.out = false;
                    if matches!(e, AttemptError::Timeout(_)) {
                        served.abandoned = true;
                    }
                    // Only failures that say something about the deployment count against it.
                    let cooled = if e.retryable() {
                        let retry_after = match &e {
                            AttemptError::Status { retry_after, .. } => *retry_after,
                            _ => None,
                        };
                        d.state
                            .failure(self.allowed_fails, self.cooldown, retry_after)
                    } else {
                        // A refusal of this request (a 400) says nothing of the deployment:
                        // its failures neither count nor reset, and a probe has no verdict.
                        d.state.release_probe();
                        false
                    };
                    if let Some(m) = metrics::metrics() {
                        let kind = match &e {
                            AttemptError::Connect(_) => "connect".to_string(),
                            AttemptError::Timeout(_) => "timeout".to_string(),
                            AttemptError::Status { error, .. } => error.status.as_u16().to_string(),
                        };
                        m.upstream_errors
                            .with_label_values(&[
                                &self.name,
                                &d.label,
                                &d.provider.name,
                                kind.as_str(),
                            ])
                            .inc();
                    }
                    tracing::warn!(
                        request_id = %req.request_id_str(),
                        route = %self.name,
                        deployment = %d.label,
                        status = e.status().map(|s| s.as_u16()),
                        retryable = e.retryable(),
                        cooling_down = cooled,
                        "upstream attempt failed"
                    );
                    let retryable = e.retryable();
                    if e.held_elsewhere() {
                        if not_holding.is_empty() {
                            not_holding = vec![false; self.deployments.len()];
                        }
                        not_holding[i] = true;
                        // Looked for on the deployments not asked yet, retries or not.
                        if tried.iter().any(|t| !t) {
                            allowed += 1;
                        }
                        // What another deployment said (the one holding it, busy: a 429)
                        // is the client's answer rather than this one's "not found"; so is
                        // one that refused the gateway's key (it may be the one holding
                        // it), whichever was asked last.
                        let replace = match &last {
                            None => true,
                            Some(l) if l.held_elsewhere() => {
                                !l.refused_gateway() || e.refused_gateway()
                            }
                            Some(_) => false,
                        };
                        if replace {
                            last = Some(e);
                        }
                        continue;
                    }
                    last = Some(e);
                    if !retryable {
                        break;
                    }
                }
            }
        }
        Err(match last {
            Some(e) => RouteError::Failed(e),
            None => RouteError::Unavailable { retry_after: None },
        })
    }

    /// One attempt on deployment `d`. A stream counts as answered only once its first
    /// frame arrived within `first_token_timeout`; until then it may still fail over.
    async fn send_once(
        &self,
        req: &ApiRequest,
        d: &Deployment,
    ) -> Result<http::Response<ResponseBody>, AttemptError> {
        let in_flight = InFlight::new(&d.state);
        let start = Instant::now();
        let deadline = start
            + if req.stream {
                self.first_token_timeout
            } else {
                self.timeout
            };
        let no_first_token = || {
            AttemptError::Timeout(format!(
                "the upstream sent no first token within {}s",
                self.first_token_timeout.as_secs_f64()
            ))
        };
        let to = crate::provider::Target {
            deployment: &d.upstream,
            model: d.model.as_deref().unwrap_or(&d.upstream),
            url: d.targets.get(req.op as usize).and_then(Option::as_ref),
            timeout: self.timeout,
            cap: d.price.charges_output(),
        };
        let send = d.provider.send(req, &to);
        let resp = if req.stream {
            tokio::time::timeout_at(deadline.into(), send)
                .await
                .map_err(|_| no_first_token())??
        } else {
            send.await?
        };
        if let Some(q) = resp.extensions().get::<UpstreamQuota>() {
            d.state
                .learn_remaining(q.remaining_requests, q.remaining_tokens);
        }
        let (mut parts, mut body) = resp.into_parts();
        let first = if req.stream {
            let head_at = Instant::now();
            let is_sse = parts
                .extensions
                .get::<Arc<crate::stream::StreamState>>()
                .is_some();
            // The first event that carries data: comments (`: ping`, an upstream's keep-alive)
            // before it are held and go with it, so that neither the time to first token nor
            // `first_token_timeout` takes a comment for a token.
            let mut held: Option<BytesMut> = None;
            let first = loop {
                let next = tokio::time::timeout_at(deadline.into(), body.frame()).await;
                match next {
                    Err(_) => return Err(no_first_token()),
                    // The attempt's `timeout` passed (shorter than `first_token_timeout`): a
                    // timeout, not a break.
                    Ok(Some(Err(e))) if crate::stream::timed_out(&e) => {
                        return Err(AttemptError::Timeout(e.to_string()))
                    }
                    Ok(Some(Err(_))) => {
                        return Err(AttemptError::Connect(
                            "the upstream stream broke off before its first byte".into(),
                        ))
                    }
                    Ok(Some(Ok(frame))) => {
                        let data = frame.data_ref().is_some_and(|d| has_data_field(d));
                        if !is_sse || data || !frame.is_data() {
                            break Some(match held.take() {
                                None => frame,
                                Some(mut h) => {
                                    if let Some(d) = frame.data_ref() {
                                        h.extend_from_slice(d);
                                    }
                                    Frame::data(h.freeze())
                                }
                            });
                        }
                        if let Some(d) = frame.data_ref() {
                            held.get_or_insert_with(BytesMut::new).extend_from_slice(d);
                        }
                    }
                    // An event stream that ended before any event with data (nothing, or
                    // comments only): no answer, as one broken before its first byte is
                    // (it reached the client as a 200 without `[DONE]`).
                    Ok(None) if is_sse => {
                        return Err(AttemptError::Connect(
                            "the upstream stream ended before its first event".into(),
                        ))
                    }
                    Ok(None) => break held.take().map(|h| Frame::data(h.freeze())),
                }
            };
            // After the head, the wait for the first event is the upstream's time too.
            parts.extensions.insert(FirstFrameWait(head_at.elapsed()));
            first
        } else {
            None
        };
        // Left in the extensions too: the access log tells a broken stream by it.
        let stream = parts
            .extensions
            .get::<Arc<crate::stream::StreamState>>()
            .cloned();
        // A stream's sample is its time to first token; a plain request's, its latency.
        let elapsed = start.elapsed();
        match (req.stream, stream.is_some()) {
            (true, true) => d.state.first_event(elapsed),
            (true, false) => d.state.success(None, Some(elapsed)),
            (false, _) => d.state.began(elapsed),
        }
        let watch = BreakWatch {
            stream,
            allowed_fails: self.allowed_fails,
            cooldown: self.cooldown,
            route: self.name.clone(),
            deployment: d.label.clone(),
            provider: d.provider.name.clone(),
        };
        let body = TrackedBody {
            first,
            rest: body,
            in_flight,
            watch,
            broke: None,
        };
        Ok(http::Response::from_parts(parts, body.boxed_unsync()))
    }
}

/// Whether SSE bytes hold a `data` field (a line starting `data`), not only comments and
/// blank lines.
fn has_data_field(b: &[u8]) -> bool {
    b.split(|c| *c == b'\n' || *c == b'\r')
        .any(|line| line.starts_with(b"data"))
}

fn weighted(candidates: &[usize], weight: impl Fn(usize) -> f64, rng: &mut impl Rng) -> usize {
    let total: f64 = candidates.iter().map(|i| weight(*i).max(0.0)).sum();
    if total <= 0.0 {
        return candidates[rng.gen_range(0..candidates.len())];
    }
    let mut x = rng.gen_range(0.0..total);
    for i in candidates {
        let w = weight(*i).max(0.0);
        if x < w {
            return *i;
        }
        x -= w;
    }
    candidates[candidates.len() - 1]
}

/// What the client is told of the routes tried so far (`last`) and the one just tried (`e`).
fn merge(last: Option<RouteError>, e: RouteError) -> RouteError {
    match (last, e) {
        // A fallback that could not even try says less than an upstream's answer already
        // had: that answer (and the deployment that gave it, in the headers) is what the
        // client gets.
        (
            Some(failed @ RouteError::Failed(_)),
            RouteError::Unavailable { .. } | RouteError::Limited(_),
        ) => failed,
        // None could try: the soonest any of them can (`None` is a route with nothing
        // cooling down, a probe out say: sooner than any cooldown).
        (
            Some(RouteError::Unavailable { retry_after: a }),
            RouteError::Unavailable { retry_after: b },
        ) => RouteError::Unavailable {
            retry_after: a.zip(b).map(|(a, b)| a.min(b)),
        },
        (_, e) => e,
    }
}

/// Which fallback list an error leads to.
fn context_error(e: &AttemptError) -> bool {
    matches!(e, AttemptError::Status { error, .. } if error.is_context_length())
}

fn content_filter_error(e: &AttemptError) -> bool {
    matches!(e, AttemptError::Status { error, .. } if error.is_content_filter())
}

/// Sends the request over `route`; when it cannot serve, over the fallback list that fits
/// the failure: `context_fallbacks` for a prompt too long (known in advance from
/// `context_window`, or from the upstream's error), `content_filter_fallbacks` for a
/// content-filter refusal, `fallbacks` for anything another route might not have. Each
/// route is tried at most once per request.
/// A fallback route with `limits:` of its own is tried only when they admit the request.
pub async fn dispatch(
    route: &Arc<Route>,
    routes: &Routes,
    req: &ApiRequest,
    served: &mut Served,
    admission: Admission<'_>,
) -> Result<http::Response<ResponseBody>, GatewayError> {
    let too_long = route
        .context_window
        .is_some_and(|w| req.estimated_prompt_tokens > w)
        && !route.context_fallbacks.is_empty();
    let err = if too_long {
        tracing::info!(request_id = %req.request_id_str(), route = %route.name,
            estimated_prompt_tokens = req.estimated_prompt_tokens,
            "prompt longer than the route's context window: straight to its context fallbacks");
        None
    } else {
        match route.attempt(req, served).await {
            Ok(resp) => return Ok(resp),
            Err(e) => Some(e),
        }
    };
    let (list, list_name) = match &err {
        None => (&route.context_fallbacks, "context_fallbacks"),
        Some(RouteError::Failed(e)) if context_error(e) && !route.context_fallbacks.is_empty() => {
            (&route.context_fallbacks, "context_fallbacks")
        }
        Some(RouteError::Failed(e))
            if content_filter_error(e) && !route.content_filter_fallbacks.is_empty() =>
        {
            (&route.content_filter_fallbacks, "content_filter_fallbacks")
        }
        Some(e) if e.falls_back() => (&route.fallbacks, "fallbacks"),
        Some(_) => (&route.fallbacks, "none"),
    };
    let list: &[String] = if list_name == "none" { &[] } else { list };
    // The routes none of whose deployments could take the request, for the error's message.
    let mut unavailable: Vec<&str> = Vec::new();
    if matches!(err, Some(RouteError::Unavailable { .. })) {
        unavailable.push(&route.name);
    }
    let mut last = err;
    let mut visited: HashSet<&str> = HashSet::from([&*route.name]);
    for name in list {
        let Some(fallback) = routes.get(name) else {
            continue;
        };
        if !visited.insert(name.as_str()) {
            continue;
        }
        tracing::info!(request_id = %req.request_id_str(), from = %route.name, to = %name, "falling back");
        served.fallback_from = Some(route.name.clone());
        served.failed_over = list_name == "fallbacks";
        let admitted = match admission
            .table
            .fallback_plan(name, req.estimated_prompt_tokens)
        {
            None => Ok(()),
            Some(plan) => match admission.state.admit(&plan, crate::ledger::now_ms()).await {
                Ok(admitted) => {
                    served.admissions.push(FallbackAdmitted {
                        route: fallback.name.clone(),
                        plan,
                        admitted,
                    });
                    Ok(())
                }
                Err(refused) => {
                    tracing::info!(request_id = %req.request_id_str(), route = %name,
                        "the fallback route's own limits refuse the request");
                    Err(RouteError::Limited(refused))
                }
            },
        };
        if let Err(e) = admitted {
            last = Some(merge(last, e));
            continue;
        }
        // Sent on: counted once the fallback's own limits took it.
        if let Some(m) = metrics::metrics() {
            m.fallbacks
                .with_label_values(&[&route.name, list_name])
                .inc();
        }
        match fallback.attempt(req, served).await {
            Ok(resp) => return Ok(resp),
            Err(e) => {
                // Its admission is over: what it held (a `max_parallel` slot) goes back now,
                // its estimate counted.
                // (Removed once settled: dropped meanwhile, the request settles it again,
                // which Redis's ticket makes count once.)
                if let Some(i) = served
                    .admissions
                    .iter()
                    .position(|f| f.route == fallback.name)
                {
                    let f = &served.admissions[i];
                    let actual = crate::policy::Actual {
                        tokens: f.plan.tokens,
                        ended_ms: crate::ledger::now_ms(),
                        ..Default::default()
                    };
                    admission.state.settle(&f.plan, &f.admitted, actual).await;
                    served.admissions.swap_remove(i);
                }
                let go_on = e.falls_back()
                    || matches!(&e, RouteError::Failed(a) if context_error(a) || content_filter_error(a));
                if matches!(e, RouteError::Unavailable { .. }) {
                    unavailable.push(name.as_str());
                }
                last = Some(merge(last, e));
                if !go_on {
                    break;
                }
            }
        }
    }
    if served.route.is_empty() || served.route == route.name {
        // The answer is the route's own: no fallback got as far as a deployment.
        served.fallback_from = None;
        served.failed_over = false;
    }
    // A fallback's limit refusing counts as a refusal when it is what the client gets.
    if let Some(RouteError::Limited(refused)) = &last {
        refused.count();
    }
    Err(match last {
        Some(e) => e.into_gateway_error(&unavailable.join("`, `")),
        None => GatewayError::invalid_request(format!(
            "the prompt is longer than the context window of `{}` and no context fallback could take it",
            route.name
        ))
        .with_param("messages"),
    })
}
