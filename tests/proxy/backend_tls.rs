//! TLS from pgtenant to PostgreSQL servers, under libpq's sslmode rules.

use pgtenant::config::{BackendTlsConfig, SslMode};

use crate::support::*;

fn mode(m: SslMode, ca: Option<&std::path::Path>) -> BackendTlsConfig {
    BackendTlsConfig {
        sslmode: Some(m),
        sslrootcert: ca.map(Into::into),
        ..BackendTlsConfig::default()
    }
}

/// Whether the vault tenant's server connection, seen from the server, uses TLS.
async fn backend_uses_tls(host: &str, tls: BackendTlsConfig) -> Result<bool, String> {
    let f = fixture();
    let server = tls_server();
    let host = host.to_string();
    let addr = f.extra_proxy(move |c| server.add_to(c, &host, tls)).await;
    let c = f
        .connect_str(&f.url_at(addr, "vault"))
        .await
        .map_err(|e| pg_error(&e))?;
    let ssl: bool = c
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| pg_error(&e))?
        .get(0);
    Ok(ssl)
}

#[tokio::test]
async fn verify_full_reaches_a_server_whose_certificate_names_its_host() {
    let ca = tls_server().ca.clone();
    let tls = mode(SslMode::VerifyFull, Some(&ca));
    assert_eq!(backend_uses_tls("localhost", tls).await, Ok(true));
}

#[tokio::test]
async fn verify_full_refuses_a_certificate_for_another_host_with_08001() {
    let ca = tls_server().ca.clone();
    let e = backend_uses_tls("127.0.0.1", mode(SslMode::VerifyFull, Some(&ca)))
        .await
        .unwrap_err();
    assert!(e.ends_with("(08001)"), "{e}");
    assert!(e.contains("over TLS"), "{e}");
}

#[tokio::test]
async fn verify_ca_accepts_the_chain_whatever_the_host_name() {
    let ca = tls_server().ca.clone();
    let tls = mode(SslMode::VerifyCa, Some(&ca));
    assert_eq!(backend_uses_tls("127.0.0.1", tls).await, Ok(true));
}

#[tokio::test]
async fn verify_ca_refuses_a_certificate_from_another_ca() {
    let other = crate::pki::Pki::new();
    let e = backend_uses_tls("localhost", mode(SslMode::VerifyCa, Some(&other.ca_file())))
        .await
        .unwrap_err();
    assert!(e.ends_with("(08001)"), "{e}");
}

#[tokio::test]
async fn prefer_is_the_default_and_uses_tls_when_the_server_offers_it() {
    assert_eq!(
        backend_uses_tls("127.0.0.1", BackendTlsConfig::default()).await,
        Ok(true)
    );
}

#[tokio::test]
async fn disable_never_uses_tls() {
    assert_eq!(
        backend_uses_tls("127.0.0.1", mode(SslMode::Disable, None)).await,
        Ok(false)
    );
}

#[tokio::test]
async fn require_against_a_server_without_tls_tells_the_client_why_with_08001() {
    let f = fixture();
    let addr = f
        .extra_proxy(|c| {
            for s in c.servers.iter_mut() {
                if s.name == "main" {
                    s.sslmode = Some(SslMode::Require);
                }
            }
        })
        .await;
    let e = f
        .connect_str(&f.url_at(addr, "acme"))
        .await
        .map(drop)
        .expect_err("refused");
    let msg = pg_error(&e);
    assert_eq!(sqlstate(&e).as_deref(), Some("08001"), "{msg}");
    assert!(msg.contains("does not support TLS"), "{msg}");
}

#[tokio::test]
async fn a_session_over_backend_tls_runs_transactions_and_prepared_statements() {
    let f = fixture();
    let server = tls_server();
    let ca = server.ca.clone();
    let addr = f
        .extra_proxy(move |c| server.add_to(c, "localhost", mode(SslMode::VerifyFull, Some(&ca))))
        .await;
    let c = f.tenant_at(addr, "vault").await;
    c.batch_execute("CREATE TABLE IF NOT EXISTS t (n int)")
        .await
        .expect("create");
    let insert = c
        .prepare("INSERT INTO t VALUES ($1)")
        .await
        .expect("prepare");
    for n in 0..50 {
        c.execute(&insert, &[&n]).await.expect("insert");
    }
    let big: String = c
        .query_one("SELECT repeat('x', 1000000)", &[])
        .await
        .expect("a large row")
        .get(0);
    assert_eq!(big.len(), 1_000_000);
}

#[tokio::test]
async fn show_servers_names_the_tls_protocol_of_a_tls_server_connection() {
    let f = fixture();
    let server = tls_server();
    let ca = server.ca.clone();
    let addr = f
        .extra_proxy(move |c| server.add_to(c, "localhost", mode(SslMode::VerifyFull, Some(&ca))))
        .await;
    let c = f.tenant_at(addr, "vault").await;
    c.simple_query("SELECT 1").await.expect("query");
    let tls = admin_column(addr, "SHOW SERVERS", ("server", "secure"), "tls").await;
    assert!(
        !tls.is_empty() && tls.iter().all(|t| t.starts_with("TLSv1.")),
        "tls column: {tls:?}"
    );
}
