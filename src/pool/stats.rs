//! Counters per (tenant, role), kept across the pool rebuilds a changed entry causes: what the
//! admin console's SHOW STATS and SHOW POOLS report. Relaxed atomic adds, a few per
//! transaction, on the hot path.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

#[derive(Debug, Default)]
pub struct PoolStats {
    /// Transactions served (implicit ones included), and the server time they took (µs, from
    /// the checkout of a backend to its release).
    pub xacts: AtomicU64,
    pub xact_us: AtomicU64,
    /// Queries sent: simple Query messages and extended-protocol Executes.
    pub queries: AtomicU64,
    /// Bytes from clients to servers, and back.
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Time clients spent waiting for a backend (µs).
    pub wait_us: AtomicU64,
    /// Clients waiting for a backend now.
    pub waiting: AtomicUsize,
    /// Clients holding a backend now.
    pub active: AtomicUsize,
    /// Client connection time of sessions that ended (ms).
    pub client_ms: AtomicU64,
}

/// A point-in-time copy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub xacts: u64,
    pub xact_us: u64,
    pub queries: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub wait_us: u64,
    pub waiting: usize,
    pub active: usize,
    pub client_ms: u64,
}

impl PoolStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            xacts: self.xacts.load(Ordering::Relaxed),
            xact_us: self.xact_us.load(Ordering::Relaxed),
            queries: self.queries.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            wait_us: self.wait_us.load(Ordering::Relaxed),
            waiting: self.waiting.load(Ordering::Relaxed),
            active: self.active.load(Ordering::Relaxed),
            client_ms: self.client_ms.load(Ordering::Relaxed),
        }
    }

    /// A finished transaction: its server time and the bytes it moved.
    pub fn transaction(&self, busy_us: u64, bytes_in: u64, bytes_out: u64) {
        self.xacts.fetch_add(1, Ordering::Relaxed);
        self.xact_us.fetch_add(busy_us, Ordering::Relaxed);
        self.bytes_in.fetch_add(bytes_in, Ordering::Relaxed);
        self.bytes_out.fetch_add(bytes_out, Ordering::Relaxed);
    }
}
