//! `loadtest`: Domicile's scale measurements.
//!
//! Each measurement is a subcommand (see [`Command`]): `compare` (Domicile side by side with
//! nginx, HAProxy and Caddy), `map-memory` (the resident memory a routing map costs per
//! workspace) and `origin` (the static upstream `compare` starts). See loadtest/README.md and
//! docs/benchmarks.md.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use domicile_proxy::route::map::{Lookup, MapEntry, MapTable, RegionIdx, Replica, WorkspaceState};
use domicile_proxy::route::workspace_id::WorkspaceId;
use loadtest::synthetic::{catalogue, home_is_eu, mix, workspace_id};

#[derive(Debug, Parser)]
#[command(name = "loadtest", version, about = "Domicile scale measurements")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Domicile against nginx, HAProxy and Caddy in one run: throughput, CPU per request,
    /// latency over a direct baseline, memory. Writes loadtest/results/<date>-<host>.json and .md.
    Compare(CompareArgs),
    /// Resident memory per routing-map entry: fill a map with N workspaces and measure.
    MapMemory(MapMemoryArgs),
    /// The static origin `compare` puts behind every proxy (one listener per upstream group).
    Origin(OriginArgs),
    /// The control plane at scale: import, snapshot, change propagation, on SQLite and
    /// PostgreSQL. Writes loadtest/results/<date>-<host>-control-plane.json and .md.
    ControlPlane(ControlPlaneArgs),
    /// What a move costs its workspace's users: write pause and read availability during
    /// moves with an instant data copy. Writes loadtest/results/<date>-<host>-moves.json and .md.
    Moves(MovesArgs),
    /// The control plane with a fleet of N proxies on two replicas and PostgreSQL:
    /// propagation, moves, a reconnect storm, memory and store operations per proxy. Writes
    /// loadtest/results/<date>-<host>-fleet.json and .md.
    Fleet(FleetArgs),
    /// The residency promise under faults: 3 proxies, 2 control-plane replicas on PostgreSQL,
    /// origins for 3 regions, traffic, and moves, kill -9, stopped origins, a cut-off control
    /// plane and cut database connections on a seeded schedule; judged from the origins' logs,
    /// the map history and the audit logs. Exits 1 on any violation.
    Chaos(ChaosArgs),
    /// One process of `fleet`'s simulated proxies (started by `fleet`; commands on stdin).
    #[command(hide = true)]
    FleetAgent(FleetAgentArgs),
}

#[derive(Debug, Args)]
struct FleetArgs {
    /// Proxies in the fleet.
    #[arg(long, default_value_t = 10_000)]
    proxies: usize,
    /// 1,000 proxies, 20 changes, 3 moves.
    #[arg(long)]
    quick: bool,
    /// Writes timed for propagation.
    #[arg(long, default_value_t = 100)]
    changes: usize,
    /// Moves timed.
    #[arg(long, default_value_t = 10)]
    moves: usize,
    /// Workspaces in the map.
    #[arg(long, default_value_t = 1000)]
    workspaces: u64,
    /// Proxies per agent process (each holds two sockets per proxy).
    #[arg(long, default_value_t = 2500)]
    per_agent: usize,
    /// Control-plane replicas.
    #[arg(long, default_value_t = 2)]
    replicas: usize,
    /// Follow the map through the NATS fan-out tier at this URL (JetStream enabled), not a
    /// change stream per proxy from the replicas.
    #[arg(long)]
    nats: Option<String>,
    /// The domicile binary (default: build it with cargo build --release).
    #[arg(long)]
    domicile: Option<std::path::PathBuf>,
    /// Appended to the results file names.
    #[arg(long)]
    label: Option<String>,
}

#[derive(Debug, Args)]
struct ChaosArgs {
    /// Seed of the fault schedule and the traffic (default: drawn from the clock, and printed).
    #[arg(long)]
    seed: Option<u64>,
    /// How long traffic and faults run.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    duration: std::time::Duration,
    /// 90 seconds.
    #[arg(long)]
    quick: bool,
    /// Concurrent client loops.
    #[arg(long, default_value_t = 6)]
    clients: usize,
    /// Workspaces in the map.
    #[arg(long, default_value_t = 30)]
    workspaces: usize,
    /// The domicile binary (default: build it with cargo build --release).
    #[arg(long)]
    domicile: Option<std::path::PathBuf>,
    /// Where the logs are kept (default: a new directory in the system's temporary directory).
    #[arg(long)]
    logs: Option<std::path::PathBuf>,
    /// Appended to the results file names.
    #[arg(long)]
    label: Option<String>,
}

