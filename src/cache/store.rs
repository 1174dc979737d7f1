//! The in-process tier (L1): an LRU bounded by entries and bytes. An entry is served only if it
//! has not expired and the versions it recorded are current; one that fails either check is
//! dropped on the spot.

use super::{Db, Snapshot};
use crate::config::CacheConfig;
use crate::metrics::METRICS;
use bytes::Bytes;
use lru::LruCache;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A stored result.
#[derive(Debug)]
pub struct Entry {
    /// What the server sent the client for the statement or batch, without `ReadyForQuery`.
    pub bytes: Bytes,
    pub snapshot: Snapshot,
    pub expires: Instant,
    /// `database/role/fingerprint/params-hash`, for pattern invalidation and `SHOW CACHE`.
    pub name: String,
    pub fingerprint: String,
    pub hits: AtomicU64,
}

impl Entry {
    /// Bytes this entry holds, for the memory bound.
    fn cost(&self, key: &[u8]) -> usize {
        self.bytes.len()
            + key.len()
            + self.name.len()
            + self.fingerprint.len()
            + self.snapshot.versions.len() * 24
            + 160
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct StoreStats {
    pub entries: usize,
    pub bytes: usize,
}

struct Inner {
    lru: LruCache<Box<[u8]>, Arc<Entry>>,
    bytes: usize,
}

pub struct Store {
    inner: Mutex<Inner>,
    evictions: AtomicU64,
}

impl Store {
    pub fn new() -> Self {
        Store {
            inner: Mutex::new(Inner {
                lru: LruCache::unbounded(),
                bytes: 0,
            }),
            evictions: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, key: &[u8], db: &Db) -> Option<Arc<Entry>> {
        let e = self.lock().lru.get(key)?.clone();
        let expired = e.expires <= Instant::now();
        if !expired && db.current(&e.snapshot) {
            return Some(e);
        }
        let mut g = self.lock();
        if g.lru.peek(key).is_some_and(|x| Arc::ptr_eq(x, &e)) {
            if let Some((k, old)) = g.lru.pop_entry(key) {
                g.bytes -= old.cost(&k);
            }
            drop(g);
            if expired {
                METRICS.cache_expired.inc();
            } else {
                METRICS.cache_stale_dropped.inc();
            }
            self.publish();
        }
        None
    }

    pub fn put(&self, key: Box<[u8]>, entry: Entry, config: &CacheConfig) {
        let cost = entry.cost(&key);
        if cost > config.max_bytes {
            return;
        }
        let mut g = self.lock();
        if let Some(old) = g.lru.put(key.clone(), Arc::new(entry)) {
            g.bytes -= old.cost(&key);
        }
        g.bytes += cost;
        let evicted = Self::shrink(&mut g, config);
        let (entries, bytes) = (g.lru.len(), g.bytes);
        drop(g);
        self.evictions.fetch_add(evicted, Ordering::Relaxed);
        METRICS.cache_evictions.inc_by(evicted);
        METRICS.cache_entries.set(entries as i64);
        METRICS.cache_bytes.set(bytes as i64);
    }

    fn shrink(g: &mut Inner, config: &CacheConfig) -> u64 {
        let mut n = 0;
        while g.lru.len() > config.max_entries || g.bytes > config.max_bytes {
            let Some((k, e)) = g.lru.pop_lru() else { break };
            g.bytes -= e.cost(&k);
            n += 1;
        }
        n
    }

    /// New bounds (reload).
    pub fn trim(&self, config: &CacheConfig) {
        let n = Self::shrink(&mut self.lock(), config);
        METRICS.cache_evictions.inc_by(n);
        self.publish();
    }

    pub fn clear(&self) -> usize {
        let mut g = self.lock();
        let n = g.lru.len();
        g.lru.clear();
        g.bytes = 0;
        drop(g);
        self.publish();
        n
    }

    pub fn remove_where(&self, pred: impl Fn(&Entry) -> bool) -> usize {
        let mut g = self.lock();
        let doomed: Vec<Box<[u8]>> = g
            .lru
            .iter()
            .filter(|(_, e)| pred(e))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &doomed {
            if let Some(e) = g.lru.pop(k) {
                g.bytes -= e.cost(k);
            }
        }
        drop(g);
        self.publish();
        doomed.len()
    }

    /// Live entries, most recently used first (for `SHOW CACHE`).
    pub fn entries(&self, limit: usize) -> Vec<Arc<Entry>> {
        self.lock()
            .lru
            .iter()
            .take(limit)
            .map(|(_, e)| e.clone())
            .collect()
    }

    pub fn stats(&self) -> StoreStats {
        let g = self.lock();
        StoreStats {
            entries: g.lru.len(),
            bytes: g.bytes,
        }
    }

    fn publish(&self) {
        let s = self.stats();
        METRICS.cache_entries.set(s.entries as i64);
        METRICS.cache_bytes.set(s.bytes as i64);
    }
}
