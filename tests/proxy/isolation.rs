//! Isolation against a hostile client: whatever SQL it sends, a tenant reaches only its own
//! data and session state. Row tenants see only their rows, and tampering with their context
//! makes them see nothing, never another tenant's, also on a server connection tenants share,
//! and also on a hot standby (every read-only row test runs on both); schema tenants stay in
//! their schema; cancel keys cancel only their own client's query.

use std::net::SocketAddr;

use crate::support::{cancel_packet, fixture, sqlstate, RawClient};
use pgtenant::config::{Config, PoolMode, Tier};
use tokio_postgres::Client;

/// Where a row tenant's statements run.
#[derive(Clone, Copy, Debug, PartialEq)]
enum On {
    /// The primary, through the shared proxy.
    Primary,
    /// The primary's hot standby: the tenants' users are read-only, with no fallback.
    Standby,
}

impl On {
    fn proxy(self) -> SocketAddr {
        match self {
            On::Primary => fixture().proxy,
            On::Standby => fixture().standby_proxy,
        }
    }

    async fn tenant(self, tenant: &str) -> Client {
        fixture().tenant_at(self.proxy(), tenant).await
    }

    /// Another proxy over the same tenants, with a changed config.
    async fn extra_proxy(self, change: impl FnOnce(&mut Config)) -> SocketAddr {
        match self {
            On::Primary => fixture().extra_proxy(change).await,
            On::Standby => fixture().extra_standby_proxy(change).await,
        }
    }

    /// A superuser connection straight to the server the statements run on.
    async fn direct(self, database: &str) -> Client {
        match self {
            On::Primary => fixture().direct(0, database).await,
            On::Standby => fixture().direct_standby(database).await,
        }
    }
}

/// Each test once on the primary and once on its hot standby.
macro_rules! on_primary_and_standby {
    ($($name:ident),* $(,)?) => {
        mod on_primary {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::On::Primary).await
            })*
        }
        mod on_standby {
            $(#[tokio::test]
            async fn $name() {
                let _defaults = crate::support::ROLE_DEFAULTS.read().await;
                super::$name(super::On::Standby).await
            })*
        }
    };
}

on_primary_and_standby!(
    setting_the_tenant_setting_shows_no_other_tenants_rows,
    set_config_of_the_tenant_setting_shows_no_other_tenants_rows,
    dynamic_sql_cannot_switch_a_row_tenants_context,
    reset_all_and_discard_all_keep_a_row_tenants_context,
    reset_all_and_discard_all_keep_a_row_tenants_context_in_session_mode,
    discarding_sequences_keeps_a_row_tenants_context,
    a_forged_proof_binds_nothing,
    another_tenants_name_with_ones_own_proof_shows_nothing,
    a_proof_read_in_ones_session_is_worth_nothing_on_another_connection,
    the_row_key_is_not_readable_by_tenants,
    a_row_tenant_cannot_take_another_identity,
    the_proof_travels_as_a_parameter_never_in_statement_text,
    row_tenants_take_turns_on_one_shared_connection_each_seeing_only_its_rows,
    row_tenants_in_session_mode_reuse_a_connection_rebound_to_the_next_tenant,
    a_proxy_with_another_row_key_is_refused_with_a_clear_error,
    a_setting_made_with_set_config_does_not_follow_the_connection_to_another_tenant,
    an_advisory_lock_taken_in_dynamic_sql_does_not_follow_the_connection_to_another_tenant,
    equal_statement_names_in_two_row_tenants_on_one_connection_keep_their_own_queries,
    a_row_tenant_uses_no_more_of_the_shared_connections_than_its_pool_size,
    a_row_connection_reset_after_a_client_left_mid_transaction_is_entered_again,
);

