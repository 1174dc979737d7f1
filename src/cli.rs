//! The command line: `pgcache --config proxy.toml` runs the proxy; `pgcache check --config
//! proxy.toml` validates a configuration; `--listen`/`--upstream` (and `--pool-mode`,
//! `--pool-size`, `--metrics-listen`) give a quick start without a file and override it. Owns
//! signals and the wiring of the parts; `src/main.rs` only calls [`main`].

use crate::config::{Config, Overrides, PoolMode, Source};
use crate::{
    admin, analysis, auth, cache, insight, listener, metrics, pool, probe, session, shutdown, tls,
};
use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
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
    /// Pool mode; overrides pool.mode.
    #[arg(long, value_enum)]
    pool_mode: Option<CliPoolMode>,
    /// Server connections per pool; overrides pool.max_size.
    #[arg(long)]
    pool_size: Option<u32>,
    /// Turn the result cache on with one rule caching every table (default TTL).
    #[arg(long)]
    cache_all: bool,
    /// Invalidate from PostgreSQL's change stream (logical replication slot and publication
    /// `pgcache`, created when missing): writes that bypass the proxy are seen too.
    #[arg(long)]
    wal_invalidation: bool,
    /// Share cached results and invalidations with other proxies through this Redis
    /// (`redis://host:port`).
    #[arg(long)]
    redis: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum CliPoolMode {
    Session,
    Transaction,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate the configuration and exit: 0 when it is valid, 2 with every problem otherwise.
    /// With `invalidation.replication` on, also asks the upstream whether it can stream changes.
    Check {
        /// Only the file: do not connect to the upstream.
        #[arg(long)]
        offline: bool,
    },
    /// Run the proxy (the default).
    Run,
    /// GET a URL of the metrics endpoint (container health checks): exit 0 on HTTP 200.
    Health {
        #[arg(long, default_value = "http://127.0.0.1:9930/health")]
        url: String,
    },
}

/// Parse the command line and do what it says; the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Health { url }) = &cli.command {
        return match probe::run(url) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(1)
            }
        };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let source = Source {
        path: cli.config.clone(),
        overrides: Overrides {
            listen: cli.listen.clone(),
            upstream: cli.upstream.clone(),
            metrics_listen: cli.metrics_listen.clone(),
            pool_mode: cli.pool_mode.map(|m| match m {
                CliPoolMode::Session => PoolMode::Session,
                CliPoolMode::Transaction => PoolMode::Transaction,
            }),
            pool_size: cli.pool_size,
            cache_all: cli.cache_all,
            wal_invalidation: cli.wal_invalidation,
            redis: cli.redis.clone(),
        },
    };
    let config = match source.load() {
        Ok(c) => c,
        Err(e) => {
            eprint!("{e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::Check { offline }) = cli.command {
        if config.invalidation.replication.enabled && !offline {
            return check_upstream(config);
        }
        println!("configuration is valid");
        return ExitCode::SUCCESS;
    }
    let runtime = match runtime(config.proxy.worker_threads).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config, source)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgcache: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config, source: Source) -> anyhow::Result<()> {
    // Before anything listens: a signal that arrives early must not find the default action.
    let signals = Signals::new()?;
    let config = Arc::new(config);
    let tls = tls::acceptor(&config.tls).context("client TLS (tls.*)")?;
    let target = upstream_target(&config)?;
    // The metrics endpoint is up before clients are accepted: whoever sees the proxy port open
    // can scrape it.
    let metrics_listener = match &config.metrics.listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (metrics.listen)"))?,
        ),
        None => None,
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
    let registry = Arc::new(admin::registry::Registry::default());
    let shared = Arc::new(listener::Shared {
        users: arc_swap::ArcSwap::from_pointee(auth::Users::from_config(&config)),
        analyzer: analysis::Analyzer::new(10_000),
        cache: cache::Cache::new(&config.cache),
        insight: Default::default(),
        pools: pool::Pools::new(config.clone(), target, registry.clone()),
        tls: arc_swap::ArcSwapOption::from(tls.map(Arc::new)),
        cancels: Default::default(),
        clients: Arc::new(tokio::sync::Semaphore::new(max_clients)),
        registry,
        parking: Arc::new(
            session::park::Lot::new().context("cannot create the idle clients' poller")?,
        ),
        shutdown,
        trigger,
        paused: tokio::sync::watch::Sender::new(false),
        source,
        config: arc_swap::ArcSwap::new(config.clone()),
        config_generation: Default::default(),
    });
    if let Some(l) = metrics_listener {
        tracing::info!(addr = ?l.local_addr().ok(), "serving /metrics and /health");
        tokio::spawn(admin::http::serve(l, shared.clone()));
    }
    tokio::spawn(cache::warm::run(shared.clone()));
    tokio::spawn(insight::slow::run(shared.clone()));
    tokio::spawn(cache::stream::run(shared.clone()));
    tokio::spawn(cache::tier::follow(shared.clone()));
    tokio::spawn(session::park::run(shared.clone()));
    let threads = tokio::runtime::Handle::current().metrics().num_workers();
    tracing::info!(upstream = %shared.pools.target().addr(), threads, "pgcache started");
    let serving = tokio::spawn(listener::serve(shared.clone(), listeners));

    signals.wait_for_stop(&shared).await;
    let timeout = shared.config().proxy.shutdown_timeout;
    tracing::info!(?timeout, "shutting down: no new clients; draining sessions");
    shared.shut_down(shutdown::Phase::Drain);
    metrics::METRICS.draining.set(1);
    admin::control::resume(&shared);
    let _ = serving.await;
    let all = u32::try_from(max_clients).unwrap_or(u32::MAX);
    let drained = tokio::time::timeout(timeout, shared.clients.acquire_many(all)).await;
    if drained.is_err() {
        tracing::warn!("shutdown_timeout reached: closing the remaining sessions");
        shared.shut_down(shutdown::Phase::Force);
        let grace = std::time::Duration::from_secs(2);
        let _ = tokio::time::timeout(grace, shared.clients.acquire_many(all)).await;
    }
    tracing::info!("pgcache stopped");
    Ok(())
}

