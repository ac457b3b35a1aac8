//! The admin console: database `pgtenant`, for the config's admin users, through psql and
//! tokio-postgres.

use std::collections::HashMap;
use std::time::Duration;

use tokio_postgres::{Client, SimpleQueryMessage};

use crate::support::{fixture, pg_error, sqlstate, stderr, stdout, ADMIN, PASSWORD};

/// The rows of an admin command, as column → value maps, and its column names.
async fn show(c: &Client, cmd: &str) -> (Vec<String>, Vec<HashMap<String, Option<String>>>) {
    let msgs = c
        .simple_query(cmd)
        .await
        .unwrap_or_else(|e| panic!("{cmd}: {}", pg_error(&e)));
    let mut columns = Vec::new();
    let mut rows = Vec::new();
    for m in msgs {
        match m {
            SimpleQueryMessage::RowDescription(d) => {
                columns = d.iter().map(|c| c.name().to_string()).collect();
            }
            SimpleQueryMessage::Row(r) => {
                let names: Vec<String> = r.columns().iter().map(|c| c.name().to_string()).collect();
                rows.push(
                    names
                        .iter()
                        .enumerate()
                        .map(|(i, n)| (n.clone(), r.get(i).map(str::to_string)))
                        .collect(),
                );
            }
            _ => {}
        }
    }
    (columns, rows)
}

fn value(row: &HashMap<String, Option<String>>, col: &str) -> String {
    row.get(col)
        .cloned()
        .flatten()
        .unwrap_or_else(|| panic!("no {col} in {row:?}"))
}

/// Runs one console command through psql against the proxy at `addr`.
fn psql_admin(addr: std::net::SocketAddr, cmd: &str) -> std::process::Output {
    std::process::Command::new(&fixture().psql)
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-h"])
        .arg(addr.ip().to_string())
        .arg("-p")
        .arg(addr.port().to_string())
        .args(["-U", ADMIN, "-d", "pgtenant", "-c", cmd])
        .env("PGPASSWORD", PASSWORD)
        .output()
        .expect("psql")
}

#[tokio::test]
async fn every_admin_command_answers_psql() {
    let f = fixture();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("proxy.toml");
    let mut config = f.config.clone();
    config.listen = "127.0.0.1:0".parse().expect("addr");
    std::fs::write(&path, config.to_toml()).expect("config");
    let loaded = pgtenant::config::Config::load(&path).expect("load");
    let (addr, ctx) = f.extra_proxy_ctx(move |c| *c = loaded).await;
    ctx.config_path.set(path).expect("path");
    let _c = f.tenant_at(addr, "acme").await;
    for item in [
        "HELP", "VERSION", "CONFIG", "TENANTS", "POOLS", "CLIENTS", "SERVERS", "STATS", "USAGE",
        "HEALTH",
    ] {
        let out = psql_admin(addr, &format!("SHOW {item}"));
        assert!(out.status.success(), "SHOW {item}: {}", stderr(&out));
        assert!(
            stdout(&out).contains("row"),
            "SHOW {item}: {}",
            stdout(&out)
        );
    }
    for (cmd, tag) in [
        ("PAUSE acme", "PAUSE"),
        ("RESUME acme", "RESUME"),
        ("PAUSE", "PAUSE"),
        ("RESUME", "RESUME"),
        ("RELOAD", "RELOAD"),
        ("KILL acme", "KILL"),
        ("SHUTDOWN", "SHUTDOWN"),
    ] {
        let out = psql_admin(addr, cmd);
        assert!(out.status.success(), "{cmd}: {}", stderr(&out));
        assert_eq!(stdout(&out), tag, "{cmd}");
    }
}

