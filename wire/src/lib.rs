//! The wire types Domicile's parts exchange: the control plane's map snapshot and change feed,
//! fleet heartbeats, and API errors. Kept free of database and HTTP dependencies so the proxy
//! can speak the protocol without pulling in the control plane.
//!
//! The snapshot is the map-file format (JSON lines, `docs/map-file.md`) with the `map` line
//! carrying the control-plane epoch, the entry count and the map checksum; the change feed is
//! JSON lines of [`FeedLine`]. Both are described in `docs/control-plane.md`.

use serde::{Deserialize, Serialize};

pub mod fanout;

/// Longest workspace id accepted, in bytes.
pub const MAX_WORKSPACE_ID_LEN: usize = 64;
/// Longest region id accepted, in bytes.
pub const MAX_REGION_ID_LEN: usize = 32;

/// `[a-z][a-z0-9-]{0,31}`.
pub fn is_valid_region_id(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_REGION_ID_LEN
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
}

/// Validates a workspace id case-insensitively and returns it lowercased:
/// `[a-z0-9][a-z0-9_-]{0,63}`.
pub fn normalize_workspace_id(raw: &str) -> Result<String, &'static str> {
    let b = raw.as_bytes();
    let Some(&first) = b.first() else {
        return Err("the id is empty");
    };
    if b.len() > MAX_WORKSPACE_ID_LEN {
        return Err("the id is longer than 64 characters");
    }
    if !first.is_ascii_alphanumeric() {
        return Err("the id must start with a letter or digit");
    }
    if !b
        .iter()
        .all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
    {
        return Err("the id may contain only letters, digits, '_' and '-'");
    }
    Ok(raw.to_ascii_lowercase())
}

/// A proxy id: 1 to 128 printable characters without spaces (a proxy's `proxy.id`).
pub fn is_valid_proxy_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && !id.chars().any(|c| c.is_control() || c.is_whitespace())
}

/// Whether an ISO 3166-1 alpha-2 code is well formed (two ASCII letters; any case).
pub fn is_country_code(code: &str) -> bool {
    code.len() == 2 && code.bytes().all(|b| b.is_ascii_alphabetic())
}

/// Whether a workspace takes writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Active,
    /// Being moved: safe methods go to the current home, unsafe ones are refused.
    Frozen,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Active => "active",
            State::Frozen => "frozen",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(State::Active),
            "frozen" => Some(State::Frozen),
            _ => None,
        }
    }
}

/// A region of the catalogue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    pub id: String,
    pub name: String,
    /// ISO 3166-1 alpha-2 codes, upper case.
    pub jurisdiction: Vec<String>,
}

/// A workspace entry of the map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workspace {
    pub id: String,
    /// The home region's id.
    pub region: String,
    pub state: State,
    /// +1 on every change to this workspace.
    pub epoch: u32,
    /// Map version of the entry's last change.
    pub version: u64,
}

/// What a change sets a workspace to (absent for a delete).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceBody {
    pub region: String,
    pub state: State,
    pub epoch: u32,
}

/// What a change sets a region to (absent for a delete).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionBody {
    pub name: String,
    pub jurisdiction: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Put,
    Delete,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Put => "put",
            Op::Delete => "delete",
        }
    }
}

/// One line of `GET /v1/map/changes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum FeedLine {
    /// The first line: which control-plane epoch serves the stream and its head version.
    Hello { epoch: String, head: u64 },
    /// Sent every few seconds while nothing changes.
    Heartbeat { epoch: String, head: u64 },
    /// A workspace entry changed at `version`.
    Workspace {
        version: u64,
        id: String,
        op: Op,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        entry: Option<WorkspaceBody>,
    },
    /// A region of the catalogue changed at `version`.
    Region {
        version: u64,
        id: String,
        op: Op,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        entry: Option<RegionBody>,
    },
}

impl FeedLine {
    /// The map version a change line carries (`None` for hello and heartbeat).
    pub fn version(&self) -> Option<u64> {
        match self {
            FeedLine::Workspace { version, .. } | FeedLine::Region { version, .. } => {
                Some(*version)
            }
            FeedLine::Hello { .. } | FeedLine::Heartbeat { .. } => None,
        }
    }
}

/// `POST /v1/fleet/heartbeat`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub proxy_id: String,
    pub edge_region: String,
    /// The map version this proxy routes with (persisted as its last-known-good map).
    pub applied_version: u64,
    /// Every request routed with an older map version has finished. Absent when the proxy
    /// does not track in-flight requests per version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drained_version: Option<u64>,
    /// The proxy's map checksum at `applied_version` ([`Checksum`], hex).
    pub checksum: String,
    /// The control-plane epoch the proxy's map came from.
    pub epoch: String,
}

/// The reply to a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    pub epoch: String,
    pub head: u64,
}

/// A fleet member as `GET /v1/fleet` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetMember {
    pub proxy_id: String,
    pub edge_region: String,
    pub applied_version: u64,
    pub drained_version: Option<u64>,
    pub checksum: String,
    /// Whether the proxy's checksum matches the map's at its applied version (`None` when
    /// the proxy is not at the head, where the control plane has no checksum to compare).
    pub checksum_ok: Option<bool>,
    /// RFC 3339.
    pub last_seen: String,
    pub seconds_since_seen: f64,
    pub status: SyncStatus,
}

