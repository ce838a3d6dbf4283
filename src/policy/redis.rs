//! Limits and budgets in Redis, shared by every replica. One admission is one Lua script
//! (check every limit and budget, then take all or nothing) and one settlement another: one
//! round trip each. Keys expire with their minute or period, so nothing leaks. All keys
//! share one hash tag, so a script's keys live in one slot of a Redis Cluster.
//!
//! Each admission has a ticket (a key of its own, while its request runs), so that a call
//! whose answer never came (a timeout: Redis may still run it) is put right in the
//! background, whichever order the calls reach Redis in: an admission the gateway gave up
//! on is cancelled (what it took is given back, or, not run yet, it will take nothing), and
//! a settlement that timed out is sent again (it applies once: the ticket goes with it).
//!
//! A replica that stops (a crash, a lost node) cannot settle what its requests in flight hold.
//! Each replica says every few seconds that it is alive, and lists its tickets with what
//! each took; the others give back what a replica held once it has been silent for
//! `state.replica_timeout` (only while they themselves have reached Redis for that long, so
//! a Redis that was away does not make every replica look stopped). A settlement that comes
//! after all (a replica that was cut off, not stopped) still counts its cost.
//!
//! When Redis cannot be reached, `on_redis_error` decides: `open` admits without counting,
//! `closed` refuses (503); by default budgets fail closed and rate limits open.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures_util::future::BoxFuture;
use redis::aio::ConnectionManager;
use redis::Script;

use super::{nanos, nanos_up};
use super::{
    period_bounds, period_name, Actual, Admitted, Alert, BudgetRef, LimitHeaders, Plan,
    PolicyState, Refused,
};
use crate::config::FailMode;

/// How long one Redis call may take before it counts as Redis being down.
const CALL_TIMEOUT: Duration = Duration::from_millis(500);
const PREFIX: &str = "{switchyard}";

/// How long an admission's ticket lives: longer than any request (it is deleted when the
/// request is settled); a cancelled one, longer than a late call could take to arrive.
const TICKET_TTL_S: i64 = 7 * 86_400;
const CANCELLED_TTL_S: i64 = 3_600;

/// `now`: Redis's clock in milliseconds (one clock for every replica), as a Lua local.
macro_rules! lua_now_ms {
    () => {
        "local now_t = redis.call('TIME')\nlocal now = tonumber(now_t[1]) * 1000 + math.floor(tonumber(now_t[2]) / 1000)\n"
    };
}

