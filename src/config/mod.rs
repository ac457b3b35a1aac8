//! `proxy.toml`: parsing and validation. Field-by-field reference lives in README.md.

pub mod validate;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::secret::Secret;

/// Largest `peer_id`: cancel keys carry it in 11 bits of the process id
/// (`clients::cancel`).
pub const MAX_PEER_ID: u16 = (1 << 11) - 1;

pub use validate::validate;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// toml's message names the line, column and field.
    #[error("invalid config: {0}")]
    Parse(String),
    #[error("invalid config: {field}: {message}")]
    Invalid { field: String, message: String },
}

impl ConfigError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address clients connect to.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Separator between role and tenant in the startup user name (`app.acme`).
    #[serde(default = "default_separator")]
    pub tenant_separator: String,
    /// Custom setting that shows a row-tier session its tenant id. Informational only: RLS
    /// policies never trust it (a client can SET it); they read the signed binding.
    #[serde(default = "default_row_setting")]
    pub row_tenant_setting: String,
    /// Secret that row-tier context proofs are derived from: `file:PATH` or `env:VARIABLE`
    /// (32 bytes, base64 or hex, as made by `pgtenant registry gen-key`). Defaults to the
    /// registry's master key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row_key: Option<String>,
    /// Largest client message accepted after startup, in bytes.
    #[serde(default = "default_max_message")]
    pub max_message_bytes: u32,
    /// Threads serving clients: 1 (default) runs one event loop, like PgBouncer; 0 means one
    /// per core.
    #[serde(default = "default_workers")]
    pub worker_threads: usize,
    /// Seconds a client may take to send its startup packet and authenticate.
    #[serde(default = "default_auth_timeout")]
    pub auth_timeout: u64,
    /// Connections still in startup or authentication, over all tenants; more are refused
    /// with 53300 at once. Bounds what an unauthenticated flood can hold.
    #[serde(default = "default_max_pending_logins")]
    pub max_pending_logins: usize,
    /// Seconds running transactions get to finish when pgtenant shuts down (SIGTERM,
    /// SHUTDOWN); then the remaining sessions are ended.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout: u64,
    #[serde(default)]
    pub pool: PoolConfig,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default, skip_serializing_if = "AdminConfig::is_empty")]
    pub admin: AdminConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// This instance's number among proxies behind one address (1-2047; 0: alone). Cancel keys
    /// carry it, so a CancelRequest that reaches another instance is forwarded here.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub peer_id: u16,
    /// The other instances: `{ id, host, port }`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerConfig>,
    /// TLS for clients (off without a certificate).
    #[serde(default, skip_serializing_if = "TlsConfig::is_off")]
    pub tls: TlsConfig,
    /// Tenants kept in a PostgreSQL registry database, beside (or instead of) `[[tenants]]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<RegistryConfig>,
    #[serde(default)]
    pub servers: Vec<ServerConfig>,
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Connection string of the registry database (libpq key=value or postgresql:// URL),
    /// without a password: use `password_env`.
    pub url: String,
    /// Environment variable holding the registry password, if the server asks for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// Master key that encrypts stored passwords: `file:PATH` or `env:VARIABLE`.
    pub key: String,
    /// Older keys still accepted for reading, during a rotation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub old_keys: Vec<String>,
    /// Seconds between full reloads of the registry (LISTEN/NOTIFY brings changes at once).
    #[serde(default = "default_resync")]
    pub resync_interval: u64,
    /// Directory of versioned per-tenant migrations (`V1__name.sql`), relative to the config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrations: Option<PathBuf>,
    /// Tenants migrated at once by `pgtenant migrate`.
    #[serde(default = "default_migrate_concurrency")]
    pub migrate_concurrency: usize,
    /// Shared database of schema-tier tenants on each server.
    #[serde(default = "default_schema_database")]
    pub schema_database: String,
    /// Shared database of row-tier tenants on each server.
    #[serde(default = "default_row_database")]
    pub row_database: String,
    /// Seconds between flushes of usage accounting to `pgtenant.tenant_usage`.
    #[serde(default = "default_usage_interval")]
    pub usage_interval: u64,
    /// TLS to the registry database: `disable`, `prefer` (default, as libpq), `require`, `verify-ca`
    /// or `verify-full`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sslmode: Option<SslMode>,
    /// CA bundle (PEM) the server's certificate must chain to (verify-ca, verify-full; with
    /// `require` it makes the check verify-ca, as libpq does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sslrootcert: Option<PathBuf>,
    /// Client certificate (PEM) pgtenant presents to the server, with `sslkey`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sslcert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sslkey: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// `transaction` (default): a backend per transaction; `session`: a backend per client.
    #[serde(default)]
    pub mode: PoolMode,
    /// Backend connections per (tenant, role) unless the tenant sets `pool_size`.
    #[serde(default = "default_pool_size")]
    pub default_size: u32,
    /// Seconds a client waits for a backend connection before it gets an error.
    #[serde(default = "default_query_wait")]
    pub query_wait_timeout: u64,
    /// Seconds allowed to open and authenticate one backend connection.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: u64,
    /// Seconds an unused backend connection stays open.
    #[serde(default = "default_server_idle")]
    pub server_idle_timeout: u64,
    /// Seconds after which a backend connection is closed when it is next idle.
    #[serde(default = "default_server_lifetime")]
    pub server_lifetime: u64,
    /// Seconds allowed for the reset (ROLLBACK, DISCARD ALL) when a client leaves.
    #[serde(default = "default_reset_timeout")]
    pub reset_timeout: u64,
    /// Named statements kept prepared per backend connection (transaction mode).
    #[serde(default = "default_max_prepared")]
    pub max_prepared_statements: usize,
    /// Seconds a client may sit idle inside a transaction before it is disconnected (0: never).
    #[serde(default)]
    pub idle_transaction_timeout: u64,
    /// Client connections accepted at once, over all tenants.
    #[serde(default = "default_max_clients")]
    pub max_client_connections: usize,
    /// Seconds after which a pool with no connections and no clients is dropped.
    #[serde(default = "default_pool_idle")]
    pub pool_idle_timeout: u64,
    /// Transaction mode, a statement whose effect outlives its transaction: `pin` (default)
    /// keeps the client on its server connection, `refuse` fails it with 0A000.
    #[serde(default)]
    pub session_features: SessionFeatures,
    /// Connections of each server left out of its budget when the budget is read from the
    /// server's own `max_connections`: room for pgtenant's control plane (health checks,
    /// provisioning, migrations, usage flush) and for operators' sessions.
    #[serde(default = "default_server_reserve")]
    pub server_reserve: u32,
    /// Connections a pool opens as soon as it is made (a tenant's first login), so its first
    /// transactions do not wait for a connect; within its `pool_size`.
    #[serde(default)]
    pub prewarm: u32,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            mode: PoolMode::default(),
            default_size: default_pool_size(),
            query_wait_timeout: default_query_wait(),
            connect_timeout: default_connect_timeout(),
            server_idle_timeout: default_server_idle(),
            server_lifetime: default_server_lifetime(),
            reset_timeout: default_reset_timeout(),
            max_prepared_statements: default_max_prepared(),
            idle_transaction_timeout: 0,
            max_client_connections: default_max_clients(),
            pool_idle_timeout: default_pool_idle(),
            session_features: SessionFeatures::default(),
            server_reserve: default_server_reserve(),
            prewarm: 0,
        }
    }
}

