//! DLQ operations shared by the CLI (`weft dlq`) and the admin API:
//! replay (as it is, with an edited payload, or through the flow again for
//! parse/map failures) and discard. A replay keeps the correlation id and the
//! idempotency key and is recorded in the entry's history.

use weft_core::config::Config;
use weft_store::{DlqEntry, Op, Store};

/// Why an entry could not be replayed or discarded.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] weft_store::StoreError),
}

/// Replay one entry; `payload` (JSON text) replaces the stored one.
pub fn replay_blocking(
    config: &Config,
    store: &Store,
    e: &DlqEntry,
    payload: Option<&str>,
) -> Result<(), DlqError> {
    if let Some(p) = payload {
        serde_json::from_str::<serde_json::Value>(p).map_err(|err| {
            DlqError::Invalid(format!("the replacement payload is not JSON: {err}"))
        })?;
    }
    let note = if payload.is_some() {
        "replayed with an edited payload"
    } else {
        "replayed"
    };
    let op = if e.stage == "deliver" {
        Op::Replay {
            dlq_id: e.id,
            payload: payload.map(str::to_owned),
            note: note.into(),
        }
    } else {
        Op::ReplayMapped {
            dlq_id: e.id,
            outcome: remap(config, store, e, payload)?,
            note: note.into(),
        }
    };
    store.apply_blocking(op)?;
    Ok(())
}

/// Discard one entry: it stays listed with status `discarded`.
pub fn discard_blocking(store: &Store, id: i64, note: &str) -> Result<(), DlqError> {
    store.apply_blocking(Op::Discard {
        dlq_id: id,
        note: note.into(),
    })?;
    Ok(())
}

/// Run a parse/map-stage entry through its flow again.
fn remap(
    config: &Config,
    store: &Store,
    e: &DlqEntry,
    payload: Option<&str>,
) -> Result<weft_store::FlowOutcome, DlqError> {
    let flow = config
        .flows
        .iter()
        .find(|f| f.name == e.flow)
        .ok_or_else(|| {
            DlqError::Invalid(format!("flow `{}` is no longer in the config", e.flow))
        })?;
    let text = payload.unwrap_or(&e.payload);
    let data: serde_json::Value = serde_json::from_str(text).map_err(|_| {
        DlqError::Invalid(
            "the stored payload is not JSON (a parse failure): replay it with an edited payload"
                .into(),
        )
    })?;
    let attrs = store
        .reader()?
        .inbox_attributes(&e.source, &e.event_id)?
        .and_then(|a| serde_json::from_str(&a).ok())
        .unwrap_or_else(
            || serde_json::json!({"id": e.event_id, "correlationid": e.correlation_id}),
        );
    Ok(crate::run_flow(flow, &e.source, &e.event_id, &data, &attrs))
}
