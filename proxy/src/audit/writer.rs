//! The audit writer: its own thread, the only one that touches the segment files.
//!
//! Each turn it takes the whole queue (one swap under the queue's lock), turns the records into
//! chained lines, writes them and fsyncs: group commit, at most every `commit_interval`. A
//! signed checkpoint follows at least every `checkpoint_interval`, at rotation, after an
//! outage, and at a clean stop. Reservations are released only once their records are synced,
//! so a slow disk fills the queue and requests are refused rather than records kept in
//! memory without bound.
//!
//! When a write or an fsync fails, everything since the last successful fsync stays in memory
//! (`unsynced`), the proxy stops taking new records, and the writer retries: it cuts the
//! segment back to its last synced length and writes again; if that fails it carries on in a
//! new segment (the chain runs on across the boundary, so nothing is lost or skipped). Once a
//! write and an fsync succeed, an `outage` checkpoint states when, why, and how many requests
//! were refused meanwhile.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use ed25519_dalek::{Signer, SigningKey};

use super::format::{
    self, key, line_hash, put_hex, put_json_str, put_time, put_u64, Outage, Reason, Recovered,
};
use super::journal::{self, JournalFile};
use super::record::{LineContext, Names, Queued, COMPLETE, NONE16, RECOVERED};
use super::{AuditError, Identity, Shared};
use crate::config::AuditSection;
use crate::route::geoip::GeoIp;
use crate::route::map::Replica;

/// First wait before retrying a failed disk; doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// How long a stopping writer keeps retrying a failing disk before it gives up.
const STOP_RETRY: Duration = Duration::from_secs(5);
/// The tail of a segment read at start to find its last line (lines are far shorter).
const TAIL: u64 = 256 * 1024;

/// The segment being written.
struct Segment {
    number: u64,
    file: File,
    /// Bytes known to be on disk.
    synced_len: u64,
    opened: Instant,
}

/// A disk failure in progress.
struct DiskOutage {
    since_us: u64,
    error: String,
    retry_at: Instant,
    backoff: Duration,
}

pub(super) struct Writer {
    shared: Arc<Shared>,
    ctx: LineContext,
    replica: Arc<Replica>,
    key: SigningKey,
    key_id: String,
    run: String,
    dir: PathBuf,
    _lock: File,
    commit_interval: Duration,
    checkpoint_interval: Duration,
    segment_max_bytes: u64,
    segment_max_age: Duration,
    segment: Segment,
    /// The last record's sequence number.
    seq: u64,
    /// The hash of the last line (written or not yet).
    head: [u8; 32],
    /// Lines formed since the last successful fsync; `written` of them are in the file.
    unsynced: Vec<u8>,
    written: usize,
    unsynced_records: usize,
    batch: Vec<u8>,
    last_commit: Instant,
    last_checkpoint: Instant,
    outage: Option<DiskOutage>,
    last_refusal_report: Option<Instant>,
    /// After a failed rotation, when to try again.
    rotation_retry_at: Option<Instant>,
    /// The number of the newest forward journal file of this run.
    journal_number: u64,
    /// Journal files of records taken from the queue and not yet synced.
    journaled: Vec<Arc<JournalFile>>,
}

/// What a directory holds of an earlier run.
struct Found {
    /// The number for the new run's first segment.
    next_segment: u64,
    seq: u64,
    head: [u8; 32],
    recovered: Option<Recovered>,
}

fn dir_error(path: &Path, message: impl Into<String>) -> AuditError {
    AuditError::Dir {
        path: path.to_owned(),
        message: message.into(),
    }
}

