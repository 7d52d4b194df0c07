//! Stores for tests: a fresh SQLite file, or a fresh schema in the PostgreSQL database named
//! by `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`). When PostgreSQL is
//! unreachable the PostgreSQL tests are skipped with a note, except under `CI=true`, where
//! they fail.

#![allow(dead_code)]

use domicile_control_plane::{Store, StoreOptions};
use sqlx::Connection;

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned())
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// A store and what it lives in; dropping it removes a PostgreSQL schema.
pub struct TestStore {
    pub store: Store,
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    schema: Option<(String, String)>,
}

impl Drop for TestStore {
    fn drop(&mut self) {
        if let Some((base, schema)) = self.schema.take() {
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

pub fn options() -> StoreOptions {
    StoreOptions {
        poll_interval: std::time::Duration::from_millis(100),
        ..StoreOptions::default()
    }
}

pub async fn sqlite() -> TestStore {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("cp.db").display());
    let store = Store::open(&url, options())
        .await
        .expect("open sqlite store");
    TestStore {
        store,
        url,
        _dir: Some(dir),
        schema: None,
    }
}

/// A URL for a new, empty schema of the test database, or `None` (skip) when PostgreSQL is
/// unreachable outside CI.
pub async fn postgres_url() -> Option<(String, String, String)> {
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
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}options[search_path]={schema}");
    Some((url, base, schema))
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

pub async fn postgres() -> Option<TestStore> {
    let (url, base, schema) = postgres_url().await?;
    let store = Store::open(&url, options())
        .await
        .expect("open postgres store");
    Some(TestStore {
        store,
        url,
        _dir: None,
        schema: Some((base, schema)),
    })
}
