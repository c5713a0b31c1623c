//! Canonical models, value maps, contracts and drift through the binary:
//! `examples/canonical` validated and mapped, bad contracts and mappings
//! refused by `weft validate` with their lines, `weft contract check`, drift
//! recorded once and quarantined (and released by `weft drift accept`),
//! `on_violation: reject` answered with 422.

mod common;

use std::path::{Path, PathBuf};

use common::{Hub, jsonl_lines, wait_for, weft_cmd};
use serde_json::Value;
use std::time::Duration;

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/canonical")
}

fn out(o: &std::process::Output) -> (i32, String, String) {
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The `-> erp: {...}` payloads printed by `weft map test`.
fn payloads(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("-> erp: "))
        .map(|j| serde_json::from_str(j).unwrap())
        .collect()
}

#[test]
fn canonical_example_validates_and_maps_both_systems_into_one_shape() {
    let dir = example_dir();
    let (code, stdout, stderr) = out(&weft_cmd(&dir, &["validate", "weft.yaml"]));
    assert_eq!(code, 0, "{stdout}{stderr}");

    let (code, stdout, stderr) = out(&weft_cmd(
        &dir,
        &[
            "map",
            "test",
            "-c",
            "weft.yaml",
            "--flow",
            "crm_customers",
            "samples/crm.jsonl",
        ],
    ));
    assert_eq!(code, 0, "{stdout}{stderr}");
    let crm = payloads(&stdout);
    assert_eq!(crm.len(), 6, "{stdout}");
    // CRM "Company Type" (5 values) onto the ERP's 12 categories
    let cats: Vec<&str> = crm
        .iter()
        .map(|p| p["customer_category"].as_str().unwrap())
        .collect();
    assert_eq!(
        cats,
        [
            "CUSTOMER_ACTIVE",
            "PROSPECT",
            "PARTNER_CHANNEL",    // partner + reseller
            "PARTNER_TECHNOLOGY", // partner + technology
            "SUPPLIER",
            "UNCLASSIFIED" // "other": no equivalent, the default
        ]
    );
    // decimals stay strings, whatever the input's notation
    assert_eq!(crm[0]["credit_limit"], "1250.50");
    assert_eq!(crm[4]["credit_limit"], "1000.00");

    let (code, stdout, stderr) = out(&weft_cmd(
        &dir,
        &[
            "map",
            "test",
            "-c",
            "weft.yaml",
            "--flow",
            "shop_customers",
            "-",
        ],
    ));
    // stdin is empty here: no records, nothing failed
    assert_eq!(code, 0, "{stdout}{stderr}");
    let (code, stdout, stderr) = out(&weft_cmd(
        &dir,
        &[
            "map",
            "test",
            "-c",
            "weft.yaml",
            "--flow",
            "shop_customers",
            "samples/shop.jsonl",
        ],
    ));
    assert_eq!(code, 0, "{stdout}{stderr}");
    let shop = payloads(&stdout);
    // "J. Smith, Acme Ltd" (CRM) and "John Smith, Acme Limited" (shop): one shape
    assert_eq!(crm[0]["company"], "Acme");
    assert_eq!(shop[0]["company"], "Acme");
    assert_eq!(crm[0]["name"], "J. Smith");
    assert_eq!(shop[0]["name"], "John Smith");
    let keys = |v: &Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&crm[0]), keys(&shop[0]));
    assert_eq!(crm[0]["customer_category"], shop[0]["customer_category"]);
}

#[test]
fn bad_records_fail_map_test_with_masked_violations() {
    let dir = example_dir();
    let (code, stdout, _) = out(&weft_cmd(
        &dir,
        &[
            "map",
            "test",
            "-c",
            "weft.yaml",
            "--flow",
            "crm_customers",
            "samples/crm_bad.jsonl",
        ],
    ));
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("0 passed, 3 failed"), "{stdout}");
    // format: email on a sensitive field: the path and rule, never the value
    assert!(
        stdout.contains("/email must satisfy `format: \"email\"`"),
        "{stdout}"
    );
    assert!(stdout.contains("(value: \"***\")"), "{stdout}");
    assert!(!stdout.contains("not-an-email"), "{stdout}");
    assert!(stdout.contains("/last_name"), "{stdout}");
    assert!(
        stdout.contains("to_decimal_string: `lots` is not a number"),
        "{stdout}"
    );
}

