//! The exact-match response cache, in process (moka, bounded by bytes, a TTL per route).
//! Key: route, operation, the scope (team, key or global) and the request body in canonical
//! form (key order and number formatting do not matter) without `user`, `stream` and
//! `stream_options`. Only complete, successful answers are stored; a streamed answer is kept
//! as its events (replayed as they came), assembled into one JSON answer when a plain request
//! is served it.
//! Concurrent identical misses go upstream once: the first is the leader, the others wait
//! for its answer.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::ops::Range;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::api::Operation;
use crate::ledger::cost::Usage;
use crate::stream::sse;

pub type Key = [u8; 32];

/// Keys are SHA-256 digests, already uniform: their first 8 bytes are the hash (SipHash over
/// all 32 cost as much as the rest of a cache insert).
#[derive(Clone, Default)]
pub struct DigestHasher(u64);

impl std::hash::Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        if let Some(head) = bytes.first_chunk::<8>() {
            self.0 ^= u64::from_le_bytes(*head);
        } else {
            for b in bytes {
                self.0 = self.0.rotate_left(8) ^ u64::from(*b);
            }
        }
    }
}

type DigestState = std::hash::BuildHasherDefault<DigestHasher>;

/// A stored answer.
#[derive(Debug)]
pub struct Entry {
    /// The whole answer as one JSON body; empty for a streamed chat or completion answer,
    /// whose JSON is assembled from its events when a plain request is served it
    /// (`Entry::answer`).
    pub json: Bytes,
    /// The events of a streamed answer, as the upstream sent them (usage chunk included).
    pub events: Option<Vec<Bytes>>,
    pub usage: Usage,
    /// What the answer cost when it was fetched: what each hit saves.
    pub cost_usd: f64,
    pub ttl: Duration,
}

impl Entry {
    /// The answer as one JSON body: the stored one, or assembled from the stored events
    /// (`None` when they do not add up to one: served as a miss).
    pub fn answer(&self, op: Operation) -> Option<Bytes> {
        match &self.events {
            Some(events) if self.json.is_empty() => assemble(op, events),
            _ => Some(self.json.clone()),
        }
    }

    /// What an entry occupies, as near as can be told: its bytes, 48 per kept event (the
    /// `Bytes` handle and its allocation's header), and 640 for the entry itself, its key and
    /// moka's bookkeeping (hash table slot, LRU and timer-wheel nodes). Counting the payload
    /// alone let a full cache take about twice `cache.max_bytes`; counting 512 for the rest
    /// let a full cache of small answers take 10-20% more (measured: 8 MiB of 300-byte answers
    /// in 10,292 entries added 9.2-10.1 MB to the process, 600-680 bytes each beyond the JSON).
    fn weight(&self) -> u32 {
        let events: usize = self.events.iter().flatten().map(|e| e.len() + 48).sum();
        u32::try_from(self.json.len() + events + Self::MIN_WEIGHT as usize).unwrap_or(u32::MAX)
    }

    /// What an entry weighs besides its bytes: no entry weighs less.
    const MIN_WEIGHT: u32 = 640;
}

/// The keys asked for lately, as a Bloom filter over their digests (three bits per key, about
/// eight bits for every entry the cache can hold, so about 3% of new keys pass for seen),
/// cleared after as many new keys as the cache can hold entries: TinyLFU's doorkeeper. Lock
/// free; a lost race marks a key twice or misses one mark, which costs nothing but one more
/// offer or one refusal.
struct Doorkeeper {
    bits: Box<[std::sync::atomic::AtomicU64]>,
    /// Bits in `bits`, less one (a power of two less one).
    mask: u32,
    /// New keys marked since the last reset, and how many make a reset.
    marked: std::sync::atomic::AtomicU64,
    reset_after: u64,
}

impl Doorkeeper {
    fn new(entries: u64) -> Doorkeeper {
        let entries = entries.max(1);
        let bits = (entries.saturating_mul(8))
            .next_power_of_two()
            .clamp(1 << 12, 1 << 24);
        Doorkeeper {
            bits: (0..bits / 64)
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
            mask: (bits - 1) as u32,
            marked: std::sync::atomic::AtomicU64::new(0),
            reset_after: entries,
        }
    }

    /// Marks `key` asked for; whether it was already marked.
    fn saw(&self, key: &Key) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let mut seen = true;
        // The digest's first 8 bytes are moka's hash; these are independent of it.
        for probe in key[8..20].chunks_exact(4) {
            let bit = u32::from_le_bytes([probe[0], probe[1], probe[2], probe[3]]) & self.mask;
            let mask = 1u64 << (bit % 64);
            let before = self.bits[(bit / 64) as usize].fetch_or(mask, Relaxed);
            seen &= before & mask != 0;
        }
        if !seen && self.marked.fetch_add(1, Relaxed) + 1 >= self.reset_after {
            self.marked.store(0, Relaxed);
            for w in self.bits.iter() {
                w.store(0, Relaxed);
            }
        }
        seen
    }
}

struct PerEntryTtl;

impl moka::Expiry<Key, Arc<Entry>> for PerEntryTtl {
    fn expire_after_create(&self, _k: &Key, v: &Arc<Entry>, _now: Instant) -> Option<Duration> {
        Some(v.ttl)
    }

    /// A replaced entry lives its own TTL, not what was left of the old one's.
    fn expire_after_update(
        &self,
        _k: &Key,
        v: &Arc<Entry>,
        _now: Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.ttl)
    }
}

/// How a leader's fetch ended, for those waiting on it.
#[derive(Clone)]
enum Outcome {
    Stored(Arc<Entry>),
    /// Answered, but not cacheable: the waiters fetch their own, all at once.
    NotStored,
    /// Failed: one waiter tries again for the others (a failing upstream is not flooded).
    Failed,
}

type Waiting = watch::Receiver<Option<Outcome>>;

pub struct Cache {
    store: moka::sync::Cache<Key, Arc<Entry>, DigestState>,
    /// The keys asked for lately (`Doorkeeper`): a full cache takes in only what was asked
    /// for before.
    doorkeeper: Doorkeeper,
    in_flight: Mutex<HashMap<Key, Waiting, DigestState>>,
    /// The second tier, shared by replicas (`state.redis`).
    redis: Option<RedisTier>,
}

/// Entries in Redis, under the same keys; Redis being away makes lookups misses.
struct RedisTier {
    client: redis::Client,
    conn: Arc<arc_swap::ArcSwapOption<redis::aio::MultiplexedConnection>>,
    connecting: Arc<std::sync::atomic::AtomicBool>,
}

/// How long a lookup may wait on Redis before it counts as a miss.
const REDIS_WAIT: Duration = Duration::from_millis(250);

#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    json: String,
    events: Option<Vec<String>>,
    prompt: u64,
    cached: u64,
    completion: u64,
    cost_usd: f64,
}

impl RedisTier {
    fn conn(&self) -> Option<redis::aio::MultiplexedConnection> {
        let c = self.conn.load_full().map(|c| (*c).clone());
        if c.is_none() {
            self.reconnect();
        }
        c
    }

