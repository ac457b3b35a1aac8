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

#[tokio::test]
async fn a_registry_tenant_requiring_tls_refuses_plaintext_after_authentication() {
    let f = fixture();
    let reg = f.registry("tlsreq").await;
    reg.create("tlsreq-a", "database");
    let out = reg.cli(&["tenant", "update", "tlsreq-a", "--require-tls", "true"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut config = reg.config.clone();
    config.tls = f.pki.server_tls(pgtenant::config::TlsMode::Allow);
    let proxy = f.proxy(config);
    let e = connect(proxy.addr, "tlsreq-a").await.map(drop).unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("28000"));
    let ok = psql_over_tls(
        proxy.addr,
        &format!("user=app.tlsreq-a dbname=tlsreq-a password={PASSWORD}"),
    );
    assert!(ok.status.success(), "{}", stderr(&ok));
}

#[tokio::test]
async fn a_registry_user_with_auth_cert_logs_in_with_its_certificate() {
    let f = fixture();
    let reg = f.registry("tlscert").await;
    reg.create("tlscert-a", "database");
    let out = reg.cli(&[
        "tenant",
        "update",
        "tlscert-a",
        "--user",
        "clerk",
        "--auth",
        "cert",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let show = reg.cli(&["tenant", "show", "tlscert-a"]);
    assert!(stdout(&show).contains("(auth cert)"), "{}", stdout(&show));
    let mut config = reg.config.clone();
    config.tls = f.pki.server_tls(pgtenant::config::TlsMode::Allow);
    let proxy = f.proxy(config);
    let (cert, key) = f.pki.issue("clerk", "clerk.tlscert-a", &[], true);
    let o = psql_over_tls(
        proxy.addr,
        &format!(
            "user=clerk.tlscert-a dbname=tlscert-a sslcert={} sslkey={} password=unused",
            cert.display(),
            key.display()
        ),
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

/// psql over TLS (`sslmode=require`) to the proxy at `addr`, running `SELECT 1`.
fn psql_over_tls(addr: std::net::SocketAddr, conninfo: &str) -> std::process::Output {
    std::process::Command::new(fixture().bindir.join("psql"))
        .args(["-X", "-At", "-c", "SELECT 1"])
        .arg(format!(
            "host=127.0.0.1 port={} sslmode=require {conninfo}",
            addr.port()
        ))
        .env_remove("PGPASSWORD")
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("psql")
}