#[tokio::test]
async fn show_pools_keeps_pgbouncers_columns_in_order_and_adds_tenant_columns() {
    let f = fixture();
    let _c = f.tenant("acme").await;
    let admin = f.admin_at(f.proxy).await;
    let (columns, rows) = show(&admin, "SHOW POOLS").await;
    let pgbouncer = [
        "database",
        "user",
        "cl_active",
        "cl_waiting",
        "cl_active_cancel_req",
        "cl_waiting_cancel_req",
        "sv_active",
        "sv_active_cancel",
        "sv_being_canceled",
        "sv_idle",
        "sv_used",
        "sv_tested",
        "sv_login",
        "maxwait",
        "maxwait_us",
        "pool_mode",
    ];
    assert_eq!(&columns[..pgbouncer.len()], pgbouncer);
    assert_eq!(
        &columns[pgbouncer.len()..],
        [
            "tenant",
            "tier",
            "server",
            "replica",
            "cl_pinned",
            "sv_target",
            "target_reason",
            "server_budget",
            "budget_used",
            "budget_waiting"
        ]
    );
    let acme = rows
        .iter()
        .find(|r| value(r, "tenant") == "acme")
        .expect("acme's pool");
    assert_eq!(value(acme, "user"), "app.acme");
    assert_eq!(value(acme, "tier"), "database");
}

#[tokio::test]
async fn show_stats_counts_exactly_the_transactions_and_queries_sent() {
    let f = fixture();
    let (addr, _ctx) = f.extra_proxy_ctx(|_| {}).await;
    let c = f.tenant_at(addr, "globex").await;
    for _ in 0..5 {
        c.batch_execute("SELECT 1").await.expect("select");
    }
    c.batch_execute("BEGIN; SELECT 1; SELECT 2; COMMIT")
        .await
        .expect("one more transaction");
    let admin = f.admin_at(addr).await;
    let (columns, rows) = show(&admin, "SHOW STATS").await;
    assert_eq!(
        columns[..3],
        ["database", "total_xact_count", "total_query_count"]
    );
    let g = rows
        .iter()
        .find(|r| value(r, "tenant") == "globex" && value(r, "user") == "app")
        .expect("globex's stats");
    assert_eq!(value(g, "total_xact_count"), "6");
    assert_eq!(value(g, "total_query_count"), "6");
    assert!(value(g, "total_received").parse::<u64>().expect("int") > 0);
    let (_, usage) = show(&admin, "SHOW USAGE").await;
    let u = usage
        .iter()
        .find(|r| value(r, "tenant") == "globex")
        .expect("globex's usage");
    assert_eq!(value(u, "transactions"), "6");
}

#[tokio::test]
async fn show_clients_and_servers_list_live_connections() {
    let f = fixture();
    let (addr, _ctx) = f.extra_proxy_ctx(|_| {}).await;
    let c = f
        .connect_str(&format!(
            "{} application_name=ledger-app",
            f.url_at(addr, "globex")
        ))
        .await
        .expect("connect");
    c.batch_execute("BEGIN").await.expect("begin");
    let pid: i32 = c
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    let admin = f.admin_at(addr).await;
    let (_, clients) = show(&admin, "SHOW CLIENTS").await;
    let mine = clients
        .iter()
        .find(|r| value(r, "application_name") == "ledger-app")
        .expect("our client");
    assert_eq!(value(mine, "state"), "active");
    assert_eq!(value(mine, "tenant"), "globex");
    let (_, servers) = show(&admin, "SHOW SERVERS").await;
    let ours = servers
        .iter()
        .find(|r| value(r, "remote_pid") == pid.to_string())
        .expect("our server connection");
    assert_eq!(value(ours, "state"), "active");
    assert_eq!(value(ours, "tenant"), "globex");
    c.batch_execute("COMMIT").await.expect("commit");
}

#[tokio::test]
async fn a_tenant_user_is_told_it_is_not_an_admin() {
    let f = fixture();
    let e = f
        .connect("app.acme", "pgtenant")
        .await
        .map(drop)
        .expect_err("not an admin");
    assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{}", pg_error(&e));
}

#[tokio::test]
async fn an_unknown_console_user_fails_like_a_wrong_password() {
    let f = fixture();
    let e = f
        .connect("nobody", "pgtenant")
        .await
        .map(drop)
        .expect_err("refused");
    assert_eq!(sqlstate(&e).as_deref(), Some("28P01"), "{}", pg_error(&e));
}

