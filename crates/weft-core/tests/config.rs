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
