//! Client authentication: SCRAM-SHA-256 against the tenant's stored verifiers.
//!
//! An unknown user goes through the same exchange against a mock verifier and fails with the
//! same message, so a client cannot tell a missing user from a wrong password.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::protocol::framing::cstr;
use crate::protocol::{messages, sqlstate, ErrorReport};

use super::scram::{ScramError, ScramExchange, MECHANISM, MECHANISM_PLUS};
use crate::credentials::ScramVerifier;

/// SASL messages are a few hundred bytes; anything much larger is not one.
const MAX_AUTH_MESSAGE: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("password authentication failed for user \"{0}\"")]
    Failed(String),
    #[error("malformed authentication message: {0}")]
    Malformed(String),
    #[error("client selected an invalid SASL authentication mechanism")]
    Mechanism,
    #[error("channel binding is not supported on a connection without TLS: connect with sslmode=require")]
    ChannelBinding,
    #[error("SCRAM channel binding negotiation error: the client thinks the server cannot bind the exchange to TLS, and it can")]
    Downgrade,
    #[error("client went away during authentication")]
    Gone,
}

impl AuthError {
    pub fn report(&self) -> Option<ErrorReport> {
        Some(match self {
            AuthError::Failed(_) => {
                ErrorReport::fatal(sqlstate::INVALID_PASSWORD, self.to_string())
            }
            AuthError::Gone => return None,
            AuthError::ChannelBinding => {
                ErrorReport::fatal(sqlstate::FEATURE_NOT_SUPPORTED, self.to_string())
            }
            AuthError::Downgrade => {
                ErrorReport::fatal(sqlstate::INVALID_AUTHORIZATION, self.to_string())
            }
            _ => ErrorReport::fatal(sqlstate::PROTOCOL_VIOLATION, self.to_string()),
        })
    }
}

/// Runs the SASL exchange. On success the client has been sent SASLFinal and AuthenticationOk,
/// and the answer says whether the exchange was bound to the TLS channel. `channel`: the
/// connection's `tls-server-end-point` data when it is TLS, which offers SCRAM-SHA-256-PLUS.
pub async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    user: &str,
    verifier: ScramVerifier,
    user_exists: bool,
    channel: Option<&[u8]>,
) -> Result<bool, AuthError> {
    let mut out = BytesMut::with_capacity(256);
    if channel.is_some() {
        messages::auth_sasl(&mut out, &[MECHANISM_PLUS, MECHANISM]);
    } else {
        messages::auth_sasl(&mut out, &[MECHANISM]);
    }
    stream.write_all(&out).await.map_err(|_| AuthError::Gone)?;
    stream.flush().await.map_err(|_| AuthError::Gone)?;

    let initial = read_password_message(stream).await?;
    let (mechanism, rest) = cstr(&initial).ok_or_else(|| malformed("missing mechanism"))?;
    let plus = match mechanism {
        m if m == MECHANISM.as_bytes() => false,
        m if m == MECHANISM_PLUS.as_bytes() && channel.is_some() => true,
        _ => return Err(AuthError::Mechanism),
    };
    if rest.len() < 4 {
        return Err(malformed("missing initial response length"));
    }
    let len = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
    let data = &rest[4..];
    if len < 0 || len as usize != data.len() {
        return Err(malformed("initial response length does not match"));
    }
    let exchange =
        ScramExchange::start(verifier, data, channel, plus).map_err(scram_error(user))?;
    let bound = exchange.is_bound();

    out.clear();
    messages::auth_sasl_continue(&mut out, exchange.server_first());
    stream.write_all(&out).await.map_err(|_| AuthError::Gone)?;
    stream.flush().await.map_err(|_| AuthError::Gone)?;

    let response = read_password_message(stream).await?;
    let server_final = exchange.finish(&response).map_err(scram_error(user))?;
    if !user_exists {
        return Err(AuthError::Failed(user.to_string()));
    }
    out.clear();
    messages::auth_sasl_final(&mut out, server_final.as_bytes());
    messages::auth_ok(&mut out);
    stream.write_all(&out).await.map_err(|_| AuthError::Gone)?;
    Ok(bound)
}

fn scram_error(user: &str) -> impl Fn(ScramError) -> AuthError + '_ {
    move |e| match e {
        ScramError::BadProof => AuthError::Failed(user.to_string()),
        ScramError::ChannelBinding => AuthError::ChannelBinding,
        ScramError::Downgrade => AuthError::Downgrade,
        ScramError::Malformed(m) => AuthError::Malformed(m.to_string()),
    }
}

fn malformed(m: &str) -> AuthError {
    AuthError::Malformed(m.to_string())
}

/// Reads one PasswordMessage-family ('p') message body.
async fn read_password_message<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Vec<u8>, AuthError> {
    let mut header = [0u8; 5];
    stream
        .read_exact(&mut header)
        .await
        .map_err(|_| AuthError::Gone)?;
    if header[0] != b'p' {
        return Err(AuthError::Malformed(format!(
            "expected a password message, got message type {}",
            header[0]
        )));
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if !(4..=MAX_AUTH_MESSAGE).contains(&len) {
        return Err(malformed("invalid password message length"));
    }
    let mut body = vec![0u8; len - 4];
    stream
        .read_exact(&mut body)
        .await
        .map_err(|_| AuthError::Gone)?;
    Ok(body)
}
