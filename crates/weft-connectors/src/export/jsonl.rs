//! JSON Lines: one JSON value per line, the bare payload or, with
//! `envelope: true`, a CloudEvent in the JSON format (structured mode):
//! `{specversion, id, source, type, time, subject?, correlationid,
//! causationid, datacontenttype, data}`, with `id` the write's idempotency
//! key and `data` the payload (see [`weft_core::event::Outbound`]).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use weft_core::config::ExportTarget;
use weft_core::config::raw::JsonlSinkConfig;

use super::{ExportSink, Format};
use crate::sink::Delivery;

/// The JSON Lines sink.
pub type JsonlSink = ExportSink<Jsonl>;

impl ExportSink<Jsonl> {
    /// Open a JSON Lines sink writing to `target`.
    pub fn open(cfg: &JsonlSinkConfig, target: &ExportTarget) -> Result<Self, String> {
        ExportSink::new(
            Jsonl {
                envelope: cfg.envelope,
            },
            target,
        )
    }
}

/// The JSON Lines format.
pub struct Jsonl {
    envelope: bool,
}

impl Format for Jsonl {
    type FileState = ();

    fn ext(&self) -> &'static str {
        "jsonl"
    }

    fn begin(&self, _first: &Delivery) -> Result<((), Vec<u8>), String> {
        Ok(((), Vec::new()))
    }

    fn resume(&self, _path: &Path) -> std::io::Result<()> {
        Ok(())
    }

    fn encode(&self, _st: &(), d: &Delivery, out: &mut Vec<u8>) -> Result<(), String> {
        let written = if self.envelope {
            let v = crate::http::outbound(d).structured(&d.payload);
            serde_json::to_writer(&mut *out, &v)
        } else {
            serde_json::to_writer(&mut *out, &d.payload)
        };
        written.map_err(|e| format!("cannot encode the payload as JSON: {e}"))?;
        out.push(b'\n');
        Ok(())
    }

    /// Everything up to the last newline.
    fn whole_prefix(&self, file: &mut File) -> std::io::Result<(u64, bool)> {
        let len = file.metadata()?.len();
        let mut buf = vec![0u8; 64 * 1024];
        let mut end = len;
        while end > 0 {
            let start = end.saturating_sub(buf.len() as u64);
            let n = (end - start) as usize;
            file.seek(SeekFrom::Start(start))?;
            file.read_exact(&mut buf[..n])?;
            if let Some(p) = buf[..n].iter().rposition(|&b| b == b'\n') {
                let keep = start + p as u64 + 1;
                return Ok((keep, true));
            }
            end = start;
        }
        Ok((0, false))
    }
}
