//! Query insight on one session: each statement sent upstream carries a `Pending` (in its
//! `Expect`) from the moment it goes out to its last reply; then it is counted under its
//! fingerprint, timed, checked against the slow threshold and the repeated-statement detector.
//!
//! Time is what the client waits for beyond earlier pipelined statements: from the later of
//! "sent" and "the previous statement finished" to the reply that ends it (`CommandComplete`,
//! `PortalSuspended`, `EmptyQueryResponse`, an error; `ReadyForQuery` for a simple query).

use super::Session;
use crate::analysis::{numbers_stand_alone, Analyzed};
use crate::insight::fingerprint::{Fingerprint, Memo};
use crate::insight::stats::Sample;
use crate::insight::{ExplainArgs, Runs, SlowEvent};
use crate::metrics::{self, METRICS};
use crate::sqltext::same_plan_key;
use crate::wire;
use bytes::Bytes;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

/// A statement on its way.
#[derive(Debug)]
pub struct Pending {
    fp: Arc<Fingerprint>,
    sent: Instant,
    rows: u64,
    /// SQLSTATE of its error.
    error: Option<String>,
    protocol: usize,
    explain: Option<ExplainArgs>,
}

/// A bound portal's name, its statement's fingerprint, and what `EXPLAIN` needs (explain on).
type Bound = (Box<str>, Arc<Fingerprint>, Option<Box<ExplainArgs>>);

#[derive(Default)]
pub(super) struct SessionInsight {
    last_done: Option<Instant>,
    runs: Runs,
    /// The statement behind the last `Bind`: its portal, fingerprint, and (explain on) what
    /// `EXPLAIN` needs (boxed: an idle client keeps this struct, usually without it).
    bound: Option<Bound>,
    /// Fingerprint of the client's unnamed statement, made at its first `Bind`.
    unnamed_fp: Option<Arc<Fingerprint>>,
    /// The client's last simple `Query` (boxed: dropped when the session parks).
    last_query: Option<Box<LastQuery>>,
}

/// A session's last simple-protocol statement. A client that sends one statement with new
/// numbers each time (the simple protocol has no parameters) sends a new text each time; one
/// that differs from this only in numbers (`sqltext::same_plan_key`) takes its fingerprint
/// and, when this one cannot have touched the session, its pooling analysis, without a scan
/// of its own for either. Why those follow from `same_plan_key`: the fingerprint memo's key is
/// the text's shape with every number blanked, and the numbers are where the shape's scan
/// found them (so `same_plan_key`'s argument holds for it as for the plan key); the analysis'
/// pre-scan (`analysis::may_touch_session`) looks for words, and a digit run standing alone
/// can neither make nor unmake one of them (`analysis::numbers_stand_alone`, and its test over
/// random texts).
struct LastQuery {
    text: String,
    numbers: Vec<(usize, usize)>,
    fp: Arc<Fingerprint>,
    /// The analysis said `Analyzed::Plain` (the text cannot touch the session), and a text
    /// with other numbers gets that answer too (`analysis::numbers_stand_alone`).
    plain: bool,
}

/// Longer statements are not kept: a session holds at most this much text for `LastQuery`.
const LAST_QUERY_MAX: usize = 2048;

impl LastQuery {
    /// Make `sql` the last statement in `slot` (its buffers reused) and return its fingerprint.
    fn remember(
        slot: &mut Option<Box<LastQuery>>,
        memo: &Memo,
        sql: &str,
        plain: bool,
    ) -> Arc<Fingerprint> {
        if sql.len() > LAST_QUERY_MAX {
            *slot = None;
            return memo.get(sql);
        }
        let mut numbers = match slot.as_deref_mut() {
            Some(l) => std::mem::take(&mut l.numbers),
            None => Vec::new(),
        };
        let fp = memo.get_noting_numbers(sql, &mut numbers);
        let plain = plain && numbers_stand_alone(sql, &numbers);
        match slot.as_deref_mut() {
            Some(l) => {
                l.text.clear();
                l.text.push_str(sql);
                (l.numbers, l.fp, l.plain) = (numbers, fp.clone(), plain);
            }
            None => {
                let text = sql.to_string();
                let fp = fp.clone();
                *slot = Some(Box::new(LastQuery {
                    text,
                    numbers,
                    fp,
                    plain,
                }));
            }
        }
        fp
    }
}

impl Session {
    fn explaining(&self) -> bool {
        let c = &self.cfg;
        c.slow_query.explain && !c.slow_query.threshold.is_zero()
    }

