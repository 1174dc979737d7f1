//! One client, from the end of authentication to goodbye.
//!
//! The session owns the client's socket and, while it holds one, a server connection
//! (`Attached`). `io` moves bytes; `frontend` decides what each client message becomes upstream;
//! `backend` matches server replies to what was sent. Rows are never decoded.
//!
//! Session mode: the server connection is held from login to goodbye and client bytes pass through
//! with only their headers read. Transaction mode: a server connection is borrowed for each
//! transaction (or pipeline of statements) and given back at `ReadyForQuery 'I'` once nothing is
//! owed; prepared statements, settings and pins follow the client (see `frontend`, `settings`).
//! Whatever the mode, a server connection goes back to its pool only when it stopped cleanly
//! between messages with nothing in flight; otherwise it is closed.

mod backend;
mod cached;
pub mod cancel;
mod frontend;
mod held;
mod insight;
mod io;
pub mod park;
pub mod settings;
mod spare;
pub mod startup;
mod statements;
mod timing;
mod writes;

use crate::admin::control;
use crate::admin::registry::{ClientState, ClientTicket, PoolStats};
use crate::analysis::PinReason;
use crate::config::{Config, PoolMode};
use crate::error::{sqlstate, PgError, Severity};
use crate::listener::Shared;
use crate::metrics::ClientGauge;
use crate::pool::upstream::ServerConn;
use crate::pool::{AcquireError, PoolRef, ServerGuard};
use crate::shutdown::Phase;
use crate::stream::Stream;
use crate::wire::Scanner;
use backend::Expect;
use bytes::{Bytes, BytesMut};
use cancel::Registration;
use settings::Settings;
use statements::Prepared;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

/// A server connection lent to this client.
pub struct Attached {
    conn: ServerGuard,
    to_server: BytesMut,
    /// Bytes written since the last flush (TLS buffers them).
    needs_flush: bool,
    scan: Scanner,
    /// The client's unnamed statement was parsed on this connection.
    unnamed_valid: bool,
    /// The server reported a FATAL error: it is going away.
    fatal: bool,
}

/// Protocol state between the client and whichever server connection serves it.
struct Tx {
    /// `ReadyForQuery` still owed (one per Query, Sync, FunctionCall sent).
    in_flight: usize,
    /// Transaction status from the last `ReadyForQuery`: `I`, `T` or `E`.
    status: u8,
    /// Extended-protocol messages sent since the last Sync.
    batch_open: bool,
    /// When the client last sent something or was last answered; during an event, its time.
    last_activity: Instant,
    /// The current statement is cancelled at this time (`query_timeout`).
    query_deadline: Option<Instant>,
    /// The server is in COPY FROM STDIN mode and the client has not ended it: a `Sync` now is
    /// ignored by the server and gets no `ReadyForQuery`.
    copy_in: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Terminate or EOF from the client.
    ClientLeft,
    /// The upstream closed or failed; the client was told.
    ServerLost,
    /// Malformed input, timeout, fatal pool error, shutdown: the client was told.
    Closed,
    /// Not an end: the session is idle and gives up its task until there is something to do
    /// (`park`).
    Parked,
}

pub struct Session {
    shared: Arc<Shared>,
    /// The configuration as of this event (see `Shared::config_generation`).
    cfg: Arc<Config>,
    cfg_generation: u64,
    /// The client's pool; its key names the pool in logs and the registry.
    pool: PoolRef,
    mode: PoolMode,
    client: Stream,
    c_in: BytesMut,
    /// `c_in` grew for a large message: it goes when the transaction ends, not to the spares
    /// (what it is a slice of may be large).
    c_in_grown: bool,
    to_client: BytesMut,
    client_needs_flush: bool,
    cscan: Scanner,
    /// Boxed: an idle client (most of them, with transaction pooling) holds no room for it.
    server: Option<Box<Attached>>,
    tx: Tx,
    /// Transaction mode: what each reply from the server answers, in order.
    queue: VecDeque<Expect>,
    /// Transaction mode: the client's named statements (a fast hasher: a client can only slow
    /// itself down).
    stmts: foldhash::HashMap<String, Arc<Prepared>>,
    /// Transaction mode: the client's last unnamed `Parse`.
    unnamed: Option<Bytes>,
    /// `unnamed` went upstream with a text that cannot touch the session (`Analyzed::Plain`):
    /// the same `Parse` again (drivers send one per query) needs no new look at its text, nor
    /// does a `Bind` of it.
    unnamed_plain: bool,
    settings: Settings,
    pinned: Option<PinReason>,
    /// Extended messages are being skipped up to the next Sync (an error was reported).
    skipping: bool,
    /// `standard_conforming_strings` was off for this client at some point (sticky): a text with
    /// a backslash is not read by the proxy (see `analyze`).
    escapes: bool,
    registration: Registration,
    /// The shutdown phase as of the last look (`check_shutdown`).
    phase_seen: Phase,
    /// This client in the admin registry.
    ticket: ClientTicket,
    stats: Arc<PoolStats>,
    /// The result cache's state for this client; none when caching is off.
    cache: Option<Box<cached::SessionCache>>,
    /// Statement timing and runs; none when `insight.enabled` is off.
    insight: Option<Box<insight::SessionInsight>>,
    /// The client's `max_clients` slot and its gauge, given back when the session ends.
    slot: Option<(OwnedSemaphorePermit, ClientGauge)>,
}

