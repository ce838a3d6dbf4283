//! The live state of each deployment: requests in flight, moving latencies, the upstream
//! quota used this minute (and what the upstream said is left), failures in a row and
//! cooldowns. It lives outside a config generation, keyed by `provider/deployment`, so it
//! survives a reload for every deployment that still exists. Counters are atomics; the one
//! mutex (the quota window) is never held across an `.await`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds on the gateway's monotonic clock (since the process started).
pub fn now_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// The current wall-clock minute: quota windows follow the upstream's per-minute budget.
pub fn current_minute() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() / 60)
        .unwrap_or(0)
}

/// Time until the wall-clock minute turns (and quota windows start empty).
pub fn until_next_minute() -> Duration {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    Duration::from_millis(60_000 - ms % 60_000)
}

/// Weight of the newest sample in the moving averages.
const EWMA_ALPHA: f64 = 0.3;

#[derive(Debug, Default)]
pub struct DeploymentState {
    pub in_flight: AtomicU64,
    /// f64 bits, milliseconds; 0 until the first sample.
    latency_ms: AtomicU64,
    ttft_ms: AtomicU64,
    fails_in_row: AtomicU32,
    /// `now_ms()` until which the deployment cools down; 0: not cooling down.
    cooldown_until: AtomicU64,
    /// A cooldown ended and one probe request is deciding whether the deployment is back.
    probing: AtomicBool,
    /// The provider's active health check failed: out of rotation until it passes.
    check_failed: AtomicBool,
    quota: Mutex<QuotaWindow>,
}

/// What was sent to a deployment in one minute, and what its upstream said was left.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QuotaWindow {
    pub minute: u64,
    pub requests: u64,
    pub tokens: u64,
    pub upstream_remaining_requests: Option<u64>,
    pub upstream_remaining_tokens: Option<u64>,
    /// What the other replicas sent this minute, as of the last sync through Redis.
    pub others_requests: u64,
    pub others_tokens: u64,
    /// What this replica sent since the last sync.
    unsynced_requests: u64,
    unsynced_tokens: u64,
}

impl QuotaWindow {
    fn roll(&mut self, minute: u64) {
        if self.minute != minute {
            *self = QuotaWindow {
                minute,
                ..Default::default()
            };
        }
    }

    /// Whether a request of `tokens` estimated tokens fits in `minute`.
    pub fn fits(&mut self, minute: u64, tokens: u64, rpm: Option<u64>, tpm: Option<u64>) -> bool {
        self.roll(minute);
        let (sent_requests, sent_tokens) = (
            self.requests.saturating_add(self.others_requests),
            self.tokens.saturating_add(self.others_tokens),
        );
        let rpm_ok = rpm.is_none_or(|r| sent_requests < r);
        let tpm_ok =
            tpm.is_none_or(|t| sent_tokens.saturating_add(tokens) <= t || sent_tokens == 0);
        let upstream_ok = self.upstream_remaining_requests.is_none_or(|r| r > 0)
            && self
                .upstream_remaining_tokens
                .is_none_or(|t| t >= tokens.max(1));
        rpm_ok && tpm_ok && upstream_ok
    }

    pub fn take(&mut self, minute: u64, tokens: u64) {
        self.roll(minute);
        self.requests += 1;
        // A client's `max_tokens` can be any u64.
        self.tokens = self.tokens.saturating_add(tokens);
        self.unsynced_requests += 1;
        self.unsynced_tokens = self.unsynced_tokens.saturating_add(tokens);
        // Until the upstream says again, count down what it said was left.
        if let Some(r) = &mut self.upstream_remaining_requests {
            *r = r.saturating_sub(1);
        }
        if let Some(t) = &mut self.upstream_remaining_tokens {
            *t = t.saturating_sub(tokens);
        }
    }
}

/// Whether a deployment may take a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Up,
    /// Cooling down for this long still.
    CoolingDown(Duration),
    /// The cooldown is over and no probe is out: the next request is the probe.
    ProbeDue,
    /// The probe is out; wait for its answer.
    Probing,
    /// The provider's health check fails.
    Down,
}