#[tokio::test]
async fn unknown_commands_and_extended_protocol_get_clear_errors() {
    let f = fixture();
    let admin = f.admin_at(f.proxy).await;
    let e = admin
        .simple_query("DROP TABLE accounts")
        .await
        .expect_err("not a command");
    assert_eq!(sqlstate(&e).as_deref(), Some("42601"), "{}", pg_error(&e));
    let e = admin
        .query("SHOW POOLS", &[])
        .await
        .expect_err("extended protocol");
    assert_eq!(sqlstate(&e).as_deref(), Some("0A000"), "{}", pg_error(&e));
    // The session is still usable.
    show(&admin, "SHOW VERSION").await;
}

#[tokio::test]
async fn pause_holds_one_tenants_new_transactions_until_resume_and_no_one_elses() {
    let f = fixture();
    let (addr, _ctx) = f.extra_proxy_ctx(|_| {}).await;
    let acme = f.tenant_at(addr, "acme").await;
    let globex = f.tenant_at(addr, "globex").await;
    let admin = f.admin_at(addr).await;
    admin.simple_query("PAUSE acme").await.expect("pause");
    let held = tokio::spawn(async move { acme.batch_execute("SELECT 1").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!held.is_finished(), "acme's transaction waits");
    globex
        .batch_execute("SELECT 1")
        .await
        .expect("globex is not paused");
    admin.simple_query("RESUME acme").await.expect("resume");
    tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("served after RESUME")
        .expect("join")
        .expect("query");
}

#[tokio::test]
async fn pause_returns_once_the_running_transaction_has_ended() {
    let f = fixture();
    let (addr, _ctx) = f.extra_proxy_ctx(|_| {}).await;
    let acme = f.tenant_at(addr, "acme").await;
    acme.batch_execute("BEGIN").await.expect("begin");
    let admin = f.admin_at(addr).await;
    let pause = tokio::spawn(async move { admin.simple_query("PAUSE acme").await.map(|_| admin) });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!pause.is_finished(), "PAUSE waits for the open transaction");
    acme.batch_execute("COMMIT").await.expect("commit");
    let admin = tokio::time::timeout(Duration::from_secs(10), pause)
        .await
        .expect("PAUSE returned")
        .expect("join")
        .expect("pause");
    admin.simple_query("RESUME").await.expect("resume");
}

#[tokio::test]
async fn kill_closes_a_tenants_clients_and_leaves_the_others() {
    let f = fixture();
    let (addr, _ctx) = f.extra_proxy_ctx(|_| {}).await;
    let acme = f.tenant_at(addr, "acme").await;
    let globex = f.tenant_at(addr, "globex").await;
    let admin = f.admin_at(addr).await;
    admin.simple_query("KILL acme").await.expect("kill");
    let e = acme.batch_execute("SELECT 1").await.expect_err("killed");
    assert!(
        sqlstate(&e).as_deref() == Some("57P01") || e.is_closed(),
        "{}",
        pg_error(&e)
    );
    globex.batch_execute("SELECT 1").await.expect("unaffected");
    // The tenant itself still serves new clients.
    f.tenant_at(addr, "acme").await;
}

