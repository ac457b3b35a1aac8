//! One backend connection. The relay reads and writes its socket directly; this module owns
//! the control path around it (startup, authentication, the proxy's own simple queries), where
//! postgres-protocol's message codec is used because speed does not matter there.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::health::ServerHealth;
use super::stream::{BackendStream, ConnectError};

use crate::protocol::sqlstate;
use crate::protocol::to_server;
use crate::protocol::ErrorReport;
use crate::tenancy::row_context::{self, RowBinding, RowKey};
use crate::tenancy::{BackendCredentials, Server};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("could not connect to server \"{server}\": {source}")]
    Connect {
        server: String,
        source: std::io::Error,
    },
    #[error("timed out connecting to server \"{server}\"")]
    ConnectTimeout { server: String },
    #[error("could not connect to server \"{server}\" over TLS: {reason}")]
    Tls { server: String, reason: String },
    #[error("server \"{server}\" refused the connection: {message}")]
    Refused {
        server: String,
        code: String,
        message: String,
    },
    #[error("server \"{server}\" asked for an unsupported authentication method ({method})")]
    UnsupportedAuth {
        server: String,
        method: &'static str,
    },
    #[error("server \"{server}\" asked for a password but none is configured for role \"{role}\"")]
    MissingPassword { server: String, role: String },
    #[error("lost connection to server \"{server}\": {reason}")]
    Lost { server: String, reason: String },
    #[error("server \"{server}\" broke the protocol: {reason}")]
    Protocol { server: String, reason: String },
    #[error("server \"{server}\" failed the statement: {message}")]
    Statement {
        server: String,
        code: String,
        message: String,
    },
    #[error("timed out waiting for server \"{server}\"")]
    Timeout { server: String },
    #[error("server \"{server}\" did not accept the row-tier context of {scope}: {reason}")]
    RowContext {
        server: String,
        scope: String,
        reason: String,
    },
}

impl BackendError {
    /// Whether this could come from role defaults a tenant set to stop pgtenant's own
    /// statements at login (see `BackendConn::open_row`).
    fn may_be_tampered_defaults(&self) -> bool {
        match self {
            BackendError::Statement { code, .. } => code == "57014" || code == "25006",
            BackendError::Lost { .. } => true,
            _ => false,
        }
    }

    /// Says the server cannot be reached or is not taking connections right now (stopped,
    /// starting, shutting down, out of slots), as opposed to refusing this role or database:
    /// worth waiting for and retrying.
    pub fn is_unreachable(&self) -> bool {
        match self {
            BackendError::Connect { .. }
            | BackendError::ConnectTimeout { .. }
            | BackendError::Lost { .. } => true,
            // cannot_connect_now, admin/crash shutdown, too many connections.
            BackendError::Refused { code, .. } => {
                matches!(code.as_str(), "57P03" | "57P01" | "57P02" | "53300")
            }
            _ => false,
        }
    }

    /// What a client is told when this stops its session from starting.
    pub fn report(&self) -> ErrorReport {
        match self {
            BackendError::Statement { code, message, .. } => {
                // An error in a setting the client itself asked for: relay PostgreSQL's verdict.
                ErrorReport::fatal(static_code(code), message.clone())
            }
            _ => ErrorReport::fatal(sqlstate::UNABLE_TO_CONNECT, self.to_string()),
        }
    }
}

/// SQLSTATEs are five ASCII characters; map the common ones to static strings and fall back to
/// a generic code so a report never borrows from a dropped error.
fn static_code(code: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "22023", "42704", "42501", "22P02", "0A000", "42601", "57014", "25P02", "40001",
    ];
    KNOWN
        .iter()
        .find(|k| **k == code)
        .copied()
        .unwrap_or(sqlstate::INTERNAL_ERROR)
}

/// Everything needed to open a backend connection for one (tenant, role).
#[derive(Debug, Clone)]
pub struct ConnectSpec {
    pub server: Arc<Server>,
    pub database: String,
    pub credentials: BackendCredentials,
    pub params: Vec<(String, String)>,
    pub connect_timeout: Duration,
    /// Row tier: the connection is opened for tenant switching with this database's key
    /// (`Some(None)`: row tier, but the proxy has no key, which fails with a clear error).
    pub row_key: Option<Option<RowKey>>,
    /// Row tier: who can give the shared login role its password back when a tenant changed
    /// it (`ALTER ROLE CURRENT_USER PASSWORD`); None without a registry.
    pub repair: Option<RoleRepair>,
    /// The server's health record: connection attempts pass its backoff gate.
    pub health: Arc<ServerHealth>,
}

