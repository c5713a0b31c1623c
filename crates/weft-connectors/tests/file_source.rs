//! The file source against real files in temp folders, with an in-memory
//! `Ingest` that records batches and checkpoints.

mod common;
use common::wait_for;

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
    /// Called with the call's number before it is answered.
    on_call: Mutex<Option<OnCall>>,
}

type OnCall = Box<dyn FnMut(usize) + Send>;

impl Ingest for MemIngest {
    fn ingest(&self, batch: Batch) -> BoxFuture<'_, Result<Receipt, IngestError>> {
        Box::pin(async move {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            if let Some(f) = self.on_call.lock().unwrap().as_mut() {
                f(n);
            }
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
        cfg: Box::new(FileSourceConfig {
            dir: None,
            path: None,
            format: None,
            pattern: None,
            delimiter: None,
            encoding: None,
            record_path: None,
            poll_interval: None,
            settle: None,
            ready_marker: None,
            batch_size: Some(batch_size),
            id_field: None,
            event_type: None,
        }),
        target,
        id_field: None,
        event_type: "crm.file".into(),
        poll_interval: Duration::from_millis(poll_ms),
        batch_size,
        encoding: TextEncoding::Utf8,
        record_path: vec!["*".into(), "*".into()],
        // two polls in a row (tests that pin the settle time set their own)
        settle: Duration::ZERO,
        ready_marker: None,
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
    // every file handled (read in name order: numbers.csv comes last; it
    // was flaky under load waiting only for blob.jsonl)
    wait_for("files to be handled", || {
        d.join("processed/b.jsonl").exists()
            && ["empty.csv", "numbers.csv", "blob.jsonl"].iter().all(|n| {
                d.join("quarantine").join(n).exists()
                    && d.join("quarantine").join(format!("{n}.error.txt")).exists()
            })
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
    assert!(!d.join("sq.csv").exists(), "claimed before it is read");
    assert!(
        d.join("processing/sq.csv").exists(),
        "left in processing/ for the resume"
    );
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

// ---- encodings, JSON arrays, XML ----

fn spec_with(path: &Path, batch_size: usize, f: impl FnOnce(&mut SourceSpec)) -> SourceSpec {
    let mut sp = spec(FileTarget::Path(path.to_owned()), batch_size, 50);
    f(&mut sp);
    sp
}

fn set_encoding(sp: &mut SourceSpec, enc: TextEncoding) {
    if let SourceSpec::File { encoding, .. } = sp {
        *encoding = enc;
    }
}

fn set_record_path(sp: &mut SourceSpec, p: &str) {
    if let SourceSpec::File { record_path, .. } = sp {
        *record_path = p
            .trim_start_matches('/')
            .split('/')
            .map(String::from)
            .collect();
    }
}

async fn run_spec(sp: &SourceSpec, ingest: &Arc<MemIngest>) -> Result<(), SourceError> {
    source(sp)
        .run(ingest.clone(), CancellationToken::new())
        .await
}

#[tokio::test]
async fn latin1_and_windows1252_csv_arrive_as_utf8() {
    let dir = tempfile::tempdir().unwrap();
    // "Straße" in the header, "Müller" and "Zoë" in Latin-1
    let path = dir.path().join("kunden.csv");
    std::fs::write(
        &path,
        b"id;Stra\xdfe;name\n1;Hauptstr. 1;M\xfcller\n2;;Zo\xeb\n",
    )
    .unwrap();
    let sp = spec_with(&path, 10, |sp| {
        set_encoding(sp, TextEncoding::Latin1);
        if let SourceSpec::File { cfg, .. } = sp {
            cfg.delimiter = Some(';');
        }
    });
    let ingest = Arc::new(MemIngest::default());
    run_spec(&sp, &ingest).await.unwrap();
    let data: Vec<serde_json::Value> = ingest.goods().iter().map(|e| e.data.clone()).collect();
    assert_eq!(
        data,
        vec![
            serde_json::json!({"id": "1", "Straße": "Hauptstr. 1", "name": "Müller"}),
            serde_json::json!({"id": "2", "Straße": "", "name": "Zoë"}),
        ]
    );
    // 0x80 is the euro sign in Windows-1252 (a control character in Latin-1)
    let path = dir.path().join("prices.csv");
    std::fs::write(&path, b"item,price\nbook,\x8012\n").unwrap();
    let sp = spec_with(&path, 10, |sp| set_encoding(sp, TextEncoding::Windows1252));
    let ingest = Arc::new(MemIngest::default());
    run_spec(&sp, &ingest).await.unwrap();
    assert_eq!(ingest.goods()[0].data["price"], "€12");
}

#[tokio::test]
async fn invalid_utf8_row_goes_to_the_dlq_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("people.csv");
    std::fs::write(&path, b"id,name\n1,Ada\n2,M\xfcller\n3,Cy\n").unwrap();
    let ingest = Arc::new(MemIngest::default());
    run_path(&path, 10, &ingest).await.unwrap();
    let ids: Vec<serde_json::Value> = ingest
        .goods()
        .iter()
        .map(|e| e.data["id"].clone())
        .collect();
    assert_eq!(ids, vec!["1", "3"]);
    let bads = ingest.bads();
    assert_eq!(bads.len(), 1);
    assert_eq!(bads[0].location, "file people.csv line 3");
    assert!(
        bads[0].error.contains("not valid UTF-8"),
        "{}",
        bads[0].error
    );
    assert!(
        bads[0].error.contains("encoding: latin-1"),
        "{}",
        bads[0].error
    );
    assert_eq!(bads[0].raw, "2,M\u{fffd}ller");

    // a header that is not UTF-8: the file cannot be read at all
    let d = dir.path().join("drop");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("h.csv"), b"id,Stra\xdfe\n1,x\n").unwrap();
    let ingest = Arc::new(MemIngest::default());
    let stop = CancellationToken::new();
    let task = tokio::spawn(
        source(&spec(FileTarget::Dir(d.clone()), 10, 20)).run(ingest.clone(), stop.clone()),
    );
    wait_for("quarantine", || d.join("quarantine/h.csv").exists()).await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let report = std::fs::read_to_string(d.join("quarantine/h.csv.error.txt")).unwrap();
    assert!(
        report.contains("header row, column 2: not valid UTF-8"),
        "{report}"
    );
    assert!(ingest.records().is_empty());
}

#[tokio::test]
async fn json_array_elements_are_records() {
    let dir = tempfile::tempdir().unwrap();
    let text = "[\n  {\"id\": 1, \"tags\": [\"a\"]},\n  {\"id\": 2},\n  \"three\", 4\n]\n";
    let path = write(&dir.path().join("orders.json"), text);
    let ingest = Arc::new(MemIngest::default());
    run_path(&path, 3, &ingest).await.unwrap();
    let short = short_hash(&path);
    let got: Vec<(String, serde_json::Value)> = ingest
        .goods()
        .iter()
        .map(|e| (e.id.clone(), e.data.clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                format!("{short}:1"),
                serde_json::json!({"id": 1, "tags": ["a"]})
            ),
            (format!("{short}:2"), serde_json::json!({"id": 2})),
            (format!("{short}:3"), serde_json::json!("three")),
            (format!("{short}:4"), serde_json::json!(4)),
        ]
    );
    let batches = ingest.batches.lock().unwrap();
    let last: serde_json::Value =
        serde_json::from_str(&batches.last().unwrap().checkpoint.as_ref().unwrap().value).unwrap();
    assert_eq!(last["done"], true);
    assert_eq!(last["record"], 4);
}

#[tokio::test]
async fn malformed_json_element_goes_to_the_dlq_and_the_rest_flows() {
    let dir = tempfile::tempdir().unwrap();
    let text = "[{\"id\": 1},\n {\"id\": tru},\n {'id': 3},\n {\"id\": 4}]";
    let path = write(&dir.path().join("in.json"), text);
    let ingest = Arc::new(MemIngest::default());
    run_path(&path, 10, &ingest).await.unwrap();
    let ids: Vec<serde_json::Value> = ingest
        .goods()
        .iter()
        .map(|e| e.data["id"].clone())
        .collect();
    assert_eq!(ids, vec![1, 4]);
    let bads = ingest.bads();
    assert_eq!(bads.len(), 2);
    assert_eq!(bads[0].location, "file in.json element 2 (line 2, byte 13)");
    assert!(
        bads[0].error.contains("not valid JSON"),
        "{}",
        bads[0].error
    );
    assert!(bads[0].error.contains("at line 2"), "{}", bads[0].error);
    assert_eq!(bads[0].raw, "{\"id\": tru}");
    assert_eq!(bads[1].raw, "{'id': 3}");
    assert_eq!(bads[1].id, format!("{}:3", short_hash(&path)));
}

#[tokio::test]
async fn broken_json_array_and_xml_are_quarantined_before_any_record() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(&d.join("a.json"), "[{\"id\": 1}, {\"id\": 2]\n");
    write(&d.join("b.json"), "{\"not\": \"an array\"}");
    write(
        &d.join("c.xml"),
        "<orders><order id=\"1\"><sku>A</sku></order><order id=\"2\"><sku>B</order></orders>",
    );
    write(
        &d.join("d.xml"),
        "<?xml version=\"1.0\" encoding=\"ISO-8859-1\"?><orders/>",
    );
    write(&d.join("e.xml"), "<orders><order>1</order>");
    let ingest = Arc::new(MemIngest::default());
    let stop = CancellationToken::new();
    let task = tokio::spawn(
        source(&spec(FileTarget::Dir(d.to_owned()), 10, 20)).run(ingest.clone(), stop.clone()),
    );
    wait_for("quarantine", || {
        ["a.json", "b.json", "c.xml", "d.xml", "e.xml"]
            .iter()
            .all(|n| d.join("quarantine").join(format!("{n}.error.txt")).exists())
    })
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let report = |n: &str| {
        std::fs::read_to_string(d.join("quarantine").join(format!("{n}.error.txt"))).unwrap()
    };
    assert!(
        report("a.json").contains("unbalanced brackets: `]` at line 1, byte 20"),
        "{}",
        report("a.json")
    );
    assert!(
        report("b.json").contains("expected a JSON array"),
        "{}",
        report("b.json")
    );
    assert!(
        report("c.xml").contains("malformed XML at byte 62"),
        "{}",
        report("c.xml")
    );
    assert!(report("c.xml").contains("sku"), "{}", report("c.xml"));
    assert!(
        report("d.xml").contains("ISO-8859-1"),
        "{}",
        report("d.xml")
    );
    assert!(
        report("e.xml").contains("still open"),
        "{}",
        report("e.xml")
    );
    assert!(
        ingest.records().is_empty(),
        "nothing of a broken file is emitted"
    );
}

const ORDERS_XML: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<!-- exported by the shop -->
<orders generated="2024-05-01">
  <order id="A-1" currency="EUR">
    <customer>M&#252;ller &amp; S&#xF6;hne</customer>
    <line sku="X1" qty="2"/>
    <line sku="Y2" qty="1">gift wrap</line>
    <note><![CDATA[leave at <door>]]></note>
    <empty/>
  </order>
  <order id="A-2" currency="EUR">
    <customer>Zo&#235;</customer>
    <line sku="Z9" qty="5"/>
  </order>
  <summary count="2"/>
</orders>
"#;

#[tokio::test]
async fn xml_elements_at_the_record_path_become_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir.path().join("orders.xml"), ORDERS_XML);
    let sp = spec_with(&path, 10, |sp| set_record_path(sp, "/orders/order"));
    let ingest = Arc::new(MemIngest::default());
    run_spec(&sp, &ingest).await.unwrap();
    assert!(ingest.bads().is_empty(), "{:?}", ingest.bads());
    let short = short_hash(&path);
    let events = ingest.goods();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].id, format!("{short}:1"));
    assert_eq!(events[1].id, format!("{short}:2"));
    assert_eq!(
        events[0].data,
        serde_json::json!({
            "@id": "A-1",
            "@currency": "EUR",
            "customer": "Müller & Söhne",
            "line": [
                {"@sku": "X1", "@qty": "2"},
                {"@sku": "Y2", "@qty": "1", "#text": "gift wrap"}
            ],
            "note": "leave at <door>",
            "empty": ""
        })
    );
    assert_eq!(
        events[1].data,
        serde_json::json!({"@id": "A-2", "@currency": "EUR", "customer": "Zoë", "line": {"@sku": "Z9", "@qty": "5"}})
    );
    // the default record path: every child of the root
    let sp = spec_with(&path, 10, |_| {});
    let ingest = Arc::new(MemIngest::default());
    run_spec(&sp, &ingest).await.unwrap();
    assert_eq!(ingest.goods().len(), 3);
    assert_eq!(ingest.goods()[2].data, serde_json::json!({"@count": "2"}));
}

