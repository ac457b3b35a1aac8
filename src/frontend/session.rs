//! One client, from its first byte to the backend's reset.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use pgwire::messages::startup::ParameterStatus;
use pgwire::messages::Message;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{debug, info, warn, Instrument};

use crate::backend::reset::{self, Leftover};
use crate::backend::BackendError;
use crate::config::TlsMode;
use crate::config::{PoolMode, TenantStatus};
use crate::context::ProxyContext;
use crate::pool::{Liveness, Patience, PoolError, PooledBackend, ReadPolicy, TenantPool};
use crate::protocol::startup::{read_startup, StartupMessage, StartupPacket};
use crate::protocol::{messages, Scanner};
use crate::tenancy::{resolve, Addressed, Tenant};
use crate::tls::acceptor::TlsSettings;

use super::auth::authenticate;
use super::client_state::ClientState;
use super::error::SessionError;
use super::relay::{relay, send_report, RelayEnd, SessionRules};
use super::transaction::{Engine, TxEnd};
use crate::clients::cancel::CancelGuard;
use crate::clients::limits::{ClientSlot, PendingLogin};
use crate::clients::stream::ClientStream;
use crate::credentials::ScramVerifier;

/// Checkout attempts when a pooled connection turns out to be dead.
const CHECKOUT_ATTEMPTS: usize = 3;

