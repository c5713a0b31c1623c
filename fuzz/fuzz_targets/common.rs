//! What must hold for any file: reading it returns (no panic, no stack
//! overflow, no hang), and every record delivered is JSON that parses back
//! (what the store and the mappings do with it): never too deep, never
//! changed by the round trip.

use weft_connectors::Record;
use weft_core::config::FileFormat;

pub fn check(format: FileFormat, record_path: &[&str], data: &[u8]) {
    let path: Vec<String> = record_path.iter().map(|s| (*s).to_owned()).collect();
    let Ok(Ok(records)) = weft_connectors::file::read_bytes(format, &path, data) else {
        // quarantined (or an I/O error of the temp file): fine
        return;
    };
    for r in records {
        if let Record::Good(e) = r {
            let text = serde_json::to_string(&e.data).expect("a record serializes");
            let back: serde_json::Value =
                serde_json::from_str(&text).expect("a delivered record parses back");
            assert_eq!(back, e.data, "the round trip changed the record");
        }
    }
}
