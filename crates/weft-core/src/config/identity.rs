//! `identity:` in the config: per entity, who may create canonical records,
//! who owns which field and how conflicts are decided; and the flows that
//! feed an entity's canonical records (`flows.<name>.identity`).
//!
//! ```yaml
//! identity:
//!   customer:
//!     create: [crm]                 # only the CRM creates customers (default: any system)
//!     owners:                       # top-level fields of the flows' mapped records
//!       credit_limit: [erp]
//!       "*": [crm, erp]             # every other field; ranked for `source_of_truth`
//!     conflict: last_write_wins     # | source_of_truth | manual
//!     non_owner: drop               # | flag
//!     match: [email]                # link a new id to the record with this normalised value
//!     fuzzy:                        # then: compare with the records sharing a blocking value
//!       fields: {name: 2, company: 1}   # Jaro-Winkler on normalised values, weighted
//!       block: [company]            # candidates share one of these normalised values
//!       link: 0.95                  # at or above: linked
//!       review: 0.80                # at or above: held for `weft matches accept|reject`; below: created
//! flows:
//!   crm_customers: {from: crm, identity: customer, key: .id | tostring, mapping: ..., to: [erp]}
//! ```

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Deserialize;
use serde_saphyr::Spanned;

use super::Issue;
use crate::identity::{ConflictPolicy, Fuzzy, NonOwnerPolicy, Route, Rules};

/// The identity rules of one entity.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawIdentity {
    /// Systems that may create a canonical record of this entity; a record
    /// first reported by another system is refused (counted, in the history)
    /// unless a match key links it. Default: every system.
    #[schemars(with = "Option<Vec<String>>")]
    pub create: Option<Vec<Spanned<String>>>,
    /// Owners per top-level field, ranked (first = most trusted); `"*"` for
    /// every field not named. A change from a system not listed is handled
    /// by `non_owner`. Default: every system owns every field.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, Vec<String>>")]
    pub owners: BTreeMap<String, Vec<Spanned<String>>>,
    /// How two systems changing one field concurrently is decided:
    /// `last_write_wins` (default; by event time), `source_of_truth` (by rank
    /// in `owners`) or `manual` (queued: `weft conflicts`).
    pub conflict: Option<ConflictPolicy>,
    /// A change from a system that does not own the field: `drop` (default;
    /// counted) or `flag` (counted and kept in the record's history).
    pub non_owner: Option<NonOwnerPolicy>,
    /// Fields whose normalised value (case, accents, whitespace, punctuation,
    /// "Ltd"/"Limited") links an id weft has not seen to an existing record
    /// instead of creating one.
    #[serde(default, rename = "match")]
    pub match_on: Vec<String>,
    /// Fuzzy matching, tried when neither a link nor a `match` key finds the
    /// record.
    pub fuzzy: Option<RawFuzzy>,
}

/// `identity.<entity>.fuzzy`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawFuzzy {
    /// Top-level fields compared (normalised like match keys, then
    /// Jaro-Winkler), each with its weight (> 0).
    #[schemars(with = "BTreeMap<String, f64>")]
    pub fields: Spanned<BTreeMap<String, f64>>,
    /// Fields whose normalised value a candidate must share (at least one):
    /// what keeps matching cheap. A record with none of them is not
    /// fuzzy-matched.
    #[schemars(with = "Vec<String>")]
    pub block: Spanned<Vec<String>>,
    /// Score (0 to 1) at or above which a record is linked automatically.
    #[schemars(with = "f64")]
    pub link: Spanned<f64>,
    /// Score at or above which (and below `link`) the record is held for
    /// review (`weft matches`); below it, a new record is created.
    #[schemars(with = "f64")]
    pub review: Spanned<f64>,
}