impl Session {
    /// Start a session for an authenticated client: get a server connection, apply the client's
    /// startup settings, send the startup reply. `None` when that failed (the client was told).
    pub async fn start(
        shared: Arc<Shared>,
        client: Stream,
        c_in: BytesMut,
        pool: PoolRef,
        settings: Settings,
        peer: std::net::SocketAddr,
    ) -> Option<Box<Session>> {
        let cfg_generation = shared.config_generation.load(Ordering::Acquire);
        let config = shared.config.load_full();
        let key = pool.key().clone();
        let mode = config.pool_mode(&key.database, &key.user);
        let max = config.proxy.max_message_bytes;
        let registration = shared.cancels.register();
        let ticket = shared
            .registry
            .client(key.clone(), peer, client.tls_negotiated());
        let stats = shared.registry.stats(&key);
        // On the heap, and so is the task's: an idle client's task holds a pointer, not a second
        // copy of the session (an async fn keeps its moved-in argument beside its locals).
        let mut s = Box::new(Session {
            shared,
            cfg: config,
            cfg_generation,
            pool,
            mode,
            client,
            c_in,
            c_in_grown: false,
            to_client: BytesMut::new(),
            client_needs_flush: false,
            cscan: Scanner::new(max),
            server: None,
            tx: Tx {
                in_flight: 0,
                status: b'I',
                batch_open: false,
                last_activity: Instant::now(),
                query_deadline: None,
                copy_in: false,
            },
            queue: VecDeque::new(),
            stmts: Default::default(),
            unnamed: None,
            unnamed_plain: false,
            settings,
            pinned: None,
            skipping: false,
            escapes: false,
            registration,
            phase_seen: Phase::Running,
            ticket,
            stats,
            cache: None,
            insight: None,
            slot: None,
        });
        if s.client.is_tls() {
            s.ticket.info.never_park();
        }
        if s.cfg.insight.enabled {
            s.insight = Some(Box::default());
        }
        if s.shared.cache.enabled() {
            s.cache = Some(Box::new(cached::SessionCache::new()));
        }
        // Transaction mode answers a login like one it has seen without borrowing a connection:
        // a busy pool must not keep clients from connecting.
        let startup = s.settings.startup().clone();
        s.note_escapes(startup.get(frontend::ESCAPES_OFF.0).map(String::as_str));
        if s.mode == PoolMode::Transaction {
            if let Some(params) = s.shared.pools.login_params(s.pool.key(), &startup) {
                s.note_escapes(params.get(frontend::ESCAPES_OFF.0).map(String::as_str));
                startup::reply(&params, s.registration.key, &mut s.to_client);
                return Some(s);
            }
        }
        if let Err(e) = s.attach_fast().await {
            e.to_client(Severity::Fatal, &mut s.to_client);
            s.flush_client().await;
            return None;
        }
        let params = s.server.as_ref()?.conn.params.clone();
        s.note_escapes(params.get(frontend::ESCAPES_OFF.0).map(String::as_str));
        startup::reply(&params, s.registration.key, &mut s.to_client);
        if s.mode == PoolMode::Transaction {
            s.shared
                .pools
                .note_login_params(s.pool.key(), startup, Arc::new(params));
            s.release().await;
        }
        Some(s)
    }

