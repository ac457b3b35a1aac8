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