    /// A simple `Query` is going upstream: its pooling analysis, and its `Pending` (insight
    /// on). `plan` is the cache's plan of it (cache on), which keeps its fingerprint (as for a
    /// hit) so that a statement is not scanned for its shape again; without one, a statement
    /// that differs from the client's last only in numbers takes that one's (`LastQuery`).
    pub(super) fn look_at_query(
        &mut self,
        sql: &str,
        plan: Option<&crate::cache::Plan>,
    ) -> (Analyzed, Option<Box<Pending>>) {
        let Some(si) = self.insight.as_deref() else {
            return (self.analyze(sql), None);
        };
        let repeat = si
            .last_query
            .as_deref()
            .filter(|l| same_plan_key(&l.text, &l.numbers, sql.as_bytes()))
            .map(|l| (l.fp.clone(), l.plain));
        // `unreadable` depends on a setting, not only on the text: asked each time.
        let analysis = match repeat {
            Some((_, true)) if !self.unreadable(sql.as_bytes()) => Analyzed::Plain,
            _ => self.analyze(sql),
        };
        let memo = &self.shared.insight.memo;
        let fp = match (plan, repeat) {
            (Some(p), _) => p.insight.get_or_init(|| memo.get(sql)).clone(),
            (None, Some((fp, _))) => fp,
            (None, None) => {
                let plain = matches!(analysis, Analyzed::Plain);
                let si = self.insight.as_deref_mut().expect("insight is on");
                LastQuery::remember(&mut si.last_query, memo, sql, plain)
            }
        };
        let explain = (self.explaining() && fp.statements == 1).then(|| ExplainArgs {
            key: (**self.pool.key()).clone(),
            sql: sql.to_string(),
            parse_types: None,
            bind: None,
            settings: self.settings.wanted.clone(),
        });
        let pending = Box::new(Pending {
            fp,
            sent: self.tx.last_activity.into_std(),
            rows: 0,
            error: None,
            protocol: metrics::SIMPLE,
            explain,
        });
        (analysis, Some(pending))
    }

    /// The session is about to park: what it kept of its last statement goes.
    pub(super) fn insight_park(&mut self) {
        if let Some(si) = self.insight.as_deref_mut() {
            si.last_query = None;
        }
    }

    /// The client's unnamed statement was parsed again.
    pub(super) fn insight_unnamed_parsed(&mut self) {
        if let Some(si) = self.insight.as_deref_mut() {
            si.unnamed_fp = None;
            si.bound = None;
        }
    }

    /// A `Bind` of `portal` to the statement parsed by `parse` (a `Parse` frame), named
    /// `statement` by the client; `rest` is the `Bind` after the names.
    pub(super) fn insight_bind(
        &mut self,
        portal: &str,
        parse: Option<&Bytes>,
        prepared_fp: Option<&std::sync::OnceLock<Arc<Fingerprint>>>,
        rest: &[u8],
    ) {
        let explaining = self.insight.is_some() && self.explaining();
        let settings = &self.settings.wanted;
        let Some(si) = self.insight.as_deref_mut() else {
            return;
        };
        let Some(parse) = parse else {
            si.bound = None;
            return;
        };
        // The statement's fingerprint is kept with it: its text is read only the first time
        // (or to explain it).
        let known = match prepared_fp {
            Some(cell) => cell.get().cloned(),
            None => si.unnamed_fp.clone(),
        };
        let (fp, explain) = match known {
            Some(fp) if !explaining => (fp, None),
            _ => {
                let Some((_, sql, types)) = super::held::read_parse(parse) else {
                    si.bound = None;
                    return;
                };
                let memo = &self.shared.insight.memo;
                let fp = match prepared_fp {
                    Some(cell) => cell.get_or_init(|| memo.get(sql)).clone(),
                    None => si.unnamed_fp.get_or_insert_with(|| memo.get(sql)).clone(),
                };
                let explain = explaining.then(|| {
                    Box::new(ExplainArgs {
                        key: (**self.pool.key()).clone(),
                        sql: sql.to_string(),
                        parse_types: Some(Bytes::copy_from_slice(types)),
                        bind: Some(Bytes::copy_from_slice(rest)),
                        settings: settings.clone(),
                    })
                });
                (fp, explain)
            }
        };
        si.bound = Some((portal.into(), fp, explain));
    }

    /// An `Execute` of `portal` is going upstream.
    pub(super) fn insight_execute(&mut self, portal: &str) -> Option<Box<Pending>> {
        let si = self.insight.as_deref_mut()?;
        let (p, fp, explain) = si.bound.as_ref()?;
        if **p != *portal {
            return None;
        }
        Some(Box::new(Pending {
            fp: fp.clone(),
            sent: self.tx.last_activity.into_std(),
            rows: 0,
            error: None,
            protocol: metrics::EXTENDED,
            explain: explain.as_deref().cloned(),
        }))
    }