    fn reconnect(&self) {
        use std::sync::atomic::Ordering;
        self.conn.store(None);
        if self.connecting.swap(true, Ordering::AcqRel) {
            return;
        }
        let (client, slot, flag) = (
            self.client.clone(),
            self.conn.clone(),
            self.connecting.clone(),
        );
        tokio::spawn(async move {
            let c = tokio::time::timeout(
                Duration::from_secs(2),
                client.get_multiplexed_async_connection(),
            )
            .await;
            if let Ok(Ok(c)) = c {
                slot.store(Some(Arc::new(c)));
            } else {
                // Not yet: the next lookup tries again, at most every half second.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            flag.store(false, Ordering::Release);
        });
    }

    /// `v2`: a streamed answer's JSON is no longer stored beside its events (a replica of
    /// before would serve it empty), so the two versions keep their entries apart.
    fn key(key: &Key) -> String {
        let mut s = String::from("{switchyard}:cache:v2:");
        for b in key {
            let _ = write!(s, "{b:02x}");
        }
        s
    }

    async fn get(&self, key: &Key) -> Option<Entry> {
        let mut conn = self.conn()?;
        let k = Self::key(key);
        let got: Result<Result<(Option<String>, i64), redis::RedisError>, _> =
            tokio::time::timeout(
                REDIS_WAIT,
                redis::pipe().get(&k).pttl(&k).query_async(&mut conn),
            )
            .await;
        let (raw, pttl) = match got {
            Ok(Ok((Some(raw), pttl))) => (raw, pttl),
            Ok(Ok((None, _))) => return None,
            _ => {
                crate::telemetry::metrics::state_error("cache_get");
                self.reconnect();
                return None;
            }
        };
        let s: Stored = serde_json::from_str(&raw).ok()?;
        Some(Entry {
            json: Bytes::from(s.json),
            events: s.events.map(|e| e.into_iter().map(Bytes::from).collect()),
            usage: Usage {
                prompt: s.prompt,
                cached: s.cached,
                completion: s.completion,
                ..Default::default()
            },
            cost_usd: s.cost_usd,
            // The rest of its life in Redis.
            ttl: Duration::from_millis(pttl.max(1) as u64),
        })
    }

    fn put(&self, key: &Key, e: &Entry) {
        let slot = self.conn.clone();
        if slot.load().is_none() {
            self.reconnect();
        }
        let events = e.events.as_ref().map(|evs| {
            evs.iter()
                .map(|b| String::from_utf8(b.to_vec()))
                .collect::<Result<Vec<_>, _>>()
        });
        let (Ok(json), events) = (String::from_utf8(e.json.to_vec()), events) else {
            return;
        };
        let events = match events {
            Some(Ok(v)) => Some(v),
            Some(Err(_)) => return,
            None => None,
        };
        let stored = Stored {
            json,
            events,
            prompt: e.usage.prompt,
            cached: e.usage.cached,
            completion: e.usage.completion,
            cost_usd: e.cost_usd,
        };
        let Ok(raw) = serde_json::to_string(&stored) else {
            return;
        };
        let k = Self::key(key);
        let ttl = e.ttl.as_millis().max(1) as u64;
        tokio::spawn(async move {
            // A connection being made is worth a short wait; a missing Redis is not.
            let mut conn = None;
            for _ in 0..20 {
                if let Some(c) = slot.load_full() {
                    conn = Some((*c).clone());
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let Some(mut conn) = conn else {
                crate::telemetry::metrics::state_error("cache_set");
                return;
            };
            let r: Result<Result<(), redis::RedisError>, _> = tokio::time::timeout(
                Duration::from_secs(2),
                redis::cmd("SET")
                    .arg(&k)
                    .arg(raw)
                    .arg("PX")
                    .arg(ttl)
                    .query_async(&mut conn),
            )
            .await;
            if !matches!(r, Ok(Ok(()))) {
                crate::telemetry::metrics::state_error("cache_set");
            }
        });
    }
}

/// What a request does about the cache.
pub enum Lookup {
    Hit(Arc<Entry>),
    /// Fetch it, then store it (and wake those waiting).
    Lead(Leader),
}

/// The request that fetches an answer others wait for. Dropped without `store`, it tells
/// the others to fetch their own.
pub struct Leader {
    cache: Arc<Cache>,
    key: Key,
    tx: Option<watch::Sender<Option<Outcome>>>,
    /// This leader registered the key as in flight (and must take it out again).
    registered: bool,
    /// The key was asked for before this request, since the doorkeeper's last reset.
    asked_before: bool,
}

impl Leader {
    pub fn store(mut self, entry: Entry) {
        // Bigger than the whole cache: moka would take it in and push it out again a moment
        // later, serving it in between (for seconds when nothing else touches the cache).
        // Those waiting for it still get it.
        let too_big = self
            .cache
            .store
            .policy()
            .max_capacity()
            .is_some_and(|cap| u64::from(entry.weight()) > cap);
        if too_big {
            if let Some(m) = crate::telemetry::metrics::metrics() {
                m.cache_declined.inc();
            }
            self.tell(Outcome::Stored(Arc::new(entry)));
            return;
        }
        if let Some(r) = &self.cache.redis {
            r.put(&self.key, &entry);
        }
        let entry = Arc::new(entry);
        // A full cache takes in a newcomer only if it is asked for more often than what it
        // would push out (moka's TinyLFU admission), which one asked for the first time never
        // is: such an answer is not offered at all. Offered, moka would put it in its table,
        // weigh it against the oldest entries and take it out again, the most expensive miss
        // there is when every request is new.
        if self.asked_before || self.cache.has_room(entry.weight()) {
            self.cache.store.insert(self.key, entry.clone());
        } else if let Some(m) = crate::telemetry::metrics::metrics() {
            m.cache_declined.inc();
        }
        self.tell(Outcome::Stored(entry));
    }

    /// Whether `store` would decline an answer of `bytes` bytes (the upstream's bytes, JSON
    /// or events: an entry made of them weighs at least that plus `Entry::MIN_WEIGHT`) now:
    /// no room for it, a key not asked for before, no Redis tier to put it in, and nobody
    /// waiting for it. The caller then need not make the entry (a stream's events are split
    /// for the cache alone) and calls `declined`. A request that
    /// starts waiting after this is told to fetch its own, as for any answer not stored.
    pub fn would_decline(&self, bytes: usize) -> bool {
        let at_least = u32::try_from(bytes)
            .unwrap_or(u32::MAX)
            .saturating_add(Entry::MIN_WEIGHT);
        let nobody_waiting = self.tx.as_ref().is_none_or(|tx| tx.receiver_count() <= 1);
        self.cache.redis.is_none()
            && !self.asked_before
            && nobody_waiting
            && !self.cache.has_room(at_least)
    }

    /// The answer is not stored because `would_decline` said so.
    pub fn declined(self) {
        if let Some(m) = crate::telemetry::metrics::metrics() {
            m.cache_declined.inc();
        }
        self.not_stored();
    }

    /// The answer came but is not to be stored.
    pub fn not_stored(mut self) {
        self.tell(Outcome::NotStored);
    }

    /// Takes the key out of the in-flight map, then tells those waiting. Out of the map
    /// first: the map's own receiver goes with it, so with nobody waiting (the usual case)
    /// the send finds no receiver and wakes nothing.
    fn tell(&mut self, outcome: Outcome) {
        if std::mem::take(&mut self.registered) {
            if let Ok(mut m) = self.cache.in_flight.lock() {
                m.remove(&self.key);
            }
        }
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Some(outcome));
        }
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        self.tell(Outcome::Failed);
    }
}

impl Cache {
    /// `presize`: make the hash table for the most entries `max_bytes` can hold at once
    /// (see below), for a config whose routes cache; else it starts small and grows.
    pub fn new(
        max_bytes: u64,
        redis_url: Option<&str>,
        presize: bool,
    ) -> Result<Arc<Cache>, String> {
        let redis = match redis_url {
            None => None,
            Some(url) => {
                let tier = RedisTier {
                    client: crate::provider::tls::redis_client(url)?,
                    conn: Arc::new(arc_swap::ArcSwapOption::empty()),
                    connecting: Arc::new(std::sync::atomic::AtomicBool::new(false)),
                };
                tier.reconnect();
                Some(tier)
            }
        };
        // The most entries `max_bytes` can hold (each weighs at least `MIN_WEIGHT`).
        let most_entries = max_bytes / u64::from(Entry::MIN_WEIGHT);
        // moka's hash table probes linearly and grows only when 70% of its slots hold
        // entries, and what it evicts leaves tombstones until they take 10% more. A full
        // cache that turns its entries over (every answer new, as in bench/) sat in that band
        // (about 7,500 entries in 16,384 slots), where a lookup that misses follows a long run
        // of slots, each a pointer to chase: with 32 streams after a full cache, its lookups
        // took 6.5-7.1% of the gateway's CPU (perf, 3 recordings), 2.7-2.8% with the table
        // made for `most_entries` (two slots each, so at most half full of entries), 2.3% with
        // twice that. The table's slots are 8 bytes: 16-32 bytes per 640 of `max_bytes`
        // (2.5-5%; 8 MiB for the default 256 MiB), made and zeroed at start.
        let mut store = moka::sync::Cache::builder().max_capacity(max_bytes);
        if presize {
            store = store.initial_capacity(usize::try_from(most_entries).unwrap_or(usize::MAX));
        }
        Ok(Arc::new(Cache {
            redis,
            doorkeeper: Doorkeeper::new(most_entries),
            store: store
                .weigher(|_k: &Key, v: &Arc<Entry>| v.weight())
                .expire_after(PerEntryTtl)
                .build_with_hasher(DigestState::default()),
            in_flight: Mutex::new(HashMap::default()),
        }))
    }