#[tokio::test]
async fn xml_record_with_an_unknown_entity_goes_to_the_dlq() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        &dir.path().join("o.xml"),
        "<orders><order><n>1</n></order><order><n>&nbsp;2</n></order><order><n>3</n></order></orders>",
    );
    let sp = spec_with(&path, 10, |sp| set_record_path(sp, "/orders/order"));
    let ingest = Arc::new(MemIngest::default());
    run_spec(&sp, &ingest).await.unwrap();
    let ns: Vec<serde_json::Value> = ingest.goods().iter().map(|e| e.data["n"].clone()).collect();
    assert_eq!(ns, vec!["1", "3"]);
    let bads = ingest.bads();
    assert_eq!(bads.len(), 1);
    assert_eq!(bads[0].location, "file o.xml record 2 (byte 31)");
    assert!(
        bads[0].error.contains("unknown entity `&nbsp;`"),
        "{}",
        bads[0].error
    );
    assert_eq!(bads[0].raw, "<order><n>&nbsp;2</n></order>");
}

/// Ingest fails mid-file; a restarted source resumes after the last
/// committed batch: every record once, ids by ordinal, one correlation id.
async fn resume_once(path: &Path, sp: &SourceSpec, total: usize, key: &str) {
    let ingest = Arc::new(MemIngest::default());
    *ingest.fail_call.lock().unwrap() = Some(3);
    let err = run_spec(sp, &ingest).await.unwrap_err();
    assert!(err.message.contains("disk on fire"), "{err}");
    assert_eq!(ingest.goods().len(), 8);
    *ingest.unavailable_call.lock().unwrap() = Some(5);
    run_spec(sp, &ingest).await.unwrap();
    let got: Vec<i64> = ingest
        .goods()
        .iter()
        .map(|e| {
            e.data[key]
                .as_str()
                .map_or_else(|| e.data[key].as_i64().unwrap(), |s| s.parse().unwrap())
        })
        .collect();
    assert_eq!(got, (1..=total as i64).collect::<Vec<_>>());
    let short = short_hash(path);
    let ids: Vec<String> = ingest.goods().iter().map(|e| e.id.clone()).collect();
    assert_eq!(
        ids,
        (1..=total)
            .map(|i| format!("{short}:{i}"))
            .collect::<Vec<_>>()
    );
    let corr: HashSet<String> = ingest
        .goods()
        .iter()
        .map(|e| e.correlationid.clone())
        .collect();
    assert_eq!(corr.len(), 1);
}

