//! The header rules between client and origin, written once for every protocol: fields are
//! read from [`Fields`] (raw HTTP/1.1 slices or an HTTP/2 map) and written to a [`FieldSink`]
//! (the bytes of an HTTP/1.1 head, or an HTTP/2 header map).
//!
//! Towards the origin: hop-by-hop fields (and every field named in `Connection`) are removed,
//! so are every client-sent `x-domicile-*` field, `Expect` (the edge answers `100 Continue`
//! itself) and the framing fields (the origin's protocol writes its own); `x-request-id` is
//! kept or set; `Forwarded` and `X-Forwarded-For` are appended to (incoming values are kept
//! only from trusted peers, as are `X-Forwarded-Proto/Host/Port` and `X-Real-IP`); the
//! `x-domicile-workspace/region/epoch/map-version` fields are set.
//! Towards the client: hop-by-hop fields of the origin's response are removed, `x-request-id`
//! is set, and a response without `Date` gets one (RFC 9110 section 6.6.1).

use std::cell::RefCell;

use http::HeaderMap;

use crate::http::peer::Peer;
use crate::http::{Fields, RequestId};
use crate::route::decide::Forward;

/// Where the fields of a head go.
pub(crate) trait FieldSink {
    fn field(&mut self, name: &[u8], value: &[u8]);
}

/// The bytes of an HTTP/1.1 head.
impl FieldSink for Vec<u8> {
    fn field(&mut self, name: &[u8], value: &[u8]) {
        crate::http::push_field(self, name, value);
    }
}

/// An HTTP/2 header map ([`crate::http::append_h2_field`]).
impl FieldSink for HeaderMap {
    fn field(&mut self, name: &[u8], value: &[u8]) {
        crate::http::append_h2_field(self, name, value);
    }
}

/// Fields with a rule of their own (names compared without case).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Host,
    /// `Content-Length`, `Transfer-Encoding`: each side's protocol frames its own messages.
    Framing,
    Connection,
    /// `Keep-Alive`, `Proxy-Connection`, `Trailer`, `Proxy-Authenticate`,
    /// `Proxy-Authorization`: hop-by-hop (RFC 9110 section 7.6.1).
    HopByHop,
    Te,
    Upgrade,
    Expect,
    RequestId,
    Forwarded,
    XForwardedFor,
    XForwardedProto,
    /// `X-Forwarded-Host`, `X-Forwarded-Port`, `X-Real-IP`: kept from trusted peers only.
    Steering,
    /// `x-domicile-*`: only this proxy sets them.
    Domicile,
    Cookie,
    Date,
    Other,
}

fn classify(name: &[u8]) -> Class {
    if name.len() > 11 && name[..11].eq_ignore_ascii_case(b"x-domicile-") {
        return Class::Domicile;
    }
    let is = |s: &str| name.eq_ignore_ascii_case(s.as_bytes());
    match name.len() {
        2 if is("te") => Class::Te,
        4 if is("host") => Class::Host,
        4 if is("date") => Class::Date,
        6 if is("expect") => Class::Expect,
        6 if is("cookie") => Class::Cookie,
        7 if is("upgrade") => Class::Upgrade,
        7 if is("trailer") => Class::HopByHop,
        9 if is("forwarded") => Class::Forwarded,
        9 if is("x-real-ip") => Class::Steering,
        10 if is("connection") => Class::Connection,
        10 if is("keep-alive") => Class::HopByHop,
        12 if is("x-request-id") => Class::RequestId,
        14 if is("content-length") => Class::Framing,
        15 if is("x-forwarded-for") => Class::XForwardedFor,
        16 if is("x-forwarded-host") || is("x-forwarded-port") => Class::Steering,
        16 if is("proxy-connection") => Class::HopByHop,
        17 if is("x-forwarded-proto") => Class::XForwardedProto,
        17 if is("transfer-encoding") => Class::Framing,
        18 if is("proxy-authenticate") => Class::HopByHop,
        19 if is("proxy-authorization") => Class::HopByHop,
        _ => Class::Other,
    }
}

