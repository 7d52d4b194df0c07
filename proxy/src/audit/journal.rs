//! The forward journal: what a `kill -9` cannot take with it.
//!
//! A record reaches the log when its request ends, through an in-memory queue that the writer
//! takes every `commit_interval`. A process that dies (a crash, `kill -9`, the OOM killer) takes
//! that queue with it, and the requests it had in flight were never queued at all, though their
//! bytes may already be at an origin. So before the first byte of a request goes to an origin,
//! the request path appends the decision to a journal file, one `write` (an `O_APPEND` write of
//! one buffer is one append, from any thread, with no lock). The bytes are then in the kernel,
//! which outlives the process; nothing waits for the disk.
//!
//! At start, the writer reads the journal files an earlier run left, looks each decision up in
//! the log's newest segments (by arrival time and request id) and writes a record marked
//! `"recovered": true` for each one the log does not hold, then deletes the files. Those records
//! say where the request went, not how it ended (status, bytes and duration are unknown).
//!
//! Files rotate: the writer starts a new one when the current one grows past
//! [`ROTATE_BYTES`]; a file is deleted when the last request journaled in it has its record
//! on disk (each journaled entry holds the file, and hands it to the writer with its record),
//! and at a clean stop. A machine that loses power loses what was not fsynced, journal and
//! log alike: the journal is not fsynced, since waiting for the disk before every forward
//! would put a disk flush on every request.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::format;
use super::record::{Fixed, FIXED};

/// Starts a new journal file past this size.
pub(super) const ROTATE_BYTES: u64 = 8 << 20;

const MAGIC: u32 = u32::from_le_bytes(*b"DJ01");
/// magic, total length, region name length, endpoint name length.
const HEADER: usize = 4 + 4 + 2 + 2;

/// One journal file.
pub(super) struct JournalFile {
    path: PathBuf,
    file: File,
    bytes: AtomicU64,
    /// Set when a newer file took over; the file is deleted when the last holder lets go.
    retired: AtomicBool,
}

impl JournalFile {
    pub fn create(dir: &Path, run: &str, number: u64) -> io::Result<Self> {
        let path = dir.join(format!("journal-{run}-{number:04}.bin"));
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        Ok(Self {
            path,
            file,
            bytes: AtomicU64::new(0),
            retired: AtomicBool::new(false),
        })
    }

    /// Appends one decision about to be forwarded to `region`'s `endpoint`: one `writev`.
    pub fn append(
        &self,
        fixed: &Fixed,
        strings: &[u8],
        region: &str,
        endpoint: &str,
    ) -> io::Result<()> {
        let (region, endpoint) = (clip(region.as_bytes()), clip(endpoint.as_bytes()));
        let total = HEADER + FIXED + strings.len() + region.len() + endpoint.len();
        let mut header = [0u8; HEADER];
        header[..4].copy_from_slice(&MAGIC.to_le_bytes());
        header[4..8].copy_from_slice(&(total as u32).to_le_bytes());
        header[8..10].copy_from_slice(&(region.len() as u16).to_le_bytes());
        header[10..12].copy_from_slice(&(endpoint.len() as u16).to_le_bytes());
        let mut fixed = *fixed;
        fixed.len = (FIXED + strings.len()) as u32;
        let parts = [
            IoSlice::new(&header),
            IoSlice::new(bytemuck::bytes_of(&fixed)),
            IoSlice::new(strings),
            IoSlice::new(region),
            IoSlice::new(endpoint),
        ];
        // A regular file takes the whole buffer or fails (full disk, I/O error); a short
        // write is reported as one.
        let n = (&self.file).write_vectored(&parts)?;
        if n != total {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("journal write of {total} bytes wrote {n}"),
            ));
        }
        self.bytes.fetch_add(total as u64, Ordering::Relaxed);
        Ok(())
    }

    pub fn len(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }
}

