//! Client authentication against stored SCRAM verifiers, and backend authentication methods.

use crate::support::{fixture, pg_error, sqlstate, stderr, text, PASSWORD};

fn with_password(url: &str, password: &str) -> String {
    url.replace(
        &format!("password={PASSWORD}"),
        &format!("password={password}"),
    )
}

#[tokio::test]
async fn a_wrong_password_is_refused_with_28p01() {
    let f = fixture();
    let e = f
        .connect_str(&with_password(&f.url("app.acme", "acme"), "wrong"))
        .await
        .map(drop)
        .expect_err("refused");
    assert_eq!(sqlstate(&e).as_deref(), Some("28P01"));
    assert_eq!(
        e.as_db_error().unwrap().message(),
        "password authentication failed for user \"app.acme\""
    );
}

#[tokio::test]
async fn an_unknown_user_gets_the_same_answer_as_a_wrong_password() {
    let f = fixture();
    let e = f
        .connect_str(&f.url("mallory.acme", "acme"))
        .await
        .map(drop)
        .expect_err("refused");
    assert_eq!(sqlstate(&e).as_deref(), Some("28P01"));
    assert_eq!(
        e.as_db_error().unwrap().message(),
        "password authentication failed for user \"mallory.acme\""
    );
}

#[test]
fn psql_reports_a_wrong_password_clearly() {
    let f = fixture();
    let out = std::process::Command::new(&f.psql)
        .args([
            "-X",
            "-h",
            &f.proxy.ip().to_string(),
            "-p",
            &f.proxy.port().to_string(),
        ])
        .args(["-U", "app.acme", "-d", "acme", "-c", "SELECT 1"])
        .env("PGPASSWORD", "wrong")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("FATAL:  password authentication failed for user \"app.acme\""),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn backend_login_with_scram() {
    // acme_app's password is stored as a SCRAM verifier on the server.
    let c = fixture().tenant("acme").await;
    assert_eq!(text(&c, "SELECT current_user::text").await, "acme_app");
}

#[tokio::test]
async fn backend_login_with_md5() {
    let c = fixture().tenant("md5co").await;
    assert_eq!(text(&c, "SELECT current_user::text").await, "md5_app");
}

#[tokio::test]
async fn backend_login_with_trust() {
    let c = fixture().tenant("trustco").await;
    assert_eq!(text(&c, "SELECT current_user::text").await, "trust_app");
}

#[tokio::test]
async fn a_dead_server_is_waited_for_then_reported_as_08006() {
    let f = fixture();
    let started = std::time::Instant::now();
    let e = f
        .connect("app.ghostco", "ghostco")
        .await
        .map(drop)
        .expect_err("refused");
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(1900),
        "the client waited for its query_wait_timeout of 2 s"
    );
    assert_eq!(sqlstate(&e).as_deref(), Some("08006"), "{}", pg_error(&e));
    assert!(
        pg_error(&e).contains("could not connect to server \"ghost\""),
        "{}",
        pg_error(&e)
    );
}

#[tokio::test]
async fn a_wrong_backend_password_is_reported_without_revealing_it() {
    let f = fixture();
    let addr = f
        .extra_proxy(|c| {
            let t = c.tenants.iter_mut().find(|t| t.id == "md5co").unwrap();
            t.users[0].backend_password = Some(pgtenant::secret::Secret::new("not-the-password"));
        })
        .await;
    let url = format!(
        "host={} port={} user=app.md5co dbname=md5co password={PASSWORD}",
        addr.ip(),
        addr.port()
    );
    let e = f.connect_str(&url).await.map(drop).expect_err("refused");
    let msg = pg_error(&e);
    assert_eq!(sqlstate(&e).as_deref(), Some("08001"), "{msg}");
    assert!(msg.contains("password authentication failed"), "{msg}");
    assert!(!msg.contains("not-the-password"), "{msg}");
}
