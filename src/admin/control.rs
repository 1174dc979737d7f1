//! Operating the running proxy: reload the configuration, pause and resume, shut down. Used by
//! the admin console and by signals (SIGHUP reloads).

use crate::auth::Users;
use crate::config::{Config, ConfigError};
use crate::listener::Shared;
use crate::shutdown::Phase;
use std::sync::Arc;
use std::time::Duration;

/// Re-read the configuration sources and apply what can change live. Returns the notes a user
/// should see: settings that changed but need a restart (their old values stay in force).
pub fn reload(shared: &Shared) -> Result<Vec<String>, ConfigError> {
    let mut new = shared.source.load()?;
    // Certificate and key are read again even when their paths did not change (a renewed
    // certificate is usually written over the old one); unreadable, nothing changes.
    let acceptor = crate::tls::acceptor(&new.tls).map_err(|e| tls_error(shared, &new, e))?;
    let old = shared.config.load_full();
    let mut notes = Vec::new();
    let mut keep = |what: &str, changed: bool| {
        if changed {
            notes.push(format!("{what} changed; it takes effect after a restart"));
        }
    };
    keep("proxy.listen", new.proxy.listen != old.proxy.listen);
    keep("metrics.listen", new.metrics.listen != old.metrics.listen);
    keep(
        "upstream host, port or tls",
        new.upstream.host != old.upstream.host
            || new.upstream.port != old.upstream.port
            || new.upstream.tls != old.upstream.tls,
    );
    keep(
        "proxy.worker_threads",
        new.proxy.worker_threads != old.proxy.worker_threads,
    );
    keep(
        "proxy.max_clients",
        new.proxy.max_clients != old.proxy.max_clients,
    );
    keep("cache.enabled", new.cache.enabled != old.cache.enabled);
    keep("[cache.redis]", new.cache.redis != old.cache.redis);
    keep(
        "pool.max_prepared_statements",
        new.pool.max_prepared_statements != old.pool.max_prepared_statements,
    );
    // What is not live stays as it is in force, so SHOW CONFIG tells the truth.
    new.proxy.listen = old.proxy.listen.clone();
    new.proxy.max_clients = old.proxy.max_clients;
    new.proxy.worker_threads = old.proxy.worker_threads;
    new.metrics.listen = old.metrics.listen.clone();
    new.upstream.host = old.upstream.host.clone();
    new.upstream.port = old.upstream.port;
    new.upstream.tls = old.upstream.tls.clone();
    new.pool.max_prepared_statements = old.pool.max_prepared_statements;
    new.cache.enabled = old.cache.enabled;
    new.cache.redis = old.cache.redis.clone();
    shared.tls.store(acceptor.map(Arc::new));
    apply(shared, Arc::new(new));
    for n in &notes {
        tracing::warn!("reload: {n}");
    }
    tracing::info!("configuration reloaded");
    Ok(notes)
}

/// A client TLS file that cannot be used, as a configuration problem naming its key.
fn tls_error(shared: &Shared, c: &Config, e: crate::tls::TlsSetupError) -> ConfigError {
    let key = match &e {
        crate::tls::TlsSetupError::Read { path, .. }
        | crate::tls::TlsSetupError::Empty { path, .. }
            if c.tls.key_file.as_deref() == Some(path.as_str()) =>
        {
            "tls.key_file"
        }
        crate::tls::TlsSetupError::Rustls(_) => "tls",
        _ => "tls.cert_file",
    };
    ConfigError {
        origin: shared
            .source
            .path
            .as_ref()
            .map_or("command line".into(), |p| p.display().to_string()),
        problems: vec![crate::config::Problem {
            key: key.into(),
            line: None,
            message: e.to_string(),
        }],
    }
}

fn apply(shared: &Shared, config: Arc<Config>) {
    shared.users.store(Arc::new(Users::from_config(&config)));
    shared.pools.reload(config.clone());
    shared.cache.reload(&config.cache);
    shared.set_config(config);
}

/// Hold new transactions; return once no client holds a server connection (or `limit` passed:
/// `Err` with how many still do; the proxy stays paused).
pub async fn pause(shared: &Shared, limit: Duration) -> Result<(), usize> {
    shared.paused.send_replace(true);
    tracing::info!("paused: holding new transactions");
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let busy = shared
            .registry
            .clients()
            .iter()
            .filter(|c| c.state() == "active")
            .count();
        if busy == 0 {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(busy);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn resume(shared: &Shared) {
    shared.paused.send_replace(false);
    tracing::info!("resumed");
}

/// Wait while the proxy is paused.
pub async fn wait_unpaused(shared: &Shared) {
    let mut rx = shared.paused.subscribe();
    while *rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

pub fn shutdown(shared: &Shared) {
    tracing::info!("shutdown requested from the admin console");
    shared.shut_down(Phase::Drain);
}
