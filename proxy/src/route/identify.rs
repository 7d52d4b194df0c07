//! Identify: which workspace a request belongs to, from the configured rules.
//!
//! Every rule is evaluated; every rule that finds an id must agree, because one request must not
//! touch two workspaces' data. This module only reads the request: it never looks at the map and
//! never allocates.

use crate::config::{Pattern, Rule};
use crate::http::Fields;
use crate::route::workspace_id::{InvalidId, WorkspaceId};

/// Where an id was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Host,
    Path,
    Header(usize),
    Query(usize),
}

/// The outcome of identification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    /// No rule found an id.
    None,
    /// Every rule that found an id found this one.
    Workspace(WorkspaceId),
    /// A rule found something that is not a valid id.
    Invalid { source: Source, reason: InvalidId },
    /// Two rules (or two values) found different ids.
    Conflict {
        first: WorkspaceId,
        second: WorkspaceId,
    },
}

impl Identity {
    /// Combines the reading of the normalized path (`normalized`) with the reading of the raw
    /// path (`raw`): two different workspaces conflict, and a workspace found by either reading
    /// is the request's. An id the raw reading cannot parse (still percent-encoded) is no id:
    /// no origin can serve a workspace by that name.
    pub fn agree(normalized: Identity, raw: Identity) -> Identity {
        let raw = match raw {
            Identity::Invalid { .. } => Identity::None,
            other => other,
        };
        match (normalized, raw) {
            (settled @ (Identity::Invalid { .. } | Identity::Conflict { .. }), _) => settled,
            (_, conflict @ Identity::Conflict { .. }) => conflict,
            (Identity::Workspace(first), Identity::Workspace(second)) if first != second => {
                Identity::Conflict { first, second }
            }
            (Identity::Workspace(id), _) | (_, Identity::Workspace(id)) => Identity::Workspace(id),
            _ => Identity::None,
        }
    }
}

/// The parts of a request identification reads.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// Host without port, from the URI authority or the `Host` header.
    pub host: Option<&'a str>,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: Fields<'a>,
}

/// The path as an origin that normalizes paths would see it, for matching path rules: percent-
/// encoded unreserved characters decoded, encoded slashes (`%2F`) and backslashes (`%5C`, `\`)
/// taken as separators (as servers that decode before they route do), `.` and `..` segments
/// resolved, runs of `/` collapsed.
/// Without that, `//w/globex/x` or `/x/../w/%67lobex/` would escape a `/w/{workspace}/` rule and
/// be routed as unidentified while the origin serves them as globex's. Borrowed (no allocation)
/// when the path is already normal.
pub fn normalized_path(path: &str) -> std::borrow::Cow<'_, str> {
    let needs_work =
        path.contains('%') || path.contains("//") || path.contains("/.") || path.contains('\\');
    if !needs_work {
        return std::borrow::Cow::Borrowed(path);
    }
    // Decode %XX only where XX is an unreserved character (RFC 3986 2.3); keep the rest encoded.
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                let c = (hi * 16 + lo) as u8;
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                    decoded.push(c);
                    i += 3;
                    continue;
                }
                if c == b'/' || c == b'\\' {
                    decoded.push(b'/');
                    i += 3;
                    continue;
                }
            }
        }
        decoded.push(if bytes[i] == b'\\' { b'/' } else { bytes[i] });
        i += 1;
    }
    let decoded = String::from_utf8_lossy(&decoded);
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            other => segments.push(other),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if out.is_empty()
        || decoded.ends_with('/')
        || decoded.ends_with("/.")
        || decoded.ends_with("/..")
    {
        out.push('/');
    }
    std::borrow::Cow::Owned(out)
}

/// Compiled identification rules.
#[derive(Debug, Clone, Default)]
pub struct Identifier {
    rules: Vec<Pattern>,
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    (s.len() >= prefix.len()
        && s.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes()))
    .then(|| &s[prefix.len()..])
}

fn strip_suffix_ignore_case<'a>(s: &'a str, suffix: &str) -> Option<&'a str> {
    let cut = s.len().checked_sub(suffix.len())?;
    (s.as_bytes()[cut..].eq_ignore_ascii_case(suffix.as_bytes()) && s.is_char_boundary(cut))
        .then(|| &s[..cut])
}

impl Identifier {
    pub fn new(rules: &[Rule]) -> Result<Self, String> {
        Ok(Self {
            rules: rules
                .iter()
                .map(crate::config::compile_rule)
                .collect::<Result<_, _>>()?,
        })
    }

