//! The SHOW commands of the admin console.

use std::time::SystemTime;

use super::resultset::{t, Kind, ResultSet};
use crate::context::ProxyContext;

use Kind::{Int, Text};

pub fn show(ctx: &ProxyContext, what: &str) -> Option<ResultSet> {
    Some(match what {
        "HELP" => help(),
        "VERSION" => version(),
        "CONFIG" => config(ctx),
        "TENANTS" => tenants(ctx),
        "POOLS" => pools(ctx),
        "CLIENTS" => clients(ctx),
        "SERVERS" => servers(ctx),
        "STATS" => stats(ctx),
        "USAGE" => usage(ctx),
        "HEALTH" => health(ctx),
        _ => return None,
    })
}

fn help() -> ResultSet {
    let mut rs = ResultSet::new(&[("command", Text), ("does", Text)]);
    for (c, d) in [
        (
            "SHOW TENANTS",
            "tenants served, with tier, server, pool settings and clients",
        ),
        (
            "SHOW POOLS",
            "per (tenant, role): clients and server connections by state",
        ),
        ("SHOW CLIENTS", "client connections"),
        ("SHOW SERVERS", "server connections"),
        (
            "SHOW STATS",
            "per (tenant, role): transactions, queries, bytes, times",
        ),
        ("SHOW USAGE", "per tenant: what to charge it for"),
        (
            "SHOW HEALTH",
            "servers and replicas: health, standby, replay lag",
        ),
        ("SHOW CONFIG", "settings"),
        ("SHOW VERSION", "pgtenant's version"),
        (
            "PAUSE [tenant]",
            "hold new transactions (all tenants without one) once running ones end",
        ),
        ("RESUME [tenant]", "undo PAUSE"),
        ("RELOAD", "re-read the config file"),
        (
            "KILL tenant",
            "close the tenant's client and server connections",
        ),
        ("SHUTDOWN", "stop accepting, drain, exit"),
    ] {
        rs.push(vec![t(c), t(d)]);
    }
    rs
}

fn version() -> ResultSet {
    let mut rs = ResultSet::new(&[("version", Text)]);
    rs.push(vec![t(concat!("pgtenant ", env!("CARGO_PKG_VERSION")))]);
    rs
}

/// PgBouncer's columns: key, value, default, changeable.
fn config(ctx: &ProxyContext) -> ResultSet {
    let c = &ctx.config;
    let d = crate::config::Config::empty();
    let p = &c.pool;
    let dp = &d.pool;
    let mut rs = ResultSet::new(&[
        ("key", Text),
        ("value", Text),
        ("default", Text),
        ("changeable", Text),
    ]);
    let rows: Vec<(&str, String, String)> = vec![
        ("listen", c.listen.to_string(), d.listen.to_string()),
        (
            "tenant_separator",
            c.tenant_separator.clone(),
            d.tenant_separator.clone(),
        ),
        (
            "max_message_bytes",
            c.max_message_bytes.to_string(),
            d.max_message_bytes.to_string(),
        ),
        (
            "auth_timeout",
            c.auth_timeout.to_string(),
            d.auth_timeout.to_string(),
        ),
        (
            "worker_threads",
            c.worker_threads.to_string(),
            d.worker_threads.to_string(),
        ),
        (
            "pool_mode",
            format!("{:?}", p.mode).to_lowercase(),
            format!("{:?}", dp.mode).to_lowercase(),
        ),
        (
            "default_pool_size",
            p.default_size.to_string(),
            dp.default_size.to_string(),
        ),
        (
            "query_wait_timeout",
            p.query_wait_timeout.to_string(),
            dp.query_wait_timeout.to_string(),
        ),
        (
            "connect_timeout",
            p.connect_timeout.to_string(),
            dp.connect_timeout.to_string(),
        ),
        (
            "server_idle_timeout",
            p.server_idle_timeout.to_string(),
            dp.server_idle_timeout.to_string(),
        ),
        (
            "server_lifetime",
            p.server_lifetime.to_string(),
            dp.server_lifetime.to_string(),
        ),
        (
            "reset_timeout",
            p.reset_timeout.to_string(),
            dp.reset_timeout.to_string(),
        ),
        (
            "max_prepared_statements",
            p.max_prepared_statements.to_string(),
            dp.max_prepared_statements.to_string(),
        ),
        (
            "idle_transaction_timeout",
            p.idle_transaction_timeout.to_string(),
            dp.idle_transaction_timeout.to_string(),
        ),
        (
            "max_client_conn",
            p.max_client_connections.to_string(),
            dp.max_client_connections.to_string(),
        ),
        (
            "pool_idle_timeout",
            p.pool_idle_timeout.to_string(),
            dp.pool_idle_timeout.to_string(),
        ),
        (
            "health_interval",
            c.health.interval.to_string(),
            d.health.interval.to_string(),
        ),
        (
            "replica_max_lag",
            c.health.replica_max_lag.to_string(),
            d.health.replica_max_lag.to_string(),
        ),
        (
            "registry",
            c.registry.as_ref().map_or("-".into(), |r| r.url.clone()),
            "-".into(),
        ),
    ];
    for (k, v, def) in rows {
        // Tenants and servers reload; these settings need a restart.
        rs.push(vec![t(k), t(v), t(def), t("no")]);
    }
    rs
}

