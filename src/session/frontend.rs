//! Client messages on their way upstream.
//!
//! Session mode: bytes pass through; only headers are read, to count what owes a
//! `ReadyForQuery` and to catch `Terminate`.
//!
//! Transaction mode: each message is looked at whole (except `CopyData`, which streams).
//! - A server connection is borrowed before the first message that needs one.
//! - Statements of the extended protocol: `statements`.
//! - `SET`/`RESET` are noted for `settings`; statements that need one connection for good pin the
//!   client or are refused (`pool.session_state`), refusals going through the server so the
//!   transaction and pipeline semantics stay PostgreSQL's own.

use super::backend::{Expect, Kind};
use super::statements::{Prepared, CLOSE_COMPLETE, PARSE_COMPLETE};
use super::{End, Session};
use crate::admin::registry::PoolStats;
use crate::analysis::{Analysis, Analyzed, PinReason, SessionEffect};
use crate::config::{PoolMode, SessionStatePolicy};
use crate::error::{sqlstate, PgError, Severity};
use crate::wire::{self, read_cstr, Unreadable};
use bytes::{Bytes, BytesMut};
use std::sync::Arc;

/// The setting whose value `off` makes backslashes escape in plain string constants.
pub(super) const ESCAPES_OFF: (&str, &str) = ("standard_conforming_strings", "off");

impl Session {
    pub(super) async fn on_client_input(&mut self) -> Result<(), End> {
        if !self.tracked() {
            return self.pass_client();
        }
        if self.cache.is_some() {
            // Boxed once per read: the cache's futures are large and short-lived, and an
            // extended batch arrives as five messages in one read.
            return Box::pin(self.cached_client()).await;
        }
        self.pooled_client().await
    }

    /// Transaction mode: each whole message in turn; `CopyData` streams through.
    async fn pooled_client(&mut self) -> Result<(), End> {
        loop {
            // (Not `while let`: its scrutinee would stay in the future across the await.)
            let Some(msg) = self.next_message()? else {
                return Ok(());
            };
            self.dispatch(msg).await?;
        }
    }

    /// Transaction mode with the cache on: each message has the cache's say first.
    pub(super) async fn cached_client(&mut self) -> Result<(), End> {
        loop {
            let Some(msg) = self.next_message()? else {
                return Ok(());
            };
            let tag = msg[0];
            let msg = if self.skipping {
                msg
            } else {
                let Err(msg) = self.cache_hold_now(tag, msg) else {
                    continue;
                };
                match self.cache_message(tag, msg).await? {
                    Some(m) => m,
                    None => continue,
                }
            };
            self.dispatch(msg).await?;
        }
    }

    fn protocol_error(&mut self, e: wire::FrameError) -> End {
        crate::metrics::METRICS.protocol_errors.inc();
        PgError::fatal(
            sqlstate::PROTOCOL_VIOLATION,
            format!("invalid frontend message: {e}"),
        )
        .encode(&mut self.to_client);
        // What was walked of this input never went upstream, yet part of a message may have:
        // the server connection is out of step.
        if let Some(a) = &mut self.server {
            a.conn.broken = true;
        }
        End::Closed
    }

    /// Session mode: forward, counting what owes a `ReadyForQuery`; stop at `Terminate`.
    fn pass_client(&mut self) -> Result<(), End> {
        let (mut owed, mut queries) = (0, 0);
        let mut batch_open = self.tx.batch_open;
        let next = self.cscan.next(&self.c_in, |tag| {
            if matches!(tag, b'Q' | b'S' | b'F') {
                owed += 1;
            }
            match tag {
                b'P' | b'B' | b'D' | b'E' | b'C' => batch_open = true,
                b'S' => batch_open = false,
                _ => {}
            }
            if matches!(tag, b'Q' | b'E') {
                queries += 1;
            }
            tag == b'X'
        });
        PoolStats::add(&self.stats.queries, queries);
        self.tx.batch_open = batch_open;
        for _ in 0..owed {
            self.statement_sent();
        }
        let (n, terminate) = match next {
            Ok(Some(frame)) => (frame.start, true),
            Ok(None) => (self.cscan.walked(), false),
            Err(e) => return Err(self.protocol_error(e)),
        };
        let bytes = self.c_in.split_to(n);
        self.cscan.consumed(n);
        if let Some(a) = &mut self.server {
            forward(bytes, &mut a.to_server);
        }
        if terminate {
            return Err(End::ClientLeft);
        }
        Ok(())
    }

