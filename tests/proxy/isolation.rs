//! Row-tier isolation against a hostile client: whatever SQL it sends, a row tenant sees only
//! its own rows, and tampering with its context makes it see nothing, never another tenant's.

use crate::support::{fixture, sqlstate};
use tokio_postgres::Client;

/// Owners of the rows the client can see in the shared `accounts` table.
async fn visible_owners(c: &Client) -> Vec<String> {
    c.query("SELECT owner FROM accounts ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn setting_the_tenant_setting_does_not_change_the_rows_a_row_tenant_sees() {
    let c = fixture().tenant("hooli").await;
    c.batch_execute("SET pgtenant.tenant_id = 'piedpiper'")
        .await
        .unwrap();
    assert_eq!(visible_owners(&c).await, ["Hal", "Hana"]);
}

#[tokio::test]
async fn set_config_of_the_tenant_setting_does_not_change_the_rows_a_row_tenant_sees() {
    let c = fixture().tenant("hooli").await;
    c.batch_execute("BEGIN; SELECT set_config('pgtenant.tenant_id', 'piedpiper', true)")
        .await
        .unwrap();
    assert_eq!(visible_owners(&c).await, ["Hal", "Hana"]);
    c.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test]
async fn dynamic_sql_cannot_switch_a_row_tenants_context() {
    let c = fixture().tenant("hooli").await;
    c.batch_execute(
        "BEGIN;
         DO $$ BEGIN EXECUTE 'SET LOCAL pgtenant.tenant_id = ' || quote_literal('piedpiper'); END $$;",
    )
    .await
    .unwrap();
    assert_eq!(visible_owners(&c).await, ["Hal", "Hana"]);
    c.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test]
async fn reset_all_and_discard_all_keep_a_row_tenants_context() {
    let c = fixture().tenant("piedpiper").await;
    c.batch_execute("RESET ALL").await.unwrap();
    assert_eq!(visible_owners(&c).await, ["Pia", "Pete"]);
    c.batch_execute("DISCARD ALL").await.unwrap();
    assert_eq!(visible_owners(&c).await, ["Pia", "Pete"]);
}

#[tokio::test]
async fn a_tampered_binding_nonce_shows_no_rows() {
    let c = fixture().tenant("mallory").await;
    c.batch_execute("BEGIN; SET LOCAL pgtenant.binding = 'guessed'")
        .await
        .unwrap();
    assert!(visible_owners(&c).await.is_empty());
    c.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test]
async fn a_forged_proof_binds_nothing_and_leaves_the_session_seeing_no_rows() {
    let c = fixture().tenant("mallory").await;
    c.batch_execute("BEGIN").await.unwrap();
    let bound: bool = c
        .query_one(
            "SELECT pgtenant_rls.enter('hooli', 9999999999, sha256('guess'::bytea))",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!bound);
    assert!(visible_owners(&c).await.is_empty());
    assert_eq!(
        c.query_one("SELECT pgtenant_rls.tenant()", &[])
            .await
            .unwrap()
            .get::<_, Option<String>>(0),
        None
    );
    c.batch_execute("ROLLBACK").await.unwrap();
}

#[tokio::test]
async fn the_row_key_is_not_readable_by_tenants() {
    let c = fixture().tenant("hooli").await;
    let e = c
        .query("SELECT * FROM pgtenant_rls.secret", &[])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("42501"));
}

#[tokio::test]
async fn a_session_sees_only_its_own_binding() {
    let c = fixture().tenant("piedpiper").await;
    let rows = c
        .query("SELECT tenant FROM pgtenant_rls.binding", &[])
        .await
        .unwrap();
    let tenants: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(tenants, ["piedpiper"]);
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
async fn a_row_tenant_cannot_take_another_identity() {
    let c = fixture().tenant("hooli").await;
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

#[tokio::test]
async fn the_proof_travels_as_a_parameter_never_in_statement_text() {
    let f = fixture();
    // Idle connections kept open by the pool: their last statement is the binding.
    let addr = f
        .extra_proxy(|c| {
            for t in c.tenants.iter_mut().filter(|t| t.id == "piedpiper") {
                t.min_idle = Some(2);
            }
        })
        .await;
    let _c = f.tenant_at(addr, "piedpiper").await;
    let admin = f.direct(0, "row_tenants").await;
    let mut texts: Vec<String> = Vec::new();
    for _ in 0..100 {
        texts = admin
            .query(
                "SELECT query FROM pg_stat_activity WHERE query LIKE '%pgtenant_rls.enter%'
                   AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        if !texts.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(!texts.is_empty(), "an idle bound backend shows its binding");
    for t in texts {
        assert!(
            t.contains("$3") && !t.contains("decode('"),
            "parameters stay parameters: {t}"
        );
    }
}
