//! HTTP/1.1 message framing, strictly.
//!
//! Request smuggling lives in the gap between two parsers that read one byte stream
//! differently: the proxy sees one request where the origin sees two. Domicile closes the gap
//! by refusing, before any parser acts on it, every request head whose framing is ambiguous or
//! outside RFC 9112, instead of guessing what the client meant: `Content-Length` together with
//! `Transfer-Encoding`, a repeated or malformed `Content-Length`, a `Transfer-Encoding` other
//! than `chunked`, obsolete line folding, bare CR or LF, control bytes in names or values,
//! whitespace before the colon, HTTP/1.0 with `Transfer-Encoding`, an absolute-form target
//! whose authority disagrees with `Host`, a missing or repeated `Host`. The same rules hold for
//! chunked bodies ([`ChunkedBody`]): chunk sizes are hex digits within bounds, extensions follow
//! the grammar, every line ends with CRLF.
//!
//! [`check_request_head`] is pure (no I/O) so that it can be fuzzed; the HTTP/1.1 server codec
//! ([`crate::http::h1`]) applies it to every request head before anything acts on it.

/// Why a request's framing was refused. Every variant is answered with 400 `bad_request` (and
/// the connection closed), except [`Violation::HeadTooLarge`] (431 `headers_too_large`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Violation {
    BareLf,
    BareCr,
    ObsFold,
    InvalidRequestLine,
    InvalidMethod,
    InvalidTarget,
    UnsupportedVersion,
    FieldWithoutColon,
    WhitespaceBeforeColon,
    InvalidFieldName,
    InvalidFieldValue,
    MissingHost,
    RepeatedHost,
    InvalidHost,
    HostUserinfo,
    AbsoluteFormMismatch,
    InvalidContentLength,
    RepeatedContentLength,
    UnsupportedTransferEncoding,
    RepeatedTransferEncoding,
    ContentLengthWithTransferEncoding,
    TransferEncodingOnHttp10,
    ReservedField,
    InvalidChunkSize,
    ChunkSizeTooLarge,
    InvalidChunkExtension,
    ChunkExtensionTooLong,
    InvalidChunkData,
    InvalidTrailer,
    HeadTooLarge,
}

// The metrics keep one counter per reason.
const _: () = assert!(Violation::ALL.len() == crate::metrics::MALFORMED_REASONS);