/// Client TLS: `[tls]`. Certificates and keys are PEM files, reloaded by SIGHUP / RELOAD.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The default certificate chain (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// `disable`, `allow` (default with a certificate) or `require`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<TlsMode>,
    /// A client that connects to `<tenant><sni_suffix>` names its tenant by the TLS server name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni_suffix: Option<String>,
    /// Certificates served for particular server names; the default one for any other.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certs: Vec<SniCertConfig>,
    /// CA bundle (PEM) that client certificates must chain to; enables `auth = "cert"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SniCertConfig {
    /// The server name (SNI) this certificate is for.
    pub sni: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// SSLRequest is answered `N`.
    Disable,
    /// TLS is offered; plaintext clients are served too.
    Allow,
    /// Plaintext StartupMessages are refused (28000).
    Require,
}

impl TlsConfig {
    fn is_off(&self) -> bool {
        *self == TlsConfig::default()
    }

    /// The mode in force: `allow` when a certificate is set and no mode is given.
    pub fn effective_mode(&self) -> TlsMode {
        match (self.mode, &self.cert) {
            (Some(m), _) => m,
            (None, Some(_)) => TlsMode::Allow,
            (None, None) => TlsMode::Disable,
        }
    }

    fn resolve_paths(&mut self, dir: &Path) {
        let files = [
            self.cert.as_mut(),
            self.key.as_mut(),
            self.client_ca.as_mut(),
        ];
        let named = self
            .certs
            .iter_mut()
            .flat_map(|c| [&mut c.cert, &mut c.key]);
        relative_to(dir, files.into_iter().flatten().chain(named));
    }
}

