//! Tenants served from the registry database, kept fresh while the proxy runs: LISTEN/NOTIFY
//! brings each change at once, a periodic full reload catches anything missed, and a lost
//! registry connection is re-established with backoff while the last snapshot keeps serving.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::future::poll_fn;
use tokio::sync::{broadcast, mpsc};
use tokio_postgres::{AsyncMessage, Client};

use crate::config::{PoolConfig, RegistryConfig};
use crate::pg_error::describe_pg_error;

use super::registry::{TenantChange, TenantRegistry};
use super::store::{self, schema::CHANNEL, server_map, to_tenant, RegistryError, RegistryStore};
use super::Tenant;

/// Above this many changed tenants in one burst, one full reload is cheaper.
const FULL_RELOAD_BURST: usize = 64;

struct Entry {
    tenant: Arc<Tenant>,
    /// The stored rows the tenant was built from; equal rows keep the same `Arc`, so pools
    /// are rebuilt only when something really changed.
    fingerprint: String,
    generation: i64,
}

pub struct PgRegistry {
    snapshot: RwLock<HashMap<String, Entry>>,
    /// Admin console users: name → SCRAM verifier text.
    admins: RwLock<HashMap<String, String>>,
    changes: broadcast::Sender<TenantChange>,
    cfg: RegistryConfig,
    pool: PoolConfig,
}

impl TenantRegistry for PgRegistry {
    fn tenant(&self, id: &str) -> Option<Arc<Tenant>> {
        self.snapshot.read().ok()?.get(id).map(|e| e.tenant.clone())
    }

    fn tenants(&self) -> Vec<Arc<Tenant>> {
        self.snapshot
            .read()
            .map(|s| s.values().map(|e| e.tenant.clone()).collect())
            .unwrap_or_default()
    }

    fn changes(&self) -> Option<broadcast::Receiver<TenantChange>> {
        Some(self.changes.subscribe())
    }

    fn admin_verifier(&self, name: &str) -> Option<crate::credentials::ScramVerifier> {
        let admins = self.admins.read().ok()?;
        crate::credentials::ScramVerifier::parse(admins.get(name)?)
    }
}

impl PgRegistry {
    /// Loads every tenant (failing if the registry cannot be read, so a proxy never starts
    /// empty), then follows changes on a background task.
    pub async fn start(
        cfg: RegistryConfig,
        pool: PoolConfig,
    ) -> Result<Arc<PgRegistry>, RegistryError> {
        let store = RegistryStore::open(&cfg).await?;
        let (changes, _) = broadcast::channel(1024);
        let reg = Arc::new(PgRegistry {
            snapshot: RwLock::new(HashMap::new()),
            admins: RwLock::new(HashMap::new()),
            changes,
            cfg,
            pool,
        });
        reg.reload(&store, None).await?;
        tokio::spawn(follow(Arc::downgrade(&reg)));
        Ok(reg)
    }

    /// Reloads all tenants (`only` None) or the named ones, and announces what changed.
    async fn reload(
        &self,
        store: &RegistryStore,
        only: Option<&BTreeSet<String>>,
    ) -> Result<(), RegistryError> {
        let keys = &store.keys;
        if only.is_none() {
            let admins: HashMap<String, String> = store.admin_users().await?.into_iter().collect();
            if let Ok(mut a) = self.admins.write() {
                *a = admins;
            }
        }
        let servers = store.servers().await?;
        let server_fp: HashMap<&str, String> = servers
            .iter()
            .map(|s| (s.name.as_str(), format!("{}:{}", s.host, s.port)))
            .collect();
        let smap = server_map(&servers);
        let mut fresh: HashMap<String, Entry> = HashMap::new();
        let ids: Option<Vec<&str>> = only.map(|set| set.iter().map(String::as_str).collect());
        for rows in store.tenant_rows(ids.as_deref()).await? {
            let mut fingerprint = format!("{rows:?}");
            for s in std::iter::once(&rows.tenant.server).chain(&rows.tenant.replicas) {
                fingerprint.push_str(server_fp.get(s.as_str()).map_or("?", |v| v.as_str()));
            }
            let generation = rows.tenant.terminate_generation;
            if let Some(t) = to_tenant(&rows, &smap, keys, &self.pool) {
                fresh.insert(
                    t.id.clone(),
                    Entry {
                        tenant: t,
                        fingerprint,
                        generation,
                    },
                );
            }
        }
        let mut announce = Vec::new();
        let first_load;
        {
            let Ok(mut snap) = self.snapshot.write() else {
                return Ok(());
            };
            first_load = snap.is_empty() && only.is_none();
            let affected: Vec<String> = match only {
                None => snap
                    .keys()
                    .chain(fresh.keys())
                    .cloned()
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect(),
                Some(set) => set.iter().cloned().collect(),
            };
            for id in affected {
                let old = snap.remove(&id);
                match (old, fresh.remove(&id)) {
                    (Some(o), Some(n)) if o.fingerprint == n.fingerprint => {
                        snap.insert(id, o);
                    }
                    (old, Some(n)) => {
                        let terminate = old.as_ref().is_some_and(|o| n.generation > o.generation);
                        announce.push(TenantChange {
                            id: id.clone(),
                            now: Some(n.tenant.clone()),
                            terminate,
                        });
                        snap.insert(id, n);
                    }
                    (Some(_), None) => announce.push(TenantChange {
                        id,
                        now: None,
                        terminate: true,
                    }),
                    (None, None) => {}
                }
            }
        }
        for c in announce {
            if first_load {
                continue;
            }
            tracing::info!(tenant = %c.id, removed = c.now.is_none(), terminate = c.terminate, "registry change applied");
            let _ = self.changes.send(c);
        }
        Ok(())
    }
}

