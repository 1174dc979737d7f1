//! The admin console: `psql -d pgcache -U <admin user>` reaches the proxy itself instead of a
//! server. Simple queries only; every result is a table of text columns, as psql expects.
//!
//! Commands: `SHOW POOLS | CLIENTS | SERVERS | DATABASES | CONFIG | STATS | CACHE | QUERIES |
//! SLOW | HELP`, `INVALIDATE ...`, `RESET QUERIES`, `RELOAD`, `PAUSE`, `RESUME`, `SHUTDOWN`.

use super::control;
use super::registry::PoolStats;
use crate::error::{sqlstate, PgError};
use crate::listener::Shared;
use crate::stream::Stream;
use crate::wire;
use bytes::BytesMut;
use pgwire::messages::response::NoticeResponse;
use pgwire::messages::startup::{Authentication, BackendKeyData, ParameterStatus, SecretKey};
use pgwire::messages::PgWireBackendMessage;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::AsyncWriteExt;

/// The database name that selects the console.
pub const DATABASE: &str = "pgcache";

/// A result: column names and rows of text (None = NULL).
struct Table {
    columns: Vec<&'static str>,
    rows: Vec<Vec<Option<String>>>,
}

impl Table {
    fn new(columns: &[&'static str]) -> Self {
        Table {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, values: Vec<String>) {
        self.rows.push(values.into_iter().map(Some).collect());
    }

    fn encode(&self, out: &mut BytesMut) {
        let mut desc = Vec::new();
        desc.extend_from_slice(&(self.columns.len() as i16).to_be_bytes());
        for c in &self.columns {
            desc.extend_from_slice(c.as_bytes());
            desc.push(0);
            desc.extend_from_slice(&0i32.to_be_bytes()); // table oid
            desc.extend_from_slice(&0i16.to_be_bytes()); // column number
            desc.extend_from_slice(&25i32.to_be_bytes()); // text
            desc.extend_from_slice(&(-1i16).to_be_bytes());
            desc.extend_from_slice(&(-1i32).to_be_bytes());
            desc.extend_from_slice(&0i16.to_be_bytes());
        }
        wire::frame(b'T', &[&desc], out);
        for r in &self.rows {
            let mut row = Vec::new();
            row.extend_from_slice(&(r.len() as i16).to_be_bytes());
            for v in r {
                match v {
                    Some(v) => {
                        row.extend_from_slice(&(v.len() as i32).to_be_bytes());
                        row.extend_from_slice(v.as_bytes());
                    }
                    None => row.extend_from_slice(&(-1i32).to_be_bytes()),
                }
            }
            wire::frame(b'D', &[&row], out);
        }
        command_complete(&format!("SHOW {}", self.rows.len()), out);
    }
}

fn command_complete(tag: &str, out: &mut BytesMut) {
    wire::frame(b'C', &[tag.as_bytes(), b"\0"], out);
}

fn notice(text: &str, out: &mut BytesMut) {
    let fields = vec![
        (b'S', "NOTICE".to_string()),
        (b'V', "NOTICE".to_string()),
        (b'C', "00000".to_string()),
        (b'M', text.to_string()),
    ];
    wire::encode(
        PgWireBackendMessage::NoticeResponse(NoticeResponse::new(fields)),
        out,
    );
}

fn since(t: SystemTime) -> String {
    let secs = SystemTime::now()
        .duration_since(t)
        .unwrap_or_default()
        .as_secs();
    format!("{secs}s")
}

/// Serve an authenticated admin client until it leaves.
pub async fn serve(shared: Arc<Shared>, mut stream: Stream, mut buf: BytesMut) {
    let mut out = BytesMut::new();
    wire::encode(
        PgWireBackendMessage::Authentication(Authentication::Ok),
        &mut out,
    );
    for (k, v) in [
        ("server_version", "15.0 (pgcache admin console)"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", ""),
    ] {
        wire::encode(
            PgWireBackendMessage::ParameterStatus(ParameterStatus::new(k.into(), v.into())),
            &mut out,
        );
    }
    wire::encode(
        PgWireBackendMessage::BackendKeyData(BackendKeyData::new(0, SecretKey::I32(0))),
        &mut out,
    );
    wire::ready_for_query(b'I', &mut out);
    let mut skipping = false;
    loop {
        if stream.write_all(&out).await.is_err() || stream.flush().await.is_err() {
            return;
        }
        out.clear();
        let Ok(Some((tag, body))) = wire::read_message(&mut stream, &mut buf, 1 << 20).await else {
            return;
        };
        match tag {
            b'Q' => {
                let mut pos = 0;
                let sql = match wire::read_text(&body, &mut pos) {
                    Ok(sql) => sql,
                    Err(why) => {
                        // A string with no end: refused as PostgreSQL refuses it (an error,
                        // the session goes on). One that is not UTF-8 would be read as nothing
                        // and run as an empty command.
                        let (code, text) = match why {
                            wire::Unreadable::Unterminated => {
                                (sqlstate::PROTOCOL_VIOLATION, "invalid string in message")
                            }
                            wire::Unreadable::NotUtf8 => (
                                sqlstate::CHARACTER_NOT_IN_REPERTOIRE,
                                "the admin console reads commands as UTF-8: this one is not",
                            ),
                        };
                        PgError::error(code, text).encode(&mut out);
                        wire::ready_for_query(b'I', &mut out);
                        continue;
                    }
                };
                let stop = run(&shared, sql, &mut out).await;
                wire::ready_for_query(b'I', &mut out);
                if stop {
                    let _ = stream.write_all(&out).await;
                    let _ = stream.flush().await;
                    return;
                }
            }
            b'X' => return,
            b'S' if skipping => {
                skipping = false;
                wire::ready_for_query(b'I', &mut out);
            }
            b'P' | b'B' | b'D' | b'E' | b'C' | b'H' | b'S' | b'F' if !skipping => {
                skipping = tag != b'S';
                PgError::error(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "the pgcache admin console accepts simple queries only",
                )
                .encode(&mut out);
                if tag == b'S' {
                    wire::ready_for_query(b'I', &mut out);
                }
            }
            _ => {}
        }
    }
}

/// Run one command; true when the connection should close (SHUTDOWN).
async fn run(shared: &Shared, sql: &str, out: &mut BytesMut) -> bool {
    let words: Vec<String> = sql
        .trim()
        .trim_end_matches(';')
        .split_whitespace()
        .map(|w| w.to_ascii_uppercase())
        .collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    match words.as_slice() {
        [] => wire::frame(b'I', &[], out),
        ["SHOW", "QUERIES", options @ ..] => match super::insight::query_options(options) {
            Ok((sort, limit)) => {
                let mut t = Table::new(super::insight::QUERY_COLUMNS);
                for r in super::insight::queries(shared, &sort, limit) {
                    t.rows.push(super::insight::query_cells(&r));
                }
                t.encode(out);
            }
            Err(e) => PgError::error("42601", e).encode(out),
        },
        ["SHOW", "SLOW", rest @ ..] => {
            let limit = match rest {
                [] => Ok(20),
                ["LIMIT", n] => n
                    .parse::<usize>()
                    .map_err(|_| format!("LIMIT {n}: not a number")),
                _ => Err("use SHOW SLOW [LIMIT n]".to_string()),
            };
            match limit {
                Ok(limit) => {
                    let mut t = Table::new(super::insight::SLOW_COLUMNS);
                    for v in super::insight::slow(shared, limit) {
                        t.rows.push(super::insight::slow_cells(&v));
                    }
                    t.encode(out);
                }
                Err(e) => PgError::error("42601", e).encode(out),
            }
        }
        ["RESET", "QUERIES"] => {
            shared.insight.reset();
            command_complete("RESET", out);
        }
        ["SHOW", what] => match show(shared, what) {
            Some(t) => t.encode(out),
            None => unknown(sql, out),
        },
        ["INVALIDATE", ..] => {
            let mut raw = sql
                .trim()
                .trim_end_matches(';')
                .splitn(3, char::is_whitespace);
            raw.next();
            let kind = raw.next().unwrap_or("");
            match super::cache::Target::parse(kind, raw.next()) {
                Ok(t) => {
                    let n = super::cache::invalidate(shared, &t);
                    command_complete(&format!("INVALIDATE {n}"), out);
                }
                Err(e) => PgError::error("42601", e).encode(out),
            }
        }
        ["SHOW", "CACHE", "ENTRIES"] => cache_entries(shared).encode(out),
        ["RELOAD"] => match control::reload(shared) {
            Ok(notes) => {
                for n in notes {
                    notice(&n, out);
                }
                command_complete("RELOAD", out);
            }
            Err(e) => PgError::error(
                sqlstate::INVALID_PARAMETER_VALUE,
                "configuration not reloaded: it has problems",
            )
            .with_detail(e.to_string())
            .encode(out),
        },
        ["PAUSE"] => {
            let limit = shared
                .config()
                .proxy
                .shutdown_timeout
                .max(Duration::from_secs(1));
            match control::pause(shared, limit).await {
                Ok(()) => command_complete("PAUSE", out),
                Err(busy) => PgError::error(
                    sqlstate::CONNECTION_FAILURE,
                    format!("paused, but {busy} client(s) still hold server connections"),
                )
                .with_hint("RESUME to let clients go on")
                .encode(out),
            }
        }
        ["RESUME"] => {
            control::resume(shared);
            command_complete("RESUME", out);
        }
        ["SHUTDOWN"] => {
            control::shutdown(shared);
            command_complete("SHUTDOWN", out);
            return true;
        }
        _ => unknown(sql, out),
    }
    false
}

fn unknown(sql: &str, out: &mut BytesMut) {
    PgError::error(
        "42601",
        format!("unknown admin console command: {}", sql.trim()),
    )
    .with_hint("try SHOW HELP")
    .encode(out);
}

fn show(shared: &Shared, what: &str) -> Option<Table> {
    let config = shared.config();
    let registry = &shared.registry;
    Some(match what {
        "HELP" => {
            let mut t = Table::new(&["command", "description"]);
            for (c, d) in [
                ("SHOW POOLS", "clients and server connections per pool"),
                ("SHOW CLIENTS", "one row per client connection"),
                ("SHOW SERVERS", "one row per server connection"),
                (
                    "SHOW DATABASES",
                    "databases, their upstream and pool settings",
                ),
                ("SHOW CONFIG", "the configuration in force"),
                ("SHOW STATS", "counters per pool"),
                ("SHOW CACHE", "result cache figures"),
                (
                    "SHOW QUERIES [ORDER BY total|calls|mean|max|p99|errors|rows|hits|repeated] [LIMIT n]",
                    "statistics per statement fingerprint (default: top 20 by total time)",
                ),
                ("SHOW SLOW [LIMIT n]", "the latest slow statements, newest first"),
                ("RESET QUERIES", "forget the statistics and slow statements"),
                (
                    "SHOW CACHE ENTRIES",
                    "the 100 most recently used cache entries",
                ),
                (
                    "INVALIDATE TABLE|PATTERN|KEY|FINGERPRINT 'x' / INVALIDATE ALL",
                    "drop cached results",
                ),
                ("RELOAD", "re-read proxy.toml"),
                ("PAUSE", "hold new transactions until RESUME"),
                ("RESUME", "let held clients go on"),
                ("SHUTDOWN", "drain and stop the proxy"),
            ] {
                t.row(vec![c.into(), d.into()]);
            }
            t
        }
        "POOLS" => {
            let mut t = Table::new(&[
                "database",
                "user",
                "pool_mode",
                "cl_active",
                "cl_idle",
                "cl_waiting",
                "sv_active",
                "sv_idle",
                "max_size",
            ]);
            let clients = registry.clients();
            let servers = registry.servers();
            let mut keys: Vec<crate::pool::PoolKey> =
                clients.iter().map(|c| (*c.pool).clone()).collect();
            keys.extend(servers.iter().map(|s| s.pool.clone()));
            keys.sort_by_key(|k| k.to_string());
            keys.dedup();
            for k in keys {
                let count = |state: &str| {
                    clients
                        .iter()
                        .filter(|c| *c.pool == k && c.state() == state)
                        .count()
                        .to_string()
                };
                let sv = |active: bool| {
                    servers
                        .iter()
                        .filter(|s| s.pool == k && s.active() == active)
                        .count()
                        .to_string()
                };
                t.row(vec![
                    k.database.clone(),
                    k.user.clone(),
                    config.pool_mode(&k.database, &k.user).name().into(),
                    count("active"),
                    count("idle"),
                    count("waiting"),
                    sv(true),
                    sv(false),
                    config.pool_size(&k.database, &k.user).to_string(),
                ]);
            }
            t
        }
        "CLIENTS" => {
            let mut t = Table::new(&[
                "id",
                "database",
                "user",
                "addr",
                "state",
                "tx_status",
                "connected_for",
                "server_pid",
                "pinned",
                "parked",
                "tls",
            ]);
            for c in registry.clients() {
                let pid = c.server_pid();
                t.rows.push(vec![
                    Some(c.id.to_string()),
                    Some(c.pool.database.clone()),
                    Some(c.pool.user.clone()),
                    Some(c.addr.to_string()),
                    Some(c.state().into()),
                    Some(c.tx_status().to_string()),
                    Some(since(c.connected)),
                    (pid != 0).then(|| pid.to_string()),
                    Some(c.pinned().to_string()),
                    Some(c.parked().to_string()),
                    c.tls.map(crate::stream::tls_name),
                ]);
            }
            t
        }
        "SERVERS" => {
            let mut t = Table::new(&["pid", "database", "user", "state", "connected_for"]);
            for s in registry.servers() {
                t.row(vec![
                    s.pid.to_string(),
                    s.pool.database.clone(),
                    s.pool.user.clone(),
                    if s.active() { "active" } else { "idle" }.into(),
                    since(s.connected),
                ]);
            }
            t
        }
        "DATABASES" => {
            let mut t = Table::new(&[
                "name",
                "host",
                "port",
                "upstream_database",
                "pool_mode",
                "pool_size",
            ]);
            let mut names: Vec<String> = config.databases.keys().cloned().collect();
            names.extend(registry.clients().iter().map(|c| c.pool.database.clone()));
            names.sort();
            names.dedup();
            for name in names {
                let d = config.databases.get(&name);
                t.row(vec![
                    name.clone(),
                    config.upstream.host.clone(),
                    config.upstream.port.to_string(),
                    config.upstream_database(&name).to_string(),
                    d.and_then(|d| d.pool_mode)
                        .unwrap_or(config.pool.mode)
                        .name()
                        .into(),
                    d.and_then(|d| d.pool_size)
                        .unwrap_or(config.pool.max_size)
                        .to_string(),
                ]);
            }
            t
        }
        "CONFIG" => {
            let mut t = Table::new(&["key", "value"]);
            if let Ok(toml::Value::Table(root)) = toml::Value::try_from(&**config) {
                flatten("", &toml::Value::Table(root), &mut t);
            }
            t
        }
        "CACHE" => {
            let mut t = Table::new(&["key", "value"]);
            for (k, v) in super::cache::figures(shared) {
                t.row(vec![k.to_string(), v]);
            }
            t
        }
        "STATS" => {
            let mut t = Table::new(&[
                "database",
                "user",
                "total_xact_count",
                "total_query_count",
                "total_received",
                "total_sent",
                "total_wait_time_us",
            ]);
            for (k, s) in registry.all_stats() {
                t.row(vec![
                    k.database.clone(),
                    k.user.clone(),
                    PoolStats::get(&s.transactions).to_string(),
                    PoolStats::get(&s.queries).to_string(),
                    PoolStats::get(&s.bytes_received).to_string(),
                    PoolStats::get(&s.bytes_sent).to_string(),
                    PoolStats::get(&s.wait_us).to_string(),
                ]);
            }
            t
        }
        _ => return None,
    })
}

/// `section.key = value` rows; secrets are masked.
fn cache_entries(shared: &Shared) -> Table {
    let mut t = Table::new(&["name", "fingerprint", "bytes", "hits", "expires_in_ms"]);
    let now = std::time::Instant::now();
    for e in shared.cache.entries(100) {
        t.row(vec![
            e.name.clone(),
            e.fingerprint.clone(),
            e.bytes.len().to_string(),
            e.hits
                .load(std::sync::atomic::Ordering::Relaxed)
                .to_string(),
            e.expires
                .saturating_duration_since(now)
                .as_millis()
                .to_string(),
        ]);
    }
    t
}

fn flatten(prefix: &str, v: &toml::Value, t: &mut Table) {
    match v {
        toml::Value::Table(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, t);
            }
        }
        other => {
            let secret = prefix.ends_with("password");
            let value = match other {
                _ if secret => "********".to_string(),
                toml::Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            t.row(vec![prefix.to_string(), value]);
        }
    }
}
