//! The one failure model of forwarding: which step of an exchange failed, and whether the
//! origin may have seen the request. Those two facts alone decide whether another endpoint of
//! the home region may be tried ([`Failure::may_retry`]) and which refusal the client gets
//! ([`Failure::code`]); no other code looks at an error's kind.

use std::borrow::Cow;

use domicile_certs::client::HandshakeFailure;

use crate::http::BodyError;
use crate::refusal::RefusalCode;
use crate::upstream::connect::ConnectError;

/// The step of an exchange that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// No connection: refused, unreachable, or not within `upstream_connect_timeout`.
    Connect,
    /// The origin did not prove the home region's identity in its certificate.
    TlsIdentity,
    /// The TLS handshake failed otherwise (a certificate refused, an alert).
    Tls,
    /// Writing the request to the origin failed.
    Write,
    /// The connection failed or closed before a whole response head arrived.
    ReadHead,
    /// The response broke the framing rules before anything of it reached the client.
    Framing,
    /// No response head within `upstream_response_timeout`.
    Timeout,
    /// The client's side failed: its body was malformed, too large or stalled, or the client
    /// went away.
    Client(BodyError),
}

/// Why one attempt at an endpoint failed.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub step: Step,
    /// Whether the origin may have seen the request: some of it was written, or an HTTP/2
    /// stream was opened and not refused. When it cannot have, trying another endpoint is safe
    /// for every method.
    pub seen: bool,
    pub detail: Cow<'static, str>,
}

impl Failure {
    pub(crate) fn new(step: Step, seen: bool, detail: impl Into<Cow<'static, str>>) -> Self {
        Self {
            step,
            seen,
            detail: detail.into(),
        }
    }

    pub(crate) fn connect(error: ConnectError) -> Self {
        match error {
            ConnectError::Tcp(e) => Failure::new(Step::Connect, false, e.to_string()),
            ConnectError::Tls(failure) => Failure::tls(failure),
        }
    }

    pub(crate) fn tls(failure: HandshakeFailure) -> Self {
        let step = match failure {
            HandshakeFailure::WrongIdentity { .. } => Step::TlsIdentity,
            _ => Step::Tls,
        };
        Failure::new(step, false, failure.to_string())
    }

    pub(crate) fn client(error: BodyError) -> Self {
        let detail = match error {
            BodyError::Malformed => "the request body was malformed or cut off",
            BodyError::Stalled => "the request body stalled",
            BodyError::Gone => "the client went away before its request body ended",
            BodyError::TooLarge => "the request body is larger than this route allows",
        };
        Failure::new(Step::Client(error), true, detail)
    }

    /// Whether another endpoint of the home region may be tried: always when no origin can
    /// have seen the request; when one may have, only for an idempotent request without a
    /// body (a body streamed once cannot be sent again); never for the client's own failure.
    pub(crate) fn may_retry(&self, idempotent: bool, bodiless: bool) -> bool {
        match self.step {
            Step::Client(_) => false,
            _ if !self.seen => true,
            _ => idempotent && bodiless,
        }
    }

    /// Whether the endpoint is to blame (counted toward its passive ejection).
    pub(crate) fn blames_endpoint(&self) -> bool {
        !matches!(self.step, Step::Client(_))
    }

    /// How telling a failure is when several attempts failed: the refusal names the most
    /// telling one (an origin that answered badly over one that could not be reached).
    pub(crate) fn weight(&self) -> u8 {
        match self.step {
            Step::Connect => 0,
            Step::Tls => 1,
            Step::TlsIdentity => 2,
            _ if !self.seen => 1,
            _ => 3,
        }
    }

