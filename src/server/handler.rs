//! The innermost service: one config generation per request, then path → auth → body →
//! `ApiRequest` → route check → dispatch. Every failure becomes an OpenAI-shaped error here.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use serde_json::json;
use tower::Service;

use super::body::BoxError;
use super::body::{json_response, ResponseBody};
use super::{request_id, Gateway, Runtime};
use crate::api::{self, ApiRequest, Shape, Target};
use crate::auth::ClientKey;
use crate::cache;
use crate::config::CacheScope;
use crate::error::GatewayError;
use crate::ledger::report::{self, Format};
use crate::ledger::store::GroupBy;
use crate::ledger::{self, LedgerRow, RequestRecord, Tap};
use crate::policy::{self, Refused};
use crate::route::state::{now_ms, Health};
use crate::route::{self, Served};
use crate::telemetry::clock::UpstreamClock;
use crate::telemetry::{metrics, RequestFacts};
use crate::Name;

const ROUTE_HEADER: HeaderName = HeaderName::from_static("x-switchyard-route");
const DEPLOYMENT_HEADER: HeaderName = HeaderName::from_static("x-switchyard-deployment");
const CACHE_HEADER: HeaderName = HeaderName::from_static("x-switchyard-cache");

#[derive(Clone)]
pub struct GatewayService {
    gateway: Arc<Gateway>,
}

impl GatewayService {
    pub fn new(gateway: Arc<Gateway>) -> Self {
        GatewayService { gateway }
    }
}

impl<B> Service<Request<B>> for GatewayService
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let gateway = self.gateway.clone();
        // The request's future goes to the heap as it is made: wrapping it in an async block
        // first would copy it once more (it is several KB: every await point's state).
        Box::pin(futures_util::FutureExt::map(handle(gateway, req), Ok))
    }
}

async fn handle<B>(gateway: Arc<Gateway>, req: Request<B>) -> Response<ResponseBody>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let rt = gateway.runtime();
    let mut facts = RequestFacts::default();
    let target = api::classify(req.method(), req.uri().path());
    let result = match target {
        Target::Healthz => Ok(json_response(StatusCode::OK, &json!({"status": "ok"}))),
        Target::Readyz => Ok(readyz(&rt)),
        // The rare endpoints' futures are boxed, so that their states (a reload builds a
        // whole runtime) do not make every request's future larger, and slower to move.
        Target::Metrics => Ok(Box::pin(metrics_response(&gateway, &rt)).await),
        Target::AdminRoutes => rt
            .keys
            .authenticate_admin(req.headers())
            .map(|()| admin_routes(&rt)),
        Target::AdminSpend => match rt.keys.authenticate_admin(req.headers()) {
            Err(e) => Err(e),
            Ok(()) => Box::pin(admin_spend(&gateway, &rt, req.uri().query().unwrap_or(""))).await,
        },
        Target::AdminReload => match rt.keys.authenticate_admin(req.headers()) {
            Err(e) => Err(e),
            Ok(()) => match Box::pin(gateway.reload("admin API")).await {
                Ok(generation) => Ok(json_response(
                    StatusCode::OK,
                    &json!({"status": "ok", "generation": generation}),
                )),
                Err(errors) => Err(GatewayError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "invalid_config",
                    format!("the new config was refused; the old one keeps serving:\n{errors}"),
                )),
            },
        },
        Target::ListModels => rt.keys.authenticate(req.headers()).map(|key| {
            facts.endpoint = "models";
            facts.of_key(&key);
            list_models(&rt, &key)
        }),
        Target::GetModel(id) => rt.keys.authenticate(req.headers()).and_then(|key| {
            facts.endpoint = "models";
            facts.of_key(&key);
            get_model(&rt, &key, &id)
        }),
        Target::Call(op, shape) => {
            facts.endpoint = op.path();
            proxy(&gateway, &rt, op, shape, req, &mut facts).await
        }
        Target::Stored(rest) => match rt.keys.authenticate(req.headers()) {
            Err(e) => Err(e),
            Ok(key) => {
                facts.endpoint = if rest.starts_with("responses/") {
                    "responses"
                } else {
                    "chat/completions"
                };
                facts.of_key(&key);
                let method = match req.method() {
                    &http::Method::HEAD => http::Method::GET,
                    m => m.clone(),
                };
                let query = req.uri().query().map(str::to_string);
                Box::pin(stored_response(&rt, &key, method, query, &rest, &mut facts)).await
            }
        },
        Target::WrongMethod(allow) => Err(GatewayError::method_not_allowed(allow)),
        Target::NotFound => Err(GatewayError::not_found(
            "unknown endpoint: see GET /v1/models and the OpenAI API paths under /v1",
        )),
    };
    let mut resp = match result {
        Ok(resp) => resp,
        Err(e) => {
            facts.error_code.clone_from(&e.code);
            e.into_response()
        }
    };
    let h = resp.headers_mut();
    // The serving deployment's values are made once, with its metric handles; other answers
    // (a cache hit, a refusal after the route was known) make theirs.
    let (route, deployment) = facts
        .metrics
        .as_deref()
        .map_or((None, None), |m| m.headers());
    let value = |made: Option<&HeaderValue>, name: &str| match made {
        Some(v) => Some(v.clone()),
        None if name.is_empty() => None,
        None => HeaderValue::from_str(name).ok(),
    };
    if let Some(v) = value(route, &facts.route) {
        h.insert(ROUTE_HEADER, v);
    }
    if let Some(v) = value(deployment, &facts.deployment) {
        h.insert(DEPLOYMENT_HEADER, v);
    }
    resp.extensions_mut().insert(facts);
    resp
}

