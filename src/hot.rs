//! The hot path's pieces, reachable from outside the crate only for the microbenchmarks
//! (`benches/hotpath.rs`, criterion): walking frames, building cache keys, the L1 lookup, the
//! statement memos (pooling analysis, cache plans, a session's last plan) and fingerprinting.
//! The proxy itself does not go through this module; each item is a thin door onto the code
//! sessions run.

use crate::cache::{Cache, Db, Entry};
use crate::config::{CacheConfig, CacheRule};
use bytes::Bytes;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use crate::analysis::Analyzer;
pub use crate::cache::{entry_key, settings_sig};
pub use crate::insight::fingerprint::Memo as Fingerprints;
pub use crate::sqltext::{number_spans, same_plan_key};
pub use crate::wire::Scanner;

/// The in-process cache of one database, as sessions use it: entries filled with the versions
/// of the relations they read, looked up by key and checked against the current versions.
pub struct L1 {
    cache: Cache,
    db: Arc<Db>,
    rels: Box<[Arc<str>]>,
}

impl L1 {
    /// An enabled cache (bounds `max_entries`, 1 GiB) with one database whose reads name `rel`.
    pub fn new(max_entries: usize, rel: &str) -> Self {
        let cache = Cache::new(&CacheConfig {
            enabled: true,
            max_entries,
            max_bytes: 1 << 30,
            rules: vec![CacheRule {
                tables: vec![rel.to_string()],
                ..CacheRule::default()
            }],
            ..CacheConfig::default()
        });
        let db = cache.db("bench");
        L1 {
            cache,
            db,
            rels: vec![Arc::from(rel)].into_boxed_slice(),
        }
    }

    /// Store `bytes` (a captured result) under `key`, read at the current versions.
    pub fn fill(&self, key: Box<[u8]>, bytes: Bytes) {
        let entry = Entry {
            bytes,
            snapshot: self.db.snapshot(&self.rels),
            expires: Instant::now() + Duration::from_secs(3600),
            name: String::from("bench"),
            fingerprint: String::from("bench"),
            hits: AtomicU64::new(0),
        };
        self.cache.put(key, entry);
    }

    /// The stored result for `key` if it is still fresh: what a hit serves.
    pub fn get(&self, key: &[u8]) -> Option<Bytes> {
        self.cache.get(key, &self.db).map(|e| e.bytes.clone())
    }

    /// A write to the relation: every entry filled before it is stale.
    pub fn bump(&self) {
        self.db.bump_local(&self.rels, "write");
    }

    /// The cache plan of `sql` (memoized per statement text): whether it may be cached.
    pub fn plan(&self, sql: &str) -> bool {
        self.cache.plan(&self.db, sql).cacheable
    }
}
