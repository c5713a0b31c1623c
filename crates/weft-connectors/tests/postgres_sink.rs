//! The PostgreSQL sink against the real PostgreSQL on 127.0.0.1:5432
//! (user postgres, database `test`). Skipped with a message when it is not
//! reachable, unless `CI=true`, where that is a failure.
#![cfg(feature = "postgres")]

use std::collections::BTreeMap;

use serde_json::{Value, json};
use tokio_postgres::{Client, NoTls};
use weft_connectors::postgres::PostgresSink;
use weft_connectors::{Delivery, Sink};
use weft_core::ErrorKind;
use weft_core::config::Secret;
use weft_core::config::raw::PostgresSinkConfig;

/// The test database; `WEFT_TEST_PG_URL` overrides it.
fn url() -> String {
    std::env::var("WEFT_TEST_PG_URL")
        .unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/test".into())
}

async fn admin() -> Option<Client> {
    let url = url();
    match tokio_postgres::connect(&url, NoTls).await {
        Ok((client, conn)) => {
            tokio::spawn(conn);
            Some(client)
        }
        Err(e) => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("PostgreSQL at {url} is not reachable and CI=true: {e}");
            }
            eprintln!("!!!!!! SKIPPING PostgreSQL test: {url} is not reachable: {e} !!!!!!");
            None
        }
    }
}

/// A uniquely named table, dropped on drop.
struct Table {
    name: String,
    client: Client,
}

impl Table {
    async fn create(client: Client, ddl_cols: &str) -> Table {
        let name = format!("weft_test_{}", uuid::Uuid::new_v4().simple());
        client
            .batch_execute(&format!("CREATE TABLE {name} ({ddl_cols})"))
            .await
            .unwrap();
        Table { name, client }
    }
    async fn drop_table(self) {
        self.client
            .batch_execute(&format!("DROP TABLE IF EXISTS {}", self.name))
            .await
            .unwrap();
    }
}

fn cfg(table: &str, cols: &[(&str, &str)], key: &[&str]) -> PostgresSinkConfig {
    PostgresSinkConfig {
        url: Secret::new(url()),
        table: format!("public.{table}"),
        key: key.iter().map(|k| k.to_string()).collect(),
        columns: cols
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect::<BTreeMap<_, _>>(),
        version_column: None,
    }
}

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

const DDL: &str = "id bigint PRIMARY KEY, name text, amount numeric, n integer, ok boolean, \
                   at timestamptz, doc jsonb";
const COLS: &[(&str, &str)] = &[
    ("id", "bigint"),
    ("name", "text"),
    ("amount", "numeric"),
    ("n", "integer"),
    ("ok", "boolean"),
    ("at", "timestamptz"),
    ("doc", "jsonb"),
];

