//! `routes.yaml`: reading, typing and checking. Owns every rule about the file; the rest of the
//! gateway gets a `Loaded` value that already passed every check. Errors carry
//! `file:line:column`, and all of them are reported at once.

mod types;
pub mod yaml;

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use sha2::{Digest, Sha256};

pub use types::*;
use yaml::{path_string, EnvSource, Pos, Positions, Seg};

/// One finding about the config, with its place in the file.
#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub pos: Pos,
    pub message: String,
}

/// Every error found in one config file.
#[derive(Debug, Clone)]
pub struct ConfigErrors {
    pub file: String,
    pub errors: Vec<Diagnostic>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, e.pos.line, e.pos.col, e.message
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A config that passed every check, with what was derived while checking it.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub file: String,
    pub config: Config,
    /// SHA-256 of each client key, in the order of `config.keys`.
    pub key_hashes: Vec<[u8; 32]>,
    pub warnings: Vec<Diagnostic>,
}

impl Loaded {
    pub fn warning_lines(&self) -> Vec<String> {
        self.warnings
            .iter()
            .map(|w| {
                format!(
                    "{}:{}:{}: warning: {}",
                    self.file, w.pos.line, w.pos.col, w.message
                )
            })
            .collect()
    }
}

/// Reads a config file, taking `${VAR}` from the process environment.
pub fn load_file(path: &Path) -> Result<Loaded, ConfigErrors> {
    load_file_and_text(path).map(|(loaded, _)| loaded)
}

/// `load_file`, and the text it loaded (what a change of the file is compared with).
pub fn load_file_and_text(path: &Path) -> Result<(Loaded, String), ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
        file: path.display().to_string(),
        errors: vec![Diagnostic {
            pos: Pos { line: 1, col: 1 },
            message: format!("cannot read the config file: {e}"),
        }],
    })?;
    let loaded = load_text(path, &text)?;
    Ok((loaded, text))
}

/// The config file at `path` as `text` already read from it.
pub fn load_text(path: &Path, text: &str) -> Result<Loaded, ConfigErrors> {
    let env = |name: &str| std::env::var(name).ok();
    load_str(text, &path.display().to_string(), &env)
}

