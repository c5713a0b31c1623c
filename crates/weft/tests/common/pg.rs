//! A PostgreSQL database of a test's own, on the machine's server
//! (`WEFT_TEST_PG_ADMIN_URL`, default `postgres@127.0.0.1:5432`): created
//! by [`Db::create`], dropped with it. Absent PostgreSQL skips the test
//! loudly, and fails it under `CI=true`.

pub fn admin_url() -> String {
    std::env::var("WEFT_TEST_PG_ADMIN_URL")
        .unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/postgres".into())
}

/// Run SQL on the server (its own runtime: the test is synchronous).
pub fn sql<T: Send + 'static>(
    url: &str,
    f: impl FnOnce(tokio_postgres::Client) -> futures_lite::BoxFut<T> + Send + 'static,
) -> Result<T, String> {
    let url = url.to_owned();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .map_err(|e| e.to_string())?;
            let task = tokio::spawn(conn);
            let out = f(client).await;
            task.abort();
            Ok(out)
        })
    })
    .join()
    .map_err(|_| "the SQL thread panicked".to_string())?
}

pub mod futures_lite {
    pub type BoxFut<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;
}

pub fn exec(url: &str, statement: String) -> Result<(), String> {
    sql(url, move |c| {
        Box::pin(async move { c.batch_execute(&statement).await.map_err(|e| e.to_string()) })
    })?
}

pub fn count(url: &str, query: &'static str) -> i64 {
    sql(url, move |c| {
        Box::pin(async move { c.query_one(query, &[]).await.expect(query).get::<_, i64>(0) })
    })
    .expect("query")
}

/// A database of its own, dropped on drop.
pub struct Db {
    name: String,
}

impl Db {
    pub fn create() -> Option<Db> {
        if let Err(e) = exec(&admin_url(), "SELECT 1".into()) {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!(
                    "PostgreSQL at {} is not reachable and CI=true: {e}",
                    admin_url()
                );
            }
            eprintln!(
                "!!!!!! SKIPPING PostgreSQL store test: {} is not reachable: {e} !!!!!!",
                admin_url()
            );
            return None;
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!("weft_e2e_{}_{nanos}", std::process::id());
        exec(&admin_url(), format!("CREATE DATABASE {name}")).expect("create database");
        Some(Db { name })
    }

    pub fn url(&self) -> String {
        let base = admin_url();
        let (server, _) = base
            .rsplit_once('/')
            .expect("an admin URL ending in /<database>");
        format!("{server}/{}", self.name)
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let _ = exec(
            &admin_url(),
            format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}
