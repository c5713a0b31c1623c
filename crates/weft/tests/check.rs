//! Guarantee: `weft check CONFIG` connects to every configured system and
//! says, per system, whether weft can work with it — and which problem it
//! has — without writing anything: a missing table, a sink table without a
//! unique key, refused credentials, an unreachable host, a missing stream
//! fail with the reason; what weft would create is reported as such; the
//! exit code is 1 when a check failed.
//!
//! Against the real services on loopback (PostgreSQL with
//! `wal_level = logical`, MariaDB with the binlog, NATS, RabbitMQ, Redis,
//! Mosquitto), a real HTTP server of the test's own and real files. Skipped
//! with a message when a service is missing, unless `CI=true`, where that
//! is a failure.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use mysql_async::prelude::Queryable;
use serde_json::Value;
use tokio_postgres::NoTls;

const PG: &str = "postgresql://postgres@127.0.0.1:5432/test";
const MY: &str = "mysql://root@127.0.0.1:3306/test";

fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

fn services_up() -> bool {
    let up = [5432u16, 3306, 4222, 5672, 6379, 1883].iter().all(|p| {
        std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], *p)),
            Duration::from_secs(1),
        )
        .is_ok()
    });
    if !up {
        assert!(
            !ci(),
            "CI=true but a service is not answering (PostgreSQL, MariaDB, NATS, RabbitMQ, Redis, Mosquitto)"
        );
        eprintln!("SKIPPED: weft check test needs the local services (see SERVICES.md)");
    }
    up
}

