//! Server messages on their way to the client.
//!
//! Session mode: only `ReadyForQuery` and `ErrorResponse` are looked at; everything else streams.
//!
//! Transaction mode: every message but `DataRow`/`CopyData` (which stream) is matched against the
//! queue of what was sent (`Expect`), in order. That is how the proxy answers for itself where it
//! must (a `ParseComplete` for a statement the connection already has, a `CloseComplete` for a
//! statement it keeps), swallows replies to messages it sent on its own (re-parsing a statement on
//! a new connection), and knows when a connection owes nothing and can go back to its pool. After
//! an error the server skips to the next `Sync`; so does the queue.

use super::frontend::forward;
use super::insight::Pending;
use super::{End, Session};
use crate::error::PgError;
use crate::wire;
use bytes::{Buf, Bytes, BytesMut};

/// What a message sent upstream will be answered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Simple query or function call: everything up to `ReadyForQuery`.
    Query,
    Parse {
        server_name: Option<String>,
        client_name: Option<String>,
    },
    Bind,
    DescribeStatement,
    DescribePortal,
    Execute,
    Close,
    Sync,
}

#[derive(Debug)]
pub enum Expect {
    /// Bytes the proxy sends the client when everything before them has been answered.
    Synthetic(Bytes),
    /// A `ReadyForQuery` with the transaction status in force when it is sent.
    SyntheticReady,
    /// Where the client ended a COPY FROM STDIN (`CopyDone`/`CopyFail`) before the server said
    /// it started one: a `Sync` queued before this mark reaches the server in copy mode and is
    /// ignored there. Not a reply; dropped when it reaches the front.
    CopyEnd,
    Reply {
        kind: Kind,
        /// Not for the client: the proxy sent the message on its own.
        swallow: bool,
        /// The client sees this error instead of the server's (a refusal).
        replace_error: Option<Bytes>,
        /// A statement being timed (`Query`, `Execute`; insight on).
        timed: Option<Box<Pending>>,
    },
}

impl Expect {
    pub fn reply(kind: Kind) -> Self {
        Expect::Reply {
            kind,
            swallow: false,
            replace_error: None,
            timed: None,
        }
    }
    pub fn timed(kind: Kind, timed: Option<Box<Pending>>) -> Self {
        Expect::Reply {
            kind,
            swallow: false,
            replace_error: None,
            timed,
        }
    }
    pub fn swallowed(kind: Kind) -> Self {
        Expect::Reply {
            kind,
            swallow: true,
            replace_error: None,
            timed: None,
        }
    }
    pub fn replacing(kind: Kind, refusal: PgError) -> Self {
        Expect::Reply {
            kind,
            swallow: false,
            replace_error: Some(refusal.frame()),
            timed: None,
        }
    }
}

/// How a message ends (or not) the reply at the head of the queue.
fn completes(kind: &Kind, tag: u8) -> bool {
    match kind {
        Kind::Query | Kind::Sync => tag == b'Z',
        Kind::Parse { .. } => tag == b'1',
        Kind::Bind => tag == b'2',
        Kind::Close => tag == b'3',
        Kind::DescribeStatement | Kind::DescribePortal => tag == b'T' || tag == b'n',
        Kind::Execute => matches!(tag, b'C' | b'I' | b's'),
    }
}

/// The server's bytes being handled, taken out of the connection's buffer so that replies can
/// be read in place while the session acts on them. `run` bytes at its front go to the client
/// as they are, in one piece when they leave (`Session::flush_run`): a reply's rows and the
/// messages around them are not split off one by one.
struct Input {
    buf: BytesMut,
    run: usize,
}

impl Session {
    pub(super) async fn on_server_input(&mut self) -> Result<(), End> {
        let Some(a) = &mut self.server else {
            return Ok(());
        };
        let mut input = Input {
            buf: std::mem::take(&mut a.conn.buf),
            run: 0,
        };
        let result = self.server_messages(&mut input);
        self.flush_run(&mut input);
        if let Some(a) = &mut self.server {
            a.conn.buf = input.buf;
        }
        result
    }

