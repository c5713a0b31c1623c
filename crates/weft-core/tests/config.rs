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

// ---- `${ENV}` interpolation happens per scalar, after parsing (P2-7) ----

fn load_env(text: &str, env: &[(&str, &str)]) -> Result<config::Config, ConfigError> {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    config::load_str(Path::new("/etc/weft/test.yaml"), text, &move |k| {
        env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    })
}

const HOOK: &str = "systems:\n  crm:\n    source:\n      webhook: {path: /hooks/crm, secret: SECRET_HERE}\n  out:\n    sink: {jsonl: {path: out.jsonl}}\nflows:\n  f: {from: crm, to: [out]}\n";

fn webhook_of(c: &config::Config) -> (String, usize) {
    match &c.systems["crm"].source {
        Some(config::SourceSpec::Webhook {
            cfg,
            max_body_bytes,
            ..
        }) => (
            cfg.secret
                .as_ref()
                .map(|s| s.expose().to_owned())
                .unwrap_or_default(),
            *max_body_bytes,
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn p2_7_secret_with_hash_in_unquoted_scalar_is_kept_whole() {
    let c = load_env(
        &HOOK.replace(
            "{path: /hooks/crm, secret: SECRET_HERE}",
            "\n        path: /hooks/crm\n        secret: ${S}",
        ),
        &[("S", "abc #def")],
    )
    .unwrap();
    assert_eq!(webhook_of(&c).0, "abc #def");
}

#[test]
fn p2_7_a_quote_in_a_value_cannot_inject_keys() {
    let c = load_env(
        &HOOK.replace("SECRET_HERE", "\"${S}\""),
        &[("S", "a\", max_body_bytes: 5, event_type: \"x")],
    )
    .unwrap();
    let (secret, max) = webhook_of(&c);
    assert_eq!(secret, "a\", max_body_bytes: 5, event_type: \"x");
    assert_eq!(max, 1 << 20, "max_body_bytes must not be injected");
    // a newline in a value cannot change the document either: it is kept
    let c = load_env(
        &HOOK.replace("SECRET_HERE", "\"${S}\""),
        &[("S", "x\ny: 1")],
    )
    .unwrap();
    assert_eq!(webhook_of(&c).0, "x\ny: 1");
}

#[test]
fn interpolation_forms_are_kept() {
    let text = HOOK.replace(
        "secret: SECRET_HERE",
        "secret: \"pre-${A}-${B:-dflt}-$${A}-$$\", max_body_bytes: \"${N}\"",
    );
    let c = load_env(&text, &[("A", "alpha"), ("N", "2048")]).unwrap();
    assert_eq!(webhook_of(&c), ("pre-alpha-dflt-${A}-$".to_owned(), 2048));
    // keys are never interpolated
    let e = load_env(
        &HOOK.replace("secret: SECRET_HERE", "\"${K}\": x"),
        &[("K", "secret")],
    )
    .unwrap_err();
    assert!(e.to_string().contains("${K}"), "{e}");
    // inside `{...}` an unquoted `${VAR}` is not YAML: the error says to quote it
    let e = load_env(&HOOK.replace("SECRET_HERE", "${A}"), &[("A", "alpha")]).unwrap_err();
    assert!(
        e.to_string().contains("write `\"${VAR}\"` in quotes"),
        "{e}"
    );
}

#[test]
fn interpolation_errors_point_at_the_scalar() {
    // line 4, the scalar starts at column 43
    let e = load_env(&HOOK.replace("SECRET_HERE", "\"${NOPE}\""), &[]).unwrap_err();
    assert_eq!(e.issues.len(), 1, "{e}");
    let i = &e.issues[0];
    assert_eq!((i.line, i.column), (Some(4), Some(43)), "{e}");
    assert!(i.message.contains("`NOPE` is not set"), "{e}");
    assert!(e.to_string().contains("/etc/weft/test.yaml:4:43"), "{e}");
    let e = load_env(
        &HOOK.replace("SECRET_HERE", "\"${NOPE:?set NOPE to the CRM secret}\""),
        &[],
    )
    .unwrap_err();
    let i = &e.issues[0];
    assert_eq!((i.line, i.column), (Some(4), Some(43)), "{e}");
    assert!(i.message.contains("set NOPE to the CRM secret"), "{e}");
    // the value of a variable never shows in an error
    let e = load_env(
        &HOOK.replace("secret: SECRET_HERE", "secret: x, max_body_bytes: \"${N}\""),
        &[("N", "lots-of-s3cret")],
    )
    .unwrap_err();
    assert!(!e.to_string().contains("s3cret"), "{e}");
    assert_eq!(e.issues[0].line, Some(4), "{e}");
}

// ---- semantic errors carry file:line:col ----

fn issue<'a>(e: &'a ConfigError, path: &str) -> &'a config::Issue {
    e.issues
        .iter()
        .find(|i| i.path == path)
        .unwrap_or_else(|| panic!("no issue at {path}: {e}"))
}

const SEMANTIC: &str = r#"defaults:
  delivery:
    max_attempts: 0
systems:
  crm:
    source:
      webhook:
        path: /hooks/crm
        max_body_bytes: 0
  acc:
    sink:
      sqlite:
        path: out/acc.db
        table: bad-name
        key: [id, nope]
        columns: {id: text}
flows:
  f:
    from: crm
    to: [acc]
"#;

#[test]
fn semantic_errors_have_line_and_column() {
    let e = load(SEMANTIC).unwrap_err();
    let msg = e.to_string();
    let i = issue(&e, "defaults.delivery.max_attempts");
    assert_eq!((i.line, i.column), (Some(3), Some(19)), "{msg}");
    assert!(msg.contains("/etc/weft/test.yaml:3:19"), "{msg}");
    assert_eq!(
        e.issues
            .iter()
            .filter(|i| i.message.contains("must be at least 1"))
            .count(),
        1,
        "reported once, where it is written: {msg}"
    );
    let i = issue(&e, "systems.crm.source.webhook.max_body_bytes");
    assert_eq!((i.line, i.column), (Some(9), Some(25)), "{msg}");
    let i = issue(&e, "systems.acc.sink.sqlite.table");
    assert_eq!((i.line, i.column), (Some(14), Some(16)), "{msg}");
    let i = e
        .issues
        .iter()
        .find(|i| i.message.contains("`nope` is not among `columns`"))
        .unwrap_or_else(|| panic!("{msg}"));
    assert_eq!(i.line, Some(15), "{msg}");
    assert!(i.column.is_some(), "{msg}");
}

#[test]
fn zero_poll_intervals_are_refused() {
    let file = "systems:\n  legacy:\n    source:\n      file: {dir: drop, poll_interval: 0s}\n  out:\n    sink: {jsonl: {path: o.jsonl}}\nflows:\n  f: {from: legacy, to: [out]}\n";
    let e = load(file).unwrap_err();
    let i = issue(&e, "systems.legacy.source.file.poll_interval");
    assert!(i.message.contains("longer than 0s"), "{e}");
    assert_eq!((i.line, i.column), (Some(4), Some(40)), "{e}");
    let rest = file.replace(
        "file: {dir: drop, poll_interval: 0s}",
        "rest: {url: \"http://127.0.0.1:1/x\", records: ., interval: 0}",
    );
    let e = load(&rest).unwrap_err();
    assert!(
        issue(&e, "systems.legacy.source.rest.interval")
            .message
            .contains("longer than 0s"),
        "{e}"
    );
    let sql = file.replace(
        "file: {dir: drop, poll_interval: 0s}",
        "sql_poll: {url: \"sqlite:x.db\", table: t, key: id, cursor: ts, interval: 0s}",
    );
    let e = load(&sql).unwrap_err();
    assert!(
        issue(&e, "systems.legacy.source.sql_poll.interval")
            .message
            .contains("longer than 0s"),
        "{e}"
    );
}

#[test]
fn an_empty_config_is_refused() {
    for text in ["", "\n# nothing\n", "{}\n", "systems: {}\nflows: {}\n"] {
        let e = load(text).unwrap_err();
        assert!(e.to_string().contains("no flows"), "{text:?}: {e}");
    }
}

// ---- warnings: replays and unstable ids (P0-5, P2-2) ----

fn warnings(text: &str) -> Vec<String> {
    let c = load(text).unwrap_or_else(|e| panic!("{e}"));
    c.warnings
        .iter()
        .map(|w| {
            format!(
                "{}:{}: {}: {}",
                w.line.unwrap_or(0),
                w.column.unwrap_or(0),
                w.path,
                w.message
            )
        })
        .collect()
}

fn hook_with(webhook: &str) -> String {
    format!(
        "systems:\n  crm:\n    source:\n      webhook:\n        path: /hooks/crm\n{webhook}  out:\n    sink: {{jsonl: {{path: o.jsonl}}}}\nflows:\n  f: {{from: crm, to: [out]}}\n"
    )
}

#[test]
fn p2_2_schemes_without_a_timestamp_warn_of_replays() {
    let w = warnings(&hook_with(
        "        signature: {scheme: github, secrets: [s]}\n",
    ));
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].starts_with("6:29: systems.crm.source.webhook.signature.scheme:")
            && w[0].contains("no timestamp")
            && w[0].contains("replayed"),
        "{w:?}"
    );
    // the shorthand and hmac without timestamp_header, which also have no stable id
    let w = warnings(&hook_with("        secret: ${SECRET}\n"));
    assert!(w.iter().any(|w| w.contains("no timestamp")), "{w:?}");
    let w = warnings(&hook_with(
        "        id_field: .id\n        signature: {scheme: hmac, secrets: [s]}\n",
    ));
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("timestamp_header"), "{w:?}");
    // schemes with a timestamp and a signed id: no warning
    for scheme in [
        "        signature: {scheme: stripe, secrets: [s]}\n",
        "        signature: {scheme: standard_webhooks, secrets: [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]}\n",
        "        id_field: .id\n        signature: {scheme: hmac, secrets: [s], timestamp_header: x-ts, signed_content: \"{timestamp}.{body}\"}\n",
    ] {
        assert_eq!(
            warnings(&hook_with(scheme)),
            Vec::<String>::new(),
            "{scheme}"
        );
    }
}

