//! Messages pgtenant writes to clients itself, encoded with pgwire's message types, and the
//! transaction engine's own framing (`put_message` and what is built on it): it writes its
//! answers and statements on every transaction, so into the buffer it already holds, with no
//! owned message in between.

use bytes::{BufMut, Bytes, BytesMut};
use pgwire::messages::response::{ReadyForQuery, TransactionStatus};
use pgwire::messages::startup::{
    Authentication, BackendKeyData, NegotiateProtocolVersion, SecretKey,
};
use pgwire::messages::Message;

// Encoding these owned, well-formed messages cannot fail; pgwire only errors on oversize input.

/// AuthenticationSASL offering `mechanisms`, most preferred first.
pub fn auth_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    let _ = Authentication::SASL(mechanisms.iter().map(|m| m.to_string()).collect()).encode(buf);
}

pub fn auth_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    let _ = Authentication::SASLContinue(Bytes::copy_from_slice(data)).encode(buf);
}

pub fn auth_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    let _ = Authentication::SASLFinal(Bytes::copy_from_slice(data)).encode(buf);
}

pub fn auth_ok(buf: &mut BytesMut) {
    let _ = Authentication::Ok.encode(buf);
}

pub fn backend_key_data(buf: &mut BytesMut, pid: u32, secret: u32) {
    let _ = BackendKeyData::new(pid as i32, SecretKey::I32(secret as i32)).encode(buf);
}

pub fn ready_for_query_idle(buf: &mut BytesMut) {
    let _ = ReadyForQuery::new(TransactionStatus::Idle).encode(buf);
}

/// Tells a client that asked for 3.x (x > 0) or sent `_pq_.` options that we speak 3.0.
pub fn negotiate_protocol_version(buf: &mut BytesMut, unsupported_options: &[String]) {
    let _ = NegotiateProtocolVersion::new(0, unsupported_options.to_vec()).encode(buf);
}

/// The single-byte answer to SSLRequest / GSSENCRequest: not supported on this listener.
pub fn refuse_encryption(buf: &mut BytesMut) {
    buf.put_u8(b'N');
}

/// Appends a message of type `tag` whose body is `parts`, one after another.
pub fn put_message(buf: &mut BytesMut, tag: u8, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum::<usize>() + 4;
    buf.put_u8(tag);
    buf.put_u32(len as u32);
    for p in parts {
        buf.put_slice(p);
    }
}

/// `put_message` into a buffer of its own.
pub fn build_message(tag: u8, parts: &[&[u8]]) -> Bytes {
    let mut b = BytesMut::new();
    put_message(&mut b, tag, parts);
    b.freeze()
}

/// ReadyForQuery with transaction status `status` (`I`, `T` or `E`).
pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
    put_message(buf, b'Z', &[&[status]]);
}

/// Query (to a server): one of pgtenant's statements before a client's transaction.
pub fn put_query(buf: &mut BytesMut, sql: &str) {
    put_message(buf, b'Q', &[sql.as_bytes(), b"\0"]);
}

/// NotificationResponse from server process `pid` on `channel`.
pub fn notification(pid: i32, channel: &str, payload: &str) -> Bytes {
    build_message(
        b'A',
        &[
            &pid.to_be_bytes(),
            channel.as_bytes(),
            b"\0",
            payload.as_bytes(),
            b"\0",
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engines_framing_matches_pgwires() {
        let mut ours = BytesMut::new();
        ready_for_query(&mut ours, b'I');
        let mut theirs = BytesMut::new();
        ready_for_query_idle(&mut theirs);
        assert_eq!(ours, theirs);
    }

    #[test]
    fn a_query_is_framed_as_to_server_encodes_it() {
        let (mut ours, mut theirs) = (BytesMut::new(), BytesMut::new());
        put_query(&mut ours, "SELECT 1");
        crate::protocol::to_server::query("SELECT 1", &mut theirs).unwrap();
        assert_eq!(ours, theirs);
    }
}
