//! `[cache.redis]`: a shared second tier and the invalidation bus between proxies.

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
    /// `redis://[user:password@]host:port[/db]`; unset = no shared tier.
    pub url: Option<String>,
    /// Prefix of every key and of the bump channel: deployments sharing one Redis use their own.
    pub key_prefix: String,
    pub consistency: Consistency,
    /// Longest wait for one Redis call; a slower call counts as a failure.
    #[serde(with = "super::duration")]
    pub timeout: Duration,
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
            key_prefix: "pgcache:".into(),
            consistency: Consistency::Eventual,
            timeout: Duration::from_millis(100),
            failures_to_open: 3,
            max_backoff: Duration::from_secs(30),
        }
    }
}

pub(super) fn validate(c: &super::Config, bad: &mut impl FnMut(&str, String)) {
    let r = &c.cache.redis;
    let Some(url) = &r.url else { return };
    match url::Url::parse(url) {
        Ok(u) if u.scheme() == "redis" => {}
        Ok(u) => bad(
            "cache.redis.url",
            format!(
                "scheme {}:// is not supported: use redis:// (TLS and Cluster are not built yet)",
                u.scheme()
            ),
        ),
        Err(e) => bad("cache.redis.url", format!("{url:?} is not a URL: {e}")),
    }
    if !c.cache.enabled {
        bad("cache.redis.url", "needs cache.enabled = true".into());
    }
    if r.timeout.is_zero() {
        bad("cache.redis.timeout", "must be more than 0".into());
    }
    if r.failures_to_open == 0 {
        bad("cache.redis.failures_to_open", "must be at least 1".into());
    }
}