impl Drop for JournalFile {
    fn drop(&mut self) {
        if self.retired.load(Ordering::Acquire) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn clip(name: &[u8]) -> &[u8] {
    &name[..name.len().min(u16::MAX as usize)]
}

/// One decision read back from a journal.
pub(super) struct Journaled {
    pub fixed: Fixed,
    pub strings: Vec<u8>,
    pub region: Vec<u8>,
    pub endpoint: Vec<u8>,
}

impl Journaled {
    pub fn request_id(&self) -> &[u8] {
        &self.strings[..(self.fixed.request_id_len as usize).min(self.strings.len())]
    }

    /// The arrival time as the log writes it.
    pub fn ts(&self) -> String {
        let mut out = Vec::with_capacity(32);
        format::put_time(&mut out, self.fixed.ts_micros);
        // put_time writes a quoted JSON string.
        String::from_utf8_lossy(&out).trim_matches('"').to_owned()
    }
}

/// The journal files in `dir` (an earlier run's), oldest first.
pub(super) fn files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("journal-") && n.ends_with(".bin"))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Every whole entry of the files; a torn or foreign tail ends a file's entries. An entry
/// journaled more than once (a retry on another endpoint) is kept in its last form.
pub(super) fn read(files: &[PathBuf]) -> io::Result<Vec<Journaled>> {
    let mut out: Vec<Journaled> = Vec::new();
    for path in files {
        let bytes = std::fs::read(path)?;
        out.extend(parse(&bytes));
    }
    // Last form wins: later entries of the same request replace earlier ones.
    let mut seen = std::collections::HashMap::new();
    let mut keep = vec![true; out.len()];
    for (i, j) in out.iter().enumerate() {
        if let Some(earlier) = seen.insert((j.fixed.ts_micros, j.request_id().to_vec()), i) {
            keep[earlier] = false;
        }
    }
    let mut i = 0;
    out.retain(|_| {
        i += 1;
        keep[i - 1]
    });
    Ok(out)
}

fn parse(mut bytes: &[u8]) -> Vec<Journaled> {
    let mut out = Vec::new();
    while bytes.len() >= HEADER {
        let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or([0; 4]));
        let half = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]) as usize;
        let (total, region_len, endpoint_len) = (word(4) as usize, half(8), half(10));
        if word(0) != MAGIC || total < HEADER + FIXED || total > bytes.len() {
            break;
        }
        let body = &bytes[HEADER..total];
        let Ok(fixed) = bytemuck::try_pod_read_unaligned::<Fixed>(&body[..FIXED]) else {
            break;
        };
        let strings_len = (fixed.len as usize).saturating_sub(FIXED);
        let named = fixed.request_id_len as usize
            + fixed.workspace_len as usize
            + fixed.method_len as usize
            + fixed.host_len as usize
            + fixed.path_len as usize;
        if fixed.len as usize != FIXED + strings_len
            || named != strings_len
            || FIXED + strings_len + region_len + endpoint_len != body.len()
        {
            break;
        }
        let rest = &body[FIXED..];
        out.push(Journaled {
            fixed,
            strings: rest[..strings_len].to_vec(),
            region: rest[strings_len..strings_len + region_len].to_vec(),
            endpoint: rest[strings_len + region_len..].to_vec(),
        });
        bytes = &bytes[total..];
    }
    out
}

