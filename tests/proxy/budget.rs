//! A server's connection budget: many tenants share it, it is never exceeded, a noisy tenant
//! cannot starve quiet ones, idle pools give their connections to busy ones, and each pool's
//! target follows its demand (SHOW POOLS).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::{admin_column, fixture, pg_error};
use pgtenant::config::{Config, TenantConfig};
use tokio_postgres::Client;

/// A proxy whose main server allows pgtenant `budget` connections, with `tenants` extra
/// database-tier tenants `<prefix>NN` (trusted backend role, `pool_size` 10), whose backend
/// connections carry `application_name = <prefix>` so the server can count them.
async fn budget_proxy(
    prefix: &str,
    tenants: usize,
    budget: u32,
    tweak: impl FnOnce(&mut Config),
) -> SocketAddr {
    let prefix = prefix.to_string();
    fixture()
        .extra_proxy(move |c| {
            let base = c
                .tenants
                .iter()
                .find(|t| t.id == "trustco")
                .cloned()
                .expect("trustco");
            for i in 0..tenants {
                let mut t: TenantConfig = base.clone();
                t.id = format!("{prefix}{i:02}");
                t.pool_size = Some(10);
                t.query_wait_timeout = Some(20);
                t.params.insert("application_name".into(), prefix.clone());
                c.tenants.push(t);
            }
            let main = c
                .servers
                .iter_mut()
                .find(|s| s.name == "main")
                .expect("main server");
            main.max_connections = Some(budget);
            tweak(c);
        })
        .await
}

async fn connect(addr: SocketAddr, tenant: &str) -> Client {
    let f = fixture();
    f.connect_str(&f.url_at(addr, tenant))
        .await
        .unwrap_or_else(|e| panic!("{tenant}: {}", pg_error(&e)))
}

/// `n` clients of `tenant`, each running `sql` in a loop until `stop`; any error fails the test.
fn busy_clients(
    addr: SocketAddr,
    tenant: &'static str,
    n: usize,
    sql: &'static str,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..n)
        .map(|_| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let c = connect(addr, tenant).await;
                while !stop.load(Ordering::Relaxed) {
                    if let Err(e) = c.simple_query(sql).await {
                        panic!("{tenant}: {}", pg_error(&e));
                    }
                }
            })
        })
        .collect()
}

/// Column `column` of SHOW POOLS for `tenant`'s primary pool.
async fn pool_column(addr: SocketAddr, tenant: &str, column: &str) -> String {
    admin_column(addr, "SHOW POOLS", ("tenant", tenant), column)
        .await
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no pool of {tenant}"))
}

/// The server's own count of pgtenant's connections tagged `app`.
async fn server_connections(direct: &Client, app: &str) -> usize {
    let n: i64 = direct
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .await
        .expect("count connections")
        .get(0);
    n as usize
}