impl Violation {
    /// Every violation, in a fixed order (indexes metrics).
    pub const ALL: &'static [Violation] = &[
        Violation::BareLf,
        Violation::BareCr,
        Violation::ObsFold,
        Violation::InvalidRequestLine,
        Violation::InvalidMethod,
        Violation::InvalidTarget,
        Violation::UnsupportedVersion,
        Violation::FieldWithoutColon,
        Violation::WhitespaceBeforeColon,
        Violation::InvalidFieldName,
        Violation::InvalidFieldValue,
        Violation::MissingHost,
        Violation::RepeatedHost,
        Violation::InvalidHost,
        Violation::HostUserinfo,
        Violation::AbsoluteFormMismatch,
        Violation::InvalidContentLength,
        Violation::RepeatedContentLength,
        Violation::UnsupportedTransferEncoding,
        Violation::RepeatedTransferEncoding,
        Violation::ContentLengthWithTransferEncoding,
        Violation::TransferEncodingOnHttp10,
        Violation::ReservedField,
        Violation::InvalidChunkSize,
        Violation::ChunkSizeTooLarge,
        Violation::InvalidChunkExtension,
        Violation::ChunkExtensionTooLong,
        Violation::InvalidChunkData,
        Violation::InvalidTrailer,
        Violation::HeadTooLarge,
    ];

    /// Stable name (metrics label and log field).
    pub const fn as_str(self) -> &'static str {
        match self {
            Violation::BareLf => "bare_lf",
            Violation::BareCr => "bare_cr",
            Violation::ObsFold => "obs_fold",
            Violation::InvalidRequestLine => "invalid_request_line",
            Violation::InvalidMethod => "invalid_method",
            Violation::InvalidTarget => "invalid_target",
            Violation::UnsupportedVersion => "unsupported_version",
            Violation::FieldWithoutColon => "field_without_colon",
            Violation::WhitespaceBeforeColon => "whitespace_before_colon",
            Violation::InvalidFieldName => "invalid_field_name",
            Violation::InvalidFieldValue => "invalid_field_value",
            Violation::MissingHost => "missing_host",
            Violation::RepeatedHost => "repeated_host",
            Violation::InvalidHost => "invalid_host",
            Violation::HostUserinfo => "host_userinfo",
            Violation::AbsoluteFormMismatch => "absolute_form_mismatch",
            Violation::InvalidContentLength => "invalid_content_length",
            Violation::RepeatedContentLength => "repeated_content_length",
            Violation::UnsupportedTransferEncoding => "unsupported_transfer_encoding",
            Violation::RepeatedTransferEncoding => "repeated_transfer_encoding",
            Violation::ContentLengthWithTransferEncoding => "content_length_with_transfer_encoding",
            Violation::TransferEncodingOnHttp10 => "transfer_encoding_on_http10",
            Violation::ReservedField => "reserved_field",
            Violation::InvalidChunkSize => "invalid_chunk_size",
            Violation::ChunkSizeTooLarge => "chunk_size_too_large",
            Violation::InvalidChunkExtension => "invalid_chunk_extension",
            Violation::ChunkExtensionTooLong => "chunk_extension_too_long",
            Violation::InvalidChunkData => "invalid_chunk_data",
            Violation::InvalidTrailer => "invalid_trailer",
            Violation::HeadTooLarge => "head_too_large",
        }
    }

    /// The violation with this [`Violation::as_str`] name.
    pub fn from_name(name: &[u8]) -> Option<Violation> {
        Violation::ALL
            .iter()
            .copied()
            .find(|v| v.as_str().as_bytes() == name)
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// What the client is told.
    pub const fn message(self) -> &'static str {
        match self {
            Violation::BareLf => {
                "a line of the request head ends with LF alone; HTTP/1.1 lines end with CRLF"
            }
            Violation::BareCr => "the request head holds a CR that does not end a line",
            Violation::ObsFold => {
                "a header field is continued on the next line (obsolete line folding)"
            }
            Violation::InvalidRequestLine => {
                "the request line is not `METHOD SP target SP HTTP/1.x`"
            }
            Violation::InvalidMethod => "the method is not a token",
            Violation::InvalidTarget => {
                "the request target holds bytes outside visible ASCII or is in no valid form"
            }
            Violation::UnsupportedVersion => {
                "only HTTP/1.0 and HTTP/1.1 are served on this connection"
            }
            Violation::FieldWithoutColon => "a header line has no colon",
            Violation::WhitespaceBeforeColon => {
                "a header field name is followed by whitespace before the colon"
            }
            Violation::InvalidFieldName => {
                "a header field name holds a byte that is not a token character"
            }
            Violation::InvalidFieldValue => {
                "a header field value holds a control byte (NUL, CR, LF or another)"
            }
            Violation::MissingHost => "an HTTP/1.1 request must carry a Host header",
            Violation::RepeatedHost => "the request carries more than one Host header",
            Violation::InvalidHost => "the Host header is not a valid host[:port]",
            Violation::HostUserinfo => "the host must not contain user information ('@')",
            Violation::AbsoluteFormMismatch => {
                "the absolute-form target names another authority than the Host header"
            }
            Violation::InvalidContentLength => "Content-Length is not a plain decimal number",
            Violation::RepeatedContentLength => "the request carries more than one Content-Length",
            Violation::UnsupportedTransferEncoding => {
                "Transfer-Encoding other than a single `chunked` is not accepted"
            }
            Violation::RepeatedTransferEncoding => {
                "the request carries more than one Transfer-Encoding header"
            }
            Violation::ContentLengthWithTransferEncoding => {
                "Content-Length together with Transfer-Encoding is ambiguous"
            }
            Violation::TransferEncodingOnHttp10 => "Transfer-Encoding is not defined for HTTP/1.0",
            Violation::ReservedField => "the request carries a header field reserved to this proxy",
            Violation::InvalidChunkSize => "a chunk size is not hexadecimal digits ended by CRLF",
            Violation::ChunkSizeTooLarge => "a chunk size is larger than this proxy accepts",
            Violation::InvalidChunkExtension => {
                "a chunk extension does not follow the chunk-ext grammar"
            }
            Violation::ChunkExtensionTooLong => {
                "chunk extensions are longer than this proxy accepts"
            }
            Violation::InvalidChunkData => {
                "chunk data is not followed by CRLF where its size says it ends"
            }
            Violation::InvalidTrailer => "a trailer field of the chunked body is malformed",
            Violation::HeadTooLarge => "the request head is larger than this proxy accepts",
        }
    }
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for Violation {}

/// A field name reserved to the proxy's own use: a request carrying it is refused
/// ([`Violation::ReservedField`]), so that no client can pose as the proxy to an origin.
pub const MALFORMED_FIELD: &str = "x-domicile-internal-malformed";

/// How a request's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    None,
    Length(u64),
    Chunked,
}

/// A request head that passed every rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHead {
    /// Bytes of the head, with any empty lines before it and the blank line ending it.
    pub len: usize,
    pub body: BodyFraming,
    /// `Expect: 100-continue`: the client waits for an answer before it sends its body.
    pub expect_continue: bool,
    /// An upgrade or CONNECT: what follows the exchange may not be HTTP.
    pub tunnel: bool,
}

/// Empty lines (CRLF) tolerated before a request line (RFC 9112 section 2.2).
const MAX_LEADING_EMPTY_LINES: usize = 4;

/// Finds where a request head ends in `buf`, checking line endings as it goes. `scanned` is
/// how far an earlier call got (start at 0); it is advanced so that a head arriving a byte at
/// a time is scanned once. `Ok(Some(n))`: the head is `buf[..n]`; `Ok(None)`: not complete yet.
pub fn find_head_end(buf: &[u8], scanned: &mut usize) -> Result<Option<usize>, Violation> {
    let mut i = *scanned;
    // Empty lines before the request line.
    let mut lead = 0;
    while lead < MAX_LEADING_EMPTY_LINES
        && buf.len() >= lead * 2 + 2
        && &buf[lead * 2..lead * 2 + 2] == b"\r\n"
    {
        lead += 1;
    }
    let start = lead * 2;
    if i < start {
        i = start;
    }
    while i < buf.len() {
        match buf[i] {
            b'\n' => {
                if i == 0 || buf[i - 1] != b'\r' {
                    return Err(Violation::BareLf);
                }
                // The blank line: CRLF right after the previous line's CRLF.
                if i >= start + 3 && &buf[i - 3..i - 1] == b"\r\n" {
                    *scanned = i + 1;
                    return Ok(Some(i + 1));
                }
            }
            b'\r' => {
                if let Some(&next) = buf.get(i + 1) {
                    if next != b'\n' {
                        return Err(Violation::BareCr);
                    }
                } else {
                    // Judge it when the next byte arrives.
                    *scanned = i;
                    return Ok(None);
                }
            }
            _ => {}
        }
        i += 1;
    }
    *scanned = i;
    Ok(None)
}

