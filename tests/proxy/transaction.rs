//! Transaction pooling: clients share backends between transactions and keep behaving as if
//! each had a connection of its own.

use std::net::SocketAddr;
use std::time::Duration;

use tokio_postgres::{Client, SimpleQueryMessage};

use crate::support::{fixture, pg_error, sqlstate, text};

/// A transaction-mode proxy whose pools hold `size` backends.
async fn pool_of(size: u32) -> SocketAddr {
    fixture()
        .extra_proxy(|c| {
            for t in c.tenants.iter_mut() {
                t.pool_size = Some(size);
            }
        })
        .await
}

async fn client_at(addr: SocketAddr, tenant: &str) -> Client {
    fixture().tenant_at(addr, tenant).await
}

async fn pid(c: &Client) -> i32 {
    c.query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn clients_share_one_backend_between_transactions() {
    let addr = pool_of(1).await;
    let a = client_at(addr, "acme").await;
    let b = client_at(addr, "acme").await;
    assert_eq!(pid(&a).await, pid(&b).await);
}

#[tokio::test]
async fn an_open_transaction_keeps_its_backend_until_commit() {
    let addr = pool_of(1).await;
    let a = client_at(addr, "acme").await;
    let b = client_at(addr, "acme").await;
    a.batch_execute("BEGIN").await.unwrap();
    let a_pid = pid(&a).await;
    let waiting = tokio::spawn(async move { pid(&b).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "b waits while a is inside its transaction"
    );
    assert_eq!(pid(&a).await, a_pid, "a stays on its backend");
    a.batch_execute("COMMIT").await.unwrap();
    assert_eq!(waiting.await.unwrap(), a_pid);
}

#[tokio::test]
async fn a_failed_transaction_keeps_its_backend_until_rollback() {
    let addr = pool_of(1).await;
    let a = client_at(addr, "acme").await;
    let b = client_at(addr, "acme").await;
    a.batch_execute("BEGIN").await.unwrap();
    let e = a.batch_execute("SELECT 1/0").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("22012"));
    let waiting = tokio::spawn(async move { pid(&b).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished());
    let e = a.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(
        sqlstate(&e).as_deref(),
        Some("25P02"),
        "still in the failed transaction"
    );
    a.batch_execute("ROLLBACK").await.unwrap();
    waiting.await.unwrap();
}

#[tokio::test]
async fn a_multi_statement_query_is_one_implicit_transaction() {
    let c = fixture().tenant("crowd").await;
    let e = c
        .batch_execute("INSERT INTO accounts (owner) VALUES ('implicit'); SELECT 1/0")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("22012"));
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM accounts WHERE owner = 'implicit'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "the insert was rolled back with the failed statement");
}

#[tokio::test]
async fn a_named_statement_is_re_prepared_on_another_backend() {
    let addr = pool_of(2).await;
    let a = client_at(addr, "acme").await;
    let b = client_at(addr, "acme").await;
    let stmt = a
        .prepare("SELECT $1::int * 2, pg_backend_pid()")
        .await
        .unwrap();
    let first: i32 = a.query_one(&stmt, &[&21]).await.unwrap().get(1);
    // b takes whichever backend a just used (the pool is LIFO) and holds it.
    b.batch_execute("BEGIN").await.unwrap();
    let held = pid(&b).await;
    let row = a.query_one(&stmt, &[&21]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    let second: i32 = row.get(1);
    assert_ne!(second, held, "a ran on the other backend");
    assert!(first == held || second != first);
    b.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test]
async fn two_clients_use_the_same_statement_name_for_different_sql() {
    // tokio-postgres names statements s0, s1, ... per connection, so both clients use "s0".
    let addr = pool_of(1).await;
    let a = client_at(addr, "acme").await;
    let b = client_at(addr, "acme").await;
    let sa = a.prepare("SELECT 'a'::text").await.unwrap();
    let sb = b.prepare("SELECT 'b'::text, 2").await.unwrap();
    for _ in 0..5 {
        assert_eq!(
            a.query_one(&sa, &[]).await.unwrap().get::<_, String>(0),
            "a"
        );
        assert_eq!(
            b.query_one(&sb, &[]).await.unwrap().get::<_, String>(0),
            "b"
        );
    }
}

#[tokio::test]
async fn a_statement_with_a_syntax_error_leaves_the_session_usable() {
    let c = fixture().tenant("acme").await;
    let e = c.prepare("SELEC 1").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("42601"));
    let ok = c.prepare("SELECT 7").await.unwrap();
    assert_eq!(c.query_one(&ok, &[]).await.unwrap().get::<_, i32>(0), 7);
}

