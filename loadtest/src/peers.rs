//! The proxies `compare` measures, each started with an equivalent configuration:
//!
//! - host-based routing: `acme.bench.test` to upstream group `eu`, `globex.bench.test` to `us`
//!   (Domicile finds the workspace in the host and its home region in the map);
//! - keep-alive to the upstreams, streaming request bodies, no access logs;
//! - one worker on one core (`taskset`), `X-Forwarded-For` (or `Forwarded`) added;
//! - HTTP/1.1 and cleartext HTTP/2 with prior knowledge for clients.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The host that routes to the `eu` group, and the one that routes to `us`.
pub const EU_HOST: &str = "acme.bench.test";
pub const US_HOST: &str = "globex.bench.test";
/// Workspaces in Domicile's bench map besides `acme` and `globex`, so lookups run against a
/// populated table rather than a two-entry one.
pub const FILLER_WORKSPACES: u64 = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// No proxy: the client talks to the origin directly.
    Direct,
    Domicile,
    /// Domicile with its routing audit log on (the same configuration plus `[audit]`).
    #[serde(rename = "domicile-audit")]
    DomicileAudit,
    Nginx,
    Haproxy,
    Caddy,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Direct,
        Kind::Domicile,
        Kind::DomicileAudit,
        Kind::Nginx,
        Kind::Haproxy,
        Kind::Caddy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Domicile => "domicile",
            Kind::DomicileAudit => "domicile-audit",
            Kind::Nginx => "nginx",
            Kind::Haproxy => "haproxy",
            Kind::Caddy => "caddy",
        }
    }

    pub fn parse(text: &str) -> Result<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.name() == text)
            .with_context(|| {
                format!("unknown proxy {text:?} (known: direct, domicile, domicile-audit, nginx, haproxy, caddy)")
            })
    }
}

/// Raises this process's open-file limit (which the proxies inherit) as far as allowed, up to
/// 65536, and returns the limit in force.
pub fn raise_fd_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let current = getrlimit(Resource::Nofile);
    let want = 65_536u64;
    let raised = Rlimit {
        current: Some(want),
        maximum: Some(current.maximum.map_or(want, |m| m.max(want))),
    };
    if setrlimit(Resource::Nofile, raised).is_err() {
        // Without privilege, only the soft limit can move, up to the hard one.
        let soft = current.maximum.map_or(want, |m| m.min(want));
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(soft),
                maximum: current.maximum,
            },
        );
    }
    getrlimit(Resource::Nofile).current.unwrap_or(want)
}

/// A free TCP port on 127.0.0.1 (bound and released; peers need numbers in their configs).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Where the proxies send traffic.
#[derive(Debug, Clone, Copy)]
pub struct Upstreams {
    pub eu: SocketAddr,
    pub us: SocketAddr,
    /// The same groups over TLS, each with its region's certificate.
    pub eu_tls: SocketAddr,
    pub us_tls: SocketAddr,
}

/// The name an origin of `pool` proves in its certificate (`domicile certs dev` issues it).
pub fn origin_identity(pool: &str) -> String {
    format!("{pool}.region.bench.test")
}

/// A proxy process under test.
#[derive(Debug)]
pub struct Running {
    pub kind: Kind,
    /// HTTP/1.1 address clients use.
    pub http: SocketAddr,
    /// Cleartext HTTP/2 (prior knowledge) address, if the proxy has one.
    pub h2: Option<SocketAddr>,
    /// HTTPS address (HTTP/1.1 and HTTP/2 by ALPN), with the shared certificate.
    pub tls: Option<SocketAddr>,
    pub child: Option<Child>,
    pub version: String,
    /// The same proxy configured with TLS to origins that prove their region (a process of
    /// its own, on the same CPU), for the rows that measure it.
    pub tls_origin: Option<Box<Running>>,
}

