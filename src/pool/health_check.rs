//! The health checker: every `health.interval`, and soon after an error, it checks each server
//! some pool uses (primaries and replicas) over one connection per server that it keeps open,
//! logging in as one of the pools on that server. A check finds out whether the server answers,
//! whether it is a standby, and how far its replay lags; replicas that fail or lag leave the
//! read rotation until a check finds them fit again.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;

use crate::backend::health::log_view;
use crate::backend::{BackendConn, ConnectSpec, ServerHealth};

use super::Pools;

/// -1 on a primary; else the standby's replay lag in ms: 0 when it has replayed all it
/// received, else the age of the last transaction it replayed (unbounded when it has replayed
/// none since it started: behind by an unknown amount).
const HEALTH_SQL: &str = "SELECT CASE WHEN NOT pg_catalog.pg_is_in_recovery() THEN -1 \
     WHEN pg_catalog.pg_last_wal_receive_lsn() IS NULL \
       OR pg_catalog.pg_last_wal_receive_lsn() <= pg_catalog.pg_last_wal_replay_lsn() THEN 0 \
     ELSE COALESCE((extract(epoch FROM pg_catalog.clock_timestamp() \
       - pg_catalog.pg_last_xact_replay_timestamp()) * 1000)::bigint, 9223372036854775807) END";

/// After an error wakes the checker, errors arriving this soon after are checked together.
const BURST: Duration = Duration::from_millis(100);

struct Target {
    health: Arc<ServerHealth>,
    spec: ConnectSpec,
    replica: bool,
    pools: usize,
}

/// Runs for as long as the proxy does.
pub async fn run(pools: &Pools) {
    let interval = Duration::from_secs(pools.health_settings().interval.max(1));
    let max_lag = pools.health_settings().replica_max_lag;
    let max_lag = (max_lag > 0).then(|| Duration::from_secs(max_lag));
    let mut probes: HashMap<String, BackendConn> = HashMap::new();
    let mut in_rotation: HashMap<String, bool> = HashMap::new();
    let mut seen: HashSet<String> = HashSet::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = pools.health().recheck.notified() => tokio::time::sleep(BURST).await,
        }
        let targets = targets(pools);
        probes.retain(|addr, _| targets.contains_key(addr));
        let timeout = Duration::from_secs(pools.settings.connect_timeout.max(1));
        let checks = targets.iter().map(|(addr, t)| {
            let conn = probes.remove(addr);
            let addr = addr.clone();
            async move { (addr, check(conn, &t.spec, timeout).await) }
        });
        for (addr, (result, conn)) in join_all(checks).await {
            let Some(t) = targets.get(&addr) else {
                continue;
            };
            match result {
                Check::Done(r) => t.health.record_check(r),
                // Says nothing of the server (the role it logged in as was refused, say):
                // another pool's role is tried next time.
                Check::Inconclusive(e) => {
                    tracing::debug!(server = %t.health.name, error = %e, "health check inconclusive");
                    continue;
                }
            }
            if let Some(c) = conn {
                probes.insert(addr.clone(), c);
            }
            let view = t.health.view();
            if seen.insert(addr.clone()) {
                log_view(
                    &view,
                    if t.replica {
                        "replica checked"
                    } else {
                        "server checked"
                    },
                );
            }
            if t.replica {
                let usable = t.health.usable_for_reads(max_lag);
                if in_rotation.insert(addr.clone(), usable) != Some(usable) {
                    let lag = view.lag_ms.map_or("-".to_string(), |l| l.to_string());
                    if usable {
                        tracing::info!(server = %view.name, addr = %addr, lag_ms = %lag, pools = t.pools, "replica in read rotation");
                    } else {
                        let why = if !view.healthy || view.down {
                            "unhealthy"
                        } else {
                            "lagging more than replica_max_lag"
                        };
                        tracing::warn!(server = %view.name, addr = %addr, lag_ms = %lag, pools = t.pools, reason = why, "replica out of read rotation");
                    }
                }
            }
            tracing::debug!(server = %view.name, addr = %addr, replica = t.replica, healthy = view.healthy, down = view.down, standby = view.in_recovery, lag_ms = ?view.lag_ms, pools = t.pools, "health check");
        }
    }
}

/// Each server some pool uses, with a way to log in to it.
fn targets(pools: &Pools) -> HashMap<String, Target> {
    let mut out: HashMap<String, Target> = HashMap::new();
    for (_, p) in pools.snapshot() {
        for (pool, replica) in p.with_replicas() {
            let addr = pool.health().addr.clone();
            let t = out.entry(addr).or_insert_with(|| {
                let mut spec = pool.spec().clone();
                // A plain login: the check needs no row context.
                spec.row_key = None;
                spec.repair = None;
                // Told apart from the pools' connections in pg_stat_activity: it is outside
                // the server's budget (in pool.server_reserve).
                spec.params.retain(|(k, _)| k != "application_name");
                spec.params
                    .push(("application_name".into(), "pgtenant health check".into()));
                Target {
                    health: pool.health().clone(),
                    spec,
                    replica,
                    pools: 0,
                }
            });
            t.replica |= replica;
            t.pools += 1;
        }
    }
    out
}

enum Check {
    /// The server's state: its replay lag (None on a primary), or why it failed the check.
    Done(Result<Option<u64>, String>),
    /// The check could not run for a reason that is not the server's health.
    Inconclusive(String),
}

/// One check, on the kept connection if it is still alive, else on a new one.
async fn check(
    conn: Option<BackendConn>,
    spec: &ConnectSpec,
    timeout: Duration,
) -> (Check, Option<BackendConn>) {
    let run = async {
        let alive = conn.and_then(|mut c| (!c.is_dead()).then_some(c));
        let mut conn = match alive {
            Some(c) => c,
            None => BackendConn::connect(spec).await.inspect_err(|e| {
                if e.is_unreachable() {
                    spec.health.unreachable(&e.to_string());
                }
            })?,
        };
        let value = conn.query_value(HEALTH_SQL).await?;
        Ok::<_, crate::backend::BackendError>((value, conn))
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(Ok((value, conn))) => {
            let lag = value.and_then(|v| v.parse::<i64>().ok()).unwrap_or(-1);
            (
                Check::Done(Ok((lag >= 0).then_some(lag as u64))),
                Some(conn),
            )
        }
        Ok(Err(e)) if e.is_unreachable() => (Check::Done(Err(e.to_string())), None),
        Ok(Err(e)) => (Check::Inconclusive(e.to_string()), None),
        Err(_) => (
            Check::Done(Err(format!("health check timed out after {timeout:?}"))),
            None,
        ),
    }
}
