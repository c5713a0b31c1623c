//! How a broker message's bytes become a record and back: JSON, or Avro
//! with the schema given in the config (cargo feature `avro`, on by
//! default).
//!
//! ```yaml
//! format: json                     # the default
//! format:
//!   avro:
//!     schema: {type: record, name: Order, fields: [{name: id, type: long}, ...]}
//!     confluent: true              # each message starts with 0x00 and a 4-byte schema id
//!     schema_id: 42                # with confluent: only this id is accepted
//! ```
//!
//! `schema` is the Avro schema as YAML/JSON, or its JSON text. A message is
//! decoded with that schema as the writer's; a message that does not
//! decode, or leaves bytes over after its record (it was written with
//! another schema), is a bad record with the reason. Avro values become
//! JSON as Avro's own JSON mapping has them (records as objects, enums as
//! their symbol, bytes as arrays of numbers; a union's value without its
//! branch name).

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
}

/// An Avro format: its schema, parsed at load.
#[cfg(feature = "avro")]
#[derive(Debug, PartialEq)]
pub struct Avro {
    schema: apache_avro::Schema,
    confluent: bool,
    schema_id: Option<u32>,
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

impl Format {
    /// The payload of a message.
    pub fn decode(&self, payload: &[u8]) -> Result<Value, String> {
        match self {
            Format::Json => serde_json::from_slice(payload).map_err(|e| format!("not JSON: {e}")),
            #[cfg(feature = "avro")]
            Format::Avro(a) => a.decode(payload),
        }
    }

    /// A message's bytes for `payload`.
    pub fn encode(&self, payload: &Value) -> Result<Vec<u8>, String> {
        match self {
            Format::Json => serde_json::to_vec(payload).map_err(|e| e.to_string()),
            #[cfg(feature = "avro")]
            Format::Avro(a) => a.encode(payload),
        }
    }

    /// The content type of what [`Format::encode`] writes.
    pub fn content_type(&self) -> &'static str {
        match self {
            Format::Json => "application/json",
            #[cfg(feature = "avro")]
            Format::Avro(_) => "application/avro",
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
            let [0, a, b, c, d, rest @ ..] = payload else {
                return Err("not a Confluent-framed Avro message (it starts with 0x00 and a 4-byte schema id)".into());
            };
            let id = u32::from_be_bytes([*a, *b, *c, *d]);
            if let Some(want) = self.schema_id
                && id != want
            {
                return Err(format!(
                    "written with schema id {id}; this source reads schema id {want}"
                ));
            }
            body = rest;
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
            let id = self.schema_id.unwrap_or(0);
            let mut out = Vec::with_capacity(datum.len() + 5);
            out.push(0);
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(&datum);
            Ok(out)
        } else {
            Ok(datum)
        }
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