    /// Transaction mode: the client's next whole message, `None` when what is buffered holds
    /// none. `CopyData` before it streams through; `Terminate` ends the session.
    fn next_message(&mut self) -> Result<Option<BytesMut>, End> {
        let next = match self.cscan.next(&self.c_in, |tag| tag != b'd') {
            Ok(n) => n,
            Err(e) => return Err(self.protocol_error(e)),
        };
        let (streamed, frame) = match next {
            Some(f) => (f.start, Some(f)),
            None => (self.cscan.walked(), None),
        };
        if streamed > 0 {
            let bytes = self.c_in.split_to(streamed);
            self.cscan.consumed(streamed);
            // CopyData outside COPY is ignored by PostgreSQL too.
            if let Some(a) = &mut self.server {
                forward(bytes, &mut a.to_server);
            }
        }
        let Some(f) = frame else { return Ok(None) };
        // The rest of the buffer serves the next read (between transactions, the next
        // transaction's on this thread: `spare`).
        let msg = self.c_in.split_to(f.len);
        self.cscan.consumed(f.len);
        if msg[0] == b'X' {
            return Err(End::ClientLeft);
        }
        Ok(Some(msg))
    }

    /// Handle one message as it stands (the cache having had its say).
    pub(super) async fn dispatch(&mut self, msg: BytesMut) -> Result<(), End> {
        let tag = msg[0];
        if self.skipping {
            // After an error with no server to report it: skip to the Sync, as PostgreSQL does.
            if tag == b'S' {
                self.skipping = false;
                self.tx.batch_open = false;
                wire::ready_for_query(b'I', &mut self.to_client);
            }
            return Ok(());
        }
        if self.server.is_none() && self.answer_idle(tag, &msg) {
            return Ok(());
        }
        if self.server.is_none() {
            // The waiting part of it is boxed: inline, every idle client's task would carry
            // its size.
            if let Err(e) = self.attach_fast().await {
                tracing::info!(pool = %self.pool.key(), error = ?e, "no server connection for client");
                self.cache_drop_fill();
                let fatal = e.refused_by_upstream();
                e.to_client(Severity::Error, &mut self.to_client);
                if fatal {
                    return Err(End::Closed);
                }
                return self.answer_without_server(tag);
            }
        }
        match tag {
            b'Q' => self.on_query(msg),
            b'P' => self.on_parse(msg),
            b'B' => {
                if self.cache.is_some() {
                    Box::pin(self.cache_note_bind(&msg)).await;
                }
                self.on_bind(msg)
            }
            b'D' => self.on_describe(msg),
            b'C' => self.on_close(msg),
            b'E' => {
                PoolStats::add(&self.stats.queries, 1);
                let mut pos = 5;
                let timed = read_cstr(&msg, &mut pos).and_then(|p| self.insight_execute(p));
                self.send(msg);
                self.queue.push_back(Expect::timed(Kind::Execute, timed));
                self.tx.batch_open = true;
            }
            b'S' if self.tx.copy_in => self.send(msg), // ignored by the server in copy mode
            b'S' => {
                self.push(msg, Kind::Sync);
                self.tx.batch_open = false;
                self.statement_sent();
            }
            b'c' | b'f' => {
                if self.tx.copy_in {
                    self.tx.copy_in = false;
                } else {
                    self.queue.push_back(Expect::CopyEnd);
                }
                self.send(msg);
            }
            b'F' => {
                // A function called by OID: whatever it writes is unknown.
                self.cache_note_unknown_write();
                self.push(msg, Kind::Query);
                self.statement_sent();
            }
            // Flush, CopyDone, CopyFail and anything else: the server knows what to do.
            _ => self.send(msg),
        }
        // Answers the proxy gives itself go out as soon as they are in order: a client may wait
        // for them after a Flush with nothing else owed.
        self.emit_synthetic();
        Ok(())
    }

