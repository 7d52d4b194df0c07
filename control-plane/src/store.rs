//! The store: regions, workspaces, the change feed, history, tokens and the fleet, on SQLite
//! or PostgreSQL with one schema (a migration set per backend).
//!
//! Ordering: every write transaction first locks the single `meta` row (PostgreSQL:
//! `SELECT ... FOR UPDATE`; SQLite: `BEGIN IMMEDIATE` on the one writer connection), takes the
//! next versions from it and writes the new head back before committing. Writers are therefore
//! serialised on that row, so version order is commit order, and a reader tailing
//! `changes WHERE version > v ORDER BY version` never skips a change that commits late.
//!
//! Each operation's body is written once and compiled for both backends by [`on_backend!`]:
//! the SQL is common to both, and the few differences live in a [`Dialect`].

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use domicile_wire::{
    Checksum, FeedLine, Heartbeat, LineError, Op, Region, RegionBody, State, Workspace,
    WorkspaceBody,
};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, Row, SqlitePool};
use tokio::sync::{mpsc, watch};

use crate::auth::{hash_token, new_token, Role};

/// Most rows one bulk statement carries.
const BATCH: usize = 20_000;
/// Snapshots served at once by one replica (each holds a read connection).
const SNAPSHOTS_AT_ONCE: usize = 4;
/// A snapshot whose client reads nothing for this long is abandoned.
const SNAPSHOT_STALL: Duration = Duration::from_secs(30);
/// How many bad lines an import reports before summarising.
pub const MAX_LINE_ERRORS: usize = 1000;
/// The PostgreSQL channel a commit notifies on (a wake-up hint only).
const CHANNEL: &str = "domicile_map";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("cannot prepare the database schema: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported store URL {0:?} (expected sqlite://PATH or postgres://...)")]
    BadUrl(String),
    #[error("{what} {id:?} does not exist")]
    NotFound { what: &'static str, id: String },
    /// A request that contradicts the current state (HTTP 409).
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    /// Bad input found against the store's contents (HTTP 422).
    #[error("{message}")]
    Invalid { code: &'static str, message: String },
    /// An import with bad lines (HTTP 422); nothing was written.
    #[error("{total} line(s) of the import are invalid; nothing was imported")]
    Lines { total: usize, lines: Vec<LineError> },
    #[error("the change feed no longer serves versions after {after} (it serves from {oldest}); fetch a snapshot")]
    Gone { after: u64, oldest: u64 },
    /// The store could not do it now (a failed batched write, a closing store).
    #[error("{0}")]
    Unavailable(String),
}

/// The map head: what `meta` holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub version: u64,
    pub checksum: Checksum,
    /// This store's epoch: a random id made when the store was created.
    pub epoch: String,
}

/// Who makes a change, and why (kept in the history).
#[derive(Debug, Clone)]
pub struct Actor {
    pub name: String,
    pub reason: Option<String>,
}

impl Actor {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            reason: None,
        }
    }
}

/// The result of a write: the entry as it now stands, and the version that wrote it (`None`
/// when the write changed nothing).
#[derive(Debug, Clone)]
pub struct Written<T> {
    pub value: T,
    pub version: Option<u64>,
    pub created: bool,
}

/// One line of an import, already parsed and validated on its own.
#[derive(Debug, Clone)]
pub struct ImportLine {
    pub line: u64,
    pub id: String,
    pub region: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ImportOutcome {
    pub created: u64,
    pub updated: u64,
    pub unchanged: u64,
    /// The head version after the import.
    pub version: u64,
}

/// One version at which a workspace's entry changed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HistoryRecord {
    pub version: u64,
    pub op: Op,
    /// The entry after the change (absent for a delete).
    pub region: Option<String>,
    pub state: Option<State>,
    pub epoch: Option<u32>,
    pub actor: String,
    pub reason: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub at_ms: i64,
}

/// A fleet member as stored.
#[derive(Debug, Clone)]
pub struct FleetRow {
    pub proxy_id: String,
    pub edge_region: String,
    pub applied_version: u64,
    pub drained_version: Option<u64>,
    pub checksum: String,
    pub epoch: String,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
}

/// A token as listed (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenInfo {
    pub name: String,
    pub role: Role,
    pub created_at_ms: i64,
}

/// The per-backend SQL that differs.
struct Dialect {
    begin_write: &'static str,
    lock_meta: &'static str,
    begin_snapshot: &'static str,
    /// Whether commits send a `NOTIFY` wake-up to other replicas.
    notify: bool,
    /// Bulk writes take their rows as one JSON array parameter ($1), which both backends
    /// unpack in C: one statement per [`BATCH`] rows instead of one per row.
    insert_workspaces: &'static str,
    insert_history: &'static str,
    /// Existing workspaces among a JSON array of ids ($1).
    existing: &'static str,
    /// One page of the snapshot as ready-made lines: ids after $1, at most $2 of them.
    snapshot_page: &'static str,
    /// Heartbeats as one JSON array ($1) of `[proxy_id, edge_region, applied, drained,
    /// checksum, epoch, token]`, seen at $2; returns the proxy ids written (a row another
    /// token owns is left alone).
    upsert_fleet: &'static str,
}

const SQLITE: Dialect = Dialect {
    begin_write: "BEGIN IMMEDIATE",
    lock_meta: "SELECT version, checksum, epoch FROM meta WHERE id = 1",
    begin_snapshot: "BEGIN",
    notify: false,
    insert_workspaces: "INSERT INTO workspaces (id, region, state, epoch, version, updated_at) \
        SELECT value->>0, value->>1, value->>2, value->>3, value->>4, $2 FROM json_each($1) \
        WHERE true ON CONFLICT (id) DO UPDATE SET region = excluded.region, \
        state = excluded.state, epoch = excluded.epoch, version = excluded.version, \
        updated_at = excluded.updated_at",
    insert_history: "INSERT INTO history \
        (version, kind, key, op, region, state, epoch, name, jurisdiction, actor, reason, at) \
        SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6, \
        value->>7, value->>8, $2, $3, $4 FROM json_each($1)",
    existing: "SELECT id, region, state, epoch, version FROM workspaces \
        WHERE id IN (SELECT value FROM json_each($1))",
    snapshot_page: "SELECT group_concat(line, char(10)) AS lines, max(id) AS last, \
        count(*) AS n FROM (SELECT id, json_object('type', 'workspace', 'id', id, \
        'region', region, 'state', state, 'epoch', epoch, 'version', version) AS line \
        FROM workspaces WHERE id > $1 ORDER BY id LIMIT $2)",
    upsert_fleet: "INSERT INTO fleet (proxy_id, edge_region, applied_version, drained_version, \
        checksum, epoch, first_seen, last_seen, token) \
        SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, $2, $2, \
        value->>6 FROM json_each($1) WHERE true \
        ON CONFLICT (proxy_id) DO UPDATE SET edge_region = excluded.edge_region, \
        applied_version = excluded.applied_version, drained_version = excluded.drained_version, \
        checksum = excluded.checksum, epoch = excluded.epoch, last_seen = excluded.last_seen \
        WHERE fleet.token = excluded.token RETURNING proxy_id",
};

