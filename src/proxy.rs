//! A running proxy: builds its shared context (`crate::context`), binds the listener, runs the
//! background tasks (health checks, metrics, usage, registry changes), and stops on request.

use std::net::SocketAddr;
use std::sync::Arc;

use rand::RngCore;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use crate::context::{row_secret, ProxyContext, ServeError};

use crate::clients::cancel::CancelRegistry;
use crate::clients::limits::{ClientLimits, PendingLogins};
use crate::config::Config;
use crate::frontend::listener::accept_loop;
use crate::pool::Pools;
use crate::tenancy::pg_registry::PgRegistry;
use crate::tenancy::{LayeredRegistry, StaticRegistry, TenantRegistry};

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
                let peer = crate::clients::cancel::Peer {
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
    let instance = crate::admin::usage::instance_id();
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
        let now = crate::admin::usage::totals(&ctx.pools);
        match crate::admin::usage::flush(s, &instance, &now, &flushed).await {
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
