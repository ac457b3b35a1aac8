//! Several instances behind one address: a CancelRequest that reaches another instance than
//! the one holding the client is sent on to it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pgtenant::config::PeerConfig;

use crate::support::*;

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Two instances, 1 and 2, each listing the other as its peer.
async fn two_peers() -> (SocketAddr, SocketAddr) {
    let f = fixture();
    let (pa, pb) = (free_port(), free_port());
    let peer = |id: u16, port: u16| PeerConfig {
        id,
        host: "127.0.0.1".into(),
        port,
    };
    let a = f
        .extra_proxy(move |c| {
            c.listen = SocketAddr::from(([127, 0, 0, 1], pa));
            c.peer_id = 1;
            c.peers = vec![peer(2, pb)];
        })
        .await;
    let b = f
        .extra_proxy(move |c| {
            c.listen = SocketAddr::from(([127, 0, 0, 1], pb));
            c.peer_id = 2;
            c.peers = vec![peer(1, pa)];
        })
        .await;
    (a, b)
}

async fn send_cancel(to: SocketAddr, pid: u32, secret: u32) {
    let mut c = RawClient::connect(to).await;
    c.send(&cancel_packet(pid, secret)).await;
    // The proxy closes the connection once it has acted.
    let _ = c.read_byte().await;
}

/// Runs `sql` on `c` and returns the SQLSTATE of its error (None if it succeeded) and how long
/// it took.
async fn run(c: &mut RawClient, sql: &str) -> (Option<String>, Duration) {
    let started = Instant::now();
    let replies = c.query(sql).await;
    let code = replies
        .iter()
        .find(|(tag, _)| *tag == b'E')
        .map(|(_, body)| error_fields(body).0);
    (code, started.elapsed())
}

#[tokio::test]
async fn a_cancel_sent_to_another_instance_stops_the_clients_query() {
    let (a, b) = two_peers().await;
    let mut c = RawClient::login(a, "app.acme", "acme").await;
    let (pid, secret) = c.key.expect("BackendKeyData");
    assert_eq!(pgtenant::clients::cancel::peer_of(pid), 1);
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        send_cancel(b, pid, secret).await;
    });
    let (code, took) = run(&mut c, "SELECT pg_sleep(30)").await;
    canceller.await.expect("canceller");
    assert_eq!(code.as_deref(), Some("57014"), "canceled");
    assert!(took < Duration::from_secs(20), "took {took:?}");
    let (code, _) = run(&mut c, "SELECT 1").await;
    assert_eq!(code, None, "the session goes on");
}

#[tokio::test]
async fn a_wrong_secret_sent_through_another_instance_cancels_nothing() {
    let (a, b) = two_peers().await;
    let mut c = RawClient::login(a, "app.acme", "acme").await;
    let (pid, secret) = c.key.expect("BackendKeyData");
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        send_cancel(b, pid, secret.wrapping_add(1)).await;
    });
    let (code, _) = run(&mut c, "SELECT pg_sleep(1)").await;
    canceller.await.expect("canceller");
    assert_eq!(code, None, "the query ran to its end");
}

#[tokio::test]
async fn a_cancel_to_the_instance_holding_the_client_still_works() {
    let (a, _b) = two_peers().await;
    let mut c = RawClient::login(a, "app.acme", "acme").await;
    let (pid, secret) = c.key.expect("BackendKeyData");
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        send_cancel(a, pid, secret).await;
    });
    let (code, _) = run(&mut c, "SELECT pg_sleep(30)").await;
    canceller.await.expect("canceller");
    assert_eq!(code.as_deref(), Some("57014"));
}