    /// The refusal the client gets when this is the failure forwarding ended with.
    pub(crate) fn code(&self) -> RefusalCode {
        match self.step {
            // Nothing was processed anywhere: the region is unavailable to this request.
            Step::Connect => RefusalCode::RegionUnavailable,
            Step::Write | Step::ReadHead | Step::Framing if !self.seen => {
                RefusalCode::RegionUnavailable
            }
            Step::TlsIdentity => RefusalCode::UpstreamWrongRegion,
            Step::Tls => RefusalCode::UpstreamTls,
            Step::Write | Step::ReadHead | Step::Framing => RefusalCode::UpstreamError,
            Step::Timeout => RefusalCode::UpstreamTimeout,
            Step::Client(BodyError::TooLarge) => RefusalCode::BodyTooLarge,
            Step::Client(BodyError::Stalled) => RefusalCode::RequestTimeout,
            Step::Client(BodyError::Malformed | BodyError::Gone) => RefusalCode::BadRequest,
        }
    }

    /// The refusal's message, naming the home region.
    pub(crate) fn message(&self, region: &str) -> String {
        match self.code() {
            RefusalCode::RegionUnavailable => format!(
                "no endpoint of home region {region} could be reached; the request is not sent to any other region"
            ),
            RefusalCode::UpstreamWrongRegion | RefusalCode::UpstreamTls => format!(
                "an origin of home region {region} was refused, nothing was sent to it: {}",
                self.detail
            ),
            RefusalCode::UpstreamError => {
                format!("home region {region} failed to answer: {}", self.detail)
            }
            RefusalCode::UpstreamTimeout => {
                format!("home region {region} did not answer in time")
            }
            _ => self.detail.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_was_not_seen_may_go_elsewhere_for_every_method() {
        let unseen = Failure::new(Step::Connect, false, "refused");
        assert!(unseen.may_retry(false, false));
        let identity = Failure::tls(HandshakeFailure::WrongIdentity {
            expected: "eu.region.test".into(),
            presented: vec!["us.region.test".into()],
        });
        assert_eq!(identity.step, Step::TlsIdentity);
        assert!(identity.may_retry(false, false));
        assert_eq!(identity.code(), RefusalCode::UpstreamWrongRegion);
    }

    #[test]
    fn what_may_have_been_seen_goes_again_only_when_idempotent_and_bodiless() {
        for step in [Step::Write, Step::ReadHead, Step::Framing, Step::Timeout] {
            let seen = Failure::new(step, true, "x");
            assert!(seen.may_retry(true, true), "{step:?}");
            assert!(!seen.may_retry(false, true), "{step:?}");
            assert!(!seen.may_retry(true, false), "{step:?}");
        }
        let client = Failure::client(BodyError::Stalled);
        assert!(!client.may_retry(true, true));
        assert!(!client.blames_endpoint());
        assert_eq!(client.code(), RefusalCode::RequestTimeout);
    }

    #[test]
    fn each_step_has_one_refusal() {
        let code = |step, seen| Failure::new(step, seen, "x").code();
        assert_eq!(code(Step::Connect, false), RefusalCode::RegionUnavailable);
        assert_eq!(code(Step::ReadHead, false), RefusalCode::RegionUnavailable);
        assert_eq!(code(Step::ReadHead, true), RefusalCode::UpstreamError);
        assert_eq!(code(Step::Framing, true), RefusalCode::UpstreamError);
        assert_eq!(code(Step::Write, true), RefusalCode::UpstreamError);
        assert_eq!(code(Step::Timeout, true), RefusalCode::UpstreamTimeout);
        assert_eq!(code(Step::Tls, false), RefusalCode::UpstreamTls);
        assert_eq!(
            code(Step::Client(BodyError::TooLarge), true),
            RefusalCode::BodyTooLarge
        );
        assert_eq!(
            code(Step::Client(BodyError::Malformed), true),
            RefusalCode::BadRequest
        );
    }

    #[test]
    fn the_most_telling_failure_wins() {
        let connect = Failure::new(Step::Connect, false, "x");
        let timeout = Failure::new(Step::Timeout, true, "x");
        assert!(timeout.weight() > connect.weight());
    }
}
