//! The audit log on disk: segment files of JSON lines, chained by SHA-256, with signed
//! checkpoints. The writer and the verifier share these definitions, so what one writes is
//! exactly what the other checks (docs/audit.md describes the format for other verifiers).
//!
//! - A segment is `audit-NNNNNNNN.jsonl` (eight or more digits, numbered from 1 with no gaps).
//! - Every line is one JSON object ending in `\n`: a record (`"type":"record"`) or a checkpoint
//!   (`"type":"checkpoint"`). Each carries `prev`, the hex SHA-256 of the line before it (the
//!   line's bytes without its `\n`), across segment boundaries; the first line of a log has
//!   [`GENESIS`].
//! - A checkpoint's `sig` is the Ed25519 signature of the checkpoint's own line with the `sig`
//!   member removed: the bytes up to `,"sig":"` followed by `}`.

use std::net::IpAddr;
use std::path::Path;

use base64::Engine;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// `prev` of the first line of a log.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What separates a checkpoint's signed bytes from its signature.
pub const SIG_MEMBER: &[u8] = b",\"sig\":\"";

/// The segment file name for segment `number`.
pub fn segment_name(number: u64) -> String {
    format!("audit-{number:08}.jsonl")
}

/// The segment number in a file name, if it is a segment's: exactly the name
/// [`segment_name`] gives, so that no two files in a directory claim the same number.
pub fn segment_number(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("audit-")?.strip_suffix(".jsonl")?;
    if digits.len() < 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits
        .parse()
        .ok()
        .filter(|&n| n > 0 && segment_name(n) == name)
}

/// The segments in `dir`, by number.
pub fn list_segments(dir: &Path) -> std::io::Result<Vec<(u64, std::path::PathBuf)>> {
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(number) = entry.file_name().to_str().and_then(segment_number) {
            segments.push((number, entry.path()));
        }
    }
    segments.sort_unstable_by_key(|(n, _)| *n);
    Ok(segments)
}

/// SHA-256 of a line's bytes (without its newline).
pub fn line_hash(line: &[u8]) -> [u8; 32] {
    Sha256::digest(line).into()
}

/// A key's id: the first 16 hex digits of the SHA-256 of its 32 public-key bytes.
pub fn key_id(public: &ed25519_dalek::VerifyingKey) -> String {
    hex::encode(&Sha256::digest(public.as_bytes())[..8])
}

/// Splits a checkpoint line into the bytes its signature covers and the signature text.
pub fn split_signature(line: &[u8]) -> Option<(Vec<u8>, &[u8])> {
    let at = line
        .windows(SIG_MEMBER.len())
        .rposition(|w| w == SIG_MEMBER)?;
    let rest = &line[at + SIG_MEMBER.len()..];
    let sig = rest.strip_suffix(b"\"}")?;
    let mut signed = line[..at].to_vec();
    signed.push(b'}');
    Some((signed, sig))
}

/// Whether `sig` (base64) is `key`'s signature of `signed`.
pub fn signature_holds(key: &ed25519_dalek::VerifyingKey, signed: &[u8], sig: &[u8]) -> bool {
    let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(sig) else {
        return false;
    };
    let Ok(signature) = ed25519_dalek::Signature::from_slice(&bytes) else {
        return false;
    };
    key.verify_strict(signed, &signature).is_ok()
}

/// One line, as the verifier and the report read it.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Line {
    Record(Record),
    Checkpoint(Checkpoint),
}

/// A routing decision (every field the proxy writes; docs/audit.md lists their meaning).
#[derive(Debug, Clone, Deserialize)]
pub struct Record {
    pub seq: u64,
    pub ts: String,
    pub proxy_id: String,
    pub edge_region: String,
    pub request_id: String,
    pub workspace: Option<String>,
    pub home_region: Option<String>,
    /// `forwarded`, or the refusal code.
    pub decision: String,
    pub upstream_region: Option<String>,
    pub upstream: Option<String>,
    pub map_version: Option<u64>,
    pub epoch: Option<u32>,
    pub method: String,
    pub host: Option<String>,
    pub path: String,
    pub status: Option<u16>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_us: u64,
    pub complete: bool,
    pub client_country: Option<String>,
    pub client_ip: Option<IpAddr>,
    /// Rebuilt at start from the forward journal of a run that did not stop: the request was
    /// sent (or about to be sent) to `upstream_region`; how it ended is not known.
    #[serde(default)]
    pub recovered: bool,
    pub prev: String,
}