/// Owners of the rows the client can see in the shared `accounts` table.
async fn visible_owners(c: &Client) -> Vec<String> {
    c.query("SELECT owner FROM accounts ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Whether `c` currently sees no rows of the shared table at all (a forged or cleared
/// context fails closed).
async fn sees_nothing(c: &Client) -> bool {
    visible_owners(c).await.is_empty()
}

async fn setting_the_tenant_setting_shows_no_other_tenants_rows(on: On) {
    // Tries: claim another tenant with a plain SET, in a transaction and for the session.
    let c = on.tenant("hooli").await;
    c.batch_execute("BEGIN; SET pgtenant.tenant_id = 'piedpiper'")
        .await
        .unwrap();
    assert!(sees_nothing(&c).await);
    c.batch_execute("COMMIT; SET pgtenant.tenant_id = 'piedpiper'")
        .await
        .unwrap();
    // pgtenant binds the tenant's context again before its next transaction.
    assert_eq!(visible_owners(&c).await, ["Hal", "Hana"]);
}

async fn set_config_of_the_tenant_setting_shows_no_other_tenants_rows(on: On) {
    // Tries: the same through set_config(), which no statement parser sees.
    let c = on.tenant("hooli").await;
    c.batch_execute("BEGIN; SELECT set_config('pgtenant.tenant_id', 'piedpiper', true)")
        .await
        .unwrap();
    assert!(sees_nothing(&c).await);
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(visible_owners(&c).await, ["Hal", "Hana"]);
}

async fn dynamic_sql_cannot_switch_a_row_tenants_context(on: On) {
    // Tries: SET built at run time inside a DO block.
    let c = on.tenant("hooli").await;
    c.batch_execute(
        "BEGIN;
         DO $$ BEGIN EXECUTE 'SET LOCAL pgtenant.tenant_id = ' || quote_literal('piedpiper'); END $$;",
    )
    .await
    .unwrap();
    assert!(sees_nothing(&c).await);
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(visible_owners(&c).await, ["Hal", "Hana"]);
}

async fn reset_all_and_discard_all_keep_a_row_tenants_context(on: On) {
    // Tries: wipe the session state the context lives in; pgtenant binds it again.
    let c = on.tenant("piedpiper").await;
    c.batch_execute("RESET ALL").await.unwrap();
    assert_eq!(visible_owners(&c).await, ["Pia", "Pete"]);
    c.batch_execute("DISCARD ALL").await.unwrap();
    assert_eq!(visible_owners(&c).await, ["Pia", "Pete"]);
}

async fn reset_all_and_discard_all_keep_a_row_tenants_context_in_session_mode(on: On) {
    // Tries: the same on a connection the client holds for its whole session.
    let addr = one_shared_connection(on, PoolMode::Session).await;
    let c = fixture().tenant_at(addr, "piedpiper").await;
    for sql in [
        "RESET ALL",
        "DISCARD ALL",
        "SET pgtenant.tenant_id = 'hooli'",
        "SET pgtenant.proof = 'forged'",
    ] {
        c.batch_execute(sql).await.unwrap();
        assert_eq!(visible_owners(&c).await, ["Pia", "Pete"], "after {sql}");
    }
}

async fn discarding_sequences_keeps_a_row_tenants_context(on: On) {
    // Tries: clear the session's sequence state, where an earlier design kept the context.
    let c = on.tenant("mallory").await;
    c.batch_execute("BEGIN; DISCARD SEQUENCES").await.unwrap();
    assert_eq!(visible_owners(&c).await, ["Mal", "Mia"]);
    c.batch_execute("ROLLBACK").await.unwrap();
}

async fn a_forged_proof_binds_nothing(on: On) {
    // Tries: call bind() for another tenant with a guessed proof.
    let c = on.tenant("mallory").await;
    c.batch_execute("BEGIN").await.unwrap();
    let bound: bool = c
        .query_one(
            "SELECT pgtenant_rls.bind('hooli', encode(sha256('guess'::bytea), 'hex'))",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!bound);
    // A refused call changes nothing.
    assert_eq!(visible_owners(&c).await, ["Mal", "Mia"]);
    c.batch_execute("COMMIT").await.unwrap();
}

async fn another_tenants_name_with_ones_own_proof_shows_nothing(on: On) {
    // Tries: keep the proof pgtenant set for this session, claim another tenant's name.
    let c = on.tenant("mallory").await;
    c.batch_execute("BEGIN").await.unwrap();
    let bound: bool = c
        .query_one(
            "SELECT pgtenant_rls.bind('hooli', current_setting('pgtenant.proof'))",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!bound);
    c.batch_execute("SET LOCAL pgtenant.tenant_id = 'hooli'")
        .await
        .unwrap();
    assert!(sees_nothing(&c).await);
    c.batch_execute("COMMIT").await.unwrap();
}

async fn a_proof_read_in_ones_session_is_worth_nothing_on_another_connection(on: On) {
    // Tries: read the proof on one server connection and replay it on another, where
    // pgtenant bound another tenant: a proof is bound to its backend.
    let f = fixture();
    let addr = with_pool_size(on, 2).await;
    let first = f.tenant_at(addr, "mallory").await;
    first.batch_execute("BEGIN").await.unwrap();
    let row = first
        .query_one(
            "SELECT pg_backend_pid(), current_setting('pgtenant.proof')",
            &[],
        )
        .await
        .unwrap();
    let (pid, proof): (i32, String) = (row.get(0), row.get(1));
    // While the first holds its connection, the second gets another one.
    let second = f.tenant_at(addr, "mallory").await;
    second.batch_execute("BEGIN").await.unwrap();
    let other_pid: i32 = second
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(pid, other_pid, "two server connections");
    let bound: bool = second
        .query_one("SELECT pgtenant_rls.bind('mallory', $1)", &[&proof])
        .await
        .unwrap()
        .get(0);
    assert!(!bound);
    second
        .query_one("SELECT set_config('pgtenant.proof', $1, true)", &[&proof])
        .await
        .unwrap();
    assert!(sees_nothing(&second).await);
    second.batch_execute("COMMIT").await.unwrap();
    first.batch_execute("COMMIT").await.unwrap();
}

async fn the_row_key_is_not_readable_by_tenants(on: On) {
    let c = on.tenant("hooli").await;
    let e = c
        .query("SELECT * FROM pgtenant_rls.secret", &[])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("42501"));
}

#[tokio::test]
async fn a_row_tenant_cannot_write_rows_for_another_tenant() {
    let c = fixture().tenant("hooli").await;
    let e = c
        .execute(
            "INSERT INTO accounts (tenant_id, owner) VALUES ('piedpiper', 'Intruder')",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("42501"));
    let moved = c
        .execute("UPDATE accounts SET tenant_id = 'piedpiper'", &[])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&moved).as_deref(), Some("42501"));
}

