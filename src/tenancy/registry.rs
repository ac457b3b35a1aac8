//! Where tenants come from. The proxy only ever asks "which tenant is this id?", from an
//! in-memory snapshot, so a lookup never waits on I/O; a registry backed by a database keeps
//! that snapshot fresh behind the same trait.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use tokio::sync::broadcast;

use crate::config::{Config, ConfigError};
use crate::credentials::ScramVerifier;
use crate::secret::Secret;

use super::model::{ClientUser, Server, Tenant};

pub trait TenantRegistry: Send + Sync + 'static {
    fn tenant(&self, id: &str) -> Option<Arc<Tenant>>;

    /// Every tenant served now, for listings.
    fn tenants(&self) -> Vec<Arc<Tenant>>;

    /// Changes as they happen, for registries that change while the proxy runs.
    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<TenantChange>> {
        None
    }

    /// The SCRAM verifier of an admin console user this registry keeps, if any.
    fn admin_verifier(&self, _name: &str) -> Option<ScramVerifier> {
        None
    }

    /// Every source of changes (a layered registry has one per layer that changes).
    fn change_streams(&self) -> Vec<tokio::sync::broadcast::Receiver<TenantChange>> {
        self.changes().into_iter().collect()
    }
}

/// One tenant's entry changed: `now` is its new state (None: gone), `terminate` asks for its
/// client connections to be closed.
#[derive(Debug, Clone)]
pub struct TenantChange {
    pub id: String,
    pub now: Option<Arc<Tenant>>,
    pub terminate: bool,
}

/// Tenants from several registries; the first that knows an id wins.
pub struct LayeredRegistry(pub Vec<Arc<dyn TenantRegistry>>);

impl TenantRegistry for LayeredRegistry {
    fn tenant(&self, id: &str) -> Option<Arc<Tenant>> {
        self.0.iter().find_map(|r| r.tenant(id))
    }

    fn tenants(&self) -> Vec<Arc<Tenant>> {
        let mut seen = std::collections::HashSet::new();
        self.0
            .iter()
            .flat_map(|r| r.tenants())
            .filter(|t| seen.insert(t.id.clone()))
            .collect()
    }

    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<TenantChange>> {
        self.0.iter().find_map(|r| r.changes())
    }

    fn change_streams(&self) -> Vec<tokio::sync::broadcast::Receiver<TenantChange>> {
        self.0.iter().flat_map(|r| r.change_streams()).collect()
    }

    fn admin_verifier(&self, name: &str) -> Option<ScramVerifier> {
        self.0.iter().find_map(|r| r.admin_verifier(name))
    }
}

/// The `[[tenants]]` of proxy.toml; `reload` swaps in those of a re-read file.
pub struct StaticRegistry {
    tenants: RwLock<HashMap<String, Entry>>,
    changes: broadcast::Sender<TenantChange>,
}

struct Entry {
    tenant: Arc<Tenant>,
    /// Everything the tenant was built from: equal ones keep their `Arc` (and pools).
    fingerprint: u64,
}

impl StaticRegistry {
    /// Builds the registry from a validated config.
    pub fn from_config(config: &Config) -> Result<StaticRegistry, ConfigError> {
        let (changes, _) = broadcast::channel(1024);
        Ok(StaticRegistry {
            tenants: RwLock::new(Self::build(config)?),
            changes,
        })
    }

    /// Takes the tenants of a re-read config: changed ones are rebuilt (their pools follow,
    /// clients move at their next transaction), removed ones end, unchanged ones keep their
    /// pools. Returns the ids of the tenants that changed.
    pub fn reload(&self, config: &Config) -> Result<Vec<String>, ConfigError> {
        let mut fresh = Self::build(config)?;
        let mut announce = Vec::new();
        {
            let Ok(mut current) = self.tenants.write() else {
                return Ok(Vec::new());
            };
            let ids: std::collections::BTreeSet<String> =
                current.keys().chain(fresh.keys()).cloned().collect();
            for id in ids {
                match (current.remove(&id), fresh.remove(&id)) {
                    (Some(old), Some(new)) if old.fingerprint == new.fingerprint => {
                        current.insert(id, old);
                    }
                    (_, Some(new)) => {
                        announce.push(TenantChange {
                            id: id.clone(),
                            now: Some(new.tenant.clone()),
                            terminate: false,
                        });
                        current.insert(id, new);
                    }
                    (Some(_), None) => announce.push(TenantChange {
                        id,
                        now: None,
                        terminate: false,
                    }),
                    (None, None) => {}
                }
            }
        }
        let ids = announce.iter().map(|c| c.id.clone()).collect();
        for change in announce {
            let _ = self.changes.send(change);
        }
        Ok(ids)
    }