async fn proxy<B>(
    gateway: &Gateway,
    rt: &Arc<Runtime>,
    op: api::Operation,
    shape: Shape,
    req: Request<B>,
    facts: &mut RequestFacts,
) -> Result<Response<ResponseBody>, GatewayError>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let key = rt.keys.authenticate(req.headers())?;
    facts.of_key(&key);
    let request_id = request_id(req.headers());
    let (parts, body) = req.into_parts();
    let started = std::time::Instant::now();
    // Dropped (its client gone) before its record takes over, the request still gets its row.
    let mut unrecorded = Unrecorded {
        ledger: &gateway.accounting.ledger,
        key: &key,
        request_id: &request_id,
        route: None,
        op,
        started,
        armed: true,
    };
    // What is refused before it is routed (too large, not JSON, a model unknown or not the
    // key's) still gets its ledger row, as every request of a known key does.
    let mut named_route = None;
    let checked = async {
        // The Azure shape names the route in the path: check it before reading a large upload.
        if let Shape::Azure { route } = &shape {
            named_route = rt.routes.get(route.as_str());
            check_route(rt, &key, route)?;
        }
        if let Some(len) = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        {
            if len > rt.max_body {
                return Err(GatewayError::too_large(rt.max_body));
            }
        }
        let body = read_body(body, rt.max_body, gateway.started.client_timeout.0).await?;
        let api_req = ApiRequest::parse(op, shape, &parts.headers, body, request_id.clone())?;
        named_route = rt.routes.get(&api_req.route);
        let route = check_route(rt, &key, &api_req.route)?;
        Ok((api_req, route))
    }
    .await;
    let (mut api_req, route) = match checked {
        Ok(checked) => checked,
        Err(e) => {
            unrecorded.armed = false;
            let route = match named_route {
                // A configured route's name, as every other answer of the route has it (the
                // header, the metrics' label).
                Some(r) => {
                    facts.route.clone_from(&r.name);
                    r.name.clone()
                }
                None => Name::from("unknown"),
            };
            gateway.accounting.ledger.record(LedgerRow {
                status: e.status.as_u16(),
                latency_ms: started.elapsed().as_secs_f64() * 1000.0,
                ..ledger_row(&key, request_id.to_str().unwrap_or(""), route, op)
            });
            return Err(e);
        }
    };
    if op.is_audio_upload() {
        api_req.audio = api::audio::measure(&api_req.body, api_req.form_parts("file")).await;
    }
    facts.stream = api_req.stream;
    // Only a configured route name becomes a header or a metric label.
    facts.route.clone_from(&route.name);
    unrecorded.route = Some(&route.name);

    // What admission will check (a hit takes nothing from it).
    let plan = rt.policy.plan(
        &key.name,
        &route.name,
        api_req.estimated_prompt_tokens,
        route.worst_case_usd(&api_req, &rt.routes),
    );
    // Under a budget, a request without an output cap gets the one its reservation assumed.
    if !plan.budgets.is_empty()
        && api_req.max_tokens.is_none()
        && matches!(
            op,
            api::Operation::ChatCompletions
                | api::Operation::Completions
                | api::Operation::Responses
        )
    {
        api_req.output_cap = Some(route.output_cap(&api_req));
    }
    // llama.cpp reads its own `n_predict` before `max_tokens`: under a budget, one asking
    // more than the reservation's cap (or no cap, when negative) is cut to it.
    if let (false, Some((_, asked))) = (plan.budgets.is_empty(), &api_req.n_predict) {
        let cap = route.output_cap(&api_req);
        if *asked < 0 || *asked as u64 > cap {
            api_req.n_predict_cap = Some(cap);
        }
    }

    // The cache, on routes that set one: a hit is served here, costs nothing and takes
    // nothing from limits or budgets; a miss leads (others asking the same wait for it).
    let mut cache_leader = None;
    let mut cache_result = None;
    if let (Some(ttl), true) = (route.cache_ttl, op.cacheable()) {
        let (lookup, store) = cache::directives(&parts.headers);
        let (who, name): (&str, &str) = match rt.loaded.config.cache.scope {
            CacheScope::Global => ("global", ""),
            CacheScope::Key => ("key:", &key.name),
            CacheScope::Team => match &key.team {
                Some(t) => ("team:", t),
                // A key without a team is a team of its own (not its entries under the
                // `key` scope: a change of scope finds none of the old ones).
                None => ("teamless key:", &key.name),
            },
        };
        // The cap the gateway adds upstream changes the answer as much as the body does:
        // answers cut at a budget's cap are not served to requests that would go uncapped.
        let mut digits = itoa::Buffer::new();
        let cap = api_req
            .output_cap
            .or(api_req.n_predict_cap)
            .map_or("", |c| digits.format(c));
        let scope = [who, name, if cap.is_empty() { "" } else { "\0cap:" }, cap];
        if let Some(k) = cache::key(&route.name, op, &scope, &api_req.body) {
            if lookup {
                match gateway.cache.lookup(k, route.timeout).await {
                    cache::Lookup::Hit(entry) => {
                        match serve_hit(gateway, route, &key, &api_req, op, &entry, facts) {
                            Some(resp) => {
                                unrecorded.armed = false;
                                return Ok(resp);
                            }
                            // Stored events that add up to no JSON answer: fetched anew for
                            // a plain request, and not stored over them.
                            None => cache_result = Some("miss"),
                        }
                    }
                    cache::Lookup::Lead(leader) => {
                        cache_result = Some("miss");
                        cache_leader = store.then_some((leader, ttl));
                    }
                }
            } else {
                cache_result = Some("skip");
                cache_leader = store.then(|| (gateway.cache.store_only(k), ttl));
            }
        }
        if let (Some(m), Some(result)) = (metrics::metrics(), cache_result) {
            m.cache_requests
                .with_label_values(&[&route.name, result])
                .inc();
        }
    }

    // Admission: rate limits and budgets, reserved in one step.
    let mut record = new_record(gateway, &key, &api_req, route, plan);
    unrecorded.armed = false;
    record.generation = Some(rt.requests.clone());
    let admitted = match record.plan.never_admitted() {
        Some(never) => Err(never),
        None => {
            gateway
                .accounting
                .policy
                .admit(&record.plan, ledger::now_ms())
                .await
        }
    };
    match admitted {
        Ok(admitted) => record.admitted = Some(admitted),
        Err(refused) => {
            refused.count();
            if let Refused::Budget {
                budget,
                spent,
                first_in_period: true,
                ..
            } = &refused
            {
                policy::send_alerts(
                    &gateway.accounting.http,
                    gateway.accounting.webhook.as_deref(),
                    vec![policy::hard_alert(budget, *spent)],
                );
            }
            let e = refused.into_error();
            record.finish(e.status.as_u16(), None, None);
            return Err(e);
        }
    }
    let limit_headers = record
        .admitted
        .as_ref()
        .map(|a| a.headers)
        .unwrap_or_default();

    let dispatched = std::time::Instant::now();
    let admission = route::Admission {
        table: &rt.policy,
        state: &*gateway.accounting.policy,
    };
    let result = route::dispatch(route, &rt.routes, &api_req, &mut record.served, admission).await;
    record.row_from_served();
    let mut served = std::mem::take(&mut record.served);
    // Settled with the request; the serving fallback's limits are in the headers too.
    record.served.admissions = std::mem::take(&mut served.admissions);
    let limit_headers = record
        .served
        .admissions
        .iter()
        .filter(|f| f.route == served.route)
        .fold(limit_headers, |h, f| h.tightest(f.admitted.headers));
    let waited = dispatched.elapsed();
    // The upstream's own time as its connection saw it, when one attempt served on a
    // connection it did not have to make; else the whole dispatch (a new connection's setup,
    // retries, backoff and fallbacks are the upstreams' time too). None when no attempt was
    // made (no deployment could take it): not a request sent upstream.
    facts.upstream_wait = (served.attempts > 0).then(|| match &result {
        Ok(resp) if served.attempts == 1 => resp
            .extensions()
            .get::<UpstreamClock>()
            .and_then(|c| c.0.wait(dispatched))
            .map(|head| {
                head + resp
                    .extensions()
                    .get::<route::FirstFrameWait>()
                    .map_or(std::time::Duration::ZERO, |f| f.0)
            })
            .unwrap_or(waited),
        _ => waited,
    });
    if !served.route.is_empty() {
        facts.route.clone_from(&served.route);
    }
    record.price = served.price;
    record.tokenizer_model = served.tokenizer_model;
    facts.deployment = served.deployment;
    facts.provider = served.provider;
    facts.attempts = served.attempts;
    facts.fallback_from = served.fallback_from.unwrap_or_default();
    let failed_over = served.failed_over;
    facts.op = Some(op);
    // The key's series on the serving deployment: looked up once, for the record and the log.
    let counters = served
        .metrics
        .as_ref()
        .zip(metrics::metrics())
        .map(|(d, m)| d.key_counters(m, &record.row.key, &record.row.team));
    record.counters.clone_from(&counters);
    facts.key_counters = counters;
    facts.metrics = served.metrics;
    match result {
        Err(e) if e.is_content_filter() => {
            // Azure's content filter refusing the prompt: billed for the prompt's tokens.
            record.finish_billed_refusal(e.status.as_u16());
            Err(e)
        }
        Err(e) if served.abandoned => {
            // An attempt given up on while upstream, whatever the last one said: what the
            // reservation assumed (`finish_abandoned`).
            record.finish_abandoned(e.status.as_u16());
            Err(e)
        }
        Err(e) => {
            record.finish(e.status.as_u16(), None, None);
            Err(e)
        }
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            limit_headers.apply(&mut parts.headers);
            let content_type = parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let drop_usage_chunk = api_req.stream && !api_req.client_wants_usage;
            // Compressed although asked not to be (`accept-encoding: identity`): passed on
            // with its `content-encoding`, and not read for usage.
            let encoded = parts
                .headers
                .get(http::header::CONTENT_ENCODING)
                .is_some_and(|v| v != "identity");
            let mut tap = Tap::new(
                body,
                record,
                parts.status.as_u16(),
                &content_type,
                drop_usage_chunk,
                encoded,
            );
            // The answer of a route that served because the route asked for failed is not
            // kept under the route asked for: once that is back, its own answer is what the
            // same request should get (the degraded one was served from the cache for the
            // whole `ttl`). Those waiting for it ask again. (A context or content-filter
            // fallback serves such a request whenever it comes: kept.)
            if let Some((leader, ttl)) = cache_leader.filter(|_| !failed_over) {
                tap = tap.cache_into(leader, ttl);
            }
            if let Some(result) = cache_result {
                parts
                    .headers
                    .insert(CACHE_HEADER, HeaderValue::from_static(result));
            }
            Ok(Response::from_parts(parts, tap.boxed_unsync()))
        }
    }
}

