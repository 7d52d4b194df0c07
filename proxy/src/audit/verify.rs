//! `domicile audit verify`: checks a proxy's audit directory with the public key alone.
//!
//! Every line's `prev` must be the hash of the line before it, every record's `seq` one more
//! than the last, every checkpoint's signature must hold under the given key and commit to the
//! records before it, and segment numbers must run without gaps. Damage is named by kind,
//! file and line: an `edited` line (a byte changed, a line made up), `deleted` records,
//! `reordered` lines, a `truncated` segment (its end cut off), a `segment_deleted`, a
//! `forged_checkpoint` (a signature that does not hold, or another key's).
//!
//! What a crash leaves is not damage: the newest segment ends without a closing checkpoint
//! (possibly in half a line), so its last records are chained but not yet signed. That is
//! reported as an open tail; a checkpoint fetched earlier from the proxy (`--checkpoint`)
//! tells an open tail from a cut one. A crash in the middle of the log is acknowledged by the
//! next run's first checkpoint and reported as a note.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;
use serde::Serialize;

use super::format::{self, Checkpoint, Line, Reason, GENESIS};

/// A kind of damage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Damage {
    Edited,
    Deleted,
    Reordered,
    Truncated,
    SegmentDeleted,
    ForgedCheckpoint,
}

impl Damage {
    pub fn as_str(self) -> &'static str {
        match self {
            Damage::Edited => "edited",
            Damage::Deleted => "deleted",
            Damage::Reordered => "reordered",
            Damage::Truncated => "truncated",
            Damage::SegmentDeleted => "segment_deleted",
            Damage::ForgedCheckpoint => "forged_checkpoint",
        }
    }
}

/// One piece of damage, where it is.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub kind: Damage,
    /// The segment file (name only).
    pub file: String,
    /// 1-based line in that file, when the damage is at a line.
    pub line: Option<usize>,
    pub seq: Option<u64>,
    pub detail: String,
}

/// Something an auditor should know that is not damage.
#[derive(Debug, Clone, Serialize)]
pub struct Note {
    pub file: String,
    pub line: Option<usize>,
    pub detail: String,
}

/// The newest segment's end, when the proxy did not close it.
#[derive(Debug, Clone, Serialize)]
pub struct OpenTail {
    pub file: String,
    /// Records after the last checkpoint: chained, not yet signed.
    pub unsigned_records: u64,
    /// Bytes of an unfinished last line.
    pub partial_bytes: u64,
    pub last_checkpoint_seq: Option<u64>,
    pub last_checkpoint_ts: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Every record is under a valid signature and the log was closed.
    Intact,
    /// No damage; the newest segment is open (the proxy runs, or crashed).
    Open,
    Damaged,
}

#[derive(Debug, Clone, Serialize)]
pub struct SegmentSummary {
    pub file: String,
    pub number: u64,
    pub lines: usize,
    pub records: u64,
    pub checkpoints: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// Ends with a `rotate` or `shutdown` checkpoint.
    pub closed: bool,
}

/// The outcome of a verification.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub dir: PathBuf,
    pub key: String,
    pub verdict: Verdict,
    pub segments: Vec<SegmentSummary>,
    pub records: u64,
    pub checkpoints: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub proxy_id: Option<String>,
    pub findings: Vec<Finding>,
    pub notes: Vec<Note>,
    pub open_tail: Option<OpenTail>,
    /// Outages the log states (periods in which decisions could not be recorded).
    pub outages: Vec<(String, format::Outage)>,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot read the audit directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no audit segments (audit-NNNNNNNN.jsonl)")]
    Empty { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the witness checkpoint cannot be used: {0}")]
    Witness(String),
    #[error("segment numbers must start from 1 or more and ascend")]
    Numbering,
}

/// One complete line of a segment, parsed.
struct Parsed {
    hash: [u8; 32],
    prev: Option<[u8; 32]>,
    kind: Kind,
}

