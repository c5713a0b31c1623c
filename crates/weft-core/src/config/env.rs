//! `${VAR}` interpolation, per scalar value, after YAML parsing.
//!
//! Forms: `${VAR}` (an error if unset), `${VAR:-default}` (default when
//! unset or empty), `${VAR:?message}` (an error with the message when unset
//! or empty), `$$` for a literal `$`.
//!
//! The document is parsed first; then every scalar *value* (never a key) is
//! interpolated on its own as it is deserialized ([`Interpolate`], a
//! deserializer wrapping the YAML one). So a value cannot change the document: a secret
//! `abc #def` stays whole in an unquoted scalar, a `"` cannot end a quoted
//! one and inject keys, and a newline is just a character of the value.
//! Strings are interpolated anywhere in the scalar (`Bearer ${TOKEN}`);
//! numbers and booleans take a scalar that interpolates to one
//! (`max_body_bytes: ${MAX_BODY}`). Errors name the variable, never its
//! value; the loader adds the line and column of the scalar.

use serde::de::{self, DeserializeSeed, Deserializer, Visitor};

/// Interpolate one scalar's text; `None` when it has nothing to replace.
pub fn interpolate_str(text: &str, lookup: Lookup<'_>) -> Result<Option<String>, String> {
    if !text.contains('$') {
        return Ok(None);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = after.strip_prefix('{') {
            let Some(end) = r.find('}') else {
                return Err("`${` without a closing `}`".into());
            };
            out.push_str(&resolve(&r[..end], lookup)?);
            rest = &r[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(Some(out))
}

fn resolve(expr: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let (name, op) = match expr.find(':') {
        Some(p) => (&expr[..p], Some(&expr[p..])),
        None => (expr, None),
    };
    let valid = !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if !valid {
        return Err(format!(
            "`${{{expr}}}`: `{name}` is not a valid environment variable name (letters, digits, `_`)"
        ));
    }
    let value = lookup(name);
    match op {
        None => value.ok_or_else(|| {
            format!("environment variable `{name}` is not set (use `${{{name}:-default}}` for a default)")
        }),
        Some(op) if op.starts_with(":-") => Ok(value.filter(|v| !v.is_empty()).unwrap_or_else(|| op[2..].to_owned())),
        Some(op) if op.starts_with(":?") => value
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("environment variable `{name}` is required: {}", &op[2..])),
        Some(op) => Err(format!(
            "`${{{expr}}}`: unknown operator `{op}`; expected `${{{name}}}`, `${{{name}:-default}}` or `${{{name}:?message}}`"
        )),
    }
}

/// The lookup of environment variables.
pub type Lookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Wraps a deserializer so that every scalar *value* below it is
/// interpolated: strings anywhere in their text; numbers and booleans when
/// written as a string that interpolates to one. Mapping keys, struct
/// field names and enum variant names are never interpolated.
pub struct Interpolate<'a, D> {
    de: D,
    env: Lookup<'a>,
}

impl<'a, D> Interpolate<'a, D> {
    pub fn new(de: D, env: Lookup<'a>) -> Self {
        Interpolate { de, env }
    }
}

/// What the visitor below expects, when a scalar written as text must be
/// turned into it after interpolation.
#[derive(Clone, Copy)]
enum Want {
    Any,
    Bool,
    Signed,
    Unsigned,
    Float,
}

struct Wrap<'a, X> {
    inner: X,
    env: Lookup<'a>,
    want: Want,
}

fn wrap<X>(inner: X, env: Lookup<'_>) -> Wrap<'_, X> {
    Wrap {
        inner,
        env,
        want: Want::Any,
    }
}

macro_rules! forward_as_any {
    ($($f:ident => $want:ident),*) => {
        $(fn $f<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
            // a `${N}` scalar is a string to the parser: take any scalar,
            // and turn an interpolated string into the number here
            self.de.deserialize_any(Wrap { inner: v, env: self.env, want: Want::$want })
        })*
    };
}

macro_rules! forward_wrapped {
    ($($f:ident),*) => {
        $(fn $f<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
            self.de.$f(wrap(v, self.env))
        })*
    };
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Interpolate<'_, D> {
    type Error = D::Error;

    forward_as_any!(deserialize_bool => Bool, deserialize_i8 => Signed, deserialize_i16 => Signed,
        deserialize_i32 => Signed, deserialize_i64 => Signed, deserialize_i128 => Signed,
        deserialize_u8 => Unsigned, deserialize_u16 => Unsigned, deserialize_u32 => Unsigned,
        deserialize_u64 => Unsigned, deserialize_u128 => Unsigned, deserialize_f32 => Float,
        deserialize_f64 => Float);
    forward_wrapped!(
        deserialize_any,
        deserialize_char,
        deserialize_str,
        deserialize_string,
        deserialize_bytes,
        deserialize_byte_buf,
        deserialize_option,
        deserialize_unit,
        deserialize_seq,
        deserialize_map
    );

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        v: V,
    ) -> Result<V::Value, D::Error> {
        self.de.deserialize_unit_struct(name, wrap(v, self.env))
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        v: V,
    ) -> Result<V::Value, D::Error> {
        self.de.deserialize_newtype_struct(name, wrap(v, self.env))
    }
    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, v: V) -> Result<V::Value, D::Error> {
        self.de.deserialize_tuple(len, wrap(v, self.env))
    }
    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        len: usize,
        v: V,
    ) -> Result<V::Value, D::Error> {
        self.de
            .deserialize_tuple_struct(name, len, wrap(v, self.env))
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, D::Error> {
        self.de.deserialize_struct(name, fields, wrap(v, self.env))
    }
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, D::Error> {
        self.de.deserialize_enum(name, variants, wrap(v, self.env))
    }
    fn deserialize_identifier<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
        self.de.deserialize_identifier(v)
    }
    fn deserialize_ignored_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
        self.de.deserialize_ignored_any(v)
    }
    fn is_human_readable(&self) -> bool {
        self.de.is_human_readable()
    }
}