const ADMIT: &str = concat!(
    r#"
local n = tonumber(ARGV[1]); local m = tonumber(ARGV[2])
local tokens = tonumber(ARGV[3]); local worst = tonumber(ARGV[4]); local wttl = tonumber(ARGV[5])
local ticket = KEYS[2*n+m+1]
if redis.call('EXISTS', ticket) == 1 then return {-3} end
local a = 7
for i = 1, n do
  local w = KEYS[2*i-1]; local p = KEYS[2*i]
  local rpm = tonumber(ARGV[a]); local tpm = tonumber(ARGV[a+1]); local mp = tonumber(ARGV[a+2]); a = a + 3
  local req = tonumber(redis.call('HGET', w, 'r') or '0'); local tok = tonumber(redis.call('HGET', w, 't') or '0')
  local inf = tonumber(redis.call('GET', p) or '0')
  if rpm >= 0 and req + 1 > rpm then return {0, i, 1, req, tok} end
  if tpm >= 0 and tok + tokens > tpm then return {0, i, 2, req, tok} end
  if mp >= 0 and inf + 1 > mp then return {0, i, 3, req, tok} end
end
for j = 1, m do
  local b = KEYS[2*n+j]; local lim = tonumber(ARGV[a]); local bttl = tonumber(ARGV[a+1]); a = a + 2
  if redis.call('HEXISTS', b, 'seeded') == 0 then return {-2, j} end
  local spent = tonumber(redis.call('HGET', b, 's') or '0'); local res = tonumber(redis.call('HGET', b, 'r') or '0')
  if spent + res + worst > lim then
    local first = redis.call('HSETNX', b, 'hard', 1)
    if bttl > 0 then redis.call('EXPIRE', b, bttl) end
    return {-1, j, spent, res, first}
  end
end
local out = {1}
for i = 1, n do
  local w = KEYS[2*i-1]; local p = KEYS[2*i]
  table.insert(out, redis.call('HINCRBY', w, 'r', 1))
  table.insert(out, redis.call('HINCRBY', w, 't', tokens))
  redis.call('EXPIRE', w, wttl)
  redis.call('INCR', p); redis.call('EXPIRE', p, 3600)
end
a = 7 + 3*n
for j = 1, m do
  local b = KEYS[2*n+j]; local bttl = tonumber(ARGV[a+1]); a = a + 2
  redis.call('HINCRBY', b, 'r', worst)
  if bttl > 0 then redis.call('EXPIRE', b, bttl) end
end
redis.call('SET', ticket, 'a', 'EX', tonumber(ARGV[6]))
-- What it took, for the other replicas to give back should this one stop (written by the
-- gateway, the last argument: its keys and arguments; the list's TTL is kept by the beats).
local held = KEYS[2*n+m+2]
redis.call('HSET', held, ticket, ARGV[7 + 3*n + 2*m])
-- A replica that holds something is on the list of replicas, as alive now: before its
-- first beat, and after it was cut off (a replica giving back its holdings then stops).
"#,
    lua_now_ms!(),
    r#"
redis.call('ZADD', KEYS[2*n+m+3], 'GT', now, string.match(held, ':held:(.*)$'))
return out
"#
);

/// Gives back what an admission took, once: its ticket says whether it ran (`a`). Not run
/// yet, the ticket is marked cancelled, and the admission, should it arrive, takes nothing.
/// `ARGV[6]` 1: the admission of a replica taken for stopped (`ARGV[7]`, silent for
/// `ARGV[8]` ms on the list `KEYS[2n+m+3]`; -1 and nothing done if it has spoken since),
/// whose settlement may still come (marked `r`: it then counts its cost only); its request
/// ran, so its minute's counts stay.
const CANCEL: &str = concat!(
    lua_now_ms!(),
    r#"
local n = tonumber(ARGV[1]); local m = tonumber(ARGV[2])
local tokens = tonumber(ARGV[3]); local worst = tonumber(ARGV[4]); local cttl = tonumber(ARGV[5])
local ticket = KEYS[2*n+m+1]; local held = KEYS[2*n+m+2]
local reap = ARGV[6] == '1'
if reap then
  local score = tonumber(redis.call('ZSCORE', KEYS[2*n+m+3], ARGV[7]))
  if score and score >= now - tonumber(ARGV[8]) then return -1 end
end
local v = redis.call('GET', ticket)
redis.call('HDEL', held, ticket)
if reap then
  if v ~= 'a' then return 0 end
  redis.call('SET', ticket, 'r', 'EX', cttl)
else
  redis.call('SET', ticket, 'c', 'EX', cttl)
  if v ~= 'a' then return 0 end
end
for i = 1, n do
  local w = KEYS[2*i-1]; local p = KEYS[2*i]
  if not reap and redis.call('EXISTS', w) == 1 then
    if redis.call('HINCRBY', w, 'r', -1) < 0 then redis.call('HSET', w, 'r', 0) end
    if tokens > 0 and redis.call('HINCRBY', w, 't', -tokens) < 0 then redis.call('HSET', w, 't', 0) end
  end
  if redis.call('DECR', p) <= 0 then redis.call('DEL', p) end
end
for j = 1, m do
  local b = KEYS[2*n+j]
  if worst > 0 and redis.call('HINCRBY', b, 'r', -worst) < 0 then redis.call('HSET', b, 'r', 0) end
end
return 1
"#
);

/// Settles an admission once: only while its ticket says it was admitted (`a`), and the
/// ticket goes (a settlement sent again after a timeout finds it gone and does nothing).
/// A ticket another replica gave back (`r`: this one was taken for stopped) counts the cost
/// only: its reservation and in-flight count were given back then. No ticket at all, and a
/// budget key seeded after the admission (`ARGV[7+m]`) with a figure holding rows only of
/// requests ended before this one (`ARGV[8+m]`): Redis lost its data meanwhile (the
/// reservation went with it), and the figure has no row of this request: its cost is
/// counted there. (A figure holding its row, as when the request ended while Redis was
/// down and the settlement is sent again once Redis came back empty, gets nothing.)
const SETTLE: &str = r#"
local n = tonumber(ARGV[1]); local m = tonumber(ARGV[2])
local est = tonumber(ARGV[3]); local act = tonumber(ARGV[4]); local worst = tonumber(ARGV[5]); local cost = tonumber(ARGV[6])
local at = tonumber(ARGV[7+m] or '0'); local ended = tonumber(ARGV[8+m] or '0')
local ticket = KEYS[2*n+m+1]; local held = KEYS[2*n+m+2]
local st = redis.call('GET', ticket)
local lost = not st
if st ~= 'a' and st ~= 'r' then
  if not lost or at <= 0 then return {} end
else
  redis.call('DEL', ticket)
  redis.call('HDEL', held, ticket)
end
local live = st == 'a'
for i = 1, n do
  local w = KEYS[2*i-1]; local p = KEYS[2*i]
  if live and redis.call('EXISTS', w) == 1 then
    local t = redis.call('HINCRBY', w, 't', act - est)
    if t < 0 then redis.call('HSET', w, 't', 0) end
  end
  if live and redis.call('DECR', p) <= 0 then redis.call('DEL', p) end
end
local out = {}
for j = 1, m do
  local b = KEYS[2*n+j]; local soft = tonumber(ARGV[6+j])
  -- Lua's -0 reaches Redis as the text "-0", which HINCRBY refuses: nothing to release anyway.
  if live and worst > 0 and redis.call('HINCRBY', b, 'r', -worst) < 0 then redis.call('HSET', b, 'r', 0) end
  local crossed = 0; local after = 0
  local seeded = tonumber(redis.call('HGET', b, 'seeded') or '0')
  local holds = tonumber(redis.call('HGET', b, 'holds') or '0')
  if lost and seeded == 0 and cost > 0 then
    -- Not seeded yet: kept, with when it ended, for the seeding to count if its figure
    -- does not hold the row.
    redis.call('HSET', b, 'e:' .. ticket, ended .. ':' .. cost)
    if redis.call('TTL', b) < 0 then redis.call('EXPIRE', b, 604800) end
  elseif not lost or (seeded > at and holds < ended) then
    local before = tonumber(redis.call('HGET', b, 's') or '0')
    after = redis.call('HINCRBY', b, 's', cost)
    if soft >= 0 and before < soft and after >= soft then crossed = redis.call('HSETNX', b, 'soft', 1) end
  end
  table.insert(out, crossed); table.insert(out, after)
end
return out
"#;

/// A replica says it is alive (`KEYS[1]`: every replica by the time Redis last heard from it)
/// and learns which replicas have been silent for `ARGV[3]` ms: only once it has itself
/// reached Redis without a gap longer than `ARGV[2]` ms between its beats for that long
/// (`KEYS[2]`: since when, and its last beat), so that after Redis was away every replica has
/// had its turn to say so. Both keys, and the replica's list of what it holds (`KEYS[3]`),
/// live `ARGV[4]` s past the last beat.
const BEAT: &str = concat!(
    lua_now_ms!(),
    r#"
local me = ARGV[1]; local gap = tonumber(ARGV[2]); local dead = tonumber(ARGV[3])
-- Its own last beat (its score on the list is refreshed by its admissions too, which can
-- come first after Redis was away).
local prev = tonumber(redis.call('HGET', KEYS[2], me .. ':beat'))
local since = tonumber(redis.call('HGET', KEYS[2], me))
if not prev or not since or now - prev > gap then
  since = now
  redis.call('HSET', KEYS[2], me, now)
end
redis.call('HSET', KEYS[2], me .. ':beat', now)
redis.call('ZADD', KEYS[1], now, me)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4])); redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]))
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[4]))
if now - since < dead then return {} end
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - dead))
"#
);

/// Forgets a stopped replica once nothing it held is left (`KEYS[3]`), unless it has spoken
/// again meanwhile.
const FORGET: &str = concat!(
    lua_now_ms!(),
    r#"
local score = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
if score and score >= now - tonumber(ARGV[2]) then return 0 end
if redis.call('HLEN', KEYS[3]) > 0 then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1]); redis.call('HDEL', KEYS[2], ARGV[1], ARGV[1] .. ':beat')
return 1
"#
);

/// A replica leaves at exit (see `RedisState::leave`).
const LEAVE: &str = r#"
if redis.call('HLEN', KEYS[3]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1]); redis.call('HDEL', KEYS[2], ARGV[1], ARGV[1] .. ':beat')
  return 1
end
redis.call('ZADD', KEYS[1], 0, ARGV[1])
return 0
"#;

