//! What the broker connectors' settings share: deserializing a connector's
//! settings with the document path of a problem, durations within bounds,
//! and problems as one line.

use std::time::Duration;

use weft_core::config::raw::ConnectorSettings;
use weft_core::config::{Issue, parse_duration};

/// Problems as one line each (for a connector that fails to build).
pub fn describe(issues: &[Issue]) -> String {
    issues
        .iter()
        .map(|i| format!("at `{}`: {}", i.path, i.message))
        .collect::<Vec<_>>()
        .join("; ")
}

pub(crate) fn parse<T: serde::de::DeserializeOwned>(
    base: &str,
    settings: &ConnectorSettings,
) -> Result<T, Vec<Issue>> {
    serde_path_to_error::deserialize(&settings.0).map_err(|e| {
        let path = e.path().to_string();
        let at = if path.is_empty() || path == "." {
            base.to_owned()
        } else {
            format!("{base}.{path}")
        };
        vec![issue(at, e.into_inner().to_string())]
    })
}

pub(crate) fn duration(
    issues: &mut Vec<Issue>,
    path: &str,
    v: Option<&str>,
    default: Duration,
    (lo, hi): (Duration, Duration),
) -> Duration {
    match v.map(parse_duration) {
        None => default,
        Some(Ok(d)) if d >= lo && d <= hi => d,
        Some(Ok(_)) => {
            issues.push(issue(
                path.to_owned(),
                format!("must be between {lo:?} and {hi:?}"),
            ));
            default
        }
        Some(Err(m)) => {
            issues.push(issue(path.to_owned(), m));
            default
        }
    }
}

pub(crate) fn issue(path: String, message: impl Into<String>) -> Issue {
    Issue {
        path,
        line: None,
        column: None,
        message: message.into(),
    }
}
