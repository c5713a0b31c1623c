//! Per-destination protection shared by every lane that writes to one
//! system: a circuit breaker, a client-side rate limit, and the pause a
//! destination asks for with `Retry-After`.
//!
//! While the breaker is open or the destination is paused, lanes send
//! nothing; their messages wait in the outbox (on disk) without spending
//! attempts. Results feed the breaker: a retryable failure (network,
//! timeout, 408/429/5xx) counts against the destination; a success or a
//! permanent failure (the destination answered, it is up) counts for it.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use weft_core::config::{BreakerPolicy, RateLimitPolicy};

use crate::metrics as m;

/// Breaker states, as exported in `weft_circuit_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { probes_sent: u32 },
}

impl State {
    pub fn gauge(self) -> f64 {
        match self {
            State::Closed => 0.0,
            State::Open { .. } => 1.0,
            State::HalfOpen { .. } => 2.0,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open { .. } => "open",
            State::HalfOpen { .. } => "half_open",
        }
    }
}

struct Breaker {
    policy: BreakerPolicy,
    state: State,
    consecutive: u32,
    /// (when, failed) of recent results within `policy.window`.
    recent: VecDeque<(Instant, bool)>,
}

impl Breaker {
    /// May a write go now? Reserves a probe when half-open.
    fn allow(&mut self, now: Instant) -> Result<(), Duration> {
        if let State::Open { until } = self.state {
            if now < until {
                return Err(until - now);
            }
            self.state = State::HalfOpen { probes_sent: 0 };
        }
        if let State::HalfOpen { probes_sent } = &mut self.state {
            if *probes_sent >= self.policy.half_open_probes {
                // wait for the probes' results
                return Err(Duration::from_millis(50));
            }
            *probes_sent += 1;
        }
        Ok(())
    }

    /// Feed one result; returns the new state when it changed.
    fn record(&mut self, now: Instant, failed: bool) -> Option<State> {
        self.recent.push_back((now, failed));
        while self
            .recent
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > self.policy.window)
        {
            self.recent.pop_front();
        }
        let before = self.state;
        match self.state {
            State::HalfOpen { .. } => {
                self.state = if failed {
                    State::Open {
                        until: now + self.policy.cooldown,
                    }
                } else {
                    self.consecutive = 0;
                    self.recent.clear();
                    State::Closed
                };
            }
            State::Closed => {
                if failed {
                    self.consecutive += 1;
                    let n = self.recent.len() as u32;
                    let failures = self.recent.iter().filter(|r| r.1).count() as f64;
                    let rate_trips = n >= self.policy.min_requests
                        && failures / n as f64 >= self.policy.failure_rate;
                    if self.consecutive >= self.policy.consecutive_failures || rate_trips {
                        self.state = State::Open {
                            until: now + self.policy.cooldown,
                        };
                    }
                } else {
                    self.consecutive = 0;
                }
            }
            // results of writes that were in flight when it opened
            State::Open { .. } => {}
        }
        (std::mem::discriminant(&before) != std::mem::discriminant(&self.state))
            .then_some(self.state)
    }
}

/// The shared guard of one destination system.
pub struct Guard {
    dest: String,
    breaker: Option<Mutex<Breaker>>,
    limiter: Option<DefaultDirectRateLimiter>,
    paused_until: Mutex<Option<Instant>>,
}

impl Guard {
    pub fn new(
        dest: &str,
        breaker: Option<&BreakerPolicy>,
        rate: Option<&RateLimitPolicy>,
    ) -> Guard {
        let limiter = rate.and_then(|r| {
            let burst = NonZeroU32::new(r.burst)?;
            Quota::with_period(r.period).map(|q| RateLimiter::direct(q.allow_burst(burst)))
        });
        m::breaker_state(dest, State::Closed);
        Guard {
            dest: dest.to_owned(),
            breaker: breaker.map(|p| {
                Mutex::new(Breaker {
                    policy: p.clone(),
                    state: State::Closed,
                    consecutive: 0,
                    recent: VecDeque::new(),
                })
            }),
            limiter,
            paused_until: Mutex::new(None),
        }
    }

    /// May a write go now? `Err(d)`: not before `d` has passed. When it
    /// returns `Ok` in half-open state a probe has been reserved.
    pub fn check(&self) -> Result<(), Duration> {
        let now = Instant::now();
        if let Ok(p) = self.paused_until.lock()
            && let Some(until) = *p
            && now < until
        {
            return Err(until - now);
        }
        match &self.breaker {
            None => Ok(()),
            Some(b) => match b.lock() {
                Ok(mut b) => {
                    let before = b.state;
                    let r = b.allow(now);
                    if matches!(before, State::Open { .. })
                        && matches!(b.state, State::HalfOpen { .. })
                    {
                        self.transition(b.state);
                    }
                    r
                }
                Err(_) => Ok(()),
            },
        }
    }