/// Seeds a budget's spend from the ledger, once: `s` becomes the more of what Redis holds (the
/// settlements made since the key was lost or made) and the ledger's figure, and `seeded`
/// marks it done. An admission finds a key without `seeded` (Redis restarted without its
/// data, or flushed; a new period) and has it seeded before it counts against it. With
/// ARGV[4] = 1 (the gateway's start, a reload bringing a budget in or back, and the rebuild
/// once the requests that started before that reload have ended) it is seeded again,
/// seeded or not. The first seeding keeps when it was made (`seeded`, ARGV[6]) and the time
/// up to which its figure holds every row (`holds`, ARGV[5]: `ledger_read_ms`): a
/// settlement whose ticket is gone tells by them whether its reservation was lost and
/// whether its cost is in the figure. Such a settlement reaching a key not seeded yet leaves
/// its cost and end time (`e:TICKET`), which the seeding adds if its figure does not hold
/// the row.
const SEED: &str = r#"
local b = KEYS[1]; local ledger = tonumber(ARGV[1]); local soft = tonumber(ARGV[2]); local ttl = tonumber(ARGV[3])
if ARGV[4] ~= '1' and redis.call('HEXISTS', b, 'seeded') == 1 then return 0 end
local s = tonumber(redis.call('HGET', b, 's') or '0')
if ledger > s then redis.call('HSET', b, 's', ledger); s = ledger end
-- Costs settled while it was not seeded, of requests ended after what the figure holds.
local all = redis.call('HGETALL', b)
for i = 1, #all, 2 do
  if string.sub(all[i], 1, 2) == 'e:' then
    local ended, cost = string.match(all[i+1], '^(%-?%d+):(%d+)$')
    if ended and tonumber(ended) > tonumber(ARGV[5]) then s = redis.call('HINCRBY', b, 's', tonumber(cost)) end
    redis.call('HDEL', b, all[i])
  end
end
redis.call('HSETNX', b, 'seeded', ARGV[6])
redis.call('HSETNX', b, 'holds', ARGV[5])
if soft >= 0 and s >= soft then redis.call('HSETNX', b, 'soft', 1) end
if ttl > 0 then redis.call('EXPIRE', b, ttl) end
return 1
"#;

/// An admission sent to Redis and not answered yet: dropped so (the call failed or timed
/// out, or the request's future was dropped), it is cancelled in the background (`CANCEL`,
/// which gives back what it took if it ran, and makes it take nothing if it runs later).
struct PendingAdmission<'a> {
    state: &'a RedisState,
    plan: &'a Plan,
    /// `None` once Redis has answered.
    keys: Option<Vec<String>>,
    worst: i64,
}

impl Drop for PendingAdmission<'_> {
    fn drop(&mut self) {
        if let Some(keys) = self.keys.take() {
            self.state.cancel_later(self.plan, keys, self.worst);
        }
    }
}

/// What one run of `ADMIT` came to: an answer, or the index of a budget whose key must be
/// seeded first (nothing was counted).
enum Once {
    Decided(Result<Admitted, Refused>),
    Unseeded(usize),
}

pub struct RedisState {
    client: redis::Client,
    conn: Arc<ArcSwapOption<ConnectionManager>>,
    connecting: Arc<AtomicBool>,
    admit: Script,
    settle: Script,
    seed: Script,
    budgets_fail: FailMode,
    limits_fail: FailMode,
    /// Where a budget's spend is read from when Redis has lost it.
    ledger: crate::ledger::store::Store,
    /// Calls that did not answer, to send again (`spawn_retries`).
    retries: tokio::sync::mpsc::Sender<Retry>,
    retry_state: Arc<RetryState>,
    /// This replica's name among the others (random, new at each start), and the key of what
    /// its requests in flight hold.
    replica: Arc<str>,
    held: String,
    /// Set at shutdown: the replica no longer says it is alive.
    stopping: Arc<AtomicBool>,
}

fn window_key(id: &str, minute: u64) -> String {
    format!("{PREFIX}:w:{id}:{minute}")
}
fn parallel_key(id: &str) -> String {
    format!("{PREFIX}:p:{id}")
}
fn held_key(replica: &str) -> String {
    format!("{PREFIX}:held:{replica}")
}
const REPLICAS_KEY: &str = "{switchyard}:replicas";
const SINCE_KEY: &str = "{switchyard}:replicas:since";

fn budget_key(id: &str, period_start: i64) -> String {
    // `bn`: in nano-dollars (keys in micro-dollars were `b`; a new key is seeded from the
    // ledger like any other).
    format!("{PREFIX}:bn:{id}:{period_start}")
}

/// Seconds a budget key must live: to its period's end and a week beyond (for reports and
/// late settlements); 0 for `total`, which never ends.
fn budget_ttl(b: &BudgetRef, now_ms: i64) -> i64 {
    match period_bounds(b.period, now_ms).1 {
        Some(end) => ((end - now_ms) / 1000).max(1) + 7 * 86_400,
        None => 0,
    }
}

/// The keys of an admission's scripts: each limit's minute window and in-flight count, each
/// budget's period, the ticket, the replica's list of what it holds, and the list of replicas.
fn script_keys(
    plan: &Plan,
    minute: u64,
    periods: &[(Arc<str>, i64)],
    ticket: &str,
    held: &str,
) -> Vec<String> {
    let mut keys = Vec::with_capacity(2 * plan.limits.len() + periods.len() + 3);
    for l in plan.limits.iter() {
        keys.push(window_key(&l.id, minute));
        keys.push(parallel_key(&l.id));
    }
    for (id, start) in periods {
        keys.push(budget_key(id, *start));
    }
    keys.push(format!("{PREFIX}:t:{ticket}"));
    keys.push(held.to_string());
    keys.push(REPLICAS_KEY.to_string());
    keys
}

fn invocation<'a>(
    script: &'a Script,
    keys: &[String],
    args: &[i64],
) -> redis::ScriptInvocation<'a> {
    let mut inv = script.prepare_invoke();
    for k in keys {
        inv.key(k);
    }
    for a in args {
        inv.arg(*a);
    }
    inv
}

/// How long a call that did not answer is sent again before it is given up: longer than
/// Redis stalls (a fork, a slow disk, a host paused), and shorter than a cancelled
/// admission's mark lives (`CANCELLED_TTL_S`), so a late admission always finds it.
const RETRY_FOR: Duration = Duration::from_secs(30 * 60);
/// Calls waiting to be sent again at most: past them, new ones are given up at once (and
/// counted), so a long outage cannot grow the gateway's memory without bound.
const RETRY_QUEUE: usize = 100_000;

/// A call to send again: which script, with what.
struct Retry {
    what: RetryKind,
    keys: Vec<String>,
    args: Vec<i64>,
    until: tokio::time::Instant,
}

#[derive(Clone, Copy)]
enum RetryKind {
    Settle,
    Cancel,
}

impl RetryKind {
    fn name(self) -> &'static str {
        match self {
            RetryKind::Settle => "settle",
            RetryKind::Cancel => "cancel",
        }
    }

    /// Its `operation` in `switchyard_state_errors_total`: a cancel mends an admission.
    fn operation(self) -> &'static str {
        match self {
            RetryKind::Settle => "settle",
            RetryKind::Cancel => "admit",
        }
    }
}

