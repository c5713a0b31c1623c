//! The `rest` source's config: a full example loads; mistakes are reported
//! together, each with its path and line.

use std::path::Path;
use std::time::Duration;

use weft_core::config::{self, ConfigError, SourceSpec};

fn load(text: &str) -> Result<config::Config, ConfigError> {
    config::load_str(Path::new("/etc/weft/rest.yaml"), text, &|k| match k {
        "CRM_TOKEN" => Some("t0k3n".into()),
        "CRM_URL" => Some("https://crm.example.com".into()),
        _ => None,
    })
}

const GOOD: &str = r#"
systems:
  crm:
    source:
      rest:
        url: ${CRM_URL}/v1/contacts
        query: {archived: "false"}
        headers: {X-Tenant: acme}
        records: .data
        id_field: '"\(.id)@\(.updated_at)"'
        event_type: crm.contact
        interval: 30s
        timeout: 10s
        pagination:
          cursor: {cursor_path: .meta.next_cursor, param: cursor, max_pages: 50}
        incremental:
          cursor_field: .updated_at
          param: updated_since
          initial: "1970-01-01T00:00:00Z"
        auth: {bearer: "${CRM_TOKEN}"}
        rate_limit: {per_minute: 120, burst: 5}
"#;

#[test]
fn a_full_rest_source_loads() {
    let c = load(GOOD).unwrap();
    let Some(SourceSpec::Rest {
        method,
        interval,
        timeout,
        max_pages,
        cursor_field,
        next_page,
        event_type,
        cfg,
        ..
    }) = &c.systems["crm"].source
    else {
        panic!("not a rest source");
    };
    assert_eq!(method, "GET");
    assert_eq!(*interval, Some(Duration::from_secs(30)));
    assert_eq!(*timeout, Duration::from_secs(10));
    assert_eq!(*max_pages, 50);
    assert!(cursor_field.is_some() && next_page.is_some());
    assert_eq!(event_type, "crm.contact");
    assert_eq!(cfg.url.value, "https://crm.example.com/v1/contacts");
    assert_eq!(c.systems["crm"].source.as_ref().unwrap().kind(), "rest");
}

#[test]
fn minimal_rest_source_has_defaults() {
    let c = load("systems:\n  a:\n    source:\n      rest: {url: \"http://h/x\"}\n").unwrap();
    let Some(SourceSpec::Rest {
        interval,
        max_pages,
        event_type,
        cron,
        ..
    }) = &c.systems["a"].source
    else {
        panic!("not a rest source");
    };
    assert_eq!(*interval, Some(Duration::from_secs(60)));
    assert_eq!(*max_pages, 1000);
    assert_eq!(event_type, "a.rest");
    assert!(cron.is_none());
}