impl Running {
    /// The pid whose process tree is measured (none for `direct`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(child) = &mut self.child {
            if let Some(status) = child.try_wait()? {
                bail!("{} exited during the run: {status}", self.kind.name());
            }
        }
        Ok(())
    }

    pub fn stop(&mut self) {
        if let Some(child) = &mut self.child {
            // SIGTERM first, so nginx's master takes its worker down with it.
            let pid = rustix::process::Pid::from_raw(child.id() as i32);
            if let Some(pid) = pid {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The first non-empty line a program prints about its version (on stdout or stderr).
pub fn version_of(program: &str, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(out) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            text.lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .to_owned()
        }
        Err(e) => format!("missing ({e})"),
    }
}

/// `program` under `taskset -c cpu`.
pub fn pinned(cpu: usize, program: &Path) -> Command {
    let mut command = Command::new("taskset");
    command.arg("-c").arg(cpu.to_string()).arg(program);
    command
}

fn spawn(mut command: Command, dir: &Path, name: &str) -> Result<Child> {
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    command
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {name}"))
}

/// Everything needed to start a proxy.
pub struct Setup<'a> {
    pub dir: &'a Path,
    pub cpu: usize,
    pub upstreams: Upstreams,
    pub domicile: &'a Path,
    /// The open-file limit the proxies inherit.
    pub fd_limit: u64,
    /// The certificate every proxy serves on its HTTPS port.
    pub tls: &'a TlsFiles,
}

/// The one certificate (ECDSA P-256, `*.bench.test`) every proxy serves, made by
/// `domicile certs dev` in the run's directory.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Certificate and key in one file, for HAProxy.
    pub combined: PathBuf,
    /// The CA that signed every certificate (the origins' too).
    pub ca: PathBuf,
    /// The directory `domicile certs dev` wrote.
    pub dir: PathBuf,
}

pub fn tls_files(dir: &Path, domicile: &Path) -> Result<TlsFiles> {
    let certs = dir.join("certs");
    let status = Command::new(domicile)
        .args(["certs", "dev"])
        .arg(&certs)
        .args(["--domain", "bench.test", "--regions", "eu,us", "--force"])
        .stdout(Stdio::null())
        .status()
        .context("domicile certs dev")?;
    if !status.success() {
        bail!("domicile certs dev failed: {status}");
    }
    let files = TlsFiles {
        cert: certs.join("edge.pem"),
        key: certs.join("edge-key.pem"),
        combined: certs.join("edge-combined.pem"),
        ca: certs.join("ca.pem"),
        dir: certs.clone(),
    };
    let combined = format!(
        "{}{}",
        std::fs::read_to_string(&files.cert)?,
        std::fs::read_to_string(&files.key)?
    );
    std::fs::write(&files.combined, combined)?;
    Ok(files)
}