    /// Keep the client's slot and gauge for as long as the session lives.
    pub fn hold(&mut self, permit: OwnedSemaphorePermit, gauge: ClientGauge) {
        self.slot = Some((permit, gauge));
    }

    pub async fn run(mut self: Box<Self>) {
        let end = self.serve().await;
        if end == End::Parked {
            self.insight_park();
            park::park(self);
            return;
        }
        Box::pin(async {
            self.flush_client().await;
            // The client is done with us: close its socket before cleaning up the server side.
            let _ = tokio::time::timeout(Duration::from_secs(1), self.client.shutdown()).await;
            self.finish(end).await;
        })
        .await;
    }

    async fn serve(&mut self) -> End {
        // Bytes the client sent right behind its startup packet: no read will announce them.
        if !self.c_in.is_empty() {
            self.tx.last_activity = Instant::now();
            if let Err(end) = self.on_client_input().await {
                return end;
            }
        } else {
            // Login's read buffer (what is left of it): a client that connects and waits keeps
            // none, like one between transactions below.
            self.c_in = BytesMut::new();
        }
        loop {
            if let Some(end) = self.check_shutdown() {
                return end;
            }
            // No deadline (no timeouts configured, the common case): no timer and no select.
            // With one, the timer is polled first, so a stream that is always ready cannot
            // starve it.
            let event = match self.next_deadline() {
                None => std::future::poll_fn(|cx| self.poll_io(cx)).await,
                Some(deadline) => tokio::select! {
                    biased;
                    _ = tokio::time::sleep_until(deadline) => io::Event::Timer,
                    ev = std::future::poll_fn(|cx| self.poll_io(cx)) => ev,
                },
            };
            self.refresh_config();
            let busy = self.tx.in_flight > 0;
            if event == io::Event::Client || (event == io::Event::Server && busy) {
                // This event's time, read once: statement timing, deadlines and the idle
                // timeouts all use it. (A notice from the server to an idle client is not the
                // client's activity.)
                let now = Instant::now();
                self.tx.last_activity = now;
                self.ticket.info.note_activity(now.into_std());
            }
            let step = match event {
                io::Event::Client => self.on_client_input().await,
                io::Event::ClientGone => Err(End::ClientLeft),
                io::Event::Server => self.on_server_input().await,
                io::Event::ServerGone => Err(self.server_lost()),
                io::Event::Timer => Box::pin(self.on_timer()).await,
                io::Event::Phase => continue,
                io::Event::Park => {
                    self.ticket.info.set_running();
                    self.shed_idle();
                    if self.parkable() {
                        return End::Parked;
                    }
                    continue;
                }
            };
            if self.cache_remote_pending() {
                // Boxed like the other cache futures: idle clients do not carry it.
                Box::pin(self.cache_flush_remote()).await;
            }
            if let Err(end) = step {
                return end;
            }
            if self.releasable() {
                // The reply usually still sits in the server connection's read buffer: write it
                // out first, so the connection's next borrower finds that buffer free.
                self.write_client_now();
                self.release().await;
            }
            if self.server.is_none() {
                // Between transactions a client holds no read buffer or queue (10,000 idle
                // clients): the thread's next transaction reuses them.
                self.shed_idle();
            }
        }
    }

    /// Take a reloaded configuration, if there is one.
    fn refresh_config(&mut self) {
        let generation = self.shared.config_generation.load(Ordering::Acquire);
        if generation != self.cfg_generation {
            self.cfg = self.shared.config.load_full();
            self.cfg_generation = generation;
        }
    }

    /// Borrow a server connection in the client's settings: at once when one is idle and
    /// needs nothing sent first (no future, no timer, no allocation but the `Attached`),
    /// otherwise by waiting for one and bringing it to the client's settings.
    async fn attach_fast(&mut self) -> Result<(), AcquireError> {
        if !*self.shared.paused.borrow() {
            let now = self.tx.last_activity.into_std();
            if let Some(conn) = self
                .shared
                .pools
                .try_acquire(&mut self.pool, now, &self.cfg.pool)
            {
                crate::metrics::METRICS.pool_acquire_wait.observe(0.0);
                let ready = self
                    .settings
                    .sync_sql(&conn.applied, &conn.params)
                    .is_none();
                self.attached(conn);
                if ready {
                    return Ok(());
                }
            }
        }
        // Boxed: waiting and applying settings are large futures, and rare.
        Box::pin(self.attach()).await
    }

