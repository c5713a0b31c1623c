//! The JSON Lines sink: appends one line per delivery to a file.
//!
//! A batch is written with one `write_all` and made durable with
//! `sync_data` before `write` returns `Ok`. If the write fails the file is
//! cut back to its length before the batch, and on open a partial last line
//! (left by a crash mid-write) is removed, so the file only ever holds
//! whole lines.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use serde_json::json;

use crate::sink::{Delivery, Sink, SinkError};

pub struct JsonlSink {
    path: PathBuf,
    envelope: bool,
    file: Arc<Mutex<File>>,
}

impl JsonlSink {
    /// Open `path` for appending, creating it and its folders; repair a
    /// partial last line.
    pub fn open(
        cfg: &weft_core::config::raw::JsonlSinkConfig,
        path: &Path,
    ) -> Result<Self, String> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create folder {}: {e}", dir.display()))?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        repair_partial_line(&mut file)
            .map_err(|e| format!("cannot repair {}: {e}", path.display()))?;
        Ok(JsonlSink {
            path: path.to_owned(),
            envelope: cfg.envelope,
            file: Arc::new(Mutex::new(file)),
        })
    }

    fn line(&self, d: &Delivery, out: &mut Vec<u8>) {
        let written = if self.envelope {
            let v = json!({
                "id": d.event_id,
                "idempotency_key": d.idempotency_key,
                "correlation_id": d.correlation_id,
                "data": d.payload,
            });
            serde_json::to_writer(&mut *out, &v)
        } else {
            serde_json::to_writer(&mut *out, &d.payload)
        };
        // writing a Value into a Vec cannot fail; keep the file whole if it ever does
        if written.is_err() {
            out.extend_from_slice(b"null");
        }
        out.push(b'\n');
    }
}

/// Truncate everything after the last newline (a line cut by a crash).
fn repair_partial_line(file: &mut File) -> std::io::Result<()> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    let mut end = len;
    let mut buf = vec![0u8; 64 * 1024];
    // the last byte decides whether anything is to be done
    file.seek(SeekFrom::Start(len - 1))?;
    let mut last = [0u8; 1];
    file.read_exact(&mut last)?;
    if last[0] == b'\n' {
        return Ok(());
    }
    let keep = loop {
        if end == 0 {
            break 0;
        }
        let start = end.saturating_sub(buf.len() as u64);
        let n = (end - start) as usize;
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut buf[..n])?;
        if let Some(p) = buf[..n].iter().rposition(|&b| b == b'\n') {
            break start + p as u64 + 1;
        }
        end = start;
    };
    tracing::warn!(
        removed_bytes = len - keep,
        "jsonl sink: removed a partial last line left by an interrupted write"
    );
    file.set_len(keep)?;
    file.sync_data()?;
    Ok(())
}

fn append(file: &mut File, data: &[u8]) -> std::io::Result<()> {
    let before = file.metadata()?.len();
    let res = file.write_all(data).and_then(|_| file.sync_data());
    if res.is_err() {
        // take back whatever part of the batch made it in
        let _ = file.set_len(before);
    }
    res
}

impl Sink for JsonlSink {
    fn write<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Result<(), SinkError>>> {
        Box::pin(async move {
            if batch.is_empty() {
                return Vec::new();
            }
            let mut data = Vec::with_capacity(batch.len() * 256);
            for d in batch {
                self.line(d, &mut data);
            }
            let file = self.file.clone();
            let res = tokio::task::spawn_blocking(move || {
                let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
                append(&mut f, &data)
            })
            .await;
            match res {
                Ok(Ok(())) => batch.iter().map(|_| Ok(())).collect(),
                Ok(Err(e)) => {
                    let msg = format!("cannot append to {}: {e}", self.path.display());
                    crate::sink::all_failed(batch.len(), || SinkError::retryable(msg.clone()))
                }
                Err(e) => crate::sink::all_failed(batch.len(), || {
                    SinkError::retryable(format!("jsonl writer task failed: {e}"))
                }),
            }
        })
    }
}
