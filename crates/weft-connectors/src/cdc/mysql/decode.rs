//! Column values to JSON, by type.
//!
//! The binlog carries values in their storage form and, unless the server
//! has `binlog_row_metadata = FULL`, no column names, no signedness and no
//! enum labels. Each table's columns are read from `information_schema`
//! (names, `COLUMN_TYPE`, character set; on MariaDB a `json_valid(col)`
//! check marks a JSON column) into a [`Column`] with a [`Kind`], and the
//! values (from a rows event or from the snapshot's binary-protocol
//! `SELECT`) are read by it:
//!
//! | MariaDB/MySQL | JSON |
//! |---|---|
//! | `tinyint` ... `bigint`, signed and `unsigned` | number (exact; `bigint unsigned` up to 2^64-1) |
//! | `decimal` | string, all its digits (`"12.50"`; no float on the way) |
//! | `float`, `double` | number (`float` by its shortest decimal text) |
//! | `bit(n)` | number |
//! | `year` | number |
//! | `date` | `"2024-05-01"` |
//! | `datetime` | `"2024-05-01T12:00:00.500"`, no zone (none is stored) |
//! | `timestamp` | RFC 3339 in UTC, `"2024-05-01T10:00:00.123456Z"` |
//! | `time` | `"-838:59:59.000000"` ... as written (hours may pass 24) |
//! | `char`, `varchar`, `text` | string, from the column's character set |
//! | `enum`, `set` | string (a set's members comma-separated, as MySQL writes them) |
//! | `json` (MySQL's type; MariaDB's `longtext` with `json_valid`) | the JSON value |
//! | `binary`, `varbinary`, `blob`, geometry | base64 string |
//! | NULL | null |
//!
//! Zero dates (`0000-00-00`) stay strings as MySQL writes them.

use base64::Engine;
use chrono::{DateTime, SecondsFormat};
use mysql_async::Value as My;
use mysql_async::binlog::value::BinlogValue;
use mysql_async::consts::ColumnType;
use serde_json::Value;

/// How a column's values are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// An integer of `bits` bits (8, 16, 24, 32, 64).
    Int {
        bits: u32,
        unsigned: bool,
    },
    Decimal,
    Float,
    Double,
    Bit,
    Year,
    Date,
    DateTime,
    Timestamp,
    Time,
    /// Text in this character set (an `encoding_rs` label; UTF-8 when
    /// unknown).
    Text(String),
    /// The labels, in order (the binlog carries the 1-based index).
    Enum(Vec<String>),
    /// The members, in order (the binlog carries a bit set).
    Set(Vec<String>),
    Json,
    Bytes,
}

/// A column as `information_schema` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub kind: Kind,
}

impl Kind {
    /// The kind of a column by its `DATA_TYPE`, `COLUMN_TYPE` and
    /// `CHARACTER_SET_NAME`; `json` when a `json_valid` check covers it.
    pub fn of(data_type: &str, column_type: &str, charset: Option<&str>, json: bool) -> Kind {
        let dt = data_type.to_ascii_lowercase();
        let ct = column_type.to_ascii_lowercase();
        let unsigned = ct.split_whitespace().any(|w| w == "unsigned");
        let int = |bits| Kind::Int { bits, unsigned };
        let text = || match charset {
            None | Some("binary") => Kind::Bytes,
            Some(cs) => Kind::Text(cs.to_ascii_lowercase()),
        };
        match dt.as_str() {
            "tinyint" => int(8),
            "smallint" => int(16),
            "mediumint" => int(24),
            "int" | "integer" => int(32),
            "bigint" => int(64),
            "decimal" | "numeric" => Kind::Decimal,
            "float" => Kind::Float,
            "double" | "real" | "double precision" => Kind::Double,
            "bit" => Kind::Bit,
            "year" => Kind::Year,
            "date" => Kind::Date,
            "datetime" => Kind::DateTime,
            "timestamp" => Kind::Timestamp,
            "time" => Kind::Time,
            "json" => Kind::Json,
            "enum" => Kind::Enum(labels(column_type)),
            "set" => Kind::Set(labels(column_type)),
            "char" | "varchar" | "tinytext" | "text" | "mediumtext" | "longtext" if json => {
                Kind::Json
            }
            "char" | "varchar" | "tinytext" | "text" | "mediumtext" | "longtext" => text(),
            _ => Kind::Bytes,
        }
    }

