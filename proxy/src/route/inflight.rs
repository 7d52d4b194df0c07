//! Requests in flight, by the map version they were routed with: what makes the heartbeat's
//! `drained_version` exact (docs/moves.md).
//!
//! `drained_version = D` promises that no request routed with a map older than `D` is still
//! in flight. A request registers *before* it reads the map, and reads the table and its
//! version while holding its shard's lock; the heartbeat side takes the same locks after the
//! new version was published. Either the heartbeat side sees the registration, or the request
//! reads the map after the lock was released, which is after the new version was published:
//! no request can slip between the two with an older entry unseen. The version a request is
//! tagged with is never newer than the entry it then reads (the map publishes its version
//! after the entry), so the tag errs on the old side, which only delays a move, never lets
//! one through.
//!
//! Cost on the request path: one uncontended lock and unlock of the worker's own shard when a
//! request enters and again when it ends; shards are per thread, so workers never share one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

/// Shards; threads are spread over them round-robin.
const SHARDS: usize = 32;

/// Per-thread shard: the versions its requests were routed with, and how many of each.
#[derive(Debug)]
#[repr(align(128))]
struct Shard {
    /// (version, requests in flight); few entries, usually one.
    entries: Mutex<Vec<(u64, u64)>>,
}

/// The process's in-flight registry.
#[derive(Debug)]
pub struct InFlight {
    shards: Box<[Arc<Shard>]>,
}

impl Default for InFlight {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| {
                    Arc::new(Shard {
                        entries: Mutex::new(Vec::with_capacity(8)),
                    })
                })
                .collect(),
        }
    }
}

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static MY_SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
}

/// A request in flight. Dropping it ends the request.
#[derive(Debug)]
pub struct InFlightGuard {
    shard: Arc<Shard>,
    version: u64,
}

impl InFlightGuard {
    /// The map version the request is counted under.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Another registration at the same version (for work that outlives the response, such
    /// as an upgraded connection's tunnel).
    pub fn duplicate(&self) -> Self {
        add(&self.shard, self.version);
        Self {
            shard: self.shard.clone(),
            version: self.version,
        }
    }
}

fn add(shard: &Shard, version: u64) {
    let mut entries = shard.entries.lock();
    match entries.iter_mut().find(|(v, _)| *v == version) {
        Some((_, n)) => *n += 1,
        None => entries.push((version, 1)),
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut entries = self.shard.entries.lock();
        if let Some(i) = entries.iter().position(|(v, _)| *v == self.version) {
            entries[i].1 -= 1;
            if entries[i].1 == 0 {
                entries.swap_remove(i);
            }
        }
    }
}

impl InFlight {
    /// Registers a request. `read` runs under the shard's lock: it reads the map (the table
    /// and its version) the request will be routed with, and returns the version to count the
    /// request under (`None`: there is no map, nothing to count).
    pub fn enter<T>(&self, read: impl FnOnce() -> (T, Option<u64>)) -> (T, Option<InFlightGuard>) {
        let shard = &self.shards[MY_SHARD.with(|s| *s)];
        let mut entries = shard.entries.lock();
        let (value, version) = read();
        let Some(version) = version else {
            return (value, None);
        };
        match entries.iter_mut().find(|(v, _)| *v == version) {
            Some((_, n)) => *n += 1,
            None => entries.push((version, 1)),
        }
        drop(entries);
        (
            value,
            Some(InFlightGuard {
                shard: shard.clone(),
                version,
            }),
        )
    }

    /// The oldest map version a request in flight was routed with.
    pub fn oldest(&self) -> Option<u64> {
        self.shards
            .iter()
            .filter_map(|s| s.entries.lock().iter().map(|(v, _)| *v).min())
            .min()
    }

    /// Requests in flight.
    pub fn count(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.entries.lock().iter().map(|(_, n)| *n).sum::<u64>())
            .sum()
    }

    /// The drained version to report once `persisted` is on disk (and published): the oldest
    /// version still in flight, or `persisted` when nothing older is. Call it only after the
    /// version was published, so that the locks taken here order it after the publication.
    pub fn drained(&self, persisted: u64) -> u64 {
        self.oldest().map_or(persisted, |v| v.min(persisted))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn drained_is_the_oldest_version_in_flight_or_the_persisted_one() {
        let in_flight = InFlight::default();
        assert_eq!(in_flight.drained(7), 7);
        let (_, a) = in_flight.enter(|| ((), Some(5)));
        let (_, b) = in_flight.enter(|| ((), Some(6)));
        let (_, none) = in_flight.enter(|| ((), None));
        assert!(none.is_none());
        assert_eq!(in_flight.count(), 2);
        assert_eq!(in_flight.drained(7), 5);
        let a2 = a.as_ref().unwrap().duplicate();
        drop(a);
        assert_eq!(
            in_flight.drained(7),
            5,
            "the duplicate still holds version 5"
        );
        drop(a2);
        assert_eq!(in_flight.drained(7), 6);
        // Never more than what is on disk.
        assert_eq!(in_flight.drained(4), 4);
        drop(b);
        assert_eq!(in_flight.drained(7), 7);
        assert_eq!(in_flight.count(), 0);
    }

    /// The race the design exists for: a request that reads the map while a new version is
    /// published must either be seen by the drained computation or have read the new
    /// version. Threads route "requests" against a version that a publisher keeps raising;
    /// after each publication the publisher computes `drained` and checks that every request
    /// that registered with an older version is visible to it.
    #[test]
    fn a_request_never_hides_an_older_version_from_the_drained_computation() {
        let in_flight = Arc::new(InFlight::default());
        let version = Arc::new(AtomicU64::new(1));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let violations = Arc::new(AtomicU64::new(0));
        let workers: Vec<_> = (0..3)
            .map(|_| {
                let in_flight = in_flight.clone();
                let version = version.clone();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut held = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let (seen, guard) = in_flight.enter(|| {
                            let v = version.load(Ordering::Acquire);
                            (v, Some(v))
                        });
                        held.push((seen, guard));
                        if held.len() > 4 {
                            held.remove(0);
                        }
                    }
                })
            })
            .collect();
        for v in 2..20_000u64 {
            version.store(v, Ordering::Release);
            let drained = in_flight.drained(v);
            // Any request registered after this point reads >= v; any registered before is
            // visible, so `drained` is <= the oldest of them. Re-reading now must never find
            // a request older than `drained` that `drained` missed: the registry only shrinks
            // for versions < v from here on.
            if let Some(oldest) = in_flight.oldest() {
                if oldest < drained {
                    violations.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        assert_eq!(violations.load(Ordering::Relaxed), 0);
    }
}
