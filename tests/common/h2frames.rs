//! HTTP/2 written by hand, for peers that send what no well-behaved library would: frames,
//! header blocks, a frame reader, and a scripted HTTP/2 origin.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::LOOPBACK;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const GOAWAY: u8 = 0x7;
pub const CONTINUATION: u8 = 0x9;
pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A frame: type, flags, stream, payload.
pub type Frame = (u8, u8, u32, Vec<u8>);

/// HPACK integer with an `n`-bit prefix (RFC 7541 section 5.1).
pub fn hpack_int(out: &mut Vec<u8>, first: u8, n: u8, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128 + 128) as u8);
        value /= 128;
    }
    out.push(value as u8);
}

/// A header block of literal fields without indexing (no Huffman), so any byte can be sent.
pub fn header_block(fields: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        hpack_int(&mut out, 0, 7, name.len());
        out.extend_from_slice(name);
        hpack_int(&mut out, 0, 7, value.len());
        out.extend_from_slice(value);
    }
    out
}

pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// The client's preface, its SETTINGS and one request head on stream 1 (`:scheme http`,
/// `:authority acme.localhost`), with `flags` on the HEADERS frame.
pub fn request_start(method: &[u8], path: &[u8], extra: &[(&[u8], &[u8])], flags: u8) -> Vec<u8> {
    let mut fields: Vec<(&[u8], &[u8])> = vec![
        (b":method", method),
        (b":scheme", b"http"),
        (b":authority", b"acme.localhost"),
        (b":path", path),
    ];
    fields.extend_from_slice(extra);
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(SETTINGS, 0, 0, &[]));
    bytes.extend(frame(
        HEADERS,
        END_HEADERS | flags,
        1,
        &header_block(&fields),
    ));
    bytes
}

/// Takes the whole frames off the front of `buf`.
pub fn split_frames(buf: &mut Vec<u8>, frames: &mut Vec<Frame>) {
    while buf.len() >= 9 {
        let len = (buf[0] as usize) << 16 | (buf[1] as usize) << 8 | buf[2] as usize;
        if buf.len() < 9 + len {
            break;
        }
        let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
        frames.push((buf[3], buf[4], stream, buf[9..9 + len].to_vec()));
        buf.drain(..9 + len);
    }
}

/// Reads frames until the connection closes (true) or `wait` passes without one (false).
pub async fn read_frames(stream: &mut TcpStream, wait: Duration) -> (Vec<Frame>, bool) {
    let mut buf = Vec::new();
    let mut frames = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        split_frames(&mut buf, &mut frames);
        match tokio::time::timeout(wait, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (frames, true),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => return (frames, false),
        }
    }
}

/// What a scripted HTTP/2 origin does when a request's head arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum H2Script {
    /// Closes the connection: the request may have been processed.
    Close,
    /// Never answers.
    Hang,
    /// Resets the stream with REFUSED_STREAM: not processed (RFC 9113 section 8.7).
    Refuse,
    /// GOAWAY with last stream 0: the request was not processed.
    GoAway,
    /// A response header block that does not decode: a connection error.
    BadHeaders,
}

/// An HTTP/2 (prior knowledge) origin that answers every request by `script`; counts
/// connections and the request heads that reached it.
pub struct ScriptedH2 {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicU64>,
    pub requests: Arc<AtomicU64>,
}

pub async fn scripted_h2(script: H2Script) -> ScriptedH2 {
    let listener = TcpListener::bind(LOOPBACK).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let requests = Arc::new(AtomicU64::new(0));
    let (counter, heads) = (accepted.clone(), requests.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve_h2(stream, script, heads.clone()));
        }
    });
    ScriptedH2 {
        addr,
        accepted,
        requests,
    }
}

async fn serve_h2(mut stream: TcpStream, script: H2Script, requests: Arc<AtomicU64>) {
    if stream.write_all(&frame(SETTINGS, 0, 0, &[])).await.is_err() {
        return;
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    let mut preface = false;
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if !preface {
            if buf.len() < PREFACE.len() {
                continue;
            }
            assert_eq!(&buf[..PREFACE.len()], PREFACE, "client preface");
            buf.drain(..PREFACE.len());
            preface = true;
        }
        let mut frames = Vec::new();
        split_frames(&mut buf, &mut frames);
        for (kind, flags, id, _) in frames {
            let reply = match kind {
                SETTINGS if flags & ACK == 0 => frame(SETTINGS, ACK, 0, &[]),
                HEADERS => {
                    requests.fetch_add(1, Ordering::SeqCst);
                    match script {
                        H2Script::Close => return,
                        H2Script::Hang => continue,
                        H2Script::Refuse => frame(RST_STREAM, 0, id, &7u32.to_be_bytes()),
                        H2Script::GoAway => {
                            let mut payload = 0u32.to_be_bytes().to_vec();
                            payload.extend_from_slice(&0u32.to_be_bytes());
                            frame(GOAWAY, 0, 0, &payload)
                        }
                        // Index 0 of the HPACK tables does not exist (RFC 7541 section 6.1).
                        H2Script::BadHeaders => frame(HEADERS, END_HEADERS, id, &[0x80]),
                    }
                }
                _ => continue,
            };
            if stream.write_all(&reply).await.is_err() {
                return;
            }
        }
    }
}
