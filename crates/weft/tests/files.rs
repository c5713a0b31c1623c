//! `examples/files` through the binary: a drop folder of Latin-1 CSV and
//! one of XML orders, mapped, written as rotating CSV exports; complete
//! files only after shutdown, the malformed XML quarantined, the record
//! with an unknown entity in the DLQ.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Hub, weft_cmd};

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/files")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn wait_for(what: &str, hub: &Hub, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}; log:\n{}",
            hub.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every row of the export files in `dir`, header checked.
fn rows(dir: &Path, header: &[&str]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for f in files(dir) {
        let mut rdr = csv::Reader::from_path(&f).unwrap();
        assert_eq!(rdr.headers().unwrap(), header.to_vec(), "{}", f.display());
        out.extend(
            rdr.records()
                .map(|r| r.unwrap().iter().map(String::from).collect::<Vec<_>>()),
        );
    }
    out
}

#[test]
fn files_example_validates() {
    let o = weft_cmd(&example_dir(), &["validate", "weft.yaml"]);
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn files_example_runs_latin1_csv_and_xml_into_csv_exports() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ex = example_dir();
    std::fs::copy(ex.join("weft.yaml"), dir.join("weft.yaml")).unwrap();
    for d in ["drop/customers", "drop/orders"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::copy(
        ex.join("samples/customers-latin1.csv"),
        dir.join("drop/customers/customers-latin1.csv"),
    )
    .unwrap();
    for f in ["orders.xml", "broken-orders.xml"] {
        std::fs::copy(ex.join("samples").join(f), dir.join("drop/orders").join(f)).unwrap();
    }
    let hub = Hub::start(dir, "weft.yaml", 0, &[]);
    let part_rows = |sub: &str| -> usize {
        files(&dir.join("out").join(sub))
            .iter()
            .map(|f| {
                std::fs::read_to_string(f)
                    .unwrap()
                    .lines()
                    .count()
                    .saturating_sub(1)
            })
            .sum()
    };
    wait_for("the drop folders to be read and delivered", &hub, || {
        dir.join("drop/orders/quarantine/broken-orders.xml")
            .exists()
            && dir
                .join("drop/customers/processed/customers-latin1.csv")
                .exists()
            && part_rows("customers") == 4
            && part_rows("orders") == 2
    });
    // still being written (idle is 5s): only .part files so far
    let names: Vec<PathBuf> = files(&dir.join("out/orders"));
    assert!(
        names
            .iter()
            .all(|p| p.to_string_lossy().ends_with(".csv.part")),
        "{names:?}"
    );
    assert!(hub.stop().success());

    // shutdown completed every file: no .part left
    for sub in ["customers", "orders"] {
        let names = files(&dir.join("out").join(sub));
        assert_eq!(names.len(), 1, "{names:?}");
        assert!(names[0].to_string_lossy().ends_with(".csv"), "{names:?}");
    }
    let customers = rows(
        &dir.join("out/customers"),
        &["customer_id", "name", "city", "country"],
    );
    assert_eq!(
        customers,
        vec![
            vec!["CRM-1001", "Müller & Söhne GmbH", "Köln", "DE"],
            vec!["CRM-1002", "Zoë Lefèvre", "Genève", "CH"],
            vec!["CRM-1003", "Jürgen Groß", "Graz", "AT"],
            vec!["CRM-1004", "Ærø Fisk ApS", "Ærøskøbing", "DE"],
        ]
    );
    let orders = rows(
        &dir.join("out/orders"),
        &[
            "order_id",
            "customer_id",
            "ordered_at",
            "currency",
            "total",
            "lines",
        ],
    );
    assert_eq!(orders.len(), 2);
    assert_eq!(
        orders[0][..5],
        ["SO-5001", "CRM-1001", "2024-05-01", "EUR", "84.50"]
    );
    let lines: serde_json::Value = serde_json::from_str(&orders[0][5]).unwrap();
    assert_eq!(
        lines,
        serde_json::json!([{"sku": "BOLT-M8", "qty": 500}, {"sku": "NUT-M8", "qty": 500}])
    );

    let report =
        std::fs::read_to_string(dir.join("drop/orders/quarantine/broken-orders.xml.error.txt"))
            .unwrap();
    assert!(report.contains("malformed XML at byte"), "{report}");
    let o = weft_cmd(dir, &["dlq", "list", "-c", "weft.yaml"]);
    let list = String::from_utf8_lossy(&o.stdout);
    assert!(list.contains("unknown entity `&uuml;`"), "{list}");
    assert!(list.contains("1 entry"), "{list}");
}