/// What transaction mode does with a statement whose effect outlives its transaction (a temp
/// table, a `WITH HOLD` cursor, a session advisory lock, SQL `PREPARE`, `LISTEN`, `LOAD`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionFeatures {
    /// The client keeps its server connection from then until it disconnects or runs
    /// `DISCARD ALL`, and everything works as in session mode.
    #[default]
    Pin,
    /// The statement fails with 0A000; the connection stays shared.
    Refuse,
}

/// How a tenant's client user proves who it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthMethod {
    /// SCRAM-SHA-256, with or without channel binding.
    #[default]
    #[serde(rename = "scram")]
    Scram,
    /// SCRAM-SHA-256-PLUS only: the client must bind the exchange to the TLS channel.
    #[serde(rename = "scram-plus")]
    ScramPlus,
    /// A client certificate whose CN (or a DNS SAN) is the login name `role<sep>tenant`.
    #[serde(rename = "cert")]
    Cert,
    /// Both the certificate and the password.
    #[serde(rename = "scram+cert")]
    ScramCert,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Scram => "scram",
            AuthMethod::ScramPlus => "scram-plus",
            AuthMethod::Cert => "cert",
            AuthMethod::ScramCert => "scram+cert",
        }
    }

    pub fn parse(s: &str) -> Option<AuthMethod> {
        Some(match s {
            "scram" => AuthMethod::Scram,
            "scram-plus" => AuthMethod::ScramPlus,
            "cert" => AuthMethod::Cert,
            "scram+cert" => AuthMethod::ScramCert,
            _ => return None,
        })
    }

    pub fn needs_cert(self) -> bool {
        matches!(self, AuthMethod::Cert | AuthMethod::ScramCert)
    }

    pub fn needs_password(self) -> bool {
        !matches!(self, AuthMethod::Cert)
    }
}

/// Logging.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (default) or `json` (one object per line).
    #[serde(default)]
    pub format: LogFormat,
    /// Filter, e.g. `info` or `info,pgtenant::pool=debug` (`RUST_LOG` wins); reloadable.
    #[serde(default = "default_log_level")]
    pub level: String,
    /// Log transactions that take longer than this many ms (0: off); tenants may override.
    #[serde(default)]
    pub slow_transaction_ms: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::default(),
            level: default_log_level(),
            slow_transaction_ms: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

fn default_log_level() -> String {
    "info".into()
}

/// The admin console (database `pgtenant` on the proxy's port).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Who may use it: `{ name = "admin", scram = "SCRAM-SHA-256$..." }`.
    #[serde(default)]
    pub users: Vec<AdminUserConfig>,
    /// Address of the Prometheus endpoint (`GET /metrics`); off when unset. Keep it on
    /// 127.0.0.1 or a private network: it names every tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
}