/// The row of a request of a known key whose client left before its `RequestRecord` took over
/// (while its body was read, or it waited for another request's answer to the same
/// question): written when dropped still `armed`, as a `499` at no cost. (Made only then:
/// nothing is allocated for the requests that get their record.)
struct Unrecorded<'a> {
    ledger: &'a ledger::LedgerWriter,
    key: &'a ClientKey,
    request_id: &'a HeaderValue,
    /// Once known.
    route: Option<&'a Name>,
    op: api::Operation,
    started: std::time::Instant,
    armed: bool,
}

impl Drop for Unrecorded<'_> {
    fn drop(&mut self) {
        if self.armed {
            let route = self
                .route
                .map_or_else(|| Name::from("unknown"), Name::clone);
            self.ledger.record(LedgerRow {
                status: ledger::CLIENT_CLOSED,
                latency_ms: self.started.elapsed().as_secs_f64() * 1000.0,
                ..ledger_row(
                    self.key,
                    self.request_id.to_str().unwrap_or(""),
                    route,
                    self.op,
                )
            });
        }
    }
}

/// A call on what an upstream stores (a response, a chat completion made with `store: true`;
/// `api::Target::Stored`): it names no model, and what is stored lives where it was made,
/// so the providers of the routes the key may use, and of the routes those fall back to
/// (which serve the key too; not their fallbacks, which no request of the key reaches), are
/// asked in turn (each once, in the config's order; mocks store nothing) until one holds it. The answer is passed on as it comes (a `stream=true` retrieval too);
/// such calls cost nothing and make no ledger row.
async fn stored_response(
    rt: &Runtime,
    key: &ClientKey,
    method: http::Method,
    query: Option<String>,
    rest: &str,
    facts: &mut RequestFacts,
) -> Result<Response<ResponseBody>, GatewayError> {
    // The key's routes, then the routes they fall back to, each once. Fallbacks are not
    // chained (a request uses only the list of the route it names), so neither is this.
    let mut routes: Vec<&route::Route> = rt
        .routes
        .values()
        .filter(|r| check_route(rt, key, &r.name).is_ok())
        .map(|r| &**r)
        .collect();
    let own = routes.len();
    for i in 0..own {
        let r = routes[i];
        for name in r
            .fallbacks
            .iter()
            .chain(&r.context_fallbacks)
            .chain(&r.content_filter_fallbacks)
        {
            if let Some(f) = rt.routes.get(name.as_str()) {
                if !routes.iter().any(|x| x.name == f.name) {
                    routes.push(f);
                }
            }
        }
    }
    facts.stream = query
        .as_deref()
        .is_some_and(|q| q.split('&').any(|p| p == "stream=true"));
    let mut asked: Vec<&str> = Vec::new();
    // Kept for the client when none holds it: an upstream that could not say (down, busy)
    // first, then a "not found", then a refusal that says nothing of the response (an
    // upstream key refused, a method it does not serve).
    let (mut unsure, mut not_found, mut refused) = (None, None, None);
    for route in routes {
        for d in &route.deployments {
            if asked.contains(&&*d.provider.name) {
                continue;
            }
            asked.push(&d.provider.name);
            let Some(answer) = d
                .provider
                .send_stored(method.clone(), rest, query.as_deref(), route.timeout)
                .await
            else {
                continue;
            };
            facts.attempts += 1;
            facts.route.clone_from(&route.name);
            facts.deployment.clone_from(&d.label);
            facts.provider.clone_from(&d.provider.name);
            let e = match answer {
                Ok(resp) => return Ok(resp),
                Err(e) => e.into_gateway_error(),
            };
            match e.status.as_u16() {
                // Not held there.
                404 => {
                    not_found.get_or_insert(e);
                }
                // Held there, and refused (a cancel of a response not in the background).
                400 | 409 | 422 => return Err(e),
                // Says nothing of the response: its key refused (401, 403), a call it does
                // not serve (405: vLLM has no DELETE).
                401..=499 if e.status != http::StatusCode::TOO_MANY_REQUESTS => {
                    refused.get_or_insert(e);
                }
                // Could not say (down, busy): asked of the others still.
                _ => unsure = Some(e),
            }
        }
    }
    facts.route = Default::default();
    facts.deployment = Default::default();
    facts.provider = Default::default();
    // A refusal of the gateway's key is told as one (a 502 saying what the upstream said),
    // not as a 401 the SDK raises as `AuthenticationError` about the client's own key.
    let refused = refused.map(|e| match e.status.as_u16() {
        401 | 403 => crate::provider::told_as_refusal(e),
        _ => e,
    });
    Err(unsure.or(not_found).or(refused).unwrap_or_else(|| {
        GatewayError::not_found(format!(
            "no upstream of the routes this key may use holds `{}`",
            rest.split('/')
                .find(|p| p.contains(['_', '-']))
                .unwrap_or(rest)
        ))
    }))
}

