//! A connection budget per PostgreSQL server, shared by every pool of every tenant on it, and
//! the fair queue in front of it.
//!
//! Each server (a primary and each replica separately) has a number of backend connections
//! pgtenant's pools may hold together: `max_connections` of its `[[servers]]` entry, else the
//! server's own `max_connections` minus its reserved slots minus `pool.server_reserve`, read over
//! the first connection. The control plane (health checks, provisioning, migrations, usage
//! flush) is not counted: it lives in that reserve.
//!
//! A slot is taken before a connection is opened and given back when it closes, so the budget
//! holds during bursts, reloads (old and new pools share it) and failovers. When it is full, a
//! request waits in a queue ordered by weighted fairness across tenants (the `Ledger`): the
//! tenant whose slots per unit of weight are fewest goes first; a tenant below its
//! `min_connections` goes before all; within a tenant, first come first served. Meanwhile
//! idle connections of other pools are closed to make room (longest idle first), and tenants
//! holding more than their fair share give a connection back at the end of a transaction
//! (`should_yield`) instead of passing it to their own next client.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::oneshot;

/// The pure bookkeeping of one server's budget: who holds how many slots and who waits.
/// `W` is what a waiter is woken with (a channel in the proxy, a marker in tests).
#[derive(Debug)]
pub struct Ledger<W> {
    /// None until the server's own limit is known; until then one slot at a time (the first
    /// connection is the one that finds the limit out).
    limit: Option<usize>,
    used: usize,
    accounts: HashMap<Arc<str>, Account<W>>,
    waiting: usize,
    seq: u64,
    /// The fairest waiting account, found once per change of the ledger (connections open
    /// and close far less often than transactions end and ask `should_yield`).
    fairest: Option<Option<Arc<str>>>,
}

#[derive(Debug)]
struct Account<W> {
    held: usize,
    weight: u32,
    min: u32,
    /// (ticket, waiter), oldest first.
    queue: VecDeque<(u64, W)>,
}

/// Who asks for a slot: a tenant (or a row group) with its weight and reserved minimum.
#[derive(Debug, Clone)]
pub struct Claim {
    pub account: Arc<str>,
    pub weight: u32,
    pub min: u32,
}

impl<W> Ledger<W> {
    pub fn new(limit: Option<usize>) -> Self {
        Ledger {
            limit,
            used: 0,
            accounts: HashMap::new(),
            waiting: 0,
            seq: 0,
            fairest: None,
        }
    }

    pub fn limit(&self) -> Option<usize> {
        self.limit
    }

    pub fn used(&self) -> usize {
        self.used
    }

    pub fn waiting(&self) -> usize {
        self.waiting
    }

    pub fn held(&self, account: &str) -> usize {
        self.accounts.get(account).map_or(0, |a| a.held)
    }

    fn capacity(&self) -> usize {
        self.limit.unwrap_or(1)
    }

    fn account(&mut self, c: &Claim) -> &mut Account<W> {
        self.fairest = None;
        let a = self.accounts.entry(c.account.clone()).or_insert(Account {
            held: 0,
            weight: 1,
            min: 0,
            queue: VecDeque::new(),
        });
        a.weight = c.weight.max(1);
        a.min = c.min;
        a
    }

    /// A slot at once (Ok), or the waiter queued under a ticket (Err) that `cancel` takes back.
    /// Nobody passes a queue that is not empty: freed slots go to the queue first.
    pub fn request(&mut self, c: &Claim, waiter: W) -> Result<W, u64> {
        if self.used < self.capacity() && self.waiting == 0 {
            self.used += 1;
            self.account(c).held += 1;
            return Ok(waiter);
        }
        self.seq += 1;
        let ticket = self.seq;
        self.account(c).queue.push_back((ticket, waiter));
        self.waiting += 1;
        Err(ticket)
    }

