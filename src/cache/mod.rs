//! The result cache (DESIGN §2): entries hold the exact bytes the server sent for a read, keyed by
//! everything that can change them, and are served only while the versions of the relations they
//! read are those read *before* the query went upstream. A write bumps versions; an entry that
//! raced a write carries an old version and is never served.
//!
//! `sql` says what a statement text reads and writes, `catalog` what those names are upstream,
//! `plan` joins both with the rules of `proxy.toml`, `store` is the bounded L1, `glob` matches
//! rule and invalidation patterns. The session (`session::cached`) decides when to look up and
//! what to capture.

pub mod catalog;
#[cfg(test)]
mod decisions;
mod glob;
pub mod plan;
pub mod sql;
mod store;
pub mod stream;
pub mod tier;
pub mod warm;

pub use glob::glob_match;
pub use plan::Plan;
pub use store::{Entry, StoreStats};

use crate::config::CacheConfig;
use crate::metrics::METRICS;
use arc_swap::ArcSwapOption;
use bytes::Bytes;
use catalog::Catalog;
use lru::LruCache;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use store::Store;

/// The part of a key that stands for a session's settings: every setting but `application_name`,
/// in the map's (sorted) order.
pub fn settings_sig<'a>(settings: impl IntoIterator<Item = (&'a String, &'a String)>) -> Bytes {
    let mut s = Vec::new();
    for (k, v) in settings {
        if k != "application_name" {
            s.extend_from_slice(k.as_bytes());
            s.push(b'=');
            s.extend_from_slice(v.as_bytes());
            s.push(0);
        }
    }
    Bytes::from(s)
}

/// An entry's key: every part, length-prefixed, so no two different inputs give the same bytes.
pub fn entry_key(db: &str, role: &str, sig: &[u8], parts: &[&[u8]]) -> Box<[u8]> {
    let mut key = Vec::new();
    entry_key_into(&mut key, db, role, sig, parts);
    key.into_boxed_slice()
}

/// `entry_key` written into `key` (cleared first): a session looks up with one buffer it keeps.
pub fn entry_key_into(key: &mut Vec<u8>, db: &str, role: &str, sig: &[u8], parts: &[&[u8]]) {
    let fields = || {
        [db.as_bytes(), role.as_bytes(), sig]
            .into_iter()
            .chain(parts.iter().copied())
    };
    key.clear();
    // Exactly the room it needs: no copy when it becomes a boxed slice.
    key.reserve_exact(fields().map(|p| p.len() + 4).sum::<usize>());
    for p in fields() {
        key.extend_from_slice(&(p.len() as u32).to_be_bytes());
        key.extend_from_slice(p);
    }
}

/// An entry's readable name, `database/role/fingerprint/params-hash` (made only when storing).
pub fn entry_name(db: &str, role: &str, fingerprint: &str, parts: &[&[u8]]) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parts.hash(&mut h);
    format!("{db}/{role}/{fingerprint}/{:016x}", h.finish())
}

/// After a failed catalog read, the next one waits this long (until then nothing is cached).
pub const CATALOG_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

/// Versions of relations, as read before a query went upstream.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub epoch: u64,
    pub versions: Box<[(Arc<str>, u64)]>,
    /// With the shared tier: the versions in Redis (epoch, then `versions`' relations), read
    /// before the query went upstream. None when Redis could not be asked.
    pub remote: Option<tier::Remote>,
}

/// One upstream database: its catalog, relation versions and statement plans.
pub struct Db {
    pub name: String,
    catalog: ArcSwapOption<Catalog>,
    /// Bumped when the catalog or the rules change: plans made before are stale.
    generation: AtomicU64,
    /// foldhash: every write bumps, and every look-up and fill reads, a few of these.
    versions: RwLock<foldhash::HashMap<Arc<str>, u64>>,
    /// Held while the catalog is being read: one reader at a time; holds when the last read
    /// failed (the next waits `CATALOG_RETRY`).
    pub load_lock: tokio::sync::Mutex<Option<std::time::Instant>>,
    /// Bumped by writes whose relations cannot be known: every entry of the database.
    epoch: AtomicU64,
    plans: Mutex<LruCache<Box<[u8]>, Arc<Plan>>>,
    /// The shared tier: bumps are told to the other proxies.
    pub tier: Option<Arc<tier::Tier>>,
}

