//! The routing map replica: workspace id -> home region, state and epoch.
//!
//! Sized for 10 million workspaces. Each entry is a 32-byte slot (two per cache line) in one of
//! 64 shards, each a linear-probing table: ids of up to 19 bytes live inside the slot, longer ids
//! in a per-shard byte arena. A lookup usually reads one cache line. Region ids are interned to a
//! `u8` ([`RegionIdx`]).
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
use http::HeaderValue;
use parking_lot::{Mutex, RwLock};

use crate::route::inflight::{InFlight, InFlightGuard};
use crate::route::workspace_id::{is_valid_region_id, WorkspaceId};

/// A region id interned for the lifetime of the process.
pub type RegionIdx = u8;

/// Most regions one process can know.
pub const MAX_REGIONS: usize = 256;
// The metrics keep one slot per region index.
const _: () = assert!(MAX_REGIONS == crate::metrics::REGIONS);
/// Largest map version an entry can carry (48 bits).
pub const MAX_VERSION: u64 = (1 << 48) - 1;

const SHARDS: usize = 64;
const INLINE_KEY: usize = 19;

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

/// A slot: 32 bytes, two per cache line, so a lookup usually reads one line.
#[repr(C, align(32))]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Slot {
    /// version (48 bits) | home region (8) | state (8)
    packed: u64,
    epoch: u32,
    /// key[0] = id length (0: empty slot). Ids of up to 19 bytes live in key[1..]; longer ones
    /// keep their arena offset (u32) in key[1..5] and their first 15 bytes in key[5..20].
    key: [u8; 20],
}

const EMPTY: Slot = Slot {
    packed: 0,
    epoch: 0,
    key: [0; 20],
};

impl Slot {
    fn is_empty(&self) -> bool {
        self.key[0] == 0
    }

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

    fn arena_offset(&self) -> usize {
        u32::from_le_bytes([self.key[1], self.key[2], self.key[3], self.key[4]]) as usize
    }

    fn id<'a>(&'a self, arena: &'a [u8]) -> &'a [u8] {
        let len = self.key[0] as usize;
        if len <= INLINE_KEY {
            &self.key[1..1 + len]
        } else {
            let offset = self.arena_offset();
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
            self.key[5..20] == id[..15] && self.id(arena) == id
        }
    }
}

/// Slot storage. Arrays of 2 MiB and more live in an anonymous mapping advised for transparent
/// huge pages: at 10 million entries a lookup's cost is mostly the TLB walk and the cache miss,
/// and huge pages take most of the walk away (measured in docs/benchmarks.md).
enum SlotArray {
    Heap(Vec<Slot>),
    Mapped(memmap2::MmapMut),
}

const HUGE_PAGE: usize = 2 << 20;

impl SlotArray {
    /// `len` empty slots (an empty slot is all zero bytes).
    fn new(len: usize) -> Self {
        let bytes = len * std::mem::size_of::<Slot>();
        if bytes >= HUGE_PAGE {
            if let Ok(map) = memmap2::MmapMut::map_anon(bytes) {
                // Advice only: without transparent huge pages the mapping still works.
                let _ = map.advise(memmap2::Advice::HugePage);
                return SlotArray::Mapped(map);
            }
        }
        SlotArray::Heap(vec![EMPTY; len])
    }

    fn slots(&self) -> &[Slot] {
        match self {
            SlotArray::Heap(v) => v,
            SlotArray::Mapped(m) => bytemuck::cast_slice(&m[..]),
        }
    }

    fn slots_mut(&mut self) -> &mut [Slot] {
        match self {
            SlotArray::Heap(v) => v,
            SlotArray::Mapped(m) => bytemuck::cast_slice_mut(&mut m[..]),
        }
    }

    fn bytes(&self) -> usize {
        std::mem::size_of_val(self.slots())
    }
}

/// Most entries per slot before a shard grows (it grows by a quarter).
const MAX_LOAD: f64 = 0.8;
/// Load a presized shard starts at.
const INITIAL_LOAD: f64 = 0.75;

/// One shard: linear probing over a slot array, deletions by backward shift (no tombstones).
struct Shard {
    slots: SlotArray,
    len: usize,
    arena: Vec<u8>,
    dead_bytes: usize,
}

/// The slot a hash starts probing at: the hash's high bits scaled to the array length, so any
/// length works (no power-of-two rounding, which would waste up to half the memory).
fn home(hash: u64, len: usize) -> usize {
    ((hash as u128 * len as u128) >> 64) as usize
}

impl Shard {
    fn with_capacity(entries: usize) -> Self {
        let len = ((entries as f64 / INITIAL_LOAD) as usize).max(8);
        Self {
            slots: SlotArray::new(len),
            len: 0,
            arena: Vec::new(),
            dead_bytes: 0,
        }
    }

