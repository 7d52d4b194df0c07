//! Workspace ids: case-insensitive, stored lowercase, `[a-z0-9][a-z0-9_-]{0,63}`.
//!
//! A [`WorkspaceId`] lives inline (no heap allocation) so that identifying a request costs no
//! allocation on the hot path. Region ids (`[a-z][a-z0-9-]{0,31}`) are checked here too.

use std::fmt;

/// Longest workspace id accepted, in bytes.
pub const MAX_WORKSPACE_ID_LEN: usize = 64;
/// Longest region id accepted, in bytes.
pub use domicile_wire::MAX_REGION_ID_LEN;

/// Class bit: the byte may start an id (letters and digits).
const ANY_POSITION: u8 = 0x80;
/// The low seven bits of a class hold the byte lowercased.
const LOWERCASE: u8 = 0x7f;

/// Per byte: 0 when it may not appear in an id; otherwise its lowercase form, with
/// `ANY_POSITION` set for bytes that may also start one.
static ID_CLASS: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = match c {
            b'a'..=b'z' | b'0'..=b'9' => c | ANY_POSITION,
            b'A'..=b'Z' => c.to_ascii_lowercase() | ANY_POSITION,
            b'_' | b'-' => c,
            _ => 0,
        };
        b += 1;
    }
    table
};

/// A validated, lowercased workspace id held inline.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct WorkspaceId {
    len: u8,
    bytes: [u8; MAX_WORKSPACE_ID_LEN],
}

/// Why a candidate workspace id was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidId {
    #[error("the id is empty")]
    Empty,
    #[error("the id is longer than {MAX_WORKSPACE_ID_LEN} characters")]
    TooLong,
    #[error("the id must start with a letter or digit")]
    BadFirst,
    #[error("the id may contain only letters, digits, '_' and '-'")]
    BadChar,
}

impl WorkspaceId {
    /// Validates `raw` case-insensitively and stores it lowercased.
    pub fn parse(raw: &[u8]) -> Result<Self, InvalidId> {
        let Some((&first, _)) = raw.split_first() else {
            return Err(InvalidId::Empty);
        };
        if raw.len() > MAX_WORKSPACE_ID_LEN {
            return Err(InvalidId::TooLong);
        }
        if ID_CLASS[first as usize] & ANY_POSITION == 0 {
            return Err(if ID_CLASS[first as usize] != 0 {
                InvalidId::BadFirst
            } else {
                InvalidId::BadChar
            });
        }
        let mut bytes = [0u8; MAX_WORKSPACE_ID_LEN];
        // One table look-up per byte: the class says whether the byte may appear, and the
        // table's low bits carry it lowercased.
        let mut invalid = 0u8;
        for (slot, &b) in bytes.iter_mut().zip(raw) {
            let class = ID_CLASS[b as usize];
            invalid |= (class == 0) as u8;
            *slot = class & LOWERCASE;
        }
        if invalid != 0 {
            return Err(InvalidId::BadChar);
        }
        Ok(Self {
            len: raw.len() as u8,
            bytes,
        })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII bytes are ever stored (checked in `parse`).
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }
}

impl fmt::Debug for WorkspaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WorkspaceId({})", self.as_str())
    }
}

impl fmt::Display for WorkspaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Checks a region id: `[a-z][a-z0-9-]{0,31}` (the rule the control plane applies too).
pub use domicile_wire::is_valid_region_id;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_lowercases() {
        let id = WorkspaceId::parse(b"AcMe_01-x").unwrap();
        assert_eq!(id.as_str(), "acme_01-x");
        assert_eq!(id, WorkspaceId::parse(b"acme_01-X").unwrap());
        assert!(WorkspaceId::parse(&[b'a'; 64]).is_ok());
    }

    #[test]
    fn rejects_bad_ids() {
        let cases: &[(&[u8], InvalidId)] = &[
            (b"", InvalidId::Empty),
            (&[b'a'; 65], InvalidId::TooLong),
            (b"-acme", InvalidId::BadFirst),
            (b"_acme", InvalidId::BadFirst),
            (b"ac.me", InvalidId::BadChar),
            (b"ac me", InvalidId::BadChar),
            (b"acm\xc3\xa9", InvalidId::BadChar),
            (b"ac%2fme", InvalidId::BadChar),
        ];
        for (raw, want) in cases {
            assert_eq!(WorkspaceId::parse(raw), Err(*want), "{raw:?}");
        }
    }

    #[test]
    fn region_ids() {
        for ok in ["us", "eu", "au-east-1", "a"] {
            assert!(is_valid_region_id(ok), "{ok}");
        }
        for bad in ["", "US", "1us", "-us", "us_east", &"a".repeat(33)] {
            assert!(!is_valid_region_id(bad), "{bad}");
        }
    }
}
