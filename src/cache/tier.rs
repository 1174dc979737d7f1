//! The shared tier (`[cache.redis]`): relation versions kept in Redis (`INCR`), every bump
//! broadcast on a channel that every proxy applies to its own view, results shared as a second
//! tier behind the in-process LRU, the circuit breaker that keeps a dead or slow Redis away
//! from clients, and the retry that tells Redis of the bumps it missed as soon as it answers.
//!
//! Keys (under `key_prefix`, a database's keys hash-tagged with it so one pipeline reaches them
//! on a Redis Cluster): `{<db>}:v:<relation>` versions, `{<db>}:e` the database's epoch,
//! `{<db>}:r:<sha256 of the entry key>` results; channel `<prefix>bumps` (cluster-wide). A result in Redis carries the
//! Redis versions read before its query went upstream, and is served only while they are
//! current.

use crate::config::{Consistency, RedisConfig};
use crate::metrics::METRICS;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use redis::aio::ConnectionManager;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Versions in Redis of a database's epoch then of each relation (in the order asked).
pub type Remote = Box<[u64]>;

struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
    backoff: Duration,
}

/// A connection to one Redis or to a cluster.
#[derive(Clone)]
enum Conn {
    One(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

pub struct Tier {
    pub config: RedisConfig,
    /// For the bump subscription: the Redis, or each cluster node in turn.
    subscribe_to: Vec<redis::Client>,
    cluster: Option<redis::cluster::ClusterClient>,
    conn: tokio::sync::Mutex<Option<Conn>>,
    breaker: Mutex<Breaker>,
    up: AtomicBool,
    /// Databases with bumps Redis never heard of: their epoch is bumped in Redis first thing
    /// once it answers again, so no proxy keeps serving what they invalidated.
    dirty: Mutex<std::collections::BTreeSet<String>>,
    /// Signalled when a bump could not be told (`retry_missed` waits on it).
    missed: tokio::sync::Notify,
    /// Identifies this proxy's own broadcasts.
    pub instance: u64,
}

/// A result as stored in Redis.
pub struct Stored {
    pub remote: Remote,
    pub ttl_ms: u64,
    pub name: String,
    pub fingerprint: String,
    pub bytes: Bytes,
}

impl Tier {
    pub fn new(config: &RedisConfig) -> Option<Arc<Tier>> {
        let made = Self::clients(config);
        let (subscribe_to, cluster) = match made {
            Ok(Some(c)) => c,
            Ok(None) => return None,
            Err(e) => {
                tracing::error!(error = %e, "cache.redis: cannot use it; no shared tier");
                return None;
            }
        };
        METRICS.redis_up.set(0);
        Some(Arc::new(Tier {
            config: config.clone(),
            subscribe_to,
            cluster,
            conn: tokio::sync::Mutex::new(None),
            breaker: Mutex::new(Breaker {
                failures: 0,
                open_until: None,
                backoff: Duration::from_secs(1),
            }),
            up: AtomicBool::new(false),
            dirty: Mutex::new(Default::default()),
            missed: tokio::sync::Notify::new(),
            instance: rand::random(),
        }))
    }

    /// Clients for the subscription, and the cluster client (with `cluster`).
    #[allow(clippy::type_complexity)]
    fn clients(
        config: &RedisConfig,
    ) -> redis::RedisResult<Option<(Vec<redis::Client>, Option<redis::cluster::ClusterClient>)>>
    {
        let ca = match &config.ca_file {
            Some(f) => Some(std::fs::read(f).map_err(|e| {
                redis::RedisError::from(std::io::Error::new(e.kind(), format!("{f}: {e}")))
            })?),
            None => None,
        };
        let certs = || redis::TlsCertificates {
            client_tls: None,
            root_cert: ca.clone(),
        };
        let open = |url: &str| match &ca {
            Some(_) => redis::Client::build_with_tls(url, certs()),
            None => redis::Client::open(url),
        };
        if let Some(url) = &config.url {
            return Ok(Some((vec![open(url)?], None)));
        }
        if config.cluster.is_empty() {
            return Ok(None);
        }
        let nodes = config
            .cluster
            .iter()
            .map(|u| open(u))
            .collect::<redis::RedisResult<Vec<_>>>()?;
        let mut b = redis::cluster::ClusterClient::builder(config.cluster.clone())
            .connection_timeout(config.timeout.max(Duration::from_millis(500)))
            .response_timeout(config.timeout);
        if ca.is_some() {
            b = b.certs(certs());
        }
        Ok(Some((nodes, Some(b.build()?))))
    }

    pub fn strict(&self) -> bool {
        self.config.consistency == Consistency::Strict
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// A key of database `db`: `<prefix>{<db>}:<parts>`.
    fn key(&self, db: &str, parts: &[&str]) -> String {
        format!("{}{{{db}}}:{}", self.config.key_prefix, parts.join(":"))
    }

    pub fn channel(&self) -> String {
        format!("{}bumps", self.config.key_prefix)
    }

    /// Run `pipe` within `timeout`, through the breaker. `None` when Redis is unavailable
    /// (the caller falls back).
    async fn query<T: redis::FromRedisValue>(
        &self,
        what: &'static str,
        pipe: redis::Pipeline,
    ) -> Option<T> {
        if !self.admitted() {
            return None;
        }
        self.call(what, pipe, self.config.timeout).await
    }

    /// Run `pipe` within `limit`, whether or not the circuit is open; its outcome counts for
    /// the breaker.
    async fn call<T: redis::FromRedisValue>(
        &self,
        what: &'static str,
        pipe: redis::Pipeline,
        limit: Duration,
    ) -> Option<T> {
        let result = tokio::time::timeout(limit, async {
            let mut guard = self.conn.lock().await;
            if guard.is_none() {
                *guard = Some(match &self.cluster {
                    Some(c) => Conn::Cluster(c.get_async_connection().await?),
                    None => Conn::One(self.subscribe_to[0].get_connection_manager().await?),
                });
            }
            let conn = guard.as_ref().expect("just set").clone();
            drop(guard);
            match conn {
                Conn::One(mut c) => pipe.query_async::<T>(&mut c).await,
                Conn::Cluster(mut c) => pipe.query_async::<T>(&mut c).await,
            }
        })
        .await;
        match result {
            Ok(Ok(v)) => {
                self.succeeded();
                Some(v)
            }
            Ok(Err(e)) => {
                self.failed(what, &e.to_string());
                None
            }
            Err(_) => {
                self.failed(what, "timed out");
                None
            }
        }
    }

    fn admit(&self) -> bool {
        let b = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        b.open_until.is_none_or(|t| Instant::now() >= t)
    }

    /// `admit`, counting a call the open circuit skips.
    fn admitted(&self) -> bool {
        let admitted = self.admit();
        if !admitted {
            METRICS.redis_fallbacks.with_label_values(&["open"]).inc();
        }
        admitted
    }

    /// The backoff after `d`: doubled, up to `max_backoff` (never under a second).
    fn next_backoff(&self, d: Duration) -> Duration {
        (d * 2).min(self.config.max_backoff.max(Duration::from_secs(1)))
    }

    /// A database whose bumps Redis has not heard of (see `dirty`).
    fn mark_dirty(&self, db: &str) {
        self.dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(db.to_string());
    }

    fn succeeded(&self) {
        let mut b = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        b.failures = 0;
        b.open_until = None;
        b.backoff = Duration::from_secs(1);
        drop(b);
        self.set_up(true, "");
    }

    fn failed(&self, what: &str, error: &str) {
        tracing::debug!(what, error, "redis call failed");
        METRICS.redis_fallbacks.with_label_values(&["error"]).inc();
        let mut b = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        b.failures += 1;
        if b.failures >= self.config.failures_to_open {
            b.open_until = Some(Instant::now() + b.backoff);
            b.backoff = self.next_backoff(b.backoff);
            drop(b);
            self.set_up(false, &format!("{what}: {error}"));
        }
    }

    /// Log once per change of state.
    pub fn set_up(&self, up: bool, why: &str) {
        let was = self.up.swap(up, Ordering::SeqCst);
        METRICS.redis_up.set(i64::from(up));
        if was != up {
            if up {
                tracing::info!("redis is reachable: shared tier on");
            } else {
                tracing::warn!(
                    error = why,
                    "redis unavailable: serving without the shared tier"
                );
            }
        }
    }

    /// Bump `rels` (or the whole database with `all`) in Redis and broadcast it, waiting up to
    /// `bump_timeout` (a write's acknowledgement waits for this: a lookup that is late only
    /// falls back to PostgreSQL, a bump given up on lets the other proxies serve what it
    /// invalidated). Not tried while the circuit is open. False when Redis could not be told:
    /// the database is then bumped whole in the background as soon as Redis answers.
    pub async fn bump(&self, db: &str, rels: &[Arc<str>], all: bool) -> bool {
        let told = self.admitted() && self.tell(db, rels, all).await;
        if !told {
            METRICS.redis_bumps_missed.inc();
            self.mark_dirty(db);
            self.missed.notify_one();
        }
        told
    }

    async fn tell(&self, db: &str, rels: &[Arc<str>], all: bool) -> bool {
        let limit = self.config.bump_timeout.max(self.config.timeout);
        let mut pipe = redis::pipe();
        if all {
            pipe.incr(self.key(db, &["e"]), 1).ignore();
        }
        for r in rels {
            pipe.incr(self.key(db, &["v", r]), 1).ignore();
        }
        let sent = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let mut msg = format!("{}\t{sent}\t{db}\t{}", self.instance, u8::from(all));
        for r in rels {
            msg.push('\t');
            msg.push_str(r);
        }
        // On a cluster the channel hashes to a slot of its own: a second call.
        if self.cluster.is_some() {
            self.call::<()>("bump", pipe, limit).await.is_some() && {
                let mut publish = redis::pipe();
                publish.publish(self.channel(), msg).ignore();
                self.call::<()>("publish", publish, limit).await.is_some()
            }
        } else {
            pipe.publish(self.channel(), msg).ignore();
            self.call::<()>("bump", pipe, limit).await.is_some()
        }
    }

    /// Bump the epoch of every database whose bumps Redis missed. Tried whether or not the
    /// circuit is open (nobody waits for it). Until that worked, false.
    pub async fn flush_dirty(&self) -> bool {
        let dbs: Vec<String> = self
            .dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        for db in dbs {
            self.dirty
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&db);
            if !self.tell(&db, &[], true).await {
                self.mark_dirty(&db);
                return false;
            }
            tracing::info!(database = %db, "redis: bumped the database's epoch for the writes it missed");
        }
        true
    }

    /// Tell Redis of missed bumps as soon as it answers, without waiting for the bump
    /// subscription to be lost and made again (a slow Redis, or this proxy too busy to hear it
    /// in time, leaves the subscription up).
    pub async fn retry_missed(self: Arc<Self>) {
        loop {
            self.missed.notified().await;
            let mut pause = Duration::from_millis(100);
            while !self.flush_dirty().await {
                tokio::time::sleep(pause).await;
                pause = self.next_backoff(pause);
            }
        }
    }

    /// Close the circuit: Redis answered on another connection.
    pub fn reset_breaker(&self) {
        let mut b = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        b.failures = 0;
        b.open_until = None;
        b.backoff = Duration::from_secs(1);
    }

    fn push_versions(&self, pipe: &mut redis::Pipeline, db: &str, rels: &[Arc<str>]) {
        let mut keys = vec![self.key(db, &["e"])];
        keys.extend(rels.iter().map(|r| self.key(db, &["v", r])));
        pipe.cmd("MGET").arg(keys);
    }

    fn result_key(&self, db: &str, entry_key: &[u8]) -> String {
        use sha2::Digest;
        let h = sha2::Sha256::digest(entry_key);
        let hex: String = h.iter().take(16).map(|b| format!("{b:02x}")).collect();
        self.key(db, &["r", &hex])
    }

    /// The stored result for `entry_key` and the current versions, in one round trip.
    pub async fn lookup(
        &self,
        entry_key: &[u8],
        db: &str,
        rels: &[Arc<str>],
    ) -> Option<(Option<Stored>, Remote)> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(self.result_key(db, entry_key));
        self.push_versions(&mut pipe, db, rels);
        let (raw, v): (Option<Vec<u8>>, Vec<Option<u64>>) = self.query("lookup", pipe).await?;
        let current: Remote = v.into_iter().map(|x| x.unwrap_or(0)).collect();
        Some((raw.and_then(|r| decode(&r)), current))
    }

    /// Store a result (in the background: the client does not wait for it).
    pub fn store(self: &Arc<Self>, db: &str, entry_key: &[u8], s: Stored) {
        let key = self.result_key(db, entry_key);
        let tier = self.clone();
        tokio::spawn(async move {
            let mut pipe = redis::pipe();
            pipe.cmd("SET")
                .arg(key)
                .arg(encode(&s))
                .arg("PX")
                .arg(s.ttl_ms.max(1))
                .ignore();
            if tier.query::<()>("store", pipe).await.is_some() {
                METRICS.cache_l2_fills.inc();
            }
        });
    }
}

fn encode(s: &Stored) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u32(s.remote.len() as u32);
    for v in s.remote.iter() {
        b.put_u64(*v);
    }
    b.put_u64(s.ttl_ms);
    for t in [&s.name, &s.fingerprint] {
        b.put_u32(t.len() as u32);
        b.put_slice(t.as_bytes());
    }
    b.put_slice(&s.bytes);
    b.to_vec()
}