impl Writer {
    /// Opens the directory, continues its chain and writes the run's `start` checkpoint.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        section: &AuditSection,
        identity: Identity<'_>,
        shared: Arc<Shared>,
        replica: Arc<Replica>,
        endpoints: Vec<Vec<Arc<str>>>,
        geoip: Option<Arc<GeoIp>>,
        key: SigningKey,
        key_id: String,
    ) -> Result<Self, AuditError> {
        let dir = section.dir.clone();
        std::fs::create_dir_all(&dir)
            .map_err(|e| dir_error(&dir, format!("cannot create: {e}")))?;
        let lock = File::create(dir.join(".lock"))
            .map_err(|e| dir_error(&dir, format!("cannot create its lock file: {e}")))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(dir_error(
                    &dir,
                    "another process writes to this directory (each proxy needs its own)",
                ))
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(dir_error(&dir, format!("cannot lock: {e}")))
            }
        }
        let found = scan(&dir)?;
        let mut identity_json = Vec::new();
        identity_json.extend_from_slice(b"\"proxy_id\":");
        put_json_str(&mut identity_json, identity.proxy_id.as_bytes());
        identity_json.extend_from_slice(b",\"edge_region\":");
        put_json_str(&mut identity_json, identity.edge_region.as_bytes());
        let file = create_segment(&dir, found.next_segment)?;
        shared.segment.store(found.next_segment, Ordering::Relaxed);
        let now = Instant::now();
        let mut writer = Self {
            shared,
            ctx: LineContext::new(identity_json, endpoints, geoip, section.client_ip),
            replica,
            key,
            key_id,
            run: hex::encode(rand::random::<[u8; 8]>()),
            dir,
            _lock: lock,
            commit_interval: section.commit_interval,
            checkpoint_interval: section.checkpoint_interval,
            segment_max_bytes: section.segment_max_bytes,
            segment_max_age: section.segment_max_age,
            segment: Segment {
                number: found.next_segment,
                file,
                synced_len: 0,
                opened: now,
            },
            seq: found.seq,
            head: found.head,
            unsynced: Vec::with_capacity(64 * 1024),
            written: 0,
            unsynced_records: 0,
            batch: Vec::new(),
            last_commit: now,
            last_checkpoint: now,
            outage: None,
            last_refusal_report: None,
            rotation_retry_at: None,
            journal_number: 0,
            journaled: Vec::new(),
        };
        if let Some(recovered) = &found.recovered {
            tracing::warn!(
                segment = recovered.segment,
                seq = recovered.seq,
                partial_bytes = recovered.partial_bytes,
                "the audit log's last run did not stop cleanly; its records up to the last fsync are kept"
            );
        }
        writer.append_checkpoint(Reason::Start, None, found.recovered.as_ref());
        if !writer.commit() {
            let error = writer.outage.take().map(|o| o.error).unwrap_or_default();
            return Err(dir_error(
                &writer.dir,
                format!("cannot write the first checkpoint: {error}"),
            ));
        }
        writer.recover_journal()?;
        writer.open_journal().map_err(|e| {
            dir_error(
                &writer.dir,
                format!("cannot create the forward journal: {e}"),
            )
        })?;
        tracing::info!(
            dir = %writer.dir.display(),
            segment = writer.segment.number,
            seq = writer.seq,
            key = %writer.key_id,
            "audit log open"
        );
        Ok(writer)
    }

    /// Writes a `recovered` record for every decision an earlier run journaled and did not
    /// get into the log, then deletes that run's journal files.
    fn recover_journal(&mut self) -> Result<(), AuditError> {
        let files = journal::files(&self.dir)
            .map_err(|e| dir_error(&self.dir, format!("cannot list the forward journal: {e}")))?;
        if files.is_empty() {
            return Ok(());
        }
        let read =
            journal::read(&files).and_then(|entries| journal::missing_from_log(&self.dir, entries));
        let missing = match read {
            Ok(missing) => missing,
            Err(e) => {
                // Kept for the next start; this run goes on with a journal of its own.
                tracing::error!("cannot read the forward journal of the last run: {e}");
                return Ok(());
            }
        };
        for entry in &missing {
            let mut fixed = entry.fixed;
            fixed.flags = (fixed.flags | RECOVERED) & !COMPLETE;
            fixed.status = 0;
            fixed.duration_us = 0;
            let names = Names {
                home_region: (fixed.home_region != NONE16).then_some(&entry.region[..]),
                upstream_region: &entry.region,
                upstream: &entry.endpoint,
            };
            self.seq += 1;
            let start = self.unsynced.len();
            Queued::new(fixed, &entry.strings).write_line_named(
                self.seq,
                &self.head,
                &self.ctx,
                Some(&names),
                &mut self.unsynced,
            );
            self.head = line_hash(&self.unsynced[start..]);
            self.unsynced.push(b'\n');
        }
        if !missing.is_empty() {
            if !self.commit() {
                let error = self.outage.take().map(|o| o.error).unwrap_or_default();
                return Err(dir_error(
                    &self.dir,
                    format!("cannot write the records recovered from the forward journal: {error}"),
                ));
            }
            self.shared
                .records_written
                .fetch_add(missing.len() as u64, Ordering::Relaxed);
            tracing::warn!(
                records = missing.len(),
                "the last run ended with forwards not in the log; recorded them from its forward journal"
            );
        }
        for file in files {
            if let Err(e) = std::fs::remove_file(&file) {
                tracing::warn!("cannot remove {}: {e}", file.display());
            }
        }
        Ok(())
    }

    /// Starts the next journal file; the one it replaces goes once its last holder lets go.
    fn open_journal(&mut self) -> io::Result<()> {
        self.journal_number += 1;
        let file = JournalFile::create(&self.dir, &self.run, self.journal_number)?;
        if let Some(old) = self.shared.journal.swap(Some(Arc::new(file))) {
            old.retire();
        }
        Ok(())
    }

    fn rotate_journal_if_due(&mut self) {
        let due = self
            .shared
            .journal
            .load()
            .as_ref()
            .is_some_and(|j| j.len() >= journal::ROTATE_BYTES);
        if due {
            if let Err(e) = self.open_journal() {
                tracing::warn!("cannot start a new forward journal file: {e}");
            }
        }
    }

    pub fn run(mut self) {
        // Workers come first when they share a core with the writer: it works in their gaps
        // (and still gets a fair share of a saturated core, so it keeps up).
        #[cfg(target_os = "linux")]
        if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 5) {
            tracing::debug!("cannot lower the audit writer's priority: {e}");
        }
        let mut stop_deadline: Option<Instant> = None;
        loop {
            if !self.shared.stopping.load(Ordering::Acquire) {
                self.wait();
            }
            let stopping = self.shared.stopping.load(Ordering::Acquire);
            self.take_batch();
            match &self.outage {
                Some(outage) if Instant::now() >= outage.retry_at || stopping => self.recover(),
                Some(_) => {}
                None => {
                    if !self.unsynced.is_empty() {
                        self.commit();
                    }
                }
            }
            if self.outage.is_none() {
                self.report_refusals();
                if self.last_checkpoint.elapsed() >= self.checkpoint_interval {
                    self.checkpoint(Reason::Interval, None);
                }
                self.rotate_if_due();
                self.rotate_journal_if_due();
            }
            if stopping {
                let empty = self.shared.queue.lock().records == 0;
                if self.outage.is_none() && empty {
                    self.checkpoint(Reason::Shutdown, None);
                    if self.outage.is_none() {
                        // Every record is on disk: the journal has nothing left to prove.
                        if let Some(file) = self.shared.journal.swap(None) {
                            file.retire();
                        }
                        tracing::info!(
                            seq = self.seq,
                            segment = self.segment.number,
                            "audit log closed"
                        );
                        return;
                    }
                }
                let deadline = *stop_deadline.get_or_insert_with(|| Instant::now() + STOP_RETRY);
                if Instant::now() >= deadline {
                    let lost = self.unsynced_records + self.shared.queue.lock().records;
                    tracing::error!(
                        records = lost,
                        "the audit log could not be written at shutdown; these records are lost"
                    );
                    return;
                }
                if self.outage.is_some() {
                    std::thread::sleep(RETRY_FIRST);
                }
            }
        }
    }

    /// Sleeps until there is something to do: queued records (at most every
    /// `commit_interval`), a checkpoint, a retry, or a stop.
    fn wait(&self) {
        let now = Instant::now();
        let queued = self.shared.queue.lock().records > 0;
        let checkpoint = self.last_checkpoint + self.checkpoint_interval;
        // While the disk fails nothing is written, checkpoints included: the retry is all.
        let until = match &self.outage {
            Some(outage) => outage.retry_at,
            None if queued => checkpoint.min(self.last_commit + self.commit_interval),
            None => checkpoint,
        };
        if until > now {
            std::thread::park_timeout(until - now);
            // Woken by the first record after an empty queue: still batch for the rest of the
            // commit interval.
            if self.outage.is_none() && !self.shared.stopping.load(Ordering::Acquire) {
                let at = self.last_commit + self.commit_interval;
                let now = Instant::now();
                if at > now {
                    std::thread::sleep(at - now);
                }
            }
        }
    }

    /// Takes the queue and turns its records into lines in `unsynced`.
    fn take_batch(&mut self) {
        let records = {
            let mut queue = self.shared.queue.lock();
            if queue.records == 0 {
                return;
            }
            std::mem::swap(&mut queue.bytes, &mut self.batch);
            self.journaled.append(&mut queue.journaled);
            std::mem::take(&mut queue.records)
        };
        self.ctx.regions(&self.replica.regions().snapshot());
        let mut rest = &self.batch[..];
        let mut formed = 0;
        while let Some((record, after)) = Queued::split(rest) {
            self.seq += 1;
            let start = self.unsynced.len();
            record.write_line(self.seq, &self.head, &self.ctx, &mut self.unsynced);
            self.head = line_hash(&self.unsynced[start..]);
            self.unsynced.push(b'\n');
            formed += 1;
            rest = after;
        }
        debug_assert_eq!(formed, records);
        self.batch.clear();
        self.unsynced_records += formed;
        self.shared
            .unsynced_records
            .store(self.unsynced_records, Ordering::Relaxed);
    }

    /// Writes what is not yet in the file and fsyncs it. On failure the disk is in outage and
    /// everything stays in `unsynced`.
    fn commit(&mut self) -> bool {
        let result = (|| {
            while self.written < self.unsynced.len() {
                let n = io_write(
                    &self.shared,
                    &mut self.segment.file,
                    &self.unsynced[self.written..],
                )?;
                if n == 0 {
                    return Err(io::Error::from(io::ErrorKind::WriteZero));
                }
                self.written += n;
            }
            let started = Instant::now();
            io_sync(&self.shared, &self.segment.file)?;
            self.shared.observe_fsync(started.elapsed());
            Ok(())
        })();
        match result {
            Ok(()) => {
                self.synced();
                true
            }
            Err(e) => {
                self.fail(e);
                false
            }
        }
    }

    /// Everything in `unsynced` is on disk.
    fn synced(&mut self) {
        self.journaled.clear();
        self.segment.synced_len += self.unsynced.len() as u64;
        self.unsynced.clear();
        self.written = 0;
        let records = std::mem::take(&mut self.unsynced_records);
        self.shared.unsynced_records.store(0, Ordering::Relaxed);
        self.shared
            .outstanding
            .fetch_sub(records, Ordering::Relaxed);
        self.shared
            .records_written
            .fetch_add(records as u64, Ordering::Relaxed);
        self.last_commit = Instant::now();
    }

    fn fail(&mut self, error: io::Error) {
        self.shared.write_errors.fetch_add(1, Ordering::Relaxed);
        self.shared.healthy.store(false, Ordering::Relaxed);
        match &mut self.outage {
            None => {
                tracing::error!(
                    segment = self.segment.number,
                    "audit log write failed, refusing new requests until it recovers: {error}"
                );
                self.outage = Some(DiskOutage {
                    since_us: format::now_micros(),
                    error: error.to_string(),
                    retry_at: Instant::now() + RETRY_FIRST,
                    backoff: RETRY_FIRST,
                });
            }
            Some(outage) => {
                tracing::debug!("audit log still failing: {error}");
                outage.backoff = (outage.backoff * 2).min(RETRY_MAX);
                outage.retry_at = Instant::now() + outage.backoff;
            }
        }
    }

    /// Tries to get what is unsynced onto disk again: in the segment, cut back to what was
    /// synced (the segment is opened for appending, so writes go on from there), or else in a
    /// new segment. The old segment must be cut back first either way: a line that reached it
    /// unsynced must not stand there and again in the next segment.
    fn recover(&mut self) {
        if let Err(e) = io_truncate(&self.shared, &self.segment.file, self.segment.synced_len) {
            return self.fail(e);
        }
        self.written = 0;
        if !self.commit() {
            if let Err(e) = io_truncate(&self.shared, &self.segment.file, self.segment.synced_len) {
                return self.fail(e);
            }
            // A new segment is kept only if the records get onto disk there; otherwise it is
            // removed again, so a disk that stays full does not fill up with empty segments.
            let old = match self.open_next_segment() {
                Ok(old) => old,
                Err(e) => return self.fail(e),
            };
            if !self.commit() {
                let new = std::mem::replace(&mut self.segment, old);
                let _ = std::fs::remove_file(self.dir.join(format::segment_name(new.number)));
                self.shared
                    .segment
                    .store(self.segment.number, Ordering::Relaxed);
                self.written = 0;
                return;
            }
            tracing::warn!(
                abandoned = old.number,
                segment = self.segment.number,
                "the audit log goes on in a new segment"
            );
        }
        let Some(outage) = self.outage.take() else {
            return;
        };
        self.shared.healthy.store(true, Ordering::Relaxed);
        let (refused, _, last) = self.take_refusals();
        let outage = Outage {
            kind: "disk".into(),
            since: time_text(outage.since_us),
            until: time_text(last.max(format::now_micros())),
            refused,
            unrecorded: self.shared.unrecorded.swap(0, Ordering::Relaxed),
            error: Some(outage.error),
        };
        tracing::warn!(
            refused = outage.refused,
            since = %outage.since,
            "audit log writable again"
        );
        self.checkpoint(Reason::Outage, Some(&outage));
    }

    /// Requests refused (or served unrecorded) while the disk was fine: the queue was full.
    /// At most once a second while it lasts, so an overload does not become a flood of
    /// checkpoints.
    fn report_refusals(&mut self) {
        let refused = self.shared.refused.load(Ordering::Relaxed);
        let unrecorded = self.shared.unrecorded.load(Ordering::Relaxed);
        if refused == 0 && unrecorded == 0 {
            return;
        }
        if self
            .last_refusal_report
            .is_some_and(|at| at.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        self.last_refusal_report = Some(Instant::now());
        let (refused, first, last) = self.take_refusals();
        let unrecorded = self.shared.unrecorded.swap(0, Ordering::Relaxed);
        let now = format::now_micros();
        let outage = Outage {
            kind: "queue_full".into(),
            since: time_text(if first > 0 { first } else { now }),
            until: time_text(if last > 0 { last } else { now }),
            refused,
            unrecorded,
            error: None,
        };
        tracing::warn!(refused, unrecorded, "audit queue was full");
        self.checkpoint(Reason::Outage, Some(&outage));
    }

    fn take_refusals(&self) -> (u64, u64, u64) {
        let s = &self.shared;
        let refused = s.refused.swap(0, Ordering::Relaxed);
        let first = s.refused_first.swap(0, Ordering::Relaxed);
        let last = s.refused_last.swap(0, Ordering::Relaxed);
        (refused, first, last)
    }

    fn checkpoint(&mut self, reason: Reason, outage: Option<&Outage>) {
        self.append_checkpoint(reason, outage, None);
        self.commit();
    }

    /// Appends a signed checkpoint line to `unsynced`.
    fn append_checkpoint(
        &mut self,
        reason: Reason,
        outage: Option<&Outage>,
        recovered: Option<&Recovered>,
    ) {
        let start = self.unsynced.len();
        let out = &mut self.unsynced;
        out.extend_from_slice(b"{\"type\":\"checkpoint\",\"reason\":\"");
        out.extend_from_slice(reason.as_str().as_bytes());
        out.push(b'"');
        out.extend_from_slice(key!("ts"));
        put_time(out, format::now_micros());
        out.push(b',');
        out.extend_from_slice(&self.ctx.identity);
        out.extend_from_slice(key!("run"));
        put_json_str(out, self.run.as_bytes());
        out.extend_from_slice(key!("segment"));
        put_u64(out, self.segment.number);
        out.extend_from_slice(key!("seq"));
        put_u64(out, self.seq);
        out.extend_from_slice(key!("interval_ms"));
        put_u64(out, self.checkpoint_interval.as_millis() as u64);
        out.extend_from_slice(key!("key"));
        put_json_str(out, self.key_id.as_bytes());
        out.extend_from_slice(key!("outage"));
        let _ = serde_json::to_writer(&mut *out, &outage);
        out.extend_from_slice(key!("recovered"));
        let _ = serde_json::to_writer(&mut *out, &recovered);
        out.extend_from_slice(key!("prev"));
        out.push(b'"');
        put_hex(out, &self.head);
        out.extend_from_slice(b"\"}");
        let signature = self.key.sign(&out[start..]);
        out.pop();
        out.extend_from_slice(format::SIG_MEMBER);
        let sig = base64::engine::general_purpose::STANDARD.encode(signature.to_bytes());
        out.extend_from_slice(sig.as_bytes());
        out.extend_from_slice(b"\"}");
        self.head = line_hash(&out[start..]);
        let line = String::from_utf8_lossy(&out[start..]).into_owned();
        out.push(b'\n');
        self.last_checkpoint = Instant::now();
        self.shared
            .checkpoints_written
            .fetch_add(1, Ordering::Relaxed);
        *self.shared.latest_checkpoint.lock() = line;
    }

    fn rotate_if_due(&mut self) {
        let size = self.segment.synced_len + self.unsynced.len() as u64;
        if size < self.segment_max_bytes && self.segment.opened.elapsed() < self.segment_max_age {
            return;
        }
        if self.rotation_retry_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        self.checkpoint(Reason::Rotate, None);
        if self.outage.is_some() {
            return;
        }
        if let Err(e) = self.open_next_segment() {
            // The closed segment stays current; rotation is tried again in a second.
            tracing::error!(
                segment = self.segment.number + 1,
                "cannot begin a new audit segment, trying again in a second: {e}"
            );
            self.shared.write_errors.fetch_add(1, Ordering::Relaxed);
            self.rotation_retry_at = Some(Instant::now() + Duration::from_secs(1));
        } else {
            self.rotation_retry_at = None;
        }
    }

    /// Creates the next segment and makes it the current one; returns the one it replaces.
    fn open_next_segment(&mut self) -> io::Result<Segment> {
        let number = self.segment.number + 1;
        let file =
            create_segment(&self.dir, number).map_err(|e| io::Error::other(e.to_string()))?;
        let old = std::mem::replace(
            &mut self.segment,
            Segment {
                number,
                file,
                synced_len: 0,
                opened: Instant::now(),
            },
        );
        self.written = 0;
        self.shared.segment.store(number, Ordering::Relaxed);
        Ok(old)
    }
}