/// The output cap a request goes upstream with, times the answers it asks for: its own cap
/// field, or the one the gateway added. llama.cpp reads `n_predict` before either: with one
/// (the client's, or the gateway's cut of it) the larger counts, and a negative one (no cap)
/// leaves the request uncapped.
fn sent_cap(req: &ApiRequest) -> Option<u64> {
    use api::Operation as Op;
    if !matches!(
        req.op,
        Op::ChatCompletions | Op::Completions | Op::Responses
    ) {
        return None;
    }
    let cap = req.max_tokens.or(req.output_cap);
    let cap = match (&req.n_predict, req.n_predict_cap) {
        (_, Some(cut)) => Some(cap.map_or(cut, |c| c.max(cut))),
        (Some((_, asked)), None) if *asked < 0 => None,
        (Some((_, asked)), None) => Some(cap.map_or(*asked as u64, |c| c.max(*asked as u64))),
        (None, None) => cap,
    };
    cap.map(|c| c.saturating_mul(req.choices))
}

/// The start of a request's ledger row: when, which request, whose, where to.
fn ledger_row(key: &ClientKey, request_id: &str, route: Name, op: api::Operation) -> LedgerRow {
    LedgerRow {
        ts_ms: ledger::now_ms(),
        request_id: request_id.to_string(),
        key: key.name.clone(),
        team: key.team.clone().unwrap_or_default(),
        route,
        endpoint: op.path().into(),
        ..Default::default()
    }
}

