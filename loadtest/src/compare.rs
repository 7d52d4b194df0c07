//! `loadtest compare`: Domicile side by side with nginx, HAProxy and Caddy, in one run on one
//! machine. See loadtest/README.md for the method and docs/benchmarks.md for the figures.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::peers::{self, Kind, Running, Upstreams, EU_HOST, US_HOST};
use crate::procs;
use crate::tools::{self, LoadResult};

/// How one workload loads a proxy.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(tag = "tool", rename_all = "lowercase")]
pub enum Load {
    /// Closed-loop maximum throughput.
    Wrk {
        path: &'static str,
        connections: u32,
        method: &'static str,
        body_bytes: usize,
        /// `Connection: close`: a new connection per request.
        close: bool,
    },
    /// Open-loop fixed rate, as a share of the knee, with coordinated-omission correction.
    Oha {
        path: &'static str,
        connections: u32,
        percent_of_knee: u32,
    },
    /// HTTP/2 with prior knowledge, several streams per connection.
    H2load {
        path: &'static str,
        connections: u32,
        streams: u32,
    },
    /// Keep-alive requests over TLS on the HTTPS port (h2load): HTTP/1.1 (`streams: None`, one
    /// request at a time per connection) or HTTP/2 with `streams` per connection, a POST of
    /// `body_bytes` when not zero. `tls_origin`: to the proxy configured with TLS origins that
    /// prove their region.
    Https {
        path: &'static str,
        connections: u32,
        streams: Option<u32>,
        body_bytes: usize,
        tls_origin: bool,
    },
    /// TLS 1.3 handshakes on the HTTPS port (h2load, HTTP/1.1 over TLS, one request per
    /// connection), in batches until the run's time is up. `resumed`: each client closes
    /// after every request (`Connection: close`) and h2load resumes its session on the next
    /// connection, so all but each client's first handshake are resumptions; otherwise every
    /// client of a batch makes one connection, a full handshake.
    Tls { connections: u32, resumed: bool },
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Workload {
    pub name: &'static str,
    pub description: &'static str,
    pub load: Load,
}

const fn wrk(
    path: &'static str,
    connections: u32,
    method: &'static str,
    body_bytes: usize,
    close: bool,
) -> Load {
    Load::Wrk {
        path,
        connections,
        method,
        body_bytes,
        close,
    }
}

const fn https(
    connections: u32,
    streams: Option<u32>,
    body_bytes: usize,
    tls_origin: bool,
) -> Load {
    Load::Https {
        path: "/",
        connections,
        streams,
        body_bytes,
        tls_origin,
    }
}

/// The closed-loop workloads, measured first; `get-small` also finds the knee.
pub const THROUGHPUT: [Workload; 12] = [
    Workload {
        name: "get-small",
        description: "GET, 29-byte response, keep-alive, 64 connections (wrk)",
        load: wrk("/", 64, "GET", 0, false),
    },
    Workload {
        name: "get-16k",
        description: "GET, 16 KiB response, keep-alive, 64 connections (wrk)",
        load: wrk("/16k", 64, "GET", 0, false),
    },
    Workload {
        name: "get-1m",
        description: "GET, 1 MiB response, keep-alive, 16 connections (wrk)",
        load: wrk("/1m", 16, "GET", 0, false),
    },
    Workload {
        name: "post-64k",
        description: "POST, 64 KiB request body, keep-alive, 64 connections (wrk)",
        load: wrk("/", 64, "POST", 64 * 1024, false),
    },
    Workload {
        name: "new-conn",
        description:
            "GET with Connection: close, a new connection per request, 16 connections (wrk)",
        load: wrk("/", 16, "GET", 0, true),
    },
    Workload {
        name: "h2",
        description: "HTTP/2 prior knowledge, 16 connections x 16 streams (h2load)",
        load: Load::H2load {
            path: "/",
            connections: 16,
            streams: 16,
        },
    },
    Workload {
        name: "https-h1",
        description: "GET over TLS 1.3, HTTP/1.1 keep-alive, 32 connections (h2load --h1)",
        load: https(32, None, 0, false),
    },
    Workload {
        name: "https-h2",
        description: "GET over TLS 1.3, HTTP/2, 16 connections x 16 streams (h2load)",
        load: https(16, Some(16), 0, false),
    },
    Workload {
        name: "https-post-64k",
        description: "POST of 64 KiB over TLS 1.3, HTTP/1.1 keep-alive, 32 connections (h2load --h1)",
        load: https(32, None, 64 * 1024, false),
    },
    Workload {
        name: "tls-origin",
        description: "GET over TLS 1.3 to origins over TLS that prove their region, HTTP/1.1 keep-alive, 32 connections (h2load --h1)",
        load: https(32, None, 0, true),
    },
    Workload {
        name: "tls-full",
        description:
            "full TLS 1.3 handshakes (X25519, ECDSA P-256), one GET each, 64 at a time (h2load)",
        load: Load::Tls {
            connections: 64,
            resumed: false,
        },
    },
    Workload {
        name: "tls-resumed",
        description:
            "resumed TLS 1.3 handshakes (session tickets), one GET each, 16 clients (h2load)",
        load: Load::Tls {
            connections: 16,
            resumed: true,
        },
    },
];

/// The open-loop latency workloads, at fixed shares of the knee.
pub const LATENCY: [Workload; 3] = [
    Workload {
        name: "latency-25",
        description: "GET at 25% of the knee, 16 connections (oha, latency correction)",
        load: Load::Oha {
            path: "/",
            connections: 16,
            percent_of_knee: 25,
        },
    },
    Workload {
        name: "latency-50",
        description: "GET at 50% of the knee, 16 connections (oha, latency correction)",
        load: Load::Oha {
            path: "/",
            connections: 16,
            percent_of_knee: 50,
        },
    },
    Workload {
        name: "latency-75",
        description: "GET at 75% of the knee, 16 connections (oha, latency correction)",
        load: Load::Oha {
            path: "/",
            connections: 16,
            percent_of_knee: 75,
        },
    },
];

#[derive(Debug, Clone)]
pub struct Options {
    pub reps: usize,
    pub duration: Duration,
    pub kinds: Vec<Kind>,
    pub domicile: Option<PathBuf>,
    pub install: bool,
    pub idle_connections: usize,
    pub results_dir: PathBuf,
    pub label: Option<String>,
    pub scale: bool,
    pub workloads: Option<Vec<String>>,
}

#[derive(Debug, Serialize)]
struct Sample {
    rep: usize,
    #[serde(flatten)]
    load: LoadResult,
    requests_per_second: f64,
    cpu_seconds: Option<f64>,
    cpu_seconds_per_million: Option<f64>,
    /// For fixed-rate runs: the rate asked for.
    target_rate: Option<u64>,
}

#[derive(Debug, Serialize, Clone, Copy, Default)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

fn spread(values: &[f64]) -> Option<Spread> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Spread {
        median,
        min: v[0],
        max: v[n - 1],
    })
}

