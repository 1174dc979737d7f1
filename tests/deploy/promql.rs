//! Metric names in PromQL and in a Prometheus text exposition, for tests/deploy.rs: the
//! `pgcache_*` names (with the label matchers written after them) that the dashboard and the
//! alert rules use, and the series a scrape holds.

use serde_json::Value;
use std::collections::BTreeMap;

use super::files::{deploy_dir, read, yaml_docs};

/// A metric named in PromQL (or prose), with the label matchers written right after it.
#[derive(Debug)]
pub struct MetricRef {
    pub name: String,
    /// (label, operator, value)
    pub matchers: Vec<(String, String, String)>,
}

pub fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b':'
}

/// `a="x", b=~"y"` as (label, operator, value) triples.
pub fn parse_matchers(set: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut rest = set.trim();
    while !rest.is_empty() {
        let end = rest
            .bytes()
            .position(|b| !is_ident(b))
            .unwrap_or(rest.len());
        let label = rest[..end].to_string();
        let after = rest[end..].trim_start();
        let op = ["=~", "!~", "!=", "="]
            .into_iter()
            .find(|op| after.starts_with(op))
            .unwrap_or_else(|| panic!("no operator after {label} in {{{set}}}"));
        let after = after[op.len()..].trim_start();
        let body = after
            .strip_prefix('"')
            .unwrap_or_else(|| panic!("unquoted value in {{{set}}}"));
        let close = body.find('"').expect("closing quote");
        out.push((label, op.to_string(), body[..close].to_string()));
        rest = body[close + 1..]
            .trim_start()
            .trim_start_matches(',')
            .trim();
    }
    out
}

/// Every `pgcache_*` metric named in `text` (not part of a longer identifier).
pub fn metric_refs(text: &str) -> Vec<MetricRef> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(offset) = text[i..].find("pgcache_") {
        let start = i + offset;
        if start > 0 && is_ident(bytes[start - 1]) {
            i = start + 1;
            continue;
        }
        let mut end = start;
        while end < bytes.len() && is_ident(bytes[end]) {
            end += 1;
        }
        let mut matchers = Vec::new();
        let brace = text[end..].trim_start();
        if let Some(set) = brace.strip_prefix('{') {
            let close = set.find('}').expect("closing brace");
            matchers = parse_matchers(&set[..close]);
        }
        out.push(MetricRef {
            name: text[start..end].to_string(),
            matchers,
        });
        i = end;
    }
    out
}

/// Every string in a JSON value, and whether it is a query (under an `expr`, `query` or
/// `definition` key) rather than prose.
pub fn strings(v: &Value, query: bool, out: &mut Vec<(bool, String)>) {
    match v {
        Value::String(s) => out.push((query, s.clone())),
        Value::Array(a) => a.iter().for_each(|v| strings(v, query, out)),
        Value::Object(o) => o.iter().for_each(|(k, v)| {
            strings(
                v,
                matches!(k.as_str(), "expr" | "query" | "definition"),
                out,
            )
        }),
        _ => {}
    }
}

/// A metric that the dashboard or the alert rules name: where, whether in a query, and how.
pub struct Named {
    pub origin: &'static str,
    pub in_query: bool,
    pub metric: MetricRef,
}

pub fn referenced_metrics() -> Vec<Named> {
    let mut out = Vec::new();
    let dashboard = deploy_dir().join("grafana/dashboards/pgcache.json");
    let alerts = deploy_dir().join("prometheus/alerts.yml");
    let docs = [
        serde_json::from_str::<Value>(&read(&dashboard)).expect("dashboard JSON"),
        yaml_docs(&alerts).remove(0),
    ];
    for (doc, origin) in docs.iter().zip(["pgcache.json", "alerts.yml"]) {
        let mut texts = Vec::new();
        strings(doc, false, &mut texts);
        for (in_query, t) in texts {
            out.extend(metric_refs(&t).into_iter().map(|metric| Named {
                origin,
                in_query,
                metric,
            }));
        }
    }
    out
}

/// Samples of a Prometheus text exposition: series name → label sets.
pub fn scrape_samples(text: &str) -> BTreeMap<String, Vec<BTreeMap<String, String>>> {
    let mut out: BTreeMap<String, Vec<BTreeMap<String, String>>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let end = line
            .bytes()
            .position(|b| !is_ident(b))
            .unwrap_or(line.len());
        let labels = match line[end..].strip_prefix('{') {
            Some(set) => {
                let close = set.rfind('}').expect("closing brace");
                parse_matchers(&set[..close])
                    .into_iter()
                    .map(|(k, _, v)| (k, v))
                    .collect()
            }
            None => BTreeMap::new(),
        };
        out.entry(line[..end].to_string()).or_default().push(labels);
    }
    out
}
