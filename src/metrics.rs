//! Every Prometheus metric the proxy exports, defined in one place with its help text. Code
//! elsewhere calls the typed handles on `METRICS`; labels are fixed sets, never user input.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use std::sync::LazyLock;

pub struct Metrics {
    pub registry: Registry,
    /// Clients accepted (TCP).
    pub clients_accepted: IntCounter,
    /// Clients connected now, by state (`login`, `active`).
    pub clients: IntGaugeVec,
    /// Authentication failures by method.
    pub auth_failures: IntCounterVec,
    /// Failed attempts to open an upstream connection.
    pub upstream_connect_errors: IntCounter,
    /// Clients turned away because their pool stayed full for `acquire_timeout`.
    pub pool_acquire_timeouts: IntCounter,
    /// Server connections per pool and state (`active`, `idle`), sampled at scrape time.
    pub server_connections: IntGaugeVec,
    /// TLS handshakes by side (`client`, `upstream`) and outcome (`ok`, `error`).
    pub tls_handshakes: IntCounterVec,
    /// Clients disconnected for malformed messages.
    pub protocol_errors: IntCounter,
    /// Cancel requests forwarded upstream.
    pub cancels_forwarded: IntCounter,
    /// 1 while the proxy is draining for shutdown.
    pub draining: IntGauge,
    /// Reads answered from the cache.
    pub cache_hits: IntCounter,
    /// Cacheable reads that went upstream.
    pub cache_misses: IntCounter,
    /// Results stored.
    pub cache_fills: IntCounter,
    /// Results not stored, by reason (`too_large`, `error`, `notice`, `disconnect`).
    pub cache_fill_skips: IntCounterVec,
    /// Entries pushed out by the entry or byte bound.
    pub cache_evictions: IntCounter,
    /// Entries found stale (a relation they read was written) or expired, and dropped.
    pub cache_stale_dropped: IntCounter,
    /// Entries held now.
    pub cache_entries: IntGauge,
    /// Bytes held now.
    pub cache_bytes: IntGauge,
    /// Invalidations by source (`write`, `ddl`, `explicit`).
    pub cache_invalidations: IntCounterVec,
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let r = Registry::new();
    Metrics {
        draining: gauge(
            &r,
            "pgcache_draining",
            "1 while the proxy is draining for shutdown",
        ),
        cache_hits: counter(
            &r,
            "pgcache_cache_hits_total",
            "Reads answered from the cache",
        ),
        cache_misses: counter(
            &r,
            "pgcache_cache_misses_total",
            "Cacheable reads that went upstream",
        ),
        cache_fills: counter(
            &r,
            "pgcache_cache_fills_total",
            "Results stored in the cache",
        ),
        cache_fill_skips: counter_vec(
            &r,
            "pgcache_cache_fill_skips_total",
            "Cacheable results not stored, by reason",
            &["reason"],
        ),
        cache_evictions: counter(
            &r,
            "pgcache_cache_evictions_total",
            "Entries pushed out by cache.max_entries or cache.max_bytes",
        ),
        cache_stale_dropped: counter(
            &r,
            "pgcache_cache_stale_dropped_total",
            "Entries found stale or expired at lookup and dropped",
        ),
        cache_entries: gauge(&r, "pgcache_cache_entries", "Entries in the cache"),
        cache_bytes: gauge(&r, "pgcache_cache_bytes", "Bytes held by the cache"),
        cache_invalidations: counter_vec(
            &r,
            "pgcache_cache_invalidations_total",
            "Version bumps and explicit invalidations, by source",
            &["source"],
        ),
        clients_accepted: counter(
            &r,
            "pgcache_clients_accepted_total",
            "Client TCP connections accepted",
        ),
        clients: gauge_vec(
            &r,
            "pgcache_client_connections",
            "Client connections by state",
            &["state"],
        ),
        auth_failures: counter_vec(
            &r,
            "pgcache_auth_failures_total",
            "Client authentication failures",
            &["method"],
        ),
        upstream_connect_errors: counter(
            &r,
            "pgcache_upstream_connect_errors_total",
            "Failed attempts to open an upstream connection",
        ),
        pool_acquire_timeouts: counter(
            &r,
            "pgcache_pool_acquire_timeouts_total",
            "Clients refused because their pool stayed full for acquire_timeout",
        ),
        server_connections: gauge_vec(
            &r,
            "pgcache_server_connections",
            "Upstream connections per pool and state",
            &["pool", "state"],
        ),
        tls_handshakes: counter_vec(
            &r,
            "pgcache_tls_handshakes_total",
            "TLS handshakes",
            &["side", "outcome"],
        ),
        protocol_errors: counter(
            &r,
            "pgcache_client_protocol_errors_total",
            "Clients disconnected for malformed messages",
        ),
        cancels_forwarded: counter(
            &r,
            "pgcache_cancel_requests_total",
            "Cancel requests forwarded upstream",
        ),
        registry: r,
    }
});

/// Decrements a client-state gauge when dropped, so every exit path is counted.
pub struct ClientGauge(&'static str);

impl ClientGauge {
    pub fn enter(state: &'static str) -> Self {
        METRICS.clients.with_label_values(&[state]).inc();
        ClientGauge(state)
    }
}

impl Drop for ClientGauge {
    fn drop(&mut self) {
        METRICS.clients.with_label_values(&[self.0]).dec();
    }
}
