//! Test harness: real origins and a real proxy on loopback, port 0, owned by the test.
#![allow(dead_code)]

pub mod cp;
pub mod h2frames;
pub mod scripted;
pub mod tls;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use bytes::Bytes;
use domicile::origin::Origin;
use domicile_proxy::{ProxyConfig, RunningProxy};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const LOOPBACK: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// The demo's four workspaces plus a frozen one and one homed in a region without a route.
pub const MAP: &str = r#"{"type":"map","version":7}
{"type":"region","id":"us","name":"United States","jurisdiction":["US","CA"]}
{"type":"region","id":"eu","name":"European Union","jurisdiction":["DE","FR","SE"]}
{"type":"region","id":"au","name":"Australia","jurisdiction":["AU"]}
{"type":"workspace","id":"acme","region":"us","epoch":3,"version":1}
{"type":"workspace","id":"initech","region":"us","epoch":1,"version":2}
{"type":"workspace","id":"globex","region":"eu","epoch":5,"version":3}
{"type":"workspace","id":"umbrella","region":"eu","epoch":1,"version":4}
{"type":"workspace","id":"hooli","region":"us","state":"frozen","epoch":9,"version":6}
{"type":"workspace","id":"wombat","region":"au","epoch":1,"version":7}
"#;

pub fn geoip_db(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/testdata/geoip")
        .join(name)
}

/// Builds a proxy configuration in a temporary directory.
pub struct ProxyBuilder {
    dir: tempfile::TempDir,
    regions: BTreeMap<String, (Vec<SocketAddr>, String)>,
    sections: Vec<String>,
    identify_extra: String,
    limits: String,
    proxy_extra: String,
    map: Option<String>,
    id: String,
}

pub fn proxy() -> ProxyBuilder {
    ProxyBuilder {
        dir: tempfile::tempdir().expect("tempdir"),
        regions: BTreeMap::new(),
        sections: Vec::new(),
        identify_extra: String::new(),
        limits: String::new(),
        proxy_extra: String::new(),
        map: Some(MAP.to_owned()),
        id: "test-edge".to_owned(),
    }
}

impl ProxyBuilder {
    /// A route for `region` to these origins (fast health checks).
    pub fn route(mut self, region: &str, origins: &[&Origin]) -> Self {
        let addrs = origins.iter().map(|o| o.addr).collect();
        self.regions
            .insert(region.to_owned(), (addrs, String::new()));
        self
    }

    /// A route to raw addresses, with extra TOML lines for the region table.
    pub fn route_addrs(mut self, region: &str, addrs: &[SocketAddr], extra: &str) -> Self {
        self.regions
            .insert(region.to_owned(), (addrs.to_vec(), extra.to_owned()));
        self
    }

    pub fn identify(mut self, extra: &str) -> Self {
        self.identify_extra.push_str(extra);
        self.identify_extra.push('\n');
        self
    }

    pub fn limits(mut self, extra: &str) -> Self {
        self.limits.push_str(extra);
        self.limits.push('\n');
        self
    }

    /// The proxy's id in the fleet (default `test-edge`).
    pub fn id(mut self, id: &str) -> Self {
        self.id = id.to_owned();
        self
    }

    pub fn proxy_section(mut self, extra: &str) -> Self {
        self.proxy_extra.push_str(extra);
        self.proxy_extra.push('\n');
        self
    }

    pub fn map(mut self, map: Option<&str>) -> Self {
        self.map = map.map(str::to_owned);
        self
    }

    pub fn section(mut self, text: &str) -> Self {
        self.sections.push(text.to_owned());
        self
    }

    /// An audit log in `DIR/audit`, signed with a key made for the test (`DIR/audit.key`,
    /// public key `DIR/audit.pub`); `extra` adds lines to the `[audit]` section.
    pub fn audit(self, extra: &str) -> Self {
        domicile_proxy::audit::keys::generate(
            &self.dir.path().join("audit.key"),
            &self.dir.path().join("audit.pub"),
            false,
        )
        .expect("audit key");
        self.section(&format!(
            "[audit]\ndir = \"audit\"\nsigning_key = \"audit.key\"\n{extra}\n"
        ))
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn toml(&self) -> String {
        let mut text = format!(
            "[proxy]\nid = \"{}\"\nedge_region = \"us\"\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\n{}\n",
            self.id, self.proxy_extra
        );
        if self.map.is_some() {
            text.push_str("[map]\nfile = \"map.jsonl\"\n\n");
        }
        text.push_str(&format!(
            "[identify]\nrules = [\n  {{ from = \"host\", pattern = \"{{workspace}}.localhost\" }},\n  {{ from = \"header\", name = \"x-workspace-id\" }},\n  {{ from = \"path\", pattern = \"/w/{{workspace}}/\" }},\n  {{ from = \"query\", name = \"workspace\" }},\n]\n{}\n",
            self.identify_extra
        ));
        text.push_str(&format!("[limits]\n{}\n", self.limits));
        for (region, (addrs, extra)) in &self.regions {
            let endpoints: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
            // Fast health checks unless the test sets its own.
            let health = if extra.contains("health") {
                ""
            } else {
                "health = { interval = \"100ms\", timeout = \"500ms\" }\n"
            };
            text.push_str(&format!(
                "[regions.{region}]\nendpoints = [{}]\n{health}{extra}\n",
                endpoints.join(", ")
            ));
        }
        for section in &self.sections {
            text.push_str(section);
            text.push('\n');
        }
        text
    }

    /// Writes the config (and map) and returns the config path; the directory lives as long
    /// as the returned guard.
    pub fn write(self) -> (PathBuf, tempfile::TempDir) {
        if let Some(map) = &self.map {
            std::fs::write(self.dir.path().join("map.jsonl"), map).expect("write map");
        }
        let path = self.dir.path().join("proxy.toml");
        std::fs::write(&path, self.toml()).expect("write config");
        (path, self.dir)
    }

    pub async fn start(self) -> TestProxy {
        let (path, dir) = self.write();
        let config = ProxyConfig::from_file(&path).unwrap_or_else(|e| panic!("config: {e}"));
        let running = domicile_proxy::start(config).await.expect("proxy starts");
        TestProxy { running, dir }
    }
}

pub struct TestProxy {
    pub running: RunningProxy,
    pub dir: tempfile::TempDir,
}

impl TestProxy {
    pub fn addr(&self) -> SocketAddr {
        self.running.addr
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.running.addr, path)
    }

