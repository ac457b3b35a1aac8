//! A server given as a socket directory (`host = "/path"`, libpq's convention) is reached over
//! PostgreSQL's Unix-domain socket, with the same authentication, pooling and cancel.

use std::net::SocketAddr;

use crate::support::{assert_cancel_stops_pg_sleep, fixture, text};

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

#[tokio::test]
async fn a_socket_directory_host_is_reached_over_the_unix_socket() {
    let addr = proxy_over_unix_socket().await;
    let c = fixture().tenant_at(addr, "acme").await;
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
    let c = fixture().tenant_at(addr, "md5co").await;
    assert_eq!(text(&c, "SELECT current_user").await, "md5_app");
}

#[tokio::test]
async fn cancel_reaches_a_backend_over_the_unix_socket() {
    let addr = proxy_over_unix_socket().await;
    assert_cancel_stops_pg_sleep(fixture().tenant_at(addr, "acme").await).await;
}
