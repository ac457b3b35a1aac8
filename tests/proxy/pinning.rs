//! `session_features = "pin"` (the default): a transaction-mode client that uses something
//! outliving its transaction keeps its server connection until it disconnects or runs
//! DISCARD ALL, and everything works as in session mode.

use std::net::SocketAddr;

use pgtenant::config::SessionFeatures;
use tokio_postgres::Client;

use crate::support::*;

/// A proxy with `pin` and a pool of `size` per tenant.
async fn pinning_proxy(size: u32) -> SocketAddr {
    fixture()
        .extra_proxy(move |c| {
            c.pool.session_features = SessionFeatures::Pin;
            for t in c.tenants.iter_mut() {
                t.pool_size = Some(size);
            }
        })
        .await
}

async fn backend_pid(c: &Client) -> i32 {
    c.query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0)
}

async fn show_pinned(addr: SocketAddr, tenant: &str) -> i64 {
    admin_column(addr, "SHOW POOLS", ("tenant", tenant), "cl_pinned")
        .await
        .iter()
        .filter_map(|v| v.parse::<i64>().ok())
        .sum()
}

#[tokio::test]
async fn a_temp_table_outliving_its_transaction_pins_the_client_and_stays_usable() {
    let f = fixture();
    let addr = pinning_proxy(2).await;
    let c = f.tenant_at(addr, "acme").await;
    c.batch_execute("CREATE TEMP TABLE scratch (x int)")
        .await
        .expect("pinned, not refused");
    let pid = backend_pid(&c).await;
    for n in 0..5 {
        c.execute("INSERT INTO scratch VALUES ($1)", &[&n])
            .await
            .expect("the temp table is there in later transactions");
        assert_eq!(backend_pid(&c).await, pid, "the same server connection");
    }
    let n: i64 = c
        .query_one("SELECT count(*) FROM scratch", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 5);
    assert_eq!(show_pinned(addr, "acme").await, 1);
}

#[tokio::test]
async fn sql_prepare_and_a_with_hold_cursor_work_when_pinned() {
    let f = fixture();
    let addr = pinning_proxy(2).await;
    let c = f.tenant_at(addr, "acme").await;
    c.batch_execute("PREPARE p AS SELECT (40 + $1::int)::text")
        .await
        .expect("prepare");
    c.batch_execute("DECLARE cur CURSOR WITH HOLD FOR SELECT generate_series(1, 3)::text")
        .await
        .expect("cursor");
    assert_eq!(text(&c, "EXECUTE p(2)").await, "42");
    assert_eq!(text(&c, "FETCH cur").await, "1");
    assert_eq!(text(&c, "FETCH cur").await, "2");
}

#[tokio::test]
async fn discard_all_unpins_and_the_connection_serves_others_again() {
    let f = fixture();
    let addr = pinning_proxy(1).await;
    let pinned = f.tenant_at(addr, "acme").await;
    pinned
        .batch_execute("SELECT pg_advisory_lock(777)")
        .await
        .expect("session lock");
    assert_eq!(show_pinned(addr, "acme").await, 1);
    pinned.batch_execute("DISCARD ALL").await.expect("discard");
    assert_eq!(show_pinned(addr, "acme").await, 0);
    // The pool's only connection is free again, with the lock released.
    let other = f.tenant_at(addr, "acme").await;
    let got: bool = other
        .query_one("SELECT pg_try_advisory_lock(777)", &[])
        .await
        .expect("lock")
        .get(0);
    assert!(got, "DISCARD ALL released the advisory lock");
    other
        .batch_execute("SELECT pg_advisory_unlock_all()")
        .await
        .expect("unlock");
}

#[tokio::test]
async fn a_pinned_client_that_leaves_frees_its_connection_cleaned() {
    let f = fixture();
    let addr = pinning_proxy(1).await;
    {
        let pinned = f.tenant_at(addr, "acme").await;
        pinned
            .batch_execute("CREATE TEMP TABLE leftover (x int)")
            .await
            .expect("temp");
    }
    let next = f.tenant_at(addr, "acme").await;
    let n: i64 = next
        .query_one(
            "SELECT count(*) FROM pg_class WHERE relname = 'leftover' AND relpersistence = 't'",
            &[],
        )
        .await
        .expect("catalog")
        .get(0);
    assert_eq!(n, 0, "the next client finds no temp table of the last one");
}

