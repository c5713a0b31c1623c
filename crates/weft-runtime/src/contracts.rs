//! Contract checks at the two boundaries of a flow: after its mapping (the
//! flow's `entity`) and before each write (a destination's `contract`).
//!
//! A violation follows the flow's `on_violation`: `dead_letter` rejects the
//! flow's outcome (DLQ, stage `map`, the violations as the error), `reject`
//! does the same and makes the ingest refuse the whole request (webhooks
//! answer 422), `warn` lets the record through, logs and counts it.

use metrics::counter;
use serde_json::Value;
use weft_core::config::entities::{OnViolation, Violation, describe};
use weft_core::config::{Destination, Flow};
use weft_store::{FlowOutcome, IngestBatch, Stage};

/// Counter of contract violations, by flow, boundary and mode.
pub const VIOLATIONS: &str = "weft_contract_violations_total";

/// Errors of `reject`-mode violations start with this.
pub const REJECT_PREFIX: &str = "contract violation (reject)";

/// Check the flow's mapped record against its entity contract.
pub fn check_entity(flow: &Flow, mapped: &Value) -> Result<(), FlowOutcome> {
    let Some(e) = &flow.data.entity else {
        return Ok(());
    };
    match e.check(mapped) {
        Ok(()) => Ok(()),
        Err(vs) => violated(flow, &format!("entity {}", e.label()), "entity", &vs),
    }
}

/// Check one destination's payload against its contract.
pub fn check_destination(flow: &Flow, d: &Destination, payload: &Value) -> Result<(), FlowOutcome> {
    let Some(c) = &d.contract else {
        return Ok(());
    };
    if c.is_valid(payload) {
        return Ok(());
    }
    let vs = c.violations(payload, flow.data.sensitive());
    violated(
        flow,
        &format!("contract of `{}`", d.system),
        "destination",
        &vs,
    )
}

/// Every violation of a mapped record and of its payloads, whatever the
/// flow's mode (for `weft map test`).
pub fn violations_of(flow: &Flow, mapped: &Value) -> Vec<Violation> {
    match &flow.data.entity {
        Some(e) => e.check(mapped).err().unwrap_or_default(),
        None => Vec::new(),
    }
}

fn violated(
    flow: &Flow,
    what: &str,
    boundary: &'static str,
    vs: &[Violation],
) -> Result<(), FlowOutcome> {
    let mode = match flow.data.on_violation {
        OnViolation::DeadLetter => "dead_letter",
        OnViolation::Reject => "reject",
        OnViolation::Warn => "warn",
    };
    counter!(VIOLATIONS, "flow" => flow.name.clone(), "boundary" => boundary, "mode" => mode)
        .increment(1);
    let text = format!("{what}: {}", describe(vs));
    match flow.data.on_violation {
        OnViolation::Warn => {
            tracing::warn!(flow = %flow.name, violations = %text, "contract violation; delivered (on_violation: warn)");
            Ok(())
        }
        OnViolation::DeadLetter => Err(FlowOutcome::rejected(
            flow.name.clone(),
            Stage::Map,
            format!("contract violation: {text}"),
        )),
        OnViolation::Reject => Err(FlowOutcome::rejected(
            flow.name.clone(),
            Stage::Map,
            format!("{REJECT_PREFIX}: {text}"),
        )),
    }
}

/// The reason to refuse a prepared batch: a `reject`-mode violation.
pub fn refusal(batch: &IngestBatch) -> Option<String> {
    batch
        .events
        .iter()
        .flat_map(|e| &e.outcomes)
        .find_map(|o| match o {
            FlowOutcome::Rejected {
                flow,
                stage: Stage::Map,
                error,
                ..
            } if error.starts_with(REJECT_PREFIX) => Some(format!("flow `{flow}`: {error}")),
            _ => None,
        })
}
