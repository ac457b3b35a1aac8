//! Every open server connection, for the admin console's SHOW SERVERS: registered when a pool
//! opens it, gone when it closes. A connection's state is one relaxed store per checkout.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use dashmap::DashMap;

/// What SHOW SERVERS shows of one connection.
#[derive(Debug)]
pub struct ConnInfo {
    pub id: u64,
    /// The tenant it serves (a row group's connection: the last one it served).
    pub tenant: std::sync::Mutex<Arc<str>>,
    pub role: Arc<str>,
    pub user: String,
    pub database: String,
    pub server: String,
    pub host: String,
    pub port: u16,
    pub pid: u32,
    pub connected: SystemTime,
    pub active: AtomicBool,
    /// Protocol and cipher suite when the connection uses TLS.
    pub tls: Option<String>,
}

#[derive(Default)]
pub struct Census {
    conns: DashMap<u64, Arc<ConnInfo>>,
    next: AtomicU64,
}

impl Census {
    pub fn next_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    pub fn add(self: &Arc<Self>, info: Arc<ConnInfo>) -> CensusEntry {
        self.conns.insert(info.id, info.clone());
        CensusEntry {
            census: self.clone(),
            info,
        }
    }

    pub fn all(&self) -> Vec<Arc<ConnInfo>> {
        let mut v: Vec<Arc<ConnInfo>> = self.conns.iter().map(|c| c.value().clone()).collect();
        v.sort_by_key(|c| c.id);
        v
    }
}

/// A connection's place in the census; leaving it removes the connection.
pub struct CensusEntry {
    census: Arc<Census>,
    pub info: Arc<ConnInfo>,
}

impl Drop for CensusEntry {
    fn drop(&mut self) {
        self.census.conns.remove(&self.info.id);
    }
}

impl std::fmt::Debug for CensusEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CensusEntry({})", self.info.id)
    }
}
