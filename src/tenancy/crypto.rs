//! Encryption of the passwords the registry stores: AES-256-GCM, a fresh random nonce per value,
//! the owner (tenant and role, or server) bound as associated data, and the key's id stored with
//! the ciphertext so a keyring of old and new keys can read both during a rotation.
//!
//! A sealed value is text: `pgt1$<key id>$<base64(nonce ‖ ciphertext ‖ tag)>`.

use std::collections::HashMap;
use std::path::PathBuf;

use aes_gcm::aead::{Aead, KeyInit, OsRng, Payload};
use aes_gcm::{AeadCore, Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use sha2::{Digest, Sha256};

use crate::secret::Secret;

use super::row_context::RowKey;

const PREFIX: &str = "pgt1";
const NONCE_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("cannot read master key {source_name}: {reason}")]
    KeySource { source_name: String, reason: String },
    #[error("master key {source_name} is not 32 bytes in base64 or hex (generate one with `pgtenant registry gen-key`)")]
    KeyFormat { source_name: String },
    #[error("key source \"{0}\" must be file:PATH or env:VARIABLE")]
    SourceSyntax(String),
    #[error("stored value for {owner} is not a pgtenant-encrypted value")]
    Malformed { owner: String },
    #[error("stored value for {owner} is encrypted under key {key_id}, which is not configured here (configured: {known}); during a rotation list the old key in registry.old_keys")]
    UnknownKey {
        owner: String,
        key_id: String,
        known: String,
    },
    #[error("stored value for {owner} fails authentication: it was tampered with or copied from another tenant's row")]
    Forged { owner: String },
}

/// Where a master key comes from: `file:PATH` or `env:VARIABLE`. Never the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    File(PathBuf),
    Env(String),
}

impl KeySource {
    pub fn parse(s: &str) -> Result<KeySource, CryptoError> {
        if let Some(p) = s.strip_prefix("file:") {
            Ok(KeySource::File(PathBuf::from(p)))
        } else if let Some(v) = s.strip_prefix("env:") {
            Ok(KeySource::Env(v.to_string()))
        } else {
            Err(CryptoError::SourceSyntax(s.to_string()))
        }
    }

    fn name(&self) -> String {
        match self {
            KeySource::File(p) => format!("file {}", p.display()),
            KeySource::Env(v) => format!("environment variable {v}"),
        }
    }

    pub fn load(&self) -> Result<MasterKey, CryptoError> {
        let text = match self {
            KeySource::File(p) => {
                std::fs::read_to_string(p).map_err(|e| CryptoError::KeySource {
                    source_name: self.name(),
                    reason: e.to_string(),
                })?
            }
            KeySource::Env(v) => std::env::var(v).map_err(|_| CryptoError::KeySource {
                source_name: self.name(),
                reason: "not set".into(),
            })?,
        };
        MasterKey::from_text(text.trim()).ok_or_else(|| CryptoError::KeyFormat {
            source_name: self.name(),
        })
    }
}

/// A 256-bit key and its public id.
#[derive(Clone)]
pub struct MasterKey {
    id: String,
    cipher: Aes256Gcm,
    /// A subkey for the row tier's context proofs (never the key itself).
    row_secret: [u8; 32],
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKey({})", self.id)
    }
}

impl MasterKey {
    pub fn from_bytes(bytes: &[u8; 32]) -> MasterKey {
        // The id names the key without revealing it: a hash of the key under a fixed label.
        let digest = Sha256::new()
            .chain_update(b"pgtenant key id\0")
            .chain_update(bytes)
            .finalize();
        let id = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        let row_secret = Sha256::new()
            .chain_update(b"pgtenant row secret\0")
            .chain_update(bytes)
            .finalize()
            .into();
        MasterKey {
            id,
            cipher: Aes256Gcm::new(bytes.into()),
            row_secret,
        }
    }