    /// A hit; or, when the same request is already being fetched, its answer once it comes
    /// (up to `wait`); or the lead, to fetch it.
    pub async fn lookup(self: &Arc<Self>, key: Key, wait: Duration) -> Lookup {
        loop {
            if let Some(e) = self.store.get(&key) {
                return Lookup::Hit(e);
            }
            if let Some(r) = &self.redis {
                if let Some(e) = r.get(&key).await {
                    let e = Arc::new(e);
                    self.store.insert(key, e.clone());
                    return Lookup::Hit(e);
                }
            }
            let waiting = {
                let Ok(mut m) = self.in_flight.lock() else {
                    return Lookup::Lead(self.leader(key, None));
                };
                match m.get(&key) {
                    Some(rx) => Some(rx.clone()),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        m.insert(key, rx);
                        drop(m);
                        return Lookup::Lead(self.leader(key, Some(tx)));
                    }
                }
            };
            let Some(mut rx) = waiting else { continue };
            match tokio::time::timeout(wait, rx.changed()).await {
                Ok(Ok(())) => {
                    let outcome = rx.borrow().clone();
                    match outcome {
                        Some(Outcome::Stored(e)) => return Lookup::Hit(e),
                        // Not cacheable: everyone fetches their own, at once.
                        Some(Outcome::NotStored) => return Lookup::Lead(self.leader(key, None)),
                        // Failed: loop; one waiter becomes the leader, the others wait for it.
                        Some(Outcome::Failed) | None => {}
                    }
                }
                // The leader went away, or takes too long: fetch it without waiting more.
                Ok(Err(_)) => {}
                Err(_) => return Lookup::Lead(self.leader(key, None)),
            }
        }
    }

    /// `(bytes, entries)` held in process, bytes as counted against `cache.max_bytes`
    /// (moka's bookkeeping brought up to date first).
    pub fn size(&self) -> (u64, u64) {
        self.store.run_pending_tasks();
        (self.store.weighted_size(), self.store.entry_count())
    }

    /// The lead without a lookup (`Cache-Control: no-cache`): fetch, then store. Its answer
    /// is always offered, full cache or not: it replaces what the cache may hold for the key.
    pub fn store_only(self: &Arc<Self>, key: Key) -> Leader {
        let mut leader = self.leader(key, None);
        leader.asked_before = true;
        leader
    }

    fn leader(self: &Arc<Self>, key: Key, tx: Option<watch::Sender<Option<Outcome>>>) -> Leader {
        Leader {
            cache: self.clone(),
            asked_before: self.doorkeeper.saw(&key),
            key,
            registered: tx.is_some(),
            tx,
        }
    }

    /// Whether an answer of `weight` fits without pushing another out (as far as moka has
    /// settled its size).
    fn has_room(&self, weight: u32) -> bool {
        let max = self.store.policy().max_capacity().unwrap_or(u64::MAX);
        self.store.weighted_size() + u64::from(weight) <= max
    }
}

/// The cache key of a request, or `None` when the body is not JSON. The scope is given in
/// parts (`["key:", name]`), hashed as if joined.
pub fn key(route: &str, op: Operation, scope: &[&str], body: &[u8]) -> Option<Key> {
    let mut canonical = Vec::with_capacity(body.len());
    let mut reader = Canonical {
        text: body,
        at: 0,
        depth: 0,
        members: Vec::new(),
        scratch: Vec::new(),
    };
    reader.value(&mut canonical, true)?;
    reader.space();
    if reader.at != body.len() {
        return None;
    }
    let mut h = Sha256::new();
    for part in [route, op.path()] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    for part in scope {
        h.update(part.as_bytes());
    }
    h.update([0]);
    h.update(&canonical);
    Some(h.finalize().into())
}

/// A JSON string as serde_json writes it: as it came when it has no escapes (the usual case).
fn write_string(s: &str, out: &mut Vec<u8>) {
    if s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        out.extend_from_slice(serde_json::to_string(s).unwrap_or_default().as_bytes());
    } else {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
}

/// How deep a body's objects and arrays may nest to be cached (serde_json's own limit): each
/// level is a call on the stack, and a body of 10,000 `[` overflowed it (the process
/// aborted). A deeper body is not cached; it goes upstream as any other.
const MAX_DEPTH: u32 = 128;

/// Writes JSON canonically in one pass over the text: sorted keys, no whitespace, one
/// spelling per number (`1`, `1.0` and `1e0` are the same) and per string (escapes decoded).
/// An object's members are written as they come, then reordered in place when their keys
/// were not in order. At the top level, `user`, `stream` and `stream_options` are left out
/// (they do not change the answer). `None` for anything that is not JSON.
struct Canonical<'a> {
    text: &'a [u8],
    at: usize,
    /// The members of the objects being read, innermost last: each object's key (decoded)
    /// and where its `"key":value` text sits in the output. One stack for all levels.
    /// Objects and arrays open around the value being read (`MAX_DEPTH` at most).
    depth: u32,
    members: Vec<(Cow<'a, str>, Range<usize>)>,
    /// A copy of an object's members while they are written again in key order.
    scratch: Vec<u8>,
}

