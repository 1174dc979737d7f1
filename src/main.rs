//! `pgcache`: command line, configuration, signals and wiring of the parts.
//!
//! `pgcache --config proxy.toml` runs the proxy; `pgcache check --config proxy.toml` validates a
//! configuration; `--listen`/`--upstream` give a quick start without a file and override it.

mod admin;
mod analysis;
mod auth;
mod config;
mod error;
mod listener;
mod metrics;
mod pool;
mod session;
mod shutdown;
mod stream;
mod tls;
mod wire;

use anyhow::Context;
use clap::{Parser, Subcommand};
use config::{Config, ConfigError, Problem, UpstreamTlsMode};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser, Debug)]
#[command(
    name = "pgcache",
    version,
    about = "A transparent caching proxy for PostgreSQL"
)]
struct Cli {
    /// Configuration file (proxy.toml).
    #[arg(long, short = 'c', global = true)]
    config: Option<PathBuf>,
    /// Address to accept clients on (repeatable); overrides proxy.listen.
    #[arg(long)]
    listen: Vec<String>,
    /// Upstream server as a URL: postgres://user:password@host:port/database?sslmode=require
    #[arg(long)]
    upstream: Option<String>,
    /// Address of the HTTP metrics endpoint; overrides metrics.listen.
    #[arg(long)]
    metrics_listen: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate the configuration and exit: 0 when it is valid, 2 with every problem otherwise.
    Check,
    /// Run the proxy (the default).
    Run,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = match load(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprint!("{e}");
            return ExitCode::from(2);
        }
    };
    if matches!(cli.command, Some(Command::Check)) {
        println!("configuration is valid");
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgcache: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The file (or defaults), then command-line overrides, then validation of the result.
fn load(cli: &Cli) -> Result<Config, ConfigError> {
    let mut config = match &cli.config {
        Some(path) => config::load_file(path)?,
        None => config::load_str("", "defaults", std::env::vars())?,
    };
    let origin = "command line".to_string();
    if !cli.listen.is_empty() {
        config.proxy.listen = cli.listen.clone();
    }
    if let Some(m) = &cli.metrics_listen {
        config.metrics.listen = Some(m.clone());
    }
    if let Some(u) = &cli.upstream {
        apply_upstream_url(&mut config, u).map_err(|message| ConfigError {
            origin: origin.clone(),
            problems: vec![Problem {
                key: "--upstream".into(),
                line: None,
                message,
            }],
        })?;
    }
    let problems = config::validate(&config);
    if problems.is_empty() {
        Ok(config)
    } else {
        let origin = cli
            .config
            .as_ref()
            .map(|p| format!("{} with command-line flags", p.display()))
            .unwrap_or(origin);
        Err(ConfigError { origin, problems })
    }
}

fn apply_upstream_url(config: &mut Config, raw: &str) -> Result<(), String> {
    let url = url::Url::parse(raw).map_err(|e| format!("{raw:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Err(format!(
            "scheme must be postgres://, not {}://",
            url.scheme()
        ));
    }
    let decode = |s: &str| {
        url::form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    let up = &mut config.upstream;
    if let Some(host) = url.host_str() {
        up.host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
    }
    if let Some(port) = url.port() {
        up.port = port;
    }
    if !url.username().is_empty() {
        up.user = Some(decode(url.username()));
    }
    if let Some(p) = url.password() {
        up.password = Some(decode(p));
    }
    let db = url.path().trim_start_matches('/');
    if !db.is_empty() {
        up.database = Some(decode(db));
    }
    for (k, v) in url.query_pairs() {
        match (k.as_ref(), v.as_ref()) {
            ("sslmode", "disable") => up.tls.mode = UpstreamTlsMode::Disable,
            ("sslmode", "prefer" | "allow") => up.tls.mode = UpstreamTlsMode::Prefer,
            ("sslmode", "require" | "verify-ca") => up.tls.mode = UpstreamTlsMode::Require,
            ("sslmode", "verify-full") => up.tls.mode = UpstreamTlsMode::VerifyFull,
            ("sslrootcert", f) => up.tls.ca_file = Some(f.to_string()),
            (k, v) => return Err(format!("unsupported URL parameter {k}={v}")),
        }
    }
    Ok(())
}

async fn run(config: Config) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let tls = tls::acceptor(&config.tls).context("client TLS (tls.*)")?;
    let connector =
        tls::connector(&config.upstream.tls).context("upstream TLS (upstream.tls.*)")?;
    let target = pool::upstream::Target {
        host: config.upstream.host.clone(),
        port: config.upstream.port,
        tls_mode: config.upstream.tls.mode,
        tls: match connector {
            Some(c) => Some((
                c,
                tls::server_name(&config.upstream.tls, &config.upstream.host)?,
            )),
            None => None,
        },
        connect_timeout: config.upstream.connect_timeout,
        max_message: config.proxy.max_message_bytes,
        max_prepared: config.pool.max_prepared_statements,
    };
    let mut listeners = Vec::new();
    for addr in &config.proxy.listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (proxy.listen)"))?;
        tracing::info!(%addr, "accepting clients");
        listeners.push(l);
    }
    let (trigger, shutdown) = shutdown::channel();
    let max_clients = config.proxy.max_clients;
    let shared = Arc::new(listener::Shared {
        users: arc_swap::ArcSwap::from_pointee(auth::Users::from_config(&config)),
        analyzer: analysis::Analyzer::new(10_000),
        pools: pool::Pools::new(config.clone(), target),
        tls,
        cancels: Default::default(),
        clients: Arc::new(tokio::sync::Semaphore::new(max_clients)),
        shutdown,
        config: arc_swap::ArcSwap::new(config.clone()),
    });
    tracing::info!(upstream = %shared.pools.target().addr(), "pgcache started");
    if let Some(addr) = &config.metrics.listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (metrics.listen)"))?;
        tracing::info!(%addr, "serving /metrics and /health");
        tokio::spawn(admin::http::serve(l, shared.clone()));
    }
    let serving = tokio::spawn(listener::serve(shared.clone(), listeners));

    wait_for_signal().await?;
    tracing::info!(timeout = ?config.shutdown_timeout(), "shutting down: no new clients; draining sessions");
    trigger.set(shutdown::Phase::Drain);
    metrics::METRICS.draining.set(1);
    let _ = serving.await;
    let all = u32::try_from(max_clients).unwrap_or(u32::MAX);
    let drained =
        tokio::time::timeout(config.shutdown_timeout(), shared.clients.acquire_many(all)).await;
    if drained.is_err() {
        tracing::warn!("shutdown_timeout reached: closing the remaining sessions");
        trigger.set(shutdown::Phase::Force);
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            shared.clients.acquire_many(all),
        )
        .await;
    }
    tracing::info!("pgcache stopped");
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    Ok(())
}

impl Config {
    fn shutdown_timeout(&self) -> std::time::Duration {
        self.proxy.shutdown_timeout
    }
}
