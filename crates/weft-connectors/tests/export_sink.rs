//! The export sinks (CSV, rotating JSON Lines) against real folders.

mod common;
use common::wait_for;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use weft_connectors::export::{CsvSink, JsonlSink};
use weft_connectors::{Delivery, Sink};
use weft_core::config::raw::JsonlSinkConfig;
use weft_core::config::{ExportTarget, RotatePolicy};

fn delivery(id: i64, payload: Value) -> Delivery {
    Delivery {
        id,
        idempotency_key: format!("k-{id}"),
        correlation_id: "c-1".into(),
        event_id: format!("e-{id}"),
        entity_key: None,
        attempt: 1,
        payload,
        context: Default::default(),
    }
}

fn rotating(dir: &Path, max_bytes: u64, max_age: Duration, idle: Duration) -> ExportTarget {
    ExportTarget::Dir {
        dir: dir.to_owned(),
        prefix: "orders".into(),
        rotate: RotatePolicy {
            max_bytes,
            max_age,
            idle,
        },
    }
}

const HOUR: Duration = Duration::from_secs(3600);

/// The folder's files, by name.
fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

fn read_csv(path: &Path) -> (Vec<String>, Vec<Vec<String>>) {
    let mut rdr = csv::Reader::from_path(path).unwrap();
    let header = rdr.headers().unwrap().iter().map(String::from).collect();
    let rows = rdr
        .records()
        .map(|r| r.unwrap().iter().map(String::from).collect())
        .collect();
    (header, rows)
}

#[tokio::test]
async fn csv_rotates_by_size_into_complete_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("export");
    let cols = vec!["id".to_owned(), "name".to_owned(), "tags".to_owned()];
    let sink = CsvSink::open(
        Some(cols.clone()),
        b';',
        true,
        &rotating(&out, 2_000, HOUR, HOUR),
    )
    .unwrap();
    for b in 0..20 {
        let batch: Vec<Delivery> = (1..=50)
            .map(|i| {
                let n = b * 50 + i;
                delivery(
                    n,
                    json!({"id": n, "name": format!("Müller; {n}"), "tags": ["a", n], "extra": 1}),
                )
            })
            .collect();
        let r = sink.write(&batch).await;
        assert!(r.iter().all(Result::is_ok), "{r:?}");
    }
    // everything before the last file is complete; the last one is still open
    let names = files(&out);
    assert!(names.last().unwrap().ends_with(".csv.part"), "{names:?}");
    assert!(names.iter().filter(|n| n.ends_with(".part")).count() == 1);
    sink.flush().await.unwrap();
    let names = files(&out);
    assert!(names.len() > 5, "{names:?}");
    assert!(
        names
            .iter()
            .all(|n| n.starts_with("orders-") && n.ends_with(".csv")),
        "{names:?}"
    );
    let mut ids = Vec::new();
    for n in &names {
        let p = out.join(n);
        assert!(
            std::fs::metadata(&p).unwrap().len() <= 2_000,
            "{n} is over max_bytes"
        );
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(
            text.starts_with("id;name;tags\n"),
            "{n}: every file has its header"
        );
        let mut rdr = csv::ReaderBuilder::new()
            .delimiter(b';')
            .from_reader(text.as_bytes());
        for r in rdr.records() {
            let r = r.unwrap();
            let id: i64 = r[0].parse().unwrap();
            assert_eq!(&r[1], format!("Müller; {id}"));
            assert_eq!(
                &r[2],
                format!("[\"a\",{id}]"),
                "nested values are JSON in the cell"
            );
            ids.push(id);
        }
    }
    assert_eq!(
        ids,
        (1..=1000).collect::<Vec<_>>(),
        "every row once, in order"
    );
    // sequence numbers increase with the names
    let seqs: Vec<u64> = names
        .iter()
        .map(|n| {
            n.trim_end_matches(".csv")
                .rsplit('-')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
}

#[tokio::test]
async fn csv_columns_from_the_first_record_and_bad_payloads_are_permanent() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("export");
    let sink = CsvSink::open(None, b',', true, &rotating(&out, 1 << 20, HOUR, HOUR)).unwrap();
    let r = sink
        .write(&[
            delivery(1, json!("not an object")),
            delivery(2, json!({"b": "x,y", "a": 1, "c": null})),
            delivery(3, json!([1, 2])),
            delivery(4, json!({"a": 2, "b": "say \"hi\"", "d": "ignored"})),
        ])
        .await;
    assert!(r[0].as_ref().unwrap_err().kind == weft_core::ErrorKind::Permanent);
    assert!(
        r[0].as_ref()
            .unwrap_err()
            .message
            .contains("object payload")
    );
    assert!(r[1].is_ok() && r[3].is_ok());
    assert!(r[2].as_ref().unwrap_err().kind == weft_core::ErrorKind::Permanent);
    drop(sink); // dropping the sink completes its file too
    let names = files(&out);
    assert_eq!(names.len(), 1, "{names:?}");
    let (header, rows) = read_csv(&out.join(&names[0]));
    assert_eq!(header, vec!["a", "b", "c"]);
    assert_eq!(
        rows,
        vec![vec!["1", "x,y", ""], vec!["2", "say \"hi\"", ""]]
    );
}

