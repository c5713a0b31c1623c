//! CSV: a header row, then one row per record.
//!
//! Columns are configured, or taken from the keys of each file's first
//! record (in the order the record holds them: weft's JSON objects keep
//! their keys sorted). A cell is empty for a missing field or null, the
//! text of a string, the JSON text of a number or boolean, and the JSON
//! encoding of an array or object. A field is quoted (`"`, doubled inside)
//! when it holds the delimiter, a quote or a line break; rows end with
//! `\n`.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use serde_json::Value;
use weft_core::config::ExportTarget;

use super::{ExportSink, Format};
use crate::sink::Delivery;

/// The CSV sink.
pub type CsvSink = ExportSink<Csv>;

impl ExportSink<Csv> {
    /// Open a CSV sink writing to `target`. `columns: None` takes each
    /// file's columns from its first record; it needs `header` (else a
    /// reader could not tell the columns).
    pub fn open(
        columns: Option<Vec<String>>,
        delimiter: u8,
        header: bool,
        target: &ExportTarget,
    ) -> Result<Self, String> {
        if columns.is_none() && !header {
            return Err("a CSV sink without a header row needs `columns`".into());
        }
        ExportSink::new(
            Csv {
                columns,
                delimiter,
                header,
            },
            target,
        )
    }
}

/// The CSV format.
pub struct Csv {
    columns: Option<Vec<String>>,
    delimiter: u8,
    header: bool,
}

impl Csv {
    fn row<'a>(&self, cells: impl Iterator<Item = &'a str>, out: &mut Vec<u8>) {
        let start = out.len();
        let mut n = 0;
        for (i, c) in cells.enumerate() {
            if i > 0 {
                out.push(self.delimiter);
            }
            self.field(c, out);
            n += 1;
        }
        // a lone empty field would be an empty line, which readers skip
        if n == 1 && out.len() == start {
            out.extend_from_slice(b"\"\"");
        }
        out.push(b'\n');
    }

    fn field(&self, s: &str, out: &mut Vec<u8>) {
        let quote = s
            .bytes()
            .any(|b| b == self.delimiter || b == b'"' || b == b'\n' || b == b'\r');
        if !quote {
            out.extend_from_slice(s.as_bytes());
            return;
        }
        out.push(b'"');
        for b in s.bytes() {
            if b == b'"' {
                out.push(b'"');
            }
            out.push(b);
        }
        out.push(b'"');
    }
}

