//! Tenants invisible to each other: what provisioning creates on a server is named by a keyed
//! hash of the tenant id, so the catalogs every login can read list no customer; tenants made
//! before that get the same names with `tenant rename-objects`.

use std::time::Duration;

use crate::support::*;

const SOON: Duration = Duration::from_secs(5);

/// Every database, schema and role name on the fixture's server, and every schema name in
/// `schema_database`.
async fn catalog_names(f: &Fixture, schema_database: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for (db, sql) in [
        ("postgres", "SELECT datname::text FROM pg_database"),
        ("postgres", "SELECT rolname::text FROM pg_roles"),
        (schema_database, "SELECT nspname::text FROM pg_namespace"),
    ] {
        for r in f.admin(db).await.query(sql, &[]).await.unwrap() {
            names.push(r.get(0));
        }
    }
    names
}

#[tokio::test]
async fn what_provisioning_creates_names_nothing_of_the_tenant() {
    let f = fixture();
    let reg = f.registry("opaque").await;
    reg.create("zenith-credit", "database");
    reg.create("quokka-bank", "schema");
    let out = reg.cli_stdin(
        &["tenant", "update", "quokka-bank", "--user", "orm", "--ddl"],
        PASSWORD,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let schema_database = &reg.config.registry.as_ref().unwrap().schema_database;
    for name in catalog_names(f, schema_database).await {
        for word in ["zenith", "quokka"] {
            assert!(!name.contains(word), "\"{name}\" names a tenant");
        }
    }
    // The registry knows the names, and `tenant show` prints them.
    let names = reg.names("quokka-bank").await;
    let shown = stdout(&reg.cli(&["tenant", "show", "quokka-bank"]));
    assert!(shown.contains(names.schema.as_deref().unwrap()), "{shown}");
    for role in &names.roles {
        assert!(shown.contains(role.as_str()), "{shown}");
    }
}

#[tokio::test]
async fn a_tenant_reading_the_catalogs_through_the_proxy_learns_no_other_tenants_id() {
    let f = fixture();
    let reg = f.registry("catalogs").await;
    for (id, tier) in [
        ("vega-db", "database"),
        ("vega-schema", "schema"),
        ("vega-nosy", "schema"),
        ("vega-row", "row"),
    ] {
        reg.create(id, tier);
    }
    let proxy = f.proxy(reg.config.clone());
    let nosy = connect(proxy.addr, "vega-nosy").await.expect("connect");
    let seen: String = nosy
        .query_one(
            "SELECT concat_ws(' ',
                 (SELECT string_agg(datname, ' ') FROM pg_database),
                 (SELECT string_agg(nspname, ' ') FROM pg_namespace),
                 (SELECT string_agg(rolname, ' ') FROM pg_roles),
                 (SELECT string_agg(coalesce(usename, '') || ' ' || coalesce(datname, ''), ' ')
                    FROM pg_stat_activity))",
            &[],
        )
        .await
        .expect("the catalogs are readable")
        .get(0);
    assert!(
        !seen.contains("vega"),
        "a tenant id in the catalogs: {seen}"
    );
}

/// Gives tenant `id` the names tenants had before opaque names: the database (database tier)
/// or schema (schema tier) named after the id, and roles `<id>_app` / `<id>_ddl`.
async fn make_legacy(f: &Fixture, reg: &Reg, id: &str) -> ServerNames {
    let now = reg.names(id).await;
    let admin = f.admin("postgres").await;
    let legacy_role = |r: &str| format!("{id}{}", &r[r.len() - 4..]);
    let roles: Vec<(String, String)> = now
        .roles
        .iter()
        .map(|r| (r.clone(), legacy_role(r)))
        .collect();
    for (from, to) in &roles {
        admin
            .batch_execute(&format!("ALTER ROLE \"{from}\" RENAME TO \"{to}\""))
            .await
            .unwrap();
    }
    let (database, schema) = match &now.schema {
        Some(s) => {
            let legacy = id.replace('-', "_");
            f.admin(&now.database)
                .await
                .batch_execute(&format!("ALTER SCHEMA \"{s}\" RENAME TO \"{legacy}\""))
                .await
                .unwrap();
            (now.database.clone(), Some(legacy))
        }
        None => {
            admin
                .batch_execute(&format!(
                    "ALTER DATABASE \"{}\" RENAME TO \"{id}\"",
                    now.database
                ))
                .await
                .unwrap();
            (id.to_string(), None)
        }
    };
    reg.store()
        .await
        .rename_objects(id, &database, schema.as_deref(), &roles)
        .await
        .expect("record the legacy names");
    reg.names(id).await
}

