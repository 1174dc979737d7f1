//! Statements of the extended protocol in transaction mode: `Parse`, `Bind`, `Describe` and
//! `Close`, and the client's statements behind them.
//!
//! - Named statements get server-side names derived from their text and parameter types
//!   (`pgc_<hash>`), so any connection can serve any client; a statement missing on the connection
//!   at hand is parsed there first, its `ParseComplete` swallowed; a `Parse` the connection already
//!   has is answered by the proxy; `Close` of a statement is answered by the proxy (the server keeps
//!   it for reuse, bounded by an LRU per connection).
//! - The unnamed statement is kept (its `Parse`) to be parsed again on another connection.
//! - What a statement does to the session's settings is recorded when it is parsed and again at
//!   each `Bind`, so that settings are read back after it has run.

use super::backend::{Expect, Kind};
use super::frontend::{forward, unread};
use super::Session;
use crate::analysis::{Analyzed, PinReason, SessionEffect};
use crate::config::PoolMode;
use crate::error::{sqlstate, PgError};
use crate::wire::{self, read_cstr, Unreadable};
use bytes::{Bytes, BytesMut};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// The replies the proxy gives for the server: `ParseComplete` and `CloseComplete`.
pub(super) const PARSE_COMPLETE: &[u8] = b"1\0\0\0\x04";
pub(super) const CLOSE_COMPLETE: &[u8] = b"3\0\0\0\x04";

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
    pub(super) fn new(
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
    /// An extended-protocol message the proxy refuses: the probe fails on the server in its
    /// place, so the rest of the batch up to the `Sync` is skipped as after a real error, and the
    /// client sees `refusal`.
    fn refuse_extended(&mut self, refusal: PgError) {
        let mut probe = BytesMut::new();
        abort_probe(&mut probe);
        self.send(probe);
        self.queue.push_back(Expect::replacing(Kind::Bind, refusal));
        self.tx.batch_open = true;
    }

    pub(super) fn on_parse(&mut self, msg: BytesMut) {
        self.tx.batch_open = true;
        // The unnamed statement parsed again with the same text (drivers send one per query):
        // what it does to the session (nothing), its copy and its fingerprint are last time's.
        let repeat = self.unnamed_plain
            && msg.get(5) == Some(&0)
            && self.unnamed.as_deref() == Some(&msg[..]);
        if !repeat {
            let body = &msg[5..];
            let mut pos = 0;
            let name = wire::read_text(body, &mut pos);
            let query = wire::read_text(body, &mut pos);
            let (Ok(name), Ok(query)) = (name, query) else {
                if name != Err(Unreadable::Unterminated) && query != Err(Unreadable::Unterminated) {
                    // Whole, but its name or text is not UTF-8: unreadable, so pinned (or
                    // refused). A pinned client's statements need no tracking.
                    if let Err(refusal) = self.admit(&unread(PinReason::NotUtf8)) {
                        return self.refuse_extended(refusal);
                    }
                }
                // (Malformed: the server says so.)
                return self.push(
                    msg,
                    Kind::Parse {
                        server_name: None,
                        client_name: None,
                    },
                );
            };
            let analysis = self.analyze(query);
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
                // (Attached: the queue has room.)
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

    pub(super) fn on_bind(&mut self, msg: BytesMut) {
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
                    let analysis = self.analyze(sql);
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

    pub(super) fn on_describe(&mut self, msg: BytesMut) {
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

    pub(super) fn on_close(&mut self, msg: BytesMut) {
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
