//! Counters per (tenant, role): what SHOW STATS, SHOW USAGE and the Prometheus endpoint report.
//! They are prometheus metric handles taken once per (tenant, role), so the hot path pays a few
//! relaxed atomic adds per transaction and no label lookup; they outlive the pool rebuilds a
//! changed entry causes, and their series are removed when the tenant or role goes away.

use std::sync::{Arc, Mutex};

use prometheus::{
    Counter, CounterVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry,
};

/// Upper bounds (seconds) of the duration histograms: sub-millisecond point queries up to
/// long reports, in few buckets so 10,000 tenants stay cheap to scrape.
const BUCKETS: &[f64] = &[0.0005, 0.002, 0.01, 0.05, 0.25, 1.0, 5.0, 30.0];

/// The metric families, registered once per proxy.
pub struct Metrics {
    pub registry: Registry,
    transactions: IntCounterVec,
    queries: IntCounterVec,
    received: IntCounterVec,
    sent: IntCounterVec,
    xact_seconds: HistogramVec,
    query_seconds: HistogramVec,
    wait_seconds: HistogramVec,
    client_seconds: CounterVec,
    errors: IntCounterVec,
    /// Client connections by state (active, waiting, idle).
    pub clients: IntGaugeVec,
    /// Server connections by state (active, idle).
    pub servers: IntGaugeVec,
    /// Per server: 1 when its last health check passed and it takes connections.
    pub server_up: IntGaugeVec,
    /// Per standby: replay lag at the last check.
    pub replay_lag: prometheus::GaugeVec,
    /// Connections each pool keeps, as its demand-following loop decided.
    target: IntGaugeVec,
    resizes: IntCounterVec,
    /// Per server: its connection budget, the slots in use, and the requests waiting.
    pub budget: IntGaugeVec,
    /// Per tenant: the server connections holding its clients' LISTENs (state=connections)
    /// and the channel subscriptions on them (state=subscriptions).
    pub listen: IntGaugeVec,
}

const TR: &[&str] = &["tenant", "role"];

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| {
            let v = IntCounterVec::new(Opts::new(name, help), TR).expect("valid metric");
            let _ = registry.register(Box::new(v.clone()));
            v
        };
        let histogram = |name: &str, help: &str| {
            let v = HistogramVec::new(HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()), TR)
                .expect("valid metric");
            let _ = registry.register(Box::new(v.clone()));
            v
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let v = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            let _ = registry.register(Box::new(v.clone()));
            v
        };
        let client_seconds = CounterVec::new(
            Opts::new(
                "pgtenant_client_connection_seconds_total",
                "Time client connections were open (ended ones; open ones when they end)",
            ),
            TR,
        )
        .expect("valid metric");
        let _ = registry.register(Box::new(client_seconds.clone()));
        let errors = IntCounterVec::new(
            Opts::new(
                "pgtenant_errors_total",
                "Errors returned to clients, by SQLSTATE class (first two characters)",
            ),
            &["tenant", "role", "class"],
        )
        .expect("valid metric");
        let _ = registry.register(Box::new(errors.clone()));
        let replay_lag = prometheus::GaugeVec::new(
            Opts::new(
                "pgtenant_server_replay_lag_seconds",
                "Replay lag of a standby at its last health check",
            ),
            &["server", "addr"],
        )
        .expect("valid metric");
        let _ = registry.register(Box::new(replay_lag.clone()));
        #[cfg(target_os = "linux")]
        {
            let _ = registry.register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ));
        }
        Metrics {
            transactions: counter("pgtenant_transactions_total", "Transactions served"),
            queries: counter(
                "pgtenant_queries_total",
                "Queries sent (simple Query messages and extended-protocol Executes)",
            ),
            received: counter(
                "pgtenant_client_received_bytes_total",
                "Bytes received from clients",
            ),
            sent: counter("pgtenant_client_sent_bytes_total", "Bytes sent to clients"),
            xact_seconds: histogram(
                "pgtenant_transaction_duration_seconds",
                "Server time of a transaction (from checkout of a server connection to its release)",
            ),
            query_seconds: histogram(
                "pgtenant_query_duration_seconds",
                "Time from a client request (Query or Sync) to its ReadyForQuery",
            ),
            wait_seconds: histogram(
                "pgtenant_pool_wait_duration_seconds",
                "Time a transaction waited for a server connection",
            ),
            clients: gauge(
                "pgtenant_client_connections",
                "Client connections by state",
                &["tenant", "role", "state"],
            ),
            servers: gauge(
                "pgtenant_server_connections",
                "Server connections by state",
                &["tenant", "role", "state"],
            ),
            server_up: gauge(
                "pgtenant_server_up",
                "1 when the server passed its last health check and takes connections",
                &["server", "addr"],
            ),
            target: gauge(
                "pgtenant_pool_target_connections",
                "Server connections a pool keeps, as its demand-following loop decided",
                TR,
            ),
            resizes: counter(
                "pgtenant_pool_resizes_total",
                "Changes of a pool's target size",
            ),
            budget: gauge(
                "pgtenant_server_budget",
                "A server's connection budget (state=limit), the slots in use (used, peak) and the connection requests waiting for one (waiting)",
                &["server", "addr", "state"],
            ),
            listen: gauge(
                "pgtenant_listen",
                "Transaction mode, database tier: server connections holding a tenant's LISTENs (state=connections) and its clients' channel subscriptions on them (state=subscriptions)",
                &["tenant", "state"],
            ),
            client_seconds,
            errors,
            replay_lag,
            registry,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

pub struct PoolStats {
    /// Shared with every session of the pool, which names itself with them.
    tenant: Arc<str>,
    role: Arc<str>,
    pub transactions: IntCounter,
    pub queries: IntCounter,
    pub bytes_in: IntCounter,
    pub bytes_out: IntCounter,
    pub xact_seconds: Histogram,
    pub query_seconds: Histogram,
    pub wait_seconds: Histogram,
    pub client_seconds: Counter,
    /// Clients waiting for a server connection now, and holding one.
    pub waiting: IntGauge,
    pub active: IntGauge,
    /// Transaction-mode clients pinned to their server connection (`session_features = pin`).
    pub pinned: IntGauge,
    target: IntGauge,
    resizes: IntCounter,
    errors: IntCounterVec,
    /// SQLSTATE classes counted, so their series go with the tenant.
    classes: Mutex<Vec<String>>,
}

impl std::fmt::Debug for PoolStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PoolStats({}/{})", self.tenant, self.role)
    }
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
    /// Request time (Query or Sync to ReadyForQuery), transaction mode.
    pub query_us: u64,
    pub waiting: usize,
    pub active: usize,
    pub pinned: usize,
    pub client_ms: u64,
}

