//! The routing map replica: workspace id -> home region, state and epoch.
//!
//! Sized for 10 million workspaces. Each entry is a 24-byte slot in one of 64 sharded open
//! addressing tables (hashbrown's SwissTable): ids of up to 11 bytes live inside the slot, longer
//! ids in a per-shard byte arena. Region ids are interned to a `u8` ([`RegionIdx`]).
//!
//! Consistency: a writer applies an entry under its shard's write lock and only then publishes
//! the new map version (`Release`). A reader loads the version (`Acquire`) *before* looking up
//! the entry, so the version a request is tagged with is never newer than the entry it saw.
//! A whole new map (a reload) is built aside and swapped in atomically.
//!
//! This module never decides anything: it only answers "what does the map say".

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use hashbrown::HashTable;
use http::HeaderValue;
use parking_lot::{Mutex, RwLock};

use crate::workspace_id::{is_valid_region_id, WorkspaceId};

/// A region id interned for the lifetime of the process.
pub type RegionIdx = u8;

/// Most regions one process can know.
pub const MAX_REGIONS: usize = 256;
/// Largest map version an entry can carry (48 bits).
pub const MAX_VERSION: u64 = (1 << 48) - 1;

const SHARDS: usize = 64;
const INLINE_KEY: usize = 11;

/// Whether a workspace takes writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkspaceState {
    Active,
    /// Being moved: safe methods go to the current home, unsafe ones are refused.
    Frozen,
}

/// What the map says about one workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    pub home_region: RegionIdx,
    pub state: WorkspaceState,
    /// +1 on every change to this workspace; sent to origins as a fence.
    pub epoch: u32,
    /// Map version of the entry's last change.
    pub version: u64,
}

/// One region as the map's catalogue describes it.
#[derive(Debug, Clone)]
pub struct RegionMeta {
    pub id: Arc<str>,
    pub name: String,
    /// ISO 3166-1 alpha-2 country codes, upper case.
    pub jurisdiction: Vec<[u8; 2]>,
    /// Whether the currently loaded map lists this region.
    pub in_map: bool,
    /// Ready-made `x-domicile-region` value.
    pub header_value: HeaderValue,
}

/// Interns region ids to [`RegionIdx`] (append-only) and holds the catalogue.
#[derive(Debug, Default)]
pub struct Regions {
    all: ArcSwap<Vec<RegionMeta>>,
    write: Mutex<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error("region id {0:?} is not valid (expected [a-z][a-z0-9-]{{0,31}})")]
    InvalidId(String),
    #[error("too many regions (at most {MAX_REGIONS})")]
    TooMany,
}

impl Regions {
    /// Returns the index of `id`, interning it if new.
    pub fn intern(&self, id: &str) -> Result<RegionIdx, RegionError> {
        if let Some(idx) = self.find(id) {
            return Ok(idx);
        }
        if !is_valid_region_id(id) {
            return Err(RegionError::InvalidId(id.to_owned()));
        }
        let _guard = self.write.lock();
        let current = self.all.load();
        if let Some(idx) = current.iter().position(|r| &*r.id == id) {
            return Ok(idx as RegionIdx);
        }
        if current.len() >= MAX_REGIONS {
            return Err(RegionError::TooMany);
        }
        let mut next = Vec::clone(&current);
        next.push(RegionMeta {
            id: Arc::from(id),
            name: id.to_owned(),
            jurisdiction: Vec::new(),
            in_map: false,
            header_value: HeaderValue::from_str(id)
                .map_err(|_| RegionError::InvalidId(id.to_owned()))?,
        });
        self.all.store(Arc::new(next));
        Ok((current.len()) as RegionIdx)
    }

    pub fn find(&self, id: &str) -> Option<RegionIdx> {
        self.all
            .load()
            .iter()
            .position(|r| &*r.id == id)
            .map(|i| i as RegionIdx)
    }

    /// The catalogue as it is now.
    pub fn snapshot(&self) -> Arc<Vec<RegionMeta>> {
        self.all.load_full()
    }

    pub fn id(&self, idx: RegionIdx) -> Option<Arc<str>> {
        self.all.load().get(idx as usize).map(|r| r.id.clone())
    }

    pub fn header_value(&self, idx: RegionIdx) -> Option<HeaderValue> {
        self.all
            .load()
            .get(idx as usize)
            .map(|r| r.header_value.clone())
    }

