//! Test utilities for journal users: a destination that records what it
//! received.

use std::collections::BTreeMap;

use weft_store::OutboxRow;

/// One write a destination received: `(order_seq, event id, forced)`.
pub type Write = (i64, String, bool);

/// A destination that records every write per key queue, to check that it
/// never receives an older version after a newer one.
#[derive(Default)]
pub struct Recorder {
    /// `(destination, key)` -> its writes, in write order.
    writes: BTreeMap<(String, String), Vec<Write>>,
}

impl Recorder {
    /// A write of `row`; `forced` when it came from a forced replay (which
    /// may put older data over newer by the operator's choice).
    pub fn write(&mut self, row: &OutboxRow, forced: bool) {
        if let Some(k) = &row.entity_key {
            self.writes
                .entry((row.destination.clone(), k.clone()))
                .or_default()
                .push((row.order_seq, row.event_id.clone(), forced));
        }
    }

    /// The event ids written to `(destination, key)`, in write order.
    pub fn events(&self, destination: &str, key: &str) -> Vec<&str> {
        self.writes
            .get(&(destination.to_owned(), key.to_owned()))
            .map_or_else(Vec::new, |w| w.iter().map(|(_, e, _)| e.as_str()).collect())
    }

    /// Unforced writes of each key arrived in strictly increasing order.
    pub fn assert_in_order(&self) {
        for (queue, writes) in &self.writes {
            let seqs: Vec<i64> = writes
                .iter()
                .filter(|(_, _, forced)| !forced)
                .map(|(s, _, _)| *s)
                .collect();
            assert!(
                seqs.windows(2).all(|w| w[0] < w[1]),
                "{queue:?} received an older version after a newer one: {writes:?}"
            );
        }
    }
}