    /// Borrow a server connection (unless one is attached) and bring it to the client's
    /// settings; on failure none is attached.
    async fn attach(&mut self) -> Result<(), AcquireError> {
        if self.server.is_none() {
            let info = &self.ticket.info;
            info.set_state(ClientState::Waiting);
            let started = Instant::now();
            control::wait_unpaused(&self.shared).await;
            let got = self.shared.pools.acquire(self.pool.key()).await;
            let waited = started.elapsed();
            PoolStats::add(&self.stats.wait_us, waited.as_micros() as u64);
            crate::metrics::METRICS
                .pool_acquire_wait
                .observe(waited.as_secs_f64());
            match got {
                Ok(c) => self.attached(c),
                Err(e) => {
                    self.ticket.info.set_state(ClientState::Idle);
                    return Err(e);
                }
            }
        }
        let Some(a) = self.server.as_deref_mut() else {
            return Ok(());
        };
        if let Err(e) = self.settings.apply(&mut a.conn).await {
            if let Some(mut a) = self.detach() {
                a.conn.broken = e.retryable();
            }
            return Err(AcquireError::Upstream(Arc::new(e)));
        }
        Ok(())
    }

    /// Let go of the read buffer and the reply queue, if empty, to the thread's spares.
    fn shed_idle(&mut self) {
        if self.c_in.is_empty() && self.c_in.capacity() > 0 {
            let buf = std::mem::take(&mut self.c_in);
            if !std::mem::take(&mut self.c_in_grown) {
                spare::give_read_buffer(buf);
            }
        }
        if self.queue.is_empty() && self.queue.capacity() > 0 {
            spare::give_queue(std::mem::take(&mut self.queue));
        }
    }

    /// The proxy's own answer, owed to the client in order, where there may be no server
    /// connection (a cache hit): then the queue has no room yet, and it takes a spare's rather
    /// than a new one per hit. (With a server attached the queue has room: `attached`.)
    #[inline(always)]
    pub(super) fn expect(&mut self, e: Expect) {
        if self.queue.capacity() == 0 {
            self.queue_from_spares();
        }
        self.queue.push_back(e);
    }

    // Out of line: with a server attached (nearly every push) the queue has room already.
    #[cold]
    #[inline(never)]
    fn queue_from_spares(&mut self) {
        self.queue = spare::queue();
    }

    /// `conn` now serves this client.
    fn attached(&mut self, conn: ServerGuard) {
        let info = &self.ticket.info;
        info.set_state(ClientState::Active);
        info.set_server_pid(conn.pid);
        if let Some(t) = &conn.ticket {
            t.info.set_active(true);
        }
        self.registration.attach(conn.cancel.clone());
        // Room for a whole extended batch's replies at once (it would grow 0 → 4 → 8).
        if self.queue.capacity() == 0 {
            self.queue = spare::queue();
        } else {
            self.queue.reserve(spare::QUEUE);
        }
        let max = self.cfg.proxy.max_message_bytes;
        self.server = Some(Box::new(Attached {
            conn,
            to_server: BytesMut::new(),
            needs_flush: false,
            scan: Scanner::new(max),
            unnamed_valid: false,
            fatal: false,
        }));
    }

    /// Every message is looked at whole (transaction pooling, the cache or insight is on); otherwise
    /// bytes pass through with only their headers read.
    fn tracked(&self) -> bool {
        self.mode == PoolMode::Transaction || self.cache.is_some() || self.insight.is_some()
    }

    /// Transaction mode: the server connection can go back to its pool now.
    fn releasable(&self) -> bool {
        let Some(a) = &self.server else { return false };
        self.mode == PoolMode::Transaction
            && !self.cache.as_ref().is_some_and(|c| c.holding())
            && self.pinned.is_none()
            && self.queue.is_empty()
            && self.tx.in_flight == 0
            && self.tx.status == b'I'
            && !self.tx.batch_open
            && a.to_server.is_empty()
            && a.scan.at_boundary()
            && a.conn.buf.is_empty()
            && !a.fatal
    }

