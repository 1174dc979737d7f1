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

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let r = Registry::new();
    let draining = IntGauge::new(
        "pgcache_draining",
        "1 while the proxy is draining for shutdown",
    )
    .expect("valid metric");
    r.register(Box::new(draining.clone()))
        .expect("unique metric");
    Metrics {
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
        draining,
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
