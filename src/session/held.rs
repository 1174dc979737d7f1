//! Extended batches and the cache: a batch shaped `[Parse] Bind [Describe] Execute Sync` whose
//! statement is cacheable is held back until its `Sync` and looked up whole; anything else lets
//! what was held go, in order, as if it had just arrived. A hit registers the batch's `Parse` for
//! the client (the server gets it when the statement is next used); a miss sends the batch with a
//! fill armed. `Bind`s that are not held still report what their statement writes.

use super::{End, Session};
use crate::cache::sql::is_time_word;
use crate::cache::Plan;
use crate::wire::{find_nul, read_cstr};
use bytes::{Bytes, BytesMut};
use std::sync::Arc;

/// The statement a held batch runs: its plan, and its `Parse` (text and parameter types) when
/// that is not the batch's own held `Parse`.
pub(super) struct HeldStatement {
    parse: Option<Bytes>,
    plan: Arc<Plan>,
}

/// The message types of a held batch, in order (a batch held is at most `Parse Bind Describe
/// Execute`; longer ones are never held, so they never need more room than this).
struct Shape {
    tags: [u8; 8],
    len: usize,
}

impl Shape {
    fn of(held: &[BytesMut]) -> Self {
        let mut s = Shape {
            tags: [0; 8],
            len: held.len().min(8),
        };
        for (t, m) in s.tags.iter_mut().zip(held) {
            *t = m[0];
        }
        s
    }
    fn tags(&self) -> &[u8] {
        &self.tags[..self.len]
    }
}

/// A `Describe` or `Execute` that a batch held as `shape` takes: of the unnamed portal, no
/// row limit.
fn joins(tag: u8, shape: &[u8], msg: &[u8]) -> bool {
    match (tag, shape) {
        (b'D', [.., b'B']) => msg.get(5) == Some(&b'P') && msg.get(6) == Some(&0),
        (b'E', [.., b'B'] | [.., b'B', b'D']) => {
            msg.get(5) == Some(&0) && msg.get(6..10) == Some(&[0, 0, 0, 0])
        }
        _ => false,
    }
}

/// The bind message of an extended batch, read for its key.
struct BindParts<'a> {
    portal: &'a str,
    statement: &'a str,
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
    // The parameters' format codes, read where they are (no copy: one per `Bind`).
    let fmt = |i: usize| i16_at(2 + 2 * i);
    let mut p = 2 + 2 * nfmt;
    rest.get(..p)?;
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
        let text = match nfmt {
            0 => true,
            1 => fmt(0) == Some(0),
            _ => i < nfmt && fmt(i) == Some(0),
        };
        has_time_word |= text && is_time_word(v);
    }
    Some(BindParts {
        portal,
        statement,
        has_time_word,
    })
}

/// A `Bind` after its portal and statement names: formats, values and result formats.
fn bind_rest(msg: &[u8]) -> Option<&[u8]> {
    let mut body = msg.get(5..)?;
    for _ in 0..2 {
        body = &body[find_nul(body)? + 1..];
    }
    Some(body)
}

/// Name, query text and parameter types of a `Parse` message, as bytes (not checked as UTF-8).
pub(super) fn parse_parts(msg: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let body = msg.get(5..)?;
    let name_end = find_nul(body)?;
    let rest = &body[name_end + 1..];
    let sql_end = find_nul(rest)?;
    Some((&body[..name_end], &rest[..sql_end], &rest[sql_end + 1..]))
}

/// Name, query text and parameter types of a `Parse` message.
pub(super) fn read_parse(msg: &[u8]) -> Option<(&str, &str, &[u8])> {
    let (name, sql, types) = parse_parts(msg)?;
    Some((
        std::str::from_utf8(name).ok()?,
        std::str::from_utf8(sql).ok()?,
        types,
    ))
}

impl Session {
    /// The `Parse` (text and parameter types) of the client's statement `name` (a held `Parse`
    /// is not one yet: a `Bind` behind it is held too, or the `Parse` was let go first).
    fn statement_parse(&self, name: &str) -> Option<Bytes> {
        if name.is_empty() {
            self.unnamed.clone()
        } else {
            Some(self.stmts.get(name)?.parse.clone())
        }
    }