fn time_text(micros: u64) -> String {
    let mut out = Vec::new();
    put_time(&mut out, micros);
    serde_json::from_slice(&out).unwrap_or_default()
}

/// Creates segment `number` (it must not exist) and makes its name durable.
fn create_segment(dir: &Path, number: u64) -> Result<File, AuditError> {
    let path = dir.join(format::segment_name(number));
    let file = OpenOptions::new()
        .append(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| dir_error(dir, format!("cannot create {}: {e}", path.display())))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| dir_error(dir, format!("cannot sync the directory: {e}")))?;
    Ok(file)
}

/// Reads what an earlier run left: where its chain ends and whether it stopped cleanly.
fn scan(dir: &Path) -> Result<Found, AuditError> {
    let segments =
        format::list_segments(dir).map_err(|e| dir_error(dir, format!("cannot list: {e}")))?;
    let Some(&(newest, _)) = segments.last() else {
        return Ok(Found {
            next_segment: 1,
            seq: 0,
            head: [0; 32],
            recovered: None,
        });
    };
    // The newest segment may hold nothing complete (a crash right after it was begun); the
    // chain then ends in the one before.
    let mut partial_bytes = None;
    for (number, path) in segments.iter().rev() {
        let (line, partial) = last_line(path)
            .map_err(|e| dir_error(dir, format!("cannot read {}: {e}", path.display())))?;
        if *number == newest {
            partial_bytes = Some(partial);
        }
        let Some(line) = line else {
            continue;
        };
        let parsed: format::Line = serde_json::from_slice(&line).map_err(|e| {
            dir_error(
                dir,
                format!(
                    "the last line of {} is not an audit line ({e}); check the log with \
                     `domicile audit verify`, and move the directory aside to begin a new log",
                    path.display()
                ),
            )
        })?;
        let (seq, clean) = match &parsed {
            format::Line::Record(r) => (r.seq, false),
            format::Line::Checkpoint(c) => {
                (c.seq, matches!(c.reason, Reason::Shutdown | Reason::Rotate))
            }
        };
        let partial = partial_bytes.unwrap_or(0);
        let clean = clean && *number == newest && partial == 0;
        return Ok(Found {
            next_segment: newest + 1,
            seq,
            head: line_hash(&line),
            recovered: (!clean).then_some(Recovered {
                segment: newest,
                seq,
                partial_bytes: partial,
            }),
        });
    }
    Err(dir_error(
        dir,
        "its segments hold no complete line; move the directory aside to begin a new log",
    ))
}

