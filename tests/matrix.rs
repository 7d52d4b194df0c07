//! Every client protocol × every origin protocol: HTTP/1.1 and HTTP/2, cleartext and TLS, on
//! both sides. An origin sees the same request whichever way the client came, and the same
//! fields whichever way the proxy reaches it, apart from what each protocol must carry
//! differently (named below).

mod common;

use bytes::Bytes;
use common::tls::*;
use common::*;
use domicile::origin::Origin;
use serde_json::Value;

/// The ways a client reaches the proxy.
const CLIENTS: [(&str, bool, bool); 4] = [
    // (name, TLS, HTTP/2)
    ("http1", false, false),
    ("h2c", false, true),
    ("https-http1", true, false),
    ("https-h2", true, true),
];

/// The ways the proxy reaches an origin: (name, TLS, HTTP/2).
const ORIGINS: [(&str, bool, bool); 4] = [
    ("http1", false, false),
    ("h2c", false, true),
    ("tls-http1", true, false),
    ("tls-h2", true, true),
];

/// A proxy with an HTTPS listener whose region `us` is one origin spoken to as `origin`.
async fn proxy_to(origin: (&str, bool, bool)) -> (Origin, TestProxy) {
    let (_, tls, h2) = origin;
    let builder = proxy();
    let layout = pki(builder.dir());
    let mut extra = String::from("health = { enabled = false }\n");
    if h2 {
        extra.push_str("protocol = \"h2c\"\n");
    }
    let us = if tls {
        extra.push_str(&origin_tls(&layout, "us.region.example.test"));
        let (cert, key) = layout.origin("us");
        Origin::start_tls("us", LOOPBACK, &cert, &key, Some(&layout.ca()))
            .await
            .unwrap()
    } else {
        Origin::start("us", LOOPBACK).await.unwrap()
    };
    let proxy = builder
        .route_addrs("us", &[us.addr], &extra)
        .section(&tls_section(&[layout.edge()], ""))
        .start()
        .await;
    (us, proxy)
}

async fn client(proxy: &TestProxy, (_, tls, h2): (&str, bool, bool)) -> Sender {
    if !tls {
        return Sender::cleartext(proxy.addr(), h2).await;
    }
    let ca = proxy.dir.path().join("certs/ca.pem");
    let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[b"http/1.1"] };
    let session = handshake(
        proxy.running.tls_addr.expect("https address"),
        "acme.localhost",
        client_config(&ca, alpn),
    )
    .await
    .expect("handshake");
    assert_eq!(session.alpn().as_deref() == Some(b"h2"), h2);
    Sender::open(session).await
}

/// What the origin saw of one upload, with the fields that differ by design between clients
/// taken out and checked: the request id (fresh each time) and the protocol the client used.
async fn seen(sender: &mut Sender, (_, tls, h2): (&str, bool, bool)) -> Value {
    let mut headers = vec![
        ("accept", "*/*"),
        ("user-agent", "matrix/1"),
        ("te", "trailers"),
        ("x-forwarded-for", "6.6.6.6"),
        ("x-domicile-region", "eu"),
        ("x-domicile-epoch", "999"),
        ("forwarded", "for=6.6.6.6"),
        ("connection", "x-hop"),
        ("x-hop", "dropped"),
    ];
    if h2 {
        // HTTP/2 clients may split cookies into several fields (RFC 9113 section 8.2.3);
        // HTTP/2 has no `Connection`.
        headers.retain(|(k, _)| !matches!(*k, "connection" | "x-hop"));
        headers.extend([("cookie", "a=1"), ("cookie", "b=2")]);
    } else {
        headers.push(("cookie", "a=1; b=2"));
    }
    let reply = sender
        .send(
            "POST",
            "acme.localhost",
            "/upload?q=1",
            &headers,
            Bytes::from_static(b"hello world"),
        )
        .await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert!(
        reply.headers.get("x-request-id").is_some(),
        "the client gets the request id"
    );
    let mut json = reply.json();
    let headers = json["headers"].as_object_mut().unwrap();
    let id = headers.remove("x-request-id").expect("request id");
    assert_eq!(id.as_str().unwrap().len(), 32);
    let proto = if tls { "https" } else { "http" };
    assert_eq!(headers.remove("x-forwarded-proto").unwrap(), proto);
    let forwarded = headers["forwarded"].as_str().unwrap().to_owned();
    assert!(forwarded.contains(&format!("proto={proto}")), "{forwarded}");
    headers.insert(
        "forwarded".into(),
        forwarded
            .replace(&format!("proto={proto}"), "proto=*")
            .into(),
    );
    json
}