#[tokio::test]
async fn reload_applies_a_changed_pool_size_to_the_running_proxy() {
    let f = fixture();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("proxy.toml");
    let mut config = f.config.clone();
    config.listen = "127.0.0.1:0".parse().expect("addr");
    let set_size = |config: &mut pgtenant::config::Config, n: u32| {
        for t in config.tenants.iter_mut().filter(|t| t.id == "acme") {
            t.pool_size = Some(n);
            t.query_wait_timeout = Some(2);
        }
    };
    set_size(&mut config, 1);
    std::fs::write(&path, config.to_toml()).expect("write config");
    let loaded = pgtenant::config::Config::load(&path).expect("load");
    let (addr, ctx) = f.extra_proxy_ctx(move |c| *c = loaded).await;
    ctx.config_path.set(path.clone()).expect("path");

    let holder = f.tenant_at(addr, "acme").await;
    let second = f.tenant_at(addr, "acme").await;
    holder.batch_execute("BEGIN").await.expect("begin");
    let e = second
        .batch_execute("SELECT 1")
        .await
        .expect_err("pool of one is taken");
    assert_eq!(sqlstate(&e).as_deref(), Some("57P03"), "{}", pg_error(&e));

    set_size(&mut config, 2);
    std::fs::write(&path, config.to_toml()).expect("rewrite config");
    let admin = f.admin_at(addr).await;
    admin.simple_query("RELOAD").await.expect("reload");
    let (_, tenants) = show(&admin, "SHOW TENANTS").await;
    let acme = tenants
        .iter()
        .find(|r| value(r, "tenant") == "acme")
        .expect("acme");
    assert_eq!(value(acme, "pool_size"), "2");
    second
        .batch_execute("SELECT 1")
        .await
        .expect("the second connection is allowed now");
    holder.batch_execute("COMMIT").await.expect("commit");
}

