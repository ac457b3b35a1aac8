//! Per-tenant migrations: versioned SQL files applied in the right place for each tier — the
//! tenant's own database, its schema (through search_path), or once for the shared row-tier
//! tables — and recorded both where they ran and in the registry.
//!
//! Hand-written rather than refinery or sqlx-migrate: those track one database per history
//! table, while here one file set lands in three kinds of place, the shared row-tier tables
//! must be migrated once for many tenants, and every tenant's history is also kept in the
//! registry. The runner is small: read, sort, checksum, apply in a transaction.

use std::path::Path;

use sha2::{Digest, Sha256};
use tokio_postgres::Client;

use crate::config::Tier;
use crate::pg_error::describe_pg_error;
use crate::tenancy::tier::quote_ident;

use super::store::{RegistryError, RegistryStore, TenantRecord};

/// Table, in each migrated place, that records what ran there (in the same transaction).
pub const HISTORY_TABLE: &str = "pgtenant_migrations";

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("cannot read migrations from {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("migration file {0} is not named V<version>__<name>.sql")]
    BadName(String),
    #[error("migration version {0} appears twice")]
    Duplicate(i64),
    #[error("migration V{version} ({name}) failed: {message}")]
    Failed {
        version: i64,
        name: String,
        message: String,
    },
    #[error("migration V{version} was changed after it was applied (checksum differs)")]
    Changed { version: i64 },
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("{0}")]
    Sql(String),
}

impl From<tokio_postgres::Error> for MigrateError {
    fn from(e: tokio_postgres::Error) -> Self {
        MigrateError::Sql(describe_pg_error(&e))
    }
}

#[derive(Debug, Clone)]
pub struct Migration {
    pub version: i64,
    pub name: String,
    pub sql: String,
    pub checksum: String,
}

/// Reads `V<version>__<name>.sql` files, sorted by version. A missing directory is an error;
/// other files are ignored.
pub fn load_dir(dir: &Path) -> Result<Vec<Migration>, MigrateError> {
    let read_err = |reason: String| MigrateError::Read {
        path: dir.display().to_string(),
        reason,
    };
    let mut out: Vec<Migration> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| read_err(e.to_string()))? {
        let entry = entry.map_err(|e| read_err(e.to_string()))?;
        let file = entry.file_name().to_string_lossy().to_string();
        let Some(stem) = file.strip_suffix(".sql") else {
            continue;
        };
        let (version, name) = stem
            .strip_prefix('V')
            .and_then(|s| s.split_once("__"))
            .and_then(|(v, n)| Some((v.parse::<i64>().ok()?, n)))
            .filter(|(v, n)| *v > 0 && !n.is_empty())
            .ok_or_else(|| MigrateError::BadName(file.clone()))?;
        let sql = std::fs::read_to_string(entry.path()).map_err(|e| read_err(e.to_string()))?;
        let checksum = Sha256::digest(sql.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        out.push(Migration {
            version,
            name: name.replace('_', " "),
            sql,
            checksum,
        });
    }
    out.sort_by_key(|m| m.version);
    for w in out.windows(2) {
        if w[0].version == w[1].version {
            return Err(MigrateError::Duplicate(w[0].version));
        }
    }
    Ok(out)
}

/// Where a tenant's migrations run and are recorded.
pub struct Place {
    pub database: String,
    /// The schema migrations run in (search_path) and where the history table lives.
    pub schema: String,
}

pub fn place_of(t: &TenantRecord, tier: Tier) -> Place {
    Place {
        database: t.database.clone(),
        schema: match tier {
            Tier::Schema => t.schema.clone().unwrap_or_else(|| "public".into()),
            Tier::Database | Tier::Row => "public".into(),
        },
    }
}

/// The versions not yet applied at `place` (checksums of applied ones verified).
pub async fn pending<'a>(
    db: &Client,
    place: &Place,
    all: &'a [Migration],
) -> Result<Vec<&'a Migration>, MigrateError> {
    let table = format!("{}.{HISTORY_TABLE}", quote_ident(&place.schema));
    let exists: bool = db
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await?
        .get(0);
    let applied: Vec<(i64, String)> = if exists {
        db.query(&format!("SELECT version, checksum FROM {table}"), &[])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    } else {
        Vec::new()
    };
    let mut out = Vec::new();
    for m in all {
        match applied.iter().find(|(v, _)| *v == m.version) {
            Some((_, sum)) if *sum != m.checksum => {
                return Err(MigrateError::Changed { version: m.version })
            }
            Some(_) => {}
            None => out.push(m),
        }
    }
    Ok(out)
}

