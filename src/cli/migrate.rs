//! `pgtenant migrate`: pending migrations for every auto-updating tenant, N at a time, with a
//! progress bar and a final table. One tenant's failure is reported and the others go on.

use futures_util::stream::{self, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::config::Tier;
use crate::tenancy::migrate::{self, Migration};
use crate::tenancy::provision::{self, admin_client};
use crate::tenancy::store::{RegistryStore, TenantRecord};

use super::output;

#[derive(Debug, Serialize)]
pub struct TenantOutcome {
    pub tenant: String,
    pub tier: String,
    /// Versions applied (or, in a dry run, that would be).
    pub versions: Vec<i64>,
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("another `pgtenant migrate` is running against this registry; try again when it ends")]
    Locked,
    #[error(transparent)]
    Registry(#[from] crate::tenancy::store::RegistryError),
}

/// Migrates (or with `dry_run`, plans) every provisioned, non-deleted tenant with auto_update.
pub async fn run(
    store: &RegistryStore,
    migrations: &[Migration],
    concurrency: usize,
    dry_run: bool,
    progress: bool,
) -> Result<Vec<TenantOutcome>, RunError> {
    // Session-level: held until this connection ends, so a crashed run frees it too.
    let locked: bool = store
        .client
        .query_one(
            "SELECT pg_try_advisory_lock(hashtext('pgtenant migrate'))",
            &[],
        )
        .await
        .map_err(crate::tenancy::store::RegistryError::from)?
        .get(0);
    if !locked {
        return Err(RunError::Locked);
    }
    let tenants: Vec<TenantRecord> = store
        .tenant_rows(None)
        .await?
        .into_iter()
        .map(|r| r.tenant)
        .filter(|t| t.provisioned && t.auto_update && t.status != "deleted")
        .collect();
    let bar = if progress {
        let b = ProgressBar::new(tenants.len() as u64);
        b.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} tenants {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let mut outcomes: Vec<TenantOutcome> = stream::iter(tenants.iter())
        .map(|t| {
            let bar = bar.clone();
            async move {
                let r = one(store, t, migrations, dry_run).await;
                bar.inc(1);
                bar.set_message(t.id.clone());
                let (versions, error) = match r {
                    Ok(v) => (v, None),
                    Err(e) => (Vec::new(), Some(e)),
                };
                TenantOutcome {
                    tenant: t.id.clone(),
                    tier: t.tier.clone(),
                    versions,
                    error,
                }
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    bar.finish_and_clear();
    let _ = store
        .client
        .execute(
            "SELECT pg_advisory_unlock(hashtext('pgtenant migrate'))",
            &[],
        )
        .await;
    outcomes.sort_by(|a, b| a.tenant.cmp(&b.tenant));
    Ok(outcomes)
}

async fn one(
    store: &RegistryStore,
    t: &TenantRecord,
    migrations: &[Migration],
    dry_run: bool,
) -> Result<Vec<i64>, String> {
    let mut db = admin_client(store, &t.server, &t.database)
        .await
        .map_err(|e| e.to_string())?;
    if dry_run {
        let tier = Tier::parse(&t.tier).unwrap_or(Tier::Database);
        let place = migrate::place_of(t, tier);
        return migrate::pending(&db, &place, migrations)
            .await
            .map(|p| p.iter().map(|m| m.version).collect())
            .map_err(|e| e.to_string());
    }
    provision::migrate_one(store, t, &mut db, migrations)
        .await
        .map_err(|e| e.to_string())
}

pub fn render(outcomes: &[TenantOutcome], dry_run: bool) -> String {
    let rows = outcomes
        .iter()
        .map(|o| {
            let versions = if o.versions.is_empty() {
                "-".to_string()
            } else {
                o.versions
                    .iter()
                    .map(|v| format!("V{v}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let result = match (&o.error, dry_run, o.versions.is_empty()) {
                (Some(e), _, _) => format!("FAILED: {e}"),
                (None, true, true) => "up to date".into(),
                (None, true, false) => "pending".into(),
                (None, false, true) => "up to date".into(),
                (None, false, false) => "migrated".into(),
            };
            vec![o.tenant.clone(), o.tier.clone(), versions, result]
        })
        .collect();
    let head = if dry_run {
        ["tenant", "tier", "would apply", "result"]
    } else {
        ["tenant", "tier", "applied", "result"]
    };
    let failed = outcomes.iter().filter(|o| o.error.is_some()).count();
    format!(
        "{}\n{} tenants, {} failed",
        output::table(&head, rows),
        outcomes.len(),
        failed
    )
}