    /// Whether a binlog column of type `t` can hold this kind (a table map
    /// that disagrees describes another shape of the table).
    pub fn fits(&self, t: ColumnType) -> bool {
        use ColumnType::*;
        match self {
            Kind::Int { bits, .. } => matches!(
                (bits, t),
                (8, MYSQL_TYPE_TINY)
                    | (16, MYSQL_TYPE_SHORT)
                    | (24, MYSQL_TYPE_INT24)
                    | (32, MYSQL_TYPE_LONG)
                    | (64, MYSQL_TYPE_LONGLONG)
            ),
            Kind::Decimal => matches!(t, MYSQL_TYPE_NEWDECIMAL | MYSQL_TYPE_DECIMAL),
            Kind::Float => t == MYSQL_TYPE_FLOAT,
            Kind::Double => t == MYSQL_TYPE_DOUBLE,
            Kind::Bit => t == MYSQL_TYPE_BIT,
            Kind::Year => t == MYSQL_TYPE_YEAR,
            Kind::Date => matches!(t, MYSQL_TYPE_DATE | MYSQL_TYPE_NEWDATE),
            Kind::DateTime => matches!(t, MYSQL_TYPE_DATETIME | MYSQL_TYPE_DATETIME2),
            Kind::Timestamp => matches!(t, MYSQL_TYPE_TIMESTAMP | MYSQL_TYPE_TIMESTAMP2),
            Kind::Time => matches!(t, MYSQL_TYPE_TIME | MYSQL_TYPE_TIME2),
            Kind::Enum(_) => t == MYSQL_TYPE_ENUM,
            Kind::Set(_) => t == MYSQL_TYPE_SET,
            Kind::Json | Kind::Text(_) | Kind::Bytes => matches!(
                t,
                MYSQL_TYPE_VARCHAR
                    | MYSQL_TYPE_VAR_STRING
                    | MYSQL_TYPE_STRING
                    | MYSQL_TYPE_TINY_BLOB
                    | MYSQL_TYPE_MEDIUM_BLOB
                    | MYSQL_TYPE_LONG_BLOB
                    | MYSQL_TYPE_BLOB
                    | MYSQL_TYPE_JSON
                    | MYSQL_TYPE_GEOMETRY
                    | MYSQL_TYPE_VECTOR
            ),
        }
    }

    /// The kind of a binlog column no schema describes (the table map
    /// alone): what its type says.
    pub fn of_binlog(t: ColumnType, unsigned: bool) -> Kind {
        use ColumnType::*;
        let int = |bits| Kind::Int { bits, unsigned };
        match t {
            MYSQL_TYPE_TINY => int(8),
            MYSQL_TYPE_SHORT => int(16),
            MYSQL_TYPE_INT24 => int(24),
            MYSQL_TYPE_LONG => int(32),
            MYSQL_TYPE_LONGLONG => int(64),
            MYSQL_TYPE_NEWDECIMAL | MYSQL_TYPE_DECIMAL => Kind::Decimal,
            MYSQL_TYPE_FLOAT => Kind::Float,
            MYSQL_TYPE_DOUBLE => Kind::Double,
            MYSQL_TYPE_BIT => Kind::Bit,
            MYSQL_TYPE_YEAR => Kind::Year,
            MYSQL_TYPE_DATE | MYSQL_TYPE_NEWDATE => Kind::Date,
            MYSQL_TYPE_DATETIME | MYSQL_TYPE_DATETIME2 => Kind::DateTime,
            MYSQL_TYPE_TIMESTAMP | MYSQL_TYPE_TIMESTAMP2 => Kind::Timestamp,
            MYSQL_TYPE_TIME | MYSQL_TYPE_TIME2 => Kind::Time,
            MYSQL_TYPE_JSON => Kind::Json,
            _ => Kind::Bytes,
        }
    }
}

