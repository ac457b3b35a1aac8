//! How a connection names its tenant, and the refusals when it names none, two, or a bad one.

use crate::support::{fixture, pg_error, sqlstate, PASSWORD};

async fn tenant_of(user: &str, database: &str, options: Option<&str>) -> Result<String, String> {
    let f = fixture();
    let mut url = f.url(user, database);
    if let Some(o) = options {
        url.push_str(&format!(" options='{o}'"));
    }
    let c = f
        .connect_str(&url)
        .await
        .map_err(|e| format!("{} {}", sqlstate(&e).unwrap_or_default(), pg_error(&e)))?;
    let db: String = c
        .query_one("SELECT current_database()", &[])
        .await
        .map_err(|e| pg_error(&e))?
        .get(0);
    Ok(db)
}

#[tokio::test]
async fn tenant_from_the_user_name_suffix() {
    // libpq-style default: database = user name, which is not a carrier.
    assert_eq!(
        tenant_of("app.acme", "app.acme", None).await.unwrap(),
        "acme"
    );
}

#[tokio::test]
async fn tenant_from_the_database_name() {
    assert_eq!(tenant_of("app", "acme", None).await.unwrap(), "acme");
}

#[tokio::test]
async fn tenant_from_options_dash_c_setting() {
    let got = tenant_of("app", "app", Some("-c pgtenant.tenant=acme")).await;
    assert_eq!(got.unwrap(), "acme");
}

#[tokio::test]
async fn tenant_from_options_bare_word() {
    assert_eq!(
        tenant_of("app", "app", Some("tenant=acme")).await.unwrap(),
        "acme"
    );
}

#[tokio::test]
async fn carriers_that_agree_are_accepted() {
    let got = tenant_of("app.acme", "acme", Some("tenant=acme")).await;
    assert_eq!(got.unwrap(), "acme");
}

#[tokio::test]
async fn user_and_database_naming_different_tenants_are_refused() {
    let e = tenant_of("app.acme", "globex", None).await.unwrap_err();
    assert!(e.starts_with("28000"), "{e}");
    assert!(e.contains("conflicts"), "{e}");
}

#[tokio::test]
async fn options_and_user_naming_different_tenants_are_refused() {
    let e = tenant_of("app.acme", "app.acme", Some("tenant=globex"))
        .await
        .unwrap_err();
    assert!(e.starts_with("28000"), "{e}");
}

#[tokio::test]
async fn a_connection_naming_no_tenant_is_refused() {
    let e = tenant_of("app", "app", None).await.unwrap_err();
    assert!(e.starts_with("28000"), "{e}");
    assert!(e.contains("no tenant given"), "{e}");
}

#[tokio::test]
async fn an_unknown_tenant_is_refused_like_a_wrong_password() {
    let e = tenant_of("app.nosuch", "nosuch", None).await.unwrap_err();
    assert!(e.starts_with("28P01"), "{e}");
    assert!(
        e.contains("password authentication failed for user \"app.nosuch\""),
        "{e}"
    );
}

#[tokio::test]
async fn a_suspended_tenant_is_refused_after_authentication() {
    let e = tenant_of("app.dormant", "dormant", None).await.unwrap_err();
    assert!(e.starts_with("55000"), "{e}");
    assert!(e.contains("tenant \"dormant\" is suspended"), "{e}");
}

#[tokio::test]
async fn a_suspended_tenant_does_not_reveal_itself_to_a_wrong_password() {
    let f = fixture();
    let url = f
        .url("app.dormant", "dormant")
        .replace(&format!("password={PASSWORD}"), "password=wrong");
    let e = f.connect_str(&url).await.map(drop).expect_err("refused");
    assert_eq!(sqlstate(&e).as_deref(), Some("28P01"), "{}", pg_error(&e));
}
