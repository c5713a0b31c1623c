//! Column values to JSON, by type.
//!
//! pgoutput (text mode) and the snapshot's `COPY` send each value as the
//! type's text output. Each column's type is resolved once through
//! `pg_type` (domains to their base type, arrays to their element type) into
//! a [`Kind`], and the text is read by it:
//!
//! | PostgreSQL | JSON |
//! |---|---|
//! | `smallint`, `integer`, `bigint`, `oid` | number (exact: `i64`) |
//! | `real`, `double precision` | number; `NaN`, `Infinity`, `-Infinity` as strings |
//! | `numeric` | string, digits as PostgreSQL wrote them (no float on the way) |
//! | `boolean` | `true` / `false` |
//! | `json`, `jsonb` | the JSON value |
//! | `bytea` | base64 string |
//! | `timestamp with time zone` | RFC 3339 in UTC, `2024-05-01T10:00:00.123456Z` |
//! | `timestamp` (without zone) | `2024-05-01T10:00:00.123456`, no zone (none was stored) |
//! | `date` | `2024-05-01` |
//! | arrays (any dimension) | JSON arrays of the element's JSON |
//! | enums, `uuid`, `text`, `time`, `interval`, `money`, `inet`, ... | string, as PostgreSQL wrote it |
//! | NULL | null |
//!
//! `infinity` timestamps and dates and BC dates stay strings as written.
//! The session must use `DateStyle` ISO and `bytea_output` hex (the
//! defaults); the source checks both when it connects.

use std::collections::HashMap;

use base64::Engine;
use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
use serde_json::Value;

/// How a column's text is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Bool,
    Int,
    Float,
    Numeric,
    Json,
    Bytea,
    TimestampTz,
    Timestamp,
    Text,
    /// An array of `elem`, its elements separated by `delim` (`,` for all
    /// but a few geometric types).
    Array {
        elem: Box<Kind>,
        delim: u8,
    },
}

/// One `pg_type` row, as far as [`Kind`] needs it.
#[derive(Debug, Clone)]
pub struct PgType {
    pub name: String,
    /// In `pg_catalog`.
    pub builtin: bool,
    /// `typtype`: `b` base, `d` domain, `e` enum, ...
    pub typtype: u8,
    /// `typcategory`: `A` for arrays.
    pub category: u8,
    pub elem: u32,
    pub base: u32,
    pub delim: u8,
}

/// The kind of type `oid`, from `types` (which must hold it and every type
/// it refers to); [`Kind::Text`] for anything unknown.
pub fn kind_of(oid: u32, types: &HashMap<u32, PgType>) -> Kind {
    kind_at(oid, types, 0)
}

fn kind_at(oid: u32, types: &HashMap<u32, PgType>, depth: usize) -> Kind {
    let Some(t) = types.get(&oid) else {
        return Kind::Text;
    };
    if depth > 16 {
        return Kind::Text;
    }
    if t.typtype == b'd' && t.base != 0 {
        return kind_at(t.base, types, depth + 1);
    }
    if t.category == b'A' && t.elem != 0 {
        let delim = types.get(&t.elem).map(|e| e.delim).unwrap_or(b',');
        return Kind::Array {
            elem: Box::new(kind_at(t.elem, types, depth + 1)),
            delim,
        };
    }
    if !t.builtin {
        return Kind::Text;
    }
    match t.name.as_str() {
        "bool" => Kind::Bool,
        "int2" | "int4" | "int8" | "oid" => Kind::Int,
        "float4" | "float8" => Kind::Float,
        "numeric" => Kind::Numeric,
        "json" | "jsonb" => Kind::Json,
        "bytea" => Kind::Bytea,
        "timestamptz" => Kind::TimestampTz,
        "timestamp" => Kind::Timestamp,
        _ => Kind::Text,
    }
}

