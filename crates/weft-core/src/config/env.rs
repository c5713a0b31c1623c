//! `${VAR}` interpolation in the config text, before YAML parsing.
//!
//! Forms: `${VAR}` (an error if unset), `${VAR:-default}` (default when
//! unset or empty), `${VAR:?message}` (an error with the message when unset
//! or empty), `$$` for a literal `$`. Values containing a newline are
//! rejected: they would change the document's structure.

use super::Issue;

/// Interpolate `text`; every problem is reported with its line and column.
pub fn interpolate(
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, Vec<Issue>> {
    let mut out = String::with_capacity(text.len());
    let mut issues = Vec::new();
    let mut line = 1u64;
    let mut col = 1u64;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == '$' {
            match chars.peek().map(|&(_, n)| n) {
                Some('$') => {
                    chars.next();
                    out.push('$');
                    col += 2;
                    continue;
                }
                Some('{') => {
                    let rest = &text[i + 2..];
                    let Some(end) = rest.find('}') else {
                        issues.push(issue(line, col, "`${` without a closing `}`".into()));
                        out.push_str(&text[i..]);
                        break;
                    };
                    let expr = &rest[..end];
                    match resolve(expr, lookup) {
                        Ok(v) if v.contains('\n') || v.contains('\r') => issues.push(issue(
                            line,
                            col,
                            format!(
                                "the value of `${{{}}}` contains a newline, which is not allowed",
                                name_of(expr)
                            ),
                        )),
                        Ok(v) => out.push_str(&v),
                        Err(m) => issues.push(issue(line, col, m)),
                    }
                    // skip `{expr}`
                    let stop = i + 2 + end + 1;
                    while chars.peek().is_some_and(|&(j, _)| j < stop) {
                        chars.next();
                    }
                    col += expr.chars().count() as u64 + 3;
                    continue;
                }
                _ => {}
            }
        }
        out.push(c);
        if c == '\n' {
            line += 1;
            col = 1;
        } else {
            col += 1;
        }
    }
    if issues.is_empty() {
        Ok(out)
    } else {
        Err(issues)
    }
}

fn name_of(expr: &str) -> &str {
    expr.split(":").next().unwrap_or(expr)
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

fn issue(line: u64, column: u64, message: String) -> Issue {
    Issue {
        path: String::new(),
        line: Some(line),
        column: Some(column),
        message,
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

    #[test]
    fn forms() {
        assert_eq!(interpolate("a: ${A}", &env).unwrap(), "a: alpha");
        assert_eq!(interpolate("a: ${B:-def}", &env).unwrap(), "a: def");
        assert_eq!(interpolate("a: ${EMPTY:-def}", &env).unwrap(), "a: def");
        assert_eq!(interpolate("a: $$HOME $x", &env).unwrap(), "a: $HOME $x");
        assert_eq!(interpolate("ü${A}ü", &env).unwrap(), "üalphaü");
    }

    #[test]
    fn errors_have_positions() {
        let e = interpolate("x: 1\ny: ${MISSING}\n", &env).unwrap_err();
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].line, e[0].column), (Some(2), Some(4)));
        assert!(e[0].message.contains("MISSING"));
        let e = interpolate("${B:?set it}", &env).unwrap_err();
        assert!(e[0].message.contains("set it"));
        let e = interpolate("${NL}", &env).unwrap_err();
        assert!(e[0].message.contains("newline"));
        let e = interpolate("${A} ${B} ${C}", &env).unwrap_err();
        assert_eq!(e.len(), 2, "all problems are collected");
    }
}
