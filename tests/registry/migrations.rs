//! `pgtenant migrate` across many tenants of every tier.

use pgtenant::config::Tier;
use pgtenant::tenancy::migrate::load_dir;
use pgtenant::tenancy::provision::{self, CreateRequest};
use pgtenant::tenancy::store::TenantSettings;

use crate::support::*;

#[tokio::test]
async fn migrate_applies_to_fifty_tenants_and_reports_the_one_that_fails() {
    let f = fixture();
    let reg = f.registry("mig").await;
    let store = reg.store().await;
    let migs = load_dir(&reg.path("migrations")).unwrap();
    let mut ids = Vec::new();
    for i in 0..50 {
        let tier = match i % 5 {
            0 => Tier::Database,
            1 | 2 => Tier::Schema,
            _ => Tier::Row,
        };
        let id = format!("m{i:02}");
        let req = CreateRequest {
            id: id.clone(),
            tier,
            server: None,
            settings: TenantSettings::default(),
            users: vec![("app".into(), pgtenant::credentials::hash_password(PASSWORD))],
        };
        provision::create(&store, &req, &migs)
            .await
            .expect("create");
        ids.push((id, tier));
    }
    // One schema tenant already has what V2 adds, so V2 fails there.
    let r = reg.config.registry.as_ref().unwrap();
    let m01 = reg.names("m01").await.schema.expect("a schema");
    f.admin(&r.schema_database)
        .await
        .batch_execute(&format!("CREATE TABLE {m01}.ledger (x int)"))
        .await
        .unwrap();
    std::fs::write(
        reg.path("migrations/V2__ledger.sql"),
        "CREATE TABLE ledger (id bigserial PRIMARY KEY, tenant_id text, amount numeric NOT NULL);",
    )
    .unwrap();

    let plan = reg.cli(&["migrate", "--dry-run", "--json"]);
    assert!(plan.status.success(), "{}", stderr(&plan));
    let v: serde_json::Value = serde_json::from_str(&stdout(&plan)).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 50);
    assert!(v
        .as_array()
        .unwrap()
        .iter()
        .all(|o| o["versions"] == serde_json::json!([2])));
    let n: i64 = store
        .client
        .query_one(
            "SELECT count(*) FROM pgtenant.migrations WHERE version = 2",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "a dry run changes nothing");

    let out = reg.cli(&["migrate", "--concurrency", "6"]);
    assert_eq!(out.status.code(), Some(1), "a failed tenant fails the run");
    let table = stdout(&out);
    assert!(table.contains("50 tenants, 1 failed"), "{table}");
    let failed: Vec<&str> = table.lines().filter(|l| l.contains("FAILED")).collect();
    assert_eq!(failed.len(), 1, "{table}");
    assert!(
        failed[0].contains("m01") && failed[0].contains("already exists"),
        "{table}"
    );

    let proxy = f.proxy(reg.config.clone());
    for (id, _) in &ids {
        let c = connect(proxy.addr, id).await.expect("connect");
        let has = c.query("SELECT 1 FROM ledger LIMIT 1", &[]).await;
        if id == "m01" {
            let n: i64 = store
                .client
                .query_one(
                    "SELECT max(version) FROM pgtenant.migrations WHERE tenant_id = 'm01'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(n, 1, "the failed tenant stays at V1");
        } else {
            has.unwrap_or_else(|e| panic!("{id} has the V2 table: {e}"));
        }
    }
    // Row tenants share one place: V2 ran there once.
    let row_history: i64 = f
        .admin(&r.row_database)
        .await
        .query_one(
            "SELECT count(*) FROM pgtenant_migrations WHERE version = 2",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(row_history, 1);
}

#[tokio::test]
async fn a_second_migrate_run_is_refused_while_one_holds_the_lock() {
    let f = fixture();
    let reg = f.registry("miglock").await;
    let store = reg.store().await;
    store
        .client
        .query_one("SELECT pg_advisory_lock(hashtext('pgtenant migrate'))", &[])
        .await
        .unwrap();
    let out = reg.cli(&["migrate"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("another `pgtenant migrate` is running"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn a_migration_changed_after_it_ran_is_reported() {
    let f = fixture();
    let reg = f.registry("migsum").await;
    reg.create("migsum-a", "database");
    std::fs::write(
        reg.path("migrations/V1__accounts.sql"),
        format!("{V1}\n-- edited"),
    )
    .unwrap();
    let out = reg.cli(&["migrate"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("changed after it was applied"),
        "{}",
        stdout(&out)
    );
}
