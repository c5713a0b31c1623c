//! A shortcut for the mappings most flows are made of: objects of renamed
//! and flattened fields (`{id: .Id, city: .address.city}`), literals, `//`
//! defaults and inline lookup tables (`{a: "X", b: "Y"}[.kind] // "Z"`).
//!
//! jaq builds `{a: f, b: g, ...}` as `{a: f} + {b: g} + ...` over boxed
//! iterators, which costs about 1.5 µs per field; this walk over the
//! `serde_json` value costs a few hundred nanoseconds for the whole record.
//!
//! It is not a second jq: the program is parsed by jaq's own parser, only
//! the forms above are recognised, and every program is still compiled by
//! jaq. Evaluation returns `None` whenever jq could do anything else than
//! produce one value the obvious way (an index into a number, a key that is
//! not a string, ...): the caller then runs the jaq program, which gives the
//! real result or error. The two paths are compared in the tests below.

use std::borrow::Cow;

use jaq_core::load::lex::StrPart;
use jaq_core::load::parse::{BinaryOp, Term};
use jaq_core::load::{Lexer, Parser};
use jaq_core::path::{Opt, Part};
use serde_json::{Map, Value};

/// A recognised program.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Fast {
    /// `.`
    Input,
    /// `"text"`, an integer, `null`, `true`, `false`
    Lit(Value),
    /// `{key: f, ...}` with literal keys, in order (a later key wins)
    Obj(Vec<(String, Fast)>),
    /// `l // r`
    Alt(Box<Fast>, Box<Fast>),
    /// `f.a.b`, `f[g]`: the indices are evaluated on the program's input
    Index(Box<Fast>, Vec<Fast>),
}

impl Fast {
    /// The shortcut for `code`, if the whole program is one of the forms.
    pub(super) fn parse(code: &str) -> Option<Fast> {
        let tokens = Lexer::new(code).lex().ok()?;
        let term = Parser::new(&tokens).parse(|p| p.term()).ok()?;
        from_term(&term)
    }

    /// The program's one output, or `None` when jaq must decide.
    pub(super) fn eval<'a>(&'a self, input: &'a Value) -> Option<Cow<'a, Value>> {
        match self {
            Fast::Input => Some(Cow::Borrowed(input)),
            Fast::Lit(v) => Some(Cow::Borrowed(v)),
            Fast::Obj(entries) => {
                let mut out = Map::new();
                for (k, f) in entries {
                    out.insert(k.clone(), f.eval(input)?.into_owned());
                }
                Some(Cow::Owned(Value::Object(out)))
            }
            Fast::Alt(l, r) => {
                let v = l.eval(input)?;
                if matches!(*v, Value::Null | Value::Bool(false)) {
                    r.eval(input)
                } else {
                    Some(v)
                }
            }
            Fast::Index(base, keys) => {
                let mut v = base.eval(input)?;
                for k in keys {
                    let key = k.eval(input)?;
                    let Value::String(key) = &*key else {
                        return None;
                    };
                    v = match v {
                        Cow::Borrowed(Value::Object(m)) => {
                            Cow::Borrowed(m.get(key.as_str()).unwrap_or(&Value::Null))
                        }
                        Cow::Owned(Value::Object(mut m)) => {
                            Cow::Owned(m.remove(key.as_str()).unwrap_or(Value::Null))
                        }
                        Cow::Borrowed(Value::Null) | Cow::Owned(Value::Null) => {
                            Cow::Owned(Value::Null)
                        }
                        _ => return None,
                    };
                }
                Some(v)
            }
        }
    }
}

fn from_term(t: &Term<&str>) -> Option<Fast> {
    Some(match t {
        Term::Id => Fast::Input,
        Term::Num(n) => Fast::Lit(Value::from(n.parse::<i64>().ok()?)),
        Term::Str(None, parts) => Fast::Lit(Value::String(literal(parts)?)),
        Term::Call(name, args) if args.is_empty() => match *name {
            "null" => Fast::Lit(Value::Null),
            "true" => Fast::Lit(Value::Bool(true)),
            "false" => Fast::Lit(Value::Bool(false)),
            _ => return None,
        },
        Term::Obj(entries) => {
            let mut out = Vec::with_capacity(entries.len());
            for (k, v) in entries {
                let Term::Str(None, parts) = k else {
                    return None;
                };
                let key = literal(parts)?;
                let value = match v {
                    Some(v) => from_term(v)?,
                    // `{a}` is `{a: .a}`
                    None => Fast::Index(
                        Box::new(Fast::Input),
                        vec![Fast::Lit(Value::String(key.clone()))],
                    ),
                };
                out.push((key, value));
            }
            Fast::Obj(out)
        }
        Term::BinOp(l, BinaryOp::Alt, r) => {
            Fast::Alt(Box::new(from_term(l)?), Box::new(from_term(r)?))
        }
        Term::Path(base, path) => {
            let mut keys = Vec::with_capacity(path.0.len());
            for (part, opt) in &path.0 {
                match (part, opt) {
                    (Part::Index(i), Opt::Essential) => match from_term(i)? {
                        // array indices are jaq's
                        Fast::Lit(v) if !v.is_string() => return None,
                        f => keys.push(f),
                    },
                    _ => return None,
                }
            }
            Fast::Index(Box::new(from_term(base)?), keys)
        }
        _ => return None,
    })
}

