//! Header rules between client and origin.
//!
//! Towards the origin: hop-by-hop headers (and every header named in `Connection`) are removed,
//! every client-sent `x-domicile-*` header is removed, `x-request-id` is kept or set,
//! `Forwarded` / `X-Forwarded-For` are appended to (incoming values are kept only from trusted
//! peers), and the `x-domicile-workspace/region/epoch/map-version` headers are set.
//! Towards the client: hop-by-hop headers of the origin's response are removed.

use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;

use crate::identify::Headers;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_DOMICILE_WORKSPACE: HeaderName = HeaderName::from_static("x-domicile-workspace");
pub static X_DOMICILE_REGION: HeaderName = HeaderName::from_static("x-domicile-region");
pub static X_DOMICILE_EPOCH: HeaderName = HeaderName::from_static("x-domicile-epoch");
pub static X_DOMICILE_MAP_VERSION: HeaderName = HeaderName::from_static("x-domicile-map-version");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Hop-by-hop headers of RFC 9110 section 7.6.1 (plus the legacy `proxy-connection`).
fn hop_by_hop() -> [&'static HeaderName; 8] {
    [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::PROXY_AUTHENTICATE,
        &header::PROXY_AUTHORIZATION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
    ]
}

/// Whether the request asks for a protocol upgrade (`Connection: upgrade` + `Upgrade`).
pub fn is_upgrade_request(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_has(headers, "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// Removes hop-by-hop headers; keeps `Upgrade` (and `Connection: upgrade`) when `upgrade`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Most messages carry none: one pass over the names present is cheaper than looking each
    // hop-by-hop name up (a hash and a probe apiece).
    let hop = hop_by_hop();
    let any = headers
        .keys()
        .any(|name| name == header::UPGRADE || hop.contains(&name));
    if !any && !upgrade {
        return;
    }
    // Headers named in Connection are hop-by-hop too (RFC 9110 7.6.1).
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok())
            .filter(|n| !(upgrade && n == header::UPGRADE))
            .collect();
        for name in named {
            headers.remove(&name);
        }
    }
    let keep_te_trailers = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for name in hop_by_hop() {
        headers.remove(name);
    }
    if keep_te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Removes every `x-domicile-*` header: only this proxy may set them.
pub fn strip_domicile(headers: &mut HeaderMap) {
    let has_any = headers
        .keys()
        .any(|k| k.as_str().starts_with("x-domicile-"));
    if has_any {
        let names: Vec<HeaderName> = headers
            .keys()
            .filter(|k| k.as_str().starts_with("x-domicile-"))
            .cloned()
            .collect();
        for name in names {
            headers.remove(name);
        }
    }
}

/// Whether `peer` is one of the trusted proxies.
pub fn is_trusted(peer: IpAddr, trusted: &[IpNet]) -> bool {
    trusted.iter().any(|net| net.contains(&peer))
}

/// The client's address: the peer, or, when the peer is trusted, the right-most address in
/// `X-Forwarded-For` that is not itself a trusted proxy.
pub fn client_ip(peer: IpAddr, headers: Headers<'_>, trusted: &[IpNet]) -> IpAddr {
    if !is_trusted(peer, trusted) {
        return peer;
    }
    let mut client = peer;
    let values: Vec<&[u8]> = headers.values(&X_FORWARDED_FOR).collect();
    for value in values.iter().rev() {
        let Ok(text) = std::str::from_utf8(value) else {
            return client;
        };
        for hop in text.rsplit(',') {
            match hop.trim().parse::<IpAddr>() {
                Ok(ip) => {
                    client = ip;
                    if !is_trusted(ip, trusted) {
                        return ip;
                    }
                }
                Err(_) => return client,
            }
        }
    }
    client
}

/// What the proxy knows of a connection's peer, worked out once per connection so requests do
/// not format the same address again.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// Whether the peer is one of `trusted_proxies`.
    pub trusted: bool,
    /// `X-Forwarded-For` for an untrusted peer: its address alone.
    xff: HeaderValue,
    /// `http`, or `https` for a client connected over TLS.
    proto: HeaderValue,
    /// `for=<node>;proto=http` (or `https`)
    forwarded: String,
    forwarded_value: HeaderValue,
}