/// The types `oid` refers to (domain base, array element) that `types`
/// does not hold yet.
pub fn missing_refs(types: &HashMap<u32, PgType>) -> Vec<u32> {
    let mut out: Vec<u32> = types
        .values()
        .flat_map(|t| [t.base, t.elem])
        .filter(|o| *o != 0 && !types.contains_key(o))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// A value's text as JSON.
pub fn to_json(kind: &Kind, text: &str) -> Value {
    match kind {
        Kind::Text | Kind::Numeric => Value::String(text.to_owned()),
        Kind::Bool => match text {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            other => Value::String(other.to_owned()),
        },
        Kind::Int => match text.parse::<i64>() {
            Ok(n) => Value::from(n),
            Err(_) => Value::String(text.to_owned()),
        },
        Kind::Float => match text.parse::<f64>() {
            Ok(f) if f.is_finite() => serde_json::Number::from_f64(f)
                .map_or_else(|| Value::String(text.into()), Value::Number),
            _ => Value::String(text.to_owned()),
        },
        Kind::Json => serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned())),
        Kind::Bytea => match text.strip_prefix("\\x").and_then(|h| hex::decode(h).ok()) {
            Some(bytes) => Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)),
            None => Value::String(text.to_owned()),
        },
        Kind::TimestampTz => Value::String(timestamptz(text).unwrap_or_else(|| text.to_owned())),
        Kind::Timestamp => Value::String(timestamp(text).unwrap_or_else(|| text.to_owned())),
        Kind::Array { elem, delim } => match parse_array(text, *delim) {
            Some(a) => array_to_json(elem, a),
            None => Value::String(text.to_owned()),
        },
    }
}

/// `2024-05-01 12:00:00.5+02` (ISO output, any offset) as RFC 3339 UTC.
fn timestamptz(text: &str) -> Option<String> {
    // the offset is `+HH`, `+HH:MM` or `+HH:MM:SS`; chrono wants `+HHMM`
    let at = text.rfind(['+', '-'])?;
    let (main, off) = text.split_at(at);
    if !main.contains(' ') {
        return None;
    }
    let sign = &off[..1];
    let parts: Vec<&str> = off[1..].split(':').collect();
    let (h, m, s) = match parts.as_slice() {
        [h] => (*h, "00", "00"),
        [h, m] => (*h, *m, "00"),
        [h, m, s] => (*h, *m, *s),
        _ => return None,
    };
    if s != "00" {
        // a historical LMT offset with seconds: kept as written
        return None;
    }
    let t = DateTime::parse_from_str(&format!("{main} {sign}{h}{m}"), "%Y-%m-%d %H:%M:%S%.f %z")
        .ok()?;
    Some(
        t.with_timezone(&Utc)
            .to_rfc3339_opts(SecondsFormat::AutoSi, true),
    )
}

/// `2024-05-01 12:00:00.5` as `2024-05-01T12:00:00.500`, no zone.
fn timestamp(text: &str) -> Option<String> {
    let t = NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f").ok()?;
    Some(t.format("%Y-%m-%dT%H:%M:%S%.f").to_string())
}

/// A parsed array literal: elements (text or NULL) or nested arrays.
#[derive(Debug, PartialEq)]
enum Item {
    Null,
    Text(String),
    Array(Vec<Item>),
}

fn array_to_json(elem: &Kind, items: Vec<Item>) -> Value {
    Value::Array(
        items
            .into_iter()
            .map(|i| match i {
                Item::Null => Value::Null,
                Item::Text(t) => to_json(elem, &t),
                Item::Array(a) => array_to_json(elem, a),
            })
            .collect(),
    )
}

/// PostgreSQL's array output: `{1,2,NULL,"a b","q\"x"}`, nested `{{1},{2}}`,
/// with an optional `[1:2]=` dimension prefix.
fn parse_array(text: &str, delim: u8) -> Option<Vec<Item>> {
    let body = match text.find('=') {
        Some(eq) if text.starts_with('[') => &text[eq + 1..],
        _ => text,
    };
    let bytes = body.as_bytes();
    let mut pos = 0;
    let items = parse_level(bytes, &mut pos, delim)?;
    (pos == bytes.len()).then_some(items)
}

