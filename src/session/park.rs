//! Parking idle clients: a client that has been quiet for a while gives up its task and its
//! socket's place in the runtime's reactor, and waits in the `Lot` — a map of sessions and an
//! epoll set of their sockets, which a thread of its own waits on — until there is something to
//! do. An idle client then costs its session, not a tokio task (384 bytes, 128-byte aligned) and
//! a reactor registration (256, aligned) as well, nor the holes aligned allocations leave.
//!
//! The sweep (`run`, every `TICK`) asks the sessions that are between transactions and have not
//! heard from their client for `pool.park_after` (250 ms; 0: never) to look at themselves: a busy
//! client never parks, and one that comes back pays a task spawn and two `epoll_ctl`s once per
//! quiet spell. One that can park (`Session::parkable`: plain TCP, no server connection, nothing
//! buffered or held either way, no transaction) ends its task with `End::Parked` and `park` takes
//! the session. It comes back (a new task, the same session) when its socket turns readable (a
//! statement, or the client leaving), when the registry wakes every session (shutdown, reload:
//! `Registry::set_unparker`), or when the sweep sees its deadline (`client_idle_timeout`) near.

use super::Session;
use crate::admin::registry::{clock_ms, lock};
use crate::listener::Shared;
use crate::metrics::METRICS;
use crate::shutdown::Phase;
use crate::stream::Stream;
use mio::unix::SourceFd;
use mio::{Events, Interest, Token};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// How often the sweep runs.
const TICK: Duration = Duration::from_millis(100);
/// Two sweeps: a parked session is woken when its deadline comes this near, and a session whose
/// deadline is nearer does not park.
const NEAR: Duration = Duration::from_millis(2 * TICK.as_millis() as u64);

/// Parked sessions and the poller that watches their sockets.
pub struct Lot {
    /// Adds and removes parked sockets (any thread); `run` owns the poll itself.
    registry: mio::Registry,
    poll: Mutex<Option<mio::Poll>>,
    /// By client id (the registry's, and the socket's token).
    parked: Mutex<foldhash::HashMap<u64, Box<Session>>>,
    /// Ids the registry asked back (shutdown, reload, a deadline near), for `run`.
    asked: Mutex<Vec<u64>>,
    bell: Notify,
}

impl Lot {
    pub fn new() -> io::Result<Lot> {
        let poll = mio::Poll::new()?;
        Ok(Lot {
            registry: poll.registry().try_clone()?,
            poll: Mutex::new(Some(poll)),
            parked: Default::default(),
            asked: Default::default(),
            bell: Notify::new(),
        })
    }

    /// Ask for a parked session back (`run` does it); any thread.
    pub fn ask_back(&self, id: u64) {
        lock(&self.asked).push(id);
        self.bell.notify_one();
    }

    /// Bring a parked session back: its socket rejoins the reactor and its task is spawned.
    /// Within the runtime. Nothing when it is not parked (any more).
    fn bring_back(&self, id: u64) {
        let Some(mut session) = lock(&self.parked).remove(&id) else {
            return;
        };
        METRICS.clients_parked.dec();
        if let Stream::Parked(Some(socket)) = &session.client {
            let _ = self.registry.deregister(&mut SourceFd(&socket.as_raw_fd()));
        }
        session.ticket.info.set_running();
        match session.client.unpark() {
            Ok(()) => drop(tokio::spawn(session.run())),
            // The socket could not rejoin the reactor: the client is closed (dropping the
            // session gives back its slot and registry entry; it holds no server connection).
            Err(e) => tracing::warn!(error = %e, "a parked client could not come back"),
        }
    }
}

