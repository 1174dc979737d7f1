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
    state: AtomicU8,
    tx_status: AtomicU8,
    server_pid: AtomicI32,
    pinned: AtomicBool,
    /// The session's task, woken when something outside it needs a look (shutdown).
    waker: AtomicWaker,
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
}

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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Registry {
    pub fn client(self: &Arc<Self>, pool: Arc<PoolKey>, addr: SocketAddr) -> ClientTicket {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let info = Arc::new(ClientInfo {
            id,
            pool,
            addr,
            connected: SystemTime::now(),
            state: AtomicU8::new(0),
            tx_status: AtomicU8::new(b'I'),
            server_pid: AtomicI32::new(0),
            pinned: AtomicBool::new(false),
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

    /// Wake every client session (it then re-reads the shutdown phase).
    pub fn wake_clients(&self) {
        for c in lock(&self.clients).values() {
            c.waker.wake();
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
        let c = r.client(Arc::new(key.clone()), "127.0.0.1:1".parse().unwrap());
        let s = r.server(42, key);
        c.info.set_state(ClientState::Waiting);
        assert_eq!(r.clients()[0].state(), "waiting");
        assert_eq!(r.servers()[0].pid, 42);
        drop((c, s));
        assert!(r.clients().is_empty() && r.servers().is_empty());
    }
}
