//! Following a promoted replica when the config is reloaded.

use crate::support::{blocking, on_standby, pair, pg_error, sqlstate};

async fn server_port(c: &tokio_postgres::Client) -> i32 {
    c.query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap_or_else(|e| panic!("{}", pg_error(&e)))
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_a_config_reload_moves_idle_clients_to_the_promoted_replica() {
    let mut p = pair(|_| {}).await;
    let idle = p.connect("app", "acme").await;
    assert_eq!(server_port(&idle).await, p.primary.port() as i32);
    let in_tx = p.connect("app", "acme").await;
    in_tx.batch_execute("BEGIN").await.expect("begin");
    in_tx
        .batch_execute("INSERT INTO accounts (owner) VALUES ('in flight')")
        .await
        .expect("insert");

    // The primary is lost; the standby is promoted; the operator points "main" at it.
    blocking(|| p.primary.shutdown());
    // A client whose transaction starts meanwhile waits for the server...
    let waiting = {
        let url = p.url("app", "acme");
        tokio::spawn(async move {
            let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("{}", pg_error(&e)));
            tokio::spawn(conn);
            server_port(&c).await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let standby = p.standby.connect("postgres").await.expect("standby");
    standby
        .batch_execute("SELECT pg_promote()")
        .await
        .expect("promote");
    let mut config = p.config.clone();
    config.servers.retain(|s| s.name == "main");
    config.servers[0].port = p.standby.port();
    config.servers[0].replicas.clear();
    let changed = p.proxy.ctx.reload(&config).expect("reload");
    assert_eq!(changed, 2, "both tenants live on the moved server");

    // ...and is served by the new primary once the config names it.
    assert_eq!(waiting.await.expect("join"), p.standby.port() as i32);
    // The idle client was not dropped: its next transaction runs on the new primary.
    assert_eq!(server_port(&idle).await, p.standby.port() as i32);
    assert!(!on_standby(&idle).await);
    idle.batch_execute("INSERT INTO accounts (owner) VALUES ('after failover')")
        .await
        .expect("write to the new primary");

    // The client whose transaction died with the old primary is told, ends it, and goes on.
    let e = in_tx
        .batch_execute("COMMIT")
        .await
        .expect_err("the transaction was lost");
    assert!(
        matches!(sqlstate(&e).as_deref(), Some("57P01" | "08006")),
        "{}",
        pg_error(&e)
    );
    in_tx.batch_execute("ROLLBACK").await.expect("rollback");
    assert_eq!(server_port(&in_tx).await, p.standby.port() as i32);
    let lost: i64 = in_tx
        .query_one(
            "SELECT count(*) FROM accounts WHERE owner = 'in flight'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(lost, 0);
}