fn chaos(args: ChaosArgs) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let logs = args.logs.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("domicile-chaos-{seed}-{}", std::process::id()))
    });
    let duration = if args.quick {
        std::time::Duration::from_secs(90)
    } else {
        args.duration
    };
    let outcome = runtime.block_on(loadtest::chaos::run(loadtest::chaos::Options {
        seed,
        duration,
        clients: args.clients.max(1),
        workspaces: args.workspaces.max(1),
        domicile: loadtest::peers::domicile_binary(args.domicile)?,
        dir: logs,
        results_dir: Some(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("results")),
        label: args
            .label
            .or_else(|| args.quick.then(|| "quick".to_owned())),
    }))?;
    println!("chaos seed {seed}: {}", outcome.report.verdict.line());
    Ok(if outcome.report.verdict.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[derive(Debug, Args)]
struct FleetAgentArgs {
    #[arg(long)]
    first: usize,
    #[arg(long)]
    count: usize,
    #[arg(long, value_delimiter = ',')]
    control_planes: Vec<String>,
    #[arg(long)]
    token_file: std::path::PathBuf,
    #[arg(long)]
    lkg_dir: std::path::PathBuf,
    #[arg(long)]
    head: u64,
    /// The NATS fan-out tier's URL and subject prefix.
    #[arg(long, requires = "nats_prefix")]
    nats: Option<String>,
    #[arg(long)]
    nats_prefix: Option<String>,
}

fn fleet(args: FleetArgs) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let results_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("results");
    let (proxies, changes, moves) = if args.quick {
        (1000, 20, 3)
    } else {
        (args.proxies, args.changes, args.moves)
    };
    runtime.block_on(loadtest::fleet::run(loadtest::fleet::Options {
        proxies: proxies.max(1),
        changes: changes.max(1),
        moves,
        workspaces: args.workspaces.max(1),
        per_agent: args.per_agent.max(1),
        replicas: args.replicas.max(1),
        nats: args.nats,
        domicile: args.domicile,
        results_dir,
        label: args.label,
    }))?;
    Ok(ExitCode::SUCCESS)
}