macro_rules! visit_plain {
    ($($f:ident: $t:ty),*) => {
        $(fn $f<E: de::Error>(self, v: $t) -> Result<X::Value, E> { self.inner.$f(v) })*
    };
}

impl<'de, X: Visitor<'de>> Visitor<'de> for Wrap<'_, X> {
    type Value = X::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        self.inner.expecting(f)
    }
    visit_plain!(visit_bool: bool, visit_i8: i8, visit_i16: i16, visit_i32: i32, visit_i64: i64,
        visit_i128: i128, visit_u8: u8, visit_u16: u16, visit_u32: u32, visit_u64: u64,
        visit_u128: u128, visit_f32: f32, visit_f64: f64, visit_char: char, visit_bytes: &[u8],
        visit_borrowed_bytes: &'de [u8], visit_byte_buf: Vec<u8>);

    fn visit_str<E: de::Error>(self, v: &str) -> Result<X::Value, E> {
        match interpolate_str(v, self.env).map_err(E::custom)? {
            None => match self.want {
                Want::Any => self.inner.visit_str(v),
                want => literal(self.inner, want, v),
            },
            Some(s) => typed(self.inner, self.want, v, s),
        }
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<X::Value, E> {
        match interpolate_str(v, self.env).map_err(E::custom)? {
            None => match self.want {
                Want::Any => self.inner.visit_borrowed_str(v),
                want => literal(self.inner, want, v),
            },
            Some(s) => typed(self.inner, self.want, v, s),
        }
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<X::Value, E> {
        match interpolate_str(&v, self.env).map_err(E::custom)? {
            None => match self.want {
                Want::Any => self.inner.visit_string(v),
                want => literal(self.inner, want, &v),
            },
            Some(s) => typed(self.inner, self.want, &v, s),
        }
    }
    fn visit_none<E: de::Error>(self) -> Result<X::Value, E> {
        self.inner.visit_none()
    }
    fn visit_unit<E: de::Error>(self) -> Result<X::Value, E> {
        self.inner.visit_unit()
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<X::Value, D::Error> {
        self.inner.visit_some(Interpolate::new(d, self.env))
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<X::Value, D::Error> {
        self.inner
            .visit_newtype_struct(Interpolate::new(d, self.env))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<X::Value, A::Error> {
        self.inner.visit_seq(wrap(seq, self.env))
    }
    fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<X::Value, A::Error> {
        self.inner.visit_map(wrap(map, self.env))
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<X::Value, A::Error> {
        self.inner.visit_enum(wrap(data, self.env))
    }
}

/// A number or boolean the YAML parser gave as text (quoted, `yes`/`no`):
/// taken as the parser takes it when asked for that type directly; else
/// the visitor's own "invalid type" error.
fn literal<'de, X: Visitor<'de>, E: de::Error>(
    inner: X,
    want: Want,
    v: &str,
) -> Result<X::Value, E> {
    let t = v.trim();
    match want {
        Want::Bool => match t.to_ascii_lowercase().as_str() {
            "true" | "yes" | "y" | "on" => inner.visit_bool(true),
            "false" | "no" | "n" | "off" => inner.visit_bool(false),
            _ => inner.visit_str(v),
        },
        // through u64/i64: what the primitive visitors take
        Want::Signed | Want::Unsigned => match parse_int(t) {
            Some(n) if n >= 0 && n <= i128::from(u64::MAX) => inner.visit_u64(n as u64),
            Some(n) if n < 0 && n >= i128::from(i64::MIN) => inner.visit_i64(n as i64),
            _ => inner.visit_str(v),
        },
        Want::Float => match t.parse::<f64>() {
            Ok(n) => inner.visit_f64(n),
            Err(_) => inner.visit_str(v),
        },
        Want::Any => inner.visit_str(v),
    }
}

/// A YAML integer: decimal with a sign, or `0x`, `0o`, `0b`.
fn parse_int(t: &str) -> Option<i128> {
    let (neg, digits) = match t.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let n = if let Some(h) = digits.strip_prefix("0x") {
        i128::from_str_radix(h, 16).ok()?
    } else if let Some(o) = digits.strip_prefix("0o") {
        i128::from_str_radix(o, 8).ok()?
    } else if let Some(b) = digits.strip_prefix("0b") {
        i128::from_str_radix(b, 2).ok()?
    } else if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        digits.parse().ok()?
    } else {
        return None;
    };
    Some(if neg { -n } else { n })
}

/// Give the visitor the interpolated text `s` of the scalar `raw` as the
/// kind of value it wants. Errors quote the scalar, never the value.
fn typed<'de, X: Visitor<'de>, E: de::Error>(
    inner: X,
    want: Want,
    raw: &str,
    s: String,
) -> Result<X::Value, E> {
    let bad = |what: &str| E::custom(format!("`{raw}` does not interpolate to {what}"));
    let t = s.trim();
    match want {
        Want::Any => inner.visit_string(s),
        Want::Bool => match t {
            "true" => inner.visit_bool(true),
            "false" => inner.visit_bool(false),
            _ => Err(bad("`true` or `false`")),
        },
        Want::Signed => match t.parse::<i64>() {
            Ok(n) => inner.visit_i64(n),
            Err(_) => Err(bad("an integer")),
        },
        Want::Unsigned => match t.parse::<u64>() {
            Ok(n) => inner.visit_u64(n),
            Err(_) => Err(bad("a non-negative integer")),
        },
        Want::Float => match t.parse::<f64>() {
            Ok(n) if n.is_finite() => inner.visit_f64(n),
            _ => Err(bad("a number")),
        },
    }
}

impl<'de, T: DeserializeSeed<'de>> DeserializeSeed<'de> for Wrap<'_, T> {
    type Value = T::Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T::Value, D::Error> {
        self.inner.deserialize(Interpolate::new(d, self.env))
    }
}

impl<'de, A: de::SeqAccess<'de>> de::SeqAccess<'de> for Wrap<'_, A> {
    type Error = A::Error;
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, A::Error> {
        self.inner.next_element_seed(wrap(seed, self.env))
    }
    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

impl<'de, A: de::MapAccess<'de>> de::MapAccess<'de> for Wrap<'_, A> {
    type Error = A::Error;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        // keys are names, not values
        self.inner.next_key_seed(seed)
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.inner.next_value_seed(wrap(seed, self.env))
    }
    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

impl<'a, 'de, A: de::EnumAccess<'de>> de::EnumAccess<'de> for Wrap<'a, A> {
    type Error = A::Error;
    type Variant = Wrap<'a, A::Variant>;
    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, Self::Variant), A::Error> {
        // the variant's name is not interpolated; its content is
        let env = self.env;
        let (v, variant) = self.inner.variant_seed(seed)?;
        Ok((v, wrap(variant, env)))
    }
}

impl<'de, A: de::VariantAccess<'de>> de::VariantAccess<'de> for Wrap<'_, A> {
    type Error = A::Error;
    fn unit_variant(self) -> Result<(), A::Error> {
        self.inner.unit_variant()
    }
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, A::Error> {
        self.inner.newtype_variant_seed(wrap(seed, self.env))
    }
    fn tuple_variant<V: Visitor<'de>>(self, len: usize, v: V) -> Result<V::Value, A::Error> {
        self.inner.tuple_variant(len, wrap(v, self.env))
    }
    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, A::Error> {
        self.inner.struct_variant(fields, wrap(v, self.env))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(k: &str) -> Option<String> {
        match k {
            "A" => Some("alpha".into()),
            "EMPTY" => Some(String::new()),
            "NL" => Some("x\ny".into()),
            _ => None,
        }
    }

    fn i(s: &str) -> Result<Option<String>, String> {
        interpolate_str(s, &env)
    }

    #[test]
    fn forms() {
        assert_eq!(i("plain"), Ok(None));
        assert_eq!(i("${A}").unwrap().as_deref(), Some("alpha"));
        assert_eq!(i("a ${B:-def}").unwrap().as_deref(), Some("a def"));
        assert_eq!(i("${EMPTY:-def}").unwrap().as_deref(), Some("def"));
        assert_eq!(i("$$HOME $x $").unwrap().as_deref(), Some("$HOME $x $"));
        assert_eq!(i("$${A}").unwrap().as_deref(), Some("${A}"));
        assert_eq!(i("ü${A}ü").unwrap().as_deref(), Some("üalphaü"));
        assert_eq!(i("${NL}").unwrap().as_deref(), Some("x\ny"));
    }

    #[test]
    fn errors() {
        assert!(
            i("${MISSING}")
                .unwrap_err()
                .contains("`MISSING` is not set")
        );
        assert!(i("${B:?set it}").unwrap_err().contains("set it"));
        assert!(i("${EMPTY:?set it}").unwrap_err().contains("required"));
        assert!(i("${A").unwrap_err().contains("closing"));
        assert!(i("${1A}").unwrap_err().contains("not a valid"));
        assert!(i("${A:+x}").unwrap_err().contains("unknown operator"));
    }
}
