//! Bytes in and out of a connection, the same for clients and origins: the transports (a TCP
//! socket, or a TLS session over one), reads and writes bounded by deadlines, and the
//! per-worker pool of buffers that idle connections give back.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// A connection's byte stream: a TCP socket, or a TLS session over one.
pub(crate) trait Transport: AsyncRead + AsyncWrite + Unpin + Send {
    /// The socket underneath (readiness without reading, half-close).
    fn socket(&self) -> &TcpStream;

    /// Whether input is already held above the socket: a TLS session that has decrypted
    /// data (or the peer's close) the caller has not read. A read then returns at once, and
    /// the socket may never become readable again for it, so waiting on the socket's
    /// readiness would wait for nothing.
    fn holds_input(&self) -> bool {
        false
    }

    /// Whether ending the stream takes a message of its own (a TLS session's
    /// `close_notify`); a TCP socket's close says it all.
    fn ends_in_band(&self) -> bool {
        false
    }
}

impl Transport for TcpStream {
    fn socket(&self) -> &TcpStream {
        self
    }
}

impl Transport for tokio_rustls::server::TlsStream<TcpStream> {
    fn socket(&self) -> &TcpStream {
        self.get_ref().0
    }

    fn ends_in_band(&self) -> bool {
        true
    }

    fn holds_input(&self) -> bool {
        // After the handshake a session wants no more from the socket only while it holds
        // plaintext or has the peer's close_notify.
        !self.get_ref().1.wants_read()
    }
}

impl Transport for tokio_rustls::client::TlsStream<TcpStream> {
    fn socket(&self) -> &TcpStream {
        self.get_ref().0
    }

    fn ends_in_band(&self) -> bool {
        true
    }

    fn holds_input(&self) -> bool {
        !self.get_ref().1.wants_read()
    }
}

impl<T: Transport + ?Sized> Transport for Box<T> {
    fn socket(&self) -> &TcpStream {
        (**self).socket()
    }

    fn holds_input(&self) -> bool {
        (**self).holds_input()
    }

    fn ends_in_band(&self) -> bool {
        (**self).ends_in_band()
    }
}

/// A deadline for one kind of wait on a connection, kept as one timer that is re-armed only
/// when it fires before the current deadline. Moving the deadline later (every request does)
/// then costs nothing: no timer-wheel work per request.
pub(crate) struct Deadline {
    sleep: Pin<Box<Sleep>>,
    at: Instant,
}

impl Default for Deadline {
    fn default() -> Self {
        Self::new()
    }
}

impl Deadline {
    pub(crate) fn new() -> Self {
        let at = Instant::now() + Duration::from_secs(86_400);
        Self {
            sleep: Box::pin(tokio::time::sleep_until(at)),
            at,
        }
    }

    pub(crate) fn set(&mut self, at: Instant) {
        self.at = at;
        if at < self.sleep.deadline() {
            self.sleep.as_mut().reset(at);
        }
    }

    /// Sets the deadline `after` from now.
    pub(crate) fn after(&mut self, after: Duration) {
        self.set(Instant::now() + after);
    }

    /// Runs `work` until it finishes (`Some`) or the deadline passes (`None`).
    pub(crate) fn run<F: Future>(&mut self, work: F) -> Run<'_, F> {
        Run {
            deadline: self,
            within: None,
            work,
        }
    }

    /// Runs `work`, giving it `within` from the moment it first has to wait: a wait that
    /// never blocks (the common case for a write, or a read whose bytes are here) reads no
    /// clock and moves no timer.
    pub(crate) fn within<F: Future>(&mut self, within: Duration, work: F) -> Run<'_, F> {
        Run {
            deadline: self,
            within: Some(within),
            work,
        }
    }

    /// Ready once the deadline has passed.
    pub(crate) fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        while self.sleep.as_mut().poll(cx).is_ready() {
            if Instant::now() >= self.at {
                return Poll::Ready(());
            }
            let at = self.at;
            self.sleep.as_mut().reset(at);
        }
        Poll::Pending
    }
}

pin_project_lite::pin_project! {
    /// `work` bounded by a [`Deadline`] ([`Deadline::run`], [`Deadline::within`]). A named
    /// future rather than an `async fn`, which would keep `work` twice in its state: every
    /// connection's future carries one of these while it waits.
    pub(crate) struct Run<'a, F> {
        deadline: &'a mut Deadline,
        // `Some`: arm the deadline this far ahead the first time `work` has to wait.
        within: Option<Duration>,
        #[pin]
        work: F,
    }
}

impl<F: Future> Future for Run<'_, F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(output) = this.work.poll(cx) {
            return Poll::Ready(Some(output));
        }
        if let Some(within) = this.within.take() {
            this.deadline.after(within);
        }
        this.deadline.poll_expired(cx).map(|()| None)
    }
}

/// Resolves once `shutdown` turns true (or its sender is gone).
pub(crate) async fn stopped(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// The error a wait that ran past its deadline ends with.
pub(crate) fn timed_out(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what)
}

/// Reads what has arrived into `buf`'s spare room (grown to at least `READ_RESERVE` free
/// bytes): `Ok(0)` at end of stream, `TimedOut` when the deadline passed first.
pub(crate) async fn read_some<T: Transport>(
    io: &mut T,
    buf: &mut Vec<u8>,
    deadline: &mut Deadline,
) -> io::Result<usize> {
    reserve(buf);
    match deadline.run(io.read_buf(buf)).await {
        Some(read) => read,
        None => Err(timed_out("no bytes arrived in time")),
    }
}