    /// Waits until the proxy holds `n` client connections.
    pub async fn wait_for_connections(&self, n: u64) {
        let engine = self.running.engine.clone();
        let held = eventually(Duration::from_secs(5), || {
            engine
                .metrics
                .connections_active
                .load(std::sync::atomic::Ordering::Relaxed)
                == n
        })
        .await;
        assert!(held, "the proxy never held {n} connections");
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.running.admin_addr.expect("admin"), path)
    }
}

/// Origins for `us` and `eu` and a proxy routing to both, with the standard test map.
pub async fn two_regions() -> (Origin, Origin, TestProxy) {
    let us = origin("us").await;
    let eu = origin("eu").await;
    let proxy = proxy()
        .route("us", &[&us])
        .route("eu", &[&eu])
        .start()
        .await;
    (us, eu, proxy)
}

pub type BodySender =
    tokio::sync::mpsc::Sender<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>;
pub type PendingResponse = tokio::task::JoinHandle<
    Result<Response<hyper::body::Incoming>, hyper_util::client::legacy::Error>,
>;

/// Starts a POST for `workspace` whose body is sent, frame by frame, through the returned sender;
/// dropping the sender ends the body.
pub fn streaming_post(url: &str, workspace: &str) -> (BodySender, PendingResponse) {
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let body =
        http_body_util::StreamBody::new(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)));
    let client: Client<_, http_body_util::StreamBody<_>> =
        Client::builder(TokioExecutor::new()).build_http();
    let request = Request::post(url)
        .header("x-workspace-id", workspace)
        .body(body)
        .expect("request");
    (tx, tokio::spawn(client.request(request)))
}

pub async fn origin(region: &str) -> Origin {
    Origin::start(region, LOOPBACK)
        .await
        .expect("origin starts")
}

/// A full response: status, headers, body.
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn refusal(&self) -> Option<&str> {
        self.headers
            .get("x-domicile-refusal")
            .and_then(|v| v.to_str().ok())
    }

    /// The region of the origin that answered.
    pub fn region(&self) -> String {
        self.json()["region"].as_str().unwrap_or("").to_owned()
    }
}

pub async fn send(request: Request<Full<Bytes>>) -> Reply {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    collect(client.request(request).await.expect("request")).await
}

pub async fn send_h2(request: Request<Full<Bytes>>) -> Reply {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    collect(client.request(request).await.expect("request")).await
}

pub async fn collect(response: Response<hyper::body::Incoming>) -> Reply {
    let (parts, body) = response.into_parts();
    Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: body.collect().await.expect("body").to_bytes(),
    }
}

/// A GET with optional headers.
pub async fn get(url: &str, headers: &[(&str, &str)]) -> Reply {
    let mut builder = Request::get(url);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    send(builder.body(Full::new(Bytes::new())).unwrap()).await
}

pub async fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &'static [u8],
) -> Reply {
    let mut builder = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    send(builder.body(Full::new(Bytes::from_static(body))).unwrap()).await
}

/// Sends raw bytes and reads until the server closes or `wait` passes; returns what came back.
pub async fn raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The status code of the first response in a raw HTTP/1.1 answer.
pub fn raw_status(answer: &str) -> Option<u16> {
    answer.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// Polls `check` every 20 ms until it holds or `within` passes.
pub async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `domicile` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_domicile");

/// A child process killed when the test ends, however it ends.
pub struct Owned(pub Child);

impl Drop for Owned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Owned {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        for _ in 0..200 {
            if let Ok(Some(status)) = self.0.try_wait() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("process did not exit after SIGTERM");
    }
}

/// Reads the child's stdout until a line containing `marker`; returns that line.
pub fn wait_for_line(child: &mut Child, marker: &str) -> (String, Vec<String>) {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut lines = Vec::new();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no line with {marker:?}; got {lines:#?}"));
        lines.push(line.clone());
        if line.contains(marker) {
            // Drain the rest of a multi-line banner without blocking.
            std::thread::sleep(Duration::from_millis(50));
            lines.extend(rx.try_iter());
            return (line, lines);
        }
    }
}

pub fn addr_after(line: &str, prefix: &str) -> SocketAddr {
    let start = line
        .find(prefix)
        .unwrap_or_else(|| panic!("{prefix} in {line}"))
        + prefix.len();
    let rest = &line[start..];
    let end = rest
        .find(|c: char| c.is_whitespace() || c == ')')
        .unwrap_or(rest.len());
    rest[..end]
        .parse()
        .unwrap_or_else(|e| panic!("{e}: {line}"))
}
