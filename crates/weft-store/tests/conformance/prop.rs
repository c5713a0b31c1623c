//! The property test: random operations over 2 flows × 2 destinations ×
//! 3 keys (and keyless rows). After every operation: every lane's counts
//! are exactly what the operations imply (so the identity holds and every
//! routed delivery is accounted for), the DLQ depths match the counts, no
//! key queue has rows of two claims out at once, pending rows come in key
//! order. At the end everything drains, and a destination never received an
//! older version of a key after a newer one (forced replays excepted).

use std::collections::{HashMap, HashSet};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestError, TestRng, TestRunner};
use weft_store::*;

use crate::Harness;
use crate::cases::{LEASE, Nums, batch, delivery, event, lane, nums, rejected, routed};
use crate::testing::Recorder;

const FLOWS: [&str; 2] = ["a", "b"];
const DESTS: [&str; 2] = ["x", "y"];
const KEYS: [Option<&str>; 4] = [Some("k0"), Some("k1"), Some("k2"), None];

#[derive(Debug, Clone, Copy)]
enum Kind {
    Routed,
    Filtered,
    Rejected { hold: bool },
}

#[derive(Debug, Clone, Copy)]
enum Fate {
    Delivered,
    Retry,
    Dead { hold: bool },
    Release,
}

#[derive(Debug, Clone)]
enum Op {
    /// Events, each with an optional outcome (kind, key) per flow.
    Ingest(Vec<[Option<(Kind, usize)>; 2]>),
    /// An earlier event again: a duplicate.
    Duplicate(usize),
    Claim {
        lane: usize,
        max: usize,
        per_key: usize,
    },
    /// Settle whole claims (picked by index) with fates taken in turn; with
    /// `zombies`, also every settlement from before the last restart; with
    /// `follow_up`, the first delivered row's next step goes to the flow's
    /// other destination.
    Settle {
        claims: Vec<usize>,
        fates: Vec<Fate>,
        zombies: bool,
        follow_up: bool,
    },
    Replay {
        pick: usize,
        force: bool,
    },
    Discard {
        pick: usize,
    },
    Restart,
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        4 => Just(Kind::Routed),
        1 => Just(Kind::Filtered),
        1 => any::<bool>().prop_map(|hold| Kind::Rejected { hold }),
    ]
}

fn fate() -> impl Strategy<Value = Fate> {
    prop_oneof![
        5 => Just(Fate::Delivered),
        2 => Just(Fate::Retry),
        2 => proptest::bool::weighted(0.3).prop_map(|hold| Fate::Dead { hold }),
        1 => Just(Fate::Release),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    // a hot key, so that the rows of a key meet often
    let key = || prop_oneof![4 => Just(0usize), 2 => Just(1), 2 => Just(2), 2 => Just(3)];
    let outcome = || proptest::option::weighted(0.7, (kind(), key()));
    prop_oneof![
        6 => vec([outcome(), outcome()], 1..4).prop_map(Op::Ingest),
        1 => any::<usize>().prop_map(Op::Duplicate),
        8 => (0..4usize, 1..6usize, 1..4usize)
            .prop_map(|(lane, max, per_key)| Op::Claim { lane, max, per_key }),
        6 => (
            vec(any::<usize>(), 1..3),
            vec(fate(), 1..8),
            proptest::bool::weighted(0.3),
            proptest::bool::weighted(0.2),
        )
            .prop_map(|(claims, fates, zombies, follow_up)| Op::Settle {
                claims,
                fates,
                zombies,
                follow_up,
            }),
        4 => (any::<usize>(), proptest::bool::weighted(0.3))
            .prop_map(|(pick, force)| Op::Replay { pick, force }),
        1 => any::<usize>().prop_map(|pick| Op::Discard { pick }),
        1 => Just(Op::Restart),
    ]
}

/// Runs ~200 random operation sequences on fresh journals from `make`.
pub fn run<H: Harness>(make: impl Fn() -> H) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let config = Config {
        cases: 200,
        failure_persistence: None,
        ..Config::default()
    };
    // the same sequences on every run (a failure reproduces as it is);
    // WEFT_PROP_RANDOM=1 explores new ones
    let mut runner = if std::env::var_os("WEFT_PROP_RANDOM").is_some() {
        TestRunner::new(config)
    } else {
        let rng = TestRng::deterministic_rng(config.rng_algorithm);
        TestRunner::new_with_rng(config, rng)
    };
    let total = std::cell::RefCell::new(Stats::default());
    let result = runner.run(&vec(op(), 1..60), |ops| {
        let mut h = make();
        let stats = rt.block_on(Case::new(&h).run(&mut h, &ops));
        total.borrow_mut().add(&stats);

        Ok(())
    });
    match result {
        Ok(()) => {
            let total = total.borrow();
            if std::env::var_os("WEFT_PROP_STATS").is_some() {
                eprintln!("property test: {total:?}");
            }
            total.assert_all_seen();
        }
        Err(TestError::Fail(why, ops)) => panic!("{why}\nminimal failing operations: {ops:#?}"),
        Err(e) => panic!("{e}"),
    }
}