const POSTGRES: Dialect = Dialect {
    begin_write: "BEGIN",
    lock_meta: "SELECT version, checksum, epoch FROM meta WHERE id = 1 FOR UPDATE",
    begin_snapshot: "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
    notify: true,
    insert_workspaces: "INSERT INTO workspaces (id, region, state, epoch, version, updated_at) \
        SELECT x->>0, x->>1, x->>2, (x->>3)::bigint, (x->>4)::bigint, $2 \
        FROM jsonb_array_elements($1::jsonb) AS x \
        ON CONFLICT (id) DO UPDATE SET region = excluded.region, \
        state = excluded.state, epoch = excluded.epoch, version = excluded.version, \
        updated_at = excluded.updated_at",
    insert_history: "INSERT INTO history \
        (version, kind, key, op, region, state, epoch, name, jurisdiction, actor, reason, at) \
        SELECT (x->>0)::bigint, x->>1, x->>2, x->>3, x->>4, x->>5, (x->>6)::bigint, \
        x->>7, x->>8, $2, $3, $4 FROM jsonb_array_elements($1::jsonb) AS x",
    existing: "SELECT id, region, state, epoch, version FROM workspaces \
        WHERE id IN (SELECT jsonb_array_elements_text($1::jsonb))",
    // Concatenation, not json_build_object (ten times slower per row): ids, regions and
    // states are validated on the way in and never need escaping.
    snapshot_page: "SELECT string_agg(line, E'\\n') AS lines, max(id) AS last, \
        count(*) AS n FROM (SELECT id, '{\"type\":\"workspace\",\"id\":\"' || id || \
        '\",\"region\":\"' || region || '\",\"state\":\"' || state || '\",\"epoch\":' || \
        epoch || ',\"version\":' || version || '}' AS line \
        FROM workspaces WHERE id > $1 ORDER BY id LIMIT $2) AS page",
    upsert_fleet: "INSERT INTO fleet (proxy_id, edge_region, applied_version, drained_version, \
        checksum, epoch, first_seen, last_seen, token) \
        SELECT x->>0, x->>1, (x->>2)::bigint, (x->>3)::bigint, x->>4, x->>5, $2, $2, x->>6 \
        FROM jsonb_array_elements($1::jsonb) AS x \
        ON CONFLICT (proxy_id) DO UPDATE SET edge_region = excluded.edge_region, \
        applied_version = excluded.applied_version, drained_version = excluded.drained_version, \
        checksum = excluded.checksum, epoch = excluded.epoch, last_seen = excluded.last_seen \
        WHERE fleet.token = excluded.token RETURNING proxy_id",
};

enum Backend {
    Sqlite { write: SqlitePool, read: SqlitePool },
    Postgres(PgPool),
}

/// Runs `$body` with `$pool` (writer pool), `$read` (reader pool) and `$d` (the [`Dialect`])
/// bound for whichever backend the store uses; the body is compiled once per backend.
macro_rules! on_backend {
    ($store:expr, |$pool:ident, $read:ident, $d:ident| $body:expr) => {{
        $store
            .operations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match &$store.backend {
            Backend::Sqlite { write, read } => {
                let $pool = write;
                let $read = read;
                let $d = &SQLITE;
                let _ = ($d, $read, $pool);
                $body
            }
            Backend::Postgres(pool) => {
                let $pool = pool;
                let $read = pool;
                let $d = &POSTGRES;
                let _ = ($d, $read, $pool);
                $body
            }
        }
    }};
}

/// Store settings.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Largest pool of PostgreSQL connections.
    pub max_connections: u32,
    /// How often the head is re-read, in case a wake-up was missed (or, on PostgreSQL,
    /// another replica wrote).
    pub poll_interval: Duration,
    /// How many of the newest versions the change feed serves.
    pub change_retention: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
            poll_interval: Duration::from_millis(500),
            change_retention: 1_000_000,
        }
    }
}

/// The control plane's store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Backend,
    epoch: String,
    change_retention: std::sync::atomic::AtomicU64,
    /// The newest committed version this replica knows of.
    head: watch::Sender<u64>,
    /// Set when the store closes: long reads (snapshots) stop.
    closing: watch::Sender<bool>,
    /// Snapshots hold a read connection for as long as the client reads: at most this many
    /// at once, so they never take every connection the API needs.
    snapshots: Arc<tokio::sync::Semaphore>,
    /// Store operations begun (each one statement or one transaction): what `/metrics`
    /// reports, so that the cost of a change can be read per change and per proxy.
    operations: std::sync::atomic::AtomicU64,
    /// Heartbeats on their way to the batched writer (`beats`).
    beats: mpsc::UnboundedSender<beats::Beat>,
    /// Live tokens by hash, as last read from the store.
    tokens: std::sync::Mutex<TokenCache>,
}

/// Live tokens by hash, as last read. Emptied when this replica creates or deletes a token,
/// and when the head watch sees the store's `tokens_version` move (another replica's doing):
/// a deleted token stops working everywhere within the poll interval. Only hits are kept, at most
/// [`TOKEN_CACHE_MAX`].
#[derive(Default)]
struct TokenCache {
    live: HashMap<String, (String, Role)>,
    /// The store's `tokens_version` when the cache was last emptied.
    seen: Option<i64>,
    /// Bumped at every emptying, so that a read racing one is not cached.
    generation: u64,
}

const TOKEN_CACHE_MAX: usize = 10_000;

/// Every token creation and deletion bumps this, in its transaction.
const BUMP_TOKENS: &str = "UPDATE meta SET tokens_version = tokens_version + 1 WHERE id = 1";

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend_name())
            .field("epoch", &self.inner.epoch)
            .finish()
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn new_epoch() -> String {
    use rand::Rng;
    let bytes: [u8; 8] = rand::thread_rng().gen();
    hex::encode(bytes)
}

/// A row of the fleet table.
fn fleet_row<R: Row>(r: &R) -> Result<FleetRow, StoreError>
where
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'c> String: sqlx::Decode<'c, R::Database> + sqlx::Type<R::Database>,
    for<'c> i64: sqlx::Decode<'c, R::Database> + sqlx::Type<R::Database>,
    for<'c> Option<i64>: sqlx::Decode<'c, R::Database> + sqlx::Type<R::Database>,
{
    Ok(FleetRow {
        proxy_id: r.try_get("proxy_id")?,
        edge_region: r.try_get("edge_region")?,
        applied_version: u(r.try_get("applied_version")?),
        drained_version: r.try_get::<Option<i64>, _>("drained_version")?.map(u),
        checksum: r.try_get("checksum")?,
        epoch: r.try_get("epoch")?,
        first_seen_ms: r.try_get("first_seen")?,
        last_seen_ms: r.try_get("last_seen")?,
    })
}

/// The one row a query on the read pool returned. Reads there use `fetch_all`, never
/// `fetch_one` or `fetch_optional`: on SQLite a statement left unfinished holds its read
/// transaction open, and the pooled connection then sees the database as it was until that
/// statement is next used (a replica's poll would read the token table, or a workspace, from
/// the past).
fn only<R>(rows: Vec<R>) -> Result<R, sqlx::Error> {
    rows.into_iter().next().ok_or(sqlx::Error::RowNotFound)
}

fn u(v: i64) -> u64 {
    v as u64
}

fn i(v: u64) -> i64 {
    v as i64
}

fn split_jurisdiction(text: &str) -> Vec<String> {
    text.split(',')
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
        .collect()
}

fn workspace_from_row<R: Row>(row: &R) -> Result<Workspace, sqlx::Error>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let state: String = row.try_get("state")?;
    Ok(Workspace {
        id: row.try_get("id")?,
        region: row.try_get("region")?,
        state: State::parse(&state).ok_or_else(|| {
            sqlx::Error::Decode(format!("unknown workspace state {state:?}").into())
        })?,
        epoch: row.try_get::<i64, _>("epoch")? as u32,
        version: u(row.try_get("version")?),
    })
}

fn region_from_row<R: Row>(row: &R) -> Result<Region, sqlx::Error>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    Ok(Region {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        jurisdiction: split_jurisdiction(&row.try_get::<String, _>("jurisdiction")?),
    })
}

fn head_from_row<R: Row>(row: &R) -> Result<Head, sqlx::Error>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    Ok(Head {
        version: u(row.try_get("version")?),
        checksum: Checksum(u(row.try_get("checksum")?)),
        epoch: row.try_get("epoch")?,
    })
}

fn entry_hash(w: &Workspace) -> u64 {
    Checksum::entry_hash(&w.id, &w.region, w.state, w.epoch, w.version)
}

/// A change about to be written to the history.
struct Pending {
    version: u64,
    kind: &'static str,
    key: String,
    op: Op,
    region: Option<String>,
    state: Option<State>,
    epoch: Option<u32>,
    name: Option<String>,
    jurisdiction: Option<String>,
}

