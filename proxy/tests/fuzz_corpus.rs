//! The fuzz targets' seeds (and every finding kept as a regression case) run as ordinary
//! tests, so CI exercises what `cargo fuzz` starts from without nightly.

use std::path::Path;

fn run_seeds<T>(target: &str, run: fn(&[u8]) -> T) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| {
            run(&data);
        });
        assert!(outcome.is_ok(), "{} fails {target}", path.display());
        count += 1;
    }
    assert!(count > 0, "no seeds in {}", dir.display());
}

#[test]
fn framing_seeds() {
    run_seeds("framing", domicile_proxy::fuzzing::framing);
}

#[test]
fn identify_seeds() {
    run_seeds("identify", domicile_proxy::fuzzing::identify);
}

#[test]
fn config_seeds() {
    run_seeds("config", domicile_proxy::fuzzing::config);
}

#[test]
fn snapshot_seeds() {
    run_seeds("snapshot", domicile_proxy::fuzzing::snapshot);
}

#[test]
fn change_stream_seeds() {
    run_seeds("change_stream", domicile_proxy::fuzzing::change_stream);
}

#[test]
fn audit_verify_seeds() {
    run_seeds("audit_verify", domicile_proxy::fuzzing::audit_verify);
}

fn seed(target: &str, name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target)
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The seeds reach what they are for: changes are applied, not refused at the first line.
#[test]
fn change_stream_seeds_apply_their_changes() {
    use domicile_proxy::fuzzing::change_stream;
    // put, move and freeze, heartbeat, delete.
    assert_eq!(change_stream(&seed("change_stream", "seed-00")), 3);
    // a new region, a workspace moved into it, a region deleted.
    assert_eq!(change_stream(&seed("change_stream", "seed-01")), 3);
    // A gap, an unknown region, another epoch, a bad id, a bad country code.
    for refused in [
        "seed-02", "seed-03", "seed-04", "seed-05", "seed-06", "seed-07",
    ] {
        assert_eq!(
            change_stream(&seed("change_stream", refused)),
            0,
            "{refused}"
        );
    }
}

/// The genuine log verifies intact in both modes; every edit seed is caught.
#[test]
fn audit_verify_seeds_reach_the_verdicts() {
    use domicile_proxy::audit::verify::Verdict;
    use domicile_proxy::fuzzing::audit_verify;
    let verdict = |name| audit_verify(&seed("audit_verify", name));
    assert_eq!(verdict("seed-00"), Some(Verdict::Intact));
    assert_eq!(verdict("seed-10"), Some(Verdict::Intact));
    for damaged in [
        "seed-01", "seed-03", "seed-04", "seed-05", "seed-08", "seed-09",
    ] {
        assert_eq!(verdict(damaged), Some(Verdict::Damaged), "{damaged}");
    }
    // Cut in the middle of a line, or the last line feed cut: what a crash leaves.
    for open in ["seed-02", "seed-07"] {
        assert_eq!(verdict(open), Some(Verdict::Open), "{open}");
    }
}

#[test]
fn origin_response_seeds() {
    run_seeds("origin_response", domicile_proxy::fuzzing::origin_response);
}
