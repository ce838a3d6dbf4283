//! Deployment state shared by replicas through Redis, twice a second, off the request path
//! (picking a deployment never waits on Redis): cooldowns (a replica that cools a deployment
//! down publishes the end; the others cool down too) and upstream quota counters (each
//! replica adds what it sent this minute and learns the fleet's total).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::AsyncCommands;

use super::state::{now_ms, StateRegistry};

const SYNC_EVERY: Duration = Duration::from_millis(500);

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn key(label: &str) -> String {
    format!("{{switchyard}}:cooldown:{label}")
}

/// Runs the sync until the process ends; Redis being away only pauses it.
pub fn spawn_cooldown_sync(url: &str, registry: Arc<StateRegistry>) -> Result<(), String> {
    let client = crate::provider::tls::redis_client(url)?;
    tokio::spawn(async move {
        let mut conn: Option<redis::aio::MultiplexedConnection> = None;
        let mut tick = tokio::time::interval(SYNC_EVERY);
        loop {
            tick.tick().await;
            if conn.is_none() {
                conn = tokio::time::timeout(
                    Duration::from_secs(2),
                    client.get_multiplexed_async_connection(),
                )
                .await
                .ok()
                .and_then(Result::ok);
            }
            let Some(c) = conn.as_mut() else { continue };
            if tokio::time::timeout(Duration::from_secs(2), sync_once(c, &registry))
                .await
                .map_or(true, |r| r.is_err())
            {
                crate::telemetry::metrics::state_error("cooldown_sync");
                conn = None;
            }
        }
    });
    Ok(())
}

async fn sync_once(
    conn: &mut redis::aio::MultiplexedConnection,
    registry: &StateRegistry,
) -> redis::RedisResult<()> {
    let states = registry.snapshot();
    if states.is_empty() {
        return Ok(());
    }
    let (now_mono, now_wall) = (now_ms(), wall_ms());
    // Ours out: each cooldown this replica holds, as a wall-clock end with a matching expiry.
    let mut pipe = redis::pipe();
    let mut any = false;
    for (label, s) in &states {
        if let Some(until) = s.cooling_until() {
            let left = until - now_mono;
            pipe.cmd("SET")
                .arg(key(label))
                .arg(now_wall + left)
                .arg("PX")
                .arg(left.max(1))
                .ignore();
            any = true;
        }
    }
    if any {
        let _: () = pipe.query_async(conn).await?;
    }
    // Quota counters: add ours, read the fleet's total.
    let mut pipe = redis::pipe();
    let mut own = Vec::with_capacity(states.len());
    for (label, s) in &states {
        let Some((minute, dr, dt, own_r, own_t)) = s.take_unsynced() else {
            continue;
        };
        let k = format!("{{switchyard}}:quota:{label}:{minute}");
        // HINCRBY takes a signed 64-bit step: a client's `max_tokens` can be any u64.
        let step = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        pipe.hincr(&k, "r", step(dr))
            .hincr(&k, "t", step(dt))
            .expire(&k, 120)
            .ignore();
        own.push((s.clone(), minute, (own_r, own_t)));
    }
    if !own.is_empty() {
        let totals: Vec<(u64, u64)> = pipe
            .query_async::<Vec<u64>>(conn)
            .await?
            .chunks(2)
            .map(|c| (c[0], c.get(1).copied().unwrap_or(0)))
            .collect();
        for ((s, minute, mine), total) in own.iter().zip(totals) {
            s.set_fleet(*minute, total, *mine);
        }
    }
    // Cooldowns in.
    let keys: Vec<String> = states.iter().map(|(l, _)| key(l)).collect();
    let ends: Vec<Option<u64>> = conn.mget(&keys).await?;
    for ((_, s), end) in states.iter().zip(ends) {
        if let Some(end) = end.filter(|e| *e > now_wall) {
            s.apply_remote_cooldown(now_mono + (end - now_wall));
        }
    }
    Ok(())
}