/// Follows the registry until the registry object is dropped.
async fn follow(reg: std::sync::Weak<PgRegistry>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let Some(r) = reg.upgrade() else { return };
        let cfg = r.cfg.clone();
        drop(r);
        match listen(&cfg).await {
            Ok((client, mut notes)) => {
                backoff = Duration::from_millis(200);
                let mut store = RegistryStore {
                    client,
                    keys: match store::keyring(&cfg) {
                        Ok(k) => k,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot load the master keys");
                            tokio::time::sleep(backoff).await;
                            continue;
                        }
                    },
                    cfg: cfg.clone(),
                };
                if let Err(e) = session(&reg, &mut store, &mut notes).await {
                    tracing::warn!(error = %e, "registry connection lost; serving the last snapshot and reconnecting");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot reach the registry; serving the last snapshot");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// A registry connection that forwards notification payloads to a channel.
async fn listen(
    cfg: &RegistryConfig,
) -> Result<(Client, mpsc::UnboundedReceiver<String>), RegistryError> {
    let mut pg = store::pg_config(cfg)?;
    let connector = store::registry_tls(cfg, &mut pg)?;
    let (client, mut conn) = pg
        .connect(connector)
        .await
        .map_err(|e| RegistryError::Connect(describe_pg_error(&e)))?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(m) = poll_fn(|cx| conn.poll_message(cx)).await {
            match m {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n.payload().to_string()).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "registry listener connection ended");
                    return;
                }
            }
        }
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    Ok((client, rx))
}

async fn session(
    reg: &std::sync::Weak<PgRegistry>,
    store: &mut RegistryStore,
    notes: &mut mpsc::UnboundedReceiver<String>,
) -> Result<(), RegistryError> {
    // Listening already: a change made from now on is either in this reload or notified.
    match reg.upgrade() {
        Some(r) => r.reload(store, None).await?,
        None => return Ok(()),
    }
    let mut tick = tokio::time::interval(Duration::from_secs(store.cfg.resync_interval.max(1)));
    tick.tick().await;
    loop {
        tokio::select! {
            note = notes.recv() => {
                let Some(first) = note else {
                    return Err(RegistryError::Connect("notification stream ended".into()));
                };
                let mut tenants = BTreeSet::new();
                let mut everything = false;
                let mut take = |p: String| match p.split_once(':') {
                    Some(("tenant", id)) => { tenants.insert(id.to_string()); }
                    _ => everything = true,
                };
                take(first);
                while let Ok(p) = notes.try_recv() {
                    take(p);
                }
                let Some(r) = reg.upgrade() else { return Ok(()) };
                // A change may be a rotation to a key whose file just appeared.
                refresh_keys(store);
                if everything || tenants.len() > FULL_RELOAD_BURST {
                    r.reload(store, None).await?;
                } else {
                    r.reload(store, Some(&tenants)).await?;
                }
            }
            _ = tick.tick() => {
                refresh_keys(store);
                let Some(r) = reg.upgrade() else { return Ok(()) };
                r.reload(store, None).await?;
            }
        }
    }
}

/// Reads the key sources again, so a key added for a rotation is picked up without a restart.
fn refresh_keys(store: &mut RegistryStore) {
    match store::keyring(&store.cfg) {
        Ok(k) => store.keys = k,
        Err(e) => {
            tracing::warn!(error = %e, "cannot reload the master keys; keeping the loaded ones")
        }
    }
}
