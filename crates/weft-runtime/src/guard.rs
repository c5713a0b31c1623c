//! Per-destination protection shared by every lane that writes to one
//! system: a circuit breaker, a client-side rate limit, and the pause a
//! destination asks for with `Retry-After`.
//!
//! While the breaker is open or the destination is paused, lanes send
//! nothing; their messages wait in the outbox (on disk) without spending
//! attempts. Results feed the breaker: a retryable failure (network,
//! timeout, 408/429/5xx) counts against the destination; a success or a
//! permanent failure (the destination answered, it is up) counts for it.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
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

/// Buckets of the failure-rate window: its memory and the cost of a
/// result are fixed, whatever the write rate.
const BUCKETS: usize = 60;

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Which slice of time (counted in bucket widths since `Window::start`).
    slot: u64,
    total: u64,
    failed: u64,
}

/// Write results of the last `policy.window`, counted in [`BUCKETS`]
/// buckets of `window / BUCKETS` each.
#[derive(Debug)]
struct Window {
    start: Instant,
    width_ns: u128,
    buckets: [Bucket; BUCKETS],
}

impl Window {
    fn new(window: Duration, start: Instant) -> Window {
        Window {
            start,
            width_ns: (window.as_nanos() / BUCKETS as u128).max(1_000_000),
            buckets: [Bucket::default(); BUCKETS],
        }
    }

    fn slot(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.start).as_nanos() / self.width_ns) as u64
    }

    fn add(&mut self, now: Instant, failed: bool) {
        let slot = self.slot(now);
        let b = &mut self.buckets[(slot % BUCKETS as u64) as usize];
        if b.slot != slot {
            *b = Bucket {
                slot,
                total: 0,
                failed: 0,
            };
        }
        b.total += 1;
        b.failed += u64::from(failed);
    }

    /// (writes, failed writes) within the window.
    fn totals(&self, now: Instant) -> (u64, u64) {
        let slot = self.slot(now);
        self.buckets
            .iter()
            .filter(|b| b.slot <= slot && slot - b.slot < BUCKETS as u64)
            .fold((0, 0), |(t, f), b| (t + b.total, f + b.failed))
    }

    fn clear(&mut self) {
        self.buckets = [Bucket::default(); BUCKETS];
    }
}

struct Breaker {
    policy: BreakerPolicy,
    state: State,
    consecutive: u32,
    window: Window,
    /// Counts the half-open periods: a probe is tagged with the one it was
    /// sent in, and only a probe of the current one decides it.
    generation: u64,
}

impl Breaker {
    fn new(policy: &BreakerPolicy, now: Instant) -> Breaker {
        Breaker {
            policy: policy.clone(),
            state: State::Closed,
            consecutive: 0,
            window: Window::new(policy.window, now),
            generation: 0,
        }
    }

    /// May a write go now? `Ok(Some(generation))`: yes, as a half-open probe.
    fn allow(&mut self, now: Instant) -> Result<Option<u64>, Duration> {
        if let State::Open { until } = self.state {
            if now < until {
                return Err(until - now);
            }
            self.generation += 1;
            self.state = State::HalfOpen { probes_sent: 0 };
        }
        if let State::HalfOpen { probes_sent } = &mut self.state {
            if *probes_sent >= self.policy.half_open_probes {
                // wait for the probes' results
                return Err(Duration::from_millis(50));
            }
            *probes_sent += 1;
            return Ok(Some(self.generation));
        }
        Ok(None)
    }

    /// A probe of `generation` was not sent: give it back.
    fn cancel(&mut self, generation: u64) {
        if generation == self.generation
            && let State::HalfOpen { probes_sent } = &mut self.state
        {
            *probes_sent = probes_sent.saturating_sub(1);
        }
    }

