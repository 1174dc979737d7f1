//! Cache administration shared by the console and the HTTP API: explicit invalidation (by
//! table glob, key-name glob, exact key name, fingerprint, or everything) and the cache's
//! figures.

use crate::cache::{glob_match, Entry};
use crate::listener::Shared;
use crate::metrics::METRICS;

/// What to invalidate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Relations whose name matches the glob: every entry that read them, now and later.
    Table(String),
    /// Entries whose name (`database/role/fingerprint/params-hash`) matches the glob.
    Pattern(String),
    /// The entry of this exact name.
    Key(String),
    /// Entries of this statement fingerprint.
    Fingerprint(String),
    All,
}

impl Target {
    /// From a kind word and an argument (`TABLE 'order*'`); quotes around the argument are
    /// optional.
    pub fn parse(kind: &str, arg: Option<&str>) -> Result<Target, String> {
        let arg = arg
            .map(|a| a.trim().trim_matches('\'').trim_matches('"').to_string())
            .filter(|a| !a.is_empty());
        let need =
            |a: Option<String>| a.ok_or_else(|| format!("INVALIDATE {kind} needs an argument"));
        Ok(match kind.to_ascii_uppercase().as_str() {
            "TABLE" => Target::Table(need(arg)?),
            "PATTERN" => Target::Pattern(need(arg)?),
            "KEY" => Target::Key(need(arg)?),
            "FINGERPRINT" => Target::Fingerprint(need(arg)?),
            "ALL" if arg.is_none() => Target::All,
            _ => {
                return Err(format!(
                    "unknown target {kind:?}: use TABLE, PATTERN, KEY, FINGERPRINT or ALL"
                ))
            }
        })
    }
}

/// Invalidate; returns how many relations (for `Table`) or entries were affected.
pub fn invalidate(shared: &Shared, target: &Target) -> usize {
    let cache = &shared.cache;
    let count = |name: &str, pred: &dyn Fn(&Entry) -> bool| {
        let n = cache.invalidate_names(pred);
        tracing::info!(target = name, entries = n, "cache invalidated");
        METRICS
            .cache_invalidations
            .with_label_values(&["explicit"])
            .inc();
        n
    };
    match target {
        Target::Table(glob) => {
            let n: usize = cache
                .dbs()
                .iter()
                .map(|db| db.bump_matching(glob, "explicit"))
                .sum();
            tracing::info!(table = %glob, relations = n, "cache invalidated by table");
            n
        }
        Target::Pattern(glob) => count("pattern", &|e| glob_match(glob, &e.name)),
        Target::Key(name) => count("key", &|e| e.name == *name),
        Target::Fingerprint(fp) => count("fingerprint", &|e| e.fingerprint == *fp),
        Target::All => {
            let n = cache.invalidate_all();
            tracing::info!(entries = n, "cache invalidated: all");
            n
        }
    }
}

/// The cache's figures, as (name, value) pairs.
pub fn figures(shared: &Shared) -> Vec<(&'static str, String)> {
    let s = shared.cache.stats();
    let m = &METRICS;
    let inv = |src: &str| m.cache_invalidations.with_label_values(&[src]).get();
    vec![
        ("enabled", shared.cache.enabled().to_string()),
        ("entries", s.entries.to_string()),
        ("bytes", s.bytes.to_string()),
        ("hits", m.cache_hits.get().to_string()),
        ("misses", m.cache_misses.get().to_string()),
        ("fills", m.cache_fills.get().to_string()),
        ("evictions", m.cache_evictions.get().to_string()),
        ("stale_dropped", m.cache_stale_dropped.get().to_string()),
        ("expired", m.cache_expired.get().to_string()),
        ("invalidations_write", inv("write").to_string()),
        ("invalidations_ddl", inv("ddl").to_string()),
        ("invalidations_explicit", inv("explicit").to_string()),
        ("invalidations_replication", inv("replication").to_string()),
        ("invalidations_peer", inv("peer").to_string()),
        (
            "redis",
            match &shared.cache.tier {
                None => "off".into(),
                Some(t) if t.is_up() => "up".into(),
                Some(_) => "down".into(),
            },
        ),
        ("l2_hits", m.cache_l2_hits.get().to_string()),
        ("l2_misses", m.cache_l2_misses.get().to_string()),
        ("l2_fills", m.cache_l2_fills.get().to_string()),
        (
            "redis_fallbacks",
            ["open", "error"]
                .iter()
                .map(|r| m.redis_fallbacks.with_label_values(&[r]).get())
                .sum::<u64>()
                .to_string(),
        ),
        ("peer_delay_mean_ms", mean_ms(&m.redis_propagation)),
        (
            "replication",
            if !shared.config().invalidation.replication.enabled {
                "off".into()
            } else if m.replication_up.get() == 1 {
                "up".into()
            } else {
                "down".into()
            },
        ),
        (
            "replication_transactions",
            m.replication_transactions.get().to_string(),
        ),
        ("replication_delay_mean_ms", mean_ms(&m.replication_delay)),
    ]
}

fn mean_ms(h: &prometheus::Histogram) -> String {
    let n = h.get_sample_count();
    if n == 0 {
        return "0".into();
    }
    format!("{:.3}", h.get_sample_sum() / n as f64 * 1000.0)
}

/// Figures as a JSON object (HTTP `GET /cache`).
pub fn figures_json(shared: &Shared) -> String {
    let body: Vec<String> = figures(shared)
        .into_iter()
        .map(|(k, v)| {
            if v.parse::<f64>().is_ok() || v == "true" || v == "false" {
                format!("\"{k}\":{v}")
            } else {
                format!("\"{k}\":{}", serde_json::Value::from(v))
            }
        })
        .collect();
    format!("{{{}}}\n", body.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(
            Target::parse("table", Some("'order*'")),
            Ok(Target::Table("order*".into()))
        );
        assert_eq!(Target::parse("ALL", None), Ok(Target::All));
        assert!(Target::parse("TABLE", None).is_err());
        assert!(Target::parse("ROWS", Some("x")).is_err());
        assert_eq!(
            Target::parse("KEY", Some("app/alice/abc/0")),
            Ok(Target::Key("app/alice/abc/0".into()))
        );
    }
}
