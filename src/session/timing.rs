//! A session's clocks: the deadline its loop sleeps to (`query_timeout`,
//! `idle_transaction_timeout`, `client_idle_timeout`), what happens when one passes, the
//! statements in flight they are counted from, and the shutdown phase it leaves by.

use super::{End, Session};
use crate::admin::registry::PoolStats;
use crate::error::{sqlstate, PgError};
use crate::shutdown::Phase;
use std::time::Duration;
use tokio::time::Instant;

/// After a `query_timeout` cancel, the statement is cancelled again if it still runs this much
/// later (or `query_timeout` later, if longer).
const CANCEL_AGAIN: Duration = Duration::from_secs(1);

impl Session {
    /// Draining: idle clients leave now, busy ones when their transaction ends; forced: all.
    pub(super) fn check_shutdown(&mut self) -> Option<End> {
        let phase = self.shared.shutdown.phase();
        self.phase_seen = phase;
        let idle = self.tx.in_flight == 0
            && self.tx.status == b'I'
            && self.queue.is_empty()
            && self.cscan.at_boundary();
        if phase == Phase::Force || (phase == Phase::Drain && idle) {
            PgError::fatal(
                sqlstate::ADMIN_SHUTDOWN,
                "terminating connection due to administrator command",
            )
            .encode(&mut self.to_client);
            return Some(End::Closed);
        }
        None
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let p = &self.cfg.pool;
        let after = |d: Duration| (!d.is_zero()).then(|| self.tx.last_activity + d);
        if self.tx.in_flight > 0 {
            self.tx.query_deadline
        } else if self.tx.status != b'I' {
            after(p.idle_transaction_timeout)
        } else {
            after(p.client_idle_timeout)
        }
    }

    pub(super) async fn on_timer(&mut self) -> Result<(), End> {
        let now = Instant::now();
        if self.tx.in_flight > 0 {
            if self.tx.query_deadline.is_some_and(|d| d <= now) {
                self.tx.query_deadline = None;
                if let Some(key) = self.server.as_ref().and_then(|a| a.conn.cancel.clone()) {
                    tracing::info!(pool = %self.pool.key(), "query_timeout reached: cancelling the statement");
                    // Marks the connection as cancelled now (`CancelKey::sent`): it is closed,
                    // not pooled, when the client is done with it.
                    let send = key.send();
                    tokio::spawn(async move {
                        if let Err(e) = send.await {
                            tracing::warn!(error = %e, "could not send cancel for query_timeout");
                        }
                    });
                    // A cancel can be lost (it reaches a server that has not started the
                    // statement yet, or its connection fails): while the statement still runs,
                    // cancel it again.
                    let again = self.cfg.pool.query_timeout.max(CANCEL_AGAIN);
                    self.tx.query_deadline = Some(now + again);
                }
            }
            return Ok(());
        }
        let Some(deadline) = self.next_deadline() else {
            return Ok(());
        };
        if deadline > now {
            return Ok(());
        }
        let err = if self.tx.status != b'I' {
            PgError::fatal(
                sqlstate::IDLE_IN_TRANSACTION_TIMEOUT,
                "terminating connection due to idle-in-transaction timeout",
            )
        } else {
            PgError::fatal(
                sqlstate::IDLE_SESSION_TIMEOUT,
                "terminating connection due to idle-session timeout",
            )
        };
        err.encode(&mut self.to_client);
        Err(End::Closed)
    }

    /// A message that owes a `ReadyForQuery` went upstream. `query_timeout` counts from now,
    /// not from when the client sent it: waiting for a server connection is not running, and a
    /// cancel sent before the server has the statement would be lost.
    pub(super) fn statement_sent(&mut self) {
        self.tx.in_flight += 1;
        let t = self.cfg.pool.query_timeout;
        if !t.is_zero() && self.tx.query_deadline.is_none() {
            self.tx.query_deadline = Some(Instant::now() + t);
        }
    }

    /// A `ReadyForQuery` came back.
    pub(super) fn statement_done(&mut self, status: u8) {
        self.tx.in_flight = self.tx.in_flight.saturating_sub(1);
        self.tx.status = status;
        self.ticket.info.set_tx_status(status);
        if status == b'I' {
            PoolStats::add(&self.stats.transactions, 1);
        }
        let t = self.cfg.pool.query_timeout;
        self.tx.query_deadline =
            (self.tx.in_flight > 0 && !t.is_zero()).then(|| self.tx.last_activity + t);
    }
}
