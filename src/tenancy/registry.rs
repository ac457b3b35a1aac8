//! Where tenants come from. The proxy only ever asks "which tenant is this id?", from an
//! in-memory snapshot, so a lookup never waits on I/O; a registry backed by a database keeps
//! that snapshot fresh behind the same trait.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{Config, ConfigError, Tier};
use crate::frontend::scram::ScramVerifier;
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
}

/// The `[[tenants]]` of proxy.toml.
#[derive(Debug, Default)]
pub struct StaticRegistry {
    tenants: HashMap<String, Arc<Tenant>>,
}

impl StaticRegistry {
    /// Builds the registry from a validated config.
    pub fn from_config(config: &Config) -> Result<StaticRegistry, ConfigError> {
        let by_name: HashMap<&str, &crate::config::ServerConfig> = config
            .servers
            .iter()
            .map(|s| (s.name.as_str(), s))
            .collect();
        let servers: HashMap<&str, Arc<Server>> = config
            .servers
            .iter()
            .map(|s| {
                (
                    s.name.as_str(),
                    Arc::new(Server {
                        name: s.name.clone(),
                        host: s.host.clone(),
                        port: s.port,
                    }),
                )
            })
            .collect();
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
                        .read_only(u.read_only),
                );
            }
            tenants.insert(
                t.id.clone(),
                Arc::new(Tenant {
                    id: t.id.clone(),
                    display_name: None,
                    tier: t.tier,
                    replicas: match t.tier {
                        // Validation refuses a row tenant's own list; its server's is not for it.
                        Tier::Row => Vec::new(),
                        _ => t
                            .replicas
                            .as_ref()
                            .or(by_name.get(t.server.as_str()).map(|s| &s.replicas))
                            .into_iter()
                            .flatten()
                            .filter_map(|r| servers.get(r.as_str()).cloned())
                            .collect(),
                    },
                    read_write_split: t.read_write_split,
                    replica_fallback: t.replica_fallback,
                    server,
                    database: t.database.clone(),
                    schema: t.schema.clone(),
                    pool_size: t.pool_size.unwrap_or(config.pool.default_size),
                    min_idle: t.min_idle,
                    query_wait_timeout: t.query_wait_timeout,
                    server_idle_timeout: t.server_idle_timeout,
                    pool_mode: t.pool_mode.unwrap_or(config.pool.mode),
                    max_client_connections: t.max_client_connections,
                    status: t.status,
                    params: t
                        .params
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                    enforce_limits: crate::tenancy::limits::enforce_statement(&t.limits),
                    users,
                    unavailable: None,
                }),
            );
        }
        Ok(StaticRegistry { tenants })
    }
}

impl TenantRegistry for StaticRegistry {
    fn tenant(&self, id: &str) -> Option<Arc<Tenant>> {
        self.tenants.get(id).cloned()
    }

    fn tenants(&self) -> Vec<Arc<Tenant>> {
        self.tenants.values().cloned().collect()
    }
}
