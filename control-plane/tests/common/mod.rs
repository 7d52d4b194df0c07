//! Stores for the store suite.

#![allow(dead_code)]

use domicile_control_plane::testing;
use domicile_control_plane::Store;

/// A store and what it lives in.
pub struct TestStore {
    pub store: Store,
    /// Where the store lives, for a second replica on it.
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    _schema: Option<testing::Schema>,
}

pub async fn sqlite() -> TestStore {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("cp.db").display());
    let store = Store::open(&url, testing::options())
        .await
        .expect("open sqlite store");
    TestStore {
        store,
        url,
        _dir: Some(dir),
        _schema: None,
    }
}

pub async fn postgres() -> Option<TestStore> {
    let (store, schema) = testing::postgres().await?;
    Some(TestStore {
        store,
        url: schema.url.clone(),
        _dir: None,
        _schema: Some(schema),
    })
}
