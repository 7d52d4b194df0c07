//! `domicile`: the data-residency routing edge's one command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use domicile::admin::{
    self, AuditCommand, Connection, FleetCommand, MoveCommand, RegionCommand, TokenCommand,
    WorkspaceCommand,
};
use domicile::audit;
use domicile::demo::{self, DemoOptions};
use domicile_control_plane::ControlPlaneConfig;
use domicile_proxy::ProxyConfig;

#[derive(Debug, Parser)]
#[command(
    name = "domicile",
    version,
    about = "Data-residency routing edge: every workspace's requests go to its home region and nowhere else"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "DOMICILE_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run demo origins for regions us and eu and a proxy in front of them, on loopback.
    Demo {
        /// Where the demo writes its configuration and map.
        #[arg(long, default_value = "./domicile-demo")]
        data_dir: PathBuf,
        /// Proxy address for client traffic.
        #[arg(long, default_value = "127.0.0.1:8080")]
        http: SocketAddr,
        /// Proxy address for HTTPS client traffic (certificates in DATA_DIR/certs/).
        #[arg(long, default_value = "127.0.0.1:8443")]
        https: SocketAddr,
        /// Admin address (/healthz, /readyz, /metrics).
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: SocketAddr,
        /// Control-plane address (the admin API).
        #[arg(long, default_value = "127.0.0.1:7700")]
        control_plane: SocketAddr,
    },
    /// Run the control plane: the map's store, the admin API, the change feed, the fleet.
    ControlPlane {
        /// Configuration (TOML); every setting has a default.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Address of the admin API (default 127.0.0.1:7700).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// sqlite://PATH or postgres://... (default sqlite://domicile.db).
        #[arg(long, env = "DOMICILE_STORE", hide_env_values = true)]
        store: Option<String>,
        /// On first start, create an admin token and write it to this file.
        #[arg(long)]
        admin_token_file: Option<PathBuf>,
        /// Serve the API over HTTPS with this certificate chain (PEM), with --tls-key.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The private key of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Accept client certificates from this CA (mTLS): their urn:domicile:<role>:<name>
        /// grants the role, as a token would.
        #[arg(long, requires = "tls_cert")]
        client_ca: Option<PathBuf>,
    },
    /// Regions of the map (control-plane API).
    Region {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        command: RegionCommand,
    },
    /// Workspaces of the map (control-plane API).
    Workspace {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        command: WorkspaceCommand,
    },
    /// The proxies following the map, and how far each has got.
    Fleet {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        command: Option<FleetCommand>,
    },
    /// Move a workspace to another region with zero misrouted requests (control-plane API).
    Move {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        command: MoveCommand,
    },
    /// Audit: the proxy's routing audit log (keygen, verify, report) and the control plane's
    /// admin trail.
    Audit {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// API tokens (admin only).
    Token {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Run the proxy (data plane).
    Proxy {
        /// Proxy configuration (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// TLS certificates: `certs dev` writes a development CA and every certificate a deployment
    /// uses.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Check a proxy configuration and report every problem in it.
    CheckConfig {
        /// Proxy configuration (TOML).
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Write a development CA and, signed by it, the edge certificate, each region's origin
    /// certificate, each proxy's client certificate and the control plane's certificate.
    Dev {
        /// Directory to write into (created if missing).
        dir: PathBuf,
        /// DNS domain of the names: edge `*.DOMAIN`, origins `REGION.region.DOMAIN`.
        #[arg(long, default_value = "example.test")]
        domain: String,
        /// Regions to issue origin certificates for (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "us,eu")]
        regions: Vec<String>,
        /// Proxy ids to issue client certificates for (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "edge-1")]
        proxies: Vec<String>,
        /// More names for the edge certificate (comma-separated), such as `acme.localhost`:
        /// clients do not accept `*.localhost` for it.
        #[arg(long, value_delimiter = ',')]
        edge_names: Vec<String>,
        /// Days the certificates are valid.
        #[arg(long, default_value_t = 365)]
        days: u64,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DOMICILE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// mimalloc instead of the system allocator: the request path allocates and frees small objects
/// (header maps, futures, buffers) on one thread at a time, which is its strength; see
/// docs/benchmarks.md for what it bought.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Certs {
            command:
                CertsCommand::Dev {
                    dir,
                    domain,
                    regions,
                    proxies,
                    edge_names,
                    days,
                    force,
                },
        } => {
            let options = domicile_certs::dev::DevOptions {
                domain,
                regions,
                proxies,
                edge_names,
                days,
                force,
            };
            match domicile_certs::dev::generate(&dir, &options) {
                Ok(files) => {
                    for file in files {
                        println!("wrote {}", file.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::CheckConfig { file } => match domicile_proxy::check_config(&file) {
            Ok(config) => {
                println!(
                    "{}: ok ({} region route{}, {} identification rule{}, map {})",
                    file.display(),
                    config.regions.len(),
                    if config.regions.len() == 1 { "" } else { "s" },
                    config.identify.rules.len(),
                    if config.identify.rules.len() == 1 {
                        ""
                    } else {
                        "s"
                    },
                    match (&config.control_plane, &config.map.file) {
                        (Some(cp), _) => format!("from the control plane at {}", cp.url),
                        (None, Some(path)) => path.display().to_string(),
                        (None, None) => "none".to_owned(),
                    },
                );
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{}: {errors}", file.display());
                ExitCode::from(2)
            }
        },
        command => {
            // The proxy serves client traffic on its own worker threads (`proxy.workers`), one
            // single-threaded runtime each; this runtime only runs the admin listener, health
            // checks and map reloads, so one thread is enough.
            let workers = match command {
                Command::Proxy { .. } => 1,
                _ => std::thread::available_parallelism().map_or(1, |n| n.get()),
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(run(command)) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    let done = |result: anyhow::Result<()>| result.map(|()| ExitCode::SUCCESS);
    match command {
        Command::Demo {
            data_dir,
            http,
            https,
            admin,
            control_plane,
        } => done(
            demo::run(
                DemoOptions {
                    data_dir,
                    http,
                    https,
                    admin,
                    control_plane,
                },
                shutdown_signal(),
            )
            .await,
        ),
        Command::Proxy { config } => done(run_proxy(domicile_proxy::check_config(&config)?).await),
        Command::ControlPlane {
            config,
            listen,
            store,
            admin_token_file,
            tls_cert,
            tls_key,
            client_ca,
        } => {
            let mut config = match config {
                Some(path) => ControlPlaneConfig::from_file(&path)?,
                None => ControlPlaneConfig::default(),
            };
            if let Some(listen) = listen {
                config.listen = listen;
            }
            if let Some(store) = store {
                config.store = store;
            }
            if let Some(path) = admin_token_file {
                config.admin_token_file = Some(path);
            }
            if let (Some(cert), Some(key)) = (tls_cert, tls_key) {
                config.tls = Some(domicile_control_plane::config::TlsConfig {
                    cert,
                    key,
                    client_ca,
                });
            }
            config.validate()?;
            done(run_control_plane(config).await)
        }
        Command::Region { conn, command } => done(admin::region(&conn, command).await),
        Command::Workspace { conn, command } => done(admin::workspace(&conn, command).await),
        Command::Fleet {
            conn,
            command: None,
        } => done(admin::fleet(&conn).await),
        Command::Fleet {
            conn,
            command: Some(FleetCommand::Remove { proxy_id }),
        } => done(admin::fleet_remove(&conn, &proxy_id).await),
        Command::Move { conn, command } => done(admin::moves(&conn, command).await),
        Command::Audit { conn, command } => match command {
            AuditCommand::Keygen { key, public, force } => audit::keygen(&key, &public, force),
            AuditCommand::Verify {
                dir,
                key,
                checkpoint,
            } => audit::verify(&dir, &key, checkpoint.as_deref(), conn.json).await,
            AuditCommand::Report {
                dir,
                from,
                to,
                key,
                html,
            } => {
                audit::report(
                    &conn,
                    &dir,
                    from.as_deref(),
                    to.as_deref(),
                    key.as_deref(),
                    html.as_deref(),
                )
                .await
            }
            AuditCommand::Admin {
                workspace,
                since,
                until,
                limit,
                all,
            } => done(admin::audit_admin(&conn, workspace, since, until, limit, all).await),
        },
        Command::Token { conn, command } => done(admin::token(&conn, command).await),
        Command::CheckConfig { .. } | Command::Certs { .. } => {
            unreachable!("handled before the runtime starts")
        }
    }
}

async fn run_control_plane(config: ControlPlaneConfig) -> anyhow::Result<()> {
    let running = domicile_control_plane::start(config.clone()).await?;
    if let (Some(path), Some(_)) = (&config.admin_token_file, &running.bootstrap_token) {
        eprintln!("created the first admin token in {}", path.display());
    }
    // One machine-readable line for scripts and tests that bind port 0.
    println!(
        "domicile control plane listening on {}://{} store {} epoch {}",
        running.scheme,
        running.addr,
        running.store.backend_name(),
        running.store.epoch()
    );
    shutdown_signal().await;
    tracing::info!("signal received: stopping");
    running.shutdown().await;
    Ok(())
}

async fn run_proxy(config: ProxyConfig) -> anyhow::Result<()> {
    let proxy = domicile_proxy::start(config).await?;
    // One machine-readable line for scripts and tests that bind port 0.
    println!(
        "domicile proxy listening on http://{} admin {} https {}",
        proxy.addr,
        proxy
            .admin_addr
            .map_or_else(|| "none".to_owned(), |a| format!("http://{a}")),
        proxy
            .tls_addr
            .map_or_else(|| "none".to_owned(), |a| format!("https://{a}"))
    );
    shutdown_signal().await;
    tracing::info!("signal received: draining");
    let left = proxy.shutdown().await;
    if left > 0 {
        tracing::warn!(
            left,
            "connections were still open at the end of the grace period"
        );
    }
    Ok(())
}
