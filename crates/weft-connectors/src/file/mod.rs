//! The file source: a drop folder polled for new files, or one file read
//! in place.
//!
//! - **Dir**: every `poll_interval` the folder is listed; a file matching
//!   the pattern (default: the extensions of `format`, or `.csv`, `.jsonl`,
//!   `.ndjson`, `.json`, `.xml`; never dotfiles, `*.tmp`, `*.part`) is
//!   ready once its size and modification time held still for `settle`
//!   (default 10 s, so an upload that pauses is left alone), or, with
//!   `ready_marker: .done`, once `<name>.done` exists. A ready file is
//!   claimed by an atomic rename into `processing/`, opened there once
//!   without following symbolic links, and every pass (hash, check, read)
//!   reads that one descriptor by position, never past the length it had
//!   when opened; if its size or modification time change while it is
//!   read, reading stops and it goes to quarantine with the reason.
//!   Files are read in name order, then moved to `processed/`, or,
//!   when they cannot be read at all (no CSV header, binary), to
//!   `quarantine/` beside a `<name>.error.txt` report; a marker moves with
//!   its file. What is in `processing/` at the start is resumed from its
//!   checkpoint. Runs until shutdown.
//! - **Path**: the one file is read in place (never moved or changed), then
//!   `run` returns.
//!
//! Formats (in `read.rs`, `json_array.rs`, `xml.rs`):
//! - CSV with a header row: each row becomes an object of strings keyed by
//!   the header. Decoded from `encoding` (UTF-8, Latin-1, Windows-1252)
//!   field by field, so byte offsets stay those of the file.
//! - JSON Lines: each non-empty line any JSON value.
//! - JSON arrays: each element of the file's one top-level array.
//! - XML: each element at `record_path`, turned into a JSON value.
//!
//! A record that cannot be read becomes a bad record (file, line or record
//! number, reason) and reading goes on; a file whose structure is broken
//! (no CSV header, malformed XML, unbalanced JSON array) goes to
//! quarantine before any of its records is emitted.
//!
//! Files are streamed, never read whole into memory: a first pass hashes
//! the content, then a reader thread parses batches of `batch_size` records
//! while the previous batch is being ingested. Each batch is ingested with
//! the checkpoint `file:<sha256>` = `{offset, line, done, ...}`, so a
//! restart resumes after the last committed batch and emits no row twice.
//! Record ids are `<first 16 hex digits of the sha256>:<n>`, `n` being the
//! line (CSV, JSON Lines) or the record's ordinal (JSON arrays, XML),
//! unless `id_field` is set; all records of one file share one correlation
//! id.

mod json_array;
mod read;
mod xml;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use weft_core::config::{FileFormat, FileTarget, SourceSpec, TextEncoding};
use weft_core::mapping::Program;

use crate::source::{Batch, Checkpoint, Ingest, IngestError, Source, SourceError};
use read::{Plan, Pos, ReadError, Unreadable};

const DEFAULT_SUFFIXES: &[&str] = &[".csv", ".jsonl", ".ndjson", ".json", ".xml"];

/// Default suffixes of files in `format`.
fn suffixes(format: Option<FileFormat>) -> &'static [&'static str] {
    match format {
        None => DEFAULT_SUFFIXES,
        Some(FileFormat::Csv) => &[".csv"],
        Some(FileFormat::Jsonl) => &[".jsonl", ".ndjson"],
        Some(FileFormat::JsonArray) => &[".json"],
        Some(FileFormat::Xml) => &[".xml"],
    }
}
/// Parsed batches waiting for ingest: one ready while one is being
/// ingested keeps the reader ahead; more only held records in memory.
const READ_AHEAD: usize = 1;
/// Wait before trying again when ingest is not accepting.
const BACKOFF: Duration = Duration::from_millis(200);

pub struct FileSource {
    system: String,
    target: FileTarget,
    format: Option<FileFormat>,
    pattern: Option<String>,
    delimiter: u8,
    encoding: TextEncoding,
    record_path: Arc<[String]>,
    poll_interval: Duration,
    /// Drop folder: how long a file must hold still before it is read.
    settle: Duration,
    /// Drop folder: a file is read once `<name><ready_marker>` exists.
    ready_marker: Option<String>,
    batch_size: usize,
    id_field: Option<Arc<Program>>,
    event_type: String,
    /// Entries of the folder that are not read (a name that is not UTF-8,
    /// a symbolic link), each reported once, not at every poll.
    skipped: std::sync::Mutex<std::collections::HashSet<std::ffi::OsString>>,
}