impl Pending {
    fn workspace_put(w: &Workspace) -> Self {
        Self {
            version: w.version,
            kind: "workspace",
            key: w.id.clone(),
            op: Op::Put,
            region: Some(w.region.clone()),
            state: Some(w.state),
            epoch: Some(w.epoch),
            name: None,
            jurisdiction: None,
        }
    }

    fn workspace_delete(id: &str, version: u64) -> Self {
        Self {
            version,
            kind: "workspace",
            key: id.to_owned(),
            op: Op::Delete,
            region: None,
            state: None,
            epoch: None,
            name: None,
            jurisdiction: None,
        }
    }

    fn region(id: &str, version: u64, body: Option<RegionBody>) -> Self {
        Self {
            version,
            kind: "region",
            key: id.to_owned(),
            op: if body.is_some() { Op::Put } else { Op::Delete },
            region: None,
            state: None,
            epoch: None,
            jurisdiction: body.as_ref().map(|b| b.jurisdiction.join(",")),
            name: body.map(|b| b.name),
        }
    }
}

/// The feed line of one history row.
fn feed_line_from_row<R: Row>(row: &R) -> Result<(u64, String), sqlx::Error>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<i64>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let version = u(row.try_get("version")?);
    let kind: String = row.try_get("kind")?;
    let id: String = row.try_get("key")?;
    let op = if row.try_get::<String, _>("op")? == "delete" {
        Op::Delete
    } else {
        Op::Put
    };
    let bad = |what: &str| sqlx::Error::Decode(format!("history row {version}: {what}").into());
    let line = match (kind.as_str(), op) {
        ("workspace", Op::Put) => {
            let state: Option<String> = row.try_get("state")?;
            FeedLine::Workspace {
                version,
                id,
                op,
                entry: Some(WorkspaceBody {
                    region: row
                        .try_get::<Option<String>, _>("region")?
                        .ok_or_else(|| bad("no region"))?,
                    state: state
                        .as_deref()
                        .and_then(State::parse)
                        .ok_or_else(|| bad("no state"))?,
                    epoch: row
                        .try_get::<Option<i64>, _>("epoch")?
                        .ok_or_else(|| bad("no epoch"))? as u32,
                }),
            }
        }
        ("workspace", Op::Delete) => FeedLine::Workspace {
            version,
            id,
            op,
            entry: None,
        },
        ("region", Op::Put) => FeedLine::Region {
            version,
            id,
            op,
            entry: Some(RegionBody {
                name: row
                    .try_get::<Option<String>, _>("name")?
                    .unwrap_or_default(),
                jurisdiction: split_jurisdiction(
                    &row.try_get::<Option<String>, _>("jurisdiction")?
                        .unwrap_or_default(),
                ),
            }),
        },
        ("region", Op::Delete) => FeedLine::Region {
            version,
            id,
            op,
            entry: None,
        },
        _ => return Err(bad("unknown kind")),
    };
    Ok((
        version,
        serde_json::to_string(&line).expect("feed lines always serialise"),
    ))
}

/// The workspace `$id` as the transaction sees it, if it exists.
macro_rules! load_workspace {
    ($tx:expr, $id:expr) => {{
        sqlx::query("SELECT id, region, state, epoch, version FROM workspaces WHERE id = $1")
            .bind($id)
            .fetch_optional(&mut *$tx)
            .await?
            .map(|r| workspace_from_row(&r))
            .transpose()?
    }};
}

/// Appends changes to the history (which is also the feed).
macro_rules! append_changes {
    ($tx:expr, $d:expr, $pending:expr, $actor:expr, $at:expr) => {{
        Bulk::insert_history(&mut $tx, $d, &$pending, $actor, $at).await?;
    }};
}

/// Writing many rows at once. Both backends take a JSON array of rows as one parameter and
/// unpack it in C (one statement per [`BATCH`] rows); PostgreSQL loads large batches with
/// `COPY`, several times faster than any `INSERT` there.
trait Bulk {
    async fn insert_workspaces(
        &mut self,
        d: &Dialect,
        rows: &[Workspace],
        at: i64,
        upsert: bool,
    ) -> Result<(), sqlx::Error>;

    async fn insert_history(
        &mut self,
        d: &Dialect,
        rows: &[Pending],
        actor: &Actor,
        at: i64,
    ) -> Result<(), sqlx::Error>;
}

fn workspace_rows(rows: &[Workspace]) -> String {
    let rows: Vec<_> = rows
        .iter()
        .map(|w| {
            (
                w.id.as_str(),
                w.region.as_str(),
                w.state.as_str(),
                w.epoch,
                w.version,
            )
        })
        .collect();
    serde_json::to_string(&rows).expect("rows serialise")
}

fn history_rows(rows: &[Pending]) -> String {
    let rows: Vec<_> = rows
        .iter()
        .map(|p| {
            (
                p.version,
                p.kind,
                p.key.as_str(),
                p.op.as_str(),
                p.region.as_deref(),
                p.state.map(State::as_str),
                p.epoch,
                p.name.as_deref(),
                p.jurisdiction.as_deref(),
            )
        })
        .collect();
    serde_json::to_string(&rows).expect("rows serialise")
}

impl Bulk for sqlx::Transaction<'_, sqlx::Sqlite> {
    async fn insert_workspaces(
        &mut self,
        d: &Dialect,
        rows: &[Workspace],
        at: i64,
        _upsert: bool,
    ) -> Result<(), sqlx::Error> {
        for chunk in rows.chunks(BATCH) {
            sqlx::query(d.insert_workspaces)
                .bind(workspace_rows(chunk))
                .bind(at)
                .execute(&mut **self)
                .await?;
        }
        Ok(())
    }

    async fn insert_history(
        &mut self,
        d: &Dialect,
        rows: &[Pending],
        actor: &Actor,
        at: i64,
    ) -> Result<(), sqlx::Error> {
        for chunk in rows.chunks(BATCH) {
            sqlx::query(d.insert_history)
                .bind(history_rows(chunk))
                .bind(actor.name.as_str())
                .bind(actor.reason.as_deref())
                .bind(at)
                .execute(&mut **self)
                .await?;
        }
        Ok(())
    }
}

/// Below this many rows an `INSERT` beats the round trips of a `COPY`.
const COPY_FROM: usize = 200;

/// One field of `COPY ... FROM STDIN` text format.
fn copy_field(out: &mut String, value: Option<&str>) {
    match value {
        None => out.push_str("\\N"),
        Some(v) => {
            for c in v.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\t' => out.push_str("\\t"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    c => out.push(c),
                }
            }
        }
    }
}

