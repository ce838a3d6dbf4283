//! Where a request goes: the compiled route table, the pick among a route's deployments,
//! retries on another deployment and the route's fallbacks. Strategies beyond a weighted
//! pick, cooldowns and quotas slot in here (see the routing issue).

use std::sync::Arc;
use std::time::Duration;

use indexmap::IndexMap;
use rand::Rng;

use crate::api::ApiRequest;
use crate::config::{Loaded, Strategy};
use crate::error::GatewayError;
use crate::provider::{AttemptError, Provider, Providers};
use crate::server::body::ResponseBody;

pub struct Deployment {
    pub provider: Arc<Provider>,
    /// What the upstream calls it: the Azure deployment, or the model name sent upstream.
    pub upstream: String,
    /// `provider/deployment`, as shown in headers, logs and the admin API.
    pub label: String,
    pub model: Option<String>,
    pub weight: f64,
    pub priority: u32,
}

pub struct Route {
    pub name: String,
    pub strategy: Strategy,
    pub deployments: Vec<Deployment>,
    pub fallbacks: Vec<String>,
    pub retries: u32,
    pub timeout: Duration,
}

pub type Routes = IndexMap<String, Arc<Route>>;

pub fn build_routes(loaded: &Loaded, providers: &Providers) -> Result<Routes, String> {
    let c = &loaded.config;
    let mut routes = IndexMap::new();
    for (name, r) in &c.models {
        let mut deployments = Vec::with_capacity(r.deployments.len());
        for d in &r.deployments {
            let provider = providers
                .get(&d.provider)
                .cloned()
                .ok_or_else(|| format!("route `{name}`: unknown provider `{}`", d.provider))?;
            let upstream = d.deployment.clone().unwrap_or_else(|| name.clone());
            deployments.push(Deployment {
                label: format!("{}/{}", d.provider, upstream),
                provider,
                upstream,
                model: d.model.clone(),
                weight: d.weight,
                priority: d.priority,
            });
        }
        routes.insert(
            name.clone(),
            Arc::new(Route {
                name: name.clone(),
                strategy: r.strategy,
                deployments,
                fallbacks: r.fallbacks.clone(),
                retries: r.retries.unwrap_or(c.routing.retries),
                timeout: r.timeout.unwrap_or(c.routing.timeout).0,
            }),
        );
    }
    Ok(routes)
}

/// What served a request: put on the response for headers and the log line.
#[derive(Debug, Clone, Default)]
pub struct Served {
    pub route: String,
    pub deployment: String,
    pub provider: String,
    pub attempts: u32,
}

impl Route {
    /// A weighted random pick among deployments not tried yet; once every deployment was
    /// tried, among all of them (a route with one deployment retries that one).
    fn pick(&self, tried: &[bool]) -> Option<usize> {
        let untried = |i: usize| !tried[i];
        let pick_from = |filter: &dyn Fn(usize) -> bool| -> Option<usize> {
            let total: f64 = (0..self.deployments.len())
                .filter(|i| filter(*i))
                .map(|i| self.deployments[i].weight)
                .sum();
            if total <= 0.0 {
                return None;
            }
            let mut x = rand::thread_rng().gen_range(0.0..total);
            for i in (0..self.deployments.len()).filter(|i| filter(*i)) {
                let w = self.deployments[i].weight;
                if x < w {
                    return Some(i);
                }
                x -= w;
            }
            (0..self.deployments.len())
                .rev()
                .find(|i| filter(*i) && self.deployments[*i].weight > 0.0)
        };
        pick_from(&untried).or_else(|| pick_from(&|_| true))
    }

    /// Up to `retries + 1` attempts over this route's deployments.
    async fn attempt(
        &self,
        req: &ApiRequest,
        served: &mut Served,
    ) -> Result<http::Response<ResponseBody>, AttemptError> {
        let mut tried = vec![false; self.deployments.len()];
        let mut last: Option<AttemptError> = None;
        for _ in 0..=self.retries {
            let Some(i) = self.pick(&tried) else { break };
            tried[i] = true;
            let d = &self.deployments[i];
            served.route.clone_from(&self.name);
            served.deployment.clone_from(&d.label);
            served.provider.clone_from(&d.provider.name);
            served.attempts += 1;
            match d.provider.send(req, &d.upstream, self.timeout).await {
                Ok(resp) => return Ok(resp),
                Err(e) => {
                    tracing::warn!(
                        request_id = %req.request_id_str(),
                        route = %self.name,
                        deployment = %d.label,
                        status = e.status().map(|s| s.as_u16()),
                        retryable = e.retryable(),
                        "upstream attempt failed"
                    );
                    let retryable = e.retryable();
                    last = Some(e);
                    if !retryable {
                        break;
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            AttemptError::Connect(format!("route `{}` has no deployment to try", self.name))
        }))
    }
}

/// Sends the request over `route`, then over its fallbacks in order when every attempt
/// failed with an error another deployment might not have.
pub async fn dispatch(
    route: &Arc<Route>,
    routes: &Routes,
    req: &ApiRequest,
    served: &mut Served,
) -> Result<http::Response<ResponseBody>, GatewayError> {
    let err = match route.attempt(req, served).await {
        Ok(resp) => return Ok(resp),
        Err(e) => e,
    };
    if !err.retryable() {
        return Err(err.into_gateway_error());
    }
    let mut last = err;
    for name in &route.fallbacks {
        let Some(fallback) = routes.get(name) else {
            continue;
        };
        tracing::info!(request_id = %req.request_id_str(), from = %route.name, to = %name, "falling back");
        match fallback.attempt(req, served).await {
            Ok(resp) => return Ok(resp),
            Err(e) => {
                let retryable = e.retryable();
                last = e;
                if !retryable {
                    break;
                }
            }
        }
    }
    Err(last.into_gateway_error())
}
