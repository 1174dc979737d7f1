//! The cache on one session: when a read may be answered from the cache, what it is keyed by,
//! and capturing a result on its way to the client (this client's writes: `writes`).
//!
//! A lookup happens only when nothing the server still owes could write or change the
//! transaction (a hit is queued behind it, so it cannot overtake earlier replies), and the
//! transaction is idle, or a read-only read-committed one when the rule allows. Simple queries are
//! looked up as they arrive; extended batches are held until their `Sync` (`held`). On a miss the result is
//! captured from the first reply to the `ReadyForQuery` and stored if nothing odd (an error, a
//! notice, a setting change, a size over `max_entry_bytes`) came with it, under the versions read
//! before the statement was sent. Writes are noted when sent and bumped at every
//! `ReadyForQuery` while their transaction is open, and at its end, before the client hears of it.

use super::backend::{Expect, Kind};
use super::held::HeldStatement;
use super::{End, Session};
use crate::cache::{catalog, Db, Entry, Plan, Snapshot};
use crate::metrics::METRICS;
use crate::sqltext::same_plan_key;
use bytes::{Bytes, BytesMut};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A result being captured.
struct Fill {
    key: Box<[u8]>,
    snapshot: Snapshot,
    ttl: Duration,
    name: String,
    fingerprint: Arc<str>,
    buf: BytesMut,
    /// Why it will not be stored.
    skip: Option<&'static str>,
    /// `ReadyForQuery`s owed for earlier messages: capture starts after them.
    after: usize,
}

#[derive(Default)]
pub(super) struct SessionCache {
    pub(super) db: Option<Arc<Db>>,
    /// Never look up or fill again in this session (temporary tables, settings changed where
    /// the proxy cannot see them).
    pub(super) off: bool,
    /// Relations written in the open transaction, bumped at each `ReadyForQuery`.
    pub(super) written: Vec<Arc<str>>,
    pub(super) written_all: bool,
    pub(super) ddl: bool,
    fill: Option<Fill>,
    /// An extended batch held back until its `Sync`.
    pub(super) held: Vec<BytesMut>,
    pub(super) held_stmt: Option<HeldStatement>,
    /// The open transaction began with a plain `BEGIN` and has not written.
    pub(super) tx_plain: bool,
    /// Key part for the session's settings, made again when they change.
    sig: Option<Bytes>,
    /// Room for the key of the next look-up (boxed only when a fill keeps it).
    key: Vec<u8>,
    /// The plan of the session's last statement: clients repeat statements (with new numbers,
    /// over the simple protocol), and the shared plan memo is a lock all sessions take and a
    /// key to make.
    last_plan: Option<Arc<Plan>>,
    /// The plan of the simple `Query` being handled, for insight (set by `cache_query` when
    /// the cache did not answer; taken when the query goes upstream).
    pub(super) query_plan: Option<Arc<Plan>>,
    /// Bumps still to tell Redis (relations, whole database) before the client hears of them.
    pub(super) remote: Option<(Vec<Arc<str>>, bool)>,
}

impl SessionCache {
    pub(super) fn new() -> Self {
        SessionCache::default()
    }

    pub(super) fn holding(&self) -> bool {
        !self.held.is_empty()
    }

    pub(super) fn settings_changed(&mut self) {
        self.sig = None;
    }

    /// Bytes on their way to the client.
    pub(super) fn capture(&mut self, bytes: &[u8], max: usize) {
        let Some(f) = &mut self.fill else { return };
        if f.skip.is_some() || f.after > 0 {
            return;
        }
        if f.buf.len() + bytes.len() > max {
            f.skip = Some("too_large");
            f.buf = BytesMut::new();
            return;
        }
        f.buf.extend_from_slice(bytes);
    }

    /// Something that must not be replayed came with the result.
    pub(super) fn spoil(&mut self, reason: &'static str) {
        if let Some(f) = self.fill.as_mut().filter(|f| f.after == 0) {
            f.skip.get_or_insert(reason);
        }
    }
}

impl Session {
    pub(super) fn cache_db(&mut self) -> Option<Arc<Db>> {
        let c = self.cache.as_deref_mut()?;
        if c.db.is_none() {
            let name = self
                .shared
                .config()
                .upstream_database(&self.pool.key().database)
                .to_string();
            c.db = Some(self.shared.cache.db(&name));
        }
        c.db.clone()
    }

    /// Nothing is owed by the server and no batch is open.
    fn idle(&self) -> bool {
        self.tx.in_flight == 0 && self.queue.is_empty() && !self.tx.batch_open
    }

