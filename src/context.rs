//! What every session shares while the proxy runs: config, tenants, pools, clients, TLS
//! settings, and the shutdown signal. Below the front end and the admin console, which both
//! use it; `crate::proxy` builds it and runs the listener.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::clients::cancel::CancelRegistry;
use crate::clients::limits::{ClientLimits, PendingLogins};
use crate::config::{Config, ConfigError};
use crate::pool::Pools;
use crate::tenancy::crypto::{KeySource, RowSecret};
use crate::tenancy::{StaticRegistry, TenantRegistry};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Registry(#[from] crate::tenancy::store::RegistryError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("row_key: {0}")]
    RowKey(#[from] crate::tenancy::crypto::CryptoError),
}

/// The secret row-tier context keys derive from: `row_key`, else the one the registry keeps
/// sealed (it outlives master key rotations).
pub async fn row_secret(config: &Config) -> Result<Option<RowSecret>, ServeError> {
    match (&config.row_key, &config.registry) {
        (Some(k), _) => Ok(Some(KeySource::parse(k)?.load()?.row_secret())),
        (None, Some(r)) => {
            let store = crate::tenancy::store::RegistryStore::open(r).await?;
            Ok(Some(store.row_secret().await?))
        }
        (None, None) => Ok(None),
    }
}

/// What every session shares.
pub struct ProxyContext {
    pub config: Config,
    pub registry: Arc<dyn TenantRegistry>,
    pub pools: Pools,
    pub cancels: Arc<CancelRegistry>,
    pub limits: Arc<ClientLimits>,
    /// Client TLS settings, replaced by RELOAD.
    pub tls: crate::tls::TlsAcceptorState,
    /// Connections not yet authenticated (`max_pending_logins`).
    pub pending: Arc<PendingLogins>,
    /// Key for the mock SCRAM verifiers of unknown users; random per process.
    pub mock_key: [u8; 32],
    /// The config file's tenants, which `reload` replaces (None when the proxy was given its
    /// registry ready-made).
    pub file_tenants: Option<Arc<StaticRegistry>>,
    /// The config file, for RELOAD.
    pub config_path: std::sync::OnceLock<std::path::PathBuf>,
    pub started: std::time::Instant,
    /// Where the Prometheus endpoint listens, once bound.
    pub metrics_addr: std::sync::OnceLock<SocketAddr>,
    pub(crate) shutdown: tokio::sync::Notify,
    pub(crate) shutting_down: std::sync::atomic::AtomicBool,
}

impl ProxyContext {
    /// RELOAD: re-reads the config file the proxy was started with.
    pub fn reload_from_file(&self) -> Result<usize, ServeError> {
        let path = self.config_path.get().ok_or_else(|| {
            ServeError::Config(ConfigError::invalid(
                "reload",
                "this proxy was not started from a config file",
            ))
        })?;
        self.reload(&Config::load(path)?)
    }

    /// SHUTDOWN: stop accepting and drain, as SIGTERM does.
    pub fn request_shutdown(&self) {
        self.shutting_down
            .store(true, std::sync::atomic::Ordering::Release);
        self.shutdown.notify_waiters();
    }

    pub(crate) async fn shutdown_requested(&self) {
        loop {
            let n = self.shutdown.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self
                .shutting_down
                .load(std::sync::atomic::Ordering::Acquire)
            {
                return;
            }
            n.await;
        }
    }

    /// Lets sessions finish: clients idle between transactions are told at once (FATAL
    /// 57P01), those in a transaction when it ends; whatever is still open after
    /// `shutdown_timeout` is ended (its transaction rolled back).
    pub async fn drain(&self) {
        let open = self.cancels.len();
        tracing::info!(
            clients = open,
            "draining: no new clients; running transactions may finish"
        );
        self.cancels.begin_drain();
        let deadline = tokio::time::Instant::now()
            + std::time::Duration::from_secs(self.config.shutdown_timeout);
        while !self.cancels.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        if !self.cancels.is_empty() {
            let n = self
                .cancels
                .terminate_all("terminating connection: pgtenant is shutting down");
            tracing::warn!(
                clients = n,
                "shutdown_timeout reached; ending the remaining sessions"
            );
            let grace = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
            while !self.cancels.is_empty() && tokio::time::Instant::now() < grace {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
        tracing::info!("drained");
    }

    /// Applies a re-read config file (SIGHUP): tenants and servers, with their pools and
    /// replicas, change without a restart; clients of a changed tenant move to its new pools
    /// at their next transaction, none is dropped. Settings that only a restart can change
    /// (listen, pool, health, registry, worker_threads) are reported and left as they are.
    pub fn reload(&self, config: &Config) -> Result<usize, ServeError> {
        // New connections get the new certificates; connected clients keep their sessions.
        self.tls.reload(&config.tls)?;
        let Some(file) = &self.file_tenants else {
            return Ok(0);
        };
        let old = &self.config;
        let fixed = [
            (
                "listen",
                old.listen.to_string() != config.listen.to_string(),
            ),
            (
                "pool",
                format!("{:?}", old.pool) != format!("{:?}", config.pool),
            ),
            (
                "health",
                format!("{:?}", old.health) != format!("{:?}", config.health),
            ),
            (
                "registry",
                format!("{:?}", old.registry) != format!("{:?}", config.registry),
            ),
            (
                "worker_threads",
                old.worker_threads != config.worker_threads,
            ),
            (
                "tenant_separator",
                old.tenant_separator != config.tenant_separator,
            ),
            ("row_key", old.row_key != config.row_key),
            (
                "peer_id/peers",
                old.peer_id != config.peer_id || old.peers != config.peers,
            ),
            (
                "max_pending_logins",
                old.max_pending_logins != config.max_pending_logins,
            ),
            ("log.format", old.log.format != config.log.format),
        ];
        for (name, changed) in fixed {
            if changed {
                tracing::warn!(
                    setting = name,
                    "config reload: this setting changes only with a restart; kept as it was"
                );
            }
        }
        crate::logging::set_level(&config.log.level);
        let changed = file.reload(config)?;
        // Applied here too (the change followers will find nothing left to do), so the
        // caller's next request already meets the new pools.
        for id in &changed {
            self.pools.refresh(id, self.registry.tenant(id).as_ref());
        }
        tracing::info!(tenants_changed = changed.len(), "config reloaded");
        Ok(changed.len())
    }
}