/// The entries whose records are not in the log of `dir`: the newest segments are read back
/// until one that closed before the oldest entry arrived (a record is written after its
/// request arrived, so an older segment cannot hold one).
pub(super) fn missing_from_log(dir: &Path, entries: Vec<Journaled>) -> io::Result<Vec<Journaled>> {
    let Some(oldest) = entries.iter().map(Journaled::ts).min() else {
        return Ok(entries);
    };
    let mut logged: std::collections::HashSet<(String, Vec<u8>)> = Default::default();
    let segments = format::list_segments(dir)?;
    for (_, path) in segments.iter().rev() {
        let text = std::fs::read(path)?;
        let mut last_checkpoint_ts: Option<String> = None;
        for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let Ok(value) = serde_json::from_slice::<serde_json::Value>(line) else {
                continue; // a torn last line of a crashed run
            };
            let ts = value["ts"].as_str().unwrap_or_default().to_owned();
            match value["type"].as_str() {
                Some("record") => {
                    let id = value["request_id"].as_str().unwrap_or_default();
                    logged.insert((ts, id.as_bytes().to_vec()));
                    last_checkpoint_ts = None;
                }
                Some("checkpoint") => last_checkpoint_ts = Some(ts),
                _ => {}
            }
        }
        // Timestamps share one fixed-width format, so they compare as text.
        if last_checkpoint_ts.is_some_and(|closed| closed < oldest) {
            break;
        }
    }
    Ok(entries
        .into_iter()
        .filter(|e| {
            !logged.contains(&(
                e.ts(),
                String::from_utf8_lossy(e.request_id()).as_bytes().to_vec(),
            ))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed_for(strings: &[u8], id_len: u8, ts: u64) -> Fixed {
        let mut f = Fixed::new(ts);
        f.request_id_len = id_len;
        f.path_len = (strings.len() - id_len as usize) as u16;
        f
    }

    #[test]
    fn entries_read_back_as_written_and_a_torn_tail_ends_them() {
        let dir = tempfile::tempdir().unwrap();
        let j = JournalFile::create(dir.path(), "r", 1).unwrap();
        j.append(&fixed_for(b"id-1/x", 4, 10), b"id-1/x", "eu", "10.0.0.1:80")
            .unwrap();
        j.append(&fixed_for(b"id-2/y", 4, 20), b"id-2/y", "us", "10.0.0.2:80")
            .unwrap();
        j.append(&fixed_for(b"id-2/y", 4, 20), b"id-2/y", "us", "10.0.0.3:80")
            .unwrap();
        let path = dir.path().join("journal-r-0001.bin");
        let mut bytes = std::fs::read(&path).unwrap();
        let whole = bytes.len();
        bytes.extend_from_within(..20); // a torn fourth entry
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(j.len() as usize, whole);

        let read = read(&files(dir.path()).unwrap()).unwrap();
        assert_eq!(read.len(), 2, "the retry replaced its first form");
        assert_eq!(read[0].request_id(), b"id-1");
        assert_eq!(read[0].region, b"eu");
        assert_eq!(
            read[1].endpoint, b"10.0.0.3:80",
            "the last attempt's endpoint"
        );
        assert_eq!(read[1].strings, b"id-2/y");
    }

    #[test]
    fn a_retired_file_is_deleted_by_its_last_holder() {
        let dir = tempfile::tempdir().unwrap();
        let j = std::sync::Arc::new(JournalFile::create(dir.path(), "r", 1).unwrap());
        let held = j.clone();
        j.retire();
        drop(j);
        assert_eq!(files(dir.path()).unwrap().len(), 1);
        drop(held);
        assert!(files(dir.path()).unwrap().is_empty());
        // A current (not retired) file outlives its holders: it is the crash's evidence.
        let j = JournalFile::create(dir.path(), "r", 2).unwrap();
        drop(j);
        assert_eq!(files(dir.path()).unwrap().len(), 1);
    }

    #[test]
    fn entries_already_in_the_log_are_not_recovered() {
        let dir = tempfile::tempdir().unwrap();
        let j = JournalFile::create(dir.path(), "r", 1).unwrap();
        let ts = 1_764_621_767_025_637; // 2025-12-01T20:42:47.025637Z
        j.append(&fixed_for(b"in-log/x", 6, ts), b"in-log/x", "eu", "e")
            .unwrap();
        j.append(&fixed_for(b"lost/x", 4, ts + 1), b"lost/x", "eu", "e")
            .unwrap();
        let entries = read(&files(dir.path()).unwrap()).unwrap();
        let logged = format!(
            "{{\"type\":\"record\",\"seq\":1,\"ts\":\"{}\",\"request_id\":\"in-log\"}}\n",
            entries[0].ts()
        );
        std::fs::write(dir.path().join(format::segment_name(1)), logged).unwrap();
        let missing = missing_from_log(dir.path(), entries).unwrap();
        assert_eq!(missing.len(), 1);
        assert_eq!(missing[0].request_id(), b"lost");
    }
}
