//! Session pooling: cancel, concurrency, cleanup between clients, dead clients and backends.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pgtenant::config::PoolMode;

use crate::support::{
    assert_cancel_stops_pg_sleep, cancel_packet, fixture, pg_error, sqlstate, text, RawClient,
    PASSWORD, SCRATCH,
};

#[tokio::test]
async fn cancel_stops_a_running_pg_sleep() {
    assert_cancel_stops_pg_sleep(fixture().tenant("acme").await).await;
}

#[tokio::test]
async fn a_cancel_with_a_wrong_key_cancels_nothing() {
    let f = fixture();
    let c = f.tenant("globex").await;
    let sleeper = tokio::spawn(async move { c.batch_execute("SELECT pg_sleep(1.5)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    for pid in 1..50u32 {
        let mut raw = RawClient::connect(f.proxy).await;
        raw.send(&cancel_packet(pid, 12345)).await;
    }
    sleeper.await.unwrap().expect("the sleep finished normally");
}

#[tokio::test]
async fn fifty_concurrent_sessions_across_tenants_get_their_own_results() {
    let tenants = [
        ("acme", "acme", None),
        ("globex", "globex", None),
        ("initech", "schema_tenants", Some("initech")),
        ("umbrella", "schema_tenants", Some("umbrella")),
        ("hooli", "row_tenants", Some("hooli")),
        ("piedpiper", "row_tenants", Some("piedpiper")),
    ];
    let mut tasks = Vec::new();
    for i in 0..50 {
        let (tenant, db, marker) = tenants[i % tenants.len()];
        tasks.push(tokio::spawn(async move {
            let c = fixture().tenant(tenant).await;
            // The row tier's context: the tenant the server has bound this session to.
            let context = if db == "row_tenants" {
                "pgtenant_rls.tenant()"
            } else {
                "''"
            };
            let sql = format!(
                "SELECT current_database(), current_schemas(false)::text, \
                 coalesce({context}, ''), $1::int + 1"
            );
            for n in 0..20i32 {
                let row = c.query_one(&sql, &[&n]).await.unwrap();
                assert_eq!(row.get::<_, String>(0), db);
                let schemas: String = row.get(1);
                let setting: String = row.get(2);
                match marker {
                    Some(m) if db == "schema_tenants" => assert!(schemas.contains(m), "{schemas}"),
                    Some(m) => assert_eq!(setting, m),
                    None => assert_eq!(setting, ""),
                }
                assert_eq!(row.get::<_, i32>(3), n + 1);
            }
        }));
    }
    for t in tasks {
        t.await.expect("session task");
    }
}

/// The backend pids of scratch_app sessions and whether any holds a transaction or a lock.
async fn scratch_backend_state() -> (i64, i64) {
    let direct = fixture().direct(1, "scratch").await;
    let row = direct
        .query_one(
            "SELECT
               (SELECT count(*) FROM pg_stat_activity
                 WHERE usename = 'scratch_app' AND xact_start IS NOT NULL),
               (SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
                 WHERE c.relname = 'accounts' AND l.pid <> pg_backend_pid())",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

async fn scratch_balance() -> String {
    let direct = fixture().direct(1, "scratch").await;
    direct
        .query_one("SELECT sum(balance)::text FROM accounts", &[])
        .await
        .unwrap()
        .get(0)
}

async fn wait_for(
    mut cond: impl FnMut() -> futures_util::future::BoxFuture<'static, bool>,
) -> bool {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// psql reading a script from a pipe we keep open, so it can be killed mid-transaction.
fn psql_on_scratch(script: &str) -> std::process::Child {
    let f = fixture();
    let mut child = Command::new(&f.psql)
        .args([
            "-X",
            "-q",
            "-h",
            &f.proxy.ip().to_string(),
            "-p",
            &f.proxy.port().to_string(),
        ])
        .args(["-U", "app.scratch", "-d", "scratch"])
        .env("PGPASSWORD", PASSWORD)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("psql");
    child
        .stdin
        .as_mut()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    child
}

#[tokio::test]
async fn a_client_killed_mid_transaction_leaves_no_transaction_and_no_lock() {
    let _serial = SCRATCH.lock().await;
    let before = scratch_balance().await;
    let mut psql = psql_on_scratch("BEGIN;\nUPDATE accounts SET balance = balance + 1000;\n");
    assert!(
        wait_for(|| Box::pin(async { scratch_backend_state().await.1 > 0 })).await,
        "the update took its lock"
    );
    psql.kill().unwrap();
    let _ = psql.wait();
    assert!(
        wait_for(|| Box::pin(async { scratch_backend_state().await == (0, 0) })).await,
        "transaction and lock are gone: {:?}",
        scratch_backend_state().await
    );
    assert_eq!(
        scratch_balance().await,
        before,
        "the update was rolled back"
    );
}

#[tokio::test]
async fn a_client_killed_while_its_query_runs_leaves_nothing_running() {
    let _serial = SCRATCH.lock().await;
    let before = scratch_balance().await;
    let mut psql = psql_on_scratch(
        "BEGIN;\nUPDATE accounts SET balance = balance + 1000;\nSELECT pg_sleep(60);\n",
    );
    assert!(
        wait_for(|| Box::pin(async {
            let direct = fixture().direct(1, "scratch").await;
            let n: i64 = direct
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = 'scratch_app' AND query LIKE '%pg_sleep(60)%' AND state = 'active'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            n > 0
        }))
        .await,
        "the sleep is running"
    );
    psql.kill().unwrap();
    let _ = psql.wait();
    assert!(
        wait_for(|| Box::pin(async { scratch_backend_state().await == (0, 0) })).await,
        "query cancelled, transaction rolled back: {:?}",
        scratch_backend_state().await
    );
    assert_eq!(scratch_balance().await, before);
}

/// A proxy whose pools hold one backend each, so consecutive clients share it.
async fn single_backend_url(tenant: &str, mode: PoolMode) -> String {
    let addr = fixture()
        .extra_proxy(|c| {
            c.pool.mode = mode;
            // Row tenants share a group pool of this size.
            c.pool.default_size = 1;
            for t in c.tenants.iter_mut() {
                t.pool_size = Some(1);
            }
        })
        .await;
    format!(
        "host={} port={} user=app.{tenant} dbname={tenant} password={PASSWORD}",
        addr.ip(),
        addr.port()
    )
}

#[tokio::test]
async fn session_mode_state_does_not_reach_the_next_client_of_the_backend() {
    let f = fixture();
    let url = single_backend_url("acme", PoolMode::Session).await;
    let first = f.connect_str(&url).await.unwrap();
    first
        .batch_execute(
            "SET statement_timeout = '42s';
             CREATE TEMP TABLE leftover (x int);
             PREPARE leaked AS SELECT 1;
             SELECT pg_advisory_lock(4242);
             LISTEN leaked_channel;",
        )
        .await
        .unwrap();
    let first_pid: i32 = first
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    drop(first);

    let second = f.connect_str(&url).await.unwrap();
    let row = second
        .query_one(
            "SELECT pg_backend_pid(), current_setting('statement_timeout'),
                    (SELECT count(*) FROM pg_prepared_statements WHERE name = 'leaked'),
                    (SELECT count(*) FROM pg_class WHERE relname = 'leftover'),
                    (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'),
                    (SELECT count(*) FROM pg_listening_channels())",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, i32>(0),
        first_pid,
        "the same backend was reused"
    );
    assert_eq!(row.get::<_, String>(1), "0");
    assert_eq!(row.get::<_, i64>(2), 0, "no prepared statement left");
    assert_eq!(row.get::<_, i64>(3), 0, "no temp table left");
    assert_eq!(row.get::<_, i64>(4), 0, "no advisory lock left");
    assert_eq!(row.get::<_, i64>(5), 0, "no LISTEN left");
}

#[tokio::test]
async fn a_changed_search_path_is_back_to_the_tenants_schema_for_the_next_client() {
    let f = fixture();
    let url = single_backend_url("umbrella", PoolMode::Transaction).await;
    let first = f.connect_str(&url).await.unwrap();
    first
        .batch_execute("SET search_path = public")
        .await
        .unwrap();
    drop(first);
    let second = f.connect_str(&url).await.unwrap();
    assert_eq!(
        text(&second, "SELECT current_setting('search_path')").await,
        "\"umbrella\", public"
    );
}

#[tokio::test]
async fn a_row_tenants_tampering_does_not_reach_the_next_client_of_its_connection() {
    let f = fixture();
    let url = single_backend_url("hooli", PoolMode::Transaction).await;
    let first = f.connect_str(&url).await.unwrap();
    first
        .batch_execute("SET pgtenant.tenant_id = 'piedpiper'; SET pgtenant.binding = 'forged'")
        .await
        .unwrap();
    drop(first);
    let second = f.connect_str(&url).await.unwrap();
    let row = second
        .query_one(
            "SELECT pgtenant_rls.tenant(), (SELECT count(*) FROM accounts WHERE tenant_id <> 'hooli'), (SELECT count(*) FROM accounts)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some("hooli"));
    assert_eq!(row.get::<_, i64>(1), 0);
    assert!(row.get::<_, i64>(2) > 0);
}

#[tokio::test]
async fn startup_parameters_and_options_reach_the_session() {
    let f = fixture();
    let url = format!(
        "{} application_name=ledger-ui options='-c statement_timeout=1234 -c DateStyle=German'",
        f.url("app.acme", "acme")
    );
    let c = f.connect_str(&url).await.unwrap();
    let row = c
        .query_one(
            "SELECT current_setting('application_name'), current_setting('statement_timeout'), current_setting('DateStyle')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "ledger-ui");
    assert_eq!(row.get::<_, String>(1), "1234ms");
    assert!(row.get::<_, String>(2).starts_with("German"));
}

#[tokio::test]
async fn an_invalid_startup_setting_is_refused_with_the_servers_error() {
    let f = fixture();
    let url = format!("{} options='-c DateStyle=bogus'", f.url("app.acme", "acme"));
    let e = f.connect_str(&url).await.map(drop).expect_err("refused");
    assert_eq!(sqlstate(&e).as_deref(), Some("22023"), "{}", pg_error(&e));
    // The backend went back to the pool clean and the tenant still works.
    let c = f.tenant("acme").await;
    assert_eq!(text(&c, "SHOW DateStyle").await, "ISO, MDY");
}

#[tokio::test]
async fn session_mode_clients_beyond_the_pool_wait_then_get_57p03() {
    let f = fixture();
    let addr = f
        .extra_proxy(|c| {
            c.pool.mode = PoolMode::Session;
            for t in c.tenants.iter_mut() {
                t.pool_size = Some(1);
            }
            c.pool.query_wait_timeout = 1;
        })
        .await;
    let url = format!(
        "host={} port={} user=app.globex dbname=globex password={PASSWORD}",
        addr.ip(),
        addr.port()
    );
    let holder = f.connect_str(&url).await.unwrap();
    let e = f
        .connect_str(&url)
        .await
        .map(drop)
        .expect_err("no backend free");
    assert_eq!(sqlstate(&e).as_deref(), Some("57P03"), "{}", pg_error(&e));
    assert!(
        pg_error(&e).contains("waiting for a server connection"),
        "{}",
        pg_error(&e)
    );
    drop(holder);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let next = f.connect_str(&url).await.expect("the backend came back");
    next.query_one("SELECT 1", &[]).await.unwrap();
}