/// Take a session whose task ended with `End::Parked`. Called from that task.
pub(super) fn park(mut session: Box<Session>) {
    let shared = session.shared.clone();
    let lot = &shared.parking;
    let id = session.ticket.info.id;
    let fd = match session.client.park() {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "could not park a client");
            if !matches!(session.client, Stream::Parked(None)) {
                drop(tokio::spawn(session.run()));
            }
            // Otherwise the reactor would not let the socket go and closed it: the session ends.
            return;
        }
    };
    let deadline = session.next_deadline().map(Instant::into_std);
    let mut parked = lock(&lot.parked);
    // Registered under the lock: an event for it waits for the lock, then finds the session.
    // A socket that is readable already reports at once.
    if let Err(e) =
        lot.registry
            .register(&mut SourceFd(&fd), Token(id as usize), Interest::READABLE)
    {
        drop(parked);
        tracing::warn!(error = %e, "could not park a client");
        if session.client.unpark().is_ok() {
            drop(tokio::spawn(session.run()));
        }
        return;
    }
    // Marked parked before the looks (all SeqCst): a shutdown or reload either rings it as
    // parked, or is seen here.
    session.ticket.info.set_parked(deadline);
    let missed = shared.shutdown.phase() != session.phase_seen
        || shared.config_generation.load(Ordering::SeqCst) != session.cfg_generation;
    parked.insert(id, session);
    METRICS.clients_parked.inc();
    METRICS.client_parks.inc();
    drop(parked);
    if missed {
        // A shutdown or reload came while it was on its way here.
        lot.ask_back(id);
    }
}

impl Session {
    /// Nothing would be lost or delayed if this session's task ended now and came back with
    /// the next readable byte. TLS may hold decrypted bytes its socket does not show, so a TLS
    /// client never parks.
    pub(super) fn parkable(&self) -> bool {
        let now = Instant::now();
        !self.client.is_tls()
            && self.server.is_none()
            && self.c_in.is_empty()
            && self.to_client.is_empty()
            && !self.client_needs_flush
            && self.tx.in_flight == 0
            && self.tx.status == b'I'
            && !self.tx.batch_open
            && !self.tx.copy_in
            && !self.skipping
            && self.queue.is_empty()
            && self.cscan.at_boundary()
            && self.cache_quiet()
            && self.phase_seen == Phase::Running
            && !self.cfg.pool.park_after.is_zero()
            && now.saturating_duration_since(self.tx.last_activity) >= self.cfg.pool.park_after
            && self.next_deadline().is_none_or(|d| d > now + NEAR)
    }
}

/// The lot's task: every `TICK` until shutdown begins, ask quiet sessions to park and bring
/// back parked ones whose deadline is near; always, bring back the sessions whose socket turned
/// readable (reported by the lot's thread) or that the registry asked back (shutdown, reload).
pub async fn run(shared: Arc<Shared>) {
    let Some(poll) = lock(&shared.parking.poll).take() else {
        return;
    };
    let lot = shared.parking.clone();
    // A thread of its own blocks on the parked sockets: no registration with the runtime, and
    // only the first statement after a quiet spell pays the hop.
    let watching = std::thread::Builder::new()
        .name("pgcache-park".into())
        .spawn(move || watch(poll, &lot));
    if let Err(e) = watching {
        tracing::error!(error = %e, "idle clients will not park: cannot start their thread");
        return;
    }
    {
        let weak = Arc::downgrade(&shared.parking);
        shared.registry.set_unparker(Box::new(move |id| {
            if let Some(lot) = weak.upgrade() {
                lot.ask_back(id);
            }
        }));
    }
    let lot = &shared.parking;
    let mut shutdown = shared.shutdown.clone();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sweeping = true;
    loop {
        tokio::select! {
            _ = tick.tick(), if sweeping => {
                let now = clock_ms(std::time::Instant::now());
                let ms = |d: Duration| d.as_millis() as u64;
                // Parking off: nobody is asked, and parked clients still wake for deadlines.
                let quiet = match shared.config().pool.park_after {
                    d if d.is_zero() => u64::MAX,
                    d => ms(d),
                };
                shared.registry.sweep_idle(now, quiet, ms(NEAR));
            }
            _ = shutdown.reached(Phase::Drain), if sweeping => sweeping = false,
            _ = lot.bell.notified() => {
                let asked = std::mem::take(&mut *lock(&lot.asked));
                for id in asked {
                    lot.bring_back(id);
                }
            }
        }
    }
}

/// The lot's thread: wait for parked sockets to turn readable and ask their sessions back.
fn watch(mut poll: mio::Poll, lot: &Lot) {
    let mut events = Events::with_capacity(256);
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() != io::ErrorKind::Interrupted {
                tracing::warn!(error = %e, "waiting on parked clients failed");
                std::thread::sleep(Duration::from_millis(100));
            }
            continue;
        }
        if events.is_empty() {
            continue;
        }
        {
            let mut asked = lock(&lot.asked);
            asked.extend(events.iter().map(|e| e.token().0 as u64));
        }
        lot.bell.notify_one();
    }
}