fn decode(raw: &[u8]) -> Option<Stored> {
    let mut b = Bytes::copy_from_slice(raw);
    let take = |b: &mut Bytes, n: usize| (b.len() >= n).then(|| b.split_to(n));
    let n = take(&mut b, 4)?.get_u32() as usize;
    let mut remote = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        remote.push(take(&mut b, 8)?.get_u64());
    }
    let ttl_ms = take(&mut b, 8)?.get_u64();
    let mut text = || {
        let len = take(&mut b, 4)?.get_u32() as usize;
        Some(String::from_utf8_lossy(&take(&mut b, len)?).into_owned())
    };
    let (name, fingerprint) = (text()?, text()?);
    Some(Stored {
        remote: remote.into(),
        ttl_ms,
        name,
        fingerprint,
        bytes: b,
    })
}

/// A broadcast bump.
pub struct Bump<'a> {
    /// The proxy that sent it.
    pub instance: u64,
    /// When, in µs since the Unix epoch.
    pub sent: u64,
    pub db: &'a str,
    /// The whole database.
    pub all: bool,
    pub rels: Vec<Arc<str>>,
}

pub fn parse_bump(msg: &str) -> Option<Bump<'_>> {
    let mut f = msg.split('\t');
    Some(Bump {
        instance: f.next()?.parse().ok()?,
        sent: f.next()?.parse().ok()?,
        db: f.next()?,
        all: f.next()? == "1",
        rels: f.map(Arc::from).collect(),
    })
}

