//! `references:` on a flow's destination: fields of the payload that hold
//! one system's id of a canonical record, replaced at delivery by the
//! destination's id of the same record. A row whose record the destination
//! has no id for yet waits (no attempt spent) until it has one, up to
//! `wait`, then goes to the DLQ with the reason.
//!
//! ```yaml
//! flows:
//!   shop_orders:
//!     from: shop
//!     key: .id | tostring
//!     mapping: '{order_no: .id, customer: .customer_id, total}'
//!     to:
//!       - system: erp
//!         references:
//!           # `customer` holds the shop's id of a customer: the ERP's id of it is written
//!           customer: {entity: customer, from: shop, to: erp, wait: 24h}
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use schemars::JsonSchema;
use serde::Deserialize;
use serde_saphyr::Spanned;

use super::Issue;

/// Default time a write waits for a referenced record's id.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(24 * 3600);

/// `references.<field>`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawReference {
    /// The entity (a key of `identity:`) the field's id is of.
    #[schemars(with = "String")]
    pub entity: Spanned<String>,
    /// The system whose id the field holds (default: the flow's source).
    #[schemars(with = "Option<String>")]
    pub from: Option<Spanned<String>>,
    /// The system whose id of the record is written (default: the
    /// destination; name another when the destination is one endpoint of
    /// a system weft links records of under another name).
    #[schemars(with = "Option<String>")]
    pub to: Option<Spanned<String>>,
    /// How long a write waits for the destination's id of the record
    /// (default `24h`); then it goes to the DLQ.
    #[schemars(with = "Option<String>")]
    pub wait: Option<Spanned<String>>,
}

/// One resolved reference of a destination.
#[derive(Debug, Clone, PartialEq)]
pub struct Reference {
    /// Top-level field of the payload.
    pub field: String,
    pub entity: String,
    /// The system whose id the field holds.
    pub from: String,
    /// The system whose id is written; `None`: the destination.
    pub to: Option<String>,
    pub wait: Duration,
}

/// What the checks need to know of the rest of the config.
pub(super) struct Known<'a> {
    pub systems: &'a dyn Fn(&str) -> bool,
    pub entities: &'a dyn Fn(&str) -> bool,
    /// The flow's source system.
    pub from: &'a str,
    /// The flow feeds canonical records itself (`identity:`).
    pub identity_flow: bool,
}

pub(super) fn references(
    issues: &mut Vec<Issue>,
    dp: &str,
    raw: BTreeMap<String, RawReference>,
    k: &Known<'_>,
) -> Vec<Reference> {
    let mut out = Vec::new();
    for (field, r) in raw {
        let p = format!("{dp}.references.{field}");
        let before = issues.len();
        if k.identity_flow {
            push(
                issues,
                &p,
                &r.entity,
                "an identity flow's destination mapping has every system's id already (`_ids`): references are for other flows".into(),
            );
        }
        if field.is_empty() || field.starts_with('_') {
            push(
                issues,
                &p,
                &r.entity,
                format!("`{field}`: expected a top-level field of the payload"),
            );
        }
        if !(k.entities)(&r.entity.value) {
            push(
                issues,
                &format!("{p}.entity"),
                &r.entity,
                format!(
                    "unknown entity `{}`; declare it under `identity:`",
                    r.entity.value
                ),
            );
        }
        let mut system = |name: &str, s: &Option<Spanned<String>>| {
            if let Some(s) = s
                && !(k.systems)(&s.value)
            {
                push(
                    issues,
                    &format!("{p}.{name}"),
                    s,
                    format!("unknown system `{}`", s.value),
                );
            }
            s.as_ref().map(|s| s.value.clone())
        };
        let from = system("from", &r.from).unwrap_or_else(|| k.from.to_owned());
        let to = system("to", &r.to);
        let wait = match &r.wait {
            None => DEFAULT_WAIT,
            Some(w) => match super::parse_duration(&w.value) {
                Ok(d) if !d.is_zero() => d,
                Ok(_) => {
                    push(
                        issues,
                        &format!("{p}.wait"),
                        w,
                        "expected a duration above zero (`24h`, `15m`)".into(),
                    );
                    DEFAULT_WAIT
                }
                Err(e) => {
                    push(issues, &format!("{p}.wait"), w, e);
                    DEFAULT_WAIT
                }
            },
        };
        if issues.len() == before {
            out.push(Reference {
                field,
                entity: r.entity.value,
                from,
                to,
                wait,
            });
        }
    }
    out
}

fn push<T>(issues: &mut Vec<Issue>, path: &str, span: &Spanned<T>, message: String) {
    let loc = span.referenced;
    issues.push(Issue {
        path: path.to_owned(),
        line: Some(loc.line()).filter(|l| *l > 0),
        column: Some(loc.column()).filter(|c| *c > 0),
        message,
    });
}
