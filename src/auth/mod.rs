//! Client keys and the admin key. Keys are only ever held as SHA-256 hashes; the presented
//! key is hashed once per request and looked up. Nothing here logs or returns a key.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use http::HeaderMap;

use crate::config::{hash_key, Loaded};
use crate::error::GatewayError;
use crate::Name;

/// Azure's key header, made once (a `&str` name is parsed on every lookup).
const API_KEY: http::HeaderName = http::HeaderName::from_static("api-key");

/// A client key as the rest of the gateway sees it: a name, never the secret.
#[derive(Debug)]
pub struct ClientKey {
    pub name: Name,
    pub team: Option<Name>,
    /// Routes this key may use; `None`: all.
    pub routes: Option<HashSet<String>>,
}

impl ClientKey {
    pub fn may_use(&self, route: &str) -> bool {
        self.routes.as_ref().is_none_or(|r| r.contains(route))
    }
}

pub struct KeyTable {
    by_hash: HashMap<[u8; 32], Arc<ClientKey>>,
    /// No `keys:` in the config: every request is let in (and start-up says so loudly).
    open: Arc<ClientKey>,
    admin: Option<[u8; 32]>,
}

/// The presented credential: `Authorization: Bearer KEY` or `api-key: KEY`.
fn presented(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get(API_KEY).and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        if !v.is_empty() {
            return Some(v);
        }
    }
    let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = v.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim())
        .filter(|k| !k.is_empty())
}

impl KeyTable {
    pub fn build(loaded: &Loaded) -> KeyTable {
        let by_hash = loaded
            .config
            .keys
            .iter()
            .zip(&loaded.key_hashes)
            .map(|(k, h)| {
                (
                    *h,
                    Arc::new(ClientKey {
                        name: k.name.as_str().into(),
                        team: k.team.as_deref().map(Name::from),
                        routes: k.models.as_ref().map(|m| m.iter().cloned().collect()),
                    }),
                )
            })
            .collect();
        let admin = loaded
            .config
            .server
            .admin_key
            .as_ref()
            .filter(|k| !k.is_empty())
            .map(|k| hash_key(k.expose()));
        KeyTable {
            by_hash,
            open: Arc::new(ClientKey {
                name: "anonymous".into(),
                team: None,
                routes: None,
            }),
            admin,
        }
    }

    pub fn is_open(&self) -> bool {
        self.by_hash.is_empty()
    }

    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Arc<ClientKey>, GatewayError> {
        if self.is_open() {
            return Ok(self.open.clone());
        }
        let Some(key) = presented(headers) else {
            return Err(GatewayError::invalid_api_key(
                "Missing API key: send it as `Authorization: Bearer KEY` or `api-key: KEY`.",
            ));
        };
        self.by_hash
            .get(&hash_key(key))
            .cloned()
            .ok_or_else(|| GatewayError::invalid_api_key("Incorrect API key provided."))
    }

    /// The admin API: off when no admin key is set, else the key must match.
    pub fn authenticate_admin(&self, headers: &HeaderMap) -> Result<(), GatewayError> {
        let Some(admin) = &self.admin else {
            return Err(GatewayError::not_found(
                "the admin API is off: set server.admin_key to turn it on",
            ));
        };
        match presented(headers) {
            Some(k) if constant_time_eq(&hash_key(k), admin) => Ok(()),
            Some(_) => Err(GatewayError::invalid_api_key(
                "Incorrect admin key provided.",
            )),
            None => Err(GatewayError::invalid_api_key(
                "Missing admin key: send it as `Authorization: Bearer KEY` or `api-key: KEY`.",
            )),
        }
    }
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A new random client key and the line that goes into `routes.yaml`.
pub fn generate_key() -> (String, String) {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rngs::OsRng;
    let body: String = (0..40)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    let key = format!("sk-sy-{body}");
    let hash = hex::encode(hash_key(&key));
    (key, format!("sha256:{hash}"))
}