impl PoolStats {
    /// The tenant's id, shared.
    pub fn tenant_name(&self) -> &Arc<str> {
        &self.tenant
    }

    /// The client role's name, shared.
    pub fn role_name(&self) -> &Arc<str> {
        &self.role
    }

    pub fn new(m: &Metrics, tenant: &str, role: &str) -> PoolStats {
        let l = [tenant, role];
        PoolStats {
            tenant: Arc::from(tenant),
            role: Arc::from(role),
            transactions: m.transactions.with_label_values(&l),
            queries: m.queries.with_label_values(&l),
            bytes_in: m.received.with_label_values(&l),
            bytes_out: m.sent.with_label_values(&l),
            xact_seconds: m.xact_seconds.with_label_values(&l),
            query_seconds: m.query_seconds.with_label_values(&l),
            wait_seconds: m.wait_seconds.with_label_values(&l),
            client_seconds: m.client_seconds.with_label_values(&l),
            waiting: m.clients.with_label_values(&[tenant, role, "waiting"]),
            active: m.clients.with_label_values(&[tenant, role, "active"]),
            pinned: m.clients.with_label_values(&[tenant, role, "pinned"]),
            target: m.target.with_label_values(&l),
            resizes: m.resizes.with_label_values(&l),
            errors: m.errors.clone(),
            classes: Mutex::new(Vec::new()),
        }
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            xacts: self.transactions.get(),
            xact_us: (self.xact_seconds.get_sample_sum() * 1e6) as u64,
            queries: self.queries.get(),
            bytes_in: self.bytes_in.get(),
            bytes_out: self.bytes_out.get(),
            wait_us: (self.wait_seconds.get_sample_sum() * 1e6) as u64,
            query_us: (self.query_seconds.get_sample_sum() * 1e6) as u64,
            waiting: self.waiting.get().max(0) as usize,
            active: self.active.get().max(0) as usize,
            pinned: self.pinned.get().max(0) as usize,
            client_ms: (self.client_seconds.get() * 1e3) as u64,
        }
    }

    /// A finished transaction: its server time and the bytes it moved.
    pub fn transaction(&self, busy_seconds: f64, bytes_in: u64, bytes_out: u64) {
        self.transactions.inc();
        self.xact_seconds.observe(busy_seconds);
        self.bytes_in.inc_by(bytes_in);
        self.bytes_out.inc_by(bytes_out);
    }

    /// The pool's demand-following loop set a new target.
    pub fn note_resize(&self, target: u32) {
        self.target.set(i64::from(target));
        self.resizes.inc();
    }

    /// An error the client got, by its SQLSTATE's class.
    pub fn error(&self, sqlstate: &[u8]) {
        let class = String::from_utf8_lossy(sqlstate.get(..2).unwrap_or(b"XX")).into_owned();
        if let Ok(mut seen) = self.classes.lock() {
            if !seen.contains(&class) {
                seen.push(class.clone());
            }
        }
        self.errors
            .with_label_values(&[&*self.tenant, &*self.role, class.as_str()])
            .inc();
    }

    /// Removes this (tenant, role)'s series (the tenant or role is gone).
    pub fn unregister(&self, m: &Metrics) {
        let l = [&*self.tenant, &*self.role];
        let _ = m.transactions.remove_label_values(&l);
        let _ = m.queries.remove_label_values(&l);
        let _ = m.received.remove_label_values(&l);
        let _ = m.sent.remove_label_values(&l);
        let _ = m.xact_seconds.remove_label_values(&l);
        let _ = m.query_seconds.remove_label_values(&l);
        let _ = m.wait_seconds.remove_label_values(&l);
        let _ = m.client_seconds.remove_label_values(&l);
        let _ = m.target.remove_label_values(&l);
        let _ = m.resizes.remove_label_values(&l);
        for state in ["active", "waiting", "idle", "pinned"] {
            let _ = m.clients.remove_label_values(&[l[0], l[1], state]);
        }
        for state in ["active", "idle"] {
            let _ = m.servers.remove_label_values(&[l[0], l[1], state]);
        }
        if let Ok(seen) = self.classes.lock() {
            for c in seen.iter() {
                let _ = m.errors.remove_label_values(&[l[0], l[1], c]);
            }
        }
    }
}
