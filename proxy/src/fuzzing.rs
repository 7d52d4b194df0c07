//! Entry points for the fuzz targets in `proxy/fuzz/`, kept here so that the seed corpus runs
//! as an ordinary test too (`tests/fuzz_corpus.rs`). Each takes arbitrary bytes, must never
//! panic, and checks what must hold for any input.

use std::path::Path;

use crate::config::{ProxyConfig, Rule};
use crate::http::framing::{self, ChunkedBody};
use crate::http::Fields;
use crate::route::identify::{Identifier, Identity, RequestView};
use crate::route::map::{MapTable, Replica};
use crate::route::mapfile::{self, MapBuilder};
use crate::route::workspace_id::WorkspaceId;
use crate::sync::{self, Position, Taken};

/// Request heads and chunked bodies: the framing rules never panic, a head found in one piece
/// is found the same when it arrives a byte at a time, and a head that passes is framed once.
pub fn framing(data: &[u8]) {
    let mut scanned = 0;
    let whole = framing::find_head_end(data, &mut scanned);
    let mut scanned = 0;
    let mut piecewise = Ok(None);
    for end in 1..=data.len().min(4096) {
        piecewise = framing::find_head_end(&data[..end], &mut scanned);
        if !matches!(piecewise, Ok(None)) {
            break;
        }
    }
    if data.len() <= 4096 {
        assert_eq!(
            whole, piecewise,
            "a head split into bytes reads differently"
        );
    }
    if let Ok(Some(end)) = whole {
        if let Ok(head) = framing::check_request_head(&data[..end]) {
            assert_eq!(head.len, end);
            if head.body == framing::BodyFraming::Chunked {
                let body = &data[end..];
                let whole = ChunkedBody::default().feed(body);
                let mut chunks = ChunkedBody::default();
                let mut split = Ok(None);
                for (i, byte) in body.iter().enumerate() {
                    match chunks.feed(std::slice::from_ref(byte)) {
                        Ok(Some(_)) => {
                            split = Ok(Some(i + 1));
                            break;
                        }
                        Ok(None) => {}
                        Err(e) => {
                            split = Err(e);
                            break;
                        }
                    }
                }
                assert_eq!(
                    whole, split,
                    "a chunked body split into bytes reads differently"
                );
            }
        }
    }
}

fn rules() -> Vec<Rule> {
    vec![
        Rule::Host {
            pattern: "{workspace}.app.example.com".into(),
        },
        Rule::Path {
            pattern: "/workspaces/{workspace}/".into(),
        },
        Rule::Header {
            name: "x-workspace-id".into(),
        },
        Rule::Query {
            name: "app_id".into(),
        },
    ]
}

/// Identification: host, path, query and header values split from the input by NUL bytes.
/// Whatever is found is a valid workspace id, and the same request always gives the same
/// answer.
pub fn identify(data: &[u8]) {
    let identifier = Identifier::new(&rules()).expect("fixed rules compile");
    let mut parts = data.split(|&b| b == 0);
    let host = parts.next().and_then(|p| std::str::from_utf8(p).ok());
    let path = parts
        .next()
        .and_then(|p| std::str::from_utf8(p).ok())
        .unwrap_or("/");
    let query = parts.next().and_then(|p| std::str::from_utf8(p).ok());
    let values: Vec<&[u8]> = parts.collect();
    let fields: Vec<httparse::Header<'_>> = values
        .iter()
        .map(|value| httparse::Header {
            name: "x-workspace-id",
            value,
        })
        .collect();
    let request = RequestView {
        host,
        path,
        query,
        headers: Fields::Raw(&fields),
    };
    let first = identifier.identify(&request);
    if let Identity::Workspace(id) = &first {
        let again = WorkspaceId::parse(id.as_bytes()).expect("an identified id is valid");
        assert_eq!(again.as_bytes(), id.as_bytes(), "ids are normal forms");
    }
    assert_eq!(
        format!("{first:?}"),
        format!("{:?}", identifier.identify(&request))
    );
}

