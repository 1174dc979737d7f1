//! Cache warming: the `[[cache.warm]]` queries of `proxy.toml` are run at start, through the pool
//! of their (database, user) and with the session settings of the clients they are for, and their
//! results stored under the key such a client's identical query would have. With `refresh`, a
//! query whose entry was invalidated (a write to its tables) or expired is run again within a
//! second. A query the cache would not cache for a client is not cached here either.

use super::{catalog, entry_key, entry_name, settings_sig, Db, Entry};
use crate::config::CacheWarm;
use crate::listener::Shared;
use crate::metrics::METRICS;
use crate::pool::PoolKey;
use crate::session::settings::Settings;
use crate::shutdown::Phase;
use crate::wire;
use bytes::BytesMut;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where a warmed result lives, to check it is still there.
struct Warmed {
    key: Box<[u8]>,
    db: Arc<Db>,
}

enum Outcome {
    Stored(Warmed),
    /// Not cacheable, or too large: warming it again would not help.
    Never,
    /// The upstream failed: try again later.
    Retry,
}

/// Keep the configured queries warm until shutdown.
pub async fn run(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    let mut state: HashMap<String, Option<Warmed>> = HashMap::new();
    loop {
        let config = shared.config();
        if shared.cache.enabled() {
            for w in &config.cache.warm {
                let id = format!("{}\0{}\0{}", w.database, w.user, w.sql);
                let due = match state.get(&id) {
                    None => true,
                    Some(None) => false,
                    Some(Some(done)) => {
                        w.refresh && shared.cache.get(&done.key, &done.db).is_none()
                    }
                };
                if !due {
                    continue;
                }
                match warm(&shared, w).await {
                    Outcome::Stored(done) => {
                        state.insert(id, Some(done));
                    }
                    Outcome::Never => {
                        state.insert(id, None);
                    }
                    Outcome::Retry => {}
                }
            }
        }
        drop(config);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.reached(Phase::Drain) => return,
        }
    }
}

async fn warm(shared: &Shared, w: &CacheWarm) -> Outcome {
    let pool = PoolKey {
        database: w.database.clone(),
        user: w.user.clone(),
    };
    let mut conn = match shared.pools.acquire(&pool).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(pool = %pool, error = ?e, "cache warm: no server connection; will retry");
            return Outcome::Retry;
        }
    };
    let settings = Settings::new(std::sync::Arc::new(
        w.settings.clone().into_iter().collect(),
    ));
    if let Err(e) = settings.apply(&mut conn).await {
        tracing::warn!(pool = %pool, error = %e, "cache warm: applying settings failed; will retry");
        conn.broken = true;
        return Outcome::Retry;
    }
    let db = shared
        .cache
        .db(shared.config().upstream_database(&w.database));
    if db.catalog().is_none() {
        match catalog::load(&mut conn).await {
            Ok(c) => db.set_catalog(Some(c)),
            Err(e) => {
                tracing::warn!(db = %db.name, error = %e, "cache warm: reading the catalog failed; will retry");
                return Outcome::Retry;
            }
        }
    }
    let plan = shared.cache.plan(&db, &w.sql);
    if !plan.cacheable {
        tracing::warn!(sql = %w.sql, "cache warm: the query is not cacheable (see the README's rules); skipped");
        return Outcome::Never;
    }
    let snapshot = db.snapshot(&plan.deps);
    let replies = match conn.simple_query(&w.sql).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(sql = %w.sql, error = %e, "cache warm: the query failed; will retry");
            return Outcome::Retry;
        }
    };
    if replies
        .iter()
        .any(|(tag, _)| matches!(tag, b'N' | b'S' | b'A'))
    {
        tracing::warn!(sql = %w.sql, "cache warm: the query sent a notice; not cached");
        return Outcome::Never;
    }
    let mut bytes = BytesMut::new();
    for (tag, body) in &replies {
        wire::frame(*tag, &[body], &mut bytes);
    }
    let max = shared.cache.config().max_entry_bytes;
    if bytes.len() > max {
        tracing::warn!(sql = %w.sql, bytes = bytes.len(), max, "cache warm: result over cache.max_entry_bytes; not cached");
        return Outcome::Never;
    }
    let role = if plan.shared { "*" } else { w.user.as_str() };
    let sig = settings_sig(settings.wanted.iter());
    let parts: [&[u8]; 2] = [b"Q", w.sql.as_bytes()];
    let key = entry_key(&db.name, role, &sig, &parts);
    let name = entry_name(&db.name, role, &plan.fingerprint, &parts);
    tracing::info!(%name, bytes = bytes.len(), "cache warmed");
    METRICS.cache_fills.inc();
    shared.cache.put(
        key.clone(),
        Entry {
            bytes: bytes.freeze(),
            snapshot,
            expires: Instant::now() + plan.ttl,
            name,
            fingerprint: plan.fingerprint.to_string(),
            hits: AtomicU64::new(0),
        },
    );
    Outcome::Stored(Warmed { key, db })
}
