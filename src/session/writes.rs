//! A session's writes and the cache: what a statement about to be sent will write or change
//! (noted from its plan), bumping the versions of what the open transaction wrote at each of its
//! `ReadyForQuery`s and at its end — before the client hears of it — and telling Redis, so that
//! the other proxies drop what they hold of it too.

use super::Session;
use crate::analysis::PinReason;
use crate::cache::sql::TxControl;
use crate::cache::Plan;

impl Session {
    /// Record the effects of a statement about to be sent.
    pub(super) fn cache_note_sent(&mut self, plan: &Plan) {
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

    /// A message whose writes cannot be known (`FunctionCall`).
    pub(super) fn cache_note_unknown_write(&mut self) {
        if let Some(c) = self.cache.as_deref_mut() {
            c.written_all = true;
            c.off = true;
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
        let Some(c) = self.cache.as_deref_mut() else {
            return;
        };
        let Some(db) = c.db.clone() else { return };
        if c.ddl {
            db.catalog_stale();
            db.bump_all_local("ddl");
        } else if c.written_all {
            db.bump_all_local("write");
        }
        db.bump_local(&c.written, "write");
        if db.tier.is_some() && (c.ddl || c.written_all || !c.written.is_empty()) {
            let r = c.remote.get_or_insert_with(Default::default);
            r.0.extend(c.written.iter().cloned());
            r.1 |= c.ddl || c.written_all;
        }
    }

    /// A `ReadyForQuery` with transaction status `status`: bump what the transaction wrote so
    /// far; at its end, forget it.
    pub(super) fn cache_ready_writes(&mut self, status: u8) {
        let Some(c) = self.cache.as_deref_mut() else {
            return;
        };
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

    /// Bumps are waiting for Redis.
    pub(super) fn cache_remote_pending(&self) -> bool {
        self.cache.as_ref().is_some_and(|c| c.remote.is_some())
    }

    /// Tell Redis (and so the other proxies) what this client wrote, before it is answered: the
    /// `ReadyForQuery` waits in the client's buffer until this returns.
    pub(super) async fn cache_flush_remote(&mut self) {
        let Some(c) = self.cache.as_deref_mut() else {
            return;
        };
        let (Some((mut rels, all)), Some(db)) = (c.remote.take(), c.db.clone()) else {
            return;
        };
        let Some(t) = db.tier.clone() else { return };
        rels.sort();
        rels.dedup();
        if !t.bump(&db.name, &rels, all).await {
            tracing::debug!(
                "redis: a write's bump did not reach it in time; retried in the background"
            );
        }
    }

    /// The session is ending or lost its server: whatever it wrote may have committed.
    pub(super) fn cache_session_end_writes(&mut self) {
        self.cache_bump_writes();
        self.cache_clear_writes();
        if let Some(c) = self.cache.as_deref_mut() {
            // Nobody waits for an answer any more: tell Redis in the background.
            if let (Some((rels, all)), Some(db)) = (c.remote.take(), c.db.clone()) {
                if let Some(t) = db.tier.clone() {
                    tokio::spawn(async move { t.bump(&db.name, &rels, all).await });
                }
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