/// An API with one page of two records at `/items`, and 401 at `/locked`
/// unless `Authorization: Bearer good`.
fn api(rt: &tokio::runtime::Runtime) -> std::net::SocketAddr {
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    let app = axum::Router::new()
        .route(
            "/items",
            axum::routing::get(|| async {
                axum::Json(serde_json::json!({"items": [{"id": 1}, {"id": 2}]}))
            }),
        )
        .route(
            "/locked/",
            axum::routing::head(|h: HeaderMap| async move {
                let good = h
                    .get("authorization")
                    .is_some_and(|v| v.as_bytes() == b"Bearer good");
                if good {
                    StatusCode::METHOD_NOT_ALLOWED.into_response()
                } else {
                    StatusCode::UNAUTHORIZED.into_response()
                }
            }),
        );
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

#[test]
fn check_reports_each_system_with_its_problem() {
    if !services_up() {
        return;
    }
    let sfx = unique_suffix();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let addr = api(&rt);
    let (pg, conn) = rt.block_on(tokio_postgres::connect(PG, NoTls)).unwrap();
    rt.spawn(conn);
    let keyed = format!("check_keyed_{sfx}");
    let unkeyed = format!("check_unkeyed_{sfx}");
    let captured = format!("check_cdc_{sfx}");
    rt.block_on(pg.batch_execute(&format!(
        "CREATE TABLE {keyed} (id text PRIMARY KEY, name text);
         CREATE TABLE {unkeyed} (id text, name text);
         CREATE TABLE {captured} (id int PRIMARY KEY, name text);"
    )))
    .unwrap();
    let my_table = format!("check_my_{sfx}");
    let mut my = rt
        .block_on(mysql_async::Conn::from_url(MY))
        .expect("MariaDB");
    rt.block_on(my.query_drop(format!(
        "CREATE TABLE {my_table} (id INT PRIMARY KEY, name TEXT)"
    )))
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let closed = free_port();
    let config = format!(
        r#"store:
  path: weft-data/weft.db
server:
  listen: 127.0.0.1:{listen}
  admin_listen: 127.0.0.1:{admin}
systems:
  gen:
    source:
      generate: {{count: 1, template: '{{id: "x"}}'}}
  poll:
    source:
      rest:
        url: http://{addr}/items
        records: .items
        id_field: .id | tostring
        interval: 60s
  inbox:
    source:
      file: {{dir: no-such-folder, format: csv}}
  pg_changes:
    source:
      postgres_cdc:
        url: {PG}
        tables: [{captured}]
        publication: weft_check_pub_{sfx}
        slot: weft_check_slot_{sfx}
  my_changes:
    source:
      mysql_cdc:
        url: {MY}
        tables: [{my_table}]
  bus:
    source:
      nats:
        url: nats://127.0.0.1:4222
        stream: CHECK_{sfx}
        subject: check.{sfx}
        consumer: weft
        create: false
  rabbit:
    source:
      amqp:
        url: amqp://guest:guest@127.0.0.1:5672/%2f
        queue: check-{sfx}
        event_id: content
  stream:
    source:
      redis:
        url: redis://127.0.0.1:6379
        stream: check:{sfx}
        group: weft
  plant:
    source:
      mqtt:
        url: mqtt://127.0.0.1:1883
        topics: ['check/{sfx}/#']
        event_id: {{field: .id}}
  keyed:
    sink:
      postgres:
        url: {PG}
        table: {keyed}
        key: [id]
        columns: {{id: text, name: text}}
  unkeyed:
    sink:
      postgres:
        url: {PG}
        table: {unkeyed}
        key: [id]
        columns: {{id: text, name: text}}
  missing:
    sink:
      postgres:
        url: {PG}
        table: check_missing_{sfx}
        key: [id]
        columns: {{id: text}}
  maria:
    sink:
      mysql:
        url: {MY}
        table: {my_table}
        key: [id]
        columns: {{id: int, name: text}}
  locked:
    sink:
      http:
        url: http://{addr}/locked/{{id}}
        headers: {{Authorization: Bearer wrong}}
  open:
    sink:
      http:
        url: http://{addr}/locked/{{id}}
        headers: {{Authorization: Bearer good}}
  down:
    sink:
      http: {{url: "http://127.0.0.1:{closed}/x"}}
  broker_down:
    sink:
      mqtt: {{url: "mqtt://127.0.0.1:{closed}", topic: out}}
  out:
    sink:
      jsonl: {{path: out/all.jsonl}}
flows:
  f_gen: {{from: gen, to: [keyed, unkeyed, missing, maria, locked, open, down, broker_down, out]}}
  f_poll: {{from: poll, to: [out]}}
  f_inbox: {{from: inbox, to: [out]}}
  f_pg: {{from: pg_changes, to: [out]}}
  f_my: {{from: my_changes, to: [out]}}
  f_bus: {{from: bus, to: [out]}}
  f_rabbit: {{from: rabbit, to: [out]}}
  f_stream: {{from: stream, to: [out]}}
  f_plant: {{from: plant, to: [out]}}
"#,
        listen = free_port(),
        admin = free_port(),
    );
    std::fs::write(dir.path().join("weft.yaml"), &config).unwrap();

    let out = weft_cmd(dir.path(), &["check", "weft.yaml", "--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let lines: BTreeMap<String, (String, String)> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                format!(
                    "{} {}",
                    c["system"].as_str().unwrap(),
                    c["role"].as_str().unwrap()
                ),
                (
                    c["verdict"].as_str().unwrap().to_owned(),
                    c["detail"].as_str().unwrap().to_owned(),
                ),
            )
        })
        .collect();
    let expect = |name: &str, verdict: &str, needle: &str| {
        let (v, d) = lines
            .get(name)
            .unwrap_or_else(|| panic!("no line for {name}: {stdout}"));
        assert_eq!(v, verdict, "{name}: {d}");
        assert!(d.contains(needle), "{name}: `{d}` lacks `{needle}`");
    };
    expect("store store", "ok", "will be created");
    expect("server server", "ok", "are free");
    expect("gen source", "ok", "nothing to connect");
    expect("poll source", "ok", "2 records on the first page");
    expect("inbox source", "fail", "cannot list");
    expect(
        "pg_changes source",
        "ok",
        "a test slot was created and dropped",
    );
    expect(
        "pg_changes source",
        "ok",
        &format!("publication `weft_check_pub_{sfx}` will be created"),
    );
    expect("my_changes source", "ok", "1 tables found");
    expect("bus source", "fail", "does not exist (and `create: false`)");
    expect("rabbit source", "ok", "weft declares it");
    expect("stream source", "ok", "weft creates it");
    expect("plant source", "ok", "connected to 127.0.0.1:1883");
    expect("keyed sink", "ok", "INSERT and UPDATE granted");
    expect("unkeyed sink", "fail", "unique");
    expect("missing sink", "fail", &format!("check_missing_{sfx}"));
    expect("maria sink", "ok", "unique key on (id)");
    expect("locked sink", "fail", "401");
    expect("open sink", "ok", "405");
    expect("down sink", "fail", &format!("127.0.0.1:{closed}"));
    expect("broker_down sink", "fail", &format!("127.0.0.1:{closed}"));
    expect("out sink", "ok", "will be created");
    assert_eq!(report["ok"], false);

    // nothing was written or left behind: no store, no export, no slot,
    // no publication, no stream, no queue
    assert!(
        !dir.path().join("weft-data").exists(),
        "the check made the store"
    );
    assert!(
        !dir.path().join("out").exists(),
        "the check made the export folder"
    );
    let slots = rt
        .block_on(pg.query(
            "SELECT slot_name::text FROM pg_replication_slots WHERE slot_name LIKE 'weft_check%'",
            &[],
        ))
        .unwrap();
    assert!(
        slots.is_empty(),
        "slots left: {:?}",
        slots
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
    );
    let pubs = rt
        .block_on(pg.query(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&format!("weft_check_pub_{sfx}")],
        ))
        .unwrap();
    assert!(pubs.is_empty(), "the check created the publication");
    let redis_type = std::process::Command::new("redis-cli")
        .args(["TYPE", &format!("check:{sfx}")])
        .output();
    if let Ok(o) = redis_type {
        assert_eq!(
            String::from_utf8_lossy(&o.stdout).trim(),
            "none",
            "the check created the stream"
        );
    }

    // the text form: one line per check and a summary; a clean config exits 0
    let text = weft_cmd(dir.path(), &["check", "weft.yaml"]);
    let shown = String::from_utf8_lossy(&text.stdout);
    assert!(shown.contains("FAIL  unkeyed"), "{shown}");
    assert!(shown.contains("failed"), "{shown}");
    let good = format!(
        "systems:\n  gen:\n    source:\n      generate: {{count: 1, template: '{{id: \"x\"}}'}}\n  keyed:\n    sink:\n      postgres:\n        url: {PG}\n        table: {keyed}\n        key: [id]\n        columns: {{id: text, name: text}}\nflows:\n  f: {{from: gen, to: [keyed]}}\nserver:\n  listen: 127.0.0.1:{}\n  admin_listen: 127.0.0.1:{}\n",
        free_port(),
        free_port()
    );
    std::fs::write(dir.path().join("good.yaml"), good).unwrap();
    let ok = weft_cmd(dir.path(), &["check", "good.yaml"]);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&ok.stdout),
        String::from_utf8_lossy(&ok.stderr)
    );

    rt.block_on(pg.batch_execute(&format!(
        "DROP TABLE {keyed}; DROP TABLE {unkeyed}; DROP TABLE {captured};"
    )))
    .unwrap();
    rt.block_on(my.query_drop(format!("DROP TABLE {my_table}")))
        .unwrap();
}

