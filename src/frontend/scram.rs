//! SCRAM-SHA-256 (RFC 5802/7677), server side: the exchange with a client over its socket,
//! against a stored verifier (`crate::credentials`).
//!
//! pgwire 0.42 has a SCRAM server, but it is driven by its own Framed codec and handler traits;
//! pgtenant owns the raw socket from the first byte so it can hand it to the relay. The exchange
//! is small, so it is written here on RustCrypto's hmac/sha2 and checked against verifiers made by
//! postgres-protocol (the code tokio-postgres uses) and by PostgreSQL itself in the tests.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::credentials::{hmac, ScramVerifier};

pub const MECHANISM: &str = "SCRAM-SHA-256";
/// SCRAM bound to the TLS channel (`tls-server-end-point`), offered only over TLS.
pub const MECHANISM_PLUS: &str = "SCRAM-SHA-256-PLUS";
const CHANNEL_BINDING_TYPE: &str = "tls-server-end-point";
const NONCE_BYTES: usize = 18;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("channel binding is not supported on this connection")]
    ChannelBinding,
    #[error("SCRAM channel binding negotiation error: the client supports channel binding but thinks the server does not, and this server does")]
    Downgrade,
    #[error("password authentication failed")]
    BadProof,
}

/// Server state between the server-first and client-final messages.
pub struct ScramExchange {
    verifier: ScramVerifier,
    client_first_bare: String,
    server_first: String,
    nonce: String,
    /// What the client-final `c=` attribute must decode to.
    expected_binding: Vec<u8>,
    /// Whether the exchange is bound to the TLS channel.
    bound: bool,
}