enum Kind {
    Record { seq: u64 },
    Checkpoint(Box<Checkpoint>, Box<[u8]>),
    Malformed(String),
}

fn parse_line(bytes: &[u8]) -> Parsed {
    let hash = format::line_hash(bytes);
    let kind = match serde_json::from_slice::<Line>(bytes) {
        Ok(Line::Record(r)) => {
            let prev = decode_hash(&r.prev);
            return Parsed {
                hash,
                prev,
                kind: Kind::Record { seq: r.seq },
            };
        }
        Ok(Line::Checkpoint(c)) => {
            let prev = decode_hash(&c.prev);
            return Parsed {
                hash,
                prev,
                kind: Kind::Checkpoint(Box::new(c), bytes.into()),
            };
        }
        Err(e) => Kind::Malformed(e.to_string()),
    };
    Parsed {
        hash,
        prev: None,
        kind,
    }
}

fn decode_hash(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

/// Verifies the log in `dir`. `witness` is a checkpoint line obtained from the proxy (or a log
/// shipper) earlier: the log must still hold it.
pub fn verify(
    dir: &Path,
    key: &VerifyingKey,
    witness: Option<&str>,
) -> Result<Report, VerifyError> {
    let segments = format::list_segments(dir).map_err(|source| VerifyError::Dir {
        path: dir.to_owned(),
        source,
    })?;
    if segments.is_empty() {
        return Err(VerifyError::Empty {
            path: dir.to_owned(),
        });
    }
    let names: Vec<(u64, String)> = segments
        .iter()
        .map(|(n, path)| {
            let name = path
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
            (*n, name)
        })
        .collect();
    check(dir, key, witness, &names, |index| {
        let path = &segments[index].1;
        std::fs::read(path).map_err(|source| VerifyError::Read {
            path: path.clone(),
            source,
        })
    })
}

/// Verifies a log held in memory: `segments` are (segment number, contents), in ascending
/// order of number. The report is the one [`verify`] gives for a directory holding them.
pub fn verify_segments(
    segments: &[(u64, &[u8])],
    key: &VerifyingKey,
    witness: Option<&str>,
) -> Result<Report, VerifyError> {
    let dir = Path::new("(memory)");
    if segments.is_empty() {
        return Err(VerifyError::Empty {
            path: dir.to_owned(),
        });
    }
    if segments[0].0 == 0 || segments.windows(2).any(|w| w[0].0 >= w[1].0) {
        return Err(VerifyError::Numbering);
    }
    let names: Vec<(u64, String)> = segments
        .iter()
        .map(|(n, _)| (*n, format::segment_name(*n)))
        .collect();
    check(dir, key, witness, &names, |index| {
        Ok(segments[index].1.to_vec())
    })
}

/// The verification proper, over segments (number, file name), ascending and not empty, read
/// one at a time by `read` (by index into `segments`).
fn check(
    dir: &Path,
    key: &VerifyingKey,
    witness: Option<&str>,
    segments: &[(u64, String)],
    mut read: impl FnMut(usize) -> Result<Vec<u8>, VerifyError>,
) -> Result<Report, VerifyError> {
    let witness = witness.map(|w| parse_witness(w, key)).transpose()?;
    let mut v = Verifier {
        key,
        key_id: format::key_id(key),
        report: Report {
            dir: dir.to_owned(),
            key: format::key_id(key),
            verdict: Verdict::Intact,
            segments: Vec::new(),
            records: 0,
            checkpoints: 0,
            first_seq: None,
            last_seq: None,
            proxy_id: None,
            findings: Vec::new(),
            notes: Vec::new(),
            open_tail: None,
            outages: Vec::new(),
        },
        head: None,
        last_seq: None,
        max_seq: 0,
        previous_damaged: false,
        checkpoint_hashes: HashMap::new(),
        last_checkpoint: None,
        unsigned: 0,
        pending_partial: None,
        pending_open: None,
    };
    let first = segments[0].0;
    if first != 1 {
        v.report.findings.push(Finding {
            kind: Damage::SegmentDeleted,
            file: format::segment_name(1),
            line: None,
            seq: None,
            detail: if first == 2 {
                "segment 1 is missing: the log does not begin here".into()
            } else {
                format!(
                    "segments 1 to {} are missing: the log does not begin here",
                    first - 1
                )
            },
        });
    }
    let last_index = segments.len() - 1;
    let mut expected_number = first;
    for (index, (number, file)) in segments.iter().enumerate() {
        let mut gap = false;
        if *number != expected_number {
            gap = true;
            let missing = if *number == expected_number + 1 {
                format!("segment {expected_number} is missing")
            } else {
                format!("segments {expected_number} to {} are missing", number - 1)
            };
            let seqs = match v.last_seq {
                Some(seq) => format!(" (the log jumps from record {seq})"),
                None => String::new(),
            };
            v.report.findings.push(Finding {
                kind: Damage::SegmentDeleted,
                file: format::segment_name(expected_number),
                line: None,
                seq: v.last_seq.map(|s| s + 1),
                detail: format!("{missing}{seqs}"),
            });
        }
        expected_number = number + 1;
        let bytes = read(index)?;
        v.segment(*number, file, &bytes, gap, index == last_index);
    }
    if let Some(witness) = witness {
        v.check_witness(&witness);
    }
    let report = &mut v.report;
    report.verdict = if !report.findings.is_empty() {
        Verdict::Damaged
    } else if report.open_tail.is_some() {
        Verdict::Open
    } else {
        Verdict::Intact
    };
    Ok(v.report)
}

struct Witness {
    hash: [u8; 32],
    checkpoint: Checkpoint,
}

fn parse_witness(text: &str, key: &VerifyingKey) -> Result<Witness, VerifyError> {
    let line = text.trim().as_bytes();
    match serde_json::from_slice::<Line>(line) {
        Ok(Line::Checkpoint(checkpoint)) => {
            let holds = format::split_signature(line)
                .is_some_and(|(signed, sig)| format::signature_holds(key, &signed, sig));
            if !holds {
                return Err(VerifyError::Witness(
                    "its signature does not hold under the given key".into(),
                ));
            }
            Ok(Witness {
                hash: format::line_hash(line),
                checkpoint,
            })
        }
        Ok(Line::Record(_)) => Err(VerifyError::Witness("it is a record".into())),
        Err(e) => Err(VerifyError::Witness(e.to_string())),
    }
}

struct Verifier<'k> {
    key: &'k VerifyingKey,
    key_id: String,
    report: Report,
    /// The hash of the last line read.
    head: Option<[u8; 32]>,
    /// The last record's seq, and the highest.
    last_seq: Option<u64>,
    max_seq: u64,
    /// Whether the last line read was damaged (the next line's chain is then not checked
    /// against it: one change, one finding).
    previous_damaged: bool,
    /// Every valid checkpoint line's hash, for the witness.
    checkpoint_hashes: HashMap<[u8; 32], (String, usize)>,
    last_checkpoint: Option<(u64, String)>,
    /// Records since the last valid checkpoint.
    unsigned: u64,
    /// The previous segment's unfinished last line (file, bytes): a crash, if the next run's
    /// first checkpoint says so.
    pending_partial: Option<(String, u64, u64)>,
    /// The previous segment ended without a closing checkpoint (file, number).
    pending_open: Option<(String, u64)>,
}

