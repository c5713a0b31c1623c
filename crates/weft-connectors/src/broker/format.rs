//! How a broker message's bytes become a record and back: JSON, Avro with
//! the schema given in the config (cargo feature `avro`), or Protobuf with
//! a `.proto` file (cargo feature `protobuf`); both features are on by
//! default.
//!
//! ```yaml
//! format: json                     # the default
//! format:
//!   avro:
//!     schema: {type: record, name: Order, fields: [{name: id, type: long}, ...]}
//!     confluent: true              # each message starts with 0x00 and a 4-byte schema id
//!     schema_id: 42                # with confluent: only this id is accepted
//! format:
//!   protobuf:
//!     schema: proto/orders.proto   # relative to the config file's folder
//!     message: shop.v1.Order       # the fully qualified name of one message of it
//!     confluent: true              # 0x00, a 4-byte schema id, then the message indexes
//!     schema_id: 42                # with confluent: only this id is accepted
//!     allow_unknown_fields: false  # the default: a message with fields the .proto lacks is refused
//! ```
//!
//! Avro: `schema` is the Avro schema as YAML/JSON, or its JSON text. A
//! message is decoded with that schema as the writer's; a message that
//! does not decode, or leaves bytes over after its record (it was written
//! with another schema), is a bad record with the reason. Avro values
//! become JSON as Avro's own JSON mapping has them (records as objects,
//! enums as their symbol, bytes as arrays of numbers; a union's value
//! without its branch name).
//!
//! Protobuf: the `.proto` file is compiled at load by protox (no `protoc`
//! needed; its imports are looked up beside it, and the well-known types
//! `google/protobuf/*.proto` are built in). A message becomes JSON by the
//! canonical proto3 JSON mapping: lowerCamelCase field names (`json_name`),
//! 64-bit integers as strings (`"12345678901234567890"`: a JSON number
//! past 2^53 loses digits in most readers), enums as their names, bytes as
//! base64, `Timestamp`/`Duration`/wrappers/`Struct` as their JSON forms.
//! Every field without presence is there, with its default when it was not
//! on the wire (`0`, `""`, `[]`: a mapping sees the same fields in every
//! record); message, `optional` and oneof fields only when set. Writing
//! takes the same JSON, and also the proto field names, 64-bit integers as
//! numbers and enums as numbers (what proto3 JSON parsers accept); a field
//! the message does not have, or a value of the wrong type, is refused.
//! Reading refuses bytes that do not decode as the message, and by
//! default a message with field numbers the `.proto` does not have (it
//! was written as another message, or with a newer `.proto`:
//! `allow_unknown_fields: true` drops them instead).

use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

/// How a message's payload is read (sources) or written (sinks).
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Format {
    /// One JSON value per message (UTF-8). A CloudEvents structured-mode
    /// message (`content-type: application/cloudevents+json`) is unwrapped:
    /// its `data` is the payload, its attributes the event's.
    #[default]
    Json,
    /// Avro binary datums of one schema.
    #[cfg(feature = "avro")]
    Avro(Arc<Avro>),
    /// Protobuf messages of one message type of a `.proto` file.
    #[cfg(feature = "protobuf")]
    Protobuf(Arc<Protobuf>),
}

/// An Avro format: its schema, parsed at load.
#[cfg(feature = "avro")]
#[derive(Debug, PartialEq)]
pub struct Avro {
    schema: apache_avro::Schema,
    confluent: bool,
    schema_id: Option<u32>,
}

/// A Protobuf format: the message's descriptor, compiled from its `.proto`
/// file at load.
#[cfg(feature = "protobuf")]
#[derive(Debug, PartialEq)]
pub struct Protobuf {
    message: prost_reflect::MessageDescriptor,
    /// The file it was compiled from (for messages).
    file: std::path::PathBuf,
    confluent: bool,
    schema_id: Option<u32>,
    /// The Confluent message indexes of `message` in its file: its index
    /// among the file's messages, then among each nesting message's.
    indexes: Vec<i32>,
    allow_unknown_fields: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum RawFormat {
    Json,
    Avro {
        schema: Value,
        #[serde(default)]
        confluent: bool,
        schema_id: Option<u32>,
    },
    Protobuf(RawProtobuf),
}

/// `format: {protobuf: ...}` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProtobuf {
    /// The `.proto` file (relative to the config file's folder).
    schema: String,
    /// The fully qualified name of the message (`package.Message`,
    /// `package.Outer.Inner`).
    message: String,
    #[serde(default)]
    confluent: bool,
    schema_id: Option<u32>,
    #[serde(default)]
    allow_unknown_fields: bool,
}

