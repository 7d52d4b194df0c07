//! The admin commands: `domicile region|workspace|fleet|token ...` against the control
//! plane's API, with readable tables or `--json`.

use std::path::PathBuf;

use anyhow::Context;
use bytes::Bytes;
use clap::{Args, Subcommand};
use http::Method;
use serde_json::{json, Value};

use crate::client::{q, AdminClient, DEFAULT_URL};

/// Where the control plane is and who is asking.
#[derive(Debug, Clone, Args)]
pub struct Connection {
    /// The control plane's URL.
    #[arg(long, global = true, env = "DOMICILE_CONTROL_PLANE", default_value = DEFAULT_URL)]
    pub control_plane: String,
    /// Bearer token.
    #[arg(long, global = true, env = "DOMICILE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A file holding the bearer token (for example the demo's `admin.token`).
    #[arg(long, global = true, env = "DOMICILE_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// For an https:// control plane: the CA (PEM) its certificate is signed by (the demo's
    /// `certs/ca.pem`).
    #[arg(long, global = true, env = "DOMICILE_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// A client certificate (PEM) to authenticate with instead of a token (mTLS), with
    /// --key-file.
    #[arg(long, global = true, env = "DOMICILE_CERT_FILE", requires = "key_file")]
    pub cert_file: Option<PathBuf>,
    #[arg(long, global = true, env = "DOMICILE_KEY_FILE", requires = "cert_file")]
    pub key_file: Option<PathBuf>,
}

