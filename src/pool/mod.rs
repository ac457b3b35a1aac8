//! Backend connection pools, one per (tenant, client role), created on first use.

pub mod health_check;
mod manager;
pub mod pause;
mod replicas;
pub mod stats;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use dashmap::DashMap;
use tokio::sync::{oneshot, Notify};

use crate::backend::health::coarse_ms;
use crate::backend::{BackendError, ConnectSpec, HealthBook, RoleRepair, ServerHealth};
use crate::config::{HealthConfig, PoolConfig, Tier};
use crate::protocol::{sqlstate, ErrorReport};
use crate::tenancy::crypto::RowSecret;
use crate::tenancy::row_context::RowBinding;
use crate::tenancy::{ClientUser, Server, Tenant};

pub use manager::BackendManager;
use pause::Pauses;
pub use replicas::{ReadPolicy, Replicas};
use stats::PoolStats;

/// Whether a checkout waits for an unreachable server to come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Patience {
    /// Until `query_wait_timeout`: the server may be restarting.
    UntilTimeout,
    /// Not at all: the caller has somewhere else to go (a read, another replica or the primary).
    FailFast,
}

pub type PooledBackend = bb8::PooledConnection<'static, BackendManager>;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("timed out after {0:?} waiting for a server connection")]
    Timeout(Duration),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("tenant \"{0}\" or its role was removed from the registry")]
    Removed(String),
    #[error("no server connection within {wait:?}: server \"{server}\" is unreachable ({error})")]
    Unreachable {
        wait: Duration,
        server: String,
        error: String,
    },
    #[error("the tenant's entry changed; its new pool serves this request")]
    Retired,
    #[error("tenant \"{0}\" is paused by an administrator (PAUSE); timed out waiting for RESUME")]
    Paused(String),
    #[error("no read replica of tenant \"{tenant}\" is usable (unreachable, or lagging more than replica_max_lag), and {why}")]
    NoReplica { tenant: String, why: &'static str },
}

impl PoolError {
    pub fn report(&self) -> ErrorReport {
        match self {
            PoolError::Timeout(_) => {
                ErrorReport::fatal(sqlstate::CANNOT_CONNECT_NOW, self.to_string())
                    .with_hint("the tenant's pool is busy; raise pool_size or query_wait_timeout")
            }
            PoolError::Backend(e) => e.report(),
            PoolError::Removed(_) => ErrorReport::fatal(sqlstate::ADMIN_SHUTDOWN, self.to_string()),
            PoolError::Retired | PoolError::Paused(_) => {
                ErrorReport::fatal(sqlstate::CANNOT_CONNECT_NOW, self.to_string())
            }
            PoolError::Unreachable { .. } => {
                ErrorReport::fatal(sqlstate::CONNECTION_FAILURE, self.to_string()).with_hint(
                    "the server is down or restarting; pgtenant retries and serves again as soon as it is back",
                )
            }
            PoolError::NoReplica { .. } => {
                ErrorReport::fatal(sqlstate::CANNOT_CONNECT_NOW, self.to_string())
                    .with_hint("allow reads on the primary with replica_fallback = true, or retry")
            }
        }
    }

    /// Whether the client may stay connected and try again with its next request (the pool
    /// still exists; only this request could not be served).
    pub fn is_transient(&self) -> bool {
        !matches!(self, PoolError::Removed(_))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub tenant: Arc<str>,
    pub role: Arc<str>,
}

/// Source of global statement names; never reused, so a stale name can never alias.
static NEXT_STATEMENT: AtomicU64 = AtomicU64::new(1);
/// Distinct statements remembered per pool; beyond this, new ones still get fresh names.
const MAX_STATEMENT_NAMES: usize = 10_000;
/// How long (ms) a connection stays parked in the fast path before it goes back to bb8.
const PARK_MAX_MS: u64 = 1000;

/// One bb8 pool plus the last connect error, which bb8 itself only hands to its error sink.
pub struct TenantPool {
    /// The registry entry this pool was built from; a changed entry gets a new pool.
    tenant: Arc<Tenant>,
    /// Set when the entry changed or went away; `successor` serves the tenant from then on.
    retired: AtomicBool,
    successor: std::sync::Mutex<Option<Arc<TenantPool>>>,
    pool: bb8::Pool<BackendManager>,
    max_size: u32,
    failures: Arc<ConnectFailures>,
    wait: Duration,
    /// (query text + parameter types) → global statement name, shared by the pool's clients.
    names: DashMap<Bytes, Arc<str>>,
    /// Global names that some backend has parsed successfully: valid SQL for this pool.
    parsed: DashMap<Arc<str>, ()>,
    /// Connections between transactions and clients waiting for one (shared by a row group).
    idle: Arc<std::sync::Mutex<Idle>>,
    /// Row tier: the binding this pool's sessions need on a connection.
    row: Option<RowBinding>,
    /// Row tier: connections, parked ones and waiting clients are shared with the other row
    /// tenants of the same server, database, backend role and session defaults.
    shared: bool,
    /// Row tier: the tenant's `pool_size` when below its group's, as permits each connection
    /// it uses holds, so no tenant takes more than its share of the group.
    share: Option<Arc<tokio::sync::Semaphore>>,
    /// Clients currently using this pool, and when it was last used (for the idle-pool sweep).
    clients: AtomicUsize,
    last_used: std::sync::Mutex<Instant>,
    /// The server's health: its backoff gate, and whether reads may go there.
    health: Arc<ServerHealth>,
    /// How this pool logs in, for health checks of its server.
    spec: ConnectSpec,
    /// A primary's read replicas (one pool each), if the tenant has any.
    replicas: Option<Arc<Replicas>>,
    /// Counters of (tenant, role), shared with the pools that replace this one.
    stats: Arc<PoolStats>,
    pauses: Arc<Pauses>,
}

impl TenantPool {
    /// The global name for a statement; equal statements share one, so a backend prepares each
    /// once whichever client asks.
    pub fn statement_name(&self, key: &[u8]) -> Arc<str> {
        if let Some(n) = self.names.get(key) {
            return n.clone();
        }
        let name: Arc<str> = Arc::from(format!(
            "__pgt_{}",
            NEXT_STATEMENT.fetch_add(1, Ordering::Relaxed)
        ));
        if self.names.len() < MAX_STATEMENT_NAMES {
            self.names
                .entry(Bytes::copy_from_slice(key))
                .or_insert_with(|| name.clone())
                .clone()
        } else {
            name
        }
    }