impl<'de> Deserialize<'de> for Format {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match RawFormat::deserialize(d)? {
            RawFormat::Json => Ok(Format::Json),
            RawFormat::Avro {
                schema,
                confluent,
                schema_id,
            } => avro(schema, confluent, schema_id).map_err(serde::de::Error::custom),
            RawFormat::Protobuf(raw) => protobuf(raw).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(feature = "avro")]
fn avro(schema: Value, confluent: bool, schema_id: Option<u32>) -> Result<Format, String> {
    let parsed = match &schema {
        Value::String(text) => apache_avro::Schema::parse_str(text),
        other => apache_avro::Schema::parse(other),
    }
    .map_err(|e| format!("`avro.schema` is not an Avro schema: {e}"))?;
    if schema_id.is_some() && !confluent {
        return Err("`avro.schema_id` is for `confluent: true` messages".into());
    }
    Ok(Format::Avro(Arc::new(Avro {
        schema: parsed,
        confluent,
        schema_id,
    })))
}

#[cfg(not(feature = "avro"))]
fn avro(_: Value, _: bool, _: Option<u32>) -> Result<Format, String> {
    Err(crate::without_feature("avro", "Avro"))
}

#[cfg(feature = "protobuf")]
fn protobuf(raw: RawProtobuf) -> Result<Format, String> {
    Protobuf::load(raw).map(|p| Format::Protobuf(Arc::new(p)))
}

#[cfg(not(feature = "protobuf"))]
fn protobuf(_: RawProtobuf) -> Result<Format, String> {
    Err(crate::without_feature("protobuf", "Protobuf"))
}

impl Format {
    /// The payload of a message.
    pub fn decode(&self, payload: &[u8]) -> Result<Value, String> {
        match self {
            Format::Json => serde_json::from_slice(payload).map_err(|e| format!("not JSON: {e}")),
            #[cfg(feature = "avro")]
            Format::Avro(a) => a.decode(payload),
            #[cfg(feature = "protobuf")]
            Format::Protobuf(p) => p.decode(payload),
        }
    }

    /// A message's bytes for `payload`.
    pub fn encode(&self, payload: &Value) -> Result<Vec<u8>, String> {
        match self {
            Format::Json => serde_json::to_vec(payload).map_err(|e| e.to_string()),
            #[cfg(feature = "avro")]
            Format::Avro(a) => a.encode(payload),
            #[cfg(feature = "protobuf")]
            Format::Protobuf(p) => p.encode(payload),
        }
    }

    /// The content type of what [`Format::encode`] writes.
    pub fn content_type(&self) -> &'static str {
        match self {
            Format::Json => "application/json",
            #[cfg(feature = "avro")]
            Format::Avro(_) => "application/avro",
            #[cfg(feature = "protobuf")]
            Format::Protobuf(_) => "application/x-protobuf",
        }
    }

    /// Whether a CloudEvents structured-mode body can be read (JSON only).
    pub fn is_json(&self) -> bool {
        matches!(self, Format::Json)
    }
}

#[cfg(feature = "avro")]
impl Avro {
    fn decode(&self, payload: &[u8]) -> Result<Value, String> {
        let mut body = payload;
        if self.confluent {
            body = confluent_body(
                payload,
                self.schema_id,
                "not a Confluent-framed Avro message (it starts with 0x00 and a 4-byte schema id)",
            )?;
        }
        let value = apache_avro::from_avro_datum(&self.schema, &mut body, None)
            .map_err(|e| format!("not Avro of the configured schema: {e}"))?;
        // apache-avro can hand back a value the schema does not allow
        // (a string field read past the end as null): checked here
        if !value.validate(&self.schema) {
            return Err(
                "not Avro of the configured schema: its fields do not read as the schema's types"
                    .into(),
            );
        }
        if !body.is_empty() {
            return Err(format!(
                "not Avro of the configured schema: {} bytes left after the record (written with another schema?)",
                body.len()
            ));
        }
        Value::try_from(value).map_err(|e| format!("an Avro value JSON cannot hold: {e}"))
    }

