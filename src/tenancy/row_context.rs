//! The row tier's tenant context, made so a tenant's own SQL cannot forge it, and made of
//! nothing but session settings, so it works on a hot standby too.
//!
//! RLS policies compare `tenant_id` with a custom setting, `pgtenant.tenant_id`, which keeps
//! the planner's index choices cheap, *and* check once per statement (an InitPlan) that a
//! second setting, `pgtenant.proof`, holds `HMAC-SHA256(k, "ctx/" pid "/" tenant)` for the
//! backend's own pid. Only pgtenant and the database's `SECURITY DEFINER` functions know `k`
//! (tenants cannot read the table holding it), so a client that sets either setting itself
//! sees no rows at all (fail closed).
//!
//! - **Switching** is one statement, `bind(tenant, proof)`, which checks the proof before it
//!   sets anything: a forged call changes nothing. pgtenant switches right after the reset that
//!   clears the previous tenant's settings, so if `bind` fails the session is bound to no one.
//! - **No writes.** The previous design kept the context in a sequence (`setval`) and opened
//!   each connection with a challenge written to a table; a hot standby refuses both. A proof
//!   is bound to one backend pid, so one a tenant reads in its own session is worth nothing on
//!   another connection, and it names only that tenant.
//! - **Proofs travel as bind parameters**, never in statement text that `pg_stat_activity`
//!   would show other sessions of the same (shared) role.
//! - `DISCARD ALL` and `RESET ALL` clear the context (no rows), never leave another tenant's;
//!   pgtenant binds again after a client runs them.

use std::sync::Arc;