impl Bulk for sqlx::Transaction<'_, sqlx::Postgres> {
    async fn insert_workspaces(
        &mut self,
        d: &Dialect,
        rows: &[Workspace],
        at: i64,
        upsert: bool,
    ) -> Result<(), sqlx::Error> {
        if upsert || rows.len() < COPY_FROM {
            for chunk in rows.chunks(BATCH) {
                sqlx::query(d.insert_workspaces)
                    .bind(workspace_rows(chunk))
                    .bind(at)
                    .execute(&mut **self)
                    .await?;
            }
            return Ok(());
        }
        let mut copy = self
            .copy_in_raw(
                "COPY workspaces (id, region, state, epoch, version, updated_at) FROM STDIN",
            )
            .await?;
        for chunk in rows.chunks(BATCH) {
            let mut text = String::with_capacity(chunk.len() * 48);
            for w in chunk {
                use std::fmt::Write;
                copy_field(&mut text, Some(&w.id));
                text.push('\t');
                copy_field(&mut text, Some(&w.region));
                let _ = writeln!(
                    text,
                    "\t{}\t{}\t{}\t{at}",
                    w.state.as_str(),
                    w.epoch,
                    w.version
                );
            }
            copy.send(text.as_bytes()).await?;
        }
        copy.finish().await?;
        Ok(())
    }

    async fn insert_history(
        &mut self,
        d: &Dialect,
        rows: &[Pending],
        actor: &Actor,
        at: i64,
    ) -> Result<(), sqlx::Error> {
        if rows.len() < COPY_FROM {
            for chunk in rows.chunks(BATCH) {
                sqlx::query(d.insert_history)
                    .bind(history_rows(chunk))
                    .bind(actor.name.as_str())
                    .bind(actor.reason.as_deref())
                    .bind(at)
                    .execute(&mut **self)
                    .await?;
            }
            return Ok(());
        }
        let mut copy = self
            .copy_in_raw(
                "COPY history (version, kind, key, op, region, state, epoch, name, \
                 jurisdiction, actor, reason, at) FROM STDIN",
            )
            .await?;
        let mut tail = String::new();
        copy_field(&mut tail, Some(&actor.name));
        tail.push('\t');
        copy_field(&mut tail, actor.reason.as_deref());
        tail.push_str(&format!("\t{at}\n"));
        for chunk in rows.chunks(BATCH) {
            let mut text = String::with_capacity(chunk.len() * 64);
            for p in chunk {
                text.push_str(&p.version.to_string());
                text.push('\t');
                text.push_str(p.kind);
                text.push('\t');
                copy_field(&mut text, Some(&p.key));
                text.push('\t');
                text.push_str(p.op.as_str());
                text.push('\t');
                copy_field(&mut text, p.region.as_deref());
                text.push('\t');
                copy_field(&mut text, p.state.map(State::as_str));
                text.push('\t');
                copy_field(&mut text, p.epoch.map(|e| e.to_string()).as_deref());
                text.push('\t');
                copy_field(&mut text, p.name.as_deref());
                text.push('\t');
                copy_field(&mut text, p.jurisdiction.as_deref());
                text.push('\t');
                text.push_str(&tail);
            }
            copy.send(text.as_bytes()).await?;
        }
        copy.finish().await?;
        Ok(())
    }
}

/// Writes the new head (and, on PostgreSQL, the wake-up hint) into the transaction.
macro_rules! set_head {
    ($tx:expr, $d:expr, $version:expr, $checksum:expr) => {{
        sqlx::query("UPDATE meta SET version = $1, checksum = $2 WHERE id = 1")
            .bind(i($version))
            .bind(i($checksum.0))
            .execute(&mut *$tx)
            .await?;
        if $d.notify {
            // The payload names the store's epoch: stores in other schemas of the same
            // database notify on the same channel.
            sqlx::query("SELECT pg_notify($1, epoch || ':' || $2) FROM meta WHERE id = 1")
                .bind(CHANNEL)
                .bind($version.to_string())
                .execute(&mut *$tx)
                .await?;
        }
    }};
}

/// Writes one workspace entry change inside a write transaction holding the meta lock:
/// `$old` becomes `$state` at `$region` (or its own region when `None`) at version
/// `$head.version + 1`, with its history row and the new head. Evaluates to the new entry.
macro_rules! write_entry {
    ($tx:expr, $d:expr, $head:expr, $old:expr, $region:expr, $state:expr, $actor:expr) => {{
        let old: &Workspace = &$old;
        let version = $head.version + 1;
        let new = Workspace {
            id: old.id.clone(),
            region: $region.map_or_else(|| old.region.clone(), |r: &str| r.to_owned()),
            state: $state,
            epoch: old.epoch.wrapping_add(1),
            version,
        };
        let mut checksum = $head.checksum;
        checksum.remove(entry_hash(old));
        checksum.add(entry_hash(&new));
        let at = now_ms();
        sqlx::query(
            "UPDATE workspaces SET region = $2, state = $3, epoch = $4, version = $5, \
             updated_at = $6 WHERE id = $1",
        )
        .bind(&old.id)
        .bind(&new.region)
        .bind(new.state.as_str())
        .bind(i64::from(new.epoch))
        .bind(i(version))
        .bind(at)
        .execute(&mut *$tx)
        .await?;
        let pending = [Pending::workspace_put(&new)];
        append_changes!($tx, $d, pending, $actor, at);
        set_head!($tx, $d, version, checksum);
        new
    }};
}

// After the macros above: the module uses them.
mod beats;
mod moves;
pub use moves::{AuditCursor, AuditEntry, AuditQuery, Move, MoveRequest, Phase};

impl Store {
    /// Opens (creating if needed) the store at `url` and brings its schema up to date.
    pub async fn open(url: &str, options: StoreOptions) -> Result<Self, StoreError> {
        let backend = if url.starts_with("sqlite:") {
            let connect = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                .foreign_keys(true)
                .busy_timeout(Duration::from_secs(10));
            // One writer: SQLite serialises writers anyway, and one connection never sees
            // SQLITE_BUSY from its own process.
            let write = SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(connect.clone())
                .await?;
            sqlx::migrate!("./migrations/sqlite").run(&write).await?;
            let read = SqlitePoolOptions::new()
                .max_connections(8)
                .connect_with(connect.read_only(true))
                .await?;
            Backend::Sqlite { write, read }
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let connect = PgConnectOptions::from_str(url)?;
            let pool = PgPoolOptions::new()
                .max_connections(options.max_connections)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(connect)
                .await?;
            sqlx::migrate!("./migrations/postgres").run(&pool).await?;
            Backend::Postgres(pool)
        } else {
            return Err(StoreError::BadUrl(url.to_owned()));
        };
        let (beats, beats_rx) = mpsc::unbounded_channel();
        let mut store = Self {
            inner: Arc::new(Inner {
                backend,
                epoch: String::new(),
                change_retention: options.change_retention.into(),
                head: watch::channel(0).0,
                closing: watch::channel(false).0,
                snapshots: Arc::new(tokio::sync::Semaphore::new(SNAPSHOTS_AT_ONCE)),
                operations: 0.into(),
                beats,
                tokens: Default::default(),
            }),
        };
        on_backend!(store.inner, |pool, _read, _d| {
            sqlx::query(
                "INSERT INTO meta (id, version, checksum, epoch) \
                 VALUES (1, 0, 0, $1) ON CONFLICT (id) DO NOTHING",
            )
            .bind(new_epoch())
            .execute(pool)
            .await?;
        });
        let head = store.head().await?;
        let inner = Arc::get_mut(&mut store.inner).expect("not shared yet");
        inner.epoch = head.epoch.clone();
        inner.head.send_replace(head.version);
        store.spawn_head_watch(options.poll_interval);
        beats::spawn(Arc::downgrade(&store.inner), beats_rx);
        Ok(store)
    }

