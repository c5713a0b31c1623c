//! The web dashboard in a real browser: headless Chromium driven over
//! WebDriver (a chromedriver this test starts on a free port) against the
//! real binary. A webhook and a file source feed an HTTP destination that
//! answers 400 for marked records, so the DLQ fills; the test logs in,
//! checks each screen against the store's numbers, inspects a record,
//! edits and replays one entry (an invalid payload refused by the page and
//! by the server), runs a bulk replay and cancels it (the count replayed
//! stays below the total and stays put), and checks the jobs API.
//! Screenshots go to `<target>/dashboard-screenshots/`.
//!
//! Without chromium and chromedriver the test says so and passes; with
//! `CI=true` it fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

const SECRET: &str = "dash-hook";
const TOKEN: &str = "dash-token-0123456789abcdef0123456789";
/// Entries the bulk replay works through.
const BULK: usize = 300;
const OK_EVENTS: usize = 10;

fn config(recorder: &str, with_token: bool) -> String {
    let token = if with_token {
        "  admin_token: ${WEFT_ADMIN_TOKEN}\n"
    } else {
        ""
    };
    format!(
        r#"
store:
  path: data/weft.db
server:
  listen: 127.0.0.1:0
{token}
systems:
  crm:
    source:
      webhook: {{path: /hooks/crm, secret: "${{HOOK_SECRET}}"}}
  erp_file:
    source:
      file: {{path: in/orders.jsonl, format: jsonl, poll_interval: 200ms}}
  api:
    sink:
      http: {{url: "{recorder}/items"}}
    circuit_breaker: {{enabled: false}}
flows:
  items:
    from: crm
    mapping: '{{id, fail, name}}'
    to: [api]
    delivery: {{max_attempts: 1}}
    freshness: 1h
  orders:
    from: erp_file
    mapping: '{{id, fail: false, name: "order"}}'
    to: [api]
"#
    )
}

const ENV: [(&str, &str); 2] = [("HOOK_SECRET", SECRET), ("WEFT_ADMIN_TOKEN", TOKEN)];

fn post_event(hub: &Hub, http: &reqwest::blocking::Client, id: &str, body: Value) {
    let body = body.to_string();
    let s = http
        .post(hub.url("/hooks/crm"))
        .header("x-event-id", id)
        .header("x-signature-256", sign(SECRET, body.as_bytes()))
        .body(body)
        .send()
        .expect("post")
        .status();
    assert_eq!(s.as_u16(), 202, "event {id}");
}

fn api(hub: &Hub, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let c = reqwest::blocking::Client::new();
    let mut req = match method {
        "GET" => c.get(hub.admin_url(path)),
        _ => c.post(hub.admin_url(path)),
    };
    req = req.bearer_auth(TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().expect("admin request");
    let status = resp.status().as_u16();
    (status, resp.json().unwrap_or(Value::Null))
}

fn dlq_depth(hub: &Hub) -> i64 {
    api(hub, "GET", "/api/v1/status", None).1["dlq_depth"]
        .as_i64()
        .unwrap_or(-1)
}

fn pending(hub: &Hub) -> i64 {
    let (_, s) = api(hub, "GET", "/api/v1/status", None);
    s["lanes"]
        .as_array()
        .map(|l| l.iter().filter_map(|l| l["pending"].as_i64()).sum())
        .unwrap_or(-1)
}

/// Chromium and chromedriver, or why not.
fn browser_programs() -> Result<(PathBuf, PathBuf), String> {
    let driver = std::env::var_os("CHROMEDRIVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromedriver"));
    let chrome = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    for p in [&driver, &chrome] {
        if !p.exists() {
            return Err(format!(
                "{} is missing (apt-get install -y chromium chromium-driver)",
                p.display()
            ));
        }
    }
    Ok((chrome, driver))
}

/// `<target>/dashboard-screenshots/`, beside the binary's profile folder.
fn screenshot_dir() -> PathBuf {
    let exe = weft();
    let target = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("target"));
    let dir = target.join("dashboard-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    dir
}