    /// Replaces the catalogue of regions the map lists (interning new ids).
    pub fn set_catalogue(&self, listed: &[CatalogueRegion]) -> Result<(), RegionError> {
        for region in listed {
            self.intern(&region.id)?;
        }
        let _guard = self.write.lock();
        let mut next = Vec::clone(&self.all.load());
        for meta in next.iter_mut() {
            match listed.iter().find(|r| *r.id == *meta.id) {
                Some(region) => {
                    meta.name = region.name.clone();
                    meta.jurisdiction = region.jurisdiction.clone();
                    meta.in_map = true;
                }
                None => {
                    meta.in_map = false;
                    meta.jurisdiction.clear();
                }
            }
        }
        self.all.store(Arc::new(next));
        Ok(())
    }

    /// The first region listed in the map whose jurisdiction includes `country`.
    pub fn by_jurisdiction(
        &self,
        country: [u8; 2],
        mut accept: impl FnMut(RegionIdx) -> bool,
    ) -> Option<RegionIdx> {
        self.all
            .load()
            .iter()
            .enumerate()
            .filter(|(_, r)| r.in_map && r.jurisdiction.contains(&country))
            .map(|(i, _)| i as RegionIdx)
            .find(|&i| accept(i))
    }
}

/// A region as listed in a map source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogueRegion {
    pub id: String,
    pub name: String,
    pub jurisdiction: Vec<[u8; 2]>,
}

#[derive(Clone, Copy)]
struct Slot {
    /// version (48 bits) | home region (8) | state (8)
    packed: u64,
    epoch: u32,
    /// key[0] = id length; then the id inline (<= 11 bytes), or a u32 arena offset and a prefix.
    key: [u8; 12],
}

impl Slot {
    fn entry(&self) -> MapEntry {
        MapEntry {
            home_region: (self.packed >> 8) as u8,
            state: if self.packed & 0xff == 1 {
                WorkspaceState::Frozen
            } else {
                WorkspaceState::Active
            },
            epoch: self.epoch,
            version: self.packed >> 16,
        }
    }

    fn set_entry(&mut self, entry: &MapEntry) {
        let state = match entry.state {
            WorkspaceState::Active => 0,
            WorkspaceState::Frozen => 1,
        };
        self.packed =
            ((entry.version & MAX_VERSION) << 16) | ((entry.home_region as u64) << 8) | state;
        self.epoch = entry.epoch;
    }

    fn id<'a>(&'a self, arena: &'a [u8]) -> &'a [u8] {
        let len = self.key[0] as usize;
        if len <= INLINE_KEY {
            &self.key[1..1 + len]
        } else {
            let offset =
                u32::from_le_bytes([self.key[1], self.key[2], self.key[3], self.key[4]]) as usize;
            &arena[offset..offset + len]
        }
    }

    fn matches(&self, id: &[u8], arena: &[u8]) -> bool {
        let len = self.key[0] as usize;
        if len != id.len() {
            return false;
        }
        if len <= INLINE_KEY {
            &self.key[1..1 + len] == id
        } else {
            // Cheap reject on the stored prefix before touching the arena.
            self.key[5..12] == id[..7] && self.id(arena) == id
        }
    }
}

#[derive(Default)]
struct Shard {
    table: HashTable<Slot>,
    arena: Vec<u8>,
    dead_bytes: usize,
}

impl Shard {
    fn compact(&mut self) {
        let mut arena = Vec::with_capacity(self.arena.len() - self.dead_bytes);
        for slot in self.table.iter_mut() {
            let len = slot.key[0] as usize;
            if len > INLINE_KEY {
                let id = slot.id(&self.arena);
                let offset = arena.len() as u32;
                arena.extend_from_slice(id);
                slot.key[1..5].copy_from_slice(&offset.to_le_bytes());
            }
        }
        self.arena = arena;
        self.dead_bytes = 0;
    }
}

/// One complete map: every workspace entry at one (advancing) version.
pub struct MapTable {
    shards: Box<[RwLock<Shard>]>,
    hasher: foldhash::fast::RandomState,
    len: AtomicUsize,
    version: AtomicU64,
}

impl std::fmt::Debug for MapTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapTable")
            .field("len", &self.len())
            .field("version", &self.version())
            .finish()
    }
}

impl MapTable {
    /// An empty map at `version`, with room for about `capacity` entries.
    pub fn with_capacity(capacity: usize, version: u64) -> Self {
        let per_shard = capacity.div_ceil(SHARDS);
        let shards = (0..SHARDS)
            .map(|_| {
                RwLock::new(Shard {
                    table: HashTable::with_capacity(per_shard),
                    arena: Vec::new(),
                    dead_bytes: 0,
                })
            })
            .collect();
        Self {
            shards,
            hasher: foldhash::fast::RandomState::default(),
            len: AtomicUsize::new(0),
            version: AtomicU64::new(version),
        }
    }

    fn hash(&self, id: &[u8]) -> u64 {
        self.hasher.hash_one(id)
    }