/// As [`read_some`], failing when no byte arrives for `stall` (from when the read has to
/// wait).
pub(crate) async fn read_stalling<T: Transport>(
    io: &mut T,
    buf: &mut Vec<u8>,
    deadline: &mut Deadline,
    stall: Duration,
) -> io::Result<usize> {
    reserve(buf);
    match deadline.within(stall, io.read_buf(buf)).await {
        Some(read) => read,
        None => Err(timed_out("no bytes arrived in time")),
    }
}

fn reserve(buf: &mut Vec<u8>) {
    if buf.capacity() - buf.len() < READ_RESERVE / 4 {
        buf.reserve(READ_RESERVE);
    }
}

/// Writes every byte of `parts`, in one system call when the transport takes them at once,
/// failing when no byte moves for `stall`.
pub(crate) async fn write_all<T: Transport>(
    io: &mut T,
    parts: &mut [&[u8]],
    deadline: &mut Deadline,
    stall: Duration,
) -> io::Result<()> {
    let mut first = 0;
    loop {
        while first < parts.len() && parts[first].is_empty() {
            first += 1;
        }
        if first == parts.len() {
            return Ok(());
        }
        let live = &parts[first..];
        let written = {
            let write = poll_fn(|cx| {
                if live.len() == 1 {
                    return Pin::new(&mut *io).poll_write(cx, live[0]);
                }
                let slices: [IoSlice<'_>; 4] = [
                    IoSlice::new(live.first().copied().unwrap_or_default()),
                    IoSlice::new(live.get(1).copied().unwrap_or_default()),
                    IoSlice::new(live.get(2).copied().unwrap_or_default()),
                    IoSlice::new(live.get(3).copied().unwrap_or_default()),
                ];
                Pin::new(&mut *io).poll_write_vectored(cx, &slices[..live.len().min(4)])
            });
            match deadline.within(stall, write).await {
                Some(written) => written?,
                None => return Err(timed_out("the peer stopped reading")),
            }
        };
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let mut left = written;
        while left > 0 {
            let part = &mut parts[first];
            let n = part.len().min(left);
            *part = &part[n..];
            left -= n;
            if part.is_empty() {
                first += 1;
            }
        }
    }
}

/// One read attempt that does not wait: what has arrived goes into `buf`'s spare room
/// (`Pending`: nothing has). The caller waits for readiness itself.
pub(crate) fn read_now<T: Transport>(io: &mut T, buf: &mut Vec<u8>) -> Poll<io::Result<usize>> {
    reserve(buf);
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let read = io.read_buf(buf);
    let mut read = pin!(read);
    read.as_mut().poll(&mut cx)
}

/// Pushes what a TLS session still holds onto the socket (nothing to do for a plain socket).
pub(crate) async fn flush<T: Transport>(
    io: &mut T,
    deadline: &mut Deadline,
    stall: Duration,
) -> io::Result<()> {
    match deadline
        .within(stall, poll_fn(|cx| Pin::new(&mut *io).poll_flush(cx)))
        .await
    {
        Some(flushed) => flushed,
        None => Err(timed_out("the peer stopped reading")),
    }
}

/// Whether an idle connection is still usable: nothing has arrived on it and it has not
/// ended. An idle origin connection only becomes readable when the origin closes it, so this
/// costs no system call unless the socket has signalled something; TLS records that carry no
/// data (session tickets) are taken in passing.
pub(crate) fn idle_usable<T: Transport>(io: &mut T) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    if !io.holds_input() && io.socket().poll_read_ready(&mut cx).is_pending() {
        return true;
    }
    let mut probe = [0u8; 1];
    let mut buf = ReadBuf::new(&mut probe);
    Pin::new(io).poll_read(&mut cx, &mut buf).is_pending()
}

/// Read buffers grow by at least this much when nearly full.
pub(crate) const READ_RESERVE: usize = 16 * 1024;
/// Bodies are relayed in reads of up to this many bytes.
pub(crate) const BODY_CHUNK: usize = 64 * 1024;
/// Buffers of idle connections, kept per worker for the next busy one.
const POOLED_BUFFERS: usize = 256;
/// Buffers larger than this (grown by a large head) are freed rather than kept.
const MAX_POOLED_BUFFER: usize = 2 * BODY_CHUNK + READ_RESERVE;

thread_local! {
    static BUFFERS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer from this worker's pool (or a new one).
pub(crate) fn take_buffer() -> Vec<u8> {
    BUFFERS
        .try_with(|buffers| buffers.borrow_mut().pop())
        .ok()
        .flatten()
        .unwrap_or_else(|| Vec::with_capacity(READ_RESERVE))
}

/// Gives `buf` back to the worker (or frees it); `buf` is left empty, without capacity.
pub(crate) fn release(buf: &mut Vec<u8>) {
    if buf.capacity() == 0 {
        return;
    }
    let mut buf = std::mem::take(buf);
    if buf.capacity() <= MAX_POOLED_BUFFER {
        buf.clear();
        let _ = BUFFERS.try_with(|buffers| {
            let mut buffers = buffers.borrow_mut();
            if buffers.len() < POOLED_BUFFERS {
                buffers.push(buf);
            }
        });
    }
}

/// A buffer that goes back to the worker's pool when dropped.
pub(crate) struct PooledBuf(pub Vec<u8>);

impl PooledBuf {
    pub(crate) fn empty() -> Self {
        Self(Vec::new())
    }

    /// Makes sure the buffer holds room from the pool.
    pub(crate) fn ensure(&mut self) -> &mut Vec<u8> {
        if self.0.capacity() == 0 {
            self.0 = take_buffer();
        }
        &mut self.0
    }

    pub(crate) fn release(&mut self) {
        release(&mut self.0);
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        release(&mut self.0);
    }
}