impl Peer {
    pub fn new(addr: SocketAddr, trusted: &[IpNet]) -> Self {
        Self::with_scheme(addr, trusted, false)
    }

    /// A peer connected over TLS (`tls`) or in cleartext.
    pub fn with_scheme(addr: SocketAddr, trusted: &[IpNet], tls: bool) -> Self {
        let ip = addr.ip();
        let scheme = if tls { "https" } else { "http" };
        let forwarded = match ip {
            IpAddr::V4(v4) => format!("for={v4};proto={scheme}"),
            IpAddr::V6(v6) => format!("for=\"[{v6}]\";proto={scheme}"),
        };
        let text = ip.to_string();
        Self {
            addr,
            trusted: is_trusted(ip, trusted),
            xff: HeaderValue::from_str(&text)
                .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
            proto: HeaderValue::from_static(scheme),
            forwarded_value: HeaderValue::from_str(&forwarded)
                .unwrap_or_else(|_| HeaderValue::from_static("for=unknown")),
            forwarded,
        }
    }
}

impl Peer {
    /// This peer's `Forwarded` element without the host: `for=<node>;proto=http`.
    pub fn forwarded_element(&self) -> &str {
        &self.forwarded
    }

    /// This peer's address as an `X-Forwarded-For` item.
    pub fn xff_value(&self) -> &[u8] {
        self.xff.as_bytes()
    }
}

/// Sets `Forwarded`, `X-Forwarded-For` and `X-Forwarded-Proto` for a request from `peer`.
/// Incoming values are kept (and appended to) only when the peer is trusted.
pub fn set_forwarded(headers: &mut HeaderMap, peer: &Peer, host: Option<&str>) {
    let host = host.filter(|h| {
        h.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    });
    let forwarded = match host {
        Some(host) => {
            let mut text = String::with_capacity(peer.forwarded.len() + host.len() + 8);
            text.push_str(&peer.forwarded);
            text.push_str(";host=\"");
            text.push_str(host);
            text.push('"');
            HeaderValue::from_maybe_shared(bytes::Bytes::from(text))
                .unwrap_or_else(|_| peer.forwarded_value.clone())
        }
        None => peer.forwarded_value.clone(),
    };
    if peer.trusted {
        if let Ok(item) = forwarded.to_str() {
            append_list(headers, header::FORWARDED, item);
        }
        if let Ok(item) = peer.xff.to_str() {
            append_list(headers, X_FORWARDED_FOR.clone(), item);
        }
        if !headers.contains_key(&X_FORWARDED_PROTO) {
            headers.insert(X_FORWARDED_PROTO.clone(), peer.proto.clone());
        }
    } else {
        // Other forwarding headers an untrusted client could use to steer a framework that
        // trusts this proxy.
        let steering = [&X_FORWARDED_HOST, &X_FORWARDED_PORT, &X_REAL_IP];
        if headers.keys().any(|name| steering.contains(&name)) {
            for name in steering {
                headers.remove(name);
            }
        }
        headers.insert(header::FORWARDED, forwarded);
        headers.insert(X_FORWARDED_FOR.clone(), peer.xff.clone());
        headers.insert(X_FORWARDED_PROTO.clone(), peer.proto.clone());
    }
}

