//! The HTTP endpoint on `metrics.listen` (or `--metrics-listen`): Prometheus text on `/metrics`
//! with client and pool figures, `/health` (200 ok, or 503 degraded naming the unreachable
//! upstream) and `/ready`.

mod support;

use support::http::{http_get, wait_http};
use support::{connect, free_port, pg, proxy_config, PgOptions, PgServer, Proxy};

/// A proxy in front of `server` with its metrics endpoint; returns it and the endpoint address.
fn start_with_metrics(server: &PgServer, extra: &str) -> (Proxy, String) {
    let metrics = format!("127.0.0.1:{}", free_port());
    let proxy = Proxy::start(&proxy_config(
        server,
        free_port(),
        &format!("[metrics]\nlisten = \"{metrics}\"\n{extra}"),
    ));
    wait_http(&metrics);
    (proxy, metrics)
}

/// GET on the metrics endpoint from a blocking thread (the proxy is another process).
async fn get(addr: &str, path: &'static str) -> (u16, String) {
    let addr = addr.to_string();
    tokio::task::spawn_blocking(move || http_get(&addr, path))
        .await
        .expect("HTTP GET task")
}

/// Value of the sample whose line starts with `series` (a name, or a name with labels) followed
/// by a space; `None` when there is no such sample.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Value of the sample of `name` whose labels include every one of `labels` (`key="value"`).
fn labelled_sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix('{')?;
        let (set, value) = rest.split_once("} ")?;
        let pairs: Vec<&str> = set.split(',').collect();
        labels
            .iter()
            .all(|want| pairs.contains(want))
            .then(|| value.trim().parse().ok())
            .flatten()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_clients_and_pool_connections() {
    let (proxy, metrics) = start_with_metrics(pg(), "");
    let (status, text) = get(&metrics, "/metrics").await;
    assert_eq!(status, 200, "{text}");
    let before = sample(&text, "pgcache_clients_accepted_total")
        .unwrap_or_else(|| panic!("no pgcache_clients_accepted_total in:\n{text}"));

    let url = proxy.url("app", "app", "app");
    let mut clients = Vec::new();
    for _ in 0..3 {
        let client = connect(&url).await;
        client.simple_query("select 1").await.expect("select 1");
        clients.push(client);
    }
    let (status, text) = get(&metrics, "/metrics").await;
    assert_eq!(status, 200, "{text}");
    let after = sample(&text, "pgcache_clients_accepted_total")
        .unwrap_or_else(|| panic!("no pgcache_clients_accepted_total in:\n{text}"));
    assert!(after >= before + 3.0, "{before} -> {after}");
    assert!(after >= 3.0, "{after}");
    // Session pooling: three connected clients hold three server connections.
    let active = labelled_sample(
        &text,
        "pgcache_server_connections",
        &["pool=\"app/app\"", "state=\"active\""],
    )
    .unwrap_or_else(|| panic!("no active server connections for app/app in:\n{text}"));
    assert!(active >= 3.0, "{active}\n{text}");
    assert!(
        text.contains("# TYPE pgcache_clients_accepted_total counter"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_ready_are_ok_with_upstream_up() {
    let (_proxy, metrics) = start_with_metrics(pg(), "");
    let (status, body) = get(&metrics, "/health").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"status\":\"ok\""), "{body}");
    let (status, body) = get(&metrics, "/ready").await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_degraded_naming_a_stopped_upstream() {
    let server = tokio::task::spawn_blocking(|| PgServer::start_new(PgOptions::default()))
        .await
        .expect("start private PostgreSQL");
    let (_proxy, metrics) = start_with_metrics(&server, "");
    let (status, body) = get(&metrics, "/health").await;
    assert_eq!(status, 200, "{body}");

    let server = tokio::task::spawn_blocking(move || {
        server.stop();
        server
    })
    .await
    .expect("stop private PostgreSQL");
    let (status, body) = get(&metrics, "/health").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("degraded"), "{body}");
    assert!(
        body.contains(&format!("127.0.0.1:{}", server.port)),
        "{body}"
    );

    // Back to ok once the upstream is back.
    let _server = tokio::task::spawn_blocking(move || {
        server.start();
        server
    })
    .await
    .expect("restart private PostgreSQL");
    let (status, body) = get(&metrics, "/health").await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_listen_flag_serves_metrics_in_quick_mode() {
    let listen = format!("127.0.0.1:{}", free_port());
    let metrics = format!("127.0.0.1:{}", free_port());
    let upstream = format!("postgres://app:app@127.0.0.1:{}/app", pg().port);
    let proxy = Proxy::start_args(&[
        "--listen",
        &listen,
        "--upstream",
        &upstream,
        "--metrics-listen",
        &metrics,
    ]);
    let client = connect(&proxy.url("app", "", "app")).await;
    client.simple_query("select 1").await.expect("select 1");
    let addr = metrics.clone();
    tokio::task::spawn_blocking(move || wait_http(&addr))
        .await
        .expect("wait for metrics endpoint");
    let (status, text) = get(&metrics, "/metrics").await;
    assert_eq!(status, 200, "{text}");
    let accepted = sample(&text, "pgcache_clients_accepted_total")
        .unwrap_or_else(|| panic!("no pgcache_clients_accepted_total in:\n{text}"));
    assert!(accepted >= 1.0, "{text}");
    let (status, body) = get(&metrics, "/health").await;
    assert_eq!(status, 200, "{body}");
}
