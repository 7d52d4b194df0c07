//! The map file: a routing map on disk, in JSON lines, loaded into the [`Replica`] and reloaded
//! when it changes.
//!
//! ```text
//! {"type":"map","version":42}
//! {"type":"region","id":"us","name":"United States","jurisdiction":["US","CA"]}
//! {"type":"workspace","id":"acme","region":"us","state":"active","epoch":3,"version":12}
//! ```
//!
//! Exactly one `map` line gives the map version. Every workspace's region must be listed by a
//! `region` line. A file with any bad line is rejected whole (the replica keeps what it had) and
//! the error names each bad line. The same format is what the proxy persists as its
//! last-known-good map.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use domicile_wire::Checksum;

use crate::route::map::{
    CatalogueRegion, MapEntry, MapTable, Replica, WorkspaceState, MAX_VERSION,
};
use crate::route::workspace_id::{is_valid_region_id, WorkspaceId};

/// How many line errors one report lists before summarising the rest.
const MAX_REPORTED_ERRORS: usize = 20;

#[derive(Debug, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
enum Line<'a> {
    Map {
        version: u64,
        /// The control-plane epoch (snapshots and last-known-good files).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<String>,
        /// How many workspace lines follow; checked when present.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        entries: Option<u64>,
        /// The map checksum (16 hex digits); checked when present.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        checksum: Option<String>,
    },
    Region {
        #[serde(borrow)]
        id: &'a str,
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        jurisdiction: Vec<String>,
    },
    Workspace {
        #[serde(borrow)]
        id: std::borrow::Cow<'a, str>,
        #[serde(borrow)]
        region: &'a str,
        #[serde(default = "active")]
        state: WorkspaceState,
        #[serde(default)]
        epoch: u32,
        #[serde(default)]
        version: u64,
    },
}

fn active() -> WorkspaceState {
    WorkspaceState::Active
}

#[derive(Debug, thiserror::Error)]
pub enum MapFileError {
    #[error("cannot read map file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("map file {path} is invalid:\n{}", .errors.join("\n"))]
    Invalid { path: PathBuf, errors: Vec<String> },
}

/// A parsed map, not yet installed.
pub struct LoadedMap {
    pub table: MapTable,
    pub regions: Vec<CatalogueRegion>,
    /// The control-plane epoch the map came from (snapshots and last-known-good files).
    pub epoch: Option<String>,
    /// The map checksum over the entries as loaded.
    pub checksum: Checksum,
}

/// Builds a map from map-file lines, one at a time: a file, a snapshot streamed from the
/// control plane, or a last-known-good file all go through here.
pub struct MapBuilder<'r> {
    replica: &'r Replica,
    table: MapTable,
    regions: Vec<CatalogueRegion>,
    pending_workspaces: Vec<(usize, WorkspaceId, String, MapEntry)>,
    errors: Vec<String>,
    version: Option<u64>,
    epoch: Option<String>,
    expect_entries: Option<u64>,
    expect_checksum: Option<Checksum>,
    checksum: Checksum,
    lines: usize,
}

impl<'r> MapBuilder<'r> {
    /// Region ids are interned into `replica`'s region table; `capacity` sizes the table.
    pub fn new(replica: &'r Replica, capacity: usize) -> Self {
        Self {
            replica,
            table: MapTable::with_capacity(capacity, 0),
            regions: Vec::new(),
            pending_workspaces: Vec::new(),
            errors: Vec::new(),
            version: None,
            epoch: None,
            expect_entries: None,
            expect_checksum: None,
            checksum: Checksum::default(),
            lines: 0,
        }
    }

    fn error(&mut self, line_no: usize, msg: String) {
        if self.errors.len() < MAX_REPORTED_ERRORS {
            self.errors.push(format!("  line {line_no}: {msg}"));
        } else if self.errors.len() == MAX_REPORTED_ERRORS {
            self.errors.push("  (further errors not shown)".to_owned());
        }
    }