    /// No batch is open and what the server still owes cannot write or change the transaction
    /// (a `Sync` after a `Close`, as drivers pipeline when they drop a statement): a hit is
    /// queued behind it, a fill starts after it.
    pub(super) fn quiet(&self) -> bool {
        !self.tx.batch_open
            && self.queue.iter().all(|e| match e {
                Expect::Synthetic(_) | Expect::SyntheticReady => true,
                Expect::CopyEnd => false,
                Expect::Reply { kind, .. } => matches!(
                    kind,
                    Kind::Sync | Kind::Close | Kind::Parse { .. } | Kind::DescribeStatement
                ),
            })
    }

    /// Read the catalog (first use, or after DDL: on a connection of its own, never the
    /// client's) and, while the session is idle outside a transaction, the settings the client
    /// changed. Failures only mean this statement is not cached.
    async fn cache_prepare(&mut self, db: &Db) {
        if db.catalog().is_none() {
            // Boxed here and below: rare, and large; inline, every message's future would
            // carry their size (the hot path boxes it per message).
            Box::pin(self.load_catalog(db)).await;
        }
        if !self.settings.dirty() || self.tx.status != b'I' || !self.idle() {
            return;
        }
        let Some(mut a) = self.server.take() else {
            return; // transaction mode: captured when the connection goes back
        };
        if a.to_server.is_empty() && a.conn.buf.is_empty() {
            Box::pin(self.capture_settings(&mut a.conn)).await;
        }
        self.server = Some(a);
    }

