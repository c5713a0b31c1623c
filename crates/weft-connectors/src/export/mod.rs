//! Export sinks: records written to files, as JSON Lines or CSV.
//!
//! Two places to write to:
//!
//! - **One file** (`path`): appended to. On open, a partial last record
//!   left by a crash mid-write is cut off.
//! - **Rotating files** (`dir`): `<prefix>-<UTC time>-<seq>.<ext>` are
//!   written as `<name>.<ext>.part` and renamed to their final name once
//!   complete: when the next batch would take the file over
//!   `rotate.max_bytes`, when it is `rotate.max_age` old, when nothing was
//!   written to it for `rotate.idle`, and on shutdown ([`Sink::flush`]) or
//!   when the sink is dropped. A rename is atomic, so whoever watches the
//!   folder sees whole files only (and weft's own file source ignores
//!   `*.part`). On open, `.part` files left by a crash are cut back to
//!   their last whole record and renamed (or removed when they hold none).
//!
//! Delivery contract (see [`Sink`]): a batch is encoded, written with one
//! `write_all` and made durable with `sync_data` before `write` returns
//! `Ok`; a new file's folder entry is synced too. A failed write is cut
//! back, so files only ever hold whole records. Duplicates are possible,
//! as with every sink: a write that reached the disk but whose delivery was
//! not yet marked done when weft crashed is written again after the restart
//! (with the same idempotency key, which the JSON Lines `envelope` carries).
//!
//! Writes are serialised by a mutex and done on a blocking thread.

pub mod csv;
pub mod jsonl;

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use weft_core::config::{ExportTarget, RotatePolicy};

use crate::sink::{Delivery, Sink, SinkError, WriteResult};

pub use self::csv::CsvSink;
pub use self::jsonl::JsonlSink;

/// What a file format contributes to an export sink.
pub trait Format: Send + 'static {
    /// Per-file state, e.g. the columns of a CSV file.
    type FileState: Send;
    /// File name extension, without the dot.
    fn ext(&self) -> &'static str;
    /// Start a new file with `first` as its first record: the file's state
    /// and the bytes it starts with (a header row). `Err`: `first` cannot
    /// start a file (it is dead-lettered with this reason).
    fn begin(&self, first: &Delivery) -> Result<(Self::FileState, Vec<u8>), String>;
    /// The state of an existing, non-empty file appended to (one-file mode).
    fn resume(&self, path: &Path) -> std::io::Result<Self::FileState>;
    /// Append one record to `out`. `Err`: this delivery cannot be written
    /// in this format (it is dead-lettered with this reason).
    fn encode(&self, st: &Self::FileState, d: &Delivery, out: &mut Vec<u8>) -> Result<(), String>;
    /// The longest prefix of `file` made of whole records (and header), and
    /// whether it holds at least one record.
    fn whole_prefix(&self, file: &mut File) -> std::io::Result<(u64, bool)>;
}

/// A sink writing `F` records to files.
pub struct ExportSink<F: Format> {
    inner: Arc<Mutex<Inner<F>>>,
    /// For messages.
    place: String,
}

struct Inner<F: Format> {
    fmt: F,
    target: Target,
    current: Option<Current<F::FileState>>,
}

enum Target {
    File,
    Dir {
        dir: PathBuf,
        prefix: String,
        rotate: RotatePolicy,
        /// Sequence number of the last file started.
        seq: u64,
    },
}

/// The file being written.
struct Current<S> {
    file: File,
    path: PathBuf,
    /// `None` until the first record (and header) is written.
    state: Option<S>,
    len: u64,
    records: u64,
    opened: Instant,
    last_write: Instant,
}

