//! The fuzz targets' seeds (and every finding kept as a regression case) run as ordinary
//! tests, so CI exercises what `cargo fuzz` starts from without nightly.

use std::path::Path;

fn run_seeds(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| run(&data));
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
