//! The writer and the verifier together: logs written for real, then damaged in every way an
//! auditor must catch, and crashes that must not be mistaken for damage.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use ed25519_dalek::{Signer, VerifyingKey};

use super::format::{self, segment_name};
use super::verify::{verify, Damage, Report, Verdict};
use super::*;
use crate::config::{AuditSection, ClientIpMode, OnFailure};

struct Log {
    _dir: tempfile::TempDir,
    audit_dir: PathBuf,
    key_path: PathBuf,
    public: VerifyingKey,
    replica: Arc<Replica>,
}

impl Log {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("audit.key");
        let public = keys::generate(&key_path, &dir.path().join("audit.pub"), false).unwrap();
        let replica = Arc::new(Replica::new());
        replica.regions().intern("us").unwrap();
        replica.regions().intern("eu").unwrap();
        Self {
            audit_dir: dir.path().join("audit"),
            _dir: dir,
            key_path,
            public,
            replica,
        }
    }

    fn section(&self, segment_max_bytes: u64) -> AuditSection {
        AuditSection {
            dir: self.audit_dir.clone(),
            signing_key: self.key_path.clone(),
            commit_interval: Duration::from_millis(1),
            checkpoint_interval: Duration::from_secs(10),
            segment_max_bytes,
            segment_max_age: Duration::from_secs(3600),
            queue_capacity: 1024,
            client_ip: ClientIpMode::Full,
            on_failure: OnFailure::Refuse,
        }
    }

    fn start(&self, segment_max_bytes: u64) -> Audit {
        Audit::start(
            &self.section(segment_max_bytes),
            Identity {
                proxy_id: "edge-1",
                edge_region: "us",
            },
            self.replica.clone(),
            vec![
                vec![Arc::from("10.0.0.1:80")],
                vec![Arc::from("10.0.1.1:80")],
            ],
            None,
        )
        .unwrap()
    }

    /// Records `n` forwarded requests, letting the writer commit between them so segments
    /// rotate at their size.
    fn record(&self, audit: &Audit, n: usize) {
        let workspace = crate::route::workspace_id::WorkspaceId::parse(b"acme").unwrap();
        for i in 0..n {
            let Begin::Record(mut entry) = audit.begin() else {
                panic!("the log refused a record");
            };
            let path = format!("/orders/{i}");
            entry.describe(&Description {
                request_id: format!("req-{i}").as_bytes(),
                method: "GET",
                host: Some("acme.example.com"),
                path: &path,
                client_ip: "81.2.69.142".parse().unwrap(),
                workspace: Some(&workspace),
                home_region: Some(0),
                map_version: Some(7),
                epoch: Some(3),
                refusal: None,
            });
            entry.upstream(0, 0);
            entry.status(200);
            entry.add_bytes_out(29);
            entry.complete();
            if i % 10 == 9 {
                self.wait_written(audit, i as u64 + 1);
            }
        }
        self.wait_written(audit, n as u64);
    }

    fn wait_written(&self, audit: &Audit, at_least: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while audit.records_written() < at_least {
            assert!(std::time::Instant::now() < deadline, "records not written");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn verify(&self) -> Report {
        verify(&self.audit_dir, &self.public, None).unwrap()
    }

    fn segment(&self, number: u64) -> PathBuf {
        self.audit_dir.join(segment_name(number))
    }

    fn lines(&self, number: u64) -> Vec<String> {
        std::fs::read_to_string(self.segment(number))
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn write_lines(&self, number: u64, lines: &[String]) {
        let mut text = lines.join("\n");
        text.push('\n');
        std::fs::write(self.segment(number), text).unwrap();
    }

    fn segments(&self) -> usize {
        format::list_segments(&self.audit_dir).unwrap().len()
    }
}

/// A closed log of `records` records over several segments.
fn closed_log(records: usize) -> Log {
    let log = Log::new();
    let audit = log.start(64 * 1024);
    log.record(&audit, records);
    audit.stop();
    log
}

fn kinds(report: &Report) -> Vec<Damage> {
    report.findings.iter().map(|f| f.kind).collect()
}

fn line_of(log: &Log, number: u64, seq: u64) -> usize {
    log.lines(number)
        .iter()
        .position(|l| l.contains(&format!("\"type\":\"record\",\"seq\":{seq},")))
        .expect("record in segment")
}

#[test]
fn a_closed_log_verifies_intact() {
    let log = closed_log(800);
    assert!(
        log.segments() >= 3,
        "expected rotation, got {}",
        log.segments()
    );
    let report = log.verify();
    assert_eq!(report.verdict, Verdict::Intact, "{}", report.to_text());
    assert_eq!(report.records, 800);
    assert_eq!((report.first_seq, report.last_seq), (Some(1), Some(800)));
    assert!(report.findings.is_empty() && report.open_tail.is_none());
    assert_eq!(report.proxy_id.as_deref(), Some("edge-1"));
    // Every segment but the last ends with a rotation checkpoint, the last with shutdown.
    assert!(report.segments.iter().all(|s| s.closed));
    let last = log.lines(report.segments.len() as u64);
    assert!(last.last().unwrap().contains("\"reason\":\"shutdown\""));
    // Records carry what the design lists.
    let first = log.lines(1);
    let record: serde_json::Value = serde_json::from_str(&first[1]).unwrap();
    for (field, value) in [
        ("seq", serde_json::json!(1)),
        ("proxy_id", serde_json::json!("edge-1")),
        ("edge_region", serde_json::json!("us")),
        ("workspace", serde_json::json!("acme")),
        ("home_region", serde_json::json!("us")),
        ("decision", serde_json::json!("forwarded")),
        ("upstream_region", serde_json::json!("us")),
        ("upstream", serde_json::json!("10.0.0.1:80")),
        ("map_version", serde_json::json!(7)),
        ("epoch", serde_json::json!(3)),
        ("method", serde_json::json!("GET")),
        ("path", serde_json::json!("/orders/0")),
        ("status", serde_json::json!(200)),
        ("bytes_out", serde_json::json!(29)),
        ("complete", serde_json::json!(true)),
        ("client_ip", serde_json::json!("81.2.69.142")),
    ] {
        assert_eq!(record[field], value, "{field} in {record}");
    }
}

#[test]
fn a_flipped_byte_is_an_edit_at_its_line() {
    let log = closed_log(300);
    let mut lines = log.lines(1);
    let at = line_of(&log, 1, 40);
    lines[at] = lines[at].replace("\"upstream_region\":\"us\"", "\"upstream_region\":\"eu\"");
    log.write_lines(1, &lines);
    let report = log.verify();
    assert_eq!(report.verdict, Verdict::Damaged);
    assert_eq!(kinds(&report), [Damage::Edited], "{}", report.to_text());
    let finding = &report.findings[0];
    assert_eq!(finding.file, segment_name(1));
    assert_eq!(finding.line, Some(at + 1), "{}", report.to_text());
    assert_eq!(finding.seq, Some(40));

    // A byte that breaks the JSON is an edit too, named at that line.
    let log = closed_log(50);
    let mut bytes = std::fs::read(log.segment(1)).unwrap();
    let at = bytes.len() / 2;
    bytes[at] = b'{';
    std::fs::write(log.segment(1), bytes).unwrap();
    let report = log.verify();
    assert_eq!(kinds(&report), [Damage::Edited], "{}", report.to_text());
}

#[test]
fn a_deleted_record_is_named_by_its_seq() {
    let log = closed_log(300);
    let mut lines = log.lines(1);
    let at = line_of(&log, 1, 25);
    lines.remove(at);
    log.write_lines(1, &lines);
    let report = log.verify();
    assert_eq!(kinds(&report), [Damage::Deleted], "{}", report.to_text());
    assert!(
        report.findings[0].detail.contains("record 25 is missing"),
        "{}",
        report.to_text()
    );
}

#[test]
fn a_deleted_segment_is_named() {
    let log = closed_log(800);
    assert!(log.segments() >= 3);
    std::fs::remove_file(log.segment(2)).unwrap();
    let report = log.verify();
    assert_eq!(
        kinds(&report),
        [Damage::SegmentDeleted],
        "{}",
        report.to_text()
    );
    assert_eq!(report.findings[0].file, segment_name(2));

    // The first segment too: the log does not begin where it should.
    let log = closed_log(800);
    std::fs::remove_file(log.segment(1)).unwrap();
    let report = log.verify();
    assert_eq!(
        kinds(&report),
        [Damage::SegmentDeleted],
        "{}",
        report.to_text()
    );
}

#[test]
fn swapped_records_are_reordered() {
    let log = closed_log(300);
    let mut lines = log.lines(1);
    let a = line_of(&log, 1, 30);
    let b = line_of(&log, 1, 31);
    lines.swap(a, b);
    log.write_lines(1, &lines);
    let report = log.verify();
    assert_eq!(kinds(&report), [Damage::Reordered], "{}", report.to_text());

    // Far apart, too.
    let log = closed_log(300);
    let mut lines = log.lines(1);
    let a = line_of(&log, 1, 10);
    let b = line_of(&log, 1, 20);
    lines.swap(a, b);
    log.write_lines(1, &lines);
    let report = log.verify();
    assert!(
        !report.findings.is_empty() && report.findings.iter().all(|f| f.kind == Damage::Reordered),
        "{}",
        report.to_text()
    );
}

#[test]
fn a_cut_tail_is_truncation() {
    // The end of a segment that has a successor.
    let log = closed_log(800);
    let mut lines = log.lines(1);
    lines.truncate(lines.len() - 5);
    log.write_lines(1, &lines);
    let report = log.verify();
    assert_eq!(kinds(&report), [Damage::Truncated], "{}", report.to_text());
    assert_eq!(report.findings[0].file, segment_name(2));

    // The end of the newest segment, against a checkpoint fetched from the proxy earlier.
    let log = Log::new();
    let audit = log.start(64 * 1024);
    log.record(&audit, 100);
    audit.stop();
    let witness = std::fs::read_to_string(log.segment(1))
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .to_owned();
    let mut lines = log.lines(1);
    lines.truncate(lines.len() - 10);
    log.write_lines(1, &lines);
    let report = verify(&log.audit_dir, &log.public, Some(&witness)).unwrap();
    assert_eq!(kinds(&report), [Damage::Truncated], "{}", report.to_text());
    assert!(report.findings[0].detail.contains("tail was cut"));
    // Without the witness, all that can be said is that the log is open at the end.
    let report = log.verify();
    assert_eq!(report.verdict, Verdict::Open, "{}", report.to_text());
    assert!(report.to_text().contains("open tail"));
    // A witness that is not the proxy's own is refused.
    let forged = witness.replace("\"seq\":100", "\"seq\":1000");
    assert!(verify(&log.audit_dir, &log.public, Some(&forged)).is_err());
}

#[test]
fn a_checkpoint_signed_with_another_key_is_forged() {
    let log = closed_log(300);
    let mut lines = log.lines(1);
    let at = lines
        .iter()
        .rposition(|l| l.contains("\"type\":\"checkpoint\""))
        .unwrap();
    let other = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
    let other_id = format::key_id(&other.verifying_key());
    let original = &lines[at];
    let (signed, _) = format::split_signature(original.as_bytes()).unwrap();
    let signed = String::from_utf8(signed)
        .unwrap()
        .replace(&format::key_id(&log.public), &other_id);
    let sig =
        base64::engine::general_purpose::STANDARD.encode(other.sign(signed.as_bytes()).to_bytes());
    lines[at] = format!("{},\"sig\":\"{sig}\"}}", &signed[..signed.len() - 1]);
    log.write_lines(1, &lines);
    let report = log.verify();
    assert_eq!(
        kinds(&report),
        [Damage::ForgedCheckpoint],
        "{}",
        report.to_text()
    );
    assert!(report.findings[0].detail.contains(&other_id));
    assert_eq!(report.findings[0].line, Some(at + 1));
}

#[test]
fn a_crash_leaves_an_open_tail_and_the_next_run_acknowledges_it() {
    let log = Log::new();
    let audit = log.start(64 * 1024);
    log.record(&audit, 120);
    audit.stop();
    // What a crash leaves: no closing checkpoint, and the last write cut short.
    let mut lines = log.lines(1);
    lines.pop();
    let mut text = lines.join("\n");
    text.push('\n');
    text.truncate(text.len() - 40);
    std::fs::write(log.segment(1), &text).unwrap();
    let report = log.verify();
    assert_eq!(report.verdict, Verdict::Open, "{}", report.to_text());
    assert!(report.findings.is_empty(), "{}", report.to_text());
    let tail = report.open_tail.as_ref().unwrap();
    assert!(tail.partial_bytes > 0);
    assert_eq!(report.last_seq, Some(119));

    // The next run continues the chain after the last complete line and says so.
    let audit = log.start(64 * 1024);
    log.record(&audit, 5);
    audit.stop();
    let report = log.verify();
    assert_eq!(report.verdict, Verdict::Intact, "{}", report.to_text());
    assert!(
        report.notes.iter().any(|n| n.detail.contains("crash")),
        "{}",
        report.to_text()
    );
    let start = log.lines(2)[0].clone();
    assert!(start.contains("\"reason\":\"start\"") && start.contains("\"recovered\":{"));
    // Sequences go on from the last record on disk.
    assert_eq!(report.last_seq, Some(124));
    assert_eq!(report.records, 124);
}

#[test]
fn idle_logs_are_checkpointed_and_restarts_continue_the_chain() {
    let log = Log::new();
    let mut section = log.section(1 << 20);
    section.checkpoint_interval = Duration::from_millis(50);
    let start = |section: &AuditSection| {
        Audit::start(
            section,
            Identity {
                proxy_id: "edge-1",
                edge_region: "us",
            },
            log.replica.clone(),
            vec![],
            None,
        )
        .unwrap()
    };
    let audit = start(&section);
    std::thread::sleep(Duration::from_millis(300));
    audit.stop();
    let audit = start(&section);
    log.record(&audit, 3);
    audit.stop();
    let report = log.verify();
    assert_eq!(report.verdict, Verdict::Intact, "{}", report.to_text());
    let intervals = log
        .lines(1)
        .iter()
        .filter(|l| l.contains("\"reason\":\"interval\""))
        .count();
    assert!(
        intervals >= 3,
        "only {intervals} idle checkpoints in 300 ms"
    );
    assert_eq!(log.segments(), 2);
    assert_eq!(report.records, 3);
}

#[test]
fn a_second_writer_on_one_directory_is_refused() {
    let log = Log::new();
    let audit = log.start(1 << 20);
    let err = Audit::start(
        &log.section(1 << 20),
        Identity {
            proxy_id: "edge-2",
            edge_region: "us",
        },
        log.replica.clone(),
        vec![],
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("another process"), "{err}");
    audit.stop();
}

#[test]
fn a_full_queue_refuses_and_the_next_checkpoint_says_so() {
    let log = Log::new();
    let mut section = log.section(1 << 20);
    section.queue_capacity = 4;
    let audit = Audit::start(
        &section,
        Identity {
            proxy_id: "edge-1",
            edge_region: "us",
        },
        log.replica.clone(),
        vec![],
        None,
    )
    .unwrap();
    // Four requests in flight hold every reservation.
    let held: Vec<Entry> = (0..4)
        .map(|_| match audit.begin() {
            Begin::Record(entry) => entry,
            _ => panic!("refused early"),
        })
        .collect();
    assert!(matches!(audit.begin(), Begin::Refuse));
    audit.count_refusal();
    drop(held);
    log.wait_written(&audit, 4);
    assert!(matches!(audit.begin(), Begin::Record(_)));
    audit.stop();
    let report = log.verify();
    assert_eq!(report.verdict, Verdict::Intact, "{}", report.to_text());
    assert_eq!(report.outages.len(), 1, "{}", report.to_text());
    assert_eq!(report.outages[0].1.kind, "queue_full");
    assert_eq!(report.outages[0].1.refused, 1);
    // Cut-off requests are recorded as not complete.
    let records: Vec<_> = log
        .lines(1)
        .into_iter()
        .filter(|l| l.contains("\"record\""))
        .collect();
    assert_eq!(records.len(), 5);
    assert!(records[..4]
        .iter()
        .all(|l| l.contains("\"complete\":false")));
}

/// Where the audit fuzz target's sealed log lives (`crate::fuzzing::audit_verify`).
fn fuzz_fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/fixtures/audit")
}

/// Writes the audit fuzz target's fixture: a closed log of a dozen records over two
/// segments and its public key (the signing key is thrown away). Run by hand when the log
/// format changes: `cargo test -p domicile-proxy --lib -- --ignored write_audit_fuzz_fixture`.
#[test]
#[ignore = "rewrites proxy/fuzz/fixtures/audit"]
fn write_audit_fuzz_fixture() {
    let log = Log::new();
    let audit = log.start(2048);
    log.record(&audit, 12);
    audit.stop();
    let out = fuzz_fixture_dir();
    if out.exists() {
        std::fs::remove_dir_all(&out).unwrap();
    }
    std::fs::create_dir_all(&out).unwrap();
    for (number, path) in format::list_segments(&log.audit_dir).unwrap() {
        std::fs::copy(path, out.join(segment_name(number))).unwrap();
    }
    std::fs::write(
        out.join("audit.pub"),
        keys::public_pem(&log.public).unwrap(),
    )
    .unwrap();
}

#[test]
fn the_audit_fuzz_fixture_is_a_closed_intact_log() {
    let dir = fuzz_fixture_dir();
    let key = keys::load_verifying_key(&dir.join("audit.pub")).unwrap();
    let report = verify(&dir, &key, None).unwrap();
    assert_eq!(report.verdict, Verdict::Intact, "{}", report.to_text());
    assert!(report.segments.len() >= 2, "the fixture should rotate");
    assert_eq!(report.records, 12);
    // The same log from memory reads the same.
    let segments: Vec<(u64, Vec<u8>)> = format::list_segments(&dir)
        .unwrap()
        .into_iter()
        .map(|(n, p)| (n, std::fs::read(p).unwrap()))
        .collect();
    let borrowed: Vec<(u64, &[u8])> = segments.iter().map(|(n, b)| (*n, &b[..])).collect();
    let again = super::verify::verify_segments(&borrowed, &key, None).unwrap();
    assert_eq!(
        again
            .to_text()
            .replace("(memory)", &dir.display().to_string()),
        report.to_text()
    );
}

#[test]
fn segments_in_memory_must_be_numbered_from_one_up_and_ascend() {
    let dir = fuzz_fixture_dir();
    let key = keys::load_verifying_key(&dir.join("audit.pub")).unwrap();
    let line: &[u8] = b"{}\n";
    for numbers in [&[0u64][..], &[1, 1], &[2, 1]] {
        let segments: Vec<(u64, &[u8])> = numbers.iter().map(|&n| (n, line)).collect();
        let outcome = super::verify::verify_segments(&segments, &key, None);
        assert!(
            matches!(outcome, Err(super::verify::VerifyError::Numbering)),
            "{numbers:?}"
        );
    }
    assert!(matches!(
        super::verify::verify_segments(&[], &key, None),
        Err(super::verify::VerifyError::Empty { .. })
    ));
}