    fn build(config: &Config) -> Result<HashMap<String, Entry>, ConfigError> {
        let by_name: HashMap<&str, &crate::config::ServerConfig> = config
            .servers
            .iter()
            .map(|s| (s.name.as_str(), s))
            .collect();
        let mut servers: HashMap<&str, Arc<Server>> = HashMap::new();
        for (i, s) in config.servers.iter().enumerate() {
            let tls = crate::tls::BackendTls::build(&s.backend_tls())
                .map_err(|e| ConfigError::invalid(format!("servers[{i}]"), e.to_string()))?;
            servers.insert(
                s.name.as_str(),
                Arc::new(Server {
                    name: s.name.clone(),
                    host: s.host.clone(),
                    port: s.port,
                    tls,
                    max_connections: s.max_connections,
                }),
            );
        }
        let mut tenants = HashMap::new();
        for (i, t) in config.tenants.iter().enumerate() {
            let server = servers.get(t.server.as_str()).cloned().ok_or_else(|| {
                ConfigError::invalid(format!("tenants[{i}].server"), "unknown server")
            })?;
            let mut users = HashMap::new();
            for (j, u) in t.users.iter().enumerate() {
                let verifier = ScramVerifier::parse(&u.scram).ok_or_else(|| {
                    ConfigError::invalid(
                        format!("tenants[{i}].users[{j}].scram"),
                        "is not a SCRAM-SHA-256 verifier",
                    )
                })?;
                let password = match (&u.backend_password, &u.backend_password_env) {
                    (Some(p), _) => Some(p.clone()),
                    (None, Some(var)) => Some(Secret::new(std::env::var(var).map_err(|_| {
                        ConfigError::invalid(
                            format!("tenants[{i}].users[{j}].backend_password_env"),
                            format!("environment variable {var} is not set"),
                        )
                    })?)),
                    (None, None) => None,
                };
                users.insert(
                    u.name.clone(),
                    ClientUser::new(&u.name, verifier, &u.backend_user, password)
                        .read_only(u.read_only)
                        .with_auth(u.auth)
                        .with_session_features(u.session_features),
                );
            }
            let fingerprint = {
                use std::hash::{BuildHasher, Hash, Hasher};
                let mut h = foldhash::fast::FixedState::with_seed(0).build_hasher();
                format!("{t:?}").hash(&mut h);
                for s in std::iter::once(&t.server)
                    .chain(t.replicas.iter().flatten())
                    .chain(
                        by_name
                            .get(t.server.as_str())
                            .map_or(&[][..], |s| &s.replicas),
                    )
                {
                    format!("{:?}", by_name.get(s.as_str())).hash(&mut h);
                }
                (config.pool.default_size, config.pool.mode as u8).hash(&mut h);
                // Passwords (Debug hides them), those from the environment as read now.
                for u in &t.users {
                    u.backend_password.as_ref().map(|p| p.expose()).hash(&mut h);
                    if let Some(var) = &u.backend_password_env {
                        std::env::var(var).ok().hash(&mut h);
                    }
                }
                h.finish()
            };
            let tenant = Arc::new(Tenant {
                id: t.id.clone(),
                display_name: None,
                tier: t.tier,
                replicas: t
                    .replicas
                    .as_ref()
                    .or(by_name.get(t.server.as_str()).map(|s| &s.replicas))
                    .into_iter()
                    .flatten()
                    .filter_map(|r| servers.get(r.as_str()).cloned())
                    .collect(),
                read_write_split: t.read_write_split,
                slow_transaction_ms: t.slow_transaction_ms,
                replica_fallback: t.replica_fallback,
                server,
                database: t.database.clone(),
                schema: t.schema.clone(),
                pool_size: t.pool_size.unwrap_or(config.pool.default_size),
                min_idle: t.min_idle,
                weight: t.weight.unwrap_or(1).max(1),
                query_wait_timeout: t.query_wait_timeout,
                server_idle_timeout: t.server_idle_timeout,
                pool_mode: t.pool_mode.unwrap_or(config.pool.mode),
                max_client_connections: t.max_client_connections,
                require_tls: t.require_tls,
                session_features: t.session_features.unwrap_or(config.pool.session_features),
                status: t.status,
                params: t
                    .params
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                enforce_limits: crate::tenancy::limits::enforce_statement(&t.limits),
                users,
                unavailable: None,
            });
            tenants.insert(
                t.id.clone(),
                Entry {
                    tenant,
                    fingerprint,
                },
            );
        }
        Ok(tenants)
    }
}

impl TenantRegistry for StaticRegistry {
    fn tenant(&self, id: &str) -> Option<Arc<Tenant>> {
        self.tenants.read().ok()?.get(id).map(|e| e.tenant.clone())
    }

    fn tenants(&self) -> Vec<Arc<Tenant>> {
        self.tenants
            .read()
            .map(|t| t.values().map(|e| e.tenant.clone()).collect())
            .unwrap_or_default()
    }

    fn changes(&self) -> Option<broadcast::Receiver<TenantChange>> {
        Some(self.changes.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pool_size: u32) -> Config {
        // A fixed verifier: a fresh salt would make every config a different one.
        static VERIFIER: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let verifier = VERIFIER.get_or_init(|| crate::credentials::hash_password("pw"));
        Config::parse(&format!(
            r#"
            [[servers]]
            name = "main"
            host = "127.0.0.1"
            port = 5432
            [[tenants]]
            id = "acme"
            tier = "database"
            server = "main"
            database = "acme"
            pool_size = {pool_size}
            [[tenants.users]]
            name = "app"
            scram = "{verifier}"
            backend_user = "acme_app"
            [[tenants]]
            id = "globex"
            tier = "database"
            server = "main"
            database = "globex"
            "#
        ))
        .expect("config")
    }

    #[test]
    fn reloading_an_unchanged_config_keeps_every_tenant_as_it_was() {
        let r = StaticRegistry::from_config(&config(5)).expect("registry");
        let before = r.tenant("acme").expect("acme");
        assert!(r.reload(&config(5)).expect("reload").is_empty());
        assert!(Arc::ptr_eq(&before, &r.tenant("acme").expect("acme")));
    }

    #[test]
    fn reloading_announces_only_the_changed_tenant() {
        let r = StaticRegistry::from_config(&config(5)).expect("registry");
        let mut changes = r.changes().expect("changes");
        assert_eq!(r.reload(&config(9)).expect("reload"), ["acme"]);
        let c = changes.try_recv().expect("a change");
        assert_eq!(c.id, "acme");
        assert_eq!(c.now.expect("still there").pool_size, 9);
        assert!(changes.try_recv().is_err());
    }
}