    async fn load_catalog(&self, db: &Db) {
        let mut failed_at = db.load_lock.lock().await;
        if db.catalog().is_some()
            || failed_at.is_some_and(|t| t.elapsed() < crate::cache::CATALOG_RETRY)
        {
            return;
        }
        let limit = self.shared.config().upstream.connect_timeout * 2;
        // Concurrent DDL can make a catalog function fail (a view dropped between two reads):
        // a few quick attempts.
        let load = async {
            let mut last = None;
            for _ in 0..3 {
                let mut conn = self.shared.pools.connect_unpooled(self.pool.key()).await?;
                let c = catalog::load(&mut conn).await;
                conn.terminate().await;
                match c {
                    Ok(c) => return Ok(c),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.expect("three attempts"))
        };
        match tokio::time::timeout(limit, load).await {
            Ok(Ok(c)) => {
                tracing::debug!(db = %db.name, relations = c.rels.len(), "catalog read");
                db.set_catalog(Some(c));
                *failed_at = None;
            }
            Ok(Err(e)) => {
                tracing::warn!(db = %db.name, error = %e, "reading the catalog failed; not caching");
                *failed_at = Some(std::time::Instant::now());
            }
            Err(_) => {
                tracing::warn!(db = %db.name, "reading the catalog timed out; not caching");
                *failed_at = Some(std::time::Instant::now());
            }
        }
    }

    /// Plan `sql` and note what running it does to this session (writes, settings, transaction).
    /// `sql` is checked as UTF-8 only when it is not the last statement's with new numbers
    /// (`None` when it is not UTF-8, and then counted as a write of anything, as unreadable text).
    pub(super) async fn cache_plan(&mut self, sql: &[u8]) -> Option<(Arc<Db>, Arc<Plan>)> {
        if self.unreadable(sql) {
            // The proxy cannot tell what it reads or writes: not looked up nor filled, and
            // counted as a write of anything (the whole database is bumped at its end).
            self.cache_note_unknown_write();
            return None;
        }
        let db = self.cache_db()?;
        self.cache_prepare(&db).await;
        let last = (self.cache.as_deref()?.last_plan.as_ref())
            .filter(|p| same_plan_key(&p.text, &p.numbers, sql) && db.is_current(p))
            .cloned();
        let plan = match last {
            Some(p) => p,
            None => {
                let Ok(text) = std::str::from_utf8(sql) else {
                    // Not UTF-8 (a client_encoding other than UTF8): as unreadable as above.
                    self.cache_note_unknown_write();
                    return None;
                };
                let p = self.shared.cache.plan(&db, text);
                self.cache.as_deref_mut()?.last_plan = Some(p.clone());
                p
            }
        };
        Some((db, plan))
    }

    /// May this plan be looked up (and filled) now?
    pub(super) fn cache_eligible(&self, db: &Db, plan: &Plan) -> bool {
        let Some(c) = self.cache.as_deref() else {
            return false;
        };
        if !plan.cacheable || c.off || self.pinned.is_some() || self.settings.dirty() {
            return false;
        }
        // A write still in flight (its bump comes with its ReadyForQuery): the client must not
        // get an answer from before it.
        if !c.written.is_empty() || c.written_all || c.ddl {
            return false;
        }
        match self.tx.status {
            b'I' => true,
            b'T' => {
                plan.in_transaction
                    && c.tx_plain
                    && c.written.is_empty()
                    && !c.written_all
                    && db.catalog().is_some_and(|k| k.read_committed)
                    && !self
                        .settings
                        .wanted
                        .contains_key("default_transaction_isolation")
            }
            _ => false,
        }
    }

    /// The key: database, role, settings, then the statement's own parts.
    /// The entry key, in the session's key buffer (taken: give it back with `cache_key_done`).
    fn cache_key(&mut self, db: &Db, plan: &Plan, parts: &[&[u8]]) -> Vec<u8> {
        let role = if plan.shared {
            "*"
        } else {
            self.pool.key().user.as_str()
        };
        let c = self.cache.as_deref_mut().expect("cache on");
        let sig = c
            .sig
            .get_or_insert_with(|| crate::cache::settings_sig(self.settings.wanted.iter()));
        let mut key = std::mem::take(&mut c.key);
        crate::cache::entry_key_into(&mut key, &db.name, role, sig, parts);
        key
    }

    fn cache_key_done(&mut self, key: Vec<u8>) {
        if let Some(c) = self.cache.as_deref_mut() {
            c.key = key;
        }
    }

    /// Answer from the cache, or arm a fill for the statement about to go upstream.
    /// `sql` and `protocol` (`metrics::SIMPLE`/`EXTENDED`) are for insight.
    ///
    /// With the shared tier: a strict hit is checked against the versions in Redis; a miss here
    /// asks Redis for the result and the versions in one round trip, and a fill records those
    /// versions. Redis unavailable: eventual mode goes on with this proxy alone; strict mode
    /// neither serves nor fills.
    pub(super) async fn cache_lookup(
        &mut self,
        db: &Db,
        plan: &Plan,
        parts: &[&[u8]],
        (sql, protocol): (&[u8], usize),
    ) -> bool {
        // One clock read for the look-up: the entry's expiry is checked against it, and it is
        // when a hit was answered. The statement arrived with the client's last read.
        let sent = self.tx.last_activity.into_std();
        let now = Instant::now();
        let key = self.cache_key(db, plan, parts);
        let tier = db.tier.clone();
        // With Redis, before the round trip: a local bump during it makes the snapshot stale.
        // Without, a hit needs none; a miss takes it below, before the query goes upstream.
        let mut early = tier.as_ref().map(|_| db.snapshot(&plan.deps));
        let strict = tier.as_ref().is_some_and(|t| t.strict());
        let mut found = self.shared.cache.get_at(&key, db, now);
        let mut current = None;
        let mut stored = None;
        if let Some(t) = &tier {
            if strict || found.is_none() {
                match Box::pin(t.lookup(&key, &db.name, &plan.deps)).await {
                    Some((s, v)) => {
                        stored = s;
                        current = Some(v);
                    }
                    None if strict => {
                        tracing::trace!("strict: redis unavailable, not served from cache");
                        return false;
                    }
                    None => {}
                }
            }
            if strict {
                found = found.filter(|e| e.snapshot.remote.as_ref() == current.as_ref());
            }
        }
        let hit = match found {
            Some(e) => Some((e.bytes.clone(), e)),
            None => match stored.filter(|s| Some(&s.remote) == current.as_ref()) {
                Some(s) => {
                    // From the shared tier: kept here too, under the versions read before.
                    METRICS.cache_l2_hits.inc();
                    let mut snapshot = early.take().unwrap_or_else(|| db.snapshot(&plan.deps));
                    snapshot.remote = current.clone();
                    let bytes = s.bytes.clone();
                    let e = Entry {
                        bytes: s.bytes,
                        snapshot,
                        expires: now + Duration::from_millis(s.ttl_ms),
                        name: s.name,
                        fingerprint: s.fingerprint,
                        hits: AtomicU64::new(0),
                    };
                    self.shared.cache.put(key.as_slice().into(), e);
                    self.shared.cache.get_at(&key, db, now).map(|e| (bytes, e))
                }
                None => {
                    if tier.is_some() && current.is_some() {
                        METRICS.cache_l2_misses.inc();
                    }
                    None
                }
            },
        };
        if let Some((bytes, e)) = hit {
            tracing::trace!(name = %e.name, snapshot = ?e.snapshot, "hit");
            e.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            METRICS.cache_hits.inc();
            // In order behind whatever the server still owes.
            self.expect(Expect::Synthetic(bytes));
            self.expect(Expect::SyntheticReady);
            self.emit_synthetic();
            self.tx.last_activity = tokio::time::Instant::from_std(now);
            crate::admin::registry::PoolStats::add(&self.stats.queries, 1);
            self.insight_cached(plan, sql, protocol, sent);
            self.cache_key_done(key);
            return true;
        }
        METRICS.cache_misses.inc();
        let role = if plan.shared {
            "*"
        } else {
            self.pool.key().user.as_str()
        };
        let name = crate::cache::entry_name(&db.name, role, &plan.fingerprint, parts);
        tracing::trace!(%name, "miss");
        let mut snapshot = early.unwrap_or_else(|| db.snapshot(&plan.deps));
        snapshot.remote = current;
        let fill_key = key.as_slice().into();
        self.cache_key_done(key);
        if let Some(c) = self.cache.as_deref_mut() {
            c.fill = Some(Fill {
                key: fill_key,
                snapshot,
                ttl: plan.ttl,
                name,
                fingerprint: plan.fingerprint.clone(),
                buf: BytesMut::new(),
                skip: None,
                after: self.tx.in_flight,
            });
        }
        false
    }

    /// The cache's say on a client message: answered (`None`), held, or to be handled as it
    /// stands (returned).
    pub(super) async fn cache_message(
        &mut self,
        tag: u8,
        msg: BytesMut,
    ) -> Result<Option<BytesMut>, End> {
        if tag != b'Q' {
            return self.cache_hold(tag, msg).await;
        }
        self.release_held().await?;
        Ok((!self.cache_query(&msg).await).then_some(msg))
    }

    /// A simple `Query`: true when the cache answered it.
    pub(super) async fn cache_query(&mut self, msg: &[u8]) -> bool {
        if let Some(c) = self.cache.as_deref_mut() {
            c.query_plan = None;
        }
        let Some(sql) = msg.get(5..).and_then(|b| Some(&b[..memchr::memchr(0, b)?])) else {
            return false;
        };
        let Some((db, plan)) = self.cache_plan(sql).await else {
            return false;
        };
        self.cache_note_sent(&plan);
        let served = if !self.quiet() || !self.cache_eligible(&db, &plan) {
            tracing::trace!(cacheable = plan.cacheable, quiet = self.quiet(), status = %(self.tx.status as char), queue = ?self.queue, batch_open = self.tx.batch_open, in_flight = self.tx.in_flight, "simple query not looked up");
            false
        } else {
            let insight = (sql, crate::metrics::SIMPLE);
            self.cache_lookup(&db, &plan, &[b"Q", sql], insight).await
        };
        if !served {
            if let Some(c) = self.cache.as_deref_mut() {
                c.query_plan = Some(plan);
            }
        }
        served
    }

    /// The statement a fill was armed for was not sent (no server connection could be had).
    pub(super) fn cache_drop_fill(&mut self) {
        if let Some(c) = self.cache.as_deref_mut() {
            c.fill = None;
        }
    }

    /// Nothing held, filling or owed to Redis: the session may park.
    pub(super) fn cache_quiet(&self) -> bool {
        self.cache.as_ref().is_none_or(|c| {
            c.held.is_empty() && c.held_stmt.is_none() && c.fill.is_none() && c.remote.is_none()
        })
    }

    /// A `ReadyForQuery` from the server, before the client sees it: store a finished fill,
    /// bump writes (`writes`).
    pub(super) fn cache_ready(&mut self, status: u8) {
        let Some(c) = self.cache.as_deref_mut() else {
            return;
        };
        let max_ok = self.shared.cache.enabled();
        if let Some(f) = c.fill.as_mut().filter(|f| f.after > 0) {
            f.after -= 1;
        } else if let Some(f) = c.fill.take() {
            let db = c.db.clone();
            match f.skip {
                Some(reason) => METRICS.cache_fill_skips.with_label_values(&[reason]).inc(),
                None if max_ok && !f.buf.is_empty() => {
                    tracing::trace!(name = %f.name, snapshot = ?f.snapshot, "fill");
                    METRICS.cache_fills.inc();
                    let bytes = f.buf.freeze();
                    let tier = self.shared.cache.tier.clone();
                    if let (Some(t), Some(remote), Some(db)) = (tier, f.snapshot.remote.clone(), db)
                    {
                        t.store(
                            &db.name,
                            &f.key,
                            crate::cache::tier::Stored {
                                remote,
                                ttl_ms: f.ttl.as_millis() as u64,
                                name: f.name.clone(),
                                fingerprint: f.fingerprint.to_string(),
                                bytes: bytes.clone(),
                            },
                        );
                    }
                    self.shared.cache.put(
                        f.key,
                        Entry {
                            bytes,
                            snapshot: f.snapshot,
                            expires: Instant::now() + f.ttl,
                            name: f.name,
                            fingerprint: f.fingerprint.to_string(),
                            hits: AtomicU64::new(0),
                        },
                    );
                }
                None => {}
            }
        }
        self.cache_ready_writes(status);
    }

    /// The session is ending or lost its server: whatever it wrote may have committed, and a
    /// result being captured is not stored.
    pub(super) fn cache_session_end(&mut self) {
        self.cache_session_end_writes();
        if self
            .cache
            .as_deref_mut()
            .and_then(|c| c.fill.take())
            .is_some()
        {
            METRICS
                .cache_fill_skips
                .with_label_values(&["disconnect"])
                .inc();
        }
    }
}
