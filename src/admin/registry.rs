//! Who is connected, for the admin console: every client session and every server connection
//! registers here and is removed when dropped. Sessions update their state with plain atomics.

use crate::pool::PoolKey;
use futures::task::AtomicWaker;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ClientState {
    /// Between transactions, no server connection.
    Idle = 0,
    /// Holding a server connection.
    Active = 1,
    /// Waiting for a server connection.
    Waiting = 2,
}

#[derive(Debug)]
pub struct ClientInfo {
    pub id: u64,
    pub pool: Arc<PoolKey>,
    pub addr: SocketAddr,
    pub connected: SystemTime,
    /// The TLS version and cipher suite the client negotiated (their IANA numbers), or `None`
    /// for a plain connection.
    pub tls: Option<(u16, u16)>,
    state: AtomicU8,
    tx_status: AtomicU8,
    server_pid: AtomicI32,
    pinned: AtomicBool,
    /// Parking (`session::park`): `RUNNING`, `PARK_ASKED`, `PARKED` or `NEVER_PARKS` in the
    /// low two bits; when parked, the session's next deadline above them (`clock_ms`, 0 for
    /// none: the sweep wakes it in time). One word, so the sweep's ask cannot undo a park.
    park: AtomicU64,
    /// When the session last heard from its client (`clock_ms`).
    active_at: AtomicU64,
    /// The session's task, woken when something outside it needs a look (shutdown, parking,
    /// reload); empty while the session is parked (`Registry::set_unparker` brings it back).
    waker: AtomicWaker,
}

/// `ClientInfo::park` states.
const RUNNING: u64 = 0;
const PARK_ASKED: u64 = 1;
const PARKED: u64 = 2;
const NEVER_PARKS: u64 = 3;

/// Milliseconds on a monotonic clock private to the registry (parking deadlines).
pub fn clock_ms(at: std::time::Instant) -> u64 {
    static BASE: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(std::time::Instant::now);
    at.saturating_duration_since(base).as_millis() as u64 + 1
}

impl ClientInfo {
    /// Remember the session's task (cheap when it is the same task as last time).
    pub fn register_waker(&self, waker: &std::task::Waker) {
        self.waker.register(waker);
    }
    pub fn set_state(&self, s: ClientState) {
        self.state.store(s as u8, Ordering::Relaxed);
    }
    pub fn state(&self) -> &'static str {
        match self.state.load(Ordering::Relaxed) {
            1 => "active",
            2 => "waiting",
            _ => "idle",
        }
    }
    pub fn set_tx_status(&self, s: u8) {
        self.tx_status.store(s, Ordering::Relaxed);
    }
    pub fn tx_status(&self) -> char {
        self.tx_status.load(Ordering::Relaxed) as char
    }
    pub fn set_server_pid(&self, pid: i32) {
        self.server_pid.store(pid, Ordering::Relaxed);
    }
    pub fn server_pid(&self) -> i32 {
        self.server_pid.load(Ordering::Relaxed)
    }
    pub fn set_pinned(&self) {
        self.pinned.store(true, Ordering::Relaxed);
    }
    pub fn pinned(&self) -> bool {
        self.pinned.load(Ordering::Relaxed)
    }
    /// The client was heard from at `at`.
    pub fn note_activity(&self, at: std::time::Instant) {
        self.active_at.store(clock_ms(at), Ordering::Relaxed);
    }
    /// The sweep never asks this session to park (TLS).
    pub fn never_park(&self) {
        self.park.store(NEVER_PARKS, Ordering::Relaxed);
    }
    /// The session is parked (`SHOW CLIENTS`).
    pub fn parked(&self) -> bool {
        self.park.load(Ordering::Relaxed) & 3 == PARKED
    }
    /// The sweep asked this session to park (and has not been answered yet).
    pub fn park_asked(&self) -> bool {
        self.park.load(Ordering::Relaxed) == PARK_ASKED
    }
    /// The session is running (it declined to park, or came back).
    pub fn set_running(&self) {
        self.park.store(RUNNING, Ordering::Relaxed);
    }
    /// The session parked; with a deadline it wants to be woken a little before it. Its task's
    /// waker is let go (it would keep the ended task's memory).
    pub fn set_parked(&self, wake_at: Option<std::time::Instant>) {
        let at = wake_at.map_or(0, clock_ms);
        // SeqCst, like `ring`'s load and the shutdown phase and configuration generation: either
        // a ring sees the session parked, or the session sees what the ring was about.
        self.park.store(at << 2 | PARKED, Ordering::SeqCst);
        drop(self.waker.take());
    }
}

