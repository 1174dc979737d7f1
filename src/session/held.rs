//! Extended batches and the cache: a batch shaped `[Parse] Bind [Describe] Execute Sync` whose
//! statement is cacheable is held back until its `Sync` and looked up whole; anything else lets
//! what was held go, in order, as if it had just arrived. A hit registers the batch's `Parse` for
//! the client (the server gets it when the statement is next used); a miss sends the batch with a
//! fill armed. `Bind`s that are not held still report what their statement writes.

use super::{End, Session};
use crate::cache::sql::is_time_word;
use crate::cache::Plan;
use crate::wire::read_cstr;
use bytes::{Bytes, BytesMut};
use std::sync::Arc;

/// The client's statement a held `Bind` runs: its `Parse` (text and parameter types) and plan.
pub(super) struct HeldStatement {
    parse: Bytes,
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
pub(super) fn read_parse(msg: &[u8]) -> Option<(&str, &str, &[u8])> {
    let body = msg.get(5..)?;
    let mut pos = 0;
    let name = read_cstr(body, &mut pos)?;
    let sql = read_cstr(body, &mut pos)?;
    Some((name, sql, &body[pos..]))
}

impl Session {
    /// The `Parse` (text and parameter types) of the statement a `Bind` to `name` runs, from
    /// this batch's held `Parse` or the client's statements. No copy but for a held `Parse`.
    fn statement_parse(&self, name: &str) -> Option<Bytes> {
        let c = self.cache.as_deref()?;
        if let Some(m) = c.held.first().filter(|m| m[0] == b'P') {
            if read_parse(m).is_some_and(|(n, ..)| n == name) {
                return Some(Bytes::copy_from_slice(m));
            }
        }
        if name.is_empty() {
            self.unnamed.clone()
        } else {
            Some(self.stmts.get(name)?.parse.clone())
        }
    }

    /// A `Bind` outside a held batch: note the writes of what it runs.
    pub(super) async fn cache_note_bind(&mut self, msg: &[u8]) {
        let Some(b) = read_bind(msg) else { return };
        let Some(parse) = self.statement_parse(b.statement) else {
            return;
        };
        let Some((_, sql, _)) = read_parse(&parse) else {
            return;
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
        match self.cache_plan(sql).await {
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
        let Some(parse) = self.statement_parse(b.statement) else {
            return false;
        };
        let Some((_, sql, _)) = read_parse(&parse) else {
            return false;
        };
        let Some((db, plan)) = self.cache_plan(sql).await else {
            return false;
        };
        if !self.cache_eligible(&db, &plan) {
            return false;
        }
        if let Some(c) = self.cache.as_deref_mut() {
            c.held_stmt = Some(HeldStatement { parse, plan });
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
        let shape = Shape::of(&held);
        let shape = shape.tags();
        let bind = held
            .iter()
            .find(|m| m[0] == b'B')
            .and_then(|m| read_bind(m));
        let rest = bind.map(|b| b.rest).unwrap_or_default();
        let (_, sql, types) = read_parse(&stmt.parse).unwrap_or_default();
        let parts: [&[u8]; 4] = [shape, sql.as_bytes(), types, rest];
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
        if let Some(p) = held.into_iter().find(|m| m[0] == b'P') {
            self.note_parse_served(p);
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