    /// Takes the next line (without its line feed; blank lines are skipped).
    pub fn line(&mut self, text: &str) {
        self.lines += 1;
        let line_no = self.lines;
        let text = text.trim();
        if text.is_empty() {
            return;
        }
        let parsed: Line<'_> = match serde_json::from_str(text) {
            Ok(parsed) => parsed,
            Err(e) => {
                self.error(line_no, e.to_string());
                return;
            }
        };
        match parsed {
            Line::Map {
                version: v,
                epoch,
                entries,
                checksum,
            } => {
                if self.version.is_some() {
                    self.error(line_no, "a second `map` line".into());
                } else if v > MAX_VERSION {
                    self.error(line_no, format!("version {v} is above {MAX_VERSION}"));
                } else {
                    self.version = Some(v);
                    self.epoch = epoch;
                    self.expect_entries = entries;
                    if let Some(n) = entries.filter(|_| self.table.is_empty()) {
                        // Sized once for what the header promises (bounded: a header is not
                        // trusted with memory).
                        self.table = MapTable::with_capacity(n.min(1 << 25) as usize, 0);
                    }
                    match checksum.as_deref().map(Checksum::from_hex) {
                        Some(None) => self.error(line_no, "checksum is not 16 hex digits".into()),
                        Some(Some(c)) => self.expect_checksum = Some(c),
                        None => {}
                    }
                }
            }
            Line::Region {
                id,
                name,
                jurisdiction,
            } => {
                if !is_valid_region_id(id) {
                    self.error(
                        line_no,
                        format!("region id {id:?} is not valid (expected [a-z][a-z0-9-]{{0,31}})"),
                    );
                    return;
                }
                if self.regions.iter().any(|r| r.id == id) {
                    self.error(line_no, format!("region {id:?} listed twice"));
                    return;
                }
                let mut codes = Vec::with_capacity(jurisdiction.len());
                for code in &jurisdiction {
                    match country_code(code) {
                        Some(c) => codes.push(c),
                        None => self.error(
                            line_no,
                            format!(
                                "jurisdiction {code:?} is not an ISO 3166 alpha-2 country code"
                            ),
                        ),
                    }
                }
                if let Err(e) = self.replica.regions().intern(id) {
                    self.error(line_no, e.to_string());
                    return;
                }
                self.regions.push(CatalogueRegion {
                    id: id.to_owned(),
                    name: name.unwrap_or_else(|| id.to_owned()),
                    jurisdiction: codes,
                });
            }
            Line::Workspace {
                id,
                region,
                state,
                epoch,
                version: entry_version,
            } => {
                let ws = match WorkspaceId::parse(id.as_bytes()) {
                    Ok(ws) => ws,
                    Err(e) => {
                        self.error(line_no, format!("workspace id {id:?}: {e}"));
                        return;
                    }
                };
                if entry_version > MAX_VERSION {
                    self.error(
                        line_no,
                        format!("version {entry_version} is above {MAX_VERSION}"),
                    );
                    return;
                }
                let entry = MapEntry {
                    home_region: 0,
                    state,
                    epoch,
                    version: entry_version,
                };
                if self.regions.iter().any(|r| r.id == region) {
                    let Some(home_region) = self.replica.regions().find(region) else {
                        return;
                    };
                    self.place(
                        line_no,
                        ws,
                        region,
                        MapEntry {
                            home_region,
                            ..entry
                        },
                    );
                } else {
                    // A region listed further down is fine: placed at the end, once every region
                    // line is known. Nothing is interned for a region no line lists.
                    self.pending_workspaces
                        .push((line_no, ws, region.to_owned(), entry));
                }
            }
        }
    }

    fn place(&mut self, line_no: usize, ws: WorkspaceId, region: &str, entry: MapEntry) {
        if self.table.get(ws.as_bytes()).is_some() {
            self.error(line_no, format!("workspace {ws} listed twice"));
            return;
        }
        self.checksum.add(entry_hash(ws.as_str(), region, &entry));
        self.table.insert(&ws, entry);
    }

    /// Checks the whole map (a `map` line, every region listed, the entry count and checksum
    /// the header promises) and returns it; `source` names it in errors.
    pub fn finish(mut self, source: &Path) -> Result<LoadedMap, MapFileError> {
        for (line_no, ws, region, mut entry) in std::mem::take(&mut self.pending_workspaces) {
            let home_region = self
                .regions
                .iter()
                .any(|r| r.id == region)
                .then(|| self.replica.regions().find(&region))
                .flatten();
            let Some(home_region) = home_region else {
                self.error(
                    line_no,
                    format!("region {region:?} is not listed by any `region` line"),
                );
                continue;
            };
            entry.home_region = home_region;
            self.place(line_no, ws, &region, entry);
        }
        match self.version {
            Some(v) => self.table.publish_version(v),
            None => self.error(0, "no `map` line gives the map version".into()),
        }
        if self.errors.is_empty() {
            if let Some(n) = self
                .expect_entries
                .filter(|&n| n != self.table.len() as u64)
            {
                self.errors.push(format!(
                    "  the map promises {n} entries but holds {} (truncated or edited)",
                    self.table.len()
                ));
            } else if let Some(c) = self.expect_checksum.filter(|&c| c != self.checksum) {
                self.errors.push(format!(
                    "  the map's checksum is {} but its entries sum to {} (corrupted or edited)",
                    c.to_hex(),
                    self.checksum.to_hex()
                ));
            }
        }
        if !self.errors.is_empty() {
            return Err(MapFileError::Invalid {
                path: source.to_owned(),
                errors: self.errors,
            });
        }
        Ok(LoadedMap {
            table: self.table,
            regions: self.regions,
            epoch: self.epoch,
            checksum: self.checksum,
        })
    }
}