/// `enum('a','b''c')` -> `["a", "b'c"]`.
fn labels(column_type: &str) -> Vec<String> {
    let Some(open) = column_type.find('(') else {
        return Vec::new();
    };
    let inner = column_type[open + 1..].trim_end();
    let inner = inner.strip_suffix(')').unwrap_or(inner);
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (false, '\'') => quoted = true,
            (false, ',') => out.push(std::mem::take(&mut cur)),
            (false, _) => {}
            (true, '\'') if chars.peek() == Some(&'\'') => {
                chars.next();
                cur.push('\'');
            }
            (true, '\'') => quoted = false,
            (true, '\\') => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            (true, _) => cur.push(c),
        }
    }
    if !inner.trim().is_empty() {
        out.push(cur);
    }
    out
}

/// A binlog value as JSON; `Err` for what cannot be read (a partial JSON
/// update, an invalid MySQL binary JSON).
pub fn binlog_to_json(kind: &Kind, v: &BinlogValue<'_>) -> Result<Value, String> {
    match v {
        BinlogValue::Value(v) => Ok(to_json(kind, v, true)),
        BinlogValue::Jsonb(j) => serde_json::Value::try_from(j.clone())
            .map_err(|e| format!("a binary JSON value that cannot be read: {e}")),
        BinlogValue::JsonDiff(_) => Err(
            "a partial JSON update (binlog_row_value_options=PARTIAL_JSON): set it to '' for CDC"
                .into(),
        ),
    }
}