#[test]
fn bad_contracts_and_mappings_fail_validate_with_locations() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("bad.json"), r#"{"type": "strng"}"#).unwrap();
    std::fs::write(d.join("broken.json"), "{\"type\": ").unwrap();
    std::fs::write(d.join("ok.json"), r#"{"type": "object"}"#).unwrap();
    let cfg = r#"entities:
  a:
    contract: missing.json
  b:
    contract: bad.json
  c:
    contract: broken.json
  d:
    contract: ok.json
    sensitive: [email]
value_maps:
  m:
    map:
      x:
        when: '.kind =='
        then: X
systems:
  f:
    source:
      file:
        path: in.jsonl
  out:
    sink:
      jsonl:
        path: out.jsonl
flows:
  one:
    from: f
    entity: nope
    on_violation: reject
    mapping: '{c: valuemap("unknown"; .t)}'
    to:
      - system: out
        contract: bad.json
  two:
    from: f
    mapping: '{c: (.t | valuemap("m")) '
    to: [out]
"#;
    std::fs::write(d.join("weft.yaml"), cfg).unwrap();
    let (code, stdout, stderr) = out(&weft_cmd(d, &["validate", "weft.yaml"]));
    assert_eq!(code, 2, "{stdout}{stderr}");
    for (line, what) in [
        (":3:", "cannot read contract"),
        (":5:", "not a valid JSON Schema"),
        (":7:", "is not JSON"),
        (":10:", "is not a JSON pointer"),
        (":15:", "invalid jq predicate"),
        (":29:", "unknown entity `nope`"),
        (":31:", "unknown value map `unknown`"),
        (":34:", "not a valid JSON Schema"),
        (":37:", "invalid jq program"),
    ] {
        assert!(
            stderr.lines().any(|l| l.contains(line) && l.contains(what)),
            "expected {what} at {line}:\n{stderr}"
        );
    }
    assert!(
        stderr.contains("`reject` refuses the request of a webhook"),
        "{stderr}"
    );
}

#[test]
fn contract_check_reports_compatibility_and_exits_by_mode() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let v1 = r#"{"type": "object", "required": ["id"], "properties": {"id": {"type": "string"}, "tier": {"enum": ["A", "B"]}}}"#;
    // new optional field, new enum value: old data still reads (backward)
    let v2 = r#"{"type": "object", "required": ["id"], "properties": {"id": {"type": "string"}, "tier": {"enum": ["A", "B", "C"]}, "note": {"type": "string"}}}"#;
    // a required field added: old data lacks it
    let v3 = r#"{"type": "object", "required": ["id", "note"], "properties": {"id": {"type": "string"}, "tier": {"enum": ["A", "B"]}, "note": {"type": "string"}}}"#;
    for (n, t) in [("v1.json", v1), ("v2.json", v2), ("v3.json", v3)] {
        std::fs::write(d.join(n), t).unwrap();
    }
    let (code, stdout, _) = out(&weft_cmd(d, &["contract", "check", "v1.json", "v2.json"]));
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("compatibility backward"), "{stdout}");
    assert!(
        stdout.contains("/tier enum_value_added: \"C\" (breaks forward)"),
        "{stdout}"
    );
    let (code, _, _) = out(&weft_cmd(
        d,
        &["contract", "check", "v1.json", "v2.json", "--mode", "full"],
    ));
    assert_eq!(code, 1);
    let (code, stdout, _) = out(&weft_cmd(
        d,
        &["contract", "check", "v1.json", "v3.json", "--json"],
    ));
    assert_eq!(code, 1, "{stdout}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["compatibility"], "forward");
    assert_eq!(v["changes"][0]["change"], "required_added");
    let (code, _, _) = out(&weft_cmd(
        d,
        &[
            "contract", "check", "v1.json", "v3.json", "--mode", "forward",
        ],
    ));
    assert_eq!(code, 0);
}

#[test]
fn string_to_array_drift_is_recorded_once_listed_and_quarantined_before_it_breaks_the_mapping() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // records 1-10 carry `tags` as a string, 11-12 as an array
    let cfg = r#"systems:
  crm:
    source:
      generate:
        count: 12
        template: '{id: $seq, email: "u\($seq)@x.example", tags: (if $seq <= 10 then "VIP" else ["VIP", "Gold"] end)}'
  out:
    sink:
      jsonl:
        path: out.jsonl