#[test]
fn p2_2_an_unsigned_id_header_beside_a_signed_id_warns() {
    let w = warnings(&hook_with(
        "        id_header: x-event-id\n        signature: {scheme: stripe, secrets: [s]}\n",
    ));
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("systems.crm.source.webhook.id_header") && w[0].contains("not signed"),
        "{w:?}"
    );
}

#[test]
fn p0_5_a_webhook_without_a_stable_id_warns_of_a_b_a() {
    let w = warnings(&hook_with("        event_type: crm.contact\n"));
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].starts_with("4:7: systems.crm.source.webhook:")
            && w[0].contains("SHA-256 of the body")
            && w[0].contains("A → B → A"),
        "{w:?}"
    );
    for stable in [
        "        id_field: .id\n",
        "        id_header: x-request-id\n",
    ] {
        assert_eq!(
            warnings(&hook_with(stable)),
            Vec::<String>::new(),
            "{stable}"
        );
    }
}

/// What the connectors' parsers refuse (`weft validate` passes
/// `weft_connectors::check::check`) is reported like any problem, with the
/// line and column of the value.
#[test]
fn connector_checks_are_placed_at_their_value() {
    let text = "systems:\n  wh:\n    sink:\n      postgres:\n        url: \"postgresql://u@h:notaport/db\"\n        table: t\n        key: [id]\n        columns: {id: text}\n  crm:\n    source:\n      webhook: {path: /h, id_field: .id}\nflows:\n  f: {from: crm, to: [wh]}\n";
    let check = |c: &config::Config| {
        assert!(c.systems.contains_key("wh"));
        vec![config::Issue {
            path: "systems.wh.sink.postgres.url".into(),
            line: None,
            column: None,
            message: "not a PostgreSQL connection URL".into(),
        }]
    };
    let e = config::load_str_checked(Path::new("/etc/weft/test.yaml"), text, &|_| None, &check)
        .unwrap_err();
    let i = issue(&e, "systems.wh.sink.postgres.url");
    assert_eq!((i.line, i.column), (Some(5), Some(14)), "{e}");
}

