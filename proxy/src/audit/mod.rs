//! The routing audit: one record per routing decision, forwarded or refused, in a
//! tamper-evident log that an auditor checks with the public key alone (docs/audit.md).
//!
//! The request path never touches the disk. [`Audit::begin`] reserves room for the request's
//! record in a bounded queue before anything is forwarded (a decision that could not be
//! recorded is refused, `audit_unavailable`, unless `on_failure = "serve"`); the request fills
//! in its [`Entry`] as it goes, and the entry goes into the queue when the request ends, also
//! when it is cut off or cancelled (its `Drop` queues it). An entry is queued before the last
//! bytes of its response are written, so a client never holds a whole response whose record
//! was not queued; the queue is one FIFO, so a record that is on disk has every record queued
//! before it on disk too.
//!
//! The writer ([`writer`]) runs on its own thread: it takes the queue at most every
//! `commit_interval`, chains and writes the records, fsyncs (group commit), signs checkpoints
//! and rotates segments. It must never drop a record: when the disk fails it keeps what it has
//! not synced, refuses new requests until a write and an fsync succeed again, and then states
//! the outage in a signed checkpoint.

pub mod format;
mod journal;
pub mod keys;
mod record;
#[cfg(test)]
mod tests;
pub mod verify;
mod writer;

use std::cell::RefCell;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use parking_lot::Mutex;

use crate::config::{AuditSection, OnFailure};
use crate::refusal::RefusalCode;
use crate::route::geoip::GeoIp;
use crate::route::map::{RegionIdx, Replica};
use crate::route::workspace_id::WorkspaceId;

use record::{Fixed, COMPLETE, FIXED, HAS_EPOCH, HAS_MAP_VERSION, NONE16};

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    Key(#[from] keys::KeyError),
    #[error("audit directory {path}: {message}")]
    Dir { path: PathBuf, message: String },
    #[error("cannot start the audit writer thread: {0}")]
    Thread(std::io::Error),
}

/// The queue between the request path and the writer.
#[derive(Default)]
struct Queue {
    /// Queued records, one after another ([`Fixed`] then its strings).
    bytes: Vec<u8>,
    records: usize,
    /// The journal files of the queued records that were journaled (one holder each), let go
    /// by the writer once their records are on disk.
    journaled: Vec<Arc<journal::JournalFile>>,
}

/// fsync latency buckets, in seconds.
const FSYNC_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

/// What the request path, the writer and the admin listener share.
struct Shared {
    queue: Mutex<Queue>,
    /// Records begun and not yet on disk (in flight, queued or being written).
    outstanding: AtomicUsize,
    capacity: usize,
    /// False while the writer cannot write: new decisions are not recorded.
    healthy: AtomicBool,
    on_failure: OnFailure,
    stopping: AtomicBool,
    writer: OnceLock<std::thread::Thread>,
    /// Requests refused with `audit_unavailable` since the last checkpoint said so, and when
    /// the first and the last of them were (µs since the epoch).
    refused: AtomicU64,
    refused_first: AtomicU64,
    refused_last: AtomicU64,
    /// Requests served without a record (`on_failure = "serve"`) since the last checkpoint.
    unrecorded: AtomicU64,
    /// The forward journal being appended to (none until the writer opened it).
    journal: arc_swap::ArcSwapOption<journal::JournalFile>,
    journal_errors: AtomicU64,
    /// The latest checkpoint line written and synced.
    latest_checkpoint: Mutex<String>,
    // Counters for the metrics.
    refused_total: AtomicU64,
    unrecorded_total: AtomicU64,
    records_written: AtomicU64,
    checkpoints_written: AtomicU64,
    write_errors: AtomicU64,
    segment: AtomicU64,
    /// Records taken from the queue and not yet synced.
    unsynced_records: AtomicUsize,
    fsync_buckets: [AtomicU64; FSYNC_BUCKETS.len()],
    fsync_count: AtomicU64,
    fsync_micros: AtomicU64,
    #[cfg(feature = "failpoints")]
    fail_io: AtomicBool,
}

impl Shared {
    fn wake_writer(&self) {
        if let Some(thread) = self.writer.get() {
            thread.unpark();
        }
    }

