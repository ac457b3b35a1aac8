//! A running proxy sees each kind of registry change without a restart.

use std::time::Duration;

use crate::support::*;

/// LISTEN/NOTIFY delivers changes in milliseconds; the margin is for a loaded CI machine.
const SOON: Duration = Duration::from_secs(3);

#[tokio::test]
async fn a_tenant_created_after_start_is_served() {
    let f = fixture();
    let reg = f.registry("hotnew").await;
    let proxy = f.proxy(reg.config.clone());
    let e = connect(proxy.addr, "hotnew-a").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("28P01"));
    reg.create("hotnew-a", "row");
    let c = connect_within(proxy.addr, "hotnew-a", SOON)
        .await
        .expect("served");
    let row = c
        .query_one("SELECT pgtenant_rls.tenant()", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "hotnew-a");
}

#[tokio::test]
async fn suspend_refuses_new_clients_and_resume_admits_them_again() {
    let f = fixture();
    let reg = f.registry("hotsusp").await;
    reg.create("hotsusp-a", "schema");
    let proxy = f.proxy(reg.config.clone());
    let kept = connect(proxy.addr, "hotsusp-a").await.expect("connect");
    assert!(reg
        .cli(&["tenant", "suspend", "hotsusp-a"])
        .status
        .success());
    let msg = refused_within(proxy.addr, "hotsusp-a", "55000", SOON).await;
    assert!(msg.contains("suspended"), "{msg}");
    // Without --terminate, connected clients carry on.
    kept.simple_query("SELECT 1")
        .await
        .expect("existing client unaffected");
    assert!(reg.cli(&["tenant", "resume", "hotsusp-a"]).status.success());
    connect_within(proxy.addr, "hotsusp-a", SOON)
        .await
        .expect("resumed");
}

#[tokio::test]
async fn suspend_with_terminate_closes_clients_and_rolls_back_their_transaction() {
    let f = fixture();
    let reg = f.registry("hotterm").await;
    reg.create("hotterm-a", "database");
    let proxy = f.proxy(reg.config.clone());
    let c = connect(proxy.addr, "hotterm-a").await.expect("connect");
    c.batch_execute("BEGIN; INSERT INTO accounts (owner) VALUES ('half-done')")
        .await
        .unwrap();
    let out = reg.cli(&["tenant", "suspend", "hotterm-a", "--terminate"]);
    assert!(out.status.success(), "{}", stderr(&out));
    eventually("client still connected", SOON, || c.is_closed()).await;
    assert!(c.simple_query("SELECT 1").await.is_err());
    let database = reg.names("hotterm-a").await.database;
    assert_eq!(
        rows_owned(f, &database, "half-done").await,
        0,
        "the open transaction was rolled back"
    );
}

#[tokio::test]
async fn a_terminated_client_is_told_why() {
    let f = fixture();
    let reg = f.registry("hotwhy").await;
    reg.create("hotwhy-a", "database");
    let proxy = f.proxy(reg.config.clone());
    // psql prints the FATAL a server sends before closing.
    let psql = f.bindir.join("psql");
    let url = format!(
        "postgresql://app.hotwhy-a:{PASSWORD}@{}:{}/hotwhy-a",
        proxy.addr.ip(),
        proxy.addr.port()
    );
    let child = tokio::process::Command::new(psql)
        .args(["-X", "-At", &url, "-c", "SELECT pg_sleep(30)"])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(reg
        .cli(&["tenant", "suspend", "hotwhy-a", "--terminate"])
        .status
        .success());
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("psql ended")
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tenant \"hotwhy-a\" was suspended"), "{err}");
}

#[tokio::test]
async fn a_deleted_tenant_is_refused_as_unknown() {
    let f = fixture();
    let reg = f.registry("hotdel").await;
    reg.create("hotdel-a", "schema");
    let proxy = f.proxy(reg.config.clone());
    connect(proxy.addr, "hotdel-a").await.expect("connect");
    let out = reg.cli(&["tenant", "delete", "hotdel-a"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let msg = refused_within(proxy.addr, "hotdel-a", "28P01", SOON).await;
    assert!(msg.contains("password authentication failed"), "{msg}");
}

/// Backend pids seen by `n` clients that each hold a transaction for a moment at once.
async fn concurrent_backends(
    proxy: std::net::SocketAddr,
    tenant: &str,
    n: usize,
) -> std::collections::HashSet<i32> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let tenant = tenant.to_string();
        tasks.push(tokio::spawn(async move {
            let mut c = connect(proxy, &tenant).await.expect("connect");
            let tx = c.transaction().await.unwrap();
            let pid: i32 = tx
                .query_one("SELECT pg_backend_pid()", &[])
                .await
                .unwrap()
                .get(0);
            tx.batch_execute("SELECT pg_sleep(0.3)").await.unwrap();
            tx.commit().await.unwrap();
            pid
        }));
    }
    let mut pids = std::collections::HashSet::new();
    for t in tasks {
        pids.insert(t.await.unwrap());
    }
    pids
}

