//! `[cache.redis]`: a shared second tier and the invalidation bus between proxies (one Redis,
//! with or without TLS, or a Redis Cluster).

use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Consistency {
    /// Trust the broadcast: a hit is served on this proxy's view of the versions.
    #[default]
    Eventual,
    /// Check the versions in Redis on every hit (one round trip); without Redis, no hits.
    Strict,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`, or `rediss://` for TLS; unset = no shared tier
    /// (unless `cluster`).
    pub url: Option<String>,
    /// Redis Cluster: the URLs of some of its nodes (instead of `url`).
    pub cluster: Vec<String>,
    /// PEM file of the CA that signed Redis's certificate (`rediss://`); default: the system's.
    pub ca_file: Option<String>,
    /// Prefix of every key and of the bump channel: deployments sharing one Redis use their own.
    pub key_prefix: String,
    pub consistency: Consistency,
    /// Longest wait for one Redis call; a slower call counts as a failure.
    #[serde(with = "super::duration")]
    pub timeout: Duration,
    /// Longest wait for a write's bump (never less than `timeout`): the writer's
    /// acknowledgement waits for it, and a bump given up on leaves the other proxies a window
    /// in which they may serve what it invalidated.
    #[serde(with = "super::duration")]
    pub bump_timeout: Duration,
    /// After this many failures in a row Redis is left alone (the circuit opens) for a backoff
    /// that doubles from 1s up to `max_backoff`.
    pub failures_to_open: u32,
    #[serde(with = "super::duration")]
    pub max_backoff: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: None,
            cluster: Vec::new(),
            ca_file: None,
            key_prefix: "pgcache:".into(),
            consistency: Consistency::Eventual,
            timeout: Duration::from_millis(100),
            bump_timeout: Duration::from_secs(1),
            failures_to_open: 3,
            max_backoff: Duration::from_secs(30),
        }
    }
}

pub(super) fn validate(c: &super::Config, bad: &mut impl FnMut(&str, String)) {
    let r = &c.cache.redis;
    if r.url.is_some() && !r.cluster.is_empty() {
        bad(
            "cache.redis.cluster",
            "give either cache.redis.url (one Redis) or cache.redis.cluster (its nodes), not both"
                .into(),
        );
    }
    let urls: Vec<(String, &String)> = match &r.url {
        Some(u) => vec![("cache.redis.url".into(), u)],
        None => r
            .cluster
            .iter()
            .enumerate()
            .map(|(i, u)| (format!("cache.redis.cluster.{i}"), u))
            .collect(),
    };
    if urls.is_empty() {
        return;
    }
    for (key, url) in urls {
        match url::Url::parse(url) {
            Ok(u) if u.scheme() == "redis" || u.scheme() == "rediss" => {}
            Ok(u) => bad(
                &key,
                format!(
                    "scheme {}:// is not Redis: use redis:// or rediss://",
                    u.scheme()
                ),
            ),
            Err(e) => bad(&key, format!("{url:?} is not a URL: {e}")),
        }
    }
    if let Some(f) = &r.ca_file {
        if std::fs::metadata(f).is_err() {
            bad("cache.redis.ca_file", format!("cannot read {f}"));
        }
    }
    if !c.cache.enabled {
        bad("cache.redis.url", "needs cache.enabled = true".into());
    }
    if r.timeout.is_zero() {
        bad("cache.redis.timeout", "must be more than 0".into());
    }
    if r.bump_timeout.is_zero() {
        bad("cache.redis.bump_timeout", "must be more than 0".into());
    }
    if r.failures_to_open == 0 {
        bad("cache.redis.failures_to_open", "must be at least 1".into());
    }
}