    /// Records that a backend accepted the statement, so later clients may prepare it
    /// without waiting for a backend.
    pub fn mark_parsed(&self, name: &Arc<str>) {
        if !self.parsed.contains_key(name) && self.parsed.len() < MAX_STATEMENT_NAMES {
            self.parsed.insert(name.clone(), ());
        }
    }

    pub fn is_parsed(&self, name: &Arc<str>) -> bool {
        self.parsed.contains_key(name)
    }

    /// Counts a client in; the guard counts it out.
    pub fn enter(self: &Arc<Self>) -> PoolClientGuard {
        self.clients.fetch_add(1, Ordering::Relaxed);
        self.touch();
        PoolClientGuard(self.clone())
    }

    fn touch(&self) {
        if let Ok(mut t) = self.last_used.lock() {
            *t = Instant::now();
        }
    }

    fn idle_for(&self) -> Duration {
        let busy = self.clients.load(Ordering::Relaxed) > 0
            // A row group's connections outlive the pools of its tenants.
            || (!self.shared && self.pool.state().connections > 0)
            || self
                .replica_pools()
                .iter()
                .any(|p| p.pool.state().connections > 0);
        if busy {
            return Duration::ZERO;
        }
        self.last_used
            .lock()
            .map(|t| t.elapsed())
            .unwrap_or(Duration::ZERO)
    }

    /// A connection: a parked one if any (the hot path: a lock and a pop, no timer), else one
    /// from bb8 while it may open more, else the next one a finishing transaction hands over
    /// (first come, first served, as PgBouncer queues its clients). Fails as soon as a connect
    /// attempt fails (bb8 alone would keep retrying until the wait timeout and then report only
    /// the timeout), or after `query_wait_timeout`. A row tenant whose `pool_size` is below its
    /// group's first waits for a share of its own, so no tenant can take its neighbours'
    /// connections.
    pub async fn checkout(&self) -> Result<Box<PooledBackend>, PoolError> {
        self.checkout_with(Patience::UntilTimeout).await
    }

    /// Like `checkout`; with `Patience::FailFast` an unreachable server fails the checkout at
    /// once instead of being waited for (a replica read then goes elsewhere).
    pub async fn checkout_with(&self, patience: Patience) -> Result<Box<PooledBackend>, PoolError> {
        // Boxed and only when something is paused: the wait's state (a timer) would
        // otherwise sit in every checkout's.
        if self.pauses.any() && !Box::pin(self.pauses.wait(&self.tenant.id, self.wait)).await {
            return Err(PoolError::Paused(self.tenant.id.clone()));
        }
        let be = self.checkout_shared(patience).await?;
        if let Some(c) = &be.census {
            c.info.active.store(true, Ordering::Relaxed);
            if let (Some(row), Ok(mut t)) = (&self.row, c.info.tenant.lock()) {
                // A row group's connection serves one tenant after another.
                if **t != *row.tenant {
                    *t = row.tenant.clone();
                }
            }
        }
        Ok(be)
    }

    async fn checkout_shared(&self, patience: Patience) -> Result<Box<PooledBackend>, PoolError> {
        let Some(share) = &self.share else {
            return self.checkout_unlimited(None, patience).await;
        };
        let started = tokio::time::Instant::now();
        let permit = match share.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => match tokio::time::timeout(self.wait, share.clone().acquire_owned()).await {
                Ok(Ok(p)) => p,
                _ => return Err(PoolError::Timeout(self.wait)),
            },
        };
        let mut be = self.checkout_unlimited(Some(started), patience).await?;
        be.tenant_share = Some(permit);
        Ok(be)
    }