#[tokio::test]
async fn files_are_completed_on_max_age_and_idle_without_further_writes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("export");
    let sink = CsvSink::open(
        Some(vec!["id".into()]),
        b',',
        true,
        &rotating(&out, 1 << 20, Duration::from_millis(200), HOUR),
    )
    .unwrap();
    sink.write(&[delivery(1, json!({"id": 1}))]).await;
    assert!(files(&out)[0].ends_with(".part"));
    wait_for("max_age to complete the file", || {
        let f = files(&out);
        f.len() == 1 && f[0].ends_with(".csv")
    })
    .await;
    assert_eq!(
        std::fs::read_to_string(out.join(&files(&out)[0])).unwrap(),
        "id\n1\n"
    );

    let out2 = dir.path().join("export2");
    let sink2 = JsonlSink::open(
        &JsonlSinkConfig::default(),
        &rotating(&out2, 1 << 20, HOUR, Duration::from_millis(150)),
    )
    .unwrap();
    sink2.write(&[delivery(1, json!({"x": 1}))]).await;
    wait_for("idle to complete the file", || {
        let f = files(&out2);
        f.len() == 1 && f[0].ends_with(".jsonl")
    })
    .await;
    // the next write starts a new file
    sink2.write(&[delivery(2, json!({"x": 2}))]).await;
    let f = files(&out2);
    assert_eq!(f.len(), 2);
    assert!(f[1].ends_with(".jsonl.part"), "{f:?}");
    drop((sink, sink2));
}

#[tokio::test]
async fn leftover_part_files_are_repaired_and_completed_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("export");
    std::fs::create_dir_all(&out).unwrap();
    // a crash mid-write: the last row is cut inside a quoted line break
    std::fs::write(
        out.join("orders-20240501T120000Z-000041.csv.part"),
        "id,note\n1,ok\n2,\"two\nli",
    )
    .unwrap();
    // a crash before the first row was whole: nothing to keep
    std::fs::write(out.join("orders-20240501T120500Z-000042.csv.part"), "id,no").unwrap();
    // another prefix's file is not touched
    std::fs::write(out.join("other-20240501T120000Z-000001.csv.part"), "x").unwrap();
    let sink = CsvSink::open(None, b',', true, &rotating(&out, 1 << 20, HOUR, HOUR)).unwrap();
    assert_eq!(
        files(&out),
        vec![
            "orders-20240501T120000Z-000041.csv",
            "other-20240501T120000Z-000001.csv.part"
        ]
    );
    assert_eq!(
        std::fs::read_to_string(out.join("orders-20240501T120000Z-000041.csv")).unwrap(),
        "id,note\n1,ok\n"
    );
    // numbering goes on after the highest sequence number seen
    sink.write(&[delivery(3, json!({"id": 3, "note": "new\nline"}))])
        .await;
    sink.flush().await.unwrap();
    let f = files(&out);
    assert!(
        f[1].starts_with("orders-") && f[1].ends_with("-000043.csv"),
        "{f:?}"
    );
    let (_, rows) = read_csv(&out.join(&f[1]));
    assert_eq!(rows, vec![vec!["3", "new\nline"]]);
}

#[tokio::test]
async fn csv_one_file_mode_appends_under_one_header() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("out/all.csv");
    let target = ExportTarget::File(path.clone());
    let sink = CsvSink::open(None, b',', true, &target).unwrap();
    sink.write(&[delivery(1, json!({"id": 1, "v": "a"}))]).await;
    drop(sink);
    // a crash left half a row behind
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"2,\"hal").unwrap();
    }
    // reopened: the columns come back from the header, the half row goes
    let sink = CsvSink::open(None, b',', true, &target).unwrap();
    sink.write(&[delivery(3, json!({"v": "c", "id": 3, "new": 1}))])
        .await;
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "id,v\n1,a\n3,c\n");
}

#[tokio::test]
async fn jsonl_rotating_files_carry_the_envelope() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("export");
    let cfg = JsonlSinkConfig {
        envelope: true,
        ..JsonlSinkConfig::default()
    };
    let sink = JsonlSink::open(&cfg, &rotating(&out, 200, HOUR, HOUR)).unwrap();
    let batch: Vec<Delivery> = (1..=6).map(|i| delivery(i, json!({"n": i}))).collect();
    assert!(sink.write(&batch).await.iter().all(Result::is_ok));
    sink.flush().await.unwrap();
    let names = files(&out);
    assert!(
        names.len() >= 3 && names.iter().all(|n| n.ends_with(".jsonl")),
        "{names:?}"
    );
    let mut lines = Vec::new();
    for n in &names {
        let text = std::fs::read_to_string(out.join(n)).unwrap();
        assert!(text.len() <= 200 && text.ends_with('\n'));
        lines.extend(
            text.lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap()),
        );
    }
    assert_eq!(lines.len(), 6);
    assert_eq!(
        lines[0],
        json!({"id": "e-1", "idempotency_key": "k-1", "correlation_id": "c-1", "data": {"n": 1}})
    );
}

#[tokio::test]
async fn a_file_whose_every_record_was_refused_is_not_left_behind() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("export");
    let sink = CsvSink::open(
        Some(vec!["id".into()]),
        b',',
        true,
        &rotating(&out, 1 << 20, HOUR, Duration::from_millis(100)),
    )
    .unwrap();
    let r = sink
        .write(&[delivery(1, json!(["not", "an", "object"]))])
        .await;
    assert!(r[0].is_err());
    // the idle timer removes the empty part file
    wait_for("the empty part file to go", || files(&out).is_empty()).await;
    sink.flush().await.unwrap();
    assert!(files(&out).is_empty());
}