    /// Changes how many of the newest versions the change feed serves.
    pub fn set_change_retention(&self, versions: u64) {
        self.inner
            .change_retention
            .store(versions.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// Store operations begun since the store opened.
    pub fn operations(&self) -> u64 {
        self.inner
            .operations
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn backend_name(&self) -> &'static str {
        match self.inner.backend {
            Backend::Sqlite { .. } => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// This store's epoch (fixed when the store was created).
    pub fn epoch(&self) -> &str {
        &self.inner.epoch
    }

    /// Follows the newest committed version: a receiver that changes after every commit of
    /// this replica, and within the poll interval (or a notification) for other replicas'.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.head.subscribe()
    }

    fn committed(&self, version: u64) {
        self.inner.head.send_if_modified(|head| {
            let newer = version > *head;
            if newer {
                *head = version;
            }
            newer
        });
    }

    fn spawn_head_watch(&self, poll_interval: Duration) {
        let weak = Arc::downgrade(&self.inner);
        if let Backend::Postgres(pool) = &self.inner.backend {
            let pool = pool.clone();
            let weak = weak.clone();
            tokio::spawn(async move {
                loop {
                    let mut listener = match sqlx::postgres::PgListener::connect_with(&pool).await {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::warn!("cannot listen for map changes: {e}");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            if weak.upgrade().is_none() {
                                return;
                            }
                            continue;
                        }
                    };
                    if let Err(e) = listener.listen(CHANNEL).await {
                        tracing::warn!("cannot listen for map changes: {e}");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                    loop {
                        match listener.recv().await {
                            Ok(n) => {
                                let Some(inner) = weak.upgrade() else { return };
                                let ours = n
                                    .payload()
                                    .split_once(':')
                                    .filter(|(epoch, _)| *epoch == inner.epoch)
                                    .and_then(|(_, v)| v.parse::<u64>().ok());
                                if let Some(v) = ours {
                                    Store { inner }.committed(v);
                                }
                            }
                            Err(e) => {
                                tracing::warn!("map change notifications interrupted: {e}");
                                break;
                            }
                        }
                        if pool.is_closed() {
                            return;
                        }
                    }
                }
            });
        }
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(poll_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut lower = None;
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let store = Store { inner };
                if let Err(e) = store.check_tokens().await {
                    // Nothing cached outlives what the store could not be asked about.
                    tracing::debug!("cannot look at the token set: {e}");
                    store.forget_tokens(None);
                }
                if let Ok(head) = store.head().await {
                    let known = *store.inner.head.borrow();
                    if head.version < known {
                        // Lower than what this replica saw: a store restored from a backup
                        // (or a read that raced a commit). Believe it when it holds twice.
                        if lower == Some(head.version) {
                            store.inner.head.send_replace(head.version);
                            lower = None;
                        } else {
                            lower = Some(head.version);
                        }
                    } else {
                        lower = None;
                        store.committed(head.version);
                    }
                }
            }
        });
    }

    /// Closes the connection pools.
    pub async fn close(&self) {
        self.inner.closing.send_replace(true);
        match &self.inner.backend {
            Backend::Sqlite { write, read } => {
                read.close().await;
                write.close().await;
            }
            Backend::Postgres(pool) => pool.close().await,
        }
    }

    pub async fn head(&self) -> Result<Head, StoreError> {
        on_backend!(self.inner, |_pool, read, _d| {
            let row = sqlx::query("SELECT version, checksum, epoch FROM meta WHERE id = 1")
                .fetch_all(read)
                .await?;
            Ok(head_from_row(&only(row)?)?)
        })
    }

    /// The newest version committed at or before `at_ms` (0 when none was). Read from the
    /// newest change backwards, so it costs as many rows as were committed since.
    pub async fn version_at(&self, at_ms: i64) -> Result<u64, StoreError> {
        on_backend!(self.inner, |_pool, read, _d| {
            let rows = sqlx::query(
                "SELECT version FROM history WHERE at <= $1 ORDER BY version DESC LIMIT 1",
            )
            .bind(at_ms)
            .fetch_all(read)
            .await?;
            Ok(match rows.first() {
                Some(row) => u(row.try_get("version")?),
                None => 0,
            })
        })
    }

    // ---- regions ----

    pub async fn regions(&self) -> Result<Vec<Region>, StoreError> {
        on_backend!(self.inner, |_pool, read, _d| {
            let rows = sqlx::query("SELECT id, name, jurisdiction FROM regions ORDER BY id")
                .fetch_all(read)
                .await?;
            rows.iter()
                .map(|r| region_from_row(r).map_err(StoreError::from))
                .collect()
        })
    }

    pub async fn region(&self, id: &str) -> Result<Region, StoreError> {
        on_backend!(self.inner, |_pool, read, _d| {
            let row = sqlx::query("SELECT id, name, jurisdiction FROM regions WHERE id = $1")
                .bind(id)
                .fetch_all(read)
                .await?
                .into_iter()
                .next();
            match row {
                Some(row) => Ok(region_from_row(&row)?),
                None => Err(StoreError::NotFound {
                    what: "region",
                    id: id.to_owned(),
                }),
            }
        })
    }

    /// Creates or updates a region. Ids and country codes must already be validated.
    pub async fn put_region(
        &self,
        region: Region,
        actor: &Actor,
    ) -> Result<Written<Region>, StoreError> {
        let written = on_backend!(self.inner, |pool, _read, d| {
            let mut tx = pool.begin_with(d.begin_write).await?;
            let head = head_from_row(&sqlx::query(d.lock_meta).fetch_one(&mut *tx).await?)?;
            let existing = sqlx::query("SELECT id, name, jurisdiction FROM regions WHERE id = $1")
                .bind(&region.id)
                .fetch_optional(&mut *tx)
                .await?
                .map(|r| region_from_row(&r))
                .transpose()?;
            if existing.as_ref() == Some(&region) {
                return Ok(Written {
                    value: region,
                    version: None,
                    created: false,
                });
            }
            let version = head.version + 1;
            let at = now_ms();
            sqlx::query(
                "INSERT INTO regions (id, name, jurisdiction, version, updated_at) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO UPDATE SET \
                 name = excluded.name, jurisdiction = excluded.jurisdiction, \
                 version = excluded.version, updated_at = excluded.updated_at",
            )
            .bind(&region.id)
            .bind(&region.name)
            .bind(region.jurisdiction.join(","))
            .bind(i(version))
            .bind(at)
            .execute(&mut *tx)
            .await?;
            let pending = [Pending::region(
                &region.id,
                version,
                Some(RegionBody {
                    name: region.name.clone(),
                    jurisdiction: region.jurisdiction.clone(),
                }),
            )];
            append_changes!(tx, d, pending, actor, at);
            set_head!(tx, d, version, head.checksum);
            tx.commit().await?;
            Written {
                created: existing.is_none(),
                value: region,
                version: Some(version),
            }
        });
        if let Some(v) = written.version {
            self.committed(v);
        }
        Ok(written)
    }

    /// Deletes a region; refused while any workspace calls it home.
    pub async fn delete_region(&self, id: &str, actor: &Actor) -> Result<u64, StoreError> {
        let version = on_backend!(self.inner, |pool, _read, d| {
            let mut tx = pool.begin_with(d.begin_write).await?;
            let head = head_from_row(&sqlx::query(d.lock_meta).fetch_one(&mut *tx).await?)?;
            let exists = sqlx::query("SELECT id FROM regions WHERE id = $1")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?
                .is_some();
            if !exists {
                return Err(StoreError::NotFound {
                    what: "region",
                    id: id.to_owned(),
                });
            }
            let homes: i64 = sqlx::query("SELECT COUNT(*) AS n FROM workspaces WHERE region = $1")
                .bind(id)
                .fetch_one(&mut *tx)
                .await?
                .try_get("n")?;
            if homes > 0 {
                return Err(StoreError::Conflict {
                    code: "region_in_use",
                    message: format!(
                        "region {id:?} is the home of {homes} workspace(s); move or delete them first"
                    ),
                });
            }
            let moving_in = sqlx::query(
                "SELECT id FROM moves WHERE to_region = $1 AND phase NOT IN ('done', 'aborted') \
                 LIMIT 1",
            )
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(m) = moving_in {
                let move_id: i64 = m.try_get("id")?;
                return Err(StoreError::Conflict {
                    code: "region_in_use",
                    message: format!(
                        "region {id:?} is the target of move {move_id}; let it finish or abort it first"
                    ),
                });
            }
            let version = head.version + 1;
            let at = now_ms();
            sqlx::query("DELETE FROM regions WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            let pending = [Pending::region(id, version, None)];
            append_changes!(tx, d, pending, actor, at);
            set_head!(tx, d, version, head.checksum);
            tx.commit().await?;
            version
        });
        self.committed(version);
        Ok(version)
    }

    // ---- workspaces ----

    pub async fn workspace(&self, id: &str) -> Result<Workspace, StoreError> {
        on_backend!(self.inner, |_pool, read, _d| {
            let row = sqlx::query(
                "SELECT id, region, state, epoch, version FROM workspaces WHERE id = $1",
            )
            .bind(id)
            .fetch_all(read)
            .await?
            .into_iter()
            .next();
            match row {
                Some(row) => Ok(workspace_from_row(&row)?),
                None => Err(StoreError::NotFound {
                    what: "workspace",
                    id: id.to_owned(),
                }),
            }
        })
    }

    /// Workspaces in id order after `after`, optionally only those of one region.
    pub async fn workspaces(
        &self,
        region: Option<&str>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Workspace>, StoreError> {
        on_backend!(self.inner, |_pool, read, _d| {
            let rows = sqlx::query(
                "SELECT id, region, state, epoch, version FROM workspaces \
                 WHERE ($1 IS NULL OR region = $1) AND ($2 IS NULL OR id > $2) \
                 ORDER BY id LIMIT $3",
            )
            .bind(region)
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(read)
            .await?;
            rows.iter()
                .map(|r| workspace_from_row(r).map_err(StoreError::from))
                .collect()
        })
    }

    /// Sets a workspace's home region, creating the workspace if needed. Changing the region
    /// of an existing workspace needs `force` (moves are the safe way), and is refused while
    /// the workspace is frozen.
    pub async fn put_workspace(
        &self,
        id: &str,
        region: &str,
        force: bool,
        actor: &Actor,
    ) -> Result<Written<Workspace>, StoreError> {
        let outcome = self
            .import_returning_last(
                vec![ImportLine {
                    line: 1,
                    id: id.to_owned(),
                    region: region.to_owned(),
                }],
                force,
                actor,
            )
            .await;
        let outcome = match outcome {
            Ok(o) => o,
            Err(StoreError::Lines { lines, .. }) => {
                let Some(first) = lines.into_iter().next() else {
                    return Err(StoreError::Invalid {
                        code: "invalid_workspace",
                        message: format!("workspace {id:?} was refused"),
                    });
                };
                return Err(match first.code.as_str() {
                    "unknown_region" => StoreError::Invalid {
                        code: "unknown_region",
                        message: first.message,
                    },
                    "workspace_moving" => StoreError::Conflict {
                        code: "workspace_moving",
                        message: first.message,
                    },
                    _ => StoreError::Conflict {
                        code: "region_change_requires_move",
                        message: first.message,
                    },
                });
            }
            Err(e) => return Err(e),
        };
        let (outcome, value) = outcome;
        let value = value.ok_or_else(|| StoreError::NotFound {
            what: "workspace",
            id: id.to_owned(),
        })?;
        Ok(Written {
            created: outcome.created == 1,
            version: (outcome.unchanged == 0).then_some(value.version),
            value,
        })
    }

    pub async fn delete_workspace(&self, id: &str, actor: &Actor) -> Result<u64, StoreError> {
        let version = on_backend!(self.inner, |pool, _read, d| {
            let mut tx = pool.begin_with(d.begin_write).await?;
            let head = head_from_row(&sqlx::query(d.lock_meta).fetch_one(&mut *tx).await?)?;
            let Some(existing) = load_workspace!(tx, id) else {
                return Err(StoreError::NotFound {
                    what: "workspace",
                    id: id.to_owned(),
                });
            };
            if existing.state == State::Frozen {
                return Err(StoreError::Conflict {
                    code: "workspace_moving",
                    message: format!("workspace {id:?} is frozen for a move; it cannot be deleted until the move ends"),
                });
            }
            let version = head.version + 1;
            let mut checksum = head.checksum;
            checksum.remove(entry_hash(&existing));
            let at = now_ms();
            sqlx::query("DELETE FROM workspaces WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            let pending = [Pending::workspace_delete(id, version)];
            append_changes!(tx, d, pending, actor, at);
            set_head!(tx, d, version, checksum);
            tx.commit().await?;
            version
        });
        self.committed(version);
        Ok(version)
    }

    /// Writes many workspaces in one transaction: all of them or none. Lines must already be
    /// valid on their own (ids normalised, no duplicates); this checks them against the store
    /// (the region exists; an existing workspace keeps its region unless `force`; frozen
    /// workspaces are not touched) and reports every line that fails.
    pub async fn import(
        &self,
        lines: Vec<ImportLine>,
        force: bool,
        actor: &Actor,
    ) -> Result<ImportOutcome, StoreError> {
        self.import_returning_last(lines, force, actor)
            .await
            .map(|(outcome, _)| outcome)
    }

    /// [`Store::import`], also returning the last line's entry as the transaction left it.
    async fn import_returning_last(
        &self,
        lines: Vec<ImportLine>,
        force: bool,
        actor: &Actor,
    ) -> Result<(ImportOutcome, Option<Workspace>), StoreError> {
        let (outcome, last) = on_backend!(self.inner, |pool, _read, d| {
            let mut tx = pool.begin_with(d.begin_write).await?;
            let head = head_from_row(&sqlx::query(d.lock_meta).fetch_one(&mut *tx).await?)?;
            let regions: HashSet<String> = sqlx::query("SELECT id FROM regions")
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|r| r.try_get::<String, _>("id"))
                .collect::<Result<_, _>>()?;
            let any_workspaces = sqlx::query("SELECT id FROM workspaces LIMIT 1")
                .fetch_optional(&mut *tx)
                .await?
                .is_some();
            let mut existing: HashMap<String, Workspace> = HashMap::new();
            if any_workspaces {
                for chunk in lines.chunks(BATCH) {
                    let ids: Vec<&str> = chunk.iter().map(|l| l.id.as_str()).collect();
                    let rows = sqlx::query(d.existing)
                        .bind(serde_json::to_string(&ids).expect("ids serialise"))
                        .fetch_all(&mut *tx)
                        .await?;
                    for row in rows {
                        let w = workspace_from_row(&row)?;
                        existing.insert(w.id.clone(), w);
                    }
                }
            }
            let mut errors = Vec::new();
            let mut total_errors = 0usize;
            let mut report = |line: u64, code: &str, message: String| {
                total_errors += 1;
                if errors.len() < MAX_LINE_ERRORS {
                    errors.push(LineError {
                        line,
                        code: code.to_owned(),
                        message,
                    });
                }
            };
            let mut outcome = ImportOutcome::default();
            let mut checksum = head.checksum;
            let mut version = head.version;
            let mut writes: Vec<Workspace> = Vec::new();
            for line in &lines {
                if !regions.contains(&line.region) {
                    report(
                        line.line,
                        "unknown_region",
                        format!("region {:?} does not exist", line.region),
                    );
                    continue;
                }
                match existing.get(&line.id) {
                    Some(old) if old.region == line.region => outcome.unchanged += 1,
                    Some(old) if old.state == State::Frozen => report(
                        line.line,
                        "workspace_moving",
                        format!(
                            "workspace {:?} is frozen for a move; its region cannot change now",
                            line.id
                        ),
                    ),
                    Some(old) if !force => report(
                        line.line,
                        "region_change_requires_move",
                        format!(
                            "workspace {:?} already lives in region {:?}; changing its region \
                             moves its traffic without moving its data (use a move, or force)",
                            line.id, old.region
                        ),
                    ),
                    old => {
                        version += 1;
                        let new = Workspace {
                            id: line.id.clone(),
                            region: line.region.clone(),
                            state: State::Active,
                            epoch: old.map_or(1, |o| o.epoch.wrapping_add(1)),
                            version,
                        };
                        if let Some(old) = old {
                            checksum.remove(entry_hash(old));
                            outcome.updated += 1;
                        } else {
                            outcome.created += 1;
                        }
                        checksum.add(entry_hash(&new));
                        writes.push(new);
                    }
                }
            }
            if total_errors > 0 {
                return Err(StoreError::Lines {
                    total: total_errors,
                    lines: errors,
                });
            }
            outcome.version = version;
            let last = lines.last().and_then(|l| {
                writes
                    .iter()
                    .rev()
                    .find(|w| w.id == l.id)
                    .or_else(|| existing.get(&l.id))
                    .cloned()
            });
            if writes.is_empty() {
                return Ok((outcome, last));
            }
            let at = now_ms();
            let (new, updated): (Vec<Workspace>, Vec<Workspace>) = writes
                .iter()
                .cloned()
                .partition(|w| !existing.contains_key(&w.id));
            Bulk::insert_workspaces(&mut tx, d, &new, at, false).await?;
            Bulk::insert_workspaces(&mut tx, d, &updated, at, true).await?;
            let pending: Vec<Pending> = writes.iter().map(Pending::workspace_put).collect();
            append_changes!(tx, d, pending, actor, at);
            set_head!(tx, d, version, checksum);
            tx.commit().await?;
            (outcome, last)
        });
        self.committed(outcome.version);
        Ok((outcome, last))
    }

    /// Sets a workspace's state (and, when given, its region) as one change; the building
    /// block of moves. Returns the new entry.
    pub async fn set_workspace_state(
        &self,
        id: &str,
        state: State,
        region: Option<&str>,
        actor: &Actor,
    ) -> Result<Workspace, StoreError> {
        let new = on_backend!(self.inner, |pool, _read, d| {
            let mut tx = pool.begin_with(d.begin_write).await?;
            let head = head_from_row(&sqlx::query(d.lock_meta).fetch_one(&mut *tx).await?)?;
            let Some(old) = load_workspace!(tx, id) else {
                return Err(StoreError::NotFound {
                    what: "workspace",
                    id: id.to_owned(),
                });
            };
            if let Some(region) = region {
                let known = sqlx::query("SELECT id FROM regions WHERE id = $1")
                    .bind(region)
                    .fetch_optional(&mut *tx)
                    .await?
                    .is_some();
                if !known {
                    return Err(StoreError::Invalid {
                        code: "unknown_region",
                        message: format!("region {region:?} does not exist"),
                    });
                }
            }
            let new = write_entry!(tx, d, head, old, region, state, actor);
            tx.commit().await?;
            new
        });
        self.committed(new.version);
        Ok(new)
    }

    // ---- the feed ----

    /// Up to `limit` feed lines after `after`, in version order. `Gone` when `after` is
    /// older than the retained window (the newest `change_retention` versions): a client
    /// that far behind is better served by a snapshot.
    pub async fn changes(&self, after: u64, limit: u32) -> Result<Vec<(u64, String)>, StoreError> {
        on_backend!(self.inner, |_pool, read, d| {
            let mut tx = read.begin_with(d.begin_snapshot).await?;
            let head = head_from_row(
                &sqlx::query("SELECT version, checksum, epoch FROM meta WHERE id = 1")
                    .fetch_all(&mut *tx)
                    .await
                    .and_then(only)?,
            )?;
            let retention = self
                .inner
                .change_retention
                .load(std::sync::atomic::Ordering::Relaxed);
            let floor = head.version.saturating_sub(retention);
            if after < floor {
                return Err(StoreError::Gone {
                    after,
                    oldest: floor + 1,
                });
            }
            let rows = sqlx::query(
                "SELECT version, kind, key, op, region, state, epoch, name, jurisdiction \
                 FROM history WHERE version > $1 ORDER BY version LIMIT $2",
            )
            .bind(i(after))
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await?;
            tx.commit().await?;
            rows.iter()
                .map(|r| feed_line_from_row(r).map_err(StoreError::from))
                .collect()
        })
    }

    /// The oldest version the feed serves changes after, when the head is `head`.
    pub fn change_floor(&self, head: u64) -> u64 {
        head.saturating_sub(
            self.inner
                .change_retention
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// Streams the whole map at one version, in the map-file format, as chunks of lines.
    /// The first line names the version, epoch, entry count and checksum.
    pub fn snapshot(&self) -> mpsc::Receiver<Result<Bytes, StoreError>> {
        let (tx, rx) = mpsc::channel(8);
        let store = self.clone();
        tokio::spawn(async move {
            let Ok(_permit) = store.inner.snapshots.clone().acquire_owned().await else {
                return;
            };
            if let Err(e) = store.snapshot_into(&tx).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        rx
    }

    /// Hands a snapshot chunk on; false when the reader is gone, stalled, or the store closes.
    async fn hand_on(&self, out: &mpsc::Sender<Result<Bytes, StoreError>>, chunk: Bytes) -> bool {
        let mut closing = self.inner.closing.subscribe();
        tokio::select! {
            sent = tokio::time::timeout(SNAPSHOT_STALL, out.send(Ok(chunk))) => {
                matches!(sent, Ok(Ok(())))
            }
            _ = closing.wait_for(|c| *c) => false,
        }
    }

    async fn snapshot_into(
        &self,
        out: &mpsc::Sender<Result<Bytes, StoreError>>,
    ) -> Result<(), StoreError> {
        const CHUNK: usize = 256 * 1024;
        const SNAPSHOT_PAGE: i64 = 5000;
        on_backend!(self.inner, |_pool, read, d| {
            let mut tx = read.begin_with(d.begin_snapshot).await?;
            let head = head_from_row(
                &sqlx::query("SELECT version, checksum, epoch FROM meta WHERE id = 1")
                    .fetch_all(&mut *tx)
                    .await
                    .and_then(only)?,
            )?;
            let count: i64 = sqlx::query("SELECT COUNT(*) AS n FROM workspaces")
                .fetch_all(&mut *tx)
                .await
                .and_then(only)?
                .try_get("n")?;
            let mut buf = String::with_capacity(CHUNK + 256);
            buf.push_str(
                &serde_json::json!({
                    "type": "map",
                    "version": head.version,
                    "epoch": head.epoch,
                    "entries": count,
                    "checksum": head.checksum.to_hex(),
                })
                .to_string(),
            );
            buf.push('\n');
            let regions = sqlx::query("SELECT id, name, jurisdiction FROM regions ORDER BY id")
                .fetch_all(&mut *tx)
                .await?;
            for row in &regions {
                let r = region_from_row(row)?;
                buf.push_str(
                    &serde_json::json!({
                        "type": "region", "id": r.id, "name": r.name,
                        "jurisdiction": r.jurisdiction,
                    })
                    .to_string(),
                );
                buf.push('\n');
            }
            // Pages of ready-made lines built by the database: one row per page, so the
            // per-row cost of the driver is paid once per page, not once per entry.
            let mut after = String::new();
            loop {
                let page = sqlx::query(d.snapshot_page)
                    .bind(&after)
                    .bind(SNAPSHOT_PAGE)
                    .fetch_all(&mut *tx)
                    .await
                    .and_then(only)?;
                let n: i64 = page.try_get("n")?;
                if n == 0 {
                    break;
                }
                let lines: String = page.try_get("lines")?;
                after = page.try_get("last")?;
                buf.push_str(&lines);
                buf.push('\n');
                if buf.len() >= CHUNK {
                    let chunk = Bytes::from(std::mem::replace(
                        &mut buf,
                        String::with_capacity(CHUNK + 256),
                    ));
                    if !self.hand_on(out, chunk).await {
                        return Ok(());
                    }
                }
                if n < SNAPSHOT_PAGE {
                    break;
                }
            }
            tx.commit().await?;
            if !buf.is_empty() {
                self.hand_on(out, Bytes::from(buf)).await;
            }
            Ok(())
        })
    }

    /// Every version at which `workspace`'s entry changed, oldest first.
    pub async fn history(&self, workspace: &str) -> Result<Vec<HistoryRecord>, StoreError> {
        on_backend!(self.inner, |_pool, read, _d| {
            let rows = sqlx::query(
                "SELECT version, op, region, state, epoch, actor, reason, at FROM history \
                 WHERE kind = 'workspace' AND key = $1 ORDER BY version",
            )
            .bind(workspace)
            .fetch_all(read)
            .await?;
            rows.iter()
                .map(|r| {
                    let op: String = r.try_get("op")?;
                    let state: Option<String> = r.try_get("state")?;
                    Ok(HistoryRecord {
                        version: u(r.try_get("version")?),
                        op: if op == "delete" { Op::Delete } else { Op::Put },
                        region: r.try_get("region")?,
                        state: state.as_deref().and_then(State::parse),
                        epoch: r.try_get::<Option<i64>, _>("epoch")?.map(|e| e as u32),
                        actor: r.try_get("actor")?,
                        reason: r.try_get("reason")?,
                        at_ms: r.try_get("at")?,
                    })
                })
                .collect()
        })
    }

    // ---- fleet ----

    /// How many proxies the fleet has, and how many of them have not drained `version` of
    /// the store with epoch `epoch` (the rule of `moves::lagging`, counted by the database so
    /// that a move waiting on ten thousand proxies reads one row, not ten thousand).
    pub async fn fleet_lagging(&self, epoch: &str, version: u64) -> Result<(u64, u64), StoreError> {
        on_backend!(self.inner, |_pool, read, _d| {
            let row = sqlx::query(
                "SELECT count(*) AS total, coalesce(sum(CASE WHEN epoch <> $1 \
                 OR drained_version IS NULL OR drained_version < $2 THEN 1 ELSE 0 END), 0) \
                 AS lagging FROM fleet",
            )
            .bind(epoch)
            .bind(i(version))
            .fetch_all(read)
            .await
            .and_then(only)?;
            Ok((
                u(row.try_get::<i64, _>("total")?),
                u(row.try_get::<i64, _>("lagging")?),
            ))
        })
    }

    pub async fn fleet(&self) -> Result<Vec<FleetRow>, StoreError> {
        on_backend!(self.inner, |_pool, read, _d| {
            let rows = sqlx::query(
                "SELECT proxy_id, edge_region, applied_version, drained_version, checksum, \
                 epoch, first_seen, last_seen FROM fleet ORDER BY proxy_id",
            )
            .fetch_all(read)
            .await?;
            rows.iter().map(fleet_row).collect()
        })
    }

    /// At most `limit` of the members that have not drained `version` of the store with
    /// epoch `epoch` (the rule of `moves::lagging`), the furthest behind first: what a move's
    /// view names, without reading a fleet of ten thousand to name a hundred.
    pub async fn fleet_lagging_members(
        &self,
        epoch: &str,
        version: u64,
        limit: usize,
    ) -> Result<Vec<FleetRow>, StoreError> {
        on_backend!(self.inner, |_pool, read, _d| {
            let rows = sqlx::query(
                "SELECT proxy_id, edge_region, applied_version, drained_version, checksum, \
                 epoch, first_seen, last_seen FROM fleet \
                 WHERE epoch <> $1 OR drained_version IS NULL OR drained_version < $2 \
                 ORDER BY coalesce(drained_version, -1), proxy_id LIMIT $3",
            )
            .bind(epoch)
            .bind(i(version))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(read)
            .await?;
            rows.iter().map(fleet_row).collect()
        })
    }

    /// Removes a proxy from the fleet. Returns whether it was there.
    pub async fn forget_proxy(&self, proxy_id: &str) -> Result<bool, StoreError> {
        on_backend!(self.inner, |pool, _read, _d| {
            Ok(sqlx::query("DELETE FROM fleet WHERE proxy_id = $1")
                .bind(proxy_id)
                .execute(pool)
                .await?
                .rows_affected()
                > 0)
        })
    }

    // ---- tokens ----

    /// Creates a token and returns its secret (shown once; only its hash is stored).
    pub async fn create_token(&self, name: &str, role: Role) -> Result<String, StoreError> {
        let secret = new_token();
        on_backend!(self.inner, |pool, _read, d| {
            let mut tx = pool.begin_with(d.begin_write).await?;
            let done = sqlx::query(
                "INSERT INTO tokens (name, role, hash, created_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (name) DO NOTHING",
            )
            .bind(name)
            .bind(role.as_str())
            .bind(hash_token(&secret))
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
            sqlx::query(BUMP_TOKENS).execute(&mut *tx).await?;
            tx.commit().await?;
            if done.rows_affected() == 0 {
                return Err(StoreError::Conflict {
                    code: "token_exists",
                    message: format!("a token named {name:?} already exists"),
                });
            }
            Ok::<(), StoreError>(())
        })?;
        self.forget_tokens(None);
        Ok(secret)
    }

    /// The token's name and role, if the secret is a live token.
    pub async fn authenticate(&self, secret: &str) -> Result<Option<(String, Role)>, StoreError> {
        let hash = hash_token(secret);
        let generation = {
            let cache = self.inner.tokens.lock().expect("token cache");
            if let Some(hit) = cache.live.get(&hash) {
                return Ok(Some(hit.clone()));
            }
            cache.generation
        };
        let found = on_backend!(self.inner, |_pool, read, _d| {
            let row = sqlx::query("SELECT name, role FROM tokens WHERE hash = $1")
                .bind(&hash)
                .fetch_all(read)
                .await?
                .into_iter()
                .next();
            match row {
                None => Ok::<_, StoreError>(None),
                Some(row) => {
                    let role: String = row.try_get("role")?;
                    Ok(Role::parse(&role).map(|r| (row.try_get("name").unwrap_or_default(), r)))
                }
            }
        })?;
        if let Some(hit) = &found {
            let mut cache = self.inner.tokens.lock().expect("token cache");
            if cache.generation == generation && cache.live.len() < TOKEN_CACHE_MAX {
                cache.live.insert(hash, hit.clone());
            }
        }
        Ok(found)
    }

    /// Forgets every cached token (the token set changed), remembering what it looked like.
    fn forget_tokens(&self, seen: Option<i64>) {
        let mut cache = self.inner.tokens.lock().expect("token cache");
        cache.live.clear();
        cache.generation += 1;
        if seen.is_some() {
            cache.seen = seen;
        }
    }

    /// Empties the token cache when a token was created or deleted since it was last
    /// looked at.
    async fn check_tokens(&self) -> Result<(), StoreError> {
        let seen = on_backend!(self.inner, |_pool, read, _d| {
            let row = sqlx::query("SELECT tokens_version FROM meta WHERE id = 1")
                .fetch_all(read)
                .await
                .and_then(only)?;
            Ok::<_, StoreError>(row.try_get::<i64, _>("tokens_version")?)
        })?;
        let changed = self.inner.tokens.lock().expect("token cache").seen != Some(seen);
        if changed {
            self.forget_tokens(Some(seen));
        }
        Ok(())
    }

    pub async fn tokens(&self) -> Result<Vec<TokenInfo>, StoreError> {
        on_backend!(self.inner, |_pool, read, _d| {
            let rows = sqlx::query("SELECT name, role, created_at FROM tokens ORDER BY name")
                .fetch_all(read)
                .await?;
            rows.iter()
                .filter_map(|r| {
                    let role: String = match r.try_get("role") {
                        Ok(role) => role,
                        Err(e) => return Some(Err(e.into())),
                    };
                    Some(Ok(TokenInfo {
                        name: r.try_get("name").ok()?,
                        role: Role::parse(&role)?,
                        created_at_ms: r.try_get("created_at").ok()?,
                    }))
                })
                .collect()
        })
    }

    pub async fn delete_token(&self, name: &str) -> Result<bool, StoreError> {
        let deleted = on_backend!(self.inner, |pool, _read, d| {
            let mut tx = pool.begin_with(d.begin_write).await?;
            let deleted = sqlx::query("DELETE FROM tokens WHERE name = $1")
                .bind(name)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                > 0;
            sqlx::query(BUMP_TOKENS).execute(&mut *tx).await?;
            tx.commit().await?;
            Ok::<_, StoreError>(deleted)
        })?;
        self.forget_tokens(None);
        Ok(deleted)
    }

    /// Whether any token with the admin role exists.
    pub async fn has_admin(&self) -> Result<bool, StoreError> {
        on_backend!(self.inner, |_pool, read, _d| {
            Ok(
                !sqlx::query("SELECT name FROM tokens WHERE role = 'admin' LIMIT 1")
                    .fetch_all(read)
                    .await?
                    .is_empty(),
            )
        })
    }

    /// Recomputes the map checksum from the entries (for tests and consistency checks).
    pub async fn recompute_checksum(&self) -> Result<Checksum, StoreError> {
        use futures_util::TryStreamExt;
        on_backend!(self.inner, |_pool, read, _d| {
            let mut sum = Checksum::default();
            let mut rows =
                sqlx::query("SELECT id, region, state, epoch, version FROM workspaces").fetch(read);
            while let Some(row) = rows.try_next().await? {
                sum.add(entry_hash(&workspace_from_row(&row)?));
            }
            Ok(sum)
        })
    }
}