#[tokio::test]
async fn json_array_and_xml_resume_mid_file_without_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let json: String = format!(
        "[\n{}\n]\n",
        (1..=25)
            .map(|i| format!("  {{\"i\": {i}}}"))
            .collect::<Vec<_>>()
            .join(",\n")
    );
    let path = write(&dir.path().join("big.json"), &json);
    resume_once(&path, &spec_with(&path, 4, |_| {}), 25, "i").await;

    let xml: String = format!(
        "<export><meta/><orders>{}</orders></export>",
        (1..=25)
            .map(|i| format!("<order><i>{i}</i><x a=\"{i}\"/></order>\n"))
            .collect::<String>()
    );
    let path = write(&dir.path().join("big.xml"), &xml);
    let sp = spec_with(&path, 4, |sp| set_record_path(sp, "/export/orders/order"));
    resume_once(&path, &sp, 25, "i").await;
}

#[tokio::test]
async fn a_format_picks_its_own_extensions_in_a_drop_folder() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(&d.join("a.xml"), "<r><x>1</x></r>");
    write(&d.join("b.csv"), "k\n1\n");
    let mut sp = spec(FileTarget::Dir(d.to_owned()), 10, 20);
    if let SourceSpec::File { cfg, .. } = &mut sp {
        cfg.format = Some(FileFormat::Xml);
    }
    let ingest = Arc::new(MemIngest::default());
    let stop = CancellationToken::new();
    let task = tokio::spawn(source(&sp).run(ingest.clone(), stop.clone()));
    wait_for("processed", || d.join("processed/a.xml").exists()).await;
    stop.cancel();
    task.await.unwrap().unwrap();
    assert!(d.join("b.csv").exists(), "not an .xml file: left alone");
    assert_eq!(ingest.goods()[0].data, serde_json::json!("1"));
}