pub async fn run(tcp: TcpStream, peer: SocketAddr, ctx: Arc<ProxyContext>, pending: PendingLogin) {
    let _ = tcp.set_nodelay(true);
    let mut client = ClientStream::Plain(tcp);
    let started = Instant::now();
    let login_timeout = Duration::from_secs(ctx.config.auth_timeout.max(1));
    // In a block of its own, so the login's result takes no room in the session's state.
    let (mut who, tenant, _slot) = {
        let login = match Box::pin(tokio::time::timeout(
            login_timeout,
            login(&mut client, &ctx, peer),
        ))
        .await
        {
            Ok(r) => r,
            Err(_) => Err(SessionError::LoginTimeout),
        };
        drop(pending);
        match login {
            Ok(Login::Session(who, tenant, slot)) => (who, tenant, slot),
            Ok(Login::Cancel) => return,
            Ok(Login::Admin(user)) => {
                info!(user = %user, client = %peer, "admin console session opened");
                Box::pin(crate::admin::serve(&mut client, &ctx, &user)).await;
                return;
            }
            Err(e) => {
                Box::pin(refuse(&mut client, peer, &e)).await;
                return;
            }
        }
    };

    // The user was found during login, so this lookup cannot miss.
    let Some(user) = tenant.user(&who.role) else {
        return;
    };
    let pool = ctx.pools.get(&tenant, user);
    let _in_pool = pool.enter();
    let reads = ReadPolicy::for_session(&tenant, user, who.intent);
    if reads.read_only_session() {
        // Also read-only on the primary, when no replica is usable.
        who.settings
            .push(("default_transaction_read_only".into(), "on".into()));
    }
    let stats = pool.stats();
    let info = crate::clients::cancel::ClientInfo {
        role: stats.role_name().clone(),
        database: pool.database_name().clone(),
        addr: peer,
        application_name: who
            .settings
            .iter()
            .find(|(k, _)| k == "application_name")
            .map(|(_, v)| v.as_str())
            .unwrap_or_default()
            .into(),
        connected: std::time::SystemTime::now(),
        tls: client.tls_description().map(String::into_boxed_str),
    };
    let cancel =
        ctx.cancels
            .register_client(stats.tenant_name().clone(), client.raw_fd(), Some(info));
    let mode = tenant.pool_mode;
    let state = ClientState::from_startup(&who.settings);
    // Kept as statements in `state`; an idle client should not hold them twice.
    drop(std::mem::take(&mut who.settings));
    // Everything logged for this session from here on names its tenant, role and client.
    let span = tracing::info_span!(
        "session",
        tenant = %who.tenant,
        role = %who.role,
        client = %peer,
        client_id = cancel.key().pid
    );
    let (mut backend, login_pool) = {
        let attached = {
            let mut target = pool.clone();
            loop {
                let r = Box::pin(
                    attach_routed(&mut client, &ctx, &tenant, &target, reads, &state, &cancel)
                        .instrument(span.clone()),
                )
                .await;
                // The tenant's entry changed while this client waited (a failover, say): go on
                // with the pool built from the new one.
                match (r, target.current()) {
                    (Err(SessionError::Pool(PoolError::Retired)), Some(next)) => target = next,
                    (Err(SessionError::Pool(PoolError::Retired)), None) => {
                        break Err(SessionError::Pool(PoolError::Removed(tenant.id.clone())))
                    }
                    (r, _) => break r,
                }
            }
        };
        match attached {
            Ok(b) => b,
            Err(e) => {
                warn!(tenant = %who.tenant, role = %who.role, client = %peer, error = %e, "session refused");
                if let Some(r) = e.report() {
                    Box::pin(send_report(&mut client, &r)).await;
                }
                return;
            }
        }
    };
    info!(tenant = %who.tenant, role = %who.role, client = %peer, mode = ?mode, "session opened");
    let reset_timeout = Duration::from_secs(ctx.config.pool.reset_timeout.max(1));
    let slow = Some(
        tenant
            .slow_transaction_ms
            .unwrap_or(ctx.config.log.slow_transaction_ms),
    )
    .filter(|ms| *ms > 0)
    .map(Duration::from_millis);
    let max_message = ctx.config.max_message_bytes as usize;

    // Each mode's state is boxed so an idle client's task stays small.
    let (how, bytes_in, bytes_out) = match mode {
        PoolMode::Session => Box::pin(async {
            let stats = pool.stats();
            stats.active.inc();
            let outcome = relay(
                &mut client,
                &mut backend,
                max_message,
                SessionRules {
                    row: pool.row(),
                    limits: tenant.enforce_limits.as_deref(),
                    stats: pool.stats(),
                    cancel: &cancel,
                    slow,
                    notifications: tenant.tier.rules().notifications,
                },
            )
            .await;
            stats.active.dec();
            cancel.unlink();
            farewell(&mut client, &cancel).await;
            drop(client);
            let how = describe_end(&outcome.end, &who, peer);
            match Box::pin(reset::reset(&mut backend, outcome.leftover, reset_timeout)).await {
                Ok(()) => login_pool.park(backend),
                Err(e) => {
                    warn!(tenant = %who.tenant, role = %who.role, error = %e, "server connection could not be reset; closing it");
                    login_pool.discard(backend);
                }
            }
            (how, outcome.bytes_in, outcome.bytes_out)
        }.instrument(span.clone()))
        .await,
        // A task of its own, holding only what the session needs from here on: this is
        // where an idle client waits, and the login's larger state is freed with this task.
        PoolMode::Transaction => {
            backend.applied_settings = state.script().clone();
            cancel.unlink();
            login_pool.park(backend);
            let p = &ctx.config.pool;
            let engine = Engine::new(
                pool.clone(),
                reads,
                state,
                cancel,
                max_message,
                p.max_prepared_statements,
                p.idle_transaction_timeout,
            )
            .with_slow_log(slow);
            let session = Box::new(TxSession {
                engine,
                client,
                peer,
                started,
                reset_secs: reset_timeout.as_secs().min(u32::MAX as u64) as u32,
                in_pool: _in_pool,
                _slot,
            });
            // Its span entered only when it logs: it is polled twice per transaction.
            crate::logging::spawn_in_span(serve_transactions(session), span);
            return;
        }
    };
    closed(
        &pool,
        &who.tenant,
        &who.role,
        peer,
        started,
        how,
        bytes_in,
        bytes_out,
    );
}