    /// Base64 (44 characters) or hex (64).
    pub fn from_text(text: &str) -> Option<MasterKey> {
        let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            (0..32)
                .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok())
                .collect::<Option<Vec<u8>>>()?
        } else {
            B64.decode(text).ok()?
        };
        let arr: [u8; 32] = bytes.try_into().ok()?;
        Some(MasterKey::from_bytes(&arr))
    }

    /// A new random key, base64-encoded, for a key file.
    pub fn generate_text() -> String {
        B64.encode(Aes256Gcm::generate_key(OsRng))
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The row-tier secret this key stands for when no other is stored: with `row_key` in the
    /// config, and as the first value a registry seals (what row databases installed before
    /// the secret was stored on its own hold).
    pub fn row_secret(&self) -> RowSecret {
        RowSecret(self.row_secret)
    }
}

/// The secret every row database's context key derives from. In a registry it is stored
/// sealed under the master key, so rotating the master key re-seals it and never changes it.
#[derive(Clone, PartialEq, Eq)]
pub struct RowSecret([u8; 32]);

impl std::fmt::Debug for RowSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RowSecret(***)")
    }
}

impl RowSecret {
    /// The row-tier context key of `database`.
    pub fn row_key(&self, database: &str) -> RowKey {
        RowKey::derive(&self.0, database)
    }

    /// Base64, for sealing.
    pub fn to_text(&self) -> String {
        B64.encode(self.0)
    }

    pub fn from_text(text: &str) -> Option<RowSecret> {
        Some(RowSecret(B64.decode(text).ok()?.try_into().ok()?))
    }
}

/// The key new values are sealed with, plus older keys still accepted for reading.
#[derive(Debug, Clone)]
pub struct Keyring {
    current: MasterKey,
    by_id: HashMap<String, MasterKey>,
}

impl Keyring {
    pub fn new(current: MasterKey, old: Vec<MasterKey>) -> Keyring {
        let mut by_id: HashMap<String, MasterKey> =
            old.into_iter().map(|k| (k.id.clone(), k)).collect();
        by_id.insert(current.id.clone(), current.clone());
        Keyring { current, by_id }
    }

    /// The current key must load. An old key that does not (yet) is skipped with a warning,
    /// so a proxy can name the next key's file before it exists and pick it up at a rotation.
    pub fn load(current: &KeySource, old: &[KeySource]) -> Result<Keyring, CryptoError> {
        let cur = current.load()?;
        let old = old
            .iter()
            .filter_map(|s| match s.load() {
                Ok(k) => Some(k),
                Err(e) => {
                    tracing::warn!(error = %e, "old key skipped");
                    None
                }
            })
            .collect();
        Ok(Keyring::new(cur, old))
    }

    /// The row secret the current key stands for (see `MasterKey::row_secret`).
    pub fn current_row_secret(&self) -> RowSecret {
        self.current.row_secret()
    }

    pub fn current_id(&self) -> &str {
        &self.current.id
    }

    /// Encrypts `plain` for `owner` (e.g. `tenant acme role acme_app`) under the current key.
    pub fn seal(&self, owner: &str, plain: &str) -> String {
        let nonce = Aes256Gcm::generate_nonce(OsRng);
        // Encryption with a valid key and nonce cannot fail for inputs this small.
        let ct = self
            .current
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plain.as_bytes(),
                    aad: owner.as_bytes(),
                },
            )
            .unwrap_or_default();
        let mut blob = Vec::with_capacity(NONCE_LEN + ct.len());
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&ct);
        format!("{PREFIX}${}${}", self.current.id, B64.encode(blob))
    }

    /// The key id a sealed value names, if it is one.
    pub fn key_id_of(sealed: &str) -> Option<&str> {
        let mut parts = sealed.splitn(3, '$');
        (parts.next()? == PREFIX).then_some(())?;
        parts.next()
    }

    pub fn open(&self, owner: &str, sealed: &str) -> Result<Secret, CryptoError> {
        let malformed = || CryptoError::Malformed {
            owner: owner.to_string(),
        };
        let mut parts = sealed.splitn(3, '$');
        if parts.next() != Some(PREFIX) {
            return Err(malformed());
        }
        let key_id = parts.next().ok_or_else(malformed)?;
        let blob = B64
            .decode(parts.next().ok_or_else(malformed)?)
            .map_err(|_| malformed())?;
        if blob.len() < NONCE_LEN + 16 {
            return Err(malformed());
        }
        let key = self.by_id.get(key_id).ok_or_else(|| {
            let mut known: Vec<&str> = self.by_id.keys().map(String::as_str).collect();
            known.sort();
            CryptoError::UnknownKey {
                owner: owner.to_string(),
                key_id: key_id.to_string(),
                known: known.join(", "),
            }
        })?;
        let (nonce, ct) = blob.split_at(NONCE_LEN);
        let plain = key
            .cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: owner.as_bytes(),
                },
            )
            .map_err(|_| CryptoError::Forged {
                owner: owner.to_string(),
            })?;
        String::from_utf8(plain)
            .map(Secret::new)
            .map_err(|_| CryptoError::Forged {
                owner: owner.to_string(),
            })
    }
}

