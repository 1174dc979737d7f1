//! Client messages on their way upstream.
//!
//! Session mode: bytes pass through; only headers are read, to count what owes a
//! `ReadyForQuery` and to catch `Terminate`.
//!
//! Transaction mode: each message is looked at whole (except `CopyData`, which streams).
//! - A server connection is borrowed before the first message that needs one.
//! - Named statements get server-side names derived from their text and parameter types
//!   (`pgc_<hash>`), so any connection can serve any client; a statement missing on the connection
//!   at hand is parsed there first, its `ParseComplete` swallowed; a `Parse` the connection already
//!   has is answered by the proxy; `Close` of a statement is answered by the proxy (the server keeps
//!   it for reuse, bounded by an LRU per connection).
//! - `SET`/`RESET` are noted for `settings`; statements that need one connection for good pin the
//!   client or are refused (`pool.session_state`), refusals going through the server so the
//!   transaction and pipeline semantics stay PostgreSQL's own.

use super::backend::{Expect, Kind};
use super::{End, Session};
use crate::admin::registry::PoolStats;
use crate::analysis::{Analysis, Analyzed, SessionEffect};
use crate::config::{PoolMode, SessionStatePolicy};
use crate::error::{sqlstate, PgError, Severity};
use crate::wire::{self, read_cstr};
use bytes::{Bytes, BytesMut};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// The replies the proxy gives for the server: `ParseComplete` and `CloseComplete`.
const PARSE_COMPLETE: &[u8] = b"1\0\0\0\x04";
const CLOSE_COMPLETE: &[u8] = b"3\0\0\0\x04";

/// A client's named statement.
#[derive(Debug)]
pub struct Prepared {
    pub server_name: String,
    /// The `Parse` to send a connection that lacks the statement (already renamed).
    pub parse: Bytes,
    /// Its fingerprint (insight), made at the first `Bind`.
    pub fp: std::sync::OnceLock<Arc<crate::insight::fingerprint::Fingerprint>>,
    /// What running it does to the session's settings (`SET`, `set_config`): recorded at each
    /// `Bind`, as it runs, not only at the `Parse`.
    pub effects: Box<[SessionEffect]>,
}

impl Prepared {
    /// `param_types` is the rest of the client's `Parse` after the query text. `own_name`: the
    /// name to use on the server (session mode keeps the client's); otherwise one derived from
    /// text and types, shared by clients.
    fn new(
        query: &str,
        param_types: &[u8],
        own_name: Option<&str>,
        effects: &[SessionEffect],
    ) -> Self {
        let server_name = match own_name {
            Some(n) => n.to_string(),
            None => server_name(query, param_types),
        };
        let mut parse = BytesMut::new();
        wire::frame(
            b'P',
            &[
                server_name.as_bytes(),
                b"\0",
                query.as_bytes(),
                b"\0",
                param_types,
            ],
            &mut parse,
        );
        Prepared {
            server_name,
            parse: parse.freeze(),
            fp: Default::default(),
            effects: effects.into(),
        }
    }
}

/// Statement name on the server: the same text and parameter types give the same name, so
/// clients share server-side statements.
fn server_name(query: &str, param_types: &[u8]) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    query.hash(&mut h);
    param_types.hash(&mut h);
    format!("pgc_{:016x}", h.finish())
}

/// A `Bind` to a statement that cannot exist: the server fails it, which aborts the pipeline up to
/// the next `Sync` exactly as a real error would; the proxy shows the client its own error instead.
fn abort_probe(out: &mut BytesMut) {
    wire::frame(
        b'B',
        &[b"\0", b"pgcache.refused\0", &[0, 0, 0, 0, 0, 0]],
        out,
    );
}