#[tokio::test]
async fn a_pool_size_change_applies_to_the_running_proxy() {
    let f = fixture();
    let reg = f.registry("hotpool").await;
    reg.create("hotpool-a", "database");
    let proxy = f.proxy(reg.config.clone());
    assert!(concurrent_backends(proxy.addr, "hotpool-a", 3).await.len() > 1);
    let out = reg.cli(&["tenant", "update", "hotpool-a", "--pool-size", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    eventually("pool size change not seen", SOON, || {
        proxy.ctx.registry.tenant("hotpool-a").map(|t| t.pool_size) == Some(1)
    })
    .await;
    assert_eq!(
        concurrent_backends(proxy.addr, "hotpool-a", 3).await.len(),
        1
    );
}

#[tokio::test]
async fn rotated_backend_credentials_are_used_without_a_restart() {
    let f = fixture();
    let reg = f.registry("hotcred").await;
    reg.create("hotcred-a", "row");
    let proxy = f.proxy(reg.config.clone());
    let before = connect(proxy.addr, "hotcred-a").await.expect("connect");
    before.simple_query("SELECT 1").await.unwrap();
    let out = reg.cli(&["tenant", "update", "hotcred-a", "--rotate-password"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Connections opened from now on need the new password; the proxy has it.
    let admin = f.admin("postgres").await;
    // Row tenants of one database share its login role.
    let role = format!("{}.app", reg.config.registry.as_ref().unwrap().row_database);
    let killed = admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
            &[&role],
        )
        .await
        .unwrap();
    assert!(killed > 0, "the tenant's server connections were found");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = connect_within(proxy.addr, "hotcred-a", SOON)
        .await
        .expect("connect");
    let rows = c
        .query("SELECT 1", &[])
        .await
        .expect("a backend opened with the new password");
    assert_eq!(rows.len(), 1);
}

#[tokio::test]
async fn several_proxies_sharing_a_registry_all_see_a_change() {
    let f = fixture();
    let reg = f.registry("hotmany").await;
    reg.create("hotmany-a", "database");
    let one = f.proxy(reg.config.clone());
    let two = f.proxy(reg.config.clone());
    connect(one.addr, "hotmany-a").await.expect("first proxy");
    connect(two.addr, "hotmany-a").await.expect("second proxy");
    assert!(reg
        .cli(&["tenant", "suspend", "hotmany-a"])
        .status
        .success());
    refused_within(one.addr, "hotmany-a", "55000", SOON).await;
    refused_within(two.addr, "hotmany-a", "55000", SOON).await;
}

#[tokio::test]
async fn the_proxy_reconnects_to_a_restarted_registry_and_catches_up() {
    let f = fixture();
    let mut registry_server = pgtenant::cluster::PgCluster::start().expect("registry cluster");
    let reg = f
        .registry_at("hotrestart", registry_server.host(), registry_server.port())
        .await;
    reg.create("hotrestart-a", "schema");
    let proxy = f.proxy(reg.config.clone());
    connect(proxy.addr, "hotrestart-a").await.expect("connect");

    registry_server.restart().expect("restart the registry");
    // Served from the last snapshot while the registry was away.
    connect(proxy.addr, "hotrestart-a")
        .await
        .expect("served meanwhile");
    assert!(reg
        .cli(&["tenant", "suspend", "hotrestart-a"])
        .status
        .success());
    // Backoff tops out at 5 s between attempts; the reload on reconnect brings the change.
    refused_within(proxy.addr, "hotrestart-a", "55000", Duration::from_secs(15)).await;
}

#[tokio::test]
async fn terminate_also_closes_session_mode_clients() {
    let f = fixture();
    let reg = f.registry("hotsess").await;
    let out = reg.cli_stdin(
        &[
            "tenant",
            "create",
            "hotsess-a",
            "--tier",
            "row",
            "--server",
            "main",
            "--pool-mode",
            "session",
            "--password-stdin",
        ],
        PASSWORD,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let proxy = f.proxy(reg.config.clone());
    let c = connect(proxy.addr, "hotsess-a").await.expect("connect");
    c.batch_execute("BEGIN; INSERT INTO accounts (owner) VALUES ('half-done')")
        .await
        .unwrap();
    assert!(reg
        .cli(&["tenant", "suspend", "hotsess-a", "--terminate"])
        .status
        .success());
    eventually("session-mode client still connected", SOON, || {
        c.is_closed()
    })
    .await;
    let r = reg.config.registry.as_ref().unwrap();
    assert_eq!(
        rows_owned(f, &r.row_database, "half-done").await,
        0,
        "the open transaction was rolled back"
    );
}