pub use crate::tenancy::role_repair::RestoreRolePassword;

/// A `RestoreRolePassword`, used at most every `REPAIR_INTERVAL` per pool.
#[derive(Clone)]
pub struct RoleRepair {
    pub by: Arc<dyn RestoreRolePassword>,
    last: Arc<std::sync::Mutex<Option<Instant>>>,
}

/// A tenant that keeps changing the password cannot make pgtenant hammer the server.
const REPAIR_INTERVAL: Duration = Duration::from_secs(5);

impl RoleRepair {
    pub fn new(by: Arc<dyn RestoreRolePassword>) -> RoleRepair {
        RoleRepair {
            by,
            last: Arc::default(),
        }
    }

    /// Whether a repair may run now (and, if so, counts it).
    fn due(&self) -> bool {
        let Ok(mut last) = self.last.lock() else {
            return false;
        };
        if last.is_some_and(|t| t.elapsed() < REPAIR_INTERVAL) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }
}

impl std::fmt::Debug for RoleRepair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RoleRepair(..)")
    }
}

/// Where and how to cancel whatever this backend is running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelTarget {
    pub host: String,
    pub port: u16,
    pub pid: u32,
    pub secret: u32,
}

impl CancelTarget {
    pub async fn send(&self) -> std::io::Result<()> {
        let mut stream = BackendStream::connect(&self.host, self.port).await?;
        let mut buf = BytesMut::with_capacity(16);
        to_server::cancel_request(self.pid, self.secret, &mut buf)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        stream.write_all(&buf).await?;
        // PostgreSQL closes the socket once it has read the request.
        let mut sink = [0u8; 1];
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut sink)).await;
        Ok(())
    }
}

/// What the server answered to one of pgtenant's own requests.
#[derive(Default)]
struct OwnReply {
    /// The last command tag was `SELECT 1`.
    accepted: bool,
    /// The first column of the first row.
    value: Option<String>,
    /// The first error: (SQLSTATE, message).
    error: Option<(String, String)>,
}

pub struct BackendConn {
    pub(crate) stream: BackendStream,
    /// Bytes read from the server and not yet consumed.
    pub(crate) read_buf: BytesMut,
    server: Arc<Server>,
    cancel: Arc<CancelTarget>,
    /// ParameterStatus values, in the order the server first reported them.
    params: Vec<(String, String)>,
    /// Last ReadyForQuery status: b'I', b'T' or b'E'.
    pub(crate) tx_status: u8,
    /// Set when the connection must not be reused.
    pub(crate) broken: bool,
    /// The thread whose one-thread runtime opened it (`loop_token`), and whose reactor alone
    /// watches its socket; 0 when a multi-threaded runtime did (see `is_dead_after_wake`).
    home_loop: u64,
    created: Instant,
    /// `created` on the coarse clock (`coarse_ms`), for the lifetime check of every release.
    created_ms: u64,
    /// Transaction mode: named statements prepared here (pgtenant's global names).
    pub(crate) prepared: PreparedSet,
    /// Transaction mode: the client settings script last replayed here ("" = none).
    pub(crate) applied_settings: Arc<str>,
    /// Row tier: the database's key, which binds this connection to a tenant (see
    /// `tenancy::row_context`).
    pub(crate) row_key: Option<RowKey>,
    /// Row tier: the database the key is for (named in errors).
    row_database: Option<Arc<str>>,
    /// Row tier: the tenant the server last confirmed this connection is bound to.
    pub(crate) bound: Option<Arc<str>>,
    /// Row tier: the share of its group's connections the tenant using this one holds (its
    /// `pool_size`); released when the connection is parked, discarded or closed.
    pub(crate) tenant_share: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Its entry in the census of open connections (SHOW SERVERS), while a pool owns it.
    pub census: Option<super::census::CensusEntry>,
    /// Its place in its pool and in its server's connection budget, given back when it
    /// closes (last: after the socket).
    pub(crate) lease: Option<Box<dyn ConnectionLease>>,
}

/// A connection's place in whatever owns it (a pool and its server's budget): told when the
/// connection starts closing, and dropped once the server has ended it. Defined here and
/// implemented by the pool, so a connection needs to know nothing of pools.
pub trait ConnectionLease: Send + Sync {
    fn closing(&mut self);
}

