//! Mappings and predicates written in jq syntax, run by the `jaq` crates.
//!
//! A [`Program`] is compiled once at config load (so a typo fails
//! `weft validate` with its line and column) and run per record. Programs see
//! the record as `.` and these global variables:
//! - `$event`: the CloudEvents attributes of the record (id, source, type,
//!   time, subject, correlationid, ...);
//! - any extra variables the caller declares (for example `$seq` in the
//!   `generate` source).
//!
//! Running a program never panics and never exits the process: jq's `halt`
//! and `error` both come back as a [`RunError`].

use jaq_core::load::{Arena, File, Loader};
use jaq_core::{Compiler, Ctx, Vars, data};
use jaq_json::Val;
use serde_json::Value;

type Data = data::JustLut<Val>;

/// A compiled jq program.
pub struct Program {
    code: String,
    vars: Vec<String>,
    filter: jaq_core::Filter<Data>,
}

impl std::fmt::Debug for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Program").field("code", &self.code).finish()
    }
}

/// A program that did not compile, with the position of the problem inside
/// the program text (1-based line and column).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message} (at line {line}, column {column} of the jq program)")]
pub struct CompileError {
    pub message: String,
    pub line: usize,
    pub column: usize,
}

/// A program that failed on one input.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct RunError(pub String);

impl Program {
    /// Compile `code`; `vars` names extra global variables (without `$`)
    /// that [`Program::run`] will be given, in order, after `$event`.
    pub fn compile(code: &str, vars: &[&str]) -> Result<Program, CompileError> {
        let mut names: Vec<String> = vec!["$event".to_owned()];
        names.extend(vars.iter().map(|v| format!("${v}")));
        let filter = compile(code, &names)?;
        Ok(Program {
            code: code.to_owned(),
            vars: names,
            filter,
        })
    }

    /// The program's source text.
    pub fn code(&self) -> &str {
        &self.code
    }

    /// Run on `input` and collect every output. `event` is bound to
    /// `$event`; `extra` to the declared variables, in order.
    pub fn run(&self, input: Value, event: Value, extra: &[Value]) -> Result<Vec<Value>, RunError> {
        let input = to_val(input)?;
        let mut vals = Vec::with_capacity(self.vars.len());
        vals.push(to_val(event)?);
        for v in extra {
            vals.push(to_val(v.clone())?);
        }
        if vals.len() != self.vars.len() {
            return Err(RunError(format!(
                "program expects {} variables, got {}",
                self.vars.len(),
                vals.len()
            )));
        }
        let ctx = Ctx::<Data>::new(&self.filter.lut, Vars::new(vals));
        let mut out = Vec::new();
        for r in self.filter.id.run((ctx, input)) {
            match r {
                Ok(v) => out.push(from_val(&v)?),
                Err(exn) => {
                    return Err(match exn.get_err() {
                        Ok(e) => RunError(e.to_string()),
                        Err(_) => RunError("the program called halt".to_owned()),
                    });
                }
            }
        }
        Ok(out)
    }

    /// Run and require exactly one output (what a mapping must produce).
    pub fn run_one(&self, input: Value, event: Value, extra: &[Value]) -> Result<Value, RunError> {
        let mut out = self.run(input, event, extra)?;
        match out.len() {
            1 => Ok(out.pop().unwrap_or(Value::Null)),
            0 => Err(RunError("the mapping produced no output".to_owned())),
            n => Err(RunError(format!(
                "the mapping produced {n} outputs; it must produce exactly one"
            ))),
        }
    }

    /// Run as a predicate: true when the first output is truthy (neither
    /// `false` nor `null`); no output counts as false.
    pub fn test(&self, input: Value, event: Value) -> Result<bool, RunError> {
        let out = self.run(input, event, &[])?;
        Ok(matches!(out.first(), Some(v) if !matches!(v, Value::Null | Value::Bool(false))))
    }
}

fn compile(code: &str, global_vars: &[String]) -> Result<jaq_core::Filter<Data>, CompileError> {
    let defs = jaq_core::defs()
        .chain(jaq_std::defs())
        .chain(jaq_json::defs());
    let funs = jaq_core::funs()
        .chain(jaq_std::funs())
        .chain(jaq_json::funs());
    let loader = Loader::new(defs);
    let arena = Arena::default();
    let program = File { code, path: () };
    let modules = loader.load(&arena, program).map_err(|errs| {
        let (msg, at) = match errs.into_iter().next() {
            Some((_, jaq_core::load::Error::Lex(e))) => match e.into_iter().next() {
                Some((expect, part)) => (format!("expected {}", expect.as_str()), Some(part)),
                None => ("lexing failed".to_owned(), None),
            },
            Some((_, jaq_core::load::Error::Parse(e))) => match e.into_iter().next() {
                Some((expect, found)) => {
                    let part = Some(found);
                    let found = match part {
                        Some(p) if !p.is_empty() => format!(", found `{p}`"),
                        _ => ", found the end of the program".to_owned(),
                    };
                    (format!("expected {}{found}", expect.as_str()), part)
                }
                None => ("parsing failed".to_owned(), None),
            },
            Some((_, jaq_core::load::Error::Io(e))) => (
                format!(
                    "cannot load module: {}",
                    e.first().map(|x| x.1.as_str()).unwrap_or("?")
                ),
                e.first().map(|x| x.0),
            ),
            None => ("the program could not be loaded".to_owned(), None),
        };
        located(code, msg, at)
    })?;
    let names: Vec<&str> = global_vars.iter().map(String::as_str).collect();
    Compiler::default()
        .with_funs(funs)
        .with_global_vars(names)
        .compile(modules)
        .map_err(|errs| {
            let first = errs
                .into_iter()
                .next()
                .and_then(|(_, e)| e.into_iter().next());
            match first {
                Some((name, undefined)) => located(
                    code,
                    format!("undefined {} `{name}`", undefined.as_str()),
                    Some(name),
                ),
                None => located(code, "compilation failed".to_owned(), None),
            }
        })
}

