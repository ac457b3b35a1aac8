//! A pool's connections: how many are open, the idle ones, and the clients waiting for one.
//!
//! Hand-written rather than bb8: the server budget has to close a particular idle connection
//! of another tenant's pool, count every pool's connections against one limit before they are
//! opened, and let a pool give a connection back instead of reusing it, none of which bb8's
//! per-pool API offers. What bb8 did here (a size cap, an idle timeout, a lifetime, a minimum
//! kept open) is a few lines each below.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::oneshot;

use super::autoscale::{Autoscaler, Resize, Sample, SURPLUS_IDLE_MS};
use super::budget::{BudgetSlot, Claim, Evict, ServerBudget};
use super::manager::BackendManager;
use crate::backend::health::coarse_ms;
use crate::backend::{BackendConn, BackendError};
use crate::tenancy::row_context::RowBinding;

/// What the server allows pgtenant, read once per server over its first connection.
const LIMIT_SQL: &str = "SELECT current_setting('max_connections')::int \
     - current_setting('superuser_reserved_connections')::int \
     - COALESCE(current_setting('reserved_connections', true)::int, 0)";

pub struct Core {
    pub(super) idle: Mutex<Idle>,
    /// Connections open or being opened.
    open: AtomicU32,
    /// Connections being opened: at most one at a time, as PgBouncer does. A burst of clients
    /// is served by the connections that finish their transactions meanwhile rather than by
    /// as many new server processes, each costing a login (and under a full budget, another
    /// pool's connection).
    opening: AtomicU32,
    pub(super) max_size: u32,
    pub(super) min: u32,
    manager: BackendManager,
    budget: Arc<ServerBudget>,
    /// Whose slots these are in the budget: a tenant, or a row group.
    account: Arc<str>,
    weight: AtomicU32,
    idle_timeout_ms: u64,
    lifetime: Duration,
    scaler: Mutex<Autoscaler>,
    target: AtomicU32,
}

/// A connection's place in its pool and its server budget.
pub struct Lease {
    core: Weak<Core>,
    slot: BudgetSlot,
}

impl crate::backend::connection::ConnectionLease for Lease {
    /// The connection is closing; its slot comes back when the server has ended it.
    fn closing(&mut self) {
        self.slot.closing();
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lease")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(core) = self.core.upgrade() {
            core.open.fetch_sub(1, Ordering::AcqRel);
            core.wake_one();
        }
    }
}

/// A counted connection not yet opened; dropping it uncounts it.
pub(super) struct Reservation {
    core: Arc<Core>,
    armed: bool,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.armed {
            self.core.open.fetch_sub(1, Ordering::AcqRel);
        }
        self.core.opening.fetch_sub(1, Ordering::AcqRel);
        // The next waiting client may open the next connection, if it still needs one.
        self.core.wake_one();
    }
}

pub struct CoreSettings {
    pub max_size: u32,
    pub min: u32,
    pub weight: u32,
    pub idle_timeout: Duration,
    pub lifetime: Duration,
}

impl Core {
    pub fn new(
        manager: BackendManager,
        budget: Arc<ServerBudget>,
        account: Arc<str>,
        s: CoreSettings,
    ) -> Arc<Core> {
        let min = s.min.min(s.max_size);
        let core = Arc::new(Core {
            idle: Mutex::default(),
            open: AtomicU32::new(0),
            opening: AtomicU32::new(0),
            max_size: s.max_size,
            min,
            manager,
            budget: budget.clone(),
            account,
            weight: AtomicU32::new(s.weight.max(1)),
            idle_timeout_ms: s.idle_timeout.as_millis() as u64,
            lifetime: s.lifetime,
            scaler: Mutex::new(Autoscaler::new(min, s.max_size)),
            target: AtomicU32::new(min),
        });
        let weak: Weak<Core> = Arc::downgrade(&core);
        budget.register(weak);
        core
    }

    pub fn open_count(&self) -> u32 {
        self.open.load(Ordering::Acquire)
    }

    pub fn budget(&self) -> &Arc<ServerBudget> {
        &self.budget
    }

    pub fn set_weight(&self, w: u32) {
        self.weight.store(w.max(1), Ordering::Relaxed);
    }