#[tokio::test]
async fn a_row_tenants_inserts_default_to_its_own_tenant() {
    let c = fixture().tenant("hooli").await;
    c.batch_execute("BEGIN").await.unwrap();
    let tenant: String = c
        .query_one(
            "INSERT INTO accounts (owner) VALUES ('Hugo') RETURNING tenant_id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tenant, "hooli");
    c.batch_execute("ROLLBACK").await.unwrap();
}

#[tokio::test]
async fn a_row_tenant_on_a_standby_cannot_write() {
    let c = On::Standby.tenant("hooli").await;
    let e = c
        .execute("INSERT INTO accounts (owner) VALUES ('Hugo')", &[])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("25006"));
    assert_eq!(visible_owners(&c).await, ["Hal", "Hana"]);
}

async fn a_row_tenant_cannot_take_another_identity(on: On) {
    let c = on.tenant("hooli").await;
    for sql in ["SET SESSION AUTHORIZATION postgres", "SET ROLE postgres"] {
        let e = c.batch_execute(sql).await.unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{sql}");
    }
}

#[tokio::test]
async fn a_row_tenant_cannot_shadow_a_shared_table_with_a_temp_table() {
    let c = fixture().tenant("hooli").await;
    // Within one transaction, so transaction pooling lets it through to the server.
    c.batch_execute("BEGIN").await.unwrap();
    let e = c
        .batch_execute("CREATE TEMP TABLE accounts (owner text) ON COMMIT DROP")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("42501"));
    c.batch_execute("ROLLBACK").await.unwrap();
}

async fn the_proof_travels_as_a_parameter_never_in_statement_text(on: On) {
    // A proxy of its own: the connection bound at this login serves no one else, and
    // binding is the last statement it ran.
    let addr = on.extra_proxy(|_| {}).await;
    let _c = fixture().tenant_at(addr, "piedpiper").await;
    let admin = on.direct("row_tenants").await;
    let texts: Vec<String> = admin
        .query(
            "SELECT query FROM pg_stat_activity WHERE query LIKE '%pgtenant_rls.bind%'
               AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        !texts.is_empty(),
        "the login's bind() shows in pg_stat_activity"
    );
    for t in texts {
        assert!(t.contains("$2"), "parameters stay parameters: {t}");
    }
}