/// Parses and checks config text. `file` is only used in messages.
pub fn load_str(text: &str, file: &str, env: &dyn EnvSource) -> Result<Loaded, ConfigErrors> {
    let fail = |errors: Vec<Diagnostic>| ConfigErrors {
        file: file.to_string(),
        errors,
    };
    let (value, positions) = yaml::parse(text, env).map_err(|errs| {
        fail(
            errs.into_iter()
                .map(|e| Diagnostic {
                    pos: e.pos,
                    message: e.message,
                })
                .collect(),
        )
    })?;
    let config: Config = serde_path_to_error::deserialize(value.clone()).map_err(|e| {
        let mut path = seg_path(e.path());
        let mut inner = e.into_inner().to_string();
        // A provider is read by its `kind` (a tagged enum), which loses the path inside it:
        // read again as its kind's own type, to point at the field.
        if let [Seg::Key(top), Seg::Key(name)] = path.as_slice() {
            if top == "providers" {
                if let Some((sub, message)) = provider_error(&value["providers"][name]) {
                    path.extend(sub);
                    inner = message;
                }
            }
        }
        // A value from the environment may be a secret (an unquoted `${ADMIN_KEY}` of digits
        // reads as a number and fails as one): its type is said, never the value; and so
        // wherever serde's path stops short of the field, when a value under it came from
        // the environment.
        // (An unknown field's message names the field, never its value.)
        if positions.interpolated_under(&path) && unknown_field_name(&inner).is_none() {
            inner = without_quoted_value(&inner);
        }
        // Point an unknown field at the field itself, not at its parent.
        let pos = match unknown_field_name(&inner) {
            Some(name) if !path.ends_with(&[Seg::Key(name.clone())]) => {
                path.push(Seg::Key(name));
                positions.key(&path)
            }
            Some(_) => positions.key(&path),
            None => positions.value(&path),
        };
        let at = path_string(&path);
        let message = if at.is_empty() {
            inner
        } else {
            format!("{at}: {inner}")
        };
        fail(vec![Diagnostic { pos, message }])
    })?;
    let mut check = Checker {
        positions: &positions,
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let key_hashes = check.run(&config);
    if !check.errors.is_empty() {
        return Err(fail(check.errors));
    }
    Ok(Loaded {
        file: file.to_string(),
        config,
        key_hashes,
        warnings: check.warnings,
    })
}

fn seg_path(p: &serde_path_to_error::Path) -> Vec<Seg> {
    p.iter()
        .filter_map(|s| match s {
            serde_path_to_error::Segment::Seq { index } => Some(Seg::Index(*index)),
            serde_path_to_error::Segment::Map { key } => Some(Seg::Key(key.clone())),
            _ => None,
        })
        .collect()
}

/// Where in a provider's mapping, and what, its kind's own type refuses (`None` when the
/// kind itself is wrong or missing: serde's message for the whole provider says so).
fn provider_error(provider: &serde_json::Value) -> Option<(Vec<Seg>, String)> {
    let mut fields = provider.as_object()?.clone();
    let kind = fields.remove("kind")?;
    let fields = serde_json::Value::Object(fields);
    let err = match kind.as_str()? {
        "azure_openai" => serde_path_to_error::deserialize::<_, types::AzureCfg>(fields).err(),
        "openai" => serde_path_to_error::deserialize::<_, types::OpenAiCfg>(fields).err(),
        "mock" => serde_path_to_error::deserialize::<_, types::MockCfg>(fields).err(),
        _ => None,
    }?;
    Some((seg_path(err.path()), err.into_inner().to_string()))
}

/// serde's message with the first quoted value (`` `918273` `` or `"abc"`) replaced: "invalid
/// type: integer (the value from the environment), expected a string".
fn without_quoted_value(message: &str) -> String {
    let Some(open) = message.find(['`', '"']) else {
        return message.to_string();
    };
    let quote = message[open..].chars().next().unwrap_or('`');
    match message[open + 1..].find(quote) {
        Some(len) => format!(
            "{}(the value from the environment){}",
            &message[..open],
            &message[open + 1 + len + 1..]
        ),
        None => format!("{}(the value from the environment)", &message[..open]),
    }
}

fn unknown_field_name(msg: &str) -> Option<String> {
    let rest = msg.strip_prefix("unknown field `")?;
    Some(rest[..rest.find('`')?].to_string())
}

/// SHA-256 of a client key, as stored in `routes.yaml` (`sha256:<hex>`).
pub fn hash_key(plain: &str) -> [u8; 32] {
    Sha256::digest(plain.as_bytes()).into()
}

struct Checker<'a> {
    positions: &'a Positions,
    errors: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
}

fn p(segs: &[&str]) -> Vec<Seg> {
    segs.iter().map(|s| Seg::Key(s.to_string())).collect()
}