    /// Takes a queued waiter back (it gave up); false if it was already granted a slot.
    pub fn cancel(&mut self, account: &str, ticket: u64) -> bool {
        let Some(a) = self.accounts.get_mut(account) else {
            return false;
        };
        let Some(i) = a.queue.iter().position(|(t, _)| *t == ticket) else {
            return false;
        };
        a.queue.remove(i);
        self.fairest = None;
        self.waiting -= 1;
        self.forget_if_empty(account);
        true
    }

    /// A slot of `account` is free again (its connection closed, or never opened).
    pub fn release(&mut self, account: &str) {
        self.fairest = None;
        if let Some(a) = self.accounts.get_mut(account) {
            a.held = a.held.saturating_sub(1);
            self.used = self.used.saturating_sub(1);
        }
        self.forget_if_empty(account);
    }

    fn forget_if_empty(&mut self, account: &str) {
        if self
            .accounts
            .get(account)
            .is_some_and(|a| a.held == 0 && a.queue.is_empty())
        {
            self.accounts.remove(account);
        }
    }

    /// The limit became known (or changed on reload).
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = Some(limit.max(1));
    }

    /// Hands free slots to waiters, fairest first; returns (account, waiter) for each. The
    /// caller wakes them (and releases a slot whose waiter is gone).
    pub fn grant(&mut self) -> Vec<(Arc<str>, W)> {
        let mut out = Vec::new();
        while self.used < self.capacity() && self.waiting > 0 {
            self.fairest = None;
            let Some(next) = self.fairest_waiting() else {
                break;
            };
            let Some(a) = self.accounts.get_mut(&next) else {
                break;
            };
            let Some((_, w)) = a.queue.pop_front() else {
                break;
            };
            a.held += 1;
            self.used += 1;
            self.waiting -= 1;
            out.push((next, w));
        }
        self.fairest = None;
        out
    }

    /// The waiting account to serve next: one below its reserved minimum first, then the one
    /// with the fewest slots per unit of weight, then the one waiting longest.
    fn fairest_waiting(&self) -> Option<Arc<str>> {
        self.accounts
            .iter()
            .filter(|(_, a)| !a.queue.is_empty())
            .min_by(|(_, a), (_, b)| {
                let below = |x: &Account<W>| (x.held as u64) >= u64::from(x.min);
                below(a)
                    .cmp(&below(b))
                    .then_with(|| {
                        (a.held as u64 * u64::from(b.weight))
                            .cmp(&(b.held as u64 * u64::from(a.weight)))
                    })
                    .then_with(|| a.queue[0].0.cmp(&b.queue[0].0))
            })
            .map(|(k, _)| k.clone())
    }

    /// Whether `account` should give a connection back rather than keep it for its own next
    /// transaction: another account waits below its reserved minimum, or would hold, after
    /// the swap, at most half the slots per weight this one holds now. The factor of two
    /// keeps tenants with similar shares from trading connections back and forth (each trade
    /// costs a server login); it is gross unfairness, a noisy tenant holding the budget while
    /// others wait with nothing, that this corrects. Freed slots go to the fairest waiter in
    /// any case. An account never yields below its own minimum.
    /// Only the fairest waiting account is looked at (the one a freed slot would go to): if
    /// it does not qualify, no other does. Cached, so this is O(1) per transaction however
    /// many tenants there are.
    pub fn should_yield(&mut self, account: &str) -> bool {
        if self.waiting == 0 {
            return false;
        }
        let Some(me) = self.accounts.get(account) else {
            return false;
        };
        if me.held <= me.min as usize {
            return false;
        }
        let (held, weight) = (me.held as u64, u64::from(me.weight));
        let fairest = match &self.fairest {
            Some(f) => f.clone(),
            None => {
                let f = self.fairest_waiting();
                self.fairest = Some(f.clone());
                f
            }
        };
        let Some(o) = fairest.filter(|f| &**f != account) else {
            return false;
        };
        self.accounts.get(&o).is_some_and(|o| {
            o.held < o.min as usize
                || 2 * (o.held as u64 + 1) * weight <= held * u64::from(o.weight)
        })
    }
}