fn located(code: &str, message: String, part: Option<&str>) -> CompileError {
    let offset = match part {
        // `part` is a slice of `code` when it comes from the lexer or parser
        Some(p) if !p.is_empty() && in_slice(code, p) => jaq_core::load::span(code, p).start,
        // the end of the program: point at its last character, not trailing blanks
        _ => code.trim_end().len(),
    };
    let before = &code[..offset.min(code.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0)
        + 1;
    CompileError {
        message,
        line,
        column,
    }
}

fn in_slice(whole: &str, part: &str) -> bool {
    let w = whole.as_ptr() as usize;
    let p = part.as_ptr() as usize;
    p >= w && p + part.len() <= w + whole.len()
}

/// serde_json value into jaq's value.
pub fn to_val(v: Value) -> Result<Val, RunError> {
    serde_json::from_value::<Val>(v).map_err(|e| RunError(format!("cannot convert input: {e}")))
}

/// jaq's value into a serde_json value. Byte strings become (lossy) text;
/// numbers keep their integer form when they have one.
pub fn from_val(v: &Val) -> Result<Value, RunError> {
    use jaq_json::Num;
    Ok(match v {
        Val::Null => Value::Null,
        Val::Bool(b) => Value::Bool(*b),
        Val::Num(n) => match n {
            Num::Int(i) => Value::from(*i as i64),
            Num::Float(f) => serde_json::Number::from_f64(*f)
                .map(Value::Number)
                .unwrap_or(Value::Null),
            Num::BigInt(_) | Num::Dec(_) => {
                let s = v.to_string();
                serde_json::from_str::<serde_json::Number>(&s)
                    .map(Value::Number)
                    .map_err(|e| RunError(format!("number {s} is not representable: {e}")))?
            }
        },
        Val::TStr(b) | Val::BStr(b) => Value::String(String::from_utf8_lossy(b).into_owned()),
        Val::Arr(a) => Value::Array(a.iter().map(from_val).collect::<Result<_, _>>()?),
        Val::Obj(o) => {
            let mut m = serde_json::Map::with_capacity(o.len());
            for (k, v) in o.iter() {
                let key = match k {
                    Val::TStr(b) | Val::BStr(b) => String::from_utf8_lossy(b).into_owned(),
                    other => other.to_string(),
                };
                m.insert(key, from_val(v)?);
            }
            Value::Object(m)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn maps_renames_and_value_maps() {
        let p = Program::compile(
            r#"{contact_id: .id, category: ({"customer": "CUSTOMER_ACTIVE"}[.t] // "UNCLASSIFIED")}"#,
            &[],
        )
        .unwrap();
        let out = p
            .run_one(json!({"id": 7, "t": "customer"}), json!({}), &[])
            .unwrap();
        assert_eq!(out, json!({"contact_id": 7, "category": "CUSTOMER_ACTIVE"}));
        let out = p
            .run_one(json!({"id": 8, "t": "x"}), json!({}), &[])
            .unwrap();
        assert_eq!(out["category"], "UNCLASSIFIED");
    }

    #[test]
    fn event_and_extra_vars_are_bound() {
        let p = Program::compile("{id: $event.id, n: $seq}", &["seq"]).unwrap();
        let out = p
            .run_one(json!(null), json!({"id": "e1"}), &[json!(3)])
            .unwrap();
        assert_eq!(out, json!({"id": "e1", "n": 3}));
    }

    #[test]
    fn compile_errors_have_positions() {
        let e = Program::compile("{a: .x,\n  b: (.y | }", &[]).unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        let e = Program::compile(".a | nosuchfn(1)", &[]).unwrap_err();
        assert!(e.message.contains("nosuchfn"), "{e}");
        assert_eq!((e.line, e.column), (1, 6), "{e}");
    }

    #[test]
    fn runtime_errors_and_halt_are_errors_not_exits() {
        let p = Program::compile(".a + 1", &[]).unwrap();
        assert!(p.run_one(json!({"a": "s"}), json!({}), &[]).is_err());
        let p = Program::compile("halt", &[]).unwrap();
        assert!(p.run(json!(1), json!({}), &[]).is_err());
        let p = Program::compile("error(\"boom\")", &[]).unwrap();
        let e = p.run(json!(1), json!({}), &[]).unwrap_err();
        assert!(e.0.contains("boom"), "{e}");
    }

    #[test]
    fn predicate_truthiness() {
        let p = Program::compile(".x > 1", &[]).unwrap();
        assert!(p.test(json!({"x": 2}), json!({})).unwrap());
        assert!(!p.test(json!({"x": 0}), json!({})).unwrap());
        let p = Program::compile("empty", &[]).unwrap();
        assert!(!p.test(json!({}), json!({})).unwrap());
    }
}
