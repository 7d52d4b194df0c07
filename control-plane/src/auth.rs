//! Bearer tokens and roles.
//!
//! A token is `dom_` followed by 64 hex digits (256 random bits); the store keeps only its
//! SHA-256. A fast hash is the right one here: the secret is random and long, so there is
//! nothing for a slow password hash to protect against, and every API request checks one.
//!
//! A request without a valid token gets 401 `unauthenticated`; a valid token whose role may
//! not call the endpoint gets 403 `forbidden` naming the roles that may.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything: regions, workspaces, tokens, and what the other roles may do.
    Admin,
    /// Moves and fleet operations; reads the map.
    Operator,
    /// Read-only: the map, its history, the fleet and the audit trail.
    Auditor,
    /// A proxy: the snapshot, the change feed and heartbeats.
    Proxy,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Admin, Role::Operator, Role::Auditor, Role::Proxy];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Auditor => "auditor",
            Role::Proxy => "proxy",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A new random token secret.
pub fn new_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("dom_{}", hex::encode(bytes))
}

/// What the store keeps of a token.
pub fn hash_token(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Whether `name` is acceptable as a token name: `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`.
pub fn is_valid_token_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hashed() {
        let a = new_token();
        let b = new_token();
        assert_ne!(a, b);
        assert!(a.starts_with("dom_") && a.len() == 68);
        assert_eq!(hash_token(&a), hash_token(&a));
        assert_ne!(hash_token(&a), hash_token(&b));
        assert!(!hash_token(&a).contains(&a[4..]));
    }

    #[test]
    fn roles_and_names() {
        for role in Role::ALL {
            assert_eq!(Role::parse(role.as_str()), Some(role));
        }
        assert_eq!(Role::parse("root"), None);
        assert!(is_valid_token_name("edge-eu-1.prod"));
        assert!(!is_valid_token_name(".hidden"));
        assert!(!is_valid_token_name("a b"));
    }
}
