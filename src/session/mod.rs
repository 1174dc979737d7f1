//! One client, from the end of authentication to goodbye (session pooling: one server connection
//! for the whole session). Bytes move both ways through two buffers; only message headers are read,
//! except `ReadyForQuery` (transaction state), `ErrorResponse` (fatal or not) and `Terminate`.
//! Rows are never decoded. When the client leaves, the server connection goes back to its pool
//! after `reset_query` only if it stopped cleanly between messages, idle, with nothing in flight;
//! otherwise it is closed.

pub mod cancel;
pub mod startup;

use crate::error::{sqlstate, PgError};
use crate::pool::ServerGuard;
use crate::shutdown::{Phase, Shutdown};
use crate::stream::Stream;
use crate::wire::{self, Scanner};
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Pause reading a side while this much is waiting to be written to the other.
const HIGH_WATER: usize = 256 * 1024;
const READ_CHUNK: usize = 16 * 1024;

pub struct Session {
    pub client: Stream,
    /// Bytes the client sent after its startup packet.
    pub client_buf: BytesMut,
    pub server: ServerGuard,
    pub max_message: usize,
    pub reset_query: String,
    pub shutdown: Shutdown,
}

#[derive(Debug, PartialEq, Eq)]
enum End {
    /// Terminate or EOF from the client.
    ClientLeft,
    /// The upstream closed or failed.
    ServerLost,
    /// Malformed client input; the client was told.
    ClientProtocol,
    /// Drain or forced shutdown; the client was told.
    Shutdown,
    Io,
}

/// What the relay knows about the protocol state of the pair.
struct State {
    /// `ReadyForQuery` messages still owed by the server (one per Query, Sync, FunctionCall).
    in_flight: usize,
    tx_status: u8,
    server_fatal: bool,
}

impl Session {
    pub async fn run(mut self) {
        let end = self.relay().await;
        let server = &mut *self.server;
        if server.broken {
            return;
        }
        if end == End::ServerLost {
            server.broken = true;
            return;
        }
        if !self.reset_query.is_empty() {
            if let Err(e) = server.simple_query(&self.reset_query).await {
                tracing::warn!(error = %e, "reset of server connection failed; closing it");
                server.broken = true;
            }
        }
        // Dropping the guard returns the connection to its pool (or closes it when broken).
    }

    async fn relay(&mut self) -> End {
        let max = self.max_message;
        let (mut cr, mut cw) = tokio::io::split(&mut self.client);
        let server = &mut *self.server;
        let mut s_in = std::mem::take(&mut server.buf);
        let (mut sr, mut sw) = tokio::io::split(&mut server.stream);
        let mut c_in = std::mem::take(&mut self.client_buf);
        let mut to_server = BytesMut::new();
        let mut to_client = BytesMut::new();
        let mut cscan = Scanner::new(max);
        let mut sscan = Scanner::new(max);
        let mut st = State {
            in_flight: 0,
            tx_status: b'I',
            server_fatal: false,
        };
        let mut shutdown = self.shutdown.clone();
        // Bytes the client sent along with its startup packet.
        let mut client_done = false;
        if !c_in.is_empty() {
            if let Err(end) = take_client(
                &mut c_in,
                &mut cscan,
                &mut to_server,
                &mut to_client,
                &mut st,
                &mut client_done,
            ) {
                let _ = cw.write_all(&to_client).await;
                return end;
            }
        }

        let end = loop {
            if client_done && to_server.is_empty() {
                break End::ClientLeft;
            }
            let phase = shutdown.phase();
            let idle = st.in_flight == 0
                && st.tx_status == b'I'
                && to_client.is_empty()
                && cscan.at_boundary();
            if phase == Phase::Force || (phase == Phase::Drain && idle) {
                PgError::fatal(
                    sqlstate::ADMIN_SHUTDOWN,
                    "terminating connection due to administrator command",
                )
                .encode(&mut to_client);
                let _ = cw.write_all(&to_client).await;
                let _ = cw.flush().await;
                break End::Shutdown;
            }
            if c_in.capacity() - c_in.len() < READ_CHUNK / 4 {
                c_in.reserve(READ_CHUNK);
            }
            if s_in.capacity() - s_in.len() < READ_CHUNK / 4 {
                s_in.reserve(READ_CHUNK);
            }
            tokio::select! {
                biased;
                r = cw.write(&to_client), if !to_client.is_empty() => match r {
                    Ok(n) if n > 0 => {
                        to_client.advance(n);
                        if to_client.is_empty() && cw.flush().await.is_err() {
                            break End::Io;
                        }
                    }
                    _ => break End::ClientLeft,
                },
                r = sw.write(&to_server), if !to_server.is_empty() => match r {
                    Ok(n) if n > 0 => {
                        to_server.advance(n);
                        if to_server.is_empty() && sw.flush().await.is_err() {
                            break End::ServerLost;
                        }
                    }
                    _ => break End::ServerLost,
                },
                r = cr.read_buf(&mut c_in), if !client_done && to_server.len() < HIGH_WATER => match r {
                    Ok(0) | Err(_) => {
                        // A half-forwarded message cannot be completed: the server is unusable.
                        if !cscan.at_boundary() {
                            server.broken = true;
                        }
                        break End::ClientLeft;
                    }
                    Ok(_) => {
                        if let Err(end) = take_client(&mut c_in, &mut cscan, &mut to_server, &mut to_client, &mut st, &mut client_done) {
                            let _ = cw.write_all(&to_client).await;
                            let _ = cw.flush().await;
                            break end;
                        }
                    }
                },
                r = sr.read_buf(&mut s_in), if to_client.len() < HIGH_WATER => match r {
                    Ok(0) | Err(_) => {
                        if !st.server_fatal {
                            PgError::fatal(sqlstate::CONNECTION_FAILURE, "server closed the connection unexpectedly")
                                .with_detail("the upstream PostgreSQL connection was lost")
                                .encode(&mut to_client);
                        }
                        let _ = cw.write_all(&to_client).await;
                        let _ = cw.flush().await;
                        break End::ServerLost;
                    }
                    Ok(_) => {
                        if let Err(e) = take_server(&mut s_in, &mut sscan, &mut to_client, &mut st) {
                            tracing::warn!(error = %e, "malformed message from upstream");
                            PgError::fatal(sqlstate::PROTOCOL_VIOLATION, format!("pgcache: upstream sent {e}"))
                                .encode(&mut to_client);
                            let _ = cw.write_all(&to_client).await;
                            break End::ServerLost;
                        }
                    }
                },
                _ = shutdown.changed() => {}
            }
        };
        // Reusable only when both directions stopped between messages with nothing owed.
        let clean = end != End::Io
            && end != End::ServerLost
            && cscan.at_boundary()
            && sscan.at_boundary()
            && to_server.is_empty()
            && st.in_flight == 0
            && st.tx_status == b'I'
            && !st.server_fatal;
        if !clean {
            server.broken = true;
        }
        drop((sr, sw));
        server.buf = s_in;
        end
    }
}