use bytes::BytesMut;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The setting RLS policies compare `tenant_id` with (checked against the session's context).
pub const TENANT_SETTING: &str = "pgtenant.tenant_id";
/// Schema holding the key, the connection tokens and the functions.
pub const SCHEMA: &str = "pgtenant_rls";
/// Whether the session's login role has defaults of its own in this database
/// (`ALTER ROLE ... SET`), which a tenant sharing the role could have set for all the others.
/// Immune to the defaults it looks for (a 1 ms statement_timeout, read-only transactions).
pub const ROLE_DEFAULTS_SQL: &str = "BEGIN; SET LOCAL statement_timeout = 0; \
     SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_db_role_setting s \
     JOIN pg_catalog.pg_roles r ON r.oid = s.setrole \
     WHERE r.rolname = session_user AND s.setdatabase IN (0, \
     (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database()))); \
     COMMIT";
/// Startup parameters (which win over role defaults) for a login that must get its checks
/// through whatever defaults a tenant set on the shared role.
pub const SHIELD_PARAMS: &[(&str, &str)] = &[
    ("statement_timeout", "0"),
    ("lock_timeout", "0"),
    ("idle_in_transaction_session_timeout", "0"),
    ("idle_session_timeout", "0"),
    ("default_transaction_read_only", "off"),
];
/// Clears them (a role may always reset its own defaults).
pub const CLEAR_ROLE_DEFAULTS_SQL: &str = "BEGIN READ WRITE; SET LOCAL statement_timeout = 0; \
     ALTER ROLE CURRENT_USER RESET ALL; \
     DO $pgtenant$ BEGIN EXECUTE pg_catalog.format('ALTER ROLE CURRENT_USER IN DATABASE %I RESET ALL', \
     pg_catalog.current_database()); END $pgtenant$; COMMIT";
/// Binds a connection to a tenant. Its command tag says whether the server accepted the proof
/// (`SELECT 1`) or not (`SELECT 0`), so it can be checked without looking at rows.
pub const BIND_SQL: &str = "SELECT 1 WHERE pgtenant_rls.bind($1, $2)";
/// The setting holding the tenant's proof for this backend.
pub const PROOF_SETTING: &str = "pgtenant.proof";
/// Clears a session before it is switched to another tenant: DISCARD ALL without DISCARD
/// PLANS, whose invalidation of every cached plan (`enter`'s own among them) made switching
/// several times dearer. Plans hold no data and no tenant's values.
pub const SWITCH_RESET_SQL: &str = "CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; \
     DEALLOCATE ALL; UNLISTEN *; SELECT pg_catalog.pg_advisory_unlock_all(); DISCARD SEQUENCES; \
     DISCARD TEMP";
/// Command tag of an accepted `bind`.
pub const ACCEPTED_TAG: &str = "SELECT 1";

/// The RLS condition on a row-tier table. The first half is an index condition; the proof is
/// checked once per statement, as an InitPlan (the scalar subquery), not once per row.
pub const POLICY_CONDITION: &str =
    "tenant_id = pg_catalog.current_setting('pgtenant.tenant_id', true) \
     AND (SELECT pgtenant_rls.verified())";
/// Default for `tenant_id`, so inserts need not name the tenant.
pub const COLUMN_DEFAULT: &str = "pgtenant_rls.tenant()";

/// Whether `name` is one of pgtenant's own settings (`pgtenant.*`), which only the tier sets.
pub fn is_reserved_setting(name: &str) -> bool {
    name.get(..9)
        .is_some_and(|p| p.eq_ignore_ascii_case("pgtenant."))
}

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

    /// The proof that binds backend `pid` to `tenant`, as the database computes it.
    pub fn proof(&self, pid: u32, tenant: &str) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("any key length");
        mac.update(format!("ctx/{pid}/").as_bytes());
        mac.update(tenant.as_bytes());
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

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The database's HMAC of this backend and `tenant` as hex text, computed with plain
/// `sha256` from the key's pads in variables `i` (inner) and `o` (outer). Every name is
/// schema-qualified: it runs in a `SECURITY DEFINER` function without a `SET search_path`.
fn mac_hex(tenant: &str) -> String {
    let cat = |op: &str| format!(" OPERATOR(pg_catalog.{op}) ");
    let cc = cat("||");
    format!(
        "pg_catalog.encode(pg_catalog.sha256(o{cc}pg_catalog.sha256(i{cc}pg_catalog.convert_to(\
         'ctx/'{cc}pg_catalog.pg_backend_pid(){cc}'/'{cc}{tenant}, 'UTF8'))), 'hex')"
    )
}

/// DDL that creates (or brings up to date) the schema, run as the database owner. Idempotent.
/// Tenants' roles get EXECUTE on `bind`, `verified` and `tenant`, nothing else; none of them
/// writes, so all work on a hot standby.
pub fn install_sql() -> String {
    let in_session = mac_hex("t");
    let in_call = mac_hex("p_tenant");
    format!(
        "CREATE SCHEMA IF NOT EXISTS {SCHEMA};
         REVOKE ALL ON SCHEMA {SCHEMA} FROM PUBLIC;
         GRANT USAGE ON SCHEMA {SCHEMA} TO PUBLIC;
         CREATE TABLE IF NOT EXISTS {SCHEMA}.secret (
             id int PRIMARY KEY CHECK (id = 1),
             inner_pad bytea NOT NULL,
             outer_pad bytea NOT NULL);
         REVOKE ALL ON {SCHEMA}.secret FROM PUBLIC;
         -- The previous design's per-connection state, written at every switch; its sequence
         -- goes once no policy reads it (CLEANUP_SQL).
         DROP FUNCTION IF EXISTS {SCHEMA}.challenge(), {SCHEMA}.open(bytea, bytea),
             {SCHEMA}.enter(text, bytea), {SCHEMA}.enter(text, bigint, bytea);
         DROP TABLE IF EXISTS {SCHEMA}.connection, {SCHEMA}.tenant_hash;
         -- Runs once per statement (its cost: docs/isolation.md). No SET clause, which
         -- measured a third of its cost: every name in it is schema-qualified instead. Pads
         -- read into variables and the MAC computed as a plain expression, cheaper than one
         -- query doing both. The hex texts are compared directly: a 64-byte memcmp leaks no
         -- timing a client could measure through a statement.
         CREATE OR REPLACE FUNCTION {SCHEMA}.verified() RETURNS pg_catalog.bool
         LANGUAGE plpgsql STABLE PARALLEL RESTRICTED SECURITY DEFINER AS $fn$
         DECLARE
             t pg_catalog.text := pg_catalog.current_setting('{TENANT_SETTING}', true);
             p pg_catalog.text := pg_catalog.current_setting('{PROOF_SETTING}', true);
             i pg_catalog.bytea;
             o pg_catalog.bytea;
         BEGIN
             IF t IS NULL OR p IS NULL THEN
                 RETURN false;
             END IF;
             SELECT k.inner_pad, k.outer_pad INTO i, o FROM {SCHEMA}.secret k
              WHERE k.id OPERATOR(pg_catalog.=) 1;
             IF NOT FOUND THEN
                 RETURN false;
             END IF;
             RETURN {in_session} OPERATOR(pg_catalog.=) p;
         END $fn$;
         CREATE OR REPLACE FUNCTION {SCHEMA}.bind(p_tenant text, p_proof text)
         RETURNS boolean LANGUAGE plpgsql VOLATILE SECURITY DEFINER
         SET search_path = pg_catalog, pg_temp AS $fn$
         DECLARE
             i bytea;
             o bytea;
             ignored text;
         BEGIN
             -- Checked before anything is set: a refused call changes nothing.
             IF p_tenant IS NULL OR p_tenant = '' OR p_proof IS NULL THEN
                 RETURN false;
             END IF;
             SELECT k.inner_pad, k.outer_pad INTO i, o FROM {SCHEMA}.secret k WHERE k.id = 1;
             IF NOT FOUND OR {in_call} OPERATOR(pg_catalog.<>) p_proof THEN
                 RETURN false;
             END IF;
             ignored := set_config('{TENANT_SETTING}', p_tenant, false);
             ignored := set_config('{PROOF_SETTING}', p_proof, false);
             RETURN true;
         END $fn$;
         CREATE OR REPLACE FUNCTION {SCHEMA}.tenant() RETURNS text
         LANGUAGE sql STABLE PARALLEL RESTRICTED AS $fn$
             SELECT pg_catalog.current_setting('{TENANT_SETTING}', true)
              WHERE {SCHEMA}.verified()
         $fn$;
         REVOKE ALL ON FUNCTION {SCHEMA}.verified(), {SCHEMA}.bind(text, text),
             {SCHEMA}.tenant() FROM PUBLIC;
         GRANT EXECUTE ON FUNCTION {SCHEMA}.verified(), {SCHEMA}.bind(text, text),
             {SCHEMA}.tenant() TO PUBLIC;"
    )
}

/// Functions of `pg_catalog` that let a session read or signal the other sessions of its own
/// role. Row tenants share one login role, so with them a tenant could read another tenant's
/// running statement (literals included) or cancel and end its sessions.
pub const SESSION_PEEK_FUNCTIONS: [&str; 4] = [
    "pg_stat_get_activity",
    "pg_stat_get_backend_activity",
    "pg_cancel_backend",
    "pg_terminate_backend",
];

/// Takes EXECUTE on `SESSION_PEEK_FUNCTIONS` from PUBLIC in this database only (`pg_proc` is
/// per database): `pg_stat_activity` and both signals are then refused (42501) to row tenants,
/// while the superuser keeps them. Only a superuser can; anyone else changes nothing, and
/// `open_session_peeks` tells.
fn close_session_peeks_sql() -> String {
    let names = SESSION_PEEK_FUNCTIONS.map(|n| format!("'{n}'")).join(", ");
    format!(
        "DO $do$ DECLARE f pg_catalog.regprocedure; BEGIN
             FOR f IN SELECT p.oid::pg_catalog.regprocedure FROM pg_catalog.pg_proc p
                       WHERE p.pronamespace = 'pg_catalog'::pg_catalog.regnamespace
                         AND p.proname IN ({names})
             LOOP
                 EXECUTE pg_catalog.format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f);
             END LOOP;
         END $do$;"
    )
}