fn append_list(headers: &mut HeaderMap, name: HeaderName, item: &str) {
    let combined = {
        let existing: Vec<&str> = headers
            .get_all(&name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if existing.is_empty() {
            item.to_owned()
        } else {
            format!("{}, {item}", existing.join(", "))
        }
    };
    if let Ok(value) = HeaderValue::from_str(&combined) {
        headers.insert(name, value);
    }
}

/// HTTP/2 clients may split `cookie` into several fields; HTTP/1.1 wants one, joined with
/// `"; "` (RFC 9113 section 8.2.3), or origins read only the first.
pub fn join_cookies(headers: &mut HeaderMap) {
    let count = headers.get_all(header::COOKIE).iter().count();
    if count < 2 {
        return;
    }
    let joined: Vec<&[u8]> = headers
        .get_all(header::COOKIE)
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    let joined = joined.join(&b"; "[..]);
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

/// Whether a client-sent request id is acceptable to pass on (1-128 visible ASCII characters).
pub fn valid_request_id(value: &[u8]) -> bool {
    !value.is_empty() && value.len() <= 128 && value.iter().all(|c| c.is_ascii_graphic())
}

/// A new random request id: 32 hex digits.
pub fn new_request_id() -> HeaderValue {
    let id = request_id_digits();
    HeaderValue::from_bytes(&id).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// The digits of a new random request id.
pub fn request_id_digits() -> [u8; 32] {
    use rand::Rng;
    let n: u128 = rand::thread_rng().gen();
    let mut digits = [0u8; 32];
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, slot) in digits.iter_mut().enumerate() {
        *slot = HEX[((n >> (4 * (31 - i))) & 0xf) as usize];
    }
    digits
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic x"),
            ("accept", "*/*"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["accept"]);
    }

    #[test]
    fn upgrades_keep_upgrade_and_te_trailers_stays() {
        let mut h = map(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("te", "trailers"),
        ]);
        assert!(is_upgrade_request(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn domicile_headers_are_removed() {
        let mut h = map(&[
            ("x-domicile-region", "eu"),
            ("X-Domicile-Epoch", "9"),
            ("x-domicilex", "keep"),
        ]);
        strip_domicile(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-domicilex"]);
    }

    #[test]
    fn forwarded_from_untrusted_peer_is_replaced() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut h = map(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("forwarded", "for=6.6.6.6"),
            ("x-forwarded-host", "globex.example"),
            ("x-real-ip", "6.6.6.6"),
        ]);
        let peer: SocketAddr = "203.0.113.7:5555".parse().unwrap();
        assert_eq!(client_ip(peer.ip(), Headers::Map(&h), &trusted), peer.ip());
        set_forwarded(&mut h, &Peer::new(peer, &trusted), Some("acme.localhost"));
        assert_eq!(h["x-forwarded-for"], "203.0.113.7");
        assert!(h.get("x-forwarded-host").is_none() && h.get("x-real-ip").is_none());
        assert_eq!(
            h["forwarded"],
            "for=203.0.113.7;proto=http;host=\"acme.localhost\""
        );
    }

    #[test]
    fn forwarded_from_trusted_peer_is_appended() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut h = map(&[("x-forwarded-for", "198.51.100.1, 10.1.1.1")]);
        let peer: SocketAddr = "10.0.0.2:5555".parse().unwrap();
        assert_eq!(
            client_ip(peer.ip(), Headers::Map(&h), &trusted),
            "198.51.100.1".parse::<IpAddr>().unwrap()
        );
        set_forwarded(&mut h, &Peer::new(peer, &trusted), None);
        assert_eq!(h["x-forwarded-for"], "198.51.100.1, 10.1.1.1, 10.0.0.2");
        let v6: SocketAddr = "[::1]:1".parse().unwrap();
        let mut h6 = HeaderMap::new();
        set_forwarded(&mut h6, &Peer::new(v6, &[]), None);
        assert_eq!(h6["forwarded"], "for=\"[::1]\";proto=http");
    }

    #[test]
    fn cookies_are_joined_for_http1() {
        let mut h = map(&[("cookie", "a=1"), ("cookie", "b=2"), ("cookie", "c=3")]);
        join_cookies(&mut h);
        assert_eq!(h.get_all("cookie").iter().count(), 1);
        assert_eq!(h["cookie"], "a=1; b=2; c=3");
    }

    #[test]
    fn request_ids() {
        let a = new_request_id();
        assert_eq!(a.len(), 32);
        assert_ne!(a, new_request_id());
        assert!(valid_request_id(a.as_bytes()));
        assert!(!valid_request_id(b"has space"));
        assert!(!valid_request_id("x".repeat(129).as_bytes()));
    }
}