fn parse_level(b: &[u8], pos: &mut usize, delim: u8) -> Option<Vec<Item>> {
    if b.get(*pos) != Some(&b'{') {
        return None;
    }
    *pos += 1;
    let mut items = Vec::new();
    if b.get(*pos) == Some(&b'}') {
        *pos += 1;
        return Some(items);
    }
    loop {
        match b.get(*pos)? {
            b'{' => items.push(Item::Array(parse_level(b, pos, delim)?)),
            b'"' => {
                *pos += 1;
                let mut s = Vec::new();
                loop {
                    match b.get(*pos)? {
                        b'\\' => {
                            s.push(*b.get(*pos + 1)?);
                            *pos += 2;
                        }
                        b'"' => {
                            *pos += 1;
                            break;
                        }
                        c => {
                            s.push(*c);
                            *pos += 1;
                        }
                    }
                }
                items.push(Item::Text(String::from_utf8(s).ok()?));
            }
            _ => {
                let start = *pos;
                while let Some(c) = b.get(*pos) {
                    if *c == delim || *c == b'}' {
                        break;
                    }
                    *pos += 1;
                }
                let raw = std::str::from_utf8(&b[start..*pos]).ok()?.trim();
                items.push(if raw.eq_ignore_ascii_case("NULL") {
                    Item::Null
                } else {
                    Item::Text(raw.to_owned())
                });
            }
        }
        match b.get(*pos)? {
            c if *c == delim => *pos += 1,
            b'}' => {
                *pos += 1;
                return Some(items);
            }
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ty(name: &str, typtype: u8, category: u8, elem: u32, base: u32) -> PgType {
        PgType {
            name: name.into(),
            builtin: true,
            typtype,
            category,
            elem,
            base,
            delim: b',',
        }
    }

    #[test]
    fn kinds_follow_domains_and_arrays() {
        let mut types = HashMap::new();
        types.insert(1700, ty("numeric", b'b', b'N', 0, 0));
        types.insert(1231, ty("_numeric", b'b', b'A', 1700, 0));
        types.insert(90000, ty("money_amount", b'd', b'N', 0, 1700));
        types.insert(
            90001,
            PgType {
                builtin: false,
                ..ty("mood", b'e', b'E', 0, 0)
            },
        );
        assert_eq!(kind_of(90000, &types), Kind::Numeric);
        assert_eq!(
            kind_of(1231, &types),
            Kind::Array {
                elem: Box::new(Kind::Numeric),
                delim: b','
            }
        );
        assert_eq!(kind_of(90001, &types), Kind::Text);
        assert_eq!(kind_of(4242, &types), Kind::Text);
        types.insert(3000, ty("_x", b'b', b'A', 3001, 0));
        assert_eq!(missing_refs(&types), [3001]);
    }

    #[test]
    fn values_keep_their_precision_and_zone() {
        assert_eq!(
            to_json(&Kind::Numeric, "12345678901234567890.000000000001"),
            json!("12345678901234567890.000000000001")
        );
        assert_eq!(
            to_json(&Kind::Int, "9223372036854775807"),
            json!(9223372036854775807i64)
        );
        assert_eq!(to_json(&Kind::Float, "1.5"), json!(1.5));
        assert_eq!(to_json(&Kind::Float, "NaN"), json!("NaN"));
        assert_eq!(to_json(&Kind::Float, "-Infinity"), json!("-Infinity"));
        assert_eq!(
            to_json(&Kind::TimestampTz, "2024-05-01 12:00:00.123456+02"),
            json!("2024-05-01T10:00:00.123456Z")
        );
        assert_eq!(
            to_json(&Kind::TimestampTz, "2024-05-01 12:00:00+05:30"),
            json!("2024-05-01T06:30:00Z")
        );
        assert_eq!(to_json(&Kind::TimestampTz, "infinity"), json!("infinity"));
        assert_eq!(
            to_json(&Kind::Timestamp, "2024-05-01 12:00:00.5"),
            json!("2024-05-01T12:00:00.500")
        );
        assert_eq!(to_json(&Kind::Bytea, "\\x0102ff"), json!("AQL/"));
        assert_eq!(
            to_json(&Kind::Json, "{\"a\": [1, 2.5]}"),
            json!({"a": [1, 2.5]})
        );
        assert_eq!(to_json(&Kind::Bool, "t"), json!(true));
    }

    #[test]
    fn arrays_are_parsed_with_quotes_nulls_and_nesting() {
        let int = Kind::Array {
            elem: Box::new(Kind::Int),
            delim: b',',
        };
        let text = Kind::Array {
            elem: Box::new(Kind::Text),
            delim: b',',
        };
        assert_eq!(to_json(&int, "{1,2,NULL}"), json!([1, 2, null]));
        assert_eq!(to_json(&int, "{{1,2},{3,4}}"), json!([[1, 2], [3, 4]]));
        assert_eq!(to_json(&int, "{}"), json!([]));
        assert_eq!(to_json(&int, "[0:1]={7,8}"), json!([7, 8]));
        assert_eq!(
            to_json(
                &text,
                r#"{plain,"with space","q\"x","back\\slash","NULL",NULL}"#
            ),
            json!(["plain", "with space", "q\"x", "back\\slash", "NULL", null])
        );
        // not an array literal: kept as written, never dropped
        assert_eq!(to_json(&int, "{1,2"), json!("{1,2"));
    }
}