/// The checksum term of one entry ([`Checksum::entry_hash`]).
pub fn entry_hash(id: &str, region: &str, entry: &MapEntry) -> u64 {
    let state = match entry.state {
        WorkspaceState::Active => domicile_wire::State::Active,
        WorkspaceState::Frozen => domicile_wire::State::Frozen,
    };
    Checksum::entry_hash(id, region, state, entry.epoch, entry.version)
}

/// Parses a map file; region ids are interned into `replica`'s region table.
pub fn load(path: &Path, replica: &Replica) -> Result<LoadedMap, MapFileError> {
    let io_err = |source| MapFileError::Io {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io_err)?;
    let size_hint = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    // About 80 bytes per workspace line.
    let mut builder = MapBuilder::new(replica, (size_hint / 80) as usize);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).map_err(io_err)? == 0 {
            break;
        }
        builder.line(&line);
    }
    builder.finish(path)
}

fn country_code(code: &str) -> Option<[u8; 2]> {
    let b = code.as_bytes();
    (b.len() == 2 && b.iter().all(u8::is_ascii_alphabetic))
        .then(|| [b[0].to_ascii_uppercase(), b[1].to_ascii_uppercase()])
}

/// Loads `path` and installs it as the replica's map.
pub fn load_into(path: &Path, replica: &Replica) -> Result<(u64, usize), MapFileError> {
    let loaded = load(path, replica)?;
    let version = loaded.table.version();
    let len = loaded.table.len();
    replica
        .replace(loaded.table, &loaded.regions)
        .map_err(|e| MapFileError::Invalid {
            path: path.to_owned(),
            errors: vec![format!("  {e}")],
        })?;
    Ok((version, len))
}

