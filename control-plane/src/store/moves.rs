//! Moves and the admin audit trail in the store.
//!
//! A move's map writes (the freeze at the old home, the switch to the new home, the unfreeze
//! there, or the unfreeze at the old home on abort) commit in the same transaction as the
//! move's phase change and its audit event, under the meta row's lock: the phase a move shows
//! and the map never disagree, and two replicas advancing the same move cannot both do it.
//! Deciding *when* to advance (fleet convergence) is `crate::moves`'s job.

use super::*;

/// A move's phase (docs/moves.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Accepted; the freeze is about to be written.
    Requested,
    /// `state = frozen` written at the old home (`freeze_version`); waiting for every fleet
    /// member to drain it.
    Freezing,
    /// Every fleet member drained the freeze: no write is in flight anywhere. The data mover
    /// copies, then calls `complete`.
    Frozen,
    /// `home = to` (still frozen) written (`switch_version`); waiting for every fleet member to
    /// drain it, so that nothing reads from the old home any more.
    Switching,
    /// `state = active` written at the new home (`done_version`): writes resume there.
    Done,
    /// Stopped before the switch; the workspace is active at its old home again.
    Aborted,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Requested => "requested",
            Phase::Freezing => "freezing",
            Phase::Frozen => "frozen",
            Phase::Switching => "switching",
            Phase::Done => "done",
            Phase::Aborted => "aborted",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "requested" => Phase::Requested,
            "freezing" => Phase::Freezing,
            "frozen" => Phase::Frozen,
            "switching" => Phase::Switching,
            "done" => Phase::Done,
            "aborted" => Phase::Aborted,
            _ => return None,
        })
    }

    /// Whether the move is over.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Done | Phase::Aborted)
    }

    /// Whether `abort` may still stop the move (only before the switch).
    pub fn can_abort(self) -> bool {
        matches!(self, Phase::Requested | Phase::Freezing | Phase::Frozen)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A move as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub id: u64,
    pub workspace: String,
    pub from: String,
    pub to: String,
    pub phase: Phase,
    pub actor: String,
    pub reason: Option<String>,
    pub webhook: Option<String>,
    /// How long a convergence phase may take before the move reports itself stalled.
    pub timeout_ms: u64,
    pub freeze_version: Option<u64>,
    pub switch_version: Option<u64>,
    pub done_version: Option<u64>,
    pub abort_version: Option<u64>,
    pub requested_at_ms: i64,
    pub freezing_at_ms: Option<i64>,
    pub frozen_at_ms: Option<i64>,
    pub switching_at_ms: Option<i64>,
    pub done_at_ms: Option<i64>,
    pub aborted_at_ms: Option<i64>,
    /// When the current phase outlived `timeout_ms` (cleared when the phase changes).
    pub stalled_at_ms: Option<i64>,
    pub abort_reason: Option<String>,
}

impl Move {
    /// The map version every fleet member must drain before the move advances, in the phases
    /// that wait for the fleet.
    pub fn awaited_version(&self) -> Option<u64> {
        match self.phase {
            Phase::Freezing => self.freeze_version,
            Phase::Switching => self.switch_version,
            _ => None,
        }
    }

    /// When the current phase began.
    pub fn phase_started_ms(&self) -> i64 {
        match self.phase {
            Phase::Requested => Some(self.requested_at_ms),
            Phase::Freezing => self.freezing_at_ms,
            Phase::Frozen => self.frozen_at_ms,
            Phase::Switching => self.switching_at_ms,
            Phase::Done => self.done_at_ms,
            Phase::Aborted => self.aborted_at_ms,
        }
        .unwrap_or(self.requested_at_ms)
    }
}

/// What `POST /v1/moves` asks for (already syntactically valid).
#[derive(Debug, Clone)]
pub struct MoveRequest {
    pub workspace: String,
    pub to: String,
    pub webhook: Option<String>,
    pub timeout_ms: u64,
}

/// A filter over the admin audit trail.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Entries at or after this time (ms since the Unix epoch).
    pub since_ms: Option<i64>,
    /// Entries before this time.
    pub until_ms: Option<i64>,
    /// Only entries about this workspace.
    pub workspace: Option<String>,
    /// Continue after this entry (a `next` cursor from an earlier page).
    pub after: Option<AuditCursor>,
    pub limit: u32,
}

