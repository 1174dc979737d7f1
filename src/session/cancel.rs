//! Cancel keys. Clients get the proxy's own `BackendKeyData`; a `CancelRequest` carrying it is
//! mapped to the upstream backend currently serving that client and sent there. Each client's
//! target lives in a slot of its own, so pointing it at another server takes only that slot's
//! (uncontended) lock, not the registry's.

use crate::pool::upstream::CancelKey;
use rand::RngCore;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The key the proxy hands one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey {
    pub pid: i32,
    pub secret: i32,
}

#[derive(Default)]
pub struct CancelRegistry {
    map: Mutex<HashMap<ClientKey, Arc<Slot>>>,
}

/// The server connection a client's cancel request goes to, if it has one now.
type Slot = Mutex<Option<Arc<CancelKey>>>;

/// Removes the client's key when the session ends.
pub struct Registration {
    registry: Arc<CancelRegistry>,
    pub key: ClientKey,
    slot: Arc<Slot>,
}

impl CancelRegistry {
    pub fn register(self: &Arc<Self>) -> Registration {
        let mut rng = rand::rng();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let key = ClientKey {
                pid: (rng.next_u32() & 0x7fff_ffff) as i32,
                secret: rng.next_u32() as i32,
            };
            if let std::collections::hash_map::Entry::Vacant(v) = map.entry(key) {
                let slot = v.insert(Arc::default()).clone();
                return Registration {
                    registry: self.clone(),
                    key,
                    slot,
                };
            }
        }
    }

    /// The cancel request for a client's key, if the client is attached to a server now: the
    /// send to that server (`CancelKey::send`), which marks the connection as cancelled (closed,
    /// not pooled, when the client is done with it). The mark is made under the client's slot
    /// lock, which the session takes to detach the connection before giving it back: either the
    /// session finds the mark then, or it detached first and nothing is sent. (Marked after the
    /// lock, a cancel could reach the connection in the hands of the next client.)
    pub fn cancel(
        &self,
        pid: i32,
        secret: &[u8],
    ) -> Option<impl std::future::Future<Output = std::io::Result<()>> + Send + 'static> {
        let secret: [u8; 4] = secret.try_into().ok()?;
        let key = ClientKey {
            pid,
            secret: i32::from_be_bytes(secret),
        };
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let slot = map.get(&key)?;
        let target = slot.lock().unwrap_or_else(|p| p.into_inner());
        target.clone().map(CancelKey::send)
    }
}

impl Registration {
    /// Point the client's key at the server connection now serving it (or none). Only the
    /// client's own slot is locked: a transaction-mode client does this twice per transaction.
    pub fn attach(&self, target: Option<Arc<CancelKey>>) {
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = target;
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut map = self.registry.map.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgwire::messages::startup::SecretKey;

    fn key(registration: &Registration) -> (i32, [u8; 4]) {
        (registration.key.pid, registration.key.secret.to_be_bytes())
    }

    #[test]
    fn a_cancel_marks_its_connection_before_the_session_can_detach_it() {
        let registry = Arc::new(CancelRegistry::default());
        let r = registry.register();
        let (pid, secret) = key(&r);
        let target = Arc::new(CancelKey::new("127.0.0.1".into(), 1, 7, SecretKey::I32(9)));
        r.attach(Some(target.clone()));
        // The request is found; its send has not run yet when the session detaches.
        let send = registry.cancel(pid, &secret).expect("attached");
        r.attach(None);
        assert!(target.sent(), "marked when found, not when sent");
        drop(send);
        // Detached: nothing to cancel, and nothing marked.
        let other = Arc::new(CancelKey::new("127.0.0.1".into(), 1, 8, SecretKey::I32(9)));
        r.attach(Some(other.clone()));
        r.attach(None);
        assert!(registry.cancel(pid, &secret).is_none());
        assert!(!other.sent());
        // A wrong secret finds nothing.
        r.attach(Some(other.clone()));
        let wrong = (!r.key.secret).to_be_bytes();
        assert!(registry.cancel(pid, &wrong).is_none());
        assert!(!other.sent());
        drop(r);
        assert!(
            registry.cancel(pid, &secret).is_none(),
            "gone with its session"
        );
    }
}
