//! Server connection pools: one bb8 pool per (database, user) the clients ask for, created on first
//! use. `acquire` turns bb8's outcomes into what a client should hear: a connection, the upstream's
//! own refusal (bad password, no such database) at once, `08006` with the address after retrying an
//! unreachable upstream with exponential backoff, or `53300` naming the pool when it stays full.

pub mod upstream;

use crate::admin::registry::Registry;
use crate::config::{Config, PoolConfig};
use crate::error::{sqlstate, PgError, Severity};
use crate::metrics::METRICS;
use crate::session::settings::SettingMap;
use arc_swap::ArcSwap;
use bb8::{ErrorSink, ManageConnection, PooledConnection, RunError};
use futures::FutureExt;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast;
use tokio::time::Instant;
use upstream::{Login, ServerConn, Target, UpstreamError};

/// The client-facing names a pool serves.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub database: String,
    pub user: String,
}

impl fmt::Display for PoolKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.database, self.user)
    }
}

pub struct Manager {
    target: Arc<Target>,
    login: Login,
    key: PoolKey,
    registry: Arc<Registry>,
}

/// What a connection just checked out of a pool needs before it is lent (`pool.health_check`).
enum Health {
    Good,
    /// Readable while idle: EOF, an error, or bytes nobody asked for (the FATAL of a server
    /// going away). Marked broken: it is closed, not returned.
    Broken,
    /// Idle longer than `health_check_delay`: worth a round trip first.
    Unknown,
}

impl ManageConnection for Manager {
    /// Boxed: bb8 moves connections in and out of its queue and guards on every check-out and
    /// return, and a pointer is cheaper to move than a connection.
    type Connection = Box<ServerConn>;
    type Error = Arc<UpstreamError>;

    async fn connect(&self) -> Result<Box<ServerConn>, Self::Error> {
        let mut conn = ServerConn::connect(&self.target, &self.login)
            .await
            .map_err(|e| {
                METRICS.upstream_connect_errors.inc();
                Arc::new(e)
            })?;
        conn.ticket = Some(self.registry.server(conn.pid, self.key.clone()));
        Ok(Box::new(conn))
    }

    /// Not called: bb8 checks nothing on check-out (`Pools::health` does, after it).
    async fn is_valid(&self, _: &mut Box<ServerConn>) -> Result<(), Self::Error> {
        Ok(())
    }

    fn has_broken(&self, conn: &mut Box<ServerConn>) -> bool {
        // A cancel sent for it may still arrive and hit the next client's statement.
        conn.broken || conn.cancel.as_ref().is_some_and(|k| k.sent())
    }
}

/// Carries connect errors from bb8's background tasks to the clients waiting on that pool.
#[derive(Debug, Clone)]
struct Sink(broadcast::Sender<Arc<UpstreamError>>);

impl ErrorSink<Arc<UpstreamError>> for Sink {
    fn sink(&self, error: Arc<UpstreamError>) {
        tracing::warn!(%error, "upstream connection failed");
        let _ = self.0.send(error);
    }
    fn boxed_clone(&self) -> Box<dyn ErrorSink<Arc<UpstreamError>>> {
        Box::new(self.clone())
    }
}

struct Entry {
    /// The pool's key, shared by every client of the pool (one copy, not one per client).
    key: Arc<PoolKey>,
    /// Set when a reload dropped this pool: sessions holding it look it up again.
    retired: AtomicBool,
    pool: bb8::Pool<Manager>,
    errors: broadcast::Sender<Arc<UpstreamError>>,
    /// Server names of statements this pool's server has parsed without error.
    known: Mutex<HashSet<String>>,
    /// The `ParameterStatus` set a login with these startup settings got (transaction mode answers
    /// later logins from it without borrowing a connection).
    login_params: Mutex<HashMap<Arc<SettingMap>, Arc<Params>>>,
    /// Startup settings as the pool's clients share them: most send the same ones.
    startups: Mutex<HashSet<Arc<SettingMap>>>,
}

