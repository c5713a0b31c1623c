//! Config loading: good files load, bad files fail with file, line and path.

use std::path::Path;

use weft_core::config::{self, ConfigError};

fn load(text: &str) -> Result<config::Config, ConfigError> {
    config::load_str(Path::new("/etc/weft/test.yaml"), text, &|k| match k {
        "SECRET" => Some("s3cret".into()),
        _ => None,
    })
}

const GOOD: &str = r#"
systems:
  crm:
    source:
      webhook:
        path: /hooks/crm
        secret: ${SECRET}
  erp:
    source:
      file:
        dir: drop/erp
  accounting:
    sink:
      sqlite:
        path: out/acc.db
        table: customers
        key: [id]
        columns: {id: text, name: text}
flows:
  crm_to_accounting:
    from: crm
    filter: .kind == "contact"
    mapping: |
      {id: .id | tostring, name: .name}
    to:
      - accounting
      - system: accounting2
"#;

#[test]
fn good_config_loads_with_defaults() {
    let text = GOOD.replace("      - system: accounting2\n", "");
    let c = load(&text).unwrap();
    assert_eq!(c.flows.len(), 1);
    let d = &c.flows[0].destinations[0];
    assert_eq!(d.delivery.max_attempts, 8);
    assert_eq!(d.delivery.concurrency, 1);
    assert_eq!(c.store.path, Path::new("/etc/weft/weft-data/weft.db"));
    assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
}

#[test]
fn unknown_destination_is_reported_with_line_and_path() {
    let e = load(GOOD).unwrap_err();
    assert_eq!(e.issues.len(), 1, "{e}");
    let i = &e.issues[0];
    assert_eq!(i.path, "flows.crm_to_accounting.to[1]");
    assert_eq!(i.line, Some(27), "{e}");
    assert!(i.message.contains("unknown system `accounting2`"), "{e}");
    assert!(e.to_string().contains("/etc/weft/test.yaml:27"), "{e}");
}

#[test]
fn unknown_key_names_path_and_line() {
    let text = GOOD.replace("        table: customers", "        tabel: customers");
    let e = load(&text).unwrap_err();
    let i = &e.issues[0];
    assert!(i.message.contains("tabel"), "{e}");
    assert_eq!(i.line, Some(16), "{e}");
    assert!(i.path.starts_with("systems.accounting.sink.sqlite"), "{e}");
}

#[test]
fn missing_env_var_is_reported_at_its_position() {
    let text = GOOD.replace("${SECRET}", "${NOPE}");
    let e = load(&text).unwrap_err();
    assert_eq!(e.issues[0].line, Some(7), "{e}");
    assert!(e.issues[0].message.contains("NOPE"), "{e}");
}

#[test]
fn bad_mapping_points_into_the_program() {
    let text = GOOD.replace("      - system: accounting2\n", "").replace(
        "{id: .id | tostring, name: .name}",
        "{id: .id | tostring, name: .name",
    );
    let e = load(&text).unwrap_err();
    let i = &e.issues[0];
    assert_eq!(i.path, "flows.crm_to_accounting.mapping");
    assert_eq!(i.line, Some(24), "{e}");
    assert!(i.message.contains("invalid jq program"), "{e}");
}

#[test]
fn all_problems_are_collected() {
    let text = GOOD
        .replace("from: crm", "from: nosuch")
        .replace("filter: .kind == \"contact\"", "filter: .kind ==");
    let e = load(&text).unwrap_err();
    assert_eq!(e.issues.len(), 3, "{e}");
}

#[test]
fn secrets_do_not_print() {
    let text = GOOD.replace("      - system: accounting2\n", "");
    let c = load(&text).unwrap();
    let dbg = format!("{c:?}");
    assert!(!dbg.contains("s3cret"));
}

// ---- file source formats and export sinks ----

const FILES: &str = r#"
systems:
  legacy:
    source:
      file:
        dir: drop/legacy
        format: csv
        delimiter: ";"
        encoding: latin-1
  shop:
    source:
      file:
        dir: drop/shop
        format: xml
        record_path: /orders/order
  finance:
    sink:
      csv:
        dir: out/finance
        columns: [id, name]
        rotate: {max_bytes: 1000, max_age: 10m, idle: 30s}
  lake:
    sink:
      jsonl:
        dir: out/lake
        prefix: events
flows:
  a:
    from: legacy
    to: [finance, lake]
  b:
    from: shop
    to: [finance]
"#;

#[test]
fn file_formats_and_export_sinks_load() {
    use std::time::Duration;
    use weft_core::config::{ExportTarget, SinkSpec, SourceSpec, TextEncoding};
    let c = load(FILES).unwrap();
    let Some(SourceSpec::File { encoding, .. }) = &c.systems["legacy"].source else {
        panic!()
    };
    assert_eq!(*encoding, TextEncoding::Latin1);
    let Some(SourceSpec::File { record_path, .. }) = &c.systems["shop"].source else {
        panic!()
    };
    assert_eq!(record_path, &["orders", "order"]);
    let Some(SinkSpec::Csv {
        target:
            ExportTarget::Dir {
                dir,
                prefix,
                rotate,
            },
        columns,
        delimiter,
        header,
        ..
    }) = &c.systems["finance"].sink
    else {
        panic!()
    };
    assert_eq!(dir, Path::new("/etc/weft/out/finance"));
    assert_eq!(prefix, "finance", "the system's name by default");
    assert_eq!(rotate.max_bytes, 1000);
    assert_eq!(rotate.max_age, Duration::from_secs(600));
    assert_eq!(rotate.idle, Duration::from_secs(30));
    assert_eq!(
        columns.as_deref(),
        Some(&["id".to_owned(), "name".to_owned()][..])
    );
    assert_eq!((*delimiter, *header), (b',', true));
    let Some(SinkSpec::Jsonl {
        target: ExportTarget::Dir { prefix, rotate, .. },
        ..
    }) = &c.systems["lake"].sink
    else {
        panic!()
    };
    assert_eq!(prefix, "events");
    assert_eq!(rotate.max_bytes, 64 << 20);
    assert_eq!(rotate.max_age, Duration::from_secs(3600));
    assert_eq!(rotate.idle, Duration::from_secs(60));
}