/// Where and how to reach the upstream, from the configuration.
fn upstream_target(config: &Config) -> anyhow::Result<pool::upstream::Target> {
    let connector =
        tls::connector(&config.upstream.tls).context("upstream TLS (upstream.tls.*)")?;
    Ok(pool::upstream::Target {
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
        channel_binding: config.upstream.tls.channel_binding,
        connect_timeout: config.upstream.connect_timeout,
        max_message: config.proxy.max_message_bytes,
        max_prepared: config.pool.max_prepared_statements,
    })
}

/// `pgcache check` with the change stream on: can the upstream stream to us? Problems are
/// printed with what to do.
fn check_upstream(config: Config) -> ExitCode {
    let run = async {
        let config = Arc::new(config);
        let target = upstream_target(&config)?;
        let registry = Arc::new(admin::registry::Registry::default());
        let pools = pool::Pools::new(config.clone(), target, registry);
        anyhow::Ok(cache::stream::check(&pools, &config).await)
    };
    let problems = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run))
    {
        Ok(p) => p,
        Err(e) => vec![format!("{e:#}")],
    };
    if problems.is_empty() {
        println!(
            "configuration is valid; the upstream can stream changes (invalidation.replication)"
        );
        return ExitCode::SUCCESS;
    }
    eprintln!(
        "configuration is valid, but the change stream (invalidation.replication) cannot run:"
    );
    for p in problems {
        eprintln!("  {p}");
    }
    ExitCode::from(2)
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("SIGHUP handler")?,
        })
    }

    /// Until SIGTERM, SIGINT or the admin console's SHUTDOWN; SIGHUP reloads the configuration.
    async fn wait_for_stop(mut self, shared: &listener::Shared) {
        let mut stop = shared.shutdown.clone();
        loop {
            tokio::select! {
                _ = self.term.recv() => return tracing::info!("SIGTERM received"),
                _ = self.int.recv() => return tracing::info!("SIGINT received"),
                _ = stop.reached(shutdown::Phase::Drain) => return,
                _ = self.hup.recv() => {
                    tracing::info!("SIGHUP received: reloading the configuration");
                    if let Err(e) = admin::control::reload(shared) {
                        tracing::error!("configuration not reloaded:\n{e}");
                    }
                }
            }
        }
    }
}

/// `proxy.worker_threads`: 1 is tokio's current-thread runtime (every task on the main
/// thread), anything else a work-stealing runtime with that many workers (0: one per core).
fn runtime(threads: usize) -> tokio::runtime::Builder {
    match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    }
}
