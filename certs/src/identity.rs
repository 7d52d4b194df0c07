//! Who a client certificate says its holder is.
//!
//! Domicile's client certificates carry a URI subject alternative name
//! `urn:domicile:<role>:<name>`: `urn:domicile:proxy:edge-eu-1` is the proxy `edge-eu-1`. The
//! control plane grants the role a certificate names exactly as it would grant a token's.

use rustls::pki_types::CertificateDer;

use crate::pem::CertInfo;

/// The URI prefix of a Domicile identity.
pub const URI_PREFIX: &str = "urn:domicile:";

/// A certificate holder's role and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub role: String,
    pub name: String,
}

impl Identity {
    pub fn uri(&self) -> String {
        format!("{URI_PREFIX}{}:{}", self.role, self.name)
    }

    /// Parses `urn:domicile:<role>:<name>`.
    pub fn from_uri(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix(URI_PREFIX)?;
        let (role, name) = rest.split_once(':')?;
        let valid = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        };
        (valid(role) && valid(name)).then(|| Identity {
            role: role.to_owned(),
            name: name.to_owned(),
        })
    }
}

/// The identity a (verified) leaf certificate carries, if exactly one.
pub fn of_certificate(leaf: &CertificateDer<'_>) -> Option<Identity> {
    let info = CertInfo::parse(leaf).ok()?;
    let mut found = info.uris.iter().filter_map(|u| Identity::from_uri(u));
    let first = found.next()?;
    // Two identities in one certificate is ambiguous: none is granted.
    found.next().is_none().then_some(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse() {
        let id = Identity::from_uri("urn:domicile:proxy:edge-eu-1").unwrap();
        assert_eq!(id.role, "proxy");
        assert_eq!(id.name, "edge-eu-1");
        assert_eq!(id.uri(), "urn:domicile:proxy:edge-eu-1");
        assert!(Identity::from_uri("urn:domicile:proxy").is_none());
        assert!(Identity::from_uri("urn:domicile::x").is_none());
        assert!(Identity::from_uri("urn:other:proxy:x").is_none());
        assert!(Identity::from_uri("urn:domicile:proxy:a b").is_none());
    }
}