/// Scalars the parser takes for numbers and booleans when asked directly
/// (quoted numbers, YAML 1.1 `yes`/`no`) still are, with interpolation on.
#[test]
fn typed_scalars_keep_their_yaml_meaning() {
    let text = HOOK
        .replace("secret: SECRET_HERE", "secret: s, max_body_bytes: \"4096\"")
        .replace(
            "flows:\n",
            "  api:\n    sink: {http: {url: \"http://127.0.0.1:1/x\"}}\n    circuit_breaker: {enabled: no, consecutive_failures: 0x10}\nflows:\n",
        )
        .replace("to: [out]", "to: [out, api]");
    let c = load(&text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(webhook_of(&c).1, 4096);
    assert!(c.systems["api"].breaker.is_none(), "enabled: no");
    let e = load(&text.replace("max_body_bytes: \"4096\"", "max_body_bytes: lots")).unwrap_err();
    assert!(
        e.to_string().contains("invalid type: string \"lots\""),
        "{e}"
    );
}

#[test]
fn server_listeners_and_limits() {
    let text = HOOK.replace("secret: SECRET_HERE", "secret: s");
    let c = load(&text).unwrap();
    assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.server.admin_listen.to_string(), "127.0.0.1:9090");
    assert_eq!(c.server.max_inflight_bytes, 16 << 20);
    assert_eq!(c.server.max_concurrent_requests, 512);
    let bad = format!(
        "server:\n  listen: 127.0.0.1:7000\n  admin_listen: 127.0.0.1:7000\n  admin_token: 0123456789abcdef0123456789abcde\n  max_inflight_bytes: 1000\n{}",
        text.replace("secret: s", "secret: s, max_body_bytes: 2000")
    );
    let e = load(&bad).unwrap_err();
    let msg = e.to_string();
    let i = issue(&e, "server.admin_listen");
    assert!(i.message.contains("is also `server.listen`"), "{msg}");
    assert_eq!((i.line, i.column), (Some(3), Some(17)), "{msg}");
    let i = issue(&e, "server.admin_token");
    assert_eq!(
        i.message,
        "is 31 bytes; at least 32 are required (e.g. `openssl rand -hex 32`)"
    );
    assert!(
        !msg.contains("0123456789abcdef"),
        "the token is never shown: {msg}"
    );
    let i = issue(&e, "systems.crm.source.webhook.max_body_bytes");
    assert!(
        i.message
            .contains("more than `server.max_inflight_bytes` (1000)"),
        "{msg}"
    );
    assert_eq!(i.line, Some(9), "{msg}");
}

