//! The `proxy.toml` schema: every key, its default and what it means. These structs are the
//! reference for the README's configuration table; `load` parses, applies environment overrides
//! (`PGCACHE_<SECTION>_<KEY>`) and validates, reporting problems with the key and line.

mod env;
mod insight;
mod invalidation;
mod load;
mod redis;
mod source;

pub use insight::{InsightConfig, SlowQueryConfig};
pub use invalidation::{InvalidationConfig, ReplicationConfig};
pub use load::{load_file, load_str, validate, ConfigError, Problem};
pub use redis::{Consistency, RedisConfig};
pub use source::{Overrides, Source};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Client-facing listener.
    pub proxy: ProxyConfig,
    /// The PostgreSQL server behind the proxy.
    pub upstream: UpstreamConfig,
    /// Server connection pools, one per (database, user).
    pub pool: PoolConfig,
    /// Client authentication defaults.
    pub auth: AuthConfig,
    /// Per-user client authentication and upstream credentials.
    pub users: BTreeMap<String, UserConfig>,
    /// Per-database settings; databases not listed pass through under the same name.
    pub databases: BTreeMap<String, DatabaseConfig>,
    /// Client-facing TLS.
    pub tls: ClientTlsConfig,
    /// HTTP endpoint for Prometheus metrics and health.
    pub metrics: MetricsConfig,
    /// The admin console (`psql -d pgcache`).
    pub admin: AdminConfig,
    /// The result cache.
    pub cache: CacheConfig,
    /// Per-fingerprint statistics and the repeated-statement detector.
    pub insight: InsightConfig,
    /// The slow query log and `EXPLAIN` of slow statements.
    pub slow_query: SlowQueryConfig,
    /// Invalidation from sources other than the proxy's own writes.
    pub invalidation: InvalidationConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Addresses to accept clients on.
    pub listen: Vec<String>,
    /// Most client connections at once; further ones get `53300`.
    pub max_clients: usize,
    /// Largest message accepted from a client or the upstream, in bytes.
    pub max_message_bytes: usize,
    /// Time a client has to finish startup and authentication.
    #[serde(with = "duration")]
    pub client_login_timeout: Duration,
    /// On SIGTERM/SIGINT, how long sessions may run before they are closed.
    #[serde(with = "duration")]
    pub shutdown_timeout: Duration,
    /// Threads serving clients: 0 = one per core; 1 = all on one thread (no hand-offs between
    /// threads: the least CPU per transaction, on one core).
    pub worker_threads: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: vec!["127.0.0.1:6432".into()],
            max_clients: 10_000,
            max_message_bytes: 0x3fff_ffff,
            client_login_timeout: Duration::from_secs(15),
            shutdown_timeout: Duration::from_secs(30),
            worker_threads: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Host name or IP of the PostgreSQL server.
    pub host: String,
    pub port: u16,
    /// The user whose `password` is given here (for users without their own `[users]` entry).
    pub user: Option<String>,
    /// Password of `user` (env `PGCACHE_UPSTREAM_PASSWORD`).
    pub password: Option<String>,
    /// Database a client gets when its startup packet names none (default: the user name).
    pub database: Option<String>,
    /// Time allowed for one TCP connect + TLS + authentication.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// First wait between reconnect attempts; doubles up to `retry_backoff_max`.
    #[serde(with = "duration")]
    pub retry_backoff: Duration,
    #[serde(with = "duration")]
    pub retry_backoff_max: Duration,
    /// TLS towards the upstream.
    pub tls: UpstreamTlsConfig,
    /// The ways the server may ask the proxy to log in (as libpq's `require_auth`); `None`:
    /// any it asks for.
    pub require_auth: Option<Vec<UpstreamAuth>>,
}

/// An authentication method a server can ask for.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamAuth {
    /// Cleartext password.
    Password,
    Md5,
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    /// Nothing asked: the server lets the proxy in without a password (`trust`).
    None,
}

impl UpstreamAuth {
    /// The name used in `proxy.toml`.
    pub fn name(self) -> &'static str {
        match self {
            UpstreamAuth::Password => "password",
            UpstreamAuth::Md5 => "md5",
            UpstreamAuth::ScramSha256 => "scram-sha-256",
            UpstreamAuth::None => "none",
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            host: "127.0.0.1".into(),
            port: 5432,
            user: None,
            password: None,
            database: None,
            connect_timeout: Duration::from_secs(5),
            retry_backoff: Duration::from_millis(100),
            retry_backoff_max: Duration::from_secs(2),
            tls: UpstreamTlsConfig::default(),
            require_auth: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTlsMode {
    /// Plain TCP.
    #[default]
    Disable,
    /// TLS when the server offers it, without certificate checks.
    Prefer,
    /// TLS always, without certificate checks.
    Require,
    /// TLS always; the certificate must chain to `ca_file` and match the host name.
    VerifyFull,
}

/// SCRAM channel binding on the proxy's own login to the upstream, as libpq's
/// `channel_binding`.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ChannelBinding {
    /// Bind when the server offers it over TLS.
    #[default]
    Prefer,
    /// Never bind (a TLS-terminating hop between proxy and server shows its own certificate).
    Disable,
    /// Log in only with a bound SCRAM exchange.
    Require,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    pub mode: UpstreamTlsMode,
    pub channel_binding: ChannelBinding,
    /// PEM file of CA certificates for `verify-full`.
    pub ca_file: Option<String>,
    /// Name to verify in the server certificate (default: `upstream.host`).
    pub server_name: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum PoolMode {
    /// One server connection per client for the client's whole session.
    Session,
    /// A server connection per transaction, given back at `ReadyForQuery 'I'`.
    #[default]
    Transaction,
}

impl PoolMode {
    pub fn name(self) -> &'static str {
        match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
        }
    }
}

