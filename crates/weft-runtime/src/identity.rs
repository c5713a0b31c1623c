//! Identity lanes: a row of an identity flow names a canonical record; the
//! lane reads the record as it is when the write goes out (never a stale
//! copy), maps it for the destination, and skips the write when the
//! destination already holds exactly this payload (the fingerprint of the
//! last write, kept with the link). The settle records what was written as
//! the destination's base, so the destination's echo of it is recognised by
//! its values and not propagated again.

use std::sync::Arc;

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use weft_connectors::{Delivery, SinkError, WriteResult, Written};
use weft_core::mapping::Program;
use weft_store::{CanonicalWritten, Claimed, Journal};

/// What an identity lane needs to write canonical records.
#[derive(Debug)]
pub struct LaneIdentity {
    pub destination: String,
    /// The destination's mapping: from the canonical record (with `_id`,
    /// `_ids` and `_canonical_id`) to the payload.
    pub mapping: Option<Arc<Program>>,
}

/// A claimed row, ready to write or already decided.
pub(crate) enum Prepared {
    Write(Delivery, Option<CanonicalWritten>),
    Done(WriteResult, Option<CanonicalWritten>),
}

/// The mapping's input: the record's fields, plus `_canonical_id`, `_id`
/// (this destination's id of the record, null until it gave one) and `_ids`
/// (every linked system's id).
pub fn mapping_input(
    state: &Map<String, Value>,
    canonical_id: &str,
    destination: &str,
    ids: &[(String, Option<String>)],
) -> Value {
    let mut input = state.clone();
    let mut all = Map::new();
    for (system, id) in ids {
        if let Some(id) = id {
            all.insert(system.clone(), Value::String(id.clone()));
        }
    }
    input.insert(
        "_id".into(),
        all.get(destination).cloned().unwrap_or(Value::Null),
    );
    input.insert("_ids".into(), Value::Object(all));
    input.insert("_canonical_id".into(), Value::String(canonical_id.into()));
    Value::Object(input)
}

pub(crate) fn prepare(journal: &dyn Journal, id: &LaneIdentity, c: &Claimed) -> Prepared {
    let fail = |e: SinkError| Prepared::Done(Err(e), None);
    let (entity, cid) = match serde_json::from_str::<Value>(&c.row.payload) {
        Ok(v) => match (v.get("entity"), v.get("canonical_id")) {
            (Some(Value::String(e)), Some(Value::String(i))) => (e.clone(), i.clone()),
            _ => {
                return fail(SinkError::permanent(
                    "the row does not name a canonical record",
                ));
            }
        },
        Err(e) => {
            return fail(SinkError::permanent(format!(
                "the stored payload cannot be read: {e}"
            )));
        }
    };
    let view = match journal.read().canonical(&entity, &cid) {
        Ok(Some(v)) => v,
        Ok(None) => {
            return fail(SinkError::permanent(format!(
                "canonical record {entity} {cid} does not exist"
            )));
        }
        Err(e) => {
            return fail(SinkError::retryable(format!(
                "cannot read canonical record {entity} {cid}: {e}"
            )));
        }
    };
    let ids: Vec<(String, Option<String>)> = view
        .links
        .iter()
        .map(|l| (l.system.clone(), l.external_id.clone()))
        .collect();
    let map = |state: &Map<String, Value>| -> Result<Value, SinkError> {
        let input = mapping_input(state, &cid, &id.destination, &ids);
        match &id.mapping {
            None => {
                let mut v = input;
                if let Value::Object(m) = &mut v {
                    m.remove("_ids");
                    m.remove("_canonical_id");
                    if m.get("_id") == Some(&Value::Null) {
                        m.remove("_id");
                    }
                }
                Ok(v)
            }
            Some(p) => p
                .eval(&input, &json!({"entity": entity, "canonical_id": cid}), &[])
                .map_err(|e| {
                    SinkError::permanent(format!("mapping for `{}` failed: {e}", id.destination))
                }),
        }
    };
    let payload = match map(&view.state) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let link = view.links.iter().find(|l| l.system == id.destination);
    // what the destination holds as far as weft knows, in its own terms
    let known = link
        .and_then(|l| weft_core::identity::estimate(l.base.as_ref(), l.written.as_ref()))
        .and_then(|k| map(&k).ok());
    let fingerprint = hex::encode(Sha256::digest(payload.to_string().as_bytes()));
    // the destination holds this already (what it reported, with weft's
    // writes it has not reported back on top): nothing to write
    let holds = link.is_some_and(|l| l.external_id.is_some()) && known.as_ref() == Some(&payload);
    if holds {
        return Prepared::Done(Ok(Written::default()), None);
    }
    let written = CanonicalWritten {
        entity,
        canonical_id: cid,
        base: Value::Object(view.state).to_string(),
        fingerprint,
    };
    Prepared::Write(
        Delivery {
            id: c.row.id,
            idempotency_key: c.row.idempotency_key.clone(),
            correlation_id: c.row.correlation_id.clone(),
            event_id: c.row.event_id.clone(),
            entity_key: c.row.entity_key.clone(),
            attempt: c.row.attempts + 1,
            payload,
            context: weft_connectors::sink::DeliveryContext {
                flow: c.row.flow.clone(),
                source: c.row.source.clone(),
                event_time_ms: c.row.event_time,
                traceparent: c.row.traceparent.clone(),
                tracestate: c.row.tracestate.clone(),
            },
        },
        Some(written),
    )
}