impl Verifier<'_> {
    fn damage(&mut self, kind: Damage, file: &str, line: usize, seq: Option<u64>, detail: String) {
        self.report.findings.push(Finding {
            kind,
            file: file.to_owned(),
            line: Some(line),
            seq,
            detail,
        });
    }

    fn note(&mut self, file: &str, line: Option<usize>, detail: String) {
        self.report.notes.push(Note {
            file: file.to_owned(),
            line,
            detail,
        });
    }

    fn segment(&mut self, number: u64, file: &str, bytes: &[u8], gap: bool, newest: bool) {
        let file = file.to_owned();
        let mut pieces: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
        // After the last newline: empty, or an unfinished line.
        let partial = pieces.pop().map_or(0, |p| p.len() as u64);
        let lines: Vec<Parsed> = pieces.iter().map(|l| parse_line(l)).collect();
        let by_hash: HashMap<[u8; 32], usize> =
            lines.iter().enumerate().map(|(i, l)| (l.hash, i)).collect();
        let mut summary = SegmentSummary {
            file: file.clone(),
            number,
            lines: lines.len(),
            records: 0,
            checkpoints: 0,
            first_seq: None,
            last_seq: None,
            closed: false,
        };
        // What the previous segment left open is settled by this segment's first line.
        let previous_partial = self.pending_partial.take();
        let previous_open = self.pending_open.take();
        if let Some(first) = lines.first() {
            let recovered = match &first.kind {
                Kind::Checkpoint(c, _) if c.reason == Reason::Start => c.recovered.clone(),
                _ => None,
            };
            if let Some((pfile, pnumber, pbytes)) = &previous_partial {
                let acknowledged = recovered
                    .as_ref()
                    .is_some_and(|r| r.segment == *pnumber && r.partial_bytes == *pbytes);
                if acknowledged {
                    self.note(
                        pfile,
                        None,
                        format!(
                            "ends in {pbytes} bytes of an unfinished line: the proxy stopped \
                             without closing it (a crash), as the next run's first checkpoint \
                             states"
                        ),
                    );
                } else {
                    self.report.findings.push(Finding {
                        kind: Damage::Edited,
                        file: pfile.clone(),
                        line: None,
                        seq: None,
                        detail: format!(
                            "{pbytes} bytes after its last line that no checkpoint accounts for"
                        ),
                    });
                }
            } else if let Some((pfile, pnumber)) = &previous_open {
                let crashed = recovered.as_ref().is_some_and(|r| r.segment == *pnumber);
                let continues = first.prev.is_some() && first.prev == self.head;
                if crashed && continues {
                    self.note(
                        pfile,
                        None,
                        "was left open by a crash (the next run's first checkpoint says so); \
                         nothing after its last line is missing"
                            .into(),
                    );
                } else if continues {
                    self.note(
                        pfile,
                        None,
                        format!(
                            "was left open (after a write failure, the log went on in \
                             {file}); nothing after its last line is missing"
                        ),
                    );
                }
            }
        }

        if gap {
            self.previous_damaged = true;
        }
        let mut reordered: Vec<usize> = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            let line_no = i + 1;
            let seq = match &line.kind {
                Kind::Record { seq } => Some(*seq),
                _ => None,
            };
            let previous_damaged = self.previous_damaged;
            // The chain: `prev` must be the hash of the line before (across segments); the
            // first line of a log starts from genesis. A log whose first segments are gone
            // (reported above) is taken from its first line on.
            let expected_prev = if i == 0 {
                self.head
            } else {
                Some(lines[i - 1].hash)
            };
            let chained = match (line.prev, expected_prev) {
                (Some(prev), Some(expected)) => prev == expected,
                (Some(prev), None) => number != 1 || hex::encode(prev) == GENESIS,
                (None, _) => false,
            };
            let mut damaged = false;
            match &line.kind {
                Kind::Malformed(error) => {
                    self.damage(
                        Damage::Edited,
                        &file,
                        line_no,
                        None,
                        format!("not an audit line ({error})"),
                    );
                    damaged = true;
                }
                _ if chained || previous_damaged => {}
                _ if expected_prev.is_none() => {
                    damaged = true;
                    self.damage(
                        Damage::Edited,
                        &file,
                        line_no,
                        seq,
                        "the first line of segment 1 does not begin a log (its prev is not genesis)"
                            .into(),
                    );
                }
                _ => {
                    damaged = true;
                    self.chain_break(&file, number, i, &lines, &by_hash, &mut reordered, seq);
                }
            }
            let checks = chained && !damaged && !previous_damaged;
            match &line.kind {
                Kind::Record { seq } => {
                    let seq = *seq;
                    summary.records += 1;
                    summary.first_seq.get_or_insert(seq);
                    summary.last_seq = Some(seq);
                    self.report.records += 1;
                    self.report.first_seq.get_or_insert(seq);
                    if checks {
                        match self.last_seq {
                            Some(last) if seq != last + 1 => {
                                damaged = true;
                                self.seq_break(&file, line_no, last, seq);
                            }
                            None if number == 1 && seq != 1 => {
                                damaged = true;
                                self.damage(
                                    Damage::Deleted,
                                    &file,
                                    line_no,
                                    Some(seq),
                                    format!(
                                        "the first record is seq {seq}; records 1 to {} are missing",
                                        seq.saturating_sub(1)
                                    ),
                                );
                            }
                            _ => {}
                        }
                    }
                    self.last_seq = Some(seq);
                    self.max_seq = self.max_seq.max(seq);
                    self.unsigned += 1;
                }
                Kind::Checkpoint(checkpoint, raw) => {
                    summary.checkpoints += 1;
                    self.report.checkpoints += 1;
                    if !self.checkpoint(&file, number, line_no, checkpoint, raw, line.hash) {
                        damaged = true;
                    } else if checks && checkpoint.seq != self.max_seq {
                        damaged = true;
                        let kind = if checkpoint.seq > self.max_seq {
                            Damage::Deleted
                        } else {
                            Damage::Edited
                        };
                        self.damage(
                            kind,
                            &file,
                            line_no,
                            Some(checkpoint.seq),
                            format!(
                                "the checkpoint signs {} records, but {} come before it",
                                checkpoint.seq, self.max_seq
                            ),
                        );
                    }
                }
                Kind::Malformed(_) => {}
            }
            self.previous_damaged = damaged;
        }
        self.head = lines.last().map(|l| l.hash).or(self.head);

        summary.closed = matches!(
            lines.last().map(|l| &l.kind),
            Some(Kind::Checkpoint(c, _)) if matches!(c.reason, Reason::Rotate | Reason::Shutdown)
        ) && partial == 0;
        let shutdown = matches!(
            lines.last().map(|l| &l.kind),
            Some(Kind::Checkpoint(c, _)) if c.reason == Reason::Shutdown
        ) && partial == 0;
        if newest {
            if !shutdown {
                self.report.open_tail = Some(OpenTail {
                    file: file.clone(),
                    unsigned_records: self.unsigned,
                    partial_bytes: partial,
                    last_checkpoint_seq: self.last_checkpoint.as_ref().map(|c| c.0),
                    last_checkpoint_ts: self.last_checkpoint.as_ref().map(|c| c.1.clone()),
                });
            }
        } else if partial > 0 {
            self.pending_partial = Some((file.clone(), number, partial));
        } else if lines.is_empty() {
            self.note(&file, None, "is empty (begun just before a crash)".into());
        } else if !summary.closed {
            self.pending_open = Some((file.clone(), number));
        }
        self.report.last_seq = self.last_seq.map(|_| self.max_seq);
        self.report.segments.push(summary);
    }

    /// Names a break in the chain at line `i`, using where its `prev` points and the seqs.
    #[allow(clippy::too_many_arguments)]
    fn chain_break(
        &mut self,
        file: &str,
        number: u64,
        i: usize,
        lines: &[Parsed],
        by_hash: &HashMap<[u8; 32], usize>,
        reordered: &mut Vec<usize>,
        seq: Option<u64>,
    ) {
        let line_no = i + 1;
        let line = &lines[i];
        let points_to = line.prev.and_then(|p| by_hash.get(&p).copied());
        if let Some(j) = points_to {
            if j > i {
                reordered.extend([i, j]);
                return self.damage(
                    Damage::Reordered,
                    file,
                    line_no,
                    seq,
                    format!("line {line_no} belongs after line {}, not before it", j + 1),
                );
            }
            if j + 1 < i {
                // The lines between are out of place: part of a reordering reported already,
                // or inserted.
                if reordered.iter().any(|&k| k > j && k < i) {
                    return;
                }
                return self.damage(
                    Damage::Edited,
                    file,
                    line_no,
                    seq,
                    format!(
                        "lines {} to {line_no} were inserted: line {line_no} continues from line {}",
                        j + 2,
                        j + 1
                    ),
                );
            }
        }
        let missing = match (seq, self.last_seq) {
            (Some(seq), Some(last)) if seq > last + 1 => Some((last + 1, seq - 1)),
            _ => None,
        };
        if i == 0 {
            let detail = match missing {
                Some((a, b)) => format!(
                    "segment {} was cut: records {a} to {b} at its end are missing",
                    number - 1
                ),
                None => format!(
                    "segment {} does not end with the line this segment continues from (its end was cut or changed)",
                    number - 1
                ),
            };
            return self.damage(Damage::Truncated, file, line_no, seq, detail);
        }
        match missing {
            Some((a, b)) if a == b => self.damage(
                Damage::Deleted,
                file,
                line_no,
                seq,
                format!("record {a} is missing before line {line_no}"),
            ),
            Some((a, b)) => self.damage(
                Damage::Deleted,
                file,
                line_no,
                seq,
                format!("records {a} to {b} are missing before line {line_no}"),
            ),
            None => self.damage(
                Damage::Edited,
                file,
                i,
                seq.map(|s| s.saturating_sub(1)),
                format!(
                    "line {i} was changed (or a line after it removed): its hash is not the prev of line {line_no}",
                ),
            ),
        }
    }

    /// A record whose seq does not follow the last one, though the chain holds.
    fn seq_break(&mut self, file: &str, line_no: usize, last: u64, seq: u64) {
        if seq > last + 1 {
            self.damage(
                Damage::Deleted,
                file,
                line_no,
                Some(seq),
                format!(
                    "records {} to {} are missing before line {line_no}",
                    last + 1,
                    seq - 1
                ),
            );
        } else {
            self.damage(
                Damage::Reordered,
                file,
                line_no,
                Some(seq),
                format!("record {seq} comes after record {last}"),
            );
        }
    }

    /// Checks a checkpoint's signature and fields; false if it is forged.
    fn checkpoint(
        &mut self,
        file: &str,
        number: u64,
        line_no: usize,
        checkpoint: &Checkpoint,
        raw: &[u8],
        hash: [u8; 32],
    ) -> bool {
        let holds = format::split_signature(raw)
            .is_some_and(|(signed, sig)| format::signature_holds(self.key, &signed, sig));
        if !holds {
            let (kind, detail) = if checkpoint.key != self.key_id {
                (
                    Damage::ForgedCheckpoint,
                    format!(
                        "signed with another key ({}), not the given key {}",
                        checkpoint.key, self.key_id
                    ),
                )
            } else {
                (
                    Damage::Edited,
                    "the checkpoint was changed: its signature does not hold under the given key"
                        .to_owned(),
                )
            };
            self.damage(kind, file, line_no, Some(checkpoint.seq), detail);
            return false;
        }
        if checkpoint.segment != number {
            self.damage(
                Damage::Reordered,
                file,
                line_no,
                Some(checkpoint.seq),
                format!(
                    "the checkpoint was written in segment {}, but it is in segment {number}'s file",
                    checkpoint.segment
                ),
            );
        }
        match &self.report.proxy_id {
            None => self.report.proxy_id = Some(checkpoint.proxy_id.clone()),
            Some(id) if *id != checkpoint.proxy_id => {
                let detail = format!(
                    "the checkpoint is proxy {}'s; the log is proxy {id}'s",
                    checkpoint.proxy_id
                );
                self.damage(Damage::Edited, file, line_no, Some(checkpoint.seq), detail);
            }
            Some(_) => {}
        }
        if let Some(outage) = &checkpoint.outage {
            self.report
                .outages
                .push((format!("{file}:{line_no}"), outage.clone()));
        }
        self.checkpoint_hashes
            .insert(hash, (file.to_owned(), line_no));
        self.last_checkpoint = Some((checkpoint.seq, checkpoint.ts.clone()));
        self.unsigned = 0;
        true
    }

    fn check_witness(&mut self, witness: &Witness) {
        let c = &witness.checkpoint;
        let file = format::segment_name(c.segment);
        if self.checkpoint_hashes.contains_key(&witness.hash) {
            return;
        }
        let last = self.max_seq;
        if c.seq >= last && !self.report.segments.iter().any(|s| s.number > c.segment) {
            self.report.findings.push(Finding {
                kind: Damage::Truncated,
                file,
                line: None,
                seq: Some(c.seq),
                detail: format!(
                    "the log ends at record {last}, but the proxy signed a checkpoint at record {} ({}) that is not here: its tail was cut",
                    c.seq, c.ts
                ),
            });
        } else {
            self.report.findings.push(Finding {
                kind: Damage::Edited,
                file,
                line: None,
                seq: Some(c.seq),
                detail: format!(
                    "the checkpoint the proxy signed at record {} ({}) is not in the log: it was replaced or removed",
                    c.seq, c.ts
                ),
            });
        }
    }
}