impl AdminConfig {
    fn is_empty(&self) -> bool {
        self.users.is_empty() && self.metrics_listen.is_none()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminUserConfig {
    /// Logs in as this user name (no tenant suffix) to database `pgtenant`.
    pub name: String,
    /// SCRAM-SHA-256 verifier (`pgtenant hash-password`).
    pub scram: String,
}

/// Server health checks and the replica rules that use them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Seconds between health checks of every server in use (also run soon after an error).
    #[serde(default = "default_health_interval")]
    pub interval: u64,
    /// Seconds of replay lag beyond which a replica gets no reads (0: lag is not checked).
    #[serde(default = "default_replica_max_lag")]
    pub replica_max_lag: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval: default_health_interval(),
            replica_max_lag: default_replica_max_lag(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    Session,
    #[default]
    Transaction,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub name: String,
    pub host: String,
    pub port: u16,
    /// Names of servers that are read replicas of this one; its tenants read from them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<String>,
    /// TLS to this server: `disable`, `prefer` (default, as libpq), `require`, `verify-ca`
    /// or `verify-full`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sslmode: Option<SslMode>,
    /// CA bundle (PEM) the server's certificate must chain to (verify-ca, verify-full; with
    /// `require` it makes the check verify-ca, as libpq does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sslrootcert: Option<PathBuf>,
    /// Client certificate (PEM) pgtenant presents to the server, with `sslkey`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sslcert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sslkey: Option<PathBuf>,
    /// Connections all pools together may hold to this server (its budget). Default: the
    /// server's own `max_connections` minus its reserved ones minus `pool.server_reserve`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
}

impl ServerConfig {
    /// A server with no replicas and libpq's TLS defaults.
    pub fn new(name: impl Into<String>, host: impl Into<String>, port: u16) -> ServerConfig {
        ServerConfig {
            name: name.into(),
            host: host.into(),
            port,
            replicas: Vec::new(),
            sslmode: None,
            sslrootcert: None,
            sslcert: None,
            sslkey: None,
            max_connections: None,
        }
    }

    pub fn backend_tls(&self) -> BackendTlsConfig {
        BackendTlsConfig::of(
            self.sslmode,
            [&self.sslrootcert, &self.sslcert, &self.sslkey],
        )
    }
}

/// How pgtenant connects to a PostgreSQL server, as libpq's settings of the same names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendTlsConfig {
    pub sslmode: Option<SslMode>,
    pub sslrootcert: Option<PathBuf>,
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
}

impl BackendTlsConfig {
    /// The settings of a `[[servers]]` entry or of `[registry]`: sslmode, then the
    /// sslrootcert, sslcert and sslkey files.
    fn of(sslmode: Option<SslMode>, [root, cert, key]: [&Option<PathBuf>; 3]) -> Self {
        BackendTlsConfig {
            sslmode,
            sslrootcert: root.clone(),
            sslcert: cert.clone(),
            sslkey: key.clone(),
        }
    }
}

/// Makes relative file paths relative to the config file's directory.
fn relative_to<'a>(dir: &Path, paths: impl IntoIterator<Item = &'a mut PathBuf>) {
    for p in paths {
        if p.is_relative() {
            *p = dir.join(&*p);
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    pub fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }
}

/// The isolation tiers and their rules live in `tenancy::tier`.
pub use crate::tenancy::tier::Tier;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TenantStatus {
    #[default]
    Active,
    Suspended,
    /// Kept only by `tenant delete --keep-data`-style workflows and half-deleted tenants:
    /// served as if it did not exist.
    Deleted,
}

impl TenantStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TenantStatus::Active => "active",
            TenantStatus::Suspended => "suspended",
            TenantStatus::Deleted => "deleted",
        }
    }

    pub fn parse(s: &str) -> Option<TenantStatus> {
        match s {
            "active" => Some(TenantStatus::Active),
            "suspended" => Some(TenantStatus::Suspended),
            "deleted" => Some(TenantStatus::Deleted),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub id: String,
    pub tier: Tier,
    pub server: String,
    pub database: String,
    /// Schema tier only: the tenant's schema.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    /// The most backend connections each of its roles' pools holds (alias `max_connections`).
    #[serde(alias = "max_connections", skip_serializing_if = "Option::is_none")]
    pub pool_size: Option<u32>,
    /// Backend connections kept open even when idle, and reserved for it in its server's
    /// budget (alias `min_connections`).
    #[serde(
        alias = "min_connections",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub min_idle: Option<u32>,
    /// Its share of a full server budget relative to other tenants' (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Overrides `pool.query_wait_timeout` for this tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_wait_timeout: Option<u64>,
    /// Overrides `pool.server_idle_timeout` for this tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_idle_timeout: Option<u64>,
    /// Overrides `pool.mode` for this tenant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool_mode: Option<PoolMode>,
    /// Client connections this tenant may hold at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_client_connections: Option<usize>,
    #[serde(default)]
    pub status: TenantStatus,
    /// Session defaults applied to every backend connection of the tenant (TimeZone, …).
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// Caps on settings a client may not raise beyond its transaction (`tenancy::limits`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, String>,
    /// Log this tenant's transactions longer than this many ms (overrides
    /// `log.slow_transaction_ms`; 0: off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_transaction_ms: Option<u64>,
    /// Read replicas of this tenant, replacing its server's list (`[]`: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<Vec<String>>,
    /// Transaction mode: transactions begun `READ ONLY` go to a replica.
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_write_split: bool,
    /// Reads go to the primary when no replica is usable (else they get an error).
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub replica_fallback: bool,
    /// Clients of this tenant must connect with TLS.
    #[serde(default, skip_serializing_if = "is_false")]
    pub require_tls: bool,
    /// Overrides `pool.session_features` for this tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_features: Option<SessionFeatures>,
    #[serde(default)]
    pub users: Vec<UserConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// Client role: the client logs in as `name<separator>tenant`.
    pub name: String,
    /// SCRAM-SHA-256 verifier (`pgtenant hash-password`); never a clear-text password.
    pub scram: String,
    /// Role pgtenant logs in as on the backend for this client role.
    pub backend_user: String,
    /// Backend password, or use `backend_password_env`. Empty for trust authentication.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_password: Option<Secret>,
    /// Name of an environment variable that holds the backend password.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_password_env: Option<String>,
    /// Every session of this role reads from the tenant's replicas (and is read-only).
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only: bool,
    /// `scram` (default), `scram-plus`, `cert` or `scram+cert`.
    #[serde(default, skip_serializing_if = "is_default")]
    pub auth: AuthMethod,
    /// This client role's own `session_features` (`pin` or `refuse`), over the tenant's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_features: Option<SessionFeatures>,
}

fn is_zero(v: &u16) -> bool {
    *v == 0
}

/// Another pgtenant instance serving the same clients (`[[peers]]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Its `peer_id`.
    pub id: u16,
    pub host: String,
    pub port: u16,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Config::parse(&text)?;
        // Paths in the file are relative to the file, not to wherever the command runs.
        let dir = path.parent().unwrap_or(Path::new("."));
        if let Some(r) = config.registry.as_mut() {
            r.resolve_paths(dir);
        }
        config.tls.resolve_paths(dir);
        for s in &mut config.servers {
            relative_to(
                dir,
                [&mut s.sslrootcert, &mut s.sslcert, &mut s.sslkey]
                    .into_iter()
                    .flatten(),
            );
        }
        Ok(config)
    }

    /// Every field at its default: no servers, no tenants.
    pub fn empty() -> Config {
        Config {
            listen: default_listen(),
            tenant_separator: default_separator(),
            row_tenant_setting: default_row_setting(),
            row_key: None,
            max_message_bytes: default_max_message(),
            worker_threads: default_workers(),
            auth_timeout: default_auth_timeout(),
            max_pending_logins: default_max_pending_logins(),
            shutdown_timeout: default_shutdown_timeout(),
            pool: PoolConfig::default(),
            health: HealthConfig::default(),
            admin: AdminConfig::default(),
            log: LogConfig::default(),
            tls: TlsConfig::default(),
            peer_id: 0,
            peers: Vec::new(),
            registry: None,
            servers: Vec::new(),
            tenants: Vec::new(),
        }
    }

    /// The config as proxy.toml text (backend passwords included: keep the file private).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        validate(&config)?;
        Ok(config)
    }
}