/// A position in the audit trail: time, then map changes before events, then number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct AuditCursor {
    pub at_ms: i64,
    /// 0: a map change (`num` is its version); 1: an event (`num` is its sequence number).
    pub rank: u8,
    pub num: i64,
}

impl AuditCursor {
    pub fn parse(s: &str) -> Option<Self> {
        let (at, rest) = s.split_once('-')?;
        let rank = match rest.as_bytes().first()? {
            b'v' => 0,
            b'e' => 1,
            _ => return None,
        };
        Some(Self {
            at_ms: at.parse().ok()?,
            rank,
            num: rest[1..].parse().ok()?,
        })
    }
}

impl std::fmt::Display for AuditCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.rank == 0 { 'v' } else { 'e' };
        write!(f, "{}-{kind}{}", self.at_ms, self.num)
    }
}

/// One entry of the admin audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub cursor: AuditCursor,
    pub actor: String,
    /// `map.workspace.put`, `map.workspace.delete`, `map.region.put`, `map.region.delete`,
    /// `move.requested` ... `move.done`, `move.aborted`, `move.stalled`, `fleet.remove`,
    /// `token.create`, `token.delete`.
    pub action: String,
    /// The workspace, region, proxy or token the entry is about.
    pub subject: String,
    pub version: Option<u64>,
    pub move_id: Option<u64>,
    pub reason: Option<String>,
    /// For map changes: the entry after the change (`us/active/epoch 3`); for events, free
    /// text (which proxies a stalled move waits for, why a move was aborted).
    pub detail: Option<String>,
}

const MOVE_COLUMNS: &str = "id, workspace, from_region, to_region, phase, actor, reason, \
    webhook, timeout_ms, freeze_version, switch_version, done_version, abort_version, \
    requested_at, freezing_at, frozen_at, switching_at, done_at, aborted_at, stalled_at, \
    abort_reason";

fn move_from_row<R: Row>(row: &R) -> Result<Move, sqlx::Error>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<i64>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let phase: String = row.try_get("phase")?;
    let opt = |name: &str| row.try_get::<Option<i64>, _>(name);
    Ok(Move {
        id: u(row.try_get("id")?),
        workspace: row.try_get("workspace")?,
        from: row.try_get("from_region")?,
        to: row.try_get("to_region")?,
        phase: Phase::parse(&phase)
            .ok_or_else(|| sqlx::Error::Decode(format!("unknown move phase {phase:?}").into()))?,
        actor: row.try_get("actor")?,
        reason: row.try_get("reason")?,
        webhook: row.try_get("webhook")?,
        timeout_ms: u(row.try_get("timeout_ms")?),
        freeze_version: opt("freeze_version")?.map(u),
        switch_version: opt("switch_version")?.map(u),
        done_version: opt("done_version")?.map(u),
        abort_version: opt("abort_version")?.map(u),
        requested_at_ms: row.try_get("requested_at")?,
        freezing_at_ms: opt("freezing_at")?,
        frozen_at_ms: opt("frozen_at")?,
        switching_at_ms: opt("switching_at")?,
        done_at_ms: opt("done_at")?,
        aborted_at_ms: opt("aborted_at")?,
        stalled_at_ms: opt("stalled_at")?,
        abort_reason: row.try_get("abort_reason")?,
    })
}

/// The move `$id` as the transaction sees it.
macro_rules! load_move {
    ($tx:expr, $id:expr) => {{
        sqlx::query(&format!("SELECT {MOVE_COLUMNS} FROM moves WHERE id = $1"))
            .bind(i($id))
            // `fetch_all`: see `only` in the store module.
            .fetch_all(&mut *$tx)
            .await?
            .first()
            .map(move_from_row)
            .transpose()?
            .ok_or_else(|| StoreError::NotFound {
                what: "move",
                id: $id.to_string(),
            })?
    }};
}