impl<'a> Canonical<'a> {
    fn space(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.text.get(self.at) {
            self.at += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        self.space();
        (self.text.get(self.at) == Some(&byte)).then(|| self.at += 1)
    }

    fn value(&mut self, out: &mut Vec<u8>, top: bool) -> Option<()> {
        self.space();
        match self.text.get(self.at)? {
            b'{' | b'[' if self.depth >= MAX_DEPTH => None,
            b'{' => {
                self.depth += 1;
                let r = self.object(out, top);
                self.depth -= 1;
                r
            }
            b'[' => {
                self.depth += 1;
                let r = self.array(out);
                self.depth -= 1;
                r
            }
            b'"' => {
                let (raw, escaped) = self.string()?;
                if escaped {
                    write_string(&serde_json::from_str::<String>(raw).ok()?, out);
                } else {
                    out.extend_from_slice(raw.as_bytes());
                }
                Some(())
            }
            b'-' | b'0'..=b'9' => self.number(out),
            _ => {
                for word in [&b"true"[..], b"false", b"null"] {
                    if self.text[self.at..].starts_with(word) {
                        self.at += word.len();
                        out.extend_from_slice(word);
                        return Some(());
                    }
                }
                None
            }
        }
    }

    /// A string with its quotes, and whether it holds an escape.
    fn string(&mut self) -> Option<(&'a str, bool)> {
        let start = self.at;
        let mut escaped = false;
        let mut i = start + 1;
        loop {
            i += memchr::memchr2(b'"', b'\\', self.text.get(i..)?)?;
            if self.text[i] == b'"' {
                break;
            }
            escaped = true;
            i += 2;
        }
        self.at = i + 1;
        let raw = &self.text[start..self.at];
        // Raw control characters are not JSON (serde_json refuses them too).
        if raw.iter().any(|b| *b < 0x20) {
            return None;
        }
        Some((std::str::from_utf8(raw).ok()?, escaped))
    }

    fn number(&mut self, out: &mut Vec<u8>) -> Option<()> {
        let start = self.at;
        while let Some(b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') = self.text.get(self.at) {
            self.at += 1;
        }
        let n: serde_json::Number = serde_json::from_slice(&self.text[start..self.at]).ok()?;
        let mut digits = itoa::Buffer::new();
        if let Some(i) = n.as_i64() {
            out.extend_from_slice(digits.format(i).as_bytes());
        } else if let Some(u) = n.as_u64() {
            out.extend_from_slice(digits.format(u).as_bytes());
        } else {
            let f = n.as_f64().unwrap_or(0.0);
            if f.fract() == 0.0 && f.abs() < 9.0e15 {
                out.extend_from_slice(digits.format(f as i64).as_bytes());
            } else {
                let _ = write!(out, "{f}");
            }
        }
        Some(())
    }

    fn array(&mut self, out: &mut Vec<u8>) -> Option<()> {
        self.at += 1;
        out.push(b'[');
        if self.eat(b']').is_none() {
            loop {
                self.value(out, false)?;
                if self.eat(b',').is_some() {
                    out.push(b',');
                    continue;
                }
                self.eat(b']')?;
                break;
            }
        }
        out.push(b']');
        Some(())
    }

    fn object(&mut self, out: &mut Vec<u8>, top: bool) -> Option<()> {
        self.at += 1;
        out.push(b'{');
        let first = out.len();
        // This object's members are `self.members[base..]` (nested objects push theirs
        // above and take them off again before this one adds its next).
        let base = self.members.len();
        if self.eat(b'}').is_none() {
            loop {
                self.space();
                if self.text.get(self.at) != Some(&b'"') {
                    return None;
                }
                let (raw, escaped) = self.string()?;
                let name: Cow<'a, str> = if escaped {
                    Cow::Owned(serde_json::from_str(raw).ok()?)
                } else {
                    Cow::Borrowed(&raw[1..raw.len() - 1])
                };
                self.eat(b':')?;
                let before = out.len();
                if self.members.len() > base {
                    out.push(b',');
                }
                let start = out.len();
                write_string(&name, out);
                out.push(b':');
                self.value(out, false)?;
                if top && matches!(&*name, "user" | "stream" | "stream_options") {
                    out.truncate(before);
                } else {
                    self.members.push((name, start..out.len()));
                }
                if self.eat(b',').is_some() {
                    continue;
                }
                self.eat(b'}')?;
                break;
            }
        }
        // Members not in key order (a stable sort, as the members came when keys repeat):
        // written again from a copy, in order.
        let members = &mut self.members[base..];
        if members.windows(2).any(|w| w[0].0 > w[1].0) {
            self.scratch.clear();
            self.scratch.extend_from_slice(&out[first..]);
            out.truncate(first);
            members.sort_by(|a, b| a.0.cmp(&b.0));
            for (i, (_, range)) in members.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(&self.scratch[range.start - first..range.end - first]);
            }
        }
        self.members.truncate(base);
        out.push(b'}');
        Some(())
    }
}

/// What `Cache-Control` asks: `(look up, store)`.
pub fn directives(headers: &http::HeaderMap) -> (bool, bool) {
    let mut lookup = true;
    let mut store = true;
    for v in headers.get_all(http::header::CACHE_CONTROL) {
        for d in v.to_str().unwrap_or("").split(',') {
            match d.trim().to_ascii_lowercase().as_str() {
                "no-cache" => lookup = false,
                "no-store" => {
                    lookup = false;
                    store = false;
                }
                _ => {}
            }
        }
    }
    (lookup, store)
}

/// Splits chunks into events (each ending with its blank line).
pub fn split_events(chunks: &[Bytes]) -> Vec<Bytes> {
    let mut out = Vec::with_capacity(chunks.len());
    for c in chunks {
        let mut start = 0;
        for end in sse::event_ends(c) {
            out.push(c.slice(start..end));
            start = end;
        }
        if start < c.len() {
            out.push(c.slice(start..));
        }
    }
    out
}

/// Whether a stream's events may be stored: they end properly (`[DONE]`) and no event
/// names an `error` (an error event; any `"error":` member, however nested, counts, so a
/// stream is rather not stored than stored wrong). Read without parsing a single event:
/// whether they add up to one JSON answer is found when a plain request is served them
/// (`Entry::answer`), not for every stream stored.
pub fn stream_storable(events: &[Bytes]) -> bool {
    static ERROR: LazyLock<memchr::memmem::Finder<'static>> =
        LazyLock::new(|| memchr::memmem::Finder::new(b"\"error\""));
    let mut done = false;
    for data in sse::data_until_done(events, &mut done) {
        // A member `"error": null` (some servers send one in every chunk) is no error; an
        // `"error"` that is no member's name (a string's value) is none either.
        for at in ERROR.find_iter(&data) {
            let rest = data[at + 7..].trim_ascii_start();
            if let Some(value) = rest.strip_prefix(b":") {
                if !value.trim_ascii_start().starts_with(b"null") {
                    return false;
                }
            }
        }
    }
    done
}

