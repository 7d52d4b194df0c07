use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use crate::dev::{self, DevCa, DevOptions, Leaf, Usage};
use crate::*;

fn write_leaf(dir: &Path, stem: &str, ca: &DevCa, leaf: &Leaf) -> CertSource {
    let issued = ca.issue(leaf).unwrap();
    let source = CertSource {
        cert: dir.join(format!("{stem}.pem")),
        key: dir.join(format!("{stem}-key.pem")),
    };
    dev::write_file(&source.cert, &issued.cert_pem, false).unwrap();
    dev::write_file(&source.key, &issued.key_pem, true).unwrap();
    source
}

fn server(names: &[&str]) -> Leaf {
    Leaf::new(names[0], Usage::Server, 30).names(names.iter().copied())
}

fn loaded(dir: &Path, ca: &DevCa, leaves: &[(&str, Leaf)]) -> Vec<LoadedCert> {
    let provider = pem::provider();
    leaves
        .iter()
        .map(|(stem, leaf)| {
            let s = write_leaf(dir, stem, ca, leaf);
            pem::load_pair(&s.cert, &s.key, &provider).unwrap()
        })
        .collect()
}

fn subject_of(set: &CertSet, name: Option<&str>) -> Option<String> {
    set.lookup(name).map(|c| c.info.dns_names[0].clone())
}

#[test]
fn exact_names_beat_wildcards_and_wildcards_cover_one_label() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::generate("test CA").unwrap();
    let certs = loaded(
        dir.path(),
        &ca,
        &[
            ("default", server(&["default.test"])),
            ("wild", server(&["*.example.test"])),
            ("exact", server(&["api.example.test"])),
            ("ip", server(&["ip.test", "192.0.2.7"])),
        ],
    );
    let set = CertSet::new(certs.clone(), UnknownName::Refuse).unwrap();
    assert_eq!(
        subject_of(&set, Some("api.example.test")).as_deref(),
        Some("api.example.test")
    );
    assert_eq!(
        subject_of(&set, Some("API.Example.Test.")).as_deref(),
        Some("api.example.test")
    );
    assert_eq!(
        subject_of(&set, Some("acme.example.test")).as_deref(),
        Some("*.example.test")
    );
    // One label only: neither the bare domain nor two labels deep.
    assert_eq!(subject_of(&set, Some("example.test")), None);
    assert_eq!(subject_of(&set, Some("a.b.example.test")), None);
    assert_eq!(subject_of(&set, Some(".example.test")), None);
    assert_eq!(
        subject_of(&set, Some("192.0.2.7")).as_deref(),
        Some("ip.test")
    );
    assert_eq!(subject_of(&set, None), None);

    let set = CertSet::new(certs, UnknownName::Default).unwrap();
    assert_eq!(
        subject_of(&set, Some("other.test")).as_deref(),
        Some("default.test")
    );
    assert_eq!(subject_of(&set, None).as_deref(), Some("default.test"));
}

#[test]
fn bad_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::generate("test CA").unwrap();
    let a = write_leaf(dir.path(), "a", &ca, &server(&["a.test"]));
    let b = write_leaf(dir.path(), "b", &ca, &server(&["b.test"]));
    let provider = pem::provider();
    let err = pem::load_pair(&a.cert, &b.key, &provider).unwrap_err();
    assert!(matches!(err, CertError::KeyMismatch { .. }), "{err}");
    assert!(err.to_string().contains("a.pem"), "{err}");

    let missing = dir.path().join("missing.pem");
    let err = pem::load_pair(&missing, &a.key, &provider).unwrap_err();
    assert!(err.to_string().contains("missing.pem"), "{err}");

    // A key file given as the certificate, and the reverse.
    let err = pem::load_pair(&a.key, &a.key, &provider).unwrap_err();
    assert!(matches!(err, CertError::NoCertificate { .. }), "{err}");
    let err = pem::load_pair(&a.cert, &a.cert, &provider).unwrap_err();
    assert!(matches!(err, CertError::NoKey { .. }), "{err}");

    let garbage = dir.path().join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let err = pem::load_pair(&garbage, &a.key, &provider).unwrap_err();
    assert!(err.to_string().contains("garbage.pem"), "{err}");
}

#[test]
fn validity_is_read_from_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::generate("test CA").unwrap();
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let certs = loaded(
        dir.path(),
        &ca,
        &[
            (
                "expired",
                server(&["old.test"]).valid(now - 10 * day, now - day),
            ),
            (
                "future",
                server(&["new.test"]).valid(now + day, now + 10 * day),
            ),
            ("ok", server(&["ok.test"])),
        ],
    );
    let problem = certs[0].info.validity_problem(now).unwrap();
    assert!(problem.contains("expired"), "{problem}");
    assert!(certs[0].info.seconds_left(now) < -86_000);
    let problem = certs[1].info.validity_problem(now).unwrap();
    assert!(problem.contains("not valid until"), "{problem}");
    assert_eq!(certs[2].info.validity_problem(now), None);
    let left = certs[2].info.seconds_left(now);
    assert!((29 * 86_400..=30 * 86_400).contains(&left), "{left}");
}