/// A table of which bytes belong to a class, built at compile time: one load per byte.
const fn byte_class(extra: &[u8]) -> [bool; 256] {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric();
        b += 1;
    }
    let mut i = 0;
    while i < extra.len() {
        table[extra[i] as usize] = true;
        i += 1;
    }
    table
}

/// RFC 9110 `tchar`.
static TCHAR: [bool; 256] = byte_class(b"!#$%&'*+-.^_`|~");
/// A reg-name byte of a host (RFC 3986): unreserved, percent-encoded, sub-delimiters.
static HOST_BYTE: [bool; 256] = byte_class(b"-._~%!$&'()*+,;=");

/// RFC 9110 `tchar`.
pub fn is_tchar(b: u8) -> bool {
    TCHAR[usize::from(b)]
}

/// A field value byte (RFC 9110 `field-vchar`, SP, HTAB; obs-text allowed).
fn is_value_byte(b: u8) -> bool {
    b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80
}

/// Checks a complete request head (`head`, as [`find_head_end`] delimited it) against every
/// framing rule, and says how its body is framed.
pub fn check_request_head(head: &[u8]) -> Result<RequestHead, Violation> {
    check_request_head_with(head, |_, _| {}).map(|parsed| parsed.head)
}

/// A request head that passed, with its request line as slices of the head.
#[derive(Debug, Clone, Copy)]
pub struct ParsedHead<'a> {
    pub head: RequestHead,
    pub method: &'a str,
    pub target: &'a str,
    pub http10: bool,
    /// `Connection: close`, or HTTP/1.0 without `Connection: keep-alive`.
    pub close: bool,
}

/// As [`check_request_head`], handing every field (name, value without surrounding
/// whitespace) to `field` in order as it passes: one pass over the head checks it and yields
/// what the proxy reads of it.
pub fn check_request_head_with<'a>(
    head: &'a [u8],
    mut field: impl FnMut(&'a str, &'a [u8]),
) -> Result<ParsedHead<'a>, Violation> {
    let len = head.len();
    let mut rest = head;
    while rest.starts_with(b"\r\n") {
        rest = &rest[2..];
    }
    let Some(body) = rest.strip_suffix(b"\r\n\r\n") else {
        return Err(Violation::InvalidRequestLine);
    };
    // A folded line changes the meaning of the line before it: judge it first.
    if body
        .windows(3)
        .any(|w| w[0] == b'\r' && w[1] == b'\n' && (w[2] == b' ' || w[2] == b'\t'))
    {
        return Err(Violation::ObsFold);
    }
    let mut lines = body
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    // Line endings were checked by `find_head_end`; a CR or LF left inside a line is bare.
    let mut parts = request_line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Violation::InvalidRequestLine);
    };
    if method.is_empty() || target.is_empty() {
        return Err(Violation::InvalidRequestLine);
    }
    if !method.iter().all(|&b| is_tchar(b)) {
        return Err(Violation::InvalidMethod);
    }
    if !target.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(Violation::InvalidTarget);
    }
    let http10 = match version {
        b"HTTP/1.1" => false,
        b"HTTP/1.0" => true,
        v if v.starts_with(b"HTTP/") => return Err(Violation::UnsupportedVersion),
        _ => return Err(Violation::InvalidRequestLine),
    };

    let mut host: Option<&[u8]> = None;
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut upgrade = false;
    let mut connection_upgrade = false;
    let mut expect_continue = false;
    let mut close = false;
    let mut keep_alive = false;
    for line in lines {
        if line.first().is_some_and(|&b| b == b' ' || b == b'\t') {
            return Err(Violation::ObsFold);
        }
        if line.contains(&b'\r') {
            return Err(Violation::BareCr);
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Err(Violation::FieldWithoutColon);
        };
        let name = &line[..colon];
        if name.is_empty() {
            return Err(Violation::InvalidFieldName);
        }
        if let Some(bad) = name.iter().position(|&b| !is_tchar(b)) {
            // `Name : value` (RFC 9112 section 5.1 says reject), and `Na me: value` too.
            if name[bad..].iter().all(|&b| b == b' ' || b == b'\t') {
                return Err(Violation::WhitespaceBeforeColon);
            }
            return Err(Violation::InvalidFieldName);
        }
        let value = &line[colon + 1..];
        if !value.iter().all(|&b| is_value_byte(b)) {
            return Err(Violation::InvalidFieldValue);
        }
        let value = value.trim_ascii();
        // Names are tchars only (checked above): ASCII.
        field(std::str::from_utf8(name).unwrap_or_default(), value);
        let is = |s: &str| name.eq_ignore_ascii_case(s.as_bytes());
        match name.len() {
            4 if is("host") => {
                if host.is_some() {
                    return Err(Violation::RepeatedHost);
                }
                check_host(value)?;
                host = Some(value);
            }
            14 if is("content-length") => {
                if length.is_some() {
                    return Err(Violation::RepeatedContentLength);
                }
                length = Some(parse_content_length(value).ok_or(Violation::InvalidContentLength)?);
            }
            17 if is("transfer-encoding") => {
                if chunked {
                    return Err(Violation::RepeatedTransferEncoding);
                }
                if !value.eq_ignore_ascii_case(b"chunked") {
                    return Err(Violation::UnsupportedTransferEncoding);
                }
                chunked = true;
            }
            7 if is("upgrade") => upgrade = true,
            10 if is("connection") => {
                for token in value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"upgrade") {
                        connection_upgrade = true;
                    } else if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        keep_alive = true;
                    }
                }
            }
            6 if is("expect") => expect_continue = value.eq_ignore_ascii_case(b"100-continue"),
            n if n == MALFORMED_FIELD.len() && is(MALFORMED_FIELD) => {
                return Err(Violation::ReservedField)
            }
            _ => {}
        }
    }

    if chunked && length.is_some() {
        return Err(Violation::ContentLengthWithTransferEncoding);
    }
    if chunked && http10 {
        return Err(Violation::TransferEncodingOnHttp10);
    }
    match host {
        None if !http10 => return Err(Violation::MissingHost),
        _ => {}
    }
    let connect = method == b"CONNECT";
    check_target(method, target, host, connect)?;

    let body = if chunked {
        BodyFraming::Chunked
    } else {
        match length {
            Some(0) | None => BodyFraming::None,
            Some(n) => BodyFraming::Length(n),
        }
    };
    Ok(ParsedHead {
        head: RequestHead {
            len,
            body,
            expect_continue,
            tunnel: connect || (upgrade && connection_upgrade),
        },
        // Checked above: tchars and visible ASCII.
        method: std::str::from_utf8(method).unwrap_or_default(),
        target: std::str::from_utf8(target).unwrap_or_default(),
        http10,
        close: close || (http10 && !keep_alive),
    })
}

