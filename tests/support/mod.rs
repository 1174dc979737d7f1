//! Integration-test harness: real PostgreSQL servers and the `pgcache` binary under test.
//!
//! Every test binary says `mod support;`. The map:
//! - `postgres.rs`: `pg()` is one shared PostgreSQL per test binary on a free loopback port (roles
//!   `app`/`md5user`/`trustuser`/`other`, database `app`); `PgServer::start_new` starts a private one
//!   (restartable, optionally TLS). Each runs under a watchdog that stops it when the test process ends.
//! - `proxy.rs`: `Proxy` runs the `pgcache` binary with a config (`proxy_config`) or CLI flags.
//! - `tls.rs`: a throwaway CA and server certificate.
//! - here: ports, URLs, and `tokio_postgres` clients.
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod http;
mod postgres;
mod proxy;
pub mod raw;
mod tls;

#[allow(unused_imports)]
pub use postgres::{pg, pg_bin, PgOptions, PgServer, ROLES};
#[allow(unused_imports)]
pub use proxy::{proxy_config, run_check, Proxy};
#[allow(unused_imports)]
pub use tls::{make_tls_files, TlsFiles};

use std::net::TcpListener;
use std::process::Command;

/// A free loopback TCP port (bound, read, released: another process could take it, rarely).
pub fn free_port() -> u16 {
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

/// `postgres://user:password@127.0.0.1:port/db` (no password part when `password` is empty).
pub fn url(port: u16, user: &str, password: &str, db: &str) -> String {
    if password.is_empty() {
        format!("postgres://{user}@127.0.0.1:{port}/{db}")
    } else {
        format!("postgres://{user}:{password}@127.0.0.1:{port}/{db}")
    }
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