/// The global statement names prepared on one backend, least recently used first out.
#[derive(Debug, Default)]
pub struct PreparedSet {
    /// foldhash, not SipHash: consulted at every Bind of a named statement.
    names: foldhash::HashMap<Arc<str>, u64>,
    clock: u64,
}

impl PreparedSet {
    pub fn contains(&mut self, name: &Arc<str>) -> bool {
        self.clock += 1;
        match self.names.get_mut(name) {
            Some(stamp) => {
                *stamp = self.clock;
                true
            }
            None => false,
        }
    }

    pub fn insert(&mut self, name: Arc<str>) {
        self.clock += 1;
        self.names.insert(name, self.clock);
    }

    pub fn remove(&mut self, name: &str) {
        self.names.remove(name);
    }

    pub fn clear(&mut self) {
        self.names.clear();
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The least recently used names beyond `keep`, oldest first, excluding `except`.
    pub fn overflow(&self, keep: usize, except: &[&Arc<str>]) -> Vec<Arc<str>> {
        if self.names.len() <= keep {
            return Vec::new();
        }
        let mut all: Vec<(&Arc<str>, &u64)> = self
            .names
            .iter()
            .filter(|(n, _)| {
                !except
                    .iter()
                    .any(|e| Arc::ptr_eq(e, n) || e.as_ref() == n.as_ref())
            })
            .collect();
        all.sort_by_key(|(_, stamp)| **stamp);
        all.into_iter()
            .take(self.names.len() - keep)
            .map(|(n, _)| n.clone())
            .collect()
    }
}

/// How long a closing connection waits for the server to end its session.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// A pooled connection closes in the background: Terminate, then the server's end of the
/// socket, and only then is its budget slot given back. The server counts a backend against
/// `max_connections` until its process has exited, so giving the slot back at our close
/// would let a burst of reconnects overshoot the budget.
impl Drop for BackendConn {
    fn drop(&mut self) {
        let Some(mut lease) = self.lease.take() else {
            return;
        };
        lease.closing();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut stream = std::mem::replace(&mut self.stream, BackendStream::Closed);
        rt.spawn(async move {
            let _ = tokio::time::timeout(CLOSE_WAIT, async {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                stream.write_all(&[b'X', 0, 0, 0, 4]).await?;
                let mut sink = [0u8; 512];
                while stream.read(&mut sink).await? > 0 {}
                Ok::<(), std::io::Error>(())
            })
            .await;
            drop(stream);
            drop(lease);
        });
    }
}

impl std::fmt::Debug for BackendConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendConn")
            .field("server", &self.server.name)
            .field("pid", &self.cancel.pid)
            .field("tx_status", &char::from(self.tx_status))
            .field("broken", &self.broken)
            .finish()
    }
}

impl BackendConn {
    pub async fn connect(spec: &ConnectSpec) -> Result<BackendConn, BackendError> {
        let server = spec.server.name.clone();
        tokio::time::timeout(spec.connect_timeout, async {
            // A row-tier login that found its role's defaults tampered with cleared them; its
            // own session still carries them, so it is replaced. Defaults can also stop the
            // check itself (a 1 ms statement_timeout, an idle-session timeout): then a login
            // shielded from them by startup parameters clears them first.
            let first = match Self::connect_inner(spec, false).await {
                Err(BackendError::Refused { code, message, .. })
                    if code == "28P01" && spec.row_key.is_some() =>
                {
                    Self::repair_password(spec, &message).await?;
                    Self::connect_inner(spec, false).await?
                }
                Err(e) if spec.row_key.is_some() && e.may_be_tampered_defaults() => {
                    tracing::warn!(server = %server, error = %e, "row-tier login failed; clearing the login role's defaults from a shielded session");
                    Self::connect_inner(spec, true).await?
                }
                other => other?,
            };
            if let Some(conn) = first {
                return Ok(conn);
            }
            match Self::connect_inner(spec, false).await? {
                Some(conn) => Ok(conn),
                None => Err(BackendError::RowContext {
                    server: server.clone(),
                    scope: format!("database \"{}\"", spec.database),
                    reason: "the login role's defaults are being changed (ALTER ROLE ... SET) as fast as they are cleared".into(),
                }),
            }
        })
        .await
        .map_err(|_| BackendError::ConnectTimeout {
            server: server.clone(),
        })?
    }

