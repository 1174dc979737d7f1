//! Invalidation from PostgreSQL's change stream (DESIGN §2, invalidation sources): a logical
//! replication connection reads `pgoutput` from a slot and, at each commit, bumps every relation
//! the transaction changed — inserts, updates, deletes, truncates, whoever made them — and what
//! a write to them reaches in the catalog (inheritance parents, and more, as for the proxy's own
//! writes). The position is confirmed after the bump, so a change is never confirmed before the
//! cache has forgotten what it invalidates; after a restart of either side the slot replays
//! whatever was not confirmed.

use crate::listener::Shared;
use crate::metrics::METRICS;
use crate::pool::upstream::ServerConn;
use crate::pool::PoolKey;
use crate::wire;
use bytes::{Buf, Bytes, BytesMut};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_US: i64 = 946_684_800_000_000;

/// Run the change stream while `invalidation.replication.enabled`; reconnects with backoff.
pub async fn run(shared: Arc<Shared>) {
    let mut backoff = Duration::from_secs(1);
    let mut last_error = String::new();
    loop {
        if !shared.config().invalidation.replication.enabled
            || shared.shutdown.phase() != crate::shutdown::Phase::Running
        {
            METRICS.replication_up.set(0);
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        let mut s = Stream::default();
        let result = s.follow(&shared).await;
        METRICS.replication_up.set(0);
        match result {
            Ok(()) => continue,
            Err(e) => {
                // Once per state change: a long outage does not fill the log.
                if e != last_error {
                    tracing::warn!(error = %e, "change stream stopped; retrying");
                    last_error = e;
                }
                if s.streamed {
                    backoff = Duration::from_secs(1);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

#[derive(Default)]
struct Stream {
    /// Relation oid → name, from `Relation` messages.
    relations: HashMap<u32, Arc<str>>,
    /// Relations changed by the open transaction; `all`: by a change that names none.
    changed: HashSet<Arc<str>>,
    /// Applied up to here: the end of the last commit, or a keepalive's position between
    /// transactions. Confirmed to the server in each status update.
    received: u64,
    in_transaction: bool,
    /// This connection got as far as streaming.
    streamed: bool,
}

impl Stream {
    async fn follow(&mut self, shared: &Shared) -> Result<(), String> {
        let config = shared.config();
        let r = config.invalidation.replication.clone();
        let (database, user) = config.replication_source();
        drop(config);
        let key = PoolKey {
            database: database.clone(),
            user: user.clone(),
        };
        let mut conn = shared
            .pools
            .connect_replication(&key)
            .await
            .map_err(|e| format!("replication connection as {user} to {database}: {e}"))?;
        let created = prepare(&mut conn, &r, &user).await?;
        let db = shared.cache.db(&database);
        if created {
            // Changes before the slot existed were never streamed: nothing cached before can be
            // proven fresh.
            db.bump_all("replication");
        }
        let start = format!(
            "START_REPLICATION SLOT {} LOGICAL 0/0 (proto_version '1', publication_names '{}')",
            r.slot, r.publication
        );
        let mut out = BytesMut::new();
        wire::query(&start, &mut out);
        conn.send(&out).await.map_err(|e| e.to_string())?;
        loop {
            let (tag, body) = conn.read().await.map_err(|e| e.to_string())?;
            match tag {
                b'W' => break,
                b'E' => return Err(format!("START_REPLICATION: {}", error_text(&body))),
                _ => {}
            }
        }
        tracing::info!(slot = %r.slot, publication = %r.publication, %database, "change stream following");
        METRICS.replication_up.set(1);
        self.streamed = true;
        let mut tick = tokio::time::interval(r.status_interval);
        tick.tick().await;
        loop {
            tokio::select! {
                m = conn.read() => {
                    let (tag, body) = m.map_err(|e| e.to_string())?;
                    let report = match tag {
                        b'd' => self.on_copy_data(body, &db)?,
                        b'E' => return Err(format!("change stream: {}", error_text(&body))),
                        b'c' => return Err("the server ended the change stream".into()),
                        _ => false,
                    };
                    if report {
                        self.status(&mut conn).await?;
                    }
                }
                _ = tick.tick() => self.status(&mut conn).await?,
            }
        }
    }

    /// One `CopyData`: true when the server asked for a status now, or a commit was applied.
    fn on_copy_data(&mut self, mut body: Bytes, db: &crate::cache::Db) -> Result<bool, String> {
        let short = || "short replication message".to_string();
        if body.is_empty() {
            return Err(short());
        }
        match body.get_u8() {
            b'w' => {
                if body.len() < 24 {
                    return Err(short());
                }
                let start = body.get_u64();
                let wal_end = body.get_u64();
                let _sent = body.get_i64();
                METRICS
                    .replication_lag_bytes
                    .set(wal_end.saturating_sub(start) as i64);
                // Positions advance at commits (and keepalives between transactions) only.
                self.on_pgoutput(body, db)
            }
            b'k' => {
                if body.len() < 17 {
                    return Err(short());
                }
                let wal_end = body.get_u64();
                let _sent = body.get_i64();
                let reply = body.get_u8() == 1;
                if !self.in_transaction {
                    // Everything before the server's position has been seen.
                    METRICS.replication_lag_bytes.set(0);
                    self.received = self.received.max(wal_end);
                }
                Ok(reply)
            }
            _ => Ok(false),
        }
    }

    /// A `pgoutput` message (protocol 1); true after a commit that was applied.
    fn on_pgoutput(&mut self, mut m: Bytes, db: &crate::cache::Db) -> Result<bool, String> {
        let short = || "short pgoutput message".to_string();
        if m.is_empty() {
            return Err(short());
        }
        let oid = |m: &mut Bytes| {
            if m.len() >= 4 {
                Ok(m.get_u32())
            } else {
                Err(short())
            }
        };
        match m.get_u8() {
            b'B' => {
                self.in_transaction = true;
                self.changed.clear();
            }
            b'R' => {
                let id = oid(&mut m)?;
                let _namespace = cstr(&mut m).ok_or_else(short)?;
                let name = cstr(&mut m).ok_or_else(short)?;
                self.relations.insert(id, Arc::from(name.as_str()));
            }
            b'I' | b'U' | b'D' => {
                let id = oid(&mut m)?;
                self.touch(id);
            }
            b'T' => {
                if m.len() < 5 {
                    return Err(short());
                }
                let n = m.get_u32();
                let _options = m.get_u8();
                for _ in 0..n {
                    let id = oid(&mut m)?;
                    self.touch(id);
                }
            }
            b'C' => {
                if m.len() < 25 {
                    return Err(short());
                }
                let _flags = m.get_u8();
                let _commit_lsn = m.get_u64();
                let end_lsn = m.get_u64();
                let at = m.get_i64();
                self.commit(db, at);
                self.received = self.received.max(end_lsn);
                self.in_transaction = false;
                return Ok(true);
            }
            _ => {} // Origin, Type, Message: nothing to invalidate.
        }
        Ok(false)
    }

    fn touch(&mut self, oid: u32) {
        // A Relation message always comes before the first change to it on a connection.
        let name = self
            .relations
            .get(&oid)
            .cloned()
            .unwrap_or_else(|| Arc::from(format!("(relation {oid})").as_str()));
        self.changed.insert(name);
    }

    /// Bump what the transaction changed, and what writes to those reach.
    fn commit(&mut self, db: &crate::cache::Db, at_pg_us: i64) {
        if self.changed.is_empty() {
            return;
        }
        let catalog = db.catalog();
        let mut rels: Vec<Arc<str>> = Vec::new();
        let mut all = false;
        for name in self.changed.drain() {
            match catalog.as_ref().and_then(|c| c.rels.get(&*name)) {
                Some(info) => {
                    all |= info.writes_all;
                    rels.extend(info.writes.iter().cloned());
                }
                None => rels.push(name),
            }
        }
        rels.sort();
        rels.dedup();
        if all {
            db.bump_all("replication");
        }
        db.bump(&rels, "replication");
        METRICS.replication_transactions.inc();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        let delay = (now - PG_EPOCH_US - at_pg_us).max(0) as f64 / 1e6;
        METRICS.replication_delay.observe(delay);
        tracing::debug!(relations = ?rels, delay, "change stream commit");
    }

    /// Standby status update: written, flushed and applied up to `received`.
    async fn status(&mut self, conn: &mut ServerConn) -> Result<(), String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0)
            - PG_EPOCH_US;
        let mut body = Vec::with_capacity(34);
        body.push(b'r');
        for _ in 0..3 {
            body.extend_from_slice(&self.received.to_be_bytes());
        }
        body.extend_from_slice(&now.to_be_bytes());
        body.push(0); // no reply wanted
        let mut out = BytesMut::new();
        wire::frame(b'd', &[&body], &mut out);
        conn.send(&out).await.map_err(|e| e.to_string())
    }
}

/// `pgcache check`: what the upstream lacks for the change stream, each with what to do.
pub async fn check(pools: &crate::pool::Pools, config: &crate::config::Config) -> Vec<String> {
    let r = &config.invalidation.replication;
    let (database, user) = config.replication_source();
    let key = PoolKey {
        database: database.clone(),
        user: user.clone(),
    };
    let mut conn = match pools.connect_replication(&key).await {
        Ok(c) => c,
        Err(e) => {
            let mut p =
                format!("cannot open a replication connection as {user} to {database}: {e}");
            if e.to_string().contains("42501") || e.to_string().contains("replication") {
                p.push_str(&format!(
                    " — the user needs the REPLICATION attribute (ALTER ROLE {user} REPLICATION) and a pg_hba.conf line that allows it"
                ));
            }
            return vec![p];
        }
    };
    let mut problems = Vec::new();
    let wal_level = scalar(&mut conn, "SHOW wal_level").await.ok().flatten();
    if wal_level.as_deref() != Some("logical") {
        problems.push(format!(
            "wal_level is {}: set wal_level = logical (ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL",
            wal_level.unwrap_or_default()
        ));
    }
    let lit = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let q = "SELECT rolsuper::text FROM pg_roles WHERE rolname = current_user";
    let superuser = scalar(&mut conn, q).await.ok().flatten().as_deref() == Some("true");
    let q = format!(
        "SELECT 1 FROM pg_publication WHERE pubname = {}",
        lit(&r.publication)
    );
    if scalar(&mut conn, &q).await.ok().flatten().is_none() {
        if !r.create {
            problems.push(format!(
                "publication {0} does not exist: CREATE PUBLICATION {0} FOR ALL TABLES (or set invalidation.replication.create = true)",
                r.publication
            ));
        } else if !superuser {
            problems.push(format!(
                "publication {0} does not exist and {user} is not a superuser, so it cannot create it FOR ALL TABLES: have a superuser run CREATE PUBLICATION {0} FOR ALL TABLES",
                r.publication
            ));
        }
    }
    let q = format!(
        "SELECT 1 FROM pg_replication_slots WHERE slot_name = {}",
        lit(&r.slot)
    );
    if scalar(&mut conn, &q).await.ok().flatten().is_none() && !r.create {
        problems.push(format!(
            "replication slot {} does not exist (set invalidation.replication.create = true)",
            r.slot
        ));
    }
    conn.terminate().await;
    problems
}

/// Check the server can stream, and create the publication and slot when missing (and
/// allowed). True when the slot was created now.
async fn prepare(
    conn: &mut ServerConn,
    r: &crate::config::ReplicationConfig,
    user: &str,
) -> Result<bool, String> {
    let wal_level = scalar(conn, "SHOW wal_level").await?;
    if wal_level.as_deref() != Some("logical") {
        return Err(format!(
            "the upstream has wal_level = {}; the change stream needs wal_level = logical \
             (ALTER SYSTEM SET wal_level = logical, then restart PostgreSQL)",
            wal_level.unwrap_or_default()
        ));
    }
    let lit = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let has_pub = scalar(
        conn,
        &format!(
            "SELECT 1 FROM pg_publication WHERE pubname = {}",
            lit(&r.publication)
        ),
    )
    .await?
    .is_some();
    if !has_pub {
        if !r.create {
            return Err(format!(
                "publication {} does not exist (create it: CREATE PUBLICATION {} FOR ALL TABLES; or set invalidation.replication.create = true)",
                r.publication, r.publication
            ));
        }
        let sql = format!("CREATE PUBLICATION {} FOR ALL TABLES", r.publication);
        conn.simple_query(&sql).await.map_err(|e| {
            format!(
                "{sql}: {e} (FOR ALL TABLES needs a superuser; or create the publication yourself)"
            )
        })?;
        tracing::info!(publication = %r.publication, "created publication FOR ALL TABLES");
    }
    let has_slot = scalar(
        conn,
        &format!(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = {}",
            lit(&r.slot)
        ),
    )
    .await?
    .is_some();
    if has_slot {
        return Ok(false);
    }
    if !r.create {
        return Err(format!(
            "replication slot {} does not exist (set invalidation.replication.create = true)",
            r.slot
        ));
    }
    let sql = format!(
        "SELECT pg_create_logical_replication_slot({}, 'pgoutput')",
        lit(&r.slot)
    );
    conn.simple_query(&sql).await.map_err(|e| {
        format!("{sql}: {e} (user {user} needs the REPLICATION attribute: ALTER ROLE {user} REPLICATION)")
    })?;
    tracing::info!(slot = %r.slot, "created logical replication slot");
    Ok(true)
}

/// `ServerConn::scalar`, its error naming the statement.
async fn scalar(conn: &mut ServerConn, sql: &str) -> Result<Option<String>, String> {
    conn.scalar(sql).await.map_err(|e| format!("{sql}: {e}"))
}

fn cstr(m: &mut Bytes) -> Option<String> {
    let end = m.iter().position(|&b| b == 0)?;
    let s = String::from_utf8_lossy(&m[..end]).into_owned();
    m.advance(end + 1);
    Some(s)
}

fn error_text(body: &[u8]) -> String {
    let f = wire::fields(body);
    let get = |c: u8| {
        f.iter()
            .find(|(k, _)| *k == c)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    };
    format!("{} {}", get(b'C'), get(b'M'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgoutput_names_and_truncates() {
        let mut s = Stream::default();
        let mut rel = vec![b'R', 0, 0, 0, 42];
        rel.extend_from_slice(b"public\0orders\0");
        rel.extend_from_slice(&[b'd', 0, 0]);
        assert!(s.relations.is_empty());
        // Relation and Truncate parse without a Shared (no commit involved).
        let mut m = Bytes::from(rel);
        m.advance(1);
        let id = m.get_u32();
        assert_eq!(id, 42);
        assert_eq!(cstr(&mut m).as_deref(), Some("public"));
        assert_eq!(cstr(&mut m).as_deref(), Some("orders"));
        s.relations.insert(42, Arc::from("orders"));
        s.touch(42);
        s.touch(7);
        let mut names: Vec<&str> = s.changed.iter().map(|n| &**n).collect();
        names.sort();
        assert_eq!(names, ["(relation 7)", "orders"]);
    }
}
