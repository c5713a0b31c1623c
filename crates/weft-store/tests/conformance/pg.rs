//! PostgreSQL for the journal tests (the conformance suite and
//! `tests/postgres.rs`): a fresh database per test on the
//! PostgreSQL of the machine (127.0.0.1:5432, user postgres, trust auth;
//! `WEFT_TEST_PG_ADMIN_URL` overrides), dropped when the test ends, passed
//! or failed. When PostgreSQL does not answer, the tests say so loudly and
//! pass, unless `CI=true`, where that is a failure.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use weft_store::{PgJournal, PgOptions, PgRole};

/// The server's URL without a database.
fn admin_url() -> String {
    std::env::var("WEFT_TEST_PG_ADMIN_URL")
        .unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/postgres".into())
}

/// Run `sql` on the admin database, on a runtime of its own (callers may be
/// inside one, or in a `Drop`).
fn admin(sql: String) -> Result<(), String> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async move {
            let mut config: tokio_postgres::Config =
                admin_url().parse().map_err(|e| format!("{e}"))?;
            config.connect_timeout(Duration::from_secs(5));
            let (client, conn) = config
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(|e| e.to_string())?;
            let task = tokio::spawn(conn);
            let r = client.batch_execute(&sql).await.map_err(|e| e.to_string());
            drop(client);
            let _ = task.await;
            r
        })
    })
    .join()
    .map_err(|_| "the admin thread panicked".to_string())?
}

/// Whether the tests can run: PostgreSQL answers. Prints why not, and
/// panics instead when `CI=true`.
pub fn available() -> bool {
    static CHECKED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    match CHECKED.get_or_init(|| admin("SELECT 1".into())) {
        Ok(()) => true,
        Err(e) => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!(
                    "PostgreSQL at {} is not reachable and CI=true: {e}",
                    admin_url()
                );
            }
            eprintln!(
                "!!!!!! SKIPPING PostgreSQL journal test: {} is not reachable: {e} !!!!!!",
                admin_url()
            );
            false
        }
    }
}

/// A database of its own, dropped on drop (also when the test panics).
pub struct Database {
    pub name: String,
}

impl Database {
    pub fn create() -> Database {
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!(
            "weft_conf_{}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            nanos
        );
        admin(format!("CREATE DATABASE {name}")).expect("create the test database");
        Database { name }
    }

    /// The URL of this database. Commits are not fsynced
    /// (`synchronous_commit=off`, as the SQLite tests use
    /// `synchronous=NORMAL`): the tests are about the journal's logic; a
    /// crash of the server is not among them.
    pub fn url(&self) -> String {
        let base = admin_url();
        match base.rsplit_once('/') {
            Some((server, _)) => format!(
                "{server}/{}?options=-c%20synchronous_commit%3Doff",
                self.name
            ),
            None => panic!("WEFT_TEST_PG_ADMIN_URL must end in /<database>: {base}"),
        }
    }

    /// Journal options for this database.
    pub fn options(&self, node: &str, role: PgRole) -> PgOptions {
        PgOptions {
            node: node.into(),
            role,
            pool_size: 4,
            ..PgOptions::new(self.url())
        }
    }

    /// Open a journal, waiting (up to 10 s) for a previous hub of the same
    /// node to let go of its lock: its connections close as it is dropped.
    pub fn open(&self, node: &str, role: PgRole) -> PgJournal {
        self.open_with(self.options(node, role))
    }

    pub fn open_with(&self, opts: PgOptions) -> PgJournal {
        let start = Instant::now();
        loop {
            match PgJournal::open(opts.clone()) {
                Ok(j) => return j,
                Err(e) if start.elapsed() < Duration::from_secs(10) => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("cannot open the PostgreSQL journal: {e}"),
            }
        }
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        if let Err(e) = admin(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )) {
            eprintln!("could not drop the test database {}: {e}", self.name);
        }
    }
}