/// Field names listed in `Connection` (hop-by-hop by RFC 9110 section 7.6.1), at most 16; a
/// head that names more has them all removed by [`Named::overflow`].
struct Named<'a> {
    names: [&'a [u8]; 16],
    len: usize,
    overflow: bool,
}

impl<'a> Named<'a> {
    fn of(fields: Fields<'a>) -> Self {
        let mut named = Named {
            names: [&[]; 16],
            len: 0,
            overflow: false,
        };
        for (name, value) in fields.iter() {
            if !name.eq_ignore_ascii_case("connection") {
                continue;
            }
            for token in value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.is_empty()
                    || token.eq_ignore_ascii_case(b"close")
                    || token.eq_ignore_ascii_case(b"keep-alive")
                {
                    continue;
                }
                if named.len < named.names.len() {
                    named.names[named.len] = token;
                    named.len += 1;
                } else {
                    named.overflow = true;
                }
            }
        }
        named
    }

    fn contains(&self, name: &[u8]) -> bool {
        self.names[..self.len]
            .iter()
            .any(|n| n.eq_ignore_ascii_case(name))
    }

    /// Whether `name` goes as hop-by-hop: listed, or unknown past the list's room (then every
    /// field that is not a well-known end-to-end one could be listed, and the safe reading is
    /// that the client meant them all: only the fields this proxy sets itself pass).
    fn drops(&self, name: &[u8]) -> bool {
        self.overflow || self.contains(name)
    }
}

/// What the request rules add besides the client's fields.
pub(crate) struct Forwarding<'a> {
    pub peer: &'a Peer,
    pub forward: &'a Forward,
    pub request_id: &'a RequestId,
    /// The home region's id (`x-domicile-region`).
    pub region_id: &'a str,
    /// The host the request was identified by (for `Forwarded: host=`).
    pub host: Option<&'a str>,
    /// An upgrade goes on: `Upgrade` stays.
    pub upgrade: bool,
    /// The origin speaks HTTP/1.1 and the client HTTP/2: several `cookie` fields become one
    /// (RFC 9113 section 8.2.3), or origins read only the first.
    pub join_cookies: bool,
}

