//! The row tier's tenant context, made so a tenant's own SQL cannot forge it.
//!
//! A custom setting (`SET pgtenant.tenant_id = 'b'`) is writable by any SQL a client sends, so
//! RLS policies never read one. Instead each backend connection is *bound* to its tenant once,
//! right after it logs in: pgtenant calls `pgtenant_rls.enter(tenant, expires, proof)` with an
//! HMAC-SHA256 proof over (tenant, backend pid, connection nonce, expiry) under a key only the
//! database owner's schema holds. The SECURITY DEFINER function checks the proof and records
//! the binding in a table only it writes; the policies compare `tenant_id` with the binding of
//! the session's own backend (an initPlan, evaluated once per statement). The binding table has
//! RLS of its own: a session can read only its own row.
//!
//! - The proof travels as a bind parameter, so it never shows in `pg_stat_activity` or in
//!   statement logs of other sessions.
//! - A binding is keyed by backend pid *and* a random per-connection nonce that pgtenant puts in
//!   the startup packet (`pgtenant.binding`): a new backend that inherits a dead one's pid
//!   matches no binding, and `RESET ALL` / `DISCARD ALL` return the nonce to its startup value.
//! - A failed or forged `enter` deletes the binding first: the session then sees no rows
//!   (fail closed), never another tenant's.
//! - Only `sha256` is needed (PostgreSQL ≥ 11): HMAC is computed from the key's inner and outer
//!   pads, stored instead of the key, so no extension is required.

use std::sync::Arc;

use bytes::BytesMut;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Startup parameter carrying the connection's nonce.
pub const BINDING_SETTING: &str = "pgtenant.binding";
/// Schema holding the key, the bindings and the two functions.
pub const SCHEMA: &str = "pgtenant_rls";
/// How long a proof stays valid (seconds); generous for clock skew between proxy and server.
pub const PROOF_LIFETIME: u64 = 300;
/// The statement pgtenant runs to bind a connection. Its command tag says whether the server
/// accepted the proof (`SELECT 1`) or not (`SELECT 0`), so a pipelined binding can be checked
/// without looking at rows.
pub const ENTER_SQL: &str =
    "SELECT 1 WHERE pgtenant_rls.enter($1, $2::bigint, pg_catalog.decode($3, 'hex'))";
/// Command tag of an accepted binding.
pub const BOUND_TAG: &str = "SELECT 1";

/// The RLS condition on a row-tier table: an uncorrelated subquery, so it runs once per
/// statement as an initPlan, and inline (no function call), which measured cheapest. A session
/// with no binding gets an error from `unbound()` (evaluated only then, and at run time: inside
/// the subquery the planner never pre-evaluates it for estimates), not an empty result.
pub const POLICY_CONDITION: &str =
    "tenant_id = (SELECT COALESCE((SELECT b.tenant FROM pgtenant_rls.binding b \
     WHERE b.pid = pg_catalog.pg_backend_pid() \
     AND b.nonce = pg_catalog.current_setting('pgtenant.binding', true)), pgtenant_rls.unbound()))";
/// Default for `tenant_id`, so inserts need not name the tenant.
pub const COLUMN_DEFAULT: &str = "pgtenant_rls.tenant()";

/// The per-database HMAC key. Debug never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct RowKey([u8; 32]);

impl std::fmt::Debug for RowKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RowKey(..)")
    }
}

impl RowKey {
    /// The key of `database`, derived from a 32-byte secret: each database holds a different
    /// key, so the owner of one cannot mint proofs for another.
    pub fn derive(secret: &[u8; 32], database: &str) -> RowKey {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("any key length");
        mac.update(b"pgtenant row context\0");
        mac.update(database.as_bytes());
        RowKey(mac.finalize().into_bytes().into())
    }

