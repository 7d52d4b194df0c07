//! Active health checks: `GET <path>` on every endpoint, every `interval`, through the same
//! connector as client traffic (TCP, TLS with the route's ALPN and the region's identity) and
//! read by the same response rules, with `Host` the endpoint's authority (what client traffic
//! falls back to) and `user-agent: domicile-health-check`. A passing check (2xx or 3xx) means
//! client traffic can use the endpoint.
//!
//! An endpoint starts unchecked and is not used until its first check passes; an endpoint
//! that does not prove the region's identity fails every check, so it is never counted
//! healthy. Each check makes a new connection, so the handshake (and the identity in it) is
//! verified every time.

use domicile_certs::client::HandshakeFailure;
use std::io;
use std::sync::Arc;

use super::connect::ConnectError;
use super::h1::{self as origin_h1, Parsed};
use super::{Endpoint, Health, RegionPool};
use crate::config::UpstreamProtocol;
use crate::http::io::{self as conn_io, Deadline};

/// Why a check failed.
#[derive(Debug)]
pub(crate) enum CheckFailure {
    Connect(io::Error),
    Tls(HandshakeFailure),
    /// The endpoint answered, but badly: a status outside 2xx and 3xx, a response that broke
    /// the rules, no answer in time.
    Answer(String),
}

impl std::fmt::Display for CheckFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckFailure::Connect(e) => write!(f, "connect: {e}"),
            CheckFailure::Tls(e) => write!(f, "{e}"),
            CheckFailure::Answer(detail) => f.write_str(detail),
        }
    }
}

impl From<ConnectError> for CheckFailure {
    fn from(error: ConnectError) -> Self {
        match error {
            ConnectError::Tcp(e) => CheckFailure::Connect(e),
            ConnectError::Tls(e) => CheckFailure::Tls(e),
        }
    }
}

/// Starts one checker task per endpoint of `pool`, for as long as the pool lives.
pub(crate) fn spawn(pool: &Arc<RegionPool>) {
    if !pool.health.enabled {
        return;
    }
    for endpoint in &pool.endpoints {
        let weak = Arc::downgrade(pool);
        let endpoint = endpoint.clone();
        let health = pool.health.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(health.interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let (mut passes, mut fails) = (0u32, 0u32);
            loop {
                ticker.tick().await;
                let Some(pool) = weak.upgrade() else { return };
                let checked = tokio::time::timeout(health.timeout, check(&pool, &endpoint)).await;
                let result = match checked {
                    Ok(result) => result,
                    Err(_) => Err(CheckFailure::Answer(format!(
                        "no answer within {:?}",
                        health.timeout
                    ))),
                };
                match result {
                    Ok(()) => {
                        passes += 1;
                        fails = 0;
                        let now_healthy = match endpoint.health() {
                            Health::Unchecked => true,
                            Health::Unhealthy => passes >= health.healthy_threshold,
                            Health::Healthy => false,
                        };
                        if now_healthy {
                            endpoint.set_health(Health::Healthy);
                            tracing::info!(region = %pool.region_id, endpoint = %endpoint.authority(), "endpoint healthy");
                        }
                    }
                    Err(failure) => {
                        if let CheckFailure::Tls(tls) = &failure {
                            let wrong = matches!(tls, HandshakeFailure::WrongIdentity { .. });
                            pool.count_tls_failure(&endpoint, wrong, &tls.to_string());
                        }
                        fails += 1;
                        passes = 0;
                        let now_unhealthy = match endpoint.health() {
                            Health::Unchecked => true,
                            Health::Healthy => {
                                fails >= health.unhealthy_threshold
                                    || matches!(
                                        failure,
                                        CheckFailure::Tls(HandshakeFailure::WrongIdentity { .. })
                                    )
                            }
                            Health::Unhealthy => false,
                        };
                        if now_unhealthy {
                            endpoint.set_health(Health::Unhealthy);
                            tracing::warn!(region = %pool.region_id, endpoint = %endpoint.authority(), "endpoint unhealthy: {failure}");
                        } else {
                            tracing::debug!(region = %pool.region_id, endpoint = %endpoint.authority(), "health check failed: {failure}");
                        }
                    }
                }
            }
        });
    }
}

/// One check of `endpoint`.
pub(crate) async fn check(pool: &RegionPool, endpoint: &Endpoint) -> Result<(), CheckFailure> {
    let status = match pool.protocol {
        UpstreamProtocol::Http1 => check_h1(pool, endpoint).await?,
        UpstreamProtocol::H2c => check_h2(pool, endpoint).await?,
    };
    if (200..400).contains(&status) {
        Ok(())
    } else {
        Err(CheckFailure::Answer(format!("answered {status}")))
    }
}

async fn check_h1(pool: &RegionPool, endpoint: &Endpoint) -> Result<u16, CheckFailure> {
    let mut io = endpoint.target.connect().await?;
    let mut request = Vec::with_capacity(128);
    request.extend_from_slice(b"GET ");
    request.extend_from_slice(pool.health.path.as_bytes());
    request.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    request.extend_from_slice(endpoint.authority().as_bytes());
    request
        .extend_from_slice(b"\r\nuser-agent: domicile-health-check\r\nconnection: close\r\n\r\n");
    let stall = pool.health.timeout;
    let mut deadline = Deadline::new();
    let broken = |e: io::Error| CheckFailure::Answer(format!("the exchange failed: {e}"));
    conn_io::write_all(&mut io, &mut [&request], &mut deadline, stall)
        .await
        .map_err(broken)?;
    conn_io::flush(&mut io, &mut deadline, stall)
        .await
        .map_err(broken)?;
    let mut buf = Vec::with_capacity(4096);
    deadline.after(stall);
    loop {
        if !buf.is_empty() {
            let mut fields = [httparse::EMPTY_HEADER; origin_h1::MAX_FIELDS];
            match origin_h1::parse_response(&buf, &mut fields, false, false) {
                Ok(Parsed::Final(head)) => return Ok(head.status),
                Ok(Parsed::Partial) => {}
                Err(detail) => return Err(CheckFailure::Answer(detail)),
            }
        }
        match conn_io::read_some(&mut io, &mut buf, &mut deadline).await {
            Ok(0) => {
                return Err(CheckFailure::Answer(
                    "the connection closed before the response head".into(),
                ))
            }
            Ok(_) => {}
            Err(e) => return Err(broken(e)),
        }
    }
}

async fn check_h2(pool: &RegionPool, endpoint: &Endpoint) -> Result<u16, CheckFailure> {
    let sender = super::h2::connect(&endpoint.target).await?;
    let answer = |e: h2::Error| CheckFailure::Answer(format!("the exchange failed: {e}"));
    let mut sender = sender.ready().await.map_err(answer)?;
    let scheme = if pool.tls.is_some() { "https" } else { "http" };
    let uri = format!("{scheme}://{}{}", endpoint.authority(), pool.health.path);
    let request = http::Request::get(uri)
        .header(http::header::USER_AGENT, "domicile-health-check")
        .body(())
        .map_err(|e| CheckFailure::Answer(e.to_string()))?;
    let (response, _) = sender.send_request(request, true).map_err(answer)?;
    let response = response.await.map_err(answer)?;
    Ok(response.status().as_u16())
}