    /// `started`: when the client began to wait, if it already has (None: now). A connection
    /// found dead (the server closed it while it was idle) is thrown away and another taken,
    /// so a broken one is never handed out.
    async fn checkout_unlimited(
        &self,
        started: Option<tokio::time::Instant>,
        patience: Patience,
    ) -> Result<Box<PooledBackend>, PoolError> {
        loop {
            let parked = self
                .idle
                .lock()
                .ok()
                .and_then(|mut i| i.take(self.row.as_ref()));
            let mut be = match parked {
                Some(be) => be,
                // Boxed: its state (bb8's future, timers) would otherwise sit inline in every
                // transaction's state, though the fast path above serves most transactions.
                None => {
                    let started = started.unwrap_or_else(tokio::time::Instant::now);
                    Box::pin(self.checkout_slow(started + self.wait, patience)).await?
                }
            };
            if !be.is_dead() {
                return Ok(be);
            }
            tracing::debug!(server = %self.health.name, "pooled server connection was closed by the server; discarding it");
            self.health.wake_checker();
            be.mark_broken();
            self.discard(be);
        }
    }

    async fn checkout_slow(
        &self,
        deadline: tokio::time::Instant,
        patience: Patience,
    ) -> Result<Box<PooledBackend>, PoolError> {
        loop {
            // A changed tenant entry: its waiters move to the new pool (which may name another
            // server, after a failover) rather than wait for this one.
            if self.is_retired() && !self.shared {
                return Err(PoolError::Retired);
            }
            // In the queue for a handover in every case: while bb8 opens a connection for
            // us, one parked meanwhile by a finishing transaction must not pass us by.
            let (rx, bb8_can_serve) = {
                let Ok(mut idle) = self.idle.lock() else {
                    return Err(PoolError::Timeout(self.wait));
                };
                if let Some(be) = idle.take(self.row.as_ref()) {
                    return Ok(be);
                }
                let (tx, rx) = oneshot::channel();
                // Clients that gave up leave closed senders behind; handovers skip them at the
                // front, and the rest are swept now and then (amortized O(1) per push).
                let n = idle.waiters.len();
                if n >= 64 && n.is_power_of_two() {
                    idle.waiters.retain(|w| !w.tx.is_closed());
                }
                idle.waiters.push_back(Waiter {
                    tx,
                    tenant: self.row.as_ref().map(|r| r.tenant.clone()),
                    since_ms: coarse_ms(),
                });
                let state = self.pool.state();
                (
                    rx,
                    state.idle_connections > 0 || state.connections < self.max_size,
                )
            };
            if patience == Patience::FailFast && self.health.is_down() {
                return Err(self.timeout_error());
            }
            let failed = self.failures.notify.notified();
            tokio::pin!(failed);
            failed.as_mut().enable();
            if bb8_can_serve {
                tokio::select! {
                    got = tokio::time::timeout_at(deadline, self.pool.get_owned()) => {
                        return match got {
                            Ok(Ok(be)) => Ok(Box::new(be)),
                            Ok(Err(bb8::RunError::User(e))) => Err(PoolError::Backend(e)),
                            Ok(Err(bb8::RunError::TimedOut)) | Err(_) => Err(self.timeout_error()),
                        };
                    }
                    got = rx => match got {
                        Ok(Handoff::Conn(be)) => return Ok(be),
                        Ok(Handoff::Retry) | Err(_) => continue,
                    },
                    _ = failed => match self.after_failure(patience, deadline) {
                        Some(e) => return Err(e),
                        None => continue,
                    },
                }
            }
            // Every connection exists and is busy. A connection dropped rather than parked
            // frees a slot without a handover, so look again now and then.
            let wake = (tokio::time::Instant::now() + RECHECK).min(deadline);
            tokio::select! {
                got = tokio::time::timeout_at(wake, rx) => match got {
                    Ok(Ok(Handoff::Conn(be))) => return Ok(be),
                    Ok(Ok(Handoff::Retry)) | Ok(Err(_)) => continue,
                    Err(_) if wake >= deadline => return Err(self.timeout_error()),
                    Err(_) => continue,
                },
                _ = failed => match self.after_failure(patience, deadline) {
                    Some(e) => return Err(e),
                    None => continue,
                },
            }
        }
    }

    /// A connection attempt failed. A refusal (bad password, no such database) is the client's
    /// answer at once. An unreachable server is waited for until the deadline, while the
    /// server's gate spaces out the attempts; unless the caller cannot wait.
    fn after_failure(
        &self,
        patience: Patience,
        deadline: tokio::time::Instant,
    ) -> Option<PoolError> {
        match self.failures.take() {
            Some(e) if !e.is_unreachable() || patience == Patience::FailFast => {
                Some(PoolError::Backend(e))
            }
            _ if tokio::time::Instant::now() >= deadline => Some(self.timeout_error()),
            _ => None,
        }
    }