/// Row tenants share one login role, and PostgreSQL shows a session's statement text to, and
/// lets it be signalled by, any session of the same role.
#[tokio::test]
async fn a_row_tenant_reads_no_other_row_tenants_statement_text() {
    let f = fixture();
    let hooli = f.tenant("hooli").await;
    let pied = f.tenant("piedpiper").await;
    let running = tokio::spawn(async move {
        hooli
            .simple_query("SELECT pg_sleep(1.5), 'hooli-private-literal'")
            .await
    });
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    for sql in [
        "SELECT string_agg(query, ' ') FROM pg_stat_activity",
        "SELECT string_agg(pg_stat_get_backend_activity(i), ' ')
           FROM pg_stat_get_backend_idset() i",
    ] {
        match pied.query_one(sql, &[]).await {
            Ok(row) => {
                let seen: Option<String> = row.get(0);
                assert!(
                    !seen.unwrap_or_default().contains("hooli-private"),
                    "{sql} shows another tenant's statement"
                );
            }
            Err(e) => assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{sql}: {e:?}"),
        }
    }
    running
        .await
        .unwrap()
        .expect("hooli's statement ran to its end");
}

#[tokio::test]
async fn a_row_tenant_cannot_end_or_cancel_another_row_tenants_session() {
    let f = fixture();
    let hooli = f.tenant("hooli").await;
    let pied = f.tenant("piedpiper").await;
    let running = tokio::spawn(async move {
        let r = hooli.simple_query("SELECT pg_sleep(1.5)").await;
        (r, hooli)
    });
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    for sql in [
        "SELECT pg_cancel_backend(pid) FROM pg_stat_activity
           WHERE usename = current_user AND pid <> pg_backend_pid()",
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
           WHERE usename = current_user AND pid <> pg_backend_pid()",
        "SELECT pg_terminate_backend(pg_stat_get_backend_pid(i)) FROM pg_stat_get_backend_idset() i
           WHERE pg_stat_get_backend_userid(i) = current_user::regrole
             AND pg_stat_get_backend_pid(i) <> pg_backend_pid()",
    ] {
        let e = pied.simple_query(sql).await.unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{sql}: {e:?}");
    }
    let (r, hooli) = running.await.unwrap();
    r.expect("hooli's statement ran to its end");
    hooli
        .simple_query("SELECT 1")
        .await
        .expect("and hooli is still served");
}

/// A proxy where each tenant may hold `n` server connections at once.
async fn with_pool_size(on: On, n: u32) -> SocketAddr {
    on.extra_proxy(|c| {
        for t in c.tenants.iter_mut() {
            t.pool_size = Some(n);
        }
    })
    .await
}

/// A proxy whose row tenants share a single server connection.
async fn one_shared_connection(on: On, mode: PoolMode) -> SocketAddr {
    on.extra_proxy(|c| {
        c.pool.mode = mode;
        c.pool.default_size = 1;
    })
    .await
}

