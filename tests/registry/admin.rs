//! Admin console users kept in the registry.

use std::time::Duration;

use crate::support::*;

#[tokio::test]
async fn admin_users_kept_in_the_registry_may_use_the_console_until_removed() {
    let f = fixture();
    let reg = f.registry("admins").await;
    let out = reg.cli_stdin(&["admin", "add", "ops"], "ops-secret");
    assert!(out.status.success(), "{}", stderr(&out));
    let proxy = f.proxy(reg.config.clone());
    let url = format!(
        "host={} port={} user=ops dbname=pgtenant password=ops-secret",
        proxy.addr.ip(),
        proxy.addr.port()
    );
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("admin login");
    tokio::spawn(conn);
    let rows = c.simple_query("SHOW VERSION").await.expect("show version");
    assert!(rows
        .iter()
        .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_))));

    let out = reg.cli(&["admin", "remove", "ops"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
            Err(e) => {
                assert_eq!(sqlstate(&e).as_deref(), Some("28P01"), "{e:?}");
                break;
            }
            Ok(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Ok(_) => panic!("a removed admin user can still log in"),
        }
    }
}