    /// What a client that waited in vain is told: that the server is unreachable, if it is.
    fn timeout_error(&self) -> PoolError {
        if self.health.is_down() {
            let v = self.health.view();
            return PoolError::Unreachable {
                wait: self.wait,
                server: v.name,
                error: v
                    .last_error
                    .unwrap_or_else(|| "connection attempts fail".into()),
            };
        }
        PoolError::Timeout(self.wait)
    }

    /// Keeps a clean, idle connection for the pool's next transaction: handed straight to the
    /// longest-waiting client if there is one, else parked. Connections parked for longer than
    /// `PARK_MAX_MS` go back to bb8, whose idle timeout and lifetime then apply.
    pub fn park(&self, mut be: Box<PooledBackend>) {
        be.tenant_share = None;
        if let Some(c) = &be.census {
            c.info.active.store(false, Ordering::Relaxed);
        }
        // A retired row tenant's connections still serve the rest of its group.
        if be.is_broken() || (self.is_retired() && !self.shared) {
            self.discard(be);
            return;
        }
        let now = coarse_ms();
        let stale = match self.idle.lock() {
            Ok(mut idle) => {
                while let Some(w) = idle.next_waiter(be.bound_tenant()) {
                    match w.send(Handoff::Conn(be)) {
                        Ok(()) => return,
                        // That client gave up waiting.
                        Err(Handoff::Conn(back)) => be = back,
                        Err(Handoff::Retry) => return,
                    }
                }
                let stale = take_stale(&mut idle.parked, now);
                idle.parked.push((be, now));
                stale
            }
            Err(_) => Vec::new(),
        };
        drop(stale);
    }

