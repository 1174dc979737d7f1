//! The in-process tier (L1): an LRU in shards, bounded by entries and bytes as a whole. An entry
//! is served only if it has not expired and the versions it recorded are current; one that fails
//! either check is dropped on the spot.

use super::{Db, Snapshot};
use crate::config::CacheConfig;
use crate::metrics::METRICS;
use bytes::Bytes;
use lru::LruCache;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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

/// Shards of the store: a lookup locks one, so the worker threads rarely wait for each other (a
/// worker preempted while holding the only lock stalled every hit on the other).
const SHARDS: usize = 16;

struct Shard {
    lru: LruCache<Box<[u8]>, Arc<Entry>>,
    bytes: usize,
}

/// The L1. Each shard is an LRU; the bounds hold for the whole store: when it is over them, the
/// fullest shard gives up its least recently used entry (a shard other than the one just filled,
/// when sizes tie), which keeps shards even and approximates one LRU.
pub struct Store {
    shards: Box<[Mutex<Shard>]>,
    /// Entries and bytes per shard, readable without its lock (for choosing whom to evict).
    sizes: Box<[(AtomicUsize, AtomicUsize)]>,
    /// Picks the shard: a fast hash, keys hold the whole statement.
    hasher: foldhash::fast::RandomState,
}

impl Store {
    pub fn new() -> Self {
        Store {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        lru: LruCache::unbounded(),
                        bytes: 0,
                    })
                })
                .collect(),
            sizes: (0..SHARDS)
                .map(|_| (AtomicUsize::new(0), AtomicUsize::new(0)))
                .collect(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    fn shard_of(&self, key: &[u8]) -> usize {
        self.hasher.hash_one(key) as usize % SHARDS
    }

    fn lock(&self, i: usize) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record shard `i`'s sizes after a change made under its lock.
    fn note(&self, i: usize, g: &Shard) {
        self.sizes[i].0.store(g.lru.len(), Ordering::Relaxed);
        self.sizes[i].1.store(g.bytes, Ordering::Relaxed);
    }

    pub fn get(&self, key: &[u8], db: &Db) -> Option<Arc<Entry>> {
        self.get_at(key, db, Instant::now())
    }

    /// `get` at time `now` (a caller that has just read the clock).
    pub fn get_at(&self, key: &[u8], db: &Db, now: Instant) -> Option<Arc<Entry>> {
        let i = self.shard_of(key);
        let e = self.lock(i).lru.get(key)?.clone();
        let expired = e.expires <= now;
        if !expired && db.current(&e.snapshot) {
            return Some(e);
        }
        let mut g = self.lock(i);
        if g.lru.peek(key).is_some_and(|x| Arc::ptr_eq(x, &e)) {
            if let Some((k, old)) = g.lru.pop_entry(key) {
                g.bytes -= old.cost(&k);
            }
            self.note(i, &g);
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
        let i = self.shard_of(&key);
        let mut g = self.lock(i);
        if let Some(old) = g.lru.put(key.clone(), Arc::new(entry)) {
            g.bytes -= old.cost(&key);
        }
        g.bytes += cost;
        self.note(i, &g);
        drop(g);
        let evicted = self.shrink(config, Some(i));
        METRICS.cache_evictions.inc_by(evicted);
        self.publish();
    }

    /// Evict until the store is within `config`'s bounds; `filled` is the shard just added to.
    fn shrink(&self, config: &CacheConfig, filled: Option<usize>) -> u64 {
        let mut n = 0;
        loop {
            let s = self.stats();
            if s.entries <= config.max_entries && s.bytes <= config.max_bytes {
                return n;
            }
            // The fullest shard (by entries, then bytes), the one just filled last among equals.
            let victim = (0..SHARDS).max_by_key(|&j| {
                let (e, b) = &self.sizes[j];
                (
                    e.load(Ordering::Relaxed),
                    b.load(Ordering::Relaxed),
                    Some(j) != filled,
                )
            });
            let Some(j) = victim else { return n };
            let mut g = self.lock(j);
            match g.lru.pop_lru() {
                Some((k, e)) => {
                    g.bytes -= e.cost(&k);
                    n += 1;
                }
                // Emptied meanwhile by another thread: look again.
                None if s.entries > 0 => {}
                None => return n,
            }
            self.note(j, &g);
        }
    }

    /// New bounds (reload).
    pub fn trim(&self, config: &CacheConfig) {
        let n = self.shrink(config, None);
        METRICS.cache_evictions.inc_by(n);
        self.publish();
    }

    pub fn clear(&self) -> usize {
        let mut n = 0;
        for i in 0..SHARDS {
            let mut g = self.lock(i);
            n += g.lru.len();
            g.lru.clear();
            g.bytes = 0;
            self.note(i, &g);
        }
        self.publish();
        n
    }

    pub fn remove_where(&self, pred: impl Fn(&Entry) -> bool) -> usize {
        let mut n = 0;
        for i in 0..SHARDS {
            let mut g = self.lock(i);
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
            n += doomed.len();
            self.note(i, &g);
        }
        self.publish();
        n
    }

    /// Live entries, most recently used first within each shard (for `SHOW CACHE`).
    pub fn entries(&self, limit: usize) -> Vec<Arc<Entry>> {
        let mut out = Vec::new();
        for i in 0..SHARDS {
            let g = self.lock(i);
            let room = limit.saturating_sub(out.len());
            out.extend(g.lru.iter().take(room).map(|(_, e)| e.clone()));
        }
        out
    }

    pub fn stats(&self) -> StoreStats {
        let mut s = StoreStats::default();
        for (e, b) in self.sizes.iter() {
            s.entries += e.load(Ordering::Relaxed);
            s.bytes += b.load(Ordering::Relaxed);
        }
        s
    }

    fn publish(&self) {
        let s = self.stats();
        METRICS.cache_entries.set(s.entries as i64);
        METRICS.cache_bytes.set(s.bytes as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn entry(db: &Db, bytes: usize) -> Entry {
        Entry {
            bytes: Bytes::from(vec![0u8; bytes]),
            snapshot: db.snapshot(&[]),
            expires: Instant::now() + Duration::from_secs(60),
            name: String::new(),
            fingerprint: String::new(),
            hits: AtomicU64::new(0),
        }
    }

    #[test]
    fn bounds_hold_for_the_whole_store_and_the_newest_entry_stays() {
        let db = Db::new("app", None);
        let mut config = CacheConfig {
            max_entries: 1,
            ..CacheConfig::default()
        };
        let store = Store::new();
        for i in 0..50u32 {
            let key: Box<[u8]> = i.to_be_bytes().into();
            store.put(key.clone(), entry(&db, 10), &config);
            assert_eq!(store.stats().entries, 1);
            assert!(
                store.get(&key, &db).is_some(),
                "entry {i} was evicted on arrival"
            );
        }
        config.max_entries = 1000;
        for i in 0..1000u32 {
            store.put(i.to_be_bytes().into(), entry(&db, 100), &config);
        }
        assert_eq!(store.stats().entries, 1000);
        // Bytes: about half of them must go; what stays is within the bound.
        config.max_bytes = store.stats().bytes / 2;
        store.trim(&config);
        let s = store.stats();
        assert!(s.bytes <= config.max_bytes && s.entries >= 450, "{s:?}");
        assert_eq!(store.entries(usize::MAX).len(), s.entries);
        assert_eq!(store.clear(), s.entries);
        assert_eq!(store.stats().entries, 0);
    }
}