/// A transaction-mode session after its login: on the heap, so the task that waits for the
/// client between transactions holds little more than a pointer.
struct TxSession {
    engine: Engine,
    client: ClientStream,
    peer: SocketAddr,
    started: Instant,
    reset_secs: u32,
    /// Counts the client in its pool, and holds the pool.
    in_pool: crate::pool::PoolClientGuard,
    _slot: ClientSlot,
}

/// Serves a transaction-mode session until the client leaves, then resets what it left.
async fn serve_transactions(mut session: Box<TxSession>) {
    let s = &mut *session;
    let outcome = s.engine.run(&mut s.client).await;
    // Boxed: the idle client's task is as small as the wait above, not as the ending.
    Box::pin(end_transactions(session, outcome)).await;
}

/// Tells the client why its session ended, resets the backend it left, and accounts for it.
async fn end_transactions(
    mut session: Box<TxSession>,
    outcome: crate::frontend::transaction::TxOutcome,
) {
    let s = &mut *session;
    Box::pin(farewell(&mut s.client, s.engine.cancel())).await;
    // The names are the pool's, shared by its sessions.
    let (tenant, role, peer) = (
        s.in_pool.pool().stats().tenant_name().clone(),
        s.in_pool.pool().stats().role_name().clone(),
        s.peer,
    );
    let how = match &outcome.end {
        TxEnd::Terminated => "terminate",
        TxEnd::Shutdown => "shutdown",
        TxEnd::ClientGone => "client disconnected",
        TxEnd::ClientError(e) => {
            warn!(tenant = %tenant, client = %peer, error = %e, "client protocol error");
            "client protocol error"
        }
        TxEnd::ServerGone => "server connection lost",
        TxEnd::Timeout(_) => "idle in transaction timeout",
        TxEnd::Lost(_) => "LISTEN subscription lost",
        TxEnd::Pool(e) => {
            warn!(tenant = %tenant, client = %peer, error = %e, "no server connection");
            "no server connection"
        }
    };
    if let Some((mut be, left, be_pool)) = outcome.backend {
        s.engine.cancel().unlink();
        match Box::pin(reset::reset(
            &mut be,
            left,
            Duration::from_secs(s.reset_secs.into()),
        ))
        .await
        {
            Ok(()) => be_pool.park(be),
            Err(e) => {
                warn!(tenant = %tenant, role = %role, error = %e, "server connection could not be reset; closing it");
                be_pool.discard(be);
            }
        }
    }
    closed(
        s.in_pool.pool(),
        &tenant,
        &role,
        peer,
        s.started,
        how,
        outcome.bytes_in,
        outcome.bytes_out,
    );
}

/// Accounts for and logs the end of a session.
#[allow(clippy::too_many_arguments)]
fn closed(
    pool: &TenantPool,
    tenant: &str,
    role: &str,
    peer: SocketAddr,
    started: Instant,
    how: &str,
    bytes_in: u64,
    bytes_out: u64,
) {
    pool.stats()
        .client_seconds
        .inc_by(started.elapsed().as_secs_f64());
    info!(
        tenant = %tenant,
        role = %role,
        client = %peer,
        duration_ms = started.elapsed().as_millis() as u64,
        bytes_in,
        bytes_out,
        end = how,
        "session closed"
    );
}

/// Tells a client its session was ended by an operator, and lets go of its socket.
async fn farewell(client: &mut ClientStream, cancel: &CancelGuard) {
    if let Some(reason) = cancel.termination() {
        let report =
            crate::protocol::ErrorReport::fatal(crate::protocol::sqlstate::ADMIN_SHUTDOWN, reason);
        send_report(client, &report).await;
    }
    cancel.detach_socket();
}

fn describe_end(end: &RelayEnd, who: &Addressed, peer: SocketAddr) -> &'static str {
    match end {
        RelayEnd::Terminated => "terminate",
        RelayEnd::ClientGone => "client disconnected",
        RelayEnd::ClientError(e) => {
            warn!(tenant = %who.tenant, client = %peer, error = %e, "client protocol error");
            "client protocol error"
        }
        RelayEnd::ServerGone => "server connection lost",
        RelayEnd::Shutdown => "shutdown",
    }
}