#[tokio::test]
async fn upsert_inserts_then_updates() {
    let Some(client) = admin().await else { return };
    let t = Table::create(client, DDL).await;
    let sink = PostgresSink::connect(&cfg(&t.name, COLS, &["id"]))
        .await
        .unwrap();
    let r = sink
        .write(&[
            delivery(
                1,
                json!({"id": 1, "name": "Ada", "amount": "12345678901234567890.123456789", "n": 5,
                               "ok": true, "at": "2024-05-01T10:00:00Z", "doc": {"a": [1, 2]}}),
            ),
            delivery(
                2,
                json!({"id": "2", "name": "Bob", "amount": 0.1, "n": "7", "ok": "false",
                               "at": "2024-05-01T12:00:00+02:00", "doc": "s"}),
            ),
        ])
        .await;
    assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
    let r = sink
        .write(&[
            delivery(3, json!({"id": 1, "name": "Ada L.", "amount": 1})),
            // the same key twice in one batch: the last one wins
            delivery(4, json!({"id": 2, "name": "Bobby"})),
            delivery(5, json!({"id": 2, "name": "Robert", "n": 9})),
            delivery(6, json!({"id": 3, "name": "Cy"})),
        ])
        .await;
    assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
    let rows = t
        .client
        .query(
            &format!(
                "SELECT id, name, amount::text, n, ok, extract(epoch from at)::bigint, doc::text FROM {} ORDER BY id",
                t.name
            ),
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(i64, String, Option<String>, Option<i32>)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        got,
        vec![
            (1, "Ada L.".into(), Some("1".into()), None),
            (2, "Robert".into(), None, Some(9)),
            (3, "Cy".into(), None, None),
        ]
    );
    // first batch's exact values, before they were replaced
    let sink2 = PostgresSink::connect(&cfg(&t.name, COLS, &["id"]))
        .await
        .unwrap();
    sink2
        .write(&[delivery(7, json!({"id": 10, "amount": "12345678901234567890.123456789",
                                     "ok": "t", "at": "2024-05-01T12:00:00+02:00", "doc": {"a": [1]}}))])
        .await;
    let row = t
        .client
        .query_one(
            &format!("SELECT amount::text, ok, extract(epoch from at)::bigint, doc::text FROM {} WHERE id = 10", t.name),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "12345678901234567890.123456789");
    assert!(row.get::<_, bool>(1));
    assert_eq!(row.get::<_, i64>(2), 1714557600);
    assert_eq!(row.get::<_, String>(3), r#"{"a": [1]}"#);
    t.drop_table().await;
}

#[tokio::test]
async fn other_types_roundtrip() {
    let Some(client) = admin().await else { return };
    let t = Table::create(
        client,
        "id integer PRIMARY KEY, f double precision, r real, s smallint, d date, u uuid, at timestamptz, tags text[]",
    )
    .await;
    let cols = [
        ("id", "integer"),
        ("f", "double precision"),
        ("r", "real"),
        ("s", "smallint"),
        ("d", "date"),
        ("u", "uuid"),
        ("at", "timestamptz"),
        ("tags", "text[]"),
    ];
    let sink = PostgresSink::connect(&cfg(&t.name, &cols, &["id"]))
        .await
        .unwrap();
    let r = sink
        .write(&[
            delivery(
                1,
                json!({"id": 1, "f": 0.1, "r": "2.5", "s": 7, "d": "2024-02-29",
                               "u": "67e55044-10b1-426f-9247-bb680e5fe0c8",
                               "at": "2024-05-01T10:00:00.123456789Z", "tags": "{a,b}"}),
            ),
            delivery(2, json!({"id": 2, "s": 70000})),
            delivery(3, json!({"id": 3, "d": "2024-02-30"})),
            delivery(4, json!({"id": 4, "u": "nope"})),
        ])
        .await;
    assert!(r[0].is_ok(), "{r:?}");
    assert!(r[1].as_ref().unwrap_err().message.contains("`s`"));
    assert!(r[2].as_ref().unwrap_err().message.contains("`d`"));
    assert!(r[3].as_ref().unwrap_err().message.contains("`u`"));
    let row = t
        .client
        .query_one(
            &format!(
                "SELECT f, r, s, d::text, u::text, to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'), \
                 array_to_string(tags, '|') FROM {} WHERE id = 1",
                t.name
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, f64>(0), 0.1);
    assert_eq!(row.get::<_, f32>(1), 2.5);
    assert_eq!(row.get::<_, i16>(2), 7);
    assert_eq!(row.get::<_, String>(3), "2024-02-29");
    assert_eq!(
        row.get::<_, String>(4),
        "67e55044-10b1-426f-9247-bb680e5fe0c8"
    );
    assert_eq!(row.get::<_, String>(5), "2024-05-01 10:00:00.123457");
    assert_eq!(row.get::<_, String>(6), "a|b");
    t.drop_table().await;
}

#[tokio::test]
async fn type_errors_name_the_column_and_fail_only_that_record() {
    let Some(client) = admin().await else { return };
    let t = Table::create(client, DDL).await;
    let sink = PostgresSink::connect(&cfg(&t.name, COLS, &["id"]))
        .await
        .unwrap();
    let r = sink
        .write(&[
            delivery(1, json!({"id": 1, "name": "ok"})),
            delivery(2, json!({"id": "x", "name": "bad id"})),
            delivery(3, json!({"id": 3, "amount": "12,5"})),
            delivery(4, json!({"id": 4, "n": 3_000_000_000i64})),
            delivery(5, json!({"id": 5, "at": "yesterday"})),
            delivery(6, json!({"id": 6, "name": {"o": 1}})),
            delivery(7, json!("not an object")),
            delivery(8, json!({"name": "no key"})),
            delivery(9, json!({"id": 9, "ok": "perhaps"})),
            delivery(10, json!({"id": 10, "name": "also ok"})),
        ])
        .await;
    assert_eq!(r.len(), 10);
    assert!(r[0].is_ok() && r[9].is_ok(), "{r:?}");
    for (i, col) in [
        (1, "`id`"),
        (2, "`amount`"),
        (3, "`n`"),
        (4, "`at`"),
        (5, "`name`"),
        (6, "JSON object"),
        (7, "`id`"),
        (8, "`ok`"),
    ] {
        let e = r[i].as_ref().unwrap_err();
        assert_eq!(e.kind, ErrorKind::Permanent, "{e}");
        assert!(e.message.contains(col), "{i}: {}", e.message);
    }
    let n: i64 = t
        .client
        .query_one(&format!("SELECT count(*) FROM {}", t.name), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    t.drop_table().await;
}

#[tokio::test]
async fn rows_the_database_refuses_fail_alone() {
    let Some(client) = admin().await else { return };
    // a CHECK constraint Rust cannot know about
    let t = Table::create(
        client,
        "id bigint PRIMARY KEY, qty integer CHECK (qty >= 0)",
    )
    .await;
    let sink = PostgresSink::connect(&cfg(
        &t.name,
        &[("id", "bigint"), ("qty", "integer")],
        &["id"],
    ))
    .await
    .unwrap();
    let r = sink
        .write(&[
            delivery(1, json!({"id": 1, "qty": 1})),
            delivery(2, json!({"id": 2, "qty": -1})),
            delivery(3, json!({"id": 3, "qty": 3})),
        ])
        .await;
    assert!(r[0].is_ok() && r[2].is_ok(), "{r:?}");
    let e = r[1].as_ref().unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent);
    assert!(e.message.contains("23514"), "{}", e.message);
    t.drop_table().await;
}

#[tokio::test]
async fn broken_connection_is_retryable_then_reconnects() {
    let Some(client) = admin().await else { return };
    let t = Table::create(client, "id bigint PRIMARY KEY, v text").await;
    let sink = PostgresSink::connect(&cfg(&t.name, &[("id", "bigint"), ("v", "text")], &["id"]))
        .await
        .unwrap();
    assert!(sink.write(&[delivery(1, json!({"id": 1, "v": "a"}))]).await[0].is_ok());
    // kill the sink's connection(s) from the server side
    let killed = t
        .client
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid() AND query LIKE $1",
            &[&format!("%INSERT INTO \"public\".\"{}\"%", t.name)],
        )
        .await
        .unwrap();
    assert_eq!(killed, 1, "the sink's one connection");
    // no pause: the first write may still pick the dead connection
    let mut results = Vec::new();
    for i in 2..5 {
        results.push(
            sink.write(&[delivery(i, json!({"id": i, "v": "b"}))])
                .await
                .remove(0),
        );
    }
    // a write on the dead connection is Retryable (unless the sink noticed
    // it closed first); the next one connects again and succeeds
    if let Err(e) = &results[0] {
        assert_eq!(e.kind, ErrorKind::Retryable, "{e}");
    }
    assert!(results[1..].iter().all(|r| r.is_ok()), "{results:?}");
    eprintln!("writes after the connection was killed: {results:?}");
    assert!(results.last().unwrap().is_ok(), "{results:?}");
    let n: i64 = t
        .client
        .query_one(&format!("SELECT count(*) FROM {}", t.name), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n as usize, 1 + results.iter().filter(|r| r.is_ok()).count());
    t.drop_table().await;
}

#[tokio::test]
async fn missing_table_fails_at_connect() {
    let Some(_client) = admin().await else { return };
    let err = PostgresSink::connect(&cfg("weft_no_such_table_x", &[("id", "bigint")], &["id"]))
        .await
        .err()
        .unwrap();
    assert!(err.contains("42P01"), "{err}");
}

/// `ON CONFLICT (key)` finds its unique index only when PostgreSQL plans
/// the statement (the first write), not when it is prepared: the sink asks
/// the catalog at connect, so a table without a usable unique key on
/// exactly the key columns fails at start instead of dead-lettering every
/// record. Composite keys match in any order.
#[tokio::test]
async fn a_key_without_a_unique_index_fails_at_connect() {
    let Some(client) = admin().await else { return };
    let cols = &[("a", "text"), ("b", "text"), ("v", "text")];
    for (ddl, key, fits) in [
        ("a text, b text, v text", &["a"][..], false),
        ("a text, b text, v text, UNIQUE (a, b)", &["a"][..], false),
        (
            "a text, b text, v text, PRIMARY KEY (a, b)",
            &["b", "a"][..],
            true,
        ),
        ("a text UNIQUE, b text, v text", &["a"][..], true),
        (
            "a text, b text, v text, UNIQUE (a) DEFERRABLE INITIALLY DEFERRED",
            &["a"][..],
            false,
        ),
    ] {
        let t = Table::create(admin().await.unwrap(), ddl).await;
        let got = PostgresSink::connect(&cfg(&t.name, cols, key)).await;
        match (&got, fits) {
            (Ok(_), true) => {}
            (Err(e), false) => assert!(e.contains("no primary key or unique index"), "{ddl}: {e}"),
            (Ok(_), false) => panic!("{ddl}: accepted key {key:?} without a unique index"),
            (Err(e), true) => panic!("{ddl}: refused key {key:?}: {e}"),
        }
        if fits {
            let sink = got.unwrap();
            let r = sink
                .write(&[delivery(1, json!({"a": "x", "b": "y", "v": "1"}))])
                .await;
            assert!(r[0].is_ok(), "{ddl}: {:?}", r[0]);
        }
        // a partial index cannot serve `ON CONFLICT (a)` either
        t.drop_table().await;
    }
    let t = Table::create(client, "a text, b text, v text").await;
    t.client
        .batch_execute(&format!(
            "CREATE UNIQUE INDEX ON {} (a) WHERE v IS NOT NULL",
            t.name
        ))
        .await
        .unwrap();
    let err = PostgresSink::connect(&cfg(&t.name, cols, &["a"]))
        .await
        .err()
        .unwrap();
    assert!(err.contains("no primary key or unique index"), "{err}");
    t.drop_table().await;
}

/// The MariaDB sink folded keys sharing their first 8 bytes into one row
/// (a `Debug` rendering); pin that this sink folds on the real values.
#[tokio::test]
async fn long_keys_sharing_a_prefix_are_not_folded_together() {
    let Some(client) = admin().await else { return };
    let t = Table::create(
        client,
        "code text, region text, v integer, PRIMARY KEY (code, region)",
    )
    .await;
    let cols = [("code", "text"), ("region", "text"), ("v", "integer")];
    let sink = PostgresSink::connect(&cfg(&t.name, &cols, &["code", "region"]))
        .await
        .unwrap();
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
    let got: Vec<(String, String, i32)> = t
        .client
        .query(
            &format!(
                "SELECT code, region, v FROM {} ORDER BY code, region",
                t.name
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        got,
        vec![
            ("customer-1".into(), "europe-east".into(), 4),
            ("customer-1".into(), "europe-west".into(), 1),
            ("customer-2".into(), "europe-west".into(), 22),
            ("customer-3".into(), "europe-west".into(), 3),
        ]
    );
    t.drop_table().await;
}

/// With `version_column`, a write older than the row's version (a replay, a
/// late duplicate) leaves the row as it is and still counts as done.
#[tokio::test]
async fn a_stale_write_does_not_overwrite_a_newer_version() {
    let Some(client) = admin().await else { return };
    let t = Table::create(client, "id bigint PRIMARY KEY, name text, v bigint").await;
    let cols = [("id", "bigint"), ("name", "text"), ("v", "bigint")];
    let mut c = cfg(&t.name, &cols, &["id"]);
    c.version_column = Some("v".into());
    let sink = PostgresSink::connect(&c).await.unwrap();
    let w = |d: i64, name: &str, v: i64| delivery(d, json!({"id": 1, "name": name, "v": v}));
    assert!(sink.write(&[w(1, "new", 5)]).await[0].is_ok());
    let r = sink.write(&[w(2, "old", 3)]).await;
    assert!(r[0].is_ok(), "a stale write is done, not an error: {r:?}");
    let q = format!("SELECT name, v FROM {} WHERE id = 1", t.name);
    let r = t.client.query_one(&q, &[]).await.unwrap();
    assert_eq!(
        (r.get::<_, String>(0), r.get::<_, i64>(1)),
        ("new".to_string(), 5)
    );
    assert!(sink.write(&[w(3, "newer", 6)]).await[0].is_ok());
    let r = t.client.query_one(&q, &[]).await.unwrap();
    assert_eq!(
        (r.get::<_, String>(0), r.get::<_, i64>(1)),
        ("newer".to_string(), 6)
    );
}

/// Whether the sink's connection (found by its `application_name`) uses TLS.
async fn uses_tls(client: &Client, app: &str) -> Option<bool> {
    client
        .query_opt(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a ON a.pid = s.pid \
             WHERE a.application_name = $1",
            &[&app],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}

fn with_params(params: &str) -> String {
    let base = url();
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}{params}")
}

/// Review P2-3: TLS to PostgreSQL. `require` (and the default `prefer`)
/// encrypt, `disable` does not, `verify-full` checks the certificate
/// against `sslrootcert` and refuses one it cannot verify.
#[tokio::test]
async fn tls_by_sslmode() {
    let Some(client) = admin().await else { return };
    let ssl: String = client.query_one("SHOW ssl", &[]).await.unwrap().get(0);
    if ssl != "on" {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("the test PostgreSQL has ssl=off and CI=true");
        }
        eprintln!("!!!!!! SKIPPING the TLS test: the PostgreSQL server has ssl=off !!!!!!");
        return;
    }
    let t = Table::create(admin().await.unwrap(), "id bigint PRIMARY KEY, name text").await;
    let cols = [("id", "bigint"), ("name", "text")];
    for (i, (mode, want)) in [("require", true), ("prefer", true), ("disable", false)]
        .into_iter()
        .enumerate()
    {
        let app = format!("weft_tls_{}_{mode}", std::process::id());
        let mut c = cfg(&t.name, &cols, &["id"]);
        c.url = Secret::new(with_params(&format!(
            "sslmode={mode}&application_name={app}"
        )));
        let sink = PostgresSink::connect(&c).await.unwrap();
        let r = sink
            .write(&[delivery(i as i64 + 1, json!({"id": i, "name": mode}))])
            .await;
        assert!(r[0].is_ok(), "{mode}: {:?}", r[0]);
        assert_eq!(uses_tls(&client, &app).await, Some(want), "sslmode={mode}");
    }
    // verify-full against a root that did not sign the server's certificate
    let root = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/unrelated-ca.pem"
    );
    let mut c = cfg(&t.name, &cols, &["id"]);
    c.url = Secret::new(with_params(&format!(
        "sslmode=verify-full&sslrootcert={root}"
    )));
    let err = match PostgresSink::connect(&c).await {
        Ok(_) => panic!("verify-full accepted a certificate the root did not sign"),
        Err(e) => e,
    };
    assert!(err.contains("cannot connect to PostgreSQL"), "{err}");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    // a root file that does not exist: a config error naming it
    c.url = Secret::new(with_params(
        "sslmode=verify-full&sslrootcert=/nonexistent/root.pem",
    ));
    let err = match PostgresSink::connect(&c).await {
        Ok(_) => panic!("a missing sslrootcert was accepted"),
        Err(e) => e,
    };
    assert!(err.contains("sslrootcert `/nonexistent/root.pem`"), "{err}");
    t.drop_table().await;
}