/// The one JSON answer a complete stream adds up to; `None` when the stream did not end
/// properly (no `[DONE]` / `response.completed`, or an error event). Every member is kept
/// as the upstream's own plain answer would have it: the first event's (or a later one's,
/// for what the first lacks: Azure's `prompt_filter_results`, llama.cpp's `timings`); each
/// choice's deltas merged into its `message` (strings joined: `content`, `refusal`,
/// `reasoning_content`; arrays joined: `annotations`; tool calls by their index), its
/// `logprobs` joined, its last `finish_reason` and other members; the usage chunk's usage.
pub fn assemble(op: Operation, events: &[Bytes]) -> Option<Bytes> {
    let mut done = false;
    let mut top: Map<String, Value> = Map::new();
    let mut choices: Vec<Map<String, Value>> = Vec::new();
    let mut usage = Value::Null;
    // The first value that says something: Azure's first event has an empty `id` and
    // `model` and a `created` of 0, the next ones the real ones.
    let says_nothing = |x: &Value| x.is_null() || x.as_str() == Some("") || x.as_u64() == Some(0);
    for data in sse::data_until_done(events, &mut done) {
        let Value::Object(mut v) = serde_json::from_slice::<Value>(&data).ok()? else {
            return None;
        };
        if v.get("error").is_some_and(|e| !e.is_null()) {
            return None;
        }
        if op == Operation::Responses {
            if v.get("type").and_then(Value::as_str) == Some("response.completed") {
                let response = v.remove("response")?;
                return Some(Bytes::from(response.to_string()));
            }
            continue;
        }
        if let Some(u) = v.remove("usage").filter(Value::is_object) {
            usage = u;
        }
        match v.remove("choices") {
            None | Some(Value::Null) => {}
            Some(Value::Array(cs)) => {
                for c in cs {
                    let Value::Object(c) = c else { return None };
                    let idx = c.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
                    // No upstream sends more choices than `n` allows (128).
                    if idx >= MAX_CHOICES {
                        return None;
                    }
                    while choices.len() <= idx {
                        choices.push(Map::new());
                    }
                    merge_choice(&mut choices[idx], c, op)?;
                }
            }
            Some(_) => return None,
        }
        for (k, val) in v {
            if matches!(k.as_str(), "object" | "obfuscation") {
                continue;
            }
            match top.get(&k) {
                Some(old) if !says_nothing(old) => {}
                Some(_) if says_nothing(&val) => {}
                _ => {
                    top.insert(k, val);
                }
            }
        }
    }
    if !done {
        return None;
    }
    let object = if op == Operation::ChatCompletions {
        "chat.completion"
    } else {
        "text_completion"
    };
    let mut out = Map::new();
    if let Some(id) = top.remove("id") {
        out.insert("id".into(), id);
    }
    out.insert("object".into(), json!(object));
    for k in ["created", "model"] {
        if let Some(v) = top.remove(k) {
            out.insert(k.into(), v);
        }
    }
    out.insert(
        "choices".into(),
        Value::Array(
            choices
                .into_iter()
                .enumerate()
                .map(|(i, mut c)| {
                    let mut o = Map::new();
                    o.insert("index".into(), json!(i));
                    if op == Operation::ChatCompletions {
                        let mut message = c.shift_remove("message").unwrap_or_else(empty_message);
                        // Calls with no text: `null`, as in the plain answer, though a
                        // stream's first delta may carry `"content": ""` (vLLM's, Ollama's).
                        if let Some(m) = message.as_object_mut() {
                            let calls = ["tool_calls", "function_call"];
                            if calls.iter().any(|c| m.contains_key(*c))
                                && m.get("content").and_then(Value::as_str) == Some("")
                            {
                                m.insert("content".into(), Value::Null);
                            }
                        }
                        o.insert("message".into(), message);
                    }
                    o.extend(c);
                    if op == Operation::Completions {
                        o.entry("text").or_insert(json!(""));
                    }
                    o.entry("logprobs").or_insert(Value::Null);
                    o.entry("finish_reason").or_insert(Value::Null);
                    Value::Object(o)
                })
                .collect(),
        ),
    );
    out.extend(top);
    out.insert("usage".into(), usage);
    Some(Bytes::from(Value::Object(out).to_string()))
}

/// The most choices (and tool calls of one message) an assembled answer may have: OpenAI's
/// `n` is at most 128; an index past it is no stream to trust.
const MAX_CHOICES: usize = 128;

/// A chat choice's message before its first delta.
fn empty_message() -> Value {
    json!({"role": "assistant", "content": null})
}

/// Adds one event's choice to what its earlier events made of it.
fn merge_choice(acc: &mut Map<String, Value>, c: Map<String, Value>, op: Operation) -> Option<()> {
    for (k, v) in c {
        match k.as_str() {
            // Azure's positions of a filtered stretch in the stream: no plain answer has them.
            "index" | "content_filter_offsets" => {}
            "delta" if op == Operation::ChatCompletions => {
                let msg = acc.entry("message").or_insert_with(empty_message);
                let (Value::Object(msg), Value::Object(delta)) = (msg, v) else {
                    // `"delta": null` adds nothing; anything else is no stream of OpenAI's.
                    continue;
                };
                for (dk, dv) in delta {
                    match dk.as_str() {
                        "tool_calls" => merge_tool_calls(msg, dv)?,
                        "role" => {
                            msg.insert(dk, dv);
                        }
                        // Text in pieces: `content`, `refusal`, `reasoning_content`, and
                        // within objects (`function_call`'s arguments, `audio`'s transcript).
                        _ => join(msg, dk, dv, Join::Text),
                    }
                }
            }
            "text" => join(acc, k, v, Join::Text),
            // The rest as members: each chunk's `logprobs.content` (or `tokens`, ...)
            // entries joined, the last `finish_reason`, Azure's filter results merged.
            _ => join(acc, k, v, Join::Members),
        }
    }
    Some(())
}

#[derive(Clone, Copy, PartialEq)]
enum Join {
    /// Strings are pieces of one text: appended.
    Text,
    /// Strings are whole: replaced.
    Members,
}

/// Puts `v` under `k` in `into`: arrays appended to the array there, objects merged member
/// by member, strings appended (`Join::Text`) or replaced; a `null` or `{}` where there is a
/// value says nothing (Azure's filter results come as `{}` on a stream's first and last
/// chunks).
fn join(into: &mut Map<String, Value>, k: String, v: Value, how: Join) {
    match (into.get_mut(&k), v) {
        (Some(Value::String(have)), Value::String(more)) if how == Join::Text => {
            have.push_str(&more)
        }
        (Some(Value::Array(have)), Value::Array(more)) => have.extend(more),
        (Some(Value::Object(have)), Value::Object(more)) => {
            for (mk, mv) in more {
                join(have, mk, mv, how);
            }
        }
        (Some(have), Value::Null) if !have.is_null() => {}
        (Some(have), Value::Object(more)) if more.is_empty() && !have.is_null() => {}
        (_, v) => {
            into.insert(k, v);
        }
    }
}

