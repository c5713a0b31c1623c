//! The file source against real files in temp folders, with an in-memory
//! `Ingest` that records batches and checkpoints.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use weft_connectors::file::FileSource;
use weft_connectors::{Batch, Ingest, IngestError, Receipt, Record, Source, SourceError};
use weft_core::config::raw::FileSourceConfig;
use weft_core::config::{FileFormat, FileTarget, SourceSpec, TextEncoding};
use weft_core::mapping::Program;

/// Records committed batches and checkpoints; can refuse one call.
#[derive(Default)]
struct MemIngest {
    batches: Mutex<Vec<Batch>>,
    checkpoints: Mutex<HashMap<String, String>>,
    calls: AtomicUsize,
    /// Fail the call with this number (1-based) with a store error.
    fail_call: Mutex<Option<usize>>,
    /// Answer `Unavailable` to the call with this number.
    unavailable_call: Mutex<Option<usize>>,
}

impl Ingest for MemIngest {
    fn ingest(&self, batch: Batch) -> BoxFuture<'_, Result<Receipt, IngestError>> {
        Box::pin(async move {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            if *self.fail_call.lock().unwrap() == Some(n) {
                return Err(IngestError::Store("disk on fire".into()));
            }
            if *self.unavailable_call.lock().unwrap() == Some(n) {
                return Err(IngestError::Unavailable("backlog".into()));
            }
            if let Some(cp) = &batch.checkpoint {
                self.checkpoints
                    .lock()
                    .unwrap()
                    .insert(cp.key.clone(), cp.value.clone());
            }
            let accepted = batch.records.len();
            self.batches.lock().unwrap().push(batch);
            Ok(Receipt {
                accepted,
                duplicates: 0,
            })
        })
    }
    fn checkpoint(&self, key: &str) -> BoxFuture<'_, Result<Option<String>, IngestError>> {
        let v = self.checkpoints.lock().unwrap().get(key).cloned();
        Box::pin(async move { Ok(v) })
    }
}

impl MemIngest {
    fn records(&self) -> Vec<Record> {
        self.batches
            .lock()
            .unwrap()
            .iter()
            .flat_map(|b| b.records.clone())
            .collect()
    }
    fn goods(&self) -> Vec<weft_core::Event> {
        self.records()
            .into_iter()
            .filter_map(|r| match r {
                Record::Good(e) => Some(e),
                Record::Bad(_) => None,
            })
            .collect()
    }
    fn bads(&self) -> Vec<weft_connectors::BadRecord> {
        self.records()
            .into_iter()
            .filter_map(|r| match r {
                Record::Bad(b) => Some(b),
                Record::Good(_) => None,
            })
            .collect()
    }
}

fn spec(target: FileTarget, batch_size: usize, poll_ms: u64) -> SourceSpec {
    SourceSpec::File {
        cfg: FileSourceConfig {
            dir: None,
            path: None,
            format: None,
            pattern: None,
            delimiter: None,
            encoding: None,
            record_path: None,
            poll_interval: None,
            batch_size: Some(batch_size),
            id_field: None,
            event_type: None,
        },
        target,
        id_field: None,
        event_type: "crm.file".into(),
        poll_interval: Duration::from_millis(poll_ms),
        batch_size,
        encoding: TextEncoding::Utf8,
        record_path: vec!["*".into(), "*".into()],
    }
}

fn source(spec: &SourceSpec) -> Box<dyn Source> {
    Box::new(FileSource::new("crm", spec).unwrap())
}

async fn run_path(
    path: &Path,
    batch_size: usize,
    ingest: &Arc<MemIngest>,
) -> Result<(), SourceError> {
    let s = source(&spec(FileTarget::Path(path.to_owned()), batch_size, 50));
    s.run(ingest.clone(), CancellationToken::new()).await
}

fn short_hash(path: &Path) -> String {
    let h = hex::encode(Sha256::digest(std::fs::read(path).unwrap()));
    h[..16].to_owned()
}

fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    path.to_owned()
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn csv_path_mode_reads_rows_with_ids_and_leaves_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let text = "id,name\n1,Ada\n2,\"Bob, Jr.\"\n3,Cy\n";
    let path = write(&dir.path().join("contacts.csv"), text);
    let ingest = Arc::new(MemIngest::default());
    run_path(&path, 2, &ingest).await.unwrap();
    let short = short_hash(&path);
    let events = ingest.goods();
    let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(
        ids,
        vec![
            format!("{short}:2"),
            format!("{short}:3"),
            format!("{short}:4")
        ]
    );
    assert_eq!(
        events[1].data,
        serde_json::json!({"id": "2", "name": "Bob, Jr."})
    );
    assert!(
        events
            .iter()
            .all(|e| e.source == "weft:crm" && e.ty == "crm.file")
    );
    assert!(
        events
            .iter()
            .all(|e| e.correlationid == events[0].correlationid)
    );
    // batches of 2, then the end
    {
        let batches = ingest.batches.lock().unwrap();
        assert_eq!(batches[0].records.len(), 2);
        let last: serde_json::Value =
            serde_json::from_str(&batches.last().unwrap().checkpoint.as_ref().unwrap().value)
                .unwrap();
        assert_eq!(last["done"], true);
        assert_eq!(last["offset"], text.len());
        assert_eq!(
            batches[0].checkpoint.as_ref().unwrap().key,
            format!("file:{}", hex::encode(Sha256::digest(text)))
        );
    }
    // Path mode never moves or changes the file
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    assert!(!dir.path().join("processed").exists());
    // a second run finds the file done and emits nothing
    let before = ingest.records().len();
    run_path(&path, 2, &ingest).await.unwrap();
    assert_eq!(ingest.records().len(), before);
}

#[tokio::test]
async fn jsonl_path_mode_reads_lines_with_line_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let text = "{\"a\":1}\n\n  [1,2]  \r\n\"str\"\n{\"last\":true}";
    let path = write(&dir.path().join("in.jsonl"), text);
    let ingest = Arc::new(MemIngest::default());
    run_path(&path, 1000, &ingest).await.unwrap();
    let short = short_hash(&path);
    let events = ingest.goods();
    let got: Vec<(String, serde_json::Value)> = events
        .iter()
        .map(|e| (e.id.clone(), e.data.clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            (format!("{short}:1"), serde_json::json!({"a": 1})),
            (format!("{short}:3"), serde_json::json!([1, 2])),
            (format!("{short}:4"), serde_json::json!("str")),
            (format!("{short}:5"), serde_json::json!({"last": true})),
        ]
    );
}

#[tokio::test]
async fn id_field_gives_the_event_id() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        &dir.path().join("in.ndjson"),
        "{\"id\":\"a-1\"}\n{\"id\":7}\n{\"x\":1}\n",
    );
    let mut sp = spec(FileTarget::Path(path.clone()), 10, 50);
    if let SourceSpec::File { id_field, .. } = &mut sp {
        *id_field = Some(Arc::new(Program::compile(".id", &[]).unwrap()));
    }
    let ingest = Arc::new(MemIngest::default());
    source(&sp)
        .run(ingest.clone(), CancellationToken::new())
        .await
        .unwrap();
    let ids: Vec<String> = ingest.goods().iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids, vec!["a-1", "7"]);
    let bads = ingest.bads();
    assert_eq!(bads.len(), 1);
    assert!(bads[0].error.contains("id_field"), "{}", bads[0].error);
    assert_eq!(bads[0].location, "file in.ndjson line 3");
}

#[tokio::test]
async fn bad_rows_become_bad_records_and_good_rows_flow() {
    let dir = tempfile::tempdir().unwrap();
    let csv = write(
        &dir.path().join("orders.csv"),
        "id,qty\n1,5\n2\n3,7,extra\n4,9\n",
    );
    let ingest = Arc::new(MemIngest::default());
    run_path(&csv, 1000, &ingest).await.unwrap();
    let goods: Vec<serde_json::Value> = ingest
        .goods()
        .iter()
        .map(|e| e.data["id"].clone())
        .collect();
    assert_eq!(goods, vec!["1", "4"]);
    let bads = ingest.bads();
    let short = short_hash(&csv);
    assert_eq!(bads.len(), 2);
    assert_eq!(bads[0].location, "file orders.csv line 3");
    assert_eq!(bads[0].id, format!("{short}:3"));
    assert_eq!(bads[0].raw, "2");
    assert!(
        bads[0].error.contains("expected 2 fields"),
        "{}",
        bads[0].error
    );
    assert_eq!(bads[1].location, "file orders.csv line 4");
    assert_eq!(bads[1].raw, "3,7,extra");

    let jl = write(
        &dir.path().join("events.jsonl"),
        "{\"ok\":1}\n{\"broken\":\n{\"ok\":2}\n",
    );
    let ingest = Arc::new(MemIngest::default());
    run_path(&jl, 1000, &ingest).await.unwrap();
    assert_eq!(ingest.goods().len(), 2);
    let bads = ingest.bads();
    assert_eq!(bads.len(), 1);
    assert!(
        bads[0].error.starts_with("file events.jsonl line 2: "),
        "{}",
        bads[0].error
    );
    assert_eq!(bads[0].raw, "{\"broken\":");
    assert_eq!(bads[0].correlation_id, ingest.goods()[0].correlationid);
}