#[tokio::test]
async fn shutdown_tells_an_idle_session_mode_client_at_once() {
    let f = fixture();
    let (addr, _ctx) = f
        .extra_proxy_ctx(|c| {
            c.shutdown_timeout = 60;
            for t in c.tenants.iter_mut().filter(|t| t.id == "globex") {
                t.pool_mode = Some(pgtenant::config::PoolMode::Session);
            }
        })
        .await;
    let idle = f.tenant_at(addr, "globex").await;
    idle.batch_execute("SELECT 1").await.expect("select");
    let admin = f.admin_at(addr).await;
    let started = std::time::Instant::now();
    admin.simple_query("SHUTDOWN").await.expect("shutdown");
    tokio::time::timeout(Duration::from_secs(20), async {
        while !idle.is_closed() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the idle session was ended");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "not left for shutdown_timeout"
    );
}

#[tokio::test]
async fn shutdown_lets_running_transactions_commit_and_tells_idle_clients() {
    let f = fixture();
    let (addr, _ctx) = f.extra_proxy_ctx(|_| {}).await;
    let busy = f.tenant_at(addr, "faulty").await;
    busy.batch_execute("BEGIN; INSERT INTO accounts (owner) VALUES ('drained')")
        .await
        .expect("begin");
    let idle = f.tenant_at(addr, "faulty").await;
    let admin = f.admin_at(addr).await;
    admin.simple_query("SHUTDOWN").await.expect("shutdown");
    tokio::time::sleep(Duration::from_millis(300)).await;

    let e = idle
        .batch_execute("SELECT 1")
        .await
        .expect_err("told to go");
    assert!(
        sqlstate(&e).as_deref() == Some("57P01") || e.is_closed(),
        "{}",
        pg_error(&e)
    );
    busy.batch_execute("COMMIT")
        .await
        .expect("the running transaction may finish");
    assert!(
        f.connect_str(&f.url_at(addr, "faulty")).await.is_err(),
        "no new clients"
    );
    let direct = f.direct(0, "faulty").await;
    let n: i64 = direct
        .query_one("SELECT count(*) FROM accounts WHERE owner = 'drained'", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 1, "the drained transaction committed");
}

/// `pgtenant serve` as a process, with the fixture's config on a port of its own.
struct Served {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    config: pgtenant::config::Config,
    path: std::path::PathBuf,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn serve_process() -> Served {
    serve_process_with(|_| {})
}

fn serve_process_with(change: impl FnOnce(&mut pgtenant::config::Config)) -> Served {
    let f = fixture();
    let dir = tempfile::tempdir().expect("tempdir");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let mut config = f.config.clone();
    config.listen = format!("127.0.0.1:{port}").parse().expect("addr");
    config.shutdown_timeout = 20;
    change(&mut config);
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config.to_toml()).expect("config");
    let log = dir.path().join("pgtenant.log");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_pgtenant"))
        .args(["serve", "--config"])
        .arg(&path)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn pgtenant serve");
    let addr = config.listen;
    for _ in 0..200 {
        if std::net::TcpStream::connect(addr).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Served {
        child,
        addr,
        config,
        path,
        log,
        _dir: dir,
    }
}

#[tokio::test]
async fn json_logs_carry_the_session_and_report_slow_transactions_and_sighup_changes_the_level() {
    let f = fixture();
    let mut served = serve_process_with(|c| {
        c.log.format = pgtenant::config::LogFormat::Json;
        c.log.slow_transaction_ms = 100;
    });
    let c = f.tenant_at(served.addr, "globex").await;
    c.batch_execute("SELECT pg_sleep(0.3)").await.expect("slow");
    c.batch_execute("SELECT 1").await.expect("fast");
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = std::fs::read_to_string(&served.log).expect("log");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    let slow: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "slow transaction")
        .collect();
    assert_eq!(slow.len(), 1, "only the slow one: {text}");
    assert_eq!(slow[0]["fields"]["tenant"], "globex");
    assert_eq!(
        slow[0]["span"]["role"], "app",
        "the session's span: {}",
        slow[0]
    );
    assert!(slow[0]["span"]["client_id"].is_number());

    // The level is reloadable: at warn, session lines (info) stop.
    served.config.log.level = "warn".into();
    std::fs::write(&served.path, served.config.to_toml()).expect("rewrite");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(served.child.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("SIGHUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = std::fs::read_to_string(&served.log)
        .expect("log")
        .lines()
        .count();
    let c = f.tenant_at(served.addr, "globex").await;
    c.batch_execute("SELECT 1").await.expect("select");
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = std::fs::read_to_string(&served.log).expect("log");
    assert!(
        !after
            .lines()
            .skip(before)
            .any(|l| l.contains("session opened")),
        "{after}"
    );
    let _ = served.child.kill();
    let _ = served.child.wait();
}

#[tokio::test]
async fn sigterm_under_load_drains_and_loses_no_committed_transaction() {
    let _serial = crate::support::FAULTS.lock().await;
    let f = fixture();
    let mut served = serve_process();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for client in 0..20 {
        let c = f.tenant_at(served.addr, "faulty").await;
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let (mut committed, mut failed) = (Vec::new(), Vec::new());
            let mut seq = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && !c.is_closed() {
                seq += 1;
                let tag = format!("drain-{client}-{seq}");
                let r = async {
                    c.batch_execute("BEGIN").await?;
                    for leg in ["a", "b"] {
                        c.execute(
                            "INSERT INTO accounts (owner) VALUES ($1)",
                            &[&format!("{tag}-{leg}")],
                        )
                        .await?;
                    }
                    c.batch_execute("COMMIT").await
                }
                .await;
                match r {
                    Ok(()) => committed.push(tag),
                    Err(_) => {
                        let _ = c.batch_execute("ROLLBACK").await;
                        failed.push(tag);
                    }
                }
            }
            (committed, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(served.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let status = tokio::task::spawn_blocking(move || served.child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(
        status.success(),
        "pgtenant exits 0 after draining: {status:?}"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);

    let (mut committed, mut failed) = (Vec::new(), Vec::new());
    for t in tasks {
        let (c, fl) = t.await.expect("client");
        committed.extend(c);
        failed.extend(fl);
    }
    assert!(
        !committed.is_empty(),
        "transactions committed before the drain"
    );
    let direct = f.direct(0, "faulty").await;
    let rows = direct
        .query(
            "SELECT left(owner, length(owner) - 2), count(*) FROM accounts
              WHERE owner LIKE 'drain-%' GROUP BY 1",
            &[],
        )
        .await
        .expect("ledger");
    let mut present = std::collections::HashSet::new();
    for r in rows {
        let tag: String = r.get(0);
        assert_eq!(r.get::<_, i64>(1), 2, "{tag} was half-applied");
        present.insert(tag);
    }
    for tag in &committed {
        assert!(present.contains(tag), "committed {tag} is missing");
    }
    for tag in &failed {
        assert!(!present.contains(tag), "failed {tag} was applied");
    }
}