/// `1*DIGIT`, at most 18 digits (no sign, no list, no spaces inside).
pub fn parse_content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    value.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// `uri-host [ ":" port ]` (RFC 9110 section 7.2): a bracketed IP literal or a reg-name of
/// unreserved, percent-encoded and sub-delimiter characters, and a decimal port.
pub fn check_host(value: &[u8]) -> Result<(), Violation> {
    // The common case in one pass: a reg-name, perhaps a port.
    if let Some(&first) = value.first() {
        if first != b'[' {
            let mut colon = None;
            let mut plain = true;
            for (i, &b) in value.iter().enumerate() {
                if b == b':' && colon.is_none() {
                    colon = Some(i);
                } else if !(HOST_BYTE[usize::from(b)] || (colon.is_some() && b.is_ascii_digit())) {
                    plain = false;
                    break;
                }
            }
            if plain {
                return match colon {
                    None => Ok(()),
                    Some(0) => Err(Violation::InvalidHost),
                    Some(at) => {
                        let port = &value[at + 1..];
                        if port.len() <= 5 && port.iter().all(u8::is_ascii_digit) {
                            Ok(())
                        } else {
                            Err(Violation::InvalidHost)
                        }
                    }
                };
            }
        }
    }
    if value.contains(&b'@') {
        return Err(Violation::HostUserinfo);
    }
    if value.is_empty() {
        return Err(Violation::InvalidHost);
    }
    let (host, port) = if value[0] == b'[' {
        let Some(close) = value.iter().position(|&b| b == b']') else {
            return Err(Violation::InvalidHost);
        };
        let literal = &value[1..close];
        if literal.is_empty()
            || !literal
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return Err(Violation::InvalidHost);
        }
        match &value[close + 1..] {
            [] => (&value[..=close], None),
            [b':', port @ ..] => (&value[..=close], Some(port)),
            _ => return Err(Violation::InvalidHost),
        }
    } else {
        match value.iter().rposition(|&b| b == b':') {
            Some(colon) => (&value[..colon], Some(&value[colon + 1..])),
            None => (value, None),
        }
    };
    if host.is_empty() {
        return Err(Violation::InvalidHost);
    }
    if host[0] != b'[' && !host.iter().all(|&b| HOST_BYTE[usize::from(b)]) {
        return Err(Violation::InvalidHost);
    }
    if let Some(port) = port {
        if port.len() > 5 || !port.iter().all(u8::is_ascii_digit) {
            return Err(Violation::InvalidHost);
        }
    }
    Ok(())
}