/// Proxy configuration text: parsed and validated without panicking. Paths resolve against a
/// directory that does not exist, so nothing outside is read.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = ProxyConfig::from_toml(text, Path::new("/nonexistent/domicile-fuzz"));
}

/// A map snapshot (JSON lines, as the control plane and map files send it): taken line by
/// line, and either refused with errors or loaded with as many entries as its lines held.
pub fn snapshot(data: &[u8]) {
    let replica = Replica::new();
    let mut builder = MapBuilder::new(&replica, 0);
    let mut lines = 0;
    for line in data.split(|&b| b == b'\n') {
        lines += 1;
        builder.line(&String::from_utf8_lossy(line));
    }
    if let Ok(loaded) = builder.finish(Path::new("fuzz-snapshot")) {
        assert!(loaded.table.len() <= lines, "more entries than lines");
    }
}

/// The base map the change-stream target starts from: version 10 of epoch `e1`.
const CHANGE_BASE: &str = "{\"type\":\"map\",\"version\":10,\"epoch\":\"e1\"}\n\
    {\"type\":\"region\",\"id\":\"us\",\"jurisdiction\":[\"US\"]}\n\
    {\"type\":\"region\",\"id\":\"eu\",\"jurisdiction\":[\"DE\",\"FR\"]}\n\
    {\"type\":\"workspace\",\"id\":\"acme\",\"region\":\"us\",\"epoch\":1,\"version\":3}\n\
    {\"type\":\"workspace\",\"id\":\"globex\",\"region\":\"eu\",\"state\":\"frozen\",\"epoch\":2,\"version\":9}\n";

