//! Limits and budgets in process: one mutex over every counter, so an admission checks and
//! reserves everything in one step. The lock is never held across an `.await`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;

use super::{nanos, nanos_up};
use super::{
    period_bounds, period_name, Actual, Admitted, Alert, BudgetRef, LimitHeaders, Plan,
    PolicyState, Refused,
};

#[derive(Debug, Default)]
struct Window {
    minute: u64,
    requests: u64,
    tokens: u64,
    in_flight: u64,
}

#[derive(Debug, Default)]
struct Budget {
    period_start: i64,
    spent: f64,
    reserved: f64,
    soft_alerted: bool,
    hard_alerted: bool,
}

impl Budget {
    fn roll(&mut self, start: i64) {
        if self.period_start != start {
            *self = Budget {
                period_start: start,
                ..Default::default()
            };
        }
    }
}

#[derive(Default)]
struct Counters {
    windows: HashMap<Arc<str>, Window>,
    budgets: HashMap<Arc<str>, Budget>,
}

#[derive(Default)]
pub struct MemoryState {
    inner: Mutex<Counters>,
}

fn minute_of(now_ms: i64) -> u64 {
    (now_ms.max(0) as u64) / 60_000
}

/// Budget arithmetic in whole nano-dollars, as in Redis, what is counted rounded up: float
/// noise never lets a request through, and a cost below a micro-dollar is not lost (rounded
/// to the nearest micro-dollar, `usd: 0` admitted requests whose worst case was below half
/// of one, and a budget of one micro-dollar was spent 1.5 times over).
fn fits(spent: f64, reserved: f64, worst: f64, limit: f64) -> bool {
    if [spent, reserved, worst].iter().any(|v| v.is_nan()) {
        return false;
    }
    // Saturating: a worst case of `max_tokens: 2^63` is the most there is, not a wrap (nor,
    // in a debug build, a panic under the lock, which refused every request after it).
    nanos_up(spent)
        .saturating_add(nanos_up(reserved))
        .saturating_add(nanos_up(worst))
        <= nanos(limit)
}

impl MemoryState {
    fn admit_now(&self, plan: &Plan, now_ms: i64) -> Result<Admitted, Refused> {
        // A panic while it was held (a bug) leaves the counts as they were at that moment;
        // refusing every request for ever after would be worse than going on with them.
        let mut c = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let minute = minute_of(now_ms);
        let to_next_minute = Duration::from_millis(60_000 - (now_ms.max(0) as u64 % 60_000));
        let mut headers = LimitHeaders::default();
        // Check every limit first, then take: all or nothing.
        for l in plan.limits.iter() {
            let w = c.windows.entry(l.id.clone()).or_default();
            if w.minute != minute {
                w.minute = minute;
                w.requests = 0;
                w.tokens = 0;
            }
            let refuse =
                |what: &'static str, retry_after: Duration, h: LimitHeaders| Refused::Rate {
                    limit: l.id.clone(),
                    what,
                    retry_after,
                    headers: h,
                };
            let mut h = LimitHeaders::default();
            if let Some(rpm) = l.rpm {
                h.requests = Some((rpm, rpm.saturating_sub(w.requests)));
            }
            if let Some(tpm) = l.tpm {
                h.tokens = Some((tpm, tpm.saturating_sub(w.tokens)));
            }
            if l.rpm.is_some_and(|rpm| w.requests + 1 > rpm) {
                return Err(refuse("requests per minute", to_next_minute, h));
            }
            if l.tpm
                .is_some_and(|tpm| w.tokens.saturating_add(plan.tokens) > tpm)
            {
                return Err(refuse("tokens per minute", to_next_minute, h));
            }
            if l.max_parallel.is_some_and(|mp| w.in_flight + 1 > mp) {
                return Err(refuse("requests in parallel", Duration::from_secs(1), h));
            }
        }
        let mut periods = Vec::with_capacity(plan.budgets.len());
        for b in plan.budgets.iter() {
            let (start, next) = period_bounds(b.period, now_ms);
            let s = c.budgets.entry(b.id.clone()).or_default();
            s.roll(start);
            if !fits(s.spent, s.reserved, plan.worst_usd, b.usd) {
                let first_in_period = !s.hard_alerted;
                s.hard_alerted = true;
                return Err(Refused::Budget {
                    budget: b.clone(),
                    spent: s.spent,
                    reserved: s.reserved,
                    retry_after: next.map(|n| Duration::from_millis((n - now_ms).max(0) as u64)),
                    first_in_period,
                });
            }
            periods.push((b.id.clone(), start));
        }
        for l in plan.limits.iter() {
            if let Some(w) = c.windows.get_mut(&l.id) {
                w.requests += 1;
                w.tokens = w.tokens.saturating_add(plan.tokens);
                w.in_flight += 1;
                // Headers: the tightest limit, counting this request.
                if let Some(rpm) = l.rpm {
                    let rem = rpm.saturating_sub(w.requests);
                    if headers.requests.is_none_or(|(_, r)| rem < r) {
                        headers.requests = Some((rpm, rem));
                    }
                }
                if let Some(tpm) = l.tpm {
                    let rem = tpm.saturating_sub(w.tokens);
                    if headers.tokens.is_none_or(|(_, r)| rem < r) {
                        headers.tokens = Some((tpm, rem));
                    }
                }
            }
        }
        for (id, _) in &periods {
            if let Some(s) = c.budgets.get_mut(id) {
                s.reserved += plan.worst_usd;
            }
        }
        Ok(Admitted {
            minute,
            periods,
            headers,
            counted: true,
            ticket: None,
            at_ms: now_ms,
        })
    }

    /// Settles a request. When it ended does not matter: its tokens are corrected only while
    /// its limit windows are still on the minute it was admitted in, and its cost is spent in
    /// the period it was admitted in.
    fn settle_now(&self, plan: &Plan, admitted: &Admitted, actual: Actual) -> Vec<Alert> {
        let mut alerts = Vec::new();
        let mut c = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for l in plan.limits.iter() {
            if let Some(w) = c.windows.get_mut(&l.id) {
                w.in_flight = w.in_flight.saturating_sub(1);
                // Correct the estimate with the real tokens, within the same minute.
                if w.minute == admitted.minute {
                    w.tokens = w
                        .tokens
                        .saturating_add(actual.tokens)
                        .saturating_sub(plan.tokens);
                }
            }
        }
        for ((id, start), b) in admitted.periods.iter().zip(plan.budgets.iter()) {
            let Some(s) = c.budgets.get_mut(id) else {
                continue;
            };
            // A request is spent in the period it was admitted in, which reserved for it (as
            // with Redis, and as the ledger counts its row, by its start time). When that
            // period is over and a new one has begun, the new one owes nothing for it.
            if s.period_start != *start {
                continue;
            }
            s.reserved = (s.reserved - plan.worst_usd).max(0.0);
            let before = s.spent;
            s.spent += actual.cost_usd;
            if let Some(soft) = b.soft_usd {
                if before < soft && s.spent >= soft && !s.soft_alerted {
                    s.soft_alerted = true;
                    alerts.push(alert("soft", b, s.spent));
                }
            }
        }
        alerts
    }
}