/// Starts `kind` with cleartext upstreams, or (`tls_origins`) with TLS to origins that must
/// prove their region's identity (`eu.region.bench.test`), verified against the run's CA.
pub fn start(kind: Kind, setup: &Setup<'_>, tls_origins: bool) -> Result<Running> {
    let name = if tls_origins {
        format!("{}-tls-origin", kind.name())
    } else {
        kind.name().to_owned()
    };
    let dir = setup.dir.join(&name);
    std::fs::create_dir_all(&dir)?;
    let mut ups = setup.upstreams;
    if tls_origins {
        ups.eu = ups.eu_tls;
        ups.us = ups.us_tls;
    }
    let ca = setup.tls.ca.display().to_string();
    let (eu_id, us_id) = (origin_identity("eu"), origin_identity("us"));
    match kind {
        Kind::Direct => Ok(Running {
            kind,
            http: ups.eu,
            h2: None,
            tls: None,
            child: None,
            version: "origin only".into(),
            tls_origin: None,
        }),
        Kind::Domicile | Kind::DomicileAudit => {
            let (port, tls_port) = (free_port()?, free_port()?);
            write_domicile_map(&dir.join("map.jsonl"))?;
            let mut config = format!(
                r#"[proxy]
edge_region = "eu"
listen = "127.0.0.1:{port}"
workers = 1

[map]
file = "map.jsonl"
watch = false

[identify]
rules = [{{ from = "host", pattern = "{{workspace}}.bench.test" }}]

[limits]
header_read_timeout = "60s"
idle_timeout = "60s"

[regions.eu]
endpoints = ["{eu}"]
{eu_tls}
[regions.us]
endpoints = ["{us}"]
{us_tls}

[tls]
listen = "127.0.0.1:{tls_port}"
[[tls.certificates]]
cert = "{cert}"
key = "{key}"
"#,
                eu = ups.eu,
                us = ups.us,
                eu_tls = if tls_origins {
                    format!("tls = {{ ca = \"{ca}\", identity = \"{eu_id}\" }}\n")
                } else {
                    String::new()
                },
                us_tls = if tls_origins {
                    format!("tls = {{ ca = \"{ca}\", identity = \"{us_id}\" }}\n")
                } else {
                    String::new()
                },
                cert = setup.tls.cert.display(),
                key = setup.tls.key.display(),
            );
            if kind == Kind::DomicileAudit {
                // Every decision recorded, chained, fsynced by group commit (default 10 ms),
                // checkpoints signed every 10 s: the defaults, on the run's own disk.
                let status = Command::new(setup.domicile)
                    .args(["audit", "keygen", "--force", "--key"])
                    .arg(dir.join("audit.key"))
                    .arg("--public")
                    .arg(dir.join("audit.pub"))
                    .stdout(Stdio::null())
                    .status()
                    .context("domicile audit keygen")?;
                if !status.success() {
                    bail!("domicile audit keygen failed: {status}");
                }
                config.push_str("\n[audit]\ndir = \"audit\"\nsigning_key = \"audit.key\"\n");
            }
            let version = version_of(&setup.domicile.display().to_string(), &["--version"]);
            launch(
                kind,
                setup,
                &dir,
                "domicile.toml",
                &config,
                setup.domicile,
                (port, Some(port), Some(tls_port)),
                version,
                |command, path| {
                    command
                        .arg("proxy")
                        .arg("--config")
                        .arg(path)
                        .env("DOMICILE_LOG", "warn");
                },
            )
        }
        Kind::Nginx => {
            let (port, h2, tls_port) = (free_port()?, free_port()?, free_port()?);
            let d = dir.display();
            let config = format!(
                r#"worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile {fd_limit};
events {{ worker_connections {worker_connections}; }}
http {{
  access_log off;
  client_body_temp_path {d}/client_body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  keepalive_timeout 60s;
  keepalive_requests 10000000;
  client_max_body_size 100m;
  client_body_buffer_size 128k;
  upstream eu {{ server {eu}; keepalive 256; keepalive_requests 10000000; }}
  upstream us {{ server {us}; keepalive 256; keepalive_requests 10000000; }}
  map $host $pool {{ default ""; {EU_HOST} eu; {US_HOST} us; }}
  map $host $origin_name {{ default ""; {EU_HOST} {eu_id}; {US_HOST} {us_id}; }}
  server {{
    listen 127.0.0.1:{port};
    listen 127.0.0.1:{h2} http2;
    listen 127.0.0.1:{tls_port} ssl http2;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:SSL:10m;
    ssl_session_tickets on;
    location / {{
      if ($pool = "") {{ return 421; }}
      proxy_pass {scheme}://$pool;
{origin_tls}      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_request_buffering off;
      proxy_max_temp_file_size 0;
    }}
  }}
}}
"#,
                eu = ups.eu,
                us = ups.us,
                scheme = if tls_origins { "https" } else { "http" },
                origin_tls = if tls_origins {
                    format!("      proxy_ssl_verify on;\n      proxy_ssl_trusted_certificate {ca};\n      proxy_ssl_server_name on;\n      proxy_ssl_name $origin_name;\n      proxy_ssl_session_reuse on;\n      proxy_ssl_protocols TLSv1.2 TLSv1.3;\n")
                } else {
                    String::new()
                },
                fd_limit = setup.fd_limit,
                worker_connections = setup.fd_limit.saturating_sub(100).max(1000),
                cert = setup.tls.cert.display(),
                key = setup.tls.key.display(),
            );
            let version = version_of("nginx", &["-v"]);
            launch(
                kind,
                setup,
                &dir,
                "nginx.conf",
                &config,
                Path::new("nginx"),
                (port, Some(h2), Some(tls_port)),
                version,
                |command, path| {
                    command.arg("-c").arg(path).arg("-p").arg(&dir);
                },
            )
        }
        Kind::Haproxy => {
            let (port, h2, tls_port) = (free_port()?, free_port()?, free_port()?);
            let config = format!(
                r#"global
  nbthread 1
  maxconn {maxconn}

defaults
  mode http
  maxconn {maxconn}
  timeout connect 2s
  timeout client 60s
  timeout server 30s
  timeout http-keep-alive 60s
  option forwardfor

frontend edge
  bind 127.0.0.1:{port}
  bind 127.0.0.1:{h2} proto h2
  bind 127.0.0.1:{tls_port} ssl crt {combined} alpn h2,http/1.1 ssl-min-ver TLSv1.2
  http-request return status 421 unless {{ req.hdr(host),field(1,:) -i {EU_HOST} {US_HOST} }}
  use_backend eu if {{ req.hdr(host),field(1,:) -i {EU_HOST} }}
  use_backend us if {{ req.hdr(host),field(1,:) -i {US_HOST} }}

backend eu
  server eu1 {eu}{eu_tls}

backend us
  server us1 {us}{us_tls}
"#,
                eu = ups.eu,
                us = ups.us,
                eu_tls = if tls_origins {
                    format!(" ssl verify required ca-file {ca} sni str({eu_id}) verifyhost {eu_id} alpn http/1.1")
                } else {
                    String::new()
                },
                us_tls = if tls_origins {
                    format!(" ssl verify required ca-file {ca} sni str({us_id}) verifyhost {us_id} alpn http/1.1")
                } else {
                    String::new()
                },
                // Two descriptors per proxied connection, and some to spare.
                maxconn = (setup.fd_limit.saturating_sub(200) / 2).max(1000),
                combined = setup.tls.combined.display(),
            );
            let version = version_of("haproxy", &["-v"]);
            launch(
                kind,
                setup,
                &dir,
                "haproxy.cfg",
                &config,
                Path::new("haproxy"),
                (port, Some(h2), Some(tls_port)),
                version,
                |command, path| {
                    command.arg("-db").arg("-f").arg(path);
                },
            )
        }
        Kind::Caddy => {
            let (port, tls_port) = (free_port()?, free_port()?);
            // The same routes on the cleartext and the HTTPS site.
            let upstream = |addr: SocketAddr, identity: &str| {
                if tls_origins {
                    format!("reverse_proxy {addr} {{\n      transport http {{\n        tls\n        tls_trusted_ca_certs {ca}\n        tls_server_name {identity}\n      }}\n    }}")
                } else {
                    format!("reverse_proxy {addr}")
                }
            };
            let routes = format!(
                "  @eu host {EU_HOST}\n  @us host {US_HOST}\n  handle @eu {{\n    {eu}\n  }}\n  handle @us {{\n    {us}\n  }}\n  handle {{\n    respond 421\n  }}\n",
                eu = upstream(ups.eu, &eu_id),
                us = upstream(ups.us, &us_id),
            );
            let config = format!(
                r#"{{
  admin off
  auto_https off
  default_sni {EU_HOST}
  servers {{
    protocols h1 h2 h2c
  }}
}}

https://:{tls_port} {{
  bind 127.0.0.1
  tls {cert} {key} {{
    protocols tls1.2 tls1.3
  }}
{routes}}}

