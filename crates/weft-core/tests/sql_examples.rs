//! The SQL examples (`examples/databases`, `examples/reverse-etl`) load, and
//! `sql_poll`/`mysql` mistakes are reported with their paths.

use std::path::{Path, PathBuf};
use std::time::Duration;

use weft_core::config::{self, SinkSpec, SourceSpec};

fn example(dir: &str) -> (PathBuf, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(dir)
        .join("weft.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    (path, text)
}

fn env(k: &str) -> Option<String> {
    match k {
        "MARIADB_URL" => Some("mysql://root@127.0.0.1:3306/test".into()),
        "WAREHOUSE_URL" => Some("postgresql://postgres@127.0.0.1:5432/test".into()),
        "CRM_API" => Some("https://crm.example.com/api".into()),
        "CRM_TOKEN" => Some("t0k3n".into()),
        _ => None,
    }
}

#[test]
fn databases_example_loads() {
    let (path, text) = example("databases");
    let c = config::load_str(&path, &text, &env).unwrap_or_else(|e| panic!("{e}"));
    let Some(SourceSpec::SqlPoll {
        sqlite_path,
        name,
        interval,
        batch_size,
        ..
    }) = &c.systems["legacy"].source
    else {
        panic!("not a sql_poll source");
    };
    assert!(
        sqlite_path
            .as_ref()
            .unwrap()
            .ends_with("databases/legacy.db")
    );
    assert_eq!(name, "customers");
    assert_eq!(*interval, Duration::from_secs(5));
    assert_eq!(*batch_size, 200);
    assert!(matches!(
        c.systems["crm_db"].sink,
        Some(SinkSpec::Mysql { .. })
    ));
    assert_eq!(c.flows[0].destinations[0].delivery.concurrency, 1);
}

#[test]
fn reverse_etl_example_loads() {
    let (path, text) = example("reverse-etl");
    let c = config::load_str(&path, &text, &env).unwrap_or_else(|e| panic!("{e}"));
    let src = c.systems["warehouse"].source.as_ref().unwrap();
    assert_eq!(src.kind(), "sql_poll");
    let SourceSpec::SqlPoll { name, cfg, .. } = src else {
        panic!()
    };
    assert_eq!(name, "account_scores");
    assert!(cfg.query.as_ref().unwrap().value.contains("{checkpoint}"));
    assert_eq!(c.systems["crm"].sink.as_ref().unwrap().kind(), "http");
}

#[test]
fn sql_mistakes_are_reported_together() {
    let text = r#"
systems:
  a:
    source:
      sql_poll:
        url: oracle://x
        query: "SELECT * FROM t"
        cursor: updated_at
        key: updated_at
        batch_size: 0
  b:
    source:
      sql_poll:
        url: "sqlite:"
        table: t
        query: "SELECT * FROM t WHERE {checkpoint} ORDER BY a, b LIMIT {limit}"
        cursor: "bad col"
        key: id
  c:
    sink:
      mysql:
        url: postgresql://x
        table: a.b.c
        key: [id]
        columns: {name: "text; drop"}
"#;
    let e = config::load_str(Path::new("/x/weft.yaml"), text, &|_| None).unwrap_err();
    let s = e.to_string();
    for want in [
        "systems.a.source.sql_poll.url",
        "must contain `{checkpoint}` and `{limit}`",
        "must `ORDER BY updated_at, updated_at`",
        "systems.a.source.sql_poll.name",
        "systems.a.source.sql_poll.key",
        "systems.a.source.sql_poll.batch_size",
        "`sqlite:` needs a file path",
        "exactly one of `table` and `query`",
        "systems.b.source.sql_poll.cursor",
        "systems.c.sink.mysql.url",
        "systems.c.sink.mysql.table",
        "key column `id` is not among `columns`",
        "is not a MySQL type name",
    ] {
        assert!(s.contains(want), "missing {want:?} in:\n{s}");
    }
    assert!(
        !s.contains("oracle://x"),
        "the URL may hold a password: {s}"
    );
}