    /// Closes a connection that must not be reused, and lets a waiting client open another in
    /// its place.
    pub fn discard(&self, mut be: Box<PooledBackend>) {
        be.tenant_share = None;
        drop(be);
        if let Ok(mut idle) = self.idle.lock() {
            while let Some(w) = idle.waiters.pop_front() {
                if w.tx.send(Handoff::Retry).is_ok() {
                    break;
                }
            }
        }
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    /// The pool that serves this pool's tenant and role now: itself, a newer pool built from
    /// a changed registry entry, or None when the tenant or role is gone.
    pub fn current(self: &Arc<Self>) -> Option<Arc<TenantPool>> {
        let mut p = self.clone();
        while p.is_retired() {
            let next = p.successor.lock().ok()?.clone()?;
            p = next;
        }
        Some(p)
    }

    fn retire(&self, successor: Option<Arc<TenantPool>>) {
        if let Ok(mut s) = self.successor.lock() {
            *s = successor;
        }
        self.retired.store(true, Ordering::Relaxed);
        for p in self.replica_pools() {
            p.retire(None);
        }
        if self.shared {
            // The parked connections and waiting clients belong to the whole row group.
            return;
        }
        // Idle connections close now; busy ones close when their clients are done.
        let (parked, waiters) = match self.idle.lock() {
            Ok(mut i) => (
                std::mem::take(&mut i.parked),
                std::mem::take(&mut i.waiters),
            ),
            Err(_) => return,
        };
        drop(parked);
        // Waiting clients go on to the successor at their next transaction, or open a
        // connection here for this one.
        for w in waiters {
            let _ = w.tx.send(Handoff::Retry);
        }
    }

    pub fn tenant(&self) -> &Arc<Tenant> {
        &self.tenant
    }

    /// Row tier: the binding a connection needs before it serves this pool's sessions.
    pub fn row(&self) -> Option<&RowBinding> {
        self.row.as_ref()
    }

    /// Returns connections parked longer than `PARK_MAX_MS` to bb8.
    fn release_stale(&self) {
        let stale = match self.idle.lock() {
            Ok(mut i) => take_stale(&mut i.parked, coarse_ms()),
            Err(_) => Vec::new(),
        };
        drop(stale);
        for p in self.replica_pools() {
            p.release_stale();
        }
    }

    /// The tenant's read replicas, when it has any (never for the row tier).
    pub fn replicas(&self) -> Option<&Arc<Replicas>> {
        self.replicas.as_ref()
    }

    /// This pool and its replicas' pools, each with whether it is a replica's.
    pub fn with_replicas(self: &Arc<Self>) -> Vec<(Arc<TenantPool>, bool)> {
        std::iter::once((self.clone(), false))
            .chain(self.replica_pools().iter().map(|r| (r.clone(), true)))
            .collect()
    }

    fn replica_pools(&self) -> &[Arc<TenantPool>] {
        self.replicas.as_deref().map_or(&[], Replicas::pools)
    }

    pub fn stats(&self) -> &Arc<PoolStats> {
        &self.stats
    }

    /// Clients of this pool now, and connections (all, idle in bb8, parked here).
    pub fn load(&self) -> PoolLoad {
        let state = self.pool.state();
        let (parked, waiting, oldest_wait_ms) = match self.idle.lock() {
            Ok(i) => {
                let live: Vec<&Waiter> = i.waiters.iter().filter(|w| !w.tx.is_closed()).collect();
                let oldest = live
                    .iter()
                    .map(|w| coarse_ms().saturating_sub(w.since_ms))
                    .max()
                    .unwrap_or(0);
                (i.parked.len(), live.len(), oldest)
            }
            Err(_) => (0, 0, 0),
        };
        PoolLoad {
            clients: self.clients.load(Ordering::Relaxed),
            connections: state.connections as usize,
            idle: state.idle_connections as usize + parked,
            waiting,
            oldest_wait_ms,
        }
    }

    pub fn max_size(&self) -> u32 {
        self.max_size
    }

    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// The health record of this pool's server.
    pub fn health(&self) -> &Arc<ServerHealth> {
        &self.health
    }

    /// How this pool logs in to its server.
    pub fn spec(&self) -> &ConnectSpec {
        &self.spec
    }

    pub fn state(&self) -> bb8::State {
        self.pool.state()
    }
}

/// What SHOW POOLS reports of a pool.
#[derive(Debug, Clone, Copy, Default)]
pub struct PoolLoad {
    pub clients: usize,
    pub connections: usize,
    pub idle: usize,
    pub waiting: usize,
    pub oldest_wait_ms: u64,
}

/// Each with the `coarse_ms` time it was parked.
type Parked = Vec<(Box<PooledBackend>, u64)>;

/// What a finishing transaction hands a waiting client.
enum Handoff {
    Conn(Box<PooledBackend>),
    /// A slot was freed (a connection closed): try bb8 again.
    Retry,
}

#[derive(Default)]
struct Idle {
    /// Most recently used last.
    parked: Parked,
    /// Clients waiting for a connection, longest-waiting first.
    waiters: std::collections::VecDeque<Waiter>,
}

struct Waiter {
    tx: oneshot::Sender<Handoff>,
    /// Row tier: the tenant the client needs the connection bound to.
    tenant: Option<Arc<str>>,
    /// When it started waiting (`coarse_ms`).
    since_ms: u64,
}

/// Row tier: among this many longest-waiting clients, one of the tenant a freed connection is
/// bound to is served first (no switch needed)...
const AFFINITY_WAITERS: usize = 16;
/// ...unless the longest-waiting client has waited this long (ms): no tenant starves, and a
/// switch costs about as much as a few transactions.
const MAX_AFFINITY_WAIT_MS: u64 = 5;

/// How many of the most recently parked connections a row tenant looks through for one
/// already bound to it (string compares under the idle lock: well under a microsecond).
const AFFINITY_SCAN: usize = 256;

impl Idle {
    /// The client to hand a freed connection bound to `bound` to: the longest-waiting one, or
    /// for a row group a client of the tenant the connection is bound to, if one is among the
    /// first few and the longest-waiting client has not waited long.
    fn next_waiter(&mut self, bound: Option<&str>) -> Option<oneshot::Sender<Handoff>> {
        while self.waiters.front().is_some_and(|w| w.tx.is_closed()) {
            self.waiters.pop_front();
        }
        let front = self.waiters.front()?;
        if let Some(bound) = bound {
            let patient = coarse_ms().saturating_sub(front.since_ms) < MAX_AFFINITY_WAIT_MS;
            if patient && front.tenant.as_deref() != Some(bound) {
                let mine = self
                    .waiters
                    .iter()
                    .take(AFFINITY_WAITERS)
                    .position(|w| w.tenant.as_deref() == Some(bound) && !w.tx.is_closed());
                if let Some(i) = mine {
                    return self.waiters.remove(i).map(|w| w.tx);
                }
            }
        }
        self.waiters.pop_front().map(|w| w.tx)
    }

    /// The most recently parked connection (so surplus ones grow idle and close); for a row
    /// tenant one already bound to it (no switch needed), else the one parked longest, whose
    /// tenant is the least likely to want it back soon.
    fn take(&mut self, row: Option<&RowBinding>) -> Option<Box<PooledBackend>> {
        if let Some(row) = row {
            let n = self.parked.len();
            let mine = (n.saturating_sub(AFFINITY_SCAN)..n)
                .rev()
                .find(|&i| self.parked[i].0.bound_tenant() == Some(&*row.tenant));
            if let Some(i) = mine.or((n > 0).then_some(0)) {
                return Some(self.parked.remove(i).0);
            }
        }
        self.parked.pop().map(|(be, _)| be)
    }
}

/// A pool's connections and its waiting room: a tenant's own, or shared by the row tenants of
/// one group.
#[derive(Clone)]
struct Connections {
    pool: bb8::Pool<BackendManager>,
    failures: Arc<ConnectFailures>,
    idle: Arc<std::sync::Mutex<Idle>>,
    max_size: u32,
}

/// How often a waiting client looks at the pool again in case a slot was freed silently.
const RECHECK: Duration = Duration::from_secs(1);

/// Removes the connections parked longer than `PARK_MAX_MS` (the oldest come first); the
/// caller drops them outside the lock, which hands them back to bb8.
fn take_stale(parked: &mut Parked, now: u64) -> Parked {
    let n = parked
        .iter()
        .take_while(|(_, t)| now.saturating_sub(*t) > PARK_MAX_MS)
        .count();
    parked.drain(..n).collect()
}

pub struct PoolClientGuard(Arc<TenantPool>);

impl Drop for PoolClientGuard {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

#[derive(Default)]
struct ConnectFailures {
    last: std::sync::Mutex<Option<BackendError>>,
    notify: Notify,
}

impl ConnectFailures {
    fn record(&self, e: BackendError) {
        if let Ok(mut last) = self.last.lock() {
            *last = Some(e);
        }
        self.notify.notify_waiters();
    }

