//! Per-fingerprint statistics across all clients: calls, errors, rows, cache hits, time
//! (total, max, and a log-scale histogram for percentiles), repeated runs and the latest
//! `EXPLAIN` finding. Bounded: beyond `max_fingerprints` the least total time goes first.

use super::fingerprint::Fingerprint;
// Keys are fingerprints, already hashes: a fast hasher is enough.
use foldhash::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

const SHARDS: usize = 16;
/// Exact below 16 µs, then 4 buckets per power of two (each within 19% of its values).
const BUCKETS: usize = 16 + 4 * 40;

pub struct FpStats {
    pub fp: Arc<Fingerprint>,
    pub calls: u64,
    pub errors: u64,
    pub rows: u64,
    pub cache_hits: u64,
    pub total_us: u64,
    pub max_us: u64,
    hist: Box<[u32; BUCKETS]>,
    /// Times one session ran this fingerprint `repeat_threshold` times in a row.
    pub repeated_runs: u64,
    /// Longest such run seen.
    pub longest_run: u64,
    pub last_explain: Option<Instant>,
    pub finding: Option<Arc<str>>,
}

impl FpStats {
    fn new(fp: Arc<Fingerprint>) -> Self {
        FpStats {
            fp,
            calls: 0,
            errors: 0,
            rows: 0,
            cache_hits: 0,
            total_us: 0,
            max_us: 0,
            hist: Box::new([0; BUCKETS]),
            repeated_runs: 0,
            longest_run: 0,
            last_explain: None,
            finding: None,
        }
    }

    /// Count one more run of the statement.
    fn add(&mut self, s: &Sample, repeated: Option<(u64, u64)>) {
        self.calls += 1;
        self.rows += s.rows;
        self.errors += u64::from(s.error);
        self.cache_hits += u64::from(s.cached);
        self.total_us += s.us;
        self.max_us = self.max_us.max(s.us);
        let b = &mut self.hist[bucket(s.us)];
        *b = b.saturating_add(1);
        if let Some((run, threshold)) = repeated {
            self.repeated_runs += u64::from(run == threshold);
            self.longest_run = self.longest_run.max(run);
        }
    }

    pub fn mean_us(&self) -> f64 {
        if self.calls == 0 {
            0.0
        } else {
            self.total_us as f64 / self.calls as f64
        }
    }

    /// The `q` quantile (0..1) in µs, as the middle of its histogram bucket.
    pub fn percentile_us(&self, q: f64) -> u64 {
        let n: u64 = self.hist.iter().map(|&c| u64::from(c)).sum();
        if n == 0 {
            return 0;
        }
        let rank = ((n as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &c) in self.hist.iter().enumerate() {
            seen += u64::from(c);
            if seen >= rank {
                let (lo, hi) = bucket_range(i);
                return ((lo + hi) / 2).min(self.max_us);
            }
        }
        self.max_us
    }
}

fn bucket(us: u64) -> usize {
    if us < 16 {
        return us as usize;
    }
    let e = 63 - us.leading_zeros() as usize; // >= 4
    let sub = ((us >> (e - 2)) & 3) as usize;
    (16 + (e - 4) * 4 + sub).min(BUCKETS - 1)
}

/// Values `lo..=hi` fall in bucket `i`.
fn bucket_range(i: usize) -> (u64, u64) {
    if i < 16 {
        return (i as u64, i as u64);
    }
    let e = (i - 16) / 4 + 4;
    let sub = ((i - 16) % 4) as u64;
    let lo = (1u64 << e) + sub * (1u64 << (e - 2));
    (lo, lo + (1u64 << (e - 2)) - 1)
}

/// One finished statement.
pub struct Sample {
    pub us: u64,
    pub rows: u64,
    pub error: bool,
    pub cached: bool,
}

type Shard = HashMap<u64, FpStats>;

pub struct Table {
    shards: Vec<Mutex<Shard>>,
}

impl Default for Table {
    fn default() -> Self {
        Table {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::default()))
                .collect(),
        }
    }
}

