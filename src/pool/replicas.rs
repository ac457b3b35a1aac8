//! Choosing a read replica: round robin over the replicas whose last health check passed and
//! whose replay lag is within `replica_max_lag`. Round robin rather than least-busy: each
//! replica pool has the tenant's full pool size, so spreading transactions evenly spreads
//! server load evenly too, and picking costs one atomic add.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::TenantPool;
use crate::config::PoolMode;
use crate::tenancy::{ClientUser, ReadIntent, Tenant};

/// How one client session's transactions are routed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadPolicy {
    /// Every transaction is a read (a read-only role, or the client asked for a standby).
    pub all_reads: bool,
    /// The session is read-only wherever it runs (a read-only role, or all reads).
    pub read_only: bool,
    /// Transaction mode with `read_write_split`: transactions begun READ ONLY are reads.
    pub split: bool,
    /// Reads may not fall back to the primary, and why; None: they may.
    pub no_fallback: Option<&'static str>,
}

impl ReadPolicy {
    pub fn for_session(tenant: &Tenant, user: &ClientUser, intent: Option<ReadIntent>) -> Self {
        let wants_primary = intent == Some(ReadIntent::Primary);
        let all_reads = !wants_primary && (user.read_only || intent.is_some());
        let no_fallback = match intent {
            Some(ReadIntent::Standby) => Some("the client asked for target_session_attrs=standby"),
            Some(ReadIntent::PreferStandby) => None,
            _ if !tenant.replica_fallback => {
                Some("the tenant does not allow reads on the primary (replica_fallback = false)")
            }
            _ => None,
        };
        ReadPolicy {
            all_reads,
            read_only: all_reads || user.read_only,
            split: tenant.read_write_split
                && tenant.pool_mode == PoolMode::Transaction
                && !wants_primary,
            no_fallback,
        }
    }

    /// The refusal of a read no replica can serve, when the primary may not serve it either.
    /// `last`: the error of the last replica tried, which the client is told too.
    pub fn refuse_primary(
        &self,
        tenant: &str,
        last: Option<&dyn std::fmt::Display>,
    ) -> Option<super::PoolError> {
        self.no_fallback.map(|why| super::PoolError::NoReplica {
            tenant: tenant.to_string(),
            why,
            last: last
                .map(|e| format!("; the last replica tried: {e}"))
                .unwrap_or_default(),
        })
    }

    /// Sessions that read only are also made read-only, so that one served by the primary (no
    /// replica usable) cannot write either.
    pub fn read_only_session(&self) -> bool {
        self.read_only
    }
}

pub struct Replicas {
    pools: Vec<Arc<TenantPool>>,
    next: AtomicUsize,
    max_lag: Option<Duration>,
}

impl Replicas {
    pub fn new(pools: Vec<Arc<TenantPool>>, max_lag: Option<Duration>) -> Replicas {
        Replicas {
            pools,
            next: AtomicUsize::new(0),
            max_lag,
        }
    }

    /// The next usable replica's pool, or None when every one is down, failing its health
    /// checks or lagging.
    pub fn choose(&self) -> Option<&Arc<TenantPool>> {
        let n = self.pools.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| &self.pools[(start + i) % n])
            .find(|p| p.health().usable_for_reads(self.max_lag))
    }

    /// Usable replicas to try in turn (each picked by `choose`), at most one round.
    pub fn candidates(&self) -> impl Iterator<Item = &Arc<TenantPool>> {
        (0..self.pools.len()).map_while(|_| self.choose())
    }

    pub fn pools(&self) -> &[Arc<TenantPool>] {
        &self.pools
    }
}