/// Apply the other proxies' bumps as they are broadcast; after a lost subscription, forget the
/// L1 (a bump may have been missed while it was down).
pub async fn follow(shared: Arc<crate::listener::Shared>) {
    use futures::StreamExt;
    let Some(tier) = shared.cache.tier.clone() else {
        return;
    };
    tokio::spawn(tier.clone().retry_missed());
    let mut backoff = Duration::from_millis(250);
    let mut first = true;
    let mut node = 0;
    loop {
        // On a cluster, any node hears every PUBLISH: the next one after a failure.
        let client = tier.subscribe_to[node % tier.subscribe_to.len()].clone();
        node += 1;
        let subscribed = async {
            let mut ps = client.get_async_pubsub().await?;
            ps.subscribe(tier.channel()).await?;
            redis::RedisResult::Ok(ps)
        };
        match tokio::time::timeout(Duration::from_secs(5), subscribed).await {
            Ok(Ok(mut ps)) => {
                backoff = Duration::from_millis(250);
                tier.reset_breaker();
                if !tier.flush_dirty().await {
                    tier.set_up(false, "missed bumps could not be told to redis yet");
                    tokio::time::sleep(backoff).await;
                    continue;
                }
                if !first {
                    let n = shared.cache.forget_local();
                    tracing::info!(entries = n, "redis subscription back: forgot the local cache (broadcasts may have been missed)");
                }
                tier.set_up(true, "");
                let mut messages = ps.on_message();
                while let Some(m) = messages.next().await {
                    let Ok(text) = m.get_payload::<String>() else {
                        continue;
                    };
                    apply(&shared, &tier, &text);
                }
                tier.set_up(false, "the bump subscription was lost");
            }
            Ok(Err(e)) => tier.set_up(false, &e.to_string()),
            Err(_) => tier.set_up(false, "subscribing timed out"),
        }
        first = false;
        if shared.shutdown.phase() != crate::shutdown::Phase::Running {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = tier.next_backoff(backoff);
    }
}

fn apply(shared: &crate::listener::Shared, tier: &Tier, text: &str) {
    let Some(Bump {
        instance,
        sent,
        db,
        all,
        rels,
    }) = parse_bump(text)
    else {
        return;
    };
    if instance == tier.instance {
        return; // applied here already
    }
    let d = shared.cache.db(db);
    if all {
        d.bump_all_local("peer");
    }
    d.bump_local(&rels, "peer");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    METRICS
        .redis_propagation
        .observe(now.saturating_sub(sent) as f64 / 1e6);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_results_and_bumps_round_trip() {
        let s = Stored {
            remote: vec![1, 2, 3].into(),
            ttl_ms: 60_000,
            name: "app/app/abc/def".into(),
            fingerprint: "abc".into(),
            bytes: Bytes::from_static(b"T\0\0\0\x06\0\0C..."),
        };
        let d = decode(&encode(&s)).expect("decodes");
        assert_eq!(&*d.remote, &[1, 2, 3]);
        assert_eq!(
            (d.ttl_ms, d.name.as_str(), d.fingerprint.as_str()),
            (60_000, "app/app/abc/def", "abc")
        );
        assert_eq!(d.bytes, s.bytes);
        assert!(decode(&encode(&s)[..10]).is_none());
        let b = parse_bump("7\t123\tapp\t0\torders\titems").expect("parses");
        assert_eq!((b.instance, b.sent, b.db, b.all), (7, 123, "app", false));
        assert_eq!(b.rels.len(), 2);
    }
}