/// Why a checkpoint was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reason {
    /// The first line of a run: the proxy started.
    Start,
    /// The periodic checkpoint (also when idle).
    Interval,
    /// The last line of a segment that was rotated.
    Rotate,
    /// The first checkpoint after records could not be written or requests were refused.
    Outage,
    /// The last line of a run that stopped cleanly.
    Shutdown,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Start => "start",
            Reason::Interval => "interval",
            Reason::Rotate => "rotate",
            Reason::Outage => "outage",
            Reason::Shutdown => "shutdown",
        }
    }
}

/// A signed commitment to the log up to the line before it.
#[derive(Debug, Clone, Deserialize)]
pub struct Checkpoint {
    pub reason: Reason,
    pub ts: String,
    pub proxy_id: String,
    pub edge_region: String,
    /// A random id per proxy run.
    pub run: String,
    pub segment: u64,
    /// The last record's `seq` (0 before the first record).
    pub seq: u64,
    pub interval_ms: u64,
    /// The signing key's id ([`key_id`]).
    pub key: String,
    pub outage: Option<Outage>,
    pub recovered: Option<Recovered>,
    pub prev: String,
    pub sig: String,
}

/// A period in which decisions could not be recorded, stated by the first checkpoint after it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct Outage {
    /// `disk` (writing or syncing failed) or `queue_full` (records came faster than the disk
    /// took them).
    pub kind: String,
    pub since: String,
    pub until: String,
    /// Requests refused with `audit_unavailable`.
    pub refused: u64,
    /// Requests served without a record (`on_failure = "serve"`).
    pub unrecorded: u64,
    /// The first error, for `disk`.
    pub error: Option<String>,
}

/// What a run found of the run before it, when that one did not stop cleanly.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct Recovered {
    /// The newest segment the earlier run left.
    pub segment: u64,
    /// Its last record's `seq`.
    pub seq: u64,
    /// Bytes of an unfinished last line left in that segment (a write cut short).
    pub partial_bytes: u64,
}

/// Appends `s` as a JSON string (quoted and escaped). Bytes that are not UTF-8 are replaced.
pub fn put_json_str(out: &mut Vec<u8>, s: &[u8]) {
    // Printable ASCII without quotes or backslashes (ids, hosts, paths, methods): valid UTF-8
    // that needs no escaping, found in one branch-free pass.
    let plain = s.iter().fold(true, |ok, &b| {
        ok & (0x20..0x7f).contains(&b) & (b != b'"') & (b != b'\\')
    });
    if plain {
        out.push(b'"');
        out.extend_from_slice(s);
        out.push(b'"');
        return;
    }
    match std::str::from_utf8(s) {
        Ok(text) => put_json_text(out, text),
        Err(_) => put_json_text(out, &String::from_utf8_lossy(s)),
    }
}

/// Bytes a JSON string cannot hold as they are.
const fn needs_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\' || b == 0x7f
}

fn put_json_text(out: &mut Vec<u8>, text: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = text.as_bytes();
    // Most strings (ids, hosts, paths) need no escaping: one copy.
    if !bytes.iter().any(|&b| needs_escape(b)) {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if !needs_escape(b) {
            continue;
        }
        out.extend_from_slice(&bytes[start..i]);
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[(b >> 4) as usize]);
                out.push(HEX[(b & 0xf) as usize]);
            }
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Appends `hash` as 64 lower-case hex digits.
pub fn put_hex(out: &mut Vec<u8>, hash: &[u8; 32]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = [0u8; 64];
    for (pair, b) in text.chunks_exact_mut(2).zip(hash) {
        pair[0] = HEX[(b >> 4) as usize];
        pair[1] = HEX[(b & 0xf) as usize];
    }
    out.extend_from_slice(&text);
}

