//! LISTEN/NOTIFY in transaction mode without a server connection per listener (database
//! tier): pgtenant holds the LISTEN on a connection of its own per database and delivers each
//! notification to the tenant's clients listening on its channel, between their transactions.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use pgtenant::config::SessionFeatures;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_postgres::Client;

use crate::support::fixture;

const IN_TIME: Duration = Duration::from_secs(10);
/// How long a test waits to be sure that nothing arrives.
const QUIET: Duration = Duration::from_millis(600);

/// A proxy whose tenants have one server connection each and refuse what would pin a client:
/// a LISTEN that held a server connection would either pin (refused) or block the pool. One
/// for every test here (each test listens on channels of its own), so the suite stays within
/// the server's connection limit.
async fn one_connection_no_pinning() -> (SocketAddr, std::sync::Arc<pgtenant::context::ProxyContext>)
{
    static PROXY: tokio::sync::OnceCell<(
        SocketAddr,
        std::sync::Arc<pgtenant::context::ProxyContext>,
    )> = tokio::sync::OnceCell::const_new();
    PROXY
        .get_or_init(|| async {
            fixture()
                .extra_proxy_ctx(|c| {
                    c.pool.session_features = SessionFeatures::Refuse;
                    for t in c.tenants.iter_mut() {
                        t.pool_size = Some(1);
                    }
                })
                .await
        })
        .await
        .clone()
}

