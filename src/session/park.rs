//! Parking idle clients: a client that has been quiet for a while gives up its task and waits
//! as a waker, registered with its socket and with the registry, that spawns the task again when
//! there is something to do. An idle client then costs its session and its socket's
//! registration, not a tokio task as well (384 bytes, 128-byte aligned, and the holes aligned
//! allocations leave).
//!
//! A sweep (`sweep`, every `TICK`) asks the sessions that are between transactions to look at
//! themselves. One that can park (`Session::parkable`: plain TCP, no server connection, nothing
//! buffered or held either way, no transaction, quiet for `QUIET`) ends its task with
//! `End::Parked` and `park` takes the session. It comes back (a new task, the same session) when
//! its socket turns readable (a statement, or the client leaving), when the registry wakes every
//! session (shutdown, reload), or when the sweep sees its deadline (`client_idle_timeout`) near.

use super::Session;
use crate::listener::Shared;
use crate::metrics::METRICS;
use crate::shutdown::Phase;
use std::sync::{Arc, Mutex};
use std::task::{Context, Wake, Waker};
use std::time::Duration;
use tokio::runtime::Handle;
use tokio::time::Instant;

/// How long a client stays quiet before it parks: a busy client never does, and one that comes
/// back pays a task spawn (a few microseconds) once per quiet spell.
pub const QUIET: Duration = Duration::from_millis(250);
/// How often the sweep runs; a parked session with a deadline is woken at least two sweeps
/// before it, and one whose deadline is nearer does not park.
pub const TICK: Duration = Duration::from_millis(100);

/// A parked session, and the waker that brings it back.
struct Parked {
    session: Mutex<Option<Box<Session>>>,
    runtime: Handle,
}

impl Wake for Parked {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Whichever waker fires first (socket, registry) takes the session; the others find none.
        let taken = self
            .session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(session) = taken {
            METRICS.clients_parked.dec();
            session.ticket.info.set_running();
            self.runtime.spawn(session.run());
        }
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        // Dropped still holding the session: the runtime went away without waking it.
        let session = self.session.get_mut().unwrap_or_else(|p| p.into_inner());
        if session.is_some() {
            METRICS.clients_parked.dec();
        }
    }
}

/// Take a session whose task ended with `End::Parked`. Called from that task.
pub(super) fn park(session: Box<Session>) {
    let parked = Arc::new(Parked {
        session: Mutex::new(None),
        runtime: Handle::current(),
    });
    let waker = Waker::from(parked.clone());
    let ready = {
        let mut slot = parked.session.lock().unwrap_or_else(|p| p.into_inner());
        let s = slot.insert(session);
        METRICS.clients_parked.inc();
        // Registered before the looks below, under the lock: a wake from now on waits for the
        // lock and then finds the session, so none is lost.
        s.ticket
            .info
            .set_parked(s.next_deadline().map(Instant::into_std));
        s.ticket.info.register_waker(&waker);
        let mut cx = Context::from_waker(&waker);
        s.client.poll_read_ready(&mut cx).is_ready()
            || s.shared.shutdown.phase() != s.phase_seen
            || s.shared
                .config_generation
                .load(std::sync::atomic::Ordering::Acquire)
                != s.cfg_generation
    };
    if ready {
        waker.wake();
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
            && now.saturating_duration_since(self.tx.last_activity) >= QUIET
            && self.next_deadline().is_none_or(|d| d > now + 2 * TICK)
    }
}

/// The sweep: every `TICK` until shutdown begins, ask idle sessions to park and wake parked
/// ones whose deadline is near.
pub async fn sweep(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.reached(Phase::Drain) => return,
        }
        let now = crate::admin::registry::clock_ms(std::time::Instant::now());
        let ms = |d: Duration| d.as_millis() as u64;
        shared.registry.sweep_idle(now, ms(QUIET), 2 * ms(TICK));
    }
}
