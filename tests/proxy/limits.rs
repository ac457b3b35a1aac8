//! Caps on settings (`limits` of a tenant): a client may lower a capped setting, but a raise,
//! by SET or by set_config() the proxy cannot see, lasts at most to the end of its transaction,
//! in every tier and both pool modes.

use crate::support::fixture;
use pgtenant::config::PoolMode;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use tokio_postgres::Client;

/// A proxy on which every tenant caps statement_timeout at 5s and work_mem at 8MB.
async fn capped(mode: PoolMode) -> SocketAddr {
    fixture()
        .extra_proxy(|c| {
            for t in c.tenants.iter_mut() {
                t.pool_mode = Some(mode);
                t.limits = BTreeMap::from([
                    ("statement_timeout".to_string(), "5s".to_string()),
                    ("work_mem".to_string(), "8MB".to_string()),
                ]);
            }
        })
        .await
}

async fn show(c: &Client, name: &str) -> String {
    c.query_one(&format!("SHOW {name}"), &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_setting_above_its_cap_starts_at_the_cap_in_every_tier() {
    let addr = capped(PoolMode::Transaction).await;
    for tenant in ["acme", "initech", "hooli"] {
        let c = fixture().tenant_at(addr, tenant).await;
        // The server's default statement_timeout is 0 (none): above any cap.
        assert_eq!(show(&c, "statement_timeout").await, "5s", "{tenant}");
        // A cap only ever lowers: the default 4MB is below it.
        assert_eq!(show(&c, "work_mem").await, "4MB", "{tenant}");
    }
}

#[tokio::test]
async fn raising_a_capped_setting_lasts_only_to_the_end_of_the_transaction() {
    let c = fixture()
        .tenant_at(capped(PoolMode::Transaction).await, "initech")
        .await;
    c.batch_execute("BEGIN; SET work_mem = '1GB'")
        .await
        .unwrap();
    assert_eq!(show(&c, "work_mem").await, "1GB");
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(show(&c, "work_mem").await, "8MB");
    // A session-level SET is a transaction of its own.
    c.batch_execute("SET statement_timeout = 0").await.unwrap();
    assert_eq!(show(&c, "statement_timeout").await, "5s");
}

#[tokio::test]
async fn set_config_cannot_raise_a_capped_setting_past_its_transaction() {
    // Tries: raise the cap where no statement parser looks.
    let c = fixture()
        .tenant_at(capped(PoolMode::Transaction).await, "hooli")
        .await;
    c.batch_execute(
        "SELECT set_config('statement_timeout', '0', false);
         DO $$ BEGIN EXECUTE 'SET work_mem = ''2GB'''; END $$;",
    )
    .await
    .unwrap();
    assert_eq!(show(&c, "statement_timeout").await, "5s");
    assert_eq!(show(&c, "work_mem").await, "8MB");
}

#[tokio::test]
async fn a_client_may_lower_a_capped_setting_and_keep_it() {
    let c = fixture()
        .tenant_at(capped(PoolMode::Transaction).await, "acme")
        .await;
    c.batch_execute("SET work_mem = '1MB'").await.unwrap();
    assert_eq!(show(&c, "work_mem").await, "1MB");
    assert_eq!(show(&c, "work_mem").await, "1MB");
}

#[tokio::test]
async fn in_session_mode_a_raise_also_ends_with_its_transaction() {
    let c = fixture()
        .tenant_at(capped(PoolMode::Session).await, "initech")
        .await;
    assert_eq!(show(&c, "statement_timeout").await, "5s");
    c.batch_execute("BEGIN; SET statement_timeout = '1h'")
        .await
        .unwrap();
    assert_eq!(show(&c, "statement_timeout").await, "1h");
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(show(&c, "statement_timeout").await, "5s");
    c.batch_execute("SELECT set_config('work_mem', '1GB', false)")
        .await
        .unwrap();
    assert_eq!(show(&c, "work_mem").await, "8MB");
}

#[tokio::test]
async fn a_capped_statement_timeout_stops_a_long_query() {
    // What the cap is for: a tenant's runaway query cannot hold a server connection.
    let c = fixture()
        .tenant_at(
            fixture()
                .extra_proxy(|c| {
                    for t in c.tenants.iter_mut() {
                        t.limits = BTreeMap::from([(
                            "statement_timeout".to_string(),
                            "200ms".to_string(),
                        )]);
                    }
                })
                .await,
            "acme",
        )
        .await;
    c.batch_execute("SET statement_timeout = 0").await.unwrap();
    let e = c.batch_execute("SELECT pg_sleep(5)").await.unwrap_err();
    assert_eq!(crate::support::sqlstate(&e).as_deref(), Some("57014"));
    assert_eq!(show(&c, "statement_timeout").await, "200ms");
}
