//! Stores for tests (this crate's and those of crates built on it): a fresh SQLite file, or a
//! fresh schema in the PostgreSQL database named by `DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`). When PostgreSQL is unreachable the PostgreSQL
//! tests are skipped with a note, except under `CI=true`, where they fail.

use sqlx::Connection;

use crate::{Store, StoreOptions};

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The test database: `DATABASE_URL`, or the local default.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned())
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// A PostgreSQL schema for one test, dropped with this guard.
pub struct Schema {
    /// The URL whose connections use the schema.
    pub url: String,
    base: String,
    name: String,
}

impl Schema {
    /// Cuts every open connection to this schema from the server side
    /// (`pg_terminate_backend`), as a database failover or an administrator would; returns
    /// how many were cut.
    pub async fn terminate_connections(&self) -> Result<i64, sqlx::Error> {
        let mut conn = sqlx::PgConnection::connect(&self.base).await?;
        let (cut,): (i64,) = sqlx::query_as(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&self.name)
        .fetch_one(&mut conn)
        .await?;
        Ok(cut)
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let (base, schema) = (self.base.clone(), self.name.clone());
        {
            // Best effort, on a thread of its own: Drop cannot await.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .ok()?;
                rt.block_on(async {
                    let mut conn = sqlx::PgConnection::connect(&base).await.ok()?;
                    sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                        .execute(&mut conn)
                        .await
                        .ok()
                })
            })
            .join();
        }
    }
}

/// Store options for tests: a quick poll.
pub fn options() -> StoreOptions {
    StoreOptions {
        poll_interval: std::time::Duration::from_millis(100),
        ..StoreOptions::default()
    }
}

/// A new, empty schema of the test database, or `None` (skip) when PostgreSQL is unreachable
/// outside CI.
pub async fn postgres_schema() -> Option<Schema> {
    let base = database_url();
    let mut conn = match sqlx::PgConnection::connect(&base).await {
        Ok(conn) => conn,
        Err(e) if !in_ci() => {
            eprintln!("skipping: PostgreSQL at {base} is unreachable ({e}); set DATABASE_URL");
            return None;
        }
        Err(e) => panic!("CI=true and PostgreSQL at {base} is unreachable: {e}"),
    };
    let schema = format!("domicile_test_{}_{}", std::process::id(), rand_suffix());
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&mut conn)
        .await
        .expect("create test schema");
    // Every connection to the schema carries its name, so a test can find (and cut) them.
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}options[search_path]={schema}&application_name={schema}");
    Some(Schema {
        url,
        base,
        name: schema,
    })
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{}_{}", nanos, N.fetch_add(1, Ordering::Relaxed))
}

/// A store on a new schema (see [`postgres_schema`]).
pub async fn postgres() -> Option<(Store, Schema)> {
    let schema = postgres_schema().await?;
    let store = Store::open(&schema.url, options())
        .await
        .expect("open postgres store");
    Some((store, schema))
}