/// The four target forms (RFC 9112 section 3.2), each only where it belongs.
fn check_target(
    method: &[u8],
    target: &[u8],
    host: Option<&[u8]>,
    connect: bool,
) -> Result<(), Violation> {
    if connect {
        // authority-form; CONNECT itself is refused later, with its own message.
        return Ok(());
    }
    if target[0] == b'/' {
        return Ok(());
    }
    if target == b"*" {
        return if method == b"OPTIONS" {
            Ok(())
        } else {
            Err(Violation::InvalidTarget)
        };
    }
    // absolute-form: `http://authority/...`; the authority must be the Host.
    let lower_scheme =
        |s: &[u8]| target.len() > s.len() && target[..s.len()].eq_ignore_ascii_case(s);
    let rest = if lower_scheme(b"http://") {
        &target[7..]
    } else if lower_scheme(b"https://") {
        &target[8..]
    } else {
        return Err(Violation::InvalidTarget);
    };
    let end = rest
        .iter()
        .position(|&b| b == b'/' || b == b'?' || b == b'#')
        .unwrap_or(rest.len());
    let authority = &rest[..end];
    if authority.contains(&b'@') {
        return Err(Violation::HostUserinfo);
    }
    check_host(authority).map_err(|_| Violation::InvalidTarget)?;
    match host {
        Some(host) if host.eq_ignore_ascii_case(authority) => Ok(()),
        _ => Err(Violation::AbsoluteFormMismatch),
    }
}

/// The framing fields of an HTTP/1.1 origin's response (the origin codec and the health checks
/// both read responses by these rules): one `Transfer-Encoding: chunked` at most, `Content-Length` digits only
/// (repeated only with the same value), never both, and no 101 unless an upgrade was asked for.
/// Returns (chunked, length).
pub fn check_response_fields(
    code: u16,
    upgrade_asked: bool,
    fields: &[httparse::Header<'_>],
) -> Result<(bool, Option<u64>), String> {
    if code == 101 && !upgrade_asked {
        return Err("101 Switching Protocols to a request that asked for no upgrade".into());
    }
    let mut chunked = false;
    let mut length: Option<u64> = None;
    for field in fields {
        let name = field.name.as_bytes();
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if chunked || !field.value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Err(format!(
                    "unsupported transfer-encoding {:?}",
                    String::from_utf8_lossy(field.value)
                ));
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case(b"content-length") {
            let Some(n) = parse_content_length(field.value.trim_ascii()) else {
                return Err("invalid content-length".into());
            };
            if length.is_some_and(|m| m != n) {
                return Err("conflicting content-length fields".into());
            }
            length = Some(n);
        }
    }
    if chunked && length.is_some() {
        return Err("both content-length and transfer-encoding".into());
    }
    Ok((chunked, length))
}

/// Largest origin response head accepted.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Interim (1xx) responses accepted before a final one; more is a misbehaving origin.
pub const MAX_INTERIM: usize = 16;

/// Limits on the parts of a chunked body that are not data.
pub const MAX_CHUNK_EXTRA: usize = 16 * 1024;
/// Hex digits a chunk size may have (15: below 2^60 bytes).
const MAX_CHUNK_DIGITS: u8 = 15;

/// Follows a chunked body's framing (RFC 9112 section 7.1) as it passes through, to find where
/// the message ends; the bytes themselves are relayed unchanged. Strict: sizes are hex digits,
/// extensions follow `*( BWS ";" BWS name [ BWS "=" BWS ( token / quoted-string ) ] )`, trailer
/// fields are `name ":" value`, and every line ends with CRLF.
#[derive(Debug, Default, Clone)]
pub struct ChunkedBody {
    state: ChunkState,
    /// Hex digits of the current size line, and their value so far.
    digits: u8,
    size: u64,
    /// Bytes in the current chunk's extensions or in the trailer section (bounded).
    extra: usize,
    /// Size lines completed so far.
    lines: u64,
}

/// What [`ChunkedBody::decode`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// Bytes of the input judged (framing and data).
    pub consumed: usize,
    /// Chunk data among them (empty when there was none).
    pub data: std::ops::Range<usize>,
    /// The message ended with the consumed bytes.
    pub end: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    /// Whitespace after the size or an extension, before `;` or CR.
    ExtBws,
    /// After `;`, before the name.
    ExtNameStart,
    ExtName,
    /// After the name: `=`, `;` or CR.
    ExtAfterName,
    /// After `=`, before the value.
    ExtValueStart,
    ExtToken,
    ExtQuoted,
    ExtQuotedEscape,
    SizeLf,
    Data(u64),
    DataCr,
    DataLf,
    TrailerStart,
    TrailerName,
    TrailerValue,
    TrailerLf,
    EndLf,
}

impl ChunkedBody {
    /// Takes the next bytes of the body: `Some(n)` when the message ends after `n` of them.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<usize>, Violation> {
        let mut i = 0;
        while i < bytes.len() {
            if let ChunkState::Data(left) = self.state {
                let take = (bytes.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                i += take;
                self.take_data(left, take);
                continue;
            }
            if self.step(bytes[i])? {
                return Ok(Some(i + 1));
            }
            i += 1;
        }
        Ok(None)
    }

