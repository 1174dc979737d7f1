//! `[invalidation.replication]`: invalidate cached results from PostgreSQL's change stream
//! (logical replication, `pgoutput`), so writes that bypass the proxy are seen too.

use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct InvalidationConfig {
    pub replication: ReplicationConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicationConfig {
    /// Read the change stream (needs `wal_level = logical` and a user with REPLICATION).
    pub enabled: bool,
    /// The database to stream, as clients name it (default: `upstream.database`, else
    /// `upstream.user`).
    pub database: Option<String>,
    /// The user that streams; its password comes from `[users]` or `[upstream]` as for pools
    /// (default: `upstream.user`).
    pub user: Option<String>,
    /// Replication slot: created when missing (`create`), kept across restarts so no change is
    /// missed while the proxy is down. One per proxy: a slot streams to one reader at a time.
    pub slot: String,
    /// Publication of the tables to watch (created `FOR ALL TABLES` when missing, `create`).
    pub publication: String,
    /// Create the slot and publication when they do not exist.
    pub create: bool,
    /// How often the proxy confirms its position (so the server can recycle WAL).
    #[serde(with = "super::duration")]
    pub status_interval: Duration,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            enabled: false,
            database: None,
            user: None,
            slot: "pgcache".into(),
            publication: "pgcache".into(),
            create: true,
            status_interval: Duration::from_secs(10),
        }
    }
}

impl super::Config {
    /// (database as clients name it, user) of the change stream.
    pub fn replication_source(&self) -> (String, String) {
        let r = &self.invalidation.replication;
        let user = r
            .user
            .clone()
            .or_else(|| self.upstream.user.clone())
            .unwrap_or_else(|| "postgres".into());
        let database = r
            .database
            .clone()
            .or_else(|| self.upstream.database.clone())
            .unwrap_or_else(|| user.clone());
        (database, user)
    }
}

/// Problems with `[invalidation.replication]`.
pub(super) fn validate(c: &super::Config, bad: &mut impl FnMut(&str, String)) {
    let r = &c.invalidation.replication;
    if !r.enabled {
        return;
    }
    if !c.cache.enabled {
        bad(
            "invalidation.replication.enabled",
            "needs cache.enabled = true (it invalidates cached results)".into(),
        );
    }
    let ident = |s: &str| {
        !s.is_empty()
            && s.len() < 64
            && s.chars()
                .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_')
    };
    for (key, v) in [("slot", &r.slot), ("publication", &r.publication)] {
        if !ident(v) {
            bad(
                &format!("invalidation.replication.{key}"),
                format!("{v:?}: use lower-case letters, digits and _ (at most 63)"),
            );
        }
    }
    if r.status_interval.is_zero() {
        bad(
            "invalidation.replication.status_interval",
            "must be more than 0".into(),
        );
    }
}