/// A candidate file as last listed: its state and since when it holds.
#[derive(Debug, Clone, Copy)]
struct Seen {
    len: u64,
    mtime: Option<SystemTime>,
    since: Instant,
}

/// The checkpoint value of one file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct FileCheckpoint {
    /// Byte offset of the next record.
    offset: u64,
    /// Lines consumed before it.
    line: u64,
    /// Records before it (JSON arrays, XML).
    #[serde(default)]
    record: u64,
    /// Every record of the file is ingested.
    done: bool,
    correlation_id: String,
    /// The file's name when it was read (for humans).
    file: String,
}

/// How reading one file ended.
enum Outcome {
    /// Every record ingested.
    Done,
    /// Shutdown requested; the checkpoint holds the position.
    Stopped,
    /// The file cannot be read at all.
    Unreadable(String),
    /// An I/O error (the file vanished, a read failed): try again later.
    Failed(String),
}

/// The next batch of a file, or why there is none.
enum Next {
    /// Prepared for its commit, with the checkpoint after it.
    Ready(crate::source::Staged, FileCheckpoint),
    /// The file is not read on.
    Stop(Outcome),
    /// The ingest is not accepting now: read again from the last commit
    /// after a pause.
    Wait(String),
}

impl FileSource {
    pub fn new(system: &str, spec: &SourceSpec) -> Result<Self, SourceError> {
        let err = |m: String| SourceError {
            system: system.into(),
            message: m,
        };
        let SourceSpec::File {
            cfg,
            target,
            id_field,
            event_type,
            poll_interval,
            batch_size,
            encoding,
            record_path,
            settle,
            ready_marker,
        } = spec
        else {
            return Err(err("not a file source".into()));
        };
        let delimiter = match cfg.delimiter {
            None => b',',
            Some(c) if c.is_ascii() => c as u8,
            Some(c) => {
                return Err(err(format!(
                    "CSV delimiter `{c}` must be a single ASCII character"
                )));
            }
        };
        Ok(FileSource {
            system: system.to_owned(),
            target: target.clone(),
            format: cfg.format,
            pattern: cfg.pattern.clone().filter(|p| !p.trim().is_empty()),
            delimiter,
            encoding: *encoding,
            record_path: record_path.clone().into(),
            poll_interval: *poll_interval,
            settle: *settle,
            ready_marker: ready_marker.clone(),
            batch_size: (*batch_size).max(1),
            id_field: id_field.clone(),
            event_type: event_type.clone(),
            skipped: Default::default(),
        })
    }

    /// Report once that `name` in `dir` is not read, and why.
    fn skip_once(&self, dir: &Path, name: &std::ffi::OsStr, why: &str) {
        let first = self
            .skipped
            .lock()
            .map(|mut s| s.insert(name.to_owned()))
            .unwrap_or(false);
        if first {
            metrics::counter!("weft_files_skipped_total", "source" => self.system.clone())
                .increment(1);
            tracing::warn!(
                source = %self.system,
                file = %dir.join(name).display(),
                "file source: {why}; it is not read (reported once)"
            );
        }
    }

    fn err(&self, message: impl Into<String>) -> SourceError {
        SourceError {
            system: self.system.clone(),
            message: message.into(),
        }
    }

    /// Whether a directory entry's name is a file to read.
    fn wanted(&self, name: &str) -> bool {
        if name.starts_with('.') || name.ends_with(".tmp") || name.ends_with(".part") {
            return false;
        }
        if let Some(m) = &self.ready_marker
            && name.ends_with(m.as_str())
        {
            return false;
        }
        match &self.pattern {
            Some(p) if p.contains(['*', '?']) => glob_match(p.as_bytes(), name.as_bytes()),
            Some(p) => name.ends_with(p.as_str()),
            None => suffixes(self.format)
                .iter()
                .any(|s| name.to_ascii_lowercase().ends_with(s)),
        }
    }