#[tokio::test]
async fn closing_a_statement_hides_it_from_the_client_only() {
    let addr = pool_of(1).await;
    let a = client_at(addr, "acme").await;
    let b = client_at(addr, "acme").await;
    let sa = a.prepare("SELECT 11").await.unwrap();
    let sb = b.prepare("SELECT 11").await.unwrap();
    drop(sa); // tokio-postgres sends Close for a dropped statement
    assert_eq!(b.query_one(&sb, &[]).await.unwrap().get::<_, i32>(0), 11);
}

#[tokio::test]
async fn many_statements_beyond_the_backend_limit_all_keep_working() {
    let f = fixture();
    let addr = f
        .extra_proxy(|c| {
            c.pool.max_prepared_statements = 3;
            for t in c.tenants.iter_mut() {
                t.pool_size = Some(1);
            }
        })
        .await;
    let c = client_at(addr, "acme").await;
    let mut stmts = Vec::new();
    for i in 0..10 {
        stmts.push(c.prepare(&format!("SELECT {i}")).await.unwrap());
    }
    for _ in 0..2 {
        for (i, s) in stmts.iter().enumerate() {
            assert_eq!(
                c.query_one(s, &[]).await.unwrap().get::<_, i32>(0),
                i as i32
            );
        }
    }
    let direct = f.direct(0, "acme").await;
    let max: i64 = direct
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'acme_app'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(max >= 1);
}

#[tokio::test]
async fn a_set_outside_a_transaction_follows_the_client_to_another_backend() {
    let addr = pool_of(2).await;
    let a = client_at(addr, "acme").await;
    let b = client_at(addr, "acme").await;
    a.batch_execute("SET statement_timeout = '7s'")
        .await
        .unwrap();
    b.batch_execute("BEGIN").await.unwrap();
    let held = pid(&b).await;
    let row = a
        .query_one(
            "SELECT current_setting('statement_timeout'), pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "7s");
    let _ = held;
    assert_eq!(
        text(&b, "SELECT current_setting('statement_timeout')").await,
        "0"
    );
    b.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        text(&b, "SHOW statement_timeout").await,
        "0",
        "b never sees a's setting"
    );
}

#[tokio::test]
async fn a_set_in_a_rolled_back_transaction_is_forgotten() {
    let addr = pool_of(1).await;
    let a = client_at(addr, "acme").await;
    a.batch_execute("BEGIN; SET lock_timeout = '3s'; ROLLBACK")
        .await
        .unwrap();
    let b = client_at(addr, "acme").await;
    b.batch_execute("SELECT 1").await.unwrap();
    assert_eq!(text(&a, "SHOW lock_timeout").await, "0");
}

#[tokio::test]
async fn reset_all_returns_the_client_to_its_defaults() {
    let c = fixture().tenant("initech").await;
    c.batch_execute("SET search_path = public; SET DateStyle = 'German'")
        .await
        .unwrap();
    c.batch_execute("RESET ALL").await.unwrap();
    assert_eq!(text(&c, "SHOW search_path").await, "\"initech\", public");
    assert_eq!(text(&c, "SHOW DateStyle").await, "ISO, MDY");
}

async fn refused(sql: &str) -> (String, String) {
    let c = fixture().tenant("acme").await;
    let e = c.batch_execute(sql).await.expect_err("refused");
    let db = e.as_db_error().expect("an ErrorResponse");
    // The session stays usable.
    assert_eq!(text(&c, "SELECT 'still here'").await, "still here");
    (db.code().code().to_string(), db.message().to_string())
}