/// Records an admin event inside a transaction.
macro_rules! insert_event {
    ($tx:expr, $at:expr, $actor:expr, $action:expr, $subject:expr, $move_id:expr, $version:expr,
     $reason:expr, $detail:expr) => {{
        sqlx::query(
            "INSERT INTO admin_events (at, actor, action, subject, move_id, version, reason, \
             detail) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind($at)
        .bind($actor)
        .bind($action)
        .bind($subject)
        .bind($move_id.map(i))
        .bind($version.map(i))
        .bind($reason)
        .bind($detail)
        .execute(&mut *$tx)
        .await?;
    }};
}

/// The columns a phase sets: when it began, and the map version it wrote.
fn phase_columns(phase: Phase) -> (&'static str, &'static str) {
    match phase {
        Phase::Requested => ("requested_at", "freeze_version"),
        Phase::Freezing => ("freezing_at", "freeze_version"),
        Phase::Frozen => ("frozen_at", "freeze_version"),
        Phase::Switching => ("switching_at", "switch_version"),
        Phase::Done => ("done_at", "done_version"),
        Phase::Aborted => ("aborted_at", "abort_version"),
    }
}

/// Puts the move `$m` in `$phase` at `$at` (with the map version it wrote, if any, and why it
/// was aborted, for an abort), clears its stall mark, and records the phase's audit event.
macro_rules! enter_phase {
    ($tx:expr, $m:expr, $phase:expr, $version:expr, $at:expr, $abort_reason:expr, $actor:expr,
     $reason:expr, $detail:expr) => {{
        let phase: Phase = $phase;
        let version: Option<u64> = $version;
        let (at_column, version_column) = phase_columns(phase);
        sqlx::query(&format!(
            "UPDATE moves SET phase = $2, {at_column} = $3, \
             {version_column} = COALESCE($4, {version_column}), \
             abort_reason = COALESCE($5, abort_reason), stalled_at = NULL WHERE id = $1"
        ))
        .bind(i($m.id))
        .bind(phase.as_str())
        .bind($at)
        .bind(version.map(i))
        .bind($abort_reason)
        .execute(&mut *$tx)
        .await?;
        insert_event!(
            $tx,
            $at,
            $actor,
            format!("move.{phase}"),
            &$m.workspace,
            Some($m.id),
            version,
            $reason,
            $detail
        );
    }};
}

/// The actor of a map write a move makes: the move's own actor, with the move named in the
/// reason.
fn move_actor(m: &Move, step: &str) -> Actor {
    Actor {
        name: m.actor.clone(),
        reason: Some(match &m.reason {
            Some(reason) => format!("move {}: {step} ({reason})", m.id),
            None => format!("move {}: {step}", m.id),
        }),
    }
}

fn unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

impl Store {
    /// Records a move request after checking it against the store: the workspace exists and is
    /// active, the target region exists and is not the workspace's home, and no other move of
    /// the workspace is open.
    pub async fn create_move(&self, req: &MoveRequest, actor: &Actor) -> Result<Move, StoreError> {
        on_backend!(self.inner, |pool, _read, d| {
            let mut tx = pool.begin_with(d.begin_write).await?;
            // The meta lock orders the checks below with every map write.
            sqlx::query(d.lock_meta).fetch_one(&mut *tx).await?;
            let Some(ws) = load_workspace!(tx, &req.workspace) else {
                return Err(StoreError::NotFound {
                    what: "workspace",
                    id: req.workspace.clone(),
                });
            };
            let open = sqlx::query(
                "SELECT id, phase FROM moves WHERE workspace = $1 \
                 AND phase NOT IN ('done', 'aborted')",
            )
            .bind(&req.workspace)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(open) = open {
                let id: i64 = open.try_get("id")?;
                let phase: String = open.try_get("phase")?;
                return Err(StoreError::Conflict {
                    code: "move_in_progress",
                    message: format!(
                        "workspace {:?} is already being moved by move {id} (phase {phase}); \
                         one move per workspace at a time",
                        req.workspace
                    ),
                });
            }
            let known = sqlx::query("SELECT id FROM regions WHERE id = $1")
                .bind(&req.to)
                .fetch_optional(&mut *tx)
                .await?
                .is_some();
            if !known {
                return Err(StoreError::Invalid {
                    code: "unknown_region",
                    message: format!("region {:?} does not exist", req.to),
                });
            }
            if ws.region == req.to {
                return Err(StoreError::Invalid {
                    code: "same_region",
                    message: format!(
                        "workspace {:?} already lives in region {:?}",
                        req.workspace, req.to
                    ),
                });
            }
            if ws.state == State::Frozen {
                return Err(StoreError::Conflict {
                    code: "workspace_moving",
                    message: format!(
                        "workspace {:?} is frozen; unfreeze it before moving it",
                        req.workspace
                    ),
                });
            }
            let at = now_ms();
            let inserted = sqlx::query(
                "INSERT INTO moves (workspace, from_region, to_region, phase, actor, reason, \
                 webhook, timeout_ms, requested_at) \
                 VALUES ($1, $2, $3, 'requested', $4, $5, $6, $7, $8) RETURNING id",
            )
            .bind(&req.workspace)
            .bind(&ws.region)
            .bind(&req.to)
            .bind(&actor.name)
            .bind(&actor.reason)
            .bind(&req.webhook)
            .bind(i(req.timeout_ms))
            .bind(at)
            .fetch_one(&mut *tx)
            .await;
            let id = match inserted {
                Ok(row) => u(row.try_get("id")?),
                Err(e) if unique_violation(&e) => {
                    return Err(StoreError::Conflict {
                        code: "move_in_progress",
                        message: format!(
                            "workspace {:?} is already being moved; one move per workspace \
                             at a time",
                            req.workspace
                        ),
                    })
                }
                Err(e) => return Err(e.into()),
            };
            let detail = format!("{} -> {}", ws.region, req.to);
            insert_event!(
                tx,
                at,
                &actor.name,
                "move.requested",
                &req.workspace,
                Some(id),
                None::<u64>,
                &actor.reason,
                Some(detail)
            );
            let m = load_move!(tx, id);
            tx.commit().await?;
            Ok(m)
        })
    }

    pub async fn get_move(&self, id: u64) -> Result<Move, StoreError> {
        on_backend!(self.inner, |_pool, read, _d| {
            // Read connections see every committed write (WAL), and never wait behind a long
            // write such as an import.
            let mut conn = read.acquire().await?;
            Ok(load_move!(conn, id))
        })
    }

    /// Moves, newest first: of one workspace, or all; only open ones when `open_only`.
    pub async fn moves(
        &self,
        workspace: Option<&str>,
        open_only: bool,
        limit: u32,
    ) -> Result<Vec<Move>, StoreError> {
        on_backend!(self.inner, |_pool, read, _d| {
            let rows = sqlx::query(&format!(
                "SELECT {MOVE_COLUMNS} FROM moves WHERE ($1 IS NULL OR workspace = $1) \
                 AND (NOT $2 OR phase NOT IN ('done', 'aborted')) ORDER BY id DESC LIMIT $3"
            ))
            .bind(workspace)
            .bind(open_only)
            .bind(i64::from(limit))
            .fetch_all(read)
            .await?;
            rows.iter()
                .map(|r| move_from_row(r).map_err(StoreError::from))
                .collect()
        })
    }

    /// `requested -> freezing`: writes `state = frozen` at the old home. Returns the move as it
    /// now stands, or `None` when it was no longer `requested`. A workspace that was deleted
    /// or given another region since the request aborts the move instead.
    pub async fn move_freeze(&self, id: u64) -> Result<Option<Move>, StoreError> {
        let (m, version) = on_backend!(self.inner, |pool, _read, d| {
            let mut tx = pool.begin_with(d.begin_write).await?;
            let head = head_from_row(&sqlx::query(d.lock_meta).fetch_one(&mut *tx).await?)?;
            let m = load_move!(tx, id);
            if m.phase != Phase::Requested {
                return Ok(None);
            }
            let at = now_ms();
            let ws = load_workspace!(tx, &m.workspace);
            let problem = match &ws {
                None => Some("the workspace was deleted before the freeze".to_owned()),
                Some(ws) if ws.region != m.from => Some(format!(
                    "the workspace's region changed to {:?} before the freeze",
                    ws.region
                )),
                Some(_) => None,
            };
            let version = if let Some(problem) = problem {
                enter_phase!(
                    tx,
                    m,
                    Phase::Aborted,
                    None::<u64>,
                    at,
                    Some(&problem),
                    &m.actor,
                    &m.reason,
                    Some(problem)
                );
                None
            } else {
                let ws = ws.expect("checked above");
                let actor = move_actor(&m, "freeze");
                let new = write_entry!(tx, d, head, ws, None::<&str>, State::Frozen, &actor);
                enter_phase!(
                    tx,
                    m,
                    Phase::Freezing,
                    Some(new.version),
                    at,
                    None::<&str>,
                    &m.actor,
                    &m.reason,
                    Some(format!("frozen at {} (version {})", m.from, new.version))
                );
                Some(new.version)
            };
            let m = load_move!(tx, id);
            tx.commit().await?;
            (m, version)
        });
        if let Some(version) = version {
            self.committed(version);
        }
        Ok(Some(m))
    }

    /// `freezing -> frozen` once the fleet drained the freeze. `None` when the move was no
    /// longer `freezing` (aborted meanwhile, or another replica got there first).
    pub async fn move_frozen(&self, id: u64, detail: &str) -> Result<Option<Move>, StoreError> {
        on_backend!(self.inner, |pool, _read, d| {
            let mut tx = pool.begin_with(d.begin_write).await?;
            sqlx::query(d.lock_meta).fetch_one(&mut *tx).await?;
            let m = load_move!(tx, id);
            if m.phase != Phase::Freezing {
                return Ok(None);
            }
            let at = now_ms();
            enter_phase!(
                tx,
                m,
                Phase::Frozen,
                m.freeze_version,
                at,
                None::<&str>,
                &m.actor,
                &m.reason,
                Some(detail.to_owned())
            );
            let m = load_move!(tx, id);
            tx.commit().await?;
            Ok(Some(m))
        })
    }

    /// The data mover's `complete`: `frozen -> switching`, writing `home = to` (still frozen).
    /// Calling it again once the move switched is harmless; before `frozen` or after an abort
    /// it is refused.
    pub async fn move_complete(&self, id: u64, actor: &Actor) -> Result<Move, StoreError> {
        let (m, version) = on_backend!(self.inner, |pool, _read, d| {
            let mut tx = pool.begin_with(d.begin_write).await?;
            let head = head_from_row(&sqlx::query(d.lock_meta).fetch_one(&mut *tx).await?)?;
            let m = load_move!(tx, id);
            match m.phase {
                Phase::Frozen => {}
                Phase::Switching | Phase::Done => return Ok(m),
                Phase::Requested | Phase::Freezing => {
                    return Err(StoreError::Conflict {
                        code: "move_not_frozen",
                        message: format!(
                            "move {id} is {}: writes may still be in flight to {}, so the data \
                             copy cannot be complete; wait for phase frozen",
                            m.phase, m.from
                        ),
                    })
                }
                Phase::Aborted => {
                    return Err(StoreError::Conflict {
                        code: "move_aborted",
                        message: format!("move {id} was aborted; it cannot be completed"),
                    })
                }
            }
            let Some(ws) = load_workspace!(tx, &m.workspace) else {
                return Err(StoreError::Conflict {
                    code: "workspace_missing",
                    message: format!("workspace {:?} no longer exists", m.workspace),
                });
            };
            // Deleting a region that an open move targets is refused; checked again here, under
            // the same lock, because a switch to a region proxies do not know would stall them.
            let target = sqlx::query("SELECT id FROM regions WHERE id = $1")
                .bind(&m.to)
                .fetch_optional(&mut *tx)
                .await?;
            if target.is_none() {
                return Err(StoreError::Invalid {
                    code: "unknown_region",
                    message: format!("region {:?} no longer exists; abort the move", m.to),
                });
            }
            let at = now_ms();
            let map_actor = move_actor(&m, "switch");
            let new = write_entry!(
                tx,
                d,
                head,
                ws,
                Some(m.to.as_str()),
                State::Frozen,
                &map_actor
            );
            enter_phase!(
                tx,
                m,
                Phase::Switching,
                Some(new.version),
                at,
                None::<&str>,
                &actor.name,
                &actor.reason,
                Some(format!(
                    "data copy complete; home is {} (still frozen, version {})",
                    m.to, new.version
                ))
            );
            let m = load_move!(tx, id);
            tx.commit().await?;
            (m, Some(new.version))
        });
        if let Some(version) = version {
            self.committed(version);
        }
        Ok(m)
    }

    /// `switching -> done` once the fleet drained the switch: writes `state = active` at the
    /// new home. `None` when the move was no longer `switching`.
    pub async fn move_finish(&self, id: u64, detail: &str) -> Result<Option<Move>, StoreError> {
        let (m, version) = on_backend!(self.inner, |pool, _read, d| {
            let mut tx = pool.begin_with(d.begin_write).await?;
            let head = head_from_row(&sqlx::query(d.lock_meta).fetch_one(&mut *tx).await?)?;
            let m = load_move!(tx, id);
            if m.phase != Phase::Switching {
                return Ok(None);
            }
            let at = now_ms();
            let ws = load_workspace!(tx, &m.workspace);
            let version = match ws {
                Some(ws) => {
                    let actor = move_actor(&m, "unfreeze at the new home");
                    let new = write_entry!(tx, d, head, ws, None::<&str>, State::Active, &actor);
                    Some(new.version)
                }
                // Frozen workspaces cannot be deleted; keep going rather than wedge the move.
                None => None,
            };
            enter_phase!(
                tx,
                m,
                Phase::Done,
                version,
                at,
                None::<&str>,
                &m.actor,
                &m.reason,
                Some(format!("{detail}; active at {}", m.to))
            );
            let m = load_move!(tx, id);
            tx.commit().await?;
            (m, version)
        });
        if let Some(version) = version {
            self.committed(version);
        }
        Ok(Some(m))
    }

    /// Stops a move before its switch: the workspace is unfrozen at its old home (when the
    /// freeze was written). Aborting an aborted move is harmless; after the switch began it is
    /// refused (the data may already be served from the new home).
    pub async fn move_abort(&self, id: u64, actor: &Actor) -> Result<Move, StoreError> {
        let (m, version) = on_backend!(self.inner, |pool, _read, d| {
            let mut tx = pool.begin_with(d.begin_write).await?;
            let head = head_from_row(&sqlx::query(d.lock_meta).fetch_one(&mut *tx).await?)?;
            let m = load_move!(tx, id);
            match m.phase {
                Phase::Aborted => return Ok(m),
                Phase::Switching | Phase::Done => {
                    return Err(StoreError::Conflict {
                        code: "move_past_switch",
                        message: format!(
                            "move {id} is {}: the switch to {} has begun and cannot be undone \
                             (move the workspace back instead)",
                            m.phase, m.to
                        ),
                    })
                }
                Phase::Requested | Phase::Freezing | Phase::Frozen => {}
            }
            let at = now_ms();
            let ws = load_workspace!(tx, &m.workspace);
            let version = match ws {
                Some(ws) if ws.state == State::Frozen && m.phase != Phase::Requested => {
                    let map_actor = Actor {
                        name: actor.name.clone(),
                        reason: Some(match &actor.reason {
                            Some(r) => format!("move {id}: abort ({r})"),
                            None => format!("move {id}: abort"),
                        }),
                    };
                    let new = write_entry!(
                        tx,
                        d,
                        head,
                        ws,
                        Some(m.from.as_str()),
                        State::Active,
                        &map_actor
                    );
                    Some(new.version)
                }
                _ => None,
            };
            let why = actor
                .reason
                .clone()
                .unwrap_or_else(|| format!("aborted by {}", actor.name));
            enter_phase!(
                tx,
                m,
                Phase::Aborted,
                version,
                at,
                Some(&why),
                &actor.name,
                &actor.reason,
                Some(format!("was {}; active at {} again", m.phase, m.from))
            );
            let m = load_move!(tx, id);
            tx.commit().await?;
            (m, version)
        });
        if let Some(version) = version {
            self.committed(version);
        }
        Ok(m)
    }

    /// Marks the move's current phase as having outlived its timeout, once per phase, with
    /// what it waits for. `None` when the phase changed meanwhile or was already marked.
    pub async fn move_stalled(
        &self,
        id: u64,
        phase: Phase,
        detail: &str,
    ) -> Result<Option<Move>, StoreError> {
        on_backend!(self.inner, |pool, _read, _d| {
            let mut tx = pool.begin().await?;
            let at = now_ms();
            let marked = sqlx::query(
                "UPDATE moves SET stalled_at = $3 WHERE id = $1 AND phase = $2 \
                 AND stalled_at IS NULL",
            )
            .bind(i(id))
            .bind(phase.as_str())
            .bind(at)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if marked == 0 {
                return Ok(None);
            }
            let m = load_move!(tx, id);
            insert_event!(
                tx,
                at,
                "control-plane",
                "move.stalled",
                &m.workspace,
                Some(id),
                m.awaited_version(),
                None::<String>,
                Some(detail.to_owned())
            );
            tx.commit().await?;
            Ok(Some(m))
        })
    }

    /// Records an admin event that writes nothing else (tokens, fleet removals).
    pub async fn record_event(
        &self,
        actor: &str,
        action: &str,
        subject: &str,
        detail: Option<String>,
    ) -> Result<(), StoreError> {
        on_backend!(self.inner, |pool, _read, _d| {
            let mut conn = pool.acquire().await?;
            insert_event!(
                conn,
                now_ms(),
                actor,
                action,
                subject,
                None::<u64>,
                None::<u64>,
                None::<String>,
                detail
            );
            Ok(())
        })
    }

    /// The admin audit trail: map changes (from the history) and admin events, in time order.
    pub async fn admin_audit(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        let limit = q.limit.clamp(1, 10_000);
        let after = q.after.unwrap_or(AuditCursor {
            at_ms: q.since_ms.unwrap_or(i64::MIN),
            rank: 0,
            num: -1,
        });
        // Map changes come before events of the same millisecond.
        let (history_after, events_after) = match after.rank {
            0 => (after.num, -1),
            _ => (i64::MAX, after.num),
        };
        let since = q.since_ms.unwrap_or(i64::MIN).max(after.at_ms);
        let until = q.until_ms.unwrap_or(i64::MAX);
        let mut entries = on_backend!(self.inner, |_pool, read, _d| {
            let changes = sqlx::query(
                "SELECT version, kind, key, op, region, state, epoch, name, actor, reason, at \
                 FROM history WHERE (at > $1 OR (at = $1 AND version > $2)) AND at >= $3 \
                 AND at < $4 AND ($5 IS NULL OR (kind = 'workspace' AND key = $5)) \
                 ORDER BY at, version LIMIT $6",
            )
            .bind(after.at_ms)
            .bind(history_after)
            .bind(since)
            .bind(until)
            .bind(q.workspace.as_deref())
            .bind(i64::from(limit))
            .fetch_all(read)
            .await?;
            let events = sqlx::query(
                "SELECT seq, at, actor, action, subject, move_id, version, reason, detail \
                 FROM admin_events WHERE (at > $1 OR (at = $1 AND seq > $2)) AND at >= $3 \
                 AND at < $4 AND ($5 IS NULL OR subject = $5) ORDER BY at, seq LIMIT $6",
            )
            .bind(after.at_ms)
            .bind(events_after)
            .bind(since)
            .bind(until)
            .bind(q.workspace.as_deref())
            .bind(i64::from(limit))
            .fetch_all(read)
            .await?;
            let mut entries = Vec::with_capacity(changes.len() + events.len());
            for r in &changes {
                let kind: String = r.try_get("kind")?;
                let op: String = r.try_get("op")?;
                let detail = match (kind.as_str(), op.as_str()) {
                    ("workspace", "put") => {
                        let region: Option<String> = r.try_get("region")?;
                        let state: Option<String> = r.try_get("state")?;
                        let epoch: Option<i64> = r.try_get("epoch")?;
                        Some(format!(
                            "{}/{}/epoch {}",
                            region.unwrap_or_default(),
                            state.unwrap_or_default(),
                            epoch.unwrap_or_default()
                        ))
                    }
                    ("region", "put") => r.try_get::<Option<String>, _>("name")?,
                    _ => None,
                };
                let version = u(r.try_get("version")?);
                entries.push(AuditEntry {
                    cursor: AuditCursor {
                        at_ms: r.try_get("at")?,
                        rank: 0,
                        num: i(version),
                    },
                    actor: r.try_get("actor")?,
                    action: format!("map.{kind}.{op}"),
                    subject: r.try_get("key")?,
                    version: Some(version),
                    move_id: None,
                    reason: r.try_get("reason")?,
                    detail,
                });
            }
            for r in &events {
                entries.push(AuditEntry {
                    cursor: AuditCursor {
                        at_ms: r.try_get("at")?,
                        rank: 1,
                        num: r.try_get("seq")?,
                    },
                    actor: r.try_get("actor")?,
                    action: r.try_get("action")?,
                    subject: r.try_get("subject")?,
                    version: r.try_get::<Option<i64>, _>("version")?.map(u),
                    move_id: r.try_get::<Option<i64>, _>("move_id")?.map(u),
                    reason: r.try_get("reason")?,
                    detail: r.try_get("detail")?,
                });
            }
            entries
        });
        entries.sort_by_key(|e| e.cursor);
        entries.truncate(limit as usize);
        Ok(entries)
    }
}