flows:
  tags:
    from: crm
    on_drift: quarantine
    mapping: '{id: .id, tag: (.tags | ascii_downcase)}'
    to: [out]
"#;
    std::fs::write(d.join("weft.yaml"), cfg).unwrap();
    let (code, stdout, stderr) = out(&weft_cmd(
        d,
        &[
            "run",
            "weft.yaml",
            "--until-idle",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ],
    ));
    assert_eq!(code, 0, "{stdout}{stderr}");
    let written = std::fs::read_to_string(d.join("out.jsonl")).unwrap();
    assert_eq!(written.lines().count(), 10);

    let (code, stdout, _) = out(&weft_cmd(
        d,
        &["drift", "list", "-c", "weft.yaml", "--json"],
    ));
    assert_eq!(code, 0);
    let events: Vec<Value> = serde_json::from_str(&stdout).unwrap();
    let changed: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "type_changed")
        .collect();
    assert_eq!(changed.len(), 1, "{stdout}");
    assert_eq!(changed[0]["path"], "/tags");
    assert_eq!(changed[0]["detail"], "string -> array");
    assert_eq!(changed[0]["count"], 2);
    assert_eq!(changed[0]["example"], "[\"VIP\",\"Gold\"]");
    let (_, text, _) = out(&weft_cmd(d, &["drift", "list", "-c", "weft.yaml"]));
    assert!(
        text.contains("crm type_changed /tags string -> array (2 records"),
        "{text}"
    );

    // quarantined with the drift as the error, not a mapping failure
    let (_, dlq, _) = out(&weft_cmd(d, &["dlq", "list", "-c", "weft.yaml", "--json"]));
    let dlq: Vec<Value> = serde_json::from_str(&dlq).unwrap();
    assert_eq!(dlq.len(), 2, "{dlq:?}");
    for e in &dlq {
        let err = e["error"].as_str().unwrap();
        assert!(
            err.starts_with("drift: type_changed /tags (string -> array)"),
            "{err}"
        );
    }
    // a second run sees nothing new: the shape was kept
    let (code, _, _) = out(&weft_cmd(
        d,
        &[
            "run",
            "weft.yaml",
            "--until-idle",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ],
    ));
    assert_eq!(code, 0);
    let (_, stdout, _) = out(&weft_cmd(
        d,
        &["drift", "list", "-c", "weft.yaml", "--json"],
    ));
    let again: Vec<Value> = serde_json::from_str(&stdout).unwrap();
    assert_eq!(again.len(), events.len());
}

#[test]
fn reject_mode_refuses_a_webhook_with_422_and_the_violations() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("c.json"),
        r#"{"type": "object", "required": ["id", "email"], "properties": {"id": {"type": "integer"}, "email": {"type": "string", "format": "email"}}}"#,
    )
    .unwrap();
    let cfg = r#"entities:
  contact:
    contract: c.json
    sensitive: [/email]
systems:
  crm:
    source:
      webhook:
        path: /hooks/crm
  out:
    sink:
      jsonl:
        path: out.jsonl
flows:
  contacts:
    from: crm
    entity: contact
    on_violation: reject
    to: [out]
