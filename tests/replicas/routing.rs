//! Which server a read goes to.

use crate::support::{eventually, on_standby, pair, pg_error, sqlstate};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_role_is_served_by_the_replica_and_cannot_write() {
    let p = pair(|_| {}).await;
    let c = p.connect("reporting", "acme").await;
    assert!(on_standby(&c).await);
    let rows: i64 = c
        .query_one("SELECT count(*) FROM accounts", &[])
        .await
        .expect("read")
        .get(0);
    assert_eq!(rows, 2);
    let e = c
        .batch_execute("INSERT INTO accounts (owner) VALUES ('x')")
        .await
        .expect_err("a replica refuses writes");
    assert_eq!(sqlstate(&e).as_deref(), Some("25006"), "{}", pg_error(&e));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_write_role_is_served_by_the_primary() {
    let p = pair(|_| {}).await;
    let c = p.connect("app", "acme").await;
    assert!(!on_standby(&c).await);
    c.batch_execute("INSERT INTO accounts (owner) VALUES ('written')")
        .await
        .expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_asking_for_read_only_sessions_is_served_by_the_replica() {
    let p = pair(|_| {}).await;
    for carrier in [
        "options='-c pgtenant.target_session_attrs=read-only'",
        "options='-c pgtenant.target_session_attrs=prefer-standby'",
    ] {
        let url = format!("{} {carrier}", p.url("app", "acme"));
        let c = p.try_connect(&url).await.expect("connect");
        assert!(on_standby(&c).await, "{carrier}");
    }
    // A read-only role that asks for the primary gets it, still read-only.
    let url = format!(
        "{} options='-c pgtenant.target_session_attrs=read-write'",
        p.url("reporting", "acme")
    );
    let c = p.try_connect(&url).await.expect("connect");
    assert!(!on_standby(&c).await);
    let e = c
        .batch_execute("INSERT INTO accounts (owner) VALUES ('x')")
        .await
        .expect_err("read-only session");
    assert_eq!(sqlstate(&e).as_deref(), Some("25006"), "{}", pg_error(&e));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_target_session_attrs_is_refused_at_login() {
    let p = pair(|_| {}).await;
    let url = format!(
        "{} options='-c pgtenant.target_session_attrs=fastest'",
        p.url("app", "acme")
    );
    let e = p.try_connect(&url).await.map(drop).expect_err("refused");
    assert_eq!(sqlstate(&e).as_deref(), Some("22023"), "{}", pg_error(&e));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_write_split_sends_read_only_transactions_to_the_replica_and_the_rest_to_the_primary()
{
    let p = pair(|_| {}).await;
    let c = p.connect("app", "acme").await;
    for begin in [
        "BEGIN READ ONLY",
        "START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY",
    ] {
        c.batch_execute(begin).await.expect("begin");
        assert!(on_standby(&c).await, "{begin}");
        c.batch_execute("COMMIT").await.expect("commit");
    }
    let row = c
        .simple_query("BEGIN; SET TRANSACTION READ ONLY; SELECT pg_is_in_recovery()::text; COMMIT")
        .await
        .expect("one query string");
    let value = row.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    });
    assert_eq!(value.as_deref(), Some("true"));

    // Everything else may write: the primary.
    assert!(!on_standby(&c).await);
    c.batch_execute("BEGIN").await.expect("begin");
    assert!(!on_standby(&c).await);
    c.batch_execute("INSERT INTO accounts (owner) VALUES ('split')")
        .await
        .expect("write in a read-write transaction");
    c.batch_execute("COMMIT").await.expect("commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_fall_back_to_the_primary_while_the_replica_is_down_and_return_when_it_is_back() {
    let mut p = pair(|_| {}).await;
    let c = p.connect("reporting", "acme").await;
    assert!(on_standby(&c).await);

    p.stop_standby();
    // The first read after the stop may be the one that finds the replica gone; none fails.
    for _ in 0..5 {
        assert!(!on_standby(&c).await, "served by the primary meanwhile");
    }
    let e = c
        .batch_execute("INSERT INTO accounts (owner) VALUES ('x')")
        .await
        .expect_err("still a read-only session on the primary");
    assert_eq!(sqlstate(&e).as_deref(), Some("25006"), "{}", pg_error(&e));
    let newcomer = p.connect("reporting", "acme").await;
    assert!(!on_standby(&newcomer).await);

    p.start_standby();
    eventually("reads return to the replica", || on_standby(&c)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_fallback_reads_get_a_clear_error_while_no_replica_is_usable() {
    let mut p = pair(|_| {}).await;
    // initech: session mode, replica_fallback = false.
    let c = p.connect("reporting", "initech").await;
    assert!(on_standby(&c).await);
    drop(c);

    p.stop_standby();
    let e = p
        .try_connect(&p.url("reporting", "initech"))
        .await
        .map(drop)
        .expect_err("no replica, no fallback");
    assert_eq!(sqlstate(&e).as_deref(), Some("57P03"), "{}", pg_error(&e));
    assert!(
        pg_error(&e).contains("no read replica of tenant \"initech\" is usable"),
        "{}",
        pg_error(&e)
    );
    // Its read-write role is not affected.
    let app = p.connect("app", "initech").await;
    assert!(!on_standby(&app).await);

    p.start_standby();
    eventually("the replica serves again", || async {
        match p.try_connect(&p.url("reporting", "initech")).await {
            Ok(c) => on_standby(&c).await,
            Err(_) => false,
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_lagging_beyond_replica_max_lag_is_skipped_until_it_catches_up() {
    let p = pair(|_| {}).await;
    let c = p.connect("reporting", "acme").await;
    assert!(on_standby(&c).await);

    let standby = p.standby.connect("postgres").await.expect("standby");
    standby
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .expect("pause replay");
    let primary = p.primary.connect("acme").await.expect("primary");
    // Keep writing, so the standby falls ever further behind (replica_max_lag is 1 s).
    let writer = tokio::spawn(async move {
        for i in 0..400 {
            let _ = primary
                .batch_execute(&format!("INSERT INTO accounts (owner) VALUES ('lag{i}')"))
                .await;
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    });
    eventually("reads leave the lagging replica", || async {
        !on_standby(&c).await
    })
    .await;

    standby
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .expect("resume replay");
    eventually("reads return to the caught-up replica", || on_standby(&c)).await;
    writer.abort();
}