/// What the operations imply, per flow and per lane.
#[derive(Default)]
struct Model {
    /// received, filtered, rejected, discarded (flow level)
    flow: HashMap<String, [i64; 4]>,
    /// created, delivered, dead_lettered, discarded, received (lane level:
    /// follow-ups)
    lane: HashMap<LaneId, [i64; 5]>,
}

impl Model {
    fn flow(&mut self, f: &str) -> &mut [i64; 4] {
        self.flow.entry(f.to_owned()).or_default()
    }

    fn lane(&mut self, f: &str, d: &str) -> &mut [i64; 5] {
        self.lane.entry(lane(f, d)).or_default()
    }

    fn nums(&self, l: &LaneId) -> Nums {
        let [received, filtered, rejected, fdisc] =
            self.flow.get(&l.flow).copied().unwrap_or_default();
        let [created, delivered, dead, disc, lane_received] =
            self.lane.get(l).copied().unwrap_or_default();
        [
            received + lane_received,
            filtered,
            rejected,
            delivered,
            dead,
            fdisc + disc,
            created - delivered - dead - disc,
        ]
    }
}

struct Case {
    j: std::sync::Arc<dyn Journal>,
    lanes: Vec<LaneId>,
    model: Model,
    events: Vec<NewEvent>,
    next_event: usize,
    /// Live claims, one batch per claim call.
    out: Vec<Vec<Claimed>>,
    /// Claims from before a restart.
    zombies: Vec<Claimed>,
    forced: HashSet<i64>,
    dest: Recorder,
    stats: Stats,
}

/// What a run exercised: every kind must have happened somewhere in the
/// run, or the property test proved nothing about it.
#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    delivered: usize,
    stale: usize,
    held: usize,
    follow_ups: usize,
    per_key_batches: usize,
    restarts: usize,
    replayed: usize,
    replayed_map: usize,
    forced: usize,
    refused_superseded: usize,
    refused_in_flight: usize,
    discarded: usize,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.delivered += o.delivered;
        self.stale += o.stale;
        self.held += o.held;
        self.follow_ups += o.follow_ups;
        self.per_key_batches += o.per_key_batches;
        self.restarts += o.restarts;
        self.replayed += o.replayed;
        self.replayed_map += o.replayed_map;
        self.forced += o.forced;
        self.refused_superseded += o.refused_superseded;
        self.refused_in_flight += o.refused_in_flight;
        self.discarded += o.discarded;
    }

    fn assert_all_seen(&self) {
        let s = self;
        let seen = [
            s.delivered,
            s.stale,
            s.held,
            s.follow_ups,
            s.per_key_batches,
            s.restarts,
            s.replayed,
            s.replayed_map,
            s.forced,
            s.refused_superseded,
            s.refused_in_flight,
            s.discarded,
        ];
        assert!(
            seen.iter().all(|n| *n > 0),
            "the property test missed a case: {s:?}"
        );
    }
}

impl Case {
    fn new(h: &impl Harness) -> Case {
        let mut lanes = Vec::new();
        for f in FLOWS {
            for d in DESTS {
                lanes.push(lane(f, d));
            }
        }
        Case {
            j: h.journal(),
            lanes,
            model: Model::default(),
            events: Vec::new(),
            next_event: 0,
            out: Vec::new(),
            zombies: Vec::new(),
            forced: HashSet::new(),
            dest: Recorder::default(),
            stats: Stats::default(),
        }
    }

    async fn run(mut self, h: &mut impl Harness, ops: &[Op]) -> Stats {
        for (i, op) in ops.iter().enumerate() {
            self.apply(h, op).await;
            self.check(&format!("after op {i} {op:?}"));
        }
        self.drain().await;
        self.check("after draining");
        assert_eq!(self.j.read().outbox_len().expect("outbox_len"), 0);
        self.dest.assert_in_order();
        self.stats
    }

