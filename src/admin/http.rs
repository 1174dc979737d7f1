//! The HTTP endpoint on `metrics.listen`: `/metrics` (Prometheus text format), `/health` (JSON,
//! `ok` or `degraded` with reasons; 200 or 503) and `/ready` (200 while accepting clients, 503 while
//! draining). A deliberately small HTTP/1.1 server: one GET per connection, then close.

use crate::listener::Shared;
use crate::metrics::METRICS;
use crate::shutdown::Phase;
use prometheus::Encoder;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.reached(Phase::Force) => return,
        };
        let Ok((tcp, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), handle(tcp, shared)).await;
        });
    }
}

async fn handle(mut tcp: TcpStream, shared: Arc<Shared>) -> std::io::Result<()> {
    let mut req = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tcp.read(&mut chunk).await?;
        if n == 0 || req.len() > 16 * 1024 {
            return Ok(());
        }
        req.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&req);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    let (status, ctype, body) = match (method, path) {
        ("GET", "/cache") => (
            "200 OK",
            "application/json",
            super::cache::figures_json(&shared),
        ),
        ("POST", "/cache/invalidate") => invalidate(&shared, query),
        ("GET", "/queries") => queries(&shared, query),
        ("GET", "/slow") => {
            let limit = param(query, "limit")
                .and_then(|n| n.parse().ok())
                .unwrap_or(100);
            let body = serde_json::Value::from(super::insight::slow(&shared, limit));
            ("200 OK", "application/json", format!("{body}\n"))
        }
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", metrics_text(&shared)),
        ("GET", "/health") => {
            let (ok, body) = health(&shared).await;
            (
                if ok {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                },
                "application/json",
                body,
            )
        }
        ("GET", "/ready") => {
            if shared.shutdown.phase() == Phase::Running {
                ("200 OK", "text/plain", "ready\n".to_string())
            } else {
                (
                    "503 Service Unavailable",
                    "text/plain",
                    "draining\n".to_string(),
                )
            }
        }
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET, and POST to /cache/invalidate\n".to_string(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await?;
    tcp.write_all(body.as_bytes()).await?;
    tcp.shutdown().await
}

/// `POST /cache/invalidate?table=orders` (or `pattern=`, `key=`, `fingerprint=`, `all=1`).
fn invalidate(shared: &Shared, query: &str) -> (&'static str, &'static str, String) {
    let mut pairs = url::form_urlencoded::parse(query.as_bytes());
    let target = match pairs.next() {
        Some((k, _)) if k == "all" => super::cache::Target::parse("ALL", None),
        Some((k, v)) => super::cache::Target::parse(&k, Some(&v)),
        None => {
            Err("say what to invalidate: ?table=, ?pattern=, ?key=, ?fingerprint= or ?all=1".into())
        }
    };
    match target {
        Ok(t) => {
            let n = super::cache::invalidate(shared, &t);
            (
                "200 OK",
                "application/json",
                format!("{{\"invalidated\":{n}}}\n"),
            )
        }
        Err(e) => (
            "400 Bad Request",
            "application/json",
            format!("{{\"error\":{}}}\n", json_string(&e)),
        ),
    }
}

fn param(query: &str, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// `GET /queries?sort=total&limit=50`: per-fingerprint statistics as JSON.
fn queries(shared: &Shared, query: &str) -> (&'static str, &'static str, String) {
    let sort = param(query, "sort").unwrap_or_else(|| "total".into());
    let limit = param(query, "limit")
        .and_then(|n| n.parse().ok())
        .unwrap_or(100);
    if !crate::insight::stats::SORT_KEYS.contains(&sort.as_str()) {
        let e = format!(
            "unknown sort {sort:?}: use one of {}",
            crate::insight::stats::SORT_KEYS.join(", ")
        );
        return (
            "400 Bad Request",
            "application/json",
            format!("{{\"error\":{}}}\n", json_string(&e)),
        );
    }
    let rows: Vec<serde_json::Value> = super::insight::queries(shared, &sort, limit)
        .iter()
        .map(super::insight::query_json)
        .collect();
    let body = serde_json::Value::from(rows);
    ("200 OK", "application/json", format!("{body}\n"))
}

fn metrics_text(shared: &Shared) -> String {
    // Scrape-time gauges are reset and refilled: two scrapes at once must not see each other's
    // half-filled state.
    static SCRAPE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = SCRAPE.lock().unwrap_or_else(|p| p.into_inner());
    let m = &METRICS;
    m.server_connections.reset();
    m.pool_max_connections.reset();
    m.fingerprints.set(shared.insight.stats.len() as i64);
    let config = shared.config();
    for (key, total, idle) in shared.pools.stats() {
        let pool = key.to_string();
        m.pool_max_connections
            .with_label_values(&[pool.as_str()])
            .set(i64::from(config.pool_size(&key.database, &key.user)));
        m.server_connections
            .with_label_values(&[pool.as_str(), "idle"])
            .set(idle as i64);
        m.server_connections
            .with_label_values(&[pool.as_str(), "active"])
            .set(total.saturating_sub(idle) as i64);
    }
    let mut out = Vec::new();
    if let Err(e) = prometheus::TextEncoder::new().encode(&m.registry.gather(), &mut out) {
        tracing::error!(error = %e, "encoding metrics");
    }
    String::from_utf8(out).unwrap_or_default()
}

/// Degraded when the upstream does not accept TCP connections or the proxy is draining.
async fn health(shared: &Shared) -> (bool, String) {
    let mut reasons = Vec::new();
    let target = shared.pools.target();
    let addr = target.addr();
    let probe = tokio::time::timeout(
        Duration::from_secs(2),
        TcpStream::connect((target.host.as_str(), target.port)),
    )
    .await;
    match probe {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => reasons.push(format!("upstream {addr} unreachable: {e}")),
        Err(_) => reasons.push(format!("upstream {addr} did not answer within 2s")),
    }
    if shared.shutdown.phase() != Phase::Running {
        reasons.push("draining for shutdown".to_string());
    }
    if shared.cache.tier.as_ref().is_some_and(|t| !t.is_up()) {
        reasons.push("redis (cache.redis) unavailable: serving without the shared tier".into());
    }
    if shared.config().invalidation.replication.enabled
        && crate::metrics::METRICS.replication_up.get() != 1
    {
        reasons
            .push("the change stream (invalidation.replication) is not following its slot".into());
    }
    let config = shared.config();
    let limit = config.metrics.health_pool_utilisation;
    for (key, total, idle) in shared.pools.stats() {
        let max = config.pool_size(&key.database, &key.user).max(1);
        let busy = f64::from(total.saturating_sub(idle)) / f64::from(max);
        if busy > limit {
            reasons.push(format!(
                "pool {key}: {} of {max} server connections busy (over metrics.health_pool_utilisation = {limit})",
                total.saturating_sub(idle)
            ));
        }
    }
    let ok = reasons.is_empty();
    let reasons: Vec<String> = reasons.iter().map(|r| json_string(r)).collect();
    let body = format!(
        "{{\"status\":\"{}\",\"reasons\":[{}]}}\n",
        if ok { "ok" } else { "degraded" },
        reasons.join(",")
    );
    (ok, body)
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_json() {
        assert_eq!(super::json_string("a\"b\\\n"), "\"a\\\"b\\\\\\u000a\"");
    }
}
