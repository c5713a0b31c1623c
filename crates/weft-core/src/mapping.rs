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
//!
//! Every program is compiled with weft's helper definitions ([`HELPERS`]):
//! `split_name`, `join_name`, `normalize_company`, `company_key`,
//! `to_iso8601`, `to_iso8601(fmt)`, `to_date`, `to_decimal_string`,
//! `is_missing(f)`, `blank_to_null`; programs compiled from a config also get
//! the config's value maps as `valuemap("name")` and `valuemap("name"; v)`
//! (see [`Program::compile_with`] and `config::entities`).

use jaq_core::load::{Arena, File, Loader};
use jaq_core::{Compiler, Ctx, Vars, data};
use jaq_json::Val;
use serde_json::Value;

mod fast;

type Data = data::JustLut<Val>;

/// A compiled jq program.
/// Most outputs one run of a program may give (see [`Program::run`]).
pub const MAX_OUTPUTS: usize = 10_000;

pub struct Program {
    code: String,
    vars: Vec<String>,
    filter: jaq_core::Filter<Data>,
    /// The structural shortcut, when the program is one ([`fast`]).
    fast: Option<fast::Fast>,
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
        Program::compile_with(code, vars, "")
    }

    /// Like [`Program::compile`], with extra jq definitions (`def f: ...;`)
    /// visible to the program: the config's value maps.
    pub fn compile_with(code: &str, vars: &[&str], prelude: &str) -> Result<Program, CompileError> {
        let mut names: Vec<String> = vec!["$event".to_owned()];
        names.extend(vars.iter().map(|v| format!("${v}")));
        let filter = compile(code, &names, prelude)?;
        Ok(Program {
            code: code.to_owned(),
            vars: names,
            filter,
            fast: fast::Fast::parse(code),
        })
    }

    /// The program's source text.
    pub fn code(&self) -> &str {
        &self.code
    }

    /// Run on `input` and collect every output. `event` is bound to
    /// `$event`; `extra` to the declared variables, in order.
    pub fn run(&self, input: Value, event: Value, extra: &[Value]) -> Result<Vec<Value>, RunError> {
        if let Some(v) = self.fast.as_ref().and_then(|f| f.eval(&input)) {
            return Ok(vec![v.into_owned()]);
        }
        self.run_jaq(input, event, extra, MAX_OUTPUTS)
    }

    /// [`Program::run`] by jaq alone, without the structural shortcut;
    /// more than `limit` outputs are an error (jaq has no step budget: a
    /// generator without end, `repeat(.)` or `range(1e18)`, ends here; a
    /// loop inside one output, `[repeat(1)]`, does not).
    fn run_jaq(
        &self,
        input: Value,
        event: Value,
        extra: &[Value],
        limit: usize,
    ) -> Result<Vec<Value>, RunError> {
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
            if out.len() == limit {
                return Err(RunError(if limit == 1 {
                    "the mapping produced more than one output; it must produce exactly one"
                        .to_owned()
                } else {
                    format!("the program produced more than {limit} outputs")
                }));
            }
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
        if let Some(v) = self.fast.as_ref().and_then(|f| f.eval(&input)) {
            return Ok(v.into_owned());
        }
        Self::one(self.run_jaq(input, event, extra, 1)?)
    }

    /// [`Program::run_one`] on borrowed values: the input and `$event` are
    /// only copied when the structural shortcut does not apply.
    pub fn eval(&self, input: &Value, event: &Value, extra: &[Value]) -> Result<Value, RunError> {
        self.eval_with(input, || event.clone(), extra)
    }

    /// [`Program::eval`] with `$event` built only if jaq needs it.
    pub fn eval_with(
        &self,
        input: &Value,
        event: impl FnOnce() -> Value,
        extra: &[Value],
    ) -> Result<Value, RunError> {
        if let Some(v) = self.fast.as_ref().and_then(|f| f.eval(input)) {
            return Ok(v.into_owned());
        }
        Self::one(self.run_jaq(input.clone(), event(), extra, 1)?)
    }

    fn one(mut out: Vec<Value>) -> Result<Value, RunError> {
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

fn compile(
    code: &str,
    global_vars: &[String],
    prelude: &str,
) -> Result<jaq_core::Filter<Data>, CompileError> {
    let helpers = parse_defs(HELPERS, "weft's helper definitions")?;
    let extra = if prelude.trim().is_empty() {
        Vec::new()
    } else {
        parse_defs(prelude, "the value maps")?
    };
    type Def<'s> = jaq_core::load::parse::Def<&'s str>;
    fn widen<'s>(d: Def<'static>) -> Def<'s> {
        d
    }
    let defs = jaq_core::defs()
        .chain(jaq_std::defs())
        .chain(jaq_json::defs())
        .map(widen)
        .chain(helpers.into_iter().map(widen))
        .chain(extra);
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