"#;
    std::fs::write(d.join("weft.yaml"), cfg).unwrap();
    let hub = Hub::start(d, "weft.yaml", 0, &[]);
    let client = reqwest::blocking::Client::new();
    let post = |body: &str| {
        let r = client
            .post(hub.url("/hooks/crm"))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .unwrap();
        (r.status().as_u16(), r.text().unwrap())
    };
    let (status, body) = post(r#"{"id": "x", "email": "secret-not-an-email"}"#);
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("/id") && body.contains("/email"), "{body}");
    assert!(!body.contains("secret-not-an-email"), "{body}");
    let (status, body) = post(r#"{"id": 1, "email": "a@b.example"}"#);
    assert!(status < 300, "{status} {body}");
    // a field turning from string to array: recorded, counted in the metrics
    let (status, _) = post(r#"{"id": 2, "email": "a@b.example", "tags": "x"}"#);
    assert!(status < 300);
    let (status, _) = post(r#"{"id": 3, "email": "a@b.example", "tags": ["x"]}"#);
    assert!(status < 300);
    let metrics = client
        .get(hub.admin_url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let line = |name: &str, label: &str| {
        metrics
            .lines()
            .any(|l| l.starts_with(name) && l.contains(label))
    };
    assert!(
        line("weft_contract_violations_total", "mode=\"reject\""),
        "{metrics}"
    );
    assert!(
        line("weft_drift_events_total", "kind=\"type_changed\""),
        "{metrics}"
    );
    assert!(!metrics.contains("secret-not-an-email"));
}

/// A destination that answers every request `400` quoting the request body
/// back, as many APIs do ("email 'x@y' is invalid").
fn echoing_destination() -> String {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut len = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let l = line.to_ascii_lowercase();
                    if let Some(v) = l.strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0u8; len];
                if reader.read_exact(&mut body).is_err() {
                    return;
                }
                let reply = format!("invalid record: {}", String::from_utf8_lossy(&body));
                let mut s = stream;
                let _ = write!(
                    s,
                    "HTTP/1.1 400 Bad Request\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
                    reply.len()
                );
            });
        }
    });
    format!("http://{addr}")
}

/// Review P2-6: a sensitive field must not reach the DLQ or the log through
/// a destination's error body, also after a destination mapping renamed it.
#[test]
fn a_destination_echoing_a_renamed_sensitive_field_does_not_leak_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("c.json"),
        r#"{"type": "object", "required": ["id"], "properties": {"id": {"type": "integer"}, "email": {"type": "string"}}}"#,
    )
    .unwrap();
    let url = echoing_destination();
    let cfg = format!(
        r#"entities:
  contact:
    contract: c.json
    sensitive: [/email]
systems:
  crm:
    source:
      webhook:
        path: /hooks/crm
  api:
    sink:
      http:
        url: {url}/contacts
flows:
  contacts:
    from: crm
    entity: contact
    key: .id
    to:
      - system: api
        mapping: '{{ref: .id, contact_email: .email}}'
        delivery:
          max_attempts: 1
"#
    );
    std::fs::write(d.join("weft.yaml"), cfg).unwrap();
    let hub = Hub::start(d, "weft.yaml", 0, &[]);
    let r = reqwest::blocking::Client::new()
        .post(hub.url("/hooks/crm"))
        .header("content-type", "application/json")
        .body(r#"{"id": 7, "email": "ada.lovelace@example.org"}"#)
        .send()
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let dlq = || -> Vec<Value> {
        let (_, stdout, _) = out(&weft_cmd(d, &["dlq", "list", "-c", "weft.yaml", "--json"]));
        serde_json::from_str(&stdout).unwrap_or_default()
    };
    wait_for(Duration::from_secs(30), "the DLQ entry", || {
        dlq().len() == 1
    });
    let entry = &dlq()[0];
    let error = entry["error"].as_str().unwrap_or_default().to_owned();
    assert!(error.contains("400"), "{entry}");
    assert!(error.contains("[redacted]"), "{entry}");
    assert!(!error.contains("ada.lovelace"), "{entry}");
    let log = hub.log_text();
    assert!(!log.contains("ada.lovelace"), "{log}");
    hub.stop();
}

/// Guarantee: an accepted drift is no longer a reason to quarantine.
/// `weft drift accept ID --replay` beside a running hub replays the entries
/// that drift quarantined (delivered once each), the hub follows the
/// acceptance (a later record with the same drift is delivered), and a
/// drift that was not accepted still quarantines.
#[test]
fn an_accepted_drift_releases_its_quarantine_beside_the_running_hub() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = r#"systems:
  crm:
    source:
      webhook: {path: /hooks/crm, id_field: .id | tostring}
  out:
    sink:
      jsonl:
        path: out.jsonl
flows:
  tags:
    from: crm
    key: .id | tostring
    on_drift: quarantine
    mapping: '{id: .id, tags: .tags}'
    to: [out]