    fn encode(&self, payload: &Value) -> Result<Vec<u8>, String> {
        let value = apache_avro::types::Value::from(payload.clone())
            .resolve(&self.schema)
            .map_err(|e| format!("the record does not fit the Avro schema: {e}"))?;
        let datum = apache_avro::to_avro_datum(&self.schema, value)
            .map_err(|e| format!("cannot write the record as Avro: {e}"))?;
        if self.confluent {
            let mut out = Vec::with_capacity(datum.len() + 5);
            confluent_header(self.schema_id, &mut out);
            out.extend_from_slice(&datum);
            Ok(out)
        } else {
            Ok(datum)
        }
    }
}

#[cfg(feature = "protobuf")]
impl Protobuf {
    /// Compile the `.proto` file and find the message: every problem says
    /// which file and, for a parse error, where in it.
    fn load(raw: RawProtobuf) -> Result<Protobuf, String> {
        let given = std::path::Path::new(&raw.schema);
        let file = std::fs::canonicalize(given).map_err(|e| {
            format!(
                "`protobuf.schema`: cannot read the .proto file {}: {e}",
                given.display()
            )
        })?;
        let dir = file.parent().unwrap_or(std::path::Path::new("/"));
        let mut compiler = protox::Compiler::new([dir])
            .map_err(|e| format!("`protobuf.schema`: cannot compile {}: {e}", file.display()))?;
        compiler.include_imports(true);
        if let Err(e) = compiler.open_file(&file) {
            // protox's Debug form is `file:line:column: message`
            return Err(format!(
                "`protobuf.schema`: {} is not a .proto file protox can compile: {e:?}",
                file.display()
            ));
        }
        let pool = compiler.descriptor_pool();
        let name = raw.message.trim_start_matches('.');
        let Some(message) = pool.get_message_by_name(name) else {
            let mut known: Vec<String> = pool
                .all_messages()
                .filter(|m| !m.full_name().starts_with("google.protobuf."))
                .map(|m| m.full_name().to_owned())
                .collect();
            known.sort();
            let more = known.len().saturating_sub(20);
            known.truncate(20);
            let more = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            return Err(format!(
                "`protobuf.message`: {} has no message `{}` (give its fully qualified name: {}{more})",
                file.display(),
                raw.message,
                known.join(", ")
            ));
        };
        if raw.schema_id.is_some() && !raw.confluent {
            return Err("`protobuf.schema_id` is for `confluent: true` messages".into());
        }
        // the descriptor's path in its file: [4, i] for a top-level message,
        // [4, i, 3, j, ...] for nested ones
        let indexes = message.path().iter().skip(1).step_by(2).copied().collect();
        Ok(Protobuf {
            message,
            file,
            confluent: raw.confluent,
            schema_id: raw.schema_id,
            indexes,
            allow_unknown_fields: raw.allow_unknown_fields,
        })
    }

    fn decode(&self, payload: &[u8]) -> Result<Value, String> {
        use prost_reflect::{DynamicMessage, SerializeOptions};
        let name = self.message.full_name();
        let mut body = payload;
        if self.confluent {
            let rest = confluent_body(
                payload,
                self.schema_id,
                "not a Confluent-framed Protobuf message (it starts with 0x00, a 4-byte schema id and the message indexes)",
            )?;
            let (indexes, rest) = read_indexes(rest)?;
            if indexes != self.indexes {
                return Err(format!(
                    "written as the message at indexes {indexes:?} of its schema; this source reads {name} (indexes {:?} of {})",
                    self.indexes,
                    self.file.display()
                ));
            }
            body = rest;
        }
        let message = DynamicMessage::decode(self.message.clone(), body)
            .map_err(|e| format!("not Protobuf of message {name}: {e}"))?;
        if !self.allow_unknown_fields {
            let mut unknown = Vec::new();
            unknown_fields(&message, "", &mut unknown);
            if !unknown.is_empty() {
                return Err(format!(
                    "not Protobuf of message {name}: field numbers {} are not in {} (written as another message or with a newer .proto? `allow_unknown_fields: true` drops them)",
                    unknown.join(", "),
                    self.file.display()
                ));
            }
        }
        let options = SerializeOptions::new().skip_default_fields(false);
        message
            .serialize_with_options(serde_json::value::Serializer, &options)
            .map_err(|e| format!("a Protobuf {name} JSON cannot hold: {e}"))
    }

