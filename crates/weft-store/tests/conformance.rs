//! The journal conformance suite: the [`Journal`] contract (journal.rs),
//! checked against `&dyn Journal` only, so that every engine runs the same
//! tests. An engine joins with a [`Harness`] and one line:
//!
//! ```ignore
//! struct Sqlite { dir: tempfile::TempDir, j: Option<Arc<SqliteJournal>> }
//! impl Harness for Sqlite {
//!     fn journal(&self) -> Arc<dyn Journal> { self.j.clone().expect("open") }
//!     fn restart(&mut self) {
//!         self.j = None; // the last handle: the old journal closes here
//!         let path = self.dir.path().join("w.db");
//!         self.j = Some(Arc::new(SqliteJournal::open(&path).expect("reopen")));
//!     }
//! }
//! conformance!(sqlite, || Sqlite::new());
//! ```
//!
//! Engines on a service (PostgreSQL) join with a readiness check as third
//! argument: `conformance!(postgres, pg::Postgres::new, pg::available,
//! pg::schema_per_case)`.
//!
//! The property test runs the same 200 sequences on every run (a failure
//! reproduces); `WEFT_PROP_RANDOM=1` explores new ones, `WEFT_PROP_STATS=1`
//! prints what a run exercised.
//!
//! Every step of every test checks the accounting identity on every lane it
//! knows (`Rig`), and each test asserts exact values. Regression tests are
//! named for the review finding they pin (`shared/review/spine-2026-12.md`).

use std::sync::Arc;

use weft_store::{Journal, MemoryJournal};

#[path = "conformance/cases.rs"]
mod cases;
#[cfg(feature = "postgres")]
#[path = "conformance/pg.rs"]
pub mod pg;
#[path = "conformance/prop.rs"]
mod prop;
#[path = "conformance/testing.rs"]
pub mod testing;

/// One engine under test.
pub trait Harness {
    /// The journal as it is now. Call again after [`Harness::restart`]: an
    /// engine may hand out a new one (SQLite reopens its file).
    fn journal(&self) -> Arc<dyn Journal>;
    /// A crash and restart: every lease is void, everything committed stays.
    /// The suite has dropped its handles of the old journal by then (see
    /// [`restart`]), so an engine can close it before opening the new one.
    fn restart(&mut self);
}

/// Restarts `h` with `j` (the suite's handle) dropped first, and returns
/// the engine's new journal.
pub fn restart(h: &mut impl Harness, j: &mut Arc<dyn Journal>) {
    // a placeholder, so that the old journal is gone during the restart
    *j = Arc::new(MemoryJournal::new());
    h.restart();
    *j = h.journal();
}

/// Instantiates every conformance test for one engine: `conformance!(name,
/// || -> impl Harness)`, or `conformance!(name, make, ready, cases)` for an
/// engine on a service: each test runs only when `ready()` (which says
/// loudly why not, or fails under `CI=true`), and the property test takes
/// its fresh journals from `cases()` (a maker that can share a server-side
/// resource between its ~200 cases).
macro_rules! conformance {
    ($name:ident, $make:expr) => {
        conformance!($name, $make, || true, || $make);
    };
    ($name:ident, $make:expr, $ready:expr, $cases:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            conformance!(@tests $make, $ready;
                lifecycle_keeps_every_record_accounted_for,
                ingest_is_all_or_nothing,
                position_dedupe_stores_repeats_and_prune_forgets_ids,
                claim_hands_out_only_heads_of_key_queues,
                wait_spends_no_attempt_and_keeps_the_key_head,
                p3_2_one_key_queue_across_flows,
                lease_expires_and_stale_settlements_change_nothing,
                restart_voids_leases,
                per_key_takes_consecutive_rows_of_the_lane,
                hold_key_holds_until_replay_or_discard,
                map_stage_rejection_holds_listed_destinations,
                p1_1_replay_refused_while_a_later_row_is_in_flight,
                p0_4_replay_refused_when_superseded,
                p0_4_map_stage_entry_superseded,
                replay_keeps_its_place_in_the_key_queue,
                replay_and_discard_refuse_bad_requests,
                settle_applies_everything_in_one_call,
                p0_3_external_id_committed_with_delivered,
                dlq_list_pages_and_filters,
                counts_list_empty_lanes_balanced,
                drift_is_recorded,
                p1_2_p1_8_blocked_keys_do_not_starve_the_lane,
                p1_4_counts_balance_under_concurrent_writes,
                p1_9_applied_counts_and_last_received,
                lookup_and_checkpoints_list_what_the_store_keeps,
                delivered_at_ingest_counts_without_a_row,
                p1_20_resolved_dlq_entries_and_old_drift_are_pruned,
                attempt_trail_keeps_each_write,
                topics_keep_each_publication_once_in_order
            );
            #[test]
            fn property_random_operations_keep_invariants() {
                if ($ready)() {
                    crate::prop::run(($cases)());
                }
            }
        }
    };
    (@tests $make:expr, $ready:expr; $($t:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $t() {
                if !($ready)() {
                    return;
                }
                let mut h = ($make)();
                crate::cases::$t(&mut h).await;
            }
        )*
    };
}