/// Whether a call failed with the connection (not with an answer of Redis's own).
fn connection_lost(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal()
}

/// Whether a failed call may pass if sent again: Redis unreachable or slow, or busy for a
/// moment (loading its data, a failover, a script running long).
fn transient(e: &redis::RedisError) -> bool {
    connection_lost(e)
        || e.is_timeout()
        || matches!(
            e.kind(),
            redis::ErrorKind::BusyLoadingError
                | redis::ErrorKind::TryAgain
                | redis::ErrorKind::ReadOnly
                | redis::ErrorKind::MasterDown
                | redis::ErrorKind::ClusterDown
        )
        || e.code() == Some("BUSY")
}

/// What the gateway and the retry worker share: how many calls wait (queued or being sent
/// again), how many settlements are in their first sending, and a bell that cuts the
/// worker's wait short (at shutdown, to send them at once).
#[derive(Default)]
struct RetryState {
    waiting: std::sync::atomic::AtomicUsize,
    settling: std::sync::atomic::AtomicUsize,
    now: tokio::sync::Notify,
}

/// A settlement in its first sending, counted while it lasts (shutdown waits for it).
struct Settling<'a>(&'a RetryState);

impl<'a> Settling<'a> {
    fn start(state: &'a RetryState) -> Settling<'a> {
        state.settling.fetch_add(1, Ordering::AcqRel);
        Settling(state)
    }
}

impl Drop for Settling<'_> {
    fn drop(&mut self) {
        self.0.settling.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Sends the calls that did not answer again, in order, one worker for all: while Redis
/// does not answer it waits (100 ms, doubling up to a minute) and keeps them queued.
fn spawn_retries(
    client: redis::Client,
    slot: Arc<ArcSwapOption<ConnectionManager>>,
    connecting: Arc<AtomicBool>,
    settle: Script,
    cancel: Script,
    state: Arc<RetryState>,
) -> tokio::sync::mpsc::Sender<Retry> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Retry>(RETRY_QUEUE);
    tokio::spawn(async move {
        let done = |n: usize| {
            state.waiting.fetch_sub(n, Ordering::AcqRel);
        };
        let mut pending = std::collections::VecDeque::new();
        let mut wait = Duration::from_millis(100);
        loop {
            if pending.is_empty() {
                match rx.recv().await {
                    Some(r) => pending.push_back(r),
                    None => return,
                }
                wait = Duration::from_millis(100);
            }
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = state.now.notified() => {}
            }
            while let Ok(r) = rx.try_recv() {
                pending.push_back(r);
            }
            let now = tokio::time::Instant::now();
            let before = pending.len();
            // Queued in the order they were given up on, each for the same time: the expired
            // ones are at the front.
            while let Some(r) = pending.front().filter(|r: &&Retry| r.until <= now) {
                crate::telemetry::metrics::state_error(r.what.operation());
                pending.pop_front();
            }
            if pending.len() < before {
                done(before - pending.len());
                tracing::error!(
                    calls = before - pending.len(),
                    "Redis did not take calls sent again for 30 minutes; their reservations stay until their periods end"
                );
            }
            let Some(conn) = slot.load_full() else {
                spawn_connect(client.clone(), slot.clone(), connecting.clone());
                wait = (wait * 2).min(Duration::from_secs(60));
                continue;
            };
            let mut c = (*conn).clone();
            let mut failed = false;
            while let Some(r) = pending.front() {
                let script = match r.what {
                    RetryKind::Settle => &settle,
                    RetryKind::Cancel => &cancel,
                };
                let inv = invocation(script, &r.keys, &r.args);
                match tokio::time::timeout(CALL_TIMEOUT, inv.invoke_async::<redis::Value>(&mut c))
                    .await
                {
                    Ok(Ok(_)) => {
                        tracing::info!(what = r.what.name(), "Redis call sent again: done");
                        pending.pop_front();
                        done(1);
                    }
                    Ok(Err(e)) if !transient(&e) => {
                        crate::telemetry::metrics::state_error(r.what.operation());
                        tracing::error!(what = r.what.name(), error = %e, "Redis refused a call sent again");
                        pending.pop_front();
                        done(1);
                    }
                    _ => {
                        failed = true;
                        drop_failed(&client, &slot, &connecting, &conn);
                        break;
                    }
                }
            }
            wait = if failed {
                (wait * 2).min(Duration::from_secs(60))
            } else {
                Duration::from_millis(100)
            };
        }
    });
    tx
}

/// A Redis call within `CALL_TIMEOUT`; past it, an I/O error.
async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, redis::RedisError>>,
) -> Result<T, redis::RedisError> {
    tokio::time::timeout(CALL_TIMEOUT, f)
        .await
        .map_err(|_| redis::RedisError::from((redis::ErrorKind::IoError, "timeout")))?
}

/// Drops a connection a call failed or timed out on, and connects anew: only if it is still
/// the one that failed (another may be in its place already, serving admissions).
fn drop_failed(
    client: &redis::Client,
    slot: &Arc<ArcSwapOption<ConnectionManager>>,
    connecting: &Arc<AtomicBool>,
    conn: &Arc<ConnectionManager>,
) {
    let prev = slot.compare_and_swap(&Some(conn.clone()), None);
    if prev.as_ref().is_some_and(|p| Arc::ptr_eq(p, conn)) {
        spawn_connect(client.clone(), slot.clone(), connecting.clone());
    }
}

/// What a replica's beat needs: the connection, the scripts, its name and when the others
/// count as stopped.
struct Beats {
    client: redis::Client,
    slot: Arc<ArcSwapOption<ConnectionManager>>,
    connecting: Arc<AtomicBool>,
    cancel: Script,
    replica: Arc<str>,
    held: String,
    dead_after: Duration,
    stopping: Arc<AtomicBool>,
}

