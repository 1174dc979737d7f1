//! The slow query log: statements over `slow_query.threshold`, written as JSON lines (at most
//! `max_per_second`) to stderr or a file, the latest `keep` held for `SHOW SLOW`, and — with
//! `slow_query.explain` — a sample explained first so the line carries the finding.

use super::fingerprint::Fingerprint;
use crate::listener::Shared;
use crate::metrics::METRICS;
use crate::pool::PoolKey;
use crate::session::settings::SettingMap;
use bytes::Bytes;
use std::collections::VecDeque;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc;

/// What `EXPLAIN` needs to run a statement as the client did.
#[derive(Debug, Clone)]
pub struct ExplainArgs {
    pub key: PoolKey,
    /// The statement as sent (simple protocol: with its constants; extended: with `$n`).
    pub sql: String,
    /// Extended protocol: the `Parse` after the query text (parameter types) and the `Bind`
    /// after the portal and statement names (parameter formats and values, result formats).
    pub parse_types: Option<Bytes>,
    pub bind: Option<Bytes>,
    /// The client's settings (startup parameters and, in transaction mode, the `SET`s it ran),
    /// put on the EXPLAIN's connection first: the plan is the one the client got (its
    /// `search_path`, `enable_*`, `work_mem`).
    pub settings: Arc<SettingMap>,
}

#[derive(Debug)]
pub struct SlowEvent {
    pub at: SystemTime,
    pub us: u64,
    pub fp: Arc<Fingerprint>,
    pub key: PoolKey,
    pub client: SocketAddr,
    pub rows: u64,
    pub cached: bool,
    /// SQLSTATE when it failed.
    pub error: Option<String>,
    pub explain: Option<ExplainArgs>,
}

/// A slow statement as logged.
#[derive(Debug)]
pub struct SlowRecord {
    pub event: SlowEvent,
    pub finding: Option<String>,
}

impl SlowRecord {
    pub fn json(&self) -> serde_json::Value {
        let e = &self.event;
        serde_json::json!({
            "time": humantime::format_rfc3339_millis(e.at).to_string(),
            "duration_ms": e.us as f64 / 1000.0,
            "fingerprint": e.fp.hex(),
            "query": &*e.fp.text,
            "database": e.key.database,
            "user": e.key.user,
            "client": e.client.to_string(),
            "rows": e.rows,
            "cached": e.cached,
            "error": e.error,
            "explain": self.finding,
        })
    }
}

pub struct SlowLog {
    tx: mpsc::Sender<SlowEvent>,
    rx: Mutex<Option<mpsc::Receiver<SlowEvent>>>,
    recent: Mutex<VecDeque<Arc<SlowRecord>>>,
}

impl SlowLog {
    pub fn new() -> Self {
        let (tx, rx) = mpsc::channel(1024);
        SlowLog {
            tx,
            rx: Mutex::new(Some(rx)),
            recent: Mutex::new(VecDeque::new()),
        }
    }

    /// A statement was slow. Never waits: when the writer is behind, the event is dropped
    /// (and counted).
    pub fn submit(&self, e: SlowEvent) {
        METRICS.slow_queries.inc();
        if self.tx.try_send(e).is_err() {
            METRICS.slow_log_dropped.inc();
        }
    }

    /// The latest slow statements, newest first.
    pub fn recent(&self, limit: usize) -> Vec<Arc<SlowRecord>> {
        let r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        r.iter().rev().take(limit).cloned().collect()
    }

    pub fn clear(&self) {
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    fn keep(&self, r: Arc<SlowRecord>, keep: usize) {
        let mut q = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        q.push_back(r);
        while q.len() > keep {
            q.pop_front();
        }
    }
}

impl Default for SlowLog {
    fn default() -> Self {
        Self::new()
    }
}

/// Where lines go; a file is reopened when `slow_query.log` changes, and when the file at that
/// path is no longer the one open (rotated away by `logrotate` or removed): no signal needed.
struct Output {
    path: String,
    file: Option<std::fs::File>,
}

/// The open file is still the one at `path` (same device and inode).
fn still_there(file: &std::fs::File, path: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
        _ => false,
    }
}

