//! HTTP at the client's end: the protocols a client may speak, each an adapter that turns its
//! bytes into one [`RequestHead`] and a [`ClientSide`] for the engine, and the rules every
//! HTTP/1.1 message is held to.
//!
//! - [`framing`]: strict HTTP/1.1 framing rules, pure functions (fuzzed).
//! - [`io`]: transports (a socket, or TLS over one), reads and writes with deadlines, buffers.
//! - [`h1`]: HTTP/1.1 connections: heads parsed in place, bodies by length or chunks,
//!   keep-alive, pipelining, `100 Continue`, upgrades, lingering close.
//! - [`h2`]: HTTP/2 connections (the `h2` crate): one stream, one request.
//! - [`peer`]: what is known of the client's address and the proxies in front of it.
//!
//! Nothing here routes: a request goes to the [`Handler`] (the engine in `forward`), which runs
//! the same steps whatever the protocol. An adapter adds no policy of its own; it only says
//! what the client sent and carries what the engine answers.

pub mod framing;
pub(crate) mod h1;
pub(crate) mod h2;
pub(crate) mod io;
pub mod peer;

use std::future::Future;

use http::HeaderMap;

use crate::refusal::Refusal;

/// The protocol a request arrived in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    Http10,
    Http11,
    Http2,
}

/// A request's header fields: raw slices of an HTTP/1.1 head, or an HTTP/2 header map.
#[derive(Debug, Clone, Copy)]
pub enum Fields<'a> {
    Map(&'a HeaderMap),
    Raw(&'a [httparse::Header<'a>]),
}

impl<'a> Fields<'a> {
    /// Every value of the field `name` (lowercase), in the order received.
    #[inline]
    pub fn values(self, name: &'a str) -> Values<'a> {
        match self {
            Fields::Map(map) => Values::Map(map.get_all(name).iter()),
            Fields::Raw(raw) => Values::Raw {
                fields: raw.iter(),
                name,
            },
        }
    }

    /// The first value of `name` (lowercase).
    pub fn get(self, name: &'a str) -> Option<&'a [u8]> {
        self.values(name).next()
    }

    /// Every field as (name, value), in the order received (names of a map are lowercase).
    #[inline]
    pub fn iter(self) -> Iter<'a> {
        match self {
            Fields::Map(map) => Iter::Map(map.iter()),
            Fields::Raw(raw) => Iter::Raw(raw.iter()),
        }
    }

    pub fn len(self) -> usize {
        match self {
            Fields::Map(map) => map.len(),
            Fields::Raw(raw) => raw.len(),
        }
    }

    pub fn is_empty(self) -> bool {
        self.len() == 0
    }
}

/// Appends `name: value` and CRLF to an HTTP/1.1 head: room first, then the separators as
/// single bytes, so a field costs two copies.
pub(crate) fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.reserve(name.len() + value.len() + 4);
    out.extend_from_slice(name);
    out.push(b':');
    out.push(b' ');
    out.extend_from_slice(value);
    out.push(b'\r');
    out.push(b'\n');
}

/// The one field every message Domicile sends carries that no standard name covers.
static REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// Appends `name: value` to an HTTP/2 head (names are lowercased; a field that is not valid is
/// left out). `x-request-id` is unique to each message: indexing it in the peer's HPACK table
/// would only evict the fields that repeat, so it goes as never-indexed (as nghttp2 sends such
/// fields), under a name that is neither parsed nor copied.
pub(crate) fn append_h2_field(map: &mut HeaderMap, name: &[u8], value: &[u8]) {
    let Ok(mut value) = http::HeaderValue::from_bytes(value) else {
        return;
    };
    if name.eq_ignore_ascii_case(REQUEST_ID.as_str().as_bytes()) {
        value.set_sensitive(true);
        map.append(REQUEST_ID.clone(), value);
    } else if let Ok(name) = http::HeaderName::from_bytes(name) {
        map.append(name, value);
    }
}

/// The values of one field: [`Fields::values`].
pub enum Values<'a> {
    Map(http::header::ValueIter<'a, http::HeaderValue>),
    Raw {
        fields: std::slice::Iter<'a, httparse::Header<'a>>,
        name: &'a str,
    },
}

impl<'a> Iterator for Values<'a> {
    type Item = &'a [u8];

    #[inline]
    fn next(&mut self) -> Option<&'a [u8]> {
        match self {
            Values::Map(values) => values.next().map(|v| v.as_bytes()),
            Values::Raw { fields, name } => fields
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| h.value),
        }
    }
}

