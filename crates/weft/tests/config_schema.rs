//! `weft config schema`: the JSON Schema generated from the config structs.
//! Every example config validates against it and loads with `weft
//! validate` (the round trip), and the schema is strict enough to refuse
//! what the loader refuses (an unknown key, a wrong type).

mod common;

use std::path::{Path, PathBuf};

use common::{weft_cmd, weft_cmd_env};
use serde_json::Value;

fn schema() -> Value {
    let out = weft_cmd(Path::new("."), &["config", "schema"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the schema is JSON")
}

fn examples() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path().join("weft.yaml"))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found
}

fn yaml(text: &str) -> Value {
    serde_saphyr::from_str(text).expect("YAML")
}

fn errors(validator: &jsonschema::Validator, doc: &Value) -> Vec<String> {
    validator
        .iter_errors(doc)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

#[test]
fn every_example_config_validates_against_the_schema_and_loads() {
    let schema = schema();
    assert_eq!(schema["title"], "RawConfig");
    let validator = jsonschema::validator_for(&schema).expect("a valid JSON Schema");
    let examples = examples();
    assert!(examples.len() >= 5, "{examples:?}");
    for path in examples {
        let text = std::fs::read_to_string(&path).unwrap();
        let errs = errors(&validator, &yaml(&text));
        assert!(errs.is_empty(), "{}: {errs:#?}", path.display());
        let dir = path.parent().unwrap();
        // the variables the examples require, as their READMEs set them
        // (validate connects nowhere)
        let env = [
            ("API_KEY", "k-example"),
            ("API_PASSWORD", "p-example"),
            ("OAUTH_CLIENT_SECRET", "s-example"),
            ("CRM_API", "http://127.0.0.1:9/api"),
            ("CRM_TOKEN", "t-example"),
            ("GITHUB_TOKEN", "g-example"),
            ("MARIADB_URL", "mysql://root@127.0.0.1:3306/test"),
            ("WAREHOUSE_URL", "postgresql://postgres@127.0.0.1:5432/test"),
        ];
        let out = weft_cmd_env(dir, &["validate", "weft.yaml"], &env);
        assert!(
            out.status.success(),
            "{}: {}{}",
            path.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_schema_refuses_an_unknown_key_and_a_wrong_type_like_the_loader() {
    let validator = jsonschema::validator_for(&schema()).unwrap();
    let ok = yaml(
        "systems:\n  crm:\n    source:\n      webhook:\n        path: /hooks/crm\n  out:\n    sink:\n      jsonl:\n        path: out.jsonl\nflows:\n  f:\n    from: crm\n    to: [out]\n",
    );
    assert!(
        errors(&validator, &ok).is_empty(),
        "{:?}",
        errors(&validator, &ok)
    );
    let unknown = yaml(
        "systems:\n  crm:\n    source:\n      webhook:\n        path: /hooks/crm\n        pathh: /x\n",
    );
    assert!(!errors(&validator, &unknown).is_empty());
    let wrong_type = yaml("systems:\n  crm:\n    source:\n      webhook:\n        path: [1, 2]\n");
    assert!(!errors(&validator, &wrong_type).is_empty());
    let two_kinds = yaml(
        "systems:\n  crm:\n    source:\n      webhook:\n        path: /a\n      file:\n        dir: d\n",
    );
    assert!(!errors(&validator, &two_kinds).is_empty());
    // the same documents through the loader: refused too
    let dir = tempfile::tempdir().unwrap();
    for (i, text) in [
        "systems:\n  crm:\n    source:\n      webhook:\n        path: /hooks/crm\n        pathh: /x\n",
        "systems:\n  crm:\n    source:\n      webhook:\n        path: [1, 2]\n",
    ]
    .iter()
    .enumerate()
    {
        let name = format!("c{i}.yaml");
        std::fs::write(dir.path().join(&name), text).unwrap();
        let out = weft_cmd(dir.path(), &["validate", &name]);
        assert!(!out.status.success(), "{text}");
    }
}