impl RegistryConfig {
    /// A registry at `url` with every other field at its default.
    pub fn new(url: impl Into<String>, key: impl Into<String>) -> RegistryConfig {
        RegistryConfig {
            url: url.into(),
            password_env: None,
            key: key.into(),
            old_keys: Vec::new(),
            resync_interval: default_resync(),
            migrations: None,
            migrate_concurrency: default_migrate_concurrency(),
            schema_database: default_schema_database(),
            row_database: default_row_database(),
            usage_interval: default_usage_interval(),
            sslmode: None,
            sslrootcert: None,
            sslcert: None,
            sslkey: None,
        }
    }

    pub fn backend_tls(&self) -> BackendTlsConfig {
        BackendTlsConfig::of(
            self.sslmode,
            [&self.sslrootcert, &self.sslcert, &self.sslkey],
        )
    }

    fn resolve_paths(&mut self, dir: &Path) {
        let fix = |k: &mut String| {
            if let Some(p) = k.strip_prefix("file:") {
                if Path::new(p).is_relative() {
                    *k = format!("file:{}", dir.join(p).display());
                }
            }
        };
        fix(&mut self.key);
        self.old_keys.iter_mut().for_each(fix);
        let files = [&mut self.sslrootcert, &mut self.sslcert, &mut self.sslkey];
        relative_to(
            dir,
            files.into_iter().flatten().chain(self.migrations.as_mut()),
        );
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}
fn is_true(b: &bool) -> bool {
    *b
}
fn default_true() -> bool {
    true
}
fn default_health_interval() -> u64 {
    5
}
fn default_replica_max_lag() -> u64 {
    10
}
fn default_usage_interval() -> u64 {
    60
}
fn default_resync() -> u64 {
    30
}
fn default_migrate_concurrency() -> usize {
    4
}
fn default_schema_database() -> String {
    "schema_tenants".into()
}
fn default_row_database() -> String {
    "row_tenants".into()
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 6432))
}
fn default_separator() -> String {
    ".".into()
}
fn default_row_setting() -> String {
    "pgtenant.tenant_id".into()
}
fn default_max_message() -> u32 {
    // PostgreSQL's own ceiling for the largest message kinds (PQ_LARGE_MESSAGE_LIMIT).
    0x3fff_ffff
}
fn default_workers() -> usize {
    1
}
fn default_shutdown_timeout() -> u64 {
    30
}
/// As many as `max_client_connections`: 10,000 clients connecting at once (an application
/// fleet restarting) are all served. A pending login holds about 5 KiB (its task, the login's
/// state, the socket), so a flood holds at most some 50 MiB, for at most `auth_timeout`.
fn default_max_pending_logins() -> usize {
    10_000
}

