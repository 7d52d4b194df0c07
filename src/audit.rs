//! `domicile audit keygen|verify|report`: the routing audit log, for the operators who sign it
//! and the auditors who check it (docs/audit.md).

use std::collections::{BTreeMap, HashMap};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use domicile_proxy::audit::format::{self, Line, Outage, Record};
use domicile_proxy::audit::keys;
use domicile_proxy::audit::verify::{self, Verdict};
use futures_util::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;

use crate::admin::{table, Connection};
use crate::client::q;

/// `audit keygen`.
pub fn keygen(key: &Path, public: &Path, force: bool) -> anyhow::Result<ExitCode> {
    let verifying = keys::generate(key, public, force)?;
    println!(
        "wrote the private key to {} (mode 0600: for the proxy's audit.signing_key) and the public key to {} (for auditors); key id {}",
        key.display(),
        public.display(),
        format::key_id(&verifying)
    );
    Ok(ExitCode::SUCCESS)
}

/// Exit status of `audit verify`: 0 intact, 1 damaged, 3 open tail.
pub fn verdict_code(verdict: Verdict) -> ExitCode {
    match verdict {
        Verdict::Intact => ExitCode::SUCCESS,
        Verdict::Damaged => ExitCode::from(1),
        Verdict::Open => ExitCode::from(3),
    }
}

/// `audit verify`.
pub async fn verify(
    dir: &Path,
    key: &Path,
    checkpoint: Option<&str>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let key = keys::load_verifying_key(key)?;
    let witness = match checkpoint {
        Some(source) => Some(read_source(source).await?),
        None => None,
    };
    let dir = dir.to_owned();
    let report =
        tokio::task::spawn_blocking(move || verify::verify(&dir, &key, witness.as_deref()))
            .await
            .context("the verification stopped")??;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(verdict_code(report.verdict))
}

