//! What the proxy knows of a connection's peer: its address, whether it is one of the trusted
//! proxies in front of this edge, and the client address those proxies say they forwarded.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use super::Fields;

/// Whether `peer` is one of the trusted proxies.
pub fn is_trusted(peer: IpAddr, trusted: &[IpNet]) -> bool {
    trusted.iter().any(|net| net.contains(&peer))
}

/// The client's address: the peer, or, when the peer is trusted, the right-most address in
/// `X-Forwarded-For` that is not itself a trusted proxy.
pub fn client_ip(peer: IpAddr, fields: Fields<'_>, trusted: &[IpNet]) -> IpAddr {
    if !is_trusted(peer, trusted) {
        return peer;
    }
    let mut client = peer;
    let values: Vec<&[u8]> = fields.values("x-forwarded-for").collect();
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

/// A connection's peer, worked out once per connection so that requests do not format the same
/// address again.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// Whether the peer is one of `trusted_proxies`.
    pub trusted: bool,
    /// Whether the client connected over TLS.
    pub tls: bool,
    /// The address as an `X-Forwarded-For` item.
    xff: Box<str>,
    /// `for=<node>;proto=http` (or `https`).
    forwarded: Box<str>,
}

impl Peer {
    /// A peer connected over TLS (`tls`) or in cleartext.
    pub fn new(addr: SocketAddr, trusted: &[IpNet], tls: bool) -> Self {
        let ip = addr.ip();
        let scheme = if tls { "https" } else { "http" };
        let forwarded = match ip {
            IpAddr::V4(v4) => format!("for={v4};proto={scheme}"),
            IpAddr::V6(v6) => format!("for=\"[{v6}]\";proto={scheme}"),
        };
        Self {
            addr,
            trusted: is_trusted(ip, trusted),
            tls,
            xff: ip.to_string().into(),
            forwarded: forwarded.into(),
        }
    }

    /// This peer's `Forwarded` element without the host: `for=<node>;proto=http`.
    pub fn forwarded_element(&self) -> &str {
        &self.forwarded
    }

    /// This peer's address as an `X-Forwarded-For` item.
    pub fn xff_value(&self) -> &[u8] {
        self.xff.as_bytes()
    }

    /// `http` or `https`: how the client reached this edge.
    pub fn proto(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ip_trusts_forwarding_fields_from_trusted_peers_only() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let fields = [httparse::Header {
            name: "X-Forwarded-For",
            value: b"198.51.100.1, 10.1.1.1",
        }];
        let untrusted: IpAddr = "203.0.113.7".parse().unwrap();
        assert_eq!(
            client_ip(untrusted, Fields::Raw(&fields), &trusted),
            untrusted
        );
        let proxy: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(
            client_ip(proxy, Fields::Raw(&fields), &trusted),
            "198.51.100.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn forwarded_elements() {
        let v4 = Peer::new("203.0.113.7:5555".parse().unwrap(), &[], false);
        assert_eq!(v4.forwarded_element(), "for=203.0.113.7;proto=http");
        let v6 = Peer::new("[::1]:1".parse().unwrap(), &[], true);
        assert_eq!(v6.forwarded_element(), "for=\"[::1]\";proto=https");
        assert_eq!(v6.xff_value(), b"::1");
    }
}