    fn encode(&self, payload: &Value) -> Result<Vec<u8>, String> {
        use prost_reflect::prost::Message;
        use prost_reflect::{DeserializeOptions, DynamicMessage};
        let name = self.message.full_name();
        let message = DynamicMessage::deserialize_with_options(
            self.message.clone(),
            payload,
            &DeserializeOptions::new(),
        )
        .map_err(|e| format!("the record does not fit Protobuf message {name}: {e}"))?;
        let mut out = Vec::with_capacity(message.encoded_len() + 16);
        if self.confluent {
            confluent_header(self.schema_id, &mut out);
            write_indexes(&self.indexes, &mut out);
        }
        message
            .encode(&mut out)
            .map_err(|e| format!("cannot write the record as Protobuf {name}: {e}"))?;
        Ok(out)
    }
}

/// The body of a Confluent-framed message (0x00, a 4-byte big-endian
/// schema id, then the body), checked against the configured `schema_id`;
/// `not_framed`: the error when the frame is not there.
#[cfg(any(feature = "avro", feature = "protobuf"))]
fn confluent_body<'a>(
    payload: &'a [u8],
    schema_id: Option<u32>,
    not_framed: &str,
) -> Result<&'a [u8], String> {
    let [0, a, b, c, d, rest @ ..] = payload else {
        return Err(not_framed.to_owned());
    };
    let id = u32::from_be_bytes([*a, *b, *c, *d]);
    if let Some(want) = schema_id
        && id != want
    {
        return Err(format!(
            "written with schema id {id}; this source reads schema id {want}"
        ));
    }
    Ok(rest)
}

/// The Confluent frame's header: 0x00 and the schema id (0 when none).
#[cfg(any(feature = "avro", feature = "protobuf"))]
fn confluent_header(schema_id: Option<u32>, out: &mut Vec<u8>) {
    out.push(0);
    out.extend_from_slice(&schema_id.unwrap_or(0).to_be_bytes());
}

/// The field numbers of `m` (and of the messages in it) that its
/// descriptor does not have, as `path.number`.
#[cfg(feature = "protobuf")]
fn unknown_fields(m: &prost_reflect::DynamicMessage, at: &str, out: &mut Vec<String>) {
    use prost_reflect::Value as V;
    for u in m.unknown_fields() {
        out.push(format!("{at}{}", u.number()));
    }
    fn walk(v: &V, at: &str, out: &mut Vec<String>) {
        match v {
            V::Message(m) => unknown_fields(m, at, out),
            V::List(items) => items.iter().for_each(|i| walk(i, at, out)),
            V::Map(entries) => entries.values().for_each(|i| walk(i, at, out)),
            _ => {}
        }
    }
    for (field, value) in m.fields() {
        walk(value, &format!("{at}{}.", field.name()), out);
    }
}

/// Confluent's message indexes: a zigzag varint count, then each index as
/// a zigzag varint; a count of 0 means `[0]` (the file's first message).
#[cfg(feature = "protobuf")]
fn read_indexes(mut b: &[u8]) -> Result<(Vec<i32>, &[u8]), String> {
    let bad =
        || "not a Confluent-framed Protobuf message: its message indexes do not read".to_owned();
    let varint = |b: &mut &[u8]| -> Result<i32, String> {
        let mut v: u64 = 0;
        for shift in (0..35).step_by(7) {
            let [byte, rest @ ..] = *b else {
                return Err(bad());
            };
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                let v = u32::try_from(v).map_err(|_| bad())?;
                return Ok((v >> 1) as i32 ^ -((v & 1) as i32));
            }
        }
        Err(bad())
    };
    let count = varint(&mut b)?;
    if count == 0 {
        return Ok((vec![0], b));
    }
    if !(1..=100).contains(&count) {
        return Err(bad());
    }
    let mut indexes = Vec::with_capacity(count as usize);
    for _ in 0..count {
        indexes.push(varint(&mut b)?);
    }
    Ok((indexes, b))
}

#[cfg(feature = "protobuf")]
fn write_indexes(indexes: &[i32], out: &mut Vec<u8>) {
    fn varint(v: i32, out: &mut Vec<u8>) {
        let mut z = ((v << 1) ^ (v >> 31)) as u32;
        while z >= 0x80 {
            out.push((z as u8 & 0x7f) | 0x80);
            z >>= 7;
        }
        out.push(z as u8);
    }
    if indexes == [0] {
        out.push(0);
        return;
    }
    varint(indexes.len() as i32, out);
    for i in indexes {
        varint(*i, out);
    }
}

