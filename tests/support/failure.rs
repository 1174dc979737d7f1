//! Helpers for the failure tests (`tests/failures.rs`, `tests/upstream_failures.rs`): hang guards,
//! a health check of the proxy process, and reading the FATAL a client gets before it is closed.

use super::raw::{self, RawConn};
use super::{connect, Proxy};
use std::time::Duration;

/// Hang guard for whole operations (never a performance expectation).
pub const GUARD: Duration = Duration::from_secs(120);

pub async fn guard<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(GUARD, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer after {GUARD:?} (hang)"))
}

/// `select 1` through `url` works.
pub async fn works(url: &str) {
    let client = guard("connect", connect(url)).await;
    let one: i32 = guard("select 1", client.query_one("select 1", &[]))
        .await
        .expect("select 1")
        .get(0);
    assert_eq!(one, 1);
}

pub fn assert_proxy_healthy(proxy: &mut Proxy) {
    assert!(
        proxy.wait_exit(Duration::ZERO).is_none(),
        "the proxy exited; log:\n{}",
        proxy.log()
    );
    let log = proxy.log();
    assert!(!log.contains("panicked"), "the proxy panicked; log:\n{log}");
}

/// Reads the FATAL error a client is sent before the proxy closes it; returns its fields.
pub async fn fatal_then_close(conn: &mut RawConn) -> Vec<(u8, String)> {
    let msgs = conn.until_closed().await;
    let errors: Vec<_> = msgs.iter().filter(|(t, _)| *t == b'E').collect();
    assert_eq!(
        errors.len(),
        1,
        "one ErrorResponse before close; got {}",
        raw::tags(&msgs)
    );
    assert_eq!(
        msgs.last().map(|m| m.0),
        Some(b'E'),
        "the error is the last message"
    );
    raw::fields(&errors[0].1)
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

pub fn field(fields: &[(u8, String)], code: u8) -> Option<&str> {
    fields
        .iter()
        .find(|(c, _)| *c == code)
        .map(|(_, v)| v.as_str())
}
