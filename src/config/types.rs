//! The typed shape of `routes.yaml`. Every struct refuses unknown fields; defaults live here
//! and nowhere else, and `docs/config.md` lists them.

use std::fmt;
use std::time::Duration;

use indexmap::IndexMap;
use serde::{Deserialize, Deserializer};

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerCfg,
    #[serde(default)]
    pub state: StateCfg,
    #[serde(default)]
    pub providers: IndexMap<String, ProviderCfg>,
    #[serde(default)]
    pub models: IndexMap<String, RouteCfg>,
    #[serde(default)]
    pub routing: RoutingCfg,
    #[serde(default)]
    pub teams: IndexMap<String, TeamCfg>,
    #[serde(default)]
    pub keys: Vec<KeyCfg>,
    /// The `global` budget: all traffic together.
    pub budget: Option<BudgetCfg>,
    #[serde(default)]
    pub cache: CacheCfg,
    #[serde(default)]
    pub alerts: AlertsCfg,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerCfg {
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Empty or absent: the admin API is off.
    #[serde(default)]
    pub admin_key: Option<Secret>,
    #[serde(default = "default_max_body")]
    pub max_body: ByteSize,
    /// How long shutdown waits for requests and streams in flight.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: Dur,
    /// Reload when the config file changes on disk.
    #[serde(default = "default_true")]
    pub watch_config: bool,
    /// How long a client may send nothing while the gateway waits for its request's head
    /// (or, on a kept-alive connection, its next request) or for the next bytes of its body.
    #[serde(default = "default_client_timeout")]
    pub client_timeout: Dur,
}

impl Default for ServerCfg {
    fn default() -> Self {
        ServerCfg {
            listen: default_listen(),
            admin_key: None,
            max_body: default_max_body(),
            shutdown_grace: default_shutdown_grace(),
            watch_config: true,
            client_timeout: default_client_timeout(),
        }
    }
}

fn default_listen() -> String {
    "0.0.0.0:8080".into()
}
fn default_max_body() -> ByteSize {
    ByteSize(32 << 20)
}
fn default_shutdown_grace() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_client_timeout() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StateCfg {
    /// `sqlite://PATH` (default `sqlite://switchyard.db`) or `postgres://…`.
    pub ledger: Option<Secret>,
    /// `redis://[:password@]host:port[/db]` or `rediss://…` (TLS): limits and budgets
    /// shared by every replica.
    pub redis: Option<Secret>,
    #[serde(default)]
    pub on_redis_error: OnRedisError,
    /// With `redis`: how long a replica may go without reaching Redis before the others
    /// give back what its requests in flight hold (default 30s).
    pub replica_timeout: Option<Dur>,
}

impl StateCfg {
    pub const DEFAULT_REPLICA_TIMEOUT: Duration = Duration::from_secs(30);

    pub fn replica_timeout(&self) -> Duration {
        self.replica_timeout
            .map_or(Self::DEFAULT_REPLICA_TIMEOUT, |d| d.0)
    }
}

/// What admission does while Redis cannot be reached.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FailMode {
    /// Admit without counting.
    Open,
    /// Refuse with 503 `state_unavailable`.
    Closed,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OnRedisError {
    #[serde(default = "fail_closed")]
    pub budgets: FailMode,
    #[serde(default = "fail_open")]
    pub rate_limits: FailMode,
}

impl Default for OnRedisError {
    fn default() -> Self {
        OnRedisError {
            budgets: FailMode::Closed,
            rate_limits: FailMode::Open,
        }
    }
}