    /// The proof that binds backend `pid` (with connection nonce `nonce`) to `tenant` until
    /// `expires` (Unix seconds).
    pub fn proof(&self, tenant: &str, pid: u32, nonce: &str, expires: u64) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("any key length");
        mac.update(message(tenant, pid, nonce, expires).as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// The HMAC inner and outer pads (key XOR 0x36.., key XOR 0x5c..), what the database
    /// stores so plain `sha256` can verify proofs.
    pub fn pads(&self) -> (Vec<u8>, Vec<u8>) {
        let mut inner = vec![0x36u8; 64];
        let mut outer = vec![0x5cu8; 64];
        for (i, b) in self.0.iter().enumerate() {
            inner[i] ^= b;
            outer[i] ^= b;
        }
        (inner, outer)
    }
}

/// What a proof signs. Tenant ids cannot contain '/'.
fn message(tenant: &str, pid: u32, nonce: &str, expires: u64) -> String {
    format!("{tenant}/{pid}/{nonce}/{expires}")
}

/// A fresh connection nonce: 128 random bits, hex.
pub fn new_nonce() -> String {
    let bytes: [u8; 16] = rand::random();
    hex(&bytes)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Unix time a proof minted now expires at.
pub fn expiry() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + PROOF_LIFETIME
}

/// DDL that creates (or brings up to date) the schema, run as the database owner. Idempotent.
/// Tenants' roles get EXECUTE on the two functions, their own binding row, nothing else.
pub fn install_sql() -> String {
    format!(
        "CREATE SCHEMA IF NOT EXISTS {SCHEMA};
         REVOKE ALL ON SCHEMA {SCHEMA} FROM PUBLIC;
         GRANT USAGE ON SCHEMA {SCHEMA} TO PUBLIC;
         CREATE TABLE IF NOT EXISTS {SCHEMA}.secret (
             id int PRIMARY KEY CHECK (id = 1),
             inner_pad bytea NOT NULL,
             outer_pad bytea NOT NULL);
         CREATE UNLOGGED TABLE IF NOT EXISTS {SCHEMA}.binding (
             pid int PRIMARY KEY,
             nonce text NOT NULL,
             tenant text NOT NULL);
         REVOKE ALL ON {SCHEMA}.secret, {SCHEMA}.binding FROM PUBLIC;
         GRANT SELECT ON {SCHEMA}.binding TO PUBLIC;
         ALTER TABLE {SCHEMA}.binding ENABLE ROW LEVEL SECURITY;
         DROP POLICY IF EXISTS own_binding ON {SCHEMA}.binding;
         CREATE POLICY own_binding ON {SCHEMA}.binding FOR SELECT
             USING (pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid());
         CREATE OR REPLACE FUNCTION {SCHEMA}.enter(p_tenant text, p_expires bigint, p_proof bytea)
         RETURNS boolean LANGUAGE plpgsql VOLATILE SECURITY DEFINER
         SET search_path = pg_catalog, pg_temp AS $fn$
         DECLARE
             k record;
             nonce text := current_setting('{BINDING_SETTING}', true);
             mac bytea;
         BEGIN
             DELETE FROM {SCHEMA}.binding WHERE pid = pg_backend_pid();
             IF p_tenant IS NULL OR p_expires IS NULL OR p_proof IS NULL OR nonce IS NULL
                OR nonce = '' OR p_expires < extract(epoch FROM clock_timestamp()) THEN
                 RETURN false;
             END IF;
             SELECT inner_pad, outer_pad INTO k FROM {SCHEMA}.secret WHERE id = 1;
             IF NOT FOUND THEN
                 RETURN false;
             END IF;
             mac := sha256(k.outer_pad || sha256(k.inner_pad || convert_to(
                 p_tenant || '/' || pg_backend_pid() || '/' || nonce || '/' || p_expires, 'UTF8')));
             -- Compared as hashes: the time taken says nothing about the expected MAC.
             IF sha256(mac) <> sha256(p_proof) THEN
                 RETURN false;
             END IF;
             INSERT INTO {SCHEMA}.binding (pid, nonce, tenant)
                 VALUES (pg_backend_pid(), nonce, p_tenant);
             RETURN true;
         END $fn$;
         CREATE OR REPLACE FUNCTION {SCHEMA}.tenant() RETURNS text
         LANGUAGE sql STABLE AS $fn$
             SELECT b.tenant FROM {SCHEMA}.binding b
              WHERE b.pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid()
                AND b.nonce OPERATOR(pg_catalog.=)
                    pg_catalog.current_setting('{BINDING_SETTING}', true)
         $fn$;
         CREATE OR REPLACE FUNCTION {SCHEMA}.unbound() RETURNS text
         LANGUAGE plpgsql VOLATILE AS $fn$
         BEGIN
             RAISE EXCEPTION 'this session is not bound to a tenant'
                 USING ERRCODE = 'insufficient_privilege',
                       DETAIL = 'Its row-tier context is missing or was tampered with, so no tenant rows are visible.',
                       HINT = 'Connect through pgtenant; do not change pgtenant.binding.';
         END $fn$;
         REVOKE ALL ON FUNCTION {SCHEMA}.enter(text, bigint, bytea), {SCHEMA}.tenant(), {SCHEMA}.unbound() FROM PUBLIC;
         GRANT EXECUTE ON FUNCTION {SCHEMA}.enter(text, bigint, bytea), {SCHEMA}.tenant(), {SCHEMA}.unbound() TO PUBLIC;"
    )
}

/// Installs the schema in the database `db` is connected to and stores `key`'s pads there,
/// sent as bind parameters so they appear in no statement text.
pub async fn install(
    db: &impl tokio_postgres::GenericClient,
    key: &RowKey,
) -> Result<(), tokio_postgres::Error> {
    db.batch_execute(&format!(
        "BEGIN;
         SET LOCAL client_min_messages = warning;
         SELECT pg_advisory_xact_lock(hashtext('pgtenant row context'));
         {}
         COMMIT;",
        install_sql()
    ))
    .await?;
    let (inner, outer) = key.pads();
    db.execute(
        &format!(
            "INSERT INTO {SCHEMA}.secret (id, inner_pad, outer_pad) VALUES (1, $1, $2)
             ON CONFLICT (id) DO UPDATE SET inner_pad = EXCLUDED.inner_pad, outer_pad = EXCLUDED.outer_pad"
        ),
        &[&inner, &outer],
    )
    .await?;
    Ok(())
}

/// What a row-tier tenant's connections are bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowBinding {
    pub tenant: Arc<str>,
    /// None when the proxy has no row key (binding then fails with a clear error).
    pub key: Option<RowKey>,
}

