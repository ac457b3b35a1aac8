//! A registry tenant's answer to session features in transaction mode.

use crate::support::*;

#[tokio::test]
async fn a_registry_tenant_may_refuse_session_features_where_the_proxy_pins() {
    let f = fixture();
    let reg = f.registry("sfeat").await;
    reg.create("sfeat-a", "database");
    reg.create("sfeat-b", "database");
    let out = reg.cli(&[
        "tenant",
        "update",
        "sfeat-b",
        "--session-features",
        "refuse",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let show = reg.cli(&["tenant", "show", "sfeat-b"]);
    assert!(stdout(&show).contains("refuse"), "{}", stdout(&show));
    let proxy = f.proxy(reg.config.clone());
    let pinned = connect(proxy.addr, "sfeat-a").await.expect("connect");
    pinned
        .batch_execute("CREATE TEMP TABLE t (x int)")
        .await
        .expect("the proxy's default pins");
    let refusing = connect(proxy.addr, "sfeat-b").await.expect("connect");
    let e = refusing
        .batch_execute("CREATE TEMP TABLE t (x int)")
        .await
        .expect_err("this tenant refuses");
    assert_eq!(sqlstate(&e).as_deref(), Some("0A000"));
}

#[tokio::test]
async fn a_registry_user_may_pin_where_its_tenant_refuses() {
    let f = fixture();
    let reg = f.registry("ufeat").await;
    reg.create("ufeat-a", "database");
    let out = reg.cli_stdin(
        &["tenant", "update", "ufeat-a", "--user", "worker"],
        PASSWORD,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = reg.cli(&[
        "tenant",
        "update",
        "ufeat-a",
        "--session-features",
        "refuse",
        "--user-session-features",
        "worker=pin",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let show = stdout(&reg.cli(&["tenant", "show", "ufeat-a"]));
    assert!(
        show.contains("worker → ") && show.contains("(session features pin)"),
        "{show}"
    );
    let proxy = f.proxy(reg.config.clone());
    let worker = connect_as(proxy.addr, "worker", "ufeat-a").await;
    worker
        .batch_execute("CREATE TEMP TABLE t (x int)")
        .await
        .expect("the user pins");
    let app = connect(proxy.addr, "ufeat-a")
        .await
        .expect("connect as app");
    let e = app
        .batch_execute("CREATE TEMP TABLE t (x int)")
        .await
        .expect_err("the tenant's other users refuse");
    assert_eq!(sqlstate(&e).as_deref(), Some("0A000"));
}

#[tokio::test]
async fn a_session_features_choice_for_a_user_that_does_not_exist_is_refused() {
    let reg = fixture().registry("ufeatx").await;
    reg.create("ufeatx-a", "database");
    let out = reg.cli(&[
        "tenant",
        "update",
        "ufeatx-a",
        "--user-session-features",
        "ghost=pin",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("ghost"), "{}", stderr(&out));
}
