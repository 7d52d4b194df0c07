//! The store suite: every test runs against SQLite and against PostgreSQL.

mod common;

use std::collections::BTreeSet;

use domicile_control_plane::auth::Role;
use domicile_control_plane::store::{
    Actor, AuditQuery, ImportLine, MoveRequest, Phase, StoreError,
};
use domicile_control_plane::Store;
use domicile_wire::{Checksum, FeedLine, Heartbeat, Op, Region, State};

/// Generates `sqlite::$name` and `postgres::$name` from `async fn $name(store: &Store)`.
macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let t = crate::common::sqlite().await;
                    super::$name(&t.store).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(t) = crate::common::postgres().await else { return };
                    super::$name(&t.store).await;
                }
            )*
        }
    };
}

both!(
    regions_are_created_updated_and_guarded,
    workspaces_carry_versions_epochs_and_history,
    listing_pages_by_cursor_and_region,
    imports_are_all_or_nothing_with_every_bad_line_named,
    the_feed_is_contiguous_and_gone_past_its_window,
    the_snapshot_is_one_consistent_version,
    concurrent_writers_give_every_watcher_every_version_once_in_order,
    tokens_are_stored_hashed_and_checked,
    the_fleet_keeps_one_row_per_proxy,
    heartbeats_arriving_together_are_written_together,
    the_store_counts_lagging_proxies_as_moves_judge_them,
    moves_write_their_phases_and_map_changes_together,
);

fn actor() -> Actor {
    Actor::new("test")
}

fn region(id: &str, codes: &[&str]) -> Region {
    Region {
        id: id.into(),
        name: format!("Region {id}"),
        jurisdiction: codes.iter().map(|c| c.to_string()).collect(),
    }
}

async fn seed(store: &Store) {
    store
        .put_region(region("us", &["US"]), &actor())
        .await
        .unwrap();
    store
        .put_region(region("eu", &["DE", "FR"]), &actor())
        .await
        .unwrap();
}

async fn regions_are_created_updated_and_guarded(store: &Store) {
    let first = store
        .put_region(region("us", &["US"]), &actor())
        .await
        .unwrap();
    assert!(first.created);
    assert_eq!(first.version, Some(1));
    let same = store
        .put_region(region("us", &["US"]), &actor())
        .await
        .unwrap();
    assert_eq!(same.version, None, "an unchanged region is not a change");
    let updated = store
        .put_region(region("us", &["US", "CA"]), &actor())
        .await
        .unwrap();
    assert_eq!((updated.created, updated.version), (false, Some(2)));
    assert_eq!(store.region("us").await.unwrap().jurisdiction, ["US", "CA"]);
    store.put_region(region("eu", &[]), &actor()).await.unwrap();
    let ids: Vec<_> = store
        .regions()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, ["eu", "us"]);

    store
        .put_workspace("acme", "us", false, &actor())
        .await
        .unwrap();
    match store.delete_region("us", &actor()).await {
        Err(StoreError::Conflict { code, message }) => {
            assert_eq!(code, "region_in_use");
            assert!(message.contains("1 workspace"), "{message}");
        }
        other => panic!("deleting a region in use: {other:?}"),
    }
    assert!(matches!(
        store.delete_region("mars", &actor()).await,
        Err(StoreError::NotFound { .. })
    ));
    let v = store.delete_region("eu", &actor()).await.unwrap();
    assert_eq!(store.head().await.unwrap().version, v);
    assert!(matches!(
        store.region("eu").await,
        Err(StoreError::NotFound { .. })
    ));
}