impl Connection {
    pub fn client(&self) -> anyhow::Result<AdminClient> {
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => Some(t.trim().to_owned()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read the token file {}", path.display()))?
                    .trim()
                    .to_owned(),
            ),
            (None, None) => None,
        };
        let client_cert = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => Some(domicile_certs::CertSource {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        };
        if token.is_none() && client_cert.is_none() {
            anyhow::bail!(
                "no token: pass --token or --token-file, or set DOMICILE_TOKEN or DOMICILE_TOKEN_FILE (or a client certificate with --cert-file and --key-file)"
            );
        }
        let https = self.control_plane.starts_with("https://");
        match (&self.ca_file, https) {
            (Some(ca), true) => {
                AdminClient::with_tls(&self.control_plane, token, ca, client_cert.as_ref())
            }
            (None, true) => anyhow::bail!(
                "{} is https: pass --ca-file (or DOMICILE_CA_FILE) with the CA its certificate is signed by",
                self.control_plane
            ),
            (_, false) if client_cert.is_some() => anyhow::bail!(
                "a client certificate needs an https:// control plane"
            ),
            (_, false) => Ok(AdminClient::new(&self.control_plane, token)),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum RegionCommand {
    /// List regions.
    List,
    /// Show one region.
    Get { id: String },
    /// Create or update a region.
    Set {
        id: String,
        /// Display name (default: the id).
        #[arg(long)]
        name: Option<String>,
        /// ISO 3166-1 alpha-2 country codes, comma-separated (for example DE,FR).
        #[arg(long, value_delimiter = ',')]
        jurisdiction: Vec<String>,
    },
    /// Delete a region (refused while any workspace calls it home).
    Delete { id: String },
}

#[derive(Debug, Subcommand)]
pub enum WorkspaceCommand {
    /// Show one workspace's entry.
    Get { id: String },
    /// Create a workspace in a region (changing an existing workspace's region needs
    /// --force; moves are the safe way).
    Set {
        id: String,
        #[arg(long)]
        region: String,
        /// Change the region of an existing workspace without a move.
        #[arg(long)]
        force: bool,
        /// Why (kept in the map history).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Delete a workspace from the map.
    Delete { id: String },
    /// List workspaces, in id order.
    List {
        /// Only workspaces whose home is this region.
        #[arg(long)]
        region: Option<String>,
        /// Page size.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Start after this id (the previous page's `next_cursor`).
        #[arg(long)]
        cursor: Option<String>,
        /// Follow the cursor through every page.
        #[arg(long)]
        all: bool,
    },
    /// Import workspaces from NDJSON lines `{"id": ..., "region": ...}` (a file, or - for
    /// standard input): all of them or none, with every bad line reported.
    Import {
        file: PathBuf,
        #[arg(long)]
        force: bool,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Every map version at which the workspace's entry changed.
    History { id: String },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// List tokens (names and roles; secrets are never shown again).
    List,
    /// Create a token and print its secret once.
    Create {
        name: String,
        /// admin, operator, auditor or proxy.
        #[arg(long)]
        role: String,
    },
    /// Delete a token.
    Delete { name: String },
}

fn print_table(headers: &[&str], rows: Vec<Vec<String>>) {
    print!("{}", table(headers, rows));
}

/// A table with aligned columns, a header line first.
pub(crate) fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let mut line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        text.push_str(out.trim_end());
        text.push('\n');
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
    text
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(s).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

fn workspace_rows(items: &[Value]) -> Vec<Vec<String>> {
    items
        .iter()
        .map(|w| {
            vec![
                s(&w["id"]),
                s(&w["region"]),
                s(&w["state"]),
                s(&w["epoch"]),
                s(&w["version"]),
            ]
        })
        .collect()
}

const WORKSPACE_HEADERS: [&str; 5] = ["WORKSPACE", "REGION", "STATE", "EPOCH", "VERSION"];

pub async fn region(conn: &Connection, command: RegionCommand) -> anyhow::Result<()> {
    let client = conn.client()?;
    let out = match command {
        RegionCommand::List => {
            let v = client.get_json("/v1/regions").await?;
            if !conn.json {
                let rows = v["regions"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|r| vec![s(&r["id"]), s(&r["name"]), s(&r["jurisdiction"])])
                            .collect()
                    })
                    .unwrap_or_default();
                print_table(&["REGION", "NAME", "JURISDICTION"], rows);
                return Ok(());
            }
            v
        }
        RegionCommand::Get { id } => {
            let r = client.get_json(&format!("/v1/regions/{}", q(&id))).await?;
            if !conn.json {
                print_table(
                    &["REGION", "NAME", "JURISDICTION"],
                    vec![vec![s(&r["id"]), s(&r["name"]), s(&r["jurisdiction"])]],
                );
                return Ok(());
            }
            r
        }
        RegionCommand::Set {
            id,
            name,
            jurisdiction,
        } => {
            let mut body = json!({ "jurisdiction": jurisdiction });
            if let Some(name) = name {
                body["name"] = json!(name);
            }
            let v = client
                .send_json(Method::PUT, &format!("/v1/regions/{}", q(&id)), &body)
                .await?;
            if !conn.json {
                match v["version"].as_u64() {
                    Some(version) => println!("region {id} written at map version {version}"),
                    None => println!("region {id} unchanged"),
                }
                return Ok(());
            }
            v
        }
        RegionCommand::Delete { id } => {
            let bytes = client
                .send(Method::DELETE, &format!("/v1/regions/{}", q(&id)), None)
                .await?;
            let v: Value = serde_json::from_slice(&bytes)?;
            if !conn.json {
                println!("region {id} deleted at map version {}", s(&v["version"]));
                return Ok(());
            }
            v
        }
    };
    print_json(&out);
    Ok(())
}

pub async fn workspace(conn: &Connection, command: WorkspaceCommand) -> anyhow::Result<()> {
    let client = conn.client()?;
    let out = match command {
        WorkspaceCommand::Get { id } => {
            let w = client
                .get_json(&format!("/v1/workspaces/{}", q(&id)))
                .await?;
            if !conn.json {
                print_table(&WORKSPACE_HEADERS, workspace_rows(std::slice::from_ref(&w)));
                return Ok(());
            }
            w
        }
        WorkspaceCommand::Set {
            id,
            region,
            force,
            reason,
        } => {
            let mut body = json!({ "region": region });
            if force {
                body["force"] = json!(true);
            }
            if let Some(reason) = reason {
                body["reason"] = json!(reason);
            }
            let w = client
                .send_json(Method::PUT, &format!("/v1/workspaces/{}", q(&id)), &body)
                .await?;
            if !conn.json {
                print_table(&WORKSPACE_HEADERS, workspace_rows(std::slice::from_ref(&w)));
                return Ok(());
            }
            w
        }
        WorkspaceCommand::Delete { id } => {
            let bytes = client
                .send(Method::DELETE, &format!("/v1/workspaces/{}", q(&id)), None)
                .await?;
            let v: Value = serde_json::from_slice(&bytes)?;
            if !conn.json {
                println!(
                    "workspace {} deleted at map version {}",
                    s(&v["deleted"]),
                    s(&v["version"])
                );
                return Ok(());
            }
            v
        }
        WorkspaceCommand::List {
            region,
            limit,
            cursor,
            all,
        } => {
            let mut cursor = cursor;
            let mut items = Vec::new();
            let mut next;
            loop {
                let mut path = format!("/v1/workspaces?limit={limit}");
                if let Some(region) = &region {
                    path.push_str(&format!("&region={}", q(region)));
                }
                if let Some(c) = &cursor {
                    path.push_str(&format!("&cursor={}", q(c)));
                }
                let page = client.get_json(&path).await?;
                items.extend(page["workspaces"].as_array().cloned().unwrap_or_default());
                next = page["next_cursor"].as_str().map(str::to_owned);
                if !all || next.is_none() {
                    break;
                }
                cursor = next.clone();
            }
            if !conn.json {
                print_table(&WORKSPACE_HEADERS, workspace_rows(&items));
                if let Some(next) = &next {
                    if !all {
                        eprintln!("(more: --cursor {next}, or --all)");
                    }
                }
                return Ok(());
            }
            json!({ "workspaces": items, "next_cursor": next })
        }
        WorkspaceCommand::Import {
            file,
            force,
            reason,
        } => {
            let bytes = if file.as_os_str() == "-" {
                use std::io::Read;
                let mut buf = Vec::new();
                std::io::stdin()
                    .read_to_end(&mut buf)
                    .context("cannot read standard input")?;
                buf
            } else {
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?
            };
            let mut path = format!("/v1/workspaces:import?force={force}");
            if let Some(reason) = reason {
                path.push_str(&format!("&reason={}", q(&reason)));
            }
            let started = std::time::Instant::now();
            let answer = client
                .send(
                    Method::POST,
                    &path,
                    Some((Bytes::from(bytes), "application/x-ndjson")),
                )
                .await?;
            let v: Value = serde_json::from_slice(&answer)?;
            if !conn.json {
                println!(
                    "imported: {} created, {} updated, {} unchanged; map version {} ({:.1} s)",
                    s(&v["created"]),
                    s(&v["updated"]),
                    s(&v["unchanged"]),
                    s(&v["version"]),
                    started.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            v
        }
        WorkspaceCommand::History { id } => {
            let v = client
                .get_json(&format!("/v1/map/history?workspace={}", q(&id)))
                .await?;
            if !conn.json {
                let rows = v["history"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|h| {
                                vec![
                                    s(&h["version"]),
                                    s(&h["at"]),
                                    s(&h["op"]),
                                    s(&h["region"]),
                                    s(&h["state"]),
                                    s(&h["epoch"]),
                                    s(&h["actor"]),
                                    s(&h["reason"]),
                                ]
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                print_table(
                    &[
                        "VERSION", "AT", "OP", "REGION", "STATE", "EPOCH", "ACTOR", "REASON",
                    ],
                    rows,
                );
                return Ok(());
            }
            v
        }
    };
    print_json(&out);
    Ok(())
}

pub async fn fleet(conn: &Connection) -> anyhow::Result<()> {
    let client = conn.client()?;
    let v = client.get_json("/v1/fleet").await?;
    if conn.json {
        print_json(&v);
        return Ok(());
    }
    println!(
        "map head: version {}  (epoch {})",
        s(&v["head"]),
        s(&v["epoch"])
    );
    if let Some(expected) = v["expected_version"].as_u64() {
        println!(
            "expected from every proxy: version {expected}  (committed over {} s ago)",
            v["behind_after_seconds"].as_f64().unwrap_or(0.0)
        );
    }
    let rows = v["members"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| {
                    vec![
                        s(&m["proxy_id"]),
                        s(&m["edge_region"]),
                        s(&m["status"]),
                        s(&m["applied_version"]),
                        s(&m["drained_version"]),
                        match m["checksum_ok"].as_bool() {
                            Some(true) => "ok".into(),
                            Some(false) => "MISMATCH".into(),
                            None => "-".into(),
                        },
                        format!(
                            "{:.1}s ago",
                            m["seconds_since_seen"].as_f64().unwrap_or(0.0)
                        ),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    print_table(
        &[
            "PROXY",
            "EDGE",
            "STATUS",
            "APPLIED",
            "DRAINED",
            "CHECKSUM",
            "LAST SEEN",
        ],
        rows,
    );
    Ok(())
}

pub async fn token(conn: &Connection, command: TokenCommand) -> anyhow::Result<()> {
    let client = conn.client()?;
    let out = match command {
        TokenCommand::List => {
            let v = client.get_json("/v1/tokens").await?;
            if !conn.json {
                let rows = v["tokens"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|t| vec![s(&t["name"]), s(&t["role"])])
                            .collect()
                    })
                    .unwrap_or_default();
                print_table(&["NAME", "ROLE"], rows);
                return Ok(());
            }
            v
        }
        TokenCommand::Create { name, role } => {
            let v = client
                .send_json(
                    Method::POST,
                    "/v1/tokens",
                    &json!({ "name": name, "role": role }),
                )
                .await?;
            if !conn.json {
                println!("{}", s(&v["token"]));
                eprintln!("token {name} ({role}) created; its secret is shown only this once");
                return Ok(());
            }
            v
        }
        TokenCommand::Delete { name } => {
            let bytes = client
                .send(Method::DELETE, &format!("/v1/tokens/{}", q(&name)), None)
                .await?;
            let v: Value = serde_json::from_slice(&bytes)?;
            if !conn.json {
                println!("token {name} deleted");
                return Ok(());
            }
            v
        }
    };
    print_json(&out);
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Remove a proxy that is gone for good (moves stop waiting for it).
    Remove { proxy_id: String },
}

pub async fn fleet_remove(conn: &Connection, proxy_id: &str) -> anyhow::Result<()> {
    let client = conn.client()?;
    let bytes = client
        .send(Method::DELETE, &format!("/v1/fleet/{}", q(proxy_id)), None)
        .await?;
    if conn.json {
        print_json(&serde_json::from_slice(&bytes)?);
    } else {
        println!("proxy {proxy_id} removed from the fleet");
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum MoveCommand {
    /// Move a workspace to another region: freeze writes, wait for the fleet to drain them,
    /// then wait for the data mover's `complete`.
    Start {
        workspace: String,
        /// The target region.
        #[arg(long)]
        to: String,
        /// Why (kept in the admin audit trail).
        #[arg(long)]
        reason: Option<String>,
        /// http:// URL called with the move on every phase change.
        #[arg(long)]
        webhook: Option<String>,
        /// How long a phase may wait for the fleet before the move reports itself stalled
        /// (for example 30s or 5m; default 2m).
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<std::time::Duration>,
        /// Follow the move until it is frozen (ready for the data copy) or over.
        #[arg(long)]
        wait: bool,
    },
    /// Show a move: phase, timestamps, the proxies it waits for.
    Status {
        id: u64,
        /// Follow it until it needs someone else (frozen) or is over.
        #[arg(long)]
        wait: bool,
    },
    /// The data copy is done: switch the workspace's home to the new region.
    Complete {
        id: u64,
        #[arg(long)]
        reason: Option<String>,
        /// Follow the move until it is done.
        #[arg(long)]
        wait: bool,
    },
    /// Abort a move before its switch: the workspace is active at its old home again.
    Abort {
        id: u64,
        #[arg(long)]
        reason: Option<String>,
    },
    /// List moves, newest first.
    List {
        #[arg(long)]
        workspace: Option<String>,
        /// Only moves that are not over.
        #[arg(long)]
        open: bool,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

fn move_rows(moves: &[Value]) -> Vec<Vec<String>> {
    moves
        .iter()
        .map(|m| {
            vec![
                s(&m["id"]),
                s(&m["workspace"]),
                format!("{} -> {}", s(&m["from"]), s(&m["to"])),
                s(&m["phase"]),
                if m["stalled"].as_bool() == Some(true) {
                    "STALLED".into()
                } else {
                    "-".into()
                },
                s(&m["at"]["requested"]),
                s(&m["actor"]),
                s(&m["reason"]),
            ]
        })
        .collect()
}

const MOVE_HEADERS: [&str; 8] = [
    "MOVE",
    "WORKSPACE",
    "FROM -> TO",
    "PHASE",
    "STALLED",
    "REQUESTED",
    "ACTOR",
    "REASON",
];

fn print_move(m: &Value) {
    println!(
        "move {}: {} {} -> {}  phase {}{}",
        s(&m["id"]),
        s(&m["workspace"]),
        s(&m["from"]),
        s(&m["to"]),
        s(&m["phase"]),
        if m["stalled"].as_bool() == Some(true) {
            "  (STALLED: past its timeout)"
        } else {
            ""
        }
    );
    for phase in [
        "requested",
        "freezing",
        "frozen",
        "switching",
        "done",
        "aborted",
    ] {
        if let Some(at) = m["at"][phase].as_str() {
            let version = match phase {
                "freezing" => &m["versions"]["freeze"],
                "switching" => &m["versions"]["switch"],
                "done" => &m["versions"]["done"],
                "aborted" => &m["versions"]["abort"],
                _ => &Value::Null,
            };
            let version = match version {
                Value::Null => String::new(),
                v => format!("  (map version {v})"),
            };
            println!("  {phase:<10} {at}{version}");
        }
    }
    if let Some(pause) = m["write_pause_ms"].as_i64() {
        println!("  writes paused for {:.3} s", pause as f64 / 1000.0);
    }
    print_waiting(m);
    if let Some(why) = m["abort_reason"].as_str() {
        println!("  aborted: {why}");
    }
    println!("  next: {}", s(&m["next"]));
}

/// How many proxies a move waits for (older control planes send only the list).
fn waiting_count(m: &Value) -> u64 {
    m["waiting_count"]
        .as_u64()
        .unwrap_or_else(|| m["waiting_for"].as_array().map_or(0, |w| w.len() as u64))
}

fn print_waiting(m: &Value) {
    if let Some(waiting) = m["waiting_for"].as_array().filter(|w| !w.is_empty()) {
        let count = waiting_count(m);
        println!(
            "  waiting for {count} proxy(ies) to drain version {}:",
            s(&m["awaiting_version"])
        );
        for p in waiting {
            println!(
                "    {} ({}): {}",
                s(&p["proxy_id"]),
                s(&p["edge_region"]),
                s(&p["why"])
            );
        }
        let unnamed = count.saturating_sub(waiting.len() as u64);
        if unnamed > 0 {
            println!("    and {unnamed} more");
        }
    }
}

/// Follows a move, printing each change, until `until` says stop. Errors when the move ends
/// aborted.
async fn follow(
    client: &AdminClient,
    conn: &Connection,
    id: u64,
    until: fn(&str) -> bool,
) -> anyhow::Result<()> {
    let mut last = (String::new(), String::new(), false);
    let started = std::time::Instant::now();
    loop {
        let m = client.get_json(&format!("/v1/moves/{id}")).await?;
        let phase = s(&m["phase"]);
        let seen = (
            phase.clone(),
            format!("{} {}", waiting_count(&m), m["waiting_for"]),
            m["stalled"].as_bool() == Some(true),
        );
        if seen != last && !conn.json {
            let waiting = waiting_count(&m);
            println!(
                "{:>8.3}s  move {id}  {phase}{}{}",
                started.elapsed().as_secs_f64(),
                if waiting > 0 {
                    format!(
                        "  waiting for {waiting} proxy(ies) to drain version {}",
                        s(&m["awaiting_version"])
                    )
                } else {
                    String::new()
                },
                if seen.2 { "  STALLED" } else { "" }
            );
            if seen.2 && !last.2 {
                print_waiting(&m);
            }
            last = seen;
        }
        if until(&phase) {
            if conn.json {
                print_json(&m);
            } else {
                print_move(&m);
            }
            if phase == "aborted" {
                anyhow::bail!(
                    "move {id} was aborted: {}",
                    m["abort_reason"].as_str().unwrap_or("no reason given")
                );
            }
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

fn over_or_frozen(phase: &str) -> bool {
    matches!(phase, "frozen" | "done" | "aborted")
}

fn over(phase: &str) -> bool {
    matches!(phase, "done" | "aborted")
}

pub async fn moves(conn: &Connection, command: MoveCommand) -> anyhow::Result<()> {
    let client = conn.client()?;
    let out = match command {
        MoveCommand::Start {
            workspace,
            to,
            reason,
            webhook,
            timeout,
            wait,
        } => {
            let mut body = json!({ "workspace": workspace, "to": to });
            if let Some(reason) = reason {
                body["reason"] = json!(reason);
            }
            if let Some(webhook) = webhook {
                body["webhook"] = json!(webhook);
            }
            if let Some(timeout) = timeout {
                body["timeout_seconds"] = json!(timeout.as_secs_f64());
            }
            let m = client.send_json(Method::POST, "/v1/moves", &body).await?;
            let id = m["id"]
                .as_u64()
                .context("the control plane sent no move id")?;
            if wait {
                if !conn.json {
                    println!("move {id} started: {workspace} -> {to}");
                }
                follow(&client, conn, id, over_or_frozen).await?;
                return Ok(());
            }
            if !conn.json {
                println!("move {id} started: {workspace} -> {to}");
                println!("follow it with: domicile move status {id} --wait");
                return Ok(());
            }
            m
        }
        MoveCommand::Status { id, wait } => {
            if wait {
                return follow(&client, conn, id, over_or_frozen).await;
            }
            let m = client.get_json(&format!("/v1/moves/{id}")).await?;
            if !conn.json {
                print_move(&m);
                return Ok(());
            }
            m
        }
        MoveCommand::Complete { id, reason, wait } => {
            let body = match reason {
                Some(reason) => json!({ "reason": reason }),
                None => json!({}),
            };
            let m = client
                .send_json(Method::POST, &format!("/v1/moves/{id}/complete"), &body)
                .await?;
            if wait {
                return follow(&client, conn, id, over).await;
            }
            if !conn.json {
                print_move(&m);
                return Ok(());
            }
            m
        }
        MoveCommand::Abort { id, reason } => {
            let body = match reason {
                Some(reason) => json!({ "reason": reason }),
                None => json!({}),
            };
            let m = client
                .send_json(Method::POST, &format!("/v1/moves/{id}/abort"), &body)
                .await?;
            if !conn.json {
                print_move(&m);
                return Ok(());
            }
            m
        }
        MoveCommand::List {
            workspace,
            open,
            limit,
        } => {
            let mut path = format!("/v1/moves?limit={limit}&open={open}");
            if let Some(w) = workspace {
                path.push_str(&format!("&workspace={}", q(&w)));
            }
            let v = client.get_json(&path).await?;
            if !conn.json {
                let moves = v["moves"].as_array().cloned().unwrap_or_default();
                print_table(&MOVE_HEADERS, move_rows(&moves));
                return Ok(());
            }
            v
        }
    };
    print_json(&out);
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Make the key pair that signs a proxy's audit checkpoints (Ed25519, PEM).
    Keygen {
        /// The private key, for the proxy's `audit.signing_key` (written with mode 0600).
        #[arg(long, default_value = "audit.key")]
        key: PathBuf,
        /// The public key, for auditors (`audit verify --key`).
        #[arg(long, default_value = "audit.pub")]
        public: PathBuf,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Check a proxy's routing audit log with its public key: chains, signatures, sequences.
    /// Exit 0: intact and closed; 3: intact, newest records not yet signed (open tail);
    /// 1: damaged (each finding names file, line and kind).
    Verify {
        /// The proxy's audit directory.
        dir: PathBuf,
        /// The public key (PEM), from `audit keygen` or the proxy's `/audit/public-key`.
        #[arg(long)]
        key: PathBuf,
        /// A checkpoint obtained from the proxy earlier (a file, or the URL of its
        /// `/audit/checkpoint`): the log must still hold it, so a cut tail is found.
        #[arg(long)]
        checkpoint: Option<String>,
    },
    /// Report on a routing audit log: per workspace and region, forwarded and refused counts,
    /// and every forward checked against the control plane's map history (home region at the
    /// record's map version). Exit 1 when any forward left its home region.
    Report {
        /// The proxy's audit directory.
        dir: PathBuf,
        /// Only records from this time on (RFC 3339, or a date: 2026-12-01).
        #[arg(long)]
        from: Option<String>,
        /// Only records before this time.
        #[arg(long)]
        to: Option<String>,
        /// Verify the log first with this public key, and include the result.
        #[arg(long)]
        key: Option<PathBuf>,
        /// Write a self-contained HTML page here (`-` for standard output).
        #[arg(long)]
        html: Option<PathBuf>,
    },
    /// The admin audit trail: every map change and every admin event (moves, tokens, fleet
    /// removals) with actor, time and reason.
    Admin {
        /// Only entries about this workspace.
        #[arg(long)]
        workspace: Option<String>,
        /// From this time on (RFC 3339, for example 2026-11-23T10:00:00Z).
        #[arg(long)]
        since: Option<String>,
        /// Before this time.
        #[arg(long)]
        until: Option<String>,
        /// Entries per page.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        /// Follow the pages to the end.
        #[arg(long)]
        all: bool,
    },
}

/// `domicile audit admin`: the control plane's admin trail.
pub async fn audit_admin(
    conn: &Connection,
    workspace: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: u32,
    all: bool,
) -> anyhow::Result<()> {
    let client = conn.client()?;
    let mut base = format!("/v1/audit/admin?limit={limit}");
    for (key, value) in [("workspace", workspace), ("since", since), ("until", until)] {
        if let Some(value) = value {
            base.push_str(&format!("&{key}={}", q(&value)));
        }
    }
    let mut after: Option<String> = None;
    let mut entries: Vec<Value> = Vec::new();
    let next = loop {
        let path = match &after {
            Some(a) => format!("{base}&after={}", q(a)),
            None => base.clone(),
        };
        let v = client.get_json(&path).await?;
        entries.extend(v["entries"].as_array().cloned().unwrap_or_default());
        match v["next"].as_str() {
            Some(next) if all => after = Some(next.to_owned()),
            next => break next.map(str::to_owned),
        }
    };
    if conn.json {
        print_json(&json!({ "entries": entries, "next": next }));
        return Ok(());
    }
    let rows = entries
        .iter()
        .map(|e| {
            vec![
                s(&e["at"]),
                s(&e["actor"]),
                s(&e["action"]),
                s(&e["subject"]),
                s(&e["version"]),
                s(&e["move"]),
                s(&e["detail"]),
                s(&e["reason"]),
            ]
        })
        .collect();
    print_table(
        &[
            "AT", "ACTOR", "ACTION", "SUBJECT", "VERSION", "MOVE", "DETAIL", "REASON",
        ],
        rows,
    );
    if let Some(next) = next {
        eprintln!("more entries: add --all, or ask the API with after={next}");
    }
    Ok(())
}