/// Associated data for a tenant's backend role password.
pub fn role_owner(tenant: &str, role: &str) -> String {
    format!("tenant {tenant} role {role}")
}

/// Associated data for a server's admin password.
pub fn server_owner(server: &str) -> String {
    format!("server {server}")
}

/// Associated data for a secret of the deployment (`pgtenant.secrets`).
pub fn secret_owner(name: &str) -> String {
    format!("secret {name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> Keyring {
        Keyring::new(MasterKey::from_bytes(&[7; 32]), vec![])
    }

    #[test]
    fn sealed_value_opens_for_its_owner() {
        let r = ring();
        let s = r.seal("tenant a role x", "hunter2");
        assert!(!s.contains("hunter2"));
        assert_eq!(r.open("tenant a role x", &s).unwrap().expose(), "hunter2");
    }

    #[test]
    fn same_password_seals_differently_each_time() {
        let r = ring();
        assert_ne!(r.seal("o", "p"), r.seal("o", "p"));
    }

    #[test]
    fn value_copied_to_another_owner_is_refused() {
        let r = ring();
        let s = r.seal("tenant a role x", "hunter2");
        let e = r.open("tenant b role x", &s).unwrap_err();
        assert!(matches!(e, CryptoError::Forged { .. }), "{e}");
        assert!(e.to_string().contains("tenant b"));
    }

    #[test]
    fn tampered_value_is_refused() {
        let r = ring();
        let s = r.seal("o", "hunter2");
        let (head, body) = s.rsplit_once('$').unwrap();
        let mut blob = B64.decode(body).unwrap();
        blob[NONCE_LEN] ^= 1;
        let forged = format!("{head}${}", B64.encode(blob));
        assert!(matches!(
            r.open("o", &forged),
            Err(CryptoError::Forged { .. })
        ));
    }

    #[test]
    fn value_under_an_unknown_key_names_the_key() {
        let other = Keyring::new(MasterKey::from_bytes(&[9; 32]), vec![]);
        let s = other.seal("o", "p");
        let e = ring().open("o", &s).unwrap_err();
        assert!(e.to_string().contains(other.current_id()), "{e}");
    }

    #[test]
    fn keyring_with_the_old_key_reads_values_of_both() {
        let old = MasterKey::from_bytes(&[1; 32]);
        let new = MasterKey::from_bytes(&[2; 32]);
        let before = Keyring::new(old.clone(), vec![]).seal("o", "p1");
        let both = Keyring::new(new, vec![old]);
        let after = both.seal("o", "p2");
        assert_eq!(both.open("o", &before).unwrap().expose(), "p1");
        assert_eq!(both.open("o", &after).unwrap().expose(), "p2");
        assert_eq!(Keyring::key_id_of(&after), Some(both.current_id()));
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        for bad in ["", "pgt1", "pgt1$x", "pgt1$x$!!", "pgt1$x$AAAA", "plain"] {
            assert!(matches!(
                ring().open("o", bad),
                Err(CryptoError::Malformed { .. })
            ));
        }
    }

    #[test]
    fn generated_key_text_loads() {
        let t = MasterKey::generate_text();
        assert!(MasterKey::from_text(&t).is_some());
        assert!(MasterKey::from_text("short").is_none());
    }
}