#[derive(Debug, Serialize)]
struct Row {
    proxy: Kind,
    valid: bool,
    /// Why the row is invalid, if it is.
    problem: Option<String>,
    requests_per_second: Option<Spread>,
    cpu_seconds_per_million: Option<Spread>,
    latency_us: Option<LatencyRow>,
    samples: Vec<Sample>,
}

#[derive(Debug, Serialize, Clone, Copy)]
struct LatencyRow {
    p50: f64,
    p99: f64,
    p999: f64,
    /// Median percentile minus the direct baseline's, when there is a baseline.
    added_p50: Option<f64>,
    added_p99: Option<f64>,
    added_p999: Option<f64>,
}

#[derive(Debug, Serialize)]
struct WorkloadResult {
    workload: Workload,
    rows: Vec<Row>,
}

#[derive(Debug, Serialize)]
struct MemoryRow {
    proxy: Kind,
    peak_rss_bytes: u64,
    idle_connections: usize,
    rss_before_idle_bytes: u64,
    rss_with_idle_bytes: u64,
    /// Connections still open when the memory was read (a proxy may close some).
    idle_connections_open: usize,
    /// Why the idle-connection test could not complete, if it could not.
    problem: Option<String>,
}

#[derive(Debug, Serialize)]
struct Machine {
    host: String,
    cpu_model: String,
    cpus: usize,
    kernel: String,
    proxy_cpu: usize,
    load_cpu: usize,
}

#[derive(Debug, Serialize)]
struct Report {
    date: String,
    label: Option<String>,
    machine: Machine,
    reps: usize,
    duration_seconds: f64,
    knee_requests_per_second: Option<f64>,
    versions: BTreeMap<&'static str, String>,
    tools: BTreeMap<&'static str, String>,
    workloads: Vec<WorkloadResult>,
    memory: Vec<MemoryRow>,
    scale: Option<serde_json::Value>,
}

/// A blocking HTTP/1.1 exchange on a connection: writes `GET path` and reads one response.
/// Returns the status and the value of `x-origin-pool`.
fn exchange(stream: &mut TcpStream, host: &str, path: &str) -> Result<(u16, Option<String>)> {
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n")?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            bail!("connection closed before a response head");
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            bail!("response head over 64 KiB");
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line in {head:?}"))?;
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    };
    let length: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .context("response without content-length")?;
    let mut have = buf.len() - head_end;
    while have < length {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            bail!("connection closed inside the response body");
        }
        have += n;
    }
    Ok((status, header("x-origin-pool")))
}