/// 200,000 Latin-1 CSV rows, streamed in batches of 1000.
#[tokio::test]
async fn big_latin1_csv_is_streamed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.csv");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        f.write_all(b"id,name,city\n").unwrap();
        for i in 1..=200_000 {
            // Latin-1: every character below U+0100 is one byte
            let line = format!("{i},M\u{fc}ller {i},\"K\u{f6}ln, Germany\"\n");
            let bytes: Vec<u8> = line.chars().map(|c| c as u32 as u8).collect();
            f.write_all(&bytes).unwrap();
        }
        f.flush().unwrap();
    }
    let size = std::fs::metadata(&path).unwrap().len();
    let sp = spec_with(&path, 1000, |sp| set_encoding(sp, TextEncoding::Latin1));
    // count without keeping every record
    struct Count(AtomicUsize, Mutex<Option<weft_core::Event>>, AtomicUsize);
    impl Ingest for Count {
        fn ingest(&self, batch: Batch) -> BoxFuture<'_, Result<Receipt, IngestError>> {
            Box::pin(async move {
                self.2.fetch_add(1, Ordering::SeqCst);
                for r in &batch.records {
                    if let Record::Good(e) = r {
                        self.0.fetch_add(1, Ordering::SeqCst);
                        *self.1.lock().unwrap() = Some(e.clone());
                    }
                }
                Ok(Receipt {
                    accepted: batch.records.len(),
                    duplicates: 0,
                })
            })
        }
        fn checkpoint(&self, _key: &str) -> BoxFuture<'_, Result<Option<String>, IngestError>> {
            Box::pin(async { Ok(None) })
        }
    }
    let ingest = Arc::new(Count(
        AtomicUsize::new(0),
        Mutex::new(None),
        AtomicUsize::new(0),
    ));
    let t = Instant::now();
    source(&sp)
        .run(ingest.clone(), CancellationToken::new())
        .await
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(ingest.0.load(Ordering::SeqCst), 200_000);
    assert!(
        ingest.2.load(Ordering::SeqCst) >= 200,
        "streamed in batches"
    );
    let last = ingest.1.lock().unwrap().clone().unwrap();
    assert_eq!(
        last.data,
        serde_json::json!({"id": "200000", "name": "Müller 200000", "city": "Köln, Germany"})
    );
    println!(
        "200000 Latin-1 CSV rows ({:.1} MB) in {secs:.2}s: {:.0} rows/s",
        size as f64 / 1e6,
        200_000.0 / secs
    );
}

