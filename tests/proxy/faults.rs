//! Server connections that die under a client: killed with pg_terminate_backend while the
//! client is idle, inside a transaction, or waiting for a result.

use std::time::Duration;

use pgtenant::config::PoolMode;
use tokio_postgres::Client;

use crate::support::{fixture, pg_error, sqlstate, text, FAULTS};

/// The pid of the server connection serving `c`'s current transaction or last statement.
async fn backend_pid(c: &Client) -> i32 {
    c.query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap_or_else(|e| panic!("{}", pg_error(&e)))
        .get(0)
}

/// Terminates server process `pid` and waits until it is gone.
async fn kill(pid: i32) {
    let direct = fixture().direct(0, "postgres").await;
    direct
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .expect("terminate");
    for _ in 0..200 {
        let n: i64 = direct
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .await
            .expect("count")
            .get(0);
        if n == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("backend {pid} did not exit");
}

#[tokio::test]
async fn an_idle_clients_killed_server_connection_goes_unnoticed() {
    let _serial = FAULTS.lock().await;
    let c = fixture().tenant("faulty").await;
    let pid = backend_pid(&c).await;
    kill(pid).await;
    // The dead connection is never handed out again: the next transaction gets a live one.
    let again = backend_pid(&c).await;
    assert_ne!(again, pid);
    assert_eq!(text(&c, "SELECT owner FROM accounts LIMIT 1").await, "Fay");
}

/// On one event loop a parked connection is checked by the reactor's readiness flag rather
/// than a peek at the socket (`Liveness::AfterWake`): one the server ended while it was parked
/// must still never be handed out. Several rounds, each killing the connection the last
/// statement used.
#[tokio::test]
async fn on_one_event_loop_a_connection_killed_while_parked_is_never_handed_out() {
    let _serial = FAULTS.lock().await;
    let f = fixture();
    let addr = f.one_loop_proxy();
    let c = f.tenant_at(addr, "faulty").await;
    for round in 0..10 {
        let pid = backend_pid(&c).await;
        kill(pid).await;
        let again = backend_pid(&c).await;
        assert_ne!(again, pid, "round {round}: a fresh server connection");
        assert_eq!(text(&c, "SELECT owner FROM accounts LIMIT 1").await, "Fay");
    }
}

/// The same with the extended protocol (tokio-postgres prepares, binds and executes in one
/// go), after an idle pause long enough for the reactor to have gone to sleep in epoll_wait.
#[tokio::test]
async fn on_one_event_loop_a_killed_parked_connection_is_skipped_for_an_extended_request() {
    let _serial = FAULTS.lock().await;
    let f = fixture();
    let addr = f.one_loop_proxy();
    let c = f.tenant_at(addr, "faulty").await;
    for round in 0..5 {
        let pid = backend_pid(&c).await;
        kill(pid).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let owner: String = c
            .query_one("SELECT owner FROM accounts WHERE owner = $1", &[&"Fay"])
            .await
            .unwrap_or_else(|e| panic!("round {round}: {}", pg_error(&e)))
            .get(0);
        assert_eq!(owner, "Fay");
    }
}

#[tokio::test]
async fn a_transaction_whose_server_connection_dies_fails_and_the_client_keeps_its_connection() {
    let _serial = FAULTS.lock().await;
    let c = fixture().tenant("faulty").await;
    c.batch_execute("BEGIN").await.expect("begin");
    c.batch_execute("INSERT INTO accounts (owner, balance) VALUES ('lost', 1)")
        .await
        .expect("insert");
    let pid = backend_pid(&c).await;
    kill(pid).await;

    let e = c
        .batch_execute("SELECT 1")
        .await
        .expect_err("the transaction is gone");
    assert_eq!(sqlstate(&e).as_deref(), Some("57P01"), "{}", pg_error(&e));
    // Like any failed transaction, it must be ended before anything else runs.
    let e = c
        .batch_execute("SELECT 1")
        .await
        .expect_err("still aborted");
    assert_eq!(sqlstate(&e).as_deref(), Some("25P02"), "{}", pg_error(&e));
    c.batch_execute("ROLLBACK").await.expect("rollback");

    assert_ne!(backend_pid(&c).await, pid, "a fresh server connection");
    let lost: i64 = c
        .query_one("SELECT count(*) FROM accounts WHERE owner = 'lost'", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(lost, 0, "nothing of the lost transaction was applied");
}

#[tokio::test]
async fn a_statement_running_when_its_server_connection_dies_gets_57p01_and_the_next_one_runs() {
    let _serial = FAULTS.lock().await;
    let f = fixture();
    let c = f.tenant("faulty").await;
    let sleeper = {
        let c = f.tenant("faulty").await;
        tokio::spawn(async move {
            let r = c.batch_execute("SELECT pg_sleep(30)").await;
            (r, c)
        })
    };
    let direct = f.direct(0, "postgres").await;
    let mut pid = None;
    for _ in 0..200 {
        let row = direct
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND datname = 'faulty'",
                &[],
            )
            .await
            .expect("find sleeper");
        if let Some(r) = row {
            pid = Some(r.get::<_, i32>(0));
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    kill(pid.expect("sleeper running")).await;
    let (r, sleeper_client) = sleeper.await.expect("join");
    let e = r.expect_err("the statement was killed");
    assert_eq!(sqlstate(&e).as_deref(), Some("57P01"), "{}", pg_error(&e));
    assert_eq!(
        text(&sleeper_client, "SELECT 'still here'").await,
        "still here"
    );
    assert_eq!(
        text(&c, "SELECT 'others unaffected'").await,
        "others unaffected"
    );
}

#[tokio::test]
async fn a_session_mode_clients_killed_server_connection_ends_its_session_with_57p01() {
    let _serial = FAULTS.lock().await;
    let f = fixture();
    let addr = f
        .extra_proxy(|c| {
            for t in c.tenants.iter_mut().filter(|t| t.id == "faulty") {
                t.pool_mode = Some(PoolMode::Session);
            }
        })
        .await;
    let c = f.tenant_at(addr, "faulty").await;
    let pid = backend_pid(&c).await;
    kill(pid).await;
    let e = c
        .batch_execute("SELECT 1")
        .await
        .expect_err("session is gone");
    assert!(
        sqlstate(&e).as_deref() == Some("57P01") || e.is_closed(),
        "{}",
        pg_error(&e)
    );
    let again = f.tenant_at(addr, "faulty").await;
    assert_ne!(backend_pid(&again).await, pid);
}
