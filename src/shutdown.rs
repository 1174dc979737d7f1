//! Shutdown as a value passed down: every session holds a `Shutdown` and checks its phase.
//! `Drain` (SIGTERM/SIGINT): stop accepting; idle sessions leave now, busy ones once their
//! transaction ends. `Force` (after `shutdown_timeout`): everyone leaves.

use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Running,
    Drain,
    Force,
}

#[derive(Clone)]
pub struct Shutdown {
    rx: watch::Receiver<Phase>,
}

pub struct Trigger {
    tx: watch::Sender<Phase>,
}

pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(Phase::Running);
    (Trigger { tx }, Shutdown { rx })
}

impl Trigger {
    pub fn set(&self, phase: Phase) {
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
        *self.rx.borrow()
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
