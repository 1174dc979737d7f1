//! `[insight]` and `[slow_query]`: per-fingerprint statistics, the repeated-statement detector,
//! the slow query log and its `EXPLAIN` sampling (DESIGN §3).

use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct InsightConfig {
    /// Count every statement under its fingerprint (needs every message read whole: session
    /// pooling then takes the same path as transaction pooling).
    pub enabled: bool,
    /// Most fingerprints kept; beyond it the least total time is forgotten first.
    pub max_fingerprints: usize,
    /// A session running one fingerprint this many times in a row is reported (N+1 reads,
    /// row-at-a-time inserts); 0 turns the detector off.
    pub repeat_threshold: u32,
}

impl Default for InsightConfig {
    fn default() -> Self {
        InsightConfig {
            enabled: true,
            max_fingerprints: 5000,
            repeat_threshold: 20,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SlowQueryConfig {
    /// Statements taking at least this long are slow; `"0"` turns the slow log off.
    #[serde(with = "super::duration")]
    pub threshold: Duration,
    /// Where JSON lines go: `"stderr"`, `"off"`, or a file path (appended to).
    pub log: String,
    /// Most lines written per second; the rest are counted in `pgcache_slow_log_dropped_total`.
    pub max_per_second: u32,
    /// Slow statements kept for `SHOW SLOW` and `GET /slow`.
    pub keep: usize,
    /// Run `EXPLAIN (FORMAT JSON)` for slow statements on a separate connection.
    pub explain: bool,
    /// Use `EXPLAIN (ANALYZE, FORMAT JSON)` for read-only statements (runs them again).
    pub explain_analyze: bool,
    /// Explain one fingerprint at most once per this interval.
    #[serde(with = "super::duration")]
    pub explain_interval: Duration,
    /// A sequential scan is reported when its relation has at least this many rows.
    pub explain_min_rows: u64,
}

impl Default for SlowQueryConfig {
    fn default() -> Self {
        SlowQueryConfig {
            threshold: Duration::from_millis(500),
            log: "stderr".into(),
            max_per_second: 10,
            keep: 100,
            explain: false,
            explain_analyze: false,
            explain_interval: Duration::from_secs(60),
            explain_min_rows: 10_000,
        }
    }
}

/// Problems with `[insight]`, `[slow_query]` and the health threshold of `[metrics]`.
pub(super) fn validate(c: &super::Config, bad: &mut impl FnMut(&str, String)) {
    if c.insight.max_fingerprints == 0 {
        bad("insight.max_fingerprints", "must be at least 1".into());
    }
    let u = c.metrics.health_pool_utilisation;
    if !(u > 0.0 && u <= 1.0) {
        bad(
            "metrics.health_pool_utilisation",
            format!("{u} is not a share between 0 (excluded) and 1"),
        );
    }
    let s = &c.slow_query;
    if s.max_per_second == 0 {
        bad("slow_query.max_per_second", "must be at least 1".into());
    }
    if s.explain && !c.insight.enabled {
        bad(
            "slow_query.explain",
            "needs insight.enabled = true (slow statements are found by it)".into(),
        );
    }
    if s.explain_analyze && !s.explain {
        bad(
            "slow_query.explain_analyze",
            "needs slow_query.explain = true".into(),
        );
    }
    if !matches!(s.log.as_str(), "stderr" | "off") {
        let path = std::path::Path::new(&s.log);
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        if s.log.is_empty() || path.is_dir() || dir.is_some_and(|d| !d.is_dir()) {
            bad(
                "slow_query.log",
                format!(
                    "{:?} is not \"stderr\", \"off\" or a file in an existing directory",
                    s.log
                ),
            );
        }
    }
}
