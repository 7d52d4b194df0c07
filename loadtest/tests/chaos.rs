//! The short form of `loadtest chaos`, on a fixed seed: 60 seconds of traffic and every kind of
//! fault at least once, against the `domicile` binary of this build (the long form and what
//! it judges: docs/benchmarks.md#chaos). Needs PostgreSQL (`DATABASE_URL`); skipped without
//! it, except under `CI=true`, where it fails.

use std::path::PathBuf;
use std::time::Duration;

/// The seed of the CI run; a failure names its logs, and `loadtest chaos --seed 20261204
/// --duration 60s` replays the same schedule.
const SEED: u64 = 20_261_204;

/// `target/<profile>/domicile`, built with this test (cargo builds a package's binaries for
/// its integration tests, and the workspace's test run builds the root package's).
fn domicile_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps/<test>");
    let binary = profile_dir.join("domicile");
    assert!(
        binary.is_file(),
        "{} is missing: build it with `cargo build --bin domicile` (the workspace's test run does)",
        binary.display()
    );
    binary
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_promise_holds_while_everything_fails() {
    if domicile_control_plane::testing::postgres_schema()
        .await
        .is_none()
    {
        return; // skipped with a note (outside CI only)
    }
    let logs = tempfile::Builder::new()
        .prefix("domicile-chaos-")
        .tempdir()
        .expect("a directory for the logs");
    let outcome = loadtest::chaos::run(loadtest::chaos::Options {
        seed: SEED,
        duration: Duration::from_secs(60),
        clients: 4,
        workspaces: 24,
        domicile: domicile_binary(),
        dir: logs.path().join("run"),
        results_dir: None,
        label: None,
    })
    .await
    .expect("the chaos run ran to its end");
    let report = &outcome.report;
    let verdict = &report.verdict;
    println!("{}", outcome.markdown);
    // The run must have done what it claims before its verdict means anything.
    for fault in [
        "move",
        "move+replica-kills",
        "proxy-kill",
        "replica-kill",
        "origins-down",
        "control-plane-unreachable",
        "database-cut",
    ] {
        assert!(
            report.faults.get(fault).copied().unwrap_or(0) > 0,
            "no {fault} was injected:\n{}",
            outcome.markdown
        );
    }
    assert!(report.moves_done > 0, "{}", outcome.markdown);
    assert!(report.moves_aborted > 0, "{}", outcome.markdown);
    assert!(report.origin_requests > 1000, "{}", outcome.markdown);
    assert_eq!(verdict.logs_verified, 3);
    if !verdict.ok() {
        // Keep the logs for the replay.
        let kept = logs.keep();
        panic!(
            "{}\nlogs kept in {}\n{}",
            verdict.line(),
            kept.display(),
            outcome.markdown
        );
    }
}
