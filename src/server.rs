//! A running proxy: its shared context, its listener, and a handle to stop it.

use std::net::SocketAddr;
use std::sync::Arc;

use rand::RngCore;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::{Config, ConfigError};
use crate::frontend::cancel::CancelRegistry;
use crate::frontend::limits::{ClientLimits, PendingLogins};
use crate::frontend::listener::accept_loop;
use crate::pool::Pools;
use crate::tenancy::crypto::{KeySource, RowSecret};
use crate::tenancy::pg_registry::PgRegistry;
use crate::tenancy::{LayeredRegistry, StaticRegistry, TenantRegistry};

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
    shutdown: tokio::sync::Notify,
    shutting_down: std::sync::atomic::AtomicBool,
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

    async fn shutdown_requested(&self) {
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

pub struct Proxy {
    ctx: Arc<ProxyContext>,
    listener: TcpListener,
    /// The Prometheus endpoint's listener, when configured.
    metrics: Option<TcpListener>,
}

impl Proxy {
    /// Binds the configured address with the config's own tenants and, when `[registry]` is
    /// set, the registry database's (a tenant defined in both is served from the file).
    pub async fn bind(config: Config) -> Result<Proxy, ServeError> {
        let file = Arc::new(StaticRegistry::from_config(&config)?);
        let fixed: Arc<dyn TenantRegistry> = file.clone();
        let registry: Arc<dyn TenantRegistry> = match &config.registry {
            Some(r) => {
                let db = PgRegistry::start(r.clone(), config.pool.clone()).await?;
                Arc::new(LayeredRegistry(vec![fixed, db]))
            }
            None => fixed,
        };
        Proxy::bind_inner(config, registry, Some(file)).await
    }

    pub async fn bind_with_registry(
        config: Config,
        registry: Arc<dyn TenantRegistry>,
    ) -> Result<Proxy, ServeError> {
        Proxy::bind_inner(config, registry, None).await
    }

    async fn bind_inner(
        config: Config,
        registry: Arc<dyn TenantRegistry>,
        file_tenants: Option<Arc<StaticRegistry>>,
    ) -> Result<Proxy, ServeError> {
        let metrics = match config.admin.metrics_listen {
            Some(addr) => Some(
                crate::admin::metrics::bind(addr)
                    .await
                    .map_err(|source| ServeError::Bind { addr, source })?,
            ),
            None => None,
        };
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServeError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let mut mock_key = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut mock_key);
        let repair = config.registry.as_ref().map(|r| {
            crate::backend::RoleRepair::new(Arc::new(
                crate::tenancy::role_repair::RegistryRoleRepair::new(r.clone()),
            ))
        });
        let pools = Pools::new(config.pool.clone(), row_secret(&config).await?)
            .with_role_repair(repair)
            .with_health(config.health.clone());
        let limits = ClientLimits::new(config.pool.max_client_connections);
        let peers = config
            .peers
            .iter()
            .map(|p| {
                let peer = crate::frontend::cancel::Peer {
                    host: p.host.clone(),
                    port: p.port,
                };
                (p.id, peer)
            })
            .collect();
        let cancels = Arc::new(CancelRegistry::with_peers(config.peer_id, peers));
        let pending = PendingLogins::new(config.max_pending_logins);
        let tls = crate::tls::TlsAcceptorState::new(&config.tls)?;
        let proxy = Proxy {
            ctx: Arc::new(ProxyContext {
                config,
                registry,
                pools,
                cancels,
                limits,
                pending,
                tls,
                mock_key,
                file_tenants,
                config_path: std::sync::OnceLock::new(),
                started: std::time::Instant::now(),
                metrics_addr: std::sync::OnceLock::new(),
                shutdown: tokio::sync::Notify::new(),
                shutting_down: std::sync::atomic::AtomicBool::new(false),
            }),
            listener,
            metrics: None,
        };
        let mut proxy = proxy;
        if let Some((l, addr)) = metrics {
            let _ = proxy.ctx.metrics_addr.set(addr);
            proxy.metrics = Some(l);
        }
        Ok(proxy)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.ctx.config.listen)
    }

    pub fn context(&self) -> Arc<ProxyContext> {
        self.ctx.clone()
    }

    /// Serves until `shutdown` resolves.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        tracing::info!(addr = %self.local_addr(), "pgtenant listening");
        let sweeper = tokio::spawn(sweep_idle_pools(self.ctx.clone()));
        let maintainer = tokio::spawn(maintain_pools(self.ctx.clone()));
        let follower = tokio::spawn(apply_registry_changes(self.ctx.clone()));
        let ctx = self.ctx.clone();
        let checker = tokio::spawn(async move { crate::pool::health_check::run(&ctx.pools).await });
        let (usage_stop, usage_stopped) = oneshot::channel::<()>();
        let usage = self
            .ctx
            .config
            .registry
            .is_some()
            .then(|| tokio::spawn(flush_usage(self.ctx.clone(), usage_stopped)));
        let exporter = self.metrics.map(|l| {
            tracing::info!(addr = ?self.ctx.metrics_addr.get(), "Prometheus endpoint at /metrics");
            tokio::spawn(crate::admin::metrics::serve(l, self.ctx.clone()))
        });
        let ctx = self.ctx.clone();
        let stop = async move {
            tokio::select! {
                _ = shutdown => {}
                _ = ctx.shutdown_requested() => {}
            }
        };
        accept_loop(self.listener, self.ctx.clone(), stop).await;
        self.ctx.drain().await;
        sweeper.abort();
        maintainer.abort();
        follower.abort();
        checker.abort();
        if let Some(e) = exporter {
            e.abort();
        }
        if let Some(u) = usage {
            // A last flush, so what the final minute used is not lost.
            let _ = usage_stop.send(());
            if tokio::time::timeout(std::time::Duration::from_secs(10), u)
                .await
                .is_err()
            {
                tracing::warn!("the last usage flush did not finish in time");
            }
        }
    }

    /// Serves on a background task.
    pub fn spawn(self) -> ProxyHandle {
        let addr = self.local_addr();
        let ctx = self.ctx.clone();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(self.run(async move {
            let _ = rx.await;
        }));
        ProxyHandle {
            addr,
            ctx,
            stop: Some(tx),
            task,
        }
    }
}

