//! Every Prometheus metric the proxy exports, defined in one place with its help text. Code
//! elsewhere calls the typed handles on `METRICS`; labels are fixed sets, never user input.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use std::sync::LazyLock;

pub struct Metrics {
    pub registry: Registry,
    /// Clients accepted (TCP).
    pub clients_accepted: IntCounter,
    /// Clients connected now, by state (`login`, `active`).
    pub clients: IntGaugeVec,
    /// Idle clients without a task (`session::park`), and how often one parked.
    pub clients_parked: IntGauge,
    pub client_parks: IntCounter,
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
    /// Entries found stale (a relation they read was written) at lookup, and dropped.
    pub cache_stale_dropped: IntCounter,
    /// Entries found past their TTL at lookup, and dropped.
    pub cache_expired: IntCounter,
    /// Results stored in the shared tier.
    pub cache_l2_fills: IntCounter,
    /// Entries held now.
    pub cache_entries: IntGauge,
    /// Bytes held now.
    pub cache_bytes: IntGauge,
    /// Invalidations by source (`write`, `ddl`, `explicit`).
    pub cache_invalidations: IntCounterVec,
    /// Statements finished (`pgcache_queries_total`), by protocol (`simple`, `extended`) and
    /// outcome (`ok`, `error`, `cached`), pre-made: `[protocol][outcome]`.
    pub query_counts: [[IntCounter; 3]; 2],
    /// Statement time as the proxy saw it (`pgcache_query_duration_seconds`), by source,
    /// pre-made: `[upstream, cache]`.
    pub query_seconds: [Histogram; 2],
    /// Statements that failed, by SQLSTATE class (two characters).
    pub query_errors: IntCounterVec,
    /// Bytes read from and written to clients.
    pub client_bytes_received: IntCounter,
    pub client_bytes_sent: IntCounter,
    /// Time clients waited for a server connection.
    pub pool_acquire_wait: Histogram,
    /// `pool.max_size` per pool, sampled at scrape time (utilisation = active / this).
    pub pool_max_connections: IntGaugeVec,
    /// Statements over `slow_query.threshold`.
    pub slow_queries: IntCounter,
    /// Slow statements not written to the log (rate limit, or the writer behind).
    pub slow_log_dropped: IntCounter,
    /// `EXPLAIN`s of slow statements, by outcome (`ok`, `error`).
    pub explains: IntCounterVec,
    /// Sessions that ran one fingerprint `insight.repeat_threshold` times in a row.
    pub repeated_runs: IntCounter,
    /// Fingerprints tracked now.
    pub fingerprints: IntGauge,
    /// 1 while the change stream is following its slot.
    pub replication_up: IntGauge,
    /// Bytes of WAL the server had sent beyond what the change stream applied, last seen.
    pub replication_lag_bytes: IntGauge,
    /// Committed transactions the change stream applied (bumped).
    pub replication_transactions: IntCounter,
    /// From a transaction's commit on the server to its bump here.
    pub replication_delay: Histogram,
    /// 1 while Redis (the shared tier) answers and the bump subscription is up.
    pub redis_up: IntGauge,
    /// Redis calls not made or failed, by reason (`open` circuit, `error`).
    pub redis_fallbacks: IntCounterVec,
    /// From a peer's bump being sent to it being applied here.
    pub redis_propagation: Histogram,
    /// Bumps Redis did not take before their writer was answered (retried in the background).
    pub redis_bumps_missed: IntCounter,
    /// Results answered from / not found in the shared tier.
    pub cache_l2_hits: IntCounter,
    pub cache_l2_misses: IntCounter,
}

/// Index into `Metrics::query_counts`.
pub const SIMPLE: usize = 0;
pub const EXTENDED: usize = 1;
pub const OK: usize = 0;
pub const ERROR: usize = 1;
pub const CACHED: usize = 2;

/// Seconds, from 100 µs (a cache hit) to 30 s.
fn seconds(name: &str, help: &str) -> HistogramOpts {
    HistogramOpts::new(name, help).buckets(vec![
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0, 30.0,
    ])
}

