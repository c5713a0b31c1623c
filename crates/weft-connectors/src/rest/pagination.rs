//! Pagination: from one page's response to the next request, or the end.
//!
//! Every style stops on an empty page and at `max_pages`; cursor and
//! next-URL styles also stop when the body has no next cursor or URL (null,
//! `""`, missing) or repeats the current one; link-header style stops when
//! there is no `rel="next"` link.

use reqwest::Url;
use reqwest::header::{HeaderMap, LINK};
use serde_json::Value;
use weft_core::config::raw::RestPagination;
use weft_core::mapping::Program;

/// How the next page is requested.
#[derive(Debug, Clone)]
pub(crate) enum Style {
    /// One request per poll.
    Single,
    Page {
        param: String,
        start: u64,
        size: Option<(String, u64)>,
    },
    Offset {
        offset_param: String,
        limit_param: String,
        limit: u64,
    },
    Cursor {
        param: String,
    },
    LinkHeader,
    NextUrl,
}

impl Style {
    pub(crate) fn from_config(p: Option<&RestPagination>) -> Style {
        match p {
            None => Style::Single,
            Some(RestPagination::Page(p)) => Style::Page {
                param: p.param.clone().unwrap_or_else(|| "page".into()),
                start: p.start.unwrap_or(1),
                size: p
                    .size
                    .map(|s| (p.size_param.clone().unwrap_or_else(|| "per_page".into()), s)),
            },
            Some(RestPagination::Offset(o)) => Style::Offset {
                offset_param: o.offset_param.clone().unwrap_or_else(|| "offset".into()),
                limit_param: o.limit_param.clone().unwrap_or_else(|| "limit".into()),
                limit: o.limit.unwrap_or(100),
            },
            Some(RestPagination::Cursor(c)) => Style::Cursor {
                param: c.param.clone().unwrap_or_else(|| "cursor".into()),
            },
            Some(RestPagination::LinkHeader(_)) => Style::LinkHeader,
            Some(RestPagination::NextUrl(_)) => Style::NextUrl,
        }
    }
}

/// Where the pager is.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Position {
    /// The first request of a poll.
    First,
    PageNumber(u64),
    Offset(u64),
    Cursor(String),
    /// A URL given by the server (link header, next URL).
    Url(Url),
}

impl Style {
    /// Query parameters of the pagination style for a position built from
    /// the base URL (not for server-given URLs).
    pub(crate) fn params(&self, pos: &Position) -> Vec<(String, String)> {
        match (self, pos) {
            (Style::Page { param, start, size }, p) => {
                let n = match p {
                    Position::PageNumber(n) => *n,
                    _ => *start,
                };
                let mut v = vec![(param.clone(), n.to_string())];
                if let Some((sp, s)) = size {
                    v.push((sp.clone(), s.to_string()));
                }
                v
            }
            (
                Style::Offset {
                    offset_param,
                    limit_param,
                    limit,
                },
                p,
            ) => {
                let o = match p {
                    Position::Offset(o) => *o,
                    _ => 0,
                };
                vec![
                    (offset_param.clone(), o.to_string()),
                    (limit_param.clone(), limit.to_string()),
                ]
            }
            (Style::Cursor { param }, Position::Cursor(c)) => vec![(param.clone(), c.clone())],
            _ => Vec::new(),
        }
    }

    /// The position after a page with `n` records (n > 0), or `None` at the end.
    pub(crate) fn next(
        &self,
        current: &Position,
        current_url: &Url,
        n: usize,
        headers: &HeaderMap,
        body: &Value,
        next_page: Option<&Program>,
    ) -> Result<Option<Position>, String> {
        if n == 0 {
            return Ok(None);
        }
        Ok(match self {
            Style::Single => None,
            Style::Page { start, .. } => Some(Position::PageNumber(match current {
                Position::PageNumber(p) => p + 1,
                _ => start + 1,
            })),
            Style::Offset { .. } => Some(Position::Offset(match current {
                Position::Offset(o) => o + n as u64,
                _ => n as u64,
            })),
            Style::Cursor { .. } => {
                let c = match next_page {
                    Some(p) => scalar_out(p, body, "cursor_path")?,
                    None => None,
                };
                match c {
                    Some(c) if Position::Cursor(c.clone()) != *current => Some(Position::Cursor(c)),
                    Some(_) => {
                        tracing::warn!(
                            "the next cursor equals the current one; stopping this poll"
                        );
                        None
                    }
                    None => None,
                }
            }
            Style::LinkHeader => match next_link(headers) {
                Some(l) => {
                    let u = current_url
                        .join(&l)
                        .map_err(|e| format!("the `Link` next URL `{l}` is not a URL: {e}"))?;
                    same_url_guard(u, current_url)
                }
                None => None,
            },
            Style::NextUrl => {
                let s = match next_page {
                    Some(p) => scalar_out(p, body, "next_url path")?,
                    None => None,
                };
                match s {
                    Some(s) => {
                        let u = current_url
                            .join(&s)
                            .map_err(|e| format!("the next URL `{s}` is not a URL: {e}"))?;
                        same_url_guard(u, current_url)
                    }
                    None => None,
                }
            }
        })
    }
}