    /// A row-tier login was refused its password. The shared role's password is one any
    /// tenant on it may change (`ALTER ROLE CURRENT_USER PASSWORD`), locking the others out;
    /// put back the one pgtenant holds, if it can.
    async fn repair_password(spec: &ConnectSpec, message: &str) -> Result<(), BackendError> {
        let server = &spec.server.name;
        let role = &spec.credentials.user;
        let refused = || BackendError::Refused {
            server: server.clone(),
            code: "28P01".into(),
            message: message.to_string(),
        };
        let (Some(repair), Some(password)) = (&spec.repair, &spec.credentials.password) else {
            return Err(refused());
        };
        if !repair.due() {
            return Err(refused());
        }
        match repair.by.restore(server, role, password.expose()).await {
            Ok(()) => {
                tracing::warn!(server = %server, role = %role, "the row tier's login role had another password (changed by a tenant?); restored the registry's");
                Ok(())
            }
            Err(e) => {
                tracing::error!(server = %server, role = %role, error = %e, "could not restore the row tier's login role password");
                Err(refused())
            }
        }
    }

    /// One login; None when it must be done again (see `open_row`). `shielded`: startup
    /// parameters override the role defaults that could stop pgtenant's own statements.
    async fn connect_inner(
        spec: &ConnectSpec,
        shielded: bool,
    ) -> Result<Option<BackendConn>, BackendError> {
        let server = &spec.server;
        let stream = BackendStream::connect_with(&server.host, server.port, &server.tls)
            .await
            .map_err(|e| match e {
                ConnectError::Io(source) => BackendError::Connect {
                    server: server.name.clone(),
                    source,
                },
                ConnectError::Tls(reason) => BackendError::Tls {
                    server: server.name.clone(),
                    reason,
                },
            })?;
        let mut conn = BackendConn {
            stream,
            read_buf: BytesMut::with_capacity(8192),
            server: server.clone(),
            cancel: Arc::new(CancelTarget {
                host: server.host.clone(),
                port: server.port,
                pid: 0,
                secret: 0,
            }),
            params: Vec::new(),
            tx_status: b'I',
            broken: false,
            home_loop: loop_token(),
            created: Instant::now(),
            created_ms: super::health::coarse_ms(),
            prepared: PreparedSet::default(),
            applied_settings: Arc::from(""),
            row_key: None,
            row_database: None,
            bound: None,
            tenant_share: None,
            census: None,
            lease: None,
        };
        let mut out = BytesMut::with_capacity(256);
        let mut startup: Vec<(&str, &str)> = vec![
            ("user", spec.credentials.user.as_str()),
            ("database", spec.database.as_str()),
        ];
        startup.extend(spec.params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        if shielded {
            startup.extend(row_context::SHIELD_PARAMS.iter().copied());
        }
        to_server::startup(startup.iter().copied(), &mut out)
            .map_err(|e| conn.protocol_error(e.to_string()))?;
        conn.send(&out).await?;
        conn.authenticate(&spec.credentials).await?;
        // After AuthenticationOk: ParameterStatus…, BackendKeyData, ReadyForQuery.
        loop {
            match conn.next_message().await? {
                Message::ParameterStatus(body) => {
                    let (name, value) = (lossy(body.name()), lossy(body.value()));
                    conn.set_param(name, value);
                }
                Message::BackendKeyData(body) => {
                    conn.cancel = Arc::new(CancelTarget {
                        host: server.host.clone(),
                        port: server.port,
                        pid: body.process_id() as u32,
                        secret: body.secret_key() as u32,
                    });
                }
                Message::ReadyForQuery(body) => {
                    conn.tx_status = body.status();
                    if let Some(key) = &spec.row_key {
                        if !conn.open_row(key.as_ref(), &spec.database).await? {
                            return Ok(None);
                        }
                    }
                    return Ok(Some(conn));
                }
                Message::ErrorResponse(body) => return Err(conn.refused(body.fields())),
                Message::NoticeResponse(_) => {}
                _ => return Err(conn.protocol_error("unexpected message during startup")),
            }
        }
    }

    async fn authenticate(&mut self, creds: &BackendCredentials) -> Result<(), BackendError> {
        let mut out = BytesMut::with_capacity(256);
        let server = self.server.name.clone();
        let password = || {
            creds.password.as_ref().map(|p| p.expose()).ok_or_else(|| {
                BackendError::MissingPassword {
                    server: server.clone(),
                    role: creds.user.clone(),
                }
            })
        };
        loop {
            out.clear();
            match self.next_message().await? {
                Message::AuthenticationOk => return Ok(()),
                Message::AuthenticationCleartextPassword => {
                    to_server::password(password()?, &mut out)
                        .map_err(|e| self.protocol_error(e.to_string()))?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let hash = md5_hash(creds.user.as_bytes(), password()?.as_bytes(), body.salt());
                    to_server::password(&hash, &mut out)
                        .map_err(|e| self.protocol_error(e.to_string()))?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut mechanisms = body.mechanisms();
                    let mut offered = false;
                    while let Some(m) = mechanisms
                        .next()
                        .map_err(|e| self.protocol_error(e.to_string()))?
                    {
                        offered |= m == sasl::SCRAM_SHA_256;
                    }
                    if !offered {
                        return Err(BackendError::UnsupportedAuth {
                            server: self.server.name.clone(),
                            method: "SASL without SCRAM-SHA-256",
                        });
                    }
                    self.scram(password()?.as_bytes()).await?;
                    continue;
                }
                Message::ErrorResponse(body) => return Err(self.refused(body.fields())),
                Message::AuthenticationKerberosV5
                | Message::AuthenticationScmCredential
                | Message::AuthenticationGss
                | Message::AuthenticationSspi => {
                    return Err(BackendError::UnsupportedAuth {
                        server: self.server.name.clone(),
                        method: "Kerberos/GSSAPI/SSPI",
                    })
                }
                _ => return Err(self.protocol_error("unexpected message during authentication")),
            }
            self.send(&out).await?;
        }
    }

    async fn scram(&mut self, password: &[u8]) -> Result<(), BackendError> {
        let mut scram = ScramSha256::new(password, ChannelBinding::unsupported());
        let mut out = BytesMut::with_capacity(256);
        to_server::sasl_initial_response(sasl::SCRAM_SHA_256, scram.message(), &mut out)
            .map_err(|e| self.protocol_error(e.to_string()))?;
        self.send(&out).await?;
        match self.next_message().await? {
            Message::AuthenticationSaslContinue(body) => scram
                .update(body.data())
                .map_err(|e| self.protocol_error(format!("SCRAM: {e}")))?,
            Message::ErrorResponse(body) => return Err(self.refused(body.fields())),
            _ => return Err(self.protocol_error("expected SASLContinue")),
        }
        out.clear();
        to_server::sasl_response(scram.message(), &mut out)
            .map_err(|e| self.protocol_error(e.to_string()))?;
        self.send(&out).await?;
        match self.next_message().await? {
            Message::AuthenticationSaslFinal(body) => scram
                .finish(body.data())
                .map_err(|e| self.protocol_error(format!("SCRAM: {e}"))),
            Message::ErrorResponse(body) => Err(self.refused(body.fields())),
            _ => Err(self.protocol_error("expected SASLFinal")),
        }
    }

    /// The row tier's tenant this connection is bound to, as last confirmed by the server.
    pub fn bound_tenant(&self) -> Option<&str> {
        self.bound.as_deref()
    }

    /// Readies this row-tier connection for tenant switching with `key` (see
    /// `tenancy::row_context`).
    ///
    /// Row tenants share the login role, and any role may `ALTER ROLE CURRENT_USER SET ...`
    /// its own defaults, which every later session of every tenant on it would start with
    /// (a 1 ms statement_timeout, read-only transactions). So the role's defaults are cleared
    /// here; false means they had been set and this session, which started with them, must
    /// be replaced.
    async fn open_row(
        &mut self,
        key: Option<&RowKey>,
        database: &str,
    ) -> Result<bool, BackendError> {
        let key = key.ok_or_else(|| BackendError::RowContext {
            server: self.server.name.clone(),
            scope: format!("database \"{database}\""),
            reason: "this proxy has no row key (set row_key, or use a registry)".into(),
        })?;
        match self.query_value(row_context::ROLE_DEFAULTS_SQL).await {
            Ok(Some(t)) if t == "t" => {
                if self.query_value(IN_RECOVERY_SQL).await?.as_deref() == Some("t") {
                    // Never serve a session that started with them; the primary's next
                    // row-tier login clears them, and the standby replays that.
                    return Err(BackendError::RowContext {
                        server: self.server.name.clone(),
                        scope: format!("database \"{database}\""),
                        reason: "the login role has defaults of its own (ALTER ROLE ... SET), which a hot standby cannot clear; pgtenant clears them at its next row-tier login to the primary".into(),
                    });
                }
                tracing::warn!(server = %self.server.name, database, "the row tier's login role had defaults of its own (ALTER ROLE ... SET); cleared them");
                self.execute(row_context::CLEAR_ROLE_DEFAULTS_SQL).await?;
                return Ok(false);
            }
            Ok(_) => {}
            Err(e) => return Err(e),
        }
        self.row_key = Some(key.clone());
        self.row_database = Some(Arc::from(database));
        Ok(true)
    }

    /// Clears everything of the previous client's session (the row-tier context too).
    pub async fn clear_session(&mut self) -> Result<(), BackendError> {
        self.bound = None;
        self.execute(row_context::SWITCH_RESET_SQL).await?;
        self.prepared.clear();
        self.applied_settings = Arc::from("");
        Ok(())
    }

    /// Binds this connection to `row`'s tenant, leaving the rest of its session as it is.
    pub async fn bind_row(&mut self, row: &RowBinding) -> Result<(), BackendError> {
        self.bound = None;
        let mut out = BytesMut::with_capacity(256);
        self.put_row_bind(&mut out, &row.tenant)?;
        match self.run_checked(&out).await? {
            Ok(true) => {
                self.bound = Some(row.tenant.clone());
                Ok(())
            }
            Ok(false) => Err(self.row_refused()),
            Err((code, message)) => Err(self.row_failed(not_installed(&code).unwrap_or(message))),
        }
    }

    /// Appends the statement that binds this connection to `tenant` (Parse, Bind, Execute,
    /// Sync; command tag `SELECT 1` when the server accepted it).
    pub(crate) fn put_row_bind(
        &self,
        out: &mut BytesMut,
        tenant: &str,
    ) -> Result<(), BackendError> {
        let key = self.row_key.as_ref().ok_or_else(|| {
            self.row_failed("the connection was not opened for the row tier".into())
        })?;
        row_context::put_bind(out, key, self.cancel.pid, tenant)
            .map_err(|e| self.row_failed(e.into()))
    }

    /// The error for a bind the server refused: its key is not this proxy's.
    pub(crate) fn row_refused(&self) -> BackendError {
        self.row_failed(
            "the proof was rejected: the database holds a different row key than this proxy (re-run `pgtenant row-tier-install` or `migrate`, or check row_key)".into(),
        )
    }

    fn row_failed(&self, reason: String) -> BackendError {
        BackendError::RowContext {
            server: self.server.name.clone(),
            scope: format!(
                "database \"{}\"",
                self.row_database.as_deref().unwrap_or_default()
            ),
            reason,
        }
    }

    /// Sends one of pgtenant's own extended-protocol statements (ending in Sync) and reads up
    /// to ReadyForQuery: whether its command tag was `SELECT 1`, or the server's error.
    async fn run_checked(
        &mut self,
        out: &[u8],
    ) -> Result<Result<bool, (String, String)>, BackendError> {
        self.send(out).await?;
        let reply = self.own_reply().await?;
        Ok(match reply.error {
            Some(e) => Err(e),
            None => Ok(reply.accepted),
        })
    }

    /// Runs a one-value query of pgtenant's own and returns its first column as text.
    pub async fn query_value(&mut self, sql: &str) -> Result<Option<String>, BackendError> {
        let mut out = BytesMut::with_capacity(sql.len() + 8);
        to_server::query(sql, &mut out).map_err(|e| self.protocol_error(e.to_string()))?;
        self.send(&out).await?;
        let OwnReply { value, error, .. } = self.own_reply().await?;
        match error {
            Some((code, message)) => Err(BackendError::Statement {
                server: self.server.name.clone(),
                code,
                message,
            }),
            None => Ok(value),
        }
    }

    /// Reads the server's reply to one of pgtenant's own requests, up to ReadyForQuery.
    async fn own_reply(&mut self) -> Result<OwnReply, BackendError> {
        let mut reply = OwnReply::default();
        loop {
            match self.next_message().await? {
                Message::CommandComplete(body) => {
                    reply.accepted = body.tag().ok() == Some(row_context::ACCEPTED_TAG);
                }
                Message::DataRow(row) => {
                    if let Ok(Some(Some(range))) = row.ranges().next() {
                        let text = String::from_utf8_lossy(&row.buffer()[range]).into_owned();
                        reply.value.get_or_insert(text);
                    }
                }
                Message::ErrorResponse(body) => {
                    let (code, message, _) = error_fields(body.fields());
                    reply.error.get_or_insert((code, message));
                }
                Message::ReadyForQuery(body) => {
                    self.tx_status = body.status();
                    return Ok(reply);
                }
                _ => {}
            }
        }
    }

    /// Runs one of the proxy's own statements with the simple protocol and waits for
    /// ReadyForQuery. Rows are discarded; ParameterStatus updates are recorded.
    pub async fn execute(&mut self, sql: &str) -> Result<(), BackendError> {
        let mut out = BytesMut::with_capacity(sql.len() + 8);
        to_server::query(sql, &mut out).map_err(|e| self.protocol_error(e.to_string()))?;
        self.send(&out).await?;
        let mut failure = None;
        loop {
            match self.next_message().await? {
                Message::ReadyForQuery(body) => {
                    self.tx_status = body.status();
                    return match failure {
                        Some(e) => Err(e),
                        None => Ok(()),
                    };
                }
                Message::ErrorResponse(body) => {
                    let (code, message, fatal) = error_fields(body.fields());
                    if fatal {
                        self.broken = true;
                        return Err(BackendError::Lost {
                            server: self.server.name.clone(),
                            reason: message,
                        });
                    }
                    failure.get_or_insert(BackendError::Statement {
                        server: self.server.name.clone(),
                        code,
                        message,
                    });
                }
                Message::ParameterStatus(body) => {
                    let (name, value) = (lossy(body.name()), lossy(body.value()));
                    self.set_param(name, value);
                }
                Message::CopyInResponse(_) => {
                    self.broken = true;
                    return Err(self.protocol_error("internal statement started COPY"));
                }
                _ => {}
            }
        }
    }

    /// Reads whatever the server sent next into `read_buf` (cancel-safe).
    pub(crate) async fn read_more(&mut self) -> std::io::Result<usize> {
        self.stream.read_buf(&mut self.read_buf).await
    }

    pub fn params(&self) -> &[(String, String)] {
        &self.params
    }

    /// The server's process id for this connection.
    /// Protocol and cipher suite when the connection uses TLS (SHOW SERVERS).
    pub fn tls_description(&self) -> Option<String> {
        self.stream.tls_description()
    }

    pub fn pid(&self) -> u32 {
        self.cancel.pid
    }

    pub fn cancel_target(&self) -> &Arc<CancelTarget> {
        &self.cancel
    }

    pub fn server(&self) -> &Arc<Server> {
        &self.server
    }

    pub fn age(&self) -> Duration {
        self.created.elapsed()
    }

    /// `age` to the coarse clock's few milliseconds: no precise clock read.
    pub fn coarse_age_ms(&self) -> u64 {
        super::health::coarse_ms().saturating_sub(self.created_ms)
    }

    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Whether an idle connection turns out dead: the server closed it, or sent something
    /// unasked (the FATAL of pg_terminate_backend or a shutdown). One non-blocking peek at the
    /// socket, asked of the kernel: tokio's readiness flag may not have caught up yet.
    pub fn is_dead(&mut self) -> bool {
        if self.broken || !self.read_buf.is_empty() {
            return true;
        }
        let fd = match &self.stream {
            BackendStream::Tcp(s) => std::os::fd::AsRawFd::as_raw_fd(s),
            BackendStream::Unix(s) => std::os::fd::AsRawFd::as_raw_fd(s),
            // Post-handshake TLS messages arrive before the startup replies and are read with
            // them, so a byte waiting on an idle TLS socket is the server's too.
            BackendStream::Tls(t) => std::os::fd::AsRawFd::as_raw_fd(t.get_ref().0),
            BackendStream::Closed => return true,
        };
        let mut byte = 0u8;
        // SAFETY: a one-byte buffer we own; MSG_PEEK leaves the data where it is.
        let n = unsafe {
            libc::recv(
                fd,
                (&mut byte as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        let alive = n < 0 && {
            let e = std::io::Error::last_os_error().raw_os_error();
            e == Some(libc::EAGAIN) || e == Some(libc::EWOULDBLOCK)
        };
        if !alive {
            self.broken = true;
        }
        !alive
    }

    /// `is_dead` for a checkout by a task this thread's reactor just woke for the client's new
    /// request, which arrived after the connection was parked. On a runtime of one thread,
    /// one epoll_wait's events are all dispatched before any task runs, and the kernel hands
    /// them out in order of arrival; so whatever the server sent before that request (the
    /// FATAL of pg_terminate_backend, its close) has already set the socket's readiness, when
    /// the same reactor watches the socket: this thread's one-thread runtime opened the
    /// connection. Then the kernel is asked only when the flag says readable: a system call
    /// saved per transaction. A close that comes after the client's request is a race either
    /// check loses, and the engine recovers from it as from any lost server connection.
    pub fn is_dead_after_wake(&mut self) -> bool {
        let same_loop = self.home_loop != 0 && self.home_loop == thread_token();
        if same_loop && !self.broken && self.read_buf.is_empty() {
            if let Some(false) = self.stream.seen_readable() {
                return false;
            }
        }
        self.is_dead()
    }

    pub fn mark_broken(&mut self) {
        self.broken = true;
    }

    pub fn tx_status(&self) -> u8 {
        self.tx_status
    }

    pub(crate) fn set_param(&mut self, name: String, value: String) {
        match self.params.iter_mut().find(|(k, _)| *k == name) {
            Some(slot) => slot.1 = value,
            None => self.params.push((name, value)),
        }
    }

    pub(crate) async fn send(&mut self, bytes: &[u8]) -> Result<(), BackendError> {
        if let Err(e) = self.stream.write_all(bytes).await {
            self.broken = true;
            return Err(BackendError::Lost {
                server: self.server.name.clone(),
                reason: e.to_string(),
            });
        }
        Ok(())
    }

    /// Next whole message on the control path.
    pub(crate) async fn next_message(&mut self) -> Result<Message, BackendError> {
        loop {
            match Message::parse(&mut self.read_buf) {
                Ok(Some(m)) => return Ok(m),
                Ok(None) => {}
                Err(e) => {
                    self.broken = true;
                    return Err(self.protocol_error(e.to_string()));
                }
            }
            if self.read_buf.capacity() - self.read_buf.len() < 1024 {
                self.read_buf.reserve(8192);
            }
            match self.stream.read_buf(&mut self.read_buf).await {
                Ok(0) => {
                    self.broken = true;
                    return Err(BackendError::Lost {
                        server: self.server.name.clone(),
                        reason: "server closed the connection".into(),
                    });
                }
                Ok(_) => {}
                Err(e) => {
                    self.broken = true;
                    return Err(BackendError::Lost {
                        server: self.server.name.clone(),
                        reason: e.to_string(),
                    });
                }
            }
        }
    }

    fn refused(
        &mut self,
        fields: postgres_protocol::message::backend::ErrorFields<'_>,
    ) -> BackendError {
        self.broken = true;
        let (code, message, _) = error_fields(fields);
        BackendError::Refused {
            server: self.server.name.clone(),
            code,
            message,
        }
    }

    fn protocol_error(&mut self, reason: impl Into<String>) -> BackendError {
        self.broken = true;
        BackendError::Protocol {
            server: self.server.name.clone(),
            reason: reason.into(),
        }
    }
}

fn lossy(r: std::io::Result<&str>) -> String {
    r.map(str::to_string).unwrap_or_default()
}

/// (SQLSTATE, message, is FATAL/PANIC) of an ErrorResponse.
pub(crate) fn error_fields(
    mut fields: postgres_protocol::message::backend::ErrorFields<'_>,
) -> (String, String, bool) {
    let (mut code, mut message, mut fatal) = (String::new(), String::new(), false);
    while let Ok(Some(f)) = fields.next() {
        let value = String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            b'C' => code = value,
            b'M' => message = value,
            b'V' => fatal = value == "FATAL" || value == "PANIC",
            _ => {}
        }
    }
    (code, message, fatal)
}

/// Whether the server is a hot standby.
const IN_RECOVERY_SQL: &str = "SELECT pg_catalog.pg_is_in_recovery()";

/// The message for an error that says the row-tier functions are missing.
fn not_installed(code: &str) -> Option<String> {
    // undefined_function / invalid_schema_name
    (code == "42883" || code == "3F000").then(|| {
        format!(
            "{}'s functions do not exist in this database: install them with `pgtenant row-tier-install` (or `pgtenant tenant create` / `migrate` with a registry)",
            row_context::SCHEMA
        )
    })
}

/// The calling thread, when the task calling runs on a runtime of one thread (`worker_threads
/// = 1`): that runtime's reactor and tasks take turns on this thread alone. 0 otherwise.
fn loop_token() -> u64 {
    let one_loop = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread);
    if one_loop {
        thread_token()
    } else {
        0
    }
}

/// A number of the calling thread's own, never 0: a thread-local read, where
/// `std::thread::current()` would clone an `Arc`.
fn thread_token() -> u64 {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static TOKEN: Cell<u64> = const { Cell::new(0) };
    }
    TOKEN.with(|t| {
        if t.get() == 0 {
            t.set(NEXT.fetch_add(1, Ordering::Relaxed));
        }
        t.get()
    })
}