#[derive(Debug)]
pub struct ServerInfo {
    pub pid: i32,
    pub pool: PoolKey,
    pub connected: SystemTime,
    active: AtomicBool,
}

impl ServerInfo {
    pub fn set_active(&self, active: bool) {
        self.active.store(active, Ordering::Relaxed);
    }
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }
}

/// Counters per pool (`SHOW STATS`).
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Transactions finished (each `ReadyForQuery 'I'`, autocommit statements included).
    pub transactions: AtomicU64,
    /// Simple queries and extended `Execute`s.
    pub queries: AtomicU64,
    /// Bytes received from clients.
    pub bytes_received: AtomicU64,
    /// Bytes sent to clients.
    pub bytes_sent: AtomicU64,
    /// Total time clients waited for a server connection, in microseconds.
    pub wait_us: AtomicU64,
}

impl PoolStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
pub struct Registry {
    clients: Mutex<BTreeMap<u64, Arc<ClientInfo>>>,
    servers: Mutex<BTreeMap<(i32, u64), Arc<ServerInfo>>>,
    stats: Mutex<BTreeMap<String, (PoolKey, Arc<PoolStats>)>>,
    next: AtomicU64,
    /// Brings a parked session back, by client id (`session::park`).
    unparker: std::sync::OnceLock<Unparker>,
}

pub type Unparker = Box<dyn Fn(u64) + Send + Sync>;

/// Keeps a registration alive; dropping it removes the entry.
pub struct ClientTicket {
    registry: Arc<Registry>,
    pub info: Arc<ClientInfo>,
}

pub struct ServerTicket {
    registry: Arc<Registry>,
    key: (i32, u64),
    pub info: Arc<ServerInfo>,
}

/// A mutex's guard, poisoned or not (the data behind these locks stays consistent).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Registry {
    pub fn client(
        self: &Arc<Self>,
        pool: Arc<PoolKey>,
        addr: SocketAddr,
        tls: Option<(u16, u16)>,
    ) -> ClientTicket {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let info = Arc::new(ClientInfo {
            id,
            pool,
            addr,
            connected: SystemTime::now(),
            tls,
            state: AtomicU8::new(0),
            tx_status: AtomicU8::new(b'I'),
            server_pid: AtomicI32::new(0),
            pinned: AtomicBool::new(false),
            park: AtomicU64::new(RUNNING),
            active_at: AtomicU64::new(clock_ms(std::time::Instant::now())),
            waker: AtomicWaker::new(),
        });
        lock(&self.clients).insert(id, info.clone());
        ClientTicket {
            registry: self.clone(),
            info,
        }
    }

    pub fn server(self: &Arc<Self>, pid: i32, pool: PoolKey) -> ServerTicket {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let info = Arc::new(ServerInfo {
            pid,
            pool,
            connected: SystemTime::now(),
            active: AtomicBool::new(false),
        });
        lock(&self.servers).insert((pid, seq), info.clone());
        ServerTicket {
            registry: self.clone(),
            key: (pid, seq),
            info,
        }
    }

    /// The counters of a pool, created on first use.
    pub fn stats(&self, pool: &PoolKey) -> Arc<PoolStats> {
        let mut stats = lock(&self.stats);
        stats
            .entry(pool.to_string())
            .or_insert_with(|| (pool.clone(), Arc::default()))
            .1
            .clone()
    }

    pub fn all_stats(&self) -> Vec<(PoolKey, Arc<PoolStats>)> {
        lock(&self.stats).values().cloned().collect()
    }

    pub fn clients(&self) -> Vec<Arc<ClientInfo>> {
        lock(&self.clients).values().cloned().collect()
    }

    pub fn servers(&self) -> Vec<Arc<ServerInfo>> {
        lock(&self.servers).values().cloned().collect()
    }

    /// Who brings parked sessions back (set once, at start).
    pub fn set_unparker(&self, unparker: Unparker) {
        let _ = self.unparker.set(unparker);
    }

    /// Wake a session: its task, or the session itself if it is parked. Both, when it is
    /// between the two: a session that came back registers its task's waker before it looks.
    fn ring(&self, c: &ClientInfo) {
        if c.park.load(Ordering::SeqCst) & 3 == PARKED {
            if let Some(unpark) = self.unparker.get() {
                unpark(c.id);
            }
        }
        c.waker.wake();
    }

    /// Wake every client session (it then re-reads the shutdown phase and the configuration).
    /// Outside the lock: bringing a parked session back may end it (its socket cannot rejoin
    /// the reactor), and its ticket takes the lock.
    pub fn wake_clients(&self) {
        for c in self.clients() {
            self.ring(&c);
        }
    }

    /// One sweep of idle sessions (`session::park`): ask every session that is between
    /// transactions, has not heard from its client for `quiet_ms` and still has a task to look
    /// at whether it can park, and wake every parked session whose deadline falls before
    /// `now_ms + horizon_ms`.
    pub fn sweep_idle(&self, now_ms: u64, quiet_ms: u64, horizon_ms: u64) {
        let mut wake = Vec::new();
        for c in lock(&self.clients).values() {
            let park = c.park.load(Ordering::Acquire);
            match park & 3 {
                RUNNING
                    if c.state.load(Ordering::Relaxed) == ClientState::Idle as u8
                        && c.active_at.load(Ordering::Relaxed).saturating_add(quiet_ms)
                            <= now_ms
                        && c.park
                            .compare_exchange(
                                RUNNING,
                                PARK_ASKED,
                                Ordering::AcqRel,
                                Ordering::Relaxed,
                            )
                            .is_ok() =>
                {
                    wake.push(c.clone());
                }
                PARKED => {
                    let at = park >> 2;
                    if at != 0 && at <= now_ms + horizon_ms {
                        wake.push(c.clone());
                    }
                }
                _ => {}
            }
        }
        for c in wake {
            self.ring(&c);
        }
    }
}