impl ScramExchange {
    /// Handles client-first-message; returns the exchange and the server-first-message.
    /// `channel`: the connection's `tls-server-end-point` data when it is TLS (PLUS was
    /// offered); `plus`: the client chose SCRAM-SHA-256-PLUS.
    pub fn start(
        verifier: ScramVerifier,
        client_first: &[u8],
        channel: Option<&[u8]>,
        plus: bool,
    ) -> Result<ScramExchange, ScramError> {
        let msg =
            std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (gs2_header, bare) = split_gs2(msg)?;
        let mut expected_binding = gs2_header.as_bytes().to_vec();
        let bound = match (gs2_header.as_bytes()[0], channel, plus) {
            (b'p', Some(data), true) => {
                let name = gs2_header[2..].split(',').next().unwrap_or_default();
                if name != CHANNEL_BINDING_TYPE {
                    return Err(ScramError::Malformed("unsupported channel binding type"));
                }
                expected_binding.extend_from_slice(data);
                true
            }
            (b'p', _, _) => return Err(ScramError::ChannelBinding),
            (_, _, true) => {
                return Err(ScramError::Malformed(
                    "SCRAM-SHA-256-PLUS was selected without channel binding",
                ))
            }
            (b'y', Some(_), false) => return Err(ScramError::Downgrade),
            _ => false,
        };
        let client_nonce = bare
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .filter(|n| !n.is_empty() && n.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b','))
            .ok_or(ScramError::Malformed("missing client nonce"))?;
        let mut raw = [0u8; NONCE_BYTES];
        rand::thread_rng().fill_bytes(&mut raw);
        let nonce = format!("{client_nonce}{}", B64.encode(raw));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        Ok(ScramExchange {
            verifier,
            client_first_bare: bare.to_string(),
            server_first,
            nonce,
            expected_binding,
            bound,
        })
    }

    /// Whether the client bound the exchange to the TLS channel.
    pub fn is_bound(&self) -> bool {
        self.bound
    }

    pub fn server_first(&self) -> &[u8] {
        self.server_first.as_bytes()
    }

    /// Checks client-final-message; on success returns the server-final-message.
    pub fn finish(self, client_final: &[u8]) -> Result<String, ScramError> {
        let msg =
            std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("missing proof"))?;
        let mut attrs = without_proof.split(',');
        let binding = attrs
            .next()
            .and_then(|a| a.strip_prefix("c="))
            .ok_or(ScramError::Malformed("missing channel binding"))?;
        let nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or(ScramError::Malformed("missing nonce"))?;
        let binding_matches = B64
            .decode(binding)
            .is_ok_and(|b| bool::from(b.as_slice().ct_eq(&self.expected_binding)));
        if !binding_matches {
            return Err(ScramError::Malformed("channel binding does not match"));
        }
        if nonce != self.nonce {
            return Err(ScramError::Malformed("nonce does not match"));
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| ScramError::Malformed("proof is not base64"))?;
        if proof.len() != 32 {
            return Err(ScramError::Malformed("proof has the wrong length"));
        }
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let client_signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for i in 0..32 {
            client_key[i] = proof[i] ^ client_signature[i];
        }
        let computed: [u8; 32] = Sha256::digest(client_key).into();
        if !bool::from(computed.ct_eq(&self.verifier.stored_key)) {
            return Err(ScramError::BadProof);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

/// Splits `gs2-header` ("n,," or "y,,"; optionally with "a=authzid") from client-first-message-bare.
fn split_gs2(msg: &str) -> Result<(&str, &str), ScramError> {
    let flag = msg.as_bytes().first().copied();
    match flag {
        Some(b'n') | Some(b'y') => {}
        Some(b'p') if msg.as_bytes().get(1) == Some(&b'=') => {}
        _ => return Err(ScramError::Malformed("bad gs2 header")),
    }
    let first = msg
        .find(',')
        .ok_or(ScramError::Malformed("bad gs2 header"))?;
    let second = msg[first + 1..]
        .find(',')
        .map(|i| first + 1 + i)
        .ok_or(ScramError::Malformed("bad gs2 header"))?;
    Ok((&msg[..=second], &msg[second + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::hash_password;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    fn run(verifier: &str, password: &str) -> Result<(), ScramError> {
        let v = ScramVerifier::parse(verifier).unwrap();
        let mut client = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        let ex = ScramExchange::start(v, client.message(), None, false)?;
        client.update(ex.server_first()).unwrap();
        let server_final = ex.finish(client.message())?;
        client
            .finish(server_final.as_bytes())
            .expect("client accepts the server signature");
        Ok(())
    }

    #[test]
    fn the_right_password_authenticates() {
        let v = hash_password("s3cret");
        assert_eq!(run(&v, "s3cret"), Ok(()));
    }

    #[test]
    fn a_wrong_password_is_refused() {
        let v = hash_password("s3cret");
        assert_eq!(run(&v, "guess"), Err(ScramError::BadProof));
    }

    #[test]
    fn a_mock_verifier_refuses_every_password_with_a_stable_salt() {
        let key = [9u8; 32];
        let a = ScramVerifier::mock("nobody", &key);
        let b = ScramVerifier::mock("nobody", &key);
        assert_eq!(a.salt, b.salt);
        let mut client = ScramSha256::new(b"anything", ChannelBinding::unsupported());
        let ex = ScramExchange::start(a, client.message(), None, false).unwrap();
        client.update(ex.server_first()).unwrap();
        assert_eq!(ex.finish(client.message()), Err(ScramError::BadProof));
    }

    #[test]
    fn channel_binding_requests_without_tls_are_refused() {
        let v = ScramVerifier::parse(&hash_password("x")).unwrap();
        assert_eq!(
            ScramExchange::start(v, b"p=tls-server-end-point,,n=,r=abc", None, true).err(),
            Some(ScramError::ChannelBinding)
        );
    }

    fn run_bound(client_sees: &[u8], server_has: &[u8]) -> Result<(), ScramError> {
        let v = ScramVerifier::parse(&hash_password("pw")).unwrap();
        let mut client = ScramSha256::new(
            b"pw",
            ChannelBinding::tls_server_end_point(client_sees.to_vec()),
        );
        let ex = ScramExchange::start(v, client.message(), Some(server_has), true)?;
        assert!(ex.is_bound());
        client.update(ex.server_first()).unwrap();
        let server_final = ex.finish(client.message())?;
        client.finish(server_final.as_bytes()).unwrap();
        Ok(())
    }

    #[test]
    fn a_client_bound_to_the_same_certificate_authenticates() {
        assert_eq!(run_bound(&[7; 32], &[7; 32]), Ok(()));
    }

    #[test]
    fn a_client_that_saw_another_certificate_is_refused() {
        // What a TLS-terminating man in the middle shows the client.
        assert_eq!(
            run_bound(&[6; 32], &[7; 32]),
            Err(ScramError::Malformed("channel binding does not match"))
        );
    }

    #[test]
    fn a_client_that_thinks_the_server_cannot_bind_is_refused_when_it_can() {
        let v = ScramVerifier::parse(&hash_password("x")).unwrap();
        assert_eq!(
            ScramExchange::start(v, b"y,,n=,r=abc", Some(&[1; 32]), false).err(),
            Some(ScramError::Downgrade)
        );
    }

    #[test]
    fn plain_scram_over_tls_is_still_served() {
        let v = ScramVerifier::parse(&hash_password("pw")).unwrap();
        let mut client = ScramSha256::new(b"pw", ChannelBinding::unsupported());
        let ex = ScramExchange::start(v, client.message(), Some(&[1; 32]), false).unwrap();
        assert!(!ex.is_bound());
        client.update(ex.server_first()).unwrap();
        assert!(ex.finish(client.message()).is_ok());
    }
}