    fn shard(&self, hash: u64) -> &RwLock<Shard> {
        // Bits 40..46: hashbrown uses the low bits for the bucket and the top 7 for the
        // control byte, so the shard choice must come from neither.
        &self.shards[((hash >> 40) as usize) & (SHARDS - 1)]
    }

    /// Looks up a workspace.
    pub fn get(&self, id: &[u8]) -> Option<MapEntry> {
        let hash = self.hash(id);
        let shard = self.shard(hash).read();
        shard
            .table
            .find(hash, |slot| slot.matches(id, &shard.arena))
            .map(Slot::entry)
    }

    /// Inserts or replaces a workspace entry. Does not move the map version.
    pub fn insert(&self, id: &WorkspaceId, entry: MapEntry) {
        let id = id.as_bytes();
        let hash = self.hash(id);
        let mut guard = self.shard(hash).write();
        let shard = &mut *guard;
        if let Some(slot) = shard
            .table
            .find_mut(hash, |slot| slot.matches(id, &shard.arena))
        {
            slot.set_entry(&entry);
            return;
        }
        let mut key = [0u8; 12];
        key[0] = id.len() as u8;
        if id.len() <= INLINE_KEY {
            key[1..1 + id.len()].copy_from_slice(id);
        } else {
            let offset = shard.arena.len() as u32;
            shard.arena.extend_from_slice(id);
            key[1..5].copy_from_slice(&offset.to_le_bytes());
            key[5..12].copy_from_slice(&id[..7]);
        }
        let mut slot = Slot {
            packed: 0,
            epoch: 0,
            key,
        };
        slot.set_entry(&entry);
        let hasher = &self.hasher;
        let arena = &shard.arena;
        shard
            .table
            .insert_unique(hash, slot, |s| hasher.hash_one(s.id(arena)));
        self.len.fetch_add(1, Ordering::Relaxed);
    }

    /// Removes a workspace; returns whether it was there.
    pub fn remove(&self, id: &[u8]) -> bool {
        let hash = self.hash(id);
        let mut guard = self.shard(hash).write();
        let shard = &mut *guard;
        let Ok(found) = shard
            .table
            .find_entry(hash, |slot| slot.matches(id, &shard.arena))
        else {
            return false;
        };
        let (slot, _) = found.remove();
        if slot.key[0] as usize > INLINE_KEY {
            shard.dead_bytes += slot.key[0] as usize;
            if shard.dead_bytes > 64 * 1024 && shard.dead_bytes * 2 > shard.arena.len() {
                shard.compact();
            }
        }
        self.len.fetch_sub(1, Ordering::Relaxed);
        true
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The map version this table is at.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Publishes a new version after its changes were applied.
    pub fn publish_version(&self, version: u64) {
        self.version.store(version, Ordering::Release);
    }

    /// Heap bytes held by the table (slots, control bytes and arenas).
    pub fn heap_bytes(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let s = s.read();
                s.table.allocation_size() + s.arena.capacity()
            })
            .sum()
    }

    /// Calls `f` for every entry (shard by shard, each under its read lock).
    pub fn for_each(&self, mut f: impl FnMut(&str, MapEntry)) {
        for shard in self.shards.iter() {
            let shard = shard.read();
            for slot in shard.table.iter() {
                let id = std::str::from_utf8(slot.id(&shard.arena)).unwrap_or_default();
                f(id, slot.entry());
            }
        }
    }
}

/// The process's replica: the current table (if any map was ever loaded) and the regions.
#[derive(Debug, Default)]
pub struct Replica {
    table: ArcSwapOption<MapTable>,
    regions: Regions,
}

/// A consistent view for one routing decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// No map has ever been loaded.
    NoMap,
    /// The map (at `version`) has no such workspace.
    Unknown {
        version: u64,
    },
    Found {
        entry: MapEntry,
        version: u64,
    },
}

impl Replica {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn regions(&self) -> &Regions {
        &self.regions
    }

    /// Looks up `id`, returning the entry with the map version it is valid at.
    pub fn lookup(&self, id: &WorkspaceId) -> Lookup {
        let guard = self.table.load();
        let Some(table) = guard.as_ref() else {
            return Lookup::NoMap;
        };
        let version = table.version();
        match table.get(id.as_bytes()) {
            Some(entry) => Lookup::Found { entry, version },
            None => Lookup::Unknown { version },
        }
    }

    /// The loaded map's version, if any map was loaded.
    pub fn version(&self) -> Option<u64> {
        self.table.load().as_ref().map(|t| t.version())
    }

