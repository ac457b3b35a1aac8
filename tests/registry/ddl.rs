//! DDL for applications, by choice (`tenant update ID --user NAME --ddl`): an application's own
//! migrations (ORMs) through its normal connection, in the tenant's own place only.

use crate::support::*;

/// What an ORM's first migrations do: a table with a serial key, an index, a column added
/// later, a sequence of its own.
const MIGRATION: &str = "CREATE TABLE orders (id bigserial PRIMARY KEY, item text NOT NULL);
     CREATE INDEX orders_item ON orders (item);
     ALTER TABLE orders ADD COLUMN qty int NOT NULL DEFAULT 1;
     CREATE SEQUENCE invoice_no;";

/// A registry with tenant `id` of `tier` in pool mode `mode` and a DDL user `migrator`.
async fn tenant_with_ddl_user(id: &str, tier: &str, mode: &str) -> Reg {
    let reg = fixture().registry("ddl").await;
    reg.create(id, tier);
    let out = reg.cli(&["tenant", "update", id, "--pool-mode", mode]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = reg.cli_stdin(
        &["tenant", "update", id, "--user", "migrator", "--ddl"],
        PASSWORD,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    reg
}

/// The migration runs as the DDL user, then the tenant's ordinary user works with what it made.
async fn a_migration_through_the_proxy_is_used_by_the_dml_user(id: &str, tier: &str, mode: &str) {
    let reg = tenant_with_ddl_user(id, tier, mode).await;
    let proxy = fixture().proxy(reg.config.clone());
    let migrator = connect_as(proxy.addr, "migrator", id).await;
    migrator.batch_execute(MIGRATION).await.expect("migration");
    let app = connect_as(proxy.addr, "app", id).await;
    app.batch_execute("INSERT INTO orders (item) VALUES ('bolt'), ('nut')")
        .await
        .expect("the ordinary user writes the new table");
    let row = app
        .query_one(
            "SELECT count(*), max(qty), nextval('invoice_no') FROM orders",
            &[],
        )
        .await
        .expect("and reads it, and uses the new sequence");
    assert_eq!(row.get::<_, i64>(0), 2);
    assert_eq!(row.get::<_, i32>(1), 1);
    assert_eq!(row.get::<_, i64>(2), 1);
    // The platform's own tables stay usable by the DDL user too.
    migrator
        .query_one("SELECT count(*) FROM accounts", &[])
        .await
        .expect("the DDL user reads the platform's tables");
}

#[tokio::test]
async fn a_database_tenants_migration_in_transaction_mode_is_used_by_its_dml_user() {
    a_migration_through_the_proxy_is_used_by_the_dml_user("ddl_db_tx", "database", "transaction")
        .await;
}

#[tokio::test]
async fn a_database_tenants_migration_in_session_mode_is_used_by_its_dml_user() {
    a_migration_through_the_proxy_is_used_by_the_dml_user("ddl_db_sess", "database", "session")
        .await;
}

#[tokio::test]
async fn a_schema_tenants_migration_in_transaction_mode_is_used_by_its_dml_user() {
    a_migration_through_the_proxy_is_used_by_the_dml_user("ddl_sch_tx", "schema", "transaction")
        .await;
}

#[tokio::test]
async fn a_schema_tenants_migration_in_session_mode_is_used_by_its_dml_user() {
    a_migration_through_the_proxy_is_used_by_the_dml_user("ddl_sch_sess", "schema", "session")
        .await;
}

#[tokio::test]
async fn a_schema_tenants_ddl_user_creates_nothing_in_public_or_another_tenants_schema() {
    let reg = tenant_with_ddl_user("ddl_own", "schema", "transaction").await;
    reg.create("ddl_other", "schema");
    let other = reg.names("ddl_other").await.schema.expect("a schema");
    let proxy = fixture().proxy(reg.config.clone());
    let migrator = connect_as(proxy.addr, "migrator", "ddl_own").await;
    for sql in [
        "CREATE TABLE public.intruder (x int)".to_string(),
        format!("CREATE TABLE {other}.intruder (x int)"),
        format!("ALTER TABLE {other}.accounts ADD COLUMN x int"),
    ] {
        let sql = sql.as_str();
        let e = migrator.batch_execute(sql).await.unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{sql}: {e:?}");
    }
}

#[tokio::test]
async fn tables_a_ddl_user_creates_are_invisible_to_another_tenant() {
    let reg = tenant_with_ddl_user("ddl_maker", "schema", "transaction").await;
    reg.create("ddl_peer", "schema");
    let proxy = fixture().proxy(reg.config.clone());
    connect_as(proxy.addr, "migrator", "ddl_maker")
        .await
        .batch_execute(MIGRATION)
        .await
        .expect("migration");
    let maker = reg.names("ddl_maker").await.schema.expect("a schema");
    let peer = connect_as(proxy.addr, "app", "ddl_peer").await;
    let e = peer
        .query_one(&format!("SELECT count(*) FROM {maker}.orders"), &[])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{e:?}");
    let e = peer
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .unwrap_err();
    assert_eq!(
        sqlstate(&e).as_deref(),
        Some("42P01"),
        "not on its search_path: {e:?}"
    );
}

#[tokio::test]
async fn a_row_tenant_is_refused_ddl_with_the_reason() {
    let reg = fixture().registry("ddl").await;
    reg.create("ddl_row", "row");
    let out = reg.cli_stdin(
        &["tenant", "update", "ddl_row", "--user", "migrator", "--ddl"],
        PASSWORD,
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("row tier") && stderr(&out).contains("pgtenant migrate"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn deleting_a_tenant_drops_its_ddl_role() {
    let reg = tenant_with_ddl_user("ddl_gone", "schema", "transaction").await;
    let names = reg.names("ddl_gone").await;
    let ddl = names.roles.iter().find(|r| r.ends_with("_ddl")).cloned();
    let ddl = ddl.expect("a DDL role recorded");
    let admin = fixture().admin("postgres").await;
    let role_exists = |r: String| {
        let admin = &admin;
        async move {
            admin
                .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&r])
                .await
                .unwrap()
                .is_some()
        }
    };
    assert!(role_exists(ddl.clone()).await);
    let out = reg.cli(&["tenant", "delete", "ddl_gone"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        !role_exists(ddl).await,
        "the DDL role is dropped with its tenant"
    );
}

#[tokio::test]
async fn a_tenant_created_with_ddl_users_can_run_its_migration_at_once() {
    let reg = fixture().registry("ddl").await;
    let out = reg.cli_stdin(
        &[
            "tenant",
            "create",
            "ddl_born",
            "--tier",
            "database",
            "--server",
            "main",
            "--user",
            "migrator",
            "--ddl",
            "--password-stdin",
        ],
        PASSWORD,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let proxy = fixture().proxy(reg.config.clone());
    connect_as(proxy.addr, "migrator", "ddl_born")
        .await
        .batch_execute(MIGRATION)
        .await
        .expect("migration");
}