    fn take(&self) -> Option<BackendError> {
        self.last.lock().ok().and_then(|mut l| l.take())
    }
}

#[derive(Clone)]
struct FailureSink(Arc<ConnectFailures>);

impl std::fmt::Debug for FailureSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FailureSink")
    }
}

impl bb8::ErrorSink<BackendError> for FailureSink {
    fn sink(&self, e: BackendError) {
        tracing::warn!(error = %e, "backend connect failed");
        self.0.record(e);
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<BackendError>> {
        Box::new(self.clone())
    }
}

/// All pools of this proxy.
pub struct Pools {
    pools: DashMap<PoolKey, Arc<TenantPool>>,
    settings: PoolConfig,
    /// What row-tier context keys derive from.
    row_secret: Option<RowSecret>,
    /// Connections shared by row tenants, by server, database, backend role and defaults.
    groups: DashMap<String, Connections>,
    /// Row tier: restores the shared login role's password when a tenant changed it.
    role_repair: Option<RoleRepair>,
    /// Every server's health, shared by all pools on it.
    health: Arc<HealthBook>,
    health_settings: HealthConfig,
    stats: DashMap<PoolKey, Arc<PoolStats>>,
    metrics: Arc<stats::Metrics>,
    census: Arc<crate::backend::census::Census>,
    pauses: Arc<Pauses>,
}

impl Pools {
    pub fn new(settings: PoolConfig, row_secret: Option<RowSecret>) -> Self {
        Pools {
            pools: DashMap::new(),
            settings,
            row_secret,
            groups: DashMap::new(),
            role_repair: None,
            health: HealthBook::new(),
            health_settings: HealthConfig::default(),
            stats: DashMap::new(),
            metrics: Arc::default(),
            census: Arc::default(),
            pauses: Arc::default(),
        }
    }

    pub fn metrics(&self) -> &Arc<stats::Metrics> {
        &self.metrics
    }

    pub fn census(&self) -> &Arc<crate::backend::census::Census> {
        &self.census
    }

    pub fn pauses(&self) -> &Arc<Pauses> {
        &self.pauses
    }

    /// Counters of every (tenant, role) served since start (or since the tenant came back).
    pub fn all_stats(&self) -> Vec<(PoolKey, Arc<PoolStats>)> {
        let mut v: Vec<(PoolKey, Arc<PoolStats>)> = self
            .stats
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect();
        v.sort_by(|a, b| (&a.0.tenant, &a.0.role).cmp(&(&b.0.tenant, &b.0.role)));
        v
    }

    /// The keys of a tenant's pools (one per role in use).
    fn keys_of(&self, id: &str) -> Vec<PoolKey> {
        self.pools
            .iter()
            .filter(|p| &*p.key().tenant == id)
            .map(|p| p.key().clone())
            .collect()
    }

    /// Closes a tenant's pools (KILL): idle connections now, busy ones when their clients are
    /// done; new clients get new pools.
    pub fn close_tenant(&self, id: &str) -> usize {
        let keys = self.keys_of(id);
        for key in &keys {
            if let Some((_, old)) = self.pools.remove(key) {
                old.retire(None);
            }
        }
        keys.len()
    }

    pub fn with_health(mut self, settings: HealthConfig) -> Self {
        self.health_settings = settings;
        self
    }

    pub fn health(&self) -> &Arc<HealthBook> {
        &self.health
    }

    pub fn health_settings(&self) -> &HealthConfig {
        &self.health_settings
    }

    /// Every pool now in use (a snapshot), primaries only: replicas hang off them.
    pub fn snapshot(&self) -> Vec<(PoolKey, Arc<TenantPool>)> {
        self.pools
            .iter()
            .map(|p| (p.key().clone(), p.value().clone()))
            .collect()
    }

    /// With a registry: row-tier logins refused their password have it restored (see
    /// `BackendConn::connect`).
    pub fn with_role_repair(mut self, repair: Option<RoleRepair>) -> Self {
        self.role_repair = repair;
        self
    }