// ---- the drop folder: claim, settle, ready marker, one descriptor ----

fn dir_spec(d: &Path, batch_size: usize, f: impl FnOnce(&mut SourceSpec)) -> SourceSpec {
    let mut sp = spec(FileTarget::Dir(d.to_owned()), batch_size, 30);
    f(&mut sp);
    sp
}

fn set_settle(sp: &mut SourceSpec, d: Duration) {
    if let SourceSpec::File { settle, .. } = sp {
        *settle = d;
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// P0-2: an upload that stalls for longer than two polls was hashed and
/// read half; it waits for `settle` now.
#[tokio::test]
async fn an_upload_pausing_longer_than_two_polls_is_not_read_half() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let path = write(&d.join("upload.jsonl"), &lines(3));
    let sp = dir_spec(d, 100, |sp| set_settle(sp, Duration::from_millis(800)));
    let ingest = Arc::new(MemIngest::default());
    let stop = CancellationToken::new();
    let task = tokio::spawn(source(&sp).run(ingest.clone(), stop.clone()));
    // the uploader stalls for ten polls
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        ingest.calls.load(Ordering::SeqCst),
        0,
        "read while the upload stalled"
    );
    append(&path, "{\"i\":4}\n");
    wait_for("processed", || d.join("processed/upload.jsonl").exists()).await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let got: Vec<i64> = ingest
        .goods()
        .iter()
        .map(|e| e.data["i"].as_i64().unwrap())
        .collect();
    assert_eq!(got, vec![1, 2, 3, 4]);
}