/// A client of `tenant` and the (channel, payload) of every notification it receives.
async fn listener(addr: SocketAddr, tenant: &str) -> (Client, UnboundedReceiver<(String, String)>) {
    let url = fixture().url_at(addr, tenant);
    let (client, mut conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    (client, rx)
}

async fn next(rx: &mut UnboundedReceiver<(String, String)>) -> (String, String) {
    tokio::time::timeout(IN_TIME, rx.recv())
        .await
        .expect("a notification in time")
        .expect("the connection is open")
}

async fn nothing_arrives(rx: &mut UnboundedReceiver<(String, String)>) -> bool {
    tokio::time::timeout(QUIET, rx.recv()).await.is_err()
}

#[tokio::test]
async fn a_listen_in_transaction_mode_holds_no_server_connection_and_hears_notify() {
    let (addr, _ctx) = one_connection_no_pinning().await;
    let (l, mut rx) = listener(addr, "acme").await;
    l.batch_execute("LISTEN hub_jobs").await.expect("listen");
    // The tenant's only server connection is free for everyone else.
    let other = fixture().tenant_at(addr, "acme").await;
    tokio::time::timeout(Duration::from_secs(5), other.batch_execute("SELECT 1"))
        .await
        .expect("the listener holds no server connection")
        .expect("select");
    other
        .batch_execute("NOTIFY hub_jobs, 'run-1'")
        .await
        .expect("notify");
    assert_eq!(next(&mut rx).await, ("hub_jobs".into(), "run-1".into()));
    // And the listener's own transactions go on as before.
    l.batch_execute("SELECT 1")
        .await
        .expect("the listener works");
}

#[tokio::test]
async fn every_listener_of_a_channel_hears_it_and_a_listener_of_another_does_not() {
    let (addr, _ctx) = one_connection_no_pinning().await;
    let (a, mut ra) = listener(addr, "acme").await;
    let (b, mut rb) = listener(addr, "acme").await;
    let (c, mut rc) = listener(addr, "acme").await;
    a.batch_execute("LISTEN hub_fan").await.unwrap();
    b.batch_execute("LISTEN hub_fan").await.unwrap();
    c.batch_execute("LISTEN hub_other").await.unwrap();
    a.batch_execute("NOTIFY hub_fan, 'to-both'").await.unwrap();
    assert_eq!(next(&mut ra).await.1, "to-both", "its own NOTIFY too");
    assert_eq!(next(&mut rb).await.1, "to-both");
    assert!(nothing_arrives(&mut rc).await);
}

#[tokio::test]
async fn unlisten_stops_delivery_on_that_channel_only() {
    let (addr, _ctx) = one_connection_no_pinning().await;
    let (l, mut rx) = listener(addr, "acme").await;
    l.batch_execute("LISTEN hub_gone").await.unwrap();
    l.batch_execute("LISTEN hub_kept").await.unwrap();
    l.batch_execute("UNLISTEN hub_gone")
        .await
        .expect("unlisten");
    let n = fixture().tenant_at(addr, "acme").await;
    n.batch_execute("NOTIFY hub_gone, 'dropped'").await.unwrap();
    n.batch_execute("NOTIFY hub_kept, 'kept'").await.unwrap();
    assert_eq!(next(&mut rx).await, ("hub_kept".into(), "kept".into()));
    l.batch_execute("UNLISTEN *").await.expect("unlisten all");
    n.batch_execute("NOTIFY hub_kept, 'late'").await.unwrap();
    assert!(nothing_arrives(&mut rx).await);
}

#[tokio::test]
async fn discard_all_ends_a_clients_listen() {
    let (addr, _ctx) = one_connection_no_pinning().await;
    let (l, mut rx) = listener(addr, "acme").await;
    l.batch_execute("LISTEN hub_discard").await.unwrap();
    l.batch_execute("DISCARD ALL").await.expect("discard all");
    let n = fixture().tenant_at(addr, "acme").await;
    n.batch_execute("NOTIFY hub_discard, 'late'").await.unwrap();
    assert!(nothing_arrives(&mut rx).await);
}

#[tokio::test]
async fn a_notification_during_a_listeners_transaction_arrives_after_it() {
    let (addr, _ctx) = one_connection_no_pinning().await;
    let f = fixture();
    let addr2 = f.extra_proxy(|_| {}).await;
    let (l, mut rx) = listener(addr, "acme").await;
    l.batch_execute("LISTEN hub_during").await.unwrap();
    l.batch_execute("BEGIN; SELECT 1").await.unwrap();
    // From another proxy: this one's only connection is the listener's for now.
    f.tenant_at(addr2, "acme")
        .await
        .batch_execute("NOTIFY hub_during, 'wait'")
        .await
        .unwrap();
    assert!(
        nothing_arrives(&mut rx).await,
        "not in the middle of its transaction"
    );
    l.batch_execute("COMMIT").await.unwrap();
    assert_eq!(next(&mut rx).await.1, "wait");
}

#[tokio::test]
async fn another_tenant_hears_nothing_of_a_channel_with_the_same_name() {
    let (addr, _ctx) = one_connection_no_pinning().await;
    let (l, mut rx) = listener(addr, "acme").await;
    l.batch_execute("LISTEN hub_same_name").await.unwrap();
    fixture()
        .tenant_at(addr, "globex")
        .await
        .batch_execute("NOTIFY hub_same_name, 'globex secret'")
        .await
        .unwrap();
    assert!(nothing_arrives(&mut rx).await);
}

/// The tests that count or end the listening connections of `globex` take turns (no other
/// test listens there).
static GLOBEX_HUB: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Server connections of `database` (on the second server, globex's) that hold pgtenant's
/// LISTENs.
async fn hub_connections(database: &str) -> i64 {
    fixture()
        .direct(1, database)
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgtenant listen'
               AND datname = $1",
            &[&database],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn the_listening_connection_closes_when_the_last_listener_leaves() {
    let _turn = GLOBEX_HUB.lock().await;
    let (addr, ctx) = one_connection_no_pinning().await;
    let (a, _ra) = listener(addr, "globex").await;
    let (b, _rb) = listener(addr, "globex").await;
    a.batch_execute("LISTEN hub_leave").await.unwrap();
    b.batch_execute("LISTEN hub_leave").await.unwrap();
    assert!(ctx.pools.listen_hubs().serves("globex", "second", "globex"));
    assert_eq!(hub_connections("globex").await, 1, "one for both listeners");
    drop(a);
    b.batch_execute("UNLISTEN hub_leave").await.unwrap();
    for _ in 0..50 {
        if !ctx.pools.listen_hubs().serves("globex", "second", "globex")
            && hub_connections("globex").await == 0
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the hub and its connection outlived their listeners");
}

#[tokio::test]
async fn a_listener_whose_listening_connection_dies_is_told_and_disconnected() {
    let _turn = GLOBEX_HUB.lock().await;
    let (addr, _ctx) = one_connection_no_pinning().await;
    let (l, _rx) = listener(addr, "globex").await;
    l.batch_execute("LISTEN hub_killed").await.unwrap();
    fixture()
        .direct(1, "globex")
        .await
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE application_name = 'pgtenant listen' AND datname = 'globex'",
        )
        .await
        .unwrap();
    for _ in 0..50 {
        if l.is_closed() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the listener was not told its LISTEN was lost");
}

#[tokio::test]
async fn a_listen_sent_with_the_extended_protocol_is_held_too() {
    let (addr, _ctx) = one_connection_no_pinning().await;
    let (l, mut rx) = listener(addr, "acme").await;
    // Parse of the unnamed statement, Bind, Describe, Execute, Sync: how psycopg and JDBC
    // send every statement.
    l.execute_typed("LISTEN hub_extended", &[])
        .await
        .expect("an extended-protocol LISTEN");
    l.query_one("SELECT 1", &[])
        .await
        .expect("the next statement replaces it and runs as usual");
    fixture()
        .tenant_at(addr, "acme")
        .await
        .batch_execute("NOTIFY hub_extended, 'ext'")
        .await
        .unwrap();
    assert_eq!(next(&mut rx).await, ("hub_extended".into(), "ext".into()));
    l.execute_typed("UNLISTEN hub_extended", &[])
        .await
        .expect("an extended-protocol UNLISTEN");
}

fn tags(replies: &[(u8, Vec<u8>)]) -> Vec<u8> {
    replies.iter().map(|(t, _)| *t).collect()
}

/// Bind of the unnamed statement, without parameters, to the unnamed portal.
fn bind_unnamed(out: &mut bytes::BytesMut) {
    use postgres_protocol::message::frontend;
    use postgres_protocol::IsNull;
    type Err = Box<dyn std::error::Error + Sync + Send>;
    let no_params = |_: i32, _: &mut bytes::BytesMut| -> Result<IsNull, Err> { Ok(IsNull::No) };
    let r = frontend::bind("", "", [0i16; 0], [0i32; 0], no_params, [0i16; 0], out);
    assert!(r.is_ok(), "encode Bind");
}

#[tokio::test]
async fn a_listen_parsed_and_synced_before_it_is_bound_is_held_too() {
    use postgres_protocol::message::frontend;
    let (addr, _ctx) = one_connection_no_pinning().await;
    let mut c = crate::support::RawClient::login(addr, "app.acme", "acme").await;
    let mut out = bytes::BytesMut::new();
    frontend::parse("", "LISTEN hub_split", std::iter::empty(), &mut out).unwrap();
    frontend::describe(b'S', "", &mut out).unwrap();
    frontend::sync(&mut out);
    c.send(&out).await;
    // ParseComplete, ParameterDescription, NoData, ReadyForQuery.
    assert_eq!(tags(&c.replies().await), b"1tnZ");
    out.clear();
    bind_unnamed(&mut out);
    frontend::execute("", 0, &mut out).unwrap();
    frontend::sync(&mut out);
    c.send(&out).await;
    // BindComplete, CommandComplete LISTEN, ReadyForQuery.
    assert_eq!(tags(&c.replies().await), b"2CZ");
    fixture()
        .tenant_at(addr, "acme")
        .await
        .batch_execute("NOTIFY hub_split, 'split'")
        .await
        .unwrap();
    let (tag, body) = c.read_message().await.expect("a notification");
    assert_eq!(tag, b'A');
    assert!(body.ends_with(b"hub_split\0split\0"), "{body:?}");
}

#[tokio::test]
async fn a_listen_mixed_with_another_statement_before_its_sync_is_refused_with_the_reason() {
    use postgres_protocol::message::frontend;
    let (addr, _ctx) = one_connection_no_pinning().await;
    let mut c = crate::support::RawClient::login(addr, "app.acme", "acme").await;
    let mut out = bytes::BytesMut::new();
    frontend::parse("", "LISTEN hub_mixed", std::iter::empty(), &mut out).unwrap();
    frontend::parse("other", "SELECT 1", std::iter::empty(), &mut out).unwrap();
    frontend::sync(&mut out);
    c.send(&out).await;
    let replies = c.replies().await;
    assert_eq!(tags(&replies), b"1EZ");
    let error = String::from_utf8_lossy(&replies[1].1).to_string();
    assert!(
        error.contains("0A000") && error.contains("before its Sync"),
        "{error}"
    );
    // The session goes on.
    let after = c.query("SELECT 1").await;
    assert!(after.iter().any(|(t, _)| *t == b'D'));
}

#[tokio::test]
async fn listening_connections_and_subscriptions_are_counted_in_the_metrics() {
    let _turn = GLOBEX_HUB.lock().await;
    let (addr, ctx) = one_connection_no_pinning().await;
    let gauge = |state: &str| {
        ctx.pools
            .metrics()
            .listen
            .with_label_values(&["globex", state])
            .get()
    };
    let (a, _ra) = listener(addr, "globex").await;
    let (b, _rb) = listener(addr, "globex").await;
    a.batch_execute("LISTEN hub_counted").await.unwrap();
    b.batch_execute("LISTEN hub_counted; ").await.unwrap();
    b.batch_execute("LISTEN hub_counted_too").await.unwrap();
    assert_eq!((gauge("connections"), gauge("subscriptions")), (1, 3));
    drop(a);
    drop(b);
    for _ in 0..50 {
        if (gauge("connections"), gauge("subscriptions")) == (0, 0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "still counted after the listeners left: {} connections, {} subscriptions",
        gauge("connections"),
        gauge("subscriptions")
    );
}