#[tokio::test]
async fn dir_mode_moves_to_processed_and_quarantines_unreadable_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(&d.join("b.jsonl"), "{\"n\":2}\n");
    write(&d.join("a.csv"), "k,v\nx,1\n");
    write(&d.join("empty.csv"), "");
    write(&d.join("numbers.csv"), "1,2\n3,4\n");
    std::fs::write(d.join("blob.jsonl"), b"\x00\x01\x02binary").unwrap();
    write(&d.join("upload.csv.tmp"), "k\n1\n");
    write(&d.join("upload.jsonl.part"), "{}\n");
    write(&d.join(".hidden.csv"), "k\n1\n");
    write(&d.join("notes.txt"), "hello\n");
    let s = source(&spec(FileTarget::Dir(d.to_owned()), 100, 30));
    let ingest = Arc::new(MemIngest::default());
    let stop = CancellationToken::new();
    let task = tokio::spawn(s.run(ingest.clone(), stop.clone()));
    wait_for("files to be handled", || {
        d.join("processed/b.jsonl").exists() && d.join("quarantine/blob.jsonl").exists()
    })
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
    assert!(d.join("processed/a.csv").exists());
    for name in ["empty.csv", "numbers.csv", "blob.jsonl"] {
        assert!(d.join("quarantine").join(name).exists(), "{name}");
        let report =
            std::fs::read_to_string(d.join("quarantine").join(format!("{name}.error.txt")))
                .unwrap();
        assert!(report.contains("error: "), "{report}");
        assert!(!d.join(name).exists());
    }
    let report = std::fs::read_to_string(d.join("quarantine/numbers.csv.error.txt")).unwrap();
    assert!(report.contains("header"), "{report}");
    for name in [
        "upload.csv.tmp",
        "upload.jsonl.part",
        ".hidden.csv",
        "notes.txt",
    ] {
        assert!(d.join(name).exists(), "{name} must be left alone");
    }
    // a.csv before b.jsonl (name order)
    let data: Vec<serde_json::Value> = ingest.goods().iter().map(|e| e.data.clone()).collect();
    assert_eq!(
        data,
        vec![
            serde_json::json!({"k": "x", "v": "1"}),
            serde_json::json!({"n": 2})
        ]
    );
    assert!(ingest.bads().is_empty());
}

fn lines(n: usize) -> String {
    (1..=n).map(|i| format!("{{\"i\":{i}}}\n")).collect()
}

/// Ingest fails mid-file; a new source with the same checkpoints resumes.
#[tokio::test]
async fn resume_after_crash_emits_every_row_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir.path().join("big.jsonl"), &lines(25));
    let ingest = Arc::new(MemIngest::default());
    *ingest.fail_call.lock().unwrap() = Some(3);
    let err = run_path(&path, 4, &ingest).await.unwrap_err();
    assert!(err.message.contains("disk on fire"), "{err}");
    assert_eq!(ingest.records().len(), 8);
    // restart; one refusal (backlog) on the way is retried in place
    *ingest.unavailable_call.lock().unwrap() = Some(5);
    run_path(&path, 4, &ingest).await.unwrap();
    let got: Vec<i64> = ingest
        .goods()
        .iter()
        .map(|e| e.data["i"].as_i64().unwrap())
        .collect();
    assert_eq!(got, (1..=25).collect::<Vec<_>>());
    let ids: HashSet<String> = ingest.goods().iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids.len(), 25);
    // one correlation id for the whole file, across the restart
    let corr: HashSet<String> = ingest
        .goods()
        .iter()
        .map(|e| e.correlationid.clone())
        .collect();
    assert_eq!(corr.len(), 1);
}