#[tokio::test]
async fn ready_marker_mode_reads_a_file_once_its_marker_exists_and_moves_the_marker() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(&d.join("orders.jsonl"), &lines(2));
    let sp = dir_spec(d, 100, |sp| {
        if let SourceSpec::File { ready_marker, .. } = sp {
            *ready_marker = Some(".done".into());
        }
    });
    let ingest = Arc::new(MemIngest::default());
    let stop = CancellationToken::new();
    let task = tokio::spawn(source(&sp).run(ingest.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        ingest.calls.load(Ordering::SeqCst),
        0,
        "read without marker"
    );
    append(&d.join("orders.jsonl"), "{\"i\":3}\n");
    write(&d.join("orders.jsonl.done"), "");
    wait_for("processed", || d.join("processed/orders.jsonl").exists()).await;
    wait_for("marker moved", || {
        d.join("processed/orders.jsonl.done").exists()
    })
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
    assert!(!d.join("orders.jsonl.done").exists());
    assert!(!d.join("processing/orders.jsonl.done").exists());
    assert_eq!(ingest.goods().len(), 3);
}

/// P0-2: the file is renamed into `processing/` before it is read, so the
/// name in the drop folder is free (and an uploader that writes a new file
/// under it does not touch the one being read).
#[tokio::test]
async fn a_file_is_claimed_into_processing_before_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_owned();
    write(&d.join("a.jsonl"), &lines(5));
    let sp = dir_spec(&d, 2, |_| {});
    let ingest = Arc::new(MemIngest::default());
    let where_ = Arc::new(Mutex::new(Vec::new()));
    {
        let (d, w) = (d.clone(), where_.clone());
        *ingest.on_call.lock().unwrap() = Some(Box::new(move |_| {
            w.lock().unwrap().push((
                d.join("a.jsonl").exists(),
                d.join("processing/a.jsonl").exists(),
            ));
        }));
    }
    let stop = CancellationToken::new();
    let task = tokio::spawn(source(&sp).run(ingest.clone(), stop.clone()));
    wait_for("processed", || d.join("processed/a.jsonl").exists()).await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let seen = where_.lock().unwrap().clone();
    assert_eq!(seen, vec![(false, true); 3]);
    assert!(!d.join("processing/a.jsonl").exists());
}

/// P0-2: a file written to after it was claimed (the uploader still has it
/// open) is not marked done: reading stops before the next batch and the
/// file goes to quarantine with the reason.
#[tokio::test]
async fn a_file_appended_while_it_is_read_is_quarantined_not_marked_done() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_owned();
    write(&d.join("grow.jsonl"), &lines(6));
    let sp = dir_spec(&d, 2, |_| {});
    let ingest = Arc::new(MemIngest::default());
    {
        let d = d.clone();
        *ingest.on_call.lock().unwrap() = Some(Box::new(move |n| {
            if n == 1 {
                append(&d.join("processing/grow.jsonl"), "{\"i\":7}\n");
            }
        }));
    }
    let stop = CancellationToken::new();
    let task = tokio::spawn(source(&sp).run(ingest.clone(), stop.clone()));
    wait_for("quarantined", || {
        d.join("quarantine/grow.jsonl.error.txt").exists()
    })
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let report = std::fs::read_to_string(d.join("quarantine/grow.jsonl.error.txt")).unwrap();
    assert!(
        report.contains("the file changed while it was read (its size went from 48 to 56 bytes)"),
        "{report}"
    );
    assert!(
        report.contains("the records before line 3 were ingested, the rest not"),
        "{report}"
    );
    assert!(!d.join("processed/grow.jsonl").exists());
    assert_eq!(ingest.goods().len(), 2, "only the batch before the change");
    let cps = ingest.checkpoints.lock().unwrap();
    assert!(
        cps.values().all(|v| v.contains("\"done\":false")),
        "{cps:?}"
    );
}

