//! The SQLite sink against real database files.

use std::collections::BTreeMap;

use rusqlite::Connection;
use serde_json::{Value, json};
use weft_connectors::sqlite::SqliteSink;
use weft_connectors::{Delivery, Sink};
use weft_core::ErrorKind;
use weft_core::config::raw::SqliteSinkConfig;

fn delivery(id: i64, payload: Value) -> Delivery {
    Delivery {
        id,
        idempotency_key: format!("k-{id}"),
        correlation_id: "c-1".into(),
        event_id: id.to_string(),
        entity_key: None,
        attempt: 1,
        payload,
        context: Default::default(),
    }
}

fn cfg(columns: Option<&[(&str, &str)]>) -> SqliteSinkConfig {
    SqliteSinkConfig {
        path: "unused".into(),
        table: "contacts".into(),
        key: vec!["id".into()],
        columns: columns.map(|c| {
            c.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect::<BTreeMap<_, _>>()
        }),
        version_column: None,
    }
}

type ContactRow = (i64, String, f64, Option<i64>, Option<String>);

const COLS: &[(&str, &str)] = &[
    ("id", "integer"),
    ("name", "text"),
    ("score", "real"),
    ("active", "boolean"),
    ("meta", "json"),
];

#[tokio::test]
async fn upsert_inserts_then_updates() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/folder/out.db");
    let sink = SqliteSink::open(&cfg(Some(COLS)), &path).unwrap();
    let r = sink
        .write(&[
            delivery(
                1,
                json!({"id": 1, "name": "Ada", "score": 1.5, "active": true, "meta": {"a": [1]}}),
            ),
            delivery(
                2,
                json!({"id": "2", "name": "Bob", "score": "2", "active": "false"}),
            ),
        ])
        .await;
    assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
    let r = sink
        .write(&[
            delivery(3, json!({"id": 1, "name": "Ada L.", "score": 9.0})),
            // the same key twice in one batch: the last one wins
            delivery(4, json!({"id": 2, "name": "Bobby"})),
            delivery(5, json!({"id": 2, "name": "Robert"})),
        ])
        .await;
    assert!(r.iter().all(|r| r.is_ok()), "{r:?}");

    let conn = Connection::open(&path).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let rows: Vec<ContactRow> = conn
        .prepare("SELECT id, name, score, active, meta FROM contacts ORDER BY id")
        .unwrap()
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        rows,
        vec![
            (
                1,
                "Ada L.".into(),
                9.0,
                Some(1),
                Some(r#"{"a":[1]}"#.into())
            ),
            (2, "Robert".into(), 2.0, Some(0), None),
        ]
    );
}

#[tokio::test]
async fn type_errors_name_the_column_and_fail_only_that_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.db");
    let sink = SqliteSink::open(&cfg(Some(COLS)), &path).unwrap();
    let r = sink
        .write(&[
            delivery(1, json!({"id": 1, "name": "ok"})),
            delivery(2, json!({"id": "two", "name": "bad id"})),
            delivery(3, json!({"id": 3, "name": {"first": "x"}})),
            delivery(4, json!([1, 2])),
            delivery(5, json!({"name": "no key"})),
            delivery(6, json!({"id": 6, "active": "maybe"})),
            delivery(7, json!({"id": 7, "name": "also ok"})),
        ])
        .await;
    assert_eq!(r.len(), 7);
    assert!(r[0].is_ok() && r[6].is_ok(), "{r:?}");
    let msg = |i: usize| {
        let e = r[i].as_ref().unwrap_err();
        assert_eq!(e.kind, ErrorKind::Permanent);
        e.message.clone()
    };
    assert!(
        msg(1).contains("`id`") && msg(1).contains("integer"),
        "{}",
        msg(1)
    );
    assert!(
        msg(2).contains("`name`") && msg(2).contains("text"),
        "{}",
        msg(2)
    );
    assert!(msg(3).contains("JSON object"), "{}", msg(3));
    assert!(msg(4).contains("key column `id`"), "{}", msg(4));
    assert!(
        msg(5).contains("`active`") && msg(5).contains("boolean"),
        "{}",
        msg(5)
    );
    let conn = Connection::open(&path).unwrap();
    let ids: Vec<i64> = conn
        .prepare("SELECT id FROM contacts ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(ids, vec![1, 7]);
}

