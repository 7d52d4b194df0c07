//! Resource bounds: many idle connections, their memory, and the connection cap.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CONNECTIONS: usize = 10_000;

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Opens a connection, sends one keep-alive request and reads its whole response: the
/// connection is then idle, as a browser's is between requests.
async fn idle_connection(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /x HTTP/1.1\r\nHost: acme.localhost\r\n\r\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await.expect("read");
        assert!(n > 0, "closed before the response: {got:?}");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_owned)
                })
                .and_then(|v| v.trim().parse().ok())
                .expect("content-length");
            if body.len() >= length {
                return stream;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_connections_stay_within_memory_and_the_cap_refuses_the_next() {
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .maximum
        .unwrap_or(u64::MAX);
    let need = CONNECTIONS as u64 + 1_024;
    assert!(
        hard >= need,
        "this test needs an open-file limit of {need} (ulimit -Hn is {hard})"
    );
    rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(hard),
            maximum: Some(hard),
        },
    )
    .expect("raise the soft open-file limit");

    let us = origin("us").await;
    let (config, _dir) = proxy()
        .route("us", &[&us])
        .proxy_section("workers = 1")
        .limits(&format!(
            "max_connections = {CONNECTIONS}\nidle_timeout = \"300s\"\nheader_read_timeout = \"300s\""
        ))
        .write();
    let mut child = Owned(
        Command::new(BIN)
            .args(["proxy", "--config"])
            .arg(&config)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the proxy"),
    );
    let (line, _) = wait_for_line(&mut child.0, "domicile proxy listening on");
    let addr = addr_after(&line, "on http://");
    let pid = child.pid();

    // Warm up (runtime, pools, buffers), then measure from there.
    let warm: Vec<TcpStream> =
        futures_util::future::join_all((0..64).map(|_| idle_connection(addr))).await;
    drop(warm);
    let before = rss_kib(pid);

    let mut open = Vec::with_capacity(CONNECTIONS);
    while open.len() < CONNECTIONS {
        let batch = (CONNECTIONS - open.len()).min(200);
        open.extend(
            futures_util::future::join_all((0..batch).map(|_| idle_connection(addr))).await,
        );
    }
    let after = rss_kib(pid);
    let per_connection = (after.saturating_sub(before)) * 1024 / CONNECTIONS as u64;
    eprintln!(
        "memory per idle connection: {per_connection} bytes (RSS {before} KiB -> {after} KiB with {CONNECTIONS} idle keep-alive connections)"
    );
    assert!(
        per_connection < 16 * 1024,
        "an idle connection costs {per_connection} bytes"
    );

    // One more is over the cap: answered 503 at once, not left hanging.
    let answer = raw(
        addr,
        b"GET /x HTTP/1.1\r\nHost: acme.localhost\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(raw_status(&answer), Some(503), "{answer}");
    assert!(
        answer.contains("x-domicile-refusal: overloaded"),
        "{answer}"
    );
    assert!(answer.contains("retry-after: 1"), "{answer}");

    // The connections held are still served.
    let mut first = open.swap_remove(0);
    first
        .write_all(b"GET /again HTTP/1.1\r\nHost: acme.localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut again = Vec::new();
    first.read_to_end(&mut again).await.unwrap();
    assert!(
        again.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&again)
    );

    // Once they go, new clients are served again.
    drop(open);
    let served = eventually(Duration::from_secs(20), || {
        std::net::TcpStream::connect(addr)
            .and_then(|mut s| {
                use std::io::{Read, Write};
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                s.write_all(
                    b"GET /x HTTP/1.1\r\nHost: acme.localhost\r\nConnection: close\r\n\r\n",
                )?;
                let mut out = Vec::new();
                s.read_to_end(&mut out)?;
                Ok(out.starts_with(b"HTTP/1.1 200"))
            })
            .unwrap_or(false)
    })
    .await;
    assert!(
        served,
        "new connections are served once the old ones closed"
    );
    let exit = child.terminate();
    assert!(exit.success(), "{exit:?}");
}