impl DeploymentState {
    pub fn health(&self, now: u64) -> Health {
        if self.check_failed.load(Ordering::Acquire) {
            return Health::Down;
        }
        let until = self.cooldown_until.load(Ordering::Acquire);
        if until == 0 {
            return Health::Up;
        }
        if now < until {
            return Health::CoolingDown(Duration::from_millis(until - now));
        }
        if self.probing.load(Ordering::Acquire) {
            Health::Probing
        } else {
            Health::ProbeDue
        }
    }

    /// The result of the provider's active health check.
    pub fn set_checked(&self, healthy: bool) {
        let was = self.check_failed.swap(!healthy, Ordering::AcqRel);
        if was == healthy {
            tracing::info!(healthy, "health check changed a deployment's state");
        }
    }

    /// Claims the probe after a cooldown; only one request gets it.
    pub fn claim_probe(&self) -> bool {
        self.probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    pub fn quota_fits(&self, tokens: u64, rpm: Option<u64>, tpm: Option<u64>) -> bool {
        let minute = current_minute();
        self.quota
            .lock()
            .map(|mut q| q.fits(minute, tokens, rpm, tpm))
            .unwrap_or(true)
    }

    pub fn take_quota(&self, tokens: u64) {
        let minute = current_minute();
        if let Ok(mut q) = self.quota.lock() {
            q.take(minute, tokens);
        }
    }

    pub fn quota(&self) -> QuotaWindow {
        let minute = current_minute();
        self.quota
            .lock()
            .map(|mut q| {
                q.roll(minute);
                *q
            })
            .unwrap_or_default()
    }

    /// This minute's sends not yet shared, handed to the sync (and counted as shared):
    /// `(minute, requests, tokens, own requests, own tokens)`.
    pub fn take_unsynced(&self) -> Option<(u64, u64, u64, u64, u64)> {
        let minute = current_minute();
        let mut q = self.quota.lock().ok()?;
        q.roll(minute);
        let out = (
            minute,
            q.unsynced_requests,
            q.unsynced_tokens,
            q.requests,
            q.tokens,
        );
        q.unsynced_requests = 0;
        q.unsynced_tokens = 0;
        Some(out)
    }

    /// The fleet's totals for `minute` after a sync: the others' share is what is not ours.
    pub fn set_fleet(&self, minute: u64, total: (u64, u64), own: (u64, u64)) {
        if let Ok(mut q) = self.quota.lock() {
            if q.minute == minute {
                q.others_requests = total.0.saturating_sub(own.0);
                q.others_tokens = total.1.saturating_sub(own.1);
            }
        }
    }

    /// What the upstream said is left this minute (`x-ratelimit-remaining-*`). Negative
    /// values (Azure's `-1` on some Responses calls) mean "no figure", not "exhausted".
    pub fn learn_remaining(&self, requests: Option<i64>, tokens: Option<i64>) {
        let minute = current_minute();
        if let Ok(mut q) = self.quota.lock() {
            q.roll(minute);
            if let Some(r) = requests.filter(|r| *r >= 0) {
                q.upstream_remaining_requests = Some(r as u64);
            }
            if let Some(t) = tokens.filter(|t| *t >= 0) {
                q.upstream_remaining_tokens = Some(t as u64);
            }
        }
    }

    /// The upstream answered the request (a success): it is up. A refusal of the client's
    /// own request (a 400) is no such answer (`release_probe` only).
    ///
    /// An answer to a request sent before a cooldown began (a long stream ending after a
    /// 429's `retry-after`) does not end that cooldown early.
    pub fn answered(&self) {
        self.fails_in_row.store(0, Ordering::Release);
        self.came_back();
    }

    /// Up: a probe's verdict, and the end of a cooldown that is over.
    fn came_back(&self) {
        let until = self.cooldown_until.load(Ordering::Acquire);
        if until != 0 && now_ms() >= until {
            self.cooldown_until.store(0, Ordering::Release);
        }
        self.probing.store(false, Ordering::Release);
    }

    /// A probe that ended without an answer either way (the client went away): the next
    /// request may probe again.
    pub fn release_probe(&self) {
        self.probing.store(false, Ordering::Release);
    }

    /// An event stream's first event: up, as `success` says, but its failures in a row end
    /// only with the stream (`stream_ended`), which may still break off.
    pub fn first_event(&self, ttft: Duration) {
        self.came_back();
        ewma(&self.ttft_ms, ttft.as_secs_f64() * 1000.0);
    }

    /// A plain answer's head: up (as `success` says) and a latency sample, but its failures
    /// in a row end only with its body, whole (`stream_ended`): one whose body breaks off is
    /// a failure (`route::TrackedBody`).
    pub fn began(&self, latency: Duration) {
        self.came_back();
        ewma(&self.latency_ms, latency.as_secs_f64() * 1000.0);
    }

    /// An answer (an event stream, a plain body) that reached its end.
    pub fn stream_ended(&self) {
        self.fails_in_row.store(0, Ordering::Release);
    }

    pub fn success(&self, latency: Option<Duration>, ttft: Option<Duration>) {
        self.answered();
        if let Some(l) = latency {
            ewma(&self.latency_ms, l.as_secs_f64() * 1000.0);
        }
        if let Some(t) = ttft {
            ewma(&self.ttft_ms, t.as_secs_f64() * 1000.0);
        }
    }

    /// A failure that says something about the deployment (not the client's request).
    /// Returns whether the deployment now cools down.
    pub fn failure(
        &self,
        allowed_fails: u32,
        cooldown: Duration,
        retry_after: Option<Duration>,
    ) -> bool {
        let fails = self.fails_in_row.fetch_add(1, Ordering::AcqRel) + 1;
        let was_probe = self.probing.swap(false, Ordering::AcqRel);
        let wait = match retry_after {
            Some(ra) if !ra.is_zero() => Some(ra),
            _ if was_probe || fails >= allowed_fails.max(1) => Some(cooldown),
            _ => None,
        };
        match wait {
            Some(w) => {
                let until = now_ms() + (w.as_millis() as u64).max(1);
                self.cooldown_until.store(until, Ordering::Release);
                true
            }
            None => false,
        }
    }

    /// The end of the current cooldown on the monotonic clock, if cooling down.
    pub fn cooling_until(&self) -> Option<u64> {
        let until = self.cooldown_until.load(Ordering::Acquire);
        (until > now_ms()).then_some(until)
    }

    /// A cooldown another replica set: taken when it ends later than ours.
    pub fn apply_remote_cooldown(&self, until: u64) {
        let _ = self
            .cooldown_until
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |mine| {
                (until > mine.max(now_ms())).then_some(until)
            });
    }