#[cfg(all(test, feature = "avro"))]
mod tests {
    use super::*;
    use serde_json::json;

    fn format(yaml: &str) -> Result<Format, String> {
        serde_saphyr::from_str::<Format>(yaml).map_err(|e| e.to_string())
    }

    const ORDER: &str = r#"
avro:
  schema:
    type: record
    name: Order
    fields:
      - {name: id, type: long}
      - {name: total, type: string}
      - {name: note, type: ["null", string], default: null}
"#;

    #[test]
    fn a_record_goes_through_avro_and_back() {
        let f = format(ORDER).unwrap();
        let order = json!({"id": 7, "total": "41.50", "note": "gift"});
        let bytes = f.encode(&order).unwrap();
        assert_eq!(f.decode(&bytes).unwrap(), order);
        assert_eq!(f.content_type(), "application/avro");
        // a null union branch
        let plain = json!({"id": 8, "total": "1.00", "note": null});
        assert_eq!(f.decode(&f.encode(&plain).unwrap()).unwrap(), plain);
    }

    #[test]
    fn a_message_of_another_schema_is_refused_with_the_reason() {
        let f = format(ORDER).unwrap();
        let other = format(
            "avro:\n  schema: {type: record, name: Other, fields: [{name: id, type: long}, {name: a, type: long}, {name: b, type: long}, {name: c, type: string}]}\n",
        )
        .unwrap();
        let bytes = other
            .encode(
                &json!({"id": 1, "a": 2, "b": 3, "c": "a longer text than the other schema reads"}),
            )
            .unwrap();
        let e = f.decode(&bytes).unwrap_err();
        assert!(e.contains("not Avro of the configured schema"), "{e}");
        let e = f.decode(b"{\"id\": 7}").unwrap_err();
        assert!(e.contains("not Avro of the configured schema"), "{e}");
        let e = f.encode(&json!({"id": "seven", "total": "1"})).unwrap_err();
        assert!(e.contains("does not fit the Avro schema"), "{e}");
    }

    #[test]
    fn confluent_framing_is_read_and_written() {
        let f = format(&format!("{ORDER}  confluent: true\n  schema_id: 42\n")).unwrap();
        let order = json!({"id": 7, "total": "41.50", "note": null});
        let bytes = f.encode(&order).unwrap();
        assert_eq!(&bytes[..5], &[0, 0, 0, 0, 42]);
        assert_eq!(f.decode(&bytes).unwrap(), order);
        let mut wrong = bytes.clone();
        wrong[4] = 43;
        assert!(f.decode(&wrong).unwrap_err().contains("schema id 43"));
        assert!(
            f.decode(&bytes[5..])
                .unwrap_err()
                .contains("Confluent-framed")
        );
    }

    #[test]
    fn a_bad_schema_is_refused_at_load() {
        let e = format("avro:\n  schema: {type: record, name: X}\n").unwrap_err();
        assert!(e.contains("not an Avro schema"), "{e}");
        let e = format("avro:\n  schema: '\"long\"'\n  schema_id: 4\n").unwrap_err();
        assert!(e.contains("confluent"), "{e}");
        assert_eq!(format("json").unwrap(), Format::Json);
    }
}

#[cfg(all(test, feature = "protobuf"))]
mod protobuf_tests {
    use super::*;
    use serde_json::json;

    const SHOP: &str = r#"
syntax = "proto3";
package shop.v1;

import "google/protobuf/timestamp.proto";
import "common.proto";

enum Status {
  STATUS_UNSPECIFIED = 0;
  OPEN = 1;
  PAID = 2;
}

message Order {
  int64 id = 1;
  string customer_name = 2;
  Status status = 3;
  repeated Line lines = 4;
  optional string note = 5;
  google.protobuf.Timestamp placed_at = 6;
  common.Money total = 7;

  message Line {
    string sku = 1;
    uint32 qty = 2;
  }
}

message Refund {
  string reason = 1;
  double amount = 2;
}
"#;

    const COMMON: &str = r#"
syntax = "proto3";
package common;
message Money { string currency = 1; int64 cents = 2; }
"#;