/// Appends a decimal.
pub fn put_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// `,"name":`, to follow a member of a JSON object being written (one copy of a constant).
macro_rules! key {
    ($name:literal) => {
        concat!(",\"", $name, "\":").as_bytes()
    };
}
pub(crate) use key;

thread_local! {
    /// The last second formatted (`"2026-12-01T20:42:47.`), so a batch of records from the
    /// same second formats its date once.
    static SECOND: std::cell::RefCell<(u64, [u8; 21])> = const { std::cell::RefCell::new((u64::MAX, [0; 21])) };
}

/// Appends a time as an RFC 3339 JSON string with microseconds, in UTC
/// (`"2026-12-01T20:42:47.025637Z"`).
pub fn put_time(out: &mut Vec<u8>, micros: u64) {
    let second = micros / 1_000_000;
    let fraction = micros % 1_000_000;
    SECOND.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != second {
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(second);
            let text = humantime::format_rfc3339_seconds(t).to_string();
            // "2026-12-01T20:42:47Z": the prefix up to the seconds, then the fraction's dot.
            let mut prefix = [0u8; 21];
            prefix[0] = b'"';
            prefix[1..20].copy_from_slice(&text.as_bytes()[..19]);
            prefix[20] = b'.';
            *cached = (second, prefix);
        }
        out.extend_from_slice(&cached.1);
    });
    let mut digits = [b'0'; 6];
    let mut n = fraction;
    for d in digits.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.extend_from_slice(&digits);
    out.extend_from_slice(b"Z\"");
}

/// Appends an address as a JSON string.
pub fn put_ip(out: &mut Vec<u8>, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            out.push(b'"');
            for (i, octet) in v4.octets().iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                out.extend_from_slice(itoa::Buffer::new().format(*octet).as_bytes());
            }
            out.push(b'"');
        }
        std::net::IpAddr::V6(v6) => {
            use std::io::Write;
            let _ = write!(out, "\"{v6}\"");
        }
    }
}

/// Microseconds since the Unix epoch, now.
pub fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Parses an RFC 3339 time as written by [`put_time`] into microseconds since the epoch.
pub fn parse_time(text: &str) -> Option<u64> {
    let t = humantime::parse_rfc3339(text).ok()?;
    t.duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_micros() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_round_trip() {
        assert_eq!(segment_name(7), "audit-00000007.jsonl");
        assert_eq!(segment_number("audit-00000007.jsonl"), Some(7));
        assert_eq!(segment_number("audit-123456789.jsonl"), Some(123_456_789));
        for bad in [
            "audit-7.jsonl",
            "audit-0000000x.jsonl",
            "audit-00000000.jsonl",
            "x-00000001.jsonl",
            "audit-00000001.json",
            // Another spelling of segment 1: it would make two files claim one number.
            "audit-000000001.jsonl",
        ] {
            assert_eq!(segment_number(bad), None, "{bad}");
        }
    }

    #[test]
    fn json_strings_are_escaped() {
        let mut out = Vec::new();
        put_json_str(&mut out, b"a\"b\\c\nd\x01e\x7f/\xff");
        let text = String::from_utf8(out).unwrap();
        let back: String = serde_json::from_str(&text).unwrap();
        assert_eq!(back, "a\"b\\c\nd\u{1}e\u{7f}/\u{fffd}");
    }

    #[test]
    fn times_round_trip() {
        let mut out = Vec::new();
        put_time(&mut out, 1_764_620_206_123_456);
        let text: String = serde_json::from_slice(&out).unwrap();
        assert_eq!(text, "2025-12-01T20:16:46.123456Z");
        assert_eq!(parse_time(&text), Some(1_764_620_206_123_456));
        assert_eq!(parse_time("yesterday"), None);
    }

    #[test]
    fn signatures_split_at_the_last_sig_member() {
        let line = br#"{"type":"checkpoint","x":",\"sig\":\"","sig":"QUJD"}"#;
        let (signed, sig) = split_signature(line).unwrap();
        assert_eq!(signed, br#"{"type":"checkpoint","x":",\"sig\":\""}"#);
        assert_eq!(sig, b"QUJD");
        assert!(split_signature(br#"{"type":"checkpoint"}"#).is_none());
    }
}