    fn server_messages(&mut self, input: &mut Input) -> Result<(), End> {
        let pooled = self.tracked();
        loop {
            let Some(a) = &mut self.server else {
                return Ok(());
            };
            let next = if pooled {
                a.scan.next(&input.buf, |t| t != b'D' && t != b'd')
            } else {
                a.scan.next(&input.buf, |t| t == b'Z' || t == b'E')
            };
            let next = match next {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "malformed message from upstream");
                    a.conn.broken = true;
                    self.flush_run(input);
                    PgError::fatal(
                        crate::error::sqlstate::PROTOCOL_VIOLATION,
                        format!("pgcache: upstream sent {e}"),
                    )
                    .encode(&mut self.to_client);
                    return Err(End::ServerLost);
                }
            };
            // What was walked over before the next message streams (rows).
            let Some(f) = next else {
                input.run = a.scan.walked();
                return Ok(());
            };
            input.run = f.start;
            let tag = input.buf[f.start];
            if !pooled {
                self.on_session_reply(input, f.len);
            } else if self.cache.is_some() || matches!(tag, b'N' | b'A' | b'S' | b'E' | b'G') {
                // Looked at whole (the cache captures replies in order with its own answers).
                self.flush_run(input);
                let msg = input.buf.split_to(f.len);
                self.consumed(f.len);
                self.on_reply(msg);
            } else {
                self.on_reply_in_place(input, f.len);
            }
        }
    }

    /// The scanner's view of the buffer lost `n` bytes at its front.
    fn consumed(&mut self, n: usize) {
        if let Some(a) = &mut self.server {
            a.scan.consumed(n);
        }
    }

    /// Send the client the bytes of the run.
    fn flush_run(&mut self, input: &mut Input) {
        if input.run > 0 {
            let bytes = input.buf.split_to(input.run);
            self.consumed(input.run);
            input.run = 0;
            self.deliver(bytes);
        }
    }

    /// A message the client does not get: whatever precedes it leaves first.
    fn drop_message(&mut self, input: &mut Input, len: usize) {
        self.flush_run(input);
        input.buf.advance(len);
        self.consumed(len);
    }

    /// The proxy's own answers that are next, behind the bytes of the run.
    fn emit_synthetic_after(&mut self, input: &mut Input) {
        if self.synthetic_next() {
            self.flush_run(input);
            self.emit_synthetic_now();
        }
    }

    /// Session mode: track the transaction status and fatal errors; forward.
    fn on_session_reply(&mut self, input: &mut Input, len: usize) {
        let msg = &input.buf[input.run..input.run + len];
        match msg[0] {
            b'Z' => self.statement_done(msg.get(5).copied().unwrap_or(b'I')),
            _ if wire::is_fatal(&msg[5..]) => {
                if let Some(a) = &mut self.server {
                    a.fatal = true;
                }
            }
            _ => {}
        }
        input.run += len;
    }

    /// Transaction mode, the cache off: a reply that is not a notice, an error or the start of a
    /// COPY, matched against the queue where it lies (as `on_reply` does).
    fn on_reply_in_place(&mut self, input: &mut Input, len: usize) {
        self.emit_synthetic_after(input);
        let at = input.run;
        match self.match_reply(&input.buf[at..at + len]) {
            Some((true, _)) => self.drop_message(input, len),
            // For the client, or nothing was expected (a server going away says so): it goes on.
            _ => input.run += len,
        }
        self.emit_synthetic_after(input);
    }

    /// A reply (not a notice, an error or the start of a COPY) against the head of the queue:
    /// note what it completes. `None` when nothing was expected; otherwise whether the client
    /// does not get it (the proxy sent what it answers on its own), and whether it is the
    /// `ReadyForQuery` that ends what was expected.
    fn match_reply(&mut self, msg: &[u8]) -> Option<(bool, bool)> {
        let tag = msg[0];
        if tag == b'C' {
            self.note_command(&msg[5..]);
            if let Some(Expect::Reply { timed: Some(p), .. }) = self.queue.front_mut() {
                Session::insight_rows(p, &msg[5..]);
            }
        }
        let Some(Expect::Reply { kind, swallow, .. }) = self.queue.front() else {
            return None;
        };
        let swallow = *swallow;
        if let (
            b'1',
            Kind::Parse {
                server_name: Some(n),
                ..
            },
        ) = (tag, kind)
        {
            self.shared.pools.note_statement(self.pool.key(), n);
        }
        if !completes(kind, tag) {
            return Some((swallow, false));
        }
        if let Some(Expect::Reply { timed: Some(p), .. }) = self.queue.pop_front() {
            self.insight_finish(*p, false);
        }
        if tag == b'Z' {
            let status = msg.get(5).copied().unwrap_or(b'I');
            self.statement_done(status);
            self.cache_ready(status);
        }
        Some((swallow, tag == b'Z'))
    }

    /// Transaction mode: match against the queue.
    fn on_reply(&mut self, msg: BytesMut) {
        let tag = msg[0];
        match tag {
            // Asynchronous: notices, notifications, parameter changes. Not part of a result:
            // a result that came with one is not cached.
            b'N' | b'A' => {
                self.spoil_fill("notice");
                return forward(msg, &mut self.to_client);
            }
            b'S' => {
                self.spoil_fill("notice");
                if let Some(a) = &mut self.server {
                    a.conn.note_parameter(&msg[5..]);
                }
                if let Some((name, value)) = crate::wire::parameter_status(&msg[5..]) {
                    if name == super::frontend::ESCAPES_OFF.0 {
                        self.note_escapes(Some(value));
                    }
                }
                return forward(msg, &mut self.to_client);
            }
            _ => {}
        }
        self.emit_synthetic();
        if tag == b'G' {
            self.copy_in_started();
        }
        if tag == b'E' {
            self.on_error(msg);
            self.emit_synthetic();
            return;
        }
        let Some((swallow, ready)) = self.match_reply(&msg) else {
            // Nothing expected (a server going away says so): pass it on.
            self.spoil_fill("error");
            return forward(msg, &mut self.to_client);
        };
        if !swallow {
            if ready {
                forward(msg, &mut self.to_client);
            } else {
                self.deliver(msg);
            }
        }
        self.emit_synthetic();
    }

    /// An `ErrorResponse`: the failed message's reply, and every reply up to the next Sync, will
    /// not come (a simple query still ends with its `ReadyForQuery`).
    fn on_error(&mut self, msg: BytesMut) {
        self.spoil_fill("error");
        // An error ends COPY FROM STDIN on the server's side.
        self.tx.copy_in = false;
        if wire::is_fatal(&msg[5..]) {
            if let Some(a) = &mut self.server {
                a.fatal = true;
            }
        }
        let error_body = self.insight.is_some().then(|| msg[5..].to_vec());
        let Some(Expect::Reply {
            kind,
            replace_error,
            timed,
            ..
        }) = self.queue.front_mut()
        else {
            return forward(msg, &mut self.to_client);
        };
        if let Some(p) = timed {
            Session::insight_error(p, &msg[5..]);
        }
        match replace_error {
            Some(refusal) => self.to_client.extend_from_slice(refusal),
            None => forward(msg, &mut self.to_client),
        }
        if *kind == Kind::Query {
            // Ends at its ReadyForQuery.
            return;
        }
        // The statement that failed is the first timed one up to the Sync (its Bind may be the
        // message that failed); the rest never ran.
        let mut failed = None;
        while let Some(front) = self.queue.front() {
            if matches!(
                front,
                Expect::Reply {
                    kind: Kind::Sync,
                    ..
                }
            ) {
                break;
            }
            let popped = self.queue.pop_front();
            if let Some(Expect::Reply { timed: Some(p), .. }) = popped {
                failed = failed.or(Some(p));
                continue;
            }
            if let Some(Expect::Reply {
                kind:
                    Kind::Parse {
                        server_name,
                        client_name,
                    },
                ..
            }) = popped
            {
                // The statement was not created: forget it on both sides.
                if let (Some(n), Some(a)) = (server_name, &mut self.server) {
                    a.conn.prepared.pop(&n);
                }
                if let Some(c) = client_name {
                    self.stmts.remove(&c);
                }
            }
        }
        if let Some(mut p) = failed {
            if let Some(body) = &error_body {
                Session::insight_error(&mut p, body);
            }
            self.insight_finish(*p, false);
        }
    }

    /// `DISCARD ALL` / `DEALLOCATE ALL` succeeded: every prepared statement on the connection is
    /// gone, the client's own included.
    fn note_command(&mut self, body: &[u8]) {
        if body.starts_with(b"DISCARD ALL") || body.starts_with(b"DEALLOCATE ALL") {
            if let Some(a) = &mut self.server {
                a.conn.prepared.clear();
                a.conn.applied.clear();
                a.unnamed_valid = false;
            }
            self.stmts.clear();
            self.unnamed = None;
        }
    }

    /// Server bytes for the client, captured when a result is being cached.
    fn deliver(&mut self, bytes: BytesMut) {
        if let Some(c) = self.cache.as_deref_mut() {
            c.capture(&bytes, self.shared.cache.config().max_entry_bytes);
        }
        forward(bytes, &mut self.to_client);
    }

    fn spoil_fill(&mut self, reason: &'static str) {
        if let Some(c) = self.cache.as_deref_mut() {
            c.spoil(reason);
        }
    }

    /// `CopyInResponse`: the server now ignores `Sync` until the copy ends. Syncs the client
    /// pipelined after the COPY's Execute (and before its CopyDone) get no reply: forget them.
    fn copy_in_started(&mut self) {
        let mut i = 0;
        let mut ended = false;
        while i < self.queue.len() {
            match &self.queue[i] {
                Expect::CopyEnd => {
                    self.queue.remove(i);
                    ended = true;
                    break;
                }
                Expect::Reply {
                    kind: Kind::Sync, ..
                } => {
                    self.queue.remove(i);
                    self.tx.in_flight = self.tx.in_flight.saturating_sub(1);
                }
                _ => i += 1,
            }
        }
        self.tx.copy_in = !ended;
    }

    /// The proxy's own answers (or a COPY's end mark) are next in the queue.
    #[inline]
    fn synthetic_next(&self) -> bool {
        matches!(
            self.queue.front(),
            Some(Expect::CopyEnd | Expect::Synthetic(_) | Expect::SyntheticReady)
        )
    }

    /// Send the client the proxy's own answers that are now in order.
    #[inline]
    pub(super) fn emit_synthetic(&mut self) {
        // Called around every reply; nearly always nothing synthetic is next.
        if self.synthetic_next() {
            self.emit_synthetic_now();
        }
    }

    fn emit_synthetic_now(&mut self) {
        // One allocation for all of it (the buffer is usually empty: it is freed once written).
        let room: usize = (self.queue.iter())
            .map_while(|e| match e {
                Expect::CopyEnd => Some(0),
                Expect::Synthetic(bytes) => Some(bytes.len()),
                Expect::SyntheticReady => Some(6),
                _ => None,
            })
            .sum();
        self.to_client.reserve(room);
        loop {
            match self.queue.front() {
                Some(Expect::CopyEnd) => {}
                Some(Expect::Synthetic(bytes)) => {
                    if let Some(c) = self.cache.as_deref_mut() {
                        c.capture(bytes, self.shared.cache.config().max_entry_bytes);
                    }
                    self.to_client.extend_from_slice(bytes)
                }
                Some(Expect::SyntheticReady) => {
                    wire::ready_for_query(self.tx.status, &mut self.to_client)
                }
                _ => return,
            }
            self.queue.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_complete_their_kind() {
        assert!(completes(&Kind::Sync, b'Z'));
        assert!(!completes(&Kind::Query, b'C'));
        assert!(completes(&Kind::Execute, b's'));
        assert!(completes(&Kind::DescribeStatement, b'n'));
        assert!(!completes(&Kind::DescribeStatement, b't'));
    }
}
