//! Query insight (DESIGN §3): every statement counted under its fingerprint across all clients
//! (`stats`), slow statements logged as JSON lines and kept for `SHOW SLOW` (`slow`), explained
//! on a separate connection when configured (`explain`), and sessions that run one fingerprint
//! many times in a row reported (`Runs`). The session (`session::insight`) times statements and
//! hands them here.

pub mod explain;
pub mod fingerprint;
pub mod slow;
pub mod stats;

use crate::config::Config;
use crate::metrics::METRICS;
use fingerprint::{Fingerprint, Kind, Memo};
use stats::{Sample, Table};
use std::sync::Arc;

pub use slow::{ExplainArgs, SlowEvent};

#[derive(Default)]
pub struct Insight {
    pub memo: Memo,
    pub stats: Table,
    pub slow: slow::SlowLog,
}

impl Insight {
    /// Count one finished statement; `run` is its place in the session's run of it (`Runs`).
    pub fn record(&self, config: &Config, fp: &Arc<Fingerprint>, s: &Sample, run: u64) {
        let threshold = u64::from(config.insight.repeat_threshold);
        let repeated = threshold > 0 && run >= threshold;
        if repeated && run == threshold {
            METRICS.repeated_runs.inc();
            tracing::info!(fingerprint = %fp.hex(), query = %fp.text, "one session ran this statement {threshold} times in a row");
        }
        self.stats.record(
            fp,
            s,
            config.insight.max_fingerprints,
            repeated.then_some((run, threshold)),
        );
    }

    /// Forget every fingerprint and slow statement (`RESET QUERIES`).
    pub fn reset(&self) {
        self.stats.clear();
        self.slow.clear();
    }
}

/// One session's run of a fingerprint, for the repeated-statement detector.
#[derive(Debug, Default)]
pub struct Runs {
    id: u64,
    len: u64,
}

impl Runs {
    /// `fp` ran once more in this session: its place in the current run (0: not counted).
    pub fn note(&mut self, fp: &Fingerprint) -> u64 {
        if matches!(fp.kind, Kind::Utility) {
            // BEGIN/COMMIT between the statements of a loop do not break its run.
            return 0;
        }
        if fp.id == self.id {
            self.len += 1;
        } else {
            self.id = fp.id;
            self.len = 1;
        }
        self.len
    }
}
