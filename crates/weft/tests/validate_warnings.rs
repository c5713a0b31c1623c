//! `weft validate` prints the warnings of a config that loads, each with
//! file:line:col and its document path, and still succeeds.

mod common;

use common::weft_cmd;

#[test]
fn validate_prints_warnings_with_their_line_and_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("weft.yaml"),
        "systems:
  stock:
    source:
      rest:
        url: http://127.0.0.1:1/v1/stock
        records: .data
  out:
    sink:
      jsonl: {path: out.jsonl}
flows:
  stock_out:
    from: stock
    to: [out]
",
    )
    .unwrap();
    let out = weft_cmd(dir.path(), &["validate", "weft.yaml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(
            "warning: weft.yaml:5:14: at `systems.stock.source.rest.id_field`: no `id_field`"
        ),
        "{err}"
    );
}

/// Canonical records on the PostgreSQL journal: refused unless
/// `store.postgres.experimental_identity` is set, then a warning.
#[test]
fn identity_on_postgres_is_refused_unless_marked_experimental() {
    let dir = tempfile::tempdir().unwrap();
    let config = |flag: &str| {
        format!(
            "store:
  postgres:
    url: postgresql://127.0.0.1:1/none
{flag}systems:
  crm:
    source:
      webhook: {{path: /hooks/crm}}
  erp:
    sink:
      jsonl: {{path: out.jsonl}}
identity:
  customer:
    create: [crm]
    owners: {{\"*\": [crm]}}
    match: [email]
flows:
  customers:
    from: crm
    identity: customer
    key: .id
    mapping: '{{name, email}}'
    to: [erp]
"
        )
    };
    std::fs::write(dir.path().join("weft.yaml"), config("")).unwrap();
    let out = weft_cmd(dir.path(), &["validate", "weft.yaml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("experimental_identity: true"), "{err}");
    std::fs::write(
        dir.path().join("weft.yaml"),
        config("    experimental_identity: true\n"),
    )
    .unwrap();
    let out = weft_cmd(dir.path(), &["validate", "weft.yaml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning:")
            && err.contains("canonical records on PostgreSQL are experimental"),
        "{err}"
    );
}