    async fn apply(&mut self, h: &mut impl Harness, op: &Op) {
        match op {
            Op::Ingest(events) => self.ingest(events).await,
            Op::Duplicate(pick) => {
                if self.events.is_empty() {
                    return;
                }
                let e = self.events[pick % self.events.len()].clone();
                let a = self.j.ingest(batch(vec![e])).await.expect("ingest");
                assert_eq!((a.changed, a.duplicates), (0, 1));
            }
            Op::Claim { lane, max, per_key } => {
                let l = self.lanes[*lane].clone();
                let c = self
                    .j
                    .claim(ClaimRequest {
                        lane: l.clone(),
                        max: *max,
                        per_key: *per_key,
                        lease: LEASE,
                    })
                    .await
                    .expect("claim");
                assert!(c.len() <= *max);
                let live: HashSet<i64> = self.out.iter().flatten().map(|c| c.row.id).collect();
                for x in &c {
                    assert_eq!((&x.row.flow, &x.row.destination), (&l.flow, &l.destination));
                    assert!(!live.contains(&x.row.id), "row {} claimed twice", x.row.id);
                }
                let keys: HashSet<_> = c.iter().filter_map(|c| c.row.entity_key.clone()).collect();
                let keyed = c.iter().filter(|c| c.row.entity_key.is_some()).count();
                self.stats.per_key_batches += usize::from(keys.len() < keyed);
                if !c.is_empty() {
                    self.out.push(c);
                }
            }
            Op::Settle {
                claims,
                fates,
                zombies,
                follow_up,
            } => self.settle(claims, fates, *zombies, *follow_up).await,
            Op::Replay { pick, force } => self.replay(*pick, *force).await,
            Op::Discard { pick } => {
                let dead = self.dead();
                if dead.is_empty() {
                    return;
                }
                let e = &dead[pick % dead.len()];
                self.j
                    .discard(e.id, "prop".into())
                    .await
                    .expect("discard a dead entry");
                self.stats.discarded += 1;
                if e.stage == "deliver" {
                    let l = self.model.lane(&e.flow, &e.destination);
                    l[2] -= 1;
                    l[3] += 1;
                } else {
                    let f = self.model.flow(&e.flow);
                    f[2] -= 1;
                    f[3] += 1;
                }
            }
            Op::Restart => {
                self.stats.restarts += 1;
                crate::restart(h, &mut self.j);
                self.zombies.extend(self.out.drain(..).flatten());
            }
        }
    }

    async fn ingest(&mut self, events: &[[Option<(Kind, usize)>; 2]]) {
        let mut batch_events = Vec::new();
        for outcomes in events {
            self.next_event += 1;
            let id = format!("e{}", self.next_event);
            let mut out = Vec::new();
            for (fi, o) in outcomes.iter().enumerate() {
                let Some((kind, key)) = o else { continue };
                let (flow, key) = (FLOWS[fi], KEYS[*key]);
                self.model.flow(flow)[0] += 1;
                out.push(match kind {
                    Kind::Routed => {
                        for d in DESTS {
                            self.model.lane(flow, d)[0] += 1;
                        }
                        routed(flow, &id, &[(DESTS[0], key), (DESTS[1], key)])
                    }
                    Kind::Filtered => {
                        self.model.flow(flow)[1] += 1;
                        FlowOutcome::Filtered { flow: flow.into() }
                    }
                    Kind::Rejected { hold } => {
                        self.model.flow(flow)[2] += 1;
                        let hold: &[&str] = if *hold { &DESTS } else { &[] };
                        rejected(flow, key, hold)
                    }
                });
            }
            batch_events.push(event(&id, out));
        }
        self.events.extend(batch_events.iter().cloned());
        let n = batch_events.len();
        let a = self.j.ingest(batch(batch_events)).await.expect("ingest");
        assert_eq!((a.changed, a.duplicates), (n, 0));
    }

