//! Backend connection pools, one per (tenant, client role), created on first use.

mod autoscale;
pub mod budget;
mod core;
pub mod health_check;
pub mod listen_hub;
mod manager;
pub mod pause;
mod replicas;
pub mod stats;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use dashmap::DashMap;
use tokio::sync::oneshot;

use crate::backend::health::coarse_ms;
use crate::backend::{BackendError, ConnectSpec, HealthBook, RoleRepair, ServerHealth};
use crate::config::{HealthConfig, PoolConfig};
use crate::protocol::{sqlstate, ErrorReport};
use crate::tenancy::crypto::RowSecret;
use crate::tenancy::row_context::RowBinding;
use crate::tenancy::{ClientUser, Server, Tenant};

pub use self::core::Lease;
use self::core::{Core, CoreSettings, Handoff, Waiter};
pub use autoscale::Reason as ResizeReason;
use budget::ServerBudget;
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

/// How a checkout makes sure a parked connection was not closed by its server while idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Ask the kernel: one non-blocking peek at the socket.
    Peek,
    /// The caller was just woken by this thread's reactor for a client request that arrived
    /// after the connection was parked: for a connection this thread's one-thread runtime
    /// opened, the reactor's readiness flag answers, and the kernel is asked only when it says
    /// readable (`BackendConn::is_dead_after_wake`); any other is peeked.
    AfterWake,
}

fn is_dead_as(be: &mut PooledBackend, liveness: Liveness) -> bool {
    match liveness {
        Liveness::Peek => be.is_dead(),
        Liveness::AfterWake => be.is_dead_after_wake(),
    }
}

/// A server connection checked out of a pool; dropping it closes it.
pub type PooledBackend = crate::backend::BackendConn;

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
    #[error("no server connection within {wait:?}: server \"{server}\" has all {limit} connections of its budget in use by other tenants")]
    Budget {
        wait: Duration,
        server: String,
        limit: usize,
    },
    #[error("the tenant's entry changed; its new pool serves this request")]
    Retired,
    #[error("tenant \"{0}\" is paused by an administrator (PAUSE); timed out waiting for RESUME")]
    Paused(String),
    #[error("no read replica of tenant \"{tenant}\" is usable (unreachable, or lagging more than replica_max_lag), and {why}{last}")]
    NoReplica {
        tenant: String,
        why: &'static str,
        /// "; the last replica tried: <its error>", or empty when none was tried.
        last: String,
    },
}

