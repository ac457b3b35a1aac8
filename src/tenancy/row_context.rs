//! The row tier's tenant context, made so a tenant's own SQL cannot forge it.
//!
//! RLS policies compare `tenant_id` with a custom setting, `pgtenant.tenant_id`, which keeps
//! the planner's index choices cheap, *and* check that setting against a value only
//! pgtenant's `SECURITY DEFINER` functions can write: `currval('pgtenant_rls.context')`, which
//! is private to the session and which tenants (without USAGE or UPDATE on the sequence) can
//! read but never set. A client that sets `pgtenant.tenant_id` itself breaks the match and sees
//! no rows at all (fail closed).
//!
//! - **Opening.** Once per server connection pgtenant asks for a one-time challenge and answers
//!   `open(token, proof)` with `proof = HMAC-SHA256(k, "open/" pid "/" challenge "/" token)`:
//!   the database verifies it with plain `sha256` over the key's stored pads and records only
//!   `sha256(token)` for the backend's pid. The challenge is used up by any answer, so a proof
//!   seen in a log is worth nothing.
//! - **Switching.** `enter(tenant, token)` costs no cryptography: it compares the token's hash,
//!   sets `context` to `hashtextextended(tenant, 0)` for this session alone and the setting to
//!   the tenant. A tenant whose hash another tenant already holds is refused, so the pair is
//!   unambiguous. pgtenant switches right after `DISCARD ALL`, so if `enter` fails the session
//!   is bound to no one; a client's own forged call changes nothing.
//! - **Secrets travel as bind parameters**, never in statement text that `pg_stat_activity`
//!   would show other sessions of the same role.
//! - `DISCARD ALL`, `RESET ALL` and `DISCARD SEQUENCES` clear the context (no rows), never
//!   leave another tenant's; pgtenant re-enters after a client runs them.

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
/// Asks the server for this connection's one-time challenge.
pub const CHALLENGE_SQL: &str = "SELECT pgtenant_rls.challenge()";
/// Opens a connection for switching. Its command tag says whether the server accepted the
/// proof (`SELECT 1`) or not (`SELECT 0`), so it can be checked without looking at rows.
pub const OPEN_SQL: &str =
    "SELECT 1 WHERE pgtenant_rls.open(pg_catalog.decode($1, 'hex'), pg_catalog.decode($2, 'hex'))";
/// Binds an opened connection to a tenant; command tag as for `OPEN_SQL`.
pub const ENTER_SQL: &str = "SELECT 1 WHERE pgtenant_rls.enter($1, pg_catalog.decode($2, 'hex'))";
/// Clears a session before it is switched to another tenant: DISCARD ALL without DISCARD
/// PLANS, whose invalidation of every cached plan (`enter`'s own among them) made switching
/// several times dearer. Plans hold no data and no tenant's values.
pub const SWITCH_RESET_SQL: &str = "CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; \
     DEALLOCATE ALL; UNLISTEN *; SELECT pg_catalog.pg_advisory_unlock_all(); DISCARD SEQUENCES; \
     DISCARD TEMP";
/// Command tag of an accepted `open` or `enter`.
pub const ACCEPTED_TAG: &str = "SELECT 1";

/// The RLS condition on a row-tier table. Inline and without a subquery, which measured
/// cheapest: the first half is an index condition, the second a filter that costs a hash.
pub const POLICY_CONDITION: &str =
    "tenant_id = pg_catalog.current_setting('pgtenant.tenant_id', true) \
     AND pg_catalog.hashtextextended(pg_catalog.current_setting('pgtenant.tenant_id', true), 0) \
     = pg_catalog.currval('pgtenant_rls.context'::regclass)";
/// Default for `tenant_id`, so inserts need not name the tenant.
pub const COLUMN_DEFAULT: &str = "pgtenant_rls.tenant()";