    async fn settle(&mut self, claims: &[usize], fates: &[Fate], zombies: bool, follow_up: bool) {
        if self.out.is_empty() && !zombies {
            return;
        }
        let mut picked: Vec<usize> = if self.out.is_empty() {
            Vec::new()
        } else {
            claims.iter().map(|i| i % self.out.len()).collect()
        };
        picked.sort_unstable();
        picked.dedup();
        let mut rows: Vec<(Claimed, Fate)> = Vec::new();
        let mut n = 0;
        for &i in picked.iter().rev() {
            let claim = self.out.remove(i);
            // a sink writes a key's rows in order: after one that did not
            // go through (or holds its key), the rest of the key waits
            let mut stopped: HashSet<String> = HashSet::new();
            for c in claim {
                let key = c.row.entity_key.clone();
                let mut f = fates[n % fates.len()];
                n += 1;
                if key.as_ref().is_some_and(|k| stopped.contains(k)) {
                    f = Fate::Release;
                }
                if matches!(f, Fate::Retry | Fate::Release | Fate::Dead { hold: true })
                    && let Some(k) = key
                {
                    stopped.insert(k);
                }
                rows.push((c, f));
            }
        }
        let zombies: Vec<Claimed> = if zombies {
            std::mem::take(&mut self.zombies)
        } else {
            Vec::new()
        };
        let now = now_ms();
        let mut items: Vec<Settlement> = rows
            .iter()
            .map(|(c, f)| Settlement {
                id: c.row.id,
                token: c.token,
                attempt: None,
                outcome: match f {
                    Fate::Delivered => Outcome::Delivered(WriteOutcome::default()),
                    Fate::Retry => Outcome::Retry {
                        next_at: now - 1,
                        error: "503".into(),
                    },
                    Fate::Dead { hold } => Outcome::Dead {
                        error: "422".into(),
                        hold_key: *hold,
                    },
                    Fate::Release => Outcome::Release,
                },
            })
            .collect();
        items.extend(zombies.iter().map(|c| Settlement {
            id: c.row.id,
            token: c.token,
            attempt: None,
            outcome: Outcome::Delivered(WriteOutcome::default()),
        }));
        // a saga's next step: the first delivered row's key, at the flow's
        // other destination
        let follow_ups: Vec<FollowUp> = rows
            .iter()
            .find(|(_, f)| follow_up && matches!(f, Fate::Delivered))
            .map(|(c, _)| {
                let r = &c.row;
                let other = DESTS.iter().find(|d| **d != r.destination).copied();
                let other = other.unwrap_or(DESTS[0]);
                self.model.lane(&r.flow, other)[0] += 1;
                self.model.lane(&r.flow, other)[4] += 1;
                self.stats.follow_ups += 1;
                FollowUp {
                    flow: r.flow.clone(),
                    source: r.source.clone(),
                    event_id: format!("{}-next", r.event_id),
                    correlation_id: r.correlation_id.clone(),
                    delivery: delivery(
                        &format!("{}-next", r.event_id),
                        other,
                        r.entity_key.as_deref(),
                    ),
                }
            })
            .into_iter()
            .collect();
        let n_follow = follow_ups.len();
        let s = self
            .j
            .settle(Settle { items, follow_ups })
            .await
            .expect("settle");
        self.stats.stale += s.stale;
        let mut want = Settled {
            stale: zombies.len(),
            follow_ups: n_follow,
            ..Default::default()
        };
        for (c, f) in &rows {
            let (flow, d) = (&c.row.flow, &c.row.destination);
            match f {
                Fate::Delivered => {
                    want.delivered += 1;
                    self.stats.delivered += 1;
                    self.model.lane(flow, d)[1] += 1;
                    self.dest.write(&c.row, self.forced.contains(&c.row.id));
                }
                Fate::Retry => want.retried += 1,
                Fate::Dead { hold } => {
                    want.dead += 1;
                    self.stats.held += usize::from(*hold && c.row.entity_key.is_some());
                    self.model.lane(flow, d)[2] += 1;
                }
                Fate::Release => want.released += 1,
            }
        }
        assert_eq!(s, want);
    }

