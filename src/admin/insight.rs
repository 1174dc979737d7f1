//! Query insight for the console and the HTTP API: the per-fingerprint table (`SHOW QUERIES`,
//! `GET /queries`) and the latest slow statements (`SHOW SLOW`, `GET /slow`).

use crate::insight::stats::{self, Row};
use crate::listener::Shared;

pub const QUERY_COLUMNS: &[&str] = &[
    "fingerprint",
    "query",
    "calls",
    "errors",
    "rows",
    "cache_hits",
    "total_ms",
    "mean_ms",
    "max_ms",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "repeated_runs",
    "longest_run",
    "advice",
];

pub const SLOW_COLUMNS: &[&str] = &[
    "time",
    "duration_ms",
    "fingerprint",
    "query",
    "database",
    "user",
    "client",
    "rows",
    "cached",
    "error",
    "explain",
];

/// Parse `ORDER BY key` and `LIMIT n` (any order, both optional) from the words after
/// `SHOW QUERIES` (upper-cased).
pub fn query_options(words: &[&str]) -> Result<(String, usize), String> {
    let (mut sort, mut limit) = ("total".to_string(), 20usize);
    let mut i = 0;
    while i < words.len() {
        match (words[i], words.get(i + 1), words.get(i + 2)) {
            ("ORDER", Some(&"BY"), Some(k)) => {
                sort = k.to_ascii_lowercase();
                i += 3;
            }
            ("LIMIT", Some(n), _) => {
                limit = n.parse().map_err(|_| format!("LIMIT {n}: not a number"))?;
                i += 2;
            }
            _ => {
                return Err(format!(
                    "unexpected {:?}: use ORDER BY <key> and LIMIT <n>",
                    words[i]
                ))
            }
        }
    }
    if !stats::SORT_KEYS.contains(&sort.as_str()) {
        return Err(format!(
            "unknown sort key {sort:?}: use one of {}",
            stats::SORT_KEYS.join(", ")
        ));
    }
    Ok((sort, limit))
}

/// The top `limit` fingerprints by `sort` (a `stats::SORT_KEYS` key).
pub fn queries(shared: &Shared, sort: &str, limit: usize) -> Vec<Row> {
    let mut rows = shared.insight.stats.rows();
    stats::sort(&mut rows, sort);
    rows.truncate(limit);
    rows
}

pub fn query_cells(r: &Row) -> Vec<Option<String>> {
    let ms = |v: f64| Some(format!("{v:.3}"));
    vec![
        Some(r.fingerprint.clone()),
        Some(r.text.to_string()),
        Some(r.calls.to_string()),
        Some(r.errors.to_string()),
        Some(r.rows.to_string()),
        Some(r.cache_hits.to_string()),
        ms(r.total_ms),
        ms(r.mean_ms),
        ms(r.max_ms),
        ms(r.p50_ms),
        ms(r.p95_ms),
        ms(r.p99_ms),
        Some(r.repeated_runs.to_string()),
        Some(r.longest_run.to_string()),
        r.advice.as_deref().map(str::to_string),
    ]
}

pub fn query_json(r: &Row) -> serde_json::Value {
    serde_json::json!({
        "fingerprint": r.fingerprint,
        "query": &*r.text,
        "calls": r.calls,
        "errors": r.errors,
        "rows": r.rows,
        "cache_hits": r.cache_hits,
        "total_ms": r.total_ms,
        "mean_ms": r.mean_ms,
        "max_ms": r.max_ms,
        "p50_ms": r.p50_ms,
        "p95_ms": r.p95_ms,
        "p99_ms": r.p99_ms,
        "repeated_runs": r.repeated_runs,
        "longest_run": r.longest_run,
        "advice": r.advice.as_deref(),
    })
}

/// The latest slow statements, newest first, as JSON objects (one per slow-log line).
pub fn slow(shared: &Shared, limit: usize) -> Vec<serde_json::Value> {
    shared
        .insight
        .slow
        .recent(limit)
        .iter()
        .map(|r| r.json())
        .collect()
}

/// A slow-log object as console cells, in `SLOW_COLUMNS` order.
pub fn slow_cells(v: &serde_json::Value) -> Vec<Option<String>> {
    SLOW_COLUMNS
        .iter()
        .map(|c| match &v[*c] {
            serde_json::Value::Null => None,
            serde_json::Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn show_queries_options() {
        assert_eq!(super::query_options(&[]), Ok(("total".into(), 20)));
        assert_eq!(
            super::query_options(&["ORDER", "BY", "CALLS", "LIMIT", "5"]),
            Ok(("calls".into(), 5))
        );
        assert!(super::query_options(&["ORDER", "BY", "NAME"]).is_err());
        assert!(super::query_options(&["LIMIT", "x"]).is_err());
    }
}