    fn observe_fsync(&self, elapsed: std::time::Duration) {
        let seconds = elapsed.as_secs_f64();
        if let Some(i) = FSYNC_BUCKETS.iter().position(|&b| seconds <= b) {
            self.fsync_buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.fsync_count.fetch_add(1, Ordering::Relaxed);
        self.fsync_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }
}

/// The audit log of one proxy.
pub struct Audit {
    shared: Arc<Shared>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    public_pem: String,
    key_id: String,
    dir: PathBuf,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit")
            .field("dir", &self.dir)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// What [`Audit::begin`] allows.
pub enum Begin {
    /// Room was reserved: the decision is recorded through this entry.
    Record(Entry),
    /// The log cannot take the record and `on_failure = "serve"`: go on unrecorded (counted,
    /// and stated in the next checkpoint).
    Unrecorded,
    /// The log cannot take the record: refuse with `audit_unavailable`.
    Refuse,
}

/// What the proxy knows of itself, for the records.
pub struct Identity<'a> {
    pub proxy_id: &'a str,
    pub edge_region: &'a str,
}

impl Audit {
    /// Opens the log in `section.dir` (continuing the chain of what is there), writes the run's
    /// first checkpoint and starts the writer. `endpoints` names each region's endpoints by
    /// region index.
    pub fn start(
        section: &AuditSection,
        identity: Identity<'_>,
        replica: Arc<Replica>,
        endpoints: Vec<Vec<Arc<str>>>,
        geoip: Option<Arc<GeoIp>>,
    ) -> Result<Self, AuditError> {
        let key = keys::load_signing_key(&section.signing_key)?;
        let verifying = key.verifying_key();
        let public_pem = keys::public_pem(&verifying)?;
        let key_id = format::key_id(&verifying);
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            outstanding: AtomicUsize::new(0),
            capacity: section.queue_capacity,
            healthy: AtomicBool::new(true),
            on_failure: section.on_failure,
            stopping: AtomicBool::new(false),
            writer: OnceLock::new(),
            refused: AtomicU64::new(0),
            refused_first: AtomicU64::new(0),
            refused_last: AtomicU64::new(0),
            unrecorded: AtomicU64::new(0),
            journal: arc_swap::ArcSwapOption::empty(),
            journal_errors: AtomicU64::new(0),
            latest_checkpoint: Mutex::new(String::new()),
            refused_total: AtomicU64::new(0),
            unrecorded_total: AtomicU64::new(0),
            records_written: AtomicU64::new(0),
            checkpoints_written: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            segment: AtomicU64::new(0),
            unsynced_records: AtomicUsize::new(0),
            fsync_buckets: Default::default(),
            fsync_count: AtomicU64::new(0),
            fsync_micros: AtomicU64::new(0),
            #[cfg(feature = "failpoints")]
            fail_io: AtomicBool::new(false),
        });
        let writer = writer::Writer::open(
            section,
            identity,
            shared.clone(),
            replica,
            endpoints,
            geoip,
            key,
            key_id.clone(),
        )?;
        let handle = std::thread::Builder::new()
            .name("domicile-audit".into())
            .spawn(move || writer.run())
            .map_err(AuditError::Thread)?;
        let _ = shared.writer.set(handle.thread().clone());
        Ok(Self {
            shared,
            writer: Mutex::new(Some(handle)),
            public_pem,
            key_id,
            dir: section.dir.clone(),
        })
    }

    /// Reserves room for one decision's record (see [`Begin`]). Takes no lock.
    pub fn begin(&self) -> Begin {
        let shared = &self.shared;
        if shared.healthy.load(Ordering::Relaxed) {
            let before = shared.outstanding.fetch_add(1, Ordering::Relaxed);
            if before < shared.capacity {
                return Begin::Record(Entry::new(shared.clone()));
            }
            shared.outstanding.fetch_sub(1, Ordering::Relaxed);
        }
        match shared.on_failure {
            OnFailure::Refuse => Begin::Refuse,
            OnFailure::Serve => {
                shared.unrecorded.fetch_add(1, Ordering::Relaxed);
                shared.unrecorded_total.fetch_add(1, Ordering::Relaxed);
                Begin::Unrecorded
            }
        }
    }

    /// Counts a request refused with `audit_unavailable` (stated in the next checkpoint).
    pub fn count_refusal(&self) {
        let now = format::now_micros();
        let shared = &self.shared;
        shared.refused.fetch_add(1, Ordering::Relaxed);
        shared.refused_total.fetch_add(1, Ordering::Relaxed);
        let _ = shared
            .refused_first
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        shared.refused_last.store(now, Ordering::Relaxed);
    }

    /// Whether the log takes new records now.
    pub fn is_healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Relaxed)
    }

    /// The public key checkpoints verify with, in PEM.
    pub fn public_key_pem(&self) -> &str {
        &self.public_pem
    }

    /// The latest checkpoint on disk, as its line (a witness for `audit verify --checkpoint`).
    pub fn latest_checkpoint(&self) -> String {
        self.shared.latest_checkpoint.lock().clone()
    }

    /// Records written and synced since start.
    pub fn records_written(&self) -> u64 {
        self.shared.records_written.load(Ordering::Relaxed)
    }

    /// Drains the queue, writes the closing checkpoint and stops the writer. Blocks: call it
    /// once no request can begin any more (the workers have stopped).
    pub fn stop(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        self.shared.wake_writer();
        if let Some(handle) = self.writer.lock().take() {
            if handle.join().is_err() {
                tracing::error!("the audit writer thread panicked");
            }
        }
    }

    /// Makes every write and fsync of the writer fail (as a full disk would) until cleared.
    #[cfg(feature = "failpoints")]
    pub fn fail_disk(&self, fail: bool) {
        self.shared.fail_io.store(fail, Ordering::Relaxed);
        self.shared.wake_writer();
    }

    /// Appends the audit metrics in Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let s = &self.shared;
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let queued = s.queue.lock().records + s.unsynced_records.load(Ordering::Relaxed);
        let rows: [(&str, &str, &str, u64); 11] = [
            (
                "domicile_audit_records_written_total",
                "counter",
                "Audit records written and fsynced.",
                load(&s.records_written),
            ),
            (
                "domicile_audit_queue_depth",
                "gauge",
                "Audit records queued or being written, not yet fsynced.",
                queued as u64,
            ),
            (
                "domicile_audit_reserved",
                "gauge",
                "Audit records reserved: requests in flight plus records not yet fsynced.",
                s.outstanding.load(Ordering::Relaxed) as u64,
            ),
            (
                "domicile_audit_queue_capacity",
                "gauge",
                "Most audit records reserved at once (audit.queue_capacity).",
                s.capacity as u64,
            ),
            (
                "domicile_audit_refusals_total",
                "counter",
                "Requests refused with audit_unavailable.",
                load(&s.refused_total),
            ),
            (
                "domicile_audit_unrecorded_total",
                "counter",
                "Requests served without an audit record (on_failure = \"serve\").",
                load(&s.unrecorded_total),
            ),
            (
                "domicile_audit_checkpoints_total",
                "counter",
                "Signed checkpoints written.",
                load(&s.checkpoints_written),
            ),
            (
                "domicile_audit_write_errors_total",
                "counter",
                "Failed audit writes and fsyncs.",
                load(&s.write_errors),
            ),
            (
                "domicile_audit_journal_errors_total",
                "counter",
                "Forwards the journal could not hold (their records survive a clean stop, not a crash).",
                load(&s.journal_errors),
            ),
            (
                "domicile_audit_healthy",
                "gauge",
                "1 when the audit log takes new records.",
                s.healthy.load(Ordering::Relaxed) as u64,
            ),
            (
                "domicile_audit_segment",
                "gauge",
                "The number of the segment being written.",
                load(&s.segment),
            ),
        ];
        for (name, kind, help, value) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        out.push_str("# HELP domicile_audit_fsync_seconds Time an audit fsync took.\n");
        out.push_str("# TYPE domicile_audit_fsync_seconds histogram\n");
        let mut cumulative = 0;
        for (i, bound) in FSYNC_BUCKETS.iter().enumerate() {
            cumulative += load(&s.fsync_buckets[i]);
            let _ = writeln!(
                out,
                "domicile_audit_fsync_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = load(&s.fsync_count);
        let _ = writeln!(
            out,
            "domicile_audit_fsync_seconds_bucket{{le=\"+Inf\"}} {count}\n\
             domicile_audit_fsync_seconds_sum {}\n\
             domicile_audit_fsync_seconds_count {count}",
            load(&s.fsync_micros) as f64 / 1e6
        );
    }
}