/// The ledger record of a request that reached `route`, filled in further as it goes.
fn new_record(
    gateway: &Gateway,
    key: &ClientKey,
    req: &ApiRequest,
    route: &route::Route,
    plan: policy::Plan,
) -> RequestRecord {
    RequestRecord {
        accounting: Some(gateway.accounting.clone()),
        plan,
        admitted: None,
        row: LedgerRow {
            user: req.user.clone().unwrap_or_default(),
            ..ledger_row(key, req.request_id_str(), route.name.clone(), req.op)
        },
        started: std::time::Instant::now(),
        op: req.op,
        price: Default::default(),
        tokenizer_model: Name::default(),
        request_body: req.body.clone(),
        form_prompt: req.form_field("prompt"),
        counters: None,
        measured_usage: req.measured_usage(),
        served: Served::default(),
        billed_refusal: false,
        generation: None,
        // Every answer asked for (`n`, `best_of`, a batch of prompts), as the reservation.
        output_cap: route.output_cap(req).saturating_mul(req.choices),
        sent_cap: sent_cap(req),
        background: req.background,
        stream: req.stream,
        charge_usd: None,
    }
}

/// A cache hit: the stored answer, as one JSON body or replayed as a stream; a ledger row
/// that says it was a hit and cost nothing; what it saved, counted.
fn serve_hit(
    gateway: &Gateway,
    route: &route::Route,
    key: &ClientKey,
    req: &ApiRequest,
    op: api::Operation,
    entry: &cache::Entry,
    facts: &mut RequestFacts,
) -> Option<Response<ResponseBody>> {
    let (body, content_type) = if req.stream {
        let events = cache::stream_events(entry, op, req.client_wants_usage);
        let s = futures_util::stream::iter(events.into_iter().map(Ok::<Bytes, BoxError>));
        (super::body::streaming(s), "text/event-stream")
    } else {
        (super::body::full(entry.answer(op)?), "application/json")
    };
    facts.deployment = "cache".into();
    if let Some(m) = metrics::metrics() {
        m.cache_requests
            .with_label_values(&[&route.name, "hit"])
            .inc();
        m.cache_saved
            .with_label_values(&[&route.name])
            .inc_by(entry.cost_usd);
    }
    let mut record = new_record(gateway, key, req, route, Default::default());
    record.row.deployment = "cache".into();
    record.row.cache_hit = true;
    record.finish(200, None, Some(std::time::Instant::now()));
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    h.insert(CACHE_HEADER, HeaderValue::from_static("hit"));
    Some(resp)
}