/// Serializes everyone who changes `place` (migrations, grants, policies): concurrent
/// GRANTs on one object fail with "tuple concurrently updated", and a shared row-tier place
/// must be migrated once, not once per tenant. Held until `unlock_place`.
pub async fn lock_place(db: &Client, place: &Place) -> Result<(), tokio_postgres::Error> {
    db.execute(
        "SELECT pg_advisory_lock(hashtext('pgtenant place ' || $1))",
        &[&place.schema],
    )
    .await
    .map(|_| ())
}

pub async fn unlock_place(db: &Client, place: &Place) {
    let _ = db
        .execute(
            "SELECT pg_advisory_unlock(hashtext('pgtenant place ' || $1))",
            &[&place.schema],
        )
        .await;
}

/// Applies what is pending at `place` (whose lock the caller holds), each migration in its own
/// transaction together with its history row. Returns the versions applied.
pub async fn apply(
    db: &mut Client,
    place: &Place,
    all: &[Migration],
) -> Result<Vec<i64>, MigrateError> {
    let schema = quote_ident(&place.schema);
    let table = format!("{schema}.{HISTORY_TABLE}");
    db.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {table} (
             version bigint PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now())"
    ))
    .await?;
    let todo: Vec<Migration> = pending(db, place, all)
        .await?
        .into_iter()
        .cloned()
        .collect();
    let mut done = Vec::new();
    for m in todo {
        let tx = db.transaction().await?;
        let run = async {
            tx.batch_execute(&format!("SET LOCAL search_path = {schema}"))
                .await?;
            tx.batch_execute(&m.sql).await?;
            tx.execute(
                &format!("INSERT INTO {table} (version, name, checksum) VALUES ($1, $2, $3)"),
                &[&m.version, &m.name, &m.checksum],
            )
            .await?;
            Ok::<(), tokio_postgres::Error>(())
        }
        .await;
        match run {
            Ok(()) => tx.commit().await?,
            Err(e) => {
                return Err(MigrateError::Failed {
                    version: m.version,
                    name: m.name.clone(),
                    message: describe_pg_error(&e),
                })
            }
        }
        done.push(m.version);
    }
    Ok(done)
}

/// Mirrors what ran at the tenant's place into the registry's per-tenant history.
pub async fn record(
    store: &RegistryStore,
    tenant: &str,
    db: &Client,
    place: &Place,
) -> Result<(), MigrateError> {
    let table = format!("{}.{HISTORY_TABLE}", quote_ident(&place.schema));
    let exists: bool = db
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await?
        .get(0);
    if !exists {
        return Ok(());
    }
    for r in db
        .query(&format!("SELECT version, name, checksum FROM {table}"), &[])
        .await?
    {
        let (v, n, c): (i64, String, String) = (r.get(0), r.get(1), r.get(2));
        store
            .client
            .execute(
                "INSERT INTO pgtenant.migrations (tenant_id, version, name, checksum)
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                &[&tenant, &v, &n, &c],
            )
            .await
            .map_err(RegistryError::from)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_load_sorted_by_version_and_others_are_ignored() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("V10__later.sql"), "SELECT 10").unwrap();
        std::fs::write(d.path().join("V2__add_accounts.sql"), "SELECT 2").unwrap();
        std::fs::write(d.path().join("README.md"), "x").unwrap();
        let m = load_dir(d.path()).unwrap();
        assert_eq!(m.iter().map(|m| m.version).collect::<Vec<_>>(), vec![2, 10]);
        assert_eq!(m[0].name, "add accounts");
    }

    #[test]
    fn a_badly_named_file_is_refused_by_name() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("001_init.sql"), "SELECT 1").unwrap();
        let e = load_dir(d.path()).unwrap_err();
        assert!(e.to_string().contains("001_init.sql"), "{e}");
    }

    #[test]
    fn duplicate_versions_are_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("V1__a.sql"), "SELECT 1").unwrap();
        std::fs::write(d.path().join("V01__b.sql"), "SELECT 1").unwrap();
        assert!(matches!(
            load_dir(d.path()),
            Err(MigrateError::Duplicate(1))
        ));
    }
}