fn histogram(r: &Registry, name: &str, help: &str) -> Histogram {
    let h = Histogram::with_opts(seconds(name, help)).expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

fn histogram_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let h = HistogramVec::new(seconds(name, help), labels).expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
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
    let queries = counter_vec(
        &r,
        "pgcache_queries_total",
        "Statements finished, by protocol and outcome",
        &["protocol", "outcome"],
    );
    let query_counts = ["simple", "extended"]
        .map(|p| ["ok", "error", "cached"].map(|o| queries.with_label_values(&[p, o])));
    let query_duration = histogram_vec(
        &r,
        "pgcache_query_duration_seconds",
        "Statement time from the proxy sending it to its last reply, by source",
        &["source"],
    );
    let query_seconds = ["upstream", "cache"].map(|s| query_duration.with_label_values(&[s]));
    let explains = counter_vec(
        &r,
        "pgcache_explains_total",
        "EXPLAINs of slow statements, by outcome",
        &["outcome"],
    );
    for o in ["ok", "error"] {
        explains.with_label_values(&[o]);
    }
    let pool_acquire_wait = histogram(
        &r,
        "pgcache_pool_acquire_wait_seconds",
        "Time clients waited for a server connection",
    );
    Metrics {
        query_counts,
        query_seconds,
        explains,
        pool_acquire_wait,
        query_errors: counter_vec(
            &r,
            "pgcache_query_errors_total",
            "Statements that failed, by SQLSTATE class",
            &["class"],
        ),
        client_bytes_received: counter(
            &r,
            "pgcache_client_bytes_received_total",
            "Bytes read from clients",
        ),
        client_bytes_sent: counter(
            &r,
            "pgcache_client_bytes_sent_total",
            "Bytes written to clients",
        ),
        pool_max_connections: gauge_vec(
            &r,
            "pgcache_pool_max_connections",
            "pool.max_size per pool",
            &["pool"],
        ),
        slow_queries: counter(
            &r,
            "pgcache_slow_queries_total",
            "Statements slower than slow_query.threshold",
        ),
        slow_log_dropped: counter(
            &r,
            "pgcache_slow_log_dropped_total",
            "Slow statements not written to the slow log (rate limit or backlog)",
        ),
        repeated_runs: counter(
            &r,
            "pgcache_repeated_statement_runs_total",
            "Sessions that ran one statement insight.repeat_threshold times in a row",
        ),
        fingerprints: gauge(&r, "pgcache_fingerprints", "Fingerprints tracked"),
        redis_up: gauge(
            &r,
            "pgcache_redis_up",
            "1 while Redis answers and the bump subscription is up",
        ),
        redis_fallbacks: {
            let c = counter_vec(
                &r,
                "pgcache_redis_fallbacks_total",
                "Redis calls skipped (open circuit) or failed; the proxy went on without Redis",
                &["reason"],
            );
            for reason in ["open", "error"] {
                c.with_label_values(&[reason]);
            }
            c
        },
        redis_propagation: histogram(
            &r,
            "pgcache_redis_propagation_seconds",
            "From a peer proxy sending a bump to it being applied here",
        ),
        redis_bumps_missed: counter(
            &r,
            "pgcache_redis_bumps_missed_total",
            "Bumps Redis did not take in time (bump_timeout, or circuit open): until the retry lands, other proxies may serve what they invalidated",
        ),
        cache_l2_hits: counter(
            &r,
            "pgcache_cache_l2_hits_total",
            "Reads answered from the shared tier (Redis)",
        ),
        cache_l2_misses: counter(
            &r,
            "pgcache_cache_l2_misses_total",
            "Reads looked up in the shared tier and not found fresh there",
        ),
        replication_up: gauge(
            &r,
            "pgcache_replication_up",
            "1 while the change stream follows its replication slot",
        ),
        replication_lag_bytes: gauge(
            &r,
            "pgcache_replication_lag_bytes",
            "WAL bytes sent by the server beyond what the change stream applied",
        ),
        replication_transactions: counter(
            &r,
            "pgcache_replication_transactions_total",
            "Committed transactions whose changes the change stream applied",
        ),
        replication_delay: histogram(
            &r,
            "pgcache_replication_delay_seconds",
            "From a commit on the server to its invalidation here",
        ),
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
            "Entries found stale (a relation they read was written) at lookup and dropped",
        ),
        cache_expired: counter(
            &r,
            "pgcache_cache_expired_total",
            "Entries found past their TTL at lookup and dropped",
        ),
        cache_l2_fills: counter(
            &r,
            "pgcache_cache_l2_fills_total",
            "Results stored in the shared tier (Redis)",
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
        clients_parked: gauge(
            &r,
            "pgcache_clients_parked",
            "Idle clients parked without a task",
        ),
        client_parks: counter(
            &r,
            "pgcache_client_parks_total",
            "Times an idle client parked",
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