/// A value as JSON. `binlog`: as a rows event carries it (an enum's
/// index, a set's bits, a timestamp's seconds); else as the binary
/// protocol returns it (in a `+00:00` session).
pub fn to_json(kind: &Kind, v: &My, binlog: bool) -> Value {
    match (kind, v) {
        (_, My::NULL) => Value::Null,
        // a binlog MEDIUMINT comes without its sign (mysql_common 0.37)
        (
            Kind::Int {
                bits: 24,
                unsigned: false,
            },
            My::Int(i),
        ) if binlog && (1 << 23..1 << 24).contains(i) => Value::from(*i - (1 << 24)),
        (Kind::Int { bits, unsigned }, My::Int(i)) => {
            if *unsigned && *i < 0 {
                let mask = if *bits >= 64 {
                    u64::MAX
                } else {
                    (1u64 << bits) - 1
                };
                Value::from((*i as u64) & mask)
            } else {
                Value::from(*i)
            }
        }
        (Kind::Enum(labels), My::Int(i)) => match usize::try_from(*i) {
            // 0 is the "invalid value" MySQL stores as the empty string
            Ok(0) => Value::String(String::new()),
            Ok(n) => labels
                .get(n - 1)
                .map_or_else(|| Value::from(*i), |l| Value::String(l.clone())),
            Err(_) => Value::from(*i),
        },
        (_, My::Int(i)) => Value::from(*i),
        (_, My::UInt(u)) => Value::from(*u),
        (Kind::Float, My::Float(f)) => number(f.to_string().parse::<f64>().unwrap_or(*f as f64)),
        (_, My::Float(f)) => number(f64::from(*f)),
        (_, My::Double(d)) => number(*d),
        (Kind::Bit, My::Bytes(b)) => {
            let mut n = 0u64;
            for byte in b.iter().rev().take(8).rev() {
                n = (n << 8) | u64::from(*byte);
            }
            Value::from(n)
        }
        (Kind::Int { .. } | Kind::Year, My::Bytes(b)) => {
            let s = String::from_utf8_lossy(b);
            s.parse::<i64>()
                .map(Value::from)
                .or_else(|_| s.parse::<u64>().map(Value::from))
                .unwrap_or_else(|_| Value::String(s.into_owned()))
        }
        (Kind::Float | Kind::Double, My::Bytes(b)) => {
            let s = String::from_utf8_lossy(b);
            s.parse::<f64>()
                .map(number)
                .unwrap_or_else(|_| Value::String(s.into_owned()))
        }
        (Kind::Timestamp, My::Bytes(b)) if binlog => {
            // seconds since the epoch, `.ffffff` when there is a fraction
            let s = String::from_utf8_lossy(b);
            epoch(&s).unwrap_or_else(|| Value::String(s.into_owned()))
        }
        (Kind::Timestamp, My::Date(y, mo, d, h, mi, s, us)) => {
            if *y == 0 && *mo == 0 && *d == 0 {
                return Value::String("0000-00-00T00:00:00Z".into());
            }
            Value::String(format!("{}Z", datetime(*y, *mo, *d, *h, *mi, *s, *us)))
        }
        (Kind::Date, My::Date(y, mo, d, ..)) => Value::String(format!("{y:04}-{mo:02}-{d:02}")),
        (_, My::Date(y, mo, d, h, mi, s, us)) => {
            Value::String(datetime(*y, *mo, *d, *h, *mi, *s, *us))
        }
        (_, My::Time(neg, days, h, m, s, us)) => {
            let hours = u64::from(*days) * 24 + u64::from(*h);
            let sign = if *neg { "-" } else { "" };
            Value::String(format!("{sign}{hours:02}:{m:02}:{s:02}{}", fraction(*us)))
        }
        (Kind::Set(members), My::Bytes(b)) if binlog => {
            let mut names = Vec::new();
            for (i, m) in members.iter().enumerate() {
                if b.get(i / 8).is_some_and(|byte| byte & (1 << (i % 8)) != 0) {
                    names.push(m.as_str());
                }
            }
            Value::String(names.join(","))
        }
        (Kind::Json, My::Bytes(b)) => match serde_json::from_slice(b) {
            Ok(v) => v,
            Err(_) => Value::String(String::from_utf8_lossy(b).into_owned()),
        },
        // the binlog has the column's bytes; a session gets them in its own
        // character set (utf8mb4)
        (Kind::Text(cs), My::Bytes(b)) if binlog => Value::String(text(cs, b)),
        (Kind::Bytes, My::Bytes(b)) => {
            Value::String(base64::engine::general_purpose::STANDARD.encode(b))
        }
        (_, My::Bytes(b)) => Value::String(String::from_utf8_lossy(b).into_owned()),
    }
}

fn number(f: f64) -> Value {
    serde_json::Number::from_f64(f).map_or_else(|| Value::String(f.to_string()), Value::Number)
}

/// `.5` -> `.500`, `.123456` as it is, nothing for 0 (chrono's `%.f`).
fn fraction(us: u32) -> String {
    if us == 0 {
        String::new()
    } else if us.is_multiple_of(1000) {
        format!(".{:03}", us / 1000)
    } else {
        format!(".{us:06}")
    }
}

fn datetime(y: u16, mo: u8, d: u8, h: u8, mi: u8, s: u8, us: u32) -> String {
    format!(
        "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}{}",
        fraction(us)
    )
}

/// `1714557600.123456` (a binlog TIMESTAMP) as RFC 3339 UTC.
fn epoch(s: &str) -> Option<Value> {
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    if secs == 0 && frac.trim_matches('0').is_empty() {
        // the zero timestamp `0000-00-00 00:00:00`
        return Some(Value::String("0000-00-00T00:00:00Z".into()));
    }
    let us: u32 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<6}").get(..6)?.parse().ok()?
    };
    let t = DateTime::from_timestamp(secs, us * 1000)?;
    Some(Value::String(
        t.to_rfc3339_opts(SecondsFormat::AutoSi, true),
    ))
}