fn check_route<'a>(
    rt: &'a Runtime,
    key: &ClientKey,
    route: &str,
) -> Result<&'a Arc<route::Route>, GatewayError> {
    let r = rt
        .routes
        .get(route)
        .ok_or_else(|| GatewayError::model_not_found(route))?;
    if !key.may_use(route) {
        return Err(GatewayError::permission_denied(format!(
            "the key `{}` may not use the model `{route}`",
            key.name
        ))
        .with_param("model"));
    }
    Ok(r)
}

/// Whether a body's error says it was malformed (see `read_body`).
fn malformed(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(h) = c.downcast_ref::<hyper::Error>() {
            if h.is_parse() || h.is_user() {
                return true;
            }
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput
            );
        }
        cause = c.source();
    }
    false
}

/// Bytes a second a request body must average once it has taken `server.client_timeout`.
const MIN_BODY_RATE: f64 = 1024.0;

/// The body, whole. `idle`: the longest it may go without a byte arriving
/// (`server.client_timeout`): a client that stalls, or sends a byte now and then to hold a
/// connection, is answered 408 and let go.
async fn read_body<B>(body: B, limit: u64, idle: std::time::Duration) -> Result<Bytes, GatewayError>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let limit_usize = usize::try_from(limit).unwrap_or(usize::MAX);
    let mut body = std::pin::pin!(Limited::new(body, limit_usize));
    // Most bodies are one frame, kept as it is; more are joined once at the end.
    let mut first: Option<Bytes> = None;
    let mut more: Vec<Bytes> = Vec::new();
    // A body in several parts must keep coming at `MIN_BODY_RATE` on average once it has
    // taken `idle`: a byte now and then, each within `idle`, would hold the connection for
    // as long as its length allows.
    let mut since: Option<(std::time::Instant, usize)> = None;
    loop {
        // A frame already there (the usual body, read with its head) needs no deadline, nor
        // the clock read that makes one.
        let ready = futures_util::FutureExt::now_or_never(body.frame());
        let next = match ready {
            Some(frame) => Ok(frame),
            None => tokio::time::timeout(idle, body.frame()).await,
        };
        let frame = match next {
            Err(_) => {
                return Err(GatewayError::request_timeout(format!(
                    "no byte of the request body arrived for {} s",
                    idle.as_secs_f64()
                )))
            }
            Ok(None) => break,
            Ok(Some(Ok(frame))) => frame,
            Ok(Some(Err(e))) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(GatewayError::too_large(limit))
            }
            // A body the client framed wrong (a bad chunk size, say), its connection still
            // open: a bad request. hyper says so with an I/O error of kind InvalidData or
            // InvalidInput under its own; a body cut short is UnexpectedEof, or an HTTP/2
            // stream reset.
            Ok(Some(Err(e))) if malformed(&*e) => {
                return Err(GatewayError::invalid_request(
                    "the request body is malformed (its framing) and could not be read",
                ))
            }
            // The client closed its connection or stream before its body's end: nobody is
            // left to answer, and its row says so (499, as for a client gone before the
            // answer), not that it sent a bad request.
            Ok(Some(Err(_))) => {
                return Err(GatewayError::client_closed(
                    "the request body could not be read to its end",
                ))
            }
        };
        if let Ok(data) = frame.into_data() {
            if data.is_empty() {
                continue;
            }
            match first {
                None => first = Some(data),
                Some(_) => {
                    let (start, bytes) =
                        since.get_or_insert_with(|| (std::time::Instant::now(), 0));
                    *bytes += data.len();
                    let took = start.elapsed();
                    if took > idle && (*bytes as f64) < MIN_BODY_RATE * took.as_secs_f64() {
                        return Err(GatewayError::request_timeout(format!(
                            "the request body arrived at less than {MIN_BODY_RATE} bytes a second"
                        )));
                    }
                    more.push(data)
                }
            }
        }
    }
    Ok(match first {
        None => Bytes::new(),
        Some(one) if more.is_empty() => one,
        Some(one) => {
            let mut all =
                BytesMut::with_capacity(one.len() + more.iter().map(Bytes::len).sum::<usize>());
            all.extend_from_slice(&one);
            for b in &more {
                all.extend_from_slice(b);
            }
            all.freeze()
        }
    })
}