/// (backend pid, owners visible) for one transaction of `c`.
async fn pid_and_owners(c: &Client) -> (i32, Vec<String>) {
    let row = c
        .query_one(
            "SELECT pg_backend_pid(), (SELECT array_agg(owner ORDER BY id) FROM accounts)",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

async fn row_tenants_take_turns_on_one_shared_connection_each_seeing_only_its_rows(on: On) {
    let f = fixture();
    let addr = one_shared_connection(on, PoolMode::Transaction).await;
    let hooli = f.tenant_at(addr, "hooli").await;
    let pied = f.tenant_at(addr, "piedpiper").await;
    let mut pids = std::collections::HashSet::new();
    for _ in 0..10 {
        let (pid, owners) = pid_and_owners(&hooli).await;
        pids.insert(pid);
        assert_eq!(owners, ["Hal", "Hana"]);
        let (pid, owners) = pid_and_owners(&pied).await;
        pids.insert(pid);
        assert_eq!(owners, ["Pia", "Pete"]);
    }
    assert_eq!(pids.len(), 1, "both tenants were served by one connection");
}

async fn row_tenants_in_session_mode_reuse_a_connection_rebound_to_the_next_tenant(on: On) {
    let f = fixture();
    let addr = one_shared_connection(on, PoolMode::Session).await;
    let (first_pid, owners) = pid_and_owners(&f.tenant_at(addr, "hooli").await).await;
    assert_eq!(owners, ["Hal", "Hana"]);
    // The first client has gone: its connection is reset, then serves the next tenant.
    let mut next = None;
    for _ in 0..50 {
        match tokio::time::timeout(
            std::time::Duration::from_millis(500),
            f.tenant_at(addr, "piedpiper"),
        )
        .await
        {
            Ok(c) => {
                next = Some(pid_and_owners(&c).await);
                break;
            }
            Err(_) => continue,
        }
    }
    let (pid, owners) = next.expect("second session got the connection");
    assert_eq!(owners, ["Pia", "Pete"]);
    assert_eq!(pid, first_pid);
}

async fn a_proxy_with_another_row_key_is_refused_with_a_clear_error(on: On) {
    let f = fixture();
    let path = std::env::temp_dir().join(format!(
        "pgtenant-wrong-row-key-{}-{on:?}",
        std::process::id()
    ));
    std::fs::write(&path, pgtenant::tenancy::crypto::MasterKey::generate_text()).unwrap();
    let addr = on
        .extra_proxy(|c| c.row_key = Some(format!("file:{}", path.display())))
        .await;
    let Err(e) = f.connect_str(&f.url_at(addr, "hooli")).await else {
        panic!("login accepted with the wrong row key");
    };
    let message = crate::support::pg_error(&e);
    assert!(
        message.contains("did not accept the row-tier context of database \"row_tenants\"")
            && message.contains("different row key"),
        "{message}"
    );
    let _ = std::fs::remove_file(path);
}

/// Two clients of different row tenants on one shared server connection, `hooli` having run
/// `sql` first; returns what `piedpiper` then gets from `probe` (one text value), after checking
/// that both used the same connection.
async fn after_other_tenant_on_shared_connection(on: On, sql: &str, probe: &str) -> String {
    let f = fixture();
    let addr = one_shared_connection(on, PoolMode::Transaction).await;
    let hooli = f.tenant_at(addr, "hooli").await;
    let pied = f.tenant_at(addr, "piedpiper").await;
    let (pid_a, _) = pid_and_owners(&hooli).await;
    hooli.batch_execute(sql).await.unwrap();
    let (pid_b, _) = pid_and_owners(&pied).await;
    assert_eq!(pid_a, pid_b, "one shared connection");
    pied.query_one(probe, &[]).await.unwrap().get(0)
}

async fn a_setting_made_with_set_config_does_not_follow_the_connection_to_another_tenant(on: On) {
    let seen = after_other_tenant_on_shared_connection(
        on,
        "SELECT set_config('work_mem', '1234kB', false)",
        "SELECT current_setting('work_mem')",
    )
    .await;
    assert_eq!(seen, "4MB");
}

async fn an_advisory_lock_taken_in_dynamic_sql_does_not_follow_the_connection_to_another_tenant(
    on: On,
) {
    let seen = after_other_tenant_on_shared_connection(
        on,
        "DO $$ BEGIN EXECUTE 'SELECT pg_' || 'advisory_lock(4242)'; END $$",
        "SELECT count(*)::text FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
    )
    .await;
    assert_eq!(seen, "0");
}

#[tokio::test]
async fn a_listen_made_in_dynamic_sql_does_not_follow_the_connection_to_another_tenant() {
    // The primary only: a hot standby refuses LISTEN.
    let seen = after_other_tenant_on_shared_connection(
        On::Primary,
        "DO $$ BEGIN EXECUTE 'LIST' || 'EN hooli_events'; END $$",
        "SELECT count(*)::text FROM pg_listening_channels()",
    )
    .await;
    assert_eq!(seen, "0");
}

async fn equal_statement_names_in_two_row_tenants_on_one_connection_keep_their_own_queries(on: On) {
    let f = fixture();
    let addr = one_shared_connection(on, PoolMode::Transaction).await;
    let hooli = f.tenant_at(addr, "hooli").await;
    let pied = f.tenant_at(addr, "piedpiper").await;
    // Each client's first statement: both are named "s0" by the driver.
    let h = hooli.prepare("SELECT 'hooli:' || $1::text").await.unwrap();
    let p = pied.prepare("SELECT 'pied:' || $1::text").await.unwrap();
    for i in 0..5 {
        let n = i.to_string();
        let a: String = hooli.query_one(&h, &[&n]).await.unwrap().get(0);
        let b: String = pied.query_one(&p, &[&n]).await.unwrap().get(0);
        assert_eq!(a, format!("hooli:{i}"));
        assert_eq!(b, format!("pied:{i}"));
    }
}

#[tokio::test]
async fn a_schema_tenant_cannot_read_another_tenants_schema() {
    let c = fixture().tenant("initech").await;
    let e = c
        .query("SELECT owner FROM umbrella.accounts", &[])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("42501"));
}

#[tokio::test]
async fn a_search_path_naming_another_tenants_schema_finds_nothing_there() {
    let c = fixture().tenant("initech").await;
    c.batch_execute("BEGIN; SET LOCAL search_path = umbrella")
        .await
        .unwrap();
    let e = c
        .query("SELECT owner FROM accounts", &[])
        .await
        .unwrap_err();
    // umbrella is skipped (no USAGE): the table is not found at all.
    assert_eq!(sqlstate(&e).as_deref(), Some("42P01"));
    c.batch_execute("ROLLBACK").await.unwrap();
}

#[tokio::test]
async fn a_schema_tenants_search_path_change_lasts_only_to_the_end_of_its_transaction() {
    let c = fixture().tenant("initech").await;
    c.batch_execute("SET search_path = public").await.unwrap();
    for _ in 0..3 {
        let path: String = c
            .query_one("SELECT current_setting('search_path')", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(path, "\"initech\", public");
    }
}

/// The `search_path` `c` sees in its next transaction.
async fn search_path(c: &Client) -> String {
    c.query_one("SELECT current_setting('search_path')", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_search_path_changed_by_set_config_lasts_only_to_the_end_of_its_transaction() {
    // Tries: change the pinned setting where no statement parser looks.
    let c = fixture().tenant("initech").await;
    c.batch_execute("SELECT set_config('search_path', 'public', false)")
        .await
        .unwrap();
    assert_eq!(search_path(&c).await, "\"initech\", public");
}

#[tokio::test]
async fn a_search_path_changed_by_dynamic_sql_lasts_only_to_the_end_of_its_transaction() {
    // Tries: SET built at run time inside a DO block.
    let c = fixture().tenant("initech").await;
    c.batch_execute("DO $$ BEGIN EXECUTE 'SET search_path = ' || 'public'; END $$")
        .await
        .unwrap();
    assert_eq!(search_path(&c).await, "\"initech\", public");
}

#[tokio::test]
async fn a_prepared_statement_that_changes_the_search_path_is_undone_after_each_run() {
    // Tries: hide set_config in a named statement prepared once and run later.
    let c = fixture().tenant("umbrella").await;
    let stmt = c
        .prepare("SELECT set_config('search_path', $1, false)")
        .await
        .unwrap();
    for _ in 0..2 {
        c.query(&stmt, &[&"public"]).await.unwrap();
        assert_eq!(search_path(&c).await, "\"umbrella\", public");
    }
}

#[tokio::test]
async fn other_settings_of_a_schema_tenant_still_last_for_its_session() {
    let c = fixture().tenant("umbrella").await;
    c.batch_execute("SET search_path = public; SET statement_timeout = '7s'")
        .await
        .unwrap();
    let row = c
        .query_one(
            "SELECT current_setting('statement_timeout'), current_setting('search_path')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "7s");
    assert_eq!(row.get::<_, String>(1), "\"umbrella\", public");
}

#[tokio::test]
async fn a_flood_of_wrong_secrets_for_a_clients_own_key_cancels_nothing() {
    let f = fixture();
    let mut victim = RawClient::login(f.proxy, "app.piedpiper", "piedpiper").await;
    let (pid, secret) = victim.key.expect("BackendKeyData");
    let bystander = f.tenant("hooli").await;
    let sleeping = tokio::spawn(async move {
        victim
            .query("SELECT pg_sleep(1), 'finished'")
            .await
            .iter()
            .map(|(tag, _)| *tag)
            .collect::<Vec<u8>>()
    });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let proxy = f.proxy;
    let flood = tokio::spawn(async move {
        for i in 0..500u32 {
            let wrong = secret.wrapping_add(1 + i);
            let mut raw = RawClient::connect(proxy).await;
            raw.send(&cancel_packet(pid, wrong)).await;
        }
    });
    // Everyone else keeps being served while the flood runs.
    for _ in 0..20 {
        assert_eq!(visible_owners(&bystander).await, ["Hal", "Hana"]);
    }
    flood.await.unwrap();
    let tags = sleeping.await.unwrap();
    assert!(tags.contains(&b'D'), "the query returned its row: {tags:?}");
    assert!(!tags.contains(&b'E'), "and was not cancelled: {tags:?}");
}

#[tokio::test]
async fn a_database_tenants_role_can_connect_to_no_other_tenants_database() {
    let f = fixture();
    let admin = f.direct(0, "postgres").await;
    // The server's own maintenance databases are open to every role by PostgreSQL's default
    // and hold no tenant data.
    let rows = admin
        .query(
            "SELECT datname FROM pg_database
              WHERE has_database_privilege('acme_app', datname, 'CONNECT')
                AND datname NOT IN ('postgres', 'template0', 'template1') ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    let databases: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(databases, ["acme"]);
}

#[tokio::test]
async fn defaults_a_row_tenant_sets_on_the_shared_login_role_reach_no_other_tenant() {
    // Tries: ALTER ROLE CURRENT_USER SET ..., which any role may do to itself and which every
    // later session of the role would start with, whichever tenant it serves.
    let f = fixture();
    // The standby replays these defaults, and refuses row-tier logins until the primary's
    // clearing has reached it.
    let _defaults = crate::support::ROLE_DEFAULTS.write().await;
    let mallory = f.tenant("mallory").await;
    mallory
        .batch_execute(
            "ALTER ROLE CURRENT_USER SET statement_timeout = '1ms';
             ALTER ROLE CURRENT_USER SET idle_session_timeout = '1ms';
             ALTER ROLE CURRENT_USER SET default_transaction_read_only = on",
        )
        .await
        .unwrap();
    // A proxy of its own opens new server connections, which start with the role's defaults.
    let addr = f.extra_proxy(|_| {}).await;
    let hooli = f.tenant_at(addr, "hooli").await;
    let row = hooli
        .query_one(
            "SELECT current_setting('statement_timeout'), current_setting('default_transaction_read_only'),
                    current_setting('idle_session_timeout')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "0");
    assert_eq!(row.get::<_, String>(1), "off");
    assert_eq!(row.get::<_, String>(2), "0");
    let admin = f.direct(0, "row_tenants").await;
    let left: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole
              WHERE r.rolname = (SELECT usename FROM pg_stat_activity
                                  WHERE datname = 'row_tenants' AND usename <> 'postgres' LIMIT 1)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the role's defaults were cleared");
    let standby = f.direct_standby("row_tenants").await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let replayed: bool = standby
            .query_one(
                "SELECT NOT EXISTS (SELECT 1 FROM pg_db_role_setting s
                    JOIN pg_roles r ON r.oid = s.setrole WHERE r.rolname = 'row_app')",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if replayed {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the standby replays the clearing"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn defaults_on_the_shared_login_role_refuse_a_standby_login_with_the_reason() {
    // A hot standby cannot clear them: its row-tier logins are refused, never served a
    // session that started with another tenant's defaults. A login role of this test's own
    // (with the shared role's rights), so no other test's primary login clears them first.
    let f = fixture();
    let primary = f.direct(0, "row_tenants").await;
    primary
        .batch_execute(
            "DROP ROLE IF EXISTS row_app_defaults;
             CREATE ROLE row_app_defaults LOGIN PASSWORD 'defaults-pw' IN ROLE row_app;
             ALTER ROLE row_app_defaults SET statement_timeout = '1ms';",
        )
        .await
        .unwrap();
    let standby = f.direct_standby("row_tenants").await;
    let mut replayed = false;
    for _ in 0..600 {
        replayed = standby
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_db_role_setting s JOIN pg_roles r
                    ON r.oid = s.setrole WHERE r.rolname = 'row_app_defaults')",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if replayed {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(replayed, "the standby replays the role and its defaults");
    let addr = On::Standby
        .extra_proxy(|c| {
            for t in c.tenants.iter_mut().filter(|t| t.tier == Tier::Row) {
                for u in t.users.iter_mut() {
                    u.backend_user = "row_app_defaults".into();
                    u.backend_password = Some(pgtenant::secret::Secret::new("defaults-pw"));
                }
            }
        })
        .await;
    let refused = f.connect_str(&f.url_at(addr, "hooli")).await;
    primary
        .batch_execute("DROP ROLE row_app_defaults")
        .await
        .unwrap();
    let Err(e) = refused else {
        panic!("a standby login started with the role's defaults");
    };
    let message = crate::support::pg_error(&e);
    assert!(message.contains("hot standby cannot clear"), "{message}");
}

async fn a_row_tenant_uses_no_more_of_the_shared_connections_than_its_pool_size(on: On) {
    // A noisy neighbour: hooli may hold one of the group's four connections at a time.
    let f = fixture();
    let addr = on
        .extra_proxy(|c| {
            c.pool.default_size = 4;
            c.pool.query_wait_timeout = 1;
            for t in c.tenants.iter_mut().filter(|t| t.id == "hooli") {
                t.pool_size = Some(1);
            }
        })
        .await;
    let first = f.tenant_at(addr, "hooli").await;
    let second = f.tenant_at(addr, "hooli").await;
    let other = f.tenant_at(addr, "piedpiper").await;
    // Its neighbour has a connection open already (opening one can take longer than the
    // 1 s wait on a loaded machine).
    assert_eq!(visible_owners(&other).await, ["Pia", "Pete"]);
    first.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let e = second.batch_execute("SELECT 1").await.unwrap_err();
    assert!(
        crate::support::pg_error(&e).contains("timed out"),
        "{}",
        crate::support::pg_error(&e)
    );
    assert_eq!(visible_owners(&other).await, ["Pia", "Pete"]);
    first.batch_execute("COMMIT").await.unwrap();
    // The refusal failed that request only: the client goes on once a share is free.
    assert_eq!(visible_owners(&second).await, ["Hal", "Hana"]);
}

async fn a_row_connection_reset_after_a_client_left_mid_transaction_is_entered_again(on: On) {
    let f = fixture();
    // One server connection for the row group, so the next client gets the reset one.
    let addr = with_pool_size(on, 1).await;
    {
        let left = f.tenant_at(addr, "hooli").await;
        left.batch_execute("BEGIN; SELECT 1").await.expect("begin");
        // Dropped inside its transaction: the proxy rolls back and resets the connection.
    }
    let next = f.tenant_at(addr, "hooli").await;
    let tenant: String = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        next.query_one("SELECT pgtenant_rls.tenant()", &[]),
    )
    .await
    .expect("in time")
    .expect("the context is entered again after the reset")
    .get(0);
    assert_eq!(tenant, "hooli");
}

/// Listens on `channel` from dynamic SQL (where no parser sees a LISTEN), lets `notifier`
/// NOTIFY on it, and returns whether any NotificationResponse reached the listener.
async fn hears_through_dynamic_listen(listener: &str, notifier: &str, channel: &str) -> bool {
    let f = fixture();
    let addr = f.session_proxy().await;
    let mut l = RawClient::login(addr, &format!("app.{listener}"), listener).await;
    l.query(&format!(
        "DO $$ BEGIN EXECUTE 'LIST' || 'EN {channel}'; END $$"
    ))
    .await;
    let listening = l
        .query("SELECT count(*) FROM pg_listening_channels()")
        .await;
    assert!(
        listening
            .iter()
            .any(|(t, b)| *t == b'D' && b.ends_with(b"1")),
        "the LISTEN is in force on the listener's server connection"
    );
    f.tenant_at(addr, notifier)
        .await
        .batch_execute(&format!("NOTIFY {channel}, '{notifier} secret'"))
        .await
        .expect("notify");
    let replies = l.query("SELECT pg_sleep(0.3)").await;
    replies.iter().any(|(t, _)| *t == b'A')
}

#[tokio::test]
async fn a_schema_tenant_hears_no_notify_of_another_tenant_sharing_its_database() {
    assert!(!hears_through_dynamic_listen("umbrella", "initech", "schema_leak").await);
}

#[tokio::test]
async fn a_row_tenant_hears_no_notify_of_another_row_tenant() {
    assert!(!hears_through_dynamic_listen("piedpiper", "hooli", "row_leak").await);
}

#[tokio::test]
async fn a_database_tenant_still_hears_its_own_notify() {
    assert!(hears_through_dynamic_listen("acme", "acme", "own_events").await);
}

#[tokio::test]
async fn listen_by_a_tenant_sharing_its_database_is_refused_with_the_reason() {
    let c = fixture().tenant("initech").await;
    let e = c
        .batch_execute("LISTEN jobs")
        .await
        .expect_err("refused in transaction mode");
    assert_eq!(sqlstate(&e).as_deref(), Some("0A000"));
    let db = e
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default();
    assert!(db.contains("database-wide"), "{db}");
}
