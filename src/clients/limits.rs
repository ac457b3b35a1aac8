//! Caps on client connections, over all tenants and per tenant.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::DashMap;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("sorry, too many clients already (max_client_connections = {0})")]
    Global(usize),
    #[error(
        "too many client connections for tenant \"{tenant}\" (max_client_connections = {max})"
    )]
    Tenant { tenant: String, max: usize },
}

pub struct ClientLimits {
    max_total: usize,
    total: AtomicUsize,
    per_tenant: DashMap<Arc<str>, usize>,
}

impl ClientLimits {
    pub fn new(max_total: usize) -> Arc<Self> {
        Arc::new(ClientLimits {
            max_total,
            total: AtomicUsize::new(0),
            per_tenant: DashMap::new(),
        })
    }

    /// Counts a client of `tenant` in, or says which cap it would break.
    pub fn admit(
        self: &Arc<Self>,
        tenant: &str,
        tenant_max: Option<usize>,
    ) -> Result<ClientSlot, LimitError> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(LimitError::Global(self.max_total));
        }
        let mut entry = match self.per_tenant.get_mut(tenant) {
            Some(e) => e,
            None => self.per_tenant.entry(Arc::from(tenant)).or_insert(0),
        };
        if let Some(max) = tenant_max {
            if *entry >= max {
                drop(entry);
                self.total.fetch_sub(1, Ordering::AcqRel);
                return Err(LimitError::Tenant {
                    tenant: tenant.to_string(),
                    max,
                });
            }
        }
        *entry += 1;
        // The map's own key: a tenant's clients share one name.
        let tenant = entry.key().clone();
        drop(entry);
        Ok(ClientSlot {
            limits: self.clone(),
            tenant,
        })
    }

    pub fn total(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

/// Connections that have not authenticated yet. Nothing of a tenant's is held for them; this
/// cap and `auth_timeout` bound what they can hold of the proxy's.
pub struct PendingLogins {
    max: usize,
    now: AtomicUsize,
}

impl PendingLogins {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(PendingLogins {
            max,
            now: AtomicUsize::new(0),
        })
    }

    /// A place for one more connection in its login phase, or None when all are taken.
    pub fn enter(self: &Arc<Self>) -> Option<PendingLogin> {
        if self.now.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.now.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(PendingLogin(self.clone()))
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn count(&self) -> usize {
        self.now.load(Ordering::Acquire)
    }
}

/// A connection in its login phase; dropped when it has authenticated or gone.
pub struct PendingLogin(Arc<PendingLogins>);

impl Drop for PendingLogin {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One admitted client; dropping it frees the slot.
pub struct ClientSlot {
    limits: Arc<ClientLimits>,
    tenant: Arc<str>,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.limits.total.fetch_sub(1, Ordering::AcqRel);
        let emptied = match self.limits.per_tenant.get_mut(&self.tenant) {
            Some(mut n) => {
                *n = n.saturating_sub(1);
                *n == 0
            }
            None => false,
        };
        if emptied {
            self.limits
                .per_tenant
                .remove_if(&self.tenant, |_, n| *n == 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tenant_cap_refuses_one_more_and_frees_on_drop() {
        let l = ClientLimits::new(10);
        let a = l.admit("t", Some(1)).unwrap();
        assert!(matches!(
            l.admit("t", Some(1)),
            Err(LimitError::Tenant { .. })
        ));
        assert!(l.admit("u", Some(1)).is_ok());
        drop(a);
        assert!(l.admit("t", Some(1)).is_ok());
    }

    #[test]
    fn pending_logins_are_capped_and_freed_on_drop() {
        let p = PendingLogins::new(2);
        let a = p.enter().unwrap();
        let _b = p.enter().unwrap();
        assert!(p.enter().is_none());
        drop(a);
        assert!(p.enter().is_some());
    }

    #[test]
    fn the_global_cap_counts_every_tenant() {
        let l = ClientLimits::new(2);
        let _a = l.admit("t", None).unwrap();
        let _b = l.admit("u", None).unwrap();
        assert_eq!(l.admit("v", None).err(), Some(LimitError::Global(2)));
        assert_eq!(l.total(), 2);
    }
}
