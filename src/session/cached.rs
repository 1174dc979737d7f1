//! The cache on one session: when a read may be answered from the cache, what it is keyed by,
//! capturing a result on its way to the client, and bumping versions for this client's writes.
//!
//! A lookup happens only when nothing is owed by the server (so a hit cannot overtake earlier
//! replies) and the transaction is idle, or a read-only read-committed one when the rule allows.
//! Simple queries are looked up as they arrive; an extended batch (`[Parse] Bind [Describe]
//! Execute Sync`) is held back until its `Sync` and looked up whole. On a miss the result is
//! captured from the first reply to the `ReadyForQuery` and stored if nothing odd (an error, a
//! notice, a setting change, a size over `max_entry_bytes`) came with it, under the versions read
//! before the statement was sent. Writes are noted when sent and bumped at every
//! `ReadyForQuery` while their transaction is open, and at its end, before the client hears of it.

use super::backend::{Expect, Kind};
use super::{End, Session};
use crate::analysis::PinReason;
use crate::cache::sql::{is_time_word, TxControl};
use crate::cache::{catalog, Db, Entry, Plan, Snapshot};
use crate::metrics::METRICS;
use crate::wire::read_cstr;
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

/// The client's statement a held `Bind` runs.
struct HeldStatement {
    sql: String,
    param_types: Bytes,
    plan: Arc<Plan>,
}

#[derive(Default)]
pub(super) struct SessionCache {
    db: Option<Arc<Db>>,
    /// Never look up or fill again in this session (temporary tables, settings changed where
    /// the proxy cannot see them).
    off: bool,
    /// Relations written in the open transaction, bumped at each `ReadyForQuery`.
    written: Vec<Arc<str>>,
    written_all: bool,
    ddl: bool,
    fill: Option<Fill>,
    /// An extended batch held back until its `Sync`.
    held: Vec<BytesMut>,
    held_stmt: Option<HeldStatement>,
    /// The open transaction began with a plain `BEGIN` and has not written.
    tx_plain: bool,
    /// Key part for the session's settings, made again when they change.
    sig: Option<Bytes>,
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

/// The bind message of an extended batch, read for its key.
struct BindParts<'a> {
    portal: &'a str,
    statement: &'a str,
    /// Formats, values and result formats: everything after the names.
    rest: &'a [u8],
    /// A text parameter is `'now'` or the like.
    has_time_word: bool,
}

fn read_bind(msg: &[u8]) -> Option<BindParts<'_>> {
    let body = msg.get(5..)?;
    let mut pos = 0;
    let portal = read_cstr(body, &mut pos)?;
    let statement = read_cstr(body, &mut pos)?;
    let rest = &body[pos..];
    let i16_at = |p: usize| Some(i16::from_be_bytes(rest.get(p..p + 2)?.try_into().ok()?));
    let nfmt = i16_at(0)?.max(0) as usize;
    let fmts: Vec<i16> = (0..nfmt)
        .map(|i| i16_at(2 + 2 * i))
        .collect::<Option<_>>()?;
    let mut p = 2 + 2 * nfmt;
    let nparams = i16_at(p)?.max(0) as usize;
    p += 2;
    let mut has_time_word = false;
    for i in 0..nparams {
        let len = i32::from_be_bytes(rest.get(p..p + 4)?.try_into().ok()?);
        p += 4;
        if len < 0 {
            continue;
        }
        let v = rest.get(p..p + len as usize)?;
        p += len as usize;
        let text = match fmts.len() {
            0 => true,
            1 => fmts[0] == 0,
            _ => fmts.get(i) == Some(&0),
        };
        has_time_word |= text && is_time_word(v);
    }
    Some(BindParts {
        portal,
        statement,
        rest,
        has_time_word,
    })
}

/// Query text and parameter types of a `Parse` message.
fn read_parse(msg: &[u8]) -> Option<(&str, &str, &[u8])> {
    let body = msg.get(5..)?;
    let mut pos = 0;
    let name = read_cstr(body, &mut pos)?;
    let sql = read_cstr(body, &mut pos)?;
    Some((name, sql, &body[pos..]))
}