#[tokio::test]
async fn origins_see_one_request_from_every_client_protocol_over_every_origin_protocol() {
    let mut by_origin = Vec::new();
    for origin in ORIGINS {
        let (us, proxy) = proxy_to(origin).await;
        let mut views = Vec::new();
        for client_kind in CLIENTS {
            let mut sender = client(&proxy, client_kind).await;
            // Twice on one connection: the second rides reused connections on both sides.
            for _ in 0..2 {
                let view = seen(&mut sender, client_kind).await;
                views.push((client_kind.0, view));
            }
        }
        let (first_client, first) = &views[0];
        for (name, view) in &views[1..] {
            assert_eq!(
                view, first,
                "origin {}: client {name} differs from {first_client}",
                origin.0
            );
        }
        let view = first.clone();
        assert_eq!(view["method"], "POST");
        assert_eq!(view["path"], "/upload");
        assert_eq!(view["body_bytes"], 11);
        let headers = &view["headers"];
        // The client's own forwarding claims are replaced, the proxy's own fields stripped and
        // set from the map, cookies joined into one field, hop-by-hop fields dropped.
        assert_eq!(headers["x-forwarded-for"], "127.0.0.1", "{view}");
        assert_eq!(headers["x-domicile-region"], "us", "{view}");
        assert_eq!(headers["x-domicile-epoch"], "3", "{view}");
        assert_eq!(headers["cookie"], "a=1; b=2", "{view}");
        assert_eq!(headers["user-agent"], "matrix/1");
        assert_eq!(headers["te"], "trailers", "{view}");
        assert!(headers.get("x-hop").is_none(), "{view}");
        assert!(headers.get("connection").is_none(), "{view}");
        assert_eq!(us.seen_requests().len(), 8);
        proxy.running.shutdown().await;
        by_origin.push((origin, view));
    }
    // Across origin protocols the fields are the same but for where the client's host goes:
    // `Host` to HTTP/1.1 origins, `:authority` to HTTP/2 origins; and in `Forwarded` on every
    // protocol.
    let strip = |view: &Value| {
        let mut headers = view["headers"].as_object().unwrap().clone();
        let host = headers.remove("host");
        (headers, host, view["authority"].clone())
    };
    let (first_fields, _, _) = strip(&by_origin[0].1);
    for ((name, _, h2), view) in &by_origin {
        let (fields, host, authority) = strip(view);
        assert_eq!(fields, first_fields, "origin {name}");
        assert!(
            fields["forwarded"]
                .as_str()
                .unwrap()
                .contains("host=\"acme.localhost\""),
            "{fields:?}"
        );
        if *h2 {
            assert_eq!(authority, "acme.localhost", "{view}");
            assert!(host.is_none(), "{view}");
        } else {
            assert_eq!(host.unwrap(), "acme.localhost", "{view}");
            assert!(authority.is_null(), "{view}");
        }
    }
}

#[tokio::test]
async fn large_uploads_and_downloads_cross_every_pair_whole() {
    const SIZE: usize = 3 << 20;
    let upload = Bytes::from(vec![b'u'; SIZE]);
    for origin in ORIGINS {
        let (us, proxy) = proxy_to(origin).await;
        for client_kind in CLIENTS {
            let what = format!("client {} to origin {}", client_kind.0, origin.0);
            let mut sender = client(&proxy, client_kind).await;
            // Past every flow-control window and buffer on the way, in both directions.
            let reply = sender
                .send("PUT", "acme.localhost", "/big", &[], upload.clone())
                .await;
            assert_eq!(reply.status, 200, "{what}");
            assert_eq!(reply.json()["body_bytes"], SIZE, "{what}");
            let reply = sender
                .send(
                    "GET",
                    "acme.localhost",
                    &format!("/bytes/{SIZE}"),
                    &[],
                    Bytes::new(),
                )
                .await;
            assert_eq!(reply.status, 200, "{what}");
            assert_eq!(reply.body.len(), SIZE, "{what}");
        }
        assert_eq!(us.seen_requests().len(), 8);
        proxy.running.shutdown().await;
    }
}