/// Ready when the config is loaded and every route has a deployment not cooling down.
fn readyz(rt: &Runtime) -> Response<ResponseBody> {
    let now = now_ms();
    let down: Vec<&str> = rt
        .routes
        .values()
        .filter(|r| {
            !r.deployments
                .iter()
                .any(|d| matches!(d.state.health(now), Health::Up | Health::ProbeDue))
        })
        .map(|r| &*r.name)
        .collect();
    let (status, state) = if down.is_empty() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not_ready")
    };
    json_response(
        status,
        &json!({"status": state, "generation": rt.generation, "routes": rt.routes.len(),
                "routes_without_deployment": down}),
    )
}

fn model_object(rt: &Runtime, id: &str) -> serde_json::Value {
    json!({"id": id, "object": "model", "created": rt.loaded_at, "owned_by": "switchyard"})
}

fn list_models(rt: &Runtime, key: &ClientKey) -> Response<ResponseBody> {
    let data: Vec<_> = rt
        .routes
        .keys()
        .filter(|r| key.may_use(r))
        .map(|r| model_object(rt, r))
        .collect();
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

fn get_model(
    rt: &Runtime,
    key: &ClientKey,
    id: &str,
) -> Result<Response<ResponseBody>, GatewayError> {
    if !rt.routes.contains_key(id) || !key.may_use(id) {
        return Err(GatewayError::model_not_found(id));
    }
    Ok(json_response(StatusCode::OK, &model_object(rt, id)))
}

/// `GET /admin/spend?by=key|team|model|deployment&since=T&until=T&format=json|csv|table`:
/// the same report as `switchyard spend`, plus each budget's state now.
async fn admin_spend(
    gateway: &Gateway,
    rt: &Runtime,
    query: &str,
) -> Result<Response<ResponseBody>, GatewayError> {
    let now = ledger::now_ms();
    let mut by = GroupBy::Key;
    let mut since = 0;
    let mut until = i64::MAX;
    let mut format = Format::Json;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = &api::percent_decode(&v.replace('+', " "));
        let k = &*api::percent_decode(k);
        let bad =
            |what: &str| GatewayError::invalid_request(format!("bad `{k}`: {what}")).with_param(k);
        match k {
            "by" => {
                by = report::parse_group(v).ok_or_else(|| bad("key, team, model or deployment"))?
            }
            "since" => since = report::parse_time(v, now).map_err(|e| bad(&e))?,
            "until" => until = report::parse_time(v, now).map_err(|e| bad(&e))?,
            "format" => format = Format::parse(v).ok_or_else(|| bad("json, csv or table"))?,
            _ => return Err(bad("unknown parameter")),
        }
    }
    let lines = report::report(&gateway.store, by, since, until)
        .await
        .map_err(GatewayError::internal)?;
    if format != Format::Json {
        let mut resp = Response::new(super::body::full(report::render(&lines, by, format)));
        let ct = if format == Format::Csv {
            "text/csv"
        } else {
            "text/plain; charset=utf-8"
        };
        resp.headers_mut()
            .insert(http::header::CONTENT_TYPE, HeaderValue::from_static(ct));
        return Ok(resp);
    }
    let mut budgets = Vec::with_capacity(rt.policy.all_budgets.len());
    for b in &rt.policy.all_budgets {
        let (start, next) = policy::period_bounds(b.period, now);
        // Unknown while Redis cannot be read: null, not 0.
        let status = gateway.accounting.policy.budget_status(b, start).await;
        budgets.push(json!({"budget": b.id.as_ref(), "scope": b.scope.kind(), "name": b.scope.name(),
               "period": policy::period_name(b.period), "period_start_ms": start, "period_end_ms": next,
               "limit_usd": b.usd, "soft_usd": b.soft_usd,
               "spent_usd": status.map(|(s, _)| report::to_nano_dollar(s)),
               "reserved_usd": status.map(|(_, r)| report::to_nano_dollar(r))}));
    }
    let mut body: serde_json::Value =
        serde_json::from_str(&report::render(&lines, by, Format::Json))
            .unwrap_or_else(|_| json!({}));
    body["since_ms"] = json!(since);
    body["until_ms"] = json!(if until == i64::MAX { None } else { Some(until) });
    body["budgets"] = json!(budgets);
    Ok(json_response(StatusCode::OK, &body))
}