    pub fn target(&self) -> u32 {
        self.target.load(Ordering::Relaxed)
    }

    /// Why the target is what it is.
    pub fn target_reason(&self) -> &'static str {
        self.scaler
            .lock()
            .map_or("minimum", |s| s.reason().as_str())
    }

    /// Counts one more connection if the pool may have it and opens no other now.
    pub(super) fn try_reserve(self: &Arc<Self>) -> Option<Reservation> {
        self.opening
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        let counted = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_size).then_some(n + 1)
            })
            .is_ok();
        if !counted {
            self.opening.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Reservation {
            core: self.clone(),
            armed: true,
        })
    }

    /// What this pool asks the server's budget for.
    pub(super) fn claim(&self) -> Claim {
        Claim {
            account: self.account.clone(),
            weight: self.weight.load(Ordering::Relaxed),
            min: self.min,
        }
    }

    /// Whether the pool may open another connection now.
    pub fn may_open(&self) -> bool {
        self.open_count() < self.max_size && self.opening.load(Ordering::Acquire) == 0
    }

    /// Tells one waiting client that a slot came free (it opens a connection itself).
    pub fn wake_one(&self) {
        if let Ok(mut idle) = self.idle.lock() {
            while let Some(w) = idle.waiters.pop_front() {
                if w.tx.send(Handoff::Retry).is_ok() {
                    break;
                }
            }
        }
    }

    /// Reserves and opens a connection: a place in the pool, then a slot of the server's
    /// budget (waiting in its fair queue until `deadline`), then the login. None when the
    /// pool is full, the budget stayed full or the login failed (the next try will tell).
    async fn open_new(
        self: &Arc<Self>,
        deadline: tokio::time::Instant,
    ) -> Option<Box<BackendConn>> {
        let reservation = self.try_reserve()?;
        let slot = self.budget.acquire(&self.claim(), deadline).await?;
        self.clone().connect_reserved(reservation, slot).await.ok()
    }

    /// Logs in on a reserved place with a budget slot. Owns what it needs, so a caller that
    /// no longer wants the connection can let it finish in the background (and park it)
    /// rather than waste the server's login.
    pub(super) async fn connect_reserved(
        self: Arc<Self>,
        mut reservation: Reservation,
        slot: BudgetSlot,
    ) -> Result<Box<BackendConn>, BackendError> {
        let mut conn = self.manager.connect().await?;
        if self.budget.needs_limit() {
            match conn.query_value(LIMIT_SQL).await {
                Ok(Some(v)) => match v.parse::<usize>() {
                    Ok(n) => self.budget.learn_limit(n),
                    Err(_) => {
                        tracing::warn!(server = %self.budget.name, value = %v, "could not read the server's max_connections")
                    }
                },
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(server = %self.budget.name, error = %e, "could not read the server's max_connections");
                    if conn.is_broken() {
                        return Err(e);
                    }
                }
            }
        }
        reservation.armed = false;
        conn.lease = Some(Box::new(Lease {
            core: Arc::downgrade(&self),
            slot,
        }));
        Ok(Box::new(conn))
    }

    /// Keeps `min` connections open, in the background: opened ones are parked.
    pub fn fill(self: &Arc<Self>, want: u32, row: Option<RowBinding>) {
        let want = want.min(self.max_size);
        if self.open_count() >= want || self.opening.load(Ordering::Acquire) > 0 {
            return;
        }
        let core = self.clone();
        tokio::spawn(async move {
            // One at a time, like every other opening; stops at the first failure (the next
            // tick tries again).
            while core.open_count() < want {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                match core.open_new(deadline).await {
                    Some(be) => core.park_idle(be, row.as_ref()),
                    None => break,
                }
            }
        });
    }

    /// Parks an idle connection, or hands it to a waiting client. `row`: the row tenant that
    /// was using it (None for a connection nobody used yet).
    pub(super) fn park_idle(&self, be: Box<BackendConn>, row: Option<&RowBinding>) {
        let stale = match self.idle.lock() {
            Ok(mut idle) => {
                if let Some(row) = row {
                    idle.gave_back(&row.tenant);
                }
                let mut be = be;
                while let Some(w) = idle.next_waiter(be.bound_tenant()) {
                    match w.send(Handoff::Conn(be)) {
                        Ok(()) => return,
                        Err(Handoff::Conn(back)) => be = back,
                        Err(Handoff::Retry) => return,
                    }
                }
                idle.parked.push((be, coarse_ms()));
                None::<Box<BackendConn>>
            }
            Err(_) => Some(be),
        };
        drop(stale);
    }

    /// Whether a connection at the end of a transaction should close instead of serving the
    /// pool's next one: it outlived `server_lifetime`, or a tenant waiting for the server's
    /// budget holds far less than this pool's tenant (see `Ledger::should_yield`); the pool's
    /// minimum stays.
    pub(super) fn should_close(&self, be: &BackendConn) -> bool {
        if u128::from(be.coarse_age_ms()) >= self.lifetime.as_millis() {
            return true;
        }
        self.budget.has_waiters()
            && self.open_count() > self.min
            && self.budget.should_yield(&self.account)
    }

    /// Closes connections idle longer than the idle timeout, or than `SURPLUS_IDLE_MS` beyond
    /// the target, or past their lifetime; keeps the minimum.
    pub fn close_idle(&self) {
        let now = coarse_ms();
        let target = self.target().max(self.min);
        let closing: Vec<Box<BackendConn>> = match self.idle.lock() {
            Ok(mut idle) => {
                let mut out = Vec::new();
                let mut open = self.open_count();
                let mut i = 0;
                while i < idle.parked.len() {
                    let (be, at) = &idle.parked[i];
                    let idle_ms = now.saturating_sub(*at);
                    let expired = be.age() >= self.lifetime;
                    let timed_out = idle_ms >= self.idle_timeout_ms && open > self.min;
                    let surplus = idle_ms >= SURPLUS_IDLE_MS && open > target;
                    if expired || timed_out || surplus {
                        out.push(idle.parked.remove(i).0);
                        open = open.saturating_sub(1);
                    } else {
                        i += 1;
                    }
                }
                out
            }
            Err(_) => Vec::new(),
        };
        drop(closing);
    }

    /// One tick of the demand-following loop.
    pub fn autoscale(&self, now_ms: u64, waiting: u32) -> Option<Resize> {
        let parked = self.idle.lock().map_or(0, |i| i.parked.len() as u32);
        let opening = self.opening.load(Ordering::Acquire);
        let busy = self.open_count().saturating_sub(parked + opening);
        let mut s = self.scaler.lock().ok()?;
        let r = s.observe(Sample {
            now_ms,
            busy,
            waiting,
        });
        self.target.store(s.target(), Ordering::Relaxed);
        r
    }

    /// Drops every parked connection and tells waiting clients to look again (retired pool).
    pub fn drain(&self) {
        let (parked, waiters) = match self.idle.lock() {
            Ok(mut i) => (
                std::mem::take(&mut i.parked),
                std::mem::take(&mut i.waiters),
            ),
            Err(_) => return,
        };
        drop(parked);
        for w in waiters {
            let _ = w.tx.send(Handoff::Retry);
        }
    }
}