fn tenants(ctx: &ProxyContext) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("tenant", Text),
        ("tier", Text),
        ("server", Text),
        ("database", Text),
        ("schema", Text),
        ("pool_mode", Text),
        ("pool_size", Int),
        ("status", Text),
        ("replicas", Text),
        ("read_write_split", Text),
        ("clients", Int),
        ("paused", Text),
    ]);
    let mut all = ctx.registry.tenants();
    all.sort_by(|a, b| a.id.cmp(&b.id));
    for tn in all {
        rs.push(vec![
            t(&tn.id),
            t(tn.tier.as_str()),
            t(&tn.server.name),
            t(&tn.database),
            tn.schema.clone(),
            t(format!("{:?}", tn.pool_mode).to_lowercase()),
            t(tn.pool_size),
            t(tn.status.as_str()),
            t(tn.replicas
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join(",")),
            t(tn.read_write_split),
            t(ctx.cancels.count(&tn.id)),
            t(ctx.pools.pauses().is_paused(&tn.id)),
        ]);
    }
    rs
}

/// PgBouncer's SHOW POOLS columns, then tenant, tier, server, replica.
fn pools(ctx: &ProxyContext) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("database", Text),
        ("user", Text),
        ("cl_active", Int),
        ("cl_waiting", Int),
        ("cl_active_cancel_req", Int),
        ("cl_waiting_cancel_req", Int),
        ("sv_active", Int),
        ("sv_active_cancel", Int),
        ("sv_being_canceled", Int),
        ("sv_idle", Int),
        ("sv_used", Int),
        ("sv_tested", Int),
        ("sv_login", Int),
        ("maxwait", Int),
        ("maxwait_us", Int),
        ("pool_mode", Text),
        ("tenant", Text),
        ("tier", Text),
        ("server", Text),
        ("replica", Text),
        ("cl_pinned", Int),
        ("sv_target", Int),
        ("target_reason", Text),
        ("server_budget", Int),
        ("budget_used", Int),
        ("budget_waiting", Int),
    ]);
    let mut all = ctx.pools.snapshot();
    all.sort_by(|a, b| (&a.0.tenant, &a.0.role).cmp(&(&b.0.tenant, &b.0.role)));
    for (key, p) in all {
        let tn = p.tenant().clone();
        let user = format!("{}{}{}", key.role, ctx.config.tenant_separator, key.tenant);
        let replicas = p.replicas().map(|r| r.pools().to_vec()).unwrap_or_default();
        let members =
            std::iter::once((p.clone(), false)).chain(replicas.into_iter().map(|r| (r, true)));
        for (pool, replica) in members {
            let load = pool.load();
            let (target, reason) = pool.target();
            let budget = pool.budget().view();
            let active_servers = load.connections.saturating_sub(load.idle);
            rs.push(vec![
                t(&tn.database),
                t(&user),
                t(load.clients.saturating_sub(load.waiting)),
                t(load.waiting),
                t(0),
                t(0),
                t(active_servers),
                t(0),
                t(0),
                t(load.idle),
                t(0),
                t(0),
                t(0),
                t(load.oldest_wait_ms / 1000),
                t((load.oldest_wait_ms % 1000) * 1000),
                t(format!("{:?}", tn.pool_mode).to_lowercase()),
                t(&tn.id),
                t(tn.tier.as_str()),
                t(&pool.health().name),
                t(if replica { "yes" } else { "no" }),
                t(pool.stats().pinned.get()),
                t(target),
                t(reason),
                t(budget.limit.map_or(-1, |n| n as i64)),
                t(budget.used),
                t(budget.waiting),
            ]);
        }
    }
    rs
}

fn unix(ts: SystemTime) -> String {
    humantime::format_rfc3339_seconds(ts).to_string()
}

/// PgBouncer's leading SHOW CLIENTS and SHOW SERVERS columns.
const CONNECTION_COLUMNS: &[(&str, Kind)] = &[
    ("type", Text),
    ("user", Text),
    ("database", Text),
    ("state", Text),
    ("addr", Text),
    ("port", Int),
    ("local_addr", Text),
    ("local_port", Int),
    ("connect_time", Text),
    ("request_time", Text),
    ("wait", Int),
    ("wait_us", Int),
    ("close_needed", Int),
    ("ptr", Text),
    ("link", Text),
    ("remote_pid", Int),
    ("tls", Text),
    ("application_name", Text),
];