fn parse_defs<'s>(
    text: &'s str,
    what: &str,
) -> Result<Vec<jaq_core::load::parse::Def<&'s str>>, CompileError> {
    use jaq_core::load::{Lexer, Parser};
    let fail = |msg: String, part: Option<&str>| {
        let e = located(text, msg, part);
        CompileError {
            message: format!(
                "{what} do not parse: {} (line {}, column {} of them)",
                e.message, e.line, e.column
            ),
            line: 1,
            column: 1,
        }
    };
    let tokens = Lexer::new(text).lex().map_err(|e| {
        let part = e.first().map(|x| x.1);
        fail("lexing failed".to_owned(), part)
    })?;
    Parser::new(&tokens).parse(|p| p.defs()).map_err(|e| {
        let (msg, part) = match e.first() {
            Some((expect, found)) => (
                format!("expected {}", expect.as_str()),
                found.map(|t| t.0).or(Some("")),
            ),
            None => ("parsing failed".to_owned(), None),
        };
        fail(msg, part)
    })
}

/// jq definitions compiled with every program. Semantics:
/// - `split_name`: `"John Smith"`, `"J. Smith"`, `"Smith, John"`,
///   `"John Paul Smith"` -> `{first, middle, last}` (missing parts are null;
///   spaces collapsed). Null or blank input gives null.
/// - `join_name`: `{first, middle, last}` or an array -> one string,
///   skipping null and blank parts.
/// - `normalize_company`: trims, collapses spaces, drops punctuation at the
///   end and one legal-form suffix (Ltd, Limited, Inc, LLC, GmbH, PLC, ...):
///   `"Acme Ltd"` and `"Acme Limited."` -> `"Acme"`.
/// - `company_key`: `normalize_company`, lower case, letters and digits only:
///   a matching key.
/// - `to_iso8601`: ISO dates (`2024-03-05`), ISO date-times with or
///   without offset, `YYYY-MM-DD HH:MM[:SS]`, `DD.MM.YYYY`, epoch seconds or
///   milliseconds (numbers) -> `2024-03-05T00:00:00Z` (UTC). Ambiguous forms
///   such as `03/05/2024` are an error: use `to_iso8601("%m/%d/%Y")`.
/// - `to_date`: like `to_iso8601`, only the date: `2024-03-05`.
/// - `to_decimal_string`: a number or a string such as `"1,234.50"`,
///   `"1.234,50"`, `"€ 12,5"` -> a plain decimal string (`"1234.50"`) without
///   going through a float; null or blank -> null; anything else is an error.
/// - `is_missing(f)`: true when `f` gives no value, null, or a blank string.
/// - `blank_to_null`: a blank string becomes null; anything else unchanged.
pub const HELPERS: &str = r#"
def blank_to_null: if type == "string" and (trim == "") then null else . end;
def is_missing(f): [try f catch null] | (length == 0) or (.[0] == null) or ((.[0] | type) == "string" and (.[0] | trim) == "");
def __weft_words: [splits("\\s+")] | map(select(. != ""));
def split_name:
  if . == null or (type == "string" and trim == "") then null
  elif type != "string" then error("split_name: expected a string, got \(type)")
  elif test(",") then
    (index(",")) as $i
    | (.[:$i] | trim) as $last
    | (.[$i + 1:] | __weft_words) as $w
    | {first: ($w[0] // null), middle: (if ($w | length) > 1 then ($w[1:] | join(" ")) else null end), last: (if $last == "" then null else $last end)}
  else __weft_words as $w
    | if ($w | length) == 1 then {first: null, middle: null, last: $w[0]}
      else {first: $w[0], middle: (if ($w | length) > 2 then ($w[1:-1] | join(" ")) else null end), last: $w[-1]}
      end
  end;
def join_name:
  (if type == "array" then . elif type == "object" then [.first, .middle, .last] elif . == null then [] else [.] end)
  | map(select(. != null) | tostring | trim | select(. != "")) | join(" ")
  | if . == "" then null else . end;
def normalize_company:
  if . == null or (type == "string" and trim == "") then null
  elif type != "string" then error("normalize_company: expected a string, got \(type)")
  else __weft_words | join(" ")
    | sub("[\\s,.;]+$"; "")
    | sub("[\\s,]+(ltd|limited|inc|incorporated|llc|l\\.l\\.c|gmbh|ag|plc|corp|corporation|co|company|sa|s\\.a|sarl|bv|b\\.v|nv|oy|ab|as|pty|srl|spa)\\.?$"; ""; "i")
    | sub("[\\s,.;]+$"; "")
  end;
def company_key: normalize_company | if . == null then null else ascii_downcase | gsub("[^a-z0-9]"; "") end;
def to_iso8601(fmt): if . == null or (type == "string" and trim == "") then null else trim | strptime(fmt) | mktime | todateiso8601 end;
def to_iso8601:
  if . == null then null
  elif type == "number" then (if . > 100000000000 then . / 1000 else . end) | floor | todateiso8601
  elif type != "string" then error("to_iso8601: cannot convert a \(type)")
  else trim as $s
    | if $s == "" then null
      elif ($s | test("^\\d{4}-\\d{2}-\\d{2}$")) then $s + "T00:00:00Z" | fromdateiso8601 | floor | todateiso8601
      elif ($s | test("^\\d{4}-\\d{2}-\\d{2}[T ]\\d{2}:\\d{2}(:\\d{2}(\\.\\d+)?)?(Z|z|[+-]\\d{2}:?\\d{2})?$")) then
        ($s | sub(" "; "T")) as $t
        | (if ($t | test("T\\d{2}:\\d{2}($|[Zz+-])")) then ($t | sub("(?<hm>T\\d{2}:\\d{2})"; "\(.hm):00")) else $t end) as $t
        | (if ($t | test("([Zz]|[+-]\\d{2}:?\\d{2})$")) then $t else $t + "Z" end) as $t
        | ($t | sub("(?<h>[+-]\\d{2})(?<m>\\d{2})$"; "\(.h):\(.m)")) as $t
        | $t | fromdateiso8601 | floor | todateiso8601
      elif ($s | test("^\\d{1,2}\\.\\d{1,2}\\.\\d{4}$")) then $s | strptime("%d.%m.%Y") | mktime | todateiso8601
      else error("to_iso8601: `\($s)` is not a date format weft knows; give its strptime format, e.g. to_iso8601(%m/%d/%Y)")
      end
  end;
def to_date: to_iso8601 | if . == null then null else .[:10] end;
def to_decimal_string:
  if . == null then null
  elif type == "number" then tostring
  elif type != "string" then error("to_decimal_string: cannot convert a \(type)")
  else (gsub("[\\s'\\u00a0]|[^0-9.,+-]"; "")) as $s
    | if $s == "" then (if trim == "" then null else error("to_decimal_string: `\(.)` is not a number") end)
      else ($s | (if test("[.].*,") then gsub("[.]"; "") | sub(","; ".")
                  elif test(",.*[.]") then gsub(","; "")
                  elif test("^[+-]?\\d{1,3}(,\\d{3})+$") then gsub(","; "")
                  elif test(",") then sub(","; ".")
                  elif test("^[+-]?\\d{1,3}([.]\\d{3}){2,}$") then gsub("[.]"; "")
                  else . end)
                | ltrimstr("+")) as $d
      | if ($d | test("^-?\\d+([.]\\d+)?$")) then $d else error("to_decimal_string: `\(.)` is not a number") end
      end
  end;
"#;

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

    /// Review P2-8 (part): jq has no step budget; a generator without end
    /// in a mapping used to hang ingestion. It ends at the output cap now.
    #[test]
    fn an_endless_generator_ends_with_an_error_not_a_hang() {
        let p = Program::compile("repeat(.)", &[]).unwrap();
        let e = p.eval(&json!({"a": 1}), &json!({}), &[]).unwrap_err();
        assert!(e.to_string().contains("more than one output"), "{e}");
        let p = Program::compile("range(1e18)", &[]).unwrap();
        let e = p.run(json!(null), json!({}), &[]).unwrap_err();
        assert!(e.to_string().contains("more than 10000 outputs"), "{e}");
        // two outputs are still refused as before
        let p = Program::compile(".a, .a", &[]).unwrap();
        assert!(p.eval(&json!({"a": 1}), &json!({}), &[]).is_err());
    }

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

    fn run(code: &str, input: Value) -> Result<Value, RunError> {
        Program::compile(code, &[])
            .unwrap()
            .run_one(input, json!({}), &[])
    }

    #[test]
    fn helper_names() {
        assert_eq!(
            run("split_name", json!("J. Smith")).unwrap(),
            json!({"first": "J.", "middle": null, "last": "Smith"})
        );
        assert_eq!(
            run("split_name", json!("  John   Paul Smith ")).unwrap(),
            json!({"first": "John", "middle": "Paul", "last": "Smith"})
        );
        assert_eq!(
            run("split_name", json!("Smith, John")).unwrap(),
            json!({"first": "John", "middle": null, "last": "Smith"})
        );
        assert_eq!(run("split_name", json!(" ")).unwrap(), json!(null));
        assert_eq!(
            run(
                "join_name",
                json!({"first": "John", "middle": null, "last": "Smith"})
            )
            .unwrap(),
            json!("John Smith")
        );
        assert_eq!(
            run("join_name", json!(["", null, "X"])).unwrap(),
            json!("X")
        );
        for (name, want) in [
            ("Acme Ltd", "Acme"),
            ("Acme Limited", "Acme"),
            ("  Acme   Limited. ", "Acme"),
            ("ACME, Inc.", "ACME"),
            ("Globex GmbH", "Globex"),
            ("Limited Editions Co", "Limited Editions"),
        ] {
            assert_eq!(
                run("normalize_company", json!(name)).unwrap(),
                json!(want),
                "{name}"
            );
        }
        assert_eq!(
            run("company_key", json!("ACME, Inc.")).unwrap(),
            json!("acme")
        );
    }

    #[test]
    fn helper_dates() {
        for (input, want) in [
            (json!("2024-03-05"), "2024-03-05T00:00:00Z"),
            (json!("2024-03-05T10:11:12Z"), "2024-03-05T10:11:12Z"),
            (json!("2024-03-05T10:11:12.345Z"), "2024-03-05T10:11:12Z"),
            (json!("2024-03-05 10:11"), "2024-03-05T10:11:00Z"),
            (json!("2024-03-05T12:11:12+02:00"), "2024-03-05T10:11:12Z"),
            (json!("2024-03-05T12:11:12+0200"), "2024-03-05T10:11:12Z"),
            (json!("05.03.2024"), "2024-03-05T00:00:00Z"),
            (json!(1709633472), "2024-03-05T10:11:12Z"),
            (json!(1709633472000_i64), "2024-03-05T10:11:12Z"),
        ] {
            assert_eq!(
                run("to_iso8601", input.clone()).unwrap(),
                json!(want),
                "{input}"
            );
        }
        assert_eq!(run("to_iso8601", json!("")).unwrap(), json!(null));
        assert!(run("to_iso8601", json!("03/05/2024")).is_err());
        assert_eq!(
            run(r#"to_iso8601("%m/%d/%Y")"#, json!("03/05/2024")).unwrap(),
            json!("2024-03-05T00:00:00Z")
        );
        assert_eq!(
            run("to_date", json!("2024-03-05T23:00:00Z")).unwrap(),
            json!("2024-03-05")
        );
    }

    #[test]
    fn helper_decimals_and_missing() {
        for (input, want) in [
            (json!("1,234.50"), json!("1234.50")),
            (json!("1.234,50"), json!("1234.50")),
            (json!("€ 12,5"), json!("12.5")),
            (json!("1,234"), json!("1234")),
            (json!("1.234.567"), json!("1234567")),
            (json!("-0.10"), json!("-0.10")),
            (
                json!("12345678901234567890.123456789"),
                json!("12345678901234567890.123456789"),
            ),
            (json!(0.1), json!("0.1")),
            (json!(42), json!("42")),
            (json!("  "), json!(null)),
            (json!(null), json!(null)),
        ] {
            assert_eq!(
                run("to_decimal_string", input.clone()).unwrap(),
                want,
                "{input}"
            );
        }
        assert!(run("to_decimal_string", json!("abc")).is_err());
        assert!(run("to_decimal_string", json!([1])).is_err());
        assert_eq!(run("is_missing(.a)", json!({})).unwrap(), json!(true));
        assert_eq!(
            run("is_missing(.a)", json!({"a": " "})).unwrap(),
            json!(true)
        );
        assert_eq!(
            run("is_missing(.a)", json!({"a": 0})).unwrap(),
            json!(false)
        );
        assert_eq!(
            run("is_missing(.a.b)", json!({"a": 3})).unwrap(),
            json!(true)
        );
        assert_eq!(
            run(".a | blank_to_null", json!({"a": ""})).unwrap(),
            json!(null)
        );
        assert_eq!(
            run(".a | blank_to_null", json!({"a": "x"})).unwrap(),
            json!("x")
        );
    }

    #[test]
    fn prelude_is_visible_and_positions_stay_in_the_program() {
        let p = Program::compile_with("twice", &[], "def twice: . * 2;").unwrap();
        assert_eq!(p.run_one(json!(2), json!({}), &[]).unwrap(), json!(4));
        let e = Program::compile_with(".a |\n nope", &[], "def twice: . * 2;").unwrap_err();
        assert_eq!((e.line, e.column), (2, 2), "{e}");
    }
}