impl Checker<'_> {
    fn error(&mut self, path: &[Seg], message: impl Into<String>) {
        self.errors.push(Diagnostic {
            pos: self.positions.value(path),
            message: self.positions.without_env_values(message.into()),
        });
    }

    fn warn(&mut self, path: &[Seg], message: impl Into<String>) {
        self.warnings.push(Diagnostic {
            pos: self.positions.key(path),
            message: self.positions.without_env_values(message.into()),
        });
    }

    fn run(&mut self, c: &Config) -> Vec<[u8; 32]> {
        self.server(c);
        self.providers(c);
        self.routes(c);
        self.fallback_cycles(c);
        let hashes = self.keys(c);
        self.prices(c);
        self.money(c);
        hashes
    }

    fn server(&mut self, c: &Config) {
        if let Some(hook) = c.alerts.webhook.as_ref().filter(|h| !h.expose().is_empty()) {
            // Else every alert would fail later, with a log line that cannot say why.
            let ok = reqwest::Url::parse(hook.expose())
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
            if !ok {
                self.error(
                    &p(&["alerts", "webhook"]),
                    "alerts.webhook is not an http(s) URL",
                );
            }
        }
        if c.server.listen.parse::<std::net::SocketAddr>().is_err() {
            self.error(
                &p(&["server", "listen"]),
                format!(
                    "server.listen: `{}` is not an address like 0.0.0.0:8080",
                    c.server.listen
                ),
            );
        }
        if c.server.max_body.0 == 0 {
            self.error(
                &p(&["server", "max_body"]),
                "server.max_body must be larger than 0",
            );
        }
        if let Some(ledger) = c.state.ledger.as_ref().map(|l| l.expose()) {
            if !(ledger.starts_with("sqlite:") || crate::ledger::store::is_postgres(ledger)) {
                self.error(
                    &p(&["state", "ledger"]),
                    "state.ledger must be a sqlite:// or postgres:// URL",
                );
            } else if crate::ledger::store::in_memory_sqlite(ledger) {
                self.error(
                    &p(&["state", "ledger"]),
                    "state.ledger: an in-memory SQLite ledger would lose every row at exit; give a file (sqlite://PATH)",
                );
            } else if crate::ledger::store::is_postgres(ledger) {
                // What `serve` would refuse when it connects (an unknown `sslmode`, a bad
                // port), said here. sqlx's message names the part, not the URL's password.
                if let Err(e) =
                    <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(ledger)
                {
                    // sqlx wraps the cause twice, each time saying so: its innermost says it.
                    let mut cause: &dyn std::error::Error = &e;
                    while let Some(inner) = cause.source() {
                        cause = inner;
                    }
                    self.error(&p(&["state", "ledger"]), format!("state.ledger: {cause}"));
                }
            }
        }
        if let Some(redis) = c.state.redis.as_ref().map(|r| r.expose()) {
            let scheme_ok = redis.starts_with("redis://") || redis.starts_with("rediss://");
            // Parsing opens no connection; the redis crate's message does not echo the URL.
            if !scheme_ok || redis::Client::open(redis).is_err() {
                self.error(
                    &p(&["state", "redis"]),
                    "state.redis must be a redis:// or rediss:// URL (redis://[:password@]host:port[/db])",
                );
            }
        }
    }

    fn providers(&mut self, c: &Config) {
        /// `scheme://user:pw@host` as `scheme://***@host`, for a message: everything up to
        /// the last `@` goes (a password may hold `/`, `?` or `#`; what does not parse
        /// cannot say where it ends).
        fn without_userinfo(url: &str) -> String {
            let start = url.find("://").map_or(0, |i| i + 3);
            match url[start..].rfind('@') {
                Some(at) => format!("{}***{}", &url[..start], &url[start + at..]),
                None => url.to_string(),
            }
        }
        for (name, provider) in &c.providers {
            let version = match provider {
                ProviderCfg::AzureOpenai(a) => Some(a.api_version.as_str()),
                ProviderCfg::Openai(o) => o.api_version.as_deref(),
                ProviderCfg::Mock(_) => None,
            };
            // Put in the URL as it is written: nothing a query would read otherwise.
            if let Some(v) = version.filter(|v| {
                v.is_empty()
                    || !v
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
            }) {
                self.error(
                    &p(&["providers", name, "api_version"]),
                    format!(
                        "providers.{name}.api_version `{v}` must be letters, digits, `-`, `.` \
                         and `_` (e.g. 2024-10-21)"
                    ),
                );
            }
            let (field, url) = match provider {
                ProviderCfg::AzureOpenai(a) => ("endpoint", a.endpoint.as_str()),
                ProviderCfg::Openai(o) => ("base_url", o.base_url.as_str()),
                ProviderCfg::Mock(_) => continue,
            };
            let path = p(&["providers", name, field]);
            match reqwest::Url::parse(url) {
                // A password there would be sent nowhere (the key goes in `api_key`) and
                // would show wherever the URL is logged.
                Ok(u) if !u.username().is_empty() || u.password().is_some() => self.error(
                    &path,
                    format!(
                        "providers.{name}.{field} must not hold a user name or password \
                         (`user:password@`): put the upstream's key in `api_key`"
                    ),
                ),
                // The operation's path is added after it: a query or fragment would end up
                // before it (`…?key=x/chat/completions`), and a space makes no URL at all
                // (the parser takes it out silently).
                Ok(u)
                    if u.query().is_some()
                        || u.fragment().is_some()
                        || url.contains(|c: char| c.is_whitespace()) =>
                {
                    self.error(
                        &path,
                        format!(
                            "providers.{name}.{field} must be a base URL without spaces, query (`?…`) or fragment (`#…`); the operation's path is added to it"
                        ),
                    )
                }
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => self.error(
                    &path,
                    format!(
                        "providers.{name}.{field}: `{}` is not an http(s) URL",
                        without_userinfo(url)
                    ),
                ),
            }
        }
    }

    fn routes(&mut self, c: &Config) {
        if c.models.is_empty() {
            self.warn(
                &p(&["models"]),
                "no model routes: every request will get 404",
            );
        }
        if c.server.client_timeout.0.is_zero() {
            self.error(
                &p(&["server", "client_timeout"]),
                "server.client_timeout must be longer than 0: every request would time out at once",
            );
        }
        if c.state
            .replica_timeout
            .is_some_and(|d| d.0 < std::time::Duration::from_secs(5))
        {
            self.error(
                &p(&["state", "replica_timeout"]),
                "state.replica_timeout must be at least 5s: after Redis was away, a replica may take a few seconds to connect again and must not be taken for stopped meanwhile",
            );
        }
        let rt = &c.routing;
        for (field, d) in [
            ("timeout", rt.timeout),
            ("connect_timeout", rt.connect_timeout),
            ("first_token_timeout", rt.first_token_timeout),
        ] {
            if d.0.is_zero() {
                self.error(
                    &p(&["routing", field]),
                    format!("routing.{field} must be longer than 0: every attempt would time out at once"),
                );
            }
        }
        for (route, r) in &c.models {
            let base = p(&["models", route]);
            for (field, d) in [
                ("timeout", r.timeout),
                ("connect_timeout", r.connect_timeout),
                ("first_token_timeout", r.first_token_timeout),
            ] {
                if d.is_some_and(|d| d.0.is_zero()) {
                    self.error(
                        &p(&["models", route, field]),
                        format!("route `{route}`: {field} must be longer than 0: every attempt would time out at once"),
                    );
                }
            }
            if r.deployments.is_empty() {
                let mut path = base.clone();
                path.push(Seg::Key("deployments".into()));
                self.error(&path, format!("route `{route}` has no deployments"));
            }
            for (i, d) in r.deployments.iter().enumerate() {
                let mut path = base.clone();
                path.extend([Seg::Key("deployments".into()), Seg::Index(i)]);
                if !c.providers.contains_key(&d.provider) {
                    let mut pp = path.clone();
                    pp.push(Seg::Key("provider".into()));
                    self.error(
                        &pp,
                        format!(
                            "route `{route}`: unknown provider `{}`{}",
                            d.provider,
                            known(c.providers.keys())
                        ),
                    );
                }
                if !(d.weight.is_finite() && d.weight >= 0.0) {
                    let mut pp = path.clone();
                    pp.push(Seg::Key("weight".into()));
                    self.error(&pp, "weight must be a number >= 0");
                }
            }
            if !r.deployments.is_empty() && r.deployments.iter().all(|d| d.weight == 0.0) {
                let mut path = base.clone();
                path.push(Seg::Key("deployments".into()));
                self.error(
                    &path,
                    format!("route `{route}`: every deployment has weight 0"),
                );
            }
            for (list_name, list) in [
                ("fallbacks", &r.fallbacks),
                ("context_fallbacks", &r.context_fallbacks),
                ("content_filter_fallbacks", &r.content_filter_fallbacks),
            ] {
                for (i, target) in list.iter().enumerate() {
                    let mut path = base.clone();
                    path.extend([Seg::Key(list_name.into()), Seg::Index(i)]);
                    if target == route {
                        self.error(&path, format!("route `{route}` falls back to itself"));
                    } else if !c.models.contains_key(target) {
                        self.error(
                            &path,
                            format!("route `{route}`: {list_name} names unknown route `{target}`"),
                        );
                    }
                }
            }
        }
    }

    /// Fallback chains must end: a cycle (a -> b -> a) would bounce a failing request forever.
    fn fallback_cycles(&mut self, c: &Config) {
        let mut state: HashMap<&str, Visit> = HashMap::new();
        let mut trail = Vec::new();
        for route in c.models.keys() {
            self.visit(c, route, &mut state, &mut trail);
        }
    }

    fn visit<'c>(
        &mut self,
        c: &'c Config,
        route: &'c str,
        state: &mut HashMap<&'c str, Visit>,
        trail: &mut Vec<&'c str>,
    ) {
        if state.contains_key(route) {
            return;
        }
        let Some(r) = c.models.get(route) else { return };
        state.insert(route, Visit::OnPath);
        trail.push(route);
        for (list, targets) in [
            ("fallbacks", &r.fallbacks),
            ("context_fallbacks", &r.context_fallbacks),
            ("content_filter_fallbacks", &r.content_filter_fallbacks),
        ] {
            for (i, target) in targets.iter().enumerate() {
                if target == route || !c.models.contains_key(target) {
                    continue; // reported by `routes`
                }
                match state.get(target.as_str()) {
                    Some(Visit::OnPath) => {
                        let from = trail.iter().position(|t| t == target).unwrap_or(0);
                        let mut cycle = trail[from..].to_vec();
                        cycle.push(target);
                        let path = vec![
                            Seg::Key("models".into()),
                            Seg::Key(route.into()),
                            Seg::Key(list.into()),
                            Seg::Index(i),
                        ];
                        self.error(&path, format!("fallback cycle: {}", cycle.join(" -> ")));
                    }
                    Some(Visit::Done) => {}
                    None => self.visit(c, target, state, trail),
                }
            }
        }
        trail.pop();
        state.insert(route, Visit::Done);
    }

    /// Budgets and prices are money: none may be negative, a soft budget sits below its limit.
    fn money(&mut self, c: &Config) {
        let mut budgets: Vec<(Vec<Seg>, &BudgetCfg)> = Vec::new();
        if let Some(b) = &c.budget {
            budgets.push((p(&["budget"]), b));
        }
        for (n, t) in &c.teams {
            if let Some(b) = &t.budget {
                budgets.push((p(&["teams", n, "budget"]), b));
            }
        }
        for (i, k) in c.keys.iter().enumerate() {
            if let Some(b) = &k.budget {
                budgets.push((
                    vec![
                        Seg::Key("keys".into()),
                        Seg::Index(i),
                        Seg::Key("budget".into()),
                    ],
                    b,
                ));
            }
        }
        for (path, b) in budgets {
            if !(b.usd.is_finite() && b.usd >= 0.0) {
                self.error(&path, "a budget's `usd` must be a number >= 0");
            }
            if let Some(soft) = b.soft_usd {
                if !(soft.is_finite() && soft >= 0.0 && soft <= b.usd) {
                    self.error(&path, "`soft_usd` must be between 0 and the budget's `usd`");
                }
            }
        }
        let mut prices: Vec<(Vec<Seg>, &Pricing)> = Vec::new();
        for (route, r) in &c.models {
            if let Some(pr) = &r.pricing {
                prices.push((p(&["models", route, "pricing"]), pr));
            }
            for (i, d) in r.deployments.iter().enumerate() {
                if let Some(pr) = &d.pricing {
                    let mut path = p(&["models", route, "deployments"]);
                    path.extend([Seg::Index(i), Seg::Key("pricing".into())]);
                    prices.push((path, pr));
                }
            }
        }
        for (path, pr) in prices {
            let all = [
                Some(pr.input_per_1m),
                pr.cached_input_per_1m,
                Some(pr.output_per_1m),
                pr.per_image,
                pr.per_audio_second,
                pr.per_1m_characters,
                pr.audio_input_per_1m,
                pr.audio_output_per_1m,
                pr.image_input_per_1m,
            ];
            let sized = pr
                .image_sizes
                .iter()
                .flat_map(|t| t.values().flat_map(|s| s.values()));
            if all
                .iter()
                .flatten()
                .chain(sized)
                .any(|v| !(v.is_finite() && *v >= 0.0))
            {
                self.error(&path, "prices must be numbers >= 0");
            }
        }
    }

    fn keys(&mut self, c: &Config) -> Vec<[u8; 32]> {
        if c.keys.is_empty() {
            self.warn(
                &p(&["keys"]),
                "no `keys:`: the gateway serves without client authentication",
            );
        }
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut hashes: HashMap<[u8; 32], usize> = HashMap::new();
        let mut out = Vec::with_capacity(c.keys.len());
        for (i, k) in c.keys.iter().enumerate() {
            let base = vec![Seg::Key("keys".into()), Seg::Index(i)];
            let at = |f: &str| {
                let mut v = base.clone();
                v.push(Seg::Key(f.into()));
                v
            };
            if k.name.is_empty() {
                self.error(&at("name"), "a key needs a non-empty name");
            }
            if let Some(first) = names.insert(&k.name, i) {
                self.error(
                    &at("name"),
                    format!("duplicate key name `{}` (also keys[{first}])", k.name),
                );
            }
            let raw = k.key.expose();
            let hash = if let Some(hex_part) = raw.strip_prefix("sha256:") {
                let mut h = [0u8; 32];
                match hex::decode_to_slice(hex_part.trim(), &mut h) {
                    Ok(()) => Some(h),
                    Err(_) => {
                        self.error(
                            &at("key"),
                            format!(
                                "key `{}`: `sha256:` must be followed by 64 hex digits",
                                k.name
                            ),
                        );
                        None
                    }
                }
            } else if self.positions.was_interpolated(&at("key")) {
                if raw.is_empty() {
                    self.error(&at("key"), format!("key `{}`: the key is empty", k.name));
                    None
                } else {
                    Some(hash_key(raw))
                }
            } else {
                self.error(
                    &at("key"),
                    format!(
                        "key `{}`: a plain client key is refused; write `sha256:<hex>` \
                         (see `switchyard keys generate`) or `${{ENV_VAR}}`",
                        k.name
                    ),
                );
                None
            };
            let hash = hash.unwrap_or([0; 32]);
            if hash != [0; 32] {
                if let Some(first) = hashes.insert(hash, i) {
                    self.error(
                        &at("key"),
                        format!("key `{}` has the same secret as keys[{first}]", k.name),
                    );
                }
            }
            out.push(hash);
            if let Some(team) = &k.team {
                if !c.teams.contains_key(team) {
                    self.error(
                        &at("team"),
                        format!(
                            "key `{}`: unknown team `{team}`{}",
                            k.name,
                            known(c.teams.keys())
                        ),
                    );
                }
            }
            if let Some(models) = &k.models {
                for (j, m) in models.iter().enumerate() {
                    if !c.models.contains_key(m) {
                        let mut path = at("models");
                        path.push(Seg::Index(j));
                        self.error(&path, format!("key `{}`: unknown route `{m}`", k.name));
                    }
                }
            }
        }
        out
    }

    /// A route whose deployments have no price (no `pricing:`, no built-in entry) costs 0.
    fn prices(&mut self, c: &Config) {
        for (route, r) in &c.models {
            for (i, d) in r.deployments.iter().enumerate() {
                let provider_is_mock =
                    matches!(c.providers.get(&d.provider), Some(ProviderCfg::Mock(_)));
                let known = d.pricing.is_some()
                    || r.pricing.is_some()
                    || provider_is_mock
                    || match d.model.as_deref() {
                        Some(m) => crate::ledger::cost::builtin_price(m).is_some(),
                        None => crate::ledger::cost::builtin_price_by_name(
                            d.deployment.as_deref().unwrap_or(route),
                        )
                        .is_some(),
                    };
                if !known {
                    let mut path = p(&["models", route, "deployments"]);
                    path.push(Seg::Index(i));
                    self.warn(
                        &path,
                        match d.model.as_deref() {
                            Some(m) => format!(
                                "route `{route}`: no built-in price for model `{m}` of deployment `{}` (set `pricing:`); it costs 0",
                                d.deployment.as_deref().unwrap_or(route)
                            ),
                            None => format!(
                                "route `{route}`: no price for deployment `{}` (set `pricing:` or `model:`); it costs 0",
                                d.deployment.as_deref().unwrap_or(route)
                            ),
                        },
                    );
                }
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Visit {
    OnPath,
    Done,
}

fn known<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let names: Vec<&str> = names.map(|s| s.as_str()).collect();
    if names.is_empty() {
        String::new()
    } else {
        format!(" (known: {})", names.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn errors(text: &str) -> Vec<String> {
        match load_str(text, "routes.yaml", &no_env) {
            Ok(_) => vec![],
            Err(e) => e.to_string().lines().map(String::from).collect(),
        }
    }

    #[test]
    fn unknown_field_points_at_the_field() {
        let e = errors("providers:\n  demo:\n    kind: mock\nmodels:\n  m:\n    deployments:\n      - provider: demo\n        bogus: 1\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("routes.yaml:8:9: "), "{e:?}");
        assert!(e[0].contains("unknown field `bogus`"), "{e:?}");
    }

    #[test]
    fn semantic_errors_are_collected() {
        let text = "\
providers:
  demo: { kind: mock }
models:
  a:
    deployments: [ { provider: nope } ]
    fallbacks: [b]
  b:
    deployments: [ { provider: demo } ]
    fallbacks: [a]
keys:
  - { name: k, key: plain-secret }
  - { name: k, key: \"sha256:zz\" }
";
        let e = errors(text);
        assert!(
            e.iter()
                .any(|l| l.starts_with("routes.yaml:5:32: ")
                    && l.contains("unknown provider `nope`")),
            "{e:?}"
        );
        assert!(
            e.iter().any(|l| l.contains("fallback cycle: a -> b -> a")),
            "{e:?}"
        );
        assert!(
            e.iter().any(|l| l.starts_with("routes.yaml:11:21: ")
                && l.contains("plain client key is refused")),
            "{e:?}"
        );
        assert!(
            e.iter().any(|l| l.contains("duplicate key name `k`")),
            "{e:?}"
        );
        assert!(e.iter().any(|l| l.contains("64 hex digits")), "{e:?}");
    }

    #[test]
    fn env_keys_are_hashed_and_unset_vars_named() {
        let text = "providers: { demo: { kind: mock } }\nmodels: { m: { deployments: [ { provider: demo } ] } }\nkeys:\n  - { name: k, key: \"${CLIENT_KEY}\" }\n";
        let env = |n: &str| (n == "CLIENT_KEY").then(|| "sk-abc".to_string());
        let loaded = load_str(text, "f.yaml", &env).unwrap();
        assert_eq!(loaded.key_hashes[0], hash_key("sk-abc"));
        let e = errors(text);
        assert_eq!(
            e,
            vec!["f.yaml:4:21: environment variable `CLIENT_KEY` is not set"
                .replace("f.yaml", "routes.yaml")]
        );
    }

    #[test]
    fn an_in_memory_ledger_is_refused_a_file_is_not() {
        let config = |ledger: &str| {
            format!("state: {{ ledger: \"{ledger}\" }}\nproviders: {{ demo: {{ kind: mock }} }}\nmodels: {{ m: {{ deployments: [ {{ provider: demo }} ] }} }}\n")
        };
        for memory in [
            "sqlite::memory:",
            "sqlite://:memory:",
            "sqlite://x.db?mode=memory",
        ] {
            let e = errors(&config(memory));
            assert!(
                e.len() == 1 && e[0].contains("in-memory SQLite ledger would lose every row"),
                "{memory}: {e:?}"
            );
        }
        assert_eq!(errors(&config("sqlite://ledger.db")), Vec::<String>::new());
    }

    #[test]
    fn bad_kind_and_bad_duration() {
        let e = errors("providers:\n  x: { kind: grpc }\n");
        assert!(
            e[0].contains("providers.x") && e[0].contains("grpc"),
            "{e:?}"
        );
        let e = errors("routing:\n  timeout: soon\n");
        assert!(
            e[0].starts_with("routes.yaml:2:12: routing.timeout:"),
            "{e:?}"
        );
    }
}