"#;
    std::fs::write(d.join("weft.yaml"), cfg).unwrap();
    let hub = Hub::start(d, "weft.yaml", 0, &[]);
    let http = reqwest::blocking::Client::new();
    let post = |id: u32, tags: Value| {
        let r = http
            .post(hub.url("/hooks/crm"))
            .json(&serde_json::json!({"id": id, "tags": tags}))
            .send()
            .unwrap();
        assert!(r.status().is_success(), "{id}: {}", r.status());
    };
    let lines = || -> usize {
        std::fs::read_to_string(d.join("out.jsonl"))
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    for id in 1..=10 {
        post(id, Value::from("VIP"));
    }
    for id in 11..=12 {
        post(id, serde_json::json!(["VIP", "Gold"]));
    }
    wait_for(Duration::from_secs(20), "10 written", || lines() == 10);
    let dlq = |status: &str| -> Vec<Value> {
        let (_, s, _) = out(&weft_cmd(
            d,
            &[
                "dlq",
                "list",
                "-c",
                "weft.yaml",
                "--status",
                status,
                "--json",
            ],
        ));
        serde_json::from_str(&s).unwrap()
    };
    wait_for(Duration::from_secs(20), "2 quarantined", || {
        dlq("dead").len() == 2
    });

    let (_, listed, _) = out(&weft_cmd(
        d,
        &["drift", "list", "-c", "weft.yaml", "--json"],
    ));
    let events: Vec<Value> = serde_json::from_str(&listed).unwrap();
    let find = |kind: &str, path: &str| {
        let e = events
            .iter()
            .find(|e| e["kind"] == kind && e["path"] == path)
            .unwrap_or_else(|| panic!("{listed}"));
        assert_eq!(e["accepted_at"], Value::Null);
        e["id"].as_i64().unwrap().to_string()
    };
    // the array shows two drifts: the type change and its elements' path
    let id = find("type_changed", "/tags");
    let elements = find("new_field", "/tags/*");

    // one of two accepted: the entries still show the other, and stay
    let (code, stdout, stderr) = out(&weft_cmd(
        d,
        &["drift", "accept", "-c", "weft.yaml", &id, "--replay"],
    ));
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!(
            "accepted #{id} crm type_changed /tags (string -> array)"
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains("0 quarantined entries replayed"),
        "{stdout}"
    );
    assert!(
        stdout.contains("2 quarantined entries still show drift"),
        "{stdout}"
    );
    assert_eq!(dlq("dead").len(), 2);
    let (code, stdout, stderr) = out(&weft_cmd(
        d,
        &["drift", "accept", "-c", "weft.yaml", &elements, "--replay"],
    ));
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("2 quarantined entries replayed"),
        "{stdout}{:?}",
        dlq("dead")
    );
    wait_for(Duration::from_secs(20), "the 2 replayed written", || {
        lines() == 12
    });
    assert!(dlq("dead").is_empty());
    // a second accept changes nothing; an unknown id is an error
    let (_, again, _) = out(&weft_cmd(d, &["drift", "accept", "-c", "weft.yaml", &id]));
    assert!(again.contains("was accepted before"), "{again}");
    let (code, _, err) = out(&weft_cmd(
        d,
        &["drift", "accept", "-c", "weft.yaml", "999999"],
    ));
    assert_eq!(code, 1);
    assert!(err.contains("no drift event #999999"), "{err}");

    // the running hub follows: a new array record goes through
    wait_for(
        Duration::from_secs(20),
        "the hub took the acceptance",
        || hub.log_text().contains("drift accepted"),
    );
    post(13, serde_json::json!(["New"]));
    wait_for(Duration::from_secs(20), "13 written", || lines() == 13);
    // another drift, not accepted, is still quarantined
    post(14, Value::from(5));
    wait_for(Duration::from_secs(20), "14 quarantined", || {
        dlq("dead").iter().any(|e| {
            e["error"]
                .as_str()
                .unwrap_or("")
                .contains("string -> number")
                || e["error"].as_str().unwrap_or("").contains("-> number")
        })
    });
    assert_eq!(lines(), 13);
    let (_, text, _) = out(&weft_cmd(d, &["drift", "list", "-c", "weft.yaml"]));
    assert!(text.contains(", accepted"), "{text}");
    // every line of the export is a distinct record
    let mut ids: Vec<i64> = jsonl_lines(&d.join("out.jsonl"))
        .iter()
        .map(|v| {
            v["id"]
                .as_i64()
                .or_else(|| v["payload"]["id"].as_i64())
                .unwrap()
        })
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 13);
    hub.stop();
}
