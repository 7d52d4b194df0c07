//! The retry driver: which endpoint of the home region an exchange tries next, and when it
//! stops. Endpoints are picked round robin among the healthy and not ejected ones of the pool
//! `decide` chose, each at most once per request; there is no way from here to another
//! region's pool. After a failure ([`Failure::may_retry`]):
//! - a request no origin can have seen (no connection, a TLS handshake refused) goes to the
//!   next endpoint, whatever its method;
//! - one an origin may have seen goes again only when it is idempotent and has no body, and
//!   at most `limits.retries` times;
//! - once any response byte went to the client, nothing is tried again.

use std::time::Instant;

use super::failure::{Failure, Step};
use super::headers::Forwarding;
use super::Engine;
use crate::audit::Entry;
use crate::http::io::PooledBuf;
use crate::http::{ClientSide, RequestHead, RequestId, Served};
use crate::refusal::Refusal;
use crate::upstream::RegionPool;

/// How an attempt at one endpoint ended.
pub(crate) enum Attempt {
    /// The response (or its start) went to the client: the exchange is over.
    Done(Served),
    /// Nothing went to the client.
    Failed(Failure),
}

/// One request being forwarded to its home region.
pub(crate) struct Exchange<'a, C> {
    pub engine: &'a Engine,
    pub head: &'a RequestHead<'a>,
    pub client: &'a mut C,
    pub pool: &'a RegionPool,
    pub forwarding: &'a Forwarding<'a>,
    pub request_id: &'a RequestId,
    pub started: Instant,
    /// The request's record: queued just before the response's last bytes go to the client,
    /// or when the exchange is dropped (then as cut off).
    pub audit: Option<Entry>,
    /// Request body bytes read from the client so far (once any is, the request cannot be
    /// sent again).
    pub body_read: u64,
    /// The request head for HTTP/1.1 origins, written once for every attempt.
    pub h1_head: PooledBuf,
    /// The endpoint (index in the pool) of the current attempt.
    pub endpoint: usize,
}

impl<'a, C: ClientSide> Exchange<'a, C> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        engine: &'a Engine,
        head: &'a RequestHead<'a>,
        client: &'a mut C,
        pool: &'a RegionPool,
        forwarding: &'a Forwarding<'a>,
        request_id: &'a RequestId,
        started: Instant,
        audit: Option<Entry>,
    ) -> Self {
        Self {
            engine,
            head,
            client,
            pool,
            forwarding,
            request_id,
            started,
            audit,
            body_read: 0,
            h1_head: PooledBuf::empty(),
            endpoint: 0,
        }
    }

    /// Tries the home region's endpoints until one answers, or refuses.
    pub(crate) async fn forward(mut self) -> Served {
        let limits = &self.engine.config.limits;
        let idempotent = self.head.is_idempotent();
        let bodiless = self.head.body.is_none();
        let mut tried: u64 = 0;
        let mut retries_left = limits.retries;
        // The most telling failure so far, and the last endpoint that may have seen the
        // request (where the record says it went).
        let mut worst: Option<Failure> = None;
        let mut seen_at: Option<usize> = None;
        loop {
            let Some((index, endpoint)) = self.pool.pick(tried) else {
                return self.refuse(worst, seen_at).await;
            };
            tried |= 1u64.checked_shl(index as u32).unwrap_or(0);
            self.endpoint = index;
            // Into the forward journal before any byte leaves: a crash from here on must not
            // take the decision's record along.
            if let Some(entry) = self.audit.as_mut() {
                entry.sending(&self.pool.region_id, endpoint.authority());
            }
            let failure = match self.attempt(endpoint).await {
                Attempt::Done(served) => {
                    self.pool.record_success(endpoint);
                    return served;
                }
                Attempt::Failed(failure) => failure,
            };
            if failure.blames_endpoint() {
                self.pool.record_failure(endpoint);
            }
            if matches!(failure.step, Step::TlsIdentity | Step::Tls) {
                self.pool.count_tls_failure(
                    endpoint,
                    failure.step == Step::TlsIdentity,
                    &failure.detail,
                );
            }
            tracing::debug!(
                region = %self.pool.region_id,
                endpoint = %endpoint.target.authority,
                step = ?failure.step,
                seen = failure.seen,
                detail = %failure.detail,
                "upstream attempt failed"
            );
            if failure.seen {
                seen_at = Some(index);
            }
            let retry = failure.may_retry(idempotent, bodiless)
                && self.body_read == 0
                && (!failure.seen || retries_left > 0);
            if failure.seen && retry {
                retries_left -= 1;
            }
            if worst
                .as_ref()
                .is_none_or(|w| failure.weight() >= w.weight())
            {
                worst = Some(failure);
            }
            if !retry {
                return self.refuse(worst, seen_at).await;
            }
            self.engine
                .metrics
                .upstream_retries
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Answers a request no endpoint served: `failure` is the most telling failure, `None`
    /// when the pool had no endpoint to try.
    async fn refuse(mut self, failure: Option<Failure>, seen_at: Option<usize>) -> Served {
        let region = self.pool.region_id.clone();
        let (code, message) = match &failure {
            Some(failure) => (failure.code(), failure.message(&region)),
            None => {
                let failure = Failure::new(Step::Connect, false, "");
                (failure.code(), failure.message(&region))
            }
        };
        if let (Some(entry), Some(index)) = (self.audit.as_mut(), seen_at) {
            entry.upstream(self.pool.region, index);
        }
        let refusal = Refusal::new(code).message(message);
        let workspace = self.forwarding.forward.workspace;
        let ws = workspace.as_ref().map(|w| w.as_str());
        let audit = self.audit.take();
        self.engine
            .refuse(
                self.client,
                refusal,
                ws,
                Some(self.pool.region),
                self.request_id,
                self.started,
                audit,
            )
            .await
    }
}