enum Login {
    Session(Addressed, Arc<Tenant>, ClientSlot),
    Cancel,
    /// An admin user of the console (database `pgtenant`).
    Admin(String),
}

/// Startup packet, tenant resolution and authentication.
async fn login(
    client: &mut ClientStream,
    ctx: &ProxyContext,
    peer: SocketAddr,
) -> Result<Login, SessionError> {
    let tls = ctx.tls.current();
    let msg = match negotiate(client, &tls, peer).await? {
        First::Startup(m) => m,
        First::Cancel { pid, secret } => {
            let sent = ctx.cancels.cancel(pid, secret).await;
            debug!(sent, "cancel request");
            return Ok(Login::Cancel);
        }
    };
    if msg.minor > 0 || !msg.protocol_options.is_empty() {
        let mut out = BytesMut::new();
        messages::negotiate_protocol_version(&mut out, &msg.protocol_options);
        client.write_all(&out).await?;
    }
    if msg.param("database") == Some(crate::config::validate::ADMIN_DATABASE) {
        return admin_login(client, ctx, &msg).await;
    }
    let sni_tenant = client
        .tls()
        .and_then(|t| t.server_name.as_deref())
        .and_then(|n| tls.tenant_from_server_name(n));
    let who = resolve(&msg, &ctx.config.tenant_separator, sni_tenant)?;
    // Nothing about the tenant is told or taken before the client proves its password: an
    // unknown tenant, an unknown user and a wrong password run the same exchange and end in
    // the same error. Only the log says which it was.
    let tenant = ctx.registry.tenant(&who.tenant);
    let user = tenant.as_deref().and_then(|t| t.user(&who.role));
    let login_name = format!("{}{}{}", who.role, ctx.config.tenant_separator, who.tenant);
    let cert_ok = client
        .tls()
        .is_some_and(|t| t.peer_names.contains(&login_name));
    let method = user.map(|u| u.auth).unwrap_or_default();
    // A user the client cannot be (no such user, or a certificate user without its
    // certificate) runs the exchange against a mock verifier that no password matches.
    let (verifier, why_not) = match (&tenant, user) {
        (None, _) => (None, "no such tenant"),
        (Some(_), None) => (None, "no such user in the tenant"),
        (Some(_), Some(_)) if method.needs_cert() && !cert_ok => {
            (None, "no valid client certificate naming the user")
        }
        (Some(_), Some(u)) => (Some(u.verifier.clone()), "wrong password"),
    };
    let bound = if method.needs_password() || verifier.is_none() {
        let known = verifier.is_some();
        let verifier = verifier.unwrap_or_else(|| ScramVerifier::mock(&who.user, &ctx.mock_key));
        let channel = client.tls().map(|t| t.end_point.clone());
        match authenticate(client, &who.user, verifier, known, channel.as_deref()).await {
            Ok(bound) => bound,
            Err(e) => {
                if matches!(e, super::auth::AuthError::Failed(_)) {
                    info!(tenant = %who.tenant, role = %who.role, client = %peer, reason = why_not, "authentication failed");
                }
                return Err(e.into());
            }
        }
    } else {
        // `auth = "cert"` with the right certificate: no password exchange.
        let mut out = BytesMut::with_capacity(16);
        messages::auth_ok(&mut out);
        client.write_all(&out).await?;
        false
    };
    let Some(tenant) = tenant else {
        return Err(SessionError::UnknownTenant(who.tenant.clone()));
    };
    // Told only to a client that has proved who it is.
    if tenant.require_tls && !client.is_tls() {
        return Err(SessionError::TenantRequiresTls(tenant.id.clone()));
    }
    if method == crate::config::AuthMethod::ScramPlus && !bound {
        return Err(SessionError::ChannelBindingRequired(login_name));
    }
    // Only an authenticated client learns that the tenant is suspended.
    match tenant.status {
        TenantStatus::Active => {}
        TenantStatus::Suspended => return Err(SessionError::Suspended(tenant.id.clone())),
        TenantStatus::Deleted => return Err(SessionError::UnknownTenant(tenant.id.clone())),
    }
    if let Some(why) = &tenant.unavailable {
        return Err(SessionError::Unavailable(tenant.id.clone(), why.clone()));
    }
    // Counted only now, so unauthenticated connections cannot lock a tenant's clients out.
    let slot = ctx
        .limits
        .admit(&tenant.id, tenant.max_client_connections)?;
    Ok(Login::Session(who, tenant, slot))
}