impl Session {
    pub(super) async fn on_client_input(&mut self) -> Result<(), End> {
        if self.tracked() {
            self.pooled_client().await
        } else {
            self.pass_client()
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

    /// Transaction mode: handle each whole message; `CopyData` streams through.
    async fn pooled_client(&mut self) -> Result<(), End> {
        loop {
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
            let Some(f) = frame else { return Ok(()) };
            let msg = if f.len == self.c_in.len() && self.server.is_none() {
                // The one message that starts a transaction: the buffer goes with it (the
                // session would let go of it after the transaction anyway), saving the split's
                // bookkeeping allocation.
                std::mem::take(&mut self.c_in)
            } else {
                self.c_in.split_to(f.len)
            };
            self.cscan.consumed(f.len);
            let tag = msg[0];
            if tag == b'X' {
                return Err(End::ClientLeft);
            }
            // (Written out here rather than in a function of its own: an async fn's arguments
            // stay in its future for its whole life, and this one is in every idle client's.)
            let msg = if self.cache.is_some() && !self.skipping {
                let Err(msg) = self.cache_hold_now(tag, msg) else {
                    continue;
                };
                // Boxed: large and short-lived (a catalog read among them).
                match Box::pin(self.cache_message(tag, msg)).await? {
                    Some(m) => m,
                    None => continue,
                }
            } else {
                msg
            };
            self.dispatch(msg).await?;
        }
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
                let analysis = self.shared.analyzer.analyze(query);
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

    fn send(&mut self, msg: BytesMut) {
        if let Some(a) = &mut self.server {
            forward(msg, &mut a.to_server);
        }
    }

    fn push(&mut self, msg: BytesMut, kind: Kind) {
        self.send(msg);
        self.queue.push_back(Expect::reply(kind));
    }

    /// `push` for a message the proxy rewrote: framed straight into what goes to the server.
    fn push_frame(&mut self, tag: u8, parts: &[&[u8]], kind: Kind) {
        if let Some(a) = &mut self.server {
            // The rest of the client's batch (already read) is copied in behind this message:
            // room for it now, rather than a reallocation for each message of it.
            let len = parts.iter().map(|p| p.len()).sum::<usize>() + 5;
            a.to_server.reserve(len + self.c_in.len().min(8192));
            wire::frame(tag, parts, &mut a.to_server);
        }
        self.queue.push_back(Expect::reply(kind));
    }

    /// Pins and settings effects of a statement; `Err` with the refusal when it may not run.
    fn admit(&mut self, a: &Analysis) -> Result<(), PgError> {
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
        let sql = read_cstr(&msg, &mut pos).unwrap_or_default();
        let analysis = self.shared.analyzer.analyze(sql);
        let plan = self.cache.as_deref_mut().and_then(|c| c.query_plan.take());
        let timed = self.insight_query(sql, plan.as_deref());
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
                self.queue.push_back(Expect::Synthetic(Bytes::from_static(
                    b"C\0\0\0\x0fDEALLOCATE\0",
                )));
                self.queue.push_back(Expect::SyntheticReady);
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

    fn refuse_extended(&mut self, refusal: PgError) {
        let mut probe = BytesMut::new();
        abort_probe(&mut probe);
        self.send(probe);
        self.queue.push_back(Expect::replacing(Kind::Bind, refusal));
        self.tx.batch_open = true;
    }

    fn on_parse(&mut self, msg: BytesMut) {
        self.tx.batch_open = true;
        // The unnamed statement parsed again with the same text (drivers send one per query):
        // what it does to the session (nothing), its copy and its fingerprint are last time's.
        let repeat = self.unnamed_plain
            && msg.get(5) == Some(&0)
            && self.unnamed.as_deref() == Some(&msg[..]);
        if !repeat {
            let body = &msg[5..];
            let mut pos = 0;
            let (Some(name), Some(query)) = (read_cstr(body, &mut pos), read_cstr(body, &mut pos))
            else {
                // Malformed: the server says so.
                return self.push(
                    msg,
                    Kind::Parse {
                        server_name: None,
                        client_name: None,
                    },
                );
            };
            let analysis = self.shared.analyzer.analyze(query);
            if let Err(refusal) = self.admit(&analysis) {
                return self.refuse_extended(refusal);
            }
            if !name.is_empty() {
                return self.parse_named(name, query, &body[pos..], &analysis.effects);
            }
            self.insight_unnamed_parsed();
            // A copy is kept, to parse it again on another server connection; the message goes
            // on as it came, so the rest of the batch behind it joins it without a copy.
            self.unnamed = Some(Bytes::copy_from_slice(&msg));
            self.unnamed_plain = matches!(analysis, Analyzed::Plain);
        }
        if let Some(a) = &mut self.server {
            a.unnamed_valid = true;
            forward(msg, &mut a.to_server);
        }
        self.queue.push_back(Expect::reply(Kind::Parse {
            server_name: None,
            client_name: None,
        }));
    }

    /// A `Parse` of statement `name` (`types`: the parameter types, as sent).
    fn parse_named(&mut self, name: &str, query: &str, types: &[u8], effects: &[SessionEffect]) {
        if self.stmts.contains_key(name) {
            let refusal = PgError::error(
                sqlstate::DUPLICATE_PREPARED_STATEMENT,
                format!("prepared statement \"{name}\" already exists"),
            );
            return self.refuse_extended(refusal);
        }
        let prepared = Arc::new(Prepared::new(query, types, self.own_name(name), effects));
        let name = name.to_string();
        self.stmts.insert(name.clone(), prepared.clone());
        if self.ensure_prepared(&prepared, Some(name)) {
            self.queue
                .push_back(Expect::Synthetic(Bytes::from_static(PARSE_COMPLETE)));
        }
    }

    /// Session mode: statements keep the client's names on its own server connection (what
    /// `pg_prepared_statements` shows stays the client's).
    fn own_name<'a>(&self, name: &'a str) -> Option<&'a str> {
        (self.mode == PoolMode::Session).then_some(name)
    }

    /// A held batch was answered from the cache: its `Parse` takes effect for the client as if it
    /// had run; the server gets it when the statement is next used.
    pub(super) fn note_parse_served(&mut self, msg: BytesMut) {
        if msg.get(5) == Some(&0) {
            // The unnamed statement (its text was read when the batch was held); a new text
            // has a new fingerprint.
            if self.unnamed.as_deref() != Some(&msg[..]) {
                self.insight_unnamed_parsed();
                self.unnamed = Some(msg.freeze());
                self.unnamed_plain = false;
            }
            if let Some(a) = &mut self.server {
                a.unnamed_valid = false;
            }
            return;
        }
        let body = &msg[5..];
        let mut pos = 0;
        let (Some(name), Some(query)) = (read_cstr(body, &mut pos), read_cstr(body, &mut pos))
        else {
            return;
        };
        // (A statement the cache answered reads only: it changes no setting.)
        let prepared = Arc::new(Prepared::new(query, &body[pos..], self.own_name(name), &[]));
        self.stmts.insert(name.to_string(), prepared);
    }

    /// Make sure the attached connection has `p`, parsing it there if not. Returns true when it
    /// already had it. A parse sent for a client `Parse` is answered to the client; one the proxy
    /// sends on its own (`client_name` None) has its reply swallowed.
    fn ensure_prepared(&mut self, p: &Prepared, client_name: Option<String>) -> bool {
        let Some(a) = &mut self.server else {
            return false;
        };
        if a.conn.prepared.get(&p.server_name).is_some() {
            return true;
        }
        if let Some((evicted, ())) = a.conn.prepared.push(p.server_name.clone(), ()) {
            if evicted != p.server_name {
                wire::frame(b'C', &[b"S", evicted.as_bytes(), b"\0"], &mut a.to_server);
                self.queue.push_back(Expect::swallowed(Kind::Close));
            }
        }
        a.to_server.extend_from_slice(&p.parse);
        let kind = Kind::Parse {
            server_name: Some(p.server_name.clone()),
            client_name: client_name.clone(),
        };
        self.queue.push_back(match client_name {
            Some(_) => Expect::reply(kind),
            None => Expect::swallowed(kind),
        });
        false
    }

    /// Before a Bind or Describe of the unnamed statement on a connection that has not seen it.
    fn ensure_unnamed(&mut self) {
        let Some(a) = &mut self.server else { return };
        if a.unnamed_valid {
            return;
        }
        if let Some(parse) = &self.unnamed {
            a.to_server.extend_from_slice(parse);
            a.unnamed_valid = true;
            self.queue.push_back(Expect::swallowed(Kind::Parse {
                server_name: None,
                client_name: None,
            }));
        }
    }

    /// The client's statement `name`, made ready on the attached connection.
    fn statement_for(&mut self, name: &str) -> Option<Arc<Prepared>> {
        if name.is_empty() {
            self.ensure_unnamed();
            return None;
        }
        let p = self.stmts.get(name)?.clone();
        self.ensure_prepared(&p, None);
        Some(p)
    }

    fn on_bind(&mut self, msg: BytesMut) {
        self.tx.batch_open = true;
        let body = &msg[5..];
        let mut pos = 0;
        let (Some(portal), Some(stmt)) = (read_cstr(body, &mut pos), read_cstr(body, &mut pos))
        else {
            return self.push(msg, Kind::Bind);
        };
        let prepared = self.statement_for(stmt);
        // Settings it changes are read back after it has run: a driver that prepares in one
        // round trip and executes in the next would otherwise have them read before.
        match &prepared {
            Some(p) if !p.effects.is_empty() => self.settings.record(&p.effects),
            None if stmt.is_empty() && !self.unnamed_plain => {
                // (Rare: a text with session effects, or one served from the cache. The memo
                // has the analysis of the first kind.)
                let parsed = self
                    .unnamed
                    .as_ref()
                    .and_then(|m| super::held::read_parse(m));
                if let Some((_, sql, _)) = parsed {
                    let analysis = self.shared.analyzer.analyze(sql);
                    self.settings.record(&analysis.effects);
                }
            }
            _ => {}
        }
        if self.insight.is_some() {
            let unnamed = if stmt.is_empty() {
                self.unnamed.clone()
            } else {
                None
            };
            let parse = prepared.as_ref().map(|p| &p.parse).or(unnamed.as_ref());
            let fp = prepared.as_ref().map(|p| &p.fp);
            self.insight_bind(portal, parse, fp, &body[pos..]);
        }
        match prepared {
            // Unknown or unnamed: sent as is (the server reports a missing statement itself).
            None => self.push(msg, Kind::Bind),
            Some(p) => {
                let rest = &body[pos..];
                let parts: [&[u8]; 5] = [
                    portal.as_bytes(),
                    b"\0",
                    p.server_name.as_bytes(),
                    b"\0",
                    rest,
                ];
                self.push_frame(b'B', &parts, Kind::Bind);
            }
        }
    }

    fn on_describe(&mut self, msg: BytesMut) {
        self.tx.batch_open = true;
        let body = &msg[5..];
        let mut pos = 1;
        let (Some(&what), Some(name)) = (body.first(), read_cstr(body, &mut pos)) else {
            return self.push(msg, Kind::DescribePortal);
        };
        if what != b'S' {
            return self.push(msg, Kind::DescribePortal);
        }
        match self.statement_for(name) {
            None => self.push(msg, Kind::DescribeStatement),
            Some(p) => {
                let parts: [&[u8]; 3] = [b"S", p.server_name.as_bytes(), b"\0"];
                self.push_frame(b'D', &parts, Kind::DescribeStatement);
            }
        }
    }

    fn on_close(&mut self, msg: BytesMut) {
        self.tx.batch_open = true;
        let body = &msg[5..];
        let mut pos = 1;
        let (Some(&what), Some(name)) = (body.first(), read_cstr(body, &mut pos)) else {
            return self.push(msg, Kind::Close);
        };
        if what == b'S' && !name.is_empty() && self.mode == PoolMode::Session {
            // The client's own statement: closed on the server too (if it was ever parsed there).
            self.stmts.remove(name);
            if let Some(a) = &mut self.server {
                a.conn.prepared.pop(name);
            }
            return self.push(msg, Kind::Close);
        }
        if what == b'S' && !name.is_empty() {
            // The statement stays on the server for other clients; the client's name is gone.
            self.stmts.remove(name);
            self.queue
                .push_back(Expect::Synthetic(Bytes::from_static(CLOSE_COMPLETE)));
            return;
        }
        self.push(msg, Kind::Close);
    }
}

/// Append `bytes` to `dst`. No copy when `dst` is empty or ends where `bytes` begins (messages
/// split one after another off the same read buffer); otherwise the bytes are copied.
pub(super) fn forward(bytes: BytesMut, dst: &mut BytesMut) {
    dst.unsplit(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_depend_on_text_and_types() {
        let a = server_name("select $1", &[0, 1, 0, 0, 0, 23]);
        assert_eq!(a, server_name("select $1", &[0, 1, 0, 0, 0, 23]));
        assert_ne!(a, server_name("select $1", &[0, 1, 0, 0, 0, 25]));
        assert_ne!(a, server_name("select $2", &[0, 1, 0, 0, 0, 23]));
        assert!(a.starts_with("pgc_"));
    }

    #[test]
    fn abort_probe_is_a_well_formed_bind() {
        let mut out = BytesMut::new();
        abort_probe(&mut out);
        let mut s = wire::Scanner::new(1000);
        let f = s.next(&out, |_| true).unwrap().unwrap();
        assert_eq!(f.tag, b'B');
        assert_eq!(f.end(), out.len());
    }
}