    /// Decodes the next bytes of the body: the framing is judged and skipped, and the first
    /// run of chunk data found is returned (as a range of `bytes`), so a caller can hand on
    /// data without the framing. Call again with `bytes[consumed..]` for the rest.
    pub fn decode(&mut self, bytes: &[u8]) -> Result<Decoded, Violation> {
        let mut i = 0;
        while i < bytes.len() {
            if let ChunkState::Data(left) = self.state {
                let take = (bytes.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                self.take_data(left, take);
                return Ok(Decoded {
                    consumed: i + take,
                    data: i..i + take,
                    end: false,
                });
            }
            if self.step(bytes[i])? {
                return Ok(Decoded {
                    consumed: i + 1,
                    data: 0..0,
                    end: true,
                });
            }
            i += 1;
        }
        Ok(Decoded {
            consumed: bytes.len(),
            data: 0..0,
            end: false,
        })
    }

    fn take_data(&mut self, left: u64, take: usize) {
        let left = left - take as u64;
        self.state = if left == 0 {
            ChunkState::DataCr
        } else {
            ChunkState::Data(left)
        };
    }

    /// One byte of framing (anything but chunk data): `true` when the message ends with it.
    fn step(&mut self, b: u8) -> Result<bool, Violation> {
        use ChunkState as S;
        if matches!(
            self.state,
            S::ExtBws
                | S::ExtNameStart
                | S::ExtName
                | S::ExtAfterName
                | S::ExtValueStart
                | S::ExtToken
                | S::ExtQuoted
                | S::ExtQuotedEscape
        ) {
            self.extra += 1;
            if self.extra > MAX_CHUNK_EXTRA {
                return Err(Violation::ChunkExtensionTooLong);
            }
        }
        let bad_ext = Err(Violation::InvalidChunkExtension);
        self.state = match self.state {
            S::Size => {
                if let Some(d) = (b as char).to_digit(16) {
                    self.digits += 1;
                    if self.digits > MAX_CHUNK_DIGITS {
                        return Err(Violation::ChunkSizeTooLarge);
                    }
                    self.size = self.size * 16 + u64::from(d);
                    S::Size
                } else if self.digits == 0 {
                    return Err(Violation::InvalidChunkSize);
                } else if b == b'\r' {
                    S::SizeLf
                } else if b == b';' {
                    self.extra = 0;
                    S::ExtNameStart
                } else if b == b' ' || b == b'\t' {
                    self.extra = 0;
                    S::ExtBws
                } else {
                    return Err(Violation::InvalidChunkSize);
                }
            }
            S::ExtBws => match b {
                b' ' | b'\t' => S::ExtBws,
                b';' => S::ExtNameStart,
                b'\r' => S::SizeLf,
                _ => return bad_ext,
            },
            S::ExtNameStart => match b {
                b' ' | b'\t' => S::ExtNameStart,
                b if is_tchar(b) => S::ExtName,
                _ => return bad_ext,
            },
            S::ExtName => match b {
                b if is_tchar(b) => S::ExtName,
                b' ' | b'\t' => S::ExtAfterName,
                b'=' => S::ExtValueStart,
                b';' => S::ExtNameStart,
                b'\r' => S::SizeLf,
                _ => return bad_ext,
            },
            S::ExtAfterName => match b {
                b' ' | b'\t' => S::ExtAfterName,
                b'=' => S::ExtValueStart,
                b';' => S::ExtNameStart,
                b'\r' => S::SizeLf,
                _ => return bad_ext,
            },
            S::ExtValueStart => match b {
                b' ' | b'\t' => S::ExtValueStart,
                b'"' => S::ExtQuoted,
                b if is_tchar(b) => S::ExtToken,
                _ => return bad_ext,
            },
            S::ExtToken => match b {
                b if is_tchar(b) => S::ExtToken,
                b' ' | b'\t' => S::ExtBws,
                b';' => S::ExtNameStart,
                b'\r' => S::SizeLf,
                _ => return bad_ext,
            },
            S::ExtQuoted => match b {
                b'"' => S::ExtBws,
                b'\\' => S::ExtQuotedEscape,
                b'\t' | b' ' | 0x21 | 0x23..=0x5b | 0x5d..=0x7e | 0x80..=0xff => S::ExtQuoted,
                _ => return bad_ext,
            },
            S::ExtQuotedEscape => match b {
                b'\t' | b' ' | 0x21..=0x7e | 0x80..=0xff => S::ExtQuoted,
                _ => return bad_ext,
            },
            S::SizeLf => {
                if b != b'\n' {
                    return Err(Violation::InvalidChunkSize);
                }
                self.digits = 0;
                self.lines += 1;
                if self.size == 0 {
                    self.extra = 0;
                    S::TrailerStart
                } else {
                    S::Data(self.size)
                }
            }
            S::Data(_) => unreachable!("data is taken by the callers"),
            S::DataCr => {
                if b != b'\r' {
                    return Err(Violation::InvalidChunkData);
                }
                S::DataLf
            }
            S::DataLf => {
                if b != b'\n' {
                    return Err(Violation::InvalidChunkData);
                }
                self.size = 0;
                S::Size
            }
            S::TrailerStart => match b {
                b'\r' => S::EndLf,
                b if is_tchar(b) => {
                    self.trailer_byte()?;
                    S::TrailerName
                }
                _ => return Err(Violation::InvalidTrailer),
            },
            S::TrailerName => {
                self.trailer_byte()?;
                match b {
                    b':' => S::TrailerValue,
                    b if is_tchar(b) => S::TrailerName,
                    _ => return Err(Violation::InvalidTrailer),
                }
            }
            S::TrailerValue => {
                self.trailer_byte()?;
                match b {
                    b'\r' => S::TrailerLf,
                    b if is_value_byte(b) => S::TrailerValue,
                    _ => return Err(Violation::InvalidTrailer),
                }
            }
            S::TrailerLf => {
                if b != b'\n' {
                    return Err(Violation::InvalidTrailer);
                }
                S::TrailerStart
            }
            S::EndLf => {
                if b != b'\n' {
                    return Err(Violation::InvalidTrailer);
                }
                *self = ChunkedBody::default();
                return Ok(true);
            }
        };
        Ok(false)
    }

    fn trailer_byte(&mut self) -> Result<(), Violation> {
        self.extra += 1;
        if self.extra > MAX_CHUNK_EXTRA {
            return Err(Violation::InvalidTrailer);
        }
        Ok(())
    }

    /// Whether the first size line has been read in full (and found valid).
    pub fn first_line_done(&self) -> bool {
        self.lines > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<RequestHead, Violation> {
        let bytes = text.as_bytes();
        let mut scanned = 0;
        match find_head_end(bytes, &mut scanned)? {
            Some(n) => check_request_head(&bytes[..n]),
            None => panic!("incomplete head: {text:?}"),
        }
    }

    #[test]
    fn plain_heads_pass_with_their_framing() {
        let h = head("GET / HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        assert_eq!(h.body, BodyFraming::None);
        let h = head("POST /x HTTP/1.1\r\nHost: a:8080\r\nContent-Length: 12\r\n\r\n").unwrap();
        assert_eq!(h.body, BodyFraming::Length(12));
        let h = head("\r\nPOST /x HTTP/1.1\r\nHost: [::1]:80\r\nTransfer-Encoding: Chunked\r\nExpect: 100-continue\r\n\r\n").unwrap();
        assert_eq!(h.body, BodyFraming::Chunked);
        assert!(h.expect_continue);
        let h = head("GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n").unwrap();
        assert!(h.tunnel);
        assert!(head("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n").is_ok());
        assert!(head("GET http://A.example/x HTTP/1.1\r\nHost: a.example\r\n\r\n").is_ok());
        assert!(head("GET / HTTP/1.0\r\n\r\n").is_ok());
    }

    #[test]
    fn ambiguous_heads_are_refused_with_their_reason() {
        let cases = [
            ("GET / HTTP/1.1\nHost: a\n\n", Violation::BareLf),
            ("GET / HTTP/1.1\r\nHost: a\rx: y\r\n\r\n", Violation::BareCr),
            ("GET / HTTP/1.1\r\nHost: a\r\nx: y\r\n z\r\n\r\n", Violation::ObsFold),
            ("GET  / HTTP/1.1\r\nHost: a\r\n\r\n", Violation::InvalidRequestLine),
            ("G(T / HTTP/1.1\r\nHost: a\r\n\r\n", Violation::InvalidMethod),
            ("GET /\x7f HTTP/1.1\r\nHost: a\r\n\r\n", Violation::InvalidTarget),
            ("GET / HTTP/1.2\r\nHost: a\r\n\r\n", Violation::UnsupportedVersion),
            ("GET / HTTP/1.1\r\nHost: a\r\nnocolon\r\n\r\n", Violation::FieldWithoutColon),
            ("GET / HTTP/1.1\r\nHost : a\r\n\r\n", Violation::WhitespaceBeforeColon),
            ("GET / HTTP/1.1\r\nHo\x00st: a\r\n\r\n", Violation::InvalidFieldName),
            ("GET / HTTP/1.1\r\nHost: a\r\nx: a\x00b\r\n\r\n", Violation::InvalidFieldValue),
            ("GET / HTTP/1.1\r\n\r\n", Violation::MissingHost),
            ("GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", Violation::RepeatedHost),
            ("GET / HTTP/1.1\r\nHost: a b\r\n\r\n", Violation::InvalidHost),
            ("GET / HTTP/1.1\r\nHost: b@a\r\n\r\n", Violation::HostUserinfo),
            ("GET http://b/ HTTP/1.1\r\nHost: a\r\n\r\n", Violation::AbsoluteFormMismatch),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n", Violation::InvalidContentLength),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n", Violation::InvalidContentLength),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", Violation::RepeatedContentLength),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", Violation::UnsupportedTransferEncoding),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", Violation::RepeatedTransferEncoding),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n", Violation::ContentLengthWithTransferEncoding),
            ("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", Violation::TransferEncodingOnHttp10),
            ("GET / HTTP/1.1\r\nHost: a\r\nX-Domicile-Internal-Malformed: bare_lf\r\n\r\n", Violation::ReservedField),
        ];
        for (text, want) in cases {
            assert_eq!(head(text), Err(want), "{text:?}");
        }
    }

