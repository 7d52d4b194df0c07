//! Entry points for the fuzz targets in `proxy/fuzz/`, kept here so that the seed corpus runs
//! as an ordinary test too (`tests/fuzz_corpus.rs`). Each takes arbitrary bytes, must never
//! panic, and checks what must hold for any input.

use std::path::Path;

use crate::config::{ProxyConfig, Rule};
use crate::framing::{self, ChunkedBody};
use crate::identify::{Headers, Identifier, Identity, RequestView};
use crate::map::Replica;
use crate::mapfile::MapBuilder;
use crate::workspace_id::WorkspaceId;

/// Request heads and chunked bodies: the framing rules never panic, a head found in one piece
/// is found the same when it arrives a byte at a time, and a head that passes is framed once.
pub fn framing(data: &[u8]) {
    let mut scanned = 0;
    let whole = framing::find_head_end(data, &mut scanned);
    let mut scanned = 0;
    let mut piecewise = Ok(None);
    for end in 1..=data.len().min(4096) {
        piecewise = framing::find_head_end(&data[..end], &mut scanned);
        if !matches!(piecewise, Ok(None)) {
            break;
        }
    }
    if data.len() <= 4096 {
        assert_eq!(
            whole, piecewise,
            "a head split into bytes reads differently"
        );
    }
    if let Ok(Some(end)) = whole {
        if let Ok(head) = framing::check_request_head(&data[..end]) {
            assert_eq!(head.len, end);
            if head.body == framing::BodyFraming::Chunked {
                let body = &data[end..];
                let whole = ChunkedBody::default().feed(body);
                let mut chunks = ChunkedBody::default();
                let mut split = Ok(None);
                for (i, byte) in body.iter().enumerate() {
                    match chunks.feed(std::slice::from_ref(byte)) {
                        Ok(Some(_)) => {
                            split = Ok(Some(i + 1));
                            break;
                        }
                        Ok(None) => {}
                        Err(e) => {
                            split = Err(e);
                            break;
                        }
                    }
                }
                assert_eq!(
                    whole, split,
                    "a chunked body split into bytes reads differently"
                );
            }
        }
    }
}

fn rules() -> Vec<Rule> {
    vec![
        Rule::Host {
            pattern: "{workspace}.app.example.com".into(),
        },
        Rule::Path {
            pattern: "/workspaces/{workspace}/".into(),
        },
        Rule::Header {
            name: "x-workspace-id".into(),
        },
        Rule::Query {
            name: "app_id".into(),
        },
    ]
}

/// Identification: host, path, query and header values split from the input by NUL bytes.
/// Whatever is found is a valid workspace id, and the same request always gives the same
/// answer.
pub fn identify(data: &[u8]) {
    let identifier = Identifier::new(&rules()).expect("fixed rules compile");
    let mut parts = data.split(|&b| b == 0);
    let host = parts.next().and_then(|p| std::str::from_utf8(p).ok());
    let path = parts
        .next()
        .and_then(|p| std::str::from_utf8(p).ok())
        .unwrap_or("/");
    let query = parts.next().and_then(|p| std::str::from_utf8(p).ok());
    let values: Vec<&[u8]> = parts.collect();
    let fields: Vec<httparse::Header<'_>> = values
        .iter()
        .map(|value| httparse::Header {
            name: "x-workspace-id",
            value,
        })
        .collect();
    let request = RequestView {
        host,
        path,
        query,
        headers: Headers::Raw(&fields),
    };
    let first = identifier.identify(&request);
    if let Identity::Workspace(id) = &first {
        let again = WorkspaceId::parse(id.as_bytes()).expect("an identified id is valid");
        assert_eq!(again.as_bytes(), id.as_bytes(), "ids are normal forms");
    }
    assert_eq!(
        format!("{first:?}"),
        format!("{:?}", identifier.identify(&request))
    );
}

/// Proxy configuration text: parsed and validated without panicking. Paths resolve against a
/// directory that does not exist, so nothing outside is read.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = ProxyConfig::from_toml(text, Path::new("/nonexistent/domicile-fuzz"));
}

/// A map snapshot (JSON lines, as the control plane and map files send it): taken line by
/// line, and either refused with errors or loaded with as many entries as its lines held.
pub fn snapshot(data: &[u8]) {
    let replica = Replica::new();
    let mut builder = MapBuilder::new(&replica, 0);
    let mut lines = 0;
    for line in data.split(|&b| b == b'\n') {
        lines += 1;
        builder.line(&String::from_utf8_lossy(line));
    }
    if let Ok(loaded) = builder.finish(Path::new("fuzz-snapshot")) {
        assert!(loaded.table.len() <= lines, "more entries than lines");
    }
}