/// Waits until `target` routes each host to its group (or fails after 20 seconds).
fn wait_routing(target: &mut Running) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = String::new();
    while Instant::now() < deadline {
        target.check_alive()?;
        let attempt = || -> Result<()> {
            for (host, pool) in [(EU_HOST, "eu"), (US_HOST, "us")] {
                let mut stream = TcpStream::connect_timeout(&target.http, Duration::from_secs(1))?;
                stream.set_read_timeout(Some(Duration::from_secs(2)))?;
                let (status, got) = exchange(&mut stream, host, "/")?;
                if status != 200 || (target.kind != Kind::Direct && got.as_deref() != Some(pool)) {
                    bail!("{host} answered {status} from pool {got:?}, expected 200 from {pool}");
                }
            }
            Ok(())
        };
        match attempt() {
            Ok(()) => return Ok(()),
            Err(e) => last = format!("{e:#}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "{} did not route as configured within 20 s: {last}",
        target.kind.name()
    )
}

fn output_of(mut command: Command, what: &str) -> Result<String> {
    let out = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {what}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

struct Bench<'a> {
    options: &'a Options,
    dir: &'a Path,
    load_cpu: usize,
}

impl Bench<'_> {
    /// One run of `load` against `target`; `rate` is the fixed rate of open-loop workloads.
    fn run_once(
        &self,
        load: &Load,
        target: &Running,
        rate: Option<u64>,
    ) -> Result<Option<LoadResult>> {
        let seconds = self.options.duration.as_secs().max(1);
        match *load {
            Load::Wrk {
                path,
                connections,
                method,
                body_bytes,
                close,
            } => {
                let script = self.dir.join(format!(
                    "wrk-{}-{body_bytes}-{close}.lua",
                    method.to_ascii_lowercase()
                ));
                if !script.exists() {
                    std::fs::write(&script, tools::wrk_script(method, body_bytes, close))?;
                }
                let mut command = peers::pinned(self.load_cpu, Path::new("wrk"));
                command
                    .args(["-t1", "-c"])
                    .arg(connections.to_string())
                    .arg("-d")
                    .arg(format!("{seconds}s"))
                    .args(["--timeout", "5s", "-s"])
                    .arg(&script)
                    .arg("-H")
                    .arg(format!("Host: {EU_HOST}"))
                    .arg(format!("http://{}{path}", target.http));
                Ok(Some(tools::parse_wrk(&output_of(command, "wrk")?)?))
            }
            Load::Oha {
                path, connections, ..
            } => {
                let rate = rate.context("a fixed-rate run needs a rate")?;
                let mut command = peers::pinned(self.load_cpu, Path::new("oha"));
                command
                    .arg("-z")
                    .arg(format!("{seconds}s"))
                    .arg("-c")
                    .arg(connections.to_string())
                    .arg("-q")
                    .arg(rate.to_string())
                    .args([
                        "--latency-correction",
                        "--no-tui",
                        "--output-format",
                        "json",
                    ])
                    .arg("-H")
                    .arg(format!("Host: {EU_HOST}"))
                    .arg(format!("http://{}{path}", target.http));
                Ok(Some(tools::parse_oha(&output_of(command, "oha")?)?))
            }
            Load::H2load {
                path,
                connections,
                streams,
            } => {
                let Some(h2) = target.h2 else {
                    return Ok(None);
                };
                let mut command = peers::pinned(self.load_cpu, Path::new("h2load"));
                command
                    .arg("-c")
                    .arg(connections.to_string())
                    .arg("-m")
                    .arg(streams.to_string())
                    .args(["-t", "1", "-D"])
                    .arg(seconds.to_string())
                    .arg("-H")
                    .arg(format!(":authority: {EU_HOST}"))
                    .arg(format!("http://{h2}{path}"));
                Ok(Some(tools::parse_h2load(&output_of(command, "h2load")?)?))
            }
            Load::Https {
                path,
                connections,
                streams,
                body_bytes,
                tls_origin,
            } => {
                let serving = if tls_origin {
                    match target.tls_origin.as_deref() {
                        Some(serving) => serving,
                        None => return Ok(None),
                    }
                } else {
                    target
                };
                let Some(tls) = serving.tls else {
                    return Ok(None);
                };
                let mut command = peers::pinned(self.load_cpu, Path::new("h2load"));
                command.args(["-t", "1", "-c"]).arg(connections.to_string());
                match streams {
                    Some(streams) => {
                        command.arg("-m").arg(streams.to_string());
                    }
                    None => {
                        command.arg("--h1");
                    }
                }
                if body_bytes > 0 {
                    let file = self.dir.join(format!("body-{body_bytes}.bin"));
                    if !file.exists() {
                        std::fs::write(&file, vec![b'x'; body_bytes])?;
                    }
                    command.arg("-d").arg(&file);
                }
                command
                    .arg("-D")
                    .arg(seconds.to_string())
                    .arg("-H")
                    .arg(format!(":authority: {EU_HOST}"))
                    .arg(format!("https://{tls}{path}"));
                Ok(Some(tools::parse_h2load(&output_of(command, "h2load")?)?))
            }
            Load::Tls {
                connections,
                resumed,
            } => {
                let Some(tls) = target.tls else {
                    return Ok(None);
                };
                // h2load's -D does not end when the server closes connections, so the run is
                // batches of a fixed number of handshakes until its time is up.
                let per_batch = if resumed {
                    connections * 100
                } else {
                    connections
                };
                let started = Instant::now();
                let mut total = LoadResult::default();
                while started.elapsed().as_secs_f64() < seconds as f64 {
                    let mut command = peers::pinned(self.load_cpu, Path::new("h2load"));
                    command
                        .args(["--h1", "-t", "1", "-c"])
                        .arg(connections.to_string())
                        .arg("-n")
                        .arg(per_batch.to_string())
                        .arg("-H")
                        .arg(format!(":authority: {EU_HOST}"));
                    if resumed {
                        command.args(["-H", "connection: close"]);
                    }
                    command.arg(format!("https://{tls}/"));
                    let batch = tools::parse_h2load(&output_of(command, "h2load")?)?;
                    total.requests += batch.requests;
                    total.seconds += batch.seconds;
                    total.non_2xx += batch.non_2xx;
                    total.socket_errors += batch.socket_errors;
                }
                Ok(Some(total))
            }
        }
    }

    fn sample(
        &self,
        rep: usize,
        load: &Load,
        target: &mut Running,
        rate: Option<u64>,
    ) -> Result<Option<Sample>> {
        // The process that serves the load is the one measured.
        let measured = match load {
            Load::Https {
                tls_origin: true, ..
            } => target.tls_origin.as_ref().and_then(|t| t.pid()),
            _ => target.pid(),
        };
        let before = measured.map(procs::cpu_seconds);
        let result = self.run_once(load, target, rate)?;
        let after = measured.map(procs::cpu_seconds);
        target.check_alive()?;
        if let Some(secondary) = target.tls_origin.as_mut() {
            secondary.check_alive()?;
        }
        let Some(load) = result else { return Ok(None) };
        let cpu_seconds = before.zip(after).map(|(b, a)| a - b);
        let cpu_seconds_per_million = cpu_seconds
            .filter(|_| load.requests > 0)
            .map(|cpu| cpu / load.requests as f64 * 1e6);
        Ok(Some(Sample {
            rep,
            requests_per_second: load.requests_per_second(),
            load,
            cpu_seconds,
            cpu_seconds_per_million,
            target_rate: rate,
        }))
    }
}