    fn find(&self, hash: u64, id: &[u8]) -> Option<usize> {
        let slots = self.slots.slots();
        let n = slots.len();
        let mut i = home(hash, n);
        loop {
            let slot = &slots[i];
            if slot.is_empty() {
                return None;
            }
            if slot.matches(id, &self.arena) {
                return Some(i);
            }
            i += 1;
            if i == n {
                i = 0;
            }
        }
    }

    /// Places `slot` (not present yet) in the first empty slot of its probe sequence.
    fn place(slots: &mut [Slot], hash: u64, slot: Slot) {
        let n = slots.len();
        let mut i = home(hash, n);
        while !slots[i].is_empty() {
            i += 1;
            if i == n {
                i = 0;
            }
        }
        slots[i] = slot;
    }

    fn grow(&mut self, hasher: &foldhash::fast::RandomState) {
        // Grow by a quarter: right after growing a shard is still 64 % full, so memory per
        // entry stays under 64 bytes whatever the size.
        let new_len = (self.slots.slots().len() * 5 / 4).max(16);
        let mut next = SlotArray::new(new_len);
        for slot in self.slots.slots().iter().filter(|s| !s.is_empty()) {
            let hash = hasher.hash_one(slot.id(&self.arena));
            Self::place(next.slots_mut(), hash, *slot);
        }
        self.slots = next;
    }

    /// Removes slot `i`, shifting later members of its cluster back so no probe sequence breaks.
    fn remove_at(&mut self, mut i: usize, hasher: &foldhash::fast::RandomState) {
        let removed = self.slots.slots()[i];
        let n = self.slots.slots().len();
        let mut j = i;
        loop {
            j += 1;
            if j == n {
                j = 0;
            }
            let candidate = self.slots.slots()[j];
            if candidate.is_empty() {
                break;
            }
            let k = home(hasher.hash_one(candidate.id(&self.arena)), n);
            // Move j back to i unless its home lies cyclically in (i, j].
            let stays = if i <= j {
                i < k && k <= j
            } else {
                i < k || k <= j
            };
            if !stays {
                self.slots.slots_mut()[i] = candidate;
                i = j;
            }
        }
        self.slots.slots_mut()[i] = EMPTY;
        self.len -= 1;
        let len = removed.key[0] as usize;
        if len > INLINE_KEY {
            self.dead_bytes += len;
            if self.dead_bytes > 64 * 1024 && self.dead_bytes * 2 > self.arena.len() {
                self.compact();
            }
        }
    }

