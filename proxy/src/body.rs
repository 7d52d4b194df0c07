//! Streaming bodies with limits: a byte cap and a stall (idle) timeout.
//!
//! Bodies are never buffered: frames pass through one at a time, so memory stays flat however
//! large the body. The stall timer is re-armed lazily (only when it fires early) so a busy stream
//! does not touch the timer wheel per frame.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::audit::Entry;
use crate::inflight::InFlightGuard;
use crate::refusal::BoxError;

/// Why a body stopped early, and how many bytes it carried, shared with whoever must answer
/// for it (the pipeline's error mapping, the audit record).
#[derive(Debug, Default)]
pub struct BodyFate(AtomicU8, AtomicU64);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Running,
    TooLarge,
    Stalled,
    /// The body's source failed (for a request: the client sent a malformed body or vanished).
    Broken,
    /// Every byte went through.
    Done,
}

impl BodyFate {
    pub fn get(&self) -> Fate {
        match self.0.load(Ordering::Relaxed) {
            1 => Fate::TooLarge,
            2 => Fate::Stalled,
            3 => Fate::Broken,
            4 => Fate::Done,
            _ => Fate::Running,
        }
    }

    /// Body bytes that went through so far.
    pub fn bytes(&self) -> u64 {
        self.1.load(Ordering::Relaxed)
    }

    fn set(&self, fate: Fate) {
        let v = match fate {
            Fate::Running => 0,
            Fate::TooLarge => 1,
            Fate::Stalled => 2,
            Fate::Broken => 3,
            Fate::Done => 4,
        };
        self.0.store(v, Ordering::Relaxed);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("body larger than the limit of {0} bytes")]
    TooLarge(u64),
    #[error("body stalled: no data for {0:?}")]
    Stalled(Duration),
}

pin_project! {
    /// A body passed through with a byte limit and a stall timeout.
    pub struct Guarded<B> {
        #[pin]
        inner: B,
        limit: u64,
        seen: u64,
        idle: Duration,
        last_progress: Instant,
        #[pin]
        timer: Sleep,
        fate: Option<Arc<BodyFate>>,
        drop_trailers: bool,
        // The request this body answers, in flight until the body ends or is dropped.
        in_flight: Option<InFlightGuard>,
        // The request's audit record, queued when the body ends (complete) or is dropped
        // (cut off).
        audit: Option<Entry>,
    }
}

impl<B> Guarded<B> {
    /// `limit` in bytes (`u64::MAX` for none); `fate` records why the body failed, if it does.
    pub fn new(inner: B, limit: u64, idle: Duration, fate: Option<Arc<BodyFate>>) -> Self {
        let now = Instant::now();
        Self {
            inner,
            limit,
            seen: 0,
            idle,
            last_progress: now,
            timer: tokio::time::sleep_until(now + idle),
            fate,
            drop_trailers: false,
            in_flight: None,
            audit: None,
        }
    }

    /// Counts the body's bytes into `entry` and queues it when the body ends: complete when the
    /// last frame is handed on (before the client can have it), cut off when dropped earlier.
    pub fn recording(mut self, entry: Option<Entry>) -> Self
    where
        B: Body,
    {
        match entry {
            // No body at all (HEAD, 204, 304): the response is whole once its head goes.
            Some(entry) if self.inner.is_end_stream() => entry.complete(),
            entry => self.audit = entry,
        }
        self
    }

    /// Holds a request's in-flight registration until the body ends (or is dropped).
    pub fn holding(mut self, in_flight: Option<InFlightGuard>) -> Self {
        self.in_flight = in_flight;
        self
    }

    /// Drops trailer frames: a client's trailers could carry `x-domicile-*` or hop-by-hop
    /// fields past the header rules, so request trailers are not forwarded.
    pub fn without_trailers(mut self) -> Self {
        self.drop_trailers = true;
        self
    }
}

impl<B> Body for Guarded<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) if *this.drop_trailers && frame.is_trailers() => {
                // Trailers end the body; nothing follows them.
                if let Some(fate) = this.fate {
                    fate.set(Fate::Done);
                }
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    *this.seen += data.len() as u64;
                    if *this.seen > *this.limit {
                        if let Some(fate) = this.fate {
                            fate.set(Fate::TooLarge);
                        }
                        return Poll::Ready(Some(Err(BodyError::TooLarge(*this.limit).into())));
                    }
                    if let Some(fate) = this.fate {
                        fate.1.store(*this.seen, Ordering::Relaxed);
                    }
                    if let Some(entry) = this.audit.as_mut() {
                        entry.add_bytes_out(data.len() as u64);
                    }
                }
                *this.last_progress = Instant::now();
                // A body of known length can end with its last data frame, without a final
                // poll: its record goes now, before the frame is written.
                if this.inner.is_end_stream() {
                    if let Some(entry) = this.audit.take() {
                        entry.complete();
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(fate) = this.fate {
                    fate.set(Fate::Broken);
                }
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                if let Some(fate) = this.fate {
                    fate.set(Fate::Done);
                }
                if let Some(entry) = this.audit.take() {
                    entry.complete();
                }
                this.in_flight.take();
                Poll::Ready(None)
            }
            Poll::Pending => loop {
                ready!(this.timer.as_mut().poll(cx));
                let deadline = *this.last_progress + *this.idle;
                if deadline > Instant::now() {
                    this.timer.as_mut().reset(deadline);
                    continue;
                }
                if let Some(fate) = this.fate {
                    fate.set(Fate::Stalled);
                }
                return Poll::Ready(Some(Err(BodyError::Stalled(*this.idle).into())));
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn chunks(n: usize, size: usize) -> impl Body<Data = Bytes, Error = BoxError> {
        let frames =
            (0..n).map(move |_| Ok::<_, BoxError>(Frame::data(Bytes::from(vec![0u8; size]))));
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn passes_bodies_within_the_limit() {
        let body = Guarded::new(chunks(4, 1000), 4000, Duration::from_secs(5), None);
        assert_eq!(body.collect().await.unwrap().to_bytes().len(), 4000);
    }

    #[tokio::test]
    async fn stops_at_the_limit_and_says_why() {
        let fate = Arc::new(BodyFate::default());
        let body = Guarded::new(
            chunks(5, 1000),
            4000,
            Duration::from_secs(5),
            Some(fate.clone()),
        );
        assert!(body.collect().await.is_err());
        assert_eq!(fate.get(), Fate::TooLarge);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_times_out() {
        let fate = Arc::new(BodyFate::default());
        use futures_util::StreamExt;
        let first =
            futures_util::stream::iter([Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"x")))]);
        let stream = first.chain(futures_util::stream::pending());
        let body = Guarded::new(
            StreamBody::new(stream),
            u64::MAX,
            Duration::from_secs(3),
            Some(fate.clone()),
        );
        let err = body.collect().await.unwrap_err();
        assert!(err.to_string().contains("stalled"), "{err}");
        assert_eq!(fate.get(), Fate::Stalled);
    }
}