#[tokio::test]
async fn listen_inside_a_transaction_block_is_refused_with_a_clear_error() {
    // A LISTEN on its own between transactions works (tests/proxy/listen.rs).
    let (code, message) = refused("BEGIN; LISTEN jobs").await;
    assert_eq!(code, "0A000");
    assert_eq!(
        message,
        "LISTEN cannot be used in transaction pooling mode inside a transaction block or with other statements"
    );
}

#[tokio::test]
async fn sql_prepare_is_refused_with_a_clear_error() {
    let (code, message) = refused("PREPARE p AS SELECT 1").await;
    assert_eq!(code, "0A000");
    assert!(message.starts_with("SQL PREPARE"), "{message}");
}

#[tokio::test]
async fn session_advisory_locks_are_refused() {
    let (code, message) = refused("SELECT pg_advisory_lock(42)").await;
    assert_eq!(code, "0A000");
    assert!(message.contains("advisory locks"), "{message}");
}

#[tokio::test]
async fn with_hold_cursors_are_refused() {
    let (code, _) = refused("DECLARE c CURSOR WITH HOLD FOR SELECT 1").await;
    assert_eq!(code, "0A000");
}

#[tokio::test]
async fn temp_tables_that_outlive_the_transaction_are_refused() {
    let (code, message) = refused("CREATE TEMP TABLE t (x int)").await;
    assert_eq!(code, "0A000");
    assert!(message.contains("temporary"), "{message}");
}

#[tokio::test]
async fn a_refusal_inside_a_transaction_aborts_it() {
    let c = fixture().tenant("acme").await;
    c.batch_execute("BEGIN").await.unwrap();
    let e = c.batch_execute("LISTEN jobs").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("0A000"));
    let e = c.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("25P02"));
    c.batch_execute("ROLLBACK").await.unwrap();
}

#[tokio::test]
async fn a_prepared_refusal_is_reported_and_the_session_goes_on() {
    let c = fixture().tenant("acme").await;
    let e = c.prepare("LISTEN jobs").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("0A000"));
    assert_eq!(text(&c, "SELECT 'ok'").await, "ok");
}

#[tokio::test]
async fn copy_in_and_out_pass_through() {
    use futures_util::{SinkExt, StreamExt};
    let c = fixture().tenant("crowd").await;
    c.batch_execute("BEGIN").await.unwrap();
    let sink = c
        .copy_in("COPY accounts (owner, balance) FROM STDIN")
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    let mut data = String::new();
    for i in 0..5000 {
        data.push_str(&format!("copied-{i}\t{i}\n"));
    }
    sink.send(bytes::Bytes::from(data)).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 5000);
    let stream = c
        .copy_out("COPY (SELECT owner FROM accounts WHERE owner LIKE 'copied-%' ORDER BY balance) TO STDOUT")
        .await
        .unwrap();
    futures_util::pin_mut!(stream);
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    let lines = String::from_utf8(out).unwrap();
    assert_eq!(lines.lines().count(), 5000);
    assert_eq!(lines.lines().next(), Some("copied-0"));
    c.batch_execute("ROLLBACK").await.unwrap();
}

#[test]
fn notices_reach_the_client() {
    let f = fixture();
    let out = f.psql(
        "app.acme",
        "acme",
        &[
            "-c",
            "DO $$BEGIN RAISE NOTICE 'hello from the server'; END$$",
        ],
    );
    assert!(out.status.success());
    assert!(
        crate::support::stderr(&out).contains("NOTICE:  hello from the server"),
        "{}",
        crate::support::stderr(&out)
    );
}

#[tokio::test]
async fn a_large_result_streams_through() {
    let c = fixture().tenant("acme").await;
    let mut rows = 0;
    let mut bytes = 0;
    for m in c
        .simple_query("SELECT repeat('x', 1000) FROM generate_series(1, 30000)")
        .await
        .unwrap()
    {
        if let SimpleQueryMessage::Row(r) = m {
            rows += 1;
            bytes += r.get(0).unwrap().len();
        }
    }
    assert_eq!((rows, bytes), (30000, 30_000_000));
}