/// `GET /v1/fleet`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fleet {
    pub head: u64,
    pub epoch: String,
    pub stale_after_seconds: u64,
    /// A member that has not reported the newest version committed this long ago is
    /// BEHIND (zero: the head itself).
    #[serde(default)]
    pub behind_after_seconds: f64,
    /// That version: what every member is expected to have reported by now.
    #[serde(default)]
    pub expected_version: u64,
    pub members: Vec<FleetMember>,
}

/// Where a proxy stands against the head of the map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum SyncStatus {
    /// Heard from recently, and reported every version committed more than the control
    /// plane's `behind_after` ago (the head itself when that is zero).
    Synced,
    /// Heard from recently, but has not reported a version committed that long ago.
    Behind,
    /// Not heard from within the stale interval.
    Stale,
}

impl SyncStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncStatus::Synced => "SYNCED",
            SyncStatus::Behind => "BEHIND",
            SyncStatus::Stale => "STALE",
        }
    }
}

/// The body of every API error: `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
    /// Per-line problems of an import.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lines: Vec<LineError>,
}

/// One bad line of an NDJSON import.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineError {
    pub line: u64,
    /// What is wrong, as a stable code (`invalid_json`, `invalid_id`, `unknown_region`, ...).
    pub code: String,
    pub message: String,
}

/// The map checksum: the wrapping sum of one 64-bit hash per workspace entry, so it can be
/// kept up to date one change at a time (subtract the old entry's hash, add the new one's) and
/// does not depend on the order entries are listed in. Written as 16 hex digits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Checksum(pub u64);

impl Checksum {
    /// The hash of one entry: FNV-1a over its fields, then a 64-bit finaliser so that sums of
    /// similar entries do not cancel out.
    pub fn entry_hash(id: &str, region: &str, state: State, epoch: u32, version: u64) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut feed = |bytes: &[u8]| {
            for &b in bytes {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        feed(id.as_bytes());
        feed(&[0]);
        feed(region.as_bytes());
        feed(&[0, state as u8]);
        feed(&epoch.to_le_bytes());
        feed(&version.to_le_bytes());
        // splitmix64's finaliser.
        let mut z = h;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn add(&mut self, hash: u64) {
        self.0 = self.0.wrapping_add(hash);
    }

    pub fn remove(&mut self, hash: u64) {
        self.0 = self.0.wrapping_sub(hash);
    }

    pub fn to_hex(self) -> String {
        format!("{:016x}", self.0)
    }

    pub fn from_hex(text: &str) -> Option<Self> {
        (text.len() == 16)
            .then(|| u64::from_str_radix(text, 16).ok())
            .flatten()
            .map(Checksum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(is_valid_region_id("eu-west-1"));
        assert!(!is_valid_region_id("EU"));
        assert!(!is_valid_region_id("1eu"));
        assert!(!is_valid_region_id(&"a".repeat(33)));
        assert_eq!(
            normalize_workspace_id("Acme_Corp-1").unwrap(),
            "acme_corp-1"
        );
        assert!(normalize_workspace_id("-acme").is_err());
        assert!(normalize_workspace_id("a.b").is_err());
        assert!(normalize_workspace_id("").is_err());
        assert!(normalize_workspace_id(&"a".repeat(65)).is_err());
    }

    #[test]
    fn checksum_is_order_independent_and_incremental() {
        let a = Checksum::entry_hash("acme", "us", State::Active, 1, 1);
        let b = Checksum::entry_hash("globex", "eu", State::Active, 1, 2);
        let b2 = Checksum::entry_hash("globex", "eu", State::Frozen, 2, 3);
        let mut one = Checksum::default();
        one.add(a);
        one.add(b);
        let mut two = Checksum::default();
        two.add(b);
        two.add(a);
        assert_eq!(one, two);
        one.remove(b);
        one.add(b2);
        assert_ne!(one, two);
        assert_eq!(Checksum::from_hex(&one.to_hex()), Some(one));
        assert_ne!(a, Checksum::entry_hash("acme", "us", State::Active, 1, 2));
    }

    #[test]
    fn feed_lines_round_trip() {
        let line = FeedLine::Workspace {
            version: 7,
            id: "acme".into(),
            op: Op::Put,
            entry: Some(WorkspaceBody {
                region: "eu".into(),
                state: State::Active,
                epoch: 2,
            }),
        };
        let text = serde_json::to_string(&line).unwrap();
        assert_eq!(
            text,
            r#"{"type":"workspace","version":7,"id":"acme","op":"put","entry":{"region":"eu","state":"active","epoch":2}}"#
        );
        assert_eq!(serde_json::from_str::<FeedLine>(&text).unwrap(), line);
        let del: FeedLine =
            serde_json::from_str(r#"{"type":"workspace","version":8,"id":"acme","op":"delete"}"#)
                .unwrap();
        assert_eq!(del.version(), Some(8));
    }
}