impl<F: Format> ExportSink<F> {
    /// Open the target: create folders, repair a partial last record, and
    /// (rotating files) complete `.part` files left by an earlier run. In a
    /// tokio runtime, a task closes rotating files on `max_age` and `idle`.
    pub fn new(fmt: F, target: &ExportTarget) -> Result<Self, String> {
        let (target, current, place) = match target {
            ExportTarget::File(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| format!("cannot create folder {}: {e}", dir.display()))?;
                }
                let cur = open_one(&fmt, path)
                    .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
                (Target::File, Some(cur), path.display().to_string())
            }
            ExportTarget::Dir {
                dir,
                prefix,
                rotate,
            } => {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("cannot create folder {}: {e}", dir.display()))?;
                let seq = recover_dir(&fmt, dir, prefix)
                    .map_err(|e| format!("cannot recover files in {}: {e}", dir.display()))?;
                (
                    Target::Dir {
                        dir: dir.clone(),
                        prefix: prefix.clone(),
                        rotate: rotate.clone(),
                        seq,
                    },
                    None,
                    dir.display().to_string(),
                )
            }
        };
        let timer = match &target {
            Target::Dir { rotate, .. } => Some(rotate.max_age.min(rotate.idle)),
            Target::File => None,
        };
        let inner = Arc::new(Mutex::new(Inner {
            fmt,
            target,
            current,
        }));
        if let (Some(limit), Ok(rt)) = (timer, tokio::runtime::Handle::try_current()) {
            rt.spawn(close_when_due(Arc::downgrade(&inner), limit));
        }
        Ok(ExportSink { inner, place })
    }

    /// Complete the file being written (rotating files: rename it to its
    /// final name); one-file mode: sync it.
    pub fn close_current(&self) -> std::io::Result<()> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.close()
    }
}

/// Open (or create) the one file, cut a partial last record, and read back
/// its state when it has records.
fn open_one<F: Format>(fmt: &F, path: &Path) -> std::io::Result<Current<F::FileState>> {
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)?;
    let len = repair(fmt, &mut file, path)?.0;
    let state = if len > 0 {
        Some(fmt.resume(path)?)
    } else {
        None
    };
    Ok(Current {
        file,
        path: path.to_owned(),
        state,
        len,
        records: 0,
        opened: Instant::now(),
        last_write: Instant::now(),
    })
}

/// Cut `file` back to its whole records; returns its new length and
/// whether it holds a record.
fn repair<F: Format>(fmt: &F, file: &mut File, path: &Path) -> std::io::Result<(u64, bool)> {
    let len = file.metadata()?.len();
    let (keep, any) = fmt.whole_prefix(file)?;
    if keep < len {
        tracing::warn!(
            file = %path.display(),
            removed_bytes = len - keep,
            "export sink: removed a partial last record left by an interrupted write"
        );
        file.set_len(keep)?;
        file.sync_data()?;
    }
    file.seek(SeekFrom::End(0))?;
    Ok((keep, any))
}

/// Complete every `<prefix>-*.<ext>.part` in `dir` left by an earlier run;
/// returns the highest sequence number of the prefix's files.
fn recover_dir<F: Format>(fmt: &F, dir: &Path, prefix: &str) -> std::io::Result<u64> {
    let ext = fmt.ext();
    let mut seq = 0;
    let mut changed = false;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let Some(s) = parse_name(&name, prefix, ext) else {
            continue;
        };
        seq = seq.max(s);
        let Some(final_name) = name.strip_suffix(".part") else {
            continue;
        };
        let path = entry.path();
        let mut file = OpenOptions::new().read(true).write(true).open(&path)?;
        let (_, any) = repair(fmt, &mut file, &path)?;
        drop(file);
        if any {
            std::fs::rename(&path, dir.join(final_name))?;
            tracing::info!(
                file = final_name,
                "export sink: completed a file left by an earlier run"
            );
        } else {
            std::fs::remove_file(&path)?;
        }
        changed = true;
    }
    if changed {
        sync_dir(dir)?;
    }
    Ok(seq)
}