    #[test]
    fn a_head_sent_a_byte_at_a_time_is_found_once() {
        let text = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nrest";
        let mut scanned = 0;
        let mut found = None;
        for end in 1..=text.len() {
            if let Some(n) = find_head_end(&text[..end], &mut scanned).unwrap() {
                found = Some(n);
                break;
            }
        }
        assert_eq!(found, Some(text.len() - 4));
    }

    #[test]
    fn chunked_bodies_follow_the_grammar() {
        let good: &[&[u8]] = &[
            b"5\r\nhello\r\n0\r\n\r\n",
            b"5;name=value;flag\r\nhello\r\n0\r\n\r\n",
            b"5 ; q=\"a \\\" b\"\r\nhello\r\n0\r\nx-sum: 1\r\n\r\n",
            b"A\r\n0123456789\r\n0\r\n\r\n",
        ];
        for body in good {
            let mut c = ChunkedBody::default();
            assert_eq!(c.feed(body), Ok(Some(body.len())), "{body:?}");
            // The same bytes one at a time.
            let mut c = ChunkedBody::default();
            let ends: Vec<usize> = (0..body.len())
                .filter(|&i| c.feed(&body[i..=i]).unwrap().is_some())
                .collect();
            assert_eq!(ends, vec![body.len() - 1], "{body:?}");
        }
        let bad: &[(&[u8], Violation)] = &[
            (b"zz\r\nhello\r\n0\r\n\r\n", Violation::InvalidChunkSize),
            (b"-5\r\nhello\r\n", Violation::InvalidChunkSize),
            (b"5\nhello\r\n", Violation::InvalidChunkSize),
            (b"1000000000000000\r\n", Violation::ChunkSizeTooLarge),
            (b"5;\r\nhello\r\n", Violation::InvalidChunkExtension),
            (b"5;a=\"x\r\nhello\r\n", Violation::InvalidChunkExtension),
            (b"5;a\x00\r\n", Violation::InvalidChunkExtension),
            (b"5\r\nhelloXX\r\n", Violation::InvalidChunkData),
            (b"0\r\nbad trailer\r\n\r\n", Violation::InvalidTrailer),
            (b"0\r\n\n", Violation::InvalidTrailer),
        ];
        for (body, want) in bad {
            let mut c = ChunkedBody::default();
            assert_eq!(c.feed(body), Err(*want), "{body:?}");
        }
        let long = format!("5;{}\r\n", "a".repeat(MAX_CHUNK_EXTRA + 1));
        assert_eq!(
            ChunkedBody::default().feed(long.as_bytes()),
            Err(Violation::ChunkExtensionTooLong)
        );
    }