#[tokio::test]
async fn a_cancel_while_idle_does_nothing_and_the_next_query_runs() {
    let c = fixture().tenant("acme").await;
    c.cancel_token()
        .cancel_query(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(text(&c, "SELECT 'fine'").await, "fine");
}

#[tokio::test]
async fn a_client_waiting_too_long_for_a_backend_gets_57p03() {
    let f = fixture();
    let addr = f
        .extra_proxy(|c| {
            c.pool.query_wait_timeout = 1;
            for t in c.tenants.iter_mut() {
                t.pool_size = Some(1);
            }
        })
        .await;
    let a = client_at(addr, "globex").await;
    let b = client_at(addr, "globex").await;
    a.batch_execute("BEGIN").await.unwrap();
    let e = b.batch_execute("SELECT 1").await.unwrap_err();
    let msg = pg_error(&e);
    assert_eq!(sqlstate(&e).as_deref(), Some("57P03"), "{msg}");
    assert!(msg.contains("waiting for a server connection"), "{msg}");
    a.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test]
async fn an_idle_transaction_past_its_timeout_is_ended_and_its_backend_freed() {
    let f = fixture();
    let addr = f
        .extra_proxy(|c| {
            c.pool.idle_transaction_timeout = 1;
            for t in c.tenants.iter_mut() {
                t.pool_size = Some(1);
            }
        })
        .await;
    let a = client_at(addr, "globex").await;
    a.batch_execute("BEGIN").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1800)).await;
    let e = a.batch_execute("SELECT 1").await.unwrap_err();
    assert!(
        sqlstate(&e).as_deref() == Some("25P03") || e.is_closed(),
        "{}",
        pg_error(&e)
    );
    let b = client_at(addr, "globex").await;
    assert_eq!(text(&b, "SELECT 'free'").await, "free");
}

#[tokio::test]
async fn a_tenant_over_its_client_limit_is_refused_with_53300() {
    let f = fixture();
    let addr = f
        .extra_proxy(|c| {
            for t in c.tenants.iter_mut() {
                t.max_client_connections = Some(2);
            }
        })
        .await;
    let _a = client_at(addr, "acme").await;
    let _b = client_at(addr, "acme").await;
    let e = f
        .connect_str(&f.url_at(addr, "acme"))
        .await
        .map(drop)
        .expect_err("third client refused");
    assert_eq!(sqlstate(&e).as_deref(), Some("53300"), "{}", pg_error(&e));
    let _other_tenant = client_at(addr, "globex").await;
}

#[tokio::test]
async fn the_global_client_limit_is_enforced() {
    let f = fixture();
    let addr = f.extra_proxy(|c| c.pool.max_client_connections = 1).await;
    let _a = client_at(addr, "acme").await;
    let e = f
        .connect_str(&f.url_at(addr, "globex"))
        .await
        .map(drop)
        .expect_err("refused");
    assert_eq!(sqlstate(&e).as_deref(), Some("53300"), "{}", pg_error(&e));
}

#[tokio::test]
async fn idle_pools_are_closed() {
    let f = fixture();
    let (addr, ctx) = f
        .extra_proxy_ctx(|c| {
            c.pool.server_idle_timeout = 1;
            c.pool.pool_idle_timeout = 1;
        })
        .await;
    let c = client_at(addr, "acme").await;
    c.batch_execute("SELECT 1").await.unwrap();
    assert_eq!(ctx.pools.len(), 1);
    drop(c);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !ctx.pools.is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        ctx.pools.len(),
        0,
        "the idle pool and its connection are gone"
    );
}

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn parse(name: &str, sql: &str) -> Vec<u8> {
    msg(
        b'P',
        &[name.as_bytes(), b"\0", sql.as_bytes(), b"\0\0\0"].concat(),
    )
}

fn bind(statement: &str) -> Vec<u8> {
    msg(
        b'B',
        &[b"\0", statement.as_bytes(), b"\0\0\0\0\0\0\0"].concat(),
    )
}

fn execute() -> Vec<u8> {
    msg(b'E', b"\0\0\0\0\0")
}

fn sync() -> Vec<u8> {
    msg(b'S', b"")
}