/// Writes the replica's map in map-file format, durably: temporary file, fsync, rename. The
/// `map` line carries the entry count and checksum (so a truncated or edited file is refused
/// when loaded) and `epoch` when given. The map must not change while it is written.
pub fn write_atomically(
    path: &Path,
    replica: &Replica,
    epoch: Option<&str>,
) -> std::io::Result<()> {
    let Some(table) = replica.table() else {
        return Err(std::io::Error::other("no map loaded"));
    };
    let tmp = path.with_extension("tmp");
    {
        let catalogue = replica.regions().snapshot();
        let mut checksum = Checksum::default();
        table.for_each(|id, entry| {
            let region = &catalogue[entry.home_region as usize].id;
            checksum.add(entry_hash(id, region, &entry));
        });
        let file = std::fs::File::create(&tmp)?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        serde_json::to_writer(
            &mut out,
            &Line::Map {
                version: table.version(),
                epoch: epoch.map(str::to_owned),
                entries: Some(table.len() as u64),
                checksum: Some(checksum.to_hex()),
            },
        )?;
        out.write_all(b"\n")?;
        for region in catalogue.iter().filter(|r| r.in_map) {
            let jurisdiction = region
                .jurisdiction
                .iter()
                .map(|c| String::from_utf8_lossy(c).into_owned())
                .collect();
            serde_json::to_writer(
                &mut out,
                &Line::Region {
                    id: &region.id,
                    name: Some(region.name.clone()),
                    jurisdiction,
                },
            )?;
            out.write_all(b"\n")?;
        }
        let mut result = Ok(());
        table.for_each(|id, entry| {
            if result.is_err() {
                return;
            }
            let region = &catalogue[entry.home_region as usize].id;
            result = serde_json::to_writer(
                &mut out,
                &Line::Workspace {
                    id: id.into(),
                    region,
                    state: entry.state,
                    epoch: entry.epoch,
                    version: entry.version,
                },
            )
            .map_err(std::io::Error::from)
            .and_then(|()| out.write_all(b"\n"));
        });
        result?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Watches the map file and reloads it when it changes. Bad files are logged and counted and
/// leave the current map in place. Runs until the returned handle is dropped.
pub fn watch(
    path: PathBuf,
    replica: Arc<Replica>,
    on_reload: impl Fn(Result<(u64, usize), &MapFileError>) + Send + 'static,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher};
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let file_name = path.file_name().map(|n| n.to_owned());
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            let ours = event
                .paths
                .iter()
                .any(|p| p.file_name().map(|n| n.to_owned()) == file_name);
            if ours && !matches!(event.kind, notify::EventKind::Access(_)) {
                let _ = tx.send(());
            }
        }
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    std::thread::Builder::new()
        .name("domicile-mapfile".into())
        .spawn(move || {
            while rx.recv().is_ok() {
                // Debounce: an editor or `mv` produces several events for one change.
                while rx.recv_timeout(Duration::from_millis(100)).is_ok() {}
                match load_into(&path, &replica) {
                    Ok(loaded) => on_reload(Ok(loaded)),
                    Err(e) => on_reload(Err(&e)),
                }
            }
        })
        .map_err(notify::Error::io)?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::map::Lookup;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("map.jsonl");
        std::fs::write(&path, text).unwrap();
        path
    }

    const GOOD: &str = r#"{"type":"map","version":9}
{"type":"region","id":"us","name":"United States","jurisdiction":["US","ca"]}
{"type":"workspace","id":"Acme","region":"us","epoch":2,"version":4}
{"type":"workspace","id":"globex","region":"eu","state":"frozen"}
{"type":"region","id":"eu","jurisdiction":["DE","FR"]}
"#;

    #[test]
    fn loads_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let replica = Replica::new();
        let (version, len) = load_into(&write(dir.path(), GOOD), &replica).unwrap();
        assert_eq!((version, len), (9, 2));
        let acme = WorkspaceId::parse(b"acme").unwrap();
        let Lookup::Found { entry, version } = replica.lookup(&acme) else {
            panic!("acme missing");
        };
        assert_eq!((entry.epoch, entry.version, version), (2, 4, 9));
        assert_eq!(
            replica.regions().by_jurisdiction(*b"CA", |_| true),
            replica.regions().find("us")
        );

        let copy = dir.path().join("copy.jsonl");
        write_atomically(&copy, &replica, Some("e1")).unwrap();
        let again = Replica::new();
        assert_eq!(load_into(&copy, &again).unwrap(), (9, 2));
        let globex = WorkspaceId::parse(b"globex").unwrap();
        assert_eq!(
            match again.lookup(&globex) {
                Lookup::Found { entry, .. } => entry.state,
                other => panic!("{other:?}"),
            },
            WorkspaceState::Frozen
        );
    }

    #[test]
    fn every_bad_line_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let text = r#"{"type":"region","id":"US"}
{"type":"workspace","id":"-bad","region":"us"}
not json
{"type":"workspace","id":"x","region":"mars"}
{"type":"region","id":"eu","jurisdiction":["Germany"]}
{"type":"workspace","id":"x","region":"eu","colour":"red"}
"#;
        let replica = Replica::new();
        let err = load_into(&write(dir.path(), text), &replica).unwrap_err();
        let MapFileError::Invalid { errors, .. } = &err else {
            panic!("{err}");
        };
        let all = errors.join("\n");
        for needle in [
            "line 1:",
            "line 2:",
            "line 3:",
            "line 4:",
            "line 5:",
            "line 6:",
            "no `map` line",
        ] {
            assert!(all.contains(needle), "{needle} missing from {all}");
        }
        assert!(!replica.is_loaded(), "a bad file must not be installed");
        assert!(
            replica.regions().find("mars").is_none(),
            "a region no line lists takes no region slot"
        );
    }

    #[test]
    fn reload_keeps_old_map_on_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let replica = Replica::new();
        let path = write(dir.path(), GOOD);
        load_into(&path, &replica).unwrap();
        std::fs::write(&path, "garbage\n").unwrap();
        assert!(load_into(&path, &replica).is_err());
        assert_eq!(replica.version(), Some(9));
        assert_eq!(replica.len(), 2);
    }
}