impl PoolError {
    pub fn report(&self) -> ErrorReport {
        match self {
            PoolError::Timeout(_) => {
                ErrorReport::fatal(sqlstate::CANNOT_CONNECT_NOW, self.to_string())
                    .with_hint("the tenant's pool is busy; raise pool_size or query_wait_timeout")
            }
            PoolError::Backend(e) => e.report(),
            PoolError::Budget { .. } => {
                ErrorReport::fatal(sqlstate::CANNOT_CONNECT_NOW, self.to_string()).with_hint(
                    "the server's connection budget is shared fairly by weight; raise the server's max_connections or this tenant's weight, or retry",
                )
            }
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
/// A (tenant, role)'s pool: its connections (its own, or its row group's), its statement
/// names, and where it stands in the registry.
pub struct TenantPool {
    /// The registry entry this pool was built from; a changed entry gets a new pool.
    tenant: Arc<Tenant>,
    /// Set when the entry changed or went away; `successor` serves the tenant from then on.
    retired: AtomicBool,
    successor: std::sync::Mutex<Option<Arc<TenantPool>>>,
    core: Arc<Core>,
    wait: Duration,
    /// (query text + parameter types) → global statement name, shared by the pool's clients.
    names: DashMap<Bytes, Arc<str>>,
    /// Global names that some backend has parsed successfully: valid SQL for this pool.
    parsed: DashMap<Arc<str>, ()>,
    /// Row tier: the binding this pool's sessions need on a connection.
    row: Option<RowBinding>,
    /// The tenant's database, shared by the pool's sessions (SHOW CLIENTS).
    database: Arc<str>,
    /// Transaction mode: pin or refuse session features, the role's choice over the tenant's.
    session_features: crate::config::SessionFeatures,
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
    /// Transaction mode, database tier: where its clients' LISTENs are held.
    listen_hubs: Arc<listen_hub::ListenHubs>,
}

impl TenantPool {
    /// The proxy's LISTEN hubs (`listen_hub`).
    pub fn listen_hubs(&self) -> &Arc<listen_hub::ListenHubs> {
        &self.listen_hubs
    }

    /// The tenant's database, shared.
    pub fn database_name(&self) -> &Arc<str> {
        &self.database
    }

    /// Whether a transaction-mode client of this pool is pinned or refused when it uses a
    /// session feature: its role's setting, else its tenant's.
    pub fn session_features(&self) -> crate::config::SessionFeatures {
        self.session_features
    }

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
            || (!self.shared && self.core.open_count() > 0)
            || self
                .replica_pools()
                .iter()
                .any(|p| p.core.open_count() > 0);
        if busy {
            return Duration::ZERO;
        }
        self.last_used
            .lock()
            .map(|t| t.elapsed())
            .unwrap_or(Duration::ZERO)
    }

    /// A connection: a parked one if any (the hot path: a lock and a pop, no timer), else a new
    /// one while the pool may open more and the server's budget grants a slot, else the next
    /// one a finishing transaction hands over (first come, first served, as PgBouncer queues
    /// its clients). Fails as soon as a connect attempt is refused, or after
    /// `query_wait_timeout`. A row tenant whose `pool_size` is below its
    /// group's first waits for a share of its own, so no tenant can take its neighbours'
    /// connections.
    pub async fn checkout(&self) -> Result<Box<PooledBackend>, PoolError> {
        self.checkout_with(Patience::UntilTimeout, Liveness::Peek)
            .await
    }

    /// Like `checkout`; with `Patience::FailFast` an unreachable server fails the checkout at
    /// once instead of being waited for (a replica read then goes elsewhere). `liveness`: how
    /// a parked connection is checked for a close by its server.
    pub async fn checkout_with(
        &self,
        patience: Patience,
        mut liveness: Liveness,
    ) -> Result<Box<PooledBackend>, PoolError> {
        // Boxed and only when something is paused: the wait's state (a timer) would
        // otherwise sit in every checkout's.
        if self.pauses.any() {
            if !Box::pin(self.pauses.wait(&self.tenant.id, self.wait)).await {
                return Err(PoolError::Paused(self.tenant.id.clone()));
            }
            liveness = Liveness::Peek;
        }
        let be = self.checkout_shared(patience, liveness).await?;
        Ok(self.checked_out(be))
    }

    /// `checkout_with`'s common case without a future: a live parked connection when one can
    /// be had at once (nothing paused, the tenant's share free), else None, and the caller
    /// awaits `checkout_with`. Parked connections found dead on the way are discarded, as
    /// there.
    pub fn try_checkout(&self, liveness: Liveness) -> Option<Box<PooledBackend>> {
        if self.pauses.any() {
            return None;
        }
        let permit = match &self.share {
            None => None,
            Some(share) => Some(share.clone().try_acquire_owned().ok()?),
        };
        loop {
            let mut be = self.take_parked()?;
            if !is_dead_as(&mut be, liveness) {
                be.tenant_share = permit;
                return Some(self.checked_out(be));
            }
            self.discard_dead(be);
        }
    }

    fn take_parked(&self) -> Option<Box<PooledBackend>> {
        self.core
            .idle
            .lock()
            .ok()
            .and_then(|mut i| i.take(self.row.as_ref()))
    }

    /// A connection now in a client's hands: counted as this tenant's, and active.
    fn checked_out(&self, be: Box<PooledBackend>) -> Box<PooledBackend> {
        if let (Some(row), Ok(mut idle)) = (&self.row, self.core.idle.lock()) {
            idle.took(&row.tenant);
        }
        if let Some(c) = &be.census {
            c.info.active.store(true, Ordering::Relaxed);
            if let (Some(row), Ok(mut t)) = (&self.row, c.info.tenant.lock()) {
                // A row group's connection serves one tenant after another.
                if **t != *row.tenant {
                    *t = row.tenant.clone();
                }
            }
        }
        be
    }

    /// A parked connection its server closed: thrown away, and the server's health checked.
    fn discard_dead(&self, mut be: Box<PooledBackend>) {
        tracing::debug!(server = %self.health.name, "pooled server connection was closed by the server; discarding it");
        self.health.wake_checker();
        be.mark_broken();
        // Not yet counted as this tenant's (see `checked_out`): closed as it is.
        be.tenant_share = None;
        drop(be);
    }

    async fn checkout_shared(
        &self,
        patience: Patience,
        liveness: Liveness,
    ) -> Result<Box<PooledBackend>, PoolError> {
        let Some(share) = &self.share else {
            return self.checkout_unlimited(None, patience, liveness).await;
        };
        let started = tokio::time::Instant::now();
        let (permit, waited_for_share) = match share.clone().try_acquire_owned() {
            Ok(p) => (p, false),
            // Boxed: the wait's state (a timer) would otherwise sit in every checkout's.
            Err(_) => match Box::pin(tokio::time::timeout(
                self.wait,
                share.clone().acquire_owned(),
            ))
            .await
            {
                Ok(Ok(p)) => (p, true),
                _ => return Err(PoolError::Timeout(self.wait)),
            },
        };
        // Waited for its share: the reactor may have taken in more since the client's request.
        let liveness = if waited_for_share {
            Liveness::Peek
        } else {
            liveness
        };
        let mut be = self
            .checkout_unlimited(Some(started), patience, liveness)
            .await?;
        be.tenant_share = Some(permit);
        Ok(be)
    }

    /// `started`: when the client began to wait, if it already has (None: now). A connection
    /// found dead (the server closed it while it was idle) is thrown away and another taken,
    /// so a broken one is never handed out.
    /// A parked connection taken at once is checked as `liveness` says; one the client waited
    /// for (opened, or handed over by a finishing transaction) was not idle before the
    /// client's request arrived, and is always peeked.
    async fn checkout_unlimited(
        &self,
        started: Option<tokio::time::Instant>,
        patience: Patience,
        liveness: Liveness,
    ) -> Result<Box<PooledBackend>, PoolError> {
        loop {
            let (mut be, liveness) = match self.take_parked() {
                Some(be) => (be, liveness),
                // Boxed: its state (bb8's future, timers) would otherwise sit inline in every
                // transaction's state, though the fast path above serves most transactions.
                None => {
                    let started = started.unwrap_or_else(tokio::time::Instant::now);
                    let be = Box::pin(self.checkout_slow(started + self.wait, patience)).await?;
                    (be, Liveness::Peek)
                }
            };
            if !is_dead_as(&mut be, liveness) {
                return Ok(be);
            }
            self.discard_dead(be);
        }
    }

    async fn checkout_slow(
        &self,
        deadline: tokio::time::Instant,
        patience: Patience,
    ) -> Result<Box<PooledBackend>, PoolError> {
        let core = &self.core;
        loop {
            // A changed tenant entry: its waiters move to the new pool (which may name another
            // server, after a failover) rather than wait for this one.
            if self.is_retired() && !self.shared {
                return Err(PoolError::Retired);
            }
            if patience == Patience::FailFast && self.health.is_down() {
                return Err(self.timeout_error());
            }
            // In the queue for a handover in every case: while a connection is being opened
            // for us, one parked meanwhile by a finishing transaction must not pass us by.
            let rx = {
                let Ok(mut idle) = core.idle.lock() else {
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
                    weight: self.tenant.weight,
                    since_ms: coarse_ms(),
                });
                rx
            };
            if core.may_open() {
                match self.open_or_handoff(rx, deadline).await {
                    Got::Conn(be) => return Ok(be),
                    Got::Again => continue,
                    Got::Budget => return Err(self.budget_error()),
                    Got::Failed(e) => match self.after_failure(e, patience, deadline) {
                        Some(e) => return Err(e),
                        None => continue,
                    },
                }
            }
            // Every connection exists and is busy. Closing one wakes a waiter, but look again
            // now and then in any case.
            let wake = (tokio::time::Instant::now() + RECHECK).min(deadline);
            match tokio::time::timeout_at(wake, rx).await {
                Ok(Ok(Handoff::Conn(be))) => return Ok(be),
                Ok(Ok(Handoff::Retry)) | Ok(Err(_)) => continue,
                Err(_) if wake >= deadline => return Err(self.timeout_error()),
                Err(_) => continue,
            }
        }
    }

    /// Opens a connection, unless a finishing transaction hands one over first.
    async fn open_or_handoff(
        &self,
        rx: oneshot::Receiver<Handoff>,
        deadline: tokio::time::Instant,
    ) -> Got {
        let Some(reservation) = self.core.try_reserve() else {
            return Got::Again;
        };
        let mut rx = Some(rx);
        // A slot of the server's budget first: given up if a connection is handed over
        // meanwhile.
        let claim = self.core.claim();
        let acquire = self.core.budget().acquire(&claim, deadline);
        tokio::pin!(acquire);
        let slot = loop {
            tokio::select! {
                slot = &mut acquire => break slot,
                got = async { rx.as_mut().expect("guarded").await }, if rx.is_some() => {
                    rx = None;
                    match got {
                        Ok(Handoff::Conn(be)) => return Got::Conn(be),
                        // A place came free while we wait for a slot: it is someone else's.
                        Ok(Handoff::Retry) => self.core.wake_one(),
                        Err(_) => {}
                    }
                }
            }
        };
        let Some(slot) = slot else {
            return Got::Budget;
        };
        // Then the login. A connection handed over meanwhile is taken, and the login goes on
        // in the background and parks its connection: the server has started a process for
        // it, and throwing that away would only make the pool ask again.
        let mut connect = Box::pin(self.core.clone().connect_reserved(reservation, slot));
        loop {
            tokio::select! {
                opened = &mut connect => {
                    // The login's end woke the first waiting client, perhaps this one: with
                    // its place given up, the next one is told to open another if it still
                    // needs one.
                    drop(rx.take());
                    self.core.wake_one();
                    return match opened {
                        Ok(be) => Got::Conn(be),
                        Err(e) => Got::Failed(e),
                    };
                }
                got = async { rx.as_mut().expect("guarded").await }, if rx.is_some() => {
                    rx = None;
                    match got {
                        Ok(Handoff::Conn(be)) => {
                            let core = self.core.clone();
                            tokio::spawn(async move {
                                if let Ok(be) = connect.await {
                                    core.park_idle(be, None);
                                }
                            });
                            return Got::Conn(be);
                        }
                        Ok(Handoff::Retry) => self.core.wake_one(),
                        Err(_) => {}
                    }
                }
            }
        }
    }

    /// A connection attempt failed. A refusal (bad password, no such database) is the client's
    /// answer at once. An unreachable server is waited for until the deadline, while the
    /// server's gate spaces out the attempts; unless the caller cannot wait.
    fn after_failure(
        &self,
        e: BackendError,
        patience: Patience,
        deadline: tokio::time::Instant,
    ) -> Option<PoolError> {
        if !e.is_unreachable() || patience == Patience::FailFast {
            return Some(PoolError::Backend(e));
        }
        (tokio::time::Instant::now() >= deadline).then(|| self.timeout_error())
    }

    /// What a client that waited for its server's budget in vain is told.
    fn budget_error(&self) -> PoolError {
        let v = self.core.budget().view();
        PoolError::Budget {
            wait: self.wait,
            server: self.health.name.clone(),
            limit: v.limit.unwrap_or(1),
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
    /// longest-waiting client if there is one, else parked. Closed instead when it outlived
    /// `server_lifetime`, or when another tenant waiting for the server's budget should have
    /// the slot (see `budget`).
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
        if self.core.should_close(&be) {
            self.discard(be);
            return;
        }
        self.core.park_idle(be, self.row.as_ref());
        // A tenant waits for the server's budget: the longest-idle connection on the server
        // (perhaps this one, if nobody here wanted it) makes room.
        self.core.budget().make_room();
    }

    /// Closes a connection that must not be reused; its slot goes to a waiting client of this
    /// pool, or of the server's budget.
    pub fn discard(&self, mut be: Box<PooledBackend>) {
        be.tenant_share = None;
        if let (Some(row), Ok(mut idle)) = (&self.row, self.core.idle.lock()) {
            idle.gave_back(&row.tenant);
        }
        drop(be);
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
        // Idle connections close now; busy ones close when their clients are done. Waiting
        // clients go on to the successor.
        self.core.drain();
    }

    pub fn tenant(&self) -> &Arc<Tenant> {
        &self.tenant
    }

    /// Row tier: the binding a connection needs before it serves this pool's sessions.
    pub fn row(&self) -> Option<&RowBinding> {
        self.row.as_ref()
    }

    /// Closes idle connections past their time (see `Core::close_idle`), and runs one tick
    /// of the demand-following loop of this pool and its replicas'.
    fn maintain(&self, now_ms: u64) {
        if !self.shared {
            self.core.close_idle();
            let waiting = self.load().waiting as u32;
            if let Some(r) = self.core.autoscale(now_ms, waiting) {
                self.stats.note_resize(r.to);
                tracing::info!(
                    tenant = %self.tenant.id,
                    server = %self.health.name,
                    from = r.from,
                    to = r.to,
                    reason = r.reason.as_str(),
                    "pool target resized"
                );
            }
            if !self.is_retired() {
                self.core.fill(self.core.min, None);
            }
        }
        for p in self.replica_pools() {
            p.maintain(now_ms);
        }
    }

    /// The tenant's read replicas, when it has any.
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

    /// Clients of this pool now, and connections (all, idle).
    pub fn load(&self) -> PoolLoad {
        let (parked, waiting, oldest_wait_ms) = match self.core.idle.lock() {
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
            connections: self.core.open_count() as usize,
            idle: parked,
            waiting,
            oldest_wait_ms,
        }
    }

    pub fn max_size(&self) -> u32 {
        self.core.max_size
    }

    /// How many connections the demand-following loop keeps, and why.
    pub fn target(&self) -> (u32, &'static str) {
        (self.core.target(), self.core.target_reason())
    }

    /// The connection budget of this pool's server.
    pub fn budget(&self) -> &Arc<ServerBudget> {
        self.core.budget()
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

/// What opening a connection (or a handover meanwhile) came to.
enum Got {
    Conn(Box<PooledBackend>),
    /// The pool filled up meanwhile: queue for a handover.
    Again,
    Budget,
    Failed(BackendError),
}

/// How often a waiting client looks at the pool again in case a slot was freed silently.
const RECHECK: Duration = Duration::from_secs(1);

pub struct PoolClientGuard(Arc<TenantPool>);

impl PoolClientGuard {
    /// The pool this client is counted in.
    pub fn pool(&self) -> &Arc<TenantPool> {
        &self.0
    }
}

impl Drop for PoolClientGuard {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// All pools of this proxy.
pub struct Pools {
    pools: DashMap<PoolKey, Arc<TenantPool>>,
    settings: PoolConfig,
    /// What row-tier context keys derive from.
    row_secret: Option<RowSecret>,
    /// Connections shared by row tenants, by server, database, backend role and defaults.
    groups: DashMap<String, Arc<Core>>,
    /// Every server's connection budget, by address, shared by all pools on it.
    budgets: DashMap<String, Arc<ServerBudget>>,
    /// Row tier: restores the shared login role's password when a tenant changed it.
    role_repair: Option<RoleRepair>,
    /// Every server's health, shared by all pools on it.
    health: Arc<HealthBook>,
    health_settings: HealthConfig,
    stats: DashMap<PoolKey, Arc<PoolStats>>,
    metrics: Arc<stats::Metrics>,
    census: Arc<crate::backend::census::Census>,
    pauses: Arc<Pauses>,
    listen_hubs: Arc<listen_hub::ListenHubs>,
}

impl Pools {
    pub fn new(settings: PoolConfig, row_secret: Option<RowSecret>) -> Self {
        let metrics: Arc<stats::Metrics> = Arc::default();
        let listen_hubs = Arc::new(listen_hub::ListenHubs::with_gauge(metrics.listen.clone()));
        Pools {
            pools: DashMap::new(),
            settings,
            row_secret,
            groups: DashMap::new(),
            budgets: DashMap::new(),
            role_repair: None,
            health: HealthBook::new(),
            health_settings: HealthConfig::default(),
            stats: DashMap::new(),
            metrics,
            census: Arc::default(),
            pauses: Arc::default(),
            listen_hubs,
        }
    }

    /// The LISTEN hubs running now.
    pub fn listen_hubs(&self) -> &Arc<listen_hub::ListenHubs> {
        &self.listen_hubs
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
        if !tenant.replicas.is_empty() {
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
        let row_tier = tenant.tier.rules().shared_connections;
        let health = self.health.of(server);
        let spec = ConnectSpec {
            health: health.clone(),
            server: server.clone(),
            database: tenant.database.clone(),
            credentials: user.backend.clone(),
            params: crate::tenancy::tier::backend_startup_params(
                tenant.tier,
                tenant.schema.as_deref(),
                &tenant.params,
            ),
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
        let budget = self.budget_of(server, &health.addr);
        let core_settings = |max_size: u32, min: u32, weight: u32| CoreSettings {
            max_size,
            min,
            weight,
            idle_timeout: Duration::from_secs(
                tenant
                    .server_idle_timeout
                    .unwrap_or(s.server_idle_timeout)
                    .max(1),
            ),
            lifetime: Duration::from_secs(s.server_lifetime.max(1)),
        };
        let manager = |spec: ConnectSpec| {
            BackendManager::new(
                spec,
                self.census.clone(),
                Arc::from(tenant.id.as_str()),
                Arc::from(user.name.as_str()),
            )
        };
        let core = if row_tier {
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
                .entry(key.clone())
                .or_insert_with(|| {
                    Core::new(
                        manager(spec.clone()),
                        budget.clone(),
                        Arc::from(format!(
                            "row group {}/{}",
                            spec.database, spec.credentials.user
                        )),
                        core_settings(s.default_size, 0, tenant.weight),
                    )
                })
                .clone()
        } else {
            Core::new(
                manager(spec.clone()),
                budget,
                Arc::from(tenant.id.as_str()),
                core_settings(
                    tenant.pool_size,
                    tenant.min_idle.unwrap_or(0),
                    tenant.weight,
                ),
            )
        };
        if !row_tier {
            // A tenant coming back after an idle spell finds its minimum open.
            core.fill(core.min.max(s.prewarm.min(tenant.pool_size)), None);
        }
        TenantPool {
            tenant: tenant.clone(),
            retired: AtomicBool::new(false),
            successor: std::sync::Mutex::new(None),
            core,
            wait,
            names: DashMap::new(),
            parsed: DashMap::new(),
            row: row_tier.then(|| RowBinding {
                tenant: Arc::from(tenant.id.as_str()),
            }),
            database: Arc::from(tenant.database.as_str()),
            session_features: user.session_features.unwrap_or(tenant.session_features),
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
            listen_hubs: self.listen_hubs.clone(),
        }
    }

    /// The connection budget of `server`, made on first use; a changed configured limit
    /// applies to the existing one. Keyed by address (`addr`), as its health record is.
    fn budget_of(&self, server: &Server, addr: &str) -> Arc<ServerBudget> {
        let configured = server.max_connections.map(|n| n as usize);
        if let Some(b) = self.budgets.get(addr) {
            if let Some(n) = configured {
                if b.view().limit != Some(n) {
                    b.set_configured(n);
                }
            }
            return b.clone();
        }
        self.budgets
            .entry(addr.to_string())
            .or_insert_with(|| {
                Arc::new(ServerBudget::new(
                    server.name.clone(),
                    configured,
                    self.settings.server_reserve as usize,
                ))
            })
            .clone()
    }

    /// Every server's budget, by address.
    pub fn budgets(&self) -> Vec<(String, Arc<ServerBudget>)> {
        let mut v: Vec<_> = self
            .budgets
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Drops pools that have had no client and no connection for `idle`, so thousands of
    /// quiet tenants cost nothing. Returns how many were dropped.
    pub fn sweep(&self, idle: Duration) -> usize {
        let before = self.pools.len();
        self.pools.retain(|_, p| p.idle_for() < idle);
        // A row group no pool uses any more, with no connection left.
        self.groups
            .retain(|_, g| Arc::strong_count(g) > 1 || g.open_count() > 0);
        before - self.pools.len()
    }

    /// Once a second: idle connections past their time close, minimums are refilled, and
    /// each pool's target follows its demand.
    pub fn maintain(&self) {
        let now = coarse_ms();
        for p in self.pools.iter() {
            p.maintain(now);
        }
        // Row groups: idle connections close, the weight is their tenants' together, and a
        // group no pool uses any more, with no connection left, goes.
        let mut weights: std::collections::HashMap<*const Core, u32> = Default::default();
        for p in self.pools.iter().filter(|p| p.shared) {
            *weights.entry(Arc::as_ptr(&p.core)).or_default() += p.tenant.weight.max(1);
        }
        for g in self.groups.iter() {
            g.close_idle();
            if let Some(w) = weights.get(&Arc::as_ptr(g.value())) {
                g.set_weight(*w);
            }
        }
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
    use super::core::{Idle, MAX_AFFINITY_WAIT_MS};
    use super::*;

    /// A waiting client of `tenant` that started waiting `ago_ms` ago; its receiver tells
    /// whether it was served.
    fn waiter(idle: &mut Idle, tenant: &str, ago_ms: u64) -> oneshot::Receiver<Handoff> {
        let (tx, rx) = oneshot::channel();
        idle.waiters.push_back(Waiter {
            tx,
            tenant: Some(Arc::from(tenant)),
            weight: 1,
            since_ms: coarse_ms().saturating_sub(ago_ms),
        });
        rx
    }

    #[test]
    fn a_freed_row_connection_goes_to_the_tenant_using_the_fewest() {
        let mut idle = Idle::default();
        let noisy: Arc<str> = Arc::from("noisy");
        for _ in 0..5 {
            idle.took(&noisy);
        }
        let mut first = waiter(&mut idle, "noisy", 50);
        let mut quiet = waiter(&mut idle, "quiet", 0);
        serve(&mut idle, Some("noisy"));
        assert!(quiet.try_recv().is_ok(), "the tenant using none goes first");
        assert!(first.try_recv().is_err());
    }

    #[test]
    fn a_row_tenant_with_more_weight_may_use_more_connections() {
        let mut idle = Idle::default();
        let (heavy, light): (Arc<str>, Arc<str>) = (Arc::from("heavy"), Arc::from("light"));
        for _ in 0..3 {
            idle.took(&heavy);
        }
        idle.took(&light);
        idle.took(&light);
        let (tx, mut heavy_rx) = oneshot::channel();
        idle.waiters.push_back(Waiter {
            tx,
            tenant: Some(heavy.clone()),
            weight: 3,
            since_ms: coarse_ms(),
        });
        let mut light_rx = waiter(&mut idle, "light", 0);
        serve(&mut idle, None);
        assert!(
            heavy_rx.try_recv().is_ok(),
            "3 per weight 3 is less than 2 per weight 1"
        );
        assert!(light_rx.try_recv().is_err());
    }

    #[test]
    fn connections_given_back_no_longer_count() {
        let mut idle = Idle::default();
        let a: Arc<str> = Arc::from("a");
        idle.took(&a);
        idle.took(&a);
        idle.gave_back("a");
        idle.gave_back("a");
        idle.gave_back("a");
        let mut b = waiter(&mut idle, "b", 10);
        let mut a_rx = waiter(&mut idle, "a", 0);
        serve(&mut idle, None);
        assert!(b.try_recv().is_ok(), "equal use: the longest waiting");
        assert!(a_rx.try_recv().is_err());
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
