//! Shutdown as a value passed down: tasks hold a `Shutdown`, check its phase and wait for it to
//! change. `Drain` (SIGTERM/SIGINT): stop accepting; idle sessions leave now, busy ones once
//! their transaction ends. `Force` (after `shutdown_timeout`): everyone leaves. Client sessions
//! read the phase (an atomic) at each event and are woken through the client registry instead
//! of waiting on the channel: a wait registered per event is a lock every session shares.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Phase {
    Running,
    Drain,
    Force,
}

#[derive(Clone)]
pub struct Shutdown {
    rx: watch::Receiver<Phase>,
    now: Arc<AtomicU8>,
}

pub struct Trigger {
    tx: watch::Sender<Phase>,
    now: Arc<AtomicU8>,
}

pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(Phase::Running);
    let now = Arc::new(AtomicU8::new(Phase::Running as u8));
    (
        Trigger {
            tx,
            now: now.clone(),
        },
        Shutdown { rx, now },
    )
}

impl Trigger {
    pub fn set(&self, phase: Phase) {
        self.now.fetch_max(phase as u8, Ordering::SeqCst);
        self.tx.send_if_modified(|p| {
            if phase > *p {
                *p = phase;
                true
            } else {
                false
            }
        });
    }
}

impl Shutdown {
    pub fn phase(&self) -> Phase {
        match self.now.load(Ordering::SeqCst) {
            0 => Phase::Running,
            1 => Phase::Drain,
            _ => Phase::Force,
        }
    }

    /// Resolves when the phase changes (never, once the trigger is gone).
    pub async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Resolves once the phase is at least `phase`.
    pub async fn reached(&mut self, phase: Phase) {
        while self.phase() < phase {
            self.changed().await;
        }
    }
}