/// The text of one cell.
fn cell(v: Option<&Value>) -> std::borrow::Cow<'_, str> {
    match v {
        None | Some(Value::Null) => "".into(),
        Some(Value::String(s)) => s.as_str().into(),
        Some(Value::Bool(b)) => if *b { "true" } else { "false" }.into(),
        Some(Value::Number(n)) => n.to_string().into(),
        Some(other) => other.to_string().into(),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn object(d: &Delivery) -> Result<&serde_json::Map<String, Value>, String> {
    d.payload.as_object().ok_or_else(|| {
        format!(
            "a CSV row needs an object payload (fields by column), got {}",
            kind(&d.payload)
        )
    })
}

impl Format for Csv {
    type FileState = Vec<String>;

    fn ext(&self) -> &'static str {
        "csv"
    }

    fn begin(&self, first: &Delivery) -> Result<(Vec<String>, Vec<u8>), String> {
        let columns = match &self.columns {
            Some(c) => c.clone(),
            None => {
                let obj = object(first)?;
                if obj.is_empty() {
                    return Err(
                        "the first record of a CSV file has no fields to take the columns from \
                         (set `columns`)"
                            .into(),
                    );
                }
                obj.keys().cloned().collect()
            }
        };
        let mut head = Vec::new();
        if self.header {
            self.row(columns.iter().map(String::as_str), &mut head);
        }
        Ok((columns, head))
    }

    fn resume(&self, path: &Path) -> std::io::Result<Vec<String>> {
        if let Some(c) = &self.columns {
            return Ok(c.clone());
        }
        let mut rdr = csv::ReaderBuilder::new()
            .delimiter(self.delimiter)
            .has_headers(false)
            .flexible(true)
            .from_reader(BufReader::new(File::open(path)?));
        let mut rec = csv::StringRecord::new();
        let found = rdr
            .read_record(&mut rec)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        if !found || rec.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "no header row to take the columns from in {}",
                    path.display()
                ),
            ));
        }
        Ok(rec.iter().map(str::to_owned).collect())
    }

    fn encode(&self, columns: &Vec<String>, d: &Delivery, out: &mut Vec<u8>) -> Result<(), String> {
        let obj = object(d)?;
        let cells: Vec<_> = columns.iter().map(|c| cell(obj.get(c))).collect();
        self.row(cells.iter().map(|c| c.as_ref()), out);
        Ok(())
    }

    /// Up to the last line break outside quotes. Quote parity decides:
    /// every quote inside a field is doubled, so an odd count means "inside".
    fn whole_prefix(&self, file: &mut File) -> std::io::Result<(u64, bool)> {
        file.seek(SeekFrom::Start(0))?;
        let mut r = BufReader::with_capacity(1 << 20, &mut *file);
        let mut buf = vec![0u8; 1 << 16];
        let mut pos = 0u64;
        let mut inside = false;
        let mut keep = 0u64;
        let mut rows = 0u64;
        loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                break;
            }
            for (i, &b) in buf[..n].iter().enumerate() {
                if b == b'"' {
                    inside = !inside;
                } else if b == b'\n' && !inside {
                    keep = pos + i as u64 + 1;
                    rows += 1;
                }
            }
            pos += n as u64;
        }
        let header_rows = u64::from(self.header);
        Ok((keep, rows > header_rows))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csv() -> Csv {
        Csv {
            columns: None,
            delimiter: b',',
            header: true,
        }
    }

    fn d(payload: Value) -> Delivery {
        Delivery {
            id: 1,
            idempotency_key: "k".into(),
            correlation_id: "c".into(),
            event_id: "e".into(),
            entity_key: None,
            attempt: 1,
            payload,
            context: Default::default(),
        }
    }

    #[test]
    fn cells_are_quoted_only_when_needed_and_nested_values_are_json() {
        let c = csv();
        let first = d(serde_json::json!({
            "a": "plain", "b": "x,y", "c": "say \"hi\"", "d": "two\nlines",
            "e": null, "f": 1.5, "g": true, "h": {"k": [1, "v"]}
        }));
        let (cols, head) = c.begin(&first).unwrap();
        assert_eq!(head, b"a,b,c,d,e,f,g,h\n");
        let mut out = Vec::new();
        c.encode(&cols, &first, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "plain,\"x,y\",\"say \"\"hi\"\"\",\"two\nlines\",,1.5,true,\"{\"\"k\"\":[1,\"\"v\"\"]}\"\n"
        );
        let mut out = Vec::new();
        assert!(
            c.encode(&cols, &d(serde_json::json!([1])), &mut out)
                .is_err()
        );
        assert!(c.begin(&d(serde_json::json!("x"))).is_err());
    }

    #[test]
    fn whole_prefix_ignores_line_breaks_inside_quotes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.csv");
        let c = csv();
        for (text, keep, any) in [
            ("a,b\n1,2\n", 8, true),
            ("a,b\n1,2\n3,\"x\ny", 8, true),
            ("a,b\n1,\"x\ny\"\n", 12, true),
            ("a,b\n1,\"x\"\"\ny", 4, false),
            ("a,", 0, false),
        ] {
            std::fs::write(&p, text).unwrap();
            let mut f = File::open(&p).unwrap();
            assert_eq!(c.whole_prefix(&mut f).unwrap(), (keep, any), "{text:?}");
        }
    }
}