fn default_auth_timeout() -> u64 {
    60
}
fn default_pool_size() -> u32 {
    10
}
fn default_query_wait() -> u64 {
    120
}
fn default_connect_timeout() -> u64 {
    5
}
fn default_server_idle() -> u64 {
    600
}
fn default_server_lifetime() -> u64 {
    3600
}
fn default_reset_timeout() -> u64 {
    5
}
fn default_max_prepared() -> usize {
    500
}
fn default_max_clients() -> usize {
    10_000
}
fn default_pool_idle() -> u64 {
    300
}

fn default_server_reserve() -> u32 {
    5
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_paths_in_a_config_are_relative_to_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.toml");
        std::fs::write(
            &path,
            r#"
[tls]
cert = "server.crt"
key = "/abs/server.key"
certs = [{ sni = "a.test", cert = "a.crt", key = "a.key" }]

[[servers]]
name = "s"
host = "127.0.0.1"
port = 5432
sslrootcert = "ca.pem"
"#,
        )
        .unwrap();
        let c = Config::load(&path).unwrap();
        let d = dir.path();
        assert_eq!(c.tls.cert, Some(d.join("server.crt")));
        assert_eq!(c.tls.key, Some(PathBuf::from("/abs/server.key")));
        assert_eq!(c.tls.certs[0].cert, d.join("a.crt"));
        assert_eq!(c.servers[0].sslrootcert, Some(d.join("ca.pem")));
    }
}