    /// A `Bind` outside a held batch: note the writes of what it runs. One the proxy cannot tie
    /// to a statement text it has seen (a name that is not UTF-8, a statement made with SQL
    /// `PREPARE`, a malformed message) may write anything.
    pub(super) async fn cache_note_bind(&mut self, msg: &[u8]) {
        let parse = read_bind(msg).and_then(|b| self.statement_parse(b.statement));
        let Some(parse) = parse else {
            return self.cache_note_unknown_write();
        };
        let Some((_, sql, _)) = parse_parts(&parse) else {
            return self.cache_note_unknown_write();
        };
        if let Some((_, plan)) = self.cache_plan(sql).await {
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
        let shape = Shape::of(&c.held);
        let shape = shape.tags();
        let accept = match (tag, shape) {
            (b'P', []) if self.quiet() => self.holdable_parse(&msg).await,
            (b'B', [] | [b'P']) if shape.is_empty() && !self.quiet() => false,
            (b'B', [] | [b'P']) => self.holdable_bind(&msg).await,
            (b'S', [.., b'E']) => return self.cache_batch(msg).await,
            _ => joins(tag, shape, &msg),
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

    /// `Describe` and `Execute` join a held batch without a look-up: taken here, without the
    /// (boxed) future of `cache_hold`. The message comes back when this cannot decide.
    pub(super) fn cache_hold_now(&mut self, tag: u8, msg: BytesMut) -> Result<(), BytesMut> {
        let Some(c) = self.cache.as_deref_mut() else {
            return Err(msg);
        };
        if matches!(tag, b'D' | b'E') && joins(tag, Shape::of(&c.held).tags(), &msg) {
            c.held.push(msg);
            return Ok(());
        }
        Err(msg)
    }

    async fn holdable_parse(&mut self, msg: &[u8]) -> bool {
        let Some((name, sql, _)) = parse_parts(msg) else {
            return false;
        };
        let Ok(name) = std::str::from_utf8(name) else {
            return false;
        };
        if !name.is_empty() && self.stmts.contains_key(name) {
            return false;
        }
        let Some((db, plan)) = self.cache_plan(sql).await else {
            return false;
        };
        if !self.cache_eligible(&db, &plan) {
            return false;
        }
        if let Some(c) = self.cache.as_deref_mut() {
            c.held_stmt = Some(HeldStatement { parse: None, plan });
        }
        true
    }

    async fn holdable_bind(&mut self, msg: &[u8]) -> bool {
        let Some(b) = read_bind(msg) else {
            return false;
        };
        if !b.portal.is_empty() || b.has_time_word {
            return false;
        }
        // With a held Parse, the Bind must run that statement (the key is made of its text),
        // planned when the Parse was held.
        if let Some(held) = self.cache.as_deref().and_then(|c| c.held.first()) {
            // (Its name only: the text is read once the batch is whole.)
            let name = held.get(5..).and_then(|b| Some(&b[..find_nul(b)?]));
            return name == Some(b.statement.as_bytes());
        }
        let Some(parse) = self.statement_parse(b.statement) else {
            return false;
        };
        let Some((_, sql, _)) = parse_parts(&parse) else {
            return false;
        };
        let Some((db, plan)) = self.cache_plan(sql).await else {
            return false;
        };
        if !self.cache_eligible(&db, &plan) {
            return false;
        }
        if let Some(c) = self.cache.as_deref_mut() {
            c.held_stmt = Some(HeldStatement {
                parse: Some(parse),
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
        let mut held = std::mem::take(&mut c.held);
        let Some(db) = c.db.clone() else {
            c.held = held;
            self.release_held().await?;
            return Ok(Some(sync));
        };
        let shape = Shape::of(&held);
        let shape = shape.tags();
        let bind = held.iter().find(|m| m[0] == b'B');
        let rest = bind.and_then(|m| bind_rest(m)).unwrap_or_default();
        let parse = match &stmt.parse {
            Some(p) => &p[..],
            None => held.first().map_or(&[][..], |m| &m[..]),
        };
        // Both were read whole when held: here only their parts are needed.
        let (_, sql, types) = parse_parts(parse).unwrap_or_default();
        let parts: [&[u8]; 4] = [shape, sql, types, rest];
        let plan = stmt.plan.clone();
        self.cache_note_sent(&plan);
        let served = self.quiet()
            && self.cache_eligible(&db, &plan)
            && self
                .cache_lookup(&db, &plan, &parts, (sql, crate::metrics::EXTENDED))
                .await;
        if !served {
            for m in held {
                Box::pin(self.dispatch(m)).await?;
            }
            return Ok(Some(sync));
        }
        // Served: the client's statement now exists as if the Parse had run.
        if let Some(p) = held.drain(..).find(|m| m[0] == b'P') {
            self.note_parse_served(p);
        }
        // The next batch is held in the same room.
        held.clear();
        if let Some(c) = self.cache.as_deref_mut() {
            c.held = held;
        }
        Ok(None)
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

    fn future_size<A, B, C, F>(_: impl Fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Each read from a client with the cache on boxes this future: it must stay within glibc's
    /// per-thread cache (blocks up to 1,032 bytes). Catalog reads, settings capture and Redis
    /// look-ups are boxed where they happen so that their size stays out of it (it was 2.5 KiB).
    #[test]
    fn the_future_of_each_read_with_the_cache_on_stays_small() {
        let hold = future_size(Session::cache_message);
        assert!(hold <= 1000, "cache_message's future is {hold} bytes");
        let read = future_size1(Session::cached_client);
        assert!(read <= 1032, "cached_client's future is {read} bytes");
    }

    fn future_size1<A, F>(_: impl Fn(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn parse_parts_and_text() {
        let mut m = BytesMut::new();
        crate::wire::frame(b'P', &[b"s1\0select $1\0", &[0, 1, 0, 0, 0, 23]], &mut m);
        let (name, sql, types) = parse_parts(&m).unwrap();
        assert_eq!(
            (name, sql, types),
            (&b"s1"[..], &b"select $1"[..], &[0, 1, 0, 0, 0, 23][..])
        );
        assert_eq!(read_parse(&m), Some(("s1", "select $1", types)));
        assert!(
            parse_parts(b"P\0\0\0\x08s1\0x").is_none(),
            "text without its NUL"
        );
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