    /// Give the server connection back (transaction mode), after reading back the settings the
    /// client changed, if any (boxed: rare, and a large future).
    async fn release(&mut self) {
        let Some(mut a) = self.detach() else {
            return;
        };
        if self.settings.dirty() {
            Box::pin(self.capture_settings(&mut a.conn)).await;
        }
        a.conn.last_used = self.tx.last_activity.into_std();
    }

    /// Read back the settings the client changed, if any; on failure the connection is closed.
    async fn capture_settings(&mut self, conn: &mut ServerConn) {
        if !self.settings.dirty() {
            return;
        }
        if let Some(c) = self.cache.as_deref_mut() {
            c.settings_changed();
        }
        let limit = self.shared.config().upstream.connect_timeout;
        match tokio::time::timeout(limit, self.settings.capture(conn)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "reading back session settings failed; closing server connection");
                conn.broken = true;
            }
            Err(_) => {
                tracing::warn!(
                    "reading back session settings timed out; closing server connection"
                );
                conn.broken = true;
            }
        }
    }

    /// The session is over: return or close the server connection.
    async fn finish(&mut self, end: End) {
        self.cache_session_end();
        let Some(mut a) = self.detach() else {
            return;
        };
        let clean = end != End::ServerLost
            && !a.conn.broken
            && !self.tx.batch_open
            && self.queue.is_empty()
            && self.tx.in_flight == 0
            && a.to_server.is_empty()
            && a.scan.at_boundary()
            && self.cscan.at_boundary()
            && !a.fatal;
        if !clean {
            a.conn.broken = true;
            return;
        }
        let conn = &mut a.conn;
        let reset = match self.mode {
            // A transaction the client left open is rolled back; the rest of its state is the
            // connection's, tracked in `applied` and the prepared-statement LRU.
            PoolMode::Transaction if self.tx.status != b'I' => Some("ROLLBACK".to_string()),
            PoolMode::Transaction if self.pinned.is_none() => {
                self.capture_settings(conn).await;
                None
            }
            // Session mode, or a pinned client: its session state is not for the next client.
            _ => Some(self.shared.config().pool.reset_query.clone()).filter(|q| !q.is_empty()),
        };
        if let Some(sql) = reset {
            // Bounded: a server that does not answer is not worth keeping.
            let limit = self.shared.config().upstream.connect_timeout;
            match tokio::time::timeout(limit, conn.simple_query(&sql)).await {
                Ok(Ok(_)) if sql == "ROLLBACK" => {}
                Ok(Ok(_)) => {
                    conn.applied.clear();
                    conn.prepared.clear();
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "reset of server connection failed; closing it");
                    conn.broken = true;
                }
                Err(_) => {
                    tracing::warn!("reset of server connection timed out; closing it");
                    conn.broken = true;
                }
            }
        }
        conn.last_used = std::time::Instant::now();
    }

    /// The server connection no longer serves this client (the undoing of `attached`); the
    /// caller decides where it goes.
    fn detach(&mut self) -> Option<Box<Attached>> {
        let a = self.server.take()?;
        self.registration.attach(None);
        let info = &self.ticket.info;
        info.set_state(ClientState::Idle);
        info.set_server_pid(0);
        if let Some(t) = &a.conn.ticket {
            t.info.set_active(false);
        }
        Some(a)
    }

    /// The upstream went away: tell the client unless the server already did.
    fn server_lost(&mut self) -> End {
        self.cache_session_end();
        let told = self.server.as_ref().is_some_and(|a| a.fatal);
        if let Some(a) = &mut self.server {
            a.conn.broken = true;
        }
        if !told {
            PgError::fatal(
                sqlstate::CONNECTION_FAILURE,
                "server closed the connection unexpectedly",
            )
            .with_detail("the upstream PostgreSQL connection was lost")
            .encode(&mut self.to_client);
        }
        End::ServerLost
    }

    /// Write out what is queued for the client (at the end of a session).
    async fn flush_client(&mut self) {
        let guard = Duration::from_secs(5);
        let out = std::mem::take(&mut self.to_client);
        let _ = tokio::time::timeout(guard, async {
            self.client.write_all(&out).await?;
            self.client.flush().await
        })
        .await;
    }
}

impl AcquireError {
    /// Fatal for the client: the upstream itself refused it (authentication, unknown database).
    fn refused_by_upstream(&self) -> bool {
        matches!(self, AcquireError::Upstream(e) if e.is_fatal_refusal())
    }
}
