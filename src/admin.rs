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
        if token.is_none() {
            anyhow::bail!(
                "no token: pass --token or --token-file, or set DOMICILE_TOKEN or DOMICILE_TOKEN_FILE"
            );
        }
        Ok(AdminClient::new(&self.control_plane, token))
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
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", out.trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
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