/// A file's text, or a URL's body (`http://...`, for example a proxy's `/audit/checkpoint`).
async fn read_source(source: &str) -> anyhow::Result<String> {
    if !source.starts_with("http://") {
        return std::fs::read_to_string(source).with_context(|| format!("cannot read {source}"));
    }
    let uri: http::Uri = source
        .parse()
        .with_context(|| format!("{source} is not a URL"))?;
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let request = http::Request::get(uri)
        .body(Empty::new())
        .with_context(|| format!("{source} is not a URL"))?;
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .with_context(|| format!("{source} did not answer within 10 s"))?
        .with_context(|| format!("cannot fetch {source}"))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .with_context(|| format!("{source}: the answer was cut off"))?
        .to_bytes();
    if !status.is_success() {
        anyhow::bail!(
            "{source} answered {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// One workspace's history entry, as `GET /v1/map/history` gives it.
#[derive(Debug, Clone, serde::Deserialize)]
struct HistoryEntry {
    version: u64,
    op: String,
    region: Option<String>,
}

/// A forward that went (or claims it went) outside the workspace's home region.
#[derive(Debug, Clone, Serialize)]
pub struct CrossRegion {
    pub file: String,
    pub line: usize,
    pub seq: u64,
    pub ts: String,
    pub request_id: String,
    pub workspace: String,
    pub map_version: Option<u64>,
    pub decision: String,
    pub upstream_region: String,
    /// The home region at that map version, as the control plane's history says.
    pub home_at_version: Option<String>,
    /// The home region the record itself names.
    pub record_home: Option<String>,
    pub reason: String,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Counts {
    pub forwarded: u64,
    /// Refusals by code (also forwards that failed upstream).
    pub refused: BTreeMap<String, u64>,
}

impl Counts {
    fn add(&mut self, decision: &str) {
        if decision == "forwarded" {
            self.forwarded += 1;
        } else {
            *self.refused.entry(decision.to_owned()).or_default() += 1;
        }
    }

    fn refused_total(&self) -> u64 {
        self.refused.values().sum()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    pub verdict: Verdict,
    pub findings: Vec<verify::Finding>,
    pub notes: Vec<verify::Note>,
    pub open_tail: Option<verify::OpenTail>,
}

/// What `audit report` finds.
#[derive(Debug, Clone, Serialize)]
pub struct RoutingReport {
    pub dir: PathBuf,
    pub control_plane: String,
    pub from: Option<String>,
    pub to: Option<String>,
    pub generated_at: String,
    pub proxies: Vec<String>,
    pub verification: Option<Verification>,
    /// Records in the time range.
    pub records: u64,
    /// Lines that could not be read as audit lines (verify names them).
    pub unreadable_lines: u64,
    pub by_workspace: BTreeMap<String, Counts>,
    pub by_region: BTreeMap<String, Counts>,
    /// Records with an upstream region, checked against the map history.
    pub checked: u64,
    /// Forwards without a workspace (`unidentified = "edge-region"` or `"nearest-region"`).
    pub unidentified: u64,
    pub cross_region_forwards: u64,
    pub cross_region: Vec<CrossRegion>,
    pub outages: Vec<Outage>,
}

/// Where a record's line is.
struct Located {
    file: String,
    line: usize,
    record: Record,
}

/// `audit report`.
#[allow(clippy::too_many_arguments)]
pub async fn report(
    conn: &Connection,
    dir: &Path,
    from: Option<&str>,
    to: Option<&str>,
    key: Option<&Path>,
    html: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let from_us = from.map(parse_bound).transpose()?;
    let to_us = to.map(parse_bound).transpose()?;
    let client = conn.client()?;

    let verification = match key {
        Some(key) => {
            let key = keys::load_verifying_key(key)?;
            let dir = dir.to_owned();
            let report = tokio::task::spawn_blocking(move || verify::verify(&dir, &key, None))
                .await
                .context("the verification stopped")??;
            Some(Verification {
                verdict: report.verdict,
                findings: report.findings,
                notes: report.notes,
                open_tail: report.open_tail,
            })
        }
        None => None,
    };

    let (records, unreadable, outages) = {
        let dir = dir.to_owned();
        tokio::task::spawn_blocking(move || read_records(&dir, from_us, to_us))
            .await
            .context("reading the log stopped")??
    };

    // Every workspace's history, fetched once (a few at a time).
    let workspaces: Vec<String> = {
        let mut set: Vec<String> = records
            .iter()
            .filter(|r| r.record.upstream_region.is_some())
            .filter_map(|r| r.record.workspace.clone())
            .collect();
        set.sort_unstable();
        set.dedup();
        set
    };
    let histories: HashMap<String, Vec<HistoryEntry>> =
        futures_util::stream::iter(workspaces.into_iter().map(|workspace| {
            let client = client.clone();
            async move {
                let path = format!("/v1/map/history?workspace={}", q(&workspace));
                let value = client
                    .get_json(&path)
                    .await
                    .with_context(|| format!("cannot read workspace {workspace}'s map history"))?;
                let history: Vec<HistoryEntry> = serde_json::from_value(value["history"].clone())
                    .with_context(|| {
                    format!("workspace {workspace}'s map history is not what the API describes")
                })?;
                anyhow::Ok((workspace, history))
            }
        }))
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;

    let mut report = RoutingReport {
        dir: dir.to_owned(),
        control_plane: client.base().to_owned(),
        from: from.map(str::to_owned),
        to: to.map(str::to_owned),
        generated_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        proxies: Vec::new(),
        verification,
        records: records.len() as u64,
        unreadable_lines: unreadable,
        by_workspace: BTreeMap::new(),
        by_region: BTreeMap::new(),
        checked: 0,
        unidentified: 0,
        cross_region_forwards: 0,
        cross_region: Vec::new(),
        outages,
    };
    for Located { file, line, record } in &records {
        if !report.proxies.contains(&record.proxy_id) {
            report.proxies.push(record.proxy_id.clone());
        }
        let workspace = record.workspace.clone().unwrap_or_else(|| "(none)".into());
        report
            .by_workspace
            .entry(workspace)
            .or_default()
            .add(&record.decision);
        let region = record
            .upstream_region
            .clone()
            .or_else(|| record.home_region.clone())
            .unwrap_or_else(|| "(none)".into());
        report
            .by_region
            .entry(region)
            .or_default()
            .add(&record.decision);
        let Some(upstream) = &record.upstream_region else {
            continue;
        };
        let Some(workspace) = &record.workspace else {
            report.unidentified += 1;
            continue;
        };
        report.checked += 1;
        let history = histories.get(workspace).map(Vec::as_slice).unwrap_or(&[]);
        let home = record
            .map_version
            .and_then(|version| home_at(history, version));
        let reason = match (&home, record.map_version) {
            (_, None) => Some("the record names no map version".to_owned()),
            (None, Some(version)) => Some(format!(
                "workspace {workspace} had no home region at map version {version}"
            )),
            (Some(home), Some(version)) if home != upstream => Some(format!(
                "sent to {upstream}, but workspace {workspace}'s home at map version {version} was {home}"
            )),
            (Some(home), _) if record.home_region.as_deref() != Some(home.as_str()) => Some(format!(
                "the record names home region {}, but the map said {home}",
                record.home_region.as_deref().unwrap_or("none")
            )),
            _ => None,
        };
        if let Some(reason) = reason {
            report.cross_region.push(CrossRegion {
                file: file.clone(),
                line: *line,
                seq: record.seq,
                ts: record.ts.clone(),
                request_id: record.request_id.clone(),
                workspace: workspace.clone(),
                map_version: record.map_version,
                decision: record.decision.clone(),
                upstream_region: upstream.clone(),
                home_at_version: home,
                record_home: record.home_region.clone(),
                reason,
            });
        }
    }
    report.cross_region_forwards = report.cross_region.len() as u64;

    if conn.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report_text(&report));
    }
    if let Some(path) = html {
        let page = report_html(&report);
        if path == Path::new("-") {
            print!("{page}");
        } else {
            std::fs::write(path, page)
                .with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
    }
    let damaged = report
        .verification
        .as_ref()
        .is_some_and(|v| v.verdict == Verdict::Damaged);
    Ok(if report.cross_region_forwards > 0 || damaged {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// The home region at `version`: the last change at or before it.
fn home_at(history: &[HistoryEntry], version: u64) -> Option<String> {
    let entry = history.iter().rev().find(|h| h.version <= version)?;
    if entry.op == "delete" {
        return None;
    }
    entry.region.clone()
}

/// A time bound: RFC 3339, or a date (midnight UTC).
fn parse_bound(text: &str) -> anyhow::Result<u64> {
    let full = if text.len() == 10 {
        format!("{text}T00:00:00Z")
    } else {
        text.to_owned()
    };
    let t = humantime::parse_rfc3339_weak(full.trim_end_matches('Z')).with_context(|| {
        format!("{text:?} is not a time (RFC 3339, for example 2026-12-01T10:00:00Z, or a date)")
    })?;
    Ok(t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64))
}

/// Every record in the range, the number of unreadable lines, and the outages the
/// checkpoints state.
fn read_records(
    dir: &Path,
    from: Option<u64>,
    to: Option<u64>,
) -> anyhow::Result<(Vec<Located>, u64, Vec<Outage>)> {
    let segments = format::list_segments(dir)
        .with_context(|| format!("cannot read the audit directory {}", dir.display()))?;
    if segments.is_empty() {
        anyhow::bail!("{} holds no audit segments", dir.display());
    }
    let mut records = Vec::new();
    let mut unreadable = 0;
    let mut outages = Vec::new();
    for (_, path) in segments {
        let file = path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let reader = std::io::BufReader::new(
            std::fs::File::open(&path)
                .with_context(|| format!("cannot read {}", path.display()))?,
        );
        for (i, line) in reader.split(b'\n').enumerate() {
            let line = line.with_context(|| format!("cannot read {}", path.display()))?;
            match serde_json::from_slice::<Line>(&line) {
                Ok(Line::Record(record)) => {
                    let ts = format::parse_time(&record.ts);
                    let in_range = ts.is_some_and(|ts| {
                        from.is_none_or(|f| ts >= f) && to.is_none_or(|t| ts < t)
                    });
                    if in_range {
                        records.push(Located {
                            file: file.clone(),
                            line: i + 1,
                            record,
                        });
                    }
                }
                Ok(Line::Checkpoint(c)) => {
                    if let Some(outage) = c.outage {
                        outages.push(outage);
                    }
                }
                Err(_) => unreadable += 1,
            }
        }
    }
    Ok((records, unreadable, outages))
}

fn counts_rows(map: &BTreeMap<String, Counts>) -> Vec<Vec<String>> {
    map.iter()
        .map(|(key, c)| {
            let codes = c
                .refused
                .iter()
                .map(|(code, n)| format!("{code}={n}"))
                .collect::<Vec<_>>()
                .join(" ");
            vec![
                key.clone(),
                c.forwarded.to_string(),
                c.refused_total().to_string(),
                if codes.is_empty() { "-".into() } else { codes },
            ]
        })
        .collect()
}

const OUTAGE_HEADERS: [&str; 6] = ["KIND", "SINCE", "UNTIL", "REFUSED", "UNRECORDED", "ERROR"];

fn outage_rows(r: &RoutingReport) -> Vec<Vec<String>> {
    r.outages
        .iter()
        .map(|o| {
            vec![
                o.kind.clone(),
                o.since.clone(),
                o.until.clone(),
                o.refused.to_string(),
                o.unrecorded.to_string(),
                o.error.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect()
}

const CROSS_REGION_HEADERS: [&str; 8] = [
    "AT",
    "SEQ",
    "TS",
    "WORKSPACE",
    "SENT TO",
    "HOME",
    "REQUEST",
    "WHY",
];

fn cross_region_rows(r: &RoutingReport) -> Vec<Vec<String>> {
    r.cross_region
        .iter()
        .map(|c| {
            vec![
                format!("{}:{}", c.file, c.line),
                c.seq.to_string(),
                c.ts.clone(),
                c.workspace.clone(),
                c.upstream_region.clone(),
                c.home_at_version.clone().unwrap_or_else(|| "-".into()),
                c.request_id.clone(),
                c.reason.clone(),
            ]
        })
        .collect()
}

/// The report as readable text.
pub fn report_text(r: &RoutingReport) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "Routing audit report for {} ({}), records {} to {}\n",
        r.dir.display(),
        if r.proxies.is_empty() {
            "no proxy".to_owned()
        } else {
            format!("proxy {}", r.proxies.join(", "))
        },
        r.from.as_deref().unwrap_or("the first"),
        r.to.as_deref().unwrap_or("the last"),
    ));
    match &r.verification {
        Some(v) => out.push_str(&format!(
            "Log verification: {}{}\n",
            match v.verdict {
                Verdict::Intact => "intact",
                Verdict::Open => "intact, newest records not yet signed (open tail)",
                Verdict::Damaged => "DAMAGED",
            },
            if v.findings.is_empty() {
                String::new()
            } else {
                format!(
                    " ({} finding{}: run `domicile audit verify`)",
                    v.findings.len(),
                    if v.findings.len() == 1 { "" } else { "s" }
                )
            }
        )),
        None => out.push_str("Log verification: not done (pass --key)\n"),
    }
    out.push_str(&format!(
        "{} records; {} checked against the map history of {}; {} forwards without a workspace\n\n",
        r.records, r.checked, r.control_plane, r.unidentified
    ));
    out.push_str("By workspace\n");
    out.push_str(&table(
        &["WORKSPACE", "FORWARDED", "REFUSED", "REFUSED BY CODE"],
        counts_rows(&r.by_workspace),
    ));
    out.push_str("\nBy region\n");
    out.push_str(&table(
        &["REGION", "FORWARDED", "REFUSED", "REFUSED BY CODE"],
        counts_rows(&r.by_region),
    ));
    if !r.outages.is_empty() {
        out.push_str("\nOutages the log states\n");
        out.push_str(&table(&OUTAGE_HEADERS, outage_rows(r)));
    }
    out.push_str(&format!(
        "\nCross-region forwards: {}\n",
        r.cross_region_forwards
    ));
    if !r.cross_region.is_empty() {
        out.push_str(&table(&CROSS_REGION_HEADERS, cross_region_rows(r)));
    }
    out
}

fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn html_table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut out = String::from("<table><thead><tr>");
    for h in headers {
        out.push_str(&format!("<th>{}</th>", esc(h)));
    }
    out.push_str("</tr></thead><tbody>");
    for row in rows {
        out.push_str("<tr>");
        for cell in row {
            out.push_str(&format!("<td>{}</td>", esc(&cell)));
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>");
    out
}

/// The report as one self-contained HTML page (no scripts, no outside resources).
pub fn report_html(r: &RoutingReport) -> String {
    let ok = r.cross_region_forwards == 0
        && r.verification
            .as_ref()
            .is_none_or(|v| v.verdict != Verdict::Damaged);
    let mut body = String::new();
    body.push_str(&format!(
        "<h1>Routing audit report</h1><p class=meta>Log <code>{}</code> &middot; {} &middot; records {} to {} &middot; map history from <code>{}</code> &middot; generated {}</p>",
        esc(&r.dir.display().to_string()),
        esc(&if r.proxies.is_empty() { "no proxy".to_owned() } else { format!("proxy {}", r.proxies.join(", ")) }),
        esc(r.from.as_deref().unwrap_or("the first")),
        esc(r.to.as_deref().unwrap_or("the last")),
        esc(&r.control_plane),
        esc(&r.generated_at),
    ));
    body.push_str(&format!(
        "<div class=\"verdict {}\"><strong>{} cross-region forward{}</strong> among {} checked forward{} ({} records).</div>",
        if ok { "ok" } else { "bad" },
        r.cross_region_forwards,
        if r.cross_region_forwards == 1 { "" } else { "s" },
        r.checked,
        if r.checked == 1 { "" } else { "s" },
        r.records,
    ));
    match &r.verification {
        Some(v) => {
            body.push_str(&format!(
                "<h2>Log verification</h2><p class=\"{}\">{}</p>",
                if v.verdict == Verdict::Damaged { "bad" } else { "ok" },
                esc(match v.verdict {
                    Verdict::Intact => "Intact: every chain, checkpoint and signature holds, sequences are contiguous, the log is closed.",
                    Verdict::Open => "Intact; the newest records are chained but not yet signed (the proxy is running, or stopped without closing its log).",
                    Verdict::Damaged => "Damaged: the log was changed after it was written.",
                })
            ));
            if !v.findings.is_empty() {
                body.push_str(&html_table(
                    &["KIND", "FILE", "LINE", "SEQ", "DETAIL"],
                    v.findings
                        .iter()
                        .map(|f| {
                            vec![
                                f.kind.as_str().to_owned(),
                                f.file.clone(),
                                f.line.map_or_else(|| "-".into(), |l| l.to_string()),
                                f.seq.map_or_else(|| "-".into(), |s| s.to_string()),
                                f.detail.clone(),
                            ]
                        })
                        .collect(),
                ));
            }
        }
        None => body.push_str(
            "<h2>Log verification</h2><p>Not done: run the report with <code>--key</code>.</p>",
        ),
    }
    let counts = |title: &str, key: &str, map: &BTreeMap<String, Counts>| {
        format!(
            "<h2>{}</h2>{}",
            esc(title),
            html_table(
                &[key, "FORWARDED", "REFUSED", "REFUSED BY CODE"],
                counts_rows(map)
            )
        )
    };
    body.push_str(&counts("By workspace", "WORKSPACE", &r.by_workspace));
    body.push_str(&counts("By region", "REGION", &r.by_region));
    if !r.outages.is_empty() {
        body.push_str("<h2>Outages the log states</h2>");
        body.push_str(&html_table(&OUTAGE_HEADERS, outage_rows(r)));
    }
    body.push_str("<h2>Cross-region forwards</h2>");
    if r.cross_region.is_empty() {
        body.push_str("<p class=ok>None: every checked forward went to the workspace's home region at its map version.</p>");
    } else {
        body.push_str(&html_table(&CROSS_REGION_HEADERS, cross_region_rows(r)));
    }
    format!(
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8><title>Routing audit report</title>\
         <meta name=viewport content=\"width=device-width, initial-scale=1\"><style>\
         body{{font:15px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:72rem;padding:0 1rem;color:#1b1f24}}\
         h1{{font-size:1.6rem;margin-bottom:.2rem}}h2{{font-size:1.15rem;margin-top:2rem}}\
         .meta{{color:#57606a}}code{{font-size:.9em}}\
         table{{border-collapse:collapse;width:100%;margin:.5rem 0}}th,td{{border:1px solid #d0d7de;padding:.3rem .5rem;text-align:left;vertical-align:top}}\
         th{{background:#f6f8fa}}td{{font-variant-numeric:tabular-nums}}\
         .verdict{{padding:1rem;border-radius:6px;margin:1rem 0;font-size:1.1rem}}\
         .verdict.ok{{background:#dafbe1;border:1px solid #4ac26b}}.verdict.bad{{background:#ffebe9;border:1px solid #ff8182}}\
         p.ok{{color:#116329}}p.bad{{color:#a40e26;font-weight:600}}\
         </style></head><body>{body}</body></html>\n"
    )
}