#[tokio::test]
async fn resume_after_crash_csv_in_dir_mode() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let text: String = std::iter::once("n,sq\n".to_owned())
        .chain((1..=30).map(|i| format!("{i},{}\n", i * i)))
        .collect();
    write(&d.join("sq.csv"), &text);
    let ingest = Arc::new(MemIngest::default());
    *ingest.fail_call.lock().unwrap() = Some(4);
    let err = source(&spec(FileTarget::Dir(d.to_owned()), 7, 20))
        .run(ingest.clone(), CancellationToken::new())
        .await
        .unwrap_err();
    assert!(err.message.contains("disk on fire"));
    assert!(d.join("sq.csv").exists(), "not moved before it is read");
    let stop = CancellationToken::new();
    let task = tokio::spawn(
        source(&spec(FileTarget::Dir(d.to_owned()), 7, 20)).run(ingest.clone(), stop.clone()),
    );
    wait_for("processed", || d.join("processed/sq.csv").exists()).await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let got: Vec<String> = ingest
        .goods()
        .iter()
        .map(|e| e.data["n"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got, (1..=30).map(|i| i.to_string()).collect::<Vec<_>>());
    let short = short_hash(&d.join("processed/sq.csv"));
    let lines_seen: Vec<String> = ingest.goods().iter().map(|e| e.id.clone()).collect();
    assert_eq!(
        lines_seen,
        (2..=31).map(|l| format!("{short}:{l}")).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_growing_file_is_not_picked_up() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_owned();
    let path = d.join("live.jsonl");
    write(&path, "");
    let ingest = Arc::new(MemIngest::default());
    let stop = CancellationToken::new();
    let task = tokio::spawn(
        source(&spec(FileTarget::Dir(d.clone()), 1000, 150)).run(ingest.clone(), stop.clone()),
    );
    // append a line every 10 ms for about 0.8 s (several polls): the size
    // changes between every two polls
    for i in 1..=80 {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        writeln!(f, "{{\"i\":{i}}}").unwrap();
        drop(f);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(
            ingest.calls.load(Ordering::SeqCst),
            0,
            "picked up while still growing"
        );
    }
    wait_for("processed", || d.join("processed/live.jsonl").exists()).await;
    stop.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(ingest.goods().len(), 80);
}

#[tokio::test]
async fn stops_promptly_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir.path().join("many.jsonl"), &lines(200_000));
    // an ingest that takes 50 ms a batch
    struct Slow(MemIngest);
    impl Ingest for Slow {
        fn ingest(&self, batch: Batch) -> BoxFuture<'_, Result<Receipt, IngestError>> {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                self.0.ingest(batch).await
            })
        }
        fn checkpoint(&self, key: &str) -> BoxFuture<'_, Result<Option<String>, IngestError>> {
            self.0.checkpoint(key)
        }
    }
    let ingest = Arc::new(Slow(MemIngest::default()));
    let stop = CancellationToken::new();
    let s = source(&spec(FileTarget::Path(path), 100, 50));
    let task = tokio::spawn(s.run(ingest.clone(), stop.clone()));
    wait_for("a first batch", || {
        ingest.0.calls.load(Ordering::SeqCst) > 0
    })
    .await;
    let t = Instant::now();
    stop.cancel();
    task.await.unwrap().unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "took {:?}",
        t.elapsed()
    );
    let cps = ingest.0.checkpoints.lock().unwrap();
    let v: serde_json::Value = serde_json::from_str(cps.values().next().unwrap()).unwrap();
    assert_eq!(v["done"], false);
}

#[tokio::test]
async fn path_mode_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ingest = Arc::new(MemIngest::default());
    let err = run_path(&dir.path().join("missing.jsonl"), 10, &ingest)
        .await
        .unwrap_err();
    assert!(err.message.contains("missing.jsonl"), "{err}");
    let path = write(&dir.path().join("noheader.csv"), "");
    let err = run_path(&path, 10, &ingest).await.unwrap_err();
    assert!(err.message.contains("header"), "{err}");
    assert!(path.exists(), "Path mode never moves the file");
    let path = write(&dir.path().join("data.dat"), "<a/>");
    let err = run_path(&path, 10, &ingest).await.unwrap_err();
    assert!(err.message.contains("format"), "{err}");
    assert_eq!(ingest.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn format_and_delimiter_from_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir.path().join("data.txt"), "a;b\n1;2\n");
    let mut sp = spec(FileTarget::Path(path), 10, 50);
    if let SourceSpec::File { cfg, .. } = &mut sp {
        cfg.format = Some(FileFormat::Csv);
        cfg.delimiter = Some(';');
    }
    let ingest = Arc::new(MemIngest::default());
    source(&sp)
        .run(ingest.clone(), CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(
        ingest.goods()[0].data,
        serde_json::json!({"a": "1", "b": "2"})
    );
}