impl Evict for Core {
    fn oldest_idle(&self) -> Option<(u32, u64)> {
        let open = self.open_count();
        if open <= self.min {
            return None;
        }
        let surplus = open.saturating_sub(self.target().max(self.min));
        self.idle
            .lock()
            .ok()
            .and_then(|i| i.parked.first().map(|(_, t)| (surplus, *t)))
    }

    fn evict_oldest(&self) -> bool {
        if self.open_count() <= self.min {
            return false;
        }
        let be = match self.idle.lock() {
            Ok(mut i) if !i.parked.is_empty() => Some(i.parked.remove(0).0),
            _ => None,
        };
        be.is_some()
    }
}

/// Each with the `coarse_ms` time it was parked.
pub(super) type Parked = Vec<(Box<BackendConn>, u64)>;

/// What a finishing transaction hands a waiting client.
pub(super) enum Handoff {
    Conn(Box<BackendConn>),
    /// A slot was freed (a connection closed): try to open one.
    Retry,
}

#[derive(Default)]
pub(super) struct Idle {
    /// Most recently used last.
    pub(super) parked: Parked,
    /// Clients waiting for a connection, longest-waiting first.
    pub(super) waiters: std::collections::VecDeque<Waiter>,
    /// Row group: connections each tenant is using now, for fairness between its tenants.
    in_use: std::collections::HashMap<Arc<str>, u32>,
}

