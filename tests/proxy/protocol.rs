//! The front door against clients that send what real drivers never do.

use std::time::Duration;

use crate::support::{cancel_packet, fixture, RawClient};

const V3: u32 = 196608;

#[tokio::test]
async fn ssl_request_is_answered_n_and_startup_continues() {
    let f = fixture();
    let mut c = RawClient::connect(f.proxy).await;
    c.send(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await;
    assert_eq!(c.read_byte().await, Some(b'N'));
    c.send(&RawClient::startup_packet(
        V3,
        &[("user", "app.acme"), ("database", "acme")],
    ))
    .await;
    let (tag, body) = c.read_message().await.expect("auth request");
    assert_eq!(tag, b'R');
    assert_eq!(
        &body[..4],
        &10u32.to_be_bytes(),
        "SASL authentication requested"
    );
}

#[tokio::test]
async fn gssenc_request_is_answered_n() {
    let mut c = RawClient::connect(fixture().proxy).await;
    c.send(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30]).await;
    assert_eq!(c.read_byte().await, Some(b'N'));
}

#[tokio::test]
async fn an_unsupported_protocol_version_is_refused_with_0a000() {
    let mut c = RawClient::connect(fixture().proxy).await;
    c.send(&RawClient::startup_packet(2 << 16, &[("user", "app.acme")]))
        .await;
    let (code, message) = c.read_error().await.expect("error");
    assert_eq!(code, "0A000");
    assert!(
        message.contains("unsupported frontend protocol 2.0"),
        "{message}"
    );
}

#[tokio::test]
async fn a_newer_minor_version_gets_negotiate_protocol_version() {
    let mut c = RawClient::connect(fixture().proxy).await;
    c.send(&RawClient::startup_packet(
        (3 << 16) | 2,
        &[("user", "app.acme"), ("_pq_.future", "1")],
    ))
    .await;
    let (tag, _) = c.read_message().await.expect("a message");
    assert_eq!(tag, b'v');
}

#[tokio::test]
async fn a_malformed_startup_packet_gets_08p01_while_others_carry_on() {
    let f = fixture();
    let busy = f.tenant("acme").await;
    let long_query = tokio::spawn(async move {
        busy.query_one("SELECT count(*) FROM generate_series(1, 200000)", &[])
            .await
            .map(|r| r.get::<_, i64>(0))
    });
    let mut c = RawClient::connect(f.proxy).await;
    // Version 3.0, a parameter name, and no terminator.
    c.send(&[0, 0, 0, 12, 0, 3, 0, 0, b'u', b's', b'e', b'r'])
        .await;
    let (code, message) = c.read_error().await.expect("error");
    assert_eq!(code, "08P01");
    assert!(
        message.contains("invalid startup packet layout"),
        "{message}"
    );
    assert!(
        c.read_message().await.is_none(),
        "connection closed after the error"
    );
    assert_eq!(long_query.await.unwrap().unwrap(), 200000);
    let again = f.tenant("globex").await;
    assert_eq!(
        again
            .query_one("SELECT 1", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        1
    );
}

#[tokio::test]
async fn an_oversize_startup_length_is_refused_without_reading_it() {
    let mut c = RawClient::connect(fixture().proxy).await;
    c.send(&0x7fff_0000u32.to_be_bytes()).await;
    let (code, message) = c.read_error().await.expect("error");
    assert_eq!(code, "08P01");
    assert!(
        message.contains("invalid length of startup packet"),
        "{message}"
    );
}

#[tokio::test]
async fn an_oversize_message_after_login_is_refused_and_the_proxy_keeps_serving() {
    let f = fixture();
    let mut c = RawClient::login(f.proxy, "app.acme", "acme").await;
    c.send(&[b'Q', 0x7f, 0xff, 0xff, 0xff]).await;
    let (code, message) = c.read_error().await.expect("error");
    assert_eq!(code, "54000");
    assert!(message.contains("over the limit"), "{message}");
    assert!(c.read_message().await.is_none());
    let other = f.tenant("acme").await;
    assert_eq!(
        other
            .query_one("SELECT 2", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        2
    );
}

#[tokio::test]
async fn a_message_with_a_length_below_four_is_refused() {
    let mut c = RawClient::login(fixture().proxy, "app.acme", "acme").await;
    c.send(&[b'Q', 0, 0, 0, 2]).await;
    let (code, _) = c.read_error().await.expect("error");
    assert_eq!(code, "08P01");
}

#[tokio::test]
async fn an_unknown_message_type_is_refused() {
    let mut c = RawClient::login(fixture().proxy, "app.acme", "acme").await;
    c.send(&[b'y', 0, 0, 0, 4]).await;
    let (code, message) = c.read_error().await.expect("error");
    assert_eq!(code, "08P01");
    assert!(
        message.contains("invalid frontend message type"),
        "{message}"
    );
}

#[tokio::test]
async fn a_simple_query_round_trips_byte_for_byte() {
    let mut c = RawClient::login(fixture().proxy, "app.acme", "acme").await;
    let got = c.query("SELECT 'x'::text AS v").await;
    let tags: Vec<u8> = got.iter().map(|(t, _)| *t).collect();
    assert_eq!(tags, b"TDCZ");
    assert_eq!(got[1].1, b"\x00\x01\x00\x00\x00\x01x");
}

#[tokio::test]
async fn a_cancel_request_as_first_packet_gets_no_reply() {
    let mut c = RawClient::connect(fixture().proxy).await;
    c.send(&cancel_packet(1, 2)).await;
    let r = tokio::time::timeout(Duration::from_secs(10), c.read_message()).await;
    assert_eq!(r.ok().flatten(), None, "closed without a reply");
}
