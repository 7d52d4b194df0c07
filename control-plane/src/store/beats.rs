//! Heartbeats, written in batches.
//!
//! Every proxy reports each version it applies, so a change to the map brings one heartbeat
//! from every proxy within moments of each other. Each is still answered only once its row is
//! written (a move's driver reads the fleet from the store), but the rows go in together: one
//! task per replica writes everything that arrived while its previous write was in flight,
//! as one statement. The store's work per change then depends on how long a write takes, not
//! on how many proxies there are.

use std::sync::Weak;

use tokio::sync::oneshot;

use super::*;

/// A heartbeat waiting for its write.
pub(super) struct Beat {
    hb: Heartbeat,
    token: String,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// The most rows one statement writes.
const MAX_BATCH: usize = 4096;
/// How long the writer gathers heartbeats after the first of a batch arrives. The beats that
/// follow a change come spread over the time the fleet takes to apply it; without a pause
/// most writes would carry one row. A heartbeat's answer waits this much longer.
const GATHER: std::time::Duration = std::time::Duration::from_millis(20);

/// Starts the replica's heartbeat writer; it ends when the store is dropped.
pub(super) fn spawn(inner: Weak<Inner>, mut beats: mpsc::UnboundedReceiver<Beat>) {
    tokio::spawn(async move {
        let mut batch = Vec::new();
        while beats.recv_many(&mut batch, MAX_BATCH).await > 0 {
            tokio::time::sleep(GATHER).await;
            while batch.len() < MAX_BATCH {
                match beats.try_recv() {
                    Ok(beat) => batch.push(beat),
                    Err(_) => break,
                }
            }
            let Some(inner) = inner.upgrade() else { return };
            Store { inner }
                .write_beats(std::mem::take(&mut batch))
                .await;
        }
    });
}

impl Store {
    /// Records a heartbeat sent with the token `token`. A proxy id belongs to the token that
    /// first reported it, so one proxy's token cannot speak for another proxy; `Conflict`
    /// when it tries (remove the proxy from the fleet to hand its id over). Returns once the
    /// heartbeat is written.
    pub async fn heartbeat(&self, hb: &Heartbeat, token: &str) -> Result<(), StoreError> {
        let (done, written) = oneshot::channel();
        let closing = || StoreError::Unavailable("the store is closing".to_owned());
        self.inner
            .beats
            .send(Beat {
                hb: hb.clone(),
                token: token.to_owned(),
                done,
            })
            .map_err(|_| closing())?;
        written.await.unwrap_or_else(|_| Err(closing()))
    }

    async fn write_beats(&self, mut pending: Vec<Beat>) {
        while !pending.is_empty() {
            // One row per proxy and statement: a proxy reported twice under two tokens waits
            // for the next round, so that each token's claim is judged on its own.
            let mut owner: HashMap<String, String> = HashMap::new();
            let mut round = Vec::new();
            let mut later = Vec::new();
            for beat in pending {
                match owner.get(&beat.hb.proxy_id) {
                    Some(token) if *token != beat.token => later.push(beat),
                    _ => {
                        owner.insert(beat.hb.proxy_id.clone(), beat.token.clone());
                        round.push(beat);
                    }
                }
            }
            // A proxy's newest beat wins (a proxy waits for each answer, so there is rarely
            // more than one).
            let mut last: HashMap<&str, &Beat> = HashMap::new();
            for beat in &round {
                last.insert(&beat.hb.proxy_id, beat);
            }
            let rows: Vec<serde_json::Value> = last
                .values()
                .map(|b| {
                    serde_json::json!([
                        b.hb.proxy_id,
                        b.hb.edge_region,
                        i(b.hb.applied_version),
                        b.hb.drained_version.map(i),
                        b.hb.checksum,
                        b.hb.epoch,
                        b.token,
                    ])
                })
                .collect();
            let rows = serde_json::Value::Array(rows).to_string();
            let written: Result<HashSet<String>, StoreError> =
                on_backend!(self.inner, |pool, _read, d| {
                    sqlx::query(d.upsert_fleet)
                        .bind(rows)
                        .bind(now_ms())
                        .fetch_all(pool)
                        .await
                        .map_err(StoreError::from)
                        .and_then(|rows| {
                            rows.iter()
                                .map(|r| r.try_get::<String, _>("proxy_id"))
                                .collect::<Result<_, _>>()
                                .map_err(StoreError::from)
                        })
                });
            for beat in round {
                let result = match &written {
                    Ok(ids) if ids.contains(&beat.hb.proxy_id) => Ok(()),
                    Ok(_) => Err(StoreError::Conflict {
                        code: "proxy_id_taken",
                        message: format!(
                            "proxy id {:?} is reported by another token; remove it from the \
                             fleet (DELETE /v1/fleet/{}) to hand the id over",
                            beat.hb.proxy_id, beat.hb.proxy_id
                        ),
                    }),
                    Err(e) => Err(StoreError::Unavailable(format!(
                        "heartbeat write failed: {e}"
                    ))),
                };
                let _ = beat.done.send(result);
            }
            pending = later;
        }
    }
}