/// P0-2: a name swapped for a symbolic link is not followed: the link goes
/// to quarantine and what it points to is not read.
#[tokio::test]
async fn a_symlink_in_the_drop_folder_is_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("drop");
    std::fs::create_dir_all(d.join("processing")).unwrap();
    let secret = write(&dir.path().join("secret.jsonl"), "{\"password\":\"x\"}\n");
    // as if swapped after the listing and claimed
    std::os::unix::fs::symlink(&secret, d.join("processing/orders.jsonl")).unwrap();
    // a link in the folder itself is never a candidate
    std::os::unix::fs::symlink(&secret, d.join("more.jsonl")).unwrap();
    let sp = dir_spec(&d, 10, |_| {});
    let ingest = Arc::new(MemIngest::default());
    let stop = CancellationToken::new();
    let task = tokio::spawn(source(&sp).run(ingest.clone(), stop.clone()));
    wait_for("quarantined", || {
        d.join("quarantine/orders.jsonl.error.txt").exists()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let report = std::fs::read_to_string(d.join("quarantine/orders.jsonl.error.txt")).unwrap();
    assert!(
        report.contains("the name is a symbolic link; links are not followed in a drop folder"),
        "{report}"
    );
    assert_eq!(ingest.calls.load(Ordering::SeqCst), 0);
    assert!(d.join("more.jsonl").exists(), "a link is left alone");
}

/// A file rewritten in place after it was read is a new file (new content
/// hash, new ids): on purpose, documented in ARCHITECTURE.md.
#[tokio::test]
async fn a_file_dropped_again_with_new_content_is_a_new_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_owned();
    write(&d.join("c.jsonl"), &lines(1));
    let sp = dir_spec(&d, 10, |_| {});
    let ingest = Arc::new(MemIngest::default());
    let stop = CancellationToken::new();
    let task = tokio::spawn(source(&sp).run(ingest.clone(), stop.clone()));
    wait_for("processed", || d.join("processed/c.jsonl").exists()).await;
    write(&d.join("c.jsonl"), &lines(1));
    wait_for("same content skipped", || !d.join("c.jsonl").exists()).await;
    write(&d.join("c.jsonl"), &lines(2));
    wait_for("second", || ingest.goods().len() == 3).await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let ids: HashSet<String> = ingest.goods().iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids.len(), 3, "new content, new ids");
}

/// `weft_files_skipped_total{source}` across every snapshot taken (a
/// snapshot resets what it reads).
fn skipped_total(source: &str) -> u64 {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
    static SNAP: std::sync::OnceLock<Snapshotter> = std::sync::OnceLock::new();
    static TOTAL: Mutex<Option<HashMap<String, u64>>> = Mutex::new(None);
    let snap = SNAP.get_or_init(|| {
        let r = DebuggingRecorder::new();
        let s = r.snapshotter();
        let _ = r.install();
        s
    });
    let mut total = TOTAL.lock().unwrap();
    let total = total.get_or_insert_with(HashMap::new);
    for (k, .., v) in snap.snapshot().into_vec() {
        let key = k.key();
        if key.name() != "weft_files_skipped_total" {
            continue;
        }
        let src = key
            .labels()
            .find(|l| l.key() == "source")
            .map(|l| l.value().to_owned())
            .unwrap_or_default();
        if let DebugValue::Counter(n) = v {
            *total.entry(src).or_default() += n;
        }
    }
    total.get(source).copied().unwrap_or(0)
}

/// A symbolic link and a file whose name is not UTF-8 are reported once
/// each (log and `weft_files_skipped_total`), not skipped silently and not
/// at every poll; the good file beside them is read.
#[tokio::test]
async fn unreadable_names_are_reported_once_not_at_every_poll() {
    use std::os::unix::ffi::OsStrExt;
    // the recorder is installed before the source counts anything
    assert_eq!(skipped_total("skipper"), 0);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("drop");
    std::fs::create_dir_all(&d).unwrap();
    let elsewhere = write(&dir.path().join("elsewhere.jsonl"), &lines(1));
    std::os::unix::fs::symlink(&elsewhere, d.join("linked.jsonl")).unwrap();
    let latin1 = std::ffi::OsStr::from_bytes(b"caf\xe9.jsonl");
    std::fs::write(d.join(latin1), lines(1)).unwrap();
    write(&d.join("good.jsonl"), &lines(2));
    let sp = dir_spec(&d, 10, |sp| set_settle(sp, Duration::from_millis(20)));
    let src: Box<dyn Source> = Box::new(FileSource::new("skipper", &sp).unwrap());
    let ingest = Arc::new(MemIngest::default());
    let stop = CancellationToken::new();
    let task = tokio::spawn(src.run(ingest.clone(), stop.clone()));
    wait_for("the good file", || ingest.goods().len() == 2).await;
    // many polls later (poll_interval 30ms): still reported once each
    tokio::time::sleep(Duration::from_millis(400)).await;
    stop.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(skipped_total("skipper"), 2);
    assert!(d.join("linked.jsonl").exists() && d.join(latin1).exists());
}