/// Every problem at once, each with its path, and a line where the value has one.
#[test]
fn bad_file_source_settings_are_reported() {
    let text = FILES
        .replace("encoding: latin-1", "encoding: latin-2")
        .replace("record_path: /orders/order", "record_path: orders/order")
        .replace("delimiter: \";\"", "delimiter: \"é\"");
    let e = load(&text).unwrap_err();
    let msg = e.to_string();
    assert_eq!(e.issues.len(), 3, "{msg}");
    let enc = e
        .issues
        .iter()
        .find(|i| i.path == "systems.legacy.source.file.encoding")
        .unwrap_or_else(|| panic!("{msg}"));
    assert!(
        enc.message.contains("unknown encoding `latin-2`")
            && enc
                .message
                .contains("`utf-8`, `latin-1` (ISO-8859-1) or `windows-1252`"),
        "{msg}"
    );
    assert_eq!(enc.line, Some(9), "{msg}");
    assert!(msg.contains("/etc/weft/test.yaml:9"), "{msg}");
    let rp = e
        .issues
        .iter()
        .find(|i| i.path == "systems.shop.source.file.record_path")
        .unwrap_or_else(|| panic!("{msg}"));
    assert!(rp.message.contains("must start with `/`"), "{msg}");
    assert_eq!(rp.line, Some(15), "{msg}");
    assert!(
        e.issues
            .iter()
            .any(|i| i.path == "systems.legacy.source.file.delimiter"
                && i.message.contains("single ASCII character")),
        "{msg}"
    );

    // settings of another format
    let text = FILES
        .replace("format: csv", "format: jsonl")
        .replace("format: xml", "format: json_array");
    let e = load(&text).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("`latin-1` applies to CSV files only"), "{msg}");
    assert!(
        msg.contains("delimiter`: is used only with CSV files"),
        "{msg}"
    );
    assert!(
        msg.contains("record_path`: is used only with XML files"),
        "{msg}"
    );

    // an unknown format names the ones there are
    let e = load(&FILES.replace("format: xml", "format: yaml")).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("yaml") && msg.contains("json_array"), "{msg}");
    assert!(msg.contains("systems.shop.source.file.format"), "{msg}");
}

#[test]
fn bad_export_sink_settings_are_reported() {
    let text = FILES
        .replace(
            "columns: [id, name]",
            "columns: [id, name, id]\n        delimiter: \"\\n\"\n        header: false",
        )
        .replace("max_bytes: 1000", "max_bytes: 0")
        .replace("max_age: 10m", "max_age: soon")
        .replace("prefix: events", "prefix: ../events");
    let e = load(&text).unwrap_err();
    let msg = e.to_string();
    for (path, what) in [
        (
            "systems.finance.sink.csv.columns[2]",
            "column `id` appears twice",
        ),
        (
            "systems.finance.sink.csv.delimiter",
            "cannot be a delimiter",
        ),
        (
            "systems.finance.sink.csv.rotate.max_bytes",
            "greater than 0",
        ),
        (
            "systems.finance.sink.csv.rotate.max_age",
            "`soon` is not a duration",
        ),
        (
            "systems.lake.sink.jsonl.prefix",
            "`../events`: expected a file name start",
        ),
    ] {
        assert!(
            e.issues
                .iter()
                .any(|i| i.path == path && i.message.contains(what)),
            "{path}: {what}\n{msg}"
        );
    }
    let dup = e
        .issues
        .iter()
        .find(|i| i.path == "systems.finance.sink.csv.columns[2]")
        .unwrap();
    assert_eq!(dup.line, Some(20), "{msg}");

    // path and dir; rotate without dir; header: false without columns
    let text = FILES
        .replace(
            "        dir: out/finance\n",
            "        dir: out/finance\n        path: out/f.csv\n",
        )
        .replace("        dir: out/lake\n", "        path: out/lake.jsonl\n")
        .replace("columns: [id, name]", "header: false");
    let e = load(&text).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("at `systems.finance.sink.csv`: exactly one of `path`"),
        "{msg}"
    );
    assert!(
        msg.contains("`systems.lake.sink.jsonl.prefix`: `prefix` is used only with `dir`"),
        "{msg}"
    );
    assert!(msg.contains("`header: false` needs `columns`"), "{msg}");

    // an unknown key inside rotate: line and path
    let e = load(&FILES.replace("idle: 30s", "idel: 30s")).unwrap_err();
    let i = &e.issues[0];
    assert!(i.message.contains("idel"), "{e}");
    assert!(i.path.starts_with("systems.finance.sink.csv.rotate"), "{e}");
    assert_eq!(i.line, Some(21), "{e}");
}
