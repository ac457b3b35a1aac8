//! What provisioning calls a tenant's objects in PostgreSQL: names that say nothing about who
//! the tenant is. Catalogs such as `pg_database`, `pg_namespace` and `pg_roles` are readable by
//! every login, so a name made of the tenant id would hand each tenant the list of the
//! platform's other customers. The registry maps ids to these names.
//!
//! A name is a keyed hash of the tenant id under a secret of the deployment (sealed in the
//! registry): the same id always gives the same name, so a create interrupted and run again
//! finds what it made; without the secret nobody can test a guessed id against the catalog.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::tier::Tier;

/// Characters of the hash in a name: 20 base32 characters, 100 bits, so two tenants of one
/// server never meet by chance.
const HASH_CHARS: usize = 20;

/// The deployment's secret that names derive from.
#[derive(Clone, PartialEq, Eq)]
pub struct NamingKey([u8; 32]);

impl std::fmt::Debug for NamingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NamingKey(***)")
    }
}

impl NamingKey {
    pub fn new(bytes: [u8; 32]) -> NamingKey {
        NamingKey(bytes)
    }

    /// The stem of every object of tenant `id`: `t` and 20 characters of `a-z2-7`, a valid
    /// unquoted identifier.
    pub fn stem(&self, id: &str) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("any key length");
        mac.update(b"pgtenant object name\0");
        mac.update(id.as_bytes());
        let digest = mac.finalize().into_bytes();
        let mut out = String::with_capacity(1 + HASH_CHARS);
        out.push('t');
        out.push_str(&base32_lower(&digest, HASH_CHARS));
        out
    }
}

/// `chars` characters of RFC 4648 base32 (lower case) of `bytes`.
fn base32_lower(bytes: &[u8], chars: usize) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut out = String::with_capacity(chars);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            if out.len() == chars {
                return out;
            }
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
        }
        acc &= (1 << bits) - 1;
    }
    out
}

/// What a tenant's objects are called on its server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectNames {
    pub database: String,
    pub schema: Option<String>,
    /// The login role its client users map to.
    pub role: String,
}

impl ObjectNames {
    /// The names `tenant create` gives a tenant whose stem is `stem`. The schema tier lives in
    /// `schema_database`, the row tier in `row_database` under the role all its tenants there
    /// share.
    pub fn for_tier(
        tier: Tier,
        stem: &str,
        schema_database: &str,
        row_database: &str,
    ) -> ObjectNames {
        match tier {
            Tier::Database => ObjectNames {
                database: stem.to_string(),
                schema: None,
                role: app_role(stem),
            },
            Tier::Schema => ObjectNames {
                database: schema_database.to_string(),
                schema: Some(stem.to_string()),
                role: app_role(stem),
            },
            Tier::Row => ObjectNames {
                database: row_database.to_string(),
                schema: None,
                role: shared_row_role(row_database),
            },
        }
    }
}

/// A tenant's own login role.
pub fn app_role(stem: &str) -> String {
    format!("{stem}_app")
}

/// The login role row tenants of `database` share: they share server connections, and their
/// separation is the row context, not the role. Its name has a '.', which no stem has.
pub fn shared_row_role(database: &str) -> String {
    format!("{database}.app")
}

/// The login role of a tenant's users with DDL rights, beside its own login role `app`
/// (`<stem>_app` → `<stem>_ddl`; tenants made before opaque names have `<id>_app`).
pub fn ddl_role_for(app: &str) -> String {
    format!("{}_ddl", app.strip_suffix("_app").unwrap_or(app))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> NamingKey {
        NamingKey::new([b; 32])
    }

    #[test]
    fn a_stem_is_the_same_for_the_same_key_and_id() {
        assert_eq!(key(1).stem("acme"), key(1).stem("acme"));
    }

    #[test]
    fn a_stem_differs_between_tenants() {
        assert_ne!(key(1).stem("acme"), key(1).stem("acme2"));
    }

    #[test]
    fn a_stem_differs_between_deployments() {
        assert_ne!(key(1).stem("acme"), key(2).stem("acme"));
    }

    #[test]
    fn a_stem_is_an_unquoted_identifier_that_says_nothing_of_the_id() {
        let s = key(7).stem("acme-bank");
        assert_eq!(s.len(), 21);
        assert!(s.starts_with('t'));
        assert!(s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b)));
        assert!(!s.contains("acme"));
    }

    #[test]
    fn base32_matches_rfc_4648() {
        // RFC 4648 section 10: BASE32("foobar") = "MZXW6YTBOI======"; the whole characters.
        assert_eq!(base32_lower(b"foobar", 20), "mzxw6ytbo");
        assert_eq!(base32_lower(b"foobar", 4), "mzxw");
    }

    #[test]
    fn every_tier_gets_names_that_fit_postgresql_identifiers() {
        let stem = key(3).stem("x");
        for tier in [Tier::Database, Tier::Schema, Tier::Row] {
            let n = ObjectNames::for_tier(tier, &stem, "schema_tenants", "row_tenants");
            assert!(n.database.len() <= 63 && n.role.len() <= 63, "{n:?}");
            assert!(ddl_role_for(&n.role).len() <= 63);
        }
    }

    #[test]
    fn the_database_tier_names_its_database_and_role_after_the_stem() {
        let n = ObjectNames::for_tier(Tier::Database, "tabc", "s", "r");
        assert_eq!(
            n,
            ObjectNames {
                database: "tabc".into(),
                schema: None,
                role: "tabc_app".into()
            }
        );
    }

    #[test]
    fn the_schema_tier_names_its_schema_and_role_after_the_stem() {
        let n = ObjectNames::for_tier(Tier::Schema, "tabc", "shared", "r");
        assert_eq!(n.database, "shared");
        assert_eq!(n.schema.as_deref(), Some("tabc"));
        assert_eq!(n.role, "tabc_app");
    }

    #[test]
    fn row_tenants_of_a_database_share_its_role() {
        let a = ObjectNames::for_tier(Tier::Row, "ta", "s", "rows");
        let b = ObjectNames::for_tier(Tier::Row, "tb", "s", "rows");
        assert_eq!(a, b);
        assert_eq!(a.role, "rows.app");
    }

    #[test]
    fn the_ddl_role_sits_beside_the_login_role_old_and_new() {
        assert_eq!(ddl_role_for("tabc_app"), "tabc_ddl");
        assert_eq!(ddl_role_for("acme_app"), "acme_ddl");
    }
}