fn alert(kind: &'static str, b: &BudgetRef, spent: f64) -> Alert {
    Alert {
        kind,
        scope: b.scope.kind(),
        name: b.scope.name().to_string(),
        spent,
        limit: if kind == "soft" {
            b.soft_usd.unwrap_or(b.usd)
        } else {
            b.usd
        },
        period: period_name(b.period),
    }
}

pub fn hard_alert(b: &BudgetRef, spent: f64) -> Alert {
    alert("hard", b, spent)
}

impl PolicyState for MemoryState {
    fn admit<'a>(
        &'a self,
        plan: &'a Plan,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<Admitted, Refused>> {
        Box::pin(async move { self.admit_now(plan, now_ms) })
    }

    fn settle<'a>(
        &'a self,
        plan: &'a Plan,
        admitted: &'a Admitted,
        actual: Actual,
    ) -> BoxFuture<'a, Vec<Alert>> {
        Box::pin(async move { self.settle_now(plan, admitted, actual) })
    }

    fn seed_spent<'a>(
        &'a self,
        budget: &'a BudgetRef,
        period_start: i64,
        spent: f64,
        _read_ms: i64,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if let Ok(mut c) = self.inner.lock() {
                let s = c.budgets.entry(budget.id.clone()).or_default();
                s.roll(period_start);
                // The more of what was counted here and the ledger's figure: a budget a
                // reload brings back at once has settlements of its period the ledger's
                // writer has not written yet (it took the ledger's figure, 0 then).
                s.spent = s.spent.max(spent);
                s.soft_alerted = budget.soft_usd.is_some_and(|soft| s.spent >= soft);
            }
        })
    }

    fn budget_status<'a>(
        &'a self,
        budget: &'a BudgetRef,
        period_start: i64,
    ) -> BoxFuture<'a, Option<(f64, f64)>> {
        let status = self.status_now(budget, period_start);
        Box::pin(async move { Some(status) })
    }
}