/// A string literal without interpolation.
fn literal(parts: &[StrPart<&str, Term<&str>>]) -> Option<String> {
    let mut s = String::new();
    for p in parts {
        match p {
            StrPart::Str(x) => s.push_str(x),
            StrPart::Char(c) => s.push(*c),
            StrPart::Term(_) => return None,
        }
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::mapping::Program;

    const RECOGNISED: &[&str] = &[
        ".",
        ".id",
        ".address.city",
        ".[\"odd key\"]",
        "{id: .Id, name: .Name}",
        "{id}",
        "{\"a b\": .x, c: \"lit\\n\", d: 42, e: null, f: true, g: false}",
        "{city: .address.city, zip: (.address.zip // \"none\")}",
        "{kind: ({customer: \"C\", vendor: \"V\"}[.type // \"\"] // \"UNKNOWN\")}",
        "{a: .x // .y // .z}",
        "{nested: {deeper: {x: .a.b.c}}}",
        "{a: .x, a: .y}",
        ".a[.k]",
    ];

    const NOT_RECOGNISED: &[&str] = &[
        "{a: .x + 1}",
        "{a: .x?}",
        "{a: .[0]}",
        "{a: $event.id}",
        "{(.k): 1}",
        "{a: \"\\(.x)\"}",
        "{a: 1.5}",
        "{a: (.x, .y)}",
        "def f: 1; {a: f}",
        "{a: empty}",
        "{a: .x | .y}",
        ".[]",
        "{a: @base64 \"x\"}",
    ];

    const INPUTS: &[&str] = &[
        r#"{"Id": 7, "Name": "Ada", "id": "x", "address": {"city": "Oslo", "zip": null}, "type": "customer", "x": false, "y": 0, "z": 3, "a": {"b": {"c": [1]}}, "k": "b", "odd key": 1.5}"#,
        r#"{"Id": null, "type": "vendor", "address": null, "x": null, "y": null, "a": {"b": 1}, "k": "b"}"#,
        r#"{"type": "other", "address": {"city": 3}, "a": null, "k": null}"#,
        r#"{"type": 5, "address": "a string", "a": [1, 2], "k": 0}"#,
        r#"{}"#,
        r#"null"#,
        r#"3"#,
        r#""text""#,
        r#"[1, 2]"#,
    ];

    #[test]
    fn recognises_the_structural_forms_only() {
        for code in RECOGNISED {
            assert!(Fast::parse(code).is_some(), "should be recognised: {code}");
        }
        for code in NOT_RECOGNISED {
            assert!(
                Fast::parse(code).is_none(),
                "should not be recognised: {code}"
            );
        }
    }

    /// Wherever the shortcut answers, jaq gives the same single value.
    #[test]
    fn agrees_with_jaq() {
        let mut answered = 0;
        for code in RECOGNISED {
            let fast = Fast::parse(code).expect("recognised");
            let program = Program::compile(code, &[]).expect("compiles");
            for input in INPUTS {
                let input: Value = serde_json::from_str(input).expect("test input");
                let jaq =
                    program.run_jaq(input.clone(), json!({}), &[], crate::mapping::MAX_OUTPUTS);
                // `None`: jaq decides (an error, or an index left to it)
                if let Some(v) = fast.eval(&input) {
                    answered += 1;
                    assert_eq!(jaq.ok(), Some(vec![v.into_owned()]), "{code} on {input}");
                }
            }
        }
        assert!(answered > 40, "the shortcut answered only {answered} cases");
    }

    #[test]
    fn inline_lookup_table_with_default() {
        let f = Fast::parse(
            r#"{c: ({customer: "CUSTOMER_ACTIVE", prospect: "LEAD_QUALIFIED"}[.t // ""] // "UNCLASSIFIED")}"#,
        )
        .expect("recognised");
        for (t, want) in [
            (json!("customer"), "CUSTOMER_ACTIVE"),
            (json!("prospect"), "LEAD_QUALIFIED"),
            (json!("martian"), "UNCLASSIFIED"),
            (Value::Null, "UNCLASSIFIED"),
        ] {
            let input = json!({"t": t});
            assert_eq!(
                f.eval(&input).map(Cow::into_owned),
                Some(json!({"c": want}))
            );
        }
        // a number as the key: jq raises an error, the shortcut leaves it to jaq
        assert_eq!(f.eval(&json!({"t": 1})), None);
    }
}