#[test]
fn reload_swaps_whole_sets_and_keeps_the_old_one_on_error() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::generate("test CA").unwrap();
    let source = write_leaf(dir.path(), "edge", &ca, &server(&["one.test"]));
    let tls = ServerTls::load(
        vec![source.clone()],
        UnknownName::Refuse,
        &ServerOptions::default(),
    )
    .unwrap();
    let names = |tls: &ServerTls| tls.certs().names().collect::<Vec<_>>();
    assert_eq!(names(&tls), ["one.test"]);
    // Unchanged files: nothing to do.
    assert!(!tls.reload().unwrap());

    write_leaf(dir.path(), "edge", &ca, &server(&["two.test"]));
    assert!(tls.reload().unwrap());
    assert_eq!(names(&tls), ["two.test"]);

    // A truncated certificate: refused, counted, the current set stays.
    std::fs::write(&source.cert, "-----BEGIN CERTIFICATE-----\nMIIB").unwrap();
    let err = tls.reload().unwrap_err();
    assert!(err.to_string().contains("edge.pem"), "{err}");
    assert_eq!(names(&tls), ["two.test"]);
    assert!(tls.last_error().unwrap().contains("edge.pem"));
    // The same broken bytes are not reported again.
    assert!(!tls.reload().unwrap());

    // An expired certificate does not replace a valid one.
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    write_leaf(
        dir.path(),
        "edge",
        &ca,
        &server(&["three.test"]).valid(now - 2 * day, now - day),
    );
    let err = tls.reload().unwrap_err();
    assert!(matches!(err, CertError::Validity { .. }), "{err}");
    assert_eq!(names(&tls), ["two.test"]);

    write_leaf(dir.path(), "edge", &ca, &server(&["four.test"]));
    assert!(tls.reload().unwrap());
    assert_eq!(names(&tls), ["four.test"]);
    assert_eq!(tls.last_error(), None);
    let stats = tls.stats();
    assert_eq!(stats.reloads_ok.load(Ordering::Relaxed), 2);
    assert_eq!(stats.reloads_failed.load(Ordering::Relaxed), 2);
}

#[test]
fn dev_pki_files_and_permissions() {
    let dir = tempfile::tempdir().unwrap();
    let options = DevOptions {
        domain: "example.test".into(),
        regions: vec!["us".into(), "eu".into()],
        proxies: vec!["edge-1".into()],
        edge_names: vec!["acme.localhost".into()],
        days: 30,
        force: false,
    };
    let files = dev::generate(dir.path(), &options).unwrap();
    let layout = dev::DevLayout::new(dir.path());
    for file in &files {
        let mode = {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(file).unwrap().permissions().mode() & 0o777
        };
        let private = file.to_string_lossy().ends_with("-key.pem");
        assert_eq!(
            mode,
            if private { 0o600 } else { 0o644 },
            "{}",
            file.display()
        );
    }
    let provider = pem::provider();
    let (c, k) = layout.origin("eu");
    let eu = pem::load_pair(&c, &k, &provider).unwrap();
    assert_eq!(eu.info.dns_names, ["eu.region.example.test"]);
    let (c, k) = layout.proxy("edge-1");
    let proxy = pem::load_pair(&c, &k, &provider).unwrap();
    let id = identity::of_certificate(&proxy.key.cert[0]).unwrap();
    assert_eq!((id.role.as_str(), id.name.as_str()), ("proxy", "edge-1"));
    let (c, k) = layout.edge();
    let edge = pem::load_pair(&c, &k, &provider).unwrap();
    assert!(edge.info.dns_names.contains(&"*.localhost".to_string()));
    assert!(edge.info.dns_names.contains(&"acme.localhost".to_string()));

    // A second run does not overwrite without --force.
    let err = dev::generate(dir.path(), &options).unwrap_err();
    assert!(err.to_string().contains("--force"), "{err}");
    let forced = DevOptions {
        force: true,
        ..options.clone()
    };
    dev::generate(dir.path(), &forced).unwrap();

    let bad = DevOptions {
        domain: "Example Test".into(),
        ..options.clone()
    };
    assert!(dev::generate(dir.path(), &bad)
        .unwrap_err()
        .to_string()
        .contains("--domain"));
    let bad = DevOptions {
        regions: vec!["EU!".into()],
        ..options
    };
    assert!(dev::generate(dir.path(), &bad)
        .unwrap_err()
        .to_string()
        .contains("EU!"));
}
