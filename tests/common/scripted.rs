//! A scripted origin: raw bytes for each request head, for origin misbehaviour tests.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::LOOPBACK;

/// An origin that answers each request head with `reply(head)`, closing after it when the
/// reply says so. Counts connections and keeps the heads it received.
pub struct Scripted {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicU64>,
    pub heads: Arc<Mutex<Vec<String>>>,
}

/// The reply to one request head: the bytes, and whether to close after them.
pub type Script = fn(&str) -> (Vec<u8>, bool);

pub async fn scripted(reply: Script) -> Scripted {
    scripted_with(reply, Duration::ZERO, None).await
}

/// As [`scripted`], answering after `delay`, and closing a connection that stays idle for
/// `idle_close` (as servers with a keep-alive timeout do).
pub async fn scripted_with(
    reply: Script,
    delay: Duration,
    idle_close: Option<Duration>,
) -> Scripted {
    let listener = TcpListener::bind(LOOPBACK).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let heads = Arc::new(Mutex::new(Vec::new()));
    let (counter, seen) = (accepted.clone(), heads.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            counter.fetch_add(1, Ordering::SeqCst);
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut pending = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&pending[..end + 4]).into_owned();
                        pending.drain(..end + 4);
                        let (bytes, close) = reply(&head);
                        seen.lock().unwrap().push(head);
                        tokio::time::sleep(delay).await;
                        if stream.write_all(&bytes).await.is_err() || close {
                            return;
                        }
                    }
                    let read = stream.read(&mut buf);
                    let read = match idle_close {
                        Some(idle) => match tokio::time::timeout(idle, read).await {
                            Ok(read) => read,
                            Err(_) => return,
                        },
                        None => read.await,
                    };
                    match read {
                        Ok(0) | Err(_) => return,
                        Ok(n) => pending.extend_from_slice(&buf[..n]),
                    }
                }
            });
        }
    });
    Scripted {
        addr,
        accepted,
        heads,
    }
}