/// Puts the tenant setting back after `RESET ALL` (which leaves the session's context, the
/// sequence value, alone). Needs no secret: a setting that does not match the context shows no
/// rows.
pub fn restore_setting_sql(tenant: &str) -> String {
    format!(
        "SELECT pg_catalog.set_config('{TENANT_SETTING}', {}, false)",
        crate::tenancy::tier::quote_literal(tenant)
    )
}

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

    /// The proof that opens backend `pid`, which handed out `challenge`, with `token`.
    pub fn proof(&self, pid: u32, challenge: &str, token: &ConnToken) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("any key length");
        mac.update(format!("open/{pid}/{challenge}/").as_bytes());
        mac.update(&token.0);
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

/// A connection's switching token: 256 random bits, known to pgtenant and (as a hash) to the
/// server. Debug never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnToken([u8; 32]);

impl ConnToken {
    pub fn random() -> ConnToken {
        ConnToken(rand::random())
    }

    fn hex(&self) -> String {
        hex(&self.0)
    }
}

impl std::fmt::Debug for ConnToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnToken(..)")
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// DDL that creates (or brings up to date) the schema, run as the database owner. Idempotent.
/// Tenants' roles get EXECUTE on the functions and SELECT (for `currval`) on the context
/// sequence, nothing else.
pub fn install_sql() -> String {
    format!(
        "CREATE SCHEMA IF NOT EXISTS {SCHEMA};
         REVOKE ALL ON SCHEMA {SCHEMA} FROM PUBLIC;
         GRANT USAGE ON SCHEMA {SCHEMA} TO PUBLIC;
         CREATE TABLE IF NOT EXISTS {SCHEMA}.secret (
             id int PRIMARY KEY CHECK (id = 1),
             inner_pad bytea NOT NULL,
             outer_pad bytea NOT NULL);
         CREATE UNLOGGED TABLE IF NOT EXISTS {SCHEMA}.connection (
             pid int PRIMARY KEY,
             challenge text,
             token_hash bytea);
         CREATE TABLE IF NOT EXISTS {SCHEMA}.tenant_hash (
             hash bigint PRIMARY KEY,
             tenant text NOT NULL UNIQUE);
         DO $do$ BEGIN
             IF to_regclass('{SCHEMA}.context') IS NULL THEN
                 -- Unlogged where the server can (15+): switching writes no WAL.
                 EXECUTE format('CREATE %s SEQUENCE {SCHEMA}.context AS bigint
                     MINVALUE -9223372036854775808 MAXVALUE 9223372036854775807 START 0 NO CYCLE',
                     CASE WHEN current_setting('server_version_num')::int >= 150000
                          THEN 'UNLOGGED' ELSE '' END);
             END IF;
         END $do$;
         REVOKE ALL ON {SCHEMA}.secret, {SCHEMA}.connection, {SCHEMA}.tenant_hash,
             {SCHEMA}.context FROM PUBLIC;
         GRANT SELECT ON {SCHEMA}.context TO PUBLIC;
         CREATE OR REPLACE FUNCTION {SCHEMA}.challenge() RETURNS text
         LANGUAGE plpgsql VOLATILE SECURITY DEFINER
         SET search_path = pg_catalog, pg_temp AS $fn$
         DECLARE
             c text := gen_random_uuid()::text;
         BEGIN
             -- Leaves a token in place: asking for a challenge breaks nothing.
             INSERT INTO {SCHEMA}.connection (pid, challenge) VALUES (pg_backend_pid(), c)
                 ON CONFLICT (pid) DO UPDATE SET challenge = EXCLUDED.challenge;
             RETURN c;
         END $fn$;
         CREATE OR REPLACE FUNCTION {SCHEMA}.open(p_token bytea, p_proof bytea)
         RETURNS boolean LANGUAGE plpgsql VOLATILE SECURITY DEFINER
         SET search_path = pg_catalog, pg_temp AS $fn$
         DECLARE
             k record;
             c text;
             mac bytea;
         BEGIN
             -- The challenge is used up by any answer.
             SELECT challenge INTO c FROM {SCHEMA}.connection
              WHERE pid = pg_backend_pid() FOR UPDATE;
             UPDATE {SCHEMA}.connection SET challenge = NULL WHERE pid = pg_backend_pid();
             IF c IS NULL OR p_token IS NULL OR p_proof IS NULL OR length(p_token) < 16 THEN
                 RETURN false;
             END IF;
             SELECT inner_pad, outer_pad INTO k FROM {SCHEMA}.secret WHERE id = 1;
             IF NOT FOUND THEN
                 RETURN false;
             END IF;
             mac := sha256(k.outer_pad || sha256(k.inner_pad
                 || convert_to('open/' || pg_backend_pid() || '/' || c || '/', 'UTF8') || p_token));
             -- Compared as hashes: the time taken says nothing about the expected MAC.
             IF sha256(mac) <> sha256(p_proof) THEN
                 RETURN false;
             END IF;
             UPDATE {SCHEMA}.connection SET token_hash = sha256(p_token) WHERE pid = pg_backend_pid();
             RETURN true;
         END $fn$;
         CREATE OR REPLACE FUNCTION {SCHEMA}.enter(p_tenant text, p_token bytea)
         RETURNS boolean LANGUAGE plpgsql VOLATILE SECURITY DEFINER
         SET search_path = pg_catalog, pg_temp AS $fn$
         DECLARE
             h bigint := hashtextextended(p_tenant, 0);
             ignored bigint;
             ignored_text text;
         BEGIN
             -- One indexed query on the hot path (a known tenant); assignments below run as
             -- plain expressions, not queries. A refusal changes nothing: only the session's
             -- own client can have sent it (pgtenant switches after a reset that leaves the
             -- session bound to no one).
             PERFORM FROM {SCHEMA}.connection c, {SCHEMA}.tenant_hash t
              WHERE c.pid = pg_backend_pid() AND c.token_hash = sha256(p_token)
                AND t.hash = h AND t.tenant = p_tenant;
             IF NOT FOUND THEN
                 PERFORM FROM {SCHEMA}.connection
                  WHERE pid = pg_backend_pid() AND token_hash = sha256(p_token);
                 IF NOT FOUND OR p_tenant IS NULL OR p_tenant = '' THEN
                     RETURN false;
                 END IF;
                 -- A tenant new to this database: its hash must be its own.
                 INSERT INTO {SCHEMA}.tenant_hash (hash, tenant) VALUES (h, p_tenant)
                     ON CONFLICT DO NOTHING;
                 PERFORM FROM {SCHEMA}.tenant_hash WHERE hash = h AND tenant = p_tenant;
                 IF NOT FOUND THEN
                     RAISE EXCEPTION 'tenant id \"%\" has the same context hash as another tenant', p_tenant
                         USING ERRCODE = 'unique_violation', HINT = 'Rename one of the tenants.';
                 END IF;
             END IF;
             ignored := setval('{SCHEMA}.context', h, true);
             -- Only this session's currval keeps h: the shared value tells others nothing.
             ignored := setval('{SCHEMA}.context', 0, false);
             ignored_text := set_config('{TENANT_SETTING}', p_tenant, false);
             RETURN true;
         END $fn$;
         CREATE OR REPLACE FUNCTION {SCHEMA}.tenant() RETURNS text
         LANGUAGE sql STABLE AS $fn$
             SELECT t FROM (SELECT pg_catalog.current_setting('{TENANT_SETTING}', true) AS t) s
              WHERE t OPERATOR(pg_catalog.<>) ''
                AND pg_catalog.hashtextextended(t, 0)
                    OPERATOR(pg_catalog.=) pg_catalog.currval('{SCHEMA}.context'::regclass)
         $fn$;
         DROP FUNCTION IF EXISTS {SCHEMA}.enter(text, bigint, bytea);
         REVOKE ALL ON FUNCTION {SCHEMA}.challenge(), {SCHEMA}.open(bytea, bytea),
             {SCHEMA}.enter(text, bytea), {SCHEMA}.tenant() FROM PUBLIC;
         GRANT EXECUTE ON FUNCTION {SCHEMA}.challenge(), {SCHEMA}.open(bytea, bytea),
             {SCHEMA}.enter(text, bytea), {SCHEMA}.tenant() TO PUBLIC;"
    )
}

