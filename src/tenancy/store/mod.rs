//! The registry database: its schema, its rows, and turning rows into served tenants.
//!
//! Passwords enter and leave this module sealed (see `crypto`); only `to_tenant` opens them,
//! in memory, for the pools.

mod records;
pub mod schema;

use std::str::FromStr;

use tokio_postgres::Client;

use crate::config::RegistryConfig;
use crate::pg_error::describe_pg_error;
use crate::tenancy::crypto::{CryptoError, KeySource, Keyring};

pub use records::{
    pool_mode_str, server_map, to_tenant, NewServer, RoleRecord, ServerRecord, TenantRecord,
    TenantRows, TenantSettings, UserRecord,
};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot connect to the registry: {0}")]
    Connect(String),
    #[error("registry query failed: {0}")]
    Sql(String),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error("{kind} \"{id}\" does not exist in the registry")]
    NotFound { kind: &'static str, id: String },
    #[error("{0}")]
    Invalid(String),
}

impl RegistryError {
    pub fn no_tenant(id: &str) -> RegistryError {
        RegistryError::NotFound {
            kind: "tenant",
            id: id.to_string(),
        }
    }
}

impl From<tokio_postgres::Error> for RegistryError {
    fn from(e: tokio_postgres::Error) -> Self {
        RegistryError::Sql(describe_pg_error(&e))
    }
}

/// Connection settings for the registry, with the password taken from the environment.
pub fn pg_config(cfg: &RegistryConfig) -> Result<tokio_postgres::Config, RegistryError> {
    let mut pg = tokio_postgres::Config::from_str(&cfg.url)
        .map_err(|e| RegistryError::Connect(format!("registry.url: {e}")))?;
    if let Some(var) = &cfg.password_env {
        let pw = std::env::var(var).map_err(|_| {
            RegistryError::Connect(format!(
                "registry.password_env: environment variable {var} is not set"
            ))
        })?;
        pg.password(pw);
    }
    if pg.get_application_name().is_none() {
        pg.application_name("pgtenant");
    }
    // "already exists, skipping" notices are expected on every start.
    pg.options("-c client_min_messages=warning");
    pg.connect_timeout(std::time::Duration::from_secs(5));
    Ok(pg)
}

pub fn keyring(cfg: &RegistryConfig) -> Result<Keyring, CryptoError> {
    let current = KeySource::parse(&cfg.key)?;
    let old = cfg
        .old_keys
        .iter()
        .map(|k| KeySource::parse(k))
        .collect::<Result<Vec<_>, _>>()?;
    Keyring::load(&current, &old)
}

/// A connection to the registry plus the keyring that reads and writes its secrets.
pub struct RegistryStore {
    pub client: Client,
    pub keys: Keyring,
    pub cfg: RegistryConfig,
}

impl RegistryStore {
    /// Connects and brings the registry schema up to date.
    pub async fn open(cfg: &RegistryConfig) -> Result<RegistryStore, RegistryError> {
        let keys = keyring(cfg)?;
        let client = connect(cfg).await?;
        let store = RegistryStore {
            client,
            keys,
            cfg: cfg.clone(),
        };
        store.upgrade_schema().await?;
        Ok(store)
    }

    /// Creates the registry schema or applies the steps it lacks, one runner at a time.
    pub async fn upgrade_schema(&self) -> Result<(), RegistryError> {
        let c = &self.client;
        c.batch_execute(
            "BEGIN;
             SELECT pg_advisory_xact_lock(hashtext('pgtenant registry schema'));
             CREATE SCHEMA IF NOT EXISTS pgtenant;
             CREATE TABLE IF NOT EXISTS pgtenant.schema_version (
                 version integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now());",
        )
        .await?;
        let result = async {
            let current: i32 = c
                .query_one(
                    "SELECT COALESCE(max(version), 0) FROM pgtenant.schema_version",
                    &[],
                )
                .await?
                .get(0);
            if current as usize > schema::STEPS.len() {
                return Err(RegistryError::Invalid(format!(
                    "the registry schema is at version {current}, newer than this pgtenant knows ({}); upgrade pgtenant",
                    schema::STEPS.len()
                )));
            }
            for (i, step) in schema::STEPS.iter().enumerate().skip(current as usize) {
                c.batch_execute(step).await?;
                c.execute(
                    "INSERT INTO pgtenant.schema_version (version) VALUES ($1)",
                    &[&(i as i32 + 1)],
                )
                .await?;
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => c.batch_execute("COMMIT").await?,
            Err(e) => {
                let _ = c.batch_execute("ROLLBACK").await;
                return Err(e);
            }
        }
        Ok(())
    }
}

/// The registry's TLS policy: `[registry] sslmode` and its files, else the URL's sslmode.
pub fn registry_tls(
    cfg: &RegistryConfig,
    pg: &mut tokio_postgres::Config,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, RegistryError> {
    let mut tls = cfg.backend_tls();
    if tls.sslmode.is_none() {
        use tokio_postgres::config::SslMode as PgMode;
        tls.sslmode = Some(match pg.get_ssl_mode() {
            PgMode::Disable => crate::config::SslMode::Disable,
            PgMode::Require => crate::config::SslMode::Require,
            _ => crate::config::SslMode::Prefer,
        });
    }
    let tls = crate::tls::BackendTls::build(&tls)
        .map_err(|e| RegistryError::Connect(format!("registry: {e}")))?;
    Ok(tls.for_tokio_postgres(pg))
}

/// A plain client; the connection runs on a background task.
pub async fn connect(cfg: &RegistryConfig) -> Result<Client, RegistryError> {
    let mut pg = pg_config(cfg)?;
    let connector = registry_tls(cfg, &mut pg)?;
    let (client, conn) = pg
        .connect(connector)
        .await
        .map_err(|e| RegistryError::Connect(describe_pg_error(&e)))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "registry connection closed");
        }
    });
    Ok(client)
}
