//! Cancel keys pgtenant issues to its clients, and what each one may cancel.
//!
//! A client never sees a backend's real key: its BackendKeyData carries a random (pid, secret)
//! minted here, and a CancelRequest is forwarded only if the secret matches (compared in
//! constant time) and the client is currently linked to a backend.

use std::sync::Arc;

use dashmap::DashMap;
use rand::Rng;
use subtle::ConstantTimeEq;

use crate::backend::connection::CancelTarget;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CancelKey {
    pub pid: u32,
    pub secret: u32,
}

struct Entry {
    secret: u32,
    /// Changed at every transaction in transaction mode, so the guard holds the entry itself
    /// and link/unlink take one uncontended lock instead of a map lookup.
    target: std::sync::Mutex<Option<Arc<CancelTarget>>>,
}

#[derive(Default)]
pub struct CancelRegistry {
    entries: DashMap<u32, Arc<Entry>>,
}

impl CancelRegistry {
    /// Mints a key for a new client. The guard removes it when the client goes away.
    pub fn register(self: &Arc<Self>) -> CancelGuard {
        let mut rng = rand::thread_rng();
        loop {
            let pid = rng.gen_range(1..=i32::MAX as u32);
            let secret = rng.gen();
            if let dashmap::Entry::Vacant(v) = self.entries.entry(pid) {
                let entry = Arc::new(Entry {
                    secret,
                    target: std::sync::Mutex::new(None),
                });
                v.insert(entry.clone());
                return CancelGuard {
                    registry: self.clone(),
                    entry,
                    key: CancelKey { pid, secret },
                };
            }
        }
    }

    /// Forwards a cancel to the backend linked to `key`; true if one was sent.
    pub async fn cancel(&self, pid: u32, secret: u32) -> bool {
        let entry = self.entries.get(&pid).map(|e| e.clone());
        let target = match entry {
            Some(e) if bool::from(e.secret.to_be_bytes().ct_eq(&secret.to_be_bytes())) => {
                e.target.lock().ok().and_then(|t| t.clone())
            }
            _ => None,
        };
        match target {
            Some(t) => t.send().await.is_ok(),
            None => false,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

pub struct CancelGuard {
    registry: Arc<CancelRegistry>,
    entry: Arc<Entry>,
    key: CancelKey,
}

impl CancelGuard {
    pub fn key(&self) -> CancelKey {
        self.key
    }

    pub fn link(&self, target: Arc<CancelTarget>) {
        if let Ok(mut t) = self.entry.target.lock() {
            *t = Some(target);
        }
    }

    pub fn unlink(&self) {
        if let Ok(mut t) = self.entry.target.lock() {
            *t = None;
        }
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.registry.entries.remove(&self.key.pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_wrong_secret_cancels_nothing() {
        let reg = Arc::new(CancelRegistry::default());
        let g = reg.register();
        // Linked to a port nothing listens on: a forwarded cancel would report failure, but a
        // wrong secret must not even try.
        g.link(Arc::new(CancelTarget {
            host: "127.0.0.1".into(),
            port: 1,
            pid: 1,
            secret: 1,
        }));
        assert!(
            !reg.cancel(g.key().pid, g.key().secret.wrapping_add(1))
                .await
        );
    }

    #[tokio::test]
    async fn an_unlinked_client_cancels_nothing() {
        let reg = Arc::new(CancelRegistry::default());
        let g = reg.register();
        assert!(!reg.cancel(g.key().pid, g.key().secret).await);
    }

    #[test]
    fn keys_are_removed_with_their_client() {
        let reg = Arc::new(CancelRegistry::default());
        let g = reg.register();
        assert_eq!(reg.len(), 1);
        drop(g);
        assert!(reg.is_empty());
    }
}