    /// Feed the result of one write (`probe`: the generation it was sent
    /// in as a probe); returns the new state when it changed.
    fn record(&mut self, now: Instant, failed: bool, probe: Option<u64>) -> Option<State> {
        let before = self.state;
        match self.state {
            // only a probe of this half-open period decides it; a write sent
            // before the breaker opened says nothing about the destination now
            State::HalfOpen { .. } if probe == Some(self.generation) => {
                self.state = if failed {
                    State::Open {
                        until: now + self.policy.cooldown,
                    }
                } else {
                    self.consecutive = 0;
                    self.window.clear();
                    State::Closed
                };
            }
            State::HalfOpen { .. } => {}
            State::Closed => {
                self.window.add(now, failed);
                if failed {
                    self.consecutive += 1;
                    let (n, failures) = self.window.totals(now);
                    let rate_trips = n >= u64::from(self.policy.min_requests)
                        && failures as f64 / n as f64 >= self.policy.failure_rate;
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

/// Leave to send one write, from [`Guard::check`]. Hand it back with the
/// write's result to [`Guard::record`]; dropped unused (nothing was sent,
/// the task died), a half-open probe it reserved is given back, so no path
/// can keep the probe reserved.
#[must_use = "record the write's result with the permit, or drop it unused"]
pub struct Permit {
    guard: Arc<Guard>,
    probe: Option<u64>,
}

impl Permit {
    /// Whether this write is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe.is_some()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(g) = self.probe.take()
            && let Some(b) = &self.guard.breaker
            && let Ok(mut b) = b.lock()
        {
            b.cancel(g);
        }
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
            breaker: breaker.map(|p| Mutex::new(Breaker::new(p, Instant::now()))),
            limiter,
            paused_until: Mutex::new(None),
        }
    }

    /// May a write go now? `Err(d)`: not before `d` has passed. In
    /// half-open state the permit is a probe (see [`Permit`]).
    pub fn check(self: &Arc<Self>) -> Result<Permit, Duration> {
        let now = Instant::now();
        if let Ok(p) = self.paused_until.lock()
            && let Some(until) = *p
            && now < until
        {
            return Err(until - now);
        }
        let probe = match &self.breaker {
            None => None,
            Some(b) => match b.lock() {
                Ok(mut b) => {
                    let before = b.state;
                    let r = b.allow(now);
                    if matches!(before, State::Open { .. })
                        && matches!(b.state, State::HalfOpen { .. })
                    {
                        self.transition(b.state);
                    }
                    r?
                }
                Err(_) => None,
            },
        };
        Ok(Permit {
            guard: self.clone(),
            probe,
        })
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

    /// Wait for a rate-limit token (no-op without a limit). One token per
    /// write: the limit is a partner's request quota (`burst` requests,
    /// one more every `period`).
    pub async fn acquire(&self) {
        if let Some(l) = &self.limiter
            && l.check().is_err()
        {
            let t = Instant::now();
            l.until_ready().await;
            m::rate_limit_wait(&self.dest, t.elapsed());
        }
    }

    /// Feed the result of one write, sent under `permit`.
    pub fn record(&self, mut permit: Permit, failed: bool, retry_after: Option<Duration>) {
        let probe = permit.probe.take();
        drop(permit);
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
            && let Some(new) = b.record(Instant::now(), failed, probe)
        {
            self.transition(new);
        }
    }

    /// Open the breaker now, as if the destination had just failed enough
    /// writes: for a destination found unreachable at start, so its lanes
    /// hold deliveries on disk and probe after the cooldown instead of
    /// hammering it. Without a breaker, nothing: the lanes' retry backoff
    /// paces them.
    pub fn trip(&self) {
        if let Some(b) = &self.breaker
            && let Ok(mut b) = b.lock()
            && !matches!(b.state, State::Open { .. })
        {
            b.state = State::Open {
                until: Instant::now() + b.policy.cooldown,
            };
            let to = b.state;
            drop(b);
            self.transition(to);
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
        Breaker::new(&policy(), Instant::now())
    }

    /// Open `b` at `t` with three failures in a row.
    fn open(b: &mut Breaker, t: Instant) {
        for _ in 0..3 {
            b.record(t, true, None);
        }
        assert!(matches!(b.state, State::Open { .. }), "{:?}", b.state);
    }

    #[test]
    fn opens_after_consecutive_failures_then_probes_then_closes() {
        let mut b = breaker();
        let t = Instant::now();
        assert_eq!(b.record(t, true, None), None);
        assert_eq!(b.record(t, true, None), None);
        assert!(matches!(b.record(t, true, None), Some(State::Open { .. })));
        assert!(b.allow(t).is_err(), "open: nothing goes");
        let later = t + Duration::from_millis(150);
        let probe = b.allow(later).expect("after cooldown one probe goes");
        assert!(probe.is_some(), "it is tagged as a probe");
        assert!(b.allow(later).is_err(), "only one probe");
        assert_eq!(b.record(later, false, probe), Some(State::Closed));
        assert_eq!(b.allow(later), Ok(None), "closed: writes are not probes");
    }

    #[test]
    fn failed_probe_reopens() {
        let mut b = breaker();
        let t = Instant::now();
        open(&mut b, t);
        let later = t + Duration::from_millis(150);
        let probe = b.allow(later).expect("probe");
        assert!(matches!(
            b.record(later, true, probe),
            Some(State::Open { .. })
        ));
        assert!(b.allow(later + Duration::from_millis(50)).is_err());
    }

    /// P1-14: a write sent before the breaker opened (no probe tag) whose
    /// result arrives while half-open neither closes nor reopens it.
    #[test]
    fn a_write_sent_before_it_opened_does_not_decide_half_open() {
        let mut b = breaker();
        let t = Instant::now();
        open(&mut b, t);
        let later = t + Duration::from_millis(150);
        let probe = b.allow(later).expect("probe");
        assert_eq!(b.record(later, false, None), None, "stale success ignored");
        assert_eq!(b.record(later, true, None), None, "stale failure ignored");
        assert!(matches!(b.state, State::HalfOpen { probes_sent: 1 }));
        assert_eq!(b.record(later, false, probe), Some(State::Closed));
    }

    /// P1-14: a probe of an earlier half-open period does not decide the
    /// current one.
    #[test]
    fn a_probe_of_an_earlier_half_open_period_is_ignored() {
        let mut b = Breaker::new(
            &BreakerPolicy {
                half_open_probes: 2,
                ..policy()
            },
            Instant::now(),
        );
        let t = Instant::now();
        open(&mut b, t);
        let t1 = t + Duration::from_millis(150);
        let first = b.allow(t1).expect("probe 1");
        let second = b.allow(t1).expect("probe 2");
        assert!(matches!(
            b.record(t1, true, first),
            Some(State::Open { .. })
        ));
        let t2 = t1 + Duration::from_millis(150);
        let third = b.allow(t2).expect("probe of the next period");
        assert_ne!(second, third);
        assert_eq!(b.record(t2, false, second), None, "old probe ignored");
        assert!(matches!(b.state, State::HalfOpen { .. }));
        assert_eq!(b.record(t2, false, third), Some(State::Closed));
    }

    #[test]
    fn failure_rate_trips_without_a_streak() {
        let mut b = breaker();
        let t = Instant::now();
        // alternate: never 3 in a row, but 50% of >= 10 requests
        let mut opened = false;
        for i in 0..12 {
            if b.record(t, i % 2 == 0, None).is_some() {
                opened = true;
            }
        }
        assert!(opened, "{:?}", b.state);
    }

    #[test]
    fn failures_older_than_the_window_do_not_count() {
        let mut b = Breaker::new(
            &BreakerPolicy {
                window: Duration::from_millis(600),
                consecutive_failures: 1000,
                ..policy()
            },
            Instant::now(),
        );
        let t = Instant::now();
        for _ in 0..4 {
            b.record(t, true, None);
            b.record(t, false, None);
        }
        assert_eq!(b.window.totals(t), (8, 4));
        // the window has passed: those 8 are forgotten, so 9 more results
        // with 4 failures stay under min_requests (10) and do not trip
        let later = t + Duration::from_millis(700);
        assert_eq!(b.window.totals(later), (0, 0));
        for i in 0..9 {
            assert_eq!(b.record(later, i % 2 == 0, None), None);
        }
        assert_eq!(b.state, State::Closed);
        assert_eq!(b.window.totals(later), (9, 5));
    }

    #[test]
    fn successes_reset_the_streak() {
        let mut b = breaker();
        let t = Instant::now();
        b.record(t, true, None);
        b.record(t, true, None);
        b.record(t, false, None);
        b.record(t, true, None);
        assert_eq!(b.state, State::Closed);
    }

    fn guard(p: BreakerPolicy) -> Arc<Guard> {
        Arc::new(Guard::new("d", Some(&p), None))
    }

    /// P1-7: a probe permit dropped unused (nothing to write, the claim
    /// failed, the task died) gives the probe back, so half-open cannot stay
    /// reserved for good.
    #[test]
    fn a_dropped_probe_permit_gives_the_probe_back() {
        let g = guard(policy());
        for _ in 0..3 {
            let p = g.check().expect("closed");
            assert!(!p.is_probe());
            g.record(p, true, None);
        }
        assert!(g.check().is_err(), "open");
        std::thread::sleep(Duration::from_millis(120));
        let probe = g.check().expect("half-open: one probe");
        assert!(probe.is_probe());
        assert!(g.check().is_err(), "the probe is reserved");
        drop(probe);
        let again = g.check().expect("given back");
        assert!(again.is_probe());
        g.record(again, false, None);
        assert_eq!(g.state(), State::Closed);
    }

    /// P1-14: a `Retry-After` that arrives while a lane waits for the rate
    /// limit stops that lane's write.
    #[tokio::test]
    async fn a_pause_that_arrives_during_the_rate_limit_wait_is_seen() {
        let rate = RateLimitPolicy {
            period: Duration::from_millis(300),
            burst: 1,
            label: "t".into(),
        };
        let g = Arc::new(Guard::new("d", Some(&policy()), Some(&rate)));
        let first = g.check().expect("first");
        g.acquire().await; // the only token
        let second = g.check().expect("second, before any pause");
        let waiting = {
            let g = g.clone();
            tokio::spawn(async move {
                g.acquire().await;
                g.check_after_wait()
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        g.record(first, true, Some(Duration::from_secs(10)));
        let after = waiting.await.expect("task");
        let d = after.expect_err("paused meanwhile");
        assert!(d > Duration::from_secs(9), "{d:?}");
        drop(second);
    }

    /// P1-14: the breaker's memory and cost per result do not grow with the
    /// write rate: a million results in the window are a fixed array.
    #[test]
    fn a_million_results_keep_memory_flat() {
        let g = guard(BreakerPolicy {
            consecutive_failures: u32::MAX,
            failure_rate: 1.0,
            min_requests: 1,
            ..policy()
        });
        let t = Instant::now();
        for i in 0..1_000_000u32 {
            let p = g.check().expect("closed");
            g.record(p, i % 4 == 3, None);
        }
        let took = t.elapsed();
        let b = g.breaker.as_ref().expect("breaker").lock().expect("lock");
        assert_eq!(b.state, State::Closed, "25% failures do not trip at 100%");
        // the window is a fixed array (no heap): BUCKETS counters hold them all
        assert_eq!(b.window.buckets.len(), BUCKETS);
        let (n, failed) = b.window.totals(Instant::now());
        assert_eq!((n, failed), (1_000_000, 250_000), "all within 60 s");
        assert!(took < Duration::from_secs(20), "{took:?}");
        eprintln!("1M breaker results recorded in {took:?}");
    }
}