fn same_url_guard(u: Url, current: &Url) -> Option<Position> {
    if &u == current {
        tracing::warn!("the next page's URL equals the current one; stopping this poll");
        None
    } else {
        Some(Position::Url(u))
    }
}

/// Run a program that must give a string, a number, null or nothing.
fn scalar_out(p: &Program, body: &Value, what: &str) -> Result<Option<String>, String> {
    let out = p
        .run(body.clone(), Value::Null, &[])
        .map_err(|e| format!("{what} `{}` failed: {e}", p.code()))?;
    match out.into_iter().next() {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(other) => Err(format!(
            "{what} `{}` gave {other}, expected a string, a number or null",
            p.code()
        )),
    }
}

/// The `rel="next"` target of the `Link` headers (RFC 8288), if any.
pub(crate) fn next_link(headers: &HeaderMap) -> Option<String> {
    for v in headers.get_all(LINK) {
        let Ok(v) = v.to_str() else { continue };
        if let Some(u) = parse_link_next(v) {
            return Some(u);
        }
    }
    None
}

fn parse_link_next(v: &str) -> Option<String> {
    let mut rest = v;
    loop {
        let start = rest.find('<')?;
        let end = start + rest[start..].find('>')?;
        let target = &rest[start + 1..end];
        let after = &rest[end + 1..];
        // the parameters run to the next `<` that starts a new link (after a comma)
        let params_end = after
            .find(',')
            .and_then(|c| after[c..].find('<').map(|l| c + l))
            .unwrap_or(after.len());
        let params = &after[..params_end];
        for p in params.split(';') {
            let Some((k, val)) = p.split_once('=') else {
                continue;
            };
            if k.trim().eq_ignore_ascii_case("rel") {
                let val = val.trim().trim_end_matches(',').trim().trim_matches('"');
                if val
                    .split_whitespace()
                    .any(|r| r.eq_ignore_ascii_case("next"))
                {
                    return Some(target.trim().to_owned());
                }
            }
        }
        rest = &after[params_end..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_header_forms() {
        assert_eq!(
            parse_link_next(
                r#"<https://a/x?page=2>; rel="next", <https://a/x?page=9>; rel="last""#
            ),
            Some("https://a/x?page=2".into())
        );
        assert_eq!(
            parse_link_next(r#"<https://a/x?page=1>; rel="prev", <https://a/x?page=3>; rel=next"#),
            Some("https://a/x?page=3".into())
        );
        assert_eq!(
            parse_link_next(r#"</x?c=a,b>; title="a, b"; rel="last next""#),
            Some("/x?c=a,b".into())
        );
        assert_eq!(parse_link_next(r#"<https://a/x?page=1>; rel="prev""#), None);
        assert_eq!(parse_link_next("garbage"), None);
    }

    #[test]
    fn page_and_offset_positions() {
        let s = Style::Page {
            param: "page".into(),
            start: 1,
            size: Some(("per_page".into(), 2)),
        };
        let u = Url::parse("http://h/x").unwrap();
        let h = HeaderMap::new();
        assert_eq!(
            s.params(&Position::First),
            vec![("page".into(), "1".into()), ("per_page".into(), "2".into())]
        );
        let n = s
            .next(&Position::First, &u, 2, &h, &Value::Null, None)
            .unwrap();
        assert_eq!(n, Some(Position::PageNumber(2)));
        assert_eq!(
            s.next(&Position::PageNumber(2), &u, 0, &h, &Value::Null, None)
                .unwrap(),
            None
        );
        let o = Style::Offset {
            offset_param: "offset".into(),
            limit_param: "limit".into(),
            limit: 10,
        };
        assert_eq!(
            o.next(&Position::Offset(10), &u, 7, &h, &Value::Null, None)
                .unwrap(),
            Some(Position::Offset(17))
        );
    }
}
