//! HTTP/1.1 as the origin's client: reading a response head strictly, and following its body
//! to its end.
//!
//! A response whose framing is ambiguous (a length with `Transfer-Encoding`, lengths that
//! disagree, a coding other than `chunked`), a `101` nobody asked for, a head over 64 KiB or
//! more than 16 interim responses is refused: the caller answers 502 and does not reuse the
//! connection. A chunked body is checked chunk by chunk as it passes; bytes after a body's end
//! mean the connection is not reused.

use crate::http::framing::{self, ChunkedBody, Violation, MAX_INTERIM, MAX_RESPONSE_HEAD};

/// Header fields parsed per response head; a head with more is refused.
pub(crate) const MAX_FIELDS: usize = 100;

/// How the origin frames its response body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

/// An origin's final response head, as slices of the buffer it was read into.
#[derive(Debug)]
pub(crate) struct ResponseHead<'a> {
    pub status: u16,
    pub reason: &'a str,
    pub fields: &'a [httparse::Header<'a>],
    /// Where the body starts in the buffer (after interim responses and this head).
    pub body_start: usize,
    pub framing: Framing,
    /// Whether the connection may serve another request afterwards.
    pub reusable: bool,
}

pub(crate) enum Parsed<'a> {
    /// More bytes are needed.
    Partial,
    /// A final head.
    Final(ResponseHead<'a>),
}

/// Parses the response in `buf` (from its start: interim `1xx` responses are skipped, at most
/// [`MAX_INTERIM`] of them). `head_request`: the request was HEAD, so no body follows;
/// `upgrade_asked`: a `101` is an answer.
pub(crate) fn parse_response<'a>(
    buf: &'a [u8],
    fields: &'a mut [httparse::Header<'a>],
    head_request: bool,
    upgrade_asked: bool,
) -> Result<Parsed<'a>, String> {
    // Skip interim responses first, each parsed on its own.
    let mut start = 0;
    let mut interim = 0;
    // Only a status line of 1xx needs the look ahead (most responses have none).
    while buf.len() > start + 9 && buf[start + 9] == b'1' && buf[start..].starts_with(b"HTTP/1.") {
        let mut scratch = [httparse::EMPTY_HEADER; MAX_FIELDS];
        let mut probe = httparse::Response::new(&mut scratch);
        let len = match probe.parse(&buf[start..]) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                if buf.len() - start > MAX_RESPONSE_HEAD {
                    return Err("response head too large".into());
                }
                return Ok(Parsed::Partial);
            }
            Err(e) => return Err(format!("malformed response head: {e}")),
        };
        if len > MAX_RESPONSE_HEAD {
            return Err("response head too large".into());
        }
        match probe.code {
            Some(code) if code != 101 && (100..200).contains(&code) => {
                interim += 1;
                if interim > MAX_INTERIM {
                    return Err("too many interim (1xx) responses".into());
                }
                start += len;
            }
            _ => break,
        }
    }
    let mut response = httparse::Response::new(fields);
    let len = match response.parse(&buf[start..]) {
        Ok(httparse::Status::Complete(n)) => n,
        // A head that never ends is cut off at the limit, not read until the timeout.
        Ok(httparse::Status::Partial) if buf.len() - start > MAX_RESPONSE_HEAD => {
            return Err("response head too large".into())
        }
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(e) => return Err(format!("malformed response head: {e}")),
    };
    if len > MAX_RESPONSE_HEAD {
        return Err("response head too large".into());
    }
    let (Some(version), Some(status)) = (response.version, response.code) else {
        return Err("malformed response head".into());
    };
    let reason = response.reason.unwrap_or("");
    let fields: &'a [httparse::Header<'a>] = response.headers;
    let (chunked, length) = framing::check_response_fields(status, upgrade_asked, fields)?;
    // HTTP/1.0 origins close unless told otherwise; not worth reusing.
    let mut origin_close = version == 0;
    for field in fields {
        if field.name.eq_ignore_ascii_case("connection")
            && field
                .value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
        {
            origin_close = true;
        }
    }
    let framing = if head_request || status == 204 || status == 304 || status == 101 {
        Framing::None
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    Ok(Parsed::Final(ResponseHead {
        status,
        reason,
        fields,
        body_start: start + len,
        framing,
        reusable: !origin_close && framing != Framing::UntilClose && status != 101,
    }))
}