    /// The pool of (tenant, role), made on first use (which opens no connection, unless the
    /// tenant keeps a minimum of idle ones). A pool built from an older registry entry of the
    /// tenant is retired and replaced.
    pub fn get(&self, tenant: &Arc<Tenant>, user: &ClientUser) -> Arc<TenantPool> {
        let key = PoolKey {
            tenant: Arc::from(tenant.id.as_str()),
            role: Arc::from(user.name.as_str()),
        };
        if let Some(p) = self.pools.get(&key) {
            if Arc::ptr_eq(&p.tenant, tenant) {
                return p.clone();
            }
        }
        let mut replaced = None;
        let pool = match self.pools.entry(key) {
            dashmap::Entry::Occupied(mut o) if !Arc::ptr_eq(&o.get().tenant, tenant) => {
                let new = Arc::new(self.build(tenant, user));
                replaced = Some(o.insert(new.clone()));
                new
            }
            dashmap::Entry::Occupied(o) => o.get().clone(),
            dashmap::Entry::Vacant(v) => v.insert(Arc::new(self.build(tenant, user))).clone(),
        };
        if let Some(old) = replaced {
            old.retire(Some(pool.clone()));
        }
        pool
    }

    /// Applies a registry change: the tenant's pools are rebuilt from its new entry (clients
    /// move to them at their next transaction), or retired when the tenant or role is gone.
    pub fn refresh(&self, id: &str, now: Option<&Arc<Tenant>>) {
        let keys = self.keys_of(id);
        for key in keys {
            let user = now.and_then(|t| t.user(&key.role).cloned());
            match (now, user) {
                (Some(t), Some(u)) => {
                    self.get(t, &u);
                }
                _ => {
                    if let Some((_, old)) = self.pools.remove(&key) {
                        old.retire(None);
                    }
                    // A tenant or role that is gone takes its counters (and series) along.
                    if let Some((_, st)) = self.stats.remove(&key) {
                        st.unregister(&self.metrics);
                    }
                }
            }
        }
    }

    fn build(&self, tenant: &Arc<Tenant>, user: &ClientUser) -> TenantPool {
        let mut pool = self.build_for(tenant, user, &tenant.server);
        if tenant.tier != Tier::Row && !tenant.replicas.is_empty() {
            let max_lag = (self.health_settings.replica_max_lag > 0)
                .then(|| Duration::from_secs(self.health_settings.replica_max_lag));
            let pools = tenant
                .replicas
                .iter()
                .map(|r| Arc::new(self.build_for(tenant, user, r)))
                .collect();
            pool.replicas = Some(Arc::new(Replicas::new(pools, max_lag)));
        }
        pool
    }