thread_local! {
    /// Scratch room for joined cookies.
    static COOKIES: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Writes the origin's request fields (after the request line or pseudo-fields, before the
/// framing fields) to `sink`.
pub(crate) fn request_fields(fields: Fields<'_>, f: &Forwarding<'_>, sink: &mut impl FieldSink) {
    let named = Named::of(fields);
    let trusted = f.peer.trusted;
    let mut has_forwarding = false;
    let mut has_proto = false;
    let mut cookies = 0;
    for (name, value) in fields.iter() {
        let name = name.as_bytes();
        let keep = match classify(name) {
            Class::Other | Class::Date => !named.drops(name),
            Class::Cookie => {
                if f.join_cookies {
                    cookies += 1;
                    false
                } else {
                    !named.drops(name)
                }
            }
            Class::Te => value.eq_ignore_ascii_case(b"trailers"),
            Class::Upgrade => f.upgrade,
            Class::Steering => trusted && !named.drops(name),
            Class::XForwardedProto => {
                has_proto |= trusted;
                trusted
            }
            Class::Forwarded | Class::XForwardedFor => {
                has_forwarding = true;
                false
            }
            Class::Host
            | Class::Framing
            | Class::Connection
            | Class::HopByHop
            | Class::Expect
            | Class::RequestId
            | Class::Domicile => false,
        };
        if keep {
            sink.field(name, value);
        }
    }
    if cookies > 0 {
        COOKIES.with(|joined| {
            let mut joined = joined.borrow_mut();
            joined.clear();
            for value in fields.values("cookie") {
                if !joined.is_empty() {
                    joined.extend_from_slice(b"; ");
                }
                joined.extend_from_slice(value);
            }
            sink.field(b"cookie", &joined);
        });
    }
    if f.upgrade {
        sink.field(b"connection", b"upgrade");
    }
    // Forwarded: the peer's element, after a trusted peer's own list.
    let forwarded_host = f.host.filter(|h| !h.is_empty()).filter(|h| {
        h.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    });
    LIST.with(|list| {
        let mut list = list.borrow_mut();
        list.clear();
        if trusted && has_forwarding {
            append_existing(&mut list, fields, "forwarded");
        }
        list.extend_from_slice(f.peer.forwarded_element().as_bytes());
        if let Some(host) = forwarded_host {
            list.extend_from_slice(b";host=\"");
            list.extend_from_slice(host.as_bytes());
            list.push(b'"');
        }
        sink.field(b"forwarded", &list);
        list.clear();
        if trusted && has_forwarding {
            append_existing(&mut list, fields, "x-forwarded-for");
        }
        list.extend_from_slice(f.peer.xff_value());
        sink.field(b"x-forwarded-for", &list);
    });
    if !has_proto {
        sink.field(b"x-forwarded-proto", f.peer.proto().as_bytes());
    }
    sink.field(b"x-request-id", f.request_id.as_bytes());
    if let Some(workspace) = &f.forward.workspace {
        sink.field(b"x-domicile-workspace", workspace.as_bytes());
    }
    sink.field(b"x-domicile-region", f.region_id.as_bytes());
    let mut digits = itoa::Buffer::new();
    if let Some(epoch) = f.forward.epoch {
        sink.field(b"x-domicile-epoch", digits.format(epoch).as_bytes());
    }
    if let Some(version) = f.forward.map_version {
        sink.field(b"x-domicile-map-version", digits.format(version).as_bytes());
    }
}

thread_local! {
    /// Scratch room for the forwarding lists.
    static LIST: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Appends the text values of every `name` field, each followed by `, ` (the caller appends
/// its own element).
fn append_existing(out: &mut Vec<u8>, fields: Fields<'_>, name: &'static str) {
    for value in fields.values(name) {
        if value
            .iter()
            .all(|&b| (0x20..0x7f).contains(&b) || b == b'\t')
        {
            out.extend_from_slice(value);
            out.extend_from_slice(b", ");
        }
    }
}

/// Writes the client's response fields from the origin's: hop-by-hop fields go (`Upgrade`
/// stays in a `101`), so do the framing fields unless the response has no body to frame
/// (`keep_length`: a HEAD, 204 or 304 answer, whose `Content-Length` only informs), and the
/// origin's `x-request-id`; `x-request-id` is set, and `Date` when the origin sent none.
pub(crate) fn response_fields(
    fields: Fields<'_>,
    status: u16,
    keep_length: bool,
    request_id: &RequestId,
    sink: &mut impl FieldSink,
) {
    let named = Named::of(fields);
    let switching = status == 101;
    let mut has_date = false;
    for (name, value) in fields.iter() {
        let name = name.as_bytes();
        let keep = match classify(name) {
            Class::Date => {
                has_date = true;
                true
            }
            Class::Framing => keep_length && name.eq_ignore_ascii_case(b"content-length"),
            Class::Upgrade => switching,
            Class::Connection | Class::HopByHop | Class::Te | Class::RequestId => false,
            _ => !named.contains(name),
        };
        if keep {
            sink.field(name, value);
        }
    }
    if switching {
        sink.field(b"connection", b"upgrade");
    }
    sink.field(b"x-request-id", request_id.as_bytes());
    if !has_date {
        http_date(|date| sink.field(b"date", date));
    }
}

thread_local! {
    /// The current second as an HTTP date, formatted once per second per worker.
    static HTTP_DATE: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
}

/// The current time as an HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`).
fn http_date(f: impl FnOnce(&[u8])) {
    let now = std::time::SystemTime::now();
    let second = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    HTTP_DATE.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != second || cached.1.is_empty() {
            *cached = (second, httpdate::fmt_http_date(now));
        }
        f(cached.1.as_bytes());
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(pairs: &[(&'static str, &'static str)]) -> Vec<httparse::Header<'static>> {
        pairs
            .iter()
            .map(|(name, value)| httparse::Header {
                name,
                value: value.as_bytes(),
            })
            .collect()
    }

    fn written(sink: &[u8]) -> Vec<(String, String)> {
        String::from_utf8_lossy(sink)
            .lines()
            .filter_map(|l| l.split_once(": "))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    fn forward() -> Forward {
        Forward {
            region: 0,
            workspace: None,
            epoch: Some(4),
            map_version: Some(9),
        }
    }

    #[test]
    fn hop_by_hop_connection_named_and_domicile_fields_go() {
        let fields = raw(&[
            ("Connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "gzip"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic x"),
            ("x-domicile-region", "eu"),
            ("X-Domicile-Epoch", "999"),
            ("x-domicilex", "keep"),
            ("expect", "100-continue"),
            ("content-length", "5"),
            ("accept", "*/*"),
        ]);
        let fwd = forward();
        let peer = Peer::new("203.0.113.7:5555".parse().unwrap(), &[], false);
        let id = RequestId::new();
        let f = Forwarding {
            peer: &peer,
            forward: &fwd,
            request_id: &id,
            region_id: "us",
            host: Some("acme.localhost"),
            upgrade: false,
            join_cookies: false,
        };
        let mut out = Vec::new();
        request_fields(Fields::Raw(&fields), &f, &mut out);
        let got = written(&out);
        let names: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "x-domicilex",
                "accept",
                "forwarded",
                "x-forwarded-for",
                "x-forwarded-proto",
                "x-request-id",
                "x-domicile-region",
                "x-domicile-epoch",
                "x-domicile-map-version"
            ]
        );
        assert_eq!(
            got[2].1,
            "for=203.0.113.7;proto=http;host=\"acme.localhost\""
        );
        assert_eq!(got[6].1, "us");
    }

    #[test]
    fn trusted_peers_keep_and_extend_their_forwarding_fields() {
        let fields = raw(&[
            ("x-forwarded-for", "198.51.100.1, 10.1.1.1"),
            ("forwarded", "for=198.51.100.1"),
            ("x-forwarded-proto", "https"),
            ("x-real-ip", "198.51.100.1"),
            ("cookie", "a=1"),
            ("cookie", "b=2"),
        ]);
        let trusted = vec!["10.0.0.0/8".parse().unwrap()];
        let peer = Peer::new("10.0.0.2:5555".parse().unwrap(), &trusted, false);
        let id = RequestId::new();
        let fwd = forward();
        let f = Forwarding {
            peer: &peer,
            forward: &fwd,
            request_id: &id,
            region_id: "us",
            host: None,
            upgrade: false,
            join_cookies: true,
        };
        let mut out = Vec::new();
        request_fields(Fields::Raw(&fields), &f, &mut out);
        let got = written(&out);
        let get = |name: &str| {
            got.iter()
                .filter(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(get("x-forwarded-for"), ["198.51.100.1, 10.1.1.1, 10.0.0.2"]);
        assert_eq!(
            get("forwarded"),
            ["for=198.51.100.1, for=10.0.0.2;proto=http"]
        );
        assert_eq!(get("x-forwarded-proto"), ["https"]);
        assert_eq!(get("x-real-ip"), ["198.51.100.1"]);
        assert_eq!(get("cookie"), ["a=1; b=2"]);
    }

    #[test]
    fn responses_lose_hop_by_hop_fields_and_gain_an_id_and_a_date() {
        let fields = raw(&[
            ("connection", "x-internal"),
            ("x-internal", "1"),
            ("transfer-encoding", "chunked"),
            ("content-length", "3"),
            ("x-request-id", "origin's"),
            ("content-type", "text/plain"),
        ]);
        let id = RequestId::new();
        let mut out = Vec::new();
        response_fields(Fields::Raw(&fields), 200, false, &id, &mut out);
        let got = written(&out);
        let names: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["content-type", "x-request-id", "date"]);
        assert_eq!(got[1].1, id.as_str());
        let mut out = Vec::new();
        response_fields(Fields::Raw(&fields), 304, true, &id, &mut out);
        assert!(written(&out)
            .iter()
            .any(|(k, v)| k == "content-length" && v == "3"));
    }
}