/// The sequence number of `<prefix>-<time>-<seq>.<ext>[.part]`.
fn parse_name(name: &str, prefix: &str, ext: &str) -> Option<u64> {
    let rest = name.strip_prefix(prefix)?.strip_prefix('-')?;
    let rest = rest.strip_suffix(".part").unwrap_or(rest);
    let stem = rest.strip_suffix(ext)?.strip_suffix('.')?;
    let (time, seq) = stem.rsplit_once('-')?;
    let time_ok = time.len() == 16 && time.ends_with('Z') && time.as_bytes()[8] == b'T';
    if !time_ok || seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    seq.parse().ok()
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl<F: Format> Inner<F> {
    /// A file to write to: the current one, or a new part file.
    fn current(&mut self) -> std::io::Result<&mut Current<F::FileState>> {
        if self.current.is_none() {
            let Target::Dir {
                dir, prefix, seq, ..
            } = &mut self.target
            else {
                return Err(std::io::Error::other("the output file is not open"));
            };
            let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
            let ext = self.fmt.ext();
            let (file, path) = loop {
                *seq += 1;
                let name = format!("{prefix}-{stamp}-{seq:06}.{ext}");
                if dir.join(&name).exists() {
                    continue;
                }
                let path = dir.join(format!("{name}.part"));
                match OpenOptions::new()
                    .read(true)
                    .append(true)
                    .create_new(true)
                    .open(&path)
                {
                    Ok(f) => break (f, path),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(e),
                }
            };
            // the new name must survive a power loss like the data in it
            sync_dir(dir)?;
            let now = Instant::now();
            self.current = Some(Current {
                file,
                path,
                state: None,
                len: 0,
                records: 0,
                opened: now,
                last_write: now,
            });
        }
        self.current
            .as_mut()
            .ok_or_else(|| std::io::Error::other("no output file"))
    }

    /// Rotating files: close the current file if a limit says so.
    fn close_if_due(&mut self, now: Instant) -> std::io::Result<()> {
        let Target::Dir { rotate, .. } = &self.target else {
            return Ok(());
        };
        // (a file without records, whose first deliveries were all refused, is removed)
        let due = self.current.as_ref().is_some_and(|c| {
            c.len >= rotate.max_bytes
                || now.duration_since(c.opened) >= rotate.max_age
                || now.duration_since(c.last_write) >= rotate.idle
        });
        if due { self.close() } else { Ok(()) }
    }

    /// Complete the current file: sync it; rotating files: rename it to
    /// its final name and sync the folder.
    fn close(&mut self) -> std::io::Result<()> {
        let Target::Dir { dir, .. } = &self.target else {
            if let Some(c) = &self.current {
                c.file.sync_all()?;
            }
            return Ok(());
        };
        let Some(c) = self.current.take() else {
            return Ok(());
        };
        if c.records == 0 {
            // nothing was written (a refused first record): leave no file behind
            drop(c.file);
            std::fs::remove_file(&c.path)?;
            return sync_dir(dir);
        }
        c.file.sync_all()?;
        drop(c.file);
        let final_path = c.path.with_extension("");
        std::fs::rename(&c.path, &final_path)?;
        sync_dir(dir)?;
        tracing::debug!(file = %final_path.display(), records = c.records, bytes = c.len, "export sink: file complete");
        Ok(())
    }

    /// Write a batch; one result per delivery.
    fn write(&mut self, batch: &[Delivery], place: &str) -> Vec<Result<(), SinkError>> {
        let mut results: Vec<Option<Result<(), SinkError>>> =
            (0..batch.len()).map(|_| None).collect();
        let max_bytes = match &self.target {
            Target::Dir { rotate, .. } => rotate.max_bytes,
            Target::File => u64::MAX,
        };
        let mut i = 0;
        let failure = 'batch: {
            if let Err(e) = self.close_if_due(Instant::now()) {
                tracing::error!(folder = place, error = %e, "export sink: cannot complete a file");
            }
            while i < batch.len() {
                if let Err(e) = self.current() {
                    break 'batch Some(format!("cannot create a file in {place}: {e}"));
                }
                let fmt = &self.fmt;
                let Some(cur) = self.current.as_mut() else {
                    break 'batch Some(format!("no file open in {place}"));
                };
                let mut buf = Vec::with_capacity(256 * (batch.len() - i));
                let begun_now = cur.state.is_none();
                if begun_now {
                    match fmt.begin(&batch[i]) {
                        Ok((st, head)) => {
                            cur.state = Some(st);
                            buf.extend_from_slice(&head);
                        }
                        Err(e) => {
                            results[i] = Some(Err(SinkError::permanent(e)));
                            i += 1;
                            continue;
                        }
                    }
                }
                let Some(st) = cur.state.as_ref() else {
                    break 'batch Some("internal: file state missing".into());
                };
                let mut written = Vec::new();
                let mut full = false;
                while i < batch.len() {
                    let mark = buf.len();
                    match fmt.encode(st, &batch[i], &mut buf) {
                        Ok(()) => {
                            let has_one = cur.records > 0 || !written.is_empty();
                            if has_one && cur.len + buf.len() as u64 > max_bytes {
                                // this one goes to the next file
                                buf.truncate(mark);
                                full = true;
                                break;
                            }
                            written.push(i);
                        }
                        Err(e) => {
                            buf.truncate(mark);
                            results[i] = Some(Err(SinkError::permanent(e)));
                        }
                    }
                    i += 1;
                }
                if written.is_empty() {
                    if begun_now {
                        cur.state = None;
                    }
                } else {
                    if let Err(e) = append(&mut cur.file, cur.len, &buf) {
                        if begun_now {
                            cur.state = None;
                        }
                        break 'batch Some(format!("cannot write to {}: {e}", cur.path.display()));
                    }
                    cur.len += buf.len() as u64;
                    cur.records += written.len() as u64;
                    cur.last_write = Instant::now();
                    for w in written {
                        results[w] = Some(Ok(()));
                    }
                }
                if full && let Err(e) = self.close() {
                    tracing::error!(folder = place, error = %e, "export sink: cannot complete a file");
                    // keep writing into a new file; the old one is completed at the next start
                    self.current = None;
                }
            }
            if let Err(e) = self.close_if_due(Instant::now()) {
                tracing::error!(folder = place, error = %e, "export sink: cannot complete a file");
            }
            None
        };
        results
            .into_iter()
            .map(|r| match r {
                Some(r) => r,
                None => Err(SinkError::retryable(
                    failure.clone().unwrap_or_else(|| "not written".into()),
                )),
            })
            .collect()
    }
}