impl Drop for ClientTicket {
    fn drop(&mut self) {
        lock(&self.registry.clients).remove(&self.info.id);
    }
}

impl Drop for ServerTicket {
    fn drop(&mut self) {
        lock(&self.registry.servers).remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_remove_their_entries() {
        let r = Arc::new(Registry::default());
        let key = PoolKey {
            database: "d".into(),
            user: "u".into(),
        };
        let c = r.client(Arc::new(key.clone()), "127.0.0.1:1".parse().unwrap(), None);
        let s = r.server(42, key);
        c.info.set_state(ClientState::Waiting);
        assert_eq!(r.clients()[0].state(), "waiting");
        assert_eq!(r.servers()[0].pid, 42);
        drop((c, s));
        assert!(r.clients().is_empty() && r.servers().is_empty());
    }

    /// Counts its wakes.
    struct Count(std::sync::atomic::AtomicUsize);
    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_sweep_asks_quiet_idle_sessions_and_wakes_parked_ones_near_their_deadline() {
        let r = Arc::new(Registry::default());
        let key = Arc::new(PoolKey {
            database: "d".into(),
            user: "u".into(),
        });
        let now = std::time::Instant::now();
        let later = |ms| now + std::time::Duration::from_millis(ms);
        let mut tickets = Vec::new();
        let mut counts = Vec::new();
        for _ in 0..6 {
            let t = r.client(key.clone(), "127.0.0.1:1".parse().unwrap(), None);
            let count = Arc::new(Count(Default::default()));
            t.info
                .register_waker(&std::task::Waker::from(count.clone()));
            t.info.note_activity(now);
            counts.push(count);
            tickets.push(t);
        }
        let woken = |i: usize| counts[i].0.load(Ordering::SeqCst);
        tickets[1].info.note_activity(later(900)); // heard from recently
        tickets[2].info.set_state(ClientState::Active); // in a transaction
        tickets[3].info.never_park(); // TLS
        tickets[4].info.set_parked(Some(later(1_150))); // deadline near
        tickets[5].info.set_parked(None); // parked for good
        let asked_back = Arc::new(Mutex::new(Vec::new()));
        let record = asked_back.clone();
        r.set_unparker(Box::new(move |id| lock(&record).push(id)));
        r.sweep_idle(clock_ms(later(1_000)), 250, 200);
        // Parked sessions hold no task waker: they are asked back through the unparker.
        assert_eq!((0..6).map(woken).collect::<Vec<_>>(), [1, 0, 0, 0, 0, 0]);
        assert_eq!(*lock(&asked_back), [tickets[4].info.id]);
        assert!(tickets[0].info.park_asked());
        // Asked once: the next sweep leaves it alone until it answers.
        tickets[0]
            .info
            .register_waker(&std::task::Waker::from(counts[0].clone()));
        r.sweep_idle(clock_ms(later(1_100)), 250, 200);
        assert_eq!(woken(0), 1);
        tickets[0].info.set_running();
        r.sweep_idle(clock_ms(later(1_200)), 250, 200);
        assert_eq!(woken(0), 2);
        // (Still parked here, so each sweep asked it back again.) Shutdown and reload ring
        // every session, parked ones through the unparker.
        r.wake_clients();
        let (near, idle) = (tickets[4].info.id, tickets[5].info.id);
        assert_eq!(*lock(&asked_back), [near, near, near, near, idle]);
    }
}