    fn format_of(&self, name: &str) -> Option<FileFormat> {
        if let Some(f) = self.format {
            return Some(f);
        }
        let lower = name.to_ascii_lowercase();
        if lower.ends_with(".csv") {
            Some(FileFormat::Csv)
        } else if lower.ends_with(".jsonl")
            || lower.ends_with(".ndjson")
            || lower.ends_with(".json-lines")
        {
            Some(FileFormat::Jsonl)
        } else if lower.ends_with(".json") {
            Some(FileFormat::JsonArray)
        } else if lower.ends_with(".xml") {
            Some(FileFormat::Xml)
        } else {
            None
        }
    }

    /// Read one file to its end (or to shutdown), ingesting as it goes.
    /// The file is opened once (`follow`: whether a symbolic link is
    /// followed) and every pass reads that descriptor.
    async fn read_file(
        &self,
        path: &Path,
        follow: bool,
        ingest: &Arc<dyn Ingest>,
        shutdown: &CancellationToken,
    ) -> Result<Outcome, SourceError> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        let Some(format) = self.format_of(&name) else {
            return Ok(Outcome::Unreadable(format!(
                "cannot tell the format of `{name}`: set `format` (csv, jsonl, json_array or xml) or use a .csv, .jsonl, .ndjson, .json or .xml name"
            )));
        };
        let p = path.to_owned();
        let opened = tokio::task::spawn_blocking(move || read::open(&p, follow))
            .await
            .map_err(|e| self.err(format!("file open task failed: {e}")))?;
        let (file, stamp) = match opened {
            Ok(Ok((f, st))) => (Arc::new(f), st),
            Ok(Err(Unreadable(why))) => return Ok(Outcome::Unreadable(why)),
            Err(e) => {
                return Ok(Outcome::Failed(format!(
                    "cannot open {}: {e}",
                    path.display()
                )));
            }
        };
        // first pass: content hash and a check that the file is readable at all
        let delimiter = self.delimiter;
        let encoding = self.encoding;
        let stop = shutdown.clone();
        let f = file.clone();
        let checked = tokio::task::spawn_blocking(move || {
            read::hash_and_check(&f, stamp, format, delimiter, encoding, &stop)
        })
        .await
        .map_err(|e| self.err(format!("file check task failed: {e}")))?;
        let (hash, suspect) = match checked {
            Ok(Ok(c)) => (c.hash, c.suspect),
            Ok(Err(Unreadable(why))) => return Ok(Outcome::Unreadable(why)),
            Err(_) if shutdown.is_cancelled() => return Ok(Outcome::Stopped),
            Err(e) => {
                return Ok(Outcome::Failed(format!(
                    "cannot read {}: {e}",
                    path.display()
                )));
            }
        };
        let key = format!("file:{hash}");
        let saved = self.load_checkpoint(ingest, &key, shutdown).await?;
        let mut cp = saved.unwrap_or_else(|| FileCheckpoint {
            offset: 0,
            line: 0,
            record: 0,
            done: false,
            correlation_id: weft_core::event::new_correlation_id(),
            file: name.clone(),
        });
        if cp.done {
            tracing::info!(file = %name, "file source: already read (same content), skipping");
            return Ok(Outcome::Done);
        }
        let plan = Arc::new(Plan {
            file,
            len: stamp.len,
            name: name.clone(),
            format,
            delimiter,
            encoding,
            record_path: self.record_path.clone(),
            short: hash.chars().take(16).collect(),
            correlation_id: cp.correlation_id.clone(),
            source: format!("weft:{}", self.system),
            event_type: self.event_type.clone(),
            id_field: self.id_field.clone(),
            batch_size: self.batch_size,
            suspect,
        });
        // one reader per attempt; after a refused batch, start again from the last commit
        'attempt: loop {
            if shutdown.is_cancelled() {
                return Ok(Outcome::Stopped);
            }
            let (tx, mut rx) = mpsc::channel(READ_AHEAD);
            let start = Pos {
                offset: cp.offset,
                line: cp.line,
                record: cp.record,
            };
            read::spawn_reader(plan.clone(), start, tx)
                .map_err(|e| self.err(format!("cannot start the file reader: {e}")))?;
            // one batch ahead: the next is read and prepared (mapped) while
            // the one before it commits; commits go one after the other, in
            // order, each after the one before returned Ok
            let mut ahead = self
                .next_batch(
                    &mut rx, &plan, &stamp, &cp, &key, format, &name, ingest, shutdown,
                )
                .await?;
            loop {
                let (staged, next_cp) = match ahead {
                    Next::Ready(staged, next_cp) => (staged, next_cp),
                    Next::Stop(o) => return Ok(o),
                    // not accepting now: from the last commit after a pause
                    Next::Wait(why) => {
                        tracing::debug!(file = %name, %why, "file source: ingest not accepting, waiting");
                        drop(rx);
                        tokio::select! {
                            _ = tokio::time::sleep(BACKOFF) => continue 'attempt,
                            _ = shutdown.cancelled() => return Ok(Outcome::Stopped),
                        }
                    }
                };
                let last = next_cp.done;
                let commit = ingest.commit(staged);
                let read = async {
                    if last {
                        None
                    } else {
                        Some(
                            self.next_batch(
                                &mut rx, &plan, &stamp, &next_cp, &key, format, &name, ingest,
                                shutdown,
                            )
                            .await,
                        )
                    }
                };
                let (committed, following) = tokio::join!(commit, read);
                match committed {
                    Ok(_) => cp = next_cp,
                    // what was prepared after it is dropped
                    Err(IngestError::Unavailable(why)) => {
                        ahead = Next::Wait(why);
                        continue;
                    }
                    Err(e) => return Err(self.err(format!("ingest of {name} failed: {e}"))),
                }
                if cp.done {
                    return Ok(Outcome::Done);
                }
                if shutdown.is_cancelled() {
                    return Ok(Outcome::Stopped);
                }
                ahead = match following {
                    Some(next) => next?,
                    None => return Ok(Outcome::Done),
                };
            }
        }
    }

    /// The reader's next batch after `cp`, prepared for its commit, with
    /// the checkpoint it saves; or why the file is not read on.
    #[allow(clippy::too_many_arguments)]
    async fn next_batch(
        &self,
        rx: &mut mpsc::Receiver<Result<read::Parsed, ReadError>>,
        plan: &Plan,
        stamp: &read::Stamp,
        cp: &FileCheckpoint,
        key: &str,
        format: FileFormat,
        name: &str,
        ingest: &Arc<dyn Ingest>,
        shutdown: &CancellationToken,
    ) -> Result<Next, SourceError> {
        let next = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(Next::Stop(Outcome::Stopped)),
            m = rx.recv() => m,
        };
        let parsed = match next {
            Some(Ok(p)) => p,
            Some(Err(ReadError::Io(e))) => return Ok(Next::Stop(Outcome::Failed(e))),
            Some(Err(ReadError::Unreadable(e))) => return Ok(Next::Stop(Outcome::Unreadable(e))),
            None => {
                return Ok(Next::Stop(Outcome::Failed(format!(
                    "the reader of {name} stopped early"
                ))));
            }
        };
        // what is read must be what was hashed: stop before a batch of a
        // file that changed since it was opened
        let changed = stamp
            .changed(&plan.file)
            .unwrap_or_else(|e| Some(format!("cannot stat the open file: {e}")));
        if let Some(why) = changed {
            let at = match format {
                FileFormat::Csv | FileFormat::Jsonl => format!("line {}", cp.line + 1),
                FileFormat::JsonArray | FileFormat::Xml => {
                    format!("record {}", cp.record + 1)
                }
            };
            return Ok(Next::Stop(Outcome::Unreadable(format!(
                "{why}; the records before {at} were ingested, the rest not"
            ))));
        }
        let mut next_cp = cp.clone();
        next_cp.offset = parsed.pos.offset;
        next_cp.line = parsed.pos.line;
        next_cp.record = parsed.pos.record;
        next_cp.done = parsed.done;
        let value = serde_json::to_string(&next_cp)
            .map_err(|e| self.err(format!("cannot encode checkpoint: {e}")))?;
        let batch = Batch {
            records: parsed.records,
            checkpoint: Some(Checkpoint {
                key: key.to_owned(),
                value,
            }),
        };
        match ingest.prepare(batch).await {
            Ok(staged) => Ok(Next::Ready(staged, next_cp)),
            // refused at the door (backpressure, stopping): the commit
            // before it stands; this batch is read again after a pause
            Err(IngestError::Unavailable(why)) => Ok(Next::Wait(why)),
            Err(e) => Err(self.err(format!("ingest of {name} failed: {e}"))),
        }
    }

    /// The saved checkpoint; `Ok(None)` when there is none. Waits while the
    /// store is unavailable.
    async fn load_checkpoint(
        &self,
        ingest: &Arc<dyn Ingest>,
        key: &str,
        shutdown: &CancellationToken,
    ) -> Result<Option<FileCheckpoint>, SourceError> {
        loop {
            match ingest.checkpoint(key).await {
                Ok(None) => return Ok(None),
                Ok(Some(v)) => {
                    return serde_json::from_str(&v)
                        .map(Some)
                        .map_err(|e| self.err(format!("bad checkpoint `{key}` = `{v}`: {e}")));
                }
                Err(IngestError::Unavailable(_)) => {
                    tokio::select! {
                        _ = tokio::time::sleep(BACKOFF) => {}
                        _ = shutdown.cancelled() => return Ok(None),
                    }
                }
                Err(e) => return Err(self.err(format!("cannot read checkpoint `{key}`: {e}"))),
            }
        }
    }

    async fn run_path(
        &self,
        path: &Path,
        ingest: Arc<dyn Ingest>,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        // the one configured file: a symbolic link to it is followed
        match self.read_file(path, true, &ingest, &shutdown).await? {
            Outcome::Done | Outcome::Stopped => Ok(()),
            Outcome::Unreadable(why) => {
                Err(self.err(format!("cannot read {}: {why}", path.display())))
            }
            Outcome::Failed(why) => Err(self.err(why)),
        }
    }

    /// The drop folder. A ready file is first claimed by an atomic rename
    /// into `processing/` (so nothing else reads or replaces it under that
    /// name), then read, then moved to `processed/` or `quarantine/`. What
    /// is in `processing/` at the start (a crash, a read that failed) is
    /// resumed first, from its checkpoint.
    async fn run_dir(
        &self,
        dir: &Path,
        ingest: Arc<dyn Ingest>,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        let processing = dir.join("processing");
        let processed = dir.join("processed");
        let quarantine = dir.join("quarantine");
        for d in [&processing, &processed, &quarantine] {
            tokio::fs::create_dir_all(d)
                .await
                .map_err(|e| self.err(format!("cannot create {}: {e}", d.display())))?;
        }
        let mut seen: HashMap<String, Seen> = HashMap::new();
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            // claimed before: resume them, in name order
            let claimed = match self.claimed(&processing).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(dir = %processing.display(), error = %e, "file source: cannot list the folder");
                    Vec::new()
                }
            };
            for name in claimed {
                if shutdown.is_cancelled() {
                    return Ok(());
                }
                if !self.handle(dir, &name, &ingest, &shutdown).await? {
                    return Ok(());
                }
            }
            let ready = match self.poll(dir, &mut seen).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "file source: cannot list the folder");
                    Vec::new()
                }
            };
            for name in ready {
                if shutdown.is_cancelled() {
                    return Ok(());
                }
                seen.remove(&name);
                let to = processing.join(&name);
                if tokio::fs::symlink_metadata(&to).await.is_ok() {
                    // a file of that name is still being read (it failed): later
                    tracing::debug!(file = %name, "file source: a file of that name is in processing/, waiting");
                    continue;
                }
                match tokio::fs::rename(dir.join(&name), &to).await {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => {
                        tracing::warn!(file = %name, error = %e, "file source: cannot claim (move to processing/), will try again");
                        continue;
                    }
                }
                if let Some(m) = &self.ready_marker {
                    let marker = format!("{name}{m}");
                    move_if_there(&dir.join(&marker), &processing.join(&marker)).await;
                }
                if !self.handle(dir, &name, &ingest, &shutdown).await? {
                    return Ok(());
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.poll_interval) => {}
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
    }

    /// Names of the files in `processing/` (not markers), in name order.
    async fn claimed(&self, processing: &Path) -> std::io::Result<Vec<String>> {
        let mut out = Vec::new();
        let mut entries = tokio::fs::read_dir(processing).await?;
        while let Some(e) = entries.next_entry().await? {
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            if self
                .ready_marker
                .as_ref()
                .is_some_and(|m| name.ends_with(m.as_str()))
            {
                continue;
            }
            out.push(name);
        }
        out.sort();
        Ok(out)
    }

    /// Read `processing/<name>` and move it (and its marker) on. `false`:
    /// shutdown.
    async fn handle(
        &self,
        dir: &Path,
        name: &str,
        ingest: &Arc<dyn Ingest>,
        shutdown: &CancellationToken,
    ) -> Result<bool, SourceError> {
        let path = dir.join("processing").join(name);
        let marker = self.ready_marker.as_ref().map(|m| format!("{name}{m}"));
        if let Some(m) = &marker
            && tokio::fs::symlink_metadata(dir.join(name)).await.is_err()
        {
            // a crash between claiming the file and moving its marker
            move_if_there(&dir.join(m), &dir.join("processing").join(m)).await;
        }
        match self.read_file(&path, false, ingest, shutdown).await? {
            Outcome::Stopped => return Ok(false),
            Outcome::Failed(why) => {
                tracing::warn!(file = %name, error = %why, "file source: read failed, will try again");
            }
            Outcome::Done => {
                let processed = dir.join("processed");
                let to = free_name(&processed, name);
                if let Err(e) = tokio::fs::rename(&path, &to).await {
                    tracing::error!(file = %path.display(), error = %e, "file source: cannot move to processed/");
                } else {
                    tracing::info!(file = %name, "file source: read, moved to processed/");
                }
                if let Some(m) = &marker {
                    move_if_there(&dir.join("processing").join(m), &free_name(&processed, m)).await;
                }
            }
            Outcome::Unreadable(why) => {
                tracing::warn!(file = %name, reason = %why, "file source: cannot read, moved to quarantine/");
                let quarantine = dir.join("quarantine");
                let to = free_name(&quarantine, name);
                let report = to.with_file_name(format!(
                    "{}.error.txt",
                    to.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default()
                ));
                let text = format!(
                    "file: {name}\nsource: {}\ntime: {}\nerror: {why}\n",
                    self.system,
                    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                );
                if let Err(e) = tokio::fs::write(&report, text).await {
                    tracing::error!(file = %report.display(), error = %e, "file source: cannot write the error report");
                }
                if let Err(e) = tokio::fs::rename(&path, &to).await {
                    tracing::error!(file = %path.display(), error = %e, "file source: cannot move to quarantine/");
                }
                if let Some(m) = &marker {
                    move_if_there(&dir.join("processing").join(m), &free_name(&quarantine, m))
                        .await;
                }
            }
        }
        Ok(true)
    }

    /// List the folder; return, in name order, the files that are ready:
    /// with `ready_marker`, those whose marker exists; else those whose
    /// size and modification time held still for `settle` (and at least
    /// from one poll to the next).
    async fn poll(
        &self,
        dir: &Path,
        seen: &mut HashMap<String, Seen>,
    ) -> std::io::Result<Vec<String>> {
        let at = Instant::now();
        let mut now: HashMap<String, Seen> = HashMap::new();
        let mut markers = std::collections::HashSet::new();
        let mut entries = tokio::fs::read_dir(dir).await?;
        while let Some(e) = entries.next_entry().await? {
            let name = match e.file_name().into_string() {
                Ok(n) => n,
                Err(raw) => {
                    if self.wanted(&raw.to_string_lossy()) {
                        self.skip_once(
                            dir,
                            &raw,
                            "the file name is not valid UTF-8 (rename it to read it)",
                        );
                    }
                    continue;
                }
            };
            if let Some(m) = &self.ready_marker
                && let Some(base) = name.strip_suffix(m.as_str())
            {
                markers.insert(base.to_owned());
                continue;
            }
            if !self.wanted(&name) {
                continue;
            }
            // not followed: a symbolic link is not a file to read
            let Ok(meta) = e.metadata().await else {
                continue;
            };
            if meta.file_type().is_symlink() {
                self.skip_once(
                    dir,
                    std::ffi::OsStr::new(&name),
                    "a symbolic link is not followed (copy or move the file itself into the folder)",
                );
                continue;
            }
            if !meta.is_file() {
                continue;
            }
            let (len, mtime) = (meta.len(), meta.modified().ok());
            let since = match seen.get(&name) {
                Some(s) if s.len == len && s.mtime == mtime => s.since,
                _ => at,
            };
            now.insert(name, Seen { len, mtime, since });
        }
        let mut ready: Vec<String> = now
            .iter()
            .filter(|(name, s)| match &self.ready_marker {
                Some(_) => markers.contains(*name),
                None => s.since < at && at.duration_since(s.since) >= self.settle,
            })
            .map(|(name, _)| name.clone())
            .collect();
        ready.sort();
        *seen = now;
        Ok(ready)
    }
}