/// Something holding idle connections on a server that the budget may close to make room.
pub trait Evict: Send + Sync {
    /// How many connections it holds beyond its target, and when its longest-idle connection
    /// that may be closed was parked (`coarse_ms`); None without one.
    fn oldest_idle(&self) -> Option<(u32, u64)>;
    /// Closes that connection; true if one was closed.
    fn evict_oldest(&self) -> bool;
}

/// One server's budget, shared by all pools on it.
pub struct ServerBudget {
    pub name: String,
    ledger: Mutex<Ledger<oneshot::Sender<()>>>,
    /// Mirrors the ledger's queue length: the end of every transaction looks at it, lock-free.
    waiting: AtomicUsize,
    /// Slots whose connections are closing (waiting for the server to end the session): room
    /// already on its way, so no further connection is closed for the same waiter.
    freeing: AtomicUsize,
    /// Configured limit (`servers.max_connections`); None: read the server's own.
    configured: Option<usize>,
    /// Subtracted from the server's own limit when it is read.
    reserve: usize,
    peak: AtomicUsize,
    evictors: Mutex<Vec<Weak<dyn Evict>>>,
}

impl std::fmt::Debug for ServerBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerBudget")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// What a budget looks like now, for SHOW SERVERS-like listings and metrics.
#[derive(Debug, Clone, Copy)]
pub struct BudgetView {
    pub limit: Option<usize>,
    pub used: usize,
    pub waiting: usize,
    pub peak: usize,
}

/// A held slot; dropping it gives the slot back and wakes the fairest waiter.
#[derive(Debug)]
pub struct BudgetSlot {
    budget: Arc<ServerBudget>,
    account: Arc<str>,
    closing: bool,
}

impl Drop for BudgetSlot {
    fn drop(&mut self) {
        if self.closing {
            self.budget.freeing.fetch_sub(1, Ordering::AcqRel);
        }
        self.budget.release(&self.account);
    }
}

impl BudgetSlot {
    pub fn budget(&self) -> &Arc<ServerBudget> {
        &self.budget
    }

    /// Its connection is closing: the slot comes back soon.
    pub fn closing(&mut self) {
        if !self.closing {
            self.closing = true;
            self.budget.freeing.fetch_add(1, Ordering::AcqRel);
        }
    }
}

impl ServerBudget {
    pub fn new(name: String, configured: Option<usize>, reserve: usize) -> Self {
        ServerBudget {
            name,
            ledger: Mutex::new(Ledger::new(configured.map(|n| n.max(1)))),
            waiting: AtomicUsize::new(0),
            freeing: AtomicUsize::new(0),
            configured,
            reserve,
            peak: AtomicUsize::new(0),
            evictors: Mutex::new(Vec::new()),
        }
    }

    /// Whether the server's own limit still has to be read (over the next connection).
    pub fn needs_limit(&self) -> bool {
        self.ledger.lock().is_ok_and(|l| l.limit().is_none())
    }

    /// The server said how many connections it allows (`max_connections` minus its reserved
    /// ones); the budget is that minus pgtenant's reserve.
    pub fn learn_limit(&self, server_allows: usize) {
        if self.configured.is_some() {
            return;
        }
        let limit = server_allows.saturating_sub(self.reserve).max(1);
        tracing::info!(server = %self.name, budget = limit, "server connection budget set from the server's max_connections");
        self.set_configured(limit);
    }

    /// Applies a new limit (a reloaded `max_connections`, or the server's own): a raised one
    /// admits waiters at once.
    pub fn set_configured(&self, limit: usize) {
        let granted = match self.ledger.lock() {
            Ok(mut l) => {
                l.set_limit(limit);
                l.grant()
            }
            Err(_) => return,
        };
        self.wake(granted);
    }

