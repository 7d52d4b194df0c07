//! Origin connections kept per worker thread, one pool for every kind of origin.
//!
//! Every worker runs its own single-threaded runtime, so each keeps its own idle connections in
//! a thread-local list: taking and returning one is a `Vec` pop and push, with no lock and no
//! wake-up of another thread.
//!
//! - HTTP/1.1 (cleartext or TLS): one request at a time. A connection goes back to the list
//!   once its response has been read to the end; one whose response was cut off, that switched
//!   protocols, or that the origin marked for closing is closed instead. Before one is reused,
//!   [`idle_usable`] checks without a system call that the origin has not closed it.
//! - HTTP/2 (h2c or over TLS): one multiplexed connection per endpoint and worker, shared by
//!   every request; its driver runs as a task on the worker.

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::connect::{EndpointKey, OriginIo};
use crate::http::io::{idle_usable, Deadline};

/// An HTTP/1.1 origin connection with the timer its exchanges use (kept with it, so that an
/// exchange sets a deadline without registering a timer).
pub(crate) struct Http1 {
    pub io: OriginIo,
    pub deadline: Deadline,
}

impl Http1 {
    pub(crate) fn new(io: OriginIo) -> Self {
        Self {
            io,
            deadline: Deadline::new(),
        }
    }
}

/// Idle HTTP/1.1 connections kept per endpoint and worker; more are closed.
pub(crate) const MAX_IDLE_PER_ENDPOINT: usize = 512;
/// An idle connection older than this is closed rather than reused (origins commonly close
/// idle connections after 60 s or more; reusing one they are closing costs a new attempt).
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(50);

/// Keys are process-unique counters, not attacker input: a fast hash will do.
type Fast = foldhash::fast::RandomState;

#[derive(Default)]
struct Idle {
    http1: HashMap<EndpointKey, Vec<(Http1, Instant)>, Fast>,
    h2: HashMap<EndpointKey, h2::client::SendRequest<Bytes>, Fast>,
}

thread_local! {
    static IDLE: RefCell<Idle> = RefCell::new(Idle::default());
}

/// The most recently used idle HTTP/1.1 connection to `key` that is still usable.
pub(crate) fn take_http1(key: EndpointKey) -> Option<Http1> {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.http1.get_mut(&key)?;
        let now = Instant::now();
        while let Some((mut conn, since)) = list.pop() {
            if now.duration_since(since) < IDLE_TIMEOUT && idle_usable(&mut conn.io) {
                return Some(conn);
            }
        }
        None
    })
}

/// Keeps an HTTP/1.1 connection whose exchange ended cleanly for the next request.
pub(crate) fn give_back_http1(key: EndpointKey, conn: Http1) {
    let _ = IDLE.try_with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.http1.entry(key).or_default();
        if list.len() < MAX_IDLE_PER_ENDPOINT {
            list.push((conn, Instant::now()));
        }
    });
}

/// This worker's HTTP/2 connection to `key`, if it has one that is still open.
pub(crate) fn h2_sender(key: EndpointKey) -> Option<h2::client::SendRequest<Bytes>> {
    IDLE.with(|idle| idle.borrow().h2.get(&key).cloned())
}

/// Makes `sender` this worker's HTTP/2 connection to `key`.
pub(crate) fn keep_h2(key: EndpointKey, sender: h2::client::SendRequest<Bytes>) {
    let _ = IDLE.try_with(|idle| idle.borrow_mut().h2.insert(key, sender));
}

/// Forgets this worker's HTTP/2 connection to `key` (it failed or was closed).
pub(crate) fn drop_h2(key: EndpointKey) {
    let _ = IDLE.try_with(|idle| idle.borrow_mut().h2.remove(&key));
}