/// P1-17: a flow without `key` writing to an upsert or HTTP sink has no
/// order per record; `weft validate` says so at the destination.
#[test]
fn p1_17_a_keyless_flow_to_an_upsert_or_http_sink_warns() {
    let text = |key: &str| {
        format!(
            "systems:\n  crm:\n    source:\n      webhook: {{path: /h, id_field: .id}}\n  acc:\n    sink: {{sqlite: {{path: a.db, table: t, key: [id]}}}}\n  out:\n    sink: {{jsonl: {{path: o.jsonl}}}}\nflows:\n  f:\n    from: crm\n{key}    to: [acc, out]\n"
        )
    };
    let w = warnings(&text(""));
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].starts_with("12:10: flows.f.to[0]:")
            && w[0].contains("no `key`")
            && w[0].contains("`acc`"),
        "{w:?}"
    );
    assert_eq!(
        warnings(&text("    key: .id | tostring\n")),
        Vec::<String>::new()
    );
}

#[test]
fn bad_fuzzy_matching_settings_are_reported_with_lines() {
    let text = r#"
systems:
  crm:
    source: {webhook: {path: /hooks/crm}}
    sink: {http: {url: "http://127.0.0.1:9/c", mode: by_id, update_url: "http://127.0.0.1:9/c/{_id}"}}
identity:
  customer:
    fuzzy:
      fields: {name: 0}
      block: []
      link: 0.8
      review: 0.9
flows:
  crm_customers:
    from: crm
    identity: customer
    key: .id
    mapping: "{name}"
    to: [crm]
"#;
    let e = load(text).unwrap_err();
    let got: Vec<(String, Option<u64>)> =
        e.issues.iter().map(|i| (i.path.clone(), i.line)).collect();
    for (path, line) in [
        ("identity.customer.fuzzy.fields.name", 9),
        ("identity.customer.fuzzy.block", 10),
        ("identity.customer.fuzzy.review", 12),
    ] {
        assert!(
            got.contains(&(path.to_owned(), Some(line))),
            "{path} at line {line}: {e}"
        );
    }
    assert!(e.to_string().contains("expected review <= link"), "{e}");
}