/// Tool-call deltas into the message's calls, by their `index`: the id, type and name as
/// they come, the arguments joined.
fn merge_tool_calls(msg: &mut Map<String, Value>, deltas: Value) -> Option<()> {
    let Value::Array(deltas) = deltas else {
        return Some(());
    };
    if !msg.get("tool_calls").is_some_and(Value::is_array) {
        msg.insert("tool_calls".into(), json!([]));
    }
    let Some(Value::Array(calls)) = msg.get_mut("tool_calls") else {
        return Some(());
    };
    for tc in deltas {
        let i = tc.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
        if i >= MAX_CHOICES {
            return None;
        }
        while calls.len() <= i {
            calls.push(
                json!({"id": null, "type": "function", "function": {"name": "", "arguments": ""}}),
            );
        }
        let call = &mut calls[i];
        if let Some(id) = tc.get("id").filter(|v| !v.is_null()) {
            call["id"] = id.clone();
        }
        if let Some(t) = tc.get("type").and_then(Value::as_str) {
            call["type"] = json!(t);
        }
        if let Some(name) = tc.pointer("/function/name").and_then(Value::as_str) {
            call["function"]["name"] = json!(name);
        }
        if let Some(args) = tc.pointer("/function/arguments").and_then(Value::as_str) {
            if let Value::String(s) = &mut call["function"]["arguments"] {
                s.push_str(args);
            }
        }
    }
    Some(())
}

/// The events a streamed hit sends: the stored ones (without the usage chunk unless the
/// client asked), or, for an answer first fetched as a plain request, events made from it.
pub fn stream_events(entry: &Entry, op: Operation, include_usage: bool) -> Vec<Bytes> {
    if let Some(events) = &entry.events {
        return events
            .iter()
            .filter(|e| include_usage || !crate::ledger::is_usage_chunk(e))
            .cloned()
            .collect();
    }
    synthesize(entry, op, include_usage)
}