    pub fn len(&self) -> usize {
        self.table.load().as_ref().map_or(0, |t| t.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_loaded(&self) -> bool {
        self.table.load().is_some()
    }

    /// The current table, for change application and persistence.
    pub fn table(&self) -> Option<Arc<MapTable>> {
        self.table.load_full()
    }

    /// Atomically replaces the whole map.
    pub fn replace(
        &self,
        table: MapTable,
        catalogue: &[CatalogueRegion],
    ) -> Result<(), RegionError> {
        self.regions.set_catalogue(catalogue)?;
        self.table.store(Some(Arc::new(table)));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(region: RegionIdx, version: u64) -> MapEntry {
        MapEntry {
            home_region: region,
            state: WorkspaceState::Active,
            epoch: 7,
            version,
        }
    }

    fn id(s: &str) -> WorkspaceId {
        WorkspaceId::parse(s.as_bytes()).unwrap()
    }

    #[test]
    fn slot_is_24_bytes() {
        assert_eq!(std::mem::size_of::<Slot>(), 24);
    }

    #[test]
    fn insert_get_replace_remove_short_and_long_ids() {
        let table = MapTable::with_capacity(0, 1);
        let long = "a-very-long-workspace-identifier-that-lives-in-the-arena";
        for (i, name) in ["acme", "exactly11ch", "twelve-chars", long]
            .iter()
            .enumerate()
        {
            table.insert(&id(name), entry(i as u8, i as u64 + 1));
        }
        assert_eq!(table.len(), 4);
        assert_eq!(table.get(b"acme"), Some(entry(0, 1)));
        assert_eq!(table.get(b"exactly11ch"), Some(entry(1, 2)));
        assert_eq!(table.get(b"twelve-chars"), Some(entry(2, 3)));
        assert_eq!(table.get(long.as_bytes()), Some(entry(3, 4)));
        // Same prefix and length, different tail: must not match.
        assert_eq!(table.get(b"twelve-charz"), None);

        let frozen = MapEntry {
            state: WorkspaceState::Frozen,
            epoch: 9,
            ..entry(1, MAX_VERSION)
        };
        table.insert(&id(long), frozen);
        assert_eq!(table.len(), 4);
        assert_eq!(table.get(long.as_bytes()), Some(frozen));

        assert!(table.remove(long.as_bytes()));
        assert!(!table.remove(long.as_bytes()));
        assert_eq!(table.get(long.as_bytes()), None);
        assert_eq!(table.len(), 3);
    }

    #[test]
    fn arena_compaction_keeps_every_live_id() {
        let table = MapTable::with_capacity(0, 1);
        let name = |i: usize| format!("workspace-number-{i:08}");
        for i in 0..40_000 {
            table.insert(&id(&name(i)), entry(1, i as u64));
        }
        for i in (0..40_000).filter(|i| i % 4 != 0) {
            assert!(table.remove(name(i).as_bytes()));
        }
        assert_eq!(table.len(), 10_000);
        for i in 0..40_000 {
            let got = table.get(name(i).as_bytes());
            assert_eq!(got.is_some(), i % 4 == 0, "{i}");
        }
        let mut seen = 0;
        table.for_each(|ws, e| {
            assert!(ws.starts_with("workspace-number-"));
            assert_eq!(e.home_region, 1);
            seen += 1;
        });
        assert_eq!(seen, 10_000);
    }

    #[test]
    fn replica_lookup_reports_no_map_unknown_and_found() {
        let replica = Replica::new();
        assert_eq!(replica.lookup(&id("acme")), Lookup::NoMap);
        let us = replica.regions().intern("us").unwrap();
        let table = MapTable::with_capacity(1, 5);
        table.insert(&id("acme"), entry(us, 3));
        replica
            .replace(
                table,
                &[CatalogueRegion {
                    id: "us".into(),
                    name: "United States".into(),
                    jurisdiction: vec![*b"US"],
                }],
            )
            .unwrap();
        assert_eq!(
            replica.lookup(&id("ACME")),
            Lookup::Found {
                entry: entry(us, 3),
                version: 5
            }
        );
        assert_eq!(replica.lookup(&id("nope")), Lookup::Unknown { version: 5 });
        assert_eq!(
            replica.regions().by_jurisdiction(*b"US", |_| true),
            Some(us)
        );
        assert_eq!(replica.regions().by_jurisdiction(*b"DE", |_| true), None);
    }

    #[test]
    fn regions_are_interned_once_and_validated() {
        let regions = Regions::default();
        let us = regions.intern("us").unwrap();
        let eu = regions.intern("eu").unwrap();
        assert_ne!(us, eu);
        assert_eq!(regions.intern("us").unwrap(), us);
        assert!(matches!(
            regions.intern("US"),
            Err(RegionError::InvalidId(_))
        ));
        assert_eq!(&*regions.id(eu).unwrap(), "eu");
    }
}