    /// The last [`Guard::check`] reserved a half-open probe that will not
    /// be sent (there was nothing to write): give it back.
    pub fn cancel_probe(&self) {
        if let Some(b) = &self.breaker
            && let Ok(mut b) = b.lock()
            && let State::HalfOpen { probes_sent } = &mut b.state
        {
            *probes_sent = probes_sent.saturating_sub(1);
        }
    }

    /// After a rate-limit wait: has the destination asked for a pause, or
    /// has the breaker opened, meanwhile? Reserves nothing.
    pub fn check_after_wait(&self) -> Result<(), Duration> {
        let now = Instant::now();
        if let Ok(p) = self.paused_until.lock()
            && let Some(until) = *p
            && now < until
        {
            return Err(until - now);
        }
        if let Some(b) = &self.breaker
            && let Ok(b) = b.lock()
            && let State::Open { until } = b.state
            && now < until
        {
            return Err(until - now);
        }
        Ok(())
    }

    /// Wait for a rate-limit token (no-op without a limit).
    pub async fn acquire(&self) {
        if let Some(l) = &self.limiter
            && l.check().is_err()
        {
            let t = Instant::now();
            l.until_ready().await;
            m::rate_limit_wait(&self.dest, t.elapsed());
        }
    }

    /// Feed the result of one write.
    pub fn record(&self, failed: bool, retry_after: Option<Duration>) {
        if let Some(d) = retry_after {
            let until = Instant::now() + d.min(Duration::from_secs(3600));
            if let Ok(mut p) = self.paused_until.lock()
                && p.is_none_or(|u| u < until)
            {
                *p = Some(until);
            }
            tracing::warn!(destination = %self.dest, pause_ms = d.as_millis() as u64, "destination asked to wait (Retry-After)");
        }
        if let Some(b) = &self.breaker
            && let Ok(mut b) = b.lock()
            && let Some(new) = b.record(Instant::now(), failed)
        {
            self.transition(new);
        }
    }

    /// The breaker's state now (closed when there is no breaker).
    pub fn state(&self) -> State {
        self.breaker
            .as_ref()
            .and_then(|b| b.lock().ok().map(|b| b.state))
            .unwrap_or(State::Closed)
    }

    fn transition(&self, to: State) {
        m::breaker_state(&self.dest, to);
        match to {
            State::Open { .. } => {
                tracing::warn!(destination = %self.dest, "circuit breaker opened: holding deliveries on disk")
            }
            State::HalfOpen { .. } => {
                tracing::info!(destination = %self.dest, "circuit breaker half-open: probing")
            }
            State::Closed => {
                tracing::info!(destination = %self.dest, "circuit breaker closed: delivering again")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> BreakerPolicy {
        BreakerPolicy {
            consecutive_failures: 3,
            failure_rate: 0.5,
            min_requests: 10,
            window: Duration::from_secs(60),
            cooldown: Duration::from_millis(100),
            half_open_probes: 1,
        }
    }

    fn breaker() -> Breaker {
        Breaker {
            policy: policy(),
            state: State::Closed,
            consecutive: 0,
            recent: VecDeque::new(),
        }
    }

    #[test]
    fn opens_after_consecutive_failures_then_probes_then_closes() {
        let mut b = breaker();
        let t = Instant::now();
        assert_eq!(b.record(t, true), None);
        assert_eq!(b.record(t, true), None);
        assert!(matches!(b.record(t, true), Some(State::Open { .. })));
        assert!(b.allow(t).is_err(), "open: nothing goes");
        let later = t + Duration::from_millis(150);
        assert!(b.allow(later).is_ok(), "after cooldown one probe goes");
        assert!(b.allow(later).is_err(), "only one probe");
        assert_eq!(b.record(later, false), Some(State::Closed));
        assert!(b.allow(later).is_ok());
    }

    #[test]
    fn failed_probe_reopens() {
        let mut b = breaker();
        let t = Instant::now();
        for _ in 0..3 {
            b.record(t, true);
        }
        let later = t + Duration::from_millis(150);
        assert!(b.allow(later).is_ok());
        assert!(matches!(b.record(later, true), Some(State::Open { .. })));
        assert!(b.allow(later + Duration::from_millis(50)).is_err());
    }

    #[test]
    fn failure_rate_trips_without_a_streak() {
        let mut b = breaker();
        let t = Instant::now();
        // alternate: never 3 in a row, but 50% of >= 10 requests
        let mut opened = false;
        for i in 0..12 {
            if b.record(t, i % 2 == 0).is_some() {
                opened = true;
            }
        }
        assert!(opened, "{:?}", b.state);
    }

    #[test]
    fn successes_reset_the_streak() {
        let mut b = breaker();
        let t = Instant::now();
        b.record(t, true);
        b.record(t, true);
        b.record(t, false);
        b.record(t, true);
        assert_eq!(b.state, State::Closed);
    }
}