/// `ParameterStatus` names and values.
pub type Params = BTreeMap<String, String>;

/// Bound on `Entry::login_params` and `Entry::startups`; past it they start over.
const MAX_LOGIN_VARIANTS: usize = 64;

/// Bound on `Entry::known`; past it the set starts over.
const MAX_KNOWN_STATEMENTS: usize = 10_000;

pub type ServerGuard = PooledConnection<'static, Manager>;

/// A session's hold on its pool: check-outs need no lookup in the map of pools (a lock every
/// session shares, and a hash of the key). A reload retires it; the next check-out looks again.
pub struct PoolRef(Arc<Entry>);

impl PoolRef {
    /// The pool's key, one copy shared by its clients.
    pub fn key(&self) -> &Arc<PoolKey> {
        &self.0.key
    }

    /// `settings` as the pool's other clients with the same startup settings hold them.
    pub fn shared_settings(&self, settings: SettingMap) -> Arc<SettingMap> {
        let mut known = self.0.startups.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = known.get(&settings) {
            return s.clone();
        }
        if known.len() >= MAX_LOGIN_VARIANTS {
            known.clear();
        }
        let shared = Arc::new(settings);
        known.insert(shared.clone());
        shared
    }
}

#[derive(Debug)]
pub enum AcquireError {
    Upstream(Arc<UpstreamError>),
    Exhausted { pool: PoolKey, waited: Duration },
}

impl AcquireError {
    /// The `ErrorResponse` bytes the client gets; the proxy's own errors with `severity`.
    pub fn to_client(&self, severity: Severity, out: &mut bytes::BytesMut) {
        match self {
            AcquireError::Upstream(e) => e.to_client(severity, out),
            AcquireError::Exhausted { pool, waited } => PgError::fatal(
                sqlstate::TOO_MANY_CONNECTIONS,
                format!("pgcache: no server connection free in pool \"{pool}\" after {waited:?}"),
            )
            .with_hint("raise pool.max_size or pool.acquire_timeout, or lower the client load")
            .with_severity(severity)
            .encode(out),
        }
    }
}

/// All pools, keyed by client database and user.
pub struct Pools {
    config: ArcSwap<Config>,
    target: Arc<Target>,
    registry: Arc<Registry>,
    pools: Mutex<HashMap<PoolKey, Arc<Entry>>>,
}