impl Bench<'_> {
    /// Runs every workload against every target, `reps` times, interleaved (A B C D A B C D)
    /// so that drift on a shared machine spreads over all of them. `rate` gives the fixed rate
    /// of open-loop workloads.
    fn run_phase(
        &self,
        workloads: &[Workload],
        targets: &mut [Running],
        rate: impl Fn(&Workload) -> Option<u64>,
    ) -> Result<Vec<WorkloadResult>> {
        let mut collected: Vec<Vec<(Kind, Vec<Sample>)>> = workloads
            .iter()
            .map(|_| targets.iter().map(|t| (t.kind, Vec::new())).collect())
            .collect();
        let total = self.options.reps * workloads.len() * targets.len();
        let mut done = 0;
        for rep in 0..self.options.reps {
            for (w, workload) in workloads.iter().enumerate() {
                let rate = rate(workload);
                for (t, target) in targets.iter_mut().enumerate() {
                    done += 1;
                    let at = rate.map(|r| format!(" at {r}/s")).unwrap_or_default();
                    eprintln!(
                        "compare: [{done}/{total}] rep {} {}{at} {}",
                        rep + 1,
                        workload.name,
                        target.kind.name()
                    );
                    if let Some(sample) = self.sample(rep, &workload.load, target, rate)? {
                        collected[w][t].1.push(sample);
                    }
                }
            }
        }
        Ok(workloads
            .iter()
            .zip(collected)
            .map(|(workload, samples)| summarize(*workload, samples))
            .collect())
    }
}

fn summarize(workload: Workload, samples: Vec<(Kind, Vec<Sample>)>) -> WorkloadResult {
    let mut rows: Vec<Row> = samples
        .into_iter()
        .map(|(proxy, samples)| {
            let rps: Vec<f64> = samples.iter().map(|s| s.requests_per_second).collect();
            let cpu: Vec<f64> = samples
                .iter()
                .filter_map(|s| s.cpu_seconds_per_million)
                .collect();
            let pick = |f: fn(&tools::Percentiles) -> f64| {
                spread(
                    &samples
                        .iter()
                        .filter_map(|s| s.load.latency_us.as_ref().map(f))
                        .collect::<Vec<_>>(),
                )
                .map(|s| s.median)
            };
            let latency_us = match (pick(|p| p.p50), pick(|p| p.p99), pick(|p| p.p999)) {
                (Some(p50), Some(p99), Some(p999)) => Some(LatencyRow {
                    p50,
                    p99,
                    p999,
                    added_p50: None,
                    added_p99: None,
                    added_p999: None,
                }),
                _ => None,
            };
            let non_2xx: u64 = samples.iter().map(|s| s.load.non_2xx).sum();
            let problem = if samples.is_empty() {
                Some("not measured".to_owned())
            } else if non_2xx > 0 {
                Some(format!("{non_2xx} non-2xx responses"))
            } else if samples.iter().any(|s| s.load.requests == 0) {
                Some("a run completed no request".to_owned())
            } else {
                None
            };
            Row {
                proxy,
                valid: problem.is_none(),
                problem,
                requests_per_second: spread(&rps),
                cpu_seconds_per_million: spread(&cpu),
                latency_us,
                samples,
            }
        })
        .collect();
    let baseline = rows
        .iter()
        .find(|r| r.proxy == Kind::Direct && r.valid)
        .and_then(|r| r.latency_us);
    if let Some(base) = baseline {
        for row in &mut rows {
            if let Some(l) = &mut row.latency_us {
                l.added_p50 = Some(l.p50 - base.p50);
                l.added_p99 = Some(l.p99 - base.p99);
                l.added_p999 = Some(l.p999 - base.p999);
            }
        }
    }
    WorkloadResult { workload, rows }
}