/// Samples `server_connections` until `stop`; returns the highest count seen.
fn sample_peak(app: &'static str, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let direct = fixture().direct(0, "acme").await;
        let mut peak = 0;
        while !stop.load(Ordering::Relaxed) {
            peak = peak.max(server_connections(&direct, app).await);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        peak
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_budget_is_never_exceeded_by_fifty_tenants_of_ten_clients() {
    let addr = budget_proxy("bgt", 50, 20, |_| {}).await;
    let stop = Arc::new(AtomicBool::new(false));
    let peak = sample_peak("bgt", stop.clone());
    let done = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for t in 0..50 {
        for _ in 0..10 {
            let done = done.clone();
            clients.push(tokio::spawn(async move {
                let c = connect(addr, &format!("bgt{t:02}")).await;
                for _ in 0..3 {
                    c.simple_query("SELECT pg_sleep(0.01)")
                        .await
                        .unwrap_or_else(|e| panic!("bgt{t:02}: {}", pg_error(&e)));
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
    }
    for c in clients {
        c.await.expect("client");
    }
    stop.store(true, Ordering::Relaxed);
    let peak = peak.await.expect("sampler");
    assert_eq!(done.load(Ordering::Relaxed), 50 * 10 * 3);
    assert!(peak <= 20, "{peak} server connections on a budget of 20");
    assert!(peak > 0, "the sampler saw the load");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_noisy_tenant_cannot_starve_quiet_ones() {
    // The noisy tenant alone could hold the whole budget (its pool_size is 10).
    let addr = budget_proxy("nsy", 21, 10, |_| {}).await;
    let stop = Arc::new(AtomicBool::new(false));
    let noisy = busy_clients(addr, "nsy00", 100, "SELECT pg_sleep(0.05)", &stop);
    // Let the noisy tenant take everything first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut quiet = Vec::new();
    for t in 1..=20 {
        quiet.push(tokio::spawn(async move {
            let tenant = format!("nsy{t:02}");
            let c = connect(addr, &tenant).await;
            for _ in 0..10 {
                c.query_one("SELECT 1", &[])
                    .await
                    .unwrap_or_else(|e| panic!("{tenant}: {}", pg_error(&e)));
            }
            tenant
        }));
    }
    let mut finished = Vec::new();
    for q in quiet {
        finished.push(q.await.expect("quiet tenant"));
    }
    stop.store(true, Ordering::Relaxed);
    for n in noisy {
        n.await.expect("noisy client");
    }
    assert_eq!(
        finished.len(),
        20,
        "every quiet tenant ran its transactions"
    );
}

#[tokio::test]
async fn idle_connections_of_one_tenant_make_room_for_another() {
    // Idle connections would otherwise stay for ten minutes.
    let addr = budget_proxy("idl", 2, 4, |c| c.pool.server_idle_timeout = 600).await;
    let first: Vec<Client> =
        futures_util::future::join_all((0..4).map(|_| connect(addr, "idl00"))).await;
    // Four transactions at once: the first tenant opens the whole budget, then idles.
    futures_util::future::join_all(first.iter().map(|c| c.simple_query("SELECT pg_sleep(0.2)")))
        .await
        .into_iter()
        .for_each(|r| {
            r.expect("first tenant");
        });
    let direct = fixture().direct(0, "acme").await;
    assert_eq!(server_connections(&direct, "idl").await, 4);
    // The second tenant gets a connection: one of the idle ones is closed for it.
    let second = connect(addr, "idl01").await;
    second
        .query_one("SELECT 1", &[])
        .await
        .unwrap_or_else(|e| panic!("second tenant: {}", pg_error(&e)));
    let idle = pool_column(addr, "idl00", "sv_idle").await;
    assert_eq!(idle, "3", "one of the first tenant's idle connections went");
    assert!(server_connections(&direct, "idl").await <= 4);
}

#[tokio::test]
async fn a_pool_keeps_its_min_connections_open_and_reserved() {
    let addr = budget_proxy("min", 2, 3, |c| {
        for t in c.tenants.iter_mut().filter(|t| t.id == "min00") {
            t.min_idle = Some(2);
        }
    })
    .await;
    let direct = fixture().direct(0, "acme").await;
    // The first login makes the pool, which opens its minimum in the background.
    let _reserved = connect(addr, "min00").await;
    let mut open = 0;
    for _ in 0..100 {
        open = server_connections(&direct, "min").await;
        if open == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(open, 2, "min_connections opened");
    // Another tenant wants the whole budget: it gets the one slot left, never the reserved two.
    let other: Vec<Client> =
        futures_util::future::join_all((0..3).map(|_| connect(addr, "min01"))).await;
    let busy = futures_util::future::join_all(
        other.iter().map(|c| c.simple_query("SELECT pg_sleep(0.3)")),
    );
    let sample = async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        pool_column(addr, "min00", "sv_idle").await
    };
    let (results, reserved_idle) = tokio::join!(busy, sample);
    for r in results {
        r.expect("the other tenant's transactions run, one at a time");
    }
    assert_eq!(reserved_idle, "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_pools_reports_a_target_that_follows_demand() {
    let addr = budget_proxy("tgt", 1, 50, |_| {}).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = busy_clients(addr, "tgt00", 5, "SELECT pg_sleep(0.1)", &stop);
    let mut target = 0;
    let mut reason = String::new();
    // The loop ticks once a second.
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        target = pool_column(addr, "tgt00", "sv_target")
            .await
            .parse()
            .expect("number");
        reason = pool_column(addr, "tgt00", "target_reason").await;
        if target >= 5 {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.expect("load client");
    }
    assert!(target >= 5, "target {target} for five busy clients");
    assert!(
        reason == "clients waiting" || reason == "demand rose",
        "reason {reason}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_busy_row_tenant_does_not_make_its_group_neighbours_queue_behind_it() {
    // Row tenants share their group's connections: two of them here. In first-come order the
    // quiet tenant's transaction would wait behind the busy tenant's forty (about 4 s, over
    // its 2 s query_wait_timeout); fairness between tenants serves it next.
    let addr = fixture()
        .extra_proxy(|c| {
            c.pool.default_size = 2;
            for t in c.tenants.iter_mut() {
                if t.id == "hooli" {
                    t.query_wait_timeout = Some(2);
                }
            }
        })
        .await;
    let stop = Arc::new(AtomicBool::new(false));
    let noisy = busy_clients(addr, "swarm", 40, "SELECT pg_sleep(0.2)", &stop);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let quiet = connect(addr, "hooli").await;
    for _ in 0..5 {
        quiet
            .query_one("SELECT 1", &[])
            .await
            .unwrap_or_else(|e| panic!("the quiet row tenant: {}", pg_error(&e)));
    }
    stop.store(true, Ordering::Relaxed);
    for n in noisy {
        n.await.expect("busy row tenant's client");
    }
}