impl Pools {
    pub fn new(config: Arc<Config>, target: Target, registry: Arc<Registry>) -> Self {
        Pools {
            config: ArcSwap::new(config),
            target: Arc::new(target),
            registry,
            pools: Mutex::new(HashMap::new()),
        }
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    fn login_for(&self, key: &PoolKey) -> Login {
        let c = self.config.load();
        let user_cfg = c.users.get(&key.user);
        let user = user_cfg
            .and_then(|u| u.server_user.clone())
            .unwrap_or_else(|| key.user.clone());
        let cleartext = user_cfg
            .and_then(|u| u.password.clone())
            .filter(|p| !crate::auth::is_md5_secret(p) && !p.starts_with("SCRAM-SHA-256$"));
        let password = user_cfg
            .and_then(|u| u.server_password.clone())
            .or(cleartext)
            .or_else(|| match &c.upstream.user {
                Some(u) if *u != user => None,
                _ => c.upstream.password.clone(),
            });
        Login {
            user,
            database: c.upstream_database(&key.database).to_string(),
            password,
            replication: false,
            utf8: false,
            require_auth: c.upstream.require_auth.clone(),
        }
    }

    fn entry(&self, key: &PoolKey) -> Arc<Entry> {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = pools.get(key) {
            return e.clone();
        }
        let config = self.config.load();
        let p: &PoolConfig = &config.pool;
        let (errors, _) = broadcast::channel(16);
        let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
        let pool = bb8::Pool::builder()
            .max_size(config.pool_size(&key.database, &key.user))
            .min_idle(Some(p.min_idle).filter(|n| *n > 0))
            .connection_timeout(p.acquire_timeout)
            .idle_timeout(nonzero(p.idle_timeout))
            .max_lifetime(nonzero(p.max_lifetime))
            // Checked by `Pools::health` after check-out instead: the common case then needs
            // no future (`try_acquire`).
            .test_on_check_out(false)
            .retry_connection(false)
            .error_sink(Box::new(Sink(errors.clone())))
            .build_unchecked(Manager {
                target: self.target.clone(),
                login: self.login_for(key),
                key: key.clone(),
                registry: self.registry.clone(),
            });
        let entry = Arc::new(Entry {
            key: Arc::new(key.clone()),
            retired: AtomicBool::new(false),
            pool,
            errors,
            known: Mutex::new(HashSet::new()),
            login_params: Mutex::new(HashMap::new()),
            startups: Mutex::new(HashSet::new()),
        });
        pools.insert(key.clone(), entry.clone());
        entry
    }

    /// `key`'s pool, for a session to keep (see `PoolRef`).
    pub fn pool_ref(&self, key: &PoolKey) -> PoolRef {
        PoolRef(self.entry(key))
    }

    /// A connection outside every pool, logged in as `key`'s pool would be: the proxy's own reads
    /// (the catalog) never take a connection a client is waiting for. Close it with `terminate`.
    pub async fn connect_unpooled(&self, key: &PoolKey) -> Result<ServerConn, UpstreamError> {
        let mut login = self.login_for(key);
        login.utf8 = true;
        ServerConn::connect(&self.target, &login).await
    }

    /// A logical replication connection logged in as `key`'s pool would be (the change stream).
    pub async fn connect_replication(&self, key: &PoolKey) -> Result<ServerConn, UpstreamError> {
        let mut login = self.login_for(key);
        login.replication = true;
        login.utf8 = true;
        ServerConn::connect(&self.target, &login).await
    }

    fn health(conn: &mut ServerConn, now: std::time::Instant, p: &PoolConfig) -> Health {
        if !p.health_check {
            Health::Good
        } else if conn.readable_while_idle() {
            conn.broken = true;
            Health::Broken
        } else if now.saturating_duration_since(conn.last_used) >= p.health_check_delay {
            Health::Unknown
        } else {
            Health::Good
        }
    }

    /// An idle connection for `key` without waiting, if the pool has one that needs no round
    /// trip to check: transaction mode's common case, with no future and no timer.
    pub fn try_acquire(
        &self,
        pool: &mut PoolRef,
        now: std::time::Instant,
        config: &PoolConfig,
    ) -> Option<ServerGuard> {
        if pool.0.retired.load(Ordering::Acquire) {
            *pool = self.pool_ref(pool.key());
        }
        let entry = &pool.0;
        // Cancel-safe: a connection not handed out stays in the pool.
        let mut conn = entry.pool.get_owned().now_or_never()?.ok()?;
        match Self::health(&mut conn, now, config) {
            Health::Good => Some(conn),
            // Broken: closed on drop. Unknown: back to the pool, for `acquire` to check.
            Health::Broken | Health::Unknown => None,
        }
    }

    /// Lend a server connection for `key`, waiting up to `pool.acquire_timeout`.
    pub async fn acquire(&self, key: &PoolKey) -> Result<ServerGuard, AcquireError> {
        let started = Instant::now();
        let config = self.config.load_full();
        let deadline = started + config.pool.acquire_timeout;
        loop {
            let mut conn = self.get(key, &config, started, deadline).await?;
            match Self::health(&mut conn, std::time::Instant::now(), &config.pool) {
                Health::Good => return Ok(conn),
                Health::Broken => tracing::debug!(pool = %key, "idle server connection is dead"),
                Health::Unknown => {
                    // Stays set if the check fails or is cut short: the connection would go
                    // back to the pool with the check's reply still owed.
                    conn.broken = true;
                    let ping = tokio::time::timeout_at(deadline, conn.simple_query(""));
                    if let Ok(Ok(_)) = ping.await {
                        conn.broken = false;
                        return Ok(conn);
                    }
                }
            }
        }
    }

    /// A connection from `key`'s pool as bb8 gives it, unchecked (`config`: as `acquire` read
    /// it when it began).
    async fn get(
        &self,
        key: &PoolKey,
        config: &Config,
        started: Instant,
        deadline: Instant,
    ) -> Result<ServerGuard, AcquireError> {
        let entry = self.entry(key);
        let mut backoff = config.upstream.retry_backoff;
        let mut errors = entry.errors.subscribe();
        let mut last_error: Option<Arc<UpstreamError>> = None;
        loop {
            tokio::select! {
                got = tokio::time::timeout_at(deadline, entry.pool.get_owned()) => {
                    return match got {
                        Ok(Ok(conn)) => Ok(conn),
                        Ok(Err(RunError::User(e))) => Err(AcquireError::Upstream(e)),
                        Ok(Err(RunError::TimedOut)) | Err(_) => Err(match last_error {
                            Some(e) => AcquireError::Upstream(e),
                            None => {
                                METRICS.pool_acquire_timeouts.inc();
                                AcquireError::Exhausted { pool: key.clone(), waited: started.elapsed() }
                            }
                        }),
                    };
                }
                Ok(e) = errors.recv() => {
                    if !e.retryable() || Instant::now() + backoff >= deadline {
                        return Err(AcquireError::Upstream(e));
                    }
                    last_error = Some(e);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(config.upstream.retry_backoff_max);
                }
            }
        }
    }

    /// A statement with this server name parsed without error in this pool.
    pub fn note_statement(&self, key: &PoolKey, server_name: &str) {
        let entry = self.entry(key);
        let mut known = entry.known.lock().unwrap_or_else(|p| p.into_inner());
        if known.len() >= MAX_KNOWN_STATEMENTS {
            known.clear();
        }
        known.insert(server_name.to_string());
    }

    /// Whether a statement parsed without error here before: its `Parse` can then be answered
    /// without borrowing a server connection.
    pub fn statement_known(&self, key: &PoolKey, server_name: &str) -> bool {
        let entry = self.entry(key);
        let known = entry.known.lock().unwrap_or_else(|p| p.into_inner());
        known.contains(server_name)
    }

    /// Remember what a login with `settings` was told.
    pub fn note_login_params(&self, key: &PoolKey, settings: Arc<SettingMap>, params: Arc<Params>) {
        let entry = self.entry(key);
        let mut map = entry.login_params.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_LOGIN_VARIANTS {
            map.clear();
        }
        map.insert(settings, params);
    }

    /// What an earlier login with the same startup settings was told, if any.
    pub fn login_params(&self, key: &PoolKey, settings: &SettingMap) -> Option<Arc<Params>> {
        let entry = self.entry(key);
        let map = entry.login_params.lock().unwrap_or_else(|p| p.into_inner());
        map.get(settings).cloned()
    }

    /// Take a new configuration: pools are rebuilt on their next use with the new sizes and
    /// credentials; the old ones close their connections as clients give them back.
    pub fn reload(&self, config: Arc<Config>) {
        self.config.store(config);
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        for e in pools.values() {
            e.retired.store(true, Ordering::Release);
        }
        pools.clear();
    }

    /// (key, connections, idle) for every pool; for the admin console and metrics.
    pub fn stats(&self) -> Vec<(PoolKey, u32, u32)> {
        let pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools
            .iter()
            .map(|(k, e)| {
                let s = e.pool.state();
                (k.clone(), s.connections, s.idle_connections)
            })
            .collect()
    }
}