    /// Messages answered without borrowing a server connection (none attached, so nothing is
    /// owed and the transaction status is idle): a Sync or Flush with nothing before it, a `Close`
    /// of a statement, and a `Parse` of a statement this pool's server has parsed before — which
    /// also keeps clients that prepare synchronously (pgbench) from waiting on a busy pool.
    fn answer_idle(&mut self, tag: u8, msg: &[u8]) -> bool {
        match tag {
            b'S' => {
                self.tx.batch_open = false;
                wire::ready_for_query(b'I', &mut self.to_client);
                true
            }
            b'H' => true,
            b'C' if msg.get(5) == Some(&b'S') && msg.get(6) != Some(&0) => {
                let mut pos = 6;
                if let Some(name) = read_cstr(msg, &mut pos) {
                    self.stmts.remove(name);
                }
                self.tx.batch_open = true;
                self.to_client.extend_from_slice(CLOSE_COMPLETE);
                true
            }
            // (The unnamed statement goes with the rest of its batch: not read here.)
            b'P' if msg.get(5) != Some(&0) => {
                let body = &msg[5..];
                let mut pos = 0;
                let (Some(name), Some(query)) =
                    (read_cstr(body, &mut pos), read_cstr(body, &mut pos))
                else {
                    return false;
                };
                if name.is_empty() || self.stmts.contains_key(name) {
                    return false;
                }
                let analysis = self.analyze(query);
                if analysis.pin.is_some() || !analysis.effects.is_empty() {
                    return false;
                }
                let prepared = Arc::new(Prepared::new(query, &body[pos..], None, &[]));
                if !self
                    .shared
                    .pools
                    .statement_known(self.pool.key(), &prepared.server_name)
                {
                    return false;
                }
                self.stmts.insert(name.to_string(), prepared);
                self.tx.batch_open = true;
                self.to_client.extend_from_slice(PARSE_COMPLETE);
                true
            }
            _ => false,
        }
    }

    /// No server connection could be had: the error is queued; answer as PostgreSQL would after
    /// an error (a `ReadyForQuery` now for a Query, or at the next Sync for extended messages).
    fn answer_without_server(&mut self, tag: u8) -> Result<(), End> {
        match tag {
            b'Q' | b'S' | b'F' => {
                self.tx.batch_open = false;
                wire::ready_for_query(b'I', &mut self.to_client);
            }
            _ => self.skipping = true,
        }
        Ok(())
    }

    pub(super) fn send(&mut self, msg: BytesMut) {
        if let Some(a) = &mut self.server {
            forward(msg, &mut a.to_server);
        }
    }

    pub(super) fn push(&mut self, msg: BytesMut, kind: Kind) {
        self.send(msg);
        self.queue.push_back(Expect::reply(kind));
    }

    /// `push` for a message the proxy rewrote: framed straight into what goes to the server.
    pub(super) fn push_frame(&mut self, tag: u8, parts: &[&[u8]], kind: Kind) {
        if let Some(a) = &mut self.server {
            // The rest of the client's batch (already read) is copied in behind this message:
            // room for it now, rather than a reallocation for each message of it.
            let len = parts.iter().map(|p| p.len()).sum::<usize>() + 5;
            a.to_server.reserve(len + self.c_in.len().min(8192));
            wire::frame(tag, parts, &mut a.to_server);
        }
        self.queue.push_back(Expect::reply(kind));
    }

    /// A value of `standard_conforming_strings` seen for this client (startup, the server's
    /// report at login, a `ParameterStatus`).
    pub(super) fn note_escapes(&mut self, value: Option<&str>) {
        self.escapes |= value.is_some_and(|v| v.eq_ignore_ascii_case(ESCAPES_OFF.1));
    }

    /// The proxy cannot read `sql` the way the server will: a backslash while
    /// `standard_conforming_strings` is off (pg_query and the word scan assume it on, so a
    /// quote after a backslash may end a string for them and not for the server).
    pub(super) fn unreadable(&self, sql: &[u8]) -> bool {
        self.escapes && memchr::memchr(b'\\', sql).is_some()
    }

    /// The pooling analysis of `sql`: what it does to the session, from the memo. A text the
    /// proxy cannot read pins the client (or is refused, per `pool.session_state`).
    pub(super) fn analyze(&self, sql: &str) -> Analyzed {
        if self.unreadable(sql.as_bytes()) {
            return unread(PinReason::EscapedStrings);
        }
        self.shared.analyzer.analyze(sql)
    }

