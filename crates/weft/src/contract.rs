//! `weft contract check OLD NEW`: compatibility of two JSON Schema versions
//! in the schema-registry sense.
//!
//! - backward: consumers using NEW can read data written with OLD;
//! - forward: consumers using OLD can read data written with NEW;
//! - full: both; none: neither.
//!
//! Compared: `type` (with `integer` inside `number`), `properties`,
//! `required`, `enum`, `items`, `additionalProperties` (`false` or not),
//! recursively. Not compared (reported as "not compared" when they differ):
//! `$ref`/`$defs`, `allOf`/`anyOf`/`oneOf`/`not`, `if`/`then`/`else`,
//! `const`, `patternProperties`, string, number and array bounds, `pattern`
//! and `format`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Subcommand, ValueEnum};
use serde_json::Value;

#[derive(Subcommand)]
pub enum ContractCmd {
    /// Compare two versions of a contract; exit 1 if they are not
    /// compatible in the requested mode.
    Check {
        /// The current contract.
        old: PathBuf,
        /// The proposed contract.
        new: PathBuf,
        /// Compatibility required.
        #[arg(long, value_enum, default_value = "backward")]
        mode: Mode,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
pub enum Mode {
    Backward,
    Forward,
    Full,
    None,
}

/// One difference between the versions.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct Change {
    /// JSON pointer of the field (`/` for the root, `/*` for array items).
    pub path: String,
    /// field_added, field_removed, required_added, required_removed,
    /// type_narrowed, type_widened, type_changed, enum_value_added,
    /// enum_value_removed, content_closed, content_opened, not_compared.
    pub change: &'static str,
    pub detail: String,
    /// New readers can no longer read some old data.
    pub breaks_backward: bool,
    /// Old readers can no longer read some new data.
    pub breaks_forward: bool,
}

pub fn contract(cmd: ContractCmd) -> Result<ExitCode> {
    match cmd {
        ContractCmd::Check {
            old,
            new,
            mode,
            json,
        } => {
            let read = |p: &PathBuf| -> Result<Value> {
                let t = std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read {}", p.display()))?;
                let v: Value = serde_json::from_str(&t)
                    .with_context(|| format!("{} is not JSON", p.display()))?;
                weft_core::config::entities::Contract::from_schema(p, v.clone())
                    .map_err(anyhow::Error::msg)?;
                Ok(v)
            };
            let (o, n) = (read(&old)?, read(&new)?);
            let changes = compare(&o, &n);
            let (bw, fw) = (
                !changes.iter().any(|c| c.breaks_backward),
                !changes.iter().any(|c| c.breaks_forward),
            );
            let level = match (bw, fw) {
                (true, true) => "full",
                (true, false) => "backward",
                (false, true) => "forward",
                (false, false) => "none",
            };
            let ok = match mode {
                Mode::Backward => bw,
                Mode::Forward => fw,
                Mode::Full => bw && fw,
                Mode::None => true,
            };
            if json {
                println!(
                    "{}",
                    serde_json::json!({"compatibility": level, "mode": format!("{mode:?}").to_lowercase(), "ok": ok, "changes": changes})
                );
            } else {
                println!(
                    "{} -> {}: compatibility {level}",
                    old.display(),
                    new.display()
                );
                for c in &changes {
                    let breaks = match (c.breaks_backward, c.breaks_forward) {
                        (true, true) => "breaks backward and forward",
                        (true, false) => "breaks backward",
                        (false, true) => "breaks forward",
                        (false, false) => "compatible",
                    };
                    println!("  {} {}: {} ({breaks})", c.path, c.change, c.detail);
                }
                println!(
                    "{} in mode {}",
                    if ok { "compatible" } else { "NOT compatible" },
                    format!("{mode:?}").to_lowercase()
                );
            }
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

/// Every difference between `old` and `new`.
pub fn compare(old: &Value, new: &Value) -> Vec<Change> {
    let mut out = Vec::new();
    cmp(old, new, "", &mut out);
    out
}

const COMPARED: &[&str] = &[
    "type",
    "properties",
    "required",
    "enum",
    "items",
    "additionalProperties",
    "$schema",
    "$id",
    "title",
    "description",
    "examples",
    "default",
    "$comment",
];

fn types(s: &Value) -> Option<BTreeSet<String>> {
    let mut t: BTreeSet<String> = match s.get("type")? {
        Value::String(x) => [x.clone()].into(),
        Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_owned))
            .collect(),
        _ => return None,
    };
    if t.contains("number") {
        t.remove("integer");
    }
    Some(t)
}

/// Whether every value of types `a` is of types `b` (None: any type).
fn within(a: &Option<BTreeSet<String>>, b: &Option<BTreeSet<String>>) -> bool {
    match (a, b) {
        (_, None) => true,
        (None, Some(_)) => false,
        (Some(a), Some(b)) => a
            .iter()
            .all(|t| b.contains(t) || (t == "integer" && b.contains("number"))),
    }
}

fn show(t: &Option<BTreeSet<String>>) -> String {
    match t {
        None => "any".into(),
        Some(t) => t.iter().cloned().collect::<Vec<_>>().join("|"),
    }
}

fn closed(s: &Value) -> bool {
    s.get("additionalProperties") == Some(&Value::Bool(false))
}

fn push(
    out: &mut Vec<Change>,
    path: &str,
    change: &'static str,
    detail: String,
    bw: bool,
    fw: bool,
) {
    out.push(Change {
        path: if path.is_empty() {
            "/".into()
        } else {
            path.to_owned()
        },
        change,
        detail,
        breaks_backward: bw,
        breaks_forward: fw,
    });
}

fn cmp(old: &Value, new: &Value, path: &str, out: &mut Vec<Change>) {
    if old == new {
        return;
    }
    // `true`/`{}` accept anything, `false` nothing
    let (o, n) = (old.as_object(), new.as_object());
    let (Some(o), Some(n)) = (o, n) else {
        let any =
            |v: &Value| v == &Value::Bool(true) || v.as_object().is_some_and(|m| m.is_empty());
        push(
            out,
            path,
            "not_compared",
            format!("schema {old} -> {new}"),
            !any(new),
            !any(old),
        );
        return;
    };
    let (ot, nt) = (types(old), types(new));
    if ot != nt {
        let narrowed = within(&nt, &ot);
        let widened = within(&ot, &nt);
        let (change, bw, fw) = match (narrowed, widened) {
            (true, false) => ("type_narrowed", true, false),
            (false, true) => ("type_widened", false, true),
            _ => ("type_changed", true, true),
        };
        push(
            out,
            path,
            change,
            format!("{} -> {}", show(&ot), show(&nt)),
            bw,
            fw,
        );
    }
    // enum
    let en = |s: &serde_json::Map<String, Value>| s.get("enum").and_then(Value::as_array).cloned();
    match (en(o), en(n)) {
        (Some(a), Some(b)) => {
            for v in &a {
                if !b.contains(v) {
                    push(out, path, "enum_value_removed", v.to_string(), true, false);
                }
            }
            for v in &b {
                if !a.contains(v) {
                    push(out, path, "enum_value_added", v.to_string(), false, true);
                }
            }
        }
        (None, Some(b)) => push(
            out,
            path,
            "type_narrowed",
            format!("enum {} added", Value::Array(b)),
            true,
            false,
        ),
        (Some(a), None) => push(
            out,
            path,
            "type_widened",
            format!("enum {} removed", Value::Array(a)),
            false,
            true,
        ),
        (None, None) => {}
    }
    // required
    let req = |s: &serde_json::Map<String, Value>| -> BTreeSet<String> {
        s.get("required")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (or, nr) = (req(o), req(n));
    for r in nr.difference(&or) {
        push(
            out,
            &format!("{path}/{r}"),
            "required_added",
            format!("`{r}` is now required"),
            true,
            false,
        );
    }
    for r in or.difference(&nr) {
        push(
            out,
            &format!("{path}/{r}"),
            "required_removed",
            format!("`{r}` is no longer required"),
            false,
            true,
        );
    }
    // properties
    let empty = serde_json::Map::new();
    let props = |s: &serde_json::Map<String, Value>| {
        s.get("properties")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_else(|| empty.clone())
    };
    let (op, np) = (props(o), props(n));
    for (k, ns) in &np {
        let p = format!("{path}/{k}");
        match op.get(k) {
            Some(os) => cmp(os, ns, &p, out),
            None => {
                // old data had it only if the old schema was open: its type was unknown
                push(
                    out,
                    &p,
                    "field_added",
                    "optional field added".into(),
                    false,
                    closed(old),
                );
            }
        }
    }
    for k in op.keys() {
        if !np.contains_key(k) {
            let p = format!("{path}/{k}");
            push(
                out,
                &p,
                "field_removed",
                "field removed".into(),
                closed(new),
                false,
            );
        }
    }
    // additionalProperties
    match (closed(old), closed(new)) {
        (false, true) => push(
            out,
            path,
            "content_closed",
            "additionalProperties: false added".into(),
            true,
            false,
        ),
        (true, false) => push(
            out,
            path,
            "content_opened",
            "additionalProperties: false removed".into(),
            false,
            true,
        ),
        _ => {}
    }
    // items
    match (o.get("items"), n.get("items")) {
        (Some(a), Some(b)) => cmp(a, b, &format!("{path}/*"), out),
        (None, Some(b)) => cmp(&Value::Bool(true), b, &format!("{path}/*"), out),
        (Some(a), None) => cmp(a, &Value::Bool(true), &format!("{path}/*"), out),
        (None, None) => {}
    }
    // the rest
    let keys: BTreeSet<&String> = o.keys().chain(n.keys()).collect();
    for k in keys {
        if COMPARED.contains(&k.as_str()) {
            continue;
        }
        if o.get(k) != n.get(k) {
            push(
                out,
                path,
                "not_compared",
                format!("`{k}` changed; weft does not compare it, check it by hand"),
                false,
                false,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn level(o: Value, n: Value) -> (bool, bool, Vec<Change>) {
        let c = compare(&o, &n);
        (
            !c.iter().any(|x| x.breaks_backward),
            !c.iter().any(|x| x.breaks_forward),
            c,
        )
    }

    #[test]
    fn schema_evolution_cases() {
        let v1 = json!({"type": "object", "required": ["id"], "properties": {
            "id": {"type": "string"}, "tier": {"enum": ["A", "B"]}, "n": {"type": "integer"}}});
        // optional field added to an open schema: full
        let mut v2 = v1.clone();
        v2["properties"]["note"] = json!({"type": "string"});
        let (b, f, _) = level(v1.clone(), v2);
        assert!(b && f);
        // required added: forward only
        let mut v2 = v1.clone();
        v2["required"] = json!(["id", "n"]);
        let (b, f, c) = level(v1.clone(), v2);
        assert!(!b && f, "{c:?}");
        assert_eq!(c[0].change, "required_added");
        assert_eq!(c[0].path, "/n");
        // enum value added: backward only; removed: forward only
        let mut v2 = v1.clone();
        v2["properties"]["tier"] = json!({"enum": ["A", "B", "C"]});
        assert!(level(v1.clone(), v2.clone()).0);
        assert!(!level(v1.clone(), v2.clone()).1);
        let (b, f, _) = level(v2, v1.clone());
        assert!(!b && f);
        // type widened integer -> number: backward only; narrowed the other way
        let mut v2 = v1.clone();
        v2["properties"]["n"] = json!({"type": "number"});
        let (b, f, c) = level(v1.clone(), v2.clone());
        assert!(b && !f, "{c:?}");
        assert_eq!(c[0].change, "type_widened");
        let (b, f, _) = level(v2, v1.clone());
        assert!(!b && f);
        // string -> array: none
        let mut v2 = v1.clone();
        v2["properties"]["id"] = json!({"type": "array", "items": {"type": "string"}});
        let (b, f, c) = level(v1.clone(), v2);
        assert!(!b && !f);
        assert_eq!(c[0].change, "type_changed");
        // field removed from a closed schema: old data has it, new readers refuse it
        let mut c1 = v1.clone();
        c1["additionalProperties"] = json!(false);
        let mut c2 = c1.clone();
        c2["properties"].as_object_mut().unwrap().remove("n");
        let (b, _, c) = level(c1, c2);
        assert!(!b, "{c:?}");
        // unknown keywords are reported, not judged
        let mut v2 = v1.clone();
        v2["properties"]["id"]["maxLength"] = json!(3);
        let c = compare(&v1, &v2);
        assert_eq!(c[0].change, "not_compared");
    }
}