    fn slot(self: &Arc<Self>, account: &Arc<str>) -> BudgetSlot {
        BudgetSlot {
            budget: self.clone(),
            account: account.clone(),
            closing: false,
        }
    }

    pub fn register(&self, pool: Weak<dyn Evict>) {
        if let Ok(mut e) = self.evictors.lock() {
            e.retain(|w| w.strong_count() > 0);
            e.push(pool);
        }
    }

    /// A slot for `claim`, waiting in the fair queue until `deadline` when the budget is
    /// full. None when the deadline passed first.
    pub async fn acquire(
        self: &Arc<Self>,
        claim: &Claim,
        deadline: tokio::time::Instant,
    ) -> Option<BudgetSlot> {
        let (tx, rx) = oneshot::channel();
        let queued = match self.ledger.lock() {
            Ok(mut l) => match l.request(claim, tx) {
                Ok(_) => {
                    self.peak.fetch_max(l.used(), Ordering::Relaxed);
                    None
                }
                Err(ticket) => {
                    self.waiting.store(l.waiting(), Ordering::Relaxed);
                    Some(ticket)
                }
            },
            Err(_) => return None,
        };
        let Some(ticket) = queued else {
            return Some(self.slot(&claim.account));
        };
        let mut pending = Pending {
            budget: self,
            account: &claim.account,
            ticket,
            rx,
            done: false,
        };
        self.make_room();
        let got = tokio::time::timeout_at(deadline, &mut pending.rx).await;
        pending.done = true;
        match got {
            Ok(Ok(())) => Some(self.slot(&claim.account)),
            _ => {
                pending.done = false;
                None
            }
        }
    }

    /// Closes an idle connection on this server that may be closed, if any: of the pool most
    /// over its target, the longest idle. Its slot goes to the fairest waiter.
    pub fn make_room(&self) {
        if !self.needs_room() {
            return;
        }
        let pools: Vec<Arc<dyn Evict>> = match self.evictors.lock() {
            Ok(e) => e.iter().filter_map(Weak::upgrade).collect(),
            Err(_) => return,
        };
        // From the pool furthest over its target (a busy tenant's connections left over from
        // a burst) before the longest idle: a quiet tenant's only connection stays.
        let victim = pools
            .iter()
            .filter_map(|p| p.oldest_idle().map(|(surplus, t)| ((surplus, t), p)))
            .min_by_key(|((surplus, t), _)| (std::cmp::Reverse(*surplus), *t));
        if let Some((_, p)) = victim {
            if p.evict_oldest() {
                tracing::debug!(server = %self.name, "closed an idle server connection to make room for a waiting tenant");
            }
        }
    }

    /// Whether a connection of `account` should be closed at the end of its transaction so a
    /// waiting tenant gets the slot. One relaxed load when nobody waits.
    pub fn should_yield(&self, account: &str) -> bool {
        if self.waiting.load(Ordering::Relaxed) == 0 {
            return false;
        }
        self.ledger
            .lock()
            .is_ok_and(|mut l| l.should_yield(account))
    }

    /// Whether anyone waits for a slot.
    pub fn has_waiters(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) > 0
    }

    /// Whether more requests wait than closing connections will make room for.
    pub fn needs_room(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) > self.freeing.load(Ordering::Relaxed)
    }

    fn release(&self, account: &str) {
        let granted = match self.ledger.lock() {
            Ok(mut l) => {
                l.release(account);
                l.grant()
            }
            Err(_) => return,
        };
        self.wake(granted);
    }

    /// Wakes granted waiters; a waiter that is gone gives its slot back (outside the lock).
    fn wake(&self, mut granted: Vec<(Arc<str>, oneshot::Sender<()>)>) {
        while !granted.is_empty() {
            let mut gone = Vec::new();
            for (account, tx) in granted.drain(..) {
                if tx.send(()).is_err() {
                    gone.push(account);
                }
            }
            match self.ledger.lock() {
                Ok(mut l) => {
                    for a in &gone {
                        l.release(a);
                    }
                    granted = l.grant();
                    self.waiting.store(l.waiting(), Ordering::Relaxed);
                    self.peak.fetch_max(l.used(), Ordering::Relaxed);
                }
                Err(_) => return,
            }
        }
    }

    pub fn view(&self) -> BudgetView {
        let (limit, used, waiting) = self
            .ledger
            .lock()
            .map_or((None, 0, 0), |l| (l.limit(), l.used(), l.waiting()));
        BudgetView {
            limit,
            used,
            waiting,
            peak: self.peak.load(Ordering::Relaxed),
        }
    }
}