    /// Pins and settings effects of a statement; `Err` with the refusal when it may not run.
    pub(super) fn admit(&mut self, a: &Analysis) -> Result<(), PgError> {
        self.cache_note_pin(a.pin);
        if self.mode == PoolMode::Session {
            // The client has its server connection for good: nothing to pin or refuse.
            self.settings.record(&a.effects);
            return Ok(());
        }
        let policy = &self.cfg.pool;
        if let Some(reason) = a.pin {
            if self.pinned.is_none() {
                match policy.session_state {
                    SessionStatePolicy::Pin => {
                        tracing::debug!(pool = %self.pool.key(), %reason, "client pinned to its server connection");
                        self.pinned = Some(reason);
                        self.ticket.info.set_pinned();
                    }
                    SessionStatePolicy::Refuse => {
                        return Err(PgError::error(
                            sqlstate::FEATURE_NOT_SUPPORTED,
                            format!("{reason} is not supported in transaction pooling mode"),
                        )
                        .with_hint(
                            "use session pooling for this client (pool_mode = \"session\")",
                        ));
                    }
                }
            }
        }
        let sets = a
            .effects
            .iter()
            .any(|e| matches!(e, SessionEffect::Set(_) | SessionEffect::Reset(_)));
        if sets && !policy.track_set && self.pinned.is_none() {
            return Err(PgError::error(
                sqlstate::FEATURE_NOT_SUPPORTED,
                "session-level SET is not supported in transaction pooling mode",
            )
            .with_hint("use SET LOCAL inside a transaction, or set pool.track_set = true"));
        }
        self.settings.record(&a.effects);
        Ok(())
    }

    fn on_query(&mut self, msg: BytesMut) {
        PoolStats::add(&self.stats.queries, 1);
        let mut pos = 5;
        let plan = self.cache.as_deref_mut().and_then(|c| c.query_plan.take());
        let (analysis, timed) = match wire::read_text(&msg, &mut pos) {
            Ok(sql) => self.look_at_query(sql, plan.as_deref()),
            Err(Unreadable::NotUtf8) => (unread(PinReason::NotUtf8), None),
            // Malformed: the server says so.
            Err(Unreadable::Unterminated) => self.look_at_query("", plan.as_deref()),
        };
        // `DEALLOCATE name` of one of the client's protocol-level statements: the server knows it
        // under another name (and other clients may use it), so the proxy answers, as for `Close`.
        if let Some(name) = analysis
            .deallocate
            .as_deref()
            .filter(|_| analysis.statements == 1)
        {
            let on_server = self.mode == PoolMode::Session
                && self
                    .server
                    .as_mut()
                    .is_some_and(|a| a.conn.prepared.pop(name).is_some());
            if self.stmts.remove(name).is_some() && !on_server {
                self.expect(Expect::Synthetic(Bytes::from_static(
                    b"C\0\0\0\x0fDEALLOCATE\0",
                )));
                self.expect(Expect::SyntheticReady);
                self.tx.last_activity = tokio::time::Instant::now();
                return;
            }
        }
        match self.admit(&analysis) {
            Ok(()) => {
                self.send(msg);
                self.queue.push_back(Expect::timed(Kind::Query, timed));
            }
            Err(refusal) => {
                // `SELECT 1/0` fails on the server (aborting a transaction block, as a refused
                // statement should); the client sees the refusal in its place.
                let mut probe = BytesMut::new();
                wire::query("SELECT 1/0", &mut probe);
                self.send(probe);
                let mut expect = Expect::replacing(Kind::Query, refusal);
                if let Expect::Reply { timed: t, .. } = &mut expect {
                    *t = timed;
                }
                self.queue.push_back(expect);
            }
        }
        self.statement_sent();
    }
}

/// What the proxy knows of a statement it cannot read (`why`): nothing, so it pins.
pub(super) fn unread(why: PinReason) -> Analyzed {
    Analyzed::Parsed(Arc::new(Analysis {
        pin: Some(why),
        ..Default::default()
    }))
}

/// Append `bytes` to `dst`. No copy when `dst` is empty or ends where `bytes` begins (messages
/// split one after another off the same read buffer); otherwise the bytes are copied.
pub(super) fn forward(bytes: BytesMut, dst: &mut BytesMut) {
    dst.unsplit(bytes);
}
