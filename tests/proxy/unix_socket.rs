//! A server given as a socket directory (`host = "/path"`, libpq's convention) is reached over
//! PostgreSQL's Unix-domain socket, with the same authentication, pooling and cancel.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

use crate::support::{fixture, pg_error, sqlstate, text};

/// A proxy whose "main" server is addressed by its socket directory.
async fn proxy_over_unix_socket() -> SocketAddr {
    let f = fixture();
    let dir = f.socket_dirs[0].display().to_string();
    f.extra_proxy(move |c| {
        for s in c.servers.iter_mut() {
            if s.name == "main" {
                s.host = dir.clone();
            }
        }
    })
    .await
}

async fn client(addr: SocketAddr, tenant: &str) -> Client {
    let f = fixture();
    f.connect_str(&f.url_at(addr, tenant))
        .await
        .unwrap_or_else(|e| panic!("connect {tenant}: {}", pg_error(&e)))
}

#[tokio::test]
async fn a_socket_directory_host_is_reached_over_the_unix_socket() {
    let addr = proxy_over_unix_socket().await;
    let c = client(addr, "acme").await;
    // inet_server_addr() is NULL on a Unix-socket connection.
    assert_eq!(
        text(&c, "SELECT (inet_server_addr() IS NULL)::text").await,
        "true"
    );
    assert_eq!(text(&c, "SELECT current_user").await, "acme_app");
}

#[tokio::test]
async fn a_password_role_authenticates_over_the_unix_socket() {
    let addr = proxy_over_unix_socket().await;
    // The cluster asks every role but the superuser for its password on the socket too.
    let c = client(addr, "md5co").await;
    assert_eq!(text(&c, "SELECT current_user").await, "md5_app");
}

#[tokio::test]
async fn cancel_reaches_a_backend_over_the_unix_socket() {
    let addr = proxy_over_unix_socket().await;
    let c = client(addr, "acme").await;
    let token = c.cancel_token();
    let started = Instant::now();
    let sleeper = tokio::spawn(async move { c.batch_execute("SELECT pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    token.cancel_query(NoTls).await.expect("send cancel");
    let e = sleeper.await.unwrap().expect_err("query was cancelled");
    assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{}", pg_error(&e));
    assert!(started.elapsed() < Duration::from_secs(20));
}
