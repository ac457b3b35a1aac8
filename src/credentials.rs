//! SCRAM-SHA-256 credentials: the verifiers PostgreSQL stores (`pg_authid.rolpassword`), parsed,
//! made from a password, and mocked for unknown users. The registry, the config, the pools and
//! the front end all use them; the exchange over a client's socket is `frontend::scram`.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// A `SCRAM-SHA-256$iter:salt$StoredKey:ServerKey` verifier, as in pg_authid.rolpassword.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    pub(crate) iterations: u32,
    pub(crate) salt: Vec<u8>,
    pub(crate) stored_key: [u8; 32],
    pub(crate) server_key: [u8; 32],
}

impl std::fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ScramVerifier(iterations={}, ***)", self.iterations)
    }
}

impl ScramVerifier {
    pub fn parse(s: &str) -> Option<ScramVerifier> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iter, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        let iterations: u32 = iter.parse().ok().filter(|&i| i > 0)?;
        let salt = B64.decode(salt).ok()?;
        let stored_key = B64.decode(stored).ok()?.try_into().ok()?;
        let server_key = B64.decode(server).ok()?.try_into().ok()?;
        Some(ScramVerifier {
            iterations,
            salt,
            stored_key,
            server_key,
        })
    }

    /// A verifier that no password matches, derived from the user name so that repeated attempts
    /// for an unknown user look exactly like those for a real one (same salt, same iterations).
    pub fn mock(user: &str, mock_key: &[u8; 32]) -> ScramVerifier {
        let salt = hmac(mock_key, &[b"salt:", user.as_bytes()].concat());
        let mut stored_key = [0u8; 32];
        let mut server_key = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut stored_key);
        rand::thread_rng().fill_bytes(&mut server_key);
        ScramVerifier {
            iterations: 4096,
            salt: salt[..16].to_vec(),
            stored_key,
            server_key,
        }
    }
}

pub(crate) fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so new_from_slice cannot fail.
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// Makes a verifier for `password`, in the format PostgreSQL stores.
pub fn hash_password(password: &str) -> String {
    postgres_protocol::password::scram_sha_256(password.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_stored_verifier_format() {
        // Shape of pg_authid.rolpassword; the integration tests also use verifiers read from it.
        let v = "SCRAM-SHA-256$4096:hpFyHTUsSWcR7O9P$LgAKJiG9dcS8+cgPsZ2pETPJkVyKS0I6fA/08Zjqkgo=:fEzPKKnmkgw7S4ZTQDJQQwXBkWtwX/HsCXM1MWQ6Fhg=";
        assert!(ScramVerifier::parse(v).is_some());
    }

    #[test]
    fn clear_text_is_not_a_verifier() {
        assert!(ScramVerifier::parse("hunter2").is_none());
        assert!(ScramVerifier::parse("md5abcdef").is_none());
    }
}