pub struct ProxyHandle {
    pub addr: SocketAddr,
    pub ctx: Arc<ProxyContext>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl ProxyHandle {
    /// Stops accepting new clients.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// Adds what tenants used to the registry's hourly usage rows every `registry.usage_interval`;
/// a failed flush keeps its deltas for the next one.
async fn flush_usage(ctx: Arc<ProxyContext>, mut stop: oneshot::Receiver<()>) {
    let Some(cfg) = ctx.config.registry.clone() else {
        return;
    };
    let interval = std::time::Duration::from_secs(cfg.usage_interval.max(1));
    let instance = crate::tenancy::usage::instance_id();
    let mut flushed = std::collections::BTreeMap::new();
    let mut store = None;
    let mut last = false;
    while !last {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = &mut stop => last = true,
        }
        if store.is_none() {
            match crate::tenancy::store::RegistryStore::open(&cfg).await {
                Ok(s) => store = Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "usage flush: registry unreachable; will retry");
                    continue;
                }
            }
        }
        let Some(s) = &store else {
            continue;
        };
        let now = crate::tenancy::usage::totals(&ctx.pools);
        match crate::tenancy::usage::flush(s, &instance, &now, &flushed).await {
            Ok(()) => flushed = now,
            Err(e) => {
                tracing::warn!(error = %e, "usage flush failed; will retry");
                store = None;
            }
        }
    }
}

/// Once a second: idle connections past their time close, minimums refill, pool targets
/// follow demand (see `pool::autoscale`).
async fn maintain_pools(ctx: Arc<ProxyContext>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        ctx.pools.maintain();
    }
}

/// Drops pools of tenants that have gone quiet, so thousands of tenants do not each keep a pool.
async fn sweep_idle_pools(ctx: Arc<ProxyContext>) {
    let idle = std::time::Duration::from_secs(ctx.config.pool.pool_idle_timeout.max(1));
    let mut tick = tokio::time::interval((idle / 2).clamp(
        std::time::Duration::from_millis(500),
        std::time::Duration::from_secs(30),
    ));
    loop {
        tick.tick().await;
        let dropped = ctx.pools.sweep(idle);
        if dropped > 0 {
            tracing::debug!(dropped, "idle pools dropped");
        }
    }
}

/// Rebuilds pools from changed registry entries (of every layer: the config file's and the
/// registry database's) and ends sessions the operator asked to end.
async fn apply_registry_changes(ctx: Arc<ProxyContext>) {
    let streams = ctx.registry.change_streams();
    futures_util::future::join_all(streams.into_iter().map(|s| follow_changes(ctx.clone(), s)))
        .await;
}

async fn follow_changes(
    ctx: Arc<ProxyContext>,
    mut changes: tokio::sync::broadcast::Receiver<crate::tenancy::TenantChange>,
) {
    loop {
        match changes.recv().await {
            Ok(c) => {
                // The file's tenants shadow the registry's.
                let now = ctx.registry.tenant(&c.id);
                ctx.pools.refresh(&c.id, now.as_ref());
                if c.terminate {
                    let reason = match &now {
                        None => format!(
                            "terminating connection because tenant \"{}\" was deleted",
                            c.id
                        ),
                        Some(t) if t.status == crate::config::TenantStatus::Suspended => format!(
                            "terminating connection because tenant \"{}\" was suspended",
                            c.id
                        ),
                        Some(_) => format!(
                            "terminating connection at the operator's request for tenant \"{}\"",
                            c.id
                        ),
                    };
                    let n = ctx.cancels.terminate_tenant(&c.id, &reason);
                    tracing::info!(tenant = %c.id, sessions = n, "tenant sessions terminated");
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(
                    missed = n,
                    "registry changes came faster than they were applied"
                );
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}