fn fleet_agent(args: FleetAgentArgs) -> Result<ExitCode> {
    if args.control_planes.is_empty() {
        bail!("--control-planes names no control plane");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(loadtest::fleet::agent(loadtest::fleet::AgentOptions {
        first: args.first,
        count: args.count,
        control_planes: args.control_planes,
        token_file: args.token_file,
        lkg_dir: args.lkg_dir,
        head: args.head,
        nats: args.nats.zip(args.nats_prefix),
    }))?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
struct MovesArgs {
    /// Moves, one after another.
    #[arg(long, default_value_t = 40)]
    moves: usize,
    /// Proxies in the fleet.
    #[arg(long, default_value_t = 3)]
    proxies: usize,
    /// Concurrent readers (all through the run).
    #[arg(long, default_value_t = 4)]
    readers: usize,
}

fn moves(args: MovesArgs) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let results_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("results");
    runtime.block_on(loadtest::moves::run(loadtest::moves::Options {
        moves: args.moves.max(1),
        proxies: args.proxies.max(1),
        readers: args.readers,
        results_dir,
    }))?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
struct ControlPlaneArgs {
    /// Workspaces imported and then snapshotted.
    #[arg(long, default_value_t = 1_000_000)]
    entries: u64,
    /// Writes timed for propagation.
    #[arg(long, default_value_t = 1000)]
    changes: usize,
    /// Proxies watching for the second propagation run.
    #[arg(long, default_value_t = 10)]
    proxies: usize,
    /// Stores to measure (PostgreSQL from DATABASE_URL, default postgres://postgres@127.0.0.1:5432/test).
    #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres")]
    stores: Vec<String>,
}

fn control_plane(args: ControlPlaneArgs) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let results_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("results");
    runtime.block_on(loadtest::control_plane::run(
        loadtest::control_plane::Options {
            entries: args.entries,
            changes: args.changes,
            proxies: args.proxies.max(1),
            stores: args.stores,
            results_dir,
        },
    ))?;
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Compare(args) => compare(args),
        Command::Chaos(args) => chaos(args),
        Command::MapMemory(args) => map_memory(&args),
        Command::Origin(args) => {
            loadtest::origin::run(&args.pools, &args.tls_pools, args.certs.as_deref())
                .map(|()| ExitCode::SUCCESS)
        }
        Command::ControlPlane(args) => control_plane(args),
        Command::Moves(args) => moves(args),
        Command::Fleet(args) => fleet(args),
        Command::FleetAgent(args) => fleet_agent(args),
    };
    match outcome {
        Ok(code) => code,
        Err(error) => {
            eprintln!("loadtest: {error:#}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// compare

#[derive(Debug, Args)]
struct CompareArgs {
    /// A short run (2 repetitions of 2 s, 1,000 idle connections): under 5 minutes.
    #[arg(long)]
    quick: bool,
    /// Repetitions of every row, interleaved across proxies (default 5; 2 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=50))]
    reps: Option<u64>,
    /// Seconds per run (default 5; 2 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=600))]
    seconds: Option<u64>,
    /// Proxies to run, comma-separated, from direct, domicile, domicile-audit (the audit log
    /// on), nginx, haproxy, caddy.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,domicile,domicile-audit,nginx,haproxy,caddy"
    )]
    proxies: Vec<String>,
    /// Only these workloads (comma-separated names; get-small always runs: it finds the knee).
    #[arg(long, value_delimiter = ',')]
    workloads: Option<Vec<String>>,
    /// The domicile binary to measure (default: `cargo build --release` of this checkout).
    #[arg(long)]
    domicile: Option<std::path::PathBuf>,
    /// Do not run scripts/install-bench-peers.sh first.
    #[arg(long)]
    no_install: bool,
    /// Idle keep-alive connections opened for the memory row (default 10000; 1000 with --quick; 0 skips).
    #[arg(long)]
    idle_connections: Option<usize>,
    /// Also measure the routing map at 10 million entries (map-memory) and add it to the report.
    #[arg(long)]
    scale: bool,
    /// Appended to the result file names, e.g. `before-pool`.
    #[arg(long)]
    label: Option<String>,
    /// Where results are written.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    results_dir: std::path::PathBuf,
}

fn compare(args: CompareArgs) -> Result<ExitCode> {
    let kinds = args
        .proxies
        .iter()
        .map(|p| loadtest::peers::Kind::parse(p))
        .collect::<Result<Vec<_>>>()?;
    if kinds.is_empty() {
        bail!("--proxies names no proxy");
    }
    if let Some(names) = &args.workloads {
        let known: Vec<&str> = loadtest::compare::THROUGHPUT
            .iter()
            .chain(loadtest::compare::LATENCY.iter())
            .map(|w| w.name)
            .collect();
        for name in names {
            if !known.contains(&name.as_str()) {
                bail!("unknown workload {name:?} (known: {})", known.join(", "));
            }
        }
    }
    let label = match (&args.label, args.quick) {
        (Some(label), true) => Some(format!("{label}-quick")),
        (Some(label), false) => Some(label.clone()),
        (None, true) => Some("quick".to_owned()),
        (None, false) => None,
    };
    if let Some(label) = &label {
        if !label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bail!("--label {label:?}: use letters, digits, '-' and '_' only");
        }
    }
    let options = loadtest::compare::Options {
        reps: args.reps.unwrap_or(if args.quick { 2 } else { 5 }) as usize,
        duration: Duration::from_secs(args.seconds.unwrap_or(if args.quick { 2 } else { 5 })),
        kinds,
        domicile: args.domicile,
        install: !args.no_install,
        idle_connections: args
            .idle_connections
            .unwrap_or(if args.quick { 1000 } else { 10_000 }),
        results_dir: args.results_dir,
        label,
        scale: args.scale,
        workloads: args.workloads,
    };
    let (json, md, all_valid) = loadtest::compare::run(&options)?;
    eprintln!("compare: wrote {} and {}", json.display(), md.display());
    if all_valid {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("compare: some rows are invalid (non-2xx responses); see the table");
        Ok(ExitCode::FAILURE)
    }
}

#[derive(Debug, Args)]
struct OriginArgs {
    /// `name=address` of one upstream group, e.g. `eu=127.0.0.1:0`; repeatable.
    #[arg(long = "pool", value_parser = parse_pool, required = true)]
    pools: Vec<(String, std::net::SocketAddr)>,
    /// `name=address` of a group that also listens for TLS with its region's certificate.
    #[arg(long = "tls-pool", value_parser = parse_pool)]
    tls_pools: Vec<(String, std::net::SocketAddr)>,
    /// The `domicile certs dev` directory with `origin-<group>.pem` for each TLS group.
    #[arg(long)]
    certs: Option<std::path::PathBuf>,
}

fn parse_pool(text: &str) -> Result<(String, std::net::SocketAddr), String> {
    let (name, addr) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not name=address"))?;
    let addr = addr
        .parse()
        .map_err(|e| format!("{text:?}: address {addr:?}: {e}"))?;
    Ok((name.to_owned(), addr))
}

// ---------------------------------------------------------------------------------------------
// map-memory

/// Ids kept inline in a map slot are at most this long (proxy/src/map.rs).
const INLINE_ID_BYTES: usize = 19;

#[derive(Debug, Args)]
struct MapMemoryArgs {
    /// Number of workspaces to put in the map.
    #[arg(long, default_value_t = 10_000_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    entries: u64,
    /// Number of random workspaces looked up afterwards to check the map.
    #[arg(long, default_value_t = 1000)]
    check: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

struct MapMemoryReport {
    entries: u64,
    short_ids: u64,
    id_bytes: u64,
    rss_before: u64,
    rss_after: u64,
    heap_bytes: u64,
    /// Resident bytes in transparent huge pages (`AnonHugePages`), after the build.
    huge_page_bytes: u64,
    build: Duration,
    checked: u64,
    failures: Vec<String>,
}

impl MapMemoryReport {
    fn rss_delta(&self) -> u64 {
        self.rss_after.saturating_sub(self.rss_before)
    }

    fn per_entry(&self, bytes: u64) -> f64 {
        bytes as f64 / self.entries as f64
    }

    fn print_table(&self) {
        const MIB: f64 = 1024.0 * 1024.0;
        let rows: [(&str, String); 13] = [
            ("entries", self.entries.to_string()),
            (
                "ids <= 19 bytes (inline)",
                format!(
                    "{:.1}%",
                    100.0 * self.short_ids as f64 / self.entries as f64
                ),
            ),
            (
                "mean id length",
                format!("{:.1} bytes", self.id_bytes as f64 / self.entries as f64),
            ),
            ("build time", format!("{:.2?}", self.build)),
            (
                "build rate",
                format!(
                    "{:.2} M entries/s",
                    self.entries as f64 / self.build.as_secs_f64() / 1e6
                ),
            ),
            (
                "VmRSS before",
                format!("{:.1} MiB", self.rss_before as f64 / MIB),
            ),
            (
                "VmRSS after",
                format!("{:.1} MiB", self.rss_after as f64 / MIB),
            ),
            (
                "VmRSS delta",
                format!("{:.1} MiB", self.rss_delta() as f64 / MIB),
            ),
            (
                "MapTable::heap_bytes",
                format!("{:.1} MiB", self.heap_bytes as f64 / MIB),
            ),
            (
                "in huge pages",
                format!("{:.1} MiB", self.huge_page_bytes as f64 / MIB),
            ),
            (
                "bytes/entry (RSS delta)",
                format!("{:.1}", self.per_entry(self.rss_delta())),
            ),
            (
                "bytes/entry (heap_bytes)",
                format!("{:.1}", self.per_entry(self.heap_bytes)),
            ),
            (
                "lookup check",
                if self.failures.is_empty() {
                    format!(
                        "ok ({} random ids found in their home region)",
                        self.checked
                    )
                } else {
                    format!("FAILED ({} of {})", self.failures.len(), self.checked)
                },
            ),
        ];
        let width = rows.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
        println!("map-memory");
        for (name, value) in rows {
            println!("  {name:<width$}  {value}");
        }
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "measurement": "map-memory",
            "entries": self.entries,
            "short_id_fraction": self.short_ids as f64 / self.entries as f64,
            "mean_id_bytes": self.id_bytes as f64 / self.entries as f64,
            "build_seconds": self.build.as_secs_f64(),
            "rss_before_bytes": self.rss_before,
            "rss_after_bytes": self.rss_after,
            "rss_delta_bytes": self.rss_delta(),
            "heap_bytes": self.heap_bytes,
            "huge_page_bytes": self.huge_page_bytes,
            "bytes_per_entry_rss": self.per_entry(self.rss_delta()),
            "bytes_per_entry_heap": self.per_entry(self.heap_bytes),
            "lookup_check": {
                "sampled": self.checked,
                "failed": self.failures.len(),
                "failures": self.failures,
            },
        })
    }
}