impl Drop for Audit {
    fn drop(&mut self) {
        // A proxy dropped without a shutdown still closes its log.
        self.shared.stopping.store(true, Ordering::Release);
        self.shared.wake_writer();
    }
}

/// What a request is, for its record.
pub struct Description<'a> {
    pub request_id: &'a [u8],
    pub method: &'a str,
    pub host: Option<&'a str>,
    /// The path as received, without the query.
    pub path: &'a str,
    pub client_ip: IpAddr,
    pub workspace: Option<&'a WorkspaceId>,
    pub home_region: Option<RegionIdx>,
    pub map_version: Option<u64>,
    pub epoch: Option<u32>,
    /// `None`: forwarded.
    pub refusal: Option<RefusalCode>,
}

/// One decision's record, filled in as the request goes. Dropping it queues it: a request
/// that was cut off or cancelled is recorded as not complete.
pub struct Entry {
    fixed: Fixed,
    strings: Vec<u8>,
    started: Instant,
    shared: Arc<Shared>,
    /// The journal file this decision went into, if it was forwarded.
    journal: Option<Arc<journal::JournalFile>>,
}

thread_local! {
    /// String buffers of finished entries, for the next ones on this thread.
    static BUFFERS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

const POOLED_BUFFERS: usize = 256;

impl Entry {
    fn new(shared: Arc<Shared>) -> Self {
        let strings = BUFFERS
            .try_with(|b| b.borrow_mut().pop())
            .ok()
            .flatten()
            .unwrap_or_else(|| Vec::with_capacity(256));
        Self {
            fixed: Fixed::new(format::now_micros()),
            strings,
            started: Instant::now(),
            shared,
            journal: None,
        }
    }

    /// Records what the request is and what was decided.
    pub fn describe(&mut self, d: &Description<'_>) {
        let f = &mut self.fixed;
        record::put_strings(
            f,
            &mut self.strings,
            d.request_id,
            d.workspace.map_or(&[][..], |w| w.as_bytes()),
            d.method.as_bytes(),
            d.host.map(str::as_bytes),
            d.path.as_bytes(),
        );
        f.set_ip(d.client_ip);
        if let Some(region) = d.home_region {
            f.home_region = u16::from(region);
        }
        if let Some(version) = d.map_version {
            f.flags |= HAS_MAP_VERSION;
            f.map_version = version;
        }
        if let Some(epoch) = d.epoch {
            f.flags |= HAS_EPOCH;
            f.epoch = epoch;
        }
        self.decide(d.refusal);
    }

    /// The outcome: `None` forwarded, or the refusal (also one that forwarding ended in).
    pub fn decide(&mut self, refusal: Option<RefusalCode>) {
        self.fixed.decision = refusal.map_or(0, |c| 1 + c.index() as u8);
    }

    /// The request went (or may have gone) to this endpoint of `region`'s pool.
    pub fn upstream(&mut self, region: RegionIdx, endpoint: usize) {
        self.fixed.upstream_region = u16::from(region);
        self.fixed.upstream_endpoint = u16::try_from(endpoint).unwrap_or(NONE16);
    }

    /// The request is about to be sent to `endpoint` of `region`: the decision goes into the
    /// forward journal first, so that a crash from here on cannot take its record along
    /// ([`journal`]). Called before every attempt (a retry names its new endpoint).
    pub fn sending(&mut self, region: &str, endpoint: &str) {
        let Some(file) = self.shared.journal.load_full() else {
            return;
        };
        match file.append(&self.fixed, &self.strings, region, endpoint) {
            Ok(()) => self.journal = Some(file),
            Err(e) => {
                if self.shared.journal_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!("cannot write the audit's forward journal: {e}");
                }
            }
        }
    }

    /// The status the client is answered with.
    pub fn status(&mut self, status: u16) {
        self.fixed.status = status;
    }

    /// Response body bytes relayed to the client.
    pub fn add_bytes_out(&mut self, n: u64) {
        self.fixed.bytes_out += n;
    }

    /// Request body bytes relayed to the origin.
    pub fn add_bytes_in(&mut self, n: u64) {
        self.fixed.bytes_in += n;
    }

    /// The response was relayed whole: queue the record now, before its last bytes are
    /// written to the client.
    pub fn complete(mut self) {
        self.fixed.flags |= COMPLETE;
    }

    fn queue(&mut self) {
        let f = &mut self.fixed;
        f.duration_us = self.started.elapsed().as_micros() as u64;
        f.len = (FIXED + self.strings.len()) as u32;
        let mut queue = self.shared.queue.lock();
        let was_empty = queue.records == 0;
        queue
            .bytes
            .extend_from_slice(bytemuck::bytes_of(&self.fixed));
        queue.bytes.extend_from_slice(&self.strings);
        queue.records += 1;
        if let Some(file) = self.journal.take() {
            queue.journaled.push(file);
        }
        drop(queue);
        if was_empty {
            self.shared.wake_writer();
        }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.queue();
        let mut strings = std::mem::take(&mut self.strings);
        if strings.capacity() <= 4096 {
            strings.clear();
            let _ = BUFFERS.try_with(|b| {
                let mut b = b.borrow_mut();
                if b.len() < POOLED_BUFFERS {
                    b.push(strings);
                }
            });
        }
    }
}
