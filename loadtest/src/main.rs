//! `loadtest`: Domicile's scale measurements.
//!
//! Each measurement is a subcommand (see [`Command`]); today there is `map-memory`, the resident
//! memory a routing map costs per workspace. See loadtest/README.md and docs/benchmarks.md.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use domicile_proxy::map::{Lookup, MapEntry, MapTable, RegionIdx, Replica, WorkspaceState};
use domicile_proxy::workspace_id::WorkspaceId;
use loadtest::synthetic::{catalogue, home_is_eu, mix, workspace_id};

#[derive(Debug, Parser)]
#[command(name = "loadtest", version, about = "Domicile scale measurements")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Resident memory per routing-map entry: fill a map with N workspaces and measure.
    MapMemory(MapMemoryArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::MapMemory(args) => map_memory(&args),
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
