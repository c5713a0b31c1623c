//! Helpers shared by the connector test files.

use std::time::{Duration, Instant};

/// Poll `cond` until it holds; fail after 10 s, naming `what`.
pub async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