/// The `SESSION_PEEK_FUNCTIONS` (with their arguments) everyone may still run in the database
/// `db` is connected to: empty once `install` ran as a superuser.
pub async fn open_session_peeks(
    db: &impl tokio_postgres::GenericClient,
) -> Result<Vec<String>, tokio_postgres::Error> {
    Ok(db
        .query(
            "SELECT p.oid::regprocedure::text FROM pg_catalog.pg_proc p
              WHERE p.pronamespace = 'pg_catalog'::regnamespace AND p.proname = ANY($1)
                AND has_function_privilege('public', p.oid, 'EXECUTE')
              ORDER BY 1",
            &[&SESSION_PEEK_FUNCTIONS.as_slice()],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Drops what previous designs left behind (a binding table, the context sequence) once no
/// policy reads it any more. Objects something else still depends on stay.
pub const CLEANUP_SQL: &str = "SET client_min_messages = warning; DO $do$ BEGIN
         DROP TABLE IF EXISTS pgtenant_rls.binding;
         DROP FUNCTION IF EXISTS pgtenant_rls.unbound();
         DROP SEQUENCE IF EXISTS pgtenant_rls.context;
     EXCEPTION WHEN dependent_objects_still_exist THEN NULL;
     END $do$; RESET client_min_messages";

/// Installs the schema in the database `db` is connected to and stores `key`'s pads there,
/// sent as bind parameters so they appear in no statement text; closes the session peeks
/// (`SESSION_PEEK_FUNCTIONS`) when it runs as a superuser. Returns the peeks left open.
pub async fn install(
    db: &impl tokio_postgres::GenericClient,
    key: &RowKey,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let superuser: bool = db
        .query_one(
            "SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user",
            &[],
        )
        .await?
        .get(0);
    db.batch_execute(&format!(
        "BEGIN;
         SET LOCAL client_min_messages = warning;
         SELECT pg_advisory_xact_lock(hashtext('pgtenant row context'));
         {}
         {}
         COMMIT;",
        install_sql(),
        if superuser {
            close_session_peeks_sql()
        } else {
            String::new()
        }
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
    open_session_peeks(db).await
}

/// What a row-tier tenant's connections are bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowBinding {
    pub tenant: Arc<str>,
}

/// Appends Parse (unnamed) + Bind with text parameters + Execute + Sync of `sql`.
fn put_statement(buf: &mut BytesMut, sql: &str, params: &[&[u8]]) -> Result<(), &'static str> {
    crate::protocol::to_server::statement(sql, params, buf)
        .map_err(|_| "cannot encode the row context statement")
}

/// Appends the messages that bind backend `pid` to `tenant`.
pub fn put_bind(
    buf: &mut BytesMut,
    key: &RowKey,
    pid: u32,
    tenant: &str,
) -> Result<(), &'static str> {
    let proof = hex(&key.proof(pid, tenant));
    put_statement(buf, BIND_SQL, &[tenant.as_bytes(), proof.as_bytes()])
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    #[test]
    fn proof_is_hmac_sha256_computable_from_the_stored_pads() {
        let key = RowKey::derive(&[7; 32], "row_tenants");
        let (inner, outer) = key.pads();
        let inner_hash = Sha256::new()
            .chain_update(&inner)
            .chain_update(b"ctx/42/hooli")
            .finalize();
        let via_pads: [u8; 32] = Sha256::new()
            .chain_update(&outer)
            .chain_update(inner_hash)
            .finalize()
            .into();
        assert_eq!(key.proof(42, "hooli"), via_pads);
    }

    #[test]
    fn each_database_gets_its_own_key() {
        assert_ne!(RowKey::derive(&[7; 32], "a"), RowKey::derive(&[7; 32], "b"));
    }

    #[test]
    fn a_proof_is_bound_to_pid_and_tenant() {
        let key = RowKey::derive(&[7; 32], "d");
        let p = key.proof(1, "a");
        assert_ne!(p, key.proof(2, "a"));
        assert_ne!(p, key.proof(1, "b"));
        // The pid's digits end where the tenant starts: "1/1a" is not "11/a".
        assert_ne!(key.proof(1, "1/a"), key.proof(11, "a"));
    }

    #[test]
    fn the_proof_travels_as_a_bind_parameter() {
        let key = RowKey::derive(&[7; 32], "d");
        let mut buf = BytesMut::new();
        put_bind(&mut buf, &key, 7, "acme").unwrap();
        let proof = hex(&key.proof(7, "acme"));
        let text = String::from_utf8_lossy(&buf);
        assert_eq!(buf[0], b'P');
        let parse_end = 1 + u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        assert!(!String::from_utf8_lossy(&buf[..parse_end]).contains(&proof));
        assert_eq!(buf[parse_end], b'B');
        assert!(text.contains(&proof) && text.contains(BIND_SQL));
    }

    #[test]
    fn debug_hides_the_key() {
        assert_eq!(format!("{:?}", RowKey::derive(&[7; 32], "d")), "RowKey(..)");
    }
}