#[test]
fn every_mistake_is_reported_with_its_path_and_line() {
    let text = r#"
systems:
  crm:
    source:
      rest:
        url: ftp://crm.example.com/contacts
        method: DELETE
        records: .data[
        interval: 30s
        cron: "*/5 * * * *"
        timeout: soon
        pagination:
          page: {size: 0}
        incremental:
          cursor_field: .updated_at |
          param: updated_since
        auth:
          api_key: {header: X-Key, query: key, value: k}
        rate_limit: {per_second: 0}
"#;
    let e = load(text).unwrap_err();
    let find = |path: &str| {
        e.issues
            .iter()
            .find(|i| i.path == path)
            .unwrap_or_else(|| panic!("no issue at {path}: {e}"))
    };
    let p = "systems.crm.source.rest";
    let url = find(&format!("{p}.url"));
    assert_eq!(url.line, Some(6), "{e}");
    assert!(url.message.contains("http://"), "{e}");
    assert_eq!(find(&format!("{p}.method")).line, Some(7));
    assert!(find(&format!("{p}.records")).message.contains("jq"), "{e}");
    assert_eq!(find(&format!("{p}.records")).line, Some(8));
    assert!(find(&format!("{p}.interval")).message.contains("not both"));
    assert_eq!(find(&format!("{p}.timeout")).line, Some(11));
    find(&format!("{p}.pagination.page.size"));
    assert_eq!(
        find(&format!("{p}.incremental.cursor_field")).line,
        Some(15)
    );
    assert!(
        find(&format!("{p}.auth.api_key"))
            .message
            .contains("exactly one")
    );
    find(&format!("{p}.rate_limit"));
    assert_eq!(e.issues.len(), 9, "{e}");
    // the rendered error names the file and line
    assert!(e.to_string().contains("/etc/weft/rest.yaml:6:"), "{e}");
}

#[test]
fn unknown_keys_and_pagination_styles_are_refused_with_a_line() {
    let e = load("systems:\n  a:\n    source:\n      rest:\n        url: http://h/x\n        pagination: {pages: {}}\n").unwrap_err();
    assert_eq!(e.issues.len(), 1);
    assert_eq!(e.issues[0].line, Some(6), "{e}");
    assert!(e.issues[0].message.contains("pages"), "{e}");
    let e = load("systems:\n  a:\n    source:\n      rest:\n        url: http://h/x\n        intervall: 5s\n").unwrap_err();
    assert!(e.issues[0].message.contains("intervall"), "{e}");
}

#[test]
fn bad_cron_and_resync_without_incremental() {
    let e = load("systems:\n  a:\n    source:\n      rest:\n        url: http://h/x\n        cron: every day\n        full_resync_on_start: true\n").unwrap_err();
    let cron = e
        .issues
        .iter()
        .find(|i| i.path.ends_with(".cron"))
        .unwrap_or_else(|| panic!("{e}"));
    assert_eq!(cron.line, Some(6));
    assert!(
        e.issues
            .iter()
            .any(|i| i.path.ends_with(".full_resync_on_start")),
        "{e}"
    );
}

#[test]
fn the_rest_polling_example_is_valid() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/rest-polling/weft.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    let c = config::load_str(&file, &text, &|k| {
        (k == "GITHUB_TOKEN").then(|| "ghp_test".into())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.systems["github"].source.as_ref().unwrap().kind(), "rest");
    // without the token the error says what to set
    let e = config::load_str(&file, &text, &|_| None).unwrap_err();
    assert!(e.to_string().contains("GITHUB_TOKEN"), "{e}");
}

/// The warnings of a config that loads, as `(path, line, message)`.
fn warnings(text: &str) -> Vec<(String, Option<u64>, String)> {
    load(text)
        .unwrap()
        .warnings
        .into_iter()
        .map(|w| (w.path, w.line, w.message))
        .collect()
}

/// P0-5: without `id_field` the id is a content hash, so a record that goes
/// A -> B -> A has its third version dropped as a duplicate; `weft validate`
/// says so, with the line of the source.
#[test]
fn a_rest_source_without_a_stable_id_is_warned_about() {
    let w = warnings(
        "systems:\n  crm:\n    source:\n      rest:\n        url: https://crm.example.com/v1/stock\n        records: .data\n",
    );
    assert_eq!(w.len(), 1, "{w:?}");
    assert_eq!(w[0].0, "systems.crm.source.rest.id_field");
    assert_eq!(w[0].1, Some(5));
    assert!(w[0].2.contains("A → B → A"), "{w:?}");
}

/// P0-5: with `incremental`, an `id_field` without the cursor gives every
/// update of a record the same id: all but the first are dropped.
#[test]
fn an_incremental_id_field_without_the_cursor_is_warned_about() {
    let text = GOOD.replace(r#"'"\(.id)@\(.updated_at)"'"#, ".id");
    let w = warnings(&text);
    let id: Vec<_> = w.iter().filter(|w| w.0.ends_with(".id_field")).collect();
    assert_eq!(id.len(), 1, "{w:?}");
    assert_eq!(id[0].1, Some(10));
    assert!(id[0].2.contains("`.updated_at`"), "{w:?}");
    // the full example includes the cursor: no id warning
    assert!(
        warnings(GOOD).iter().all(|w| !w.0.ends_with(".id_field")),
        "{:?}",
        warnings(GOOD)
    );
}

/// P1-19: the `since` parameter is taken as inclusive unless said; the note
/// goes away once `since_inclusive` is set either way.
#[test]
fn incremental_since_semantics_get_a_note_until_set() {
    let w = warnings(GOOD);
    let note: Vec<_> = w.iter().filter(|w| w.0.ends_with(".incremental")).collect();
    assert_eq!(note.len(), 1, "{w:?}");
    assert!(
        note[0].2.contains("`updated_since`") && note[0].2.contains("since_inclusive: false"),
        "{w:?}"
    );
    assert!(note[0].1.is_some());
    for set in ["true", "false"] {
        let text = GOOD.replace(
            "param: updated_since\n",
            &format!("param: updated_since\n          since_inclusive: {set}\n"),
        );
        assert!(warnings(&text).is_empty(), "{:?}", warnings(&text));
    }
}