/// Appends the messages that bind backend `pid` (with connection nonce `nonce`) to `row`'s
/// tenant: Parse (unnamed) + Bind with the proof as a text parameter + Execute + Sync, encoded
/// by postgres-protocol like the proxy's other own statements.
pub fn put_enter(
    buf: &mut BytesMut,
    row: &RowBinding,
    pid: u32,
    nonce: &str,
) -> Result<(), &'static str> {
    use postgres_protocol::message::frontend;
    use postgres_protocol::IsNull;
    let key = row
        .key
        .as_ref()
        .ok_or("this proxy has no row key (set row_key, or use a registry)")?;
    if nonce.is_empty() {
        return Err("the connection has no binding nonce");
    }
    let expires = expiry();
    let proof = hex(&key.proof(&row.tenant, pid, nonce, expires));
    let expires = expires.to_string();
    let params: [&[u8]; 3] = [row.tenant.as_bytes(), expires.as_bytes(), proof.as_bytes()];
    const ENCODE: &str = "cannot encode the binding statement";
    frontend::parse("", ENTER_SQL, [], buf).map_err(|_| ENCODE)?;
    frontend::bind(
        "",
        "",
        [],
        params,
        |p, b| {
            b.extend_from_slice(p);
            Ok(IsNull::No)
        },
        [],
        buf,
    )
    .map_err(|_| ENCODE)?;
    frontend::execute("", 0, buf).map_err(|_| ENCODE)?;
    frontend::sync(buf);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    #[test]
    fn proof_is_hmac_sha256_computable_from_the_stored_pads() {
        let key = RowKey::derive(&[7; 32], "row_tenants");
        let (inner, outer) = key.pads();
        let msg = message("acme", 42, "n0nce", 1_700_000_000);
        let inner_hash = Sha256::new()
            .chain_update(&inner)
            .chain_update(msg.as_bytes())
            .finalize();
        let via_pads: [u8; 32] = Sha256::new()
            .chain_update(&outer)
            .chain_update(inner_hash)
            .finalize()
            .into();
        assert_eq!(key.proof("acme", 42, "n0nce", 1_700_000_000), via_pads);
    }

    #[test]
    fn each_database_gets_its_own_key() {
        assert_ne!(RowKey::derive(&[7; 32], "a"), RowKey::derive(&[7; 32], "b"));
    }

    #[test]
    fn a_proof_is_bound_to_tenant_pid_and_nonce() {
        let key = RowKey::derive(&[7; 32], "d");
        let p = key.proof("acme", 1, "n", 9);
        assert_ne!(p, key.proof("globex", 1, "n", 9));
        assert_ne!(p, key.proof("acme", 2, "n", 9));
        assert_ne!(p, key.proof("acme", 1, "m", 9));
    }

    #[test]
    fn debug_hides_the_key() {
        assert_eq!(format!("{:?}", RowKey::derive(&[7; 32], "d")), "RowKey(..)");
    }
}
