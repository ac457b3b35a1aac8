//! SQL `DEALLOCATE name` of a statement a driver prepared at protocol level (libpq up to 16,
//! psycopg among its users, closes statements so): it closes that client's statement, in both
//! pool modes.

use std::net::SocketAddr;

use pgtenant::config::PoolMode;

use crate::support::{error_fields, fixture, RawClient};

fn message(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let body: Vec<u8> = parts.concat();
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    m.extend(body);
    m
}

/// Parse `name` as `SELECT 7`, then Sync; waits for its ReadyForQuery.
async fn prepare(c: &mut RawClient, name: &str) {
    let parse = message(b'P', &[name.as_bytes(), b"\0SELECT 7\0", &[0, 0]]);
    c.send(&[parse, message(b'S', &[])].concat()).await;
    while let Some((tag, body)) = c.read_message().await {
        assert_ne!(tag, b'E', "{:?}", error_fields(&body));
        if tag == b'Z' {
            return;
        }
    }
    panic!("no ReadyForQuery");
}

/// Bind and Execute `name`, then Sync: None if it ran, else its SQLSTATE.
async fn run_prepared(c: &mut RawClient, name: &str) -> Option<String> {
    let bind = message(b'B', &[b"\0", name.as_bytes(), b"\0", &[0, 0, 0, 0, 0, 0]]);
    let execute = message(b'E', &[b"\0", &[0, 0, 0, 0]]);
    c.send(&[bind, execute, message(b'S', &[])].concat()).await;
    let mut code = None;
    while let Some((tag, body)) = c.read_message().await {
        if tag == b'E' {
            code = Some(error_fields(&body).0);
        }
        if tag == b'Z' {
            break;
        }
    }
    code
}

/// A simple query's command tag (or SQLSTATE) and ReadyForQuery status.
async fn simple(c: &mut RawClient, sql: &str) -> (String, u8) {
    let replies = c.query(sql).await;
    let outcome = replies
        .iter()
        .find_map(|(tag, body)| match tag {
            b'C' => Some(String::from_utf8_lossy(&body[..body.len() - 1]).into_owned()),
            b'E' => Some(error_fields(body).0),
            _ => None,
        })
        .unwrap_or_default();
    let status = replies.last().map_or(0, |(_, b)| b[0]);
    (outcome, status)
}

async fn proxy(mode: PoolMode) -> SocketAddr {
    fixture()
        .extra_proxy(move |c| {
            for t in c.tenants.iter_mut() {
                t.pool_mode = Some(mode);
            }
        })
        .await
}

async fn deallocate_closes_the_statement(mode: PoolMode) {
    let mut c = RawClient::login(proxy(mode).await, "app.acme", "acme").await;
    prepare(&mut c, "_pg3_0").await;
    assert_eq!(run_prepared(&mut c, "_pg3_0").await, None);
    assert_eq!(
        simple(&mut c, "DEALLOCATE \"_pg3_0\"").await,
        ("DEALLOCATE".to_string(), b'I')
    );
    assert_eq!(
        run_prepared(&mut c, "_pg3_0").await.as_deref(),
        Some("26000"),
        "the statement is gone"
    );
}

#[tokio::test]
async fn sql_deallocate_closes_a_protocol_statement_in_transaction_mode() {
    deallocate_closes_the_statement(PoolMode::Transaction).await;
}

#[tokio::test]
async fn sql_deallocate_closes_a_protocol_statement_in_session_mode() {
    deallocate_closes_the_statement(PoolMode::Session).await;
}

#[tokio::test]
async fn sql_deallocate_prepare_inside_a_transaction_keeps_the_transaction_open() {
    let mut c = RawClient::login(proxy(PoolMode::Transaction).await, "app.acme", "acme").await;
    prepare(&mut c, "s_in_tx").await;
    assert_eq!(simple(&mut c, "BEGIN").await, ("BEGIN".to_string(), b'T'));
    assert_eq!(
        simple(&mut c, "deallocate prepare s_in_tx").await,
        ("DEALLOCATE".to_string(), b'T')
    );
    assert_eq!(simple(&mut c, "COMMIT").await, ("COMMIT".to_string(), b'I'));
    assert_eq!(
        run_prepared(&mut c, "s_in_tx").await.as_deref(),
        Some("26000")
    );
}

#[tokio::test]
async fn sql_deallocate_in_a_failed_transaction_is_refused_as_postgresql_would() {
    let mut c = RawClient::login(proxy(PoolMode::Transaction).await, "app.acme", "acme").await;
    prepare(&mut c, "s_failed").await;
    simple(&mut c, "BEGIN").await;
    assert_eq!(
        simple(&mut c, "SELECT 1/0").await,
        ("22012".to_string(), b'E')
    );
    assert_eq!(
        simple(&mut c, "DEALLOCATE s_failed").await,
        ("25P02".to_string(), b'E')
    );
    assert_eq!(
        simple(&mut c, "ROLLBACK").await,
        ("ROLLBACK".to_string(), b'I')
    );
    assert_eq!(
        run_prepared(&mut c, "s_failed").await,
        None,
        "still prepared"
    );
}

#[tokio::test]
async fn sql_deallocate_of_an_unknown_name_gets_postgresqls_error() {
    let mut c = RawClient::login(proxy(PoolMode::Transaction).await, "app.acme", "acme").await;
    assert_eq!(
        simple(&mut c, "DEALLOCATE never_prepared").await,
        ("26000".to_string(), b'I')
    );
}