    /// A pool of (tenant, role) connections to `server`: the tenant's primary or a replica.
    fn build_for(
        &self,
        tenant: &Arc<Tenant>,
        user: &ClientUser,
        server: &Arc<Server>,
    ) -> TenantPool {
        let s = &self.settings;
        let key = PoolKey {
            tenant: Arc::from(tenant.id.as_str()),
            role: Arc::from(user.name.as_str()),
        };
        let stats = self
            .stats
            .entry(key)
            .or_insert_with(|| Arc::new(PoolStats::new(&self.metrics, &tenant.id, &user.name)))
            .clone();
        let row_tier = tenant.tier == Tier::Row;
        let health = self.health.of(server);
        let spec = ConnectSpec {
            health: health.clone(),
            server: server.clone(),
            database: tenant.database.clone(),
            credentials: user.backend.clone(),
            params: crate::tenancy::tier::backend_startup_params(tenant),
            connect_timeout: Duration::from_secs(s.connect_timeout),
            repair: row_tier.then(|| self.role_repair.clone()).flatten(),
            row_key: row_tier.then(|| {
                self.row_secret
                    .as_ref()
                    .map(|k| k.row_key(&tenant.database))
            }),
        };
        let wait = Duration::from_secs(
            tenant
                .query_wait_timeout
                .unwrap_or(s.query_wait_timeout)
                .max(1),
        );
        let group = if row_tier {
            // The password only as a hash: a rotated one makes a new group.
            let password = spec.credentials.password.as_ref().map(|p| {
                use std::hash::{BuildHasher, Hasher};
                let mut h = foldhash::fast::FixedState::with_seed(0).build_hasher();
                h.write(p.expose().as_bytes());
                h.finish()
            });
            let key = format!(
                "{}\0{}\0{}\0{}\0{}\0{:?}\0{:?}",
                spec.server.name,
                spec.server.host,
                spec.server.port,
                spec.database,
                spec.credentials.user,
                password,
                spec.params
            );
            self.groups
                .entry(key)
                .or_insert_with(|| {
                    let failures = Arc::new(ConnectFailures::default());
                    Connections {
                        pool: self.bb8_pool(
                            tenant,
                            &user.name,
                            s.default_size,
                            None,
                            wait,
                            &failures,
                            spec.clone(),
                        ),
                        failures,
                        idle: Arc::default(),
                        max_size: s.default_size,
                    }
                })
                .clone()
        } else {
            let failures = Arc::new(ConnectFailures::default());
            Connections {
                pool: self.bb8_pool(
                    tenant,
                    &user.name,
                    tenant.pool_size,
                    tenant.min_idle,
                    wait,
                    &failures,
                    spec.clone(),
                ),
                failures,
                idle: Arc::default(),
                max_size: tenant.pool_size,
            }
        };
        TenantPool {
            tenant: tenant.clone(),
            retired: AtomicBool::new(false),
            successor: std::sync::Mutex::new(None),
            pool: group.pool,
            max_size: group.max_size,
            failures: group.failures,
            wait,
            names: DashMap::new(),
            parsed: DashMap::new(),
            idle: group.idle,
            row: row_tier.then(|| RowBinding {
                tenant: Arc::from(tenant.id.as_str()),
            }),
            shared: row_tier,
            share: (row_tier && tenant.pool_size < s.default_size)
                .then(|| Arc::new(tokio::sync::Semaphore::new(tenant.pool_size as usize))),
            clients: AtomicUsize::new(0),
            last_used: std::sync::Mutex::new(Instant::now()),
            health,
            spec,
            replicas: None,
            stats,
            pauses: self.pauses.clone(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn bb8_pool(
        &self,
        tenant: &Tenant,
        role: &str,
        size: u32,
        min_idle: Option<u32>,
        wait: Duration,
        failures: &Arc<ConnectFailures>,
        spec: ConnectSpec,
    ) -> bb8::Pool<BackendManager> {
        let s = &self.settings;
        let server_idle = tenant
            .server_idle_timeout
            .unwrap_or(s.server_idle_timeout)
            .max(1);
        bb8::Pool::builder()
            .max_size(size)
            .min_idle(min_idle.map(|n| n.min(size)))
            .test_on_check_out(false)
            .retry_connection(false)
            .connection_timeout(wait)
            .idle_timeout(Some(Duration::from_secs(server_idle)))
            .max_lifetime(Some(Duration::from_secs(s.server_lifetime.max(1))))
            .reaper_rate(Duration::from_secs(server_idle.clamp(1, 30)))
            .queue_strategy(bb8::QueueStrategy::Lifo)
            .error_sink(Box::new(FailureSink(failures.clone())))
            .build_unchecked(BackendManager::new(
                spec,
                self.census.clone(),
                Arc::from(tenant.id.as_str()),
                Arc::from(role),
            ))
    }

    /// Drops pools that have had no client and no connection for `idle`, so thousands of
    /// quiet tenants cost nothing. Returns how many were dropped.
    pub fn sweep(&self, idle: Duration) -> usize {
        let before = self.pools.len();
        for p in self.pools.iter() {
            p.release_stale();
        }
        self.pools.retain(|_, p| p.idle_for() < idle);
        // A row group no pool uses any more, with no connection left.
        self.groups
            .retain(|_, g| Arc::strong_count(&g.idle) > 1 || g.pool.state().connections > 0);
        before - self.pools.len()
    }

    pub fn len(&self) -> usize {
        self.pools.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pools.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A waiting client of `tenant` that started waiting `ago_ms` ago; its receiver tells
    /// whether it was served.
    fn waiter(idle: &mut Idle, tenant: &str, ago_ms: u64) -> oneshot::Receiver<Handoff> {
        let (tx, rx) = oneshot::channel();
        idle.waiters.push_back(Waiter {
            tx,
            tenant: Some(Arc::from(tenant)),
            since_ms: coarse_ms().saturating_sub(ago_ms),
        });
        rx
    }

    fn serve(idle: &mut Idle, bound: Option<&str>) {
        let tx = idle.next_waiter(bound).expect("a waiter");
        assert!(tx.send(Handoff::Retry).is_ok());
    }

    #[test]
    fn a_freed_connection_goes_to_a_waiting_client_of_the_tenant_it_is_bound_to() {
        let mut idle = Idle::default();
        let mut a = waiter(&mut idle, "a", 0);
        let mut b = waiter(&mut idle, "b", 0);
        serve(&mut idle, Some("b"));
        assert!(b.try_recv().is_ok());
        assert!(a.try_recv().is_err(), "a is still waiting");
    }

    #[test]
    fn a_client_that_waited_long_is_served_first_whatever_the_binding() {
        let mut idle = Idle::default();
        let mut a = waiter(&mut idle, "a", MAX_AFFINITY_WAIT_MS + 10);
        let mut b = waiter(&mut idle, "b", 0);
        serve(&mut idle, Some("b"));
        assert!(a.try_recv().is_ok());
        assert!(b.try_recv().is_err());
    }

    #[test]
    fn without_a_binding_clients_are_served_first_come_first_served() {
        let mut idle = Idle::default();
        let mut a = waiter(&mut idle, "a", 0);
        let mut b = waiter(&mut idle, "b", 0);
        serve(&mut idle, None);
        assert!(a.try_recv().is_ok());
        assert!(b.try_recv().is_err());
    }

    #[test]
    fn clients_that_gave_up_are_skipped() {
        let mut idle = Idle::default();
        drop(waiter(&mut idle, "a", 0));
        let mut b = waiter(&mut idle, "b", 0);
        serve(&mut idle, Some("a"));
        assert!(b.try_recv().is_ok());
    }
}