/// Says, six times per `dead_after`, that this replica is alive; hands the replicas silent
/// for `dead_after` to a task of their own, which gives back what they held (so that giving
/// back much, or to a slow Redis, never delays a beat).
fn spawn_beats(b: Beats) {
    let (stopped_tx, stopped_rx) = tokio::sync::mpsc::channel::<Vec<String>>(1);
    let b = Arc::new(b);
    spawn_reaper(b.clone(), stopped_rx);
    tokio::spawn(async move {
        let beat = Script::new(BEAT);
        let every = (b.dead_after / 6).max(Duration::from_millis(100));
        let gap_ms = (every * 2 + CALL_TIMEOUT).as_millis() as i64;
        let dead_ms = b.dead_after.as_millis() as i64;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut listed = false;
        loop {
            if listed {
                tick.tick().await;
            } else {
                // Listed as soon as Redis answers, not a beat later.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if b.stopping.load(Ordering::Acquire) {
                return;
            }
            let Some(conn) = b.slot.load_full() else {
                continue; // being connected again
            };
            let mut c = (*conn).clone();
            let mut inv = beat.prepare_invoke();
            inv.key(REPLICAS_KEY)
                .key(SINCE_KEY)
                .key(&b.held)
                .arg(&*b.replica)
                .arg(gap_ms)
                .arg(dead_ms)
                .arg(TICKET_TTL_S);
            match tokio::time::timeout(CALL_TIMEOUT, inv.invoke_async::<Vec<String>>(&mut c)).await
            {
                Ok(Ok(stopped)) => {
                    listed = true;
                    let stopped: Vec<String> =
                        stopped.into_iter().filter(|o| *o != *b.replica).collect();
                    // Busy with the last ones: they come again at a later beat.
                    if !stopped.is_empty() {
                        let _ = stopped_tx.try_send(stopped);
                    }
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "Redis did not take this replica's beat");
                    if transient(&e) {
                        drop_failed(&b.client, &b.slot, &b.connecting, &conn);
                    }
                }
                Err(_) => drop_failed(&b.client, &b.slot, &b.connecting, &conn),
            }
        }
    });
}

/// Gives back what the replicas the beat found stopped held, one replica after another.
fn spawn_reaper(b: Arc<Beats>, mut stopped: tokio::sync::mpsc::Receiver<Vec<String>>) {
    tokio::spawn(async move {
        let (cancel, forget) = (b.cancel.clone(), Script::new(FORGET));
        let dead_ms = b.dead_after.as_millis() as i64;
        while let Some(replicas) = stopped.recv().await {
            for other in &replicas {
                if b.stopping.load(Ordering::Acquire) {
                    return;
                }
                let Some(conn) = b.slot.load_full() else {
                    break;
                };
                let mut c = (*conn).clone();
                let mut given = 0;
                let done = reap(&mut c, &cancel, &forget, other, dead_ms, &mut given).await;
                if given > 0 {
                    tracing::warn!(
                        replica = %other,
                        requests = given,
                        "a replica stopped reaching Redis: what its requests in flight held (budget reservations, in-flight counts) is given back"
                    );
                }
                if let Err(e) = done {
                    tracing::warn!(replica = %other, error = %e, "cannot give back (all of) what a stopped replica held; tried again at a later beat");
                    break;
                }
            }
        }
    });
}

/// One entry of a replica's list of what it holds, for `ADMIT` to write: the arguments of
/// `CANCEL` (n, m, tokens, worst, as strings) and the keys before the ticket.
fn held_entry(args: &[i64], keys: &[String]) -> String {
    let n = 2 * args[0] + args[1];
    let nums = [args[0], args[1], args[2], args[3]].map(|a| a.to_string());
    let keys = &keys[..(n.max(0) as usize).min(keys.len())];
    // Strings and a list of strings: serializing cannot fail.
    serde_json::to_string(&(&nums[0], &nums[1], &nums[2], &nums[3], keys)).unwrap_or_default()
}

/// One entry of a replica's list of what it holds, as `held_entry` made it.
fn parse_held(entry: &str) -> Option<([i64; 4], Vec<String>)> {
    let (n, m, tokens, worst, keys): (String, String, String, String, Vec<String>) =
        serde_json::from_str(entry).ok()?;
    let nums = [n, m, tokens, worst].map(|v| v.parse::<i64>().ok());
    let [Some(n), Some(m), Some(tokens), Some(worst)] = nums else {
        return None;
    };
    (n >= 0 && m >= 0 && keys.len() as i64 == 2 * n + m).then_some(([n, m, tokens, worst], keys))
}

/// Entries of a stopped replica's holdings read, and given back, per round trip.
const REAP_BATCH: usize = 200;