fn entries(table: &MapTable) -> Vec<(String, crate::route::map::MapEntry)> {
    let mut all = Vec::new();
    table.for_each(|id, entry| all.push((id.to_owned(), entry)));
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

/// The change stream (`GET /v1/map/changes`), line by line as the sync task takes it, from a
/// fixed base map. A change is applied only with the next version; a line that is refused
/// ends the stream and leaves the table as it was; after every line the running checksum is
/// the checksum of the table as it stands, and every entry names a known region. Returns how
/// many changes were applied.
pub fn change_stream(data: &[u8]) -> usize {
    let replica = Replica::new();
    let mut builder = MapBuilder::new(&replica, 4);
    for line in CHANGE_BASE.lines() {
        builder.line(line);
    }
    let loaded = builder
        .finish(Path::new("fuzz-base"))
        .expect("the base map loads");
    let mut pos = Position {
        epoch: loaded.epoch.clone().expect("the base names its epoch"),
        version: loaded.table.version(),
        checksum: loaded.checksum,
        catalogue: loaded.regions.clone(),
    };
    replica
        .replace(loaded.table, &loaded.regions)
        .expect("the base catalogue is valid");
    let table = replica.table().expect("a map is loaded");
    let mut applied = 0;
    for text in data.split(|&b| b == b'\n') {
        let before = entries(&table);
        let version = pos.version;
        match sync::take_line(&replica, &mut pos, text) {
            Ok(Taken::Applied { .. }) => {
                assert_eq!(pos.version, version + 1, "a change skipped a version");
                assert_eq!(table.version(), pos.version, "the table's version lags");
                applied += 1;
            }
            Ok(Taken::Hello { .. } | Taken::Heartbeat) => {
                assert_eq!(pos.version, version);
                assert_eq!(entries(&table), before, "a marker line changed the map");
            }
            Err(_) => {
                assert_eq!(pos.version, version);
                assert_eq!(table.version(), version);
                assert_eq!(entries(&table), before, "a refused line changed the map");
                break;
            }
        }
        let mut checksum = domicile_wire::Checksum::default();
        for (id, entry) in entries(&table) {
            let region = replica
                .regions()
                .id(entry.home_region)
                .expect("every entry names an interned region");
            checksum.add(mapfile::entry_hash(&id, &region, &entry));
        }
        assert_eq!(checksum, pos.checksum, "the running checksum drifted");
    }
    applied
}

/// A sealed log written by the proxy's own audit writer (two segments, closed), and its
/// public key: `proxy/fuzz/fixtures/audit`, rewritten by the ignored test
/// `write_audit_fuzz_fixture`.
const AUDIT_SEGMENTS: [&[u8]; 2] = [
    include_bytes!("../fuzz/fixtures/audit/audit-00000001.jsonl"),
    include_bytes!("../fuzz/fixtures/audit/audit-00000002.jsonl"),
];
const AUDIT_KEY: &str = include_str!("../fuzz/fixtures/audit/audit.pub");

/// Audit verification input (`domicile audit verify`). The first byte picks the mode:
///
/// - even: the rest is a log of its own, segments split at `0xFF` bytes (numbered from 1,
///   or from 2 when the second byte is odd). The verifier never panics and its verdict agrees
///   with its findings.
/// - odd: the sealed fixture log with one edit: in segment `data[1] % 2`, at the offset given
///   by `data[2..4]`, `data[4] % 32` bytes are replaced by the rest of the input. Whatever
///   the edit, a log that differs from what the proxy wrote is never reported intact.
///
/// Returns the verdict, when the input made it to the verifier.
pub fn audit_verify(data: &[u8]) -> Option<crate::audit::verify::Verdict> {
    use crate::audit::verify::{verify_segments, Verdict};
    let key = crate::audit::keys::parse_verifying_key(AUDIT_KEY).expect("the fixture key");
    let (&mode, rest) = data.split_first()?;
    if mode % 2 == 0 {
        let start = u64::from(rest.first().is_some_and(|b| b % 2 == 1)) + 1;
        let body = rest.get(1..).unwrap_or_default();
        let pieces: Vec<&[u8]> = body.split(|&b| b == 0xFF).take(4).collect();
        let segments: Vec<(u64, &[u8])> = pieces
            .iter()
            .enumerate()
            .map(|(i, piece)| (start + i as u64, *piece))
            .collect();
        let lines: usize = pieces
            .iter()
            .map(|p| p.iter().filter(|&&b| b == b'\n').count())
            .sum();
        let report = verify_segments(&segments, &key, None).expect("numbered from 1 up");
        assert!(report.records + report.checkpoints <= lines as u64);
        match report.verdict {
            Verdict::Intact => {
                assert!(report.findings.is_empty() && report.open_tail.is_none());
            }
            Verdict::Open => {
                assert!(report.findings.is_empty() && report.open_tail.is_some());
            }
            Verdict::Damaged => assert!(!report.findings.is_empty()),
        }
        let _ = report.to_text();
        return Some(report.verdict);
    }
    if rest.len() < 4 {
        return None;
    }
    let which = usize::from(rest[0] % 2);
    let original = AUDIT_SEGMENTS[which];
    let at = usize::from(u16::from_le_bytes([rest[1], rest[2]])) % (original.len() + 1);
    let cut = (usize::from(rest[3]) % 32).min(original.len() - at);
    let insert = &rest[4..];
    let mut edited = original[..at].to_vec();
    edited.extend_from_slice(insert);
    edited.extend_from_slice(&original[at + cut..]);
    let mut segments: Vec<(u64, &[u8])> = vec![(1, AUDIT_SEGMENTS[0]), (2, AUDIT_SEGMENTS[1])];
    segments[which].1 = &edited;
    let report = verify_segments(&segments, &key, None).expect("numbered from 1 up");
    if edited != original {
        assert_ne!(
            report.verdict,
            Verdict::Intact,
            "an edit at byte {at} of segment {} went unnoticed",
            which + 1
        );
    } else {
        assert_eq!(report.verdict, Verdict::Intact, "{}", report.to_text());
    }
    Some(report.verdict)
}

/// How an origin's response read: its head (status, framing), the body bytes handed on, and
/// how reading ended (`Ok(true)`: the body ended; `Ok(false)`: the input ran out first).
type ReadResponse = (Option<(u16, String)>, Vec<u8>, Result<bool, String>);

/// Reads `input` as an origin's response the way the engine does ([`upstream::h1`]): the head
/// parsed as bytes arrive, `step` at a time, then the body followed to its end, chunks relayed
/// as they are (`raw`) or decoded.
fn read_response(
    input: &[u8],
    step: usize,
    head_request: bool,
    upgrade: bool,
    raw: bool,
) -> ReadResponse {
    use crate::upstream::h1::{parse_response, BodyEnd, Parsed, MAX_FIELDS};
    let mut have = 0;
    let (status, framing, body_start) = loop {
        have = (have + step).min(input.len());
        let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
        match parse_response(&input[..have], &mut fields, head_request, upgrade) {
            Ok(Parsed::Final(head)) => break (head.status, head.framing, head.body_start),
            Ok(Parsed::Partial) if have == input.len() => return (None, Vec::new(), Ok(false)),
            Ok(Parsed::Partial) => {}
            Err(e) => return (None, Vec::new(), Err(e)),
        }
    };
    let head = Some((status, format!("{framing:?}")));
    let mut body = BodyEnd::new(framing, raw);
    let mut out = Vec::new();
    if body.is_empty() {
        return (head, out, Ok(true));
    }
    let mut pos = body_start;
    // The bytes the head read took past itself come first, then `step` at a time.
    let mut end = have.max(body_start);
    loop {
        while pos < end {
            match body.take(&input[pos..end]) {
                Ok(taken) => {
                    out.extend_from_slice(&input[pos + taken.out.start..pos + taken.out.end]);
                    pos += taken.consumed;
                    if taken.end {
                        return (head, out, Ok(true));
                    }
                }
                Err(e) => return (head, out, Err(e.to_string())),
            }
        }
        if end == input.len() {
            return (head, out, Ok(false));
        }
        end = (end + step).min(input.len());
    }
}

/// An origin's response as the engine reads it. The first byte picks the request (GET, HEAD,
/// or one asking for an upgrade), whether chunks are relayed as they are or decoded, and the
/// size of reads; the rest is what the origin sends. Read in pieces it must read as it does
/// whole: the same head, the same end, the same body bytes handed on (relayed as they are, up
/// to a break, the same bytes as far as both went). Relayed as they are, the body bytes are
/// the origin's own, in order.
pub fn origin_response(data: &[u8]) {
    let Some((&first, input)) = data.split_first() else {
        return;
    };
    let (head_request, upgrade) = match first % 3 {
        0 => (false, false),
        1 => (true, false),
        _ => (false, true),
    };
    let raw = first & 0x80 != 0;
    let step = usize::from(first / 3 % 16) + 1;
    let whole = read_response(input, input.len().max(1), head_request, upgrade, raw);
    let pieces = read_response(input, step, head_request, upgrade, raw);
    assert_eq!(
        whole.0, pieces.0,
        "read in pieces of {step}, the head read otherwise"
    );
    assert_eq!(
        whole.2, pieces.2,
        "read in pieces of {step}, the body ended otherwise"
    );
    if whole.2.is_ok() {
        assert_eq!(
            whole.1, pieces.1,
            "read in pieces of {step}, other bytes were handed on"
        );
    } else {
        // Relayed as they are, a read that holds a broken chunk hands on none of itself, so
        // how much of the body went before the break depends on where the reads fell; what
        // went is the same bytes either way.
        let n = whole.1.len().min(pieces.1.len());
        assert_eq!(
            whole.1[..n],
            pieces.1[..n],
            "read in pieces of {step}, other bytes went"
        );
        if !raw {
            assert_eq!(
                whole.1, pieces.1,
                "decoded, the same runs go before the break"
            );
        }
    }
    if raw && !whole.1.is_empty() {
        let found = input
            .windows(whole.1.len())
            .any(|window| window == whole.1.as_slice());
        assert!(found, "relayed bytes the origin did not send");
    }
}
