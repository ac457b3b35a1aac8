//! Nothing is held or told for a client before it has authenticated.

use std::time::Duration;

use crate::support::*;

/// Everything the proxy sends during one SCRAM login of `user` with `password`, as
/// (tag, body), up to and including the ErrorResponse or ReadyForQuery that ends it.
async fn login_transcript(
    addr: std::net::SocketAddr,
    user: &str,
    database: &str,
    password: &str,
) -> Vec<(u8, Vec<u8>)> {
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    let mut c = RawClient::connect(addr).await;
    c.send(&RawClient::startup_packet(
        196608,
        &[("user", user), ("database", database)],
    ))
    .await;
    let mut scram = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
    let mut seen = Vec::new();
    while let Some((tag, body)) = c.read_message().await {
        let kind = body
            .get(..4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        let mut out = bytes::BytesMut::new();
        match (tag, kind) {
            (b'R', Some(10)) => {
                postgres_protocol::message::frontend::sasl_initial_response(
                    "SCRAM-SHA-256",
                    scram.message(),
                    &mut out,
                )
                .expect("encode");
            }
            (b'R', Some(11)) => {
                scram.update(&body[4..]).expect("scram update");
                postgres_protocol::message::frontend::sasl_response(scram.message(), &mut out)
                    .expect("encode");
            }
            _ => {}
        }
        let done = matches!(tag, b'E' | b'Z');
        seen.push((tag, body));
        if !out.is_empty() {
            c.send(&out).await;
        }
        if done {
            break;
        }
    }
    seen
}

/// The salt and iteration count of a server-first-message body (after the 4-byte kind).
fn salt_and_iterations(body: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(&body[4..]).into_owned();
    let field = |p: &str| {
        text.split(',')
            .find_map(|a| a.strip_prefix(p))
            .unwrap_or_default()
            .to_string()
    };
    (field("s="), field("i="))
}

#[tokio::test]
async fn an_unknown_tenant_and_a_wrong_password_run_the_same_exchange_and_error() {
    let f = fixture();
    let unknown = login_transcript(f.proxy, "app.nosuch", "nosuch", PASSWORD).await;
    let wrong = login_transcript(f.proxy, "app.acme", "acme", "not-the-password").await;
    let kinds = |t: &[(u8, Vec<u8>)]| {
        t.iter()
            .map(|(tag, b)| (*tag, b.get(..4).map(<[u8]>::to_vec)))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        kinds(&unknown),
        kinds(&wrong),
        "same messages in the same order"
    );
    // The same mechanisms are offered.
    assert_eq!(unknown[0], wrong[0]);
    let (unknown_salt, unknown_iter) = salt_and_iterations(&unknown[1].1);
    let (wrong_salt, wrong_iter) = salt_and_iterations(&wrong[1].1);
    assert_eq!(unknown_iter, wrong_iter);
    assert_eq!(unknown_salt.len(), wrong_salt.len());
    let last = |t: &[(u8, Vec<u8>)], user: &str| {
        String::from_utf8_lossy(&t.last().expect("an error").1).replace(user, "USER")
    };
    assert_eq!(last(&unknown, "app.nosuch"), last(&wrong, "app.acme"));
    let (code, message) = error_fields(&unknown.last().unwrap().1);
    assert_eq!(code, "28P01");
    assert_eq!(
        message,
        "password authentication failed for user \"app.nosuch\""
    );
}

#[tokio::test]
async fn an_unknown_tenant_gets_the_same_salt_on_every_attempt() {
    let f = fixture();
    let first = login_transcript(f.proxy, "app.ghost", "ghost", PASSWORD).await;
    let second = login_transcript(f.proxy, "app.ghost", "ghost", PASSWORD).await;
    assert_eq!(
        salt_and_iterations(&first[1].1),
        salt_and_iterations(&second[1].1)
    );
}

/// Opens a connection that sends its StartupMessage and never answers the SCRAM challenge.
async fn stalled_login(addr: std::net::SocketAddr, user: &str, database: &str) -> RawClient {
    let mut c = RawClient::connect(addr).await;
    c.send(&RawClient::startup_packet(
        196608,
        &[("user", user), ("database", database)],
    ))
    .await;
    let (tag, _) = c.read_message().await.expect("the SASL challenge");
    assert_eq!(tag, b'R');
    c
}

#[tokio::test]
async fn logins_that_never_authenticate_do_not_use_up_a_tenants_client_limit() {
    let f = fixture();
    let addr = f
        .extra_proxy(|c| {
            for t in c.tenants.iter_mut() {
                t.max_client_connections = Some(3);
            }
        })
        .await;
    let mut stalled = Vec::new();
    for _ in 0..5 {
        stalled.push(stalled_login(addr, "app.acme", "acme").await);
    }
    let c = f
        .connect_str(&f.url_at(addr, "acme"))
        .await
        .expect("a real client still gets in");
    assert_eq!(text(&c, "SELECT 'in'").await, "in");
}

#[tokio::test]
async fn connections_over_max_pending_logins_are_refused_with_53300() {
    let f = fixture();
    let addr = f.extra_proxy(|c| c.max_pending_logins = 2).await;
    let _a = stalled_login(addr, "app.acme", "acme").await;
    let _b = stalled_login(addr, "app.acme", "acme").await;
    let mut c = RawClient::connect(addr).await;
    c.send(&RawClient::startup_packet(
        196608,
        &[("user", "app.acme"), ("database", "acme")],
    ))
    .await;
    let (code, message) = c.read_error().await.expect("an error");
    assert_eq!(code, "53300");
    assert!(message.contains("max_pending_logins = 2"), "{message}");
}

#[tokio::test]
async fn a_pending_login_frees_its_place_when_it_authenticates() {
    let f = fixture();
    let addr = f.extra_proxy(|c| c.max_pending_logins = 1).await;
    let mut open = Vec::new();
    for _ in 0..3 {
        let c = tokio::time::timeout(
            Duration::from_secs(10),
            f.connect_str(&f.url_at(addr, "acme")),
        )
        .await
        .expect("in time")
        .expect("logged in");
        assert_eq!(text(&c, "SELECT 'ok'").await, "ok");
        open.push(c);
    }
}