impl Session {
    fn cache_db(&mut self) -> Option<Arc<Db>> {
        let c = self.cache.as_deref_mut()?;
        if c.db.is_none() {
            let name = self
                .shared
                .config()
                .upstream_database(&self.key.database)
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
    fn quiet(&self) -> bool {
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
            self.load_catalog(db).await;
        }
        if !self.settings.dirty() || self.tx.status != b'I' || !self.idle() {
            return;
        }
        let Some(mut a) = self.server.take() else {
            return; // transaction mode: captured when the connection goes back
        };
        if a.to_server.is_empty() && a.conn.buf.is_empty() {
            self.capture_settings(&mut a.conn).await;
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
                let mut conn = self.shared.pools.connect_unpooled(&self.key).await?;
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
    async fn cache_plan(&mut self, sql: &str) -> Option<(Arc<Db>, Arc<Plan>)> {
        let db = self.cache_db()?;
        self.cache_prepare(&db).await;
        let plan = self.shared.cache.plan(&db, sql);
        Some((db, plan))
    }

    /// Record the effects of a statement about to be sent.
    fn cache_note_sent(&mut self, plan: &Plan) {
        let status = self.tx.status;
        let Some(c) = self.cache.as_deref_mut() else {
            return;
        };
        if plan.writes() {
            for w in plan.writes.iter() {
                if !c.written.contains(w) {
                    c.written.push(w.clone());
                }
            }
            c.written_all |= plan.writes_all;
            c.ddl |= plan.ddl;
            c.tx_plain = false;
        }
        if plan.sets {
            c.off = true;
        }
        match plan.tx {
            Some(TxControl::BeginPlain) if status == b'I' => c.tx_plain = true,
            Some(TxControl::BeginOther | TxControl::LocalSet) => c.tx_plain = false,
            _ => {}
        }
    }

    /// May this plan be looked up (and filled) now?
    fn cache_eligible(&self, db: &Db, plan: &Plan) -> bool {
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
    fn cache_key(&mut self, db: &Db, plan: &Plan, parts: &[&[u8]]) -> (Box<[u8]>, String) {
        let role = if plan.shared {
            "*"
        } else {
            self.key.user.as_str()
        };
        let c = self.cache.as_deref_mut().expect("cache on");
        let sig = c
            .sig
            .get_or_insert_with(|| crate::cache::settings_sig(self.settings.wanted.iter()));
        crate::cache::entry_key(&db.name, role, sig, &plan.fingerprint, parts)
    }

    /// Answer from the cache, or arm a fill for the statement about to go upstream.
    fn cache_lookup(&mut self, db: &Db, plan: &Plan, parts: &[&[u8]]) -> bool {
        let (key, name) = self.cache_key(db, plan, parts);
        tracing::debug!(%name, "cache lookup");
        if let Some(e) = self.shared.cache.get(&key, db) {
            tracing::trace!(%name, snapshot = ?e.snapshot, "hit");
            e.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            METRICS.cache_hits.inc();
            // In order behind whatever the server still owes.
            self.queue.push_back(Expect::Synthetic(e.bytes.clone()));
            self.queue.push_back(Expect::SyntheticReady);
            self.emit_synthetic();
            self.tx.last_activity = tokio::time::Instant::now();
            crate::admin::registry::PoolStats::add(&self.stats.queries, 1);
            return true;
        }
        METRICS.cache_misses.inc();
        let snapshot = db.snapshot(&plan.deps);
        if let Some(c) = self.cache.as_deref_mut() {
            c.fill = Some(Fill {
                key,
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

    /// A simple `Query`: true when the cache answered it.
    pub(super) async fn cache_query(&mut self, msg: &[u8]) -> bool {
        let mut pos = 5;
        let Some(sql) = read_cstr(msg, &mut pos) else {
            return false;
        };
        let sql = sql.to_string();
        let Some((db, plan)) = self.cache_plan(&sql).await else {
            return false;
        };
        self.cache_note_sent(&plan);
        if !self.quiet() || !self.cache_eligible(&db, &plan) {
            tracing::trace!(cacheable = plan.cacheable, quiet = self.quiet(), status = %(self.tx.status as char), queue = ?self.queue, batch_open = self.tx.batch_open, in_flight = self.tx.in_flight, "simple query not looked up");
            return false;
        }
        self.cache_lookup(&db, &plan, &[b"Q", sql.as_bytes()])
    }

    /// The statement text and parameter types a `Bind` to `name` runs, from this batch's held
    /// `Parse` or the client's statements.
    fn statement_text(&self, name: &str) -> Option<(String, Bytes)> {
        let c = self.cache.as_deref()?;
        if let Some((n, sql, types)) = c
            .held
            .first()
            .filter(|m| m[0] == b'P')
            .and_then(|m| read_parse(m))
        {
            if n == name {
                return Some((sql.to_string(), Bytes::copy_from_slice(types)));
            }
        }
        let parse = if name.is_empty() {
            self.unnamed.clone()?
        } else {
            self.stmts.get(name)?.parse.clone()
        };
        let (_, sql, types) = read_parse(&parse)?;
        Some((sql.to_string(), Bytes::copy_from_slice(types)))
    }

    /// A `Bind` outside a held batch: note the writes of what it runs.
    pub(super) async fn cache_note_bind(&mut self, msg: &[u8]) {
        let Some(b) = read_bind(msg) else { return };
        let Some((sql, _)) = self.statement_text(b.statement) else {
            return;
        };
        if let Some((_, plan)) = self.cache_plan(&sql).await {
            self.cache_note_sent(&plan);
        }
    }

    /// Extended messages: hold those that may make up a cacheable batch. Returns the message
    /// back when it is not held (anything held before it has been let go first).
    pub(super) async fn cache_hold(
        &mut self,
        tag: u8,
        msg: BytesMut,
    ) -> Result<Option<BytesMut>, End> {
        let Some(c) = self.cache.as_deref() else {
            return Ok(Some(msg));
        };
        let shape: Vec<u8> = c.held.iter().map(|m| m[0]).collect();
        let accept = match (tag, shape.as_slice()) {
            (b'P', []) if self.quiet() => self.holdable_parse(&msg).await,
            (b'B', [] | [b'P']) if shape.is_empty() && !self.quiet() => false,
            (b'B', [] | [b'P']) => self.holdable_bind(&msg).await,
            (b'D', [.., b'B']) => msg.get(5) == Some(&b'P') && msg.get(6) == Some(&0),
            (b'E', [.., b'B'] | [.., b'B', b'D']) => {
                // Unnamed portal, no row limit.
                msg.get(5) == Some(&0) && msg.get(6..10) == Some(&[0, 0, 0, 0])
            }
            (b'S', [.., b'E']) => return self.cache_batch(msg).await,
            _ => false,
        };
        if accept {
            if let Some(c) = self.cache.as_deref_mut() {
                c.held.push(msg);
            }
            return Ok(None);
        }
        tracing::debug!(tag = %(tag as char), ?shape, quiet = self.quiet(), in_flight = self.tx.in_flight, queue = self.queue.len(), batch_open = self.tx.batch_open, "not held");
        self.release_held().await?;
        Ok(Some(msg))
    }

    async fn holdable_parse(&mut self, msg: &[u8]) -> bool {
        let Some((name, sql, _)) = read_parse(msg) else {
            return false;
        };
        if !name.is_empty() && self.stmts.contains_key(name) {
            return false;
        }
        let sql = sql.to_string();
        match self.cache_plan(&sql).await {
            Some((db, plan)) => self.cache_eligible(&db, &plan),
            None => false,
        }
    }

    async fn holdable_bind(&mut self, msg: &[u8]) -> bool {
        let Some(b) = read_bind(msg) else {
            return false;
        };
        if !b.portal.is_empty() || b.has_time_word {
            return false;
        }
        // With a held Parse, the Bind must run that statement: the key is made of its text.
        let held_parse = self
            .cache
            .as_deref()
            .and_then(|c| c.held.first())
            .and_then(|m| read_parse(m));
        if held_parse.is_some_and(|(name, ..)| name != b.statement) {
            return false;
        }
        let Some((sql, param_types)) = self.statement_text(b.statement) else {
            return false;
        };
        let Some((db, plan)) = self.cache_plan(&sql).await else {
            return false;
        };
        if !self.cache_eligible(&db, &plan) {
            return false;
        }
        if let Some(c) = self.cache.as_deref_mut() {
            c.held_stmt = Some(HeldStatement {
                sql,
                param_types,
                plan,
            });
        }
        true
    }

    /// Send what was held, in order, as if it had just arrived.
    pub(super) async fn release_held(&mut self) -> Result<(), End> {
        let Some(c) = self.cache.as_deref_mut() else {
            return Ok(());
        };
        let held = std::mem::take(&mut c.held);
        let stmt = c.held_stmt.take();
        if let Some(s) = &stmt {
            self.cache_note_sent(&s.plan);
        }
        for m in held {
            Box::pin(self.dispatch(m)).await?;
        }
        Ok(())
    }

    /// The `Sync` of a held batch: answer it from the cache, or send it with a fill armed.
    async fn cache_batch(&mut self, sync: BytesMut) -> Result<Option<BytesMut>, End> {
        let c = self.cache.as_deref_mut().expect("cache on");
        let Some(stmt) = c.held_stmt.take() else {
            self.release_held().await?;
            return Ok(Some(sync));
        };
        let held = std::mem::take(&mut c.held);
        let Some(db) = c.db.clone() else {
            c.held = held;
            self.release_held().await?;
            return Ok(Some(sync));
        };
        let shape: Vec<u8> = held.iter().map(|m| m[0]).collect();
        let bind = held
            .iter()
            .find(|m| m[0] == b'B')
            .and_then(|m| read_bind(m));
        let rest = bind.map(|b| b.rest).unwrap_or_default();
        let parts: [&[u8]; 4] = [&shape, stmt.sql.as_bytes(), &stmt.param_types, rest];
        let plan = stmt.plan.clone();
        self.cache_note_sent(&plan);
        let served = self.quiet()
            && self.cache_eligible(&db, &plan)
            && self.cache_lookup(&db, &plan, &parts);
        if !served {
            for m in held {
                Box::pin(self.dispatch(m)).await?;
            }
            return Ok(Some(sync));
        }
        // Served: the client's statement now exists as if the Parse had run.
        if let Some(p) = held.into_iter().find(|m| m[0] == b'P') {
            self.note_parse_served(p);
        }
        Ok(None)
    }

    /// A message whose writes cannot be known (`FunctionCall`).
    pub(super) fn cache_note_unknown_write(&mut self) {
        if let Some(c) = self.cache.as_deref_mut() {
            c.written_all = true;
            c.off = true;
        }
    }

    /// The statement a fill was armed for was not sent (no server connection could be had).
    pub(super) fn cache_drop_fill(&mut self) {
        if let Some(c) = self.cache.as_deref_mut() {
            c.fill = None;
        }
    }

    /// After a record of the session's writes is no longer needed.
    fn cache_clear_writes(&mut self) {
        if let Some(c) = self.cache.as_deref_mut() {
            c.written.clear();
            c.written_all = false;
            c.ddl = false;
        }
    }

    /// Bump everything this session's open transaction wrote (at a `ReadyForQuery`, or when the
    /// session or its server goes away).
    pub(super) fn cache_bump_writes(&mut self) {
        let Some(c) = self.cache.as_deref() else {
            return;
        };
        let Some(db) = c.db.as_ref() else { return };
        if c.ddl {
            db.catalog_stale();
            db.bump_all("ddl");
        } else if c.written_all {
            db.bump_all("write");
        }
        db.bump(&c.written, "write");
    }

    /// A `ReadyForQuery` from the server, before the client sees it: store a finished fill,
    /// bump writes.
    pub(super) fn cache_ready(&mut self, status: u8) {
        let max_ok = self.shared.cache.enabled();
        let Some(c) = self.cache.as_deref_mut() else {
            return;
        };
        if let Some(f) = c.fill.as_mut().filter(|f| f.after > 0) {
            f.after -= 1;
        } else if let Some(f) = c.fill.take() {
            match f.skip {
                Some(reason) => METRICS.cache_fill_skips.with_label_values(&[reason]).inc(),
                None if max_ok && !f.buf.is_empty() => {
                    tracing::trace!(name = %f.name, snapshot = ?f.snapshot, "fill");
                    METRICS.cache_fills.inc();
                    self.shared.cache.put(
                        f.key,
                        Entry {
                            bytes: f.buf.freeze(),
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
        let c = self.cache.as_deref_mut().expect("cache on");
        let pending = c.written_all || c.ddl || !c.written.is_empty();
        if pending {
            self.cache_bump_writes();
        }
        if status == b'I' {
            self.cache_clear_writes();
            if let Some(c) = self.cache.as_deref_mut() {
                c.tx_plain = false;
            }
        }
    }

    /// The session is ending or lost its server: whatever it wrote may have committed.
    pub(super) fn cache_session_end(&mut self) {
        self.cache_bump_writes();
        self.cache_clear_writes();
        if let Some(c) = self.cache.as_deref_mut() {
            if c.fill.take().is_some() {
                METRICS
                    .cache_fill_skips
                    .with_label_values(&["disconnect"])
                    .inc();
            }
        }
    }

    /// A statement that pins a client in transaction mode; in either mode temporary tables
    /// could shadow cached names.
    pub(super) fn cache_note_pin(&mut self, reason: Option<PinReason>) {
        if reason == Some(PinReason::TempTable) {
            if let Some(c) = self.cache.as_deref_mut() {
                c.off = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind(params: &[(&[u8], i16)]) -> BytesMut {
        let mut body = Vec::new();
        body.extend_from_slice(b"\0\0");
        body.extend_from_slice(&(params.len() as i16).to_be_bytes());
        for (_, f) in params {
            body.extend_from_slice(&f.to_be_bytes());
        }
        body.extend_from_slice(&(params.len() as i16).to_be_bytes());
        for (v, _) in params {
            body.extend_from_slice(&(v.len() as i32).to_be_bytes());
            body.extend_from_slice(v);
        }
        body.extend_from_slice(&0i16.to_be_bytes());
        let mut out = BytesMut::new();
        crate::wire::frame(b'B', &[&body], &mut out);
        out
    }

    #[test]
    fn bind_parts_and_time_words() {
        let m = bind(&[(b"42", 0), (b" Now ", 0)]);
        let b = read_bind(&m).unwrap();
        assert_eq!((b.portal, b.statement), ("", ""));
        assert!(b.has_time_word);
        let m = bind(&[(b"now", 1)]);
        assert!(
            !read_bind(&m).unwrap().has_time_word,
            "binary values are not words"
        );
        let m = bind(&[(b"nowhere", 0)]);
        assert!(!read_bind(&m).unwrap().has_time_word);
        assert!(read_bind(b"B\0\0\0\x05\0").is_none());
    }
}