#[tokio::test]
async fn listen_works_when_pinned_and_notifications_arrive() {
    use futures_util::StreamExt;
    let f = fixture();
    let addr = pinning_proxy(2).await;
    let url = f.url_at(addr, "acme");
    let (listener, mut conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send(n.payload().to_string());
            }
        }
    });
    listener.batch_execute("LISTEN jobs").await.expect("listen");
    let sender = f.tenant_at(addr, "acme").await;
    sender
        .batch_execute("NOTIFY jobs, 'run-42'")
        .await
        .expect("notify");
    let got = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
        .await
        .expect("a notification in time");
    assert_eq!(got.as_deref(), Some("run-42"));
}

#[tokio::test]
async fn a_pinned_clients_session_ends_when_its_server_connection_dies() {
    let f = fixture();
    let addr = pinning_proxy(2).await;
    let c = f.tenant_at(addr, "acme").await;
    c.batch_execute("CREATE TEMP TABLE mine (x int)")
        .await
        .expect("pinned");
    let pid = backend_pid(&c).await;
    f.direct(0, "acme")
        .await
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .expect("terminate");
    // Its temp table went with the server connection: the session ends, as a direct one would.
    let e = c
        .batch_execute("SELECT 1")
        .await
        .expect_err("the session is over");
    assert!(e.is_closed() || e.as_db_error().is_some(), "{e}");
    let fresh = f.tenant_at(addr, "acme").await;
    assert_eq!(text(&fresh, "SELECT 'others go on'").await, "others go on");
}

/// SHOW STATS' transaction count of `tenant` on the proxy at `addr`.
async fn xact_count(addr: SocketAddr, tenant: &str) -> i64 {
    admin_column(addr, "SHOW STATS", ("tenant", tenant), "total_xact_count")
        .await
        .iter()
        .filter_map(|v| v.parse::<i64>().ok())
        .sum()
}

#[tokio::test]
async fn a_pinned_clients_transactions_are_counted_one_by_one() {
    let f = fixture();
    let addr = pinning_proxy(2).await;
    let c = f.tenant_at(addr, "acme").await;
    c.batch_execute("CREATE TEMP TABLE counted (x int)")
        .await
        .expect("pinned");
    for _ in 0..3 {
        c.batch_execute("SELECT 1").await.expect("select");
    }
    assert_eq!(
        xact_count(addr, "acme").await,
        4,
        "counted while still pinned"
    );
}

#[tokio::test]
async fn pipelined_queries_served_on_one_link_are_counted_as_separate_transactions() {
    let addr = pinning_proxy(2).await;
    let mut c = RawClient::login(addr, "app.acme", "acme").await;
    let mut both = bytes::BytesMut::new();
    postgres_protocol::message::frontend::query("SELECT 1", &mut both).expect("encode");
    postgres_protocol::message::frontend::query("SELECT 2", &mut both).expect("encode");
    c.send(&both).await;
    let mut ready = 0;
    while ready < 2 {
        let (tag, _) = c.read_message().await.expect("answers");
        if tag == b'Z' {
            ready += 1;
        }
    }
    assert_eq!(xact_count(addr, "acme").await, 2);
}

/// A proxy whose tenants pin (or refuse), with acme's client role set the other way.
async fn proxy_with_acme_role_set(tenants: SessionFeatures, role: SessionFeatures) -> SocketAddr {
    fixture()
        .extra_proxy(move |c| {
            c.pool.session_features = tenants;
            for t in c.tenants.iter_mut() {
                t.session_features = Some(tenants);
                if t.id == "acme" {
                    for u in t.users.iter_mut() {
                        u.session_features = Some(role);
                    }
                }
            }
        })
        .await
}

#[tokio::test]
async fn a_role_that_refuses_session_features_is_refused_where_its_tenant_pins() {
    let f = fixture();
    let addr = proxy_with_acme_role_set(SessionFeatures::Pin, SessionFeatures::Refuse).await;
    let e = f
        .tenant_at(addr, "acme")
        .await
        .batch_execute("CREATE TEMP TABLE mine (x int)")
        .await
        .expect_err("the role refuses");
    assert_eq!(sqlstate(&e).as_deref(), Some("0A000"));
    // Another tenant of the same proxy still pins.
    f.tenant_at(addr, "globex")
        .await
        .batch_execute("CREATE TEMP TABLE mine (x int)")
        .await
        .expect("its tenant pins");
}

#[tokio::test]
async fn a_role_that_pins_is_pinned_where_its_tenant_refuses() {
    let f = fixture();
    let addr = proxy_with_acme_role_set(SessionFeatures::Refuse, SessionFeatures::Pin).await;
    let c = f.tenant_at(addr, "acme").await;
    c.batch_execute("CREATE TEMP TABLE mine (x int)")
        .await
        .expect("the role pins");
    assert_eq!(show_pinned(addr, "acme").await, 1);
}