    pub fn fails_in_row(&self) -> u32 {
        self.fails_in_row.load(Ordering::Acquire)
    }

    /// The moving average of latency (or of time to first token, for streams), if known.
    pub fn latency(&self, stream: bool) -> Option<f64> {
        let cell = if stream {
            &self.ttft_ms
        } else {
            &self.latency_ms
        };
        let v = f64::from_bits(cell.load(Ordering::Acquire));
        if v > 0.0 {
            return Some(v);
        }
        // A stream with no TTFT sample yet falls back to the plain latency, and back.
        let other = if stream {
            &self.latency_ms
        } else {
            &self.ttft_ms
        };
        let v = f64::from_bits(other.load(Ordering::Acquire));
        (v > 0.0).then_some(v)
    }
}

fn ewma(cell: &AtomicU64, sample: f64) {
    let sample = sample.max(0.001);
    let _ = cell.fetch_update(Ordering::AcqRel, Ordering::Acquire, |bits| {
        let old = f64::from_bits(bits);
        let new = if old > 0.0 {
            old + EWMA_ALPHA * (sample - old)
        } else {
            sample
        };
        Some(new.to_bits())
    });
}

/// Deployment states by `provider/deployment`, shared across config generations.
#[derive(Default)]
pub struct StateRegistry {
    states: Mutex<HashMap<String, Arc<DeploymentState>>>,
}

