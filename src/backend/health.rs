//! What pgtenant knows of each server: whether it takes connections, and what the last health
//! check found (reachable, in recovery, replay lag).
//!
//! Connection attempts pass a gate per server. While the server refuses connections, one
//! attempt at a time goes through, each after an exponential backoff capped at
//! `MAX_BACKOFF_MS`, so a dead server sees a trickle instead of a stampede, and a server that
//! comes back is found within that cap.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::Notify;

use crate::tenancy::Server;

/// First retry delay after a failed connection attempt; doubles per failure.
const FIRST_BACKOFF_MS: u64 = 50;
/// Longest wait between attempts: a server that is back is used again within this.
const MAX_BACKOFF_MS: u64 = 500;

/// Replay lag value meaning "not known yet".
const LAG_UNKNOWN: i64 = -1;

/// One server's state, shared by every pool and health check that talks to it.
pub struct ServerHealth {
    pub name: String,
    pub addr: String,
    down: AtomicBool,
    failures: AtomicU32,
    retry_at_ms: AtomicU64,
    attempt: tokio::sync::Mutex<()>,
    /// Last health check: reachable, a standby, its replay lag in ms.
    checked: AtomicBool,
    healthy: AtomicBool,
    in_recovery: AtomicBool,
    lag_ms: AtomicI64,
    last_error: Mutex<Option<String>>,
    book: std::sync::Weak<HealthBook>,
}

impl std::fmt::Debug for ServerHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHealth")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// A point-in-time view of a server's health, for logs and listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthView {
    pub name: String,
    pub addr: String,
    /// Refusing connections now (attempts are backing off).
    pub down: bool,
    /// The last health check succeeded (true until a first check says otherwise).
    pub healthy: bool,
    pub in_recovery: bool,
    /// Replay lag in ms at the last check; None when unknown or not a standby.
    pub lag_ms: Option<u64>,
    pub last_error: Option<String>,
}

impl ServerHealth {
    /// Waits until a connection attempt may go out. While the server is down this admits one
    /// attempt at a time (the guard), after the current backoff; otherwise it returns at once.
    pub async fn gate(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        if !self.down.load(Ordering::Acquire) {
            return None;
        }
        let guard = self.attempt.lock().await;
        if !self.down.load(Ordering::Acquire) {
            return None;
        }
        let wait = self
            .retry_at_ms
            .load(Ordering::Relaxed)
            .saturating_sub(coarse_ms());
        if wait > 0 {
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
        Some(guard)
    }

    /// A connection was opened.
    pub fn connected(&self) {
        self.failures.store(0, Ordering::Relaxed);
        if self.down.swap(false, Ordering::AcqRel) {
            tracing::info!(server = %self.name, addr = %self.addr, "server accepts connections again");
        }
    }

    /// A connection attempt failed in a way that says the server is unreachable (not a refusal
    /// of this role or database): back off, and have the health checker look soon.
    pub fn unreachable(&self, error: &str) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed).min(8);
        let backoff = (FIRST_BACKOFF_MS << n).min(MAX_BACKOFF_MS);
        // Up to a quarter less, so many proxies do not retry in lockstep.
        let jitter = rand::random::<u64>() % (backoff / 4 + 1);
        self.retry_at_ms
            .store(coarse_ms() + backoff - jitter, Ordering::Relaxed);
        if !self.down.swap(true, Ordering::AcqRel) {
            tracing::warn!(server = %self.name, addr = %self.addr, error = %error, "server unreachable; connection attempts back off");
        }
        self.set_error(Some(error.to_string()));
        self.wake_checker();
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }

    /// Records a health check's result: Ok(lag) for a reachable server (lag in ms: None on a
    /// primary), Err for a failed check.
    pub fn record_check(&self, result: Result<Option<u64>, String>) {
        let before = self.view();
        self.checked.store(true, Ordering::Relaxed);
        match result {
            Ok(lag) => {
                self.healthy.store(true, Ordering::Relaxed);
                self.in_recovery.store(lag.is_some(), Ordering::Relaxed);
                self.lag_ms.store(
                    lag.map_or(LAG_UNKNOWN, |l| l.min(i64::MAX as u64) as i64),
                    Ordering::Relaxed,
                );
                self.set_error(None);
                self.connected();
            }
            Err(e) => {
                self.healthy.store(false, Ordering::Relaxed);
                self.set_error(Some(e));
            }
        }
        let after = self.view();
        if before.healthy != after.healthy || before.in_recovery != after.in_recovery {
            log_view(&after, "server health changed");
        }
    }

    /// Whether reads may go here: reachable, checked healthy, and (when `max_lag` is set) no
    /// further behind than that.
    pub fn usable_for_reads(&self, max_lag: Option<Duration>) -> bool {
        if self.is_down() || !self.healthy.load(Ordering::Relaxed) {
            return false;
        }
        match max_lag {
            Some(max) => {
                let lag = self.lag_ms.load(Ordering::Relaxed);
                lag < 0 || (lag as u128) <= max.as_millis()
            }
            None => true,
        }
    }

    pub fn view(&self) -> HealthView {
        let lag = self.lag_ms.load(Ordering::Relaxed);
        HealthView {
            name: self.name.clone(),
            addr: self.addr.clone(),
            down: self.is_down(),
            healthy: self.healthy.load(Ordering::Relaxed),
            in_recovery: self.in_recovery.load(Ordering::Relaxed),
            lag_ms: (lag >= 0 && self.in_recovery.load(Ordering::Relaxed)).then_some(lag as u64),
            last_error: self.last_error.lock().ok().and_then(|e| e.clone()),
        }
    }

    fn set_error(&self, e: Option<String>) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = e;
        }
    }

    /// Asks for a health check soon (after an error).
    pub fn wake_checker(&self) {
        if let Some(book) = self.book.upgrade() {
            book.recheck.notify_one();
        }
    }
}

