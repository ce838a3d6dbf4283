//! Cooldowns shared by replicas through Redis. A replica that cools a deployment down
//! publishes the end of the cooldown; every replica reads them all twice a second and cools
//! down too. Off the request path: picking a deployment never waits on Redis.

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
    let client = redis::Client::open(url).map_err(|e| format!("bad state.redis URL: {e}"))?;
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
    // Theirs in.
    let keys: Vec<String> = states.iter().map(|(l, _)| key(l)).collect();
    let ends: Vec<Option<u64>> = conn.mget(&keys).await?;
    for ((_, s), end) in states.iter().zip(ends) {
        if let Some(end) = end.filter(|e| *e > now_wall) {
            s.apply_remote_cooldown(now_mono + (end - now_wall));
        }
    }
    Ok(())
}
