//! Canonical entities, data contracts (JSON Schema) and value maps: loaded
//! and checked with the rest of the config, so a bad schema, an unreadable
//! contract file, a bad `when` rule or a mapping naming an unknown value map
//! fails `weft validate` with its location.
//!
//! Contracts are JSON Schema documents (draft 2020-12 unless their `$schema`
//! names another draft) compiled once by the `jsonschema` crate. They are
//! checked at two boundaries: after a flow's mapping (the flow's `entity`)
//! and before a write (a destination's `contract`); see weft-runtime's
//! `contracts.rs`.
//!
//! Value maps become jq definitions compiled with every program of the
//! config (the *prelude*): `valuemap("name")` maps its input,
//! `valuemap("name"; .field)` maps `.field` and evaluates context rules
//! (`when`) on its input, usually the whole record.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use serde_saphyr::Spanned;

use super::Issue;
pub use super::raw::{OnDrift, OnViolation};
use super::raw::{RawEntity, RawFlow, RawValueMap, RawValueTarget};
use crate::mapping::Program;

/// Entities and value maps of a config.
#[derive(Debug, Default)]
pub struct DataModel {
    pub entities: BTreeMap<String, Arc<Entity>>,
    /// Names of the value maps.
    pub value_maps: BTreeSet<String>,
    /// jq definitions of the value maps, compiled with every program.
    pub prelude: String,
}

/// A canonical entity and its contract versions.
#[derive(Debug)]
pub struct Entity {
    pub name: String,
    pub version: Option<u32>,
    /// The current contract.
    pub contract: Arc<Contract>,
    /// Older versions still accepted.
    pub also_accept: Vec<Arc<Contract>>,
    /// JSON pointers whose values are masked.
    pub sensitive: Vec<String>,
}

impl Entity {
    /// `Ok` when `v` satisfies the current contract or one accepted older
    /// version; otherwise the violations of the current contract.
    pub fn check(&self, v: &Value) -> Result<(), Vec<Violation>> {
        if self.contract.is_valid(v) || self.also_accept.iter().any(|c| c.is_valid(v)) {
            return Ok(());
        }
        Err(self.contract.violations(v, &self.sensitive))
    }

    /// `customer v2` or `customer`.
    pub fn label(&self) -> String {
        match self.version {
            Some(n) => format!("{} v{n}", self.name),
            None => self.name.clone(),
        }
    }
}

/// A compiled JSON Schema.
pub struct Contract {
    /// The schema file.
    pub file: PathBuf,
    /// The schema document.
    pub schema: Value,
    validator: jsonschema::Validator,
}

impl fmt::Debug for Contract {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Contract")
            .field("file", &self.file)
            .finish()
    }
}

impl Contract {
    /// Read and compile a schema file.
    pub fn load(file: &Path) -> Result<Contract, String> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read contract {}: {e}", file.display()))?;
        let schema: Value = serde_json::from_str(&text).map_err(|e| {
            format!(
                "contract {} is not JSON: {e} (line {}, column {})",
                file.display(),
                e.line(),
                e.column()
            )
        })?;
        Contract::from_schema(file, schema)
    }

    /// Compile a schema document; `file` is for messages.
    pub fn from_schema(file: &Path, schema: Value) -> Result<Contract, String> {
        if let Err(e) = jsonschema::meta::validate(&schema) {
            return Err(format!(
                "contract {} is not a valid JSON Schema: at `{}`: {e}",
                file.display(),
                e.instance_path().as_str()
            ));
        }
        let mut opts = jsonschema::options().should_validate_formats(true);
        if schema.get("$schema").is_none() {
            opts = opts.with_draft(jsonschema::Draft::Draft202012);
        }
        let validator = opts.build(&schema).map_err(|e| {
            format!(
                "contract {} is not a usable JSON Schema: {e}",
                file.display()
            )
        })?;
        Ok(Contract {
            file: file.to_owned(),
            schema,
            validator,
        })
    }

    pub fn is_valid(&self, v: &Value) -> bool {
        self.validator.is_valid(v)
    }

    /// Every violation of `v`, values under `sensitive` pointers masked.
    pub fn violations(&self, v: &Value, sensitive: &[String]) -> Vec<Violation> {
        let mut out = Vec::new();
        for e in self.validator.iter_errors(v) {
            let at = e.instance_path().as_str().to_owned();
            let keyword = e.kind().keyword().to_owned();
            let (pointer, value, message) = match e.kind() {
                jsonschema::error::ValidationErrorKind::Required { property } => {
                    let name = property
                        .as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| property.to_string());
                    (
                        format!("{at}/{}", escape_pointer(&name)),
                        "(missing)".to_owned(),
                        "required field is missing".to_owned(),
                    )
                }
                jsonschema::error::ValidationErrorKind::AdditionalProperties { unexpected } => (
                    at.clone(),
                    format!("fields {}", unexpected.join(", ")),
                    "fields not allowed by the contract".to_owned(),
                ),
                _ => {
                    let rule = self
                        .schema
                        .pointer(e.schema_path().as_str())
                        .map(|r| short(&r.to_string(), 80))
                        .unwrap_or_default();
                    let value = short(&mask(e.instance(), &at, sensitive).to_string(), 120);
                    let message = if rule.is_empty() {
                        format!("does not satisfy `{keyword}`")
                    } else {
                        format!("must satisfy `{keyword}: {rule}`")
                    };
                    (at.clone(), value, message)
                }
            };
            out.push(Violation {
                pointer: if pointer.is_empty() {
                    "/".into()
                } else {
                    pointer
                },
                keyword,
                value,
                message,
            });
            if out.len() >= 20 {
                break;
            }
        }
        out
    }
}

