//! References resolved at delivery (`references:` on a destination): a
//! payload field holds one system's id of a canonical record (an order's
//! customer, as the shop knows it); when the row is written, the field gets
//! the destination's id of the same record (the ERP's customer number). A
//! row whose record the destination has no id for yet is not written: it
//! waits (`Outcome::Wait`, no attempt spent, its key's later rows behind
//! it) and is looked at again, less often the longer it waits, until the
//! id exists or its `wait` runs out (then the DLQ, with the reason).

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use weft_connectors::{Delivery, SinkError};
use weft_core::ErrorKind;
use weft_core::config::references::Reference;
use weft_store::Journal;

/// What a lane with references needs.
#[derive(Debug)]
pub struct LaneRefs {
    pub destination: String,
    pub refs: Vec<Reference>,
}

impl LaneRefs {
    /// How long a row may wait: the longest of its references' waits.
    pub fn wait(&self) -> Duration {
        self.refs.iter().map(|r| r.wait).max().unwrap_or_default()
    }
}

/// A delivery with its references resolved, or why it waits.
pub(crate) enum Resolved {
    Ready(Box<Delivery>),
    Waiting(String),
}

/// Marks a [`SinkError`] as "not written yet, waiting" (no attempt spent).
#[derive(Debug)]
struct Waiting;

impl std::fmt::Display for Waiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("waiting for a referenced record")
    }
}

impl std::error::Error for Waiting {}

/// The result of a row that waits.
pub(crate) fn waiting(reason: String) -> SinkError {
    SinkError {
        kind: ErrorKind::Retryable,
        message: reason,
        retry_after: None,
        status: None,
        source: Some(Box::new(Waiting)),
    }
}

/// Whether a failed result is a row that waits.
pub(crate) fn is_waiting(e: &SinkError) -> bool {
    e.source.as_deref().is_some_and(|s| s.is::<Waiting>())
}

/// When a row that has waited `age` is looked at again: a tenth of its
/// age, between half a second and half a minute.
pub(crate) fn next_look(age: Duration) -> Duration {
    (age / 10).clamp(Duration::from_millis(500), Duration::from_secs(30))
}

/// `24h`, `15m`, `90s`: a wait as written in the config.
pub(crate) fn span(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// Put the destination's ids into `d`'s referenced fields (a blocking
/// read of the store).
pub(crate) fn resolve(
    journal: &dyn Journal,
    lr: &LaneRefs,
    mut d: Delivery,
) -> Result<Resolved, SinkError> {
    let read = journal.read();
    let Value::Object(m) = &mut d.payload else {
        return Err(SinkError::permanent(
            "the payload is not an object: its references cannot be resolved",
        ));
    };
    for r in &lr.refs {
        let to = r.to.as_deref().unwrap_or(&lr.destination);
        let ext = match m.get(&r.field) {
            None | Some(Value::Null) => continue,
            Some(Value::String(s)) => s.clone(),
            Some(v @ Value::Number(_)) => v.to_string(),
            Some(other) => {
                return Err(SinkError::permanent(format!(
                    "`{}` holds {}: expected {}'s id of a {}",
                    r.field,
                    kind(other),
                    r.from,
                    r.entity
                )));
            }
        };
        let unreadable = |e: weft_store::StoreError| {
            SinkError::retryable(format!(
                "cannot read the {} record {}:{ext}: {e}",
                r.entity, r.from
            ))
        };
        let Some(mut cid) = read
            .canonical_by_external(&r.entity, &r.from, &ext)
            .map_err(unreadable)?
        else {
            return Ok(Resolved::Waiting(format!(
                "waiting for the {} {}:{ext} (`{}`): weft has not seen it yet",
                r.entity, r.from, r.field
            )));
        };
        // a merged record's links are on the record it was merged into
        let mut view = None;
        for _ in 0..8 {
            match read.canonical(&r.entity, &cid).map_err(unreadable)? {
                Some(v) => match v.merged_into.clone() {
                    Some(into) => cid = into,
                    None => {
                        view = Some(v);
                        break;
                    }
                },
                None => break,
            }
        }
        let id = view.and_then(|v| {
            v.links
                .into_iter()
                .find(|l| l.system == to)
                .and_then(|l| l.external_id)
        });
        match id {
            Some(id) => {
                m.insert(r.field.clone(), Value::String(id));
            }
            None => {
                return Ok(Resolved::Waiting(format!(
                    "waiting for {to}'s id of the {} {}:{ext} (`{}`)",
                    r.entity, r.from, r.field
                )));
            }
        }
    }
    Ok(Resolved::Ready(Box::new(d)))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Bool(_) => "a boolean",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
        _ => "a value",
    }
}

/// Resolve a claimed batch's references off the async workers: `(index in
/// the batch, result)` for every delivery.
pub(crate) async fn resolve_all(
    journal: Arc<dyn Journal>,
    lr: Arc<LaneRefs>,
    ready: Vec<(usize, Delivery)>,
) -> Result<Vec<(usize, Result<Resolved, SinkError>)>, tokio::task::JoinError> {
    tokio::task::spawn_blocking(move || {
        ready
            .into_iter()
            .map(|(i, d)| (i, resolve(journal.as_ref(), &lr, d)))
            .collect()
    })
    .await
}