pub(super) struct Waiter {
    pub(super) tx: oneshot::Sender<Handoff>,
    /// Row tier: the tenant the client needs the connection bound to.
    pub(super) tenant: Option<Arc<str>>,
    /// Row tier: the tenant's weight.
    pub(super) weight: u32,
    /// When it started waiting (`coarse_ms`).
    pub(super) since_ms: u64,
}

/// Row group: how many of the longest-waiting clients a freed connection's next user is
/// chosen among (by fairness between tenants); bounds the work under the lock.
const FAIR_SCAN: usize = 64;

/// Row tier: a waiting client of the tenant a freed connection is bound to is served first
/// (no switch needed), among those fairness allows, unless the longest-waiting client has
/// waited this long (ms): a switch costs about as much as a few transactions.
pub(super) const MAX_AFFINITY_WAIT_MS: u64 = 5;

/// How many of the most recently parked connections a row tenant looks through for one
/// already bound to it (string compares under the idle lock: well under a microsecond).
const AFFINITY_SCAN: usize = 256;

impl Idle {
    /// A row tenant's client took one of the group's connections.
    pub(super) fn took(&mut self, tenant: &Arc<str>) {
        *self.in_use.entry(tenant.clone()).or_default() += 1;
    }

    /// A row tenant gave one back.
    pub(super) fn gave_back(&mut self, tenant: &str) {
        if let Some(n) = self.in_use.get_mut(tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.in_use.remove(tenant);
            }
        }
    }

    /// The client to hand a freed connection bound to `bound` to. Outside row groups: the
    /// longest-waiting one. In a row group, among the first `FAIR_SCAN`: the one whose tenant
    /// uses the fewest of the group's connections per unit of weight (a tenant with a hundred
    /// busy clients does not make the others queue behind them); among those, one of the
    /// tenant the connection is bound to (no switch needed) unless the longest-waiting has
    /// waited `MAX_AFFINITY_WAIT_MS`; then the longest-waiting.
    pub(super) fn next_waiter(&mut self, bound: Option<&str>) -> Option<oneshot::Sender<Handoff>> {
        while self.waiters.front().is_some_and(|w| w.tx.is_closed()) {
            self.waiters.pop_front();
        }
        let front = self.waiters.front()?;
        if front.tenant.is_none() {
            return self.waiters.pop_front().map(|w| w.tx);
        }
        let patient = coarse_ms().saturating_sub(front.since_ms) < MAX_AFFINITY_WAIT_MS;
        let in_use = |w: &Waiter| {
            w.tenant
                .as_ref()
                .and_then(|t| self.in_use.get(t))
                .copied()
                .unwrap_or(0) as u64
        };
        let mut best: Option<(usize, u64, u64, bool)> = None;
        for (i, w) in self.waiters.iter().take(FAIR_SCAN).enumerate() {
            if w.tx.is_closed() {
                continue;
            }
            let (used, weight) = (in_use(w), u64::from(w.weight.max(1)));
            let mine = patient && bound.is_some() && w.tenant.as_deref() == bound;
            let better = match best {
                None => true,
                Some((_, bu, bw, bmine)) => {
                    let (a, b) = (used * bw, bu * weight);
                    a < b || (a == b && mine && !bmine)
                }
            };
            if better {
                best = Some((i, used, weight, mine));
            }
        }
        let i = best.map_or(0, |b| b.0);
        self.waiters.remove(i).map(|w| w.tx)
    }

    /// The most recently parked connection (so surplus ones grow idle and close); for a row
    /// tenant one already bound to it (no switch needed), else the one parked longest, whose
    /// tenant is the least likely to want it back soon.
    pub(super) fn take(&mut self, row: Option<&RowBinding>) -> Option<Box<BackendConn>> {
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