/// Drops what the previous design (a binding table read by every policy) left behind, once
/// no policy reads it any more. Objects something else still depends on stay.
pub const CLEANUP_SQL: &str = "SET client_min_messages = warning; DO $do$ BEGIN
         DROP TABLE IF EXISTS pgtenant_rls.binding;
         DROP FUNCTION IF EXISTS pgtenant_rls.unbound();
     EXCEPTION WHEN dependent_objects_still_exist THEN NULL;
     END $do$; RESET client_min_messages";

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
}

/// Appends Parse (unnamed) + Bind with text parameters + Execute + Sync of `sql`, encoded by
/// postgres-protocol like the proxy's other own statements.
fn put_statement(buf: &mut BytesMut, sql: &str, params: &[&[u8]]) -> Result<(), &'static str> {
    use postgres_protocol::message::frontend;
    use postgres_protocol::IsNull;
    const ENCODE: &str = "cannot encode the row context statement";
    frontend::parse("", sql, [], buf).map_err(|_| ENCODE)?;
    frontend::bind(
        "",
        "",
        [],
        params.iter().copied(),
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

/// Appends the messages that answer `challenge` of backend `pid`, opening it with `token`.
pub fn put_open(
    buf: &mut BytesMut,
    key: &RowKey,
    pid: u32,
    challenge: &str,
    token: &ConnToken,
) -> Result<(), &'static str> {
    let proof = hex(&key.proof(pid, challenge, token));
    put_statement(buf, OPEN_SQL, &[token.hex().as_bytes(), proof.as_bytes()])
}