/// Move what the client sent into `to_server`, counting the messages that owe a
/// `ReadyForQuery`. Stops at `Terminate`.
fn take_client(
    c_in: &mut BytesMut,
    scan: &mut Scanner,
    to_server: &mut BytesMut,
    to_client: &mut BytesMut,
    st: &mut State,
    done: &mut bool,
) -> Result<(), End> {
    let mut owed = 0;
    let next = scan.next(c_in, |tag| {
        if matches!(tag, b'Q' | b'S' | b'F') {
            owed += 1;
        }
        tag == b'X'
    });
    st.in_flight += owed;
    match next {
        Ok(Some(frame)) => {
            // Terminate: forward what came before it, keep the server connection.
            forward(c_in, frame.start, to_server);
            scan.reset();
            c_in.clear();
            *done = true;
            Ok(())
        }
        Ok(None) => {
            let n = scan.walked();
            forward(c_in, n, to_server);
            scan.consumed(n);
            Ok(())
        }
        Err(e) => {
            // Nothing more goes upstream from this client: tell it why and close it.
            crate::metrics::METRICS.protocol_errors.inc();
            PgError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                format!("invalid frontend message: {e}"),
            )
            .encode(to_client);
            Err(End::ClientProtocol)
        }
    }
}

/// Move what the server sent into `to_client`, watching `ReadyForQuery` and fatal errors.
fn take_server(
    s_in: &mut BytesMut,
    scan: &mut Scanner,
    to_client: &mut BytesMut,
    st: &mut State,
) -> Result<(), wire::FrameError> {
    loop {
        match scan.next(s_in, |tag| matches!(tag, b'Z' | b'E'))? {
            Some(frame) => {
                let body = frame.body(s_in);
                match frame.tag {
                    b'Z' => {
                        st.in_flight = st.in_flight.saturating_sub(1);
                        st.tx_status = body.first().copied().unwrap_or(b'I');
                    }
                    _ => {
                        if wire::fields(body)
                            .iter()
                            .any(|(k, v)| *k == b'V' && (v == "FATAL" || v == "PANIC"))
                        {
                            st.server_fatal = true;
                        }
                    }
                }
            }
            None => {
                let n = scan.walked();
                forward(s_in, n, to_client);
                scan.consumed(n);
                return Ok(());
            }
        }
    }
}

/// Move `n` bytes from the front of `src` to the end of `dst`, without copying when `dst` is empty.
fn forward(src: &mut BytesMut, n: usize, dst: &mut BytesMut) {
    if n == 0 {
        return;
    }
    if dst.is_empty() {
        *dst = src.split_to(n);
    } else {
        dst.extend_from_slice(&src[..n]);
        src.advance(n);
    }
}
