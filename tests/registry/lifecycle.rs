//! `tenant create` provisions for real in each tier, `tenant delete` removes every trace, a
//! create killed halfway completes on retry, and `tenant dump` exports one tenant only.

use std::time::Duration;

use crate::support::*;

async fn exists(f: &Fixture, sql: &str, db: &str) -> bool {
    f.admin(db)
        .await
        .query_opt(sql, &[])
        .await
        .unwrap()
        .is_some()
}

async fn create_connect_delete(tier: &str, id: &str) {
    let f = fixture();
    let reg = f.registry(&id.replace('-', "")).await;
    reg.create(id, tier);
    let proxy = f.proxy(reg.config.clone());
    let c = connect(proxy.addr, id)
        .await
        .expect("connect through the proxy");
    c.execute(
        "INSERT INTO accounts (owner) VALUES ('first customer')",
        &[],
    )
    .await
    .expect("the tenant's role may write its tables");
    let n: i64 = c
        .query_one("SELECT count(*) FROM accounts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    // Least privilege: no DDL, no migration history.
    let e = c
        .batch_execute("CREATE TABLE sneaky (x int)")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{e:?}");
    let e = c
        .batch_execute("DELETE FROM pgtenant_migrations")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{e:?}");
    drop(c);

    let names = reg.names(id).await;
    // Row tenants share their database's role; the last one to go takes it along.
    let role = names.role.clone();
    if tier == "row" {
        let row_database = &reg.config.registry.as_ref().unwrap().row_database;
        assert_eq!(role, format!("{row_database}.app"));
    }
    let role_sql = format!("SELECT 1 FROM pg_roles WHERE rolname = '{role}'");
    assert!(exists(f, &role_sql, "postgres").await);
    let out = reg.cli(&["tenant", "delete", id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        !exists(
            f,
            &format!("SELECT 1 FROM pg_roles WHERE rolname = '{role}'"),
            "postgres"
        )
        .await
    );
    let store = reg.store().await;
    assert!(store.tenant_record(id).await.unwrap().is_none());
    let r = reg.config.registry.as_ref().unwrap();
    match tier {
        "database" => assert!(
            !exists(
                f,
                &format!(
                    "SELECT 1 FROM pg_database WHERE datname = '{}'",
                    names.database
                ),
                "postgres"
            )
            .await
        ),
        "schema" => assert!(
            !exists(
                f,
                &format!(
                    "SELECT 1 FROM pg_namespace WHERE nspname = '{}'",
                    names.schema.as_deref().unwrap_or_default()
                ),
                &r.schema_database
            )
            .await
        ),
        _ => {
            assert!(
                !exists(
                    f,
                    &format!("SELECT 1 FROM accounts WHERE tenant_id = '{id}'"),
                    &r.row_database
                )
                .await
            );
            assert!(
                !exists(
                    f,
                    &format!("SELECT 1 FROM pgtenant_tenants WHERE id = '{id}'"),
                    &r.row_database
                )
                .await
            );
        }
    }
    // A deleted tenant looks like any name that is not a tenant: a failed login.
    let e = refused_within(proxy.addr, id, "28P01", Duration::from_secs(3)).await;
    assert!(e.contains("password authentication failed"), "{e}");
}

#[tokio::test]
async fn database_tier_create_connect_delete() {
    create_connect_delete("database", "life-db").await;
}

#[tokio::test]
async fn schema_tier_create_connect_delete() {
    create_connect_delete("schema", "life-schema").await;
}

#[tokio::test]
async fn row_tier_create_connect_delete() {
    create_connect_delete("row", "life-row").await;
}

#[tokio::test]
async fn provisioned_row_tenants_can_neither_read_nor_signal_each_others_sessions() {
    let f = fixture();
    let reg = f.registry("peeks").await;
    reg.create("peeks-a", "row");
    let row_database = &reg.config.registry.as_ref().unwrap().row_database;
    let open = pgtenant::tenancy::row_context::open_session_peeks(&f.admin(row_database).await)
        .await
        .unwrap();
    assert!(open.is_empty(), "still open to PUBLIC: {open:?}");
    let proxy = f.proxy(reg.config.clone());
    let a = connect(proxy.addr, "peeks-a").await.unwrap();
    let e = a
        .simple_query("SELECT count(*) FROM pg_stat_activity")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{e:?}");
}

#[tokio::test]
async fn row_tier_tables_get_rls_policies_that_hide_other_tenants() {
    let f = fixture();
    let reg = f.registry("rls").await;
    reg.create("rls-a", "row");
    reg.create("rls-b", "row");
    let proxy = f.proxy(reg.config.clone());
    let a = connect(proxy.addr, "rls-a").await.unwrap();
    let b = connect(proxy.addr, "rls-b").await.unwrap();
    a.execute("INSERT INTO accounts (owner) VALUES ('only a')", &[])
        .await
        .unwrap();
    let n: i64 = b
        .query_one("SELECT count(*) FROM accounts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "b sees none of a's rows");
    let e = b
        .execute(
            "INSERT INTO accounts (tenant_id, owner) VALUES ('rls-a', 'forged')",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{e:?}");
}

#[tokio::test]
async fn delete_with_keep_data_only_suspends() {
    let f = fixture();
    let reg = f.registry("keep").await;
    reg.create("keep-a", "database");
    let out = reg.cli(&["tenant", "delete", "keep-a", "--keep-data"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let store = reg.store().await;
    assert_eq!(
        store.tenant_record("keep-a").await.unwrap().unwrap().status,
        "suspended"
    );
    let database = reg.names("keep-a").await.database;
    assert!(
        exists(
            f,
            &format!("SELECT 1 FROM pg_database WHERE datname = '{database}'"),
            "postgres"
        )
        .await
    );
}

#[tokio::test]
async fn a_create_killed_halfway_completes_when_run_again() {
    let f = fixture();
    let reg = f.registry("crash").await;
    let proxy = f.proxy(reg.config.clone());
    for (id, step) in [
        ("crash-a", "registered"),
        ("crash-b", "role"),
        ("crash-c", "storage"),
        ("crash-d", "migrated"),
    ] {
        let out = reg.cli_env(
            &[
                "tenant",
                "create",
                id,
                "--tier",
                "schema",
                "--password-stdin",
            ],
            Some(PASSWORD),
            &[("PGTENANT_CRASH_AFTER", step)],
        );
        assert!(!out.status.success(), "the create was killed after {step}");
        // Half a tenant is listed as such and never served.
        let list = reg.cli(&["tenant", "list"]);
        assert!(
            stdout(&list).contains("provisioning unfinished"),
            "{}",
            stdout(&list)
        );
        let e = connect(proxy.addr, id).await.unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("28P01"));
        reg.create(id, "schema");
        let c = connect_within(proxy.addr, id, Duration::from_secs(3))
            .await
            .expect("served after the retry");
        let n: i64 = c
            .query_one("SELECT count(*) FROM accounts", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0);
    }
}

#[tokio::test]
async fn creating_an_existing_tenant_is_refused() {
    let f = fixture();
    let reg = f.registry("dup").await;
    reg.create("dup-a", "row");
    let out = reg.cli_stdin(
        &[
            "tenant",
            "create",
            "dup-a",
            "--tier",
            "row",
            "--password-stdin",
        ],
        PASSWORD,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
}

#[tokio::test]
async fn list_json_lists_every_tenant() {
    let f = fixture();
    let reg = f.registry("list").await;
    reg.create("list-a", "row");
    reg.create("list-b", "schema");
    let out = reg.cli(&["tenant", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    let ids: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["list-a", "list-b"]);
    assert!(
        !stdout(&out).contains("pgt1$"),
        "no sealed values in the output"
    );
}

#[tokio::test]
async fn a_row_tier_dump_holds_the_tenants_rows_and_no_others() {
    let f = fixture();
    let reg = f.registry("rowdump").await;
    reg.create("rowdump-a", "row");
    reg.create("rowdump-b", "row");
    let proxy = f.proxy(reg.config.clone());
    let a = connect(proxy.addr, "rowdump-a").await.unwrap();
    let b = connect(proxy.addr, "rowdump-b").await.unwrap();
    a.execute("INSERT INTO accounts (owner) VALUES ('Alice of A')", &[])
        .await
        .unwrap();
    b.execute("INSERT INTO accounts (owner) VALUES ('Bob of B')", &[])
        .await
        .unwrap();
    let out = reg.cli(&["tenant", "dump", "rowdump-a"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("Alice of A"), "{text}");
    assert!(!text.contains("Bob of B"), "{text}");
    assert!(text.contains("COPY public.\"accounts\""), "{text}");

    // It restores with psql into an empty copy of the shared tables.
    let admin = f.admin("postgres").await;
    let target = format!("restore_{}", reg.name);
    admin
        .batch_execute(&format!("CREATE DATABASE {target}"))
        .await
        .unwrap();
    let t = f.admin(&target).await;
    t.batch_execute(V1).await.unwrap();
    let path = reg.path("a.sql");
    std::fs::write(&path, &text).unwrap();
    let psql = std::process::Command::new(f.bindir.join("psql"))
        .args([
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            &f.host,
            "-p",
            &f.port.to_string(),
            "-U",
            "postgres",
            "-d",
            &target,
            "-f",
        ])
        .arg(&path)
        .output()
        .unwrap();
    assert!(psql.status.success(), "{}", stderr(&psql));
    let owners: Vec<String> = t
        .query("SELECT owner FROM accounts", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(owners, vec!["Alice of A".to_string()]);
}

#[tokio::test]
async fn a_schema_tier_dump_holds_only_that_schema() {
    let f = fixture();
    let reg = f.registry("schdump").await;
    reg.create("schdump-a", "schema");
    reg.create("schdump-b", "schema");
    let proxy = f.proxy(reg.config.clone());
    let a = connect(proxy.addr, "schdump-a").await.unwrap();
    let b = connect(proxy.addr, "schdump-b").await.unwrap();
    a.execute("INSERT INTO accounts (owner) VALUES ('Ann')", &[])
        .await
        .unwrap();
    b.execute("INSERT INTO accounts (owner) VALUES ('Ben')", &[])
        .await
        .unwrap();
    let out = reg.cli(&["tenant", "dump", "schdump-a"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("Ann"));
    assert!(!text.contains("Ben"));
    assert!(!text.contains("schdump_b"));
}

#[tokio::test]
async fn a_replica_must_be_a_registered_server() {
    let f = fixture();
    let reg = f.registry("repl").await;
    reg.create("repl-a", "database");
    let out = reg.cli(&["tenant", "update", "repl-a", "--replica", "nowhere"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("replica \"nowhere\" is not a registered server"),
        "{}",
        stderr(&out)
    );
    let out = reg.cli(&["tenant", "update", "repl-a", "--replica", "main", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["replicas"], serde_json::json!(["main"]));
}

/// (current_user, backend pid) of one statement of `c`.
async fn role_and_pid(c: &tokio_postgres::Client) -> (String, i32) {
    let r = c
        .query_one("SELECT current_user::text, pg_backend_pid()", &[])
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

#[tokio::test]
async fn provisioned_row_tenants_share_one_login_role_and_its_server_connections() {
    let f = fixture();
    let reg = f.registry("rowshare").await;
    reg.create("rowshare-a", "row");
    reg.create("rowshare-b", "row");
    let mut config = reg.config.clone();
    config.pool.default_size = 1;
    let proxy = f.proxy(config);
    let a = connect(proxy.addr, "rowshare-a").await.unwrap();
    let b = connect(proxy.addr, "rowshare-b").await.unwrap();
    let (role_a, pid_a) = role_and_pid(&a).await;
    let (role_b, pid_b) = role_and_pid(&b).await;
    let row_database = &reg.config.registry.as_ref().unwrap().row_database;
    assert_eq!(role_a, format!("{row_database}.app"));
    assert_eq!(role_b, role_a);
    assert_eq!(pid_a, pid_b, "one server connection serves both tenants");
}

#[tokio::test]
async fn deleting_one_row_tenant_or_rotating_its_password_leaves_the_others_served() {
    let f = fixture();
    let reg = f.registry("rowkeep").await;
    reg.create("rowkeep-a", "row");
    reg.create("rowkeep-b", "row");
    reg.create("rowkeep-c", "row");
    let out = reg.cli(&["tenant", "update", "rowkeep-a", "--rotate-password"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = reg.cli(&["tenant", "delete", "rowkeep-a"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // A proxy started now opens new server connections with what the registry holds.
    let proxy = f.proxy(reg.config.clone());
    for t in ["rowkeep-b", "rowkeep-c"] {
        let c = connect(proxy.addr, t).await.unwrap();
        c.execute("INSERT INTO accounts (owner) VALUES ('still here')", &[])
            .await
            .unwrap_or_else(|e| panic!("{t}: {e:?}"));
    }
}

#[tokio::test]
async fn a_row_tenant_created_with_a_role_of_its_own_keeps_it_through_migrate() {
    // Row tenants created before roles were shared have `<id>_app`; recorded in the registry,
    // that role stays theirs.
    let f = fixture();
    let reg = f.registry("legacy").await;
    reg.create("legacy-a", "row");
    let row_database = reg.config.registry.as_ref().unwrap().row_database.clone();
    let admin = f.admin("postgres").await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE \"legacy-a_app\" LOGIN PASSWORD 'legacy-pw-9';
             GRANT CONNECT ON DATABASE \"{row_database}\" TO \"legacy-a_app\";"
        ))
        .await
        .unwrap();
    let store = reg.store().await;
    store
        .put_role("legacy-a", "legacy-a_app", "legacy-pw-9")
        .await
        .unwrap();
    store
        .put_user(
            "legacy-a",
            "app",
            &pgtenant::credentials::hash_password(PASSWORD),
            "legacy-a_app",
            false,
            Default::default(),
        )
        .await
        .unwrap();
    let out = reg.cli(&["migrate"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let proxy = f.proxy(reg.config.clone());
    let c = connect(proxy.addr, "legacy-a").await.unwrap();
    let (role, _) = role_and_pid(&c).await;
    assert_eq!(role, "legacy-a_app");
    c.execute("INSERT INTO accounts (owner) VALUES ('legacy')", &[])
        .await
        .unwrap();
}

#[tokio::test]
async fn a_row_tenant_changing_the_shared_roles_password_locks_no_other_tenant_out() {
    // Tries: ALTER ROLE CURRENT_USER PASSWORD, which any role may run, on the login role all
    // row tenants of the database share.
    let f = fixture();
    let reg = f.registry("rowpw").await;
    reg.create("rowpw-a", "row");
    reg.create("rowpw-b", "row");
    let proxy = f.proxy(reg.config.clone());
    let a = connect(proxy.addr, "rowpw-a").await.unwrap();
    a.batch_execute("ALTER ROLE CURRENT_USER PASSWORD 'hijacked-7'")
        .await
        .unwrap();
    // A proxy started now must open new server connections, with the registry's password.
    let other = f.proxy(reg.config.clone());
    let b = connect(other.addr, "rowpw-b")
        .await
        .expect("b still connects");
    b.execute("INSERT INTO accounts (owner) VALUES ('b')", &[])
        .await
        .unwrap();
}