    /// Finds the request's workspace.
    pub fn identify(&self, request: &RequestView<'_>) -> Identity {
        let mut found: Option<WorkspaceId> = None;
        let mut conflict = None;
        let mut consider = |source: Source, raw: &[u8]| -> Option<Identity> {
            match WorkspaceId::parse(raw) {
                Err(reason) => Some(Identity::Invalid { source, reason }),
                Ok(id) => {
                    match found {
                        None => found = Some(id),
                        Some(first) if first != id && conflict.is_none() => {
                            conflict = Some(Identity::Conflict { first, second: id })
                        }
                        Some(_) => {}
                    }
                    None
                }
            }
        };
        for (i, rule) in self.rules.iter().enumerate() {
            let invalid = match rule {
                Pattern::Host { prefix, suffix } => request
                    .host
                    .and_then(|host| strip_prefix_ignore_case(host, prefix))
                    .and_then(|rest| strip_suffix_ignore_case(rest, suffix))
                    .filter(|label| !label.contains('.'))
                    .and_then(|label| consider(Source::Host, label.as_bytes())),
                Pattern::Path { prefix, suffix } => strip_prefix_ignore_case(request.path, prefix)
                    .and_then(|rest| {
                        let end = rest.find('/').unwrap_or(rest.len());
                        let (segment, after) = rest.split_at(end);
                        let tail_ok = after.starts_with(suffix.as_str())
                            || (after.is_empty() && suffix == "/");
                        (tail_ok && !segment.is_empty()).then_some(segment)
                    })
                    .and_then(|segment| consider(Source::Path, segment.as_bytes())),
                Pattern::Header(name) => {
                    let mut invalid = None;
                    for value in request.headers.values(name.as_str()) {
                        if let Some(bad) = consider(Source::Header(i), value.trim_ascii()) {
                            invalid.get_or_insert(bad);
                        }
                    }
                    invalid
                }
                Pattern::Query(name) => {
                    let mut invalid = None;
                    if let Some(query) = request.query {
                        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
                            if key == name.as_str() {
                                if let Some(bad) = consider(Source::Query(i), value.as_bytes()) {
                                    invalid.get_or_insert(bad);
                                }
                            }
                        }
                    }
                    invalid
                }
            };
            if let Some(invalid) = invalid {
                return invalid;
            }
        }
        if let Some(conflict) = conflict {
            return conflict;
        }
        found.map_or(Identity::None, Identity::Workspace)
    }

    /// Describes where an id came from, for refusal messages.
    pub fn describe(&self, source: Source) -> String {
        match (source, &self.rules[..]) {
            (Source::Host, _) => "the host".to_owned(),
            (Source::Path, _) => "the path".to_owned(),
            (Source::Header(i), rules) | (Source::Query(i), rules) => match rules.get(i) {
                Some(Pattern::Header(name)) => format!("header {name}"),
                Some(Pattern::Query(name)) => format!("query parameter {name}"),
                _ => "a rule".to_owned(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::compile_rule;
    use http::{HeaderMap, HeaderValue};

    fn demo() -> Identifier {
        Identifier::new(&[
            Rule::Host {
                pattern: "{workspace}.app.example.com".into(),
            },
            Rule::Path {
                pattern: "/w/{workspace}/".into(),
            },
            Rule::Header {
                name: "x-workspace-id".into(),
            },
            Rule::Query {
                name: "app_id".into(),
            },
        ])
        .unwrap()
    }

    fn ws(s: &str) -> Identity {
        Identity::Workspace(WorkspaceId::parse(s.as_bytes()).unwrap())
    }

    struct Case {
        host: Option<&'static str>,
        path: &'static str,
        query: Option<&'static str>,
        headers: &'static [&'static str],
        want: Identity,
    }

    fn run(case: &Case) -> Identity {
        let mut headers = HeaderMap::new();
        for value in case.headers {
            headers.append("x-workspace-id", HeaderValue::from_static(value));
        }
        demo().identify(&RequestView {
            host: case.host,
            path: case.path,
            query: case.query,
            headers: Fields::Map(&headers),
        })
    }

    #[test]
    fn table() {
        let acme = WorkspaceId::parse(b"acme").unwrap();
        let globex = WorkspaceId::parse(b"globex").unwrap();
        let cases = [
            // Each source alone.
            Case {
                host: Some("acme.app.example.com"),
                path: "/",
                query: None,
                headers: &[],
                want: ws("acme"),
            },
            Case {
                host: Some("ACME.App.Example.com"),
                path: "/",
                query: None,
                headers: &[],
                want: ws("acme"),
            },
            Case {
                host: None,
                path: "/w/acme/docs",
                query: None,
                headers: &[],
                want: ws("acme"),
            },
            Case {
                host: None,
                path: "/w/acme",
                query: None,
                headers: &[],
                want: ws("acme"),
            },
            Case {
                host: None,
                path: "/",
                query: None,
                headers: &["acme"],
                want: ws("acme"),
            },
            Case {
                host: None,
                path: "/",
                query: Some("x=1&app_id=acme"),
                headers: &[],
                want: ws("acme"),
            },
            // Nothing found.
            Case {
                host: Some("app.example.com"),
                path: "/",
                query: None,
                headers: &[],
                want: Identity::None,
            },
            Case {
                host: Some("a.b.app.example.com"),
                path: "/",
                query: None,
                headers: &[],
                want: Identity::None,
            },
            Case {
                host: Some("acme.other.com"),
                path: "/wx/acme/",
                query: Some("app=acme"),
                headers: &[],
                want: Identity::None,
            },
            Case {
                host: None,
                path: "/w//x",
                query: None,
                headers: &[],
                want: Identity::None,
            },
            // Agreement across sources.
            Case {
                host: Some("acme.app.example.com"),
                path: "/w/ACME/x",
                query: Some("app_id=acme"),
                headers: &["Acme"],
                want: ws("acme"),
            },
            // Conflicts.
            Case {
                host: Some("acme.app.example.com"),
                path: "/",
                query: None,
                headers: &["globex"],
                want: Identity::Conflict {
                    first: acme,
                    second: globex,
                },
            },
            Case {
                host: None,
                path: "/",
                query: None,
                headers: &["acme", "globex"],
                want: Identity::Conflict {
                    first: acme,
                    second: globex,
                },
            },
            Case {
                host: None,
                path: "/w/acme/",
                query: Some("app_id=globex"),
                headers: &[],
                want: Identity::Conflict {
                    first: acme,
                    second: globex,
                },
            },
            Case {
                host: None,
                path: "/",
                query: Some("app_id=acme&app_id=globex"),
                headers: &[],
                want: Identity::Conflict {
                    first: acme,
                    second: globex,
                },
            },
            // Invalid ids.
            Case {
                host: None,
                path: "/",
                query: None,
                headers: &["ac.me"],
                want: Identity::Invalid {
                    source: Source::Header(2),
                    reason: InvalidId::BadChar,
                },
            },
            Case {
                host: None,
                path: "/w/-acme/",
                query: None,
                headers: &[],
                want: Identity::Invalid {
                    source: Source::Path,
                    reason: InvalidId::BadFirst,
                },
            },
            Case {
                host: None,
                path: "/",
                query: Some("app_id="),
                headers: &[],
                want: Identity::Invalid {
                    source: Source::Query(3),
                    reason: InvalidId::Empty,
                },
            },
            Case {
                host: None,
                path: "/",
                query: Some("app_id=a%2Fb"),
                headers: &[],
                want: Identity::Invalid {
                    source: Source::Query(3),
                    reason: InvalidId::BadChar,
                },
            },
        ];
        for (i, case) in cases.iter().enumerate() {
            assert_eq!(run(case), case.want, "case {i}");
        }
    }

    #[test]
    fn paths_are_normalized_for_matching() {
        let cases = [
            ("/w/acme/docs", "/w/acme/docs"),
            ("//w/acme/x", "/w/acme/x"),
            ("/x/../w/acme/", "/w/acme/"),
            ("/./w/./acme", "/w/acme"),
            ("/w/%61cme/x", "/w/acme/x"),
            ("/w/%2E%2E/w/acme/", "/w/acme/"),
            // Encoded slashes and backslashes separate segments, as a decoding server sees them.
            ("/w/a%2Fb/", "/w/a/b/"),
            ("/w/acme/..%2f..%2fw/globex/", "/w/globex/"),
            ("/w/acme\\..\\..\\w/globex/", "/w/globex/"),
            ("/w/acme/..%5C..%5Cw/globex/", "/w/globex/"),
            ("/w/%25/", "/w/%25/"),
            ("/../../", "/"),
            ("/w/acme/..", "/w/"),
            ("/%", "/%"),
            ("/%6", "/%6"),
        ];
        for (raw, want) in cases {
            assert_eq!(normalized_path(raw), want, "{raw}");
        }
        assert!(matches!(
            normalized_path("/w/acme/x"),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn bad_rules_are_rejected() {
        for rule in [
            Rule::Host {
                pattern: "app.example.com".into(),
            },
            Rule::Host {
                pattern: "x{workspace}.example.com".into(),
            },
            Rule::Host {
                pattern: "{workspace}.{workspace}.com".into(),
            },
            Rule::Path {
                pattern: "w/{workspace}/".into(),
            },
            Rule::Path {
                pattern: "/w/{workspace}x".into(),
            },
            Rule::Header {
                name: "bad header".into(),
            },
            Rule::Query { name: "a=b".into() },
        ] {
            assert!(compile_rule(&rule).map(|_| ()).is_err(), "{rule:?}");
        }
    }
}