/// What transaction pooling does with statements whose state lives on one server connection
/// (`LISTEN`, session advisory locks, SQL `PREPARE`, `WITH HOLD` cursors, temp tables).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SessionStatePolicy {
    /// Keep the client on its server connection until it disconnects.
    #[default]
    Pin,
    /// Refuse the statement with `0A000`.
    Refuse,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    pub mode: PoolMode,
    /// Idle server connections kept open per pool.
    pub min_idle: u32,
    /// Most server connections per pool.
    pub max_size: u32,
    /// How long a client waits for a server connection before `53300`.
    #[serde(with = "duration")]
    pub acquire_timeout: Duration,
    /// Idle server connections are closed after this long (0 = never).
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// Server connections are closed after this age (0 = never).
    #[serde(with = "duration")]
    pub max_lifetime: Duration,
    /// Check a server connection with an empty query before lending it.
    pub health_check: bool,
    /// Connections idle for less than this are lent without the health check.
    #[serde(with = "duration")]
    pub health_check_delay: Duration,
    /// Run on a server connection given back after a session (session mode); empty for none.
    pub reset_query: String,
    /// Prepared statements kept per server connection (transaction mode), least recently used
    /// closed first.
    pub max_prepared_statements: usize,
    /// Transaction mode: replay `SET` made outside transactions on every server connection the
    /// client gets (true), or refuse such `SET` with `0A000` (false).
    pub track_set: bool,
    /// Transaction mode: `pin` or `refuse` statements that need one server connection for good.
    pub session_state: SessionStatePolicy,
    /// Cancel a statement running longer than this (the client gets `57014`); 0 = off.
    #[serde(with = "duration")]
    pub query_timeout: Duration,
    /// Close a client idle inside a transaction this long (`25P03`); 0 = off.
    #[serde(with = "duration")]
    pub idle_transaction_timeout: Duration,
    /// Close a client idle outside a transaction this long (`57P05`); 0 = off.
    #[serde(with = "duration")]
    pub client_idle_timeout: Duration,
    /// A client quiet this long between transactions parks (`session::park`); 0 = never.
    #[serde(with = "duration")]
    pub park_after: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            mode: PoolMode::Session,
            min_idle: 0,
            max_size: 20,
            acquire_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(3600),
            health_check: true,
            health_check_delay: Duration::from_secs(1),
            reset_query: "DISCARD ALL".into(),
            max_prepared_statements: 200,
            track_set: true,
            session_state: SessionStatePolicy::Pin,
            query_timeout: Duration::ZERO,
            idle_transaction_timeout: Duration::ZERO,
            client_idle_timeout: Duration::ZERO,
            park_after: Duration::from_millis(250),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMethod {
    /// No password; allowed only when every listen address is loopback.
    Trust,
    Md5,
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    /// Refuse the user.
    Reject,
}

