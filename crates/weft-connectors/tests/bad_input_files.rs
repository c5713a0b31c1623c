//! Bad input files, format by format: each case a file, and the exact
//! outcome (bad records with their location and reason, the quarantine
//! report, the records delivered). The source is built from YAML through
//! the config loader, as `weft run` builds it, and reads a drop folder.

mod common;
use common::wait_for;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use weft_connectors::file::FileSource;
use weft_connectors::{Batch, Ingest, IngestError, Receipt, Record, Source};
use weft_core::config::{self, SourceSpec};

/// Keeps every batch and checkpoint.
#[derive(Default)]
struct MemIngest {
    records: Mutex<Vec<Record>>,
    checkpoints: Mutex<std::collections::HashMap<String, String>>,
}

impl Ingest for MemIngest {
    fn ingest(&self, batch: Batch) -> BoxFuture<'_, Result<Receipt, IngestError>> {
        Box::pin(async move {
            if let Some(cp) = &batch.checkpoint {
                self.checkpoints
                    .lock()
                    .unwrap()
                    .insert(cp.key.clone(), cp.value.clone());
            }
            let accepted = batch.records.len();
            self.records.lock().unwrap().extend(batch.records);
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

fn load(text: &str) -> Result<config::Config, config::ConfigError> {
    config::load_str(Path::new("/etc/weft/weft.yaml"), text, &|_| None)
}

/// The file source of a config whose `file:` block is `file_yaml` (lines
/// indented by 8).
fn file_spec(file_yaml: &str) -> SourceSpec {
    let text = format!("systems:\n  shop:\n    source:\n      file:\n{file_yaml}");
    let c = load(&text).unwrap_or_else(|e| panic!("{e}"));
    c.systems["shop"].source.clone().expect("a source")
}

/// What became of one dropped file.
#[derive(Debug)]
struct Outcome {
    goods: Vec<Value>,
    /// `error` of each bad record (it starts with the location).
    bads: Vec<String>,
    /// The quarantine report's `error:` line, if quarantined.
    quarantined: Option<String>,
}

/// Drop `bytes` as `name` into a fresh folder and run the source until the
/// file is in `processed/` or `quarantine/`.
async fn drop_file(name: &str, bytes: &[u8], extra_yaml: &str) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join(name), bytes).unwrap();
    let sp = file_spec(&format!(
        "        dir: {}\n        poll_interval: 20ms\n        settle: 0s\n{extra_yaml}",
        d.display()
    ));
    let source: Box<dyn Source> = Box::new(FileSource::new("shop", &sp).unwrap());
    let ingest = Arc::new(MemIngest::default());
    let stop = CancellationToken::new();
    let task = tokio::spawn(source.run(ingest.clone(), stop.clone()));
    let (done, quarantined) = (
        d.join("processed").join(name),
        d.join("quarantine").join(name),
    );
    wait_for(name, || done.exists() || quarantined.exists()).await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let report = std::fs::read_to_string(d.join("quarantine").join(format!("{name}.error.txt")))
        .ok()
        .map(|r| {
            r.lines()
                .find_map(|l| l.strip_prefix("error: "))
                .unwrap_or_default()
                .to_owned()
        });
    let records = ingest.records.lock().unwrap().clone();
    Outcome {
        goods: records
            .iter()
            .filter_map(|r| match r {
                Record::Good(e) => Some(e.data.clone()),
                Record::Bad(_) => None,
            })
            .collect(),
        bads: records
            .iter()
            .filter_map(|r| match r {
                Record::Bad(b) => Some(b.error.clone()),
                Record::Good(_) => None,
            })
            .collect(),
        quarantined: report,
    }
}

fn nested_json(levels: usize) -> String {
    "[".repeat(levels) + &"]".repeat(levels)
}

/// `[[..."x"...]]`: a string inside `containers` arrays.
fn nested_json_string(containers: usize) -> String {
    "[".repeat(containers) + "\"x\"" + &"]".repeat(containers)
}

fn utf16le(text: &str) -> Vec<u8> {
    let mut out = vec![0xFF, 0xFE];
    for u in text.encode_utf16() {
        out.extend(u.to_le_bytes());
    }
    out
}

fn utf16be(text: &str) -> Vec<u8> {
    let mut out = vec![0xFE, 0xFF];
    for u in text.encode_utf16() {
        out.extend(u.to_be_bytes());
    }
    out
}

// ---- CSV ----

/// An unclosed quote in the last column used to swallow the rows after it
/// into one field, with the right field count: no error at all.
#[tokio::test]
async fn csv_unterminated_quote_in_the_last_column_is_quarantined_before_any_row() {
    let o = drop_file("notes.csv", b"id,note\n1,ok\n2,\"open\n3,x\n4,y\n", "").await;
    assert_eq!(
        o.quarantined.as_deref(),
        Some(
            "line 3: a quoted field that starts in this record is never closed (the file ends \
             inside the quotes), so the lines after it would become one field; no record of the \
             file was read (rows before it: 1)"
        ),
        "{o:?}"
    );
    assert!(o.goods.is_empty() && o.bads.is_empty(), "{o:?}");
}

#[tokio::test]
async fn csv_unterminated_quote_in_a_middle_column_is_quarantined_before_any_row() {
    let o = drop_file("m.csv", b"a,b,c\n1,2,3\n4,\"x,5\n6,7,8\n", "").await;
    assert_eq!(
        o.quarantined.as_deref(),
        Some(
            "line 3: a quoted field that starts in this record is never closed (the file ends \
             inside the quotes), so the lines after it would become one field; no record of the \
             file was read (rows before it: 1)"
        ),
        "{o:?}"
    );
    assert!(o.goods.is_empty() && o.bads.is_empty(), "{o:?}");
}

/// A record over 32 MiB used to end reading mid-batch: the rows parsed
/// before it in that batch were lost while the report said they were read
/// (7,000 of 7,999 delivered). Now the check pass finds it first.
#[tokio::test]
async fn csv_record_over_32_mib_quarantines_the_file_before_any_row_is_delivered() {
    let mut text = String::from("id,blob\n");
    for i in 1..=2500 {
        text.push_str(&format!("{i},x\n"));
    }
    text.push_str("2501,\"");
    // the cap is checked between reads of 1 MiB: well over it
    text.push_str(&"y".repeat(35 << 20));
    text.push_str("\"\n2502,z\n");
    let o = drop_file("big.csv", text.as_bytes(), "        batch_size: 1000\n").await;
    assert_eq!(
        o.quarantined.as_deref(),
        Some(
            "line 2502: a CSV record longer than 32 MiB (an unclosed quote?); nothing tells where \
             the next record starts, so no record of the file was read (rows before it: 2500)"
        ),
        "{:?} {} {:?}",
        o.quarantined,
        o.goods.len(),
        o.bads
    );
    assert_eq!(o.goods.len(), 0);
}

/// A stray quote that pairs with a later one: the csv parser reads the
/// lines between as one field and the text after the closing quote as part
/// of it (`3,"ghi"` becomes `...3,ghi"`), with the right field count.
#[tokio::test]
async fn csv_stray_quote_closed_by_a_later_one_is_a_bad_record_not_a_swallowed_row() {
    let o = drop_file(
        "stray.csv",
        b"id,note\n1,\"abc\n2,def\n3,\"ghi\"\n4,ok\n5,\"a\"b\n6,\"fine, \"\"quoted\"\"\"\n",
        "",
    )
    .await;
    assert_eq!(o.quarantined, None);
    let why = "text after the closing quote of a quoted field (`\"a\"b`); if a quote in this \
               record was never meant to close, it swallowed the lines up to the next quote: not read";
    assert_eq!(
        o.bads,
        vec![
            format!("file stray.csv line 2: {why}"),
            format!("file stray.csv line 6: {why}"),
        ]
    );
    assert_eq!(
        o.goods,
        vec![
            serde_json::json!({"id": "4", "note": "ok"}),
            serde_json::json!({"id": "6", "note": "fine, \"quoted\""}),
        ]
    );
}

#[tokio::test]
async fn csv_bad_rows_go_to_the_dlq_with_their_line_and_the_rest_is_delivered() {
    let o = drop_file(
        "rows.csv",
        b"id,name\n1,Ada\n2,Bob,extra\n3,\"multi\nline\"\n4,\xffoo\n5,Eve\n",
        "",
    )
    .await;
    assert_eq!(o.quarantined, None);
    assert_eq!(
        o.bads,
        vec![
            "file rows.csv line 3: expected 2 fields (as in the header), found 3".to_owned(),
            "file rows.csv line 6: field 2 (`name`) is not valid UTF-8 (invalid utf-8 sequence \
             of 1 bytes from index 0); if the file is Latin-1 or Windows-1252, set `encoding: \
             latin-1` or `encoding: windows-1252`"
                .to_owned(),
        ]
    );
    assert_eq!(
        o.goods,
        vec![
            serde_json::json!({"id": "1", "name": "Ada"}),
            serde_json::json!({"id": "3", "name": "multi\nline"}),
            serde_json::json!({"id": "5", "name": "Eve"}),
        ]
    );
}

#[tokio::test]
async fn csv_files_that_cannot_be_read_are_quarantined_with_the_reason() {
    for (name, bytes, want) in [
        (
            "empty.csv",
            b"".to_vec(),
            "no CSV header row (the file is empty)".to_owned(),
        ),
        (
            "dup.csv",
            b"a,a\n1,2\n".to_vec(),
            "CSV header row: column `a` appears twice".to_owned(),
        ),
        (
            "utf16.csv",
            utf16le("a,b\n1,2\n"),
            "the file is UTF-16 (little-endian) (by its byte order mark); weft reads UTF-8 (and, \
             for CSV, `encoding: latin-1` or `windows-1252`): convert it to UTF-8"
                .to_owned(),
        ),
    ] {
        let o = drop_file(name, &bytes, "").await;
        assert_eq!(o.quarantined.as_deref(), Some(want.as_str()), "{name}");
        assert!(o.goods.is_empty() && o.bads.is_empty(), "{name}: {o:?}");
    }
}

// ---- JSON Lines ----

/// P2-1 (JSON side): a 100,000-level line is a bad record with a reason
/// that says so (not a parser message about recursion), and the lines
/// around it are delivered unchanged.
#[tokio::test]
async fn jsonl_line_nested_100000_levels_is_a_bad_record_and_the_rest_flows() {
    let text = format!(
        "{{\"n\":1}}\n{}\n{{\"n\":3}}\n{}\n",
        nested_json(100_000),
        "{\"a\":".repeat(100_000) + "1" + &"}".repeat(100_000)
    );
    let o = drop_file("deep.jsonl", text.as_bytes(), "").await;
    assert_eq!(o.quarantined, None);
    assert_eq!(
        o.bads,
        vec![
            "file deep.jsonl line 2: nested deeper than 128 levels (the limit), not read",
            "file deep.jsonl line 4: nested deeper than 128 levels (the limit), not read",
        ]
    );
    assert_eq!(
        o.goods,
        vec![serde_json::json!({"n": 1}), serde_json::json!({"n": 3})]
    );
}

/// The limit exactly: a value at level 128 (inside 127 arrays) is read
/// unchanged, one level more is a bad record.
#[tokio::test]
async fn jsonl_depth_limit_is_exact_and_values_under_it_arrive_unchanged() {
    let at_limit = nested_json_string(127);
    let text = format!("{at_limit}\n{}\n", nested_json_string(128));
    let o = drop_file("edge.jsonl", text.as_bytes(), "").await;
    assert_eq!(
        o.bads,
        vec!["file edge.jsonl line 2: nested deeper than 128 levels (the limit), not read"]
    );
    assert_eq!(o.goods.len(), 1);
    assert_eq!(serde_json::to_string(&o.goods[0]).unwrap(), at_limit);
}

#[tokio::test]
async fn jsonl_bad_lines_and_unreadable_files() {
    let o = drop_file("l.jsonl", b"{\"a\":1}\nnot json\n{\"a\":\n\n[1]\n", "").await;
    assert_eq!(
        o.bads,
        vec![
            "file l.jsonl line 2: expected ident at line 1 column 2",
            "file l.jsonl line 3: EOF while parsing a value at line 1 column 5",
        ]
    );
    assert_eq!(
        o.goods,
        vec![serde_json::json!({"a": 1}), serde_json::json!([1])]
    );
    let o = drop_file("bin.jsonl", b"{}\n\x00\x01", "").await;
    assert_eq!(
        o.quarantined.as_deref(),
        Some("the file is binary (it contains NUL bytes), not text")
    );
    let o = drop_file("w.jsonl", &utf16be("{\"a\":1}\n"), "").await;
    assert_eq!(
        o.quarantined.as_deref(),
        Some(
            "the file is UTF-16 (big-endian) (by its byte order mark); weft reads UTF-8 (and, \
             for CSV, `encoding: latin-1` or `windows-1252`): convert it to UTF-8"
        )
    );
}

// ---- JSON arrays ----

#[tokio::test]
async fn json_array_element_nested_100000_levels_is_a_bad_record_and_the_rest_flows() {
    let text = format!("[{{\"n\":1}},\n{},\n{{\"n\":3}}]\n", nested_json(100_000));
    let o = drop_file("deep.json", text.as_bytes(), "").await;
    assert_eq!(o.quarantined, None, "{:?}", o.quarantined);
    assert_eq!(
        o.bads,
        vec![
            "file deep.json element 2 (line 2, byte 10): nested deeper than 128 levels (the \
             limit), not read"
        ]
    );
    assert_eq!(
        o.goods,
        vec![serde_json::json!({"n": 1}), serde_json::json!({"n": 3})]
    );
    let at_limit = nested_json_string(127);
    let text = format!("[{at_limit}, {}]", nested_json_string(128));
    let o = drop_file("edge.json", text.as_bytes(), "").await;
    assert_eq!(o.bads.len(), 1, "{:?}", o.bads);
    assert!(o.bads[0].ends_with("nested deeper than 128 levels (the limit), not read"));
    assert_eq!(serde_json::to_string(&o.goods[0]).unwrap(), at_limit);
}

#[tokio::test]
async fn json_array_bad_elements_and_broken_arrays() {
    let o = drop_file("e.json", b"[{\"a\": tru}, {\"a\": 2}]", "").await;
    assert_eq!(
        o.bads,
        vec![
            "file e.json element 1 (line 1, byte 1): not valid JSON: expected ident at line 1, column 10"
        ]
    );
    assert_eq!(o.goods, vec![serde_json::json!({"a": 2})]);
    for (name, text, want) in [
        (
            "comma.json",
            "[1, 2,]",
            "malformed JSON array after 2 elements: `,` before `]` (a trailing comma) at line 1, byte 6",
        ),
        (
            "open.json",
            "[1, 2",
            "malformed JSON array after 2 elements: the file ends inside the array (no closing `]`)",
        ),
        (
            "obj.json",
            "{\"a\": 1}",
            "malformed JSON array after 0 elements: expected a JSON array (`[`) at the top level, \
             found `{` at line 1, byte 0 (for one JSON value per line use `format: jsonl`)",
        ),
    ] {
        let o = drop_file(name, text.as_bytes(), "").await;
        assert_eq!(o.quarantined.as_deref(), Some(want), "{name}");
        assert!(o.goods.is_empty() && o.bads.is_empty(), "{name}");
    }
}

// ---- XML ----

/// P2-1: a record nested 100,000 levels deep overflowed the stack and
/// aborted weft (and again at every restart). Now it is a bad record.
#[tokio::test]
async fn xml_record_nested_100000_levels_is_a_bad_record_not_a_crash() {
    let deep = "<a>".repeat(100_000) + "x" + &"</a>".repeat(100_000);
    let text = format!("<orders><order>1</order><order>{deep}</order><order>3</order></orders>");
    let o = drop_file("deep.xml", text.as_bytes(), "").await;
    assert_eq!(o.quarantined, None, "{:?}", o.quarantined);
    assert_eq!(
        o.bads,
        vec![
            "file deep.xml record 2 (byte 24): nested deeper than 128 levels (the limit), not read"
        ]
    );
    assert_eq!(o.goods, vec![Value::from("1"), Value::from("3")]);
}

/// The limit exactly: 128 elements inside one another with text in the
/// innermost make 127 objects (read); one more element is too deep; two
/// repeated children add an array level.
#[tokio::test]
async fn xml_depth_limit_is_exact() {
    let chain = |n: usize| "<a>".repeat(n) + "x" + &"</a>".repeat(n);
    // the record element plus 127 `<a>`: 127 objects and a string
    let ok = format!("<r>{}</r>", chain(127));
    let too_deep = format!("<r>{}</r>", chain(128));
    // 64 elements each holding two children: 64 objects, 63 arrays
    let twice = |n: usize| {
        let mut s = "x".to_owned();
        for _ in 0..n {
            s = format!("<b>{s}</b><b>y</b>");
        }
        s
    };
    let arrays_too_deep = format!("<r>{}</r>", twice(64));
    let text = format!("<rs>{ok}{too_deep}{arrays_too_deep}</rs>");
    let o = drop_file("edge.xml", text.as_bytes(), "").await;
    assert_eq!(o.goods.len(), 1, "{:?}", o.bads);
    let mut v = &o.goods[0];
    let mut objects = 0;
    while let Value::Object(m) = v {
        objects += 1;
        v = &m["a"];
    }
    assert_eq!((objects, v), (127, &Value::from("x")));
    assert_eq!(o.bads.len(), 2, "{:?}", o.bads);
    for b in &o.bads {
        assert!(
            b.ends_with("nested deeper than 128 levels (the limit), not read"),
            "{b}"
        );
    }
}

#[tokio::test]
async fn xml_files_that_cannot_be_read_are_quarantined_with_the_reason() {
    for (name, bytes, want) in [
        (
            "utf16.xml",
            utf16le("<?xml version=\"1.0\" encoding=\"UTF-16\"?><a><b>1</b></a>"),
            "the file is UTF-16 (little-endian) (by its byte order mark); weft reads UTF-8 (and, \
             for CSV, `encoding: latin-1` or `windows-1252`): convert it to UTF-8",
        ),
        (
            "latin.xml",
            b"<?xml version=\"1.0\" encoding=\"ISO-8859-1\"?><a><b>1</b></a>".to_vec(),
            "the XML declaration names encoding `ISO-8859-1`; XML files are read as UTF-8 only: \
             convert the file to UTF-8",
        ),
        (
            "open.xml",
            b"<a><b>1</b>".to_vec(),
            "malformed XML: the file ends with 1 element(s) still open",
        ),
    ] {
        let o = drop_file(name, &bytes, "").await;
        assert_eq!(o.quarantined.as_deref(), Some(want), "{name}");
        assert!(o.goods.is_empty() && o.bads.is_empty(), "{name}");
    }
    let o = drop_file("ent.xml", b"<a><b>&nope;</b><b>2</b></a>", "").await;
    assert_eq!(
        o.bads,
        vec![
            "file ent.xml record 1 (byte 3): unknown entity `&nope;` (entities of a DTD are not loaded)"
        ]
    );
    assert_eq!(o.goods, vec![Value::from("2")]);
}

// ---- every format ----

/// A UTF-8 byte order mark is skipped in every format; UTF-16 without one
/// is named, not called binary.
#[tokio::test]
async fn utf8_bom_is_accepted_and_utf16_without_bom_is_named() {
    for (name, text) in [
        ("bom.csv", "\u{feff}a\n1\n"),
        ("bom.jsonl", "\u{feff}{\"a\":\"1\"}\n"),
        ("bom.json", "\u{feff}[{\"a\":\"1\"}]"),
        ("bom.xml", "\u{feff}<r><a>1</a></r>"),
    ] {
        let o = drop_file(name, text.as_bytes(), "").await;
        assert_eq!(o.quarantined, None, "{name}");
        assert!(o.bads.is_empty(), "{name}: {:?}", o.bads);
        let want = if name.ends_with(".xml") {
            Value::from("1")
        } else {
            serde_json::json!({"a": "1"})
        };
        assert_eq!(o.goods, vec![want], "{name}");
    }
    let mut le = utf16le("<?xml version=\"1.0\"?><a><b>1</b></a>");
    le.drain(..2);
    let o = drop_file("nobom.xml", &le, "").await;
    assert_eq!(
        o.quarantined.as_deref(),
        Some(
            "the file is UTF-16 (little-endian, without a byte order mark); weft reads UTF-8 \
             (and, for CSV, `encoding: latin-1` or `windows-1252`): convert it to UTF-8"
        )
    );
}

/// The fuzz targets' entry point reads like the source.
#[test]
fn read_bytes_reads_like_the_source() {
    use weft_core::config::FileFormat;
    let path = ["*".to_owned(), "*".to_owned()];
    let deep = "<a>".repeat(100_000) + &"</a>".repeat(100_000);
    let text = format!("<r><x>1</x><x>{deep}</x></r>");
    let records = weft_connectors::file::read_bytes(FileFormat::Xml, &path, text.as_bytes())
        .unwrap()
        .unwrap();
    assert_eq!(records.len(), 2);
    assert!(matches!(&records[1], Record::Bad(b) if b.error.contains("nested deeper")));
    let why = weft_connectors::file::read_bytes(FileFormat::Csv, &[], b"a\n\"open\n1\n")
        .unwrap()
        .unwrap_err();
    assert!(why.contains("never closed"), "{why}");
}

// ---- config of the drop folder ----

#[test]
fn drop_folder_settle_defaults_to_10s_and_bad_keys_name_line_and_path() {
    let sp = file_spec("        dir: /data/in\n");
    let SourceSpec::File {
        settle,
        ready_marker,
        ..
    } = sp
    else {
        panic!("a file source");
    };
    assert_eq!((settle, ready_marker), (Duration::from_secs(10), None));
    for (yaml, line, path, want) in [
        (
            "        dir: /in\n        settle: 5s\n        ready_marker: .done\n",
            7,
            "systems.shop.source.file.ready_marker",
            "and `settle` exclude each other",
        ),
        (
            "        path: /in/a.csv\n        ready_marker: .done\n",
            6,
            "systems.shop.source.file.ready_marker",
            "is used only with `dir`",
        ),
        (
            "        dir: /in\n        ready_marker: a/b\n",
            6,
            "systems.shop.source.file.ready_marker",
            "not a path",
        ),
        (
            "        dir: /in\n        settle: soon\n",
            6,
            "systems.shop.source.file.settle",
            "",
        ),
    ] {
        let text = format!("systems:\n  shop:\n    source:\n      file:\n{yaml}");
        let e = load(&text).unwrap_err();
        let i = e
            .issues
            .iter()
            .find(|i| i.path == path)
            .unwrap_or_else(|| panic!("{yaml}: {e}"));
        assert_eq!(i.line, Some(line), "{yaml}: {e}");
        assert!(i.column.is_some(), "{e}");
        assert!(i.message.contains(want), "{yaml}: {}", i.message);
    }
}
