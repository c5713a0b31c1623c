//! Column values as JSON, shared by the three databases.

use base64::Engine;
use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
use serde_json::Value;

/// A UTC timestamp as RFC 3339 with as many fraction digits as needed.
pub fn timestamp(t: NaiveDateTime) -> Value {
    Value::String(
        DateTime::<Utc>::from_naive_utc_and_offset(t, Utc)
            .to_rfc3339_opts(SecondsFormat::AutoSi, true),
    )
}

pub fn float(f: f64) -> Value {
    serde_json::Number::from_f64(f)
        .map(Value::Number)
        .unwrap_or_else(|| Value::String(f.to_string()))
}

pub fn bytes(b: &[u8]) -> Value {
    Value::String(base64::engine::general_purpose::STANDARD.encode(b))
}

/// A time of day (or MySQL duration) `[-]HH:MM:SS[.ffffff]`.
pub fn time(neg: bool, hours: u32, m: u32, s: u32, micros: u32) -> Value {
    let mut out = format!("{}{hours:02}:{m:02}:{s:02}", if neg { "-" } else { "" });
    if micros > 0 {
        out.push_str(format!(".{micros:06}").trim_end_matches('0'));
    }
    Value::String(out)
}

/// A value as the text a database casts back (strings unquoted).
pub fn param_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// PostgreSQL's binary `numeric` as exact decimal text.
pub fn pg_numeric(raw: &[u8]) -> Result<String, String> {
    let bad = || "malformed numeric".to_string();
    let u16_at = |i: usize| -> Result<u16, String> {
        raw.get(i..i + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(bad)
    };
    let ndigits = u16_at(0)? as usize;
    let weight = u16_at(2)? as i16 as i32;
    let sign = u16_at(4)?;
    let dscale = u16_at(6)? as usize;
    match sign {
        0xC000 => return Ok("NaN".into()),
        0xD000 => return Ok("Infinity".into()),
        0xF000 => return Ok("-Infinity".into()),
        _ => {}
    }
    let mut digits = Vec::with_capacity(ndigits);
    for i in 0..ndigits {
        digits.push(u16_at(8 + 2 * i)?);
    }
    let digit = |i: i32| -> u16 {
        if i < 0 {
            0
        } else {
            digits.get(i as usize).copied().unwrap_or(0)
        }
    };
    let mut out = String::new();
    if sign == 0x4000 {
        out.push('-');
    }
    if weight < 0 {
        out.push('0');
    } else {
        for i in 0..=weight {
            if i == 0 {
                out.push_str(&digit(i).to_string());
            } else {
                out.push_str(&format!("{:04}", digit(i)));
            }
        }
    }
    if dscale > 0 {
        let mut frac = String::new();
        let mut g = weight + 1;
        while frac.len() < dscale {
            frac.push_str(&format!("{:04}", digit(g)));
            g += 1;
        }
        frac.truncate(dscale);
        out.push('.');
        out.push_str(&frac);
    }
    if out == "-0" || (out.starts_with("-0") && out[1..].bytes().all(|b| b == b'0' || b == b'.')) {
        out.remove(0);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn num(ndigits: u16, weight: i16, sign: u16, dscale: u16, d: &[u16]) -> Vec<u8> {
        let mut v = Vec::new();
        for x in [ndigits, weight as u16, sign, dscale] {
            v.extend_from_slice(&x.to_be_bytes());
        }
        for x in d {
            v.extend_from_slice(&x.to_be_bytes());
        }
        v
    }

    #[test]
    fn numeric() {
        // 12345678.9012 = [1234, 5678, 9012], weight 1, dscale 4
        assert_eq!(
            pg_numeric(&num(3, 1, 0, 4, &[1234, 5678, 9012])).unwrap(),
            "12345678.9012"
        );
        // 0.001 = [10], weight -1, dscale 3
        assert_eq!(pg_numeric(&num(1, -1, 0, 3, &[10])).unwrap(), "0.001");
        // -100 = [100], weight 0
        assert_eq!(pg_numeric(&num(1, 0, 0x4000, 0, &[100])).unwrap(), "-100");
        // 10000.50 = [1, 0, 5000], weight 1, dscale 2
        assert_eq!(
            pg_numeric(&num(3, 1, 0, 2, &[1, 0, 5000])).unwrap(),
            "10000.50"
        );
        assert_eq!(pg_numeric(&num(0, 0, 0, 2, &[])).unwrap(), "0.00");
        assert_eq!(pg_numeric(&num(0, 0, 0xC000, 0, &[])).unwrap(), "NaN");
        assert!(pg_numeric(&[0, 1]).is_err());
    }
}