impl StateRegistry {
    pub fn get(&self, label: &str) -> Arc<DeploymentState> {
        match self.states.lock() {
            Ok(mut m) => m.entry(label.to_string()).or_default().clone(),
            Err(_) => Arc::default(),
        }
    }

    /// Every deployment state, with its label.
    pub fn snapshot(&self) -> Vec<(String, Arc<DeploymentState>)> {
        self.states
            .lock()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    /// Forgets deployments that the new config no longer has.
    pub fn retain(&self, labels: &std::collections::HashSet<String>) {
        if let Ok(mut m) = self.states.lock() {
            m.retain(|k, _| labels.contains(k));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_window_fills_and_rolls_over_with_the_minute() {
        let mut q = QuotaWindow::default();
        assert!(q.fits(100, 400, None, Some(1000)));
        q.take(100, 400);
        assert!(q.fits(100, 400, None, Some(1000)));
        q.take(100, 400);
        assert!(!q.fits(100, 400, None, Some(1000)), "800 + 400 > 1000");
        assert!(
            q.fits(101, 400, None, Some(1000)),
            "a new minute starts empty"
        );
        q.take(101, 1);
        assert!(!q.fits(101, 1, Some(1), None), "rpm 1 used");
    }

    #[test]
    fn upstream_remaining_steers_away_and_ignores_minus_one() {
        let s = DeploymentState::default();
        s.learn_remaining(Some(-1), Some(-1));
        assert!(s.quota_fits(10, None, None));
        s.learn_remaining(Some(0), None);
        assert!(!s.quota_fits(10, None, None));
    }

    #[test]
    fn cooldown_after_allowed_fails_then_one_probe() {
        let s = DeploymentState::default();
        let cd = Duration::from_millis(50);
        assert!(!s.failure(2, cd, None));
        assert_eq!(s.health(now_ms()), Health::Up);
        assert!(s.failure(2, cd, None));
        assert!(matches!(s.health(now_ms()), Health::CoolingDown(_)));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(s.health(now_ms()), Health::ProbeDue);
        assert!(s.claim_probe());
        assert!(!s.claim_probe(), "one probe only");
        assert_eq!(s.health(now_ms()), Health::Probing);
        // The probe fails: straight back into cooldown.
        assert!(s.failure(2, cd, None));
        assert!(matches!(s.health(now_ms()), Health::CoolingDown(_)));
        std::thread::sleep(Duration::from_millis(60));
        assert!(s.claim_probe());
        s.success(Some(Duration::from_millis(5)), None);
        assert_eq!(s.health(now_ms()), Health::Up);
        assert_eq!(s.fails_in_row(), 0);
    }

    #[test]
    fn retry_after_cools_down_at_once() {
        let s = DeploymentState::default();
        assert!(s.failure(
            3,
            Duration::from_secs(30),
            Some(Duration::from_millis(1500))
        ));
        match s.health(now_ms()) {
            Health::CoolingDown(d) => {
                assert!(d <= Duration::from_millis(1500) && d > Duration::from_millis(1000))
            }
            h => panic!("{h:?}"),
        }
    }

    #[test]
    fn moving_latency() {
        let s = DeploymentState::default();
        assert_eq!(s.latency(false), None);
        s.success(Some(Duration::from_millis(100)), None);
        assert_eq!(s.latency(false), Some(100.0));
        s.success(Some(Duration::from_millis(200)), None);
        assert!((s.latency(false).unwrap() - 130.0).abs() < 1e-6);
        assert_eq!(s.latency(true), Some(130.0), "no TTFT yet: plain latency");
    }
}