http://:{port} {{
  bind 127.0.0.1
{routes}}}
"#,
                cert = setup.tls.cert.display(),
                key = setup.tls.key.display(),
            );
            let version = version_of("caddy", &["version"]);
            launch(
                kind,
                setup,
                &dir,
                "Caddyfile",
                &config,
                Path::new("caddy"),
                (port, Some(port), Some(tls_port)),
                version,
                |command, path| {
                    command
                        .arg("run")
                        .arg("--config")
                        .arg(path)
                        .arg("--adapter")
                        .arg("caddyfile")
                        .env("GOMAXPROCS", "1")
                        .env("HOME", &dir)
                        .env("XDG_DATA_HOME", dir.join("data"))
                        .env("XDG_CONFIG_HOME", dir.join("config"));
                },
            )
        }
    }
}

/// Writes `config` to `dir/file`, starts `program` pinned to the proxies' CPU with the
/// arguments `configure` adds (given the configuration's path), its output in `dir`, and
/// returns it as serving on the loopback ports `(http, h2, tls)`.
#[allow(clippy::too_many_arguments)]
fn launch(
    kind: Kind,
    setup: &Setup<'_>,
    dir: &Path,
    file: &str,
    config: &str,
    program: &Path,
    (http, h2, tls): (u16, Option<u16>, Option<u16>),
    version: String,
    configure: impl FnOnce(&mut Command, &Path),
) -> Result<Running> {
    let path = dir.join(file);
    std::fs::write(&path, config)?;
    let mut command = pinned(setup.cpu, program);
    configure(&mut command, &path);
    let child = spawn(command, dir, kind.name())?;
    Ok(Running {
        kind,
        http: ([127, 0, 0, 1], http).into(),
        h2: h2.map(|port| ([127, 0, 0, 1], port).into()),
        tls: tls.map(|port| ([127, 0, 0, 1], port).into()),
        child: Some(child),
        version,
        tls_origin: None,
    })
}

