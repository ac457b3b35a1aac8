//! Session mode looks like a direct connection: the client is told its server process's real
//! id, so pg_backend_pid(), notification pids and pg_terminate_backend agree with it. In
//! transaction mode a client that terminates its own server process ends only its transaction.

use std::time::Duration;

use crate::support::*;

/// The first column of the first DataRow among `replies`, as text.
fn first_value(replies: &[(u8, Vec<u8>)]) -> Option<String> {
    replies.iter().find(|(tag, _)| *tag == b'D').map(|(_, b)| {
        let len = i32::from_be_bytes([b[2], b[3], b[4], b[5]]) as usize;
        String::from_utf8_lossy(&b[6..6 + len]).into_owned()
    })
}

#[tokio::test]
async fn in_session_mode_the_client_is_told_its_server_process_id() {
    let mut c = RawClient::login(fixture().session_proxy().await, "app.acme", "acme").await;
    let (pid, _) = c.key.expect("BackendKeyData");
    let replies = c.query("SELECT pg_backend_pid()").await;
    assert_eq!(first_value(&replies), Some(pid.to_string()));
}

#[tokio::test]
async fn in_session_mode_a_notification_carries_the_pid_the_client_was_told() {
    let mut c = RawClient::login(fixture().session_proxy().await, "app.acme", "acme").await;
    let (pid, _) = c.key.expect("BackendKeyData");
    let replies = c.query("LISTEN pidcheck; NOTIFY pidcheck, 'x'").await;
    let notification = replies
        .iter()
        .find(|(tag, _)| *tag == b'A')
        .expect("a NotificationResponse");
    let sender = u32::from_be_bytes([
        notification.1[0],
        notification.1[1],
        notification.1[2],
        notification.1[3],
    ]);
    assert_eq!(sender, pid);
}

#[tokio::test]
async fn in_session_mode_terminating_the_reported_pid_ends_the_session_with_the_servers_error() {
    let f = fixture();
    let mut c = RawClient::login(fixture().session_proxy().await, "app.acme", "acme").await;
    let (pid, _) = c.key.expect("BackendKeyData");
    let done: bool = f
        .direct(0, "acme")
        .await
        .query_one("SELECT pg_terminate_backend($1)", &[&(pid as i32)])
        .await
        .expect("terminate")
        .get(0);
    assert!(done, "the pid the client was told is a real server process");
    let (code, message) = c.read_error().await.expect("the server's own FATAL");
    assert_eq!(code, "57P01", "{message}");
    assert_eq!(c.read_message().await, None, "then the connection closes");
}

#[tokio::test]
async fn in_session_mode_cancel_works_with_the_servers_pid() {
    let addr = fixture().session_proxy().await;
    let mut c = RawClient::login(addr, "app.acme", "acme").await;
    let (pid, secret) = c.key.expect("BackendKeyData");
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut k = RawClient::connect(addr).await;
        k.send(&cancel_packet(pid, secret)).await;
        let _ = k.read_byte().await;
    });
    let replies = c.query("SELECT pg_sleep(30)").await;
    canceller.await.expect("canceller");
    let code = replies
        .iter()
        .find(|(tag, _)| *tag == b'E')
        .map(|(_, b)| error_fields(b).0);
    assert_eq!(code.as_deref(), Some("57014"));
}

#[tokio::test]
async fn in_transaction_mode_terminating_its_own_server_process_ends_only_its_transaction() {
    let f = fixture();
    let _faults = FAULTS.lock().await;
    let c = f.tenant("faulty").await;
    let bystander = f.tenant("faulty").await;
    c.batch_execute("BEGIN").await.expect("begin");
    let e = c
        .batch_execute("SELECT pg_terminate_backend(pg_backend_pid())")
        .await
        .expect_err("the server ends the transaction");
    assert_eq!(sqlstate(&e).as_deref(), Some("57P01"), "{}", pg_error(&e));
    c.batch_execute("ROLLBACK")
        .await
        .expect("the client ends its transaction");
    assert_eq!(
        text(&c, "SELECT 'my connection stays'").await,
        "my connection stays"
    );
    assert_eq!(text(&bystander, "SELECT 'unharmed'").await, "unharmed");
}