impl Report {
    /// The report as text, one finding or note a line, and the verdict last.
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{}: {} segment{}, {} records (seq {}), {} checkpoints, proxy {}, key {}",
            self.dir.display(),
            self.segments.len(),
            if self.segments.len() == 1 { "" } else { "s" },
            self.records,
            match (self.first_seq, self.last_seq) {
                (Some(a), Some(b)) => format!("{a} to {b}"),
                _ => "none".into(),
            },
            self.checkpoints,
            self.proxy_id.as_deref().unwrap_or("?"),
            self.key,
        );
        for f in &self.findings {
            let at = match f.line {
                Some(line) => format!("{}:{line}", f.file),
                None => f.file.clone(),
            };
            let seq = f.seq.map_or_else(String::new, |s| format!(" (seq {s})"));
            let _ = writeln!(out, "DAMAGE {}: {at}{seq}: {}", f.kind.as_str(), f.detail);
        }
        for n in &self.notes {
            let at = match n.line {
                Some(line) => format!("{}:{line}", n.file),
                None => n.file.clone(),
            };
            let _ = writeln!(out, "note: {at} {}", n.detail);
        }
        for (at, o) in &self.outages {
            let _ = writeln!(
                out,
                "outage stated at {at}: {} from {} to {}: {} refused, {} served unrecorded{}",
                o.kind,
                o.since,
                o.until,
                o.refused,
                o.unrecorded,
                o.error
                    .as_ref()
                    .map_or_else(String::new, |e| format!(" ({e})"))
            );
        }
        if let Some(tail) = &self.open_tail {
            let _ = writeln!(
                out,
                "open tail: {} has no closing checkpoint: {} record{} after the last checkpoint{} are chained but not yet signed{}. \
                 The proxy is running, or stopped without closing the log (a crash); a checkpoint fetched from the proxy \
                 (--checkpoint) tells a cut tail apart.",
                tail.file,
                tail.unsigned_records,
                if tail.unsigned_records == 1 { "" } else { "s" },
                match (&tail.last_checkpoint_seq, &tail.last_checkpoint_ts) {
                    (Some(seq), Some(ts)) => format!(" (record {seq}, {ts})"),
                    _ => String::new(),
                },
                if tail.partial_bytes > 0 {
                    format!(", followed by {} bytes of an unfinished line", tail.partial_bytes)
                } else {
                    String::new()
                },
            );
        }
        let _ = writeln!(
            out,
            "{}",
            match self.verdict {
                Verdict::Intact => "INTACT: every chain, checkpoint and signature holds; sequences are contiguous; the log is closed",
                Verdict::Open => "OPEN: no damage; the newest records are not signed yet (see open tail)",
                Verdict::Damaged => "DAMAGED: see above",
            }
        );
        out
    }
}