    /// The cache answered `sql`, planned as `plan` (`started` when the client's message arrived).
    pub(super) fn insight_cached(
        &mut self,
        plan: &crate::cache::Plan,
        sql: &[u8],
        protocol: usize,
        started: Instant,
    ) {
        if self.insight.is_none() {
            return;
        }
        let memo = &self.shared.insight.memo;
        let fp = (plan.insight)
            .get_or_init(|| memo.get(&String::from_utf8_lossy(sql)))
            .clone();
        let p = Pending {
            fp,
            sent: started,
            rows: 0,
            error: None,
            protocol,
            explain: None,
        };
        self.insight_finish(p, true);
    }

    /// A `CommandComplete` for the statement `p` (a simple query may have several).
    pub(super) fn insight_rows(p: &mut Pending, tag_body: &[u8]) {
        p.rows += rows_of(tag_body);
    }

    pub(super) fn insight_error(p: &mut Pending, error_body: &[u8]) {
        let code = wire::fields(error_body)
            .into_iter()
            .find(|(k, _)| *k == b'C')
            .map(|(_, v)| v);
        p.error = Some(code.unwrap_or_default());
    }

    /// The statement is over: count it.
    pub(super) fn insight_finish(&mut self, p: Pending, cached: bool) {
        let Some(si) = self.insight.as_deref_mut() else {
            return;
        };
        // This event's time (the reply was read then): one clock read per event, not per use.
        let now = self.tx.last_activity.into_std();
        let start = si.last_done.map_or(p.sent, |d| d.max(p.sent));
        si.last_done = Some(now);
        let us =
            u64::try_from(now.saturating_duration_since(start).as_micros()).unwrap_or(u64::MAX);
        let run = si.runs.note(&p.fp);
        let config = &self.cfg;
        let sample = Sample {
            us,
            rows: p.rows,
            error: p.error.is_some(),
            cached,
        };
        self.shared.insight.record(config, &p.fp, &sample, run);
        let outcome = match (&p.error, cached) {
            (Some(_), _) => metrics::ERROR,
            (None, true) => metrics::CACHED,
            (None, false) => metrics::OK,
        };
        METRICS.query_counts[p.protocol][outcome].inc();
        METRICS.query_seconds[usize::from(cached)].observe(us as f64 / 1e6);
        if let Some(code) = &p.error {
            METRICS.query_errors.with_label_values(&[class(code)]).inc();
        }
        let threshold = config.slow_query.threshold;
        if threshold.is_zero() || u128::from(us) < threshold.as_micros() {
            return;
        }
        self.shared.insight.slow.submit(SlowEvent {
            at: SystemTime::now(),
            us,
            fp: p.fp,
            key: (**self.pool.key()).clone(),
            client: self.ticket.info.addr,
            rows: p.rows,
            cached,
            error: p.error,
            explain: p.explain,
        });
    }
}

/// Rows a `CommandComplete` tag reports (`SELECT 5`, `INSERT 0 5`, `UPDATE 5`, `COPY 5`...).
fn rows_of(tag: &[u8]) -> u64 {
    let tag = tag.strip_suffix(b"\0").unwrap_or(tag);
    let last = tag.rsplit(|&b| b == b' ').next().unwrap_or(b"");
    if tag.len() == last.len() {
        return 0;
    }
    // Digits read in place: this runs for every statement.
    if last.is_empty() || !last.iter().all(u8::is_ascii_digit) {
        return 0;
    }
    (last.iter())
        .try_fold(0u64, |n, &d| {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
        .unwrap_or(0)
}

/// The SQLSTATE class as a label: two digits or capitals, else `other` (labels stay bounded).
fn class(code: &str) -> &str {
    match code.get(..2) {
        Some(c)
            if c.bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase()) =>
        {
            c
        }
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rows_and_classes() {
        assert_eq!(super::rows_of(b"SELECT 5\0"), 5);
        assert_eq!(super::rows_of(b"INSERT 0 12\0"), 12);
        assert_eq!(super::rows_of(b"BEGIN\0"), 0);
        assert_eq!(super::rows_of(b"CREATE TABLE\0"), 0);
        assert_eq!(super::rows_of(b"SELECT 18446744073709551616\0"), 0);
        assert_eq!(super::rows_of(b"SELECT x1\0"), 0);
        assert_eq!(super::class("23505"), "23");
        assert_eq!(super::class("x\"y"), "other");
    }
}