/// Move `from` to `to` if `from` exists (a marker file); failures are logged.
async fn move_if_there(from: &Path, to: &Path) {
    match tokio::fs::rename(from, to).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(file = %from.display(), error = %e, "file source: cannot move the ready marker");
        }
    }
}

/// Read `bytes` as one file of `format` the way the source reads a file
/// (opened once, the check pass, then every record in batches), without a
/// store: the entry point of the fuzz targets (`fuzz/`). `Ok(Err(why))`:
/// the file would go to quarantine. What must hold for any input: it
/// returns (no panic, no stack overflow, no hang).
#[doc(hidden)]
pub fn read_bytes(
    format: FileFormat,
    record_path: &[String],
    bytes: &[u8],
) -> std::io::Result<Result<Vec<crate::source::Record>, String>> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("weft-read-bytes-{}-{n}", std::process::id()));
    std::fs::write(&path, bytes)?;
    let opened = read::open(&path, false);
    // the descriptor stays valid without the name
    let _ = std::fs::remove_file(&path);
    let (file, stamp) = match opened? {
        Ok(x) => x,
        Err(Unreadable(why)) => return Ok(Err(why)),
    };
    let file = Arc::new(file);
    let stop = CancellationToken::new();
    let checked = match read::hash_and_check(&file, stamp, format, b',', TextEncoding::Utf8, &stop)?
    {
        Ok(c) => c,
        Err(Unreadable(why)) => return Ok(Err(why)),
    };
    let plan = Arc::new(Plan {
        file,
        len: stamp.len,
        name: "input".into(),
        format,
        delimiter: b',',
        encoding: TextEncoding::Utf8,
        record_path: record_path.into(),
        short: checked.hash.chars().take(16).collect(),
        correlation_id: "read-bytes".into(),
        source: "weft:read-bytes".into(),
        event_type: "read-bytes".into(),
        id_field: None,
        batch_size: 100,
        suspect: checked.suspect,
    });
    let (tx, mut rx) = mpsc::channel(READ_AHEAD);
    read::spawn_reader(plan, Pos::default(), tx)?;
    let mut out = Vec::new();
    while let Some(m) = rx.blocking_recv() {
        match m {
            Ok(p) => {
                out.extend(p.records);
                if p.done {
                    return Ok(Ok(out));
                }
            }
            Err(ReadError::Io(e)) => return Err(std::io::Error::other(e)),
            Err(ReadError::Unreadable(why)) => return Ok(Err(why)),
        }
    }
    Err(std::io::Error::other("the reader stopped early"))
}

/// `dir/name`, or `dir/name.<n>` when that is taken.
fn free_name(dir: &Path, name: &str) -> PathBuf {
    let first = dir.join(name);
    if !first.exists() {
        return first;
    }
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3f");
    (1..)
        .map(|n| dir.join(format!("{name}.{stamp}-{n}")))
        .find(|p| !p.exists())
        .unwrap_or(first)
}

/// `*` any run of characters, `?` one character, the rest literal.
fn glob_match(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(sp) = star {
            pi = sp + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

impl Source for FileSource {
    fn run(
        self: Box<Self>,
        ingest: Arc<dyn Ingest>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            match self.target.clone() {
                FileTarget::Path(p) => self.run_path(&p, ingest, shutdown).await,
                FileTarget::Dir(d) => self.run_dir(&d, ingest, shutdown).await,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn glob() {
        assert!(glob_match(b"*.csv", b"a.csv"));
        assert!(glob_match(b"orders-*.jsonl", b"orders-2024.jsonl"));
        assert!(!glob_match(b"orders-*.jsonl", b"order-2024.jsonl"));
        assert!(glob_match(b"a?c", b"abc"));
        assert!(!glob_match(b"*.csv", b"a.csv.bak"));
    }
}