#[tokio::test]
async fn without_columns_writes_payload_fields_into_existing_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.db");
    // no table and no columns: refused at open
    assert!(
        SqliteSink::open(&cfg(None), &path)
            .err()
            .unwrap()
            .contains("does not exist")
    );
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE contacts (id INTEGER PRIMARY KEY, name TEXT NOT NULL, tags TEXT)",
        )
        .unwrap();
    }
    let sink = SqliteSink::open(&cfg(None), &path).unwrap();
    let r = sink
        .write(&[
            delivery(1, json!({"id": 1, "name": "a", "tags": ["x"]})),
            delivery(2, json!({"id": 2, "name": "b", "nope": 1})),
            // refused by the database (NOT NULL): fails alone
            delivery(3, json!({"id": 3, "name": null})),
            delivery(4, json!({"id": 1, "name": "a2"})),
        ])
        .await;
    assert!(r[0].is_ok() && r[3].is_ok(), "{r:?}");
    assert!(r[1].as_ref().unwrap_err().message.contains("`nope`"));
    let r2 = sink
        .write(&[delivery(
            9,
            json!({"id": 9, "name": "x", "bad name; --": 1}),
        )])
        .await;
    assert!(
        r2[0]
            .as_ref()
            .unwrap_err()
            .message
            .contains("not a plain SQL identifier"),
        "{r2:?}"
    );
    assert_eq!(r[2].as_ref().unwrap_err().kind, ErrorKind::Permanent);
    let conn = Connection::open(&path).unwrap();
    let row: (String, String) = conn
        .query_row("SELECT name, tags FROM contacts WHERE id = 1", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(row, ("a2".into(), r#"["x"]"#.into()));
    let n: i64 = conn
        .query_row("SELECT count(*) FROM contacts", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
}

#[tokio::test]
async fn locked_database_is_retryable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.db");
    let sink = SqliteSink::open(&cfg(Some(COLS)), &path).unwrap();
    let other = Connection::open(&path).unwrap();
    other
        .busy_timeout(std::time::Duration::from_millis(10))
        .unwrap();
    other
        .execute_batch("BEGIN IMMEDIATE; INSERT INTO contacts (id) VALUES (99);")
        .unwrap();
    // the sink waits busy_timeout (5 s) and then reports busy
    let r = sink.write(&[delivery(1, json!({"id": 1}))]).await;
    assert_eq!(
        r[0].as_ref().unwrap_err().kind,
        ErrorKind::Retryable,
        "{r:?}"
    );
    other.execute_batch("COMMIT").unwrap();
    let r = sink.write(&[delivery(1, json!({"id": 1}))]).await;
    assert!(r[0].is_ok());
}

/// The MariaDB sink folded keys sharing their first 8 bytes into one row
/// (a `Debug` rendering); pin that this sink keeps them apart.
#[tokio::test]
async fn long_keys_sharing_a_prefix_are_not_folded_together() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.db");
    let cfg = SqliteSinkConfig {
        key: vec!["code".into(), "region".into()],
        ..cfg(Some(&[
            ("code", "text"),
            ("region", "text"),
            ("v", "integer"),
        ]))
    };
    let sink = SqliteSink::open(&cfg, &path).unwrap();
    let r = sink
        .write(&[
            delivery(
                1,
                json!({"code": "customer-1", "region": "europe-west", "v": 1}),
            ),
            delivery(
                2,
                json!({"code": "customer-2", "region": "europe-west", "v": 2}),
            ),
            delivery(
                3,
                json!({"code": "customer-3", "region": "europe-west", "v": 3}),
            ),
            delivery(
                4,
                json!({"code": "customer-1", "region": "europe-east", "v": 4}),
            ),
            delivery(
                5,
                json!({"code": "customer-2", "region": "europe-west", "v": 22}),
            ),
        ])
        .await;
    assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
    let conn = Connection::open(&path).unwrap();
    let rows: Vec<(String, String, i64)> = conn
        .prepare("SELECT code, region, v FROM contacts ORDER BY code, region")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        rows,
        vec![
            ("customer-1".into(), "europe-east".into(), 4),
            ("customer-1".into(), "europe-west".into(), 1),
            ("customer-2".into(), "europe-west".into(), 22),
            ("customer-3".into(), "europe-west".into(), 3),
        ]
    );
}

/// With `version_column`, a write older than the row's version (a replay, a
/// late duplicate) leaves the row as it is and still counts as done.
#[tokio::test]
async fn a_stale_write_does_not_overwrite_a_newer_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.db");
    let cfg = SqliteSinkConfig {
        version_column: Some("v".into()),
        ..cfg(Some(&[
            ("id", "integer"),
            ("name", "text"),
            ("v", "integer"),
        ]))
    };
    let sink = SqliteSink::open(&cfg, &path).unwrap();
    let w = |d: i64, name: &str, v: i64| delivery(d, json!({"id": 1, "name": name, "v": v}));
    // in one batch too: the older row after the newer one changes nothing
    let r = sink.write(&[w(1, "new", 5), w(2, "old", 3)]).await;
    assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
    let row = || -> (String, i64) {
        Connection::open(&path)
            .unwrap()
            .query_row("SELECT name, v FROM contacts WHERE id = 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap()
    };
    assert_eq!(row(), ("new".to_string(), 5));
    assert!(sink.write(&[w(3, "newer", 6)]).await[0].is_ok());
    assert_eq!(row(), ("newer".to_string(), 6));
}