fn synthesize(entry: &Entry, op: Operation, include_usage: bool) -> Vec<Bytes> {
    let Ok(v) = serde_json::from_slice::<Value>(&entry.json) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if op == Operation::Responses {
        let mut seq = 0;
        let mut event = |kind: &str, mut data: Value| {
            data["type"] = json!(kind);
            data["sequence_number"] = json!(seq);
            seq += 1;
            Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
        };
        out.push(event("response.created", json!({"response": v})));
        out.push(event("response.completed", json!({"response": v})));
        return out;
    }
    let Value::Object(answer) = v else {
        return Vec::new();
    };
    // Each chunk carries the answer's plain members (id, created, model, system_fingerprint,
    // service_tier, ...), as OpenAI's do; the others (Azure's `prompt_filter_results`,
    // llama.cpp's `timings`) go with the first chunk.
    let object = if op == Operation::ChatCompletions {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let mut head = Map::new();
    let mut extras = Map::new();
    for (k, val) in &answer {
        match k.as_str() {
            "object" => {
                head.insert(k.clone(), json!(object));
            }
            "choices" | "usage" => {}
            _ if val.is_object() || val.is_array() => {
                extras.insert(k.clone(), val.clone());
            }
            _ => {
                head.insert(k.clone(), val.clone());
            }
        }
    }
    head.entry("object").or_insert(json!(object));
    if include_usage {
        head.insert("usage".into(), Value::Null);
    }
    let chunk = |choice: Value, first: bool| {
        let mut c = head.clone();
        c.insert("choices".into(), json!([choice]));
        if first {
            c.extend(extras.clone());
        }
        Bytes::from(format!("data: {}\n\n", Value::Object(c)))
    };
    let mut first = true;
    for c in answer
        .get("choices")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(c) = c.as_object() else { continue };
        let i = c.get("index").cloned().unwrap_or(json!(0));
        // The choice's other members (Azure's `content_filter_results`, vLLM's
        // `stop_reason`) go with its last chunk, as they come in a stream.
        let mut last = Map::new();
        last.insert("index".into(), i.clone());
        for (k, val) in c {
            if !matches!(k.as_str(), "index" | "message" | "text" | "logprobs") {
                last.insert(k.clone(), val.clone());
            }
        }
        last.entry("finish_reason").or_insert(Value::Null);
        let logprobs = c.get("logprobs").cloned().unwrap_or(Value::Null);
        if op == Operation::ChatCompletions {
            let mut delta = Map::new();
            delta.insert("role".into(), json!("assistant"));
            if let Some(m) = c.get("message").and_then(Value::as_object) {
                for (k, val) in m {
                    let val = match (k.as_str(), val) {
                        ("tool_calls", Value::Array(tc)) => json!(tc
                            .iter()
                            .enumerate()
                            .map(|(n, t)| {
                                let mut t = t.clone();
                                t["index"] = json!(n);
                                t
                            })
                            .collect::<Vec<_>>()),
                        _ => val.clone(),
                    };
                    delta.insert(k.clone(), val);
                }
            }
            out.push(chunk(
                json!({"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": null}),
                first,
            ));
            last.insert("delta".into(), json!({}));
            last.insert("logprobs".into(), Value::Null);
            out.push(chunk(Value::Object(last), false));
        } else {
            last.insert("text".into(), c.get("text").cloned().unwrap_or(json!("")));
            last.insert("logprobs".into(), logprobs);
            out.push(chunk(Value::Object(last), first));
        }
        first = false;
    }
    if include_usage {
        let mut u = head.clone();
        u.insert("choices".into(), json!([]));
        u.insert(
            "usage".into(),
            answer.get("usage").cloned().unwrap_or(Value::Null),
        );
        out.push(Bytes::from(format!("data: {}\n\n", Value::Object(u))));
    }
    out.push(Bytes::from_static(b"data: [DONE]\n\n"));
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn events_split_at_blank_lines_and_their_data_read() {
        let chunks = [
            Bytes::from_static(b"data: a\n\ndata: b\n\n\n"),
            Bytes::from_static(b"data: c"),
        ];
        let got: Vec<Bytes> = split_events(&chunks);
        assert_eq!(got, ["data: a\n\n", "data: b\n\n", "\n", "data: c"]);
        let crlf = [Bytes::from_static(b"data: a\r\n\r\ndata: b\r\n\r\n")];
        assert_eq!(split_events(&crlf), ["data: a\r\n\r\n", "data: b\r\n\r\n"]);
        let bare_cr = [Bytes::from_static(b"data: a\r\rdata: b\r\r")];
        assert_eq!(split_events(&bare_cr), ["data: a\r\r", "data: b\r\r"]);
        assert!(stream_storable(&[
            Bytes::from_static(
                b"data: {\"choices\":[{\"delta\":{\"content\":\"say \\\"error\\\": no\"}}]}\n\n"
            ),
            Bytes::from_static(b"data: [DONE]\n\n"),
        ]));
        assert!(!stream_storable(&[
            Bytes::from_static(b"data: {\"x\":{\"error\"\t: 1}}\n\n"),
            Bytes::from_static(b"data: [DONE]\n\n"),
        ]));
        assert!(!stream_storable(&[Bytes::from_static(b"data: {}\n\n")]));
        assert!(stream_storable(&[
            Bytes::from_static(b"data: {\"error\": null, \"choices\":[]}\n\n"),
            Bytes::from_static(b"data: [DONE]\n\n"),
        ]));
        // An error event's JSON over two `data:` lines is one text, read whole.
        assert!(!stream_storable(&[
            Bytes::from_static(b"data: {\ndata: \"error\": {\"message\": \"x\"}}\n\n"),
            Bytes::from_static(b"data: [DONE]\n\n"),
        ]));
    }

    use super::*;

    #[test]
    fn the_doorkeeper_remembers_keys_until_it_has_seen_as_many_new_ones_as_it_holds() {
        let key = |i: u32| -> Key {
            let mut h = Sha256::new();
            h.update(i.to_le_bytes());
            h.finalize().into()
        };
        // Room for 2,048 entries: 16,384 bits.
        let d = Doorkeeper::new(2048);
        assert_eq!((d.mask, d.reset_after), ((1 << 14) - 1, 2048));
        assert!(!d.saw(&key(0)), "new");
        assert!(d.saw(&key(0)), "seen");
        // 2,046 more new keys: all remembered, and a few pass for seen by chance (~3%).
        let passed = (1..2047).filter(|i| d.saw(&key(*i))).count();
        assert!(
            passed < 2046 / 10,
            "{passed} of 2,046 new keys passed for seen"
        );
        assert!((0..2047).all(|i| d.saw(&key(i))), "all remembered");
        // New keys counted up to 2,048 (those passing for seen do not count): a reset.
        let mut i = 2047;
        while d.marked.load(std::sync::atomic::Ordering::Relaxed) != 0 {
            d.saw(&key(i));
            i += 1;
        }
        assert!(!d.saw(&key(0)), "forgotten after the reset");
    }

    #[test]
    fn keys_ignore_order_number_spelling_and_stream_fields() {
        let a = key("r", Operation::ChatCompletions, &["team:", "a"], br#"{"model":"m","temperature":1.0,"messages":[{"role":"user","content":"hi"}],"user":"x"}"#);
        let b = key("r", Operation::ChatCompletions, &["team:", "a"], br#"{"messages":[{"content":"hi","role":"user"}],"temperature":1,"model":"m","stream":true,"stream_options":{"include_usage":true}}"#);
        assert_eq!(a, b);
        // Out of order at every level, nested objects inside arrays inside objects.
        let deep = |body: &[u8]| key("r", Operation::ChatCompletions, &["global", ""], body);
        assert_eq!(
            deep(br#"{"b":{"y":1,"x":[{"q":1,"p":{"d":2,"c":[{"z":0,"a":1}]}}]},"a":2}"#),
            deep(br#"{"a":2,"b":{"x":[{"p":{"c":[{"a":1,"z":0}],"d":2},"q":1}],"y":1}}"#)
        );
        assert_ne!(
            deep(br#"{"b":{"y":1,"x":[{"q":1,"p":{"d":2,"c":[{"z":0,"a":1}]}}]},"a":2}"#),
            deep(br#"{"a":2,"b":{"x":[{"p":{"c":[{"a":0,"z":1}],"d":2},"q":1}],"y":1}}"#)
        );
        let other_team = key(
            "r",
            Operation::ChatCompletions,
            &["team:", "b"],
            br#"{"model":"m","temperature":1,"messages":[{"role":"user","content":"hi"}]}"#,
        );
        assert_ne!(a, other_team);
        let other_text = key(
            "r",
            Operation::ChatCompletions,
            &["team:", "a"],
            br#"{"model":"m","temperature":1,"messages":[{"role":"user","content":"ho"}]}"#,
        );
        assert_ne!(a, other_text);
        let spaced = key(
            "r",
            Operation::ChatCompletions,
            &["team:", "a"],
            b"  {\"model\" : \"m\", \"temperature\": 1e0,\n \"messages\": [ {\"role\":\"user\", \"content\":\"h\\u0069\"} ] }  ",
        );
        assert_eq!(a, spaced);
        let nested_user = key(
            "r",
            Operation::ChatCompletions,
            &["team:", "a"],
            br#"{"model":"m","temperature":1,"messages":[{"role":"user","content":"hi","user":"x"}]}"#,
        );
        assert_ne!(a, nested_user, "only the top-level `user` is left out");
        assert!(key(
            "r",
            Operation::ChatCompletions,
            &["team:", "a"],
            b"{\"model\":"
        )
        .is_none());
        // A scope in parts is hashed as if joined: keys stay those of earlier versions
        // (entries other replicas stored in Redis under them stay reachable).
        assert_eq!(
            key(
                "r",
                Operation::ChatCompletions,
                &["team:a"],
                br#"{"model":"m"}"#
            ),
            key(
                "r",
                Operation::ChatCompletions,
                &["team:", "a"],
                br#"{"model":"m"}"#
            )
        );
        for not_json in [
            &b"{\"a\":1,}"[..],
            b"{\"a\":1} x",
            b"{\"a\":[1 2]}",
            b"{\"a\":tru}",
            b"{\"a\":\"\x01\"}",
            b"{\"a\":01}",
        ] {
            let k = key("r", Operation::ChatCompletions, &["team:", "a"], not_json);
            assert!(k.is_none(), "{}", String::from_utf8_lossy(not_json));
        }
        // Nested keys are sorted too, escaped keys and strings decoded, and a left-out
        // member leaves no comma behind wherever it stood.
        let one = key(
            "r",
            Operation::ChatCompletions,
            &["team:", "a"],
            br#"{"user":"u","z":{"b":[{"y":1,"x":2}],"a":"\u00e9"},"stream":true,"m":1}"#,
        );
        let two = key(
            "r",
            Operation::ChatCompletions,
            &["team:", "a"],
            "{\"m\":1,\"z\":{\"a\":\"é\",\"\\u0062\":[{\"x\":2,\"y\":1}]}}".as_bytes(),
        );
        assert!(one.is_some());
        assert_eq!(one, two);
    }

    #[test]
    fn a_stream_assembles_into_one_answer() {
        let evs: Vec<Bytes> = [
            r#"data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}],"usage":null}"#,
            r#"data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}],"usage":null}"#,
            r#"data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"stop"}],"usage":null}"#,
            r#"data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#,
            "data: [DONE]",
        ]
        .iter()
        .map(|s| Bytes::from(format!("{s}\n\n")))
        .collect();
        let json: Value =
            serde_json::from_slice(&assemble(Operation::ChatCompletions, &evs).unwrap()).unwrap();
        assert_eq!(json["choices"][0]["message"]["content"], "Hello");
        assert_eq!(json["choices"][0]["finish_reason"], "stop");
        assert_eq!(json["usage"]["completion_tokens"], 2);
        assert!(
            assemble(Operation::ChatCompletions, &evs[..3]).is_none(),
            "no [DONE]: incomplete"
        );
        // A choice that does not read is not cached rather than cached wrong.
        for bad in [
            r#"{"id":"c","choices":[5]}"#,
            r#"{"id":"c","choices":"none"}"#,
        ] {
            let evs: Vec<Bytes> = [bad, "[DONE]"]
                .iter()
                .map(|s| Bytes::from(format!("data: {s}\n\n")))
                .collect();
            assert_eq!(assemble(Operation::ChatCompletions, &evs), None, "{bad}");
        }
        let entry = Entry {
            json: Bytes::from(json.to_string()),
            events: None,
            usage: Usage::default(),
            cost_usd: 0.0,
            ttl: Duration::from_secs(1),
        };
        let replay = synthesize(&entry, Operation::ChatCompletions, true);
        let again = assemble(Operation::ChatCompletions, &replay).unwrap();
        let again: Value = serde_json::from_slice(&again).unwrap();
        assert_eq!(again["choices"][0]["message"]["content"], "Hello");
        assert_eq!(again["usage"], json["usage"]);
    }

    /// What upstreams put beside the text survives both ways: a stream assembled into the
    /// plain answer the upstream would have sent, and that answer replayed as a stream and
    /// assembled again.
    #[test]
    fn assembly_keeps_what_upstreams_send_beside_the_text() {
        let evs: Vec<Bytes> = [
            // Azure's first event: empty id and model, the prompt's filter results.
            r#"{"id":"","object":"","created":0,"model":"","choices":[],"prompt_filter_results":[{"prompt_index":0,"content_filter_results":{"hate":{"filtered":false,"severity":"safe"}}}]}"#,
            r#"{"id":"c1","object":"chat.completion.chunk","created":7,"model":"m","service_tier":"default","system_fingerprint":"fp","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":{"content":[],"refusal":null},"finish_reason":null},{"index":1,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}"#,
            r#"{"id":"c1","object":"chat.completion.chunk","created":7,"model":"m","service_tier":"default","system_fingerprint":"fp","choices":[{"index":0,"delta":{"reasoning_content":"think","content":"He"},"logprobs":{"content":[{"token":"He","logprob":-0.1}],"refusal":null},"finish_reason":null}]}"#,
            r#"{"id":"c1","object":"chat.completion.chunk","created":7,"model":"m","service_tier":"default","system_fingerprint":"fp","choices":[{"index":1,"delta":{"content":"Yo"},"logprobs":null,"finish_reason":"stop","stop_reason":null}]}"#,
            r#"{"id":"c1","object":"chat.completion.chunk","created":7,"model":"m","service_tier":"default","system_fingerprint":"fp","choices":[{"index":0,"delta":{"reasoning_content":"ing","content":"y"},"logprobs":{"content":[{"token":"y","logprob":-0.2}],"refusal":null},"finish_reason":"stop","content_filter_results":{"hate":{"filtered":false}}}],"timings":{"predicted_n":2}}"#,
            r#"{"id":"c1","object":"chat.completion.chunk","created":7,"model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#,
            "[DONE]",
        ]
        .iter()
        .map(|s| Bytes::from(format!("data: {s}\n\n")))
        .collect();
        let got: Value =
            serde_json::from_slice(&assemble(Operation::ChatCompletions, &evs).unwrap()).unwrap();
        let want = json!({
            "id": "c1", "object": "chat.completion", "created": 7, "model": "m",
            "choices": [
                {"index": 0,
                 "message": {"role": "assistant", "content": "Hey", "refusal": null,
                             "reasoning_content": "thinking"},
                 "logprobs": {"content": [{"token": "He", "logprob": -0.1},
                                          {"token": "y", "logprob": -0.2}], "refusal": null},
                 "finish_reason": "stop",
                 "content_filter_results": {"hate": {"filtered": false}}},
                {"index": 1, "message": {"role": "assistant", "content": "Yo"},
                 "logprobs": null, "finish_reason": "stop", "stop_reason": null},
            ],
            "prompt_filter_results": [{"prompt_index": 0,
                "content_filter_results": {"hate": {"filtered": false, "severity": "safe"}}}],
            "service_tier": "default", "system_fingerprint": "fp",
            "timings": {"predicted_n": 2},
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
        });
        assert_eq!(got, want);
        // Replayed as a stream and assembled again: the same answer.
        let entry = Entry {
            json: Bytes::from(got.to_string()),
            events: None,
            usage: Usage::default(),
            cost_usd: 0.0,
            ttl: Duration::from_secs(1),
        };
        let replay = synthesize(&entry, Operation::ChatCompletions, true);
        let again: Value =
            serde_json::from_slice(&assemble(Operation::ChatCompletions, &replay).unwrap())
                .unwrap();
        assert_eq!(again, want);
        // Azure's `{}` filter results on the first and last chunks, its offsets, a legacy
        // `function_call` and an audio transcript in pieces, `choices: null` on an event,
        // `[DONE]` followed by more: as the plain answer would have them.
        let evs: Vec<Bytes> = [
            r#"{"id":"a","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"content_filter_results":{}}]}"#,
            r#"{"id":"a","created":1,"model":"m","choices":[{"index":0,"delta":{"function_call":{"name":"f","arguments":""}},"content_filter_results":{"hate":{"filtered":false}},"content_filter_offsets":{"start_offset":0}}]}"#,
            r#"{"id":"a","created":1,"model":"m","choices":[{"index":0,"delta":{"function_call":{"arguments":"{\"x\":"}}}]}"#,
            r#"{"id":"a","created":1,"model":"m","choices":null}"#,
            r#"{"id":"a","created":1,"model":"m","choices":[{"index":0,"delta":{"function_call":{"arguments":"1}"},"audio":{"id":"au","transcript":"he"}}}]}"#,
            r#"{"id":"a","created":1,"model":"m","choices":[{"index":0,"delta":{"audio":{"transcript":"llo","expires_at":5}},"finish_reason":"function_call","content_filter_results":{}}]}"#,
            "[DONE]",
            r#"{"id":"a","choices":[{"index":0,"delta":{"content":"after done"}}]}"#,
        ]
        .iter()
        .map(|s| Bytes::from(format!("data: {s}\n\n")))
        .collect();
        let got: Value =
            serde_json::from_slice(&assemble(Operation::ChatCompletions, &evs).unwrap()).unwrap();
        assert_eq!(
            got["choices"][0],
            json!({"index": 0,
                   "message": {"role": "assistant", "content": null,
                               "function_call": {"name": "f", "arguments": "{\"x\":1}"},
                               "audio": {"id": "au", "transcript": "hello", "expires_at": 5}},
                   "content_filter_results": {"hate": {"filtered": false}},
                   "logprobs": null, "finish_reason": "function_call"}),
            "{got}"
        );
        // Tool calls after a first delta with `"content": ""` (vLLM's): `null`, as in the
        // plain answer; text with them stays.
        for (first, want) in [("", Value::Null), ("Sure.", json!("Sure."))] {
            let evs: Vec<Bytes> = [
                json!({"id":"t","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":first}}]}).to_string(),
                json!({"id":"t","created":1,"model":"m","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"f","arguments":"{}"}}]},"finish_reason":"tool_calls"}]}).to_string(),
                "[DONE]".to_string(),
            ]
            .iter()
            .map(|s| Bytes::from(format!("data: {s}\n\n")))
            .collect();
            let got: Value =
                serde_json::from_slice(&assemble(Operation::ChatCompletions, &evs).unwrap())
                    .unwrap();
            assert_eq!(got["choices"][0]["message"]["content"], want, "{got}");
            assert_eq!(
                got["choices"][0]["message"]["tool_calls"][0]["id"],
                "call_1"
            );
        }
        let far = [
            Bytes::from_static(b"data: {\"id\":\"a\",\"choices\":[{\"index\":4096}]}\n\n"),
            Bytes::from_static(b"data: [DONE]\n\n"),
        ];
        assert_eq!(assemble(Operation::ChatCompletions, &far), None);
        // Without usage asked for, no event has a usage member.
        let quiet = synthesize(&entry, Operation::ChatCompletions, false);
        assert!(quiet
            .iter()
            .all(|e| !e.windows(7).any(|w| w == b"\"usage\"")));
    }
}
