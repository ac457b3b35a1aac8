//! Messages pgtenant sends to PostgreSQL servers as a client of its own: the login (startup,
//! passwords, SCRAM), its own statements, and cancel requests. Encoded with pgwire's message
//! types, like the messages it writes to clients (`messages.rs`); clients' own messages are
//! forwarded as they came, never re-encoded.

use bytes::{Bytes, BytesMut};
use pgwire::messages::cancel::CancelRequest;
use pgwire::messages::extendedquery::{Bind, Execute, Parse, Sync};
use pgwire::messages::simplequery::Query;
use pgwire::messages::startup::{Password, SASLInitialResponse, SASLResponse, SecretKey, Startup};
use pgwire::messages::Message;

/// A message pgwire would not encode (a size over the protocol's limits).
#[derive(Debug, thiserror::Error)]
#[error("cannot encode {what}: {reason}")]
pub struct EncodeError {
    what: &'static str,
    reason: String,
}

fn encoded(what: &'static str, r: pgwire::error::PgWireResult<()>) -> Result<(), EncodeError> {
    r.map_err(|e| EncodeError {
        what,
        reason: e.to_string(),
    })
}

/// StartupMessage (protocol 3.0) with `params` (user, database, and the session's defaults).
pub fn startup<'a>(
    params: impl IntoIterator<Item = (&'a str, &'a str)>,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    let mut m = Startup::new();
    m.parameters = params
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    encoded("the startup message", m.encode(buf))
}

/// PasswordMessage: a cleartext password or an md5 hash.
pub fn password(password: &str, buf: &mut BytesMut) -> Result<(), EncodeError> {
    encoded(
        "a password message",
        Password::new(password.to_string()).encode(buf),
    )
}

pub fn sasl_initial_response(
    mechanism: &str,
    data: &[u8],
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    let m = SASLInitialResponse::new(mechanism.to_string(), Some(Bytes::copy_from_slice(data)));
    encoded("a SASL initial response", m.encode(buf))
}

pub fn sasl_response(data: &[u8], buf: &mut BytesMut) -> Result<(), EncodeError> {
    encoded(
        "a SASL response",
        SASLResponse::new(Bytes::copy_from_slice(data)).encode(buf),
    )
}

/// Query: one of pgtenant's own statements with the simple protocol.
pub fn query(sql: &str, buf: &mut BytesMut) -> Result<(), EncodeError> {
    encoded("a query", Query::new(sql.to_string()).encode(buf))
}

/// Parse (unnamed) + Bind with text parameters + Execute + Sync of `sql`: one of pgtenant's own
/// statements whose values must travel as parameters, never in its text.
pub fn statement(sql: &str, params: &[&[u8]], buf: &mut BytesMut) -> Result<(), EncodeError> {
    encoded(
        "a statement",
        Parse::new(None, sql.to_string(), Vec::new()).encode(buf),
    )?;
    let values = params
        .iter()
        .map(|p| Some(Bytes::copy_from_slice(p)))
        .collect();
    encoded(
        "a statement's parameters",
        Bind::new(None, None, Vec::new(), values, Vec::new()).encode(buf),
    )?;
    encoded("an execute", Execute::new(None, 0).encode(buf))?;
    encoded("a sync", Sync::new().encode(buf))
}

/// CancelRequest for the server process `pid` with its `secret`.
pub fn cancel_request(pid: u32, secret: u32, buf: &mut BytesMut) -> Result<(), EncodeError> {
    let m = CancelRequest::new(pid as i32, SecretKey::I32(secret as i32));
    encoded("a cancel request", m.encode(buf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::message::frontend;

    /// pgwire's encoding is the one libpq-compatible clients send: checked against
    /// postgres-protocol's (tokio-postgres's) byte for byte.
    #[test]
    fn a_query_is_encoded_as_clients_encode_it() {
        let (mut ours, mut theirs) = (BytesMut::new(), BytesMut::new());
        query("SELECT 1", &mut ours).unwrap();
        frontend::query("SELECT 1", &mut theirs).unwrap();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn a_statement_with_text_parameters_is_encoded_as_clients_encode_it() {
        let (mut ours, mut theirs) = (BytesMut::new(), BytesMut::new());
        statement("SELECT $1, $2", &[b"a", b"bc"], &mut ours).unwrap();
        frontend::parse("", "SELECT $1, $2", [], &mut theirs).unwrap();
        let params: [&[u8]; 2] = [b"a", b"bc"];
        let r = frontend::bind(
            "",
            "",
            [],
            params,
            |p, b| {
                b.extend_from_slice(p);
                Ok(postgres_protocol::IsNull::No)
            },
            [],
            &mut theirs,
        );
        assert!(r.is_ok());
        frontend::execute("", 0, &mut theirs).unwrap();
        frontend::sync(&mut theirs);
        assert_eq!(ours, theirs);
    }

    #[test]
    fn the_login_messages_are_encoded_as_clients_encode_them() {
        let (mut ours, mut theirs) = (BytesMut::new(), BytesMut::new());
        startup([("user", "u"), ("database", "d")], &mut ours).unwrap();
        frontend::startup_message([("database", "d"), ("user", "u")], &mut theirs).unwrap();
        assert_eq!(ours, theirs, "parameters in name order");
        ours.clear();
        theirs.clear();
        password("secret", &mut ours).unwrap();
        frontend::password_message(b"secret", &mut theirs).unwrap();
        assert_eq!(ours, theirs);
        ours.clear();
        theirs.clear();
        sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=x", &mut ours).unwrap();
        frontend::sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=x", &mut theirs).unwrap();
        assert_eq!(ours, theirs);
        ours.clear();
        theirs.clear();
        sasl_response(b"c=biws", &mut ours).unwrap();
        frontend::sasl_response(b"c=biws", &mut theirs).unwrap();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn a_cancel_request_is_encoded_as_clients_encode_it() {
        let (mut ours, mut theirs) = (BytesMut::new(), BytesMut::new());
        cancel_request(7, 0xdead_beef, &mut ours).unwrap();
        frontend::cancel_request(7, 0xdead_beef_u32 as i32, &mut theirs);
        assert_eq!(ours, theirs);
    }
}
