//! Messages pgtenant writes to clients itself, encoded with pgwire's message types.

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
