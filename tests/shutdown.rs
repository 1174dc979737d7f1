//! SIGTERM and SIGINT drain the proxy: it stops accepting at once, idle clients are told 57P01
//! and let go, a client inside a transaction is served until the transaction ends, and after
//! `shutdown_timeout` whoever is left is cut off. The proxy then exits by itself.

mod support;

use std::io::ErrorKind;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::{closed_with, connect, connect_watched, free_port, pg, proxy_config, Proxy};
use tokio::task::JoinHandle;

/// Hang guard for the proxy to exit or a connection to close.
const EXIT_GUARD: Duration = Duration::from_secs(15);

/// Asserts the connection was closed by the server with `FATAL 57P01 admin_shutdown`.
async fn assert_ended_by_admin_shutdown(connection: JoinHandle<Result<(), tokio_postgres::Error>>) {
    assert_eq!(closed_with(connection, EXIT_GUARD).await, "57P01");
}

/// Waits for the proxy to exit and checks it exited cleanly.
fn assert_exits(proxy: &mut Proxy) {
    let status = proxy
        .wait_exit(EXIT_GUARD)
        .unwrap_or_else(|| panic!("proxy did not exit; log:\n{}", proxy.log()));
    assert!(status.success(), "{status}; log:\n{}", proxy.log());
}

/// Waits until the proxy's port refuses TCP connections.
fn wait_refusing(port: u16) {
    let deadline = Instant::now() + EXIT_GUARD;
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => return,
            _ => {
                assert!(
                    Instant::now() < deadline,
                    "the proxy still accepts connections while draining"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A fresh table on the upstream, written by the tests through the proxy.
async fn fresh_table(name: &str) {
    connect(&pg().url("app", "app", "app"))
        .await
        .batch_execute(&format!(
            "drop table if exists {name}; create table {name} (x int)"
        ))
        .await
        .expect("create table");
}

async fn idle_client_is_told_and_proxy_exits(signal: &str) {
    let mut proxy = Proxy::start(&proxy_config(pg(), free_port(), ""));
    let (client, connection) = connect_watched(&proxy.url("app", "app", "app")).await;
    client.simple_query("select 1").await.expect("select 1");

    proxy.signal(signal);
    let mut waiting = tokio::task::spawn_blocking(move || {
        assert_exits(&mut proxy);
        proxy
    });
    assert_ended_by_admin_shutdown(connection).await;
    let _proxy = (&mut waiting).await.expect("proxy exit");
    assert!(client.simple_query("select 1").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_idle_client_with_57p01_and_exits() {
    idle_client_is_told_and_proxy_exits("TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_behaves_like_sigterm() {
    idle_client_is_told_and_proxy_exits("INT").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_open_transaction_commit_then_exits() {
    fresh_table("shutdown_drain_commit").await;
    let mut proxy = Proxy::start(&proxy_config(pg(), free_port(), ""));
    let url = proxy.url("app", "app", "app");
    let (client, connection) = connect_watched(&url).await;
    client
        .batch_execute("begin; insert into shutdown_drain_commit values (1)")
        .await
        .expect("begin and insert");

    proxy.signal("TERM");
    let port = proxy.port();
    tokio::task::spawn_blocking(move || wait_refusing(port))
        .await
        .expect("wait for refusal");
    // New clients are turned away while the transaction is still open...
    assert!(
        tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .is_err(),
        "a new client must be refused during drain"
    );
    // ...and the client inside it is still served.
    client
        .batch_execute("insert into shutdown_drain_commit values (2)")
        .await
        .expect("insert during drain");
    client
        .batch_execute("commit")
        .await
        .expect("commit during drain");

    let mut proxy = tokio::task::spawn_blocking(move || {
        assert_exits(&mut proxy);
        proxy
    })
    .await
    .expect("proxy exit");
    assert_ended_by_admin_shutdown(connection).await;
    assert_eq!(
        pg().psql(
            "app",
            "select string_agg(x::text, ',' order by x) from shutdown_drain_commit"
        ),
        "1,2",
        "the transaction committed during drain is durable; log:\n{}",
        proxy.log()
    );
    assert!(proxy.wait_exit(Duration::ZERO).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_timeout_cuts_off_lingering_transaction() {
    fresh_table("shutdown_cut_off").await;
    let mut proxy = Proxy::start(&proxy_config(
        pg(),
        free_port(),
        "[proxy]\nshutdown_timeout = \"1s\"\n",
    ));
    let (client, connection) = connect_watched(&proxy.url("app", "app", "app")).await;
    client
        .batch_execute("begin; insert into shutdown_cut_off values (1)")
        .await
        .expect("begin and insert");

    // The client never commits.
    proxy.signal("TERM");
    let waiting = tokio::task::spawn_blocking(move || {
        assert_exits(&mut proxy);
        proxy
    });
    assert_ended_by_admin_shutdown(connection).await;
    let _proxy = waiting.await.expect("proxy exit");
    assert!(client.simple_query("select 1").await.is_err());
    assert_eq!(
        pg().psql("app", "select count(*) from shutdown_cut_off"),
        "0",
        "the unfinished transaction is not committed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_endpoint_reports_draining() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut proxy = Proxy::start(&proxy_config(
        pg(),
        free_port(),
        &format!("[metrics]\nlisten = \"{metrics}\"\n"),
    ));
    let addr = metrics.clone();
    let (status, _) = tokio::task::spawn_blocking(move || {
        support::http::wait_http(&addr);
        support::http::http_get(&addr, "/ready")
    })
    .await
    .expect("GET /ready");
    assert_eq!(status, 200);

    // A transaction keeps the proxy draining (not gone) while we look.
    let (client, connection) = connect_watched(&proxy.url("app", "app", "app")).await;
    client.batch_execute("begin").await.expect("begin");
    proxy.signal("TERM");
    let port = proxy.port();
    let addr = metrics.clone();
    let (ready, health) = tokio::task::spawn_blocking(move || {
        wait_refusing(port);
        (
            support::http::http_get(&addr, "/ready"),
            support::http::http_get(&addr, "/health"),
        )
    })
    .await
    .expect("GET /ready and /health");
    assert_eq!(ready.0, 503, "{}", ready.1);
    assert_eq!(health.0, 503, "{}", health.1);
    assert!(health.1.contains("draining"), "{}", health.1);

    client.batch_execute("commit").await.expect("commit");
    tokio::task::spawn_blocking(move || assert_exits(&mut proxy))
        .await
        .expect("proxy exit");
    assert_ended_by_admin_shutdown(connection).await;
}