/// Opens `n` keep-alive connections to `target`, one request each, and reads its memory.
fn idle_memory(target: &mut Running, n: usize) -> Result<MemoryRow> {
    let pid = target.pid().context("no process to measure")?;
    let rss_before = procs::rss_bytes(pid);
    let mut open = Vec::with_capacity(n);
    for i in 0..n {
        let mut stream = TcpStream::connect(target.http)
            .with_context(|| format!("idle connection {i} of {n}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let (status, _) = exchange(&mut stream, EU_HOST, "/")
            .with_context(|| format!("request on idle connection {i} of {n}"))?;
        if status != 200 {
            bail!("idle connection {i}: status {status}");
        }
        open.push(stream);
    }
    std::thread::sleep(Duration::from_millis(500));
    let rss_with = procs::rss_bytes(pid);
    // Count the connections the proxy still holds open: a closed one reads end-of-file.
    let mut still_open = 0;
    for stream in &mut open {
        stream.set_nonblocking(true)?;
        let mut byte = [0u8; 1];
        match stream.read(&mut byte) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => still_open += 1,
            _ => {}
        }
    }
    drop(open);
    target.check_alive()?;
    Ok(MemoryRow {
        proxy: target.kind,
        peak_rss_bytes: 0,
        idle_connections: n,
        rss_before_idle_bytes: rss_before,
        rss_with_idle_bytes: rss_with,
        idle_connections_open: still_open,
        problem: None,
    })
}

fn start_origin(load_cpu: usize, dir: &Path, certs: &Path) -> Result<(Child, Upstreams)> {
    let exe = std::env::current_exe().context("locating the loadtest binary")?;
    let log = std::fs::File::create(dir.join("origin.log"))?;
    let mut child = Command::new("taskset")
        .arg("-c")
        .arg(load_cpu.to_string())
        .arg(exe)
        .args([
            "origin",
            "--pool",
            "eu=127.0.0.1:0",
            "--pool",
            "us=127.0.0.1:0",
            "--tls-pool",
            "eu=127.0.0.1:0",
            "--tls-pool",
            "us=127.0.0.1:0",
            "--certs",
        ])
        .arg(certs)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .context("starting the origin")?;
    let stdout = child.stdout.take().context("origin stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let addr = |pool: &str| -> Result<SocketAddr> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{pool}=")))
            .with_context(|| format!("origin did not report pool {pool}: {line:?}"))?
            .parse()
            .context("origin address")
    };
    let upstreams = Upstreams {
        eu: addr("eu")?,
        us: addr("us")?,
        eu_tls: addr("eu+tls")?,
        us_tls: addr("us+tls")?,
    };
    Ok((child, upstreams))
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn machine(proxy_cpu: usize, load_cpu: usize) -> Machine {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    Machine {
        host: read_trimmed("/proc/sys/kernel/hostname"),
        cpu_model,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        kernel: read_trimmed("/proc/sys/kernel/osrelease"),
        proxy_cpu,
        load_cpu,
    }
}

/// Today's UTC date as YYYY-MM-DD (days-to-civil, no calendar crate needed).
pub fn utc_date(unix_seconds: u64) -> String {
    let z = (unix_seconds / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

fn install_peers() -> Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("scripts")
        .join("install-bench-peers.sh");
    let status = Command::new("bash")
        .arg(&script)
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!("{} failed: {status}", script.display());
    }
    Ok(())
}

fn tool_versions() -> BTreeMap<&'static str, String> {
    BTreeMap::from([
        ("wrk", peers::version_of("wrk", &["-v"])),
        ("oha", peers::version_of("oha", &["--version"])),
        ("h2load", peers::version_of("h2load", &["--version"])),
    ])
}

