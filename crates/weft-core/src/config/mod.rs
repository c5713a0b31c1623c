//! The config file: load (interpolate, parse), then validate into a
//! ready-to-run [`Config`].
//!
//! Two phases, as in the house style: [`raw`] holds serde structs that
//! reject unknown keys; [`validate`] is pure and collects *every* problem
//! with its document path and line. Nothing here opens a connection or a file
//! other than the config itself.

pub mod entities;
pub mod env;
pub mod raw;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use raw::{FileFormat, OnDeadLetter, Synchronous};
pub use validate::{
    BreakerPolicy, Config, DeliveryPolicy, Destination, ExportTarget, FileTarget, Flow,
    RateLimitPolicy, RotatePolicy, ServerConfig, SinkSpec, SourceSpec, StoreConfig, System,
    TextEncoding,
};

/// A string that never prints: credentials, tokens, signing secrets.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret value; call only where it is used (a signature check, a header).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// Path in the document, e.g. `flows.crm_to_erp.to[1].system`.
    pub path: String,
    /// 1-based line and column, when known.
    pub line: Option<u64>,
    pub column: Option<u64>,
    /// What is wrong and what was expected.
    pub message: String,
}

impl Issue {
    /// `file:line:col: at `path`: message`, as errors are printed.
    pub fn located(&self, file: &Path) -> String {
        let mut out = file.display().to_string();
        if let Some(l) = self.line {
            out.push_str(&format!(":{l}"));
            if let Some(c) = self.column {
                out.push_str(&format!(":{c}"));
            }
        }
        if self.path.is_empty() {
            out.push_str(&format!(": {}", self.message));
        } else {
            out.push_str(&format!(": at `{}`: {}", self.path, self.message));
        }
        out
    }
}

/// Every problem found in a config file.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub issues: Vec<Issue>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.issues.len();
        write!(
            f,
            "{} has {n} problem{}:",
            self.file.display(),
            if n == 1 { "" } else { "s" }
        )?;
        for i in &self.issues {
            write!(f, "\n  {}", self.file.display())?;
            if let Some(l) = i.line {
                write!(f, ":{l}")?;
                if let Some(c) = i.column {
                    write!(f, ":{c}")?;
                }
            }
            if i.path.is_empty() {
                write!(f, ": {}", i.message)?;
            } else {
                write!(f, ": at `{}`: {}", i.path, i.message)?;
            }
        }
        Ok(())
    }
}

impl ConfigError {
    fn one(file: &Path, issue: Issue) -> Self {
        ConfigError {
            file: file.to_owned(),
            issues: vec![issue],
        }
    }
}

/// Read, interpolate `${ENV}`, parse and validate a config file.
pub fn load(file: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        ConfigError::one(
            file,
            Issue {
                path: String::new(),
                line: None,
                column: None,
                message: format!("cannot read the file: {e}"),
            },
        )
    })?;
    load_str(file, &text, &|k| std::env::var(k).ok())
}

/// Like [`load`], from text; `lookup` resolves environment variables.
pub fn load_str(
    file: &Path,
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let text = env::interpolate(text, lookup).map_err(|issues| ConfigError {
        file: file.to_owned(),
        issues,
    })?;
    let raw = parse(file, &text)?;
    let base = file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let base = if base.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        base
    };
    validate::validate(raw, file, &base).map_err(|issues| ConfigError {
        file: file.to_owned(),
        issues,
    })
}

fn parse(file: &Path, text: &str) -> Result<raw::RawConfig, ConfigError> {
    // serde_path_to_error tracks where in the document the deserializer was
    // when it failed; serde-saphyr knows the line and column.
    let path_seen = std::cell::RefCell::new(String::new());
    let result = serde_saphyr::with_deserializer_from_str(text, |de| {
        serde_path_to_error::deserialize::<_, raw::RawConfig>(de).map_err(|e| {
            *path_seen.borrow_mut() = e.path().to_string();
            e.into_inner()
        })
    });
    result.map_err(|e| {
        let loc = e.location();
        let mut message = e.to_string();
        // serde-saphyr appends its own location and snippet; keep the first line.
        if let Some(first) = message.lines().next() {
            message = first.to_owned();
        }
        let path = path_seen.into_inner();
        ConfigError::one(
            file,
            Issue {
                path: if path == "." { String::new() } else { path },
                line: loc.map(|l| l.line()).filter(|l| *l > 0),
                column: loc.map(|l| l.column()).filter(|c| *c > 0),
                message,
            },
        )
    })
}

/// Parse a duration such as `250ms`, `5s`, `2m`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        format!("`{s}` is not a duration ({e}); expected for example `250ms`, `5s`, `2m`")
    })
}