/// The in-memory engine: restart is [`MemoryJournal::restart`].
pub struct Memory(Arc<MemoryJournal>);

impl Harness for Memory {
    fn journal(&self) -> Arc<dyn Journal> {
        self.0.clone()
    }

    fn restart(&mut self) {
        self.0.restart().expect("restart the memory journal");
    }
}

conformance!(memory, || Memory(Arc::new(MemoryJournal::new())));

/// The SQLite engine on a temporary file; restart drops and reopens it (a
/// hub's open ends the leases of the run before).
pub struct Sqlite {
    dir: tempfile::TempDir,
    j: Option<Arc<weft_store::SqliteJournal>>,
}

impl Sqlite {
    fn new() -> Sqlite {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut s = Sqlite { dir, j: None };
        s.restart();
        s
    }
}

impl Harness for Sqlite {
    fn journal(&self) -> Arc<dyn Journal> {
        self.j.clone().expect("the journal is open")
    }

    fn restart(&mut self) {
        self.j = None;
        let path = self.dir.path().join("w.db");
        let mut last = None;
        for _ in 0..100 {
            match weft_store::SqliteJournal::open(
                &path,
                weft_store::Synchronous::Normal,
                weft_store::Role::Hub,
            ) {
                Ok(j) => {
                    self.j = Some(Arc::new(j));
                    return;
                }
                Err(e) => {
                    last = Some(e);
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
        }
        panic!("cannot reopen the SQLite journal: {last:?}");
    }
}

conformance!(sqlite, Sqlite::new);

/// The PostgreSQL engine (`pg.rs`: a database of the machine's PostgreSQL
/// per test).
#[cfg(feature = "postgres")]
mod postgres_harness {
    use super::*;
    use crate::pg;

    /// The conformance harness: a database per test; restart drops every
    /// connection (the journal) and opens it again as the same node's hub,
    /// which ends that node's leases.
    pub struct Postgres {
        j: Option<Arc<weft_store::PgJournal>>,
        opts: weft_store::PgOptions,
        // after `j`: the journal closes before its database is dropped
        db: Arc<pg::Database>,
    }

    impl Postgres {
        pub fn new() -> Postgres {
            Postgres::in_schema(Arc::new(pg::Database::create()), "weft")
        }

        /// A journal in `schema` of a shared database.
        pub fn in_schema(db: Arc<pg::Database>, schema: &str) -> Postgres {
            let opts = weft_store::PgOptions {
                schema: schema.into(),
                ..db.options("conformance", weft_store::PgRole::Hub)
            };
            let j = Some(Arc::new(db.open_with(opts.clone())));
            Postgres { j, opts, db }
        }
    }

    impl Default for Postgres {
        fn default() -> Self {
            Self::new()
        }
    }

    /// For the property test's ~200 cases: one database, a fresh schema (a
    /// journal of its own) per case; the database goes when the test ends.
    pub fn schema_per_case() -> impl Fn() -> Postgres {
        let db = Arc::new(pg::Database::create());
        let n = std::sync::atomic::AtomicUsize::new(0);
        move || {
            let schema = format!(
                "case_{}",
                n.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            );
            Postgres::in_schema(db.clone(), &schema)
        }
    }

    impl Harness for Postgres {
        fn journal(&self) -> Arc<dyn Journal> {
            self.j.clone().expect("the journal is open")
        }

        fn restart(&mut self) {
            self.j = None;
            self.j = Some(Arc::new(self.db.open_with(self.opts.clone())));
        }
    }
}

// The PostgreSQL engine: a database per test on the machine's PostgreSQL;
// restart closes every connection and opens the journal again.
#[cfg(feature = "postgres")]
conformance!(
    postgres,
    postgres_harness::Postgres::new,
    pg::available,
    postgres_harness::schema_per_case
);