impl AuthMethod {
    /// The name used in `proxy.toml` (and as a metric label).
    pub fn name(self) -> &'static str {
        match self {
            AuthMethod::Trust => "trust",
            AuthMethod::Md5 => "md5",
            AuthMethod::ScramSha256 => "scram-sha-256",
            AuthMethod::Reject => "reject",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Method for users without a `[users]` entry (and the default for those with one).
    pub method: AuthMethod,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            method: AuthMethod::Trust,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct UserConfig {
    /// Cleartext password, or a `SCRAM-SHA-256$...` / `md5...` secret as stored in `pg_authid`.
    pub password: Option<String>,
    /// Client authentication method (default: `auth.method`).
    pub method: Option<AuthMethod>,
    /// User name on the upstream (default: the same name).
    pub server_user: Option<String>,
    /// Upstream password (default: `password` when it is cleartext).
    pub server_password: Option<String>,
    /// Pool mode for this user's pools (overrides the database's and `pool.mode`).
    pub pool_mode: Option<PoolMode>,
    /// `max_size` for this user's pools (overrides the database's and `pool.max_size`).
    pub pool_size: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Database name on the upstream (default: the same name).
    pub dbname: Option<String>,
    /// Pool mode for this database's pools (overrides `pool.mode`).
    pub pool_mode: Option<PoolMode>,
    /// `max_size` for this database's pools (overrides `pool.max_size`).
    pub pool_size: Option<u32>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ClientTlsMode {
    /// Answer `SSLRequest` with 'N'.
    #[default]
    Disable,
    /// TLS for clients that ask; plain for the others.
    Allow,
    /// Clients must use TLS.
    Require,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClientTlsConfig {
    pub mode: ClientTlsMode,
    /// PEM certificate chain.
    pub cert_file: Option<String>,
    /// PEM private key.
    pub key_file: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Users allowed into the admin console (database `pgcache`); they authenticate like any
    /// user (see `[users]`).
    pub users: Vec<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            users: vec!["pgcache".into()],
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the HTTP endpoint (`/metrics`, `/health`); none when unset.
    pub listen: Option<String>,
    /// `/health` says degraded when a pool has more than this share of `pool.max_size` busy.
    pub health_pool_utilisation: f64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: None,
            health_pool_utilisation: 0.9,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Cache reads at all; nothing outside a rule is cached either way.
    pub enabled: bool,
    /// How long an entry lives when its rule sets no `ttl`.
    #[serde(with = "duration")]
    pub default_ttl: Duration,
    /// Most entries held in memory.
    pub max_entries: usize,
    /// Most bytes of results held in memory.
    pub max_bytes: usize,
    /// A larger result is streamed to the client and not stored.
    pub max_entry_bytes: usize,
    /// Which reads may be cached.
    pub rules: Vec<CacheRule>,
    /// Queries run at start so clients find them cached.
    pub warm: Vec<CacheWarm>,
    /// The shared tier and bus between proxies.
    pub redis: RedisConfig,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: false,
            default_ttl: Duration::from_secs(60),
            max_entries: 100_000,
            max_bytes: 256 << 20,
            max_entry_bytes: 1 << 20,
            rules: Vec::new(),
            warm: Vec::new(),
            redis: RedisConfig::default(),
        }
    }
}

/// A read is cached when every relation it names matches a rule.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CacheRule {
    /// Globs (`*`, `?`) on table or view names; `schema.name` globs match names written with a
    /// schema, and unqualified names as `public.name`.
    pub tables: Vec<String>,
    /// Time to live of entries from this rule; `cache.default_ttl` when unset.
    #[serde(with = "opt_duration", skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Duration>,
    /// Share results across roles (only for tables every role may read in full; never applies
    /// to tables with row-level security).
    pub shared: bool,
    /// Also serve and fill inside read-only read-committed transactions.
    pub in_transaction: bool,
}

/// A query to run at start (and again when its result is invalidated, with `refresh`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CacheWarm {
    /// One read, written exactly as the clients send it (the text is part of the key).
    pub sql: String,
    /// Client-facing database and user of the clients it is for.
    pub database: String,
    pub user: String,
    /// Session settings of those clients (what their driver sends at startup, minus
    /// `application_name`).
    pub settings: BTreeMap<String, String>,
    /// Run again whenever the entry is invalidated or expires.
    pub refresh: bool,
}

impl Default for CacheWarm {
    fn default() -> Self {
        CacheWarm {
            sql: String::new(),
            database: String::new(),
            user: String::new(),
            settings: [("client_encoding".to_string(), "UTF8".to_string())].into(),
            refresh: true,
        }
    }
}

/// Parse a duration as the configuration writes it.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    duration::parse(s)
}

mod opt_duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s = String::deserialize(d)?;
        super::duration::parse(&s)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }
}

/// Durations are written as `"30s"`, `"250ms"`, `"5m"`, `"1h"`; `"0"` or `"0s"` means none.
mod duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        if d.is_zero() {
            return s.serialize_str("0");
        }
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map_err(serde::de::Error::custom)
    }

    pub fn parse(s: &str) -> Result<Duration, String> {
        if s.trim() == "0" {
            return Ok(Duration::ZERO);
        }
        humantime::parse_duration(s.trim())
            .map_err(|e| format!("invalid duration {s:?} ({e}); write e.g. \"30s\" or \"250ms\""))
    }
}

impl Config {
    /// The database name to use upstream for a client database name.
    pub fn upstream_database<'a>(&'a self, client_db: &'a str) -> &'a str {
        self.databases
            .get(client_db)
            .and_then(|d| d.dbname.as_deref())
            .unwrap_or(client_db)
    }

    /// Pool mode for a (database, user): the user's override, the database's, then `pool.mode`.
    pub fn pool_mode(&self, database: &str, user: &str) -> PoolMode {
        self.users
            .get(user)
            .and_then(|u| u.pool_mode)
            .or_else(|| self.databases.get(database).and_then(|d| d.pool_mode))
            .unwrap_or(self.pool.mode)
    }

    /// `max_size` for a (database, user), resolved like `pool_mode`.
    pub fn pool_size(&self, database: &str, user: &str) -> u32 {
        self.users
            .get(user)
            .and_then(|u| u.pool_size)
            .or_else(|| self.databases.get(database).and_then(|d| d.pool_size))
            .unwrap_or(self.pool.max_size)
    }
}