/// Bytes of a text column in its character set.
fn text(charset: &str, b: &[u8]) -> String {
    let label = match charset {
        "utf8" | "utf8mb3" | "utf8mb4" | "ascii" => return String::from_utf8_lossy(b).into_owned(),
        // MySQL's latin1 is Windows-1252
        "latin1" => "windows-1252",
        "ucs2" | "utf16" => "utf-16be",
        "utf16le" => "utf-16le",
        "cp1250" => "windows-1250",
        "cp1251" => "windows-1251",
        "cp1256" => "windows-1256",
        "cp1257" => "windows-1257",
        "koi8r" => "koi8-r",
        "koi8u" => "koi8-u",
        "latin2" => "iso-8859-2",
        "greek" => "iso-8859-7",
        "hebrew" => "iso-8859-8",
        "latin5" => "iso-8859-9",
        "latin7" => "iso-8859-13",
        "sjis" | "cp932" => "shift_jis",
        "ujis" | "eucjpms" => "euc-jp",
        "euckr" => "euc-kr",
        "gbk" | "gb2312" => "gbk",
        "gb18030" => "gb18030",
        "big5" => "big5",
        other => other,
    };
    match encoding_rs::Encoding::for_label(label.as_bytes()) {
        Some(enc) => enc.decode_without_bom_handling(b).0.into_owned(),
        None => String::from_utf8_lossy(b).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn kinds_from_the_schema() {
        assert_eq!(
            Kind::of("bigint", "bigint(20) unsigned", None, false),
            Kind::Int {
                bits: 64,
                unsigned: true
            }
        );
        assert_eq!(
            Kind::of("enum", "enum('a','it''s','c,d')", Some("utf8mb4"), false),
            Kind::Enum(vec!["a".into(), "it's".into(), "c,d".into()])
        );
        assert_eq!(
            Kind::of("longtext", "longtext", Some("utf8mb4"), true),
            Kind::Json
        );
        assert_eq!(
            Kind::of("varbinary", "varbinary(8)", None, false),
            Kind::Bytes
        );
        assert_eq!(
            Kind::of("varchar", "varchar(8)", Some("latin1"), false),
            Kind::Text("latin1".into())
        );
    }

    #[test]
    fn binlog_values_as_json() {
        let u8k = Kind::Int {
            bits: 8,
            unsigned: true,
        };
        assert_eq!(to_json(&u8k, &My::Int(-1), true), json!(255));
        let u64k = Kind::Int {
            bits: 64,
            unsigned: true,
        };
        assert_eq!(to_json(&u64k, &My::Int(-1), true), json!(u64::MAX));
        let e = Kind::Enum(vec!["x".into(), "y".into()]);
        assert_eq!(to_json(&e, &My::Int(2), true), json!("y"));
        let s = Kind::Set(vec!["a".into(), "b".into(), "c".into()]);
        assert_eq!(to_json(&s, &My::Bytes(vec![0b101]), true), json!("a,c"));
        assert_eq!(
            to_json(&Kind::Timestamp, &My::Bytes(b"1714557600.5".to_vec()), true),
            json!("2024-05-01T10:00:00.500Z")
        );
        assert_eq!(
            to_json(
                &Kind::DateTime,
                &My::Date(2024, 5, 1, 12, 0, 0, 500_000),
                true
            ),
            json!("2024-05-01T12:00:00.500")
        );
        assert_eq!(
            to_json(&Kind::Time, &My::Time(true, 1, 2, 3, 4, 0), true),
            json!("-26:03:04")
        );
        assert_eq!(to_json(&Kind::Float, &My::Float(1.1), true), json!(1.1));
        assert_eq!(
            to_json(&Kind::Bit, &My::Bytes(vec![1, 2]), true),
            json!(258)
        );
        assert_eq!(
            to_json(&Kind::Text("latin1".into()), &My::Bytes(vec![0xe9]), true),
            json!("é")
        );
    }
}