    /// A folder with `shop.proto` and `common.proto`, and the format of
    /// `message` in it with `extra` YAML lines under `protobuf:`.
    fn setup() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("shop.proto"), SHOP).unwrap();
        std::fs::write(dir.path().join("common.proto"), COMMON).unwrap();
        dir
    }

    fn format(dir: &tempfile::TempDir, message: &str, extra: &str) -> Result<Format, String> {
        let yaml = format!(
            "protobuf:\n  schema: '{}'\n  message: {message}\n{extra}",
            dir.path().join("shop.proto").display()
        );
        serde_saphyr::from_str::<Format>(&yaml).map_err(|e| e.to_string())
    }

    #[test]
    fn a_record_goes_through_protobuf_and_back_in_proto3_json() {
        let dir = setup();
        let f = format(&dir, "shop.v1.Order", "").unwrap();
        assert_eq!(f.content_type(), "application/x-protobuf");
        assert!(!f.is_json());
        // proto field names and a 64-bit integer as a number are accepted
        let written = json!({
            "id": 9007199254740993_i64, "customer_name": "Ada", "status": "PAID",
            "lines": [{"sku": "A-1", "qty": 2}], "note": "gift",
            "placedAt": "2026-01-02T03:04:05Z", "total": {"currency": "EUR", "cents": "4150"}
        });
        let bytes = f.encode(&written).unwrap();
        // read back in the canonical mapping: lowerCamelCase, int64 as a
        // string (exact past 2^53), the enum by name
        assert_eq!(
            f.decode(&bytes).unwrap(),
            json!({
                "id": "9007199254740993", "customerName": "Ada", "status": "PAID",
                "lines": [{"sku": "A-1", "qty": 2}], "note": "gift",
                "placedAt": "2026-01-02T03:04:05Z", "total": {"currency": "EUR", "cents": "4150"}
            })
        );
        // fields without presence are there with their defaults; optional,
        // message fields only when set
        let empty = f.encode(&json!({})).unwrap();
        assert!(empty.is_empty());
        assert_eq!(
            f.decode(&empty).unwrap(),
            json!({"id": "0", "customerName": "", "status": "STATUS_UNSPECIFIED", "lines": []})
        );
    }

    #[test]
    fn a_record_that_does_not_fit_the_message_is_refused_with_the_reason() {
        let dir = setup();
        let f = format(&dir, "shop.v1.Order", "").unwrap();
        let e = f.encode(&json!({"id": 1, "colour": "red"})).unwrap_err();
        assert!(
            e.contains("does not fit Protobuf message shop.v1.Order"),
            "{e}"
        );
        assert!(e.contains("colour"), "{e}");
        let e = f.encode(&json!({"id": "seven"})).unwrap_err();
        assert!(e.contains("does not fit"), "{e}");
        let e = f.encode(&json!({"status": "LOST"})).unwrap_err();
        assert!(e.contains("does not fit"), "{e}");
        let e = f.encode(&json!([1, 2])).unwrap_err();
        assert!(e.contains("does not fit"), "{e}");
    }

    #[test]
    fn a_message_of_another_type_or_not_protobuf_is_refused() {
        let dir = setup();
        let order = format(&dir, "shop.v1.Order", "").unwrap();
        let refund = format(&dir, "shop.v1.Refund", "").unwrap();
        // field 2 is a double in Refund, a string in Order: wrong wire type
        let bytes = refund
            .encode(&json!({"reason": "broken", "amount": 3.5}))
            .unwrap();
        let e = order.decode(&bytes).unwrap_err();
        assert!(e.contains("not Protobuf of message shop.v1.Order"), "{e}");
        // a message of the same wire shape reads (Line {string 1, uint32
        // 2} as Money {string 1, int64 2}): Protobuf cannot tell them apart
        let money = format(&dir, "common.Money", "").unwrap();
        let line = format(&dir, "shop.v1.Order.Line", "").unwrap();
        let bytes = line.encode(&json!({"sku": "x", "qty": 3})).unwrap();
        assert_eq!(
            money.decode(&bytes).unwrap(),
            json!({"currency": "x", "cents": "3"})
        );
        // field numbers Order does not have
        let mut with_unknown = order.encode(&json!({"id": 1})).unwrap();
        with_unknown.extend_from_slice(&[0xc8, 0x01, 0x05]); // field 25, varint 5
        let e = order.decode(&with_unknown).unwrap_err();
        assert!(e.contains("field numbers 25 are not in"), "{e}");
        let lenient = format(&dir, "shop.v1.Order", "  allow_unknown_fields: true\n").unwrap();
        assert_eq!(lenient.decode(&with_unknown).unwrap()["id"], "1");
        // unknown fields inside a nested message are found too
        let mut line = vec![0x0a, 0x01, b'x', 0x18, 0x07]; // sku "x", field 3
        let mut nested = vec![0x22, line.len() as u8];
        nested.append(&mut line);
        let e = order.decode(&nested).unwrap_err();
        assert!(e.contains("lines.3"), "{e}");
        let e = order
            .decode(b"{\"id\": 7, \"total\": \"1.00\"}")
            .unwrap_err();
        assert!(e.contains("not Protobuf of message shop.v1.Order"), "{e}");
    }

    #[test]
    fn confluent_framing_with_message_indexes() {
        let dir = setup();
        let f = format(
            &dir,
            "shop.v1.Order",
            "  confluent: true\n  schema_id: 42\n",
        )
        .unwrap();
        let bytes = f.encode(&json!({"id": 5})).unwrap();
        // the file's first message: indexes [0] written as one 0 byte
        assert_eq!(bytes, [0, 0, 0, 0, 42, 0, 0x08, 0x05]);
        assert_eq!(f.decode(&bytes).unwrap()["id"], "5");
        let mut wrong = bytes.clone();
        wrong[4] = 43;
        assert!(f.decode(&wrong).unwrap_err().contains("schema id 43"));
        assert!(
            f.decode(&bytes[5..])
                .unwrap_err()
                .contains("Confluent-framed")
        );
        // a nested message: count 2, then 0 and 0 (zigzag varints)
        let line = format(&dir, "shop.v1.Order.Line", "  confluent: true\n").unwrap();
        let lb = line.encode(&json!({"sku": "s"})).unwrap();
        assert_eq!(&lb[..8], &[0, 0, 0, 0, 0, 4, 0, 0]);
        assert_eq!(line.decode(&lb).unwrap()["sku"], "s");
        // the second message (Refund): count 1, index 1
        let refund = format(&dir, "shop.v1.Refund", "  confluent: true\n").unwrap();
        let rb = refund.encode(&json!({"reason": "r"})).unwrap();
        assert_eq!(&rb[..7], &[0, 0, 0, 0, 0, 2, 2]);
        let e = f
            .decode(&[&[0, 0, 0, 0, 42][..], &rb[5..]].concat())
            .unwrap_err();
        assert!(e.contains("indexes [1]"), "{e}");
        let e = f.decode(&[0, 0, 0, 0, 42, 0x80]).unwrap_err();
        assert!(e.contains("message indexes do not read"), "{e}");
    }

    #[test]
    fn config_problems_are_refused_at_load_with_the_file_and_place() {
        let dir = setup();
        let e = format(&dir, "shop.v1.Nope", "").unwrap_err();
        assert!(e.contains("has no message `shop.v1.Nope`"), "{e}");
        assert!(
            e.contains("shop.v1.Order, shop.v1.Order.Line, shop.v1.Refund"),
            "{e}"
        );
        let e = format(&dir, "Order", "").unwrap_err();
        assert!(e.contains("fully qualified name"), "{e}");
        let e = format(&dir, "shop.v1.Order", "  schema_id: 3\n").unwrap_err();
        assert!(e.contains("confluent"), "{e}");
        let e = format(&dir, "shop.v1.Order", "  colour: red\n").unwrap_err();
        assert!(e.contains("colour"), "{e}");
        // a leading dot is the same name
        assert!(format(&dir, ".shop.v1.Refund", "").is_ok());
        std::fs::write(
            dir.path().join("shop.proto"),
            "syntax = \"proto3\";\nmessage A {\n  int32 x = 1\n}\n",
        )
        .unwrap();
        let e = format(&dir, "A", "").unwrap_err();
        assert!(e.contains("shop.proto:4:1"), "{e}");
        std::fs::write(
            dir.path().join("shop.proto"),
            "syntax = \"proto3\";\nimport \"missing.proto\";\n",
        )
        .unwrap();
        let e = format(&dir, "A", "").unwrap_err();
        assert!(e.contains("missing.proto"), "{e}");
        std::fs::remove_file(dir.path().join("shop.proto")).unwrap();
        let e = format(&dir, "A", "").unwrap_err();
        assert!(e.contains("cannot read the .proto file"), "{e}");
    }
}
