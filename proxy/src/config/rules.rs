//! Identification rules made ready to match: the `{workspace}` patterns of host and path
//! rules split into their fixed parts, header names checked, query names checked. Both
//! `check-config` and the request path's identifier use these.

use super::Rule;

const PLACEHOLDER: &str = "{workspace}";

/// A compiled identification rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    /// Lowercase fixed parts around the `{workspace}` label.
    Host {
        prefix: String,
        suffix: String,
    },
    /// Fixed parts around the `{workspace}` segment.
    Path {
        prefix: String,
        suffix: String,
    },
    /// A lowercase header name.
    Header(String),
    Query(String),
}

fn split_pattern(pattern: &str) -> Result<(String, String), String> {
    let Some(at) = pattern.find(PLACEHOLDER) else {
        return Err(format!(
            "pattern {pattern:?} has no {PLACEHOLDER} placeholder"
        ));
    };
    let (prefix, rest) = pattern.split_at(at);
    let suffix = &rest[PLACEHOLDER.len()..];
    if suffix.contains(PLACEHOLDER) {
        return Err(format!(
            "pattern {pattern:?} has more than one {PLACEHOLDER}"
        ));
    }
    Ok((prefix.to_owned(), suffix.to_owned()))
}

/// A rule made ready to match, or what is wrong with it (for `check-config`).
pub fn compile_rule(rule: &Rule) -> Result<Pattern, String> {
    match rule {
        Rule::Host { pattern } => {
            let (prefix, suffix) = split_pattern(pattern)?;
            if (!prefix.is_empty() && !prefix.ends_with('.'))
                || (!suffix.is_empty() && !suffix.starts_with('.'))
            {
                return Err(format!(
                    "host pattern {pattern:?}: {PLACEHOLDER} must be a whole label (between dots)"
                ));
            }
            if pattern.contains([':', '/', ' ']) {
                return Err(format!("host pattern {pattern:?} must be a bare hostname"));
            }
            Ok(Pattern::Host {
                prefix: prefix.to_ascii_lowercase(),
                suffix: suffix.to_ascii_lowercase(),
            })
        }
        Rule::Path { pattern } => {
            let (prefix, suffix) = split_pattern(pattern)?;
            if !prefix.starts_with('/') || !prefix.ends_with('/') {
                return Err(format!(
                    "path pattern {pattern:?} must start with '/' and {PLACEHOLDER} must be a whole segment"
                ));
            }
            if !suffix.is_empty() && !suffix.starts_with('/') {
                return Err(format!(
                    "path pattern {pattern:?}: {PLACEHOLDER} must be a whole segment"
                ));
            }
            Ok(Pattern::Path { prefix, suffix })
        }
        Rule::Header { name } => match http::HeaderName::try_from(name.as_str()) {
            Ok(name) => Ok(Pattern::Header(name.as_str().to_owned())),
            Err(_) => Err(format!("{name:?} is not a valid header name")),
        },
        Rule::Query { name } => {
            if name.is_empty() || name.contains(['&', '=', '#', ' ']) {
                Err(format!("{name:?} is not a valid query parameter name"))
            } else {
                Ok(Pattern::Query(name.clone()))
            }
        }
    }
}