impl Db {
    fn new(name: &str, tier: Option<Arc<tier::Tier>>) -> Self {
        Db {
            tier,
            name: name.to_string(),
            catalog: ArcSwapOption::empty(),
            generation: AtomicU64::new(1),
            versions: RwLock::new(foldhash::HashMap::default()),
            load_lock: tokio::sync::Mutex::new(None),
            epoch: AtomicU64::new(0),
            plans: Mutex::new(LruCache::new(
                NonZeroUsize::new(4096).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }

    pub fn catalog(&self) -> Option<Arc<Catalog>> {
        self.catalog.load_full()
    }

    /// A freshly read catalog is in force.
    pub fn set_catalog(&self, c: Option<Catalog>) {
        self.catalog.store(c.map(Arc::new));
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// The catalog is out of date (DDL through the proxy): nothing is cacheable until it is read
    /// again.
    pub fn catalog_stale(&self) {
        self.set_catalog(None);
    }

    pub fn snapshot(&self, rels: &[Arc<str>]) -> Snapshot {
        let epoch = self.epoch.load(Ordering::SeqCst);
        let v = self.versions.read().unwrap_or_else(|p| p.into_inner());
        Snapshot {
            remote: None,
            epoch,
            versions: rels
                .iter()
                .map(|r| (r.clone(), v.get(r).copied().unwrap_or(0)))
                .collect(),
        }
    }

    /// The snapshot is still what a query sent now would read.
    pub fn current(&self, s: &Snapshot) -> bool {
        if self.epoch.load(Ordering::SeqCst) != s.epoch {
            return false;
        }
        let v = self.versions.read().unwrap_or_else(|p| p.into_inner());
        s.versions
            .iter()
            .all(|(r, n)| v.get(r).copied().unwrap_or(0) == *n)
    }

    /// Relations were (or may have been) written: here, and (in the background) in Redis for
    /// the other proxies.
    pub fn bump(&self, rels: &[Arc<str>], source: &str) {
        self.bump_local(rels, source);
        self.bump_remote(rels.to_vec(), false);
    }

    /// Anything in this database may have changed: here and in Redis.
    pub fn bump_all(&self, source: &str) {
        self.bump_all_local(source);
        self.bump_remote(Vec::new(), true);
    }

    fn bump_remote(&self, rels: Vec<Arc<str>>, all: bool) {
        if let Some(t) = self.tier.clone().filter(|_| all || !rels.is_empty()) {
            let db = self.name.clone();
            tokio::spawn(async move { t.bump(&db, &rels, all).await });
        }
    }

    /// A bump on this proxy only (a peer's broadcast, or one the caller tells Redis itself).
    pub fn bump_local(&self, rels: &[Arc<str>], source: &str) {
        if rels.is_empty() {
            return;
        }
        let mut v = self.versions.write().unwrap_or_else(|p| p.into_inner());
        for r in rels {
            // Found by reference first: `entry` would take (and mostly drop) a clone of the name.
            let n = match v.get_mut(&**r) {
                Some(n) => {
                    *n += 1;
                    *n
                }
                None => {
                    v.insert(r.clone(), 1);
                    1
                }
            };
            tracing::trace!(relation = %r, version = n, "bump");
        }
        drop(v);
        METRICS
            .cache_invalidations
            .with_label_values(&[source])
            .inc();
    }

    pub fn bump_all_local(&self, source: &str) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        METRICS
            .cache_invalidations
            .with_label_values(&[source])
            .inc();
    }

    /// Bump every relation whose name matches `pattern`; returns how many.
    pub fn bump_matching(&self, pattern: &str, source: &str) -> usize {
        // Relations are known by bare name (see catalog.rs): `public.orders` means `orders`, and
        // `app.*` every relation (more than asked for, never less).
        let pattern = pattern.rsplit_once('.').map_or(pattern, |(_, name)| name);
        let mut names: Vec<Arc<str>> = self
            .catalog()
            .map(|c| {
                c.rels
                    .keys()
                    .filter(|n| glob_match(pattern, n))
                    .map(|n| Arc::from(n.as_str()))
                    .collect()
            })
            .unwrap_or_default();
        {
            let v = self.versions.read().unwrap_or_else(|p| p.into_inner());
            for n in v.keys() {
                if glob_match(pattern, n) && !names.contains(n) {
                    names.push(n.clone());
                }
            }
        }
        if !names.is_empty() {
            self.bump(&names, source);
        }
        names.len()
    }

    /// Made since the catalog and the rules last changed.
    pub fn is_current(&self, plan: &Plan) -> bool {
        plan.generation == self.generation.load(Ordering::SeqCst)
    }

    fn lock_plans(&self) -> std::sync::MutexGuard<'_, LruCache<Box<[u8]>, Arc<Plan>>> {
        self.plans.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The whole cache: settings, databases, the L1 store and the statement memo.
pub struct Cache {
    config: arc_swap::ArcSwap<CacheConfig>,
    dbs: RwLock<HashMap<String, Arc<Db>>>,
    store: Store,
    /// `[cache.redis]`, fixed at start.
    pub tier: Option<Arc<tier::Tier>>,
}

impl Cache {
    pub fn new(config: &CacheConfig) -> Self {
        Cache {
            config: arc_swap::ArcSwap::from_pointee(config.clone()),
            dbs: RwLock::new(HashMap::new()),
            store: Store::new(),
            tier: config
                .enabled
                .then(|| tier::Tier::new(&config.redis))
                .flatten(),
        }
    }

    pub fn config(&self) -> Arc<CacheConfig> {
        self.config.load_full()
    }

    pub fn enabled(&self) -> bool {
        self.config.load().enabled
    }

    /// New settings (reload): the catalog is read again, plans are remade, entries over the
    /// new bounds leave. (`enabled` itself needs a restart: sessions started without the cache
    /// do not report their writes.)
    pub fn reload(&self, config: &CacheConfig) {
        self.config.store(Arc::new(config.clone()));
        for db in self.dbs() {
            db.catalog_stale();
        }
        self.store.trim(config);
    }

    pub fn db(&self, name: &str) -> Arc<Db> {
        if let Some(d) = self.dbs.read().unwrap_or_else(|p| p.into_inner()).get(name) {
            return d.clone();
        }
        let mut w = self.dbs.write().unwrap_or_else(|p| p.into_inner());
        w.entry(name.to_string())
            .or_insert_with(|| Arc::new(Db::new(name, self.tier.clone())))
            .clone()
    }

    pub fn dbs(&self) -> Vec<Arc<Db>> {
        self.dbs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The plan for `sql` in `db`, made again when the catalog or rules changed. Memoized by the
    /// text with its numbers blanked out (texts that differ only in numbers have one plan), so a
    /// simple-protocol client sending a new literal each time costs one parse in all.
    pub fn plan(&self, db: &Db, sql: &str) -> Arc<Plan> {
        let generation = db.generation.load(Ordering::SeqCst);
        // A text with no numbers and single spaces is its own key (drivers' `$1` statements):
        // found without making the key. (No text holds the NUL a key has for each number, so
        // a text equal to a key is that key's statement, spaced the same.)
        if let Some(p) = db.lock_plans().get(sql.as_bytes()) {
            if p.generation == generation {
                return p.clone();
            }
        }
        let key = crate::sqltext::plan_key(sql);
        if let Some(p) = db.lock_plans().get(key.as_slice()) {
            if p.generation == generation {
                return p.clone();
            }
        }
        let facts = sql::facts(sql);
        let catalog = db.catalog();
        let mut p = Plan::new(&facts, catalog.as_deref(), &self.config(), generation);
        p.text = sql.into();
        p.numbers = crate::sqltext::number_spans(sql).into();
        let p = Arc::new(p);
        db.lock_plans().put(key.into_boxed_slice(), p.clone());
        p
    }

    pub fn get(&self, key: &[u8], db: &Db) -> Option<Arc<Entry>> {
        self.store.get(key, db)
    }

    /// `get` at time `now`, read by the caller.
    pub fn get_at(&self, key: &[u8], db: &Db, now: std::time::Instant) -> Option<Arc<Entry>> {
        self.store.get_at(key, db, now)
    }

    pub fn put(&self, key: Box<[u8]>, entry: Entry) {
        self.store.put(key, entry, &self.config.load());
    }

    pub fn stats(&self) -> StoreStats {
        self.store.stats()
    }

    pub fn entries(&self, limit: usize) -> Vec<Arc<Entry>> {
        self.store.entries(limit)
    }

    /// Entries by readable name; returns how many were removed.
    pub fn invalidate_names(&self, pred: impl Fn(&Entry) -> bool) -> usize {
        self.store.remove_where(pred)
    }

    /// Every entry here, without telling Redis (the shared tier came back after an outage:
    /// what was cached here may have missed broadcasts).
    pub fn forget_local(&self) -> usize {
        for db in self.dbs() {
            db.bump_all_local("peer");
        }
        self.store.clear()
    }

    /// Every entry, every database.
    pub fn invalidate_all(&self) -> usize {
        for db in self.dbs() {
            db.bump_all("explicit");
        }
        self.store.clear()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_that_differ_in_numbers_share_a_plan_and_strings_do_not() {
        let cache = Cache::new(&CacheConfig::default());
        let db = cache.db("app");
        let a = cache.plan(&db, "SELECT * FROM t WHERE id = 1 LIMIT 5");
        let b = cache.plan(&db, "SELECT  *  FROM t WHERE id = 2\nLIMIT 10");
        assert!(Arc::ptr_eq(&a, &b));
        let d = cache.plan(&db, "SELECT * FROM t WHERE d = '2024-01-01'");
        let now = cache.plan(&db, "SELECT * FROM t WHERE d = 'now'");
        assert!(!Arc::ptr_eq(&d, &now));
        let hinted = cache.plan(&db, "SELECT /* pgcache: ttl=5s */ * FROM t WHERE id = 1");
        assert!(!Arc::ptr_eq(&a, &hinted));
    }

    #[test]
    fn invalidation_patterns_may_name_a_schema() {
        let db = Db::new("app", None);
        let both_names: [Arc<str>; 2] = [Arc::from("orders"), Arc::from("users")];
        db.bump(&both_names, "write");
        let both = db.snapshot(&both_names);
        let just_users = db.snapshot(&both_names[1..]);
        assert_eq!(db.bump_matching("public.orders", "explicit"), 1);
        assert!(!db.current(&both));
        assert!(db.current(&just_users));
        assert_eq!(db.bump_matching("public.*", "explicit"), 2);
        assert!(!db.current(&just_users));
        assert_eq!(db.bump_matching("nothing_here", "explicit"), 0);
    }
}