/// Validate `identity:`; the routes are filled in by [`add_route`] as the
/// flows are read.
pub(super) fn rules(
    issues: &mut Vec<Issue>,
    raw: BTreeMap<String, RawIdentity>,
    systems: &dyn Fn(&str) -> bool,
) -> BTreeMap<String, Rules> {
    let mut out = BTreeMap::new();
    for (entity, r) in raw {
        let p = format!("identity.{entity}");
        let mut check = |path: String, s: &Spanned<String>| {
            if !systems(&s.value) {
                push(issues, &path, s, format!("unknown system `{}`", s.value));
            }
        };
        for (i, s) in r.create.iter().flatten().enumerate() {
            check(format!("{p}.create[{i}]"), s);
        }
        for (field, list) in &r.owners {
            for (i, s) in list.iter().enumerate() {
                check(format!("{p}.owners.{field}[{i}]"), s);
            }
        }
        for (field, list) in &r.owners {
            if list.is_empty() {
                issues.push(Issue {
                    path: format!("{p}.owners.{field}"),
                    line: None,
                    column: None,
                    message: "an owner list needs at least one system (leave the field out to let every system set it)".into(),
                });
            }
        }
        for (i, m) in r.match_on.iter().enumerate() {
            if m.is_empty() || m.starts_with('_') {
                issues.push(Issue {
                    path: format!("{p}.match[{i}]"),
                    line: None,
                    column: None,
                    message: format!(
                        "`{m}`: expected the name of a top-level field of the mapped record"
                    ),
                });
            }
        }
        let fuzzy = r.fuzzy.and_then(|z| fuzzy(issues, &p, z));
        out.insert(
            entity.clone(),
            Rules {
                entity,
                create: r.create.map(|c| c.into_iter().map(|s| s.value).collect()),
                owners: r
                    .owners
                    .into_iter()
                    .map(|(f, l)| (f, l.into_iter().map(|s| s.value).collect()))
                    .collect(),
                conflict: r.conflict.unwrap_or_default(),
                non_owner: r.non_owner.unwrap_or_default(),
                match_keys: r.match_on,
                fuzzy,
                routes: Vec::new(),
            },
        );
    }
    out
}

fn fuzzy(issues: &mut Vec<Issue>, p: &str, z: RawFuzzy) -> Option<Fuzzy> {
    let before = issues.len();
    if z.fields.value.is_empty() {
        push(
            issues,
            &format!("{p}.fuzzy.fields"),
            &z.fields,
            "expected at least one field to compare".into(),
        );
    }
    for (f, w) in &z.fields.value {
        if !(w.is_finite() && *w > 0.0) {
            push(
                issues,
                &format!("{p}.fuzzy.fields.{f}"),
                &z.fields,
                format!("weight {w}: expected a number above 0"),
            );
        }
    }
    if z.block.value.is_empty() {
        push(
            issues,
            &format!("{p}.fuzzy.block"),
            &z.block,
            "expected at least one blocking field (candidates must share one's value)".into(),
        );
    }
    for (name, v) in [("link", &z.link), ("review", &z.review)] {
        if !(v.value > 0.0 && v.value <= 1.0) {
            push(
                issues,
                &format!("{p}.fuzzy.{name}"),
                v,
                format!("{}: expected a score above 0 and at most 1", v.value),
            );
        }
    }
    if z.review.value > z.link.value {
        push(
            issues,
            &format!("{p}.fuzzy.review"),
            &z.review,
            format!(
                "{} is above link ({}): expected review <= link",
                z.review.value, z.link.value
            ),
        );
    }
    (issues.len() == before).then(|| Fuzzy {
        fields: z.fields.value.into_iter().collect(),
        block: z.block.value,
        link: z.link.value,
        review: z.review.value,
    })
}

/// Record that `flow` writes the entity's records to `destination` (the
/// first flow naming a destination carries its writes).
pub(super) fn add_route(rules: &mut Rules, flow: &str, destination: &str) {
    if !rules.routes.iter().any(|r| r.destination == destination) {
        rules.routes.push(Route {
            flow: flow.to_owned(),
            destination: destination.to_owned(),
        });
    }
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