/// A login to the admin console. Admin users authenticate against the config's verifiers; a
/// tenant's user who proves its password learns it is not an admin (42501); anyone else fails
/// like a wrong password, so the console reveals no user names.
async fn admin_login(
    client: &mut ClientStream,
    ctx: &ProxyContext,
    msg: &StartupMessage,
) -> Result<Login, SessionError> {
    let user = msg
        .param("user")
        .filter(|u| !u.is_empty())
        .ok_or(SessionError::Resolve(crate::tenancy::ResolveError::NoUser))?;
    let admin = ctx
        .config
        .admin
        .users
        .iter()
        .find(|a| a.name == user)
        .and_then(|a| ScramVerifier::parse(&a.scram))
        .or_else(|| ctx.registry.admin_verifier(user));
    let tenant_user = user
        .rsplit_once(ctx.config.tenant_separator.as_str())
        .and_then(|(role, t)| ctx.registry.tenant(t)?.user(role).cloned());
    let (verifier, known) = match (&admin, &tenant_user) {
        (Some(v), _) => (v.clone(), true),
        (None, Some(u)) => (u.verifier.clone(), true),
        (None, None) => (ScramVerifier::mock(user, &ctx.mock_key), false),
    };
    let channel = client.tls().map(|t| t.end_point.clone());
    authenticate(client, user, verifier, known, channel.as_deref()).await?;
    if admin.is_some() {
        Ok(Login::Admin(user.to_string()))
    } else {
        Err(SessionError::NotAdmin(user.to_string()))
    }
}

/// Answers encryption requests until the client sends its StartupMessage or a CancelRequest.
enum First {
    Startup(StartupMessage),
    Cancel { pid: u32, secret: u32 },
}

async fn negotiate(
    client: &mut ClientStream,
    tls: &TlsSettings,
    peer: SocketAddr,
) -> Result<First, SessionError> {
    // PostgreSQL 17's direct TLS: a ClientHello (record type 22) where a packet length would
    // be. No packet length starts with 22, since that would be a message of 360 MiB or more.
    if let ClientStream::Plain(tcp) = client {
        let mut first = [0u8; 1];
        if tcp.peek(&mut first).await? == 1 && first[0] == TLS_HANDSHAKE_RECORD {
            if !tls.offers_tls() {
                return Err(SessionError::TlsUnavailable);
            }
            upgrade(client, tls, true, peer).await?;
        }
    }
    // A client may ask for SSL and then GSSAPI encryption (or the reverse) before giving up.
    for _ in 0..3 {
        match read_startup(client).await? {
            StartupPacket::SslRequest if client.is_tls() => {
                return Err(SessionError::Startup(
                    crate::protocol::startup::StartupError::BadLayout(
                        "SSLRequest on a connection that is already encrypted",
                    ),
                ))
            }
            StartupPacket::SslRequest if tls.offers_tls() => {
                client.write_all(b"S").await?;
                upgrade(client, tls, false, peer).await?;
            }
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                let mut out = BytesMut::with_capacity(1);
                messages::refuse_encryption(&mut out);
                client.write_all(&out).await?;
            }
            // libpq sends cancel requests unencrypted before version 17.
            StartupPacket::Cancel { pid, secret } => return Ok(First::Cancel { pid, secret }),
            StartupPacket::Startup(_) if tls.mode == TlsMode::Require && !client.is_tls() => {
                return Err(SessionError::TlsRequired)
            }
            StartupPacket::Startup(m) => return Ok(First::Startup(m)),
        }
    }
    Err(SessionError::Startup(
        crate::protocol::startup::StartupError::BadLayout("too many encryption requests"),
    ))
}

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Runs the TLS handshake on the client's socket and goes on over TLS.
async fn upgrade(
    client: &mut ClientStream,
    tls: &TlsSettings,
    direct: bool,
    peer: SocketAddr,
) -> Result<(), SessionError> {
    let ClientStream::Plain(tcp) = std::mem::replace(client, ClientStream::Closed) else {
        return Err(SessionError::TlsUnavailable);
    };
    match tls.accept(tcp, direct).await {
        Ok(t) => {
            debug!(client = %peer, server_name = ?t.server_name, direct, "TLS established");
            *client = ClientStream::Tls(Box::new(t));
            Ok(())
        }
        Err(e) => Err(SessionError::Tls(e)),
    }
}