impl Output {
    fn write(&mut self, path: &str, line: &str) {
        match path {
            "off" => {}
            "stderr" => {
                let _ = writeln!(std::io::stderr().lock(), "{line}");
            }
            _ => {
                let moved = self.file.as_ref().is_some_and(|f| !still_there(f, path));
                if self.path != path || self.file.is_none() || moved {
                    self.path = path.to_string();
                    self.file = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                        .map_err(
                            |e| tracing::warn!(path, error = %e, "cannot open the slow query log"),
                        )
                        .ok();
                }
                if let Some(f) = &mut self.file {
                    if let Err(e) = writeln!(f, "{line}") {
                        tracing::warn!(path, error = %e, "cannot write the slow query log");
                        self.file = None;
                    }
                }
            }
        }
    }
}

/// The writer: runs for the life of the proxy.
pub async fn run(shared: Arc<Shared>) {
    let taken = shared
        .insight
        .slow
        .rx
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    let Some(mut rx) = taken else { return };
    let (done_tx, mut done_rx) = mpsc::channel::<SlowRecord>(64);
    let mut out = Output {
        path: String::new(),
        file: None,
    };
    let (mut tokens, mut refilled) = (0f64, Instant::now());
    loop {
        let record = tokio::select! {
            e = rx.recv() => match e {
                Some(e) => {
                    let config = shared.config();
                    let c = &config.slow_query;
                    let rate = f64::from(c.max_per_second);
                    tokens = (tokens + refilled.elapsed().as_secs_f64() * rate).min(rate);
                    refilled = Instant::now();
                    if tokens < 1.0 {
                        METRICS.slow_log_dropped.inc();
                        shared.insight.slow.keep(Arc::new(SlowRecord { event: e, finding: None }), c.keep);
                        continue;
                    }
                    tokens -= 1.0;
                    let explain = c.explain
                        && e.explain.is_some()
                        && shared.insight.stats.claim_explain(e.fp.id, c.explain_interval);
                    if explain {
                        let (shared, done) = (shared.clone(), done_tx.clone());
                        tokio::spawn(async move {
                            let finding = explain_for(&shared, &e).await;
                            let _ = done.send(SlowRecord { event: e, finding }).await;
                        });
                        continue;
                    }
                    SlowRecord { event: e, finding: None }
                }
                None => return,
            },
            Some(r) = done_rx.recv() => r,
        };
        let config = shared.config();
        out.write(&config.slow_query.log, &record.json().to_string());
        shared
            .insight
            .slow
            .keep(Arc::new(record), config.slow_query.keep);
    }
}

async fn explain_for(shared: &Shared, e: &SlowEvent) -> Option<String> {
    let args = e.explain.as_ref()?;
    let c = shared.config().slow_query.clone();
    let analyze = c.explain_analyze && e.fp.kind == super::fingerprint::Kind::Select;
    let run = super::explain::run(shared, args, analyze, c.explain_min_rows);
    let finding = match tokio::time::timeout(Duration::from_secs(10), run).await {
        Ok(Ok(f)) => {
            METRICS.explains.with_label_values(&["ok"]).inc();
            f
        }
        Ok(Err(err)) => {
            METRICS.explains.with_label_values(&["error"]).inc();
            tracing::info!(fingerprint = %e.fp.hex(), error = %err, "EXPLAIN of a slow statement failed");
            format!("EXPLAIN failed: {err}")
        }
        Err(_) => {
            METRICS.explains.with_label_values(&["error"]).inc();
            "EXPLAIN did not finish within 10s".to_string()
        }
    };
    shared
        .insight
        .stats
        .set_finding(e.fp.id, Arc::from(finding.as_str()));
    Some(finding)
}