    /// Rewrites the arena without the ids of removed entries.
    fn compact(&mut self) {
        let mut arena = Vec::with_capacity(self.arena.len() - self.dead_bytes);
        let old = std::mem::take(&mut self.arena);
        for slot in self.slots.slots_mut().iter_mut() {
            let len = slot.key[0] as usize;
            if len > INLINE_KEY {
                let start = slot.arena_offset();
                let offset = arena.len() as u32;
                arena.extend_from_slice(&old[start..start + len]);
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
            .map(|_| RwLock::new(Shard::with_capacity(per_shard)))
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
        // Low bits pick the shard; the slot comes from the high bits (see `home`).
        &self.shards[(hash as usize) & (SHARDS - 1)]
    }

    /// Looks up a workspace.
    pub fn get(&self, id: &[u8]) -> Option<MapEntry> {
        let hash = self.hash(id);
        let shard = self.shard(hash).read();
        shard.find(hash, id).map(|i| shard.slots.slots()[i].entry())
    }

    /// Inserts or replaces a workspace entry. Does not move the map version.
    pub fn insert(&self, id: &WorkspaceId, entry: MapEntry) {
        let id = id.as_bytes();
        let hash = self.hash(id);
        let mut guard = self.shard(hash).write();
        let shard = &mut *guard;
        if let Some(i) = shard.find(hash, id) {
            shard.slots.slots_mut()[i].set_entry(&entry);
            return;
        }
        if (shard.len + 1) as f64 > shard.slots.slots().len() as f64 * MAX_LOAD {
            shard.grow(&self.hasher);
        }
        let mut key = [0u8; 20];
        key[0] = id.len() as u8;
        if id.len() <= INLINE_KEY {
            key[1..1 + id.len()].copy_from_slice(id);
        } else {
            let offset = shard.arena.len() as u32;
            shard.arena.extend_from_slice(id);
            key[1..5].copy_from_slice(&offset.to_le_bytes());
            key[5..20].copy_from_slice(&id[..15]);
        }
        let mut slot = Slot {
            packed: 0,
            epoch: 0,
            key,
        };
        slot.set_entry(&entry);
        Shard::place(shard.slots.slots_mut(), hash, slot);
        shard.len += 1;
        self.len.fetch_add(1, Ordering::Relaxed);
    }

    /// Removes a workspace; returns whether it was there.
    pub fn remove(&self, id: &[u8]) -> bool {
        let hash = self.hash(id);
        let mut shard = self.shard(hash).write();
        let Some(i) = shard.find(hash, id) else {
            return false;
        };
        shard.remove_at(i, &self.hasher);
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

    /// Bytes held by the table (slot arrays and arenas).
    pub fn heap_bytes(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let s = s.read();
                s.slots.bytes() + s.arena.capacity()
            })
            .sum()
    }

    /// Calls `f` for every entry (shard by shard, each under its read lock).
    pub fn for_each(&self, mut f: impl FnMut(&str, MapEntry)) {
        for shard in self.shards.iter() {
            let shard = shard.read();
            for slot in shard.slots.slots().iter().filter(|s| !s.is_empty()) {
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
    in_flight: InFlight,
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

    /// Looks up `id`, returning the entry with the map version it is valid at: the published
    /// version, or the entry's own when a change was applied between reading the version and
    /// the entry (the version is published after its entries). The map at the returned version
    /// holds exactly this entry, so a request's `x-domicile-map-version` always explains where
    /// it went.
    pub fn lookup(&self, id: &WorkspaceId) -> Lookup {
        let guard = self.table.load();
        let Some(table) = guard.as_ref() else {
            return Lookup::NoMap;
        };
        let version = table.version();
        match table.get(id.as_bytes()) {
            Some(entry) => Lookup::Found {
                version: version.max(entry.version),
                entry,
            },
            None => Lookup::Unknown { version },
        }
    }

    /// [`Replica::lookup`] for a request that will be forwarded: the request is registered as
    /// in flight at the map version it reads (see [`crate::route::inflight`]) until the guard drops.
    pub fn lookup_tracked(&self, id: &WorkspaceId) -> (Lookup, Option<InFlightGuard>) {
        // The table is loaded under the registration's lock: a table swapped in before the
        // heartbeat side looked is the one this request reads.
        let (table, guard) = self.in_flight.enter(|| {
            let table = self.table.load_full();
            let version = table.as_ref().map(|t| t.version());
            (table, version)
        });
        let Some(table) = table else {
            return (Lookup::NoMap, guard);
        };
        let version = table.version();
        let lookup = match table.get(id.as_bytes()) {
            Some(entry) => Lookup::Found {
                version: version.max(entry.version),
                entry,
            },
            None => Lookup::Unknown { version },
        };
        (lookup, guard)
    }

    /// Requests in flight by map version.
    pub fn in_flight(&self) -> &InFlight {
        &self.in_flight
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
    fn slot_is_half_a_cache_line() {
        assert_eq!(std::mem::size_of::<Slot>(), 32);
        assert_eq!(std::mem::align_of::<Slot>(), 32);
    }

    #[test]
    fn grows_shrinks_and_survives_wraparound() {
        // A tiny table forces growth, probe wraparound and backward-shift deletes.
        let table = MapTable::with_capacity(0, 1);
        let name = |i: usize| format!("w{i}");
        for i in 0..5_000 {
            table.insert(&id(&name(i)), entry((i % 3) as u8, i as u64));
        }
        for i in (0..5_000).step_by(2) {
            assert!(table.remove(name(i).as_bytes()), "{i}");
        }
        for i in 0..5_000 {
            let got = table.get(name(i).as_bytes());
            if i % 2 == 0 {
                assert_eq!(got, None, "{i}");
            } else {
                assert_eq!(got, Some(entry((i % 3) as u8, i as u64)), "{i}");
            }
        }
        assert_eq!(table.len(), 2_500);
    }

    #[test]
    fn large_shards_use_mapped_memory() {
        let table = MapTable::with_capacity(64 * 100_000, 1);
        assert!(table.heap_bytes() >= 64 * 100_000 * 32);
        table.insert(&id("acme"), entry(1, 2));
        assert_eq!(table.get(b"acme"), Some(entry(1, 2)));
        assert!(matches!(table.shards[0].read().slots, SlotArray::Mapped(_)));
    }

    #[test]
    fn insert_get_replace_remove_short_and_long_ids() {
        let table = MapTable::with_capacity(0, 1);
        let long = "a-very-long-workspace-identifier-that-lives-in-the-arena";
        for (i, name) in ["acme", "exactly-nineteen-ch", "twenty-characters-id", long]
            .iter()
            .enumerate()
        {
            table.insert(&id(name), entry(i as u8, i as u64 + 1));
        }
        assert_eq!(table.len(), 4);
        assert_eq!(table.get(b"acme"), Some(entry(0, 1)));
        assert_eq!(table.get(b"exactly-nineteen-ch"), Some(entry(1, 2)));
        assert_eq!(table.get(b"twenty-characters-id"), Some(entry(2, 3)));
        assert_eq!(table.get(long.as_bytes()), Some(entry(3, 4)));
        // Same prefix and length, different tail: must not match.
        assert_eq!(table.get(b"twenty-characters-iz"), None);

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