/// A chromedriver of the test's own and one browser session, driven
/// synchronously (the rest of the test is blocking code).
struct Browser {
    rt: tokio::runtime::Runtime,
    client: Option<Client>,
    driver: Child,
    shots: PathBuf,
}

impl Browser {
    fn start(chrome: &Path, driver: &Path) -> Browser {
        let port = free_port();
        let mut child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while reqwest::blocking::get(format!("{url}/status")).is_err() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("chromedriver did not answer on {url}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chrome.display().to_string(),
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1400,900"],
            }),
        );
        let client = rt
            .block_on(
                ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                    .capabilities(caps)
                    .connect(&url),
            )
            .expect("a browser session");
        Browser {
            rt,
            client: Some(client),
            driver: child,
            shots: screenshot_dir(),
        }
    }

    fn c(&self) -> &Client {
        self.client.as_ref().expect("session")
    }

    fn goto(&self, url: &str) {
        self.rt.block_on(self.c().goto(url)).expect("goto");
    }

    fn url(&self) -> String {
        self.rt
            .block_on(self.c().current_url())
            .expect("url")
            .to_string()
    }

    /// Wait until the page's URL ends with `suffix` (a click's navigation).
    fn wait_url(&self, suffix: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.url().ends_with(suffix) && !self.url().contains(&format!("{suffix}&")) {
            assert!(
                Instant::now() < deadline,
                "the page did not reach {suffix}: {}",
                self.url()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn text(&self, css: &str) -> String {
        self.rt
            .block_on(async {
                let e = self.c().find(Locator::Css(css)).await?;
                e.text().await
            })
            .unwrap_or_else(|e| panic!("text of {css}: {e}"))
    }

    fn exists(&self, css: &str) -> bool {
        self.rt
            .block_on(self.c().find_all(Locator::Css(css)))
            .map(|v| !v.is_empty())
            .unwrap_or(false)
    }

    fn click(&self, css: &str) {
        self.rt
            .block_on(async { self.c().find(Locator::Css(css)).await?.click().await })
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// Click `css` (a form's submit) and wait until the page it loads has replaced the old
    /// one: a marker set on the old document is gone and the new one has loaded. Reads made
    /// before that can hit the old page's elements, stale once the new page arrives.
    fn click_and_load(&self, css: &str) {
        self.script("window.weftOldPage = true;");
        self.click(css);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let fresh = self
                .rt
                .block_on(self.c().execute(
                    "return window.weftOldPage === undefined && document.readyState === 'complete';",
                    vec![],
                ))
                .ok()
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
            if fresh {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "clicking {css} loaded no new page"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn fill(&self, css: &str, text: &str) {
        self.rt
            .block_on(async {
                let e = self.c().find(Locator::Css(css)).await?;
                e.clear().await?;
                e.send_keys(text).await
            })
            .unwrap_or_else(|e| panic!("fill {css}: {e}"));
    }

    fn script(&self, js: &str) -> Value {
        self.rt
            .block_on(self.c().execute(js, vec![]))
            .unwrap_or_else(|e| panic!("script: {e}"))
    }

    /// Wait (reloading with `reload`) until the text of `css` passes `ok`.
    fn wait_text(&self, css: &str, reload: bool, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // A click's navigation can replace the element between the find and the read
            // (a stale element): that reads as not there yet, and the loop tries again.
            let t = self
                .rt
                .block_on(async {
                    let e = self.c().find(Locator::Css(css)).await?;
                    e.text().await
                })
                .unwrap_or_default();
            if ok(&t) {
                return t;
            }
            if Instant::now() > deadline {
                panic!("{what}: `{css}` shows {t:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
            if reload {
                self.rt.block_on(self.c().refresh()).expect("refresh");
            }
        }
    }

    fn shot(&self, name: &str) {
        let png = self.rt.block_on(self.c().screenshot()).expect("screenshot");
        std::fs::write(self.shots.join(format!("{name}.png")), png).expect("write screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            let _ = self.rt.block_on(c.close());
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// A client that shows redirects instead of following them.
fn raw_http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

#[test]
fn the_dashboard_in_a_browser() {
    let (chrome, driver) = match browser_programs() {
        Ok(p) => p,
        Err(why) => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("dashboard test: {why}; CI must run it");
            }
            eprintln!("\n!!! SKIPPED the dashboard browser test: {why} !!!\n");
            return;
        }
    };
    let recorder = Recorder::start();
    recorder.set(FAIL_MARKED);
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("in")).unwrap();
    std::fs::write(
        dir.path().join("in/orders.jsonl"),
        "{\"id\": \"o-1\"}\n{\"id\": \"o-2\"}\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("weft.yaml"), config(&recorder.url(), true)).unwrap();
    let hub = Hub::start(dir.path(), "weft.yaml", 0, &ENV);
    let http = reqwest::blocking::Client::new();
    for i in 0..OK_EVENTS {
        post_event(
            &hub,
            &http,
            &format!("ok-{i}"),
            json!({"id": i, "fail": false, "name": "fine"}),
        );
    }
    for i in 0..BULK {
        post_event(
            &hub,
            &http,
            &format!("bad-{i}"),
            json!({"id": 1000 + i, "fail": true, "name": "refused"}),
        );
    }
    post_event(
        &hub,
        &http,
        "edit-me",
        json!({"id": 5000, "fail": true, "name": "typo"}),
    );
    // a field the stream never had: drift
    post_event(
        &hub,
        &http,
        "drifty",
        json!({"id": 6000, "fail": false, "name": "new", "extra": 1}),
    );
    let dead = BULK as i64 + 1;
    wait_for(Duration::from_secs(60), "the DLQ to fill", || {
        dlq_depth(&hub) == dead && pending(&hub) == 0
    });

    // ---- nothing without a session; no POST without its CSRF token
    let raw = raw_http();
    for path in [
        "/ui/",
        "/ui/dlq",
        "/ui/dlq/1",
        "/ui/records?q=bad-1",
        "/ui/system",
    ] {
        let r = raw.get(hub.admin_url(path)).send().unwrap();
        assert_eq!(r.status().as_u16(), 303, "GET {path} without a session");
        assert_eq!(r.headers()["location"], "/ui/login", "GET {path}");
        let body = r.text().unwrap();
        assert!(!body.contains("refused"), "GET {path} leaked: {body}");
    }
    let r = raw
        .post(hub.admin_url("/ui/dlq/jobs"))
        .form(&[("action", "discard"), ("all", "1")])
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 403, "a POST without a session");
    let r = raw
        .post(hub.admin_url("/ui/login"))
        .form(&[("token", "wrong-token-wrong-token-wrong-token-wrong")])
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401, "a wrong token");
    assert!(r.headers().get("set-cookie").is_none());
    let r = raw
        .post(hub.admin_url("/ui/login"))
        .form(&[("token", TOKEN)])
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 303);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(
        !cookie.contains(TOKEN),
        "the cookie carries the token: {cookie}"
    );
    let session = cookie.split(';').next().unwrap().to_owned();
    for form in [
        vec![("action", "discard"), ("all", "1")],
        vec![
            ("action", "discard"),
            ("all", "1"),
            ("csrf", "not-the-token"),
        ],
    ] {
        let r = raw
            .post(hub.admin_url("/ui/dlq/jobs"))
            .header("cookie", &session)
            .form(&form)
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 403, "a POST without its CSRF token");
    }
    assert_eq!(dlq_depth(&hub), dead, "a refused POST changed the DLQ");

    // ---- log in in the browser
    let b = Browser::start(&chrome, &driver);
    b.goto(&hub.admin_url("/ui/"));
    assert!(b.url().ends_with("/ui/login"), "redirected: {}", b.url());
    b.shot("login");
    b.fill("#token", "not the token");
    b.click("button[type=submit]");
    b.wait_text("#login-error", false, "the login's refusal", |t| {
        t.contains("Wrong token")
    });
    b.fill("#token", TOKEN);
    b.click("button[type=submit]");
    b.wait_url("/ui/");

    // ---- flows: the store's numbers, and series once two samples exist
    let lane = "tr[data-lane='items/api']";
    assert_eq!(b.text(&format!("{lane} td[data-k=dlq]")), dead.to_string());
    assert_eq!(b.text(&format!("{lane} td[data-k=pending]")), "0");
    assert_eq!(
        b.text("#total-delivered"),
        (OK_EVENTS + 1 + 2).to_string(),
        "ok events, the drifty one and two orders"
    );
    assert_eq!(b.text("#total-dlq"), dead.to_string());
    assert!(
        b.text(&format!("{lane} td[data-k=status]"))
            .contains("dead letters")
    );
    assert!(
        b.text(&format!("{lane} td[data-k=freshness]"))
            .contains("within 1h0m"),
        "{}",
        b.text(&format!("{lane} td[data-k=freshness]"))
    );
    assert_eq!(
        b.text("tr[data-lane='orders/api'] td[data-k=dlq]"),
        "0",
        "the file flow"
    );
    // the series: at least two samples drawn (a path, not the flat line)
    let paths = b.script("return document.querySelectorAll('svg.spark path').length");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut paths = paths.as_u64().unwrap_or(0);
    while paths == 0 {
        assert!(Instant::now() < deadline, "no series drawn");
        std::thread::sleep(Duration::from_millis(500));
        b.goto(&hub.admin_url("/ui/"));
        paths = b
            .script("return document.querySelectorAll('svg.spark path').length")
            .as_u64()
            .unwrap_or(0);
    }
    b.shot("flows");

    // ---- the record inspector
    b.goto(&hub.admin_url("/ui/records?q=bad-7"));
    let rec = b.text("section.record[data-kind=dead]");
    assert!(rec.contains("items → api"), "{rec}");
    assert!(rec.contains("dead lettered"), "{rec}");
    assert!(rec.contains("400"), "the destination's answer: {rec}");
    assert!(rec.contains("1007"), "the payload: {rec}");
    // the attempt trail: the one write, its status and outcome
    let trail = b.text("table#attempts");
    assert!(
        trail.contains("items → api") && trail.contains("400") && trail.contains("dead"),
        "the attempt trail: {trail}"
    );
    b.shot("records");
    b.goto(&hub.admin_url("/ui/records?q=nothing-like-this"));
    assert!(b.exists("#no-records"));

    // ---- edit and replay one entry; the destination answers 200 from now on
    recorder.set(OK);
    let (_, list) = api(&hub, "GET", "/api/v1/dlq?flow=items", None);
    let edit_id = list
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event_id"] == "edit-me")
        .expect("the entry to edit")["id"]
        .as_i64()
        .unwrap();
    b.goto(&hub.admin_url(&format!("/ui/dlq/{edit_id}")));
    assert_eq!(b.text("#entry-status"), "dead");
    let draft = b.script("return document.getElementById('payload').value");
    assert!(draft.as_str().unwrap_or("").contains("typo"), "{draft}");
    b.shot("dlq-entry");
    // the page refuses a payload that is not JSON
    b.fill("#payload", "{\"id\": 5000, \"name\": ");
    b.click("#replay-edited");
    assert!(
        b.text("#payload-error").contains("Not JSON"),
        "{}",
        b.text("#payload-error")
    );
    assert!(b.url().ends_with(&format!("/ui/dlq/{edit_id}")));
    // and so does the server, when the page's check is skipped
    b.script("document.getElementById('edit-form').submit()");
    let why = b.wait_text("#replay-error", false, "the server's refusal", |t| {
        !t.is_empty()
    });
    assert!(why.contains("not JSON"), "{why}");
    assert_eq!(dlq_depth(&hub), dead, "an invalid payload replayed");
    b.fill(
        "#payload",
        "{\"id\": 5000, \"fail\": true, \"name\": \"edited on the dashboard\"}",
    );
    b.click("#replay-edited");
    b.wait_text("#entry-note", false, "the replay's note", |t| {
        t.contains("Replayed")
    });
    wait_for(
        Duration::from_secs(20),
        "the edited payload delivered",
        || {
            recorder
                .received
                .lock()
                .unwrap()
                .iter()
                .any(|r| r.body["id"] == 5000 && r.body["name"] == "edited on the dashboard")
        },
    );
    let dead = dead - 1;
    wait_for(
        Duration::from_secs(20),
        "the entry to leave the DLQ",
        || dlq_depth(&hub) == dead,
    );

    // ---- DLQ: filter, preview, bulk replay in small slow chunks, cancel
    b.goto(&hub.admin_url("/ui/dlq"));
    b.fill("#f-error", "400");
    b.click("#dlq-filter button[type=submit]");
    b.wait_url("error=400");
    assert_eq!(b.text("#dlq-count"), BULK.to_string());
    b.fill("#f-error", "nothing says this");
    b.click("#dlq-filter button[type=submit]");
    b.wait_url("error=nothing+says+this");
    assert_eq!(b.text("#dlq-count"), "0");
    b.goto(&hub.admin_url("/ui/dlq?flow=items&error=400"));
    assert_eq!(b.text("#dlq-count"), BULK.to_string());
    b.shot("dlq");
    b.fill("#chunk_size", "5");
    b.fill("#pause_ms", "150");
    b.click("#bulk-replay");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !b.url().contains("/ui/dlq/jobs/") {
        assert!(Instant::now() < deadline, "no job page: {}", b.url());
        std::thread::sleep(Duration::from_millis(50));
    }
    let job_id: u64 = b
        .url()
        .rsplit('/')
        .next()
        .and_then(|s| s.parse().ok())
        .expect("job id");
    b.wait_text("#job-done", false, "the job to make progress", |t| {
        t.parse::<usize>().is_ok_and(|n| n >= 10)
    });
    b.shot("dlq-job-running");
    b.click_and_load("#job-cancel");
    b.wait_text("#job-status", false, "the job to stop", |t| {
        t == "cancelled"
    });
    let done_on_page: usize = b.text("#job-done").parse().unwrap();
    assert_eq!(b.text("#job-total"), BULK.to_string());
    assert!(
        (10..BULK).contains(&done_on_page),
        "cancel took effect: {done_on_page} of {BULK}"
    );
    assert!(!b.exists("#job-cancel"), "a finished job has no cancel");
    b.shot("dlq-job-cancelled");
    // the API says the same, and it stays put: the job has finished, the
    // entries not replayed are still dead, the replayed ones are delivered
    let (s, job) = api(&hub, "GET", &format!("/api/v1/dlq/jobs/{job_id}"), None);
    assert_eq!(s, 200);
    assert_eq!(job["status"], "cancelled");
    assert_eq!(job["done"], done_on_page as u64);
    assert_eq!(job["failed"], 0);
    assert!(job["finished_at"].is_i64());
    wait_for(
        Duration::from_secs(30),
        "the replayed rows delivered",
        || pending(&hub) == 0,
    );
    assert_eq!(dlq_depth(&hub), dead - done_on_page as i64);
    let replayed_at_dest = recorder
        .received
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.body["name"] == "refused")
        .count();
    assert_eq!(
        replayed_at_dest, done_on_page,
        "writes of the replayed entries"
    );
    let (_, job) = api(&hub, "GET", &format!("/api/v1/dlq/jobs/{job_id}"), None);
    assert_eq!(
        job["done"], done_on_page as u64,
        "the count moved after cancel"
    );
    let dead = dead - done_on_page as i64;

    // ---- system: sources and positions, destinations and breakers, drift
    b.goto(&hub.admin_url("/ui/system"));
    assert!(b.text("tr[data-source=crm]").contains("webhook"));
    let file = b.text("tr[data-source=erp_file]");
    assert!(file.contains("file") && file.contains("up"), "{file}");
    assert!(
        file.contains("offset") || file.contains("record"),
        "the file's position: {file}"
    );
    assert!(b.text("tr[data-destination=api]").contains("closed"));
    let drift = b.text("#drift");
    assert!(
        drift.contains("/extra") && drift.contains("new field"),
        "{drift}"
    );
    b.shot("system");
    // accept the drift on the page: the same code as `weft drift accept`
    let buttons = || {
        b.rt.block_on(b.c().find_all(Locator::Css("#drift button.accept-drift")))
            .map(|v| v.len())
            .unwrap_or(0)
    };
    let before = buttons();
    assert!(before >= 1, "no accept button");
    b.click("#drift button.accept-drift");
    b.wait_url("replayed=0");
    assert!(
        b.text("#accepted").contains("accepted"),
        "{}",
        b.text("#accepted")
    );
    assert!(
        b.text("#drift").contains("accepted"),
        "{}",
        b.text("#drift")
    );
    assert_eq!(buttons(), before - 1);
    let (code, listed, _) = {
        let o = weft_cmd(dir.path(), &["drift", "list", "-c", "weft.yaml", "--json"]);
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).to_string(),
            (),
        )
    };
    assert_eq!(code, Some(0));
    let events: Vec<Value> = serde_json::from_str(&listed).unwrap();
    assert_eq!(
        events.iter().filter(|e| e["accepted_at"].is_i64()).count(),
        1,
        "{listed}"
    );

    b.goto(&hub.admin_url("/ui/queues"));
    assert!(b.text("main").contains("manual conflicts (0)"));
    b.shot("queues");

    // ---- the jobs API: start, 400s and 404, a discard to the end
    let (s, e) = api(
        &hub,
        "POST",
        "/api/v1/dlq/jobs",
        Some(json!({"action": "explode", "flow": "items"})),
    );
    assert_eq!(s, 400, "{e}");
    let (s, e) = api(
        &hub,
        "POST",
        "/api/v1/dlq/jobs",
        Some(json!({"action": "discard"})),
    );
    assert_eq!(s, 400, "an empty filter: {e}");
    let (s, e) = api(
        &hub,
        "POST",
        "/api/v1/dlq/jobs",
        Some(json!({"action": "discard", "flow": "items", "chunk_size": 0})),
    );
    assert_eq!(s, 400, "{e}");
    let (s, _) = api(&hub, "GET", "/api/v1/dlq/jobs/999999", None);
    assert_eq!(s, 404);
    let (s, started) = api(
        &hub,
        "POST",
        "/api/v1/dlq/jobs",
        Some(json!({"action": "discard", "flow": "items", "chunk_size": 50})),
    );
    assert_eq!(s, 202, "{started}");
    let id = started["id"].as_u64().unwrap();
    let mut job = Value::Null;
    wait_for(Duration::from_secs(30), "the discard job", || {
        job = api(&hub, "GET", &format!("/api/v1/dlq/jobs/{id}"), None).1;
        job["status"] == "done"
    });
    assert_eq!(job["total"], dead);
    assert_eq!(job["done"], dead);
    assert_eq!(dlq_depth(&hub), 0);
    let (s, again) = api(&hub, "POST", &format!("/api/v1/dlq/jobs/{id}/cancel"), None);
    assert_eq!((s, again["status"].as_str()), (200, Some("done")));
    let (_, all) = api(&hub, "GET", "/api/v1/dlq/jobs", None);
    let ids: Vec<u64> = all
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|j| j["id"].as_u64())
        .collect();
    assert_eq!(ids, vec![id, job_id], "newest first");

    // ---- log out: the session is gone
    b.goto(&hub.admin_url("/ui/"));
    b.click("form.logout button");
    b.wait_url("/ui/login");
    b.goto(&hub.admin_url("/ui/dlq"));
    assert!(b.url().ends_with("/ui/login"), "after logout: {}", b.url());
    let r = raw
        .get(hub.admin_url("/ui/"))
        .header("cookie", &session)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "another session is still valid");
    drop(b);
    hub.stop();
}

#[test]
fn without_an_admin_token_the_dashboard_says_how_to_enable_it() {
    let recorder = Recorder::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("in")).unwrap();
    std::fs::write(dir.path().join("weft.yaml"), config(&recorder.url(), false)).unwrap();
    let hub = Hub::start(dir.path(), "weft.yaml", 0, &ENV);
    let raw = raw_http();
    let r = raw.get(hub.admin_url("/ui/dlq")).send().unwrap();
    assert_eq!(r.status().as_u16(), 303);
    let page = raw
        .get(hub.admin_url("/ui/login"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        page.contains("server.admin_token") && page.contains("disabled"),
        "{page}"
    );
    let r = raw
        .post(hub.admin_url("/ui/login"))
        .form(&[("token", "")])
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    hub.stop();
}