impl MemoryState {
    fn status_now(&self, budget: &BudgetRef, period_start: i64) -> (f64, f64) {
        self.inner
            .lock()
            .ok()
            .and_then(|c| {
                c.budgets
                    .get(&budget.id)
                    .filter(|s| s.period_start == period_start)
                    .map(|s| (s.spent, s.reserved))
            })
            .unwrap_or((0.0, 0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Period;
    use crate::policy::{BudgetScope, LimitRef};

    fn plan(rpm: Option<u64>, usd: Option<f64>, worst: f64) -> Plan {
        Plan {
            limits: rpm
                .map(|r| LimitRef {
                    id: "key:k".into(),
                    rpm: Some(r),
                    tpm: Some(1000),
                    max_parallel: None,
                })
                .into_iter()
                .collect(),
            budgets: usd
                .map(|u| BudgetRef {
                    id: "key:k".into(),
                    scope: BudgetScope::Key("k".into()),
                    usd: u,
                    soft_usd: Some(u / 2.0),
                    period: Period::Daily,
                })
                .into_iter()
                .collect(),
            tokens: 100,
            worst_usd: worst,
        }
    }

    #[test]
    fn rpm_counts_down_then_refuses() {
        let s = MemoryState::default();
        let p = plan(Some(3), None, 0.0);
        let now = 1_800_000_000_000;
        let rem: Vec<u64> = (0..3)
            .map(|_| s.admit_now(&p, now).unwrap().headers.requests.unwrap().1)
            .collect();
        assert_eq!(rem, [2, 1, 0]);
        assert!(matches!(s.admit_now(&p, now), Err(Refused::Rate { .. })));
        assert!(
            s.admit_now(&p, now + 60_000).is_ok(),
            "the next minute has room"
        );
    }

    #[test]
    fn reservations_never_overspend_and_settle_to_the_real_cost() {
        let s = MemoryState::default();
        let p = plan(None, Some(1.0), 0.3);
        let now = 1_800_000_000_000;
        let a: Vec<_> = (0..3).map(|_| s.admit_now(&p, now).unwrap()).collect();
        assert!(
            matches!(s.admit_now(&p, now), Err(Refused::Budget { .. })),
            "0.9 reserved + 0.3 > 1"
        );
        let alerts = s.settle_now(
            &p,
            &a[0],
            Actual {
                cost_usd: 0.1,
                tokens: 10,
                ..Default::default()
            },
        );
        assert!(alerts.is_empty());
        assert!(
            s.admit_now(&p, now).is_ok(),
            "0.1 spent + 0.6 reserved + 0.3 fits"
        );
        let alerts = s.settle_now(
            &p,
            &a[1],
            Actual {
                cost_usd: 0.45,
                tokens: 10,
                ..Default::default()
            },
        );
        assert_eq!(alerts.len(), 1, "soft budget 0.5 crossed once");
        let (spent, reserved) = s.status_now(&p.budgets[0], period_bounds(Period::Daily, now).0);
        assert!((spent - 0.55).abs() < 1e-9 && (reserved - 0.6).abs() < 1e-9);
    }

    /// A request admitted before midnight and ending after it is spent in the day it was
    /// admitted in, which reserved for it: the new day's budget is whole for the new day's
    /// requests, and the old day's `spent` (what the ledger rebuilds) includes it.
    #[test]
    fn a_request_running_across_a_period_boundary_is_spent_in_its_own_period() {
        let s = MemoryState::default();
        let p = plan(None, Some(1.0), 0.5);
        let day = 86_400_000;
        let midnight = 1_800_000_000_000 / day * day + day;
        let status = |period_start: i64| {
            let (spent, reserved) = s.status_now(&p.budgets[0], period_start);
            (
                (spent * 1e6).round() as i64,
                (reserved * 1e6).round() as i64,
            )
        };
        let actual = Actual {
            cost_usd: 0.4,
            tokens: 10,
            ..Default::default()
        };
        let before = s.admit_now(&p, midnight - 1).unwrap();
        // It ends after the new day's first request, which rolled the budget over.
        let early = s.admit_now(&p, midnight + 1).unwrap();
        s.settle_now(&p, &before, actual);
        assert_eq!(
            status(midnight),
            (0, 500_000),
            "the new day owes nothing for it"
        );
        s.settle_now(&p, &early, actual);
        assert_eq!(status(midnight), (400_000, 0));
        // Admitted late in the day, it ends after midnight, before the next day's first
        // request: spent in its own day.
        let late = s.admit_now(&p, midnight + day - 1).unwrap();
        s.settle_now(&p, &late, actual);
        assert_eq!(status(midnight), (800_000, 0));
        assert!(s.admit_now(&p, midnight + day + 6).is_ok());
        assert_eq!(
            status(midnight + day),
            (0, 500_000),
            "the next day starts whole"
        );
    }
}