    async fn replay(&mut self, pick: usize, force: bool) {
        let dead = self.dead();
        if dead.is_empty() {
            return;
        }
        let e = dead[pick % dead.len()].clone();
        let deliver = e.stage == "deliver";
        let outcome = (!deliver).then(|| {
            let key = e.entity_key.as_deref();
            routed(&e.flow, &e.event_id, &[(DESTS[0], key), (DESTS[1], key)])
        });
        let r = self
            .j
            .replay(Replay {
                dlq_id: e.id,
                payload: None,
                outcome,
                force,
                note: "prop".into(),
            })
            .await;
        match r {
            Ok(_) => {}
            Err(StoreError::Refused(Refusal::Superseded { .. })) if !force => {
                self.stats.refused_superseded += 1;
                return;
            }
            Err(StoreError::Refused(Refusal::InFlight)) if !force => {
                self.stats.refused_in_flight += 1;
                return;
            }
            Err(err) => panic!("replay of {e:?} (force {force}): {err}"),
        }
        self.stats.replayed += 1;
        self.stats.replayed_map += usize::from(!deliver);
        self.stats.forced += usize::from(force);
        let lanes: Vec<LaneId> = if deliver {
            self.model.lane(&e.flow, &e.destination)[2] -= 1;
            vec![lane(&e.flow, &e.destination)]
        } else {
            self.model.flow(&e.flow)[2] -= 1;
            DESTS
                .iter()
                .map(|d| {
                    self.model.lane(&e.flow, d)[0] += 1;
                    lane(&e.flow, d)
                })
                .collect()
        };
        if force {
            // a forced row is the newest of all
            for l in lanes {
                let p = self.j.read().pending(&l, 100_000).expect("pending");
                let row = p.iter().max_by_key(|r| r.order_seq).expect("the row");
                assert_eq!(row.event_id, e.event_id);
                self.forced.insert(row.id);
            }
        }
    }

    fn dead(&self) -> Vec<DlqEntry> {
        self.j
            .read()
            .dlq_list(&DlqFilter {
                limit: Some(100_000),
                ..Default::default()
            })
            .expect("dlq_list")
    }

    fn check(&self, when: &str) {
        let r = self.j.read();
        let counts = r.counts(&self.lanes).expect("counts");
        let mut want_depths = Vec::new();
        for l in &self.lanes {
            let c = counts
                .iter()
                .find(|c| c.flow == l.flow && c.destination == l.destination)
                .unwrap_or_else(|| panic!("{when}: no counts for {l:?}"));
            assert!(c.balanced, "{when}: unbalanced {c:?}");
            assert_eq!(nums(c), self.model.nums(l), "{when}: counts of {l:?}");
            if c.dead_lettered > 0 {
                want_depths.push((l.flow.clone(), l.destination.clone(), c.dead_lettered));
            }
        }
        for f in FLOWS {
            let rejected = self.model.flow.get(f).map_or(0, |x| x[2]);
            if rejected > 0 {
                want_depths.push((f.to_owned(), String::new(), rejected));
            }
        }
        want_depths.sort();
        let mut depths = r.dlq_depths().expect("dlq_depths");
        depths.sort();
        assert_eq!(depths, want_depths, "{when}: DLQ depths");

        // leased rows of one key queue all come from one claim
        let mut owner: HashMap<(String, String), usize> = HashMap::new();
        for (i, claim) in self.out.iter().enumerate() {
            for c in claim {
                if let Some(k) = &c.row.entity_key {
                    let o = owner
                        .entry((c.row.destination.clone(), k.clone()))
                        .or_insert(i);
                    assert_eq!(*o, i, "{when}: two claims hold rows of {k}");
                }
            }
        }
        let mut total = 0;
        for l in &self.lanes {
            let p = r.pending(l, 100_000).expect("pending");
            assert!(
                p.windows(2)
                    .all(|w| (w[0].order_seq, w[0].id) <= (w[1].order_seq, w[1].id)),
                "{when}: pending rows out of key order"
            );
            total += p.len() as i64;
        }
        assert_eq!(r.outbox_len().expect("outbox_len"), total);
    }

    /// Settle what is out, discard what is dead, deliver the rest: nothing
    /// may stay stuck.
    async fn drain(&mut self) {
        for _ in 0..500 {
            let claims: Vec<usize> = (0..self.out.len()).collect();
            self.settle(&claims, &[Fate::Delivered], true, false).await;
            for e in self.dead() {
                self.j.discard(e.id, "drain".into()).await.expect("discard");
                if e.stage == "deliver" {
                    let l = self.model.lane(&e.flow, &e.destination);
                    l[2] -= 1;
                    l[3] += 1;
                } else {
                    let f = self.model.flow(&e.flow);
                    f[2] -= 1;
                    f[3] += 1;
                }
            }
            if self.j.read().outbox_len().expect("outbox_len") == 0 {
                return;
            }
            for l in self.lanes.clone() {
                let c = self
                    .j
                    .claim(ClaimRequest {
                        lane: l,
                        max: 1000,
                        per_key: 1,
                        lease: LEASE,
                    })
                    .await
                    .expect("claim");
                if !c.is_empty() {
                    self.out.push(c);
                }
            }
        }
        panic!("the outbox did not drain: rows are stuck");
    }
}