/// Runs the comparison and writes the results; returns the paths written.
pub fn run(options: &Options) -> Result<(PathBuf, PathBuf, bool)> {
    if options.install {
        install_peers()?;
    }
    for program in ["taskset", "wrk", "oha", "h2load"] {
        if Command::new(program).arg("--version").output().is_err() {
            bail!("{program} is not installed (scripts/install-bench-peers.sh installs it)");
        }
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (proxy_cpu, load_cpu) = if cpus >= 2 { (0, 1) } else { (0, 0) };
    if cpus < 2 {
        eprintln!("compare: only one CPU: proxies, origin and load generators share it");
    }
    // Also without a Domicile row: its `certs dev` makes the certificate every proxy serves.
    let domicile = peers::domicile_binary(options.domicile.clone())?;
    let fd_limit = peers::raise_fd_limit();
    // HAProxy reserves two descriptors per connection it accepts (peers::start gives it
    // maxconn = (limit - 200) / 2): keep the idle test within that, in whole thousands.
    let idle_cap = ((fd_limit.saturating_sub(200) / 2).saturating_sub(200) / 1000 * 1000) as usize;
    let mut options = options.clone();
    if options.idle_connections > idle_cap {
        eprintln!(
            "compare: the open-file limit is {fd_limit}: the idle-connection row uses {idle_cap} connections instead of {} (raise the hard limit to measure more)",
            options.idle_connections
        );
        options.idle_connections = idle_cap;
    }
    let options = &options;
    let dir = std::env::temp_dir().join(format!("domicile-compare-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let tls = peers::tls_files(&dir, &domicile)?;
    let (mut origin, upstreams) = start_origin(load_cpu, &dir, &tls.dir)?;
    let result = (|| -> Result<(PathBuf, PathBuf, bool)> {
        let setup = peers::Setup {
            dir: &dir,
            cpu: proxy_cpu,
            upstreams,
            domicile: &domicile,
            fd_limit,
            tls: &tls,
        };
        let wanted = |w: &Workload| {
            options
                .workloads
                .as_ref()
                .is_none_or(|names| names.iter().any(|n| n == w.name))
        };
        let with_tls_origins = THROUGHPUT.iter().any(|w| {
            wanted(w)
                && matches!(
                    w.load,
                    Load::Https {
                        tls_origin: true,
                        ..
                    }
                )
        });
        let mut targets = Vec::new();
        for kind in &options.kinds {
            let mut target = peers::start(*kind, &setup, false)?;
            wait_routing(&mut target)
                .with_context(|| format!("see the logs in {}", dir.join(kind.name()).display()))?;
            eprintln!("compare: {} ready on {}", kind.name(), target.http);
            if with_tls_origins && *kind != Kind::Direct {
                let mut secondary = peers::start(*kind, &setup, true)?;
                wait_routing(&mut secondary).with_context(|| {
                    format!(
                        "{} with TLS origins: see the logs in {}",
                        kind.name(),
                        dir.join(format!("{}-tls-origin", kind.name())).display()
                    )
                })?;
                eprintln!(
                    "compare: {} with TLS origins ready on {}",
                    kind.name(),
                    secondary.http
                );
                target.tls_origin = Some(Box::new(secondary));
            }
            targets.push(target);
        }
        let bench = Bench {
            options,
            dir: &dir,
            load_cpu,
        };

        // Throughput first: `get-small` finds the knee for the fixed-rate rows.
        let throughput: Vec<Workload> = THROUGHPUT
            .into_iter()
            .filter(|w| wanted(w) || w.name == "get-small")
            .collect();
        let mut workloads = bench.run_phase(&throughput, &mut targets, |_| None)?;

        // The knee: the slowest proxy's median small-GET throughput, so every proxy can carry
        // the fixed rates below it.
        let knee = workloads
            .iter()
            .find(|w| w.workload.name == "get-small")
            .and_then(|w| {
                w.rows
                    .iter()
                    .filter(|r| r.proxy != Kind::Direct && r.valid)
                    .filter_map(|r| r.requests_per_second.map(|s| s.median))
                    .min_by(f64::total_cmp)
            });
        let latency: Vec<Workload> = LATENCY.into_iter().filter(|w| wanted(w)).collect();
        if let Some(knee) = knee {
            workloads.extend(bench.run_phase(&latency, &mut targets, |w| match w.load {
                Load::Oha {
                    percent_of_knee, ..
                } => Some((knee * f64::from(percent_of_knee) / 100.0).round().max(1.0) as u64),
                _ => None,
            })?);
        }

        let mut memory = Vec::new();
        for target in targets.iter_mut().filter(|t| t.kind != Kind::Direct) {
            let mut row = if options.idle_connections > 0 {
                eprintln!(
                    "compare: {} idle connections to {}",
                    options.idle_connections,
                    target.kind.name()
                );
                // A proxy that cannot hold the connections gets a row that says so; the rest
                // of the report stands.
                idle_memory(target, options.idle_connections).unwrap_or_else(|e| {
                    eprintln!("compare: idle connections to {}: {e:#}", target.kind.name());
                    MemoryRow {
                        proxy: target.kind,
                        peak_rss_bytes: 0,
                        idle_connections: options.idle_connections,
                        rss_before_idle_bytes: 0,
                        rss_with_idle_bytes: 0,
                        idle_connections_open: 0,
                        problem: Some(format!("{e:#}")),
                    }
                })
            } else {
                MemoryRow {
                    proxy: target.kind,
                    peak_rss_bytes: 0,
                    idle_connections: 0,
                    rss_before_idle_bytes: 0,
                    rss_with_idle_bytes: 0,
                    idle_connections_open: 0,
                    problem: None,
                }
            };
            row.peak_rss_bytes = target.pid().map_or(0, procs::peak_rss_bytes);
            memory.push(row);
        }

        let scale = if options.scale {
            eprintln!("compare: map-memory at 10 million entries");
            let exe = std::env::current_exe()?;
            let mut command = Command::new(exe);
            command.args(["map-memory", "--json"]);
            Some(serde_json::from_str(&output_of(command, "map-memory")?)?)
        } else {
            None
        };

        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let machine = machine(proxy_cpu, load_cpu);
        let versions = targets
            .iter()
            .map(|t| (t.kind.name(), t.version.clone()))
            .collect();
        let report = Report {
            date: utc_date(now),
            label: options.label.clone(),
            machine,
            reps: options.reps,
            duration_seconds: options.duration.as_secs_f64(),
            knee_requests_per_second: knee,
            versions,
            tools: tool_versions(),
            workloads,
            memory,
            scale,
        };
        for target in &mut targets {
            if let Some(secondary) = target.tls_origin.as_mut() {
                secondary.stop();
            }
            target.stop();
        }
        let all_valid = report
            .workloads
            .iter()
            .all(|w| w.rows.iter().all(|r| r.valid || r.samples.is_empty()));
        let (json, md) = write_report(&report, &options.results_dir)?;
        Ok((json, md, all_valid))
    })();
    let _ = origin.kill();
    let _ = origin.wait();
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("compare: logs kept in {}", dir.display());
    }
    result
}

fn write_report(report: &Report, dir: &Path) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let host: String = report
        .machine
        .host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let stem = match &report.label {
        Some(label) => format!("{}-{host}-{label}", report.date),
        None => format!("{}-{host}", report.date),
    };
    let json_path = dir.join(format!("{stem}.json"));
    let md_path = dir.join(format!("{stem}.md"));
    std::fs::write(&json_path, serde_json::to_string_pretty(report)? + "\n")?;
    let md = markdown(report);
    std::fs::write(&md_path, &md)?;
    print!("{md}");
    Ok((json_path, md_path))
}

fn fmt_us(us: f64) -> String {
    if us.abs() >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

fn fmt_signed_us(us: f64) -> String {
    let sign = if us >= 0.0 { "+" } else { "−" };
    format!("{sign}{}", fmt_us(us.abs()))
}

fn fmt_bytes(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

fn markdown(report: &Report) -> String {
    let mut md = String::new();
    let m = &report.machine;
    md.push_str(&format!(
        "# Domicile vs nginx, HAProxy and Caddy: {}{}\n\n",
        report.date,
        report
            .label
            .as_deref()
            .map(|l| format!(" ({l})"))
            .unwrap_or_default()
    ));
    md.push_str(&format!(
        "{} CPUs ({}), Linux {}. Proxy under test pinned to CPU {} with one worker; load generator and origin on CPU {}. {} interleaved repetitions of {} s per row; medians, with min–max for throughput.\n\n",
        m.cpus, m.cpu_model, m.kernel, m.proxy_cpu, m.load_cpu, report.reps, report.duration_seconds
    ));
    for (name, version) in &report.versions {
        md.push_str(&format!("- {name}: {version}\n"));
    }
    md.push('\n');
    if let Some(knee) = report.knee_requests_per_second {
        md.push_str(&format!(
            "Knee (slowest proxy's median small-GET throughput) for the fixed-rate rows: {knee:.0} req/s.\n\n"
        ));
    }
    for w in &report.workloads {
        md.push_str(&format!(
            "## {}: {}\n\n",
            w.workload.name, w.workload.description
        ));
        md.push_str("| proxy | req/s median (min–max) | CPU s per M req | p50 | p99 | p99.9 | added p99 over direct | valid |\n");
        md.push_str("| --- | --- | --- | --- | --- | --- | --- | --- |\n");
        for r in &w.rows {
            if r.samples.is_empty() {
                continue;
            }
            let rps = r.requests_per_second.map_or("–".into(), |s| {
                format!("{:.0} ({:.0}–{:.0})", s.median, s.min, s.max)
            });
            let cpu = r
                .cpu_seconds_per_million
                .map_or("–".into(), |s| format!("{:.1}", s.median));
            let (p50, p99, p999, added) = match r.latency_us {
                Some(l) => (
                    fmt_us(l.p50),
                    fmt_us(l.p99),
                    fmt_us(l.p999),
                    l.added_p99.map_or("–".into(), fmt_signed_us),
                ),
                None => ("–".into(), "–".into(), "–".into(), "–".into()),
            };
            let valid = match &r.problem {
                None => "yes".to_owned(),
                Some(p) => format!("**no**: {p}"),
            };
            md.push_str(&format!(
                "| {} | {rps} | {cpu} | {p50} | {p99} | {p999} | {added} | {valid} |\n",
                r.proxy.name()
            ));
        }
        md.push('\n');
    }

    // Ratios: Domicile over each peer. Above 1 for req/s is better; below 1 for CPU and p99.
    let peers: Vec<Kind> = [Kind::Nginx, Kind::Haproxy, Kind::Caddy]
        .into_iter()
        .filter(|k| report.versions.contains_key(k.name()))
        .collect();
    if report.versions.contains_key("domicile") && !peers.is_empty() {
        md.push_str("## Domicile relative to each peer\n\n");
        md.push_str("req/s: Domicile ÷ peer (above 1: Domicile is faster). CPU: Domicile's CPU per request ÷ peer's (below 1: Domicile is cheaper). p99: Domicile's p99 ÷ peer's (below 1: lower latency).\n\n");
        md.push_str("| workload |");
        for p in &peers {
            md.push_str(&format!(" {0} req/s | {0} CPU | {0} p99 |", p.name()));
        }
        md.push_str("\n| --- |");
        for _ in &peers {
            md.push_str(" --- | --- | --- |");
        }
        md.push('\n');
        for w in &report.workloads {
            let row = |k: Kind| w.rows.iter().find(|r| r.proxy == k && r.valid);
            let Some(ours) = row(Kind::Domicile) else {
                continue;
            };
            md.push_str(&format!("| {} |", w.workload.name));
            for p in &peers {
                let theirs = row(*p);
                let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                    (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
                    _ => "–".to_owned(),
                };
                let rps = ratio(
                    ours.requests_per_second.map(|s| s.median),
                    theirs.and_then(|t| t.requests_per_second.map(|s| s.median)),
                );
                let cpu = ratio(
                    ours.cpu_seconds_per_million.map(|s| s.median),
                    theirs.and_then(|t| t.cpu_seconds_per_million.map(|s| s.median)),
                );
                let p99 = ratio(
                    ours.latency_us.map(|l| l.p99),
                    theirs.and_then(|t| t.latency_us.map(|l| l.p99)),
                );
                md.push_str(&format!(" {rps} | {cpu} | {p99} |"));
            }
            md.push('\n');
        }
        md.push('\n');
    }

    // The audit log's cost: Domicile with it on, over Domicile without, measured in the same
    // run (interleaved), so the ratio holds on a noisy machine.
    if report.versions.contains_key("domicile") && report.versions.contains_key("domicile-audit") {
        md.push_str("## Audit log on versus off\n\n");
        md.push_str("Domicile with `[audit]` (every decision recorded, group commit every 10 ms, signed checkpoints) ÷ Domicile without, same run. req/s above 0.9 meets the target; CPU and p99 above 1 are the log's cost.\n\n");
        md.push_str(
            "| workload | req/s audit on ÷ off | CPU per request on ÷ off | p99 on ÷ off |\n",
        );
        md.push_str("| --- | --- | --- | --- |\n");
        for w in &report.workloads {
            let row = |k: Kind| w.rows.iter().find(|r| r.proxy == k && r.valid);
            let (Some(off), Some(on)) = (row(Kind::Domicile), row(Kind::DomicileAudit)) else {
                continue;
            };
            let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
                _ => "–".to_owned(),
            };
            md.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                w.workload.name,
                ratio(
                    on.requests_per_second.map(|s| s.median),
                    off.requests_per_second.map(|s| s.median)
                ),
                ratio(
                    on.cpu_seconds_per_million.map(|s| s.median),
                    off.cpu_seconds_per_million.map(|s| s.median)
                ),
                ratio(on.latency_us.map(|l| l.p99), off.latency_us.map(|l| l.p99)),
            ));
        }
        md.push('\n');
    }

    if !report.memory.is_empty() {
        md.push_str("## Memory\n\n");
        md.push_str("| proxy | peak RSS over the run | RSS before idle test | RSS with idle keep-alive connections | per idle connection | connections still open |\n");
        md.push_str("| --- | --- | --- | --- | --- | --- |\n");
        for r in &report.memory {
            let per = if r.idle_connections > 0 {
                format!(
                    "{:.1} KiB",
                    r.rss_with_idle_bytes
                        .saturating_sub(r.rss_before_idle_bytes) as f64
                        / 1024.0
                        / r.idle_connections as f64
                )
            } else {
                "–".into()
            };
            if let Some(problem) = &r.problem {
                md.push_str(&format!(
                    "| {} | {} | – | **failed**: {problem} | – | – |\n",
                    r.proxy.name(),
                    fmt_bytes(r.peak_rss_bytes),
                ));
                continue;
            }
            md.push_str(&format!(
                "| {} | {} | {} | {} ({}) | {per} | {} |\n",
                r.proxy.name(),
                fmt_bytes(r.peak_rss_bytes),
                fmt_bytes(r.rss_before_idle_bytes),
                fmt_bytes(r.rss_with_idle_bytes),
                r.idle_connections,
                r.idle_connections_open
            ));
        }
        md.push('\n');
    }
    if let Some(scale) = &report.scale {
        md.push_str(&format!(
            "## Scale\n\nmap-memory at {} entries: {:.1} bytes per entry (RSS), built in {:.1} s.\n\n",
            scale["entries"], scale["bytes_per_entry_rss"].as_f64().unwrap_or(0.0), scale["build_seconds"].as_f64().unwrap_or(0.0)
        ));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(951_782_400), "2000-02-29");
        assert_eq!(utc_date(1_795_392_000), "2026-11-23");
    }

    #[test]
    fn spreads() {
        let s = spread(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(spread(&[1.0, 4.0]).unwrap().median, 2.5);
        assert!(spread(&[]).is_none());
    }

    #[test]
    fn rows_with_non_2xx_are_invalid_and_latency_is_relative_to_direct() {
        let sample = |rps: f64, non_2xx: u64, p99: f64| Sample {
            rep: 0,
            load: LoadResult {
                requests: rps as u64,
                seconds: 1.0,
                non_2xx,
                socket_errors: 0,
                latency_us: Some(tools::Percentiles {
                    p50: p99 / 2.0,
                    p99,
                    p999: p99 * 2.0,
                }),
            },
            requests_per_second: rps,
            cpu_seconds: None,
            cpu_seconds_per_million: None,
            target_rate: None,
        };
        let result = summarize(
            THROUGHPUT[0],
            vec![
                (Kind::Direct, vec![sample(100.0, 0, 100.0)]),
                (
                    Kind::Domicile,
                    vec![sample(90.0, 0, 130.0), sample(80.0, 0, 150.0)],
                ),
                (Kind::Nginx, vec![sample(95.0, 1, 120.0)]),
            ],
        );
        let domicile = &result.rows[1];
        assert!(domicile.valid);
        assert_eq!(domicile.requests_per_second.unwrap().median, 85.0);
        assert_eq!(domicile.latency_us.unwrap().added_p99, Some(40.0));
        let nginx = &result.rows[2];
        assert!(!nginx.valid);
        assert_eq!(nginx.problem.as_deref(), Some("1 non-2xx responses"));
    }
}
