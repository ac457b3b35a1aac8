//! Each isolation tier reaches the right place: database, schema search_path, RLS context.

use crate::support::{fixture, stdout, text};

#[tokio::test]
async fn database_tier_reaches_the_tenants_own_database() {
    let f = fixture();
    let c = f.tenant("acme").await;
    let row = c
        .query_one(
            "SELECT current_database(), current_user::text, inet_server_port()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "acme");
    assert_eq!(row.get::<_, String>(1), "acme_app");
    assert_eq!(row.get::<_, i32>(2), f.servers[0].1 as i32);
}

#[tokio::test]
async fn database_tier_tenant_on_another_server_reaches_that_server() {
    let f = fixture();
    let c = f.tenant("globex").await;
    let row = c
        .query_one("SELECT current_database(), inet_server_port()", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "globex");
    assert_eq!(row.get::<_, i32>(1), f.servers[1].1 as i32);
}

#[tokio::test]
async fn schema_tier_pins_search_path_to_the_tenants_schema() {
    let c = fixture().tenant("initech").await;
    let row = c
        .query_one(
            "SELECT current_database(), current_schemas(true)::text, current_setting('search_path')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "schema_tenants");
    assert_eq!(row.get::<_, String>(1), "{pg_catalog,initech,public}");
    assert_eq!(row.get::<_, String>(2), "\"initech\", public");
}

#[tokio::test]
async fn schema_tier_unqualified_names_resolve_in_the_tenants_schema() {
    let c = fixture().tenant("umbrella").await;
    let owners: Vec<String> = c
        .query("SELECT owner FROM accounts ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(owners, ["Uma", "Ulf"]);
}

#[tokio::test]
async fn row_tier_binds_the_session_to_its_tenant() {
    let c = fixture().tenant("hooli").await;
    let row = c
        .query_one("SELECT current_database(), pgtenant_rls.tenant()", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "row_tenants");
    assert_eq!(row.get::<_, String>(1), "hooli");
}

#[tokio::test]
async fn row_tier_tenants_see_only_their_own_rows() {
    let f = fixture();
    for (tenant, expected) in [("hooli", ["Hal", "Hana"]), ("piedpiper", ["Pia", "Pete"])] {
        let c = f.tenant(tenant).await;
        let rows = c
            .query("SELECT tenant_id, owner FROM accounts ORDER BY id", &[])
            .await
            .unwrap();
        let owners: Vec<String> = rows.iter().map(|r| r.get(1)).collect();
        assert_eq!(owners, expected, "{tenant}");
        assert!(rows.iter().all(|r| r.get::<_, String>(0) == tenant));
    }
}

#[tokio::test]
async fn tenant_session_defaults_are_applied() {
    let c = fixture().tenant("acme").await;
    assert_eq!(text(&c, "SHOW TimeZone").await, "UTC");
}

#[test]
fn psql_reaches_every_tier() {
    let f = fixture();
    for (tenant, context, expected) in [
        ("acme", "''", "acme||"),
        ("initech", "''", "schema_tenants|\"initech\", public|"),
        (
            "hooli",
            "pgtenant_rls.tenant()",
            "row_tenants|\"$user\", public|hooli",
        ),
    ] {
        let sql = format!("SELECT current_database(), CASE WHEN current_database() = 'acme' THEN '' ELSE current_setting('search_path') END, {context}");
        let out = f.psql(&format!("app.{tenant}"), tenant, &["-c", &sql]);
        assert!(
            out.status.success(),
            "{tenant}: {}",
            crate::support::stderr(&out)
        );
        assert_eq!(stdout(&out), expected, "{tenant}");
    }
}

#[test]
fn psql_sees_the_real_server_version_in_parameter_status() {
    let f = fixture();
    let out = f.psql(
        "app.acme",
        "acme",
        &[
            "-c",
            "\\echo :SERVER_VERSION_NUM",
            "-c",
            "SHOW server_version_num",
        ],
    );
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(
        lines[0], lines[1],
        "psql's SERVER_VERSION_NUM comes from ParameterStatus"
    );
}