/// A queued request; if its future is dropped (the client gave up), the ticket is taken back,
/// or the slot it was granted meanwhile given back.
struct Pending<'a> {
    budget: &'a ServerBudget,
    account: &'a Arc<str>,
    ticket: u64,
    rx: oneshot::Receiver<()>,
    done: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let granted = match self.budget.ledger.lock() {
            Ok(mut l) => {
                // Grants are sent under the lock, so a ticket no longer queued was granted.
                if !l.cancel(self.account, self.ticket) && self.rx.try_recv().is_ok() {
                    l.release(self.account);
                }
                self.budget.waiting.store(l.waiting(), Ordering::Relaxed);
                l.grant()
            }
            Err(_) => return,
        };
        self.budget.wake(granted);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(name: &str, weight: u32, min: u32) -> Claim {
        Claim {
            account: Arc::from(name),
            weight,
            min,
        }
    }

    /// `n` slots for `who`, granted at once.
    fn fill(l: &mut Ledger<&'static str>, who: &Claim, n: usize) {
        for _ in 0..n {
            assert!(l.request(who, "x").is_ok());
        }
    }

    fn granted(l: &mut Ledger<&'static str>) -> Vec<String> {
        l.grant().into_iter().map(|(a, _)| a.to_string()).collect()
    }

    #[test]
    fn requests_are_granted_until_the_budget_is_full() {
        let mut l = Ledger::new(Some(2));
        let a = claim("a", 1, 0);
        fill(&mut l, &a, 2);
        assert!(l.request(&a, "x").is_err());
        assert_eq!(l.used(), 2);
        assert_eq!(l.waiting(), 1);
    }

    #[test]
    fn the_budget_is_never_exceeded_whatever_the_order_of_requests_and_releases() {
        let mut l = Ledger::new(Some(3));
        let names = ["a", "b", "c", "d"];
        for step in 0..400usize {
            let who = claim(
                names[step * 7 % 4],
                1 + (step % 3) as u32,
                (step % 2) as u32,
            );
            if step % 3 == 2 {
                let holder = names[step % 4];
                if l.held(holder) > 0 {
                    l.release(holder);
                }
            } else {
                let _ = l.request(&who, "x");
            }
            l.grant();
            assert!(l.used() <= 3, "step {step}: {} used", l.used());
        }
    }

    #[test]
    fn a_freed_slot_goes_to_the_tenant_holding_fewest_not_to_the_first_in_line() {
        let mut l = Ledger::new(Some(4));
        let noisy = claim("noisy", 1, 0);
        let quiet = claim("quiet", 1, 0);
        fill(&mut l, &noisy, 4);
        for _ in 0..10 {
            assert!(l.request(&noisy, "n").is_err());
        }
        assert!(l.request(&quiet, "q").is_err());
        l.release("noisy");
        assert_eq!(granted(&mut l), ["quiet"]);
    }

    #[test]
    fn weights_divide_the_budget_in_proportion() {
        let mut l = Ledger::new(Some(6));
        let big = claim("big", 2, 0);
        let small = claim("small", 1, 0);
        for _ in 0..10 {
            let _ = l.request(&big, "b");
            let _ = l.request(&small, "s");
        }
        // Everything held goes back and is handed out again by the queue.
        while l.used() > 0 {
            let holder = if l.held("big") > 0 { "big" } else { "small" };
            l.release(holder);
        }
        l.grant();
        assert_eq!((l.held("big"), l.held("small")), (4, 2));
    }

    #[test]
    fn a_tenant_below_its_minimum_is_served_first() {
        let mut l = Ledger::new(Some(2));
        let a = claim("a", 1, 0);
        let b = claim("b", 1, 0);
        let reserved = claim("r", 1, 2);
        fill(&mut l, &a, 2);
        assert!(l.request(&b, "b").is_err());
        assert!(l.request(&reserved, "r").is_err());
        l.release("a");
        assert_eq!(granted(&mut l), ["r"]);
    }

    #[test]
    fn within_a_tenant_waiters_are_served_in_order() {
        let mut l = Ledger::new(Some(1));
        let a = claim("a", 1, 0);
        fill(&mut l, &a, 1);
        assert!(l.request(&a, "first").is_err());
        assert!(l.request(&a, "second").is_err());
        l.release("a");
        let g = l.grant();
        assert_eq!(g[0].1, "first");
    }

    #[test]
    fn a_tenant_over_its_share_yields_to_a_waiting_one() {
        let mut l = Ledger::new(Some(4));
        let noisy = claim("noisy", 1, 0);
        let quiet = claim("quiet", 1, 0);
        fill(&mut l, &noisy, 4);
        assert!(!l.should_yield("noisy"), "nobody waits");
        assert!(l.request(&quiet, "q").is_err());
        assert!(l.should_yield("noisy"));
    }

    #[test]
    fn equal_shares_do_not_trade_connections_back_and_forth() {
        let mut l = Ledger::new(Some(4));
        let a = claim("a", 1, 0);
        let b = claim("b", 1, 0);
        fill(&mut l, &a, 2);
        fill(&mut l, &b, 2);
        assert!(l.request(&b, "b").is_err());
        assert!(!l.should_yield("a"), "a holds 2, b would hold 3");
    }

    #[test]
    fn a_tenant_never_yields_below_its_minimum() {
        let mut l = Ledger::new(Some(2));
        let a = claim("a", 1, 2);
        let b = claim("b", 1, 0);
        fill(&mut l, &a, 2);
        assert!(l.request(&b, "b").is_err());
        assert!(!l.should_yield("a"));
    }

    #[test]
    fn a_cancelled_waiter_leaves_the_queue() {
        let mut l = Ledger::new(Some(1));
        let a = claim("a", 1, 0);
        fill(&mut l, &a, 1);
        let t = l.request(&a, "w").expect_err("queued");
        assert!(l.cancel("a", t));
        assert_eq!(l.waiting(), 0);
        l.release("a");
        assert!(l.grant().is_empty());
        assert_eq!(l.used(), 0);
    }

    #[test]
    fn before_the_limit_is_known_one_connection_at_a_time() {
        let mut l = Ledger::new(None);
        let a = claim("a", 1, 0);
        fill(&mut l, &a, 1);
        assert!(l.request(&a, "w").is_err());
        l.set_limit(10);
        assert_eq!(granted(&mut l), ["a"]);
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_passes_its_slot_on() {
        let b = Arc::new(ServerBudget::new("s".into(), Some(1), 0));
        let far = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        let held = b.acquire(&claim("a", 1, 0), far).await.expect("free slot");
        let soon = tokio::time::Instant::now() + std::time::Duration::from_millis(20);
        assert!(b.acquire(&claim("b", 1, 0), soon).await.is_none());
        assert_eq!(b.view().waiting, 0);
        drop(held);
        assert_eq!(b.view().used, 0);
        assert!(b.acquire(&claim("c", 1, 0), far).await.is_some());
    }
}