/// Reads until `n` ReadyForQuery messages and returns the tags seen.
async fn tags_until_ready(c: &mut crate::support::RawClient, n: usize) -> (String, Vec<Vec<u8>>) {
    let (mut tags, mut rows, mut ready) = (String::new(), Vec::new(), 0);
    while ready < n {
        let (tag, body) = c.read_message().await.expect("a message");
        tags.push(tag as char);
        if tag == b'D' {
            rows.push(body);
        }
        if tag == b'Z' {
            ready += 1;
        }
    }
    (tags, rows)
}

/// The tags (and DataRows) PostgreSQL itself answers `batch` with, on a direct connection.
async fn direct_answer(batch: &[u8], syncs: usize) -> (String, Vec<Vec<u8>>) {
    let f = fixture();
    let (host, port) = &f.servers[0];
    let addr: SocketAddr = format!("{host}:{port}").parse().unwrap();
    let mut d = crate::support::RawClient::login(addr, "postgres", "acme").await;
    d.send(batch).await;
    tags_until_ready(&mut d, syncs).await
}

#[tokio::test]
async fn a_pipeline_with_an_error_in_the_middle_gets_every_answer_in_order() {
    let mut batch = Vec::new();
    for sql in ["SELECT 1", "SELECT 1/0", "SELECT 3"] {
        batch.extend(parse("", sql));
        batch.extend(bind(""));
        batch.extend(execute());
        batch.extend(sync());
    }
    let mut c = crate::support::RawClient::login(fixture().proxy, "app.acme", "acme").await;
    c.send(&batch).await;
    let (tags, rows) = tags_until_ready(&mut c, 3).await;
    assert_eq!((tags.clone(), rows.clone()), direct_answer(&batch, 3).await);
    assert_eq!(tags.matches('Z').count(), 3);
    assert_eq!(rows.len(), 2);
    assert!(rows[0].ends_with(b"1") && rows[1].ends_with(b"3"));
    // Nothing more is pending, and the session carries on.
    let after = c.query("SELECT 'next'").await;
    assert_eq!(after.last().map(|m| m.0), Some(b'Z'));
}

#[tokio::test]
async fn errors_skip_the_rest_of_the_pipeline_up_to_sync_only() {
    let mut batch = Vec::new();
    batch.extend(parse("", "SELECT 1/0"));
    batch.extend(bind(""));
    batch.extend(execute());
    batch.extend(parse("", "SELECT 2"));
    batch.extend(bind(""));
    batch.extend(execute());
    batch.extend(sync());
    batch.extend(parse("", "SELECT 5"));
    batch.extend(bind(""));
    batch.extend(execute());
    batch.extend(sync());
    let mut c = crate::support::RawClient::login(fixture().proxy, "app.acme", "acme").await;
    c.send(&batch).await;
    let (tags, rows) = tags_until_ready(&mut c, 2).await;
    assert_eq!((tags, rows.clone()), direct_answer(&batch, 2).await);
    assert_eq!(rows.len(), 1, "only the statement after the Sync ran");
}

#[tokio::test]
async fn deallocate_all_removes_the_clients_statements() {
    let mut c = crate::support::RawClient::login(fixture().proxy, "app.acme", "acme").await;
    c.send(&[parse("s1", "SELECT 41"), sync()].concat()).await;
    let (tags, _) = tags_until_ready(&mut c, 1).await;
    assert_eq!(tags, "1Z");
    let got = c.query("DEALLOCATE ALL").await;
    assert_eq!(got.last().map(|m| m.0), Some(b'Z'));
    c.send(&[bind("s1"), execute(), sync()].concat()).await;
    let (code, _) = c.read_error().await.expect("an error");
    assert_eq!(code, "26000", "prepared statement does not exist");
}

#[tokio::test]
async fn a_named_statement_prepared_twice_by_two_clients_runs_for_both() {
    let addr = pool_of(1).await;
    let mut a = crate::support::RawClient::login(addr, "app.acme", "acme").await;
    let mut b = crate::support::RawClient::login(addr, "app.acme", "acme").await;
    for c in [&mut a, &mut b] {
        c.send(&[parse("same", "SELECT 77"), bind("same"), execute(), sync()].concat())
            .await;
        let (tags, rows) = tags_until_ready(c, 1).await;
        assert_eq!(tags, "12DCZ");
        assert!(rows[0].ends_with(b"77"));
    }
}
