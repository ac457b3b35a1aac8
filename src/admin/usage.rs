//! Usage accounting for cost allocation: each proxy adds what its tenants used since its last
//! flush to hourly rows of its own in the registry (`pgtenant.tenant_usage`), once a minute, so
//! several proxies never count the same work twice; `pgtenant usage` sums them on read.
//! A session's connection time is credited to the hour it ends in.

use std::collections::BTreeMap;

use crate::pool::Pools;

use crate::tenancy::store::{RegistryError, RegistryStore};

/// What a tenant used, in the units stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    pub transactions: i64,
    pub queries: i64,
    pub server_busy_us: i64,
    pub bytes_in: i64,
    pub bytes_out: i64,
    pub client_connection_seconds: i64,
}

impl Usage {
    fn minus(self, o: Usage) -> Usage {
        Usage {
            transactions: self.transactions - o.transactions,
            queries: self.queries - o.queries,
            server_busy_us: self.server_busy_us - o.server_busy_us,
            bytes_in: self.bytes_in - o.bytes_in,
            bytes_out: self.bytes_out - o.bytes_out,
            client_connection_seconds: self.client_connection_seconds - o.client_connection_seconds,
        }
    }

    fn is_zero(&self) -> bool {
        *self == Usage::default()
    }
}

/// Per tenant, everything counted since start (all roles).
pub fn totals(pools: &Pools) -> BTreeMap<String, Usage> {
    let mut per: BTreeMap<String, (Usage, u64)> = BTreeMap::new();
    for (key, stats) in pools.all_stats() {
        let s = stats.snapshot();
        let (u, client_ms) = per.entry(key.tenant.to_string()).or_default();
        u.transactions += s.xacts as i64;
        u.queries += s.queries as i64;
        u.server_busy_us += s.xact_us as i64;
        u.bytes_in += s.bytes_in as i64;
        u.bytes_out += s.bytes_out as i64;
        *client_ms += s.client_ms;
    }
    per.into_iter()
        .map(|(t, (mut u, ms))| {
            u.client_connection_seconds = (ms / 1000) as i64;
            (t, u)
        })
        .collect()
}

/// This process's name in the usage rows: host, process id and a random part.
pub fn instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    format!(
        "{host}:{}:{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// Adds `now - before` per tenant to this instance's row of the current hour.
pub async fn flush(
    store: &RegistryStore,
    instance: &str,
    now: &BTreeMap<String, Usage>,
    before: &BTreeMap<String, Usage>,
) -> Result<(), RegistryError> {
    for (tenant, u) in now {
        let d = u.minus(before.get(tenant).copied().unwrap_or_default());
        if d.is_zero() {
            continue;
        }
        store
            .client
            .execute(
                "INSERT INTO pgtenant.tenant_usage AS u (instance, tenant_id, hour, transactions,
                     queries, server_busy_us, bytes_in, bytes_out, client_connection_seconds)
                 VALUES ($1, $2, date_trunc('hour', now()), $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (instance, tenant_id, hour) DO UPDATE SET
                     transactions = u.transactions + EXCLUDED.transactions,
                     queries = u.queries + EXCLUDED.queries,
                     server_busy_us = u.server_busy_us + EXCLUDED.server_busy_us,
                     bytes_in = u.bytes_in + EXCLUDED.bytes_in,
                     bytes_out = u.bytes_out + EXCLUDED.bytes_out,
                     client_connection_seconds =
                         u.client_connection_seconds + EXCLUDED.client_connection_seconds",
                &[
                    &instance,
                    tenant,
                    &d.transactions,
                    &d.queries,
                    &d.server_busy_us,
                    &d.bytes_in,
                    &d.bytes_out,
                    &d.client_connection_seconds,
                ],
            )
            .await?;
    }
    Ok(())
}

/// One row of `pgtenant usage`: a tenant's hour, summed over the proxies.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UsageRow {
    pub tenant: String,
    pub hour: String,
    #[serde(flatten)]
    pub usage: Usage,
}

/// Hourly usage since `since` (an SQL timestamp or interval expression's value, e.g.
/// `2026-11-01` or `24 hours` ago), for one tenant or all.
pub async fn read(
    store: &RegistryStore,
    since: Option<&str>,
    tenant: Option<&str>,
) -> Result<Vec<UsageRow>, RegistryError> {
    let rows = store
        .client
        .query(
            "SELECT tenant_id, to_char(hour AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:00'),
                    sum(transactions)::bigint, sum(queries)::bigint, sum(server_busy_us)::bigint,
                    sum(bytes_in)::bigint, sum(bytes_out)::bigint,
                    sum(client_connection_seconds)::bigint
               FROM pgtenant.tenant_usage
              WHERE hour >= date_trunc('hour', COALESCE($1::text::timestamptz, '-infinity'))
                AND ($2::text IS NULL OR tenant_id = $2)
              GROUP BY tenant_id, hour
              ORDER BY hour, tenant_id",
            &[&since, &tenant],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| UsageRow {
            tenant: r.get(0),
            hour: r.get(1),
            usage: Usage {
                transactions: r.get(2),
                queries: r.get(3),
                server_busy_us: r.get(4),
                bytes_in: r.get(5),
                bytes_out: r.get(6),
                client_connection_seconds: r.get(7),
            },
        })
        .collect())
}