/// Every field: [`Fields::iter`].
pub enum Iter<'a> {
    Map(http::header::Iter<'a, http::HeaderValue>),
    Raw(std::slice::Iter<'a, httparse::Header<'a>>),
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a str, &'a [u8]);

    // Called per field on every request's hot path, from several modules.
    #[inline]
    fn next(&mut self) -> Option<(&'a str, &'a [u8])> {
        match self {
            Iter::Map(fields) => fields.next().map(|(k, v)| (k.as_str(), v.as_bytes())),
            Iter::Raw(fields) => fields.next().map(|h| (h.name, h.value)),
        }
    }
}

/// How the client frames its request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestBody {
    None,
    /// HTTP/1.1 `Content-Length` (more than zero).
    Length(u64),
    /// HTTP/1.1 `Transfer-Encoding: chunked`.
    Chunked,
    /// HTTP/2 DATA frames (with `content-length`, when the client sent one).
    Frames(Option<u64>),
}

impl RequestBody {
    pub(crate) fn is_none(self) -> bool {
        self == RequestBody::None
    }

    /// The body's length when the client announced it.
    pub(crate) fn length(self) -> Option<u64> {
        match self {
            RequestBody::None => Some(0),
            RequestBody::Length(n) | RequestBody::Frames(Some(n)) => Some(n),
            RequestBody::Chunked | RequestBody::Frames(None) => None,
        }
    }
}

/// One request as a client sent it, whatever the protocol: what every later step reads.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RequestHead<'a> {
    pub version: Version,
    pub method: &'a str,
    /// The path as received, without the query (`*` for `OPTIONS *`).
    pub path: &'a str,
    pub query: Option<&'a str>,
    /// The authority the request names (`host[:port]`): HTTP/2 `:authority`, an absolute-form
    /// target's, or else `Host`.
    pub authority: Option<&'a str>,
    /// An HTTP/2 `host` field that names another authority than `:authority`.
    pub host_mismatch: bool,
    pub fields: Fields<'a>,
    pub body: RequestBody,
    /// HTTP/1.1 `Upgrade` with `Connection: upgrade`.
    pub upgrade: bool,
    /// The request head's size in bytes, as limits count it.
    pub head_bytes: usize,
}

impl RequestHead<'_> {
    /// GET, HEAD or OPTIONS.
    pub(crate) fn is_safe(&self) -> bool {
        is_safe_method(self.method)
    }

    /// Safe methods, PUT, DELETE and TRACE: sending one twice does what sending it once does.
    pub(crate) fn is_idempotent(&self) -> bool {
        self.is_safe() || matches!(self.method, "PUT" | "DELETE" | "TRACE")
    }

    /// The host the request names, without port or trailing dot.
    pub(crate) fn host(&self) -> Option<&str> {
        self.authority.map(host_without_port)
    }
}

pub(crate) fn is_safe_method(method: &str) -> bool {
    matches!(method, "GET" | "HEAD" | "OPTIONS")
}

/// `Acme.example.com:8080` -> `Acme.example.com`, `[::1]:80` -> `[::1]`; a trailing dot goes.
pub(crate) fn host_without_port(raw: &str) -> &str {
    if raw.starts_with('[') {
        return raw
            .split_once(']')
            .map_or(raw, |(h, _)| &raw[..h.len() + 1]);
    }
    let host = raw.split_once(':').map_or(raw, |(h, _)| h);
    // `acme.example.com.` is the same host as `acme.example.com`.
    host.strip_suffix('.').unwrap_or(host)
}

/// A request id kept inline: the client's `x-request-id` (1 to 128 visible characters) or 32
/// new hex digits.
#[derive(Clone, Copy)]
pub(crate) struct RequestId {
    len: u8,
    bytes: [u8; 128],
}

impl RequestId {
    /// The client's id when it sent an acceptable one, else a new one.
    pub(crate) fn of(fields: Fields<'_>) -> Self {
        match fields.get("x-request-id") {
            Some(id) if valid_request_id(id) => {
                let mut bytes = [0u8; 128];
                bytes[..id.len()].copy_from_slice(id);
                Self {
                    len: id.len() as u8,
                    bytes,
                }
            }
            _ => Self::new(),
        }
    }

    /// 32 random hex digits.
    pub(crate) fn new() -> Self {
        use rand::Rng;
        let n: u128 = rand::thread_rng().gen();
        let mut bytes = [0u8; 128];
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for (i, slot) in bytes[..32].iter_mut().enumerate() {
            *slot = HEX[((n >> (4 * (31 - i))) & 0xf) as usize];
        }
        Self { len: 32, bytes }
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    pub(crate) fn as_str(&self) -> &str {
        // Visible ASCII only, by construction.
        std::str::from_utf8(self.as_bytes()).unwrap_or("")
    }
}

impl std::fmt::Debug for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a client-sent request id is acceptable to pass on (1-128 visible ASCII characters).
pub(crate) fn valid_request_id(value: &[u8]) -> bool {
    !value.is_empty() && value.len() <= 128 && value.iter().all(|c| c.is_ascii_graphic())
}

/// How a response body reaches the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResponseBody {
    /// No body (HEAD, 204, 304, or a length of zero).
    None,
    /// This many bytes.
    Length(u64),
    /// An HTTP/1.1 origin's chunked body, relayed as it is, framing and trailers included
    /// (only to a client that [`ClientSide::takes_chunked`]).
    RawChunked,
    /// Data of a length not known in advance, ending when the origin's body ends.
    Stream,
    /// An HTTP/1.1 origin's body delimited by the end of its connection: an HTTP/1.1 client's
    /// connection ends with it too (an HTTP/2 client's stream just ends).
    UntilClose,
}