/// PgBouncer's leading SHOW CLIENTS columns, then tenant.
fn clients(ctx: &ProxyContext) -> ResultSet {
    let mut rs = ResultSet::new(&[CONNECTION_COLUMNS, &[("tenant", Text)]].concat());
    let local = ctx.config.listen;
    for c in ctx.cancels.clients() {
        let Some(info) = &c.info else {
            continue;
        };
        rs.push(vec![
            t("C"),
            t(format!(
                "{}{}{}",
                info.role, ctx.config.tenant_separator, c.tenant
            )),
            t(&info.database),
            t(if c.linked { "active" } else { "idle" }),
            t(info.addr.ip()),
            t(info.addr.port()),
            t(local.ip()),
            t(local.port()),
            t(unix(info.connected)),
            t(unix(info.connected)),
            t(0),
            t(0),
            t(0),
            t(format!("{:x}", c.pid)),
            None,
            t(c.pid),
            t(info.tls.as_deref().unwrap_or("")),
            t(&info.application_name),
            t(&c.tenant),
        ]);
    }
    rs
}

/// PgBouncer's leading SHOW SERVERS columns, then tenant and role.
fn servers(ctx: &ProxyContext) -> ResultSet {
    let mut rs =
        ResultSet::new(&[CONNECTION_COLUMNS, &[("tenant", Text), ("server", Text)]].concat());
    for c in ctx.pools.census().all() {
        let active = c.active.load(std::sync::atomic::Ordering::Relaxed);
        let tenant = c.tenant.lock().map(|t| t.to_string()).unwrap_or_default();
        rs.push(vec![
            t("S"),
            t(&c.user),
            t(&c.database),
            t(if active { "active" } else { "idle" }),
            t(&c.host),
            t(c.port),
            None,
            None,
            t(unix(c.connected)),
            t(unix(c.connected)),
            t(0),
            t(0),
            t(0),
            t(format!("{:x}", c.id)),
            None,
            t(c.pid),
            t(c.tls.as_deref().unwrap_or("")),
            t(""),
            t(tenant),
            t(&c.server),
        ]);
    }
    rs
}

/// PgBouncer's SHOW STATS columns (totals since start; averages per second since start, and
/// per transaction or query for times; query time is request to ReadyForQuery, transaction
/// mode only), then tenant.
fn stats(ctx: &ProxyContext) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("database", Text),
        ("total_xact_count", Int),
        ("total_query_count", Int),
        ("total_received", Int),
        ("total_sent", Int),
        ("total_xact_time", Int),
        ("total_query_time", Int),
        ("total_wait_time", Int),
        ("avg_xact_count", Int),
        ("avg_query_count", Int),
        ("avg_recv", Int),
        ("avg_sent", Int),
        ("avg_xact_time", Int),
        ("avg_query_time", Int),
        ("avg_wait_time", Int),
        ("tenant", Text),
        ("user", Text),
    ]);
    let uptime = ctx.started.elapsed().as_secs().max(1);
    for (key, s) in ctx.pools.all_stats() {
        let s = s.snapshot();
        let database = ctx
            .registry
            .tenant(&key.tenant)
            .map(|tn| tn.database.clone())
            .unwrap_or_default();
        let per_xact = |v: u64| v.checked_div(s.xacts).unwrap_or(0);
        rs.push(vec![
            t(database),
            t(s.xacts),
            t(s.queries),
            t(s.bytes_in),
            t(s.bytes_out),
            t(s.xact_us),
            t(s.query_us),
            t(s.wait_us),
            t(s.xacts / uptime),
            t(s.queries / uptime),
            t(s.bytes_in / uptime),
            t(s.bytes_out / uptime),
            t(per_xact(s.xact_us)),
            t(s.query_us.checked_div(s.queries).unwrap_or(0)),
            t(per_xact(s.wait_us)),
            t(&key.tenant),
            t(&key.role),
        ]);
    }
    rs
}

/// Per tenant, summed over its roles: what it used, for cost allocation.
fn usage(ctx: &ProxyContext) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("tenant", Text),
        ("transactions", Int),
        ("queries", Int),
        ("server_busy_us", Int),
        ("bytes_in", Int),
        ("bytes_out", Int),
        ("client_connection_seconds", Int),
    ]);
    let mut per = crate::admin::usage::totals(&ctx.pools);
    // Sessions still open count up to now.
    let now = SystemTime::now();
    for c in ctx.cancels.clients() {
        if let Some(info) = &c.info {
            let secs = now
                .duration_since(info.connected)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            per.entry(c.tenant.to_string())
                .or_default()
                .client_connection_seconds += secs;
        }
    }
    for (tenant, u) in per {
        rs.push(vec![
            t(tenant),
            t(u.transactions),
            t(u.queries),
            t(u.server_busy_us),
            t(u.bytes_in),
            t(u.bytes_out),
            t(u.client_connection_seconds),
        ]);
    }
    rs
}

/// Servers and replicas as the health checker last saw them.
fn health(ctx: &ProxyContext) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("server", Text),
        ("addr", Text),
        ("healthy", Text),
        ("down", Text),
        ("standby", Text),
        ("lag_ms", Int),
        ("last_error", Text),
    ]);
    for v in ctx.pools.health().views() {
        rs.push(vec![
            t(&v.name),
            t(&v.addr),
            t(v.healthy),
            t(v.down),
            t(v.in_recovery),
            v.lag_ms.map(|l| l.to_string()),
            v.last_error.clone(),
        ]);
    }
    rs
}