impl<F: Format> Drop for Inner<F> {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::error!(error = %e, "export sink: cannot complete the last file");
        }
    }
}

/// Append and sync; on failure cut the file back to `len`.
fn append(file: &mut File, len: u64, data: &[u8]) -> std::io::Result<()> {
    let res = file.write_all(data).and_then(|_| file.sync_data());
    if res.is_err() {
        // take back whatever part of the batch made it in
        let _ = file.set_len(len);
    }
    res
}

/// Close rotating files that reached `max_age` or `idle` without a write
/// to notice it. Ends when the sink is gone.
async fn close_when_due<F: Format>(inner: Weak<Mutex<Inner<F>>>, limit: Duration) {
    let tick = (limit / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    loop {
        tokio::time::sleep(tick).await;
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let res = tokio::task::spawn_blocking(move || {
            let mut g = strong.lock().unwrap_or_else(|p| p.into_inner());
            g.close_if_due(Instant::now())
        })
        .await;
        if let Ok(Err(e)) = res {
            tracing::error!(error = %e, "export sink: cannot complete a file");
        }
    }
}

impl<F: Format> Sink for ExportSink<F> {
    fn write<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<WriteResult>> {
        Box::pin(async move {
            let out: Vec<Result<(), SinkError>> = async {
                if batch.is_empty() {
                    return Vec::new();
                }
                let inner = self.inner.clone();
                let owned = batch.to_vec();
                let place = self.place.clone();
                let res = tokio::task::spawn_blocking(move || {
                    let mut g = inner.lock().unwrap_or_else(|p| p.into_inner());
                    g.write(&owned, &place)
                })
                .await;
                match res {
                    Ok(r) => r,
                    Err(e) => crate::sink::all_failed(batch.len(), || {
                        SinkError::retryable(format!("export writer task failed: {e}"))
                    }),
                }
            }
            .await;
            crate::sink::nothing_learned(out)
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            let inner = self.inner.clone();
            let res = tokio::task::spawn_blocking(move || {
                let mut g = inner.lock().unwrap_or_else(|p| p.into_inner());
                g.close()
            })
            .await;
            match res {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(SinkError::retryable(format!(
                    "cannot complete the file in {}: {e}",
                    self.place
                ))
                .with_source(e)),
                Err(e) => Err(SinkError::retryable(format!(
                    "export writer task failed: {e}"
                ))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::parse_name;

    #[test]
    fn names() {
        assert_eq!(
            parse_name("orders-20240501T120000Z-000007.csv", "orders", "csv"),
            Some(7)
        );
        assert_eq!(
            parse_name("orders-20240501T120000Z-000012.csv.part", "orders", "csv"),
            Some(12)
        );
        assert_eq!(parse_name("orders-x-1.csv", "orders", "csv"), None);
        assert_eq!(
            parse_name("orders-20240501T120000Z-000007.jsonl", "orders", "csv"),
            None
        );
        assert_eq!(
            parse_name("ordersx-20240501T120000Z-000007.csv", "orders", "csv"),
            None
        );
    }
}