/// Why reading a request body failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyError {
    /// The body broke the framing rules (a chunk), or the client reset its stream.
    Malformed,
    /// Nothing arrived for `idle_timeout`.
    Stalled,
    /// The client went away before the body ended.
    Gone,
    /// Larger than the route allows.
    TooLarge,
}

/// The client's end of one exchange, as the engine drives it. An HTTP/1.1 connection and an
/// HTTP/2 stream each implement it; the engine writes every policy once against this.
pub(crate) trait ClientSide: Send {
    /// Whether an HTTP/1.1 chunked body may be relayed to this client as it is.
    fn takes_chunked(&self) -> bool;

    /// Tells a client that waits (`Expect: 100-continue`) to send its body. Called once, when
    /// the engine is about to read the body.
    fn send_continue(&mut self) -> impl Future<Output = std::io::Result<()>> + Send;

    /// The next piece of the request body; `Ok(None)` at its end.
    fn read_body(&mut self) -> impl Future<Output = Result<Option<&[u8]>, BodyError>> + Send;

    /// Begins the response head.
    fn start_head(&mut self, status: u16, reason: &str);

    /// Adds a field to the response head begun (the header rules have been applied).
    fn head_field(&mut self, name: &[u8], value: &[u8]);

    /// Sends the response head with the first body bytes (`first`); `end` when they are all
    /// of it.
    fn send_head(
        &mut self,
        body: ResponseBody,
        first: &[u8],
        end: bool,
    ) -> impl Future<Output = std::io::Result<()>> + Send;

    /// Sends more of the body (framing as [`ResponseBody`] said); `end` with its last bytes.
    fn send_data(
        &mut self,
        data: &[u8],
        end: bool,
    ) -> impl Future<Output = std::io::Result<()>> + Send;

    /// Ends a body of unknown length, with trailers (HTTP/2; an HTTP/1.1 client gets the last
    /// chunk).
    fn send_end(
        &mut self,
        trailers: Option<HeaderMap>,
    ) -> impl Future<Output = std::io::Result<()>> + Send;

    /// Whether this client can switch protocols after a `101` (HTTP/1.1).
    fn can_upgrade(&self) -> bool;

    /// After a `101` went to the client: relays bytes both ways between the client's
    /// connection and the origin's (`from_origin`: what the origin sent after its head) until
    /// either side closes.
    fn tunnel<O: io::Transport>(
        &mut self,
        origin: &mut O,
        from_origin: &[u8],
    ) -> impl Future<Output = ()> + Send;

    /// Answers with a refusal instead of a response; `close` ends an HTTP/1.1 connection
    /// after it.
    fn send_refusal(
        &mut self,
        refusal: &Refusal<'_>,
        close: bool,
    ) -> impl Future<Output = std::io::Result<()>> + Send;
}

/// How the client's connection goes on after an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Served {
    /// The next request may follow.
    KeepAlive,
    /// The connection closes (after a lingering read, for HTTP/1.1).
    Close,
    /// The connection was handed to a tunnel (a protocol upgrade), which has ended.
    Tunneled,
}

/// Serves one request: the engine.
pub(crate) trait Handler: Send + Sync {
    fn serve<C: ClientSide>(
        &self,
        head: &RequestHead<'_>,
        client: &mut C,
    ) -> impl Future<Output = Served> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http2_fields_keep_request_ids_out_of_the_hpack_table() {
        let mut map = HeaderMap::new();
        append_h2_field(&mut map, b"X-Request-Id", b"abc");
        append_h2_field(&mut map, b"x-origin", b"eu");
        append_h2_field(&mut map, b"bad name", b"x");
        append_h2_field(&mut map, b"x-bad-value", b"a\nb");
        assert_eq!(map.len(), 2, "{map:?}");
        let id = map.get("x-request-id").expect("the request id, lowercased");
        assert_eq!(id, "abc");
        assert!(id.is_sensitive(), "sent as never-indexed");
        let origin = map.get("x-origin").expect("another field");
        assert!(!origin.is_sensitive(), "other fields may be indexed");
    }
}