/// Gives back what a stopped replica's requests held, each once (`CANCEL`, marking its
/// ticket `r`, so a settlement that still comes counts its cost), a batch per round trip,
/// then forgets the replica. Stops, giving back nothing more, if the replica speaks again.
/// Counts in `given` how many it gave back (also when a call fails midway).
async fn reap(
    c: &mut ConnectionManager,
    cancel: &Script,
    forget: &Script,
    replica: &str,
    dead_ms: i64,
    given: &mut usize,
) -> Result<(), redis::RedisError> {
    let held = held_key(replica);
    // Pipelined calls do not load a script Redis lacks (after a restart): load it first.
    let _: String = timed(cancel.prepare_invoke().load_async(c)).await?;
    let mut cursor = 0u64;
    loop {
        let (next, entries): (u64, Vec<(String, String)>) = timed(
            redis::cmd("HSCAN")
                .arg(&held)
                .arg(cursor)
                .arg("COUNT")
                .arg(REAP_BATCH)
                .query_async(c),
        )
        .await?;
        let mut pipe = redis::pipe();
        let mut invocations = Vec::with_capacity(entries.len());
        for (ticket, entry) in entries {
            let Some((args, mut keys)) = parse_held(&entry) else {
                tracing::error!(
                    replica,
                    "an entry of a stopped replica's holdings does not read; dropped"
                );
                pipe.cmd("HDEL").arg(&held).arg(&ticket).ignore();
                continue;
            };
            keys.extend([ticket, held.clone(), REPLICAS_KEY.to_string()]);
            let [n, m, tokens, worst] = args;
            let mut inv = invocation(cancel, &keys, &[n, m, tokens, worst, TICKET_TTL_S, 1]);
            inv.arg(replica).arg(dead_ms);
            invocations.push(inv);
        }
        for inv in &invocations {
            pipe.invoke_script(inv);
        }
        let done: Vec<i64> = if pipe.is_empty() {
            Vec::new()
        } else {
            timed(pipe.query_async(c)).await?
        };
        *given += done.iter().filter(|d| **d == 1).count();
        if done.contains(&-1) {
            return Ok(()); // it spoke again: alive
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    let mut inv = forget.prepare_invoke();
    inv.key(REPLICAS_KEY)
        .key(SINCE_KEY)
        .key(&held)
        .arg(replica)
        .arg(dead_ms);
    let _: i64 = timed(inv.invoke_async(c)).await?;
    Ok(())
}

/// Connects (again) in the background, with backoff, until Redis answers.
fn spawn_connect(
    client: redis::Client,
    slot: Arc<ArcSwapOption<ConnectionManager>>,
    connecting: Arc<AtomicBool>,
) {
    if connecting.swap(true, Ordering::AcqRel) {
        return; // already on it
    }
    tokio::spawn(async move {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(2))
            .set_response_timeout(CALL_TIMEOUT)
            .set_number_of_retries(1);
        let mut wait = Duration::from_millis(100);
        loop {
            match ConnectionManager::new_with_config(client.clone(), config.clone()).await {
                Ok(m) => {
                    slot.store(Some(Arc::new(m)));
                    connecting.store(false, Ordering::Release);
                    tracing::info!("connected to Redis: limits and budgets are shared");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reach Redis; retrying");
                    crate::telemetry::metrics::state_error("connect");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
            }
        }
    });
}

impl RedisState {
    /// Connects in the background; until Redis answers, `on_redis_error` applies.
    pub fn start(
        url: &str,
        budgets_fail: FailMode,
        limits_fail: FailMode,
        replica_timeout: Duration,
        ledger: crate::ledger::store::Store,
    ) -> Result<RedisState, String> {
        let client = crate::provider::tls::redis_client(url)?;
        let conn = Arc::new(ArcSwapOption::empty());
        let connecting = Arc::new(AtomicBool::new(false));
        let (settle, cancel) = (Script::new(SETTLE), Script::new(CANCEL));
        let retry_state = Arc::new(RetryState::default());
        let retries = spawn_retries(
            client.clone(),
            conn.clone(),
            connecting.clone(),
            settle.clone(),
            cancel.clone(),
            retry_state.clone(),
        );
        let replica: Arc<str> = format!("{:016x}", rand::random::<u64>()).into();
        let held = held_key(&replica);
        let stopping = Arc::new(AtomicBool::new(false));
        spawn_beats(Beats {
            client: client.clone(),
            slot: conn.clone(),
            connecting: connecting.clone(),
            cancel,
            replica: replica.clone(),
            held: held.clone(),
            dead_after: replica_timeout,
            stopping: stopping.clone(),
        });
        let state = RedisState {
            client,
            conn,
            connecting,
            admit: Script::new(ADMIT),
            settle,
            seed: Script::new(SEED),
            budgets_fail,
            limits_fail,
            ledger,
            retries,
            retry_state,
            held,
            replica,
            stopping,
        };
        spawn_connect(
            state.client.clone(),
            state.conn.clone(),
            state.connecting.clone(),
        );
        Ok(state)
    }

    fn conn(&self) -> Option<ConnectionManager> {
        self.conn.load_full().map(|c| (*c).clone())
    }

    /// The connection, and the handle `drop_used` compares: a call that fails drops the
    /// connection it ran on, not one made since by another call's failure.
    fn conn_used(&self) -> Option<(ConnectionManager, Arc<ConnectionManager>)> {
        self.conn.load_full().map(|c| ((*c).clone(), c))
    }

    /// Drops `used` and connects anew in the background, unless it was replaced already: a
    /// call that failed or timed out leaves no half-dead connection behind.
    fn drop_used(&self, used: &Arc<ConnectionManager>) {
        drop_failed(&self.client, &self.conn, &self.connecting, used);
    }

    /// Cancels, in the background, an admission whose answer never came (`CANCEL`).
    fn cancel_later(&self, plan: &Plan, keys: Vec<String>, worst: i64) {
        let args = vec![
            plan.limits.len() as i64,
            plan.budgets.len() as i64,
            plan.tokens as i64,
            worst,
            CANCELLED_TTL_S,
            0,
        ];
        self.retry_later(RetryKind::Cancel, keys, args);
    }

    /// Queues a call (one that applies at most once) to be sent again until Redis takes it.
    fn retry_later(&self, what: RetryKind, keys: Vec<String>, args: Vec<i64>) {
        let retry = Retry {
            what,
            keys,
            args,
            until: tokio::time::Instant::now() + RETRY_FOR,
        };
        self.retry_state.waiting.fetch_add(1, Ordering::AcqRel);
        if self.retries.try_send(retry).is_err() {
            self.retry_state.waiting.fetch_sub(1, Ordering::AcqRel);
            crate::telemetry::metrics::state_error(what.operation());
            tracing::error!(
                what = what.name(),
                "too many Redis calls wait to be sent again; this one is given up (its reservation stays until its period ends)"
            );
        }
    }

    /// What to do when Redis is down for this plan.
    fn on_error(&self, plan: &Plan, what: &str) -> Result<Admitted, Refused> {
        crate::telemetry::metrics::state_error(what);
        let closed = (!plan.budgets.is_empty() && self.budgets_fail == FailMode::Closed)
            || (!plan.limits.is_empty() && self.limits_fail == FailMode::Closed);
        if closed {
            Err(Refused::Unavailable)
        } else {
            // Open: admit, and settle nothing (the periods list stays empty).
            Ok(Admitted::default())
        }
    }

    /// Runs `SEED` for one budget's key with `spent` from the ledger.
    async fn seed_key(
        &self,
        conn: &mut ConnectionManager,
        budget: &BudgetRef,
        period_start: i64,
        spent: f64,
        read_ms: i64,
        again: bool,
    ) -> Result<(), redis::RedisError> {
        let mut inv = self.seed.prepare_invoke();
        inv.key(budget_key(&budget.id, period_start))
            .arg(nanos_up(spent))
            .arg(budget.soft_usd.map_or(-1, nanos))
            .arg(budget_ttl(budget, crate::ledger::now_ms()))
            .arg(i64::from(again))
            .arg(read_ms)
            .arg(crate::ledger::now_ms());
        timed(inv.invoke_async::<i64>(conn)).await.map(|_| ())
    }

    /// A budget key that was never seeded (Redis lost its data, or a new period began): its
    /// spend is read from the ledger and seeded. `false` when that could not be done.
    async fn reseed(&self, budget: &BudgetRef, period_start: i64) -> bool {
        let read_ms = crate::ledger::store::ledger_read_ms();
        let spent = match self
            .ledger
            .spent_since(budget.scope.ledger_scope(), period_start)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(budget = %budget.id, error = %e, "cannot read the ledger to seed a budget in Redis");
                return false;
            }
        };
        let Some(mut conn) = self.conn() else {
            return false;
        };
        match self
            .seed_key(&mut conn, budget, period_start, spent, read_ms, false)
            .await
        {
            Ok(()) => {
                tracing::info!(budget = %budget.id, spent, "budget seeded in Redis from the ledger");
                true
            }
            Err(e) => {
                tracing::warn!(budget = %budget.id, error = %e, "cannot seed a budget in Redis");
                false
            }
        }
    }

    async fn admit_redis(&self, plan: &Plan, now_ms: i64) -> Result<Admitted, Refused> {
        if plan.limits.is_empty() && plan.budgets.is_empty() {
            return Ok(Admitted::default());
        }
        // Each budget key found unseeded is seeded, then the admission runs again.
        for _ in 0..=plan.budgets.len() {
            let j = match self.admit_once(plan, now_ms).await {
                Once::Decided(result) => return result,
                Once::Unseeded(j) => j,
            };
            let b = &plan.budgets[j];
            let (start, _) = period_bounds(b.period, now_ms);
            if !self.reseed(b, start).await {
                return self.on_error(plan, "admit");
            }
        }
        self.on_error(plan, "admit")
    }

    /// One run of `ADMIT`.
    async fn admit_once(&self, plan: &Plan, now_ms: i64) -> Once {
        let Some((mut conn, used)) = self.conn_used() else {
            tracing::warn!("Redis is not connected: admission falls back to on_redis_error");
            return Once::Decided(self.on_error(plan, "admit"));
        };
        let minute = (now_ms.max(0) as u64) / 60_000;
        let worst = nanos_up(plan.worst_usd);
        let mut periods = Vec::with_capacity(plan.budgets.len());
        for b in plan.budgets.iter() {
            let (start, _) = period_bounds(b.period, now_ms);
            periods.push((b.id.clone(), start));
        }
        let ticket: Arc<str> = format!("{:032x}", rand::random::<u128>()).into();
        let keys = script_keys(plan, minute, &periods, &ticket, &self.held);
        let mut args = vec![
            plan.limits.len() as i64,
            plan.budgets.len() as i64,
            plan.tokens as i64,
            worst,
            120,
            TICKET_TTL_S,
        ];
        let opt = |v: Option<u64>| v.map_or(-1, |x| x as i64);
        for l in plan.limits.iter() {
            args.extend([opt(l.rpm), opt(l.tpm), opt(l.max_parallel)]);
        }
        for b in plan.budgets.iter() {
            args.extend([nanos(b.usd), budget_ttl(b, now_ms)]);
        }
        let mut inv = invocation(&self.admit, &keys, &args);
        inv.arg(held_entry(&args[..4], &keys));
        // Sent, perhaps, and run: until Redis answers, what it may have taken is given back
        // should the call fail, time out, or this future be dropped (its client gone while
        // Redis was slow: its request is never settled).
        let mut pending = PendingAdmission {
            state: self,
            plan,
            keys: Some(keys),
            worst,
        };
        let reply: Vec<i64> =
            match tokio::time::timeout(CALL_TIMEOUT, inv.invoke_async(&mut conn)).await {
                Ok(Ok(r)) => {
                    pending.keys = None;
                    r
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "Redis admission failed");
                    if connection_lost(&e) {
                        self.drop_used(&used);
                    } else {
                        // Redis's own answer (a script's error): it took nothing.
                        pending.keys = None;
                    }
                    return Once::Decided(self.on_error(plan, "admit"));
                }
                Err(_) => {
                    tracing::warn!("Redis admission timed out");
                    self.drop_used(&used);
                    return Once::Decided(self.on_error(plan, "admit"));
                }
            };
        let to_next_minute = Duration::from_millis(60_000 - (now_ms.max(0) as u64 % 60_000));
        if reply.first() == Some(&-3) {
            // This ticket was cancelled: only after a call with it timed out, so not here.
            return Once::Decided(self.on_error(plan, "admit"));
        }
        if reply.first() == Some(&-2) {
            let j = reply.get(1).copied().unwrap_or(1).max(1) as usize - 1;
            return Once::Unseeded(j.min(plan.budgets.len().saturating_sub(1)));
        }
        Once::Decided(match reply.first().copied() {
            Some(1) => {
                let mut headers = LimitHeaders::default();
                for (i, l) in plan.limits.iter().enumerate() {
                    let used_r = reply.get(1 + 2 * i).copied().unwrap_or(0).max(0) as u64;
                    let used_t = reply.get(2 + 2 * i).copied().unwrap_or(0).max(0) as u64;
                    if let Some(rpm) = l.rpm {
                        let rem = rpm.saturating_sub(used_r);
                        if headers.requests.is_none_or(|(_, r)| rem < r) {
                            headers.requests = Some((rpm, rem));
                        }
                    }
                    if let Some(tpm) = l.tpm {
                        let rem = tpm.saturating_sub(used_t);
                        if headers.tokens.is_none_or(|(_, r)| rem < r) {
                            headers.tokens = Some((tpm, rem));
                        }
                    }
                }
                Ok(Admitted {
                    minute,
                    periods,
                    headers,
                    counted: true,
                    ticket: Some(ticket),
                    at_ms: now_ms,
                })
            }
            Some(0) => {
                let i = reply.get(1).copied().unwrap_or(1).max(1) as usize - 1;
                let l = &plan.limits[i.min(plan.limits.len().saturating_sub(1))];
                let (req, tok) = (
                    reply.get(3).copied().unwrap_or(0).max(0) as u64,
                    reply.get(4).copied().unwrap_or(0).max(0) as u64,
                );
                let h = LimitHeaders {
                    requests: l.rpm.map(|r| (r, r.saturating_sub(req))),
                    tokens: l.tpm.map(|t| (t, t.saturating_sub(tok))),
                };
                let (what, retry_after) = match reply.get(2).copied() {
                    Some(1) => ("requests per minute", to_next_minute),
                    Some(2) => ("tokens per minute", to_next_minute),
                    _ => ("requests in parallel", Duration::from_secs(1)),
                };
                Err(Refused::Rate {
                    limit: l.id.clone(),
                    what,
                    retry_after,
                    headers: h,
                })
            }
            _ => {
                let j = reply.get(1).copied().unwrap_or(1).max(1) as usize - 1;
                let b = &plan.budgets[j.min(plan.budgets.len().saturating_sub(1))];
                let (_, next) = period_bounds(b.period, now_ms);
                Err(Refused::Budget {
                    budget: b.clone(),
                    spent: reply.get(2).copied().unwrap_or(0) as f64 / 1e9,
                    reserved: reply.get(3).copied().unwrap_or(0) as f64 / 1e9,
                    retry_after: next.map(|n| Duration::from_millis((n - now_ms).max(0) as u64)),
                    first_in_period: reply.get(4).copied() == Some(1),
                })
            }
        })
    }

    async fn settle_redis(&self, plan: &Plan, admitted: &Admitted, actual: Actual) -> Vec<Alert> {
        if !admitted.counted {
            return Vec::new();
        }
        let _settling = Settling::start(&self.retry_state);
        let ticket = admitted.ticket.as_deref().unwrap_or("");
        let keys = script_keys(plan, admitted.minute, &admitted.periods, ticket, &self.held);
        let mut args = vec![
            plan.limits.len() as i64,
            admitted.periods.len() as i64,
            plan.tokens as i64,
            actual.tokens as i64,
            nanos_up(plan.worst_usd),
            nanos_up(actual.cost_usd),
        ];
        args.extend(plan.budgets.iter().map(|b| b.soft_usd.map_or(-1, nanos)));
        args.extend([admitted.at_ms, actual.ended_ms]);
        let Some((mut conn, used)) = self.conn_used() else {
            // Being connected again (after a call that failed): sent once it is.
            crate::telemetry::metrics::state_error("settle");
            tracing::warn!("Redis is not connected: the settlement is sent once it is");
            self.retry_later(RetryKind::Settle, keys, args);
            return Vec::new();
        };
        let inv = invocation(&self.settle, &keys, &args);
        let reply: Vec<i64> = match tokio::time::timeout(CALL_TIMEOUT, inv.invoke_async(&mut conn))
            .await
        {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                crate::telemetry::metrics::state_error("settle");
                // An answer of Redis's own (a script's error) is no reason to drop the
                // connection, and refuse admissions while it is made again.
                if connection_lost(&e) {
                    self.drop_used(&used);
                }
                if transient(&e) {
                    tracing::warn!(error = %e, "Redis settlement failed; it is sent again in the background");
                    self.retry_later(RetryKind::Settle, keys, args);
                } else {
                    tracing::error!(error = %e, "Redis settlement failed; the reservation stays until its period ends");
                }
                return Vec::new();
            }
            Err(_) => {
                crate::telemetry::metrics::state_error("settle");
                tracing::warn!("Redis settlement timed out; it is sent again in the background");
                self.drop_used(&used);
                self.retry_later(RetryKind::Settle, keys, args);
                return Vec::new();
            }
        };
        plan.budgets
            .iter()
            .enumerate()
            .filter(|(j, _)| reply.get(2 * j).copied() == Some(1))
            .map(|(j, b)| Alert {
                kind: "soft",
                scope: b.scope.kind(),
                name: b.scope.name().to_string(),
                spent: reply.get(2 * j + 1).copied().unwrap_or(0) as f64 / 1e9,
                limit: b.soft_usd.unwrap_or(b.usd),
                period: period_name(b.period),
            })
            .collect()
    }
}