    #[test]
    fn content_length_is_plain_digits_without_overflow() {
        assert_eq!(parse_content_length(b"0"), Some(0));
        assert_eq!(parse_content_length(b"007"), Some(7));
        assert_eq!(
            parse_content_length(b"999999999999999999"),
            Some(999_999_999_999_999_999)
        );
        for bad in [
            &b""[..],
            b"-1",
            b"1 2",
            b"0x10",
            b"9999999999999999999",
            b"1,1",
        ] {
            assert_eq!(parse_content_length(bad), None, "{bad:?}");
        }
    }

    fn feed_all(parts: &[&[u8]]) -> Result<Option<usize>, Violation> {
        let mut body = ChunkedBody::default();
        let mut total = 0;
        for part in parts {
            if let Some(n) = body.feed(part)? {
                return Ok(Some(total + n));
            }
            total += part.len();
        }
        Ok(None)
    }

    #[test]
    fn chunked_end_is_found_across_any_split() {
        let body = b"5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-t: 1\r\n\r\n";
        for split in 0..body.len() {
            let (a, b) = body.split_at(split);
            assert_eq!(feed_all(&[a, b]), Ok(Some(body.len())), "split at {split}");
        }
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(feed_all(&bytes), Ok(Some(body.len())));
        // Bytes after the end are not part of the message.
        let mut more = body.to_vec();
        more.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        assert_eq!(feed_all(&[&more]), Ok(Some(body.len())));
        assert_eq!(feed_all(&[b"0\r\n\r\n"]), Ok(Some(5)));
        assert_eq!(feed_all(&[b"5\r\nhel"]), Ok(None));
    }

    /// Decodes `parts` in order, returning the data and whether the message ended.
    fn decode_all(parts: &[&[u8]]) -> Result<(Vec<u8>, bool), Violation> {
        let mut body = ChunkedBody::default();
        let mut data = Vec::new();
        for part in parts {
            let mut rest = *part;
            while !rest.is_empty() {
                let step = body.decode(rest)?;
                data.extend_from_slice(&rest[step.data.clone()]);
                if step.end {
                    return Ok((data, true));
                }
                rest = &rest[step.consumed..];
            }
        }
        Ok((data, false))
    }

    #[test]
    fn decoding_yields_the_data_alone_across_any_split() {
        let body = b"5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-t: 1\r\n\r\n";
        let want = b"helloabcdefghijklmnopqrstuvwxyz".to_vec();
        for split in 0..body.len() {
            let (a, b) = body.split_at(split);
            assert_eq!(
                decode_all(&[a, b]),
                Ok((want.clone(), true)),
                "split at {split}"
            );
        }
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(decode_all(&bytes), Ok((want, true)));
        assert_eq!(decode_all(&[b"5\r\nhel"]), Ok((b"hel".to_vec(), false)));
        assert_eq!(
            decode_all(&[b"5\r\nhelloX"]),
            Err(Violation::InvalidChunkData)
        );
    }

    #[test]
    fn malformed_chunked_bodies_are_errors() {
        for bad in [
            &b"zz\r\n"[..],
            b"\r\n",
            b"5\r\nhello!\r\n",
            b"5\nhello\r\n",
            b"5\r\nhello\r\r",
            b"1234567890abcdef0\r\n",
            b"0\r\nbad\nline\r\n\r\n",
            b"3;ext\x01\r\nabc\r\n",
        ] {
            assert!(
                feed_all(&[bad]).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