/// One contract violation: where, which rule, what value (masked when
/// sensitive).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Violation {
    /// JSON pointer of the field (`/` for the whole record).
    pub pointer: String,
    /// The JSON Schema keyword that failed (`type`, `required`, `enum`, ...).
    pub keyword: String,
    /// The offending value as JSON, `"***"` when sensitive.
    pub value: String,
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} [{}] (value: {})",
            self.pointer, self.message, self.keyword, self.value
        )
    }
}

/// Violations as one line: `a; b; c`.
pub fn describe(vs: &[Violation]) -> String {
    vs.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Whether `pointer` is, or is inside, one of `sensitive`.
pub fn is_sensitive(pointer: &str, sensitive: &[String]) -> bool {
    sensitive.iter().any(|s| {
        pointer == s
            || (pointer.starts_with(s.as_str()) && pointer.as_bytes().get(s.len()) == Some(&b'/'))
    })
}

/// `v` (found at `at`) with every sensitive value inside replaced by `"***"`.
pub fn mask(v: &Value, at: &str, sensitive: &[String]) -> Value {
    if sensitive.is_empty() {
        return v.clone();
    }
    if is_sensitive(at, sensitive) {
        return Value::String("***".into());
    }
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, x)| {
                    let p = format!("{at}/{}", escape_pointer(k));
                    (k.clone(), mask(x, &p, sensitive))
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(
            a.iter()
                .enumerate()
                .map(|(i, x)| mask(x, &format!("{at}/{i}"), sensitive))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// The shortest value [`redact`] masks: shorter ones (`1`, `ok`, `DE`)
/// would blank out the message around them and reveal next to nothing.
pub const REDACT_MIN_CHARS: usize = 4;

/// What [`redact`] writes in place of a value.
pub const REDACTED: &str = "[redacted]";

/// Every scalar inside `v` as the text a message would quote it with
/// (strings as they are, numbers and booleans as JSON), at least
/// [`REDACT_MIN_CHARS`] long: what to mask in a destination's error when
/// the payload holds sensitive fields but their names may have changed
/// (a destination mapping renames them).
pub fn scalar_texts(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => {
            if s.chars().count() >= REDACT_MIN_CHARS {
                out.push(s.clone());
            }
        }
        Value::Number(n) => {
            let t = n.to_string();
            if t.len() >= REDACT_MIN_CHARS {
                out.push(t);
            }
        }
        Value::Object(m) => m.values().for_each(|x| scalar_texts(x, out)),
        Value::Array(a) => a.iter().for_each(|x| scalar_texts(x, out)),
        Value::Bool(_) | Value::Null => {}
    }
}

/// `text` with every occurrence of each of `values` (the longest first, so
/// one inside another is masked whole) replaced by [`REDACTED`]. Values
/// shorter than [`REDACT_MIN_CHARS`] are left alone.
pub fn redact(text: &str, values: &[String]) -> String {
    let mut vs: Vec<&str> = values
        .iter()
        .map(String::as_str)
        .filter(|v| v.chars().count() >= REDACT_MIN_CHARS)
        .collect();
    if vs.is_empty() {
        return text.to_owned();
    }
    vs.sort_by_key(|v| std::cmp::Reverse(v.len()));
    vs.dedup();
    let mut out = text.to_owned();
    for v in vs {
        if out.contains(v) {
            out = out.replace(v, REDACTED);
        }
        // JSON-escaped too: a destination quoting the value in a JSON body
        let escaped = Value::String(v.to_owned()).to_string();
        let inner = &escaped[1..escaped.len() - 1];
        if inner != v && out.contains(inner) {
            out = out.replace(inner, REDACTED);
        }
    }
    out
}

/// One JSON pointer segment (`~` -> `~0`, `/` -> `~1`).
pub fn escape_pointer(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

fn short(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        format!("{}...", s.chars().take(n).collect::<String>())
    }
}

/// A flow's contract settings.
#[derive(Debug, Clone, Default)]
pub struct FlowData {
    /// The canonical entity the flow's mapping produces.
    pub entity: Option<Arc<Entity>>,
    pub on_violation: OnViolation,
    pub on_drift: OnDrift,
}

impl FlowData {
    /// Sensitive pointers to mask for this flow.
    pub fn sensitive(&self) -> &[String] {
        self.entity
            .as_ref()
            .map(|e| &e.sensitive[..])
            .unwrap_or(&[])
    }
}

fn issue<T>(issues: &mut Vec<Issue>, path: &str, span: Option<&Spanned<T>>, message: String) {
    let loc = span.map(|s| s.referenced);
    issues.push(Issue {
        path: path.to_owned(),
        line: loc.map(|l| l.line()).filter(|l| *l > 0),
        column: loc.map(|l| l.column()).filter(|c| *c > 0),
        message,
    });
}

/// Load every entity's contracts and build the value maps' prelude.
pub(super) fn model(
    issues: &mut Vec<Issue>,
    entities: BTreeMap<String, RawEntity>,
    maps: BTreeMap<String, Spanned<RawValueMap>>,
    base: &Path,
) -> DataModel {
    let mut model = DataModel::default();
    for (name, e) in entities {
        let p = format!("entities.{name}");
        let load = |issues: &mut Vec<Issue>, path: &str, f: &Spanned<String>| match Contract::load(
            &base.join(&f.value),
        ) {
            Ok(c) => Some(Arc::new(c)),
            Err(m) => {
                issue(issues, path, Some(f), m);
                None
            }
        };
        let contract = load(issues, &format!("{p}.contract"), &e.contract);
        let also_accept: Vec<_> = e
            .also_accept
            .iter()
            .enumerate()
            .filter_map(|(i, f)| load(issues, &format!("{p}.also_accept[{i}]"), f))
            .collect();
        let mut sensitive = Vec::new();
        for (i, s) in e.sensitive.iter().enumerate() {
            if !s.value.starts_with('/') {
                issue(
                    issues,
                    &format!("{p}.sensitive[{i}]"),
                    Some(s),
                    format!("`{}` is not a JSON pointer; write `/{}`", s.value, s.value),
                );
            }
            sensitive.push(s.value.clone());
        }
        if let Some(contract) = contract {
            model.entities.insert(
                name.clone(),
                Arc::new(Entity {
                    name,
                    version: e.version,
                    contract,
                    also_accept,
                    sensitive,
                }),
            );
        }
    }
    let mut prelude = String::new();
    let mut dispatch = String::new();
    for (i, (name, m)) in maps.into_iter().enumerate() {
        let p = format!("value_maps.{name}");
        let lit = |v: &Value| v.to_string();
        let plain: serde_json::Map<String, Value> = m
            .value
            .map
            .iter()
            .filter_map(|(k, t)| match t {
                RawValueTarget::Value(v) => Some((k.clone(), v.clone())),
                RawValueTarget::Rule(_) => None,
            })
            .collect();
        let fallback = match &m.value.default {
            Some(d) => lit(d),
            None => format!(
                "error(\"value map `{}` has no entry for `\\($k)` and no default\")",
                name.replace('"', "'").replace('\\', "/")
            ),
        };
        let mut body = format!(
            "def __weft_vm_{i}($v): (if $v == null then null else ($v | tostring) end) as $k | if $k == null then null elif ({} | has($k)) then {}[$k]",
            lit(&Value::Object(plain.clone())),
            lit(&Value::Object(plain)),
        );
        for (k, t) in &m.value.map {
            if let RawValueTarget::Rule(r) = t {
                let rp = format!("{p}.map.{k}.when");
                if let Err(e) = Program::compile(&r.when.value, &[]) {
                    let loc = r.when.referenced;
                    issues.push(Issue {
                        path: rp,
                        line: Some(loc.line() + e.line as u64 - 1).filter(|l| *l > 0),
                        column: None,
                        message: format!(
                            "invalid jq predicate: {} (line {}, column {} of the predicate)",
                            e.message, e.line, e.column
                        ),
                    });
                    continue;
                }
                let otherwise = r.otherwise.as_ref().map(lit).unwrap_or(fallback.clone());
                body.push_str(&format!(
                    " elif $k == {} then (if ({}) then {} else {} end)",
                    lit(&Value::String(k.clone())),
                    r.when.value,
                    lit(&r.then),
                    otherwise
                ));
            }
        }
        body.push_str(&format!(" else {fallback} end;\n"));
        prelude.push_str(&body);
        dispatch.push_str(&format!(
            "if $name == {} then __weft_vm_{i}($v) el",
            lit(&Value::String(name.clone()))
        ));
        model.value_maps.insert(name);
    }
    if !model.value_maps.is_empty() {
        prelude.push_str(&format!(
            "def valuemap($name; v): v as $v | {dispatch}se error(\"unknown value map `\\($name)`\") end;\ndef valuemap($name): valuemap($name; .);\n"
        ));
        // the `when` rules were checked one by one; a failure here is ours
        if let Err(e) = Program::compile_with(".", &[], &prelude) {
            issues.push(Issue {
                path: "value_maps".into(),
                line: None,
                column: None,
                message: format!("the value maps do not compile: {e}"),
            });
        }
    }
    model.prelude = prelude;
    model
}

/// Check a flow's `entity`, `on_violation` and the value maps its programs
/// name.
pub(super) fn flow(
    issues: &mut Vec<Issue>,
    p: &str,
    f: &RawFlow,
    source_kind: Option<&str>,
    model: &DataModel,
) -> FlowData {
    let entity = f
        .entity
        .as_ref()
        .and_then(|e| match model.entities.get(&e.value) {
            Some(x) => Some(x.clone()),
            None => {
                let known: Vec<&str> = model.entities.keys().map(String::as_str).collect();
                issue(
                    issues,
                    &format!("{p}.entity"),
                    Some(e),
                    format!(
                        "unknown entity `{}`; known: {}",
                        e.value,
                        if known.is_empty() {
                            "(none: declare it under `entities`)".to_owned()
                        } else {
                            known.join(", ")
                        }
                    ),
                );
                None
            }
        });
    let on_violation = f.on_violation.unwrap_or_default();
    if on_violation == OnViolation::Reject && source_kind.is_some_and(|k| k != "webhook") {
        issue::<()>(
            issues,
            &format!("{p}.on_violation"),
            None,
            format!(
                "`reject` refuses the request of a webhook; a {} source cannot refuse a record: use `dead_letter` or `warn`",
                source_kind.unwrap_or("?")
            ),
        );
    }
    let mut programs: Vec<(String, &Spanned<String>)> = Vec::new();
    for (what, c) in [
        ("filter", &f.filter),
        ("key", &f.key),
        ("mapping", &f.mapping),
    ] {
        if let Some(c) = c {
            programs.push((format!("{p}.{what}"), c));
        }
    }
    for (i, d) in f.to.iter().enumerate() {
        if let super::raw::RawDestination::Full(full) = &d.value
            && let Some(m) = &full.mapping
        {
            programs.push((format!("{p}.to[{i}].mapping"), m));
        }
    }
    for (path, code) in programs {
        for name in valuemap_refs(&code.value) {
            if !model.value_maps.contains(&name) {
                let known: Vec<&str> = model.value_maps.iter().map(String::as_str).collect();
                issue(
                    issues,
                    &path,
                    Some(code),
                    format!(
                        "unknown value map `{name}`; known: {}",
                        if known.is_empty() {
                            "(none: declare it under `value_maps`)".to_owned()
                        } else {
                            known.join(", ")
                        }
                    ),
                );
            }
        }
    }
    FlowData {
        entity,
        on_violation,
        on_drift: f.on_drift.unwrap_or_default(),
    }
}

/// Load a destination's `contract` file.
pub(super) fn destination_contract(
    issues: &mut Vec<Issue>,
    dp: &str,
    c: Option<&Spanned<String>>,
    base: &Path,
) -> Option<Arc<Contract>> {
    let c = c?;
    match Contract::load(&base.join(&c.value)) {
        Ok(x) => Some(Arc::new(x)),
        Err(m) => {
            issue(issues, &format!("{dp}.contract"), Some(c), m);
            None
        }
    }
}

/// Names in `valuemap("name"...` calls with a literal name.
fn valuemap_refs(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("valuemap(") {
        let after = rest[i + "valuemap(".len()..].trim_start();
        if let Some(s) = after.strip_prefix('"')
            && let Some(end) = s.find('"')
        {
            out.push(s[..end].to_owned());
        }
        rest = &rest[i + "valuemap(".len()..];
    }
    out
}

#[cfg(test)]
mod redact_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn redact_masks_every_value_longest_first_and_json_escaped() {
        let mut vs = Vec::new();
        scalar_texts(
            &json!({"email": "ada@example.com", "n": 12345, "ok": true, "cc": "DE",
                    "q": "say \"hi\" now"}),
            &mut vs,
        );
        let msg = r#"400: email 'ada@example.com' taken by ada@example.com.old; 12345; DE; {"q":"say \"hi\" now"}"#;
        let out = redact(msg, &vs);
        assert_eq!(
            out,
            r#"400: email '[redacted]' taken by [redacted].old; [redacted]; DE; {"q":"[redacted]"}"#
        );
        assert_eq!(redact("nothing here", &vs), "nothing here");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn masks_sensitive_paths() {
        let s = vec!["/email".to_owned(), "/bank".to_owned()];
        let v = json!({"email": "a@b", "name": "x", "bank": {"iban": "DE1"}, "emails": "keep"});
        assert_eq!(
            mask(&v, "", &s),
            json!({"email": "***", "name": "x", "bank": "***", "emails": "keep"})
        );
        assert!(is_sensitive("/bank/iban", &s));
        assert!(!is_sensitive("/emails", &s));
    }

    #[test]
    fn violations_name_pointer_rule_and_masked_value() {
        let c = Contract::from_schema(
            Path::new("t.json"),
            json!({
                "type": "object",
                "required": ["id", "email"],
                "properties": {
                    "id": {"type": "string"},
                    "email": {"type": "string", "format": "email", "maxLength": 5},
                    "tier": {"enum": ["A", "B"]}
                }
            }),
        )
        .unwrap();
        let v = c.violations(
            &json!({"id": 7, "email": "very-long@secret.example", "tier": "C"}),
            &["/email".to_owned()],
        );
        let text = describe(&v);
        assert!(
            text.contains("/id must satisfy `type: \"string\"` [type] (value: 7)"),
            "{text}"
        );
        assert!(
            text.contains("/email") && text.contains("(value: \"***\")"),
            "{text}"
        );
        assert!(!text.contains("secret"), "{text}");
        assert!(text.contains("/tier") && text.contains("[enum]"), "{text}");
        let v = c.violations(&json!({"id": "1"}), &[]);
        assert_eq!(v[0].pointer, "/email");
        assert_eq!(v[0].keyword, "required");
    }

    #[test]
    fn bad_schemas_are_refused() {
        let e = Contract::from_schema(Path::new("bad.json"), json!({"type": "strng"})).unwrap_err();
        assert!(
            e.contains("bad.json") && e.contains("not a valid JSON Schema"),
            "{e}"
        );
        let e = Contract::from_schema(
            Path::new("bad.json"),
            json!({"$ref": "https://example.com/x.json"}),
        )
        .unwrap_err();
        assert!(e.contains("bad.json"), "{e}");
    }

    #[test]
    fn finds_valuemap_names() {
        assert_eq!(
            valuemap_refs(r#"{a: (.t | valuemap("x")), b: valuemap( "y"; .u), c: valuemap($n)}"#),
            vec!["x".to_owned(), "y".to_owned()]
        );
    }
}