/// Guarantee: `weft run --until-idle` reports progress from the store's
/// counters: plain lines when asked (or off a terminal), the last one with
/// every record done; none with `--progress off`.
#[test]
fn until_idle_reports_progress_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "store:\n  path: weft.db\nserver:\n  listen: 127.0.0.1:{}\n  admin_listen: 127.0.0.1:{}\nsystems:\n  gen:\n    source:\n      generate: {{count: 3000, template: '{{id: $seq, fail: ($seq % 1000 == 0)}}'}}\n  out:\n    sink:\n      jsonl: {{path: out.jsonl}}\nflows:\n  f:\n    from: gen\n    key: .id | tostring\n    filter: .fail | not\n    to: [out]\n",
        free_port(),
        free_port()
    );
    std::fs::write(dir.path().join("weft.yaml"), &config).unwrap();
    let out = weft_cmd(
        dir.path(),
        &["run", "weft.yaml", "--until-idle", "--progress", "plain"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let last = stderr
        .lines()
        .rfind(|l| l.starts_with("progress: "))
        .unwrap_or_else(|| panic!("no progress line: {stderr}"));
    assert!(
        last.starts_with(
            "progress: 3000 received, 3000 done (2997 delivered, 0 dead-lettered), 0 pending"
        ),
        "{last}"
    );
    assert_eq!(jsonl_lines(&dir.path().join("out.jsonl")).len(), 2997);

    // a second run over the same store counts only its own records
    let again = weft_cmd(
        dir.path(),
        &["run", "weft.yaml", "--until-idle", "--progress", "plain"],
    );
    let stderr = String::from_utf8_lossy(&again.stderr);
    let last = stderr
        .lines()
        .rfind(|l| l.starts_with("progress: "))
        .unwrap_or_else(|| panic!("no progress line: {stderr}"));
    assert!(last.starts_with("progress: 0 received, 0 done"), "{last}");

    let quiet = weft_cmd(
        dir.path(),
        &["run", "weft.yaml", "--until-idle", "--progress", "off"],
    );
    let stderr = String::from_utf8_lossy(&quiet.stderr);
    assert!(quiet.status.success(), "{stderr}");
    assert!(!stderr.contains("progress: "), "{stderr}");
}