impl Table {
    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[(id as usize) % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Count `s` under `fp`; `max` bounds the fingerprints kept. `repeated`: (place in a run,
    /// threshold) when a session has run `fp` at least the threshold times in a row.
    pub fn record(
        &self,
        fp: &Arc<Fingerprint>,
        s: &Sample,
        max: usize,
        repeated: Option<(u64, u64)>,
    ) {
        let mut shard = self.shard(fp.id);
        if let Some(e) = shard.get_mut(&fp.id) {
            e.add(s, repeated);
            return;
        }
        let room = max.div_ceil(SHARDS).max(1);
        while shard.len() >= room {
            let least = shard
                .iter()
                .min_by_key(|(_, v)| v.total_us)
                .map(|(k, _)| *k);
            match least {
                Some(k) => shard.remove(&k),
                None => break,
            };
        }
        let mut e = FpStats::new(fp.clone());
        e.add(s, repeated);
        shard.insert(fp.id, e);
    }

    /// Claim the right to explain `id` now: false when it was explained less than `every` ago.
    pub fn claim_explain(&self, id: u64, every: std::time::Duration) -> bool {
        let mut shard = self.shard(id);
        let Some(e) = shard.get_mut(&id) else {
            return false;
        };
        if e.last_explain.is_some_and(|t| t.elapsed() < every) {
            return false;
        }
        e.last_explain = Some(Instant::now());
        true
    }

    pub fn set_finding(&self, id: u64, finding: Arc<str>) {
        if let Some(e) = self.shard(id).get_mut(&id) {
            e.finding = Some(finding);
        }
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    /// A copy of every row, for listing.
    pub fn rows(&self) -> Vec<Row> {
        let mut out = Vec::new();
        for s in &self.shards {
            let s = s.lock().unwrap_or_else(|p| p.into_inner());
            out.extend(s.values().map(Row::from));
        }
        out
    }

    pub fn clear(&self) {
        for s in &self.shards {
            s.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
    }
}

/// One fingerprint's figures at a moment.
#[derive(Debug, Clone)]
pub struct Row {
    pub fingerprint: String,
    pub text: Arc<str>,
    pub calls: u64,
    pub errors: u64,
    pub rows: u64,
    pub cache_hits: u64,
    pub total_ms: f64,
    pub mean_ms: f64,
    pub max_ms: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub repeated_runs: u64,
    pub longest_run: u64,
    pub advice: Option<Arc<str>>,
}

impl From<&FpStats> for Row {
    fn from(s: &FpStats) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        Row {
            fingerprint: s.fp.hex(),
            text: s.fp.text.clone(),
            calls: s.calls,
            errors: s.errors,
            rows: s.rows,
            cache_hits: s.cache_hits,
            total_ms: ms(s.total_us),
            mean_ms: s.mean_us() / 1000.0,
            max_ms: ms(s.max_us),
            p50_ms: ms(s.percentile_us(0.50)),
            p95_ms: ms(s.percentile_us(0.95)),
            p99_ms: ms(s.percentile_us(0.99)),
            repeated_runs: s.repeated_runs,
            longest_run: s.longest_run,
            advice: advice(s),
        }
    }
}

/// What to do about this fingerprint: the EXPLAIN finding, and repeated-run advice.
fn advice(s: &FpStats) -> Option<Arc<str>> {
    use super::fingerprint::Kind;
    let repeat = (s.repeated_runs > 0).then(|| match s.fp.kind {
        Kind::Select => "run many times in a row by one session (N+1 reads): fetch the rows in one query (WHERE key = ANY($1), IN (...), or a join)",
        Kind::Insert => "run many times in a row by one session (row-at-a-time inserts): use one multi-row INSERT ... VALUES (...), (...) or COPY",
        Kind::Update | Kind::Delete => "run many times in a row by one session: change the rows in one statement (WHERE key = ANY($1))",
        _ => "run many times in a row by one session: batch it",
    });
    match (&s.finding, repeat) {
        (Some(f), Some(r)) => Some(Arc::from(format!("{f}; {r}"))),
        (Some(f), None) => Some(f.clone()),
        (None, Some(r)) => Some(Arc::from(r)),
        (None, None) => None,
    }
}

/// Sort keys for `SHOW QUERIES ORDER BY ...` and `GET /queries?sort=`.
pub const SORT_KEYS: &[&str] = &[
    "total", "calls", "mean", "max", "p99", "errors", "rows", "hits", "repeated",
];

/// Sort descending by `key` (one of `SORT_KEYS`); false when the key is unknown.
pub fn sort(rows: &mut [Row], key: &str) -> bool {
    let f: fn(&Row) -> f64 = match key {
        "total" => |r| r.total_ms,
        "calls" => |r| r.calls as f64,
        "mean" => |r| r.mean_ms,
        "max" => |r| r.max_ms,
        "p99" => |r| r.p99_ms,
        "errors" => |r| r.errors as f64,
        "rows" => |r| r.rows as f64,
        "hits" => |r| r.cache_hits as f64,
        "repeated" => |r| r.repeated_runs as f64,
        _ => return false,
    };
    rows.sort_by(|a, b| f(b).total_cmp(&f(a)));
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::insight::fingerprint::Memo;

    #[test]
    fn buckets_cover_values_in_order() {
        let mut last = 0;
        for us in [
            0u64,
            1,
            15,
            16,
            17,
            23,
            24,
            100,
            1000,
            12_345,
            1 << 30,
            u64::MAX,
        ] {
            let b = bucket(us);
            assert!(b >= last, "{us}");
            last = b;
            let (lo, hi) = bucket_range(b);
            assert!(
                b == BUCKETS - 1 || (lo <= us && us <= hi),
                "{us} not in {lo}..={hi}"
            );
        }
    }

    #[test]
    fn counts_percentiles_and_bounds() {
        let memo = Memo::default();
        let t = Table::default();
        let a = memo.get("SELECT * FROM a WHERE id = 1");
        for us in 1..=100u64 {
            let s = Sample {
                us: us * 1000,
                rows: 1,
                error: us == 100,
                cached: us <= 10,
            };
            t.record(&a, &s, 100, (us >= 20).then(|| (us - 19, 20)));
        }
        let r = &t.rows()[0];
        assert_eq!((r.calls, r.rows, r.errors, r.cache_hits), (100, 100, 1, 10));
        assert_eq!(r.max_ms, 100.0);
        assert_eq!((r.repeated_runs, r.longest_run), (1, 81));
        assert!(r.advice.as_deref().unwrap_or("").contains("N+1"));
        assert!((45.0..=56.0).contains(&r.p50_ms), "{}", r.p50_ms);
        assert!((90.0..=100.0).contains(&r.p99_ms), "{}", r.p99_ms);
        // Bounded: with room for 64 (4 per shard), a full shard forgets its least total time.
        for i in 0..200 {
            let fp = memo.get(&format!("SELECT * FROM t{i}"));
            let s = Sample {
                us: 1,
                rows: 0,
                error: false,
                cached: false,
            };
            t.record(&fp, &s, 64, None);
        }
        assert!(t.len() <= 64);
        assert!(
            t.rows().iter().any(|r| r.calls == 100),
            "the heavy one stays"
        );
    }
}