/// Logs a server's state, one line, the fields an operator looks for.
pub fn log_view(v: &HealthView, what: &str) {
    let lag = v
        .lag_ms
        .map(|l| l.to_string())
        .unwrap_or_else(|| "-".into());
    let error = v.last_error.as_deref().unwrap_or("-");
    if v.healthy && !v.down {
        tracing::info!(server = %v.name, addr = %v.addr, standby = v.in_recovery, lag_ms = %lag, "{what}: healthy");
    } else {
        tracing::warn!(server = %v.name, addr = %v.addr, down = v.down, error = %error, "{what}: unhealthy");
    }
}

/// Every server's health, by address (the same server may have several names).
#[derive(Default)]
pub struct HealthBook {
    servers: DashMap<String, Arc<ServerHealth>>,
    /// Wakes the health checker early (after an error).
    pub recheck: Notify,
}

impl HealthBook {
    pub fn new() -> Arc<HealthBook> {
        Arc::new(HealthBook::default())
    }

    /// The health record of `server`, made on first use.
    pub fn of(self: &Arc<Self>, server: &Server) -> Arc<ServerHealth> {
        let addr = format!("{}:{}", server.host, server.port);
        if let Some(h) = self.servers.get(&addr) {
            return h.clone();
        }
        self.servers
            .entry(addr.clone())
            .or_insert_with(|| {
                Arc::new(ServerHealth {
                    name: server.name.clone(),
                    addr,
                    down: AtomicBool::new(false),
                    failures: AtomicU32::new(0),
                    retry_at_ms: AtomicU64::new(0),
                    attempt: tokio::sync::Mutex::new(()),
                    checked: AtomicBool::new(false),
                    healthy: AtomicBool::new(true),
                    in_recovery: AtomicBool::new(false),
                    lag_ms: AtomicI64::new(LAG_UNKNOWN),
                    last_error: Mutex::new(None),
                    book: Arc::downgrade(self),
                })
            })
            .clone()
    }

    pub fn views(&self) -> Vec<HealthView> {
        let mut v: Vec<HealthView> = self.servers.iter().map(|h| h.view()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name).then(a.addr.cmp(&b.addr)));
        v
    }
}

/// Monotonic milliseconds from the kernel's coarse clock.
pub fn coarse_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> (Arc<HealthBook>, Arc<ServerHealth>) {
        let book = HealthBook::new();
        let h = book.of(&Server {
            name: "s".into(),
            host: "127.0.0.1".into(),
            port: 1,
            tls: Default::default(),
            max_connections: None,
        });
        (book, h)
    }

    #[test]
    fn the_same_address_shares_one_record_whatever_its_name() {
        let (book, h) = server();
        let other = book.of(&Server {
            name: "alias".into(),
            host: "127.0.0.1".into(),
            port: 1,
            tls: Default::default(),
            max_connections: None,
        });
        assert!(Arc::ptr_eq(&h, &other));
    }

    #[test]
    fn a_lagging_standby_is_not_used_for_reads() {
        let (_book, h) = server();
        h.record_check(Ok(Some(5_000)));
        assert!(!h.usable_for_reads(Some(Duration::from_secs(1))));
        assert!(h.usable_for_reads(Some(Duration::from_secs(10))));
        assert!(h.usable_for_reads(None));
    }

    #[test]
    fn a_failed_check_takes_a_server_out_and_a_good_one_brings_it_back() {
        let (_book, h) = server();
        h.record_check(Err("connection refused".into()));
        assert!(!h.usable_for_reads(None));
        h.record_check(Ok(Some(0)));
        assert!(h.usable_for_reads(None));
    }

    #[test]
    fn an_unreachable_server_is_down_until_a_connection_succeeds() {
        let (_book, h) = server();
        h.unreachable("refused");
        assert!(h.is_down());
        assert!(!h.usable_for_reads(None));
        h.connected();
        assert!(!h.is_down());
    }

    #[tokio::test]
    async fn attempts_to_a_down_server_wait_for_the_backoff() {
        let (_book, h) = server();
        h.unreachable("refused");
        let started = std::time::Instant::now();
        let guard = h.gate().await;
        assert!(guard.is_some(), "one attempt at a time while down");
        assert!(started.elapsed() >= Duration::from_millis(FIRST_BACKOFF_MS * 3 / 4 - 10));
    }
}