async fn workspaces_carry_versions_epochs_and_history(store: &Store) {
    seed(store).await;
    let created = store
        .put_workspace("acme", "us", false, &actor())
        .await
        .unwrap();
    assert!(created.created);
    assert_eq!((created.value.epoch, created.value.version), (1, 3));
    assert_eq!(created.value.state, State::Active);

    let again = store
        .put_workspace("acme", "us", false, &actor())
        .await
        .unwrap();
    assert_eq!(again.version, None);
    assert_eq!(store.head().await.unwrap().version, 3);

    match store.put_workspace("acme", "eu", false, &actor()).await {
        Err(StoreError::Conflict { code, .. }) => assert_eq!(code, "region_change_requires_move"),
        other => panic!("{other:?}"),
    }
    match store.put_workspace("acme", "mars", false, &actor()).await {
        Err(StoreError::Invalid { code, .. }) => assert_eq!(code, "unknown_region"),
        other => panic!("{other:?}"),
    }
    let forced = store
        .put_workspace(
            "acme",
            "eu",
            true,
            &Actor {
                name: "ops".into(),
                reason: Some("wrong region at signup".into()),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (
            forced.value.region.as_str(),
            forced.value.epoch,
            forced.value.version
        ),
        ("eu", 2, 4)
    );

    let frozen = store
        .set_workspace_state("acme", State::Frozen, None, &actor())
        .await
        .unwrap();
    assert_eq!((frozen.epoch, frozen.version), (3, 5));
    match store.put_workspace("acme", "us", true, &actor()).await {
        Err(StoreError::Conflict { code, .. }) => assert_eq!(code, "workspace_moving"),
        other => panic!("{other:?}"),
    }
    match store.delete_workspace("acme", &actor()).await {
        Err(StoreError::Conflict { code, .. }) => assert_eq!(code, "workspace_moving"),
        other => panic!("{other:?}"),
    }
    store
        .set_workspace_state("acme", State::Active, None, &actor())
        .await
        .unwrap();
    store
        .put_workspace("globex", "us", false, &actor())
        .await
        .unwrap();
    let head = store.head().await.unwrap();
    assert_eq!(head.checksum, store.recompute_checksum().await.unwrap());

    let deleted = store.delete_workspace("acme", &actor()).await.unwrap();
    assert!(matches!(
        store.workspace("acme").await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.delete_workspace("acme", &actor()).await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(
        store.head().await.unwrap().checksum,
        store.recompute_checksum().await.unwrap()
    );

    let history = store.history("acme").await.unwrap();
    let versions: Vec<u64> = history.iter().map(|h| h.version).collect();
    assert_eq!(versions, [3, 4, 5, 6, deleted]);
    assert_eq!(history[1].actor, "ops");
    assert_eq!(history[1].reason.as_deref(), Some("wrong region at signup"));
    assert_eq!(history[1].region.as_deref(), Some("eu"));
    assert_eq!(history[2].state, Some(State::Frozen));
    assert_eq!(history[4].op, Op::Delete);
    assert!(history.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
}

async fn listing_pages_by_cursor_and_region(store: &Store) {
    seed(store).await;
    let lines: Vec<ImportLine> = (0..25)
        .map(|i| ImportLine {
            line: i + 1,
            id: format!("w{i:02}"),
            region: if i % 2 == 0 { "us" } else { "eu" }.into(),
        })
        .collect();
    store.import(lines, false, &actor()).await.unwrap();
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = store
            .workspaces(Some("eu"), cursor.as_deref(), 5)
            .await
            .unwrap();
        seen.extend(page.iter().map(|w| w.id.clone()));
        if page.len() < 5 {
            break;
        }
        cursor = page.last().map(|w| w.id.clone());
    }
    let expected: Vec<String> = (0..25)
        .filter(|i| i % 2 == 1)
        .map(|i| format!("w{i:02}"))
        .collect();
    assert_eq!(seen, expected);
    assert_eq!(store.workspaces(None, None, 1000).await.unwrap().len(), 25);
}

async fn imports_are_all_or_nothing_with_every_bad_line_named(store: &Store) {
    seed(store).await;
    store
        .put_workspace("acme", "us", false, &actor())
        .await
        .unwrap();
    let before = store.head().await.unwrap();
    let line = |n: u64, id: &str, region: &str| ImportLine {
        line: n,
        id: id.into(),
        region: region.into(),
    };
    let bad = vec![
        line(1, "new1", "eu"),
        line(2, "new2", "mars"),
        line(3, "acme", "eu"),
        line(4, "acme2", "us"),
    ];
    match store.import(bad, false, &actor()).await {
        Err(StoreError::Lines { total, lines }) => {
            assert_eq!(total, 2);
            assert_eq!(
                (lines[0].line, lines[0].code.as_str()),
                (2, "unknown_region")
            );
            assert_eq!(
                (lines[1].line, lines[1].code.as_str()),
                (3, "region_change_requires_move")
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(store.head().await.unwrap(), before, "nothing was written");
    assert!(store.workspace("new1").await.is_err());

    let good = vec![
        line(1, "new1", "eu"),
        line(2, "acme", "us"),
        line(3, "new2", "us"),
    ];
    let outcome = store.import(good, false, &actor()).await.unwrap();
    assert_eq!(
        (outcome.created, outcome.unchanged, outcome.updated),
        (2, 1, 0)
    );
    assert_eq!(outcome.version, before.version + 2);
    // A large import (loaded in bulk) keeps an awkward reason intact in every history row.
    let reason = "tab\there, line\nbreak, back\\slash, \\N, quote\"";
    let bulk: Vec<ImportLine> = (0..500)
        .map(|i| line(i + 1, &format!("bulk-{i}"), "eu"))
        .collect();
    store
        .import(
            bulk,
            false,
            &Actor {
                name: "bulk".into(),
                reason: Some(reason.into()),
            },
        )
        .await
        .unwrap();
    let h = store.history("bulk-499").await.unwrap();
    assert_eq!(h[0].reason.as_deref(), Some(reason));
    assert_eq!(store.workspace("bulk-0").await.unwrap().region, "eu");
    let forced = store
        .import(vec![line(1, "acme", "eu")], true, &actor())
        .await
        .unwrap();
    assert_eq!(forced.updated, 1);
    assert_eq!(
        store.head().await.unwrap().checksum,
        store.recompute_checksum().await.unwrap()
    );
}

async fn the_feed_is_contiguous_and_gone_past_its_window(store: &Store) {
    seed(store).await;
    for i in 0..10 {
        store
            .put_workspace(&format!("w{i}"), "us", false, &actor())
            .await
            .unwrap();
    }
    let all = store.changes(0, 1000).await.unwrap();
    let versions: Vec<u64> = all.iter().map(|c| c.0).collect();
    assert_eq!(versions, (1..=12).collect::<Vec<_>>());
    let parsed: Vec<FeedLine> = all
        .iter()
        .map(|c| serde_json::from_str(&c.1).unwrap())
        .collect();
    assert!(matches!(&parsed[0], FeedLine::Region { id, op: Op::Put, .. } if id == "us"));
    assert!(matches!(&parsed[2], FeedLine::Workspace { id, version: 3, .. } if id == "w0"));
    assert_eq!(store.changes(10, 1).await.unwrap()[0].0, 11);

    // Deletes and region changes are in the feed too, as the lines the proxy applies.
    store.delete_workspace("w0", &actor()).await.unwrap();
    store
        .put_region(region("au", &["AU"]), &actor())
        .await
        .unwrap();
    let tail = store.changes(12, 10).await.unwrap();
    let tail: Vec<FeedLine> = tail
        .iter()
        .map(|c| serde_json::from_str(&c.1).unwrap())
        .collect();
    assert!(matches!(
        &tail[0],
        FeedLine::Workspace { id, op: Op::Delete, entry: None, version: 13 } if id == "w0"
    ));
    assert!(matches!(
        &tail[1],
        FeedLine::Region { id, op: Op::Put, entry: Some(b), .. } if id == "au" && b.jurisdiction == ["AU"]
    ));

    store.set_change_retention(4);
    assert!(matches!(
        store.changes(9, 10).await,
        Err(StoreError::Gone {
            after: 9,
            oldest: 11
        })
    ));
    let kept: Vec<u64> = store
        .changes(10, 10)
        .await
        .unwrap()
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(kept, [11, 12, 13, 14]);
    // The history keeps everything.
    assert_eq!(store.history("w0").await.unwrap().len(), 2);
}

async fn collect_snapshot(store: &Store) -> String {
    let mut rx = store.snapshot();
    let mut text = Vec::new();
    while let Some(chunk) = rx.recv().await {
        text.extend_from_slice(&chunk.unwrap());
    }
    String::from_utf8(text).unwrap()
}

async fn the_snapshot_is_one_consistent_version(store: &Store) {
    seed(store).await;
    let lines: Vec<ImportLine> = (0..3000)
        .map(|i| ImportLine {
            line: i + 1,
            id: format!("ws-{i}"),
            region: "eu".into(),
        })
        .collect();
    store.import(lines, false, &actor()).await.unwrap();
    // Writes while the snapshot streams must not leak into it.
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..50 {
                store
                    .put_workspace(&format!("late-{i}"), "us", false, &Actor::new("w"))
                    .await
                    .unwrap();
            }
        })
    };
    let text = collect_snapshot(store).await;
    writer.await.unwrap();
    let mut lines = text.lines();
    let header: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(header["type"], "map");
    let version = header["version"].as_u64().unwrap();
    let entries = header["entries"].as_u64().unwrap();
    let mut sum = Checksum::default();
    let mut count = 0;
    let mut regions = BTreeSet::new();
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        match v["type"].as_str().unwrap() {
            "region" => {
                regions.insert(v["id"].as_str().unwrap().to_owned());
            }
            "workspace" => {
                count += 1;
                assert!(v["version"].as_u64().unwrap() <= version);
                sum.add(Checksum::entry_hash(
                    v["id"].as_str().unwrap(),
                    v["region"].as_str().unwrap(),
                    State::parse(v["state"].as_str().unwrap()).unwrap(),
                    v["epoch"].as_u64().unwrap() as u32,
                    v["version"].as_u64().unwrap(),
                ));
            }
            other => panic!("unexpected line type {other}"),
        }
    }
    assert_eq!(count, entries);
    assert_eq!(
        Checksum::from_hex(header["checksum"].as_str().unwrap()),
        Some(sum),
        "the header's checksum covers exactly the listed entries"
    );
    assert_eq!(regions.into_iter().collect::<Vec<_>>(), ["eu", "us"]);
    assert_eq!(header["epoch"], store.epoch());
}

async fn concurrent_writers_give_every_watcher_every_version_once_in_order(store: &Store) {
    seed(store).await;
    let start = store.head().await.unwrap().version;
    const WRITERS: usize = 8;
    const EACH: usize = 40;
    let end = start + (WRITERS * EACH) as u64;
    let mut watchers = Vec::new();
    for _ in 0..3 {
        let store = store.clone();
        let mut head = store.subscribe();
        watchers.push(tokio::spawn(async move {
            let mut cursor = start;
            let mut seen = Vec::new();
            while cursor < end {
                let batch = store.changes(cursor, 7).await.unwrap();
                if batch.is_empty() {
                    if tokio::time::timeout(std::time::Duration::from_secs(20), head.changed())
                        .await
                        .is_err()
                    {
                        let watched = *head.borrow();
                        panic!(
                            "no commit woke the watcher at {cursor}: watch says {}, store says {:?}, changes {:?}",
                            watched,
                            store.head().await,
                            store.changes(cursor, 7).await.map(|c| c.len())
                        );
                    }
                    continue;
                }
                for (version, line) in batch {
                    assert_eq!(version, cursor + 1, "gap or repeat after {cursor}");
                    let parsed: FeedLine = serde_json::from_str(&line).unwrap();
                    assert_eq!(parsed.version(), Some(version));
                    cursor = version;
                    seen.push(version);
                }
            }
            seen
        }));
    }
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..EACH {
                let id = format!("c{w}-{i}");
                let region = if i % 2 == 0 { "us" } else { "eu" };
                store
                    .put_workspace(&id, region, false, &Actor::new(format!("writer{w}")))
                    .await
                    .unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    for w in watchers {
        let seen = w.await.unwrap();
        assert_eq!(seen, ((start + 1)..=end).collect::<Vec<_>>());
    }
    let head = store.head().await.unwrap();
    assert_eq!(head.version, end);
    assert_eq!(head.checksum, store.recompute_checksum().await.unwrap());
}

async fn tokens_are_stored_hashed_and_checked(store: &Store) {
    let secret = store.create_token("ops", Role::Operator).await.unwrap();
    assert_eq!(
        store.authenticate(&secret).await.unwrap(),
        Some(("ops".to_owned(), Role::Operator))
    );
    assert_eq!(store.authenticate("dom_nope").await.unwrap(), None);
    assert!(matches!(
        store.create_token("ops", Role::Admin).await,
        Err(StoreError::Conflict {
            code: "token_exists",
            ..
        })
    ));
    assert!(!store.has_admin().await.unwrap());
    store.create_token("root", Role::Admin).await.unwrap();
    assert!(store.has_admin().await.unwrap());
    let names: Vec<_> = store
        .tokens()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["ops", "root"]);
    assert!(store.delete_token("ops").await.unwrap());
    assert_eq!(store.authenticate(&secret).await.unwrap(), None);
    assert!(!store.delete_token("ops").await.unwrap());
}

async fn the_fleet_keeps_one_row_per_proxy(store: &Store) {
    let mut hb = Heartbeat {
        proxy_id: "edge-1".into(),
        edge_region: "us".into(),
        applied_version: 3,
        drained_version: None,
        checksum: Checksum::default().to_hex(),
        epoch: store.epoch().into(),
    };
    store.heartbeat(&hb, "edge-1-token").await.unwrap();
    hb.applied_version = 5;
    hb.drained_version = Some(4);
    store.heartbeat(&hb, "edge-1-token").await.unwrap();
    // Another proxy's token cannot speak for edge-1.
    match store.heartbeat(&hb, "edge-2-token").await {
        Err(StoreError::Conflict { code, .. }) => assert_eq!(code, "proxy_id_taken"),
        other => panic!("{other:?}"),
    }
    let fleet = store.fleet().await.unwrap();
    assert_eq!(fleet.len(), 1);
    assert_eq!(
        (fleet[0].applied_version, fleet[0].drained_version),
        (5, Some(4))
    );
    assert!(fleet[0].last_seen_ms >= fleet[0].first_seen_ms);
    assert!(store.forget_proxy("edge-1").await.unwrap());
    assert!(store.fleet().await.unwrap().is_empty());
    // Once removed, the id can be reported by another token.
    store.heartbeat(&hb, "edge-2-token").await.unwrap();
}

async fn heartbeats_arriving_together_are_written_together(store: &Store) {
    let beat = |n: usize, version: u64| Heartbeat {
        proxy_id: format!("edge-{n}"),
        edge_region: "us".into(),
        applied_version: version,
        drained_version: Some(version),
        checksum: Checksum::default().to_hex(),
        epoch: store.epoch().into(),
    };
    // edge-0 belongs to another token: its claim fails alone, in the middle of the batch.
    store.heartbeat(&beat(0, 1), "other-token").await.unwrap();
    let before = store.operations();
    let beats: Vec<_> = (0..300)
        .map(|n| {
            let store = store.clone();
            let hb = beat(n, 7);
            tokio::spawn(async move { store.heartbeat(&hb, "fleet-token").await })
        })
        .collect();
    for (n, beat) in beats.into_iter().enumerate() {
        match (n, beat.await.unwrap()) {
            (0, Err(StoreError::Conflict { code, .. })) => assert_eq!(code, "proxy_id_taken"),
            (0, other) => panic!("edge-0 was written for another token: {other:?}"),
            (_, result) => result.unwrap(),
        }
    }
    // The same proxy under two tokens in one batch: each claim is judged on its own.
    let again = beat(0, 9);
    let (theirs, ours) = tokio::join!(
        store.heartbeat(&again, "fleet-token"),
        store.heartbeat(&again, "other-token")
    );
    assert!(
        matches!(theirs, Err(StoreError::Conflict { .. })),
        "{theirs:?}"
    );
    ours.unwrap();
    let written = store.operations() - before;
    assert!(
        written < 60,
        "302 heartbeats took {written} store operations: they were not batched"
    );
    let fleet = store.fleet().await.unwrap();
    assert_eq!(fleet.len(), 300);
    for member in &fleet {
        let want = if member.proxy_id == "edge-0" { 9 } else { 7 };
        assert_eq!(member.applied_version, want, "{}", member.proxy_id);
    }
}

async fn the_store_counts_lagging_proxies_as_moves_judge_them(store: &Store) {
    let epoch = store.epoch().to_owned();
    let members = [
        ("drained-ahead", Some(12), epoch.as_str()),
        ("drained-exactly", Some(10), epoch.as_str()),
        ("drained-behind", Some(9), epoch.as_str()),
        ("no-drained", None, epoch.as_str()),
        ("other-store", Some(50), "0123456789abcdef"),
    ];
    for (id, drained, epoch) in members {
        let hb = Heartbeat {
            proxy_id: id.into(),
            edge_region: "us".into(),
            applied_version: 12,
            drained_version: drained,
            checksum: Checksum::default().to_hex(),
            epoch: epoch.into(),
        };
        store.heartbeat(&hb, "fleet-token").await.unwrap();
    }
    let mut head = store.head().await.unwrap();
    head.epoch = epoch.clone();
    for version in [0, 9, 10, 11, 12, 13] {
        let by_rows =
            domicile_control_plane::moves::lagging(&store.fleet().await.unwrap(), &head, version)
                .len() as u64;
        assert_eq!(
            store.fleet_lagging(&epoch, version).await.unwrap(),
            (5, by_rows),
            "version {version}"
        );
    }
    assert_eq!(store.fleet_lagging(&epoch, 10).await.unwrap(), (5, 3));
}

/// A token deleted through one replica stops working on another within its poll interval,
/// though the other had it cached; one deleted locally stops at once.
async fn deleted_tokens_stop_working_on_every_replica(t: &common::TestStore) {
    let other = Store::open(&t.url, domicile_control_plane::testing::options())
        .await
        .unwrap();
    let secret = t.store.create_token("edge", Role::Proxy).await.unwrap();
    let local = t.store.create_token("local", Role::Proxy).await.unwrap();
    let found = Some(("edge".to_owned(), Role::Proxy));
    assert_eq!(other.authenticate(&secret).await.unwrap(), found);
    // Cached: asking again costs the store nothing.
    let before = other.operations();
    for _ in 0..20 {
        assert_eq!(other.authenticate(&secret).await.unwrap(), found);
    }
    assert!(other.operations() - before <= 2, "the token was not cached");
    t.store.delete_token("edge").await.unwrap();
    let started = std::time::Instant::now();
    while other.authenticate(&secret).await.unwrap().is_some() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "the deleted token still works on the other replica"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(other.authenticate(&local).await.unwrap().is_some());
    other.delete_token("local").await.unwrap();
    assert_eq!(other.authenticate(&local).await.unwrap(), None);
    other.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_tokens_stop_working_on_every_replica_sqlite() {
    deleted_tokens_stop_working_on_every_replica(&common::sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_tokens_stop_working_on_every_replica_postgres() {
    let Some(t) = common::postgres().await else {
        return;
    };
    deleted_tokens_stop_working_on_every_replica(&t).await;
}

fn move_to(workspace: &str, to: &str) -> MoveRequest {
    MoveRequest {
        workspace: workspace.into(),
        to: to.into(),
        webhook: None,
        timeout_ms: 60_000,
    }
}

fn conflict_code(e: StoreError) -> &'static str {
    match e {
        StoreError::Conflict { code, .. } | StoreError::Invalid { code, .. } => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn moves_write_their_phases_and_map_changes_together(store: &Store) {
    seed(store).await;
    store
        .put_workspace("acme", "us", false, &actor())
        .await
        .unwrap();
    let by = |name: &str, reason: &str| Actor {
        name: name.into(),
        reason: Some(reason.into()),
    };

    // Refusals: unknown workspace, unknown region, the same region.
    assert!(matches!(
        store.create_move(&move_to("nobody", "eu"), &actor()).await,
        Err(StoreError::NotFound { .. })
    ));
    let e = store.create_move(&move_to("acme", "mars"), &actor()).await;
    assert_eq!(conflict_code(e.unwrap_err()), "unknown_region");
    let e = store.create_move(&move_to("acme", "us"), &actor()).await;
    assert_eq!(conflict_code(e.unwrap_err()), "same_region");

    // Abort while requested: nothing was written to the map.
    let head = store.head().await.unwrap().version;
    let m = store
        .create_move(&move_to("acme", "eu"), &by("ops", "try"))
        .await
        .unwrap();
    assert_eq!(m.phase, Phase::Requested);
    assert_eq!((m.from.as_str(), m.to.as_str()), ("us", "eu"));
    let e = store.create_move(&move_to("acme", "eu"), &actor()).await;
    assert_eq!(conflict_code(e.unwrap_err()), "move_in_progress");
    let aborted = store
        .move_abort(m.id, &by("ops", "changed my mind"))
        .await
        .unwrap();
    assert_eq!(aborted.phase, Phase::Aborted);
    assert_eq!(aborted.abort_version, None);
    assert_eq!(aborted.abort_reason.as_deref(), Some("changed my mind"));
    assert_eq!(store.head().await.unwrap().version, head, "no map write");
    // A second abort is harmless; a complete is refused.
    assert_eq!(
        store.move_abort(m.id, &actor()).await.unwrap().phase,
        Phase::Aborted
    );
    let e = store.move_complete(m.id, &actor()).await.unwrap_err();
    assert_eq!(conflict_code(e), "move_aborted");

    // Abort while freezing: the freeze is undone at the old home.
    let m = store
        .create_move(&move_to("acme", "eu"), &actor())
        .await
        .unwrap();
    let m = store.move_freeze(m.id).await.unwrap().unwrap();
    assert_eq!(m.phase, Phase::Freezing);
    let vf = m.freeze_version.unwrap();
    let ws = store.workspace("acme").await.unwrap();
    assert_eq!(
        (ws.region.as_str(), ws.state, ws.version),
        ("us", State::Frozen, vf)
    );
    assert!(
        store.move_freeze(m.id).await.unwrap().is_none(),
        "freezes once"
    );
    let e = store.move_complete(m.id, &actor()).await.unwrap_err();
    assert_eq!(conflict_code(e), "move_not_frozen");
    let e = store
        .put_workspace("acme", "eu", true, &actor())
        .await
        .unwrap_err();
    assert_eq!(conflict_code(e), "workspace_moving");
    let aborted = store.move_abort(m.id, &actor()).await.unwrap();
    let ws = store.workspace("acme").await.unwrap();
    assert_eq!((ws.region.as_str(), ws.state), ("us", State::Active));
    assert_eq!(aborted.abort_version, Some(ws.version));

    // The whole way: freezing, frozen, switching, done.
    let m = store
        .create_move(&move_to("acme", "eu"), &by("ops", "customer asked"))
        .await
        .unwrap();
    let m = store.move_freeze(m.id).await.unwrap().unwrap();
    let m = store.move_frozen(m.id, "drained").await.unwrap().unwrap();
    assert_eq!(m.phase, Phase::Frozen);
    // The target region cannot go away under an open move.
    let e = store.delete_region("eu", &actor()).await.unwrap_err();
    assert_eq!(conflict_code(e), "region_in_use");
    assert!(store.move_frozen(m.id, "again").await.unwrap().is_none());
    let m = store
        .move_complete(m.id, &by("mover", "copied"))
        .await
        .unwrap();
    assert_eq!(m.phase, Phase::Switching);
    let vs = m.switch_version.unwrap();
    let ws = store.workspace("acme").await.unwrap();
    assert_eq!(
        (ws.region.as_str(), ws.state, ws.version),
        ("eu", State::Frozen, vs)
    );
    assert_eq!(
        store.move_complete(m.id, &actor()).await.unwrap().phase,
        Phase::Switching
    );
    let e = store.move_abort(m.id, &actor()).await.unwrap_err();
    assert_eq!(conflict_code(e), "move_past_switch");
    let m = store.move_finish(m.id, "drained").await.unwrap().unwrap();
    assert_eq!(m.phase, Phase::Done);
    let ws = store.workspace("acme").await.unwrap();
    assert_eq!((ws.region.as_str(), ws.state), ("eu", State::Active));
    assert_eq!(m.done_version, Some(ws.version));
    assert!(m.requested_at_ms <= m.freezing_at_ms.unwrap());
    assert!(m.freezing_at_ms <= m.frozen_at_ms && m.frozen_at_ms <= m.switching_at_ms);
    assert!(m.switching_at_ms <= m.done_at_ms);

    // The map history names the move and its actor.
    let history = store.history("acme").await.unwrap();
    let last = history.last().unwrap();
    assert_eq!(last.actor, "ops");
    assert!(last
        .reason
        .as_deref()
        .unwrap()
        .starts_with(&format!("move {}:", m.id)));

    // A workspace deleted before its freeze: the driver's freeze aborts the move instead.
    store
        .put_workspace("gone", "us", false, &actor())
        .await
        .unwrap();
    let doomed = store
        .create_move(&move_to("gone", "eu"), &actor())
        .await
        .unwrap();
    store.delete_workspace("gone", &actor()).await.unwrap();
    let doomed = store.move_freeze(doomed.id).await.unwrap().unwrap();
    assert_eq!(doomed.phase, Phase::Aborted);
    assert!(doomed.abort_reason.unwrap().contains("deleted"));

    // Listing.
    let listed = store.moves(Some("acme"), false, 10).await.unwrap();
    assert_eq!(listed.len(), 3);
    assert!(listed.windows(2).all(|w| w[0].id > w[1].id), "newest first");
    assert!(store.moves(None, true, 10).await.unwrap().is_empty());

    // The admin trail: every phase and map change of acme, in order, and pages that join up.
    let all = store
        .admin_audit(&AuditQuery {
            workspace: Some("acme".into()),
            limit: 1000,
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    let actions: Vec<&str> = all.iter().map(|e| e.action.as_str()).collect();
    for action in [
        "move.requested",
        "move.aborted",
        "move.freezing",
        "move.frozen",
        "move.switching",
        "move.done",
        "map.workspace.put",
    ] {
        assert!(actions.contains(&action), "{action} missing: {actions:?}");
    }
    assert!(all.windows(2).all(|w| w[0].cursor < w[1].cursor));
    let switching = all.iter().find(|e| e.action == "move.switching").unwrap();
    assert_eq!(switching.actor, "mover");
    assert_eq!(switching.reason.as_deref(), Some("copied"));
    let mut paged = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .admin_audit(&AuditQuery {
                workspace: Some("acme".into()),
                after,
                limit: 2,
                ..AuditQuery::default()
            })
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        after = Some(page.last().unwrap().cursor);
        paged.extend(page);
    }
    assert_eq!(paged, all, "pages of 2 give the same trail");
}