impl RedisState {
    /// At exit: this replica stops saying it is alive, and leaves the list of replicas, or,
    /// with something still held (a settlement Redis did not take), is marked stopped, so
    /// the others give it back at once.
    async fn leave(&self) {
        self.stopping.store(true, Ordering::Release);
        let Some(mut conn) = self.conn() else { return };
        let leave = Script::new(LEAVE);
        let mut inv = leave.prepare_invoke();
        inv.key(REPLICAS_KEY)
            .key(SINCE_KEY)
            .key(&self.held)
            .arg(&*self.replica);
        if let Err(e) = timed(inv.invoke_async::<i64>(&mut conn)).await {
            tracing::warn!(error = %e, "cannot tell Redis this replica stops; the others find it stopped after state.replica_timeout");
        }
    }
}

impl PolicyState for RedisState {
    fn admit<'a>(
        &'a self,
        plan: &'a Plan,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<Admitted, Refused>> {
        Box::pin(self.admit_redis(plan, now_ms))
    }

    fn settle<'a>(
        &'a self,
        plan: &'a Plan,
        admitted: &'a Admitted,
        actual: Actual,
    ) -> BoxFuture<'a, Vec<Alert>> {
        Box::pin(self.settle_redis(plan, admitted, actual))
    }

    fn drain(&self, within: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + within;
            loop {
                // Sent again, or still in their first sending (which may time out, and then
                // be sent again).
                let waiting = self.retry_state.waiting.load(Ordering::Acquire)
                    + self.retry_state.settling.load(Ordering::Acquire);
                if waiting == 0 {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    crate::telemetry::metrics::state_error("settle");
                    tracing::error!(
                        calls = waiting,
                        "Redis calls still to be sent again at exit; the other replicas give back their reservations"
                    );
                    break;
                }
                self.retry_state.now.notify_one();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            self.leave().await;
        })
    }

    fn seed_spent<'a>(
        &'a self,
        budget: &'a BudgetRef,
        period_start: i64,
        spent: f64,
        read_ms: i64,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            // Wait a little for the first connection: seeding happens at start.
            for _ in 0..20 {
                if self.conn().is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let Some(mut conn) = self.conn() else { return };
            // The first replica to start seeds; the others find the figure there.
            if let Err(e) = self
                .seed_key(&mut conn, budget, period_start, spent, read_ms, true)
                .await
            {
                tracing::warn!(error = %e, budget = %budget.id, "cannot seed a budget in Redis");
            }
        })
    }

    fn budget_status<'a>(
        &'a self,
        budget: &'a BudgetRef,
        period_start: i64,
    ) -> BoxFuture<'a, Option<(f64, f64)>> {
        Box::pin(async move {
            let mut conn = self.conn()?;
            let key = budget_key(&budget.id, period_start);
            let r: Result<(Option<i64>, Option<i64>), _> = timed(
                redis::cmd("HMGET")
                    .arg(&key)
                    .arg("s")
                    .arg("r")
                    .query_async(&mut conn),
            )
            .await;
            let (s, r) = r.ok()?;
            Some((s.unwrap_or(0) as f64 / 1e9, r.unwrap_or(0) as f64 / 1e9))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::parse_held;

    #[test]
    fn a_held_entry_reads_back_as_written() {
        let keys: Vec<String> = ["w", "p", "b\"/\\", "t", "held", "replicas"]
            .map(String::from)
            .to_vec();
        let entry = super::held_entry(&[1, 1, 20, 1_000_000_000_000_000], &keys);
        let (args, back) = parse_held(&entry).unwrap();
        assert_eq!(args, [1, 1, 20, 1_000_000_000_000_000]);
        assert_eq!(back, keys[..3]);
    }

    #[test]
    fn a_held_entry_reads_as_a_json_writer_may_write_it() {
        // Strings as sent, `/` escaped (as Redis's cjson wrote them in the first version).
        let e = r#"["1","1","20","1000000000000000",["{switchyard}:w:key:a\/b:1","{switchyard}:p:key:a\/b","{switchyard}:bn:key:a\/b:0"]]"#;
        let (args, keys) = parse_held(e).unwrap();
        assert_eq!(args, [1, 1, 20, 1_000_000_000_000_000]);
        assert_eq!(keys[0], "{switchyard}:w:key:a/b:1");
        assert_eq!(keys.len(), 3);
        // Keys that do not match the counts, or numbers that do not read, are refused.
        assert!(parse_held(r#"["1","1","20","5",["a","b"]]"#).is_none());
        assert!(parse_held(r#"["1","x","20","5",["a","b","c"]]"#).is_none());
        assert!(parse_held(r#"["-1","3","20","5",["a"]]"#).is_none());
        assert!(parse_held("{}").is_none());
    }
}