/// Resident anonymous memory in transparent huge pages (`AnonHugePages` in
/// /proc/self/smaps_rollup), in bytes; 0 when the kernel does not say.
fn anon_huge_pages() -> u64 {
    std::fs::read_to_string("/proc/self/smaps_rollup")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("AnonHugePages:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        })
        .map_or(0, |kib| kib * 1024)
}

/// The process's resident set size (`VmRSS` in /proc/self/status), in bytes.
fn vm_rss() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")
        .context("reading /proc/self/status (map-memory needs Linux)")?;
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .context("no VmRSS line in /proc/self/status")?;
    let kib = line
        .trim()
        .strip_suffix("kB")
        .map(str::trim)
        .and_then(|n| n.parse::<u64>().ok())
        .with_context(|| format!("unexpected VmRSS value {line:?}"))?;
    Ok(kib * 1024)
}

fn parse_id(text: &str) -> Result<WorkspaceId> {
    WorkspaceId::parse(text.as_bytes()).map_err(|e| anyhow::anyhow!("workspace id {text:?}: {e}"))
}

fn map_memory(args: &MapMemoryArgs) -> Result<ExitCode> {
    let replica = Replica::new();
    let us = replica.regions().intern("us")?;
    let eu = replica.regions().intern("eu")?;
    let region = |i: u64| -> RegionIdx {
        if home_is_eu(i) {
            eu
        } else {
            us
        }
    };

    // Nothing else stays allocated between the two readings but the table itself: each id is a
    // short-lived String, freed before the next one is made.
    let rss_before = vm_rss()?;
    let started = Instant::now();
    let table = MapTable::with_capacity(args.entries as usize, 1);
    let mut short_ids = 0u64;
    let mut id_bytes = 0u64;
    for i in 0..args.entries {
        let text = workspace_id(i);
        let id = parse_id(&text)?;
        short_ids += u64::from(text.len() <= INLINE_ID_BYTES);
        id_bytes += text.len() as u64;
        table.insert(
            &id,
            MapEntry {
                home_region: region(i),
                state: WorkspaceState::Active,
                epoch: 1 + (i % 7) as u32,
                version: 1,
            },
        );
    }
    table.publish_version(1);
    let build = started.elapsed();
    let rss_after = vm_rss()?;
    let huge_page_bytes = anon_huge_pages();
    let heap_bytes = table.heap_bytes() as u64;
    if table.len() as u64 != args.entries {
        bail!(
            "the map holds {} entries, expected {} (duplicate ids?)",
            table.len(),
            args.entries
        );
    }

    let catalogue = catalogue();
    replica.replace(table, &catalogue)?;
    let mut failures = Vec::new();
    for n in 0..args.check {
        let i = mix(0x5eed ^ n.wrapping_mul(0x2545_f491_4f6c_dd1d)) % args.entries;
        let text = workspace_id(i);
        match replica.lookup(&parse_id(&text)?) {
            Lookup::Found { entry, .. } if entry.home_region == region(i) => {}
            other => failures.push(format!("{text}: {other:?}")),
        }
    }
    // An id that is not in the map must not be found.
    let absent = workspace_id(args.entries + 1);
    if let lookup @ Lookup::Found { .. } = replica.lookup(&parse_id(&absent)?) {
        failures.push(format!("{absent} (not inserted): {lookup:?}"));
    }

    let report = MapMemoryReport {
        entries: args.entries,
        short_ids,
        id_bytes,
        rss_before,
        rss_after,
        heap_bytes,
        huge_page_bytes,
        build,
        checked: args.check,
        failures,
    };
    if args.json {
        println!("{}", report.to_json());
    } else {
        report.print_table();
    }
    if report.failures.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        for failure in report.failures.iter().take(10) {
            eprintln!("loadtest: lookup check failed: {failure}");
        }
        Ok(ExitCode::FAILURE)
    }
}