/// `attach` to the server the session's reads go to: a usable replica when all its
/// transactions are reads (another one, or the primary if allowed, when that fails), else
/// the primary. Returns the backend with the pool it came from.
async fn attach_routed(
    client: &mut ClientStream,
    ctx: &ProxyContext,
    tenant: &Tenant,
    primary: &Arc<TenantPool>,
    reads: ReadPolicy,
    state: &ClientState,
    cancel: &CancelGuard,
) -> Result<(Box<PooledBackend>, Arc<TenantPool>), SessionError> {
    if reads.all_reads {
        let mut last = None;
        if let Some(replicas) = primary.replicas() {
            for p in replicas.candidates() {
                match attach(client, ctx, tenant, p, Patience::FailFast, state, cancel).await {
                    Ok(be) => return Ok((be, p.clone())),
                    Err(SessionError::Pool(e)) if e.is_transient() => {
                        warn!(tenant = %tenant.id, replica = %p.health().name, error = %e, "replica unavailable for a read-only session");
                        last = Some(e);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        let last = last.as_ref().map(|e| e as &dyn std::fmt::Display);
        if let Some(e) = reads.refuse_primary(&tenant.id, last) {
            return Err(SessionError::Pool(e));
        }
    }
    let be = attach(
        client,
        ctx,
        tenant,
        primary,
        Patience::UntilTimeout,
        state,
        cancel,
    )
    .await?;
    Ok((be, primary.clone()))
}

/// Checks out a backend, brings it in line with the client (`prelude`) and tells the client it
/// is ready.
async fn attach(
    client: &mut ClientStream,
    ctx: &ProxyContext,
    tenant: &Tenant,
    pool: &TenantPool,
    patience: Patience,
    state: &ClientState,
    cancel: &CancelGuard,
) -> Result<Box<PooledBackend>, SessionError> {
    let mut last_err = None;
    for _ in 0..CHECKOUT_ATTEMPTS {
        let mut backend = pool.checkout_with(patience, Liveness::Peek).await?;
        // Whether a round trip just proved the connection alive.
        let mut proven = false;
        let row = pool.row();
        let plan = super::prelude::prelude(
            row.map(|r| &*r.tenant),
            backend.bound_tenant(),
            state,
            &backend.applied_settings,
            tenant.enforce_limits.is_some(),
        );
        if plan.reset {
            match backend.clear_session().await {
                Ok(()) => proven = true,
                Err(e) => {
                    debug!(error = %e, "pooled server connection is dead; trying another");
                    backend.mark_broken();
                    last_err = Some(e);
                    continue;
                }
            }
        }
        let mut sql = plan.settings.unwrap_or_default();
        if let (true, Some(caps)) = (plan.caps, &tenant.enforce_limits) {
            if !sql.is_empty() {
                sql.push_str("; ");
            }
            sql.push_str(caps);
        }
        // Nothing to run: no round trip. Transaction mode parks the connection again at once
        // (it is borrowed only for the server's parameters) and its checkout already checked
        // that the server had not closed it; a session-mode client keeps it, so a round trip
        // proves it first.
        let nothing_to_run =
            sql.is_empty() && (proven || tenant.pool_mode == PoolMode::Transaction);
        let mut setup_done = if nothing_to_run {
            Ok(())
        } else {
            backend.execute(&sql).await
        };
        // Bound last, so nothing above can clear the context.
        if let (Ok(()), Some(row), true) = (&setup_done, row, plan.bind) {
            setup_done = backend.bind_row(row).await;
        }
        match setup_done {
            Ok(()) => {
                cancel.link(backend.cancel_target());
                if tenant.pool_mode == PoolMode::Session {
                    // The client's one server process for the whole session: it is told its
                    // real id, as a direct client is.
                    cancel.adopt_server_pid(backend.pid());
                }
                let mut out = BytesMut::with_capacity(512);
                for (k, v) in backend.params() {
                    let _ = ParameterStatus::new(k.clone(), v.clone()).encode(&mut out);
                }
                let key = cancel.key();
                messages::backend_key_data(&mut out, key.pid, key.secret);
                messages::ready_for_query_idle(&mut out);
                client.write_all(&out).await?;
                return Ok(backend);
            }
            Err(e @ BackendError::RowContext { .. }) => {
                // The connection is sound (and bound to no tenant); the binding is not.
                pool.park(backend);
                return Err(SessionError::Backend(e));
            }
            Err(e @ BackendError::Statement { .. }) => {
                // The client's own settings are invalid: PostgreSQL would refuse the login too.
                let left = Leftover {
                    pending: 0,
                    unsynced: false,
                    copy_in: false,
                    scanner: Scanner::new(0, 0),
                };
                let timeout = Duration::from_secs(ctx.config.pool.reset_timeout.max(1));
                let _ = reset::reset(&mut backend, left, timeout).await;
                return Err(SessionError::Backend(e));
            }
            Err(e) => {
                debug!(error = %e, "pooled server connection is dead; trying another");
                backend.mark_broken();
                last_err = Some(e);
            }
        }
    }
    Err(SessionError::Pool(PoolError::Backend(last_err.unwrap_or(
        BackendError::Timeout {
            server: tenant.server.name.clone(),
        },
    ))))
}

/// Refuses a connection over `max_pending_logins`: the error goes out at once, then the
/// socket is half-closed and drained briefly so the client reads it instead of a reset.
pub async fn refuse_busy(mut client: TcpStream, peer: SocketAddr, max: usize) {
    let report = crate::protocol::ErrorReport::fatal(
        crate::protocol::sqlstate::TOO_MANY_CONNECTIONS,
        format!("sorry, too many clients logging in at once (max_pending_logins = {max})"),
    );
    debug!(client = %peer, "refused: too many pending logins");
    let mut out = BytesMut::with_capacity(128);
    report.encode(&mut out);
    let linger = async {
        client.write_all(&out).await?;
        client.shutdown().await?;
        let mut sink = [0u8; 512];
        while tokio::io::AsyncReadExt::read(&mut client, &mut sink).await? > 0 {}
        Ok::<(), std::io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), linger).await;
}

async fn refuse(client: &mut ClientStream, peer: SocketAddr, e: &SessionError) {
    match e.report() {
        Some(r) => {
            info!(client = %peer, code = r.code, error = %e, "connection refused");
            send_report(client, &r).await;
        }
        // Nothing can be said over a failed handshake; the log says why.
        None if matches!(e, SessionError::Tls(_) | SessionError::TlsUnavailable) => {
            info!(client = %peer, error = %e, "TLS handshake refused")
        }
        None => debug!(client = %peer, error = %e, "client left during login"),
    }
}