#[test]
fn bad_references_are_reported_with_lines() {
    let text = r#"
systems:
  shop:
    source: {webhook: {path: /hooks/shop}}
  erp:
    sink: {http: {url: "http://127.0.0.1:9/o"}}
identity:
  customer: {}
flows:
  orders:
    from: shop
    key: .id
    to:
      - system: erp
        references:
          customer: {entity: client, to: nowhere, wait: soon}
"#;
    let e = load(text).unwrap_err();
    let got: Vec<(String, Option<u64>)> =
        e.issues.iter().map(|i| (i.path.clone(), i.line)).collect();
    for path in ["entity", "to", "wait"] {
        let path = format!("flows.orders.to[0].references.customer.{path}");
        assert!(got.contains(&(path.clone(), Some(16))), "{path}: {e}");
    }
    assert!(e.to_string().contains("unknown entity `client`"), "{e}");
}

/// P1-20: the DLQ and drift retentions default to 30 and 90 days, take a
/// duration, and a bad one is reported where it is written.
#[test]
fn p1_20_dlq_and_drift_retention_load_and_bad_ones_have_line_and_column() {
    let text = GOOD.replace("      - system: accounting2\n", "");
    let c = load(&text).unwrap();
    assert_eq!(c.store.dlq_retention.as_secs(), 30 * 24 * 3600);
    assert_eq!(c.store.drift_retention.as_secs(), 90 * 24 * 3600);
    let c = load(&format!(
        "{text}store:\n  dlq_retention: 12h\n  drift_retention: 7d\n"
    ))
    .unwrap();
    assert_eq!(c.store.dlq_retention.as_secs(), 12 * 3600);
    assert_eq!(c.store.drift_retention.as_secs(), 7 * 24 * 3600);
    let bad = format!("{text}store:\n  dlq_retention: soon\n  drift_retention: 3 fortnights\n");
    let line = bad
        .lines()
        .position(|l| l.contains("dlq_retention"))
        .unwrap() as u64
        + 1;
    let e = load(&bad).unwrap_err();
    let msg = e.to_string();
    let i = issue(&e, "store.dlq_retention");
    assert_eq!((i.line, i.column), (Some(line), Some(18)), "{msg}");
    assert!(i.message.contains("`soon` is not a duration"), "{msg}");
    assert!(
        msg.contains(&format!("/etc/weft/test.yaml:{line}:18")),
        "{msg}"
    );
    let i = issue(&e, "store.drift_retention");
    assert_eq!((i.line, i.column), (Some(line + 1), Some(20)), "{msg}");
}

/// `store.postgres.node_timeout`: a duration from 3 s to 10 min, 10 s by
/// default; outside it, or not a duration, refused at its line and column.
#[test]
fn node_timeout_is_a_bounded_duration() {
    let cfg = |timeout: &str| {
        format!(
            "store:\n  postgres:\n    url: postgresql://u@h/db\n{timeout}systems:\n  crm:\n    source:\n      webhook: {{path: /h, id_field: .id}}\n  out:\n    sink:\n      jsonl: {{path: out.jsonl}}\nflows:\n  f: {{from: crm, to: [out]}}\n"
        )
    };
    let c = load(&cfg("")).unwrap();
    let pg = c.store.postgres.as_ref().unwrap();
    assert_eq!(pg.node_timeout, std::time::Duration::from_secs(10));
    let c = load(&cfg("    node_timeout: 30s\n")).unwrap();
    assert_eq!(
        c.store.postgres.as_ref().unwrap().node_timeout,
        std::time::Duration::from_secs(30)
    );
    for bad in ["1s", "2h", "soon"] {
        let e = load(&cfg(&format!("    node_timeout: {bad}\n"))).unwrap_err();
        let i = issue(&e, "store.postgres.node_timeout");
        assert_eq!((i.line, i.column), (Some(4), Some(19)), "{bad}: {e}");
    }
    let e = load(&cfg("    node_timeout: 1s\n")).unwrap_err();
    assert!(e.to_string().contains("from 3s to 10m"), "{e}");
}