fn fail_closed() -> FailMode {
    FailMode::Closed
}
fn fail_open() -> FailMode {
    FailMode::Open
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ProviderCfg {
    AzureOpenai(AzureCfg),
    Openai(OpenAiCfg),
    Mock(MockCfg),
}

impl ProviderCfg {
    /// The active health check and the server's origin (`scheme://host:port`), if any.
    pub fn health_check(&self) -> Option<(&HealthCheckCfg, String)> {
        let (hc, base) = match self {
            ProviderCfg::AzureOpenai(a) => (a.health_check.as_ref()?, a.endpoint.as_str()),
            ProviderCfg::Openai(o) => (o.health_check.as_ref()?, o.base_url.as_str()),
            ProviderCfg::Mock(_) => return None,
        };
        let url = reqwest::Url::parse(base).ok()?;
        let origin = url.origin().ascii_serialization();
        Some((hc, origin))
    }

    pub fn kind(&self) -> &'static str {
        match self {
            ProviderCfg::AzureOpenai(_) => "azure_openai",
            ProviderCfg::Openai(_) => "openai",
            ProviderCfg::Mock(_) => "mock",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureCfg {
    /// `https://{resource}.openai.azure.com`
    pub endpoint: String,
    pub api_key: Option<Secret>,
    #[serde(default = "default_api_version")]
    pub api_version: String,
    /// Ask for `stream_options.include_usage` on streams (usage for the ledger).
    #[serde(default = "default_true")]
    pub stream_usage: bool,
    pub health_check: Option<HealthCheckCfg>,
}

/// An active health check: `GET {origin}{path}` every `interval`; a 2xx answer in `timeout`
/// keeps the provider's deployments in rotation, anything else takes them out until the
/// next good answer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckCfg {
    /// From the server's root: `/health` (vLLM, TGI, llama.cpp), `/` (Ollama).
    pub path: String,
    #[serde(default = "default_health_interval")]
    pub interval: Dur,
    #[serde(default = "default_health_timeout")]
    pub timeout: Dur,
}

fn default_health_interval() -> Dur {
    Dur(Duration::from_secs(10))
}
fn default_health_timeout() -> Dur {
    Dur(Duration::from_secs(2))
}

fn default_api_version() -> String {
    "2024-10-21".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiCfg {
    /// Up to and including `/v1`, e.g. `http://127.0.0.1:8000/v1`.
    pub base_url: String,
    pub api_key: Option<Secret>,
    /// Sent as `?api-version=` on every request, for servers that require it (Azure AI
    /// Foundry's model inference endpoint, `https://{res}.services.ai.azure.com/models`).
    pub api_version: Option<String>,
    /// Ask for `stream_options.include_usage` on streams (usage for the ledger); turn off
    /// for servers that refuse the field.
    #[serde(default = "default_true")]
    pub stream_usage: bool,
    pub health_check: Option<HealthCheckCfg>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MockCfg {
    /// Time before the answer (before the first chunk of a stream).
    #[serde(default = "default_mock_latency")]
    pub latency: Dur,
    /// Content chunks of a streamed answer (also the completion tokens).
    #[serde(default = "default_mock_chunks")]
    pub stream_chunks: u32,
    /// Delay between two chunks of a stream.
    #[serde(default = "default_mock_chunk_delay")]
    pub chunk_delay: Dur,
    /// The text answered; word by word in streams. Default: a fixed sentence.
    pub reply: Option<String>,
    /// Every Nth request is answered `503` (0: never), to demo retries and failover.
    #[serde(default)]
    pub fail_every: u64,
    /// Length of embedding vectors when the request sets no `dimensions`.
    #[serde(default = "default_mock_dimensions")]
    pub embedding_dimensions: usize,
}

impl Default for MockCfg {
    fn default() -> Self {
        MockCfg {
            latency: default_mock_latency(),
            stream_chunks: default_mock_chunks(),
            chunk_delay: default_mock_chunk_delay(),
            reply: None,
            fail_every: 0,
            embedding_dimensions: default_mock_dimensions(),
        }
    }
}

fn default_mock_latency() -> Dur {
    Dur(Duration::from_millis(0))
}
fn default_mock_chunks() -> u32 {
    8
}
fn default_mock_chunk_delay() -> Dur {
    Dur(Duration::from_millis(0))
}
fn default_mock_dimensions() -> usize {
    16
}

#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    #[default]
    Weighted,
    RoundRobin,
    LeastBusy,
    LeastLatency,
    LowestCost,
    Priority,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteCfg {
    #[serde(default)]
    pub strategy: Strategy,
    pub deployments: Vec<DeploymentCfg>,
    #[serde(default)]
    pub fallbacks: Vec<String>,
    #[serde(default)]
    pub context_fallbacks: Vec<String>,
    #[serde(default)]
    pub content_filter_fallbacks: Vec<String>,
    pub context_window: Option<u64>,
    /// The most output tokens a request may ask for when it sets no `max_tokens`: the
    /// worst case a budget reserves. Default 4096 for chat, completions and responses.
    pub max_output_tokens: Option<u64>,
    pub pricing: Option<Pricing>,
    pub cache: Option<RouteCacheCfg>,
    pub limits: Option<LimitsCfg>,
    // Per-route overrides of `routing:`.
    pub retries: Option<u32>,
    pub timeout: Option<Dur>,
    pub connect_timeout: Option<Dur>,
    pub first_token_timeout: Option<Dur>,
    pub cooldown: Option<Dur>,
    pub allowed_fails: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentCfg {
    pub provider: String,
    /// The Azure deployment name for `azure_openai`; the model name sent upstream otherwise.
    /// Absent: the route's name.
    pub deployment: Option<String>,
    /// The underlying model (for prices), when `deployment` is a name of the user's own.
    pub model: Option<String>,
    #[serde(default)]
    pub priority: u32,
    #[serde(default = "default_weight")]
    pub weight: f64,
    pub tpm: Option<u64>,
    pub rpm: Option<u64>,
    pub pricing: Option<Pricing>,
}

fn default_weight() -> f64 {
    1.0
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pricing {
    /// USD per 1M prompt tokens.
    #[serde(default)]
    pub input_per_1m: f64,
    pub cached_input_per_1m: Option<f64>,
    #[serde(default)]
    pub output_per_1m: f64,
    pub per_image: Option<f64>,
    pub per_audio_second: Option<f64>,
    /// USD per 1M characters of text turned into speech (`audio/speech`'s `input`).
    pub per_1m_characters: Option<f64>,
    /// USD per 1M audio prompt / completion tokens (`gpt-4o-audio-preview`); the text prices
    /// when not set.
    pub audio_input_per_1m: Option<f64>,
    pub audio_output_per_1m: Option<f64>,
    /// USD per 1M image prompt tokens (an image uploaded to `images/edits`: the usage's
    /// `input_tokens_details.image_tokens`); `input_per_1m` when not set.
    pub image_input_per_1m: Option<f64>,
    /// USD per generated image by `quality`, then `size` (`hd: { 1024x1792: 0.12 }`);
    /// `per_image` is the price of what it does not list.
    pub image_sizes:
        Option<std::collections::BTreeMap<String, std::collections::BTreeMap<String, f64>>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteCacheCfg {
    pub ttl: Dur,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LimitsCfg {
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub max_parallel: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingCfg {
    #[serde(default = "default_retries")]
    pub retries: u32,
    #[serde(default = "default_timeout")]
    pub timeout: Dur,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Dur,
    #[serde(default = "default_first_token_timeout")]
    pub first_token_timeout: Dur,
    #[serde(default = "default_cooldown")]
    pub cooldown: Dur,
    #[serde(default = "default_allowed_fails")]
    pub allowed_fails: u32,
}

impl Default for RoutingCfg {
    fn default() -> Self {
        RoutingCfg {
            retries: default_retries(),
            timeout: default_timeout(),
            connect_timeout: default_connect_timeout(),
            first_token_timeout: default_first_token_timeout(),
            cooldown: default_cooldown(),
            allowed_fails: default_allowed_fails(),
        }
    }
}

fn default_retries() -> u32 {
    2
}
fn default_timeout() -> Dur {
    Dur(Duration::from_secs(120))
}
fn default_connect_timeout() -> Dur {
    Dur(Duration::from_secs(5))
}
fn default_first_token_timeout() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_cooldown() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_allowed_fails() -> u32 {
    3
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TeamCfg {
    pub budget: Option<BudgetCfg>,
    pub limits: Option<LimitsCfg>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    Daily,
    Weekly,
    Monthly,
    Total,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetCfg {
    pub usd: f64,
    pub period: Period,
    pub soft_usd: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyCfg {
    pub name: String,
    /// `sha256:<64 hex>`, or a `${VAR}` holding the plain key.
    pub key: Secret,
    pub team: Option<String>,
    /// Routes this key may use; absent: all.
    pub models: Option<Vec<String>>,
    pub limits: Option<LimitsCfg>,
    pub budget: Option<BudgetCfg>,
}

#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CacheScope {
    Global,
    #[default]
    Team,
    Key,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheCfg {
    #[serde(default = "default_cache_bytes")]
    pub max_bytes: ByteSize,
    #[serde(default)]
    pub scope: CacheScope,
}

impl Default for CacheCfg {
    fn default() -> Self {
        CacheCfg {
            max_bytes: default_cache_bytes(),
            scope: CacheScope::Team,
        }
    }
}

fn default_cache_bytes() -> ByteSize {
    ByteSize(256 << 20)
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AlertsCfg {
    pub webhook: Option<Secret>,
}

/// A duration written `500ms`, `30s`, `10m` or `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s)
            .map(Dur)
            .map_err(serde::de::Error::custom)
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (write e.g. 500ms, 30s, 10m, 1h)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "`{s}` is not a duration (write e.g. 500ms, 30s, 10m, 1h)"
            ))
        }
    };
    // Past this, deadlines (now + the duration) overflow the clock: every request panicked
    // on a `timeout` of 3,000,000,000,000,000h, and `from_secs_f64` itself on 1e20h.
    if !secs.is_finite() || secs > MAX_DURATION_SECS {
        return Err(format!(
            "`{s}` is longer than any duration the gateway keeps (at most 87600h, ten years)"
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Ten years: more than any timeout, cooldown or TTL needs.
const MAX_DURATION_SECS: f64 = 10.0 * 365.0 * 86_400.0;

/// A size written `64KiB`, `32MiB`, `1GiB` (or plain bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => parse_size(&s)
                .map(ByteSize)
                .map_err(serde::de::Error::custom),
        }
    }
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (write e.g. 64KiB, 32MiB)"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(format!("`{s}` is not a size (write e.g. 64KiB, 32MiB)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// A string that must never be printed: upstream keys, client keys, the admin key.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("fast").is_err());
        assert_eq!(parse_size("32MiB").unwrap(), 32 << 20);
        assert_eq!(parse_size("64KiB").unwrap(), 64 << 10);
        assert!(parse_size("lots").is_err());
    }
}