/// `GET /metrics`: gauges read from the live state, then every family.
async fn metrics_response(gateway: &Gateway, rt: &Runtime) -> Response<ResponseBody> {
    if let Some(m) = metrics::metrics() {
        let now = now_ms();
        m.deployment_up.reset();
        m.inflight.reset();
        for r in rt.routes.values() {
            let mut in_flight = 0;
            for d in &r.deployments {
                let up = matches!(d.state.health(now), Health::Up | Health::ProbeDue);
                m.deployment_up
                    .with_label_values(&[&r.name, &d.label, &d.provider.name])
                    .set(i64::from(up));
                in_flight += d.state.in_flight.load(Ordering::Acquire) as i64;
            }
            m.inflight.with_label_values(&[&r.name]).set(in_flight);
        }
        let (bytes, entries) = gateway.cache.size();
        m.cache_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        m.cache_entries
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
        // Budgets: removed ones disappear at the next scrape.
        m.budget_spent.reset();
        m.budget_limit.reset();
        let now = ledger::now_ms();
        for b in &rt.policy.all_budgets {
            let (start, _) = policy::period_bounds(b.period, now);
            let status = gateway.accounting.policy.budget_status(b, start).await;
            let labels = [
                b.scope.kind(),
                b.scope.name(),
                policy::period_name(b.period),
            ];
            // Unknown while Redis cannot be read: left out of this scrape, not 0.
            if let Some((spent, _)) = status {
                m.budget_spent.with_label_values(&labels).set(spent);
            }
            m.budget_limit.with_label_values(&labels).set(b.usd);
        }
    }
    let mut resp = Response::new(super::body::full(metrics::encode()));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

/// The live route table, without a secret in it.
fn admin_routes(rt: &Runtime) -> Response<ResponseBody> {
    let now = now_ms();
    let routes: Vec<_> = rt
        .routes
        .values()
        .map(|r| {
            let deployments: Vec<_> = r
                .deployments
                .iter()
                .map(|d| {
                    let health = d.state.health(now);
                    let quota = d.state.quota();
                    json!({
                        "deployment": d.label,
                        "provider": d.provider.name,
                        "kind": d.provider.kind_name(),
                        "upstream": d.upstream,
                        "model": d.model,
                        "weight": d.weight,
                        "priority": d.priority,
                        "up": matches!(health, Health::Up | Health::ProbeDue),
                        "cooling_down_seconds": match health {
                            Health::CoolingDown(left) => Some(left.as_secs_f64()),
                            _ => None,
                        },
                        "probing": health == Health::Probing,
                        "fails_in_row": d.state.fails_in_row(),
                        "in_flight": d.state.in_flight.load(Ordering::Acquire),
                        "latency_ms": d.state.latency(false),
                        "time_to_first_token_ms": d.state.latency(true),
                        "quota": {
                            "rpm": d.rpm, "tpm": d.tpm,
                            "requests_this_minute": quota.requests,
                            "tokens_this_minute": quota.tokens,
                            "upstream_remaining_requests": quota.upstream_remaining_requests,
                            "upstream_remaining_tokens": quota.upstream_remaining_tokens,
                        },
                    })
                })
                .collect();
            json!({
                "route": r.name,
                "strategy": r.strategy,
                "retries": r.retries,
                "timeout_seconds": r.timeout.as_secs_f64(),
                "fallbacks": r.fallbacks,
                "context_fallbacks": r.context_fallbacks,
                "content_filter_fallbacks": r.content_filter_fallbacks,
                "deployments": deployments,
            })
        })
        .collect();
    json_response(
        StatusCode::OK,
        &json!({"generation": rt.generation, "loaded_at": rt.loaded_at, "routes": routes}),
    )
}
