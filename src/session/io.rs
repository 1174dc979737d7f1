//! Moving bytes for a session without splitting sockets: one poll function tries, in order, to
//! write what is queued for the client and the server, then to read from either side. Reading a
//! side pauses while too much waits to be written to the other (back-pressure), and writes never
//! wait on reads, so a client that pipelines while the server streams rows cannot deadlock us.

use super::Session;
use crate::admin::registry::PoolStats;
use crate::metrics::METRICS;
use bytes::{Buf, BytesMut};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::AsyncWrite;
use tokio_util::io::poll_read_buf;

/// Pause reading a side while this much waits to be written to the other.
const HIGH_WATER: usize = 256 * 1024;
/// Room to make in a read buffer before reading.
const READ_CHUNK: usize = 16 * 1024;
/// Room for the first read into an empty buffer (a client's next statement, usually small): an
/// allocation this size comes from the allocator's per-thread cache. Busier streams grow to
/// `READ_CHUNK`.
const FIRST_READ: usize = 1024;

#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// New bytes from the client.
    Client,
    /// The client closed or failed.
    ClientGone,
    /// New bytes from the server.
    Server,
    /// The server closed or failed.
    ServerGone,
    /// A timeout may have fired.
    Timer,
    /// The shutdown phase changed.
    Phase,
    /// Nothing to do, and the sweep asked whether the session can park (`park`).
    Park,
}

/// Write as much of `buf` as the socket takes. `Err` when the socket is gone.
fn poll_drain<W: AsyncWrite + Unpin>(
    w: &mut W,
    buf: &mut BytesMut,
    needs_flush: &mut bool,
    cx: &mut Context<'_>,
) -> Result<(), ()> {
    while !buf.is_empty() {
        match Pin::new(&mut *w).poll_write(cx, buf) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Err(()),
            Poll::Ready(Ok(n)) => {
                buf.advance(n);
                *needs_flush = true;
            }
            Poll::Pending => return Ok(()),
        }
    }
    if buf.capacity() > 0 {
        // Written out: let go of the memory. Forwarded bytes are usually a slice of the other
        // side's read buffer, which an idle client must not keep alive.
        *buf = BytesMut::new();
    }
    if *needs_flush {
        match Pin::new(&mut *w).poll_flush(cx) {
            Poll::Ready(Ok(())) => *needs_flush = false,
            Poll::Ready(Err(_)) => return Err(()),
            Poll::Pending => {}
        }
    }
    Ok(())
}

/// Room in a server read buffer: replies may be large, so a buffer low on room grows to
/// `READ_CHUNK` (a pooled connection keeps its buffer, so this is rarely an allocation).
fn make_room(buf: &mut BytesMut) {
    if buf.capacity() == 0 {
        buf.reserve(FIRST_READ);
    } else if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
}

/// Room in the client's read buffer. With nothing pending the next message is most likely
/// small, and what is left of the buffer takes it: growing to `READ_CHUNK` here allocated
/// 16 KiB per transaction (the 1 KiB the first read took is still shared with the message
/// split off it). Part of a message in (a large one, COPY data): `READ_CHUNK`.
/// True when the buffer grew past a first read's size (`Session::shed_idle` does not keep it).
fn make_client_room(buf: &mut BytesMut) -> bool {
    let room = buf.capacity() - buf.len();
    if buf.is_empty() {
        if room < FIRST_READ / 4 {
            buf.reserve(FIRST_READ);
        }
        false
    } else if room < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
        true
    } else {
        false
    }
}

impl Session {
    /// Write what is queued for the client, as far as the socket takes it without waiting.
    pub(super) fn write_client_now(&mut self) {
        // A failed write shows again at the next `poll_io`, which reports it.
        let _ = self.drain_client(&mut Context::from_waker(std::task::Waker::noop()));
    }

    fn drain_client(&mut self, cx: &mut Context<'_>) -> Result<(), ()> {
        let queued = self.to_client.len();
        let drained = poll_drain(
            &mut self.client,
            &mut self.to_client,
            &mut self.client_needs_flush,
            cx,
        );
        let sent = queued - self.to_client.len();
        if sent > 0 {
            METRICS.client_bytes_sent.inc_by(sent as u64);
        }
        drained
    }

    pub(super) fn poll_io(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        // Registered before the phase is read: a change after the read wakes this task.
        self.ticket.info.register_waker(cx.waker());
        if self.shared.shutdown.phase() != self.phase_seen {
            return Poll::Ready(Event::Phase);
        }
        if self.drain_client(cx).is_err() {
            return Poll::Ready(Event::ClientGone);
        }
        if let Some(a) = &mut self.server {
            if poll_drain(&mut a.conn.stream, &mut a.to_server, &mut a.needs_flush, cx).is_err() {
                return Poll::Ready(Event::ServerGone);
            }
        }
        let backlog = self.server.as_ref().map_or(0, |a| a.to_server.len());
        // Between transactions a client holds no read buffer: it takes one (a spare of the
        // thread's, `spare`) when there are bytes to read.
        let ready = self.c_in.capacity() > self.c_in.len()
            || !matches!(self.client.poll_read_ready(cx), Poll::Pending);
        if backlog < HIGH_WATER && ready {
            if self.c_in.capacity() == 0 {
                self.c_in = super::spare::read_buffer();
            }
            self.c_in_grown |= make_client_room(&mut self.c_in);
            match poll_read_buf(Pin::new(&mut self.client), cx, &mut self.c_in) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Event::ClientGone),
                Poll::Ready(Ok(n)) => {
                    PoolStats::add(&self.stats.bytes_received, n as u64);
                    METRICS.client_bytes_received.inc_by(n as u64);
                    return Poll::Ready(Event::Client);
                }
                Poll::Pending => {}
            }
        }
        if self.to_client.len() < HIGH_WATER {
            if let Some(a) = &mut self.server {
                let conn = &mut *a.conn;
                make_room(&mut conn.buf);
                match poll_read_buf(Pin::new(&mut conn.stream), cx, &mut conn.buf) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                        return Poll::Ready(Event::ServerGone)
                    }
                    Poll::Ready(Ok(n)) => {
                        PoolStats::add(&self.stats.bytes_sent, n as u64);
                        return Poll::Ready(Event::Server);
                    }
                    Poll::Pending => {}
                }
            }
        }
        if self.ticket.info.park_asked() {
            return Poll::Ready(Event::Park);
        }
        Poll::Pending
    }
}
