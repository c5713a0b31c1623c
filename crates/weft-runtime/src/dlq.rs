//! DLQ operations shared by the CLI (`weft dlq`) and the admin API:
//! replay (as it is, with an edited payload, or through the flow again for
//! parse/map failures) and discard. A replay keeps the correlation id and the
//! idempotency key and is recorded in the entry's history; the journal
//! refuses one that would put older data over a newer write of its key
//! (unless forced).

use weft_core::config::Config;
use weft_store::{DlqEntry, Journal, Replay};

/// Why an entry could not be replayed or discarded.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] weft_store::StoreError),
}

impl DlqError {
    /// A mistake of the caller's (a 4xx), not a failure of the store.
    pub fn is_user_error(&self) -> bool {
        match self {
            DlqError::Invalid(_) => true,
            DlqError::Store(e) => e.is_user_error(),
        }
    }
}

/// Replay one entry; `payload` (JSON text) replaces the stored one.
pub async fn replay(
    config: &Config,
    journal: &dyn Journal,
    e: &DlqEntry,
    payload: Option<&str>,
    force: bool,
) -> Result<(), DlqError> {
    // the journal refuses it too, but a resolved entry's payload is gone:
    // say why before remapping nothing
    if e.status != "dead" {
        return Err(DlqError::Invalid(format!(
            "DLQ entry {} is already {}",
            e.id, e.status
        )));
    }
    if let Some(p) = payload {
        serde_json::from_str::<serde_json::Value>(p).map_err(|err| {
            DlqError::Invalid(format!("the replacement payload is not JSON: {err}"))
        })?;
    }
    let mut note = if payload.is_some() {
        "replayed with an edited payload".to_string()
    } else {
        "replayed".to_string()
    };
    if force {
        note.push_str(" (forced)");
    }
    let outcome = if e.stage == "deliver" {
        None
    } else {
        Some(remap(config, e, payload)?)
    };
    journal
        .replay(Replay {
            dlq_id: e.id,
            payload: payload.map(str::to_owned),
            outcome,
            force,
            note,
        })
        .await?;
    Ok(())
}

/// Discard one entry: it stays listed with status `discarded`.
pub async fn discard(journal: &dyn Journal, id: i64, note: &str) -> Result<(), DlqError> {
    journal.discard(id, note.to_owned()).await?;
    Ok(())
}

/// Run a parse/map-stage entry through its flow again.
fn remap(
    config: &Config,
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
    let attrs = e
        .attributes
        .as_deref()
        .and_then(|a| serde_json::from_str(a).ok())
        .unwrap_or_else(
            || serde_json::json!({"id": e.event_id, "correlationid": e.correlation_id}),
        );
    Ok(crate::run_flow(flow, &e.source, &e.event_id, &data, &attrs))
}
