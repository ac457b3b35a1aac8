//! Everything that can end a client session, and what the client is told.

use crate::backend::BackendError;
use crate::pool::PoolError;
use crate::protocol::startup::StartupError;
use crate::protocol::{sqlstate, ErrorReport, FrameError};
use crate::tenancy::ResolveError;

use super::auth::AuthError;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Startup(#[from] StartupError),
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error("tenant \"{0}\" does not exist")]
    UnknownTenant(String),
    #[error("tenant \"{0}\" is suspended")]
    Suspended(String),
    #[error("tenant \"{0}\" is unavailable: {1}")]
    Unavailable(String, String),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("invalid frontend message type {0}")]
    UnknownMessage(u8),
    #[error("malformed message of type '{}'", char::from(*.0))]
    Malformed(u8),
    #[error(transparent)]
    Limit(#[from] crate::clients::limits::LimitError),
    #[error("timed out during startup and authentication")]
    LoginTimeout,
    #[error("permission denied: \"{0}\" is not an admin user of the pgtenant console")]
    NotAdmin(String),
    #[error("client connection lost: {0}")]
    ClientIo(#[from] std::io::Error),
    #[error("this server requires an encrypted connection: connect with sslmode=require")]
    TlsRequired,
    #[error("tenant \"{0}\" requires an encrypted connection: connect with sslmode=require")]
    TenantRequiresTls(String),
    #[error("user \"{0}\" must authenticate with SCRAM-SHA-256-PLUS: connect with channel_binding=require over TLS")]
    ChannelBindingRequired(String),
    #[error("TLS is not enabled on this server")]
    TlsUnavailable,
    #[error(transparent)]
    Tls(#[from] crate::tls::acceptor::HandshakeError),
}

impl SessionError {
    /// The ErrorResponse for the client, or None when there is no one left to tell.
    pub fn report(&self) -> Option<ErrorReport> {
        use SessionError::*;
        Some(match self {
            // Nothing can be told over a failed handshake, nor over TLS to a plaintext client.
            Startup(StartupError::Closed | StartupError::Io(_))
            | ClientIo(_)
            | Tls(_)
            | TlsUnavailable => return None,
            TlsRequired | TenantRequiresTls(_) | ChannelBindingRequired(_) => {
                ErrorReport::fatal(sqlstate::INVALID_AUTHORIZATION, self.to_string())
            }
            Startup(e @ StartupError::UnsupportedVersion { .. }) => {
                ErrorReport::fatal(sqlstate::FEATURE_NOT_SUPPORTED, e.to_string())
            }
            Startup(e) => ErrorReport::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string()),
            Resolve(e @ ResolveError::Replication) => {
                ErrorReport::fatal(sqlstate::FEATURE_NOT_SUPPORTED, e.to_string())
            }
            Resolve(e @ ResolveError::BadTarget(_)) => {
                ErrorReport::fatal(sqlstate::INVALID_PARAMETER_VALUE, e.to_string())
            }
            Resolve(e @ ResolveError::BadOption(_)) => {
                ErrorReport::fatal(sqlstate::FEATURE_NOT_SUPPORTED, e.to_string())
            }
            Resolve(e) => ErrorReport::fatal(sqlstate::INVALID_AUTHORIZATION, e.to_string()),
            NotAdmin(_) => ErrorReport::fatal("42501", self.to_string())
                .with_hint("admin users are listed under [admin] users in the config"),
            UnknownTenant(_) => {
                ErrorReport::fatal(sqlstate::INVALID_CATALOG_NAME, self.to_string())
            }
            Suspended(_) => {
                ErrorReport::fatal(sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE, self.to_string())
                    .with_hint("ask the operator to resume the tenant")
            }
            Unavailable(..) => ErrorReport::fatal(sqlstate::SYSTEM_ERROR, self.to_string())
                .with_hint("the operator must fix the tenant's registry entry"),
            Auth(e) => return e.report(),
            Pool(e) => e.report(),
            Backend(e) => e.report(),
            Frame(e @ FrameError::TooLarge { .. }) => {
                ErrorReport::fatal(sqlstate::PROGRAM_LIMIT_EXCEEDED, e.to_string())
            }
            Frame(e) => ErrorReport::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string()),
            UnknownMessage(_) | Malformed(_) => {
                ErrorReport::fatal(sqlstate::PROTOCOL_VIOLATION, self.to_string())
            }
            LoginTimeout => ErrorReport::fatal(sqlstate::CANNOT_CONNECT_NOW, self.to_string()),
            Limit(e) => ErrorReport::fatal(sqlstate::TOO_MANY_CONNECTIONS, e.to_string()),
        })
    }
}
