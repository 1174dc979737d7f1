//! Integration-test harness: real PostgreSQL servers and the `pgcache` binary under test.
//!
//! Every test binary says `mod support;`. The map:
//! - `postgres.rs`: `pg()` is one shared PostgreSQL per test binary on a free loopback port (roles
//!   `app`/`md5user`/`trustuser`/`other`, database `app`); `PgServer::start_new` starts a private one
//!   (restartable, optionally TLS). Each runs under a watchdog that stops it when the test process ends.
//! - `proxy.rs`: `Proxy` runs the `pgcache` binary with a config (`proxy_config`) or CLI flags.
//! - `tls.rs`: a throwaway CA and server certificate, and a TLS relay (a man in the middle).
//! - `cache.rs`: a proxy with the result cache on, tables, direct writes, cache figures.
//! - `redis.rs`: a real redis-server that can be killed and started again.
//! - here: ports, URLs, and `tokio_postgres` clients.
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod cache;
pub mod failure;
pub mod http;
mod postgres;
pub mod protocol;
mod proxy;
pub mod raw;
pub mod redis;
mod tls;

#[allow(unused_imports)]
pub use postgres::{pg, pg_bin, PgOptions, PgServer, ROLES};
#[allow(unused_imports)]
pub use proxy::{merge, proxy_config, run_check, Proxy};
#[allow(unused_imports)]
pub use tls::{make_tls_files, tls_relay, TlsFiles};

use std::net::TcpListener;
use std::process::Command;

/// A free loopback TCP port (bound, released: another process could take it, rarely). Taken
/// below the kernel's ephemeral range (32768+), where outgoing connections get their source
/// ports, so a port handed out here is not also some client socket's by the time it is bound;
/// each test process starts its walk of 20000..32000 at its own place.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7919) % 12_000;
    for _ in 0..12_000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + ((start + n) % 12_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 for a free port");
    listener.local_addr().expect("local_addr of probe").port()
}

/// `tokio_postgres` client (NoTls) with its connection task spawned; panics if it cannot connect.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    try_connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e:?}"))
}

/// Like `connect`, but returns the error (for authentication-failure tests).
pub async fn try_connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A client and its connection task, whose result says how the proxy ended the connection.
pub async fn connect_watched(
    url: &str,
) -> (
    tokio_postgres::Client,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e:?}"));
    (client, tokio::spawn(connection))
}

/// The ErrorResponse that refuses a connection to `url`; panics with `why` (what getting in would
/// mean) if the connection succeeds, and when the failure is not an ErrorResponse.
pub async fn refused(url: &str, why: &str) -> tokio_postgres::error::DbError {
    match try_connect(url).await {
        Ok(_) => panic!("{why}"),
        Err(e) => e
            .as_db_error()
            .cloned()
            .unwrap_or_else(|| panic!("expected an ErrorResponse, got {e:?}")),
    }
}

/// The SQLSTATE of the FATAL error the proxy closed a watched connection with; panics when the
/// connection is still open after `guard`, or ended another way.
pub async fn closed_with(
    connection: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    guard: std::time::Duration,
) -> String {
    let result = tokio::time::timeout(guard, connection)
        .await
        .expect("connection still open (hang guard)")
        .expect("connection task");
    let e = result.expect_err("the proxy ends the connection with an error");
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("expected a FATAL error, got {e:?}"));
    assert_eq!(db.severity(), "FATAL", "{db:?}");
    db.code().code().to_string()
}

/// `postgres://user:password@127.0.0.1:port/db` (no password part when `password` is empty).
pub fn url(port: u16, user: &str, password: &str, db: &str) -> String {
    if password.is_empty() {
        format!("postgres://{user}@127.0.0.1:{port}/{db}")
    } else {
        format!("postgres://{user}:{password}@127.0.0.1:{port}/{db}")
    }
}

/// Run a spawned-ready `cmd` (stdin closed, output captured) under a hang guard of `limit`.
pub fn output_within(cmd: &mut Command, limit: std::time::Duration) -> std::process::Output {
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait().expect("poll child").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("{cmd:?} hung for {limit:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().expect("child output")
}

/// stdout then stderr, as text.
pub fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Run pgbench with `args` against `url` (password `app`); panics unless it exits 0. Returns its
/// output.
pub fn pgbench(url: &str, args: &[&str]) -> String {
    let out = output_within(
        Command::new(pg_bin("pgbench"))
            .args(args)
            .arg(url)
            .env("PGPASSWORD", "app")
            .env("PGSSLMODE", "disable"),
        std::time::Duration::from_secs(300),
    );
    let text = output_text(&out);
    assert!(
        out.status.success(),
        "pgbench {args:?} failed ({}):
{text}",
        out.status
    );
    text
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
