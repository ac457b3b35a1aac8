//! The registry fixture's server has TLS on and every connection to it checks the
//! certificate (sslmode verify-full): the registry's, provisioning's and the tenants' own.

use crate::support::*;

#[tokio::test]
async fn tenant_connections_to_a_verify_full_server_use_tls() {
    let f = fixture();
    let reg = f.registry("tlsrow").await;
    reg.create("tls-a", "schema");
    let proxy = f.proxy(reg.config.clone());
    let c = connect(proxy.addr, "tls-a").await.expect("connect");
    let ssl: bool = c
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0);
    assert!(ssl);
}

#[tokio::test]
async fn the_registry_connections_of_a_proxy_use_tls() {
    let f = fixture();
    let reg = f.registry("tlsreg").await;
    let _proxy = f.proxy(reg.config.clone());
    let admin = f.admin("postgres").await;
    // The proxy's listening connection opens in the background.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let row = admin
            .query_one(
                "SELECT count(*), coalesce(bool_and(s.ssl), false)
                 FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
                 WHERE a.datname = $1",
                &[&format!("reg_{}", reg.name)],
            )
            .await
            .expect("activity");
        let (n, all_tls): (i64, bool) = (row.get(0), row.get(1));
        if n > 0 {
            assert!(all_tls, "every registry connection uses TLS");
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the proxy keeps a registry connection"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_server_registered_with_an_unreadable_root_certificate_is_refused_at_once() {
    let f = fixture();
    let reg = f.registry("tlsbad").await;
    let out = reg.cli(&[
        "server",
        "add",
        "other",
        "--host",
        "127.0.0.1",
        "--sslmode",
        "verify-full",
        "--sslrootcert",
        "/nonexistent/ca.pem",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("/nonexistent/ca.pem"),
        "{}",
        stderr(&out)
    );
}
