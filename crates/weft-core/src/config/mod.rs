//! The config file: load (parse, interpolating `${ENV}` per scalar), then
//! validate into a ready-to-run [`Config`].
//!
//! Two phases, as in the house style: [`raw`] holds serde structs that
//! reject unknown keys; [`validate`] is pure and collects *every* problem
//! with its document path and line. Nothing here opens a connection or a file
//! other than the config itself.

pub mod entities;
pub mod env;
pub mod identity;
mod locate;
pub mod raw;
pub mod references;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use raw::{FileFormat, OnDeadLetter, Synchronous};
/// Checks run on a validated config by the caller's connectors (URLs their
/// clients must parse); see [`load_checked`].
pub type Check<'a> = &'a dyn Fn(&Config) -> Vec<Issue>;

pub use validate::{
    AlertTarget, BreakerPolicy, Config, DeliveryPolicy, Destination, ExportTarget, FileTarget,
    Flow, OtlpConfig, PgStore, RateLimitPolicy, RotatePolicy, ServerConfig, SinkSpec, SourceSpec,
    StoreConfig, System, TextEncoding, Topic, TopicStart,
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

impl schemars::JsonSchema for Secret {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Secret".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A secret: write it as `${ENV_VAR}` rather than in the file; it never prints."
        })
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
            write!(f, "\n  {}", i.render(&self.file))?;
        }
        Ok(())
    }
}

impl Issue {
    /// `file:line:col: at `path`: message`, as `weft validate` prints it.
    pub fn render(&self, file: &Path) -> String {
        let mut s = file.display().to_string();
        if let Some(l) = self.line {
            s.push_str(&format!(":{l}"));
            if let Some(c) = self.column {
                s.push_str(&format!(":{c}"));
            }
        }
        if self.path.is_empty() {
            s.push_str(&format!(": {}", self.message));
        } else {
            s.push_str(&format!(": at `{}`: {}", self.path, self.message));
        }
        s
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

/// Read, parse (interpolating `${ENV}`) and validate a config file.
pub fn load(file: &Path) -> Result<Config, ConfigError> {
    load_checked(file, &|_| Vec::new())
}

/// [`load`], then `check` (the connectors' own parsers): its problems are
/// reported like the others, with line and column.
pub fn load_checked(file: &Path, check: Check<'_>) -> Result<Config, ConfigError> {
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
    load_str_checked(file, &text, &|k| std::env::var(k).ok(), check)
}

/// Like [`load`], from text; `lookup` resolves environment variables.
pub fn load_str(
    file: &Path,
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    load_str_checked(file, text, lookup, &|_| Vec::new())
}

/// Like [`load_checked`], from text.
pub fn load_str_checked(
    file: &Path,
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    check: Check<'_>,
) -> Result<Config, ConfigError> {
    let raw = parse(file, text, lookup)?;
    let locations = locate::Locations::of(text);
    let base = file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let base = if base.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        base
    };
    let checked = validate::validate(raw, file, &base).and_then(|config| {
        let issues = check(&config);
        if issues.is_empty() {
            Ok(config)
        } else {
            Err(issues)
        }
    });
    match checked {
        Ok(mut config) => {
            for w in &mut config.warnings {
                locations.place(w);
            }
            Ok(config)
        }
        Err(mut issues) => {
            for i in &mut issues {
                locations.place(i);
            }
            Err(ConfigError {
                file: file.to_owned(),
                issues,
            })
        }
    }
}

fn parse(
    file: &Path,
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<raw::RawConfig, ConfigError> {
    if text.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#')
    }) {
        // nothing written: refused by `validate` as an empty config
        return Ok(raw::RawConfig::default());
    }
    // serde_path_to_error tracks where in the document the deserializer was
    // when it failed; serde-saphyr knows the line and column; `env::Interpolate`
    // interpolates each scalar value as it is deserialized.
    let path_seen = std::cell::RefCell::new(String::new());
    let result = serde_saphyr::with_deserializer_from_str(text, |de| {
        let de = env::Interpolate::new(de, lookup);
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
        // and prefixes `error: line L column C: `, which the issue says already
        if let Some(rest) = message.strip_prefix("error: line ")
            && let Some((_, after)) = rest.split_once(": ")
            && rest.split(' ').nth(1) == Some("column")
        {
            message = after.to_owned();
        }
        if let Some(l) = loc.map(|l| l.line()).filter(|l| *l > 0)
            && text.lines().nth(l as usize - 1).is_some_and(unquoted_in_flow)
        {
            message.push_str(
                " (inside `{...}` or `[...]`, write `\"${VAR}\"` in quotes: braces end a plain value there)",
            );
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

/// A line with an unquoted `${` after a `{` or `[`: not a plain YAML value
/// in a flow collection.
fn unquoted_in_flow(line: &str) -> bool {
    line.match_indices("${").any(|(i, _)| {
        let before = &line[..i];
        before.contains(['{', '[']) && !before.ends_with(['"', '\''])
    })
}

/// Parse a duration such as `250ms`, `5s`, `2m`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        format!("`{s}` is not a duration ({e}); expected for example `250ms`, `5s`, `2m`")
    })
}