/// Appends the messages that bind an opened connection to `tenant`.
pub fn put_enter(buf: &mut BytesMut, tenant: &str, token: &ConnToken) -> Result<(), &'static str> {
    put_statement(buf, ENTER_SQL, &[tenant.as_bytes(), token.hex().as_bytes()])
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    #[test]
    fn proof_is_hmac_sha256_computable_from_the_stored_pads() {
        let key = RowKey::derive(&[7; 32], "row_tenants");
        let token = ConnToken([9; 32]);
        let (inner, outer) = key.pads();
        let inner_hash = Sha256::new()
            .chain_update(&inner)
            .chain_update(b"open/42/c-1/")
            .chain_update(token.0)
            .finalize();
        let via_pads: [u8; 32] = Sha256::new()
            .chain_update(&outer)
            .chain_update(inner_hash)
            .finalize()
            .into();
        assert_eq!(key.proof(42, "c-1", &token), via_pads);
    }

    #[test]
    fn each_database_gets_its_own_key() {
        assert_ne!(RowKey::derive(&[7; 32], "a"), RowKey::derive(&[7; 32], "b"));
    }

    #[test]
    fn a_proof_is_bound_to_pid_challenge_and_token() {
        let key = RowKey::derive(&[7; 32], "d");
        let t = ConnToken([1; 32]);
        let p = key.proof(1, "c", &t);
        assert_ne!(p, key.proof(2, "c", &t));
        assert_ne!(p, key.proof(1, "d", &t));
        assert_ne!(p, key.proof(1, "c", &ConnToken([2; 32])));
    }

    #[test]
    fn debug_hides_the_key_and_the_token() {
        assert_eq!(format!("{:?}", RowKey::derive(&[7; 32], "d")), "RowKey(..)");
        assert_eq!(format!("{:?}", ConnToken::random()), "ConnToken(..)");
    }
}