/// The last complete line of a file (without its newline) and the bytes after it.
fn last_line(path: &Path) -> io::Result<(Option<Vec<u8>>, u64)> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let from = len.saturating_sub(TAIL);
    file.seek(SeekFrom::Start(from))?;
    let mut tail = Vec::with_capacity((len - from) as usize);
    file.read_to_end(&mut tail)?;
    let Some(end) = tail.iter().rposition(|&b| b == b'\n') else {
        if from > 0 {
            return Err(io::Error::other("no line end in its last 256 KiB"));
        }
        return Ok((None, len));
    };
    let partial = (tail.len() - end - 1) as u64;
    let start = tail[..end]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    if start == 0 && from > 0 {
        return Err(io::Error::other("a line longer than 256 KiB"));
    }
    Ok((Some(tail[start..end].to_vec()), partial))
}

#[cfg(feature = "failpoints")]
fn injected(shared: &Shared) -> io::Result<()> {
    if shared.fail_io.load(Ordering::Relaxed) {
        return Err(io::Error::from_raw_os_error(28)); // ENOSPC
    }
    Ok(())
}

#[cfg(not(feature = "failpoints"))]
fn injected(_shared: &Shared) -> io::Result<()> {
    Ok(())
}

fn io_write(shared: &Shared, file: &mut File, bytes: &[u8]) -> io::Result<usize> {
    injected(shared)?;
    file.write(bytes)
}

fn io_sync(shared: &Shared, file: &File) -> io::Result<()> {
    injected(shared)?;
    file.sync_data()
}

fn io_truncate(shared: &Shared, file: &File, len: u64) -> io::Result<()> {
    injected(shared)?;
    file.set_len(len)
}
