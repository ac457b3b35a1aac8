#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pgtenant::cluster::PgCluster;
use pgtenant::config::{Config, PoolMode, ServerConfig, UserConfig};
use pgtenant::demo::{self, SampleTenant, DEMO_PASSWORD};
use pgtenant::proxy::{Proxy, ProxyHandle};
use tokio_postgres::{Client, NoTls};

pub use pgtenant::pg_error::describe_pg_error as pg_error;

/// A primary, its hot standby, and a pgtenant serving two tenants with the standby as their
/// read replica:
/// - `acme` (database tier, transaction mode, `read_write_split`), roles `app` and the
///   read-only `reporting`;
/// - `initech` (schema tier, session mode, no fallback to the primary), the same roles.
pub struct Pair {
    pub primary: PgCluster,
    pub standby: PgCluster,
    pub config: Config,
    pub proxy: ProxyHandle,
    /// acme's backend role.
    pub acme_role: String,
}

pub async fn pair(change: impl FnOnce(&mut Config)) -> Pair {
    let primary = blocking(PgCluster::start).expect("start primary");
    let tenants: Vec<SampleTenant> = demo::sample_tenants()
        .into_iter()
        .filter(|t| t.id == "acme" || t.id == "initech")
        .collect();
    let mut config = demo::provision(&[("main", &primary)], &tenants)
        .await
        .expect("provision");
    let acme_role = config.tenants[0].users[0].backend_user.clone();
    primary
        .connect("acme")
        .await
        .expect("connect acme")
        .batch_execute(&format!(
            "CREATE TABLE ledger (client int, seq int, leg int, PRIMARY KEY (client, seq, leg));
             GRANT SELECT, INSERT ON ledger TO {acme_role};"
        ))
        .await
        .expect("ledger table");
    let standby = blocking(|| PgCluster::start_standby(&primary)).expect("start standby");
    config.servers[0].replicas = vec!["standby".into()];
    config
        .servers
        .push(ServerConfig::new("standby", standby.host(), standby.port()));
    for t in config.tenants.iter_mut() {
        let reporting = UserConfig {
            name: "reporting".into(),
            read_only: true,
            auth: Default::default(),
            session_features: None,
            ..t.users[0].clone()
        };
        t.users.push(reporting);
        t.pool_size = Some(5);
        match t.id.as_str() {
            "acme" => t.read_write_split = true,
            _ => {
                t.pool_mode = Some(PoolMode::Session);
                t.replica_fallback = false;
            }
        }
    }
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.health.interval = 1;
    config.health.replica_max_lag = 1;
    config.pool.query_wait_timeout = 30;
    change(&mut config);
    let proxy = Proxy::bind(config.clone()).await.expect("bind").spawn();
    let pair = Pair {
        primary,
        standby,
        config,
        proxy,
        acme_role,
    };
    // The standby has caught up with the provisioning once it has its tables.
    let standby_db = pair.standby.connect("acme").await.expect("standby");
    eventually("the standby has the ledger table", || async {
        standby_db
            .query_one("SELECT to_regclass('ledger') IS NOT NULL", &[])
            .await
            .map(|r| r.get::<_, bool>(0))
            .unwrap_or(false)
    })
    .await;
    pair
}

impl Pair {
    pub fn addr(&self) -> SocketAddr {
        self.proxy.addr
    }

    pub fn url(&self, user: &str, tenant: &str) -> String {
        format!(
            "host={} port={} user={user}.{tenant} dbname={tenant} password={DEMO_PASSWORD}",
            self.addr().ip(),
            self.addr().port()
        )
    }

    pub async fn connect(&self, user: &str, tenant: &str) -> Client {
        self.try_connect(&self.url(user, tenant))
            .await
            .unwrap_or_else(|e| panic!("connect {user}.{tenant}: {}", pg_error(&e)))
    }

    pub async fn try_connect(&self, url: &str) -> Result<Client, tokio_postgres::Error> {
        let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// Stops the standby (fast shutdown).
    pub fn stop_standby(&mut self) {
        blocking(|| self.standby.shutdown());
    }

    pub fn start_standby(&mut self) {
        blocking(|| self.standby.start_again()).expect("restart standby");
    }
}

/// Whether the server that ran `c`'s last statement is a standby.
pub async fn on_standby(c: &Client) -> bool {
    c.query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap_or_else(|e| panic!("{}", pg_error(&e)))
        .get(0)
}

pub fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.as_db_error().map(|d| d.code().code().to_string())
}

/// Runs blocking cluster work without stalling the proxy on this runtime.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Waits up to 30 s for `check` to hold.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