/// Domicile's bench map: `acme` in `eu`, `globex` in `us`, and [`FILLER_WORKSPACES`] more.
fn write_domicile_map(path: &Path) -> Result<()> {
    let mut text = String::with_capacity(FILLER_WORKSPACES as usize * 64);
    text.push_str("{\"type\":\"map\",\"version\":1}\n");
    text.push_str("{\"type\":\"region\",\"id\":\"eu\",\"jurisdiction\":[\"DE\"]}\n");
    text.push_str("{\"type\":\"region\",\"id\":\"us\",\"jurisdiction\":[\"US\"]}\n");
    text.push_str(
        "{\"type\":\"workspace\",\"id\":\"acme\",\"region\":\"eu\",\"epoch\":1,\"version\":1}\n",
    );
    text.push_str(
        "{\"type\":\"workspace\",\"id\":\"globex\",\"region\":\"us\",\"epoch\":1,\"version\":1}\n",
    );
    for i in 0..FILLER_WORKSPACES {
        let region = if crate::synthetic::home_is_eu(i) {
            "eu"
        } else {
            "us"
        };
        let _ = writeln!(
            text,
            "{{\"type\":\"workspace\",\"id\":\"{}\",\"region\":\"{region}\",\"epoch\":1,\"version\":1}}",
            crate::synthetic::workspace_id(i)
        );
    }
    std::fs::write(path, text)?;
    Ok(())
}

/// The Domicile binary to measure: `--domicile` if given, else a fresh release build of this
/// workspace's `domicile` (built now, so the numbers are for the code checked out).
pub fn domicile_binary(given: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(path) = given {
        if !path.is_file() {
            bail!("--domicile {}: no such file", path.display());
        }
        return Ok(path);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("loadtest has no parent directory")?
        .to_path_buf();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("compare: building domicile (cargo build --release --bin domicile)");
    let status = Command::new(cargo)
        .current_dir(&workspace)
        .args(["build", "--release", "--bin", "domicile"])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --release --bin domicile failed: {status}");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let binary = target.join("release").join("domicile");
    if !binary.is_file() {
        bail!("built domicile, but {} is missing", binary.display());
    }
    Ok(binary)
}
