//! The in-memory shape of a tenant, whatever registry it came from.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{AuthMethod, PoolMode, SessionFeatures, TenantStatus, Tier};
use crate::credentials::ScramVerifier;
use crate::secret::Secret;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub name: String,
    pub host: String,
    pub port: u16,
    /// How pgtenant's connections to it use TLS (`sslmode` and its files).
    pub tls: crate::tls::BackendTls,
    /// Its connection budget when configured (else read from the server).
    pub max_connections: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct BackendCredentials {
    pub user: String,
    /// None: the server trusts this role.
    pub password: Option<Secret>,
}

#[derive(Debug, Clone)]
pub struct ClientUser {
    /// Client role, the part of the startup user name before the separator.
    pub name: String,
    pub verifier: ScramVerifier,
    pub backend: BackendCredentials,
    /// Every session of this role reads from the tenant's replicas and is read-only.
    pub read_only: bool,
    /// How the client proves who it is (SCRAM, with channel binding, a certificate).
    pub auth: AuthMethod,
    /// Transaction mode: this role's own choice to pin or refuse session features, over the
    /// tenant's.
    pub session_features: Option<SessionFeatures>,
}

impl ClientUser {
    pub fn new(
        name: &str,
        verifier: ScramVerifier,
        backend_user: &str,
        password: Option<Secret>,
    ) -> Arc<ClientUser> {
        Arc::new(ClientUser {
            name: name.to_string(),
            verifier,
            backend: BackendCredentials {
                user: backend_user.to_string(),
                password,
            },
            read_only: false,
            auth: AuthMethod::Scram,
            session_features: None,
        })
    }

    /// The same user, with its own choice of session features (None: the tenant's).
    pub fn with_session_features(
        self: Arc<Self>,
        features: Option<SessionFeatures>,
    ) -> Arc<ClientUser> {
        if self.session_features == features {
            return self;
        }
        let mut u = (*self).clone();
        u.session_features = features;
        Arc::new(u)
    }

    /// The same user, with another way to authenticate.
    pub fn with_auth(self: Arc<Self>, auth: AuthMethod) -> Arc<ClientUser> {
        if self.auth == auth {
            return self;
        }
        let mut u = (*self).clone();
        u.auth = auth;
        Arc::new(u)
    }

    /// The same user, read-only or not.
    pub fn read_only(self: Arc<Self>, read_only: bool) -> Arc<ClientUser> {
        if self.read_only == read_only {
            return self;
        }
        let mut u = (*self).clone();
        u.read_only = read_only;
        Arc::new(u)
    }
}

#[derive(Debug, Clone)]
pub struct Tenant {
    pub id: String,
    pub display_name: Option<String>,
    pub tier: Tier,
    pub server: Arc<Server>,
    /// Read replicas of `server`.
    pub replicas: Vec<Arc<Server>>,
    /// Transaction mode: transactions begun READ ONLY are served by a replica.
    pub read_write_split: bool,
    /// Reads go to the primary when no replica is usable, instead of failing.
    pub replica_fallback: bool,
    /// This tenant's slow-transaction threshold in ms, over `log.slow_transaction_ms`.
    pub slow_transaction_ms: Option<u64>,
    pub database: String,
    pub schema: Option<String>,
    pub pool_size: u32,
    pub min_idle: Option<u32>,
    /// Its share of a full server budget relative to other tenants'.
    pub weight: u32,
    pub query_wait_timeout: Option<u64>,
    pub server_idle_timeout: Option<u64>,
    pub pool_mode: PoolMode,
    pub max_client_connections: Option<usize>,
    /// Clients must connect with TLS.
    pub require_tls: bool,
    /// Transaction mode: pin a client that uses a session feature, or refuse the statement.
    pub session_features: SessionFeatures,
    pub status: TenantStatus,
    /// Session defaults for every backend connection (TimeZone, …), in config order.
    pub params: Vec<(String, String)>,
    /// The statement that brings the tenant's capped settings down to their caps
    /// (`tenancy::limits`), run around every transaction; None without caps.
    pub enforce_limits: Option<Arc<str>>,
    pub users: HashMap<String, Arc<ClientUser>>,
    /// Set when the registry entry cannot be served (e.g. its credentials fail to decrypt):
    /// clients get this reason instead of a connection. Never holds a secret.
    pub unavailable: Option<String>,
}

impl Tenant {
    pub fn user(&self, role: &str) -> Option<&Arc<ClientUser>> {
        self.users.get(role)
    }
}
