//! The `generate` source: synthetic records from a jq template, for demos,
//! load tests and benchmarks.
//!
//! Record `n` (from 1) is the template's output with `$seq = n`; its event
//! id is `n`, so a restart continues after the last committed record and
//! never emits a sequence number twice.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use weft_core::Event;
use weft_core::config::SourceSpec;
use weft_core::mapping::Program;

use crate::source::{BadRecord, Batch, Checkpoint, Ingest, Record, Source, SourceError};

const CHECKPOINT_KEY: &str = "seq";

pub struct GenerateSource {
    system: String,
    template: Arc<Program>,
    event_type: String,
    rate: Option<f64>,
    count: Option<u64>,
    batch_size: usize,
}

impl GenerateSource {
    pub fn new(system: &str, spec: &SourceSpec) -> Result<Self, SourceError> {
        let SourceSpec::Generate {
            cfg,
            template,
            event_type,
            batch_size,
        } = spec
        else {
            return Err(SourceError {
                system: system.into(),
                message: "not a generate source".into(),
            });
        };
        Ok(GenerateSource {
            system: system.to_owned(),
            template: template.clone(),
            event_type: event_type.clone(),
            rate: cfg.rate,
            count: cfg.count,
            batch_size: *batch_size,
        })
    }

    fn record(&self, seq: u64) -> Record {
        let source = format!("weft:{}", self.system);
        let mut event = Event::new(
            seq.to_string(),
            source,
            self.event_type.clone(),
            None,
            serde_json::Value::Null,
        );
        match self
            .template
            .run_one(serde_json::Value::Null, event.attributes(), &[seq.into()])
        {
            Ok(data) => {
                event.data = data;
                Record::Good(event)
            }
            Err(e) => Record::Bad(BadRecord {
                id: seq.to_string(),
                location: format!("generate template, $seq = {seq}"),
                raw: String::new(),
                error: e.to_string(),
                correlation_id: event.correlationid,
            }),
        }
    }
}

impl Source for GenerateSource {
    fn run(
        self: Box<Self>,
        ingest: Arc<dyn Ingest>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            let err = |m: String| SourceError {
                system: self.system.clone(),
                message: m,
            };
            let last: u64 = match ingest
                .checkpoint(CHECKPOINT_KEY)
                .await
                .map_err(|e| err(e.to_string()))?
            {
                Some(v) => v
                    .parse()
                    .map_err(|_| err(format!("bad checkpoint `{v}`")))?,
                None => 0,
            };
            let mut next = last + 1;
            let started = Instant::now();
            let first = next;
            // at a set rate, commit about ten times a second
            let batch_size = match self.rate {
                Some(r) => ((r / 10.0).ceil() as usize).clamp(1, self.batch_size),
                None => self.batch_size,
            };
            loop {
                if shutdown.is_cancelled() {
                    return Ok(());
                }
                let remaining = self.count.map(|c| c.saturating_sub(next - 1));
                if remaining == Some(0) {
                    return Ok(());
                }
                let n = remaining.map_or(batch_size, |r| (r as usize).min(batch_size));
                if let Some(rate) = self.rate {
                    // when the last record of this batch is due
                    let due = Duration::from_secs_f64((next - first + n as u64) as f64 / rate);
                    let now = started.elapsed();
                    if due > now {
                        tokio::select! {
                            _ = tokio::time::sleep(due - now) => {}
                            _ = shutdown.cancelled() => return Ok(()),
                        }
                    }
                }
                let records: Vec<Record> =
                    (next..next + n as u64).map(|s| self.record(s)).collect();
                let end = next + n as u64 - 1;
                let batch = Batch {
                    records,
                    checkpoint: Some(Checkpoint {
                        key: CHECKPOINT_KEY.into(),
                        value: end.to_string(),
                    }),
                };
                match ingest.ingest(batch).await {
                    Ok(_) => next = end + 1,
                    Err(crate::source::IngestError::Unavailable(_)) => {
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                            _ = shutdown.cancelled() => return Ok(()),
                        }
                    }
                    Err(e) => return Err(err(e.to_string())),
                }
            }
        })
    }
}