/// Where a response body ends, followed as its bytes pass through.
pub(crate) enum BodyEnd {
    /// After this many more bytes.
    Length(u64),
    /// Chunks, relayed with their framing (`raw`) or decoded to their data.
    Chunked { chunks: ChunkedBody, raw: bool },
    /// When the origin closes the connection.
    Close,
}

/// What [`BodyEnd::take`] found in some bytes.
pub(crate) struct Taken {
    /// Bytes of the input that belong to the body (framing included).
    pub consumed: usize,
    /// The part to hand on: a range of the input.
    pub out: std::ops::Range<usize>,
    /// The body ended with them.
    pub end: bool,
}

impl BodyEnd {
    pub(crate) fn new(framing: Framing, raw_chunks: bool) -> Self {
        match framing {
            Framing::None => BodyEnd::Length(0),
            Framing::Length(n) => BodyEnd::Length(n),
            Framing::Chunked => BodyEnd::Chunked {
                chunks: ChunkedBody::default(),
                raw: raw_chunks,
            },
            Framing::UntilClose => BodyEnd::Close,
        }
    }

    /// Whether the body is already over (no body, or a length of zero).
    pub(crate) fn is_empty(&self) -> bool {
        matches!(self, BodyEnd::Length(0))
    }

    /// Takes the next bytes of the body. Decoded chunks yield one run of data at a time: call
    /// again with the rest (`bytes[consumed..]`).
    pub(crate) fn take(&mut self, bytes: &[u8]) -> Result<Taken, Violation> {
        match self {
            BodyEnd::Length(left) => {
                let n = bytes
                    .len()
                    .min(usize::try_from(*left).unwrap_or(usize::MAX));
                *left -= n as u64;
                Ok(Taken {
                    consumed: n,
                    out: 0..n,
                    end: *left == 0,
                })
            }
            BodyEnd::Chunked { chunks, raw: true } => Ok(match chunks.feed(bytes)? {
                Some(end) => Taken {
                    consumed: end,
                    out: 0..end,
                    end: true,
                },
                None => Taken {
                    consumed: bytes.len(),
                    out: 0..bytes.len(),
                    end: false,
                },
            }),
            BodyEnd::Chunked { chunks, raw: false } => {
                let step = chunks.decode(bytes)?;
                Ok(Taken {
                    consumed: step.consumed,
                    out: step.data,
                    end: step.end,
                })
            }
            BodyEnd::Close => Ok(Taken {
                consumed: bytes.len(),
                out: 0..bytes.len(),
                end: false,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &[u8]) -> Result<(u16, Framing, bool, usize), String> {
        let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
        match parse_response(text, &mut fields, false, false)? {
            Parsed::Partial => Err("partial".into()),
            Parsed::Final(head) => Ok((head.status, head.framing, head.reusable, head.body_start)),
        }
    }

    #[test]
    fn framings() {
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc").unwrap(),
            (200, Framing::Length(3), true, 38)
        );
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                .unwrap()
                .1,
            Framing::Chunked
        );
        let (_, framing, reusable, _) = parse(b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
        assert_eq!((framing, reusable), (Framing::UntilClose, false));
        let (_, _, reusable, _) =
            parse(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n").unwrap();
        assert!(!reusable);
        // Interim responses are skipped.
        let (status, _, _, start) =
            parse(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n").unwrap();
        assert_eq!((status, start), (204, 52));
    }

    #[test]
    fn ambiguous_responses_are_refused() {
        for bad in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
        ] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let interim = b"HTTP/1.1 102 Processing\r\n\r\n".repeat(17);
        assert!(parse(&interim).is_err());
    }

    #[test]
    fn decoded_chunks_leave_the_framing_behind() {
        let body = b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\nextra";
        let mut end = BodyEnd::new(Framing::Chunked, false);
        let mut rest = &body[..];
        let mut data = Vec::new();
        loop {
            let taken = end.take(rest).unwrap();
            data.extend_from_slice(&rest[taken.out.clone()]);
            rest = &rest[taken.consumed..];
            if taken.end {
                break;
            }
        }
        assert_eq!(data, b"abcde");
        assert_eq!(rest, b"extra");
        let mut raw = BodyEnd::new(Framing::Chunked, true);
        let taken = raw.take(body).unwrap();
        assert!(taken.end);
        assert_eq!(&body[taken.out], b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n");
    }
}