#[tokio::test]
async fn rename_objects_gives_an_old_database_tenant_opaque_names_and_keeps_it_served() {
    let f = fixture();
    let reg = f.registry("renamedb").await;
    reg.create("oldname-db", "database");
    let opaque = reg.names("oldname-db").await;
    let legacy = make_legacy(f, &reg, "oldname-db").await;
    assert_eq!(legacy.database, "oldname-db");
    let proxy = f.proxy(reg.config.clone());
    let c = connect(proxy.addr, "oldname-db").await.expect("served");
    c.batch_execute("INSERT INTO accounts (owner) VALUES ('kept')")
        .await
        .unwrap();

    let out = reg.cli(&["tenant", "rename-objects", "oldname-db"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("database oldname-db → {}", opaque.database)),
        "{}",
        stdout(&out)
    );
    let now = reg.names("oldname-db").await;
    assert_eq!(now.database, opaque.database);
    assert_eq!(now.role, opaque.role);
    assert!(catalog_names(f, "postgres")
        .await
        .iter()
        .all(|n| !n.contains("oldname-db")));
    // Its clients were closed for the rename; new ones find everything under the new names.
    eventually("the old client closed", SOON, || c.is_closed()).await;
    let c = connect_within(proxy.addr, "oldname-db", SOON)
        .await
        .expect("served again");
    let n: i64 = c
        .query_one("SELECT count(*) FROM accounts WHERE owner = 'kept'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[tokio::test]
async fn rename_objects_gives_an_old_schema_tenant_and_its_ddl_role_opaque_names() {
    let f = fixture();
    let reg = f.registry("renamesch").await;
    reg.create("oldname-sch", "schema");
    let out = reg.cli_stdin(
        &["tenant", "update", "oldname-sch", "--user", "orm", "--ddl"],
        PASSWORD,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let opaque = reg.names("oldname-sch").await;
    let legacy = make_legacy(f, &reg, "oldname-sch").await;
    assert_eq!(legacy.schema.as_deref(), Some("oldname_sch"));
    assert_eq!(legacy.roles, ["oldname-sch_app", "oldname-sch_ddl"]);

    let out = reg.cli(&["tenant", "rename-objects", "--all"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let now = reg.names("oldname-sch").await;
    assert_eq!(now.schema, opaque.schema);
    assert_eq!(now.roles, opaque.roles);
    let store = reg.store().await;
    assert_eq!(store.tenant("oldname-sch").await.unwrap().status, "active");
    // Both users log in under the new roles, and the DDL user still may change its schema.
    let proxy = f.proxy(reg.config.clone());
    let app = connect(proxy.addr, "oldname-sch").await.expect("app");
    app.query_one("SELECT count(*) FROM accounts", &[])
        .await
        .expect("the app user reads its tables");
    let orm = connect_as(proxy.addr, "orm", "oldname-sch").await;
    orm.batch_execute("CREATE TABLE orm_made (x int)")
        .await
        .expect("the DDL user creates in its schema");
    app.batch_execute("INSERT INTO orm_made VALUES (1)")
        .await
        .expect("and the app user uses what it made");
}

#[tokio::test]
async fn a_rename_cut_short_after_the_server_step_is_finished_by_running_it_again() {
    let f = fixture();
    let reg = f.registry("renamecut").await;
    reg.create("cut-db", "database");
    let opaque = reg.names("cut-db").await;
    make_legacy(f, &reg, "cut-db").await;
    // The server already has the new names; the registry still the old ones.
    let admin = f.admin("postgres").await;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"cut-db\" RENAME TO \"{}\";
             ALTER ROLE \"cut-db_app\" RENAME TO \"{}\"",
            opaque.database, opaque.role
        ))
        .await
        .unwrap();

    let out = reg.cli(&["tenant", "rename-objects", "cut-db"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(reg.names("cut-db").await.database, opaque.database);
    let proxy = f.proxy(reg.config.clone());
    connect(proxy.addr, "cut-db")
        .await
        .expect("served under the new names")
        .simple_query("SELECT 1 FROM accounts")
        .await
        .expect("its tables are there");
    // And once more: nothing left to do.
    let out = reg.cli(&["tenant", "rename-objects", "cut-db"]);
    assert!(stdout(&out).contains("opaque already"), "{}", stdout(&out));
}
