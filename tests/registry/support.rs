//! Shared fixture for the registry tests: one throwaway cluster that holds registry databases
//! and tenants, a runtime that outlives every test's own for the proxies, and helpers to make
//! a registry (its own database, key file, migration directory and shared tier databases) per
//! test, so tests run in parallel without seeing each other's tenants.

#![allow(dead_code)]

#[path = "../common/keeper.rs"]
mod keeper;
#[path = "../common/pki.rs"]
mod pki;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pgtenant::cluster::PgCluster;
use pgtenant::config::{Config, RegistryConfig};
use pgtenant::proxy::{Proxy, ProxyHandle};
use pgtenant::tenancy::crypto::MasterKey;
use pgtenant::tenancy::store::RegistryStore;
use tokio_postgres::{Client, NoTls};

pub const BIN: &str = env!("CARGO_BIN_EXE_pgtenant");
pub const PASSWORD: &str = "tenant-pw-7Qx";

pub struct Fixture {
    pub host: String,
    pub port: u16,
    pub bindir: PathBuf,
    /// The cluster's server log.
    pub server_log: PathBuf,
    pub dir: tempfile::TempDir,
    /// The CA that signed the cluster's TLS certificate (for 127.0.0.1 and localhost): every
    /// registry, provisioning and tenant connection checks it (sslmode verify-full).
    pub ca: PathBuf,
    pub pki: pki::Pki,
    rt: Option<tokio::runtime::Handle>,
}

static FIXTURE: OnceLock<Fixture> = OnceLock::new();
static NEXT: AtomicUsize = AtomicUsize::new(0);

pub fn fixture() -> &'static Fixture {
    FIXTURE.get_or_init(|| {
        let (mut f, rt) = keeper::on_keeper_thread(|| async {
            let mut cluster = PgCluster::start().expect("start cluster");
            let pki = pki::Pki::new();
            let (cert, key) = pki.issue_pem("pg", &["localhost", "127.0.0.1"]);
            cluster.enable_tls(&cert, &key).expect("TLS on");
            let f = Fixture {
                host: cluster.host().to_string(),
                port: cluster.port(),
                bindir: cluster.bindir().to_path_buf(),
                server_log: cluster.dir().join("postgres.log"),
                dir: tempfile::tempdir().expect("tempdir"),
                ca: pki.ca_file(),
                pki,
                rt: None,
            };
            keeper::keep(cluster);
            f
        });
        f.rt = Some(rt);
        f
    })
}

/// A tenant's database, schema and login roles on its server.
#[derive(Debug, Clone)]
pub struct ServerNames {
    pub database: String,
    pub schema: Option<String>,
    /// The login role its client users map to.
    pub role: String,
    /// Every login role it holds (with a DDL role, that one too).
    pub roles: Vec<String>,
}

/// One test's registry: config file, keys, migrations directory.
pub struct Reg {
    pub name: String,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub config: Config,
}

pub const V1: &str = "CREATE TABLE accounts (
    id serial PRIMARY KEY, tenant_id text, owner text NOT NULL, balance numeric NOT NULL DEFAULT 0);";

impl Fixture {
    pub async fn admin(&self, db: &str) -> Client {
        let (c, conn) = tokio_postgres::connect(
            &format!(
                "host={} port={} user=postgres dbname={db}",
                self.host, self.port
            ),
            NoTls,
        )
        .await
        .expect("admin connect");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        c
    }

    /// A fresh registry named after `tag`, with V1 in its migrations and the cluster
    /// registered as server "main".
    pub async fn registry(&self, tag: &str) -> Reg {
        self.registry_at(tag, &self.host, self.port).await
    }

    /// Like `registry`, with the registry database on another server (host, port), whose
    /// superuser `postgres` is trusted; tenants still live on the fixture's cluster.
    pub async fn registry_at(&self, tag: &str, host: &str, port: u16) -> Reg {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("{tag}{n}");
        let dir = self.dir.path().join(&name);
        std::fs::create_dir_all(dir.join("migrations")).unwrap();
        std::fs::write(dir.join("migrations/V1__accounts.sql"), V1).unwrap();
        std::fs::write(dir.join("key"), MasterKey::generate_text()).unwrap();
        let (admin, conn) = tokio_postgres::connect(
            &format!("host={host} port={port} user=postgres dbname=postgres"),
            NoTls,
        )
        .await
        .expect("registry server");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        admin
            .batch_execute(&format!("CREATE DATABASE reg_{name}"))
            .await
            .unwrap();
        let mut config = Config::empty();
        config.listen = "127.0.0.1:0".parse().unwrap();
        let mut r = RegistryConfig::new(
            format!("host={host} port={port} user=postgres dbname=reg_{name}"),
            "file:key",
        );
        r.migrations = Some("migrations".into());
        r.schema_database = format!("schemas_{name}");
        r.row_database = format!("rows_{name}");
        r.resync_interval = 30;
        let on_fixture = host == self.host && port == self.port;
        if on_fixture {
            r.sslmode = Some(pgtenant::config::SslMode::VerifyFull);
            r.sslrootcert = Some(self.ca.clone());
        }
        config.registry = Some(r);
        let config_path = dir.join("proxy.toml");
        std::fs::write(&config_path, config.to_toml()).unwrap();
        let reg = Reg {
            name,
            dir,
            config: Config::load(&config_path).unwrap(),
            config_path,
        };
        let ca = self.ca.display().to_string();
        let out = reg.cli(&[
            "server",
            "add",
            "main",
            "--host",
            &self.host,
            "--port",
            &self.port.to_string(),
            "--sslmode",
            "verify-full",
            "--sslrootcert",
            &ca,
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        reg
    }

    /// A proxy for `config` on the fixture runtime, so it outlives the calling test's runtime.
    pub fn proxy(&self, config: Config) -> ProxyHandle {
        let (tx, rx) = std::sync::mpsc::channel();
        let rt = self.rt.as_ref().expect("fixture runtime");
        rt.spawn(async move {
            let p = Proxy::bind(config).await.expect("proxy starts");
            tx.send(p.spawn()).ok();
        });
        rx.recv_timeout(Duration::from_secs(30))
            .expect("proxy started")
    }

    pub fn pg_dump(&self) -> PathBuf {
        self.bindir.join("pg_dump")
    }
}

impl Reg {
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_env(args, None, &[])
    }

    pub fn cli_stdin(&self, args: &[&str], stdin: &str) -> Output {
        self.cli_env(args, Some(stdin), &[])
    }

    pub fn cli_env(&self, args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> Output {
        use std::io::Write;
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .arg("--config")
            .arg(&self.config_path)
            .env("RUST_LOG", "warn")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("run pgtenant");
        if let Some(s) = stdin {
            child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
        }
        child.wait_with_output().expect("pgtenant output")
    }

    /// `tenant create ID --tier T` with the test password for user `app`.
    pub fn create(&self, id: &str, tier: &str) {
        let out = self.cli_stdin(
            &[
                "tenant",
                "create",
                id,
                "--tier",
                tier,
                "--server",
                "main",
                "--password-stdin",
            ],
            PASSWORD,
        );
        assert!(out.status.success(), "create {id}: {}", stderr(&out));
    }

    pub async fn store(&self) -> RegistryStore {
        RegistryStore::open(self.config.registry.as_ref().unwrap())
            .await
            .expect("open registry")
    }

    /// What tenant `id`'s objects are called on the server, as the registry records them.
    pub async fn names(&self, id: &str) -> ServerNames {
        let store = self.store().await;
        let t = store.tenant(id).await.expect("tenant in the registry");
        let rows = store.tenant_rows(Some(&[id])).await.expect("tenant rows");
        let mut roles: Vec<String> = rows[0]
            .backend_roles
            .iter()
            .map(|r| r.name.clone())
            .collect();
        roles.sort();
        ServerNames {
            database: t.database,
            schema: t.schema,
            role: roles.first().cloned().expect("a login role"),
            roles,
        }
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.join(p)
    }
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Connects through a proxy as `<user>.<tenant>`.
pub async fn connect_as(proxy: std::net::SocketAddr, user: &str, tenant: &str) -> Client {
    let (c, conn) = tokio_postgres::connect(
        &format!(
            "host={} port={} user={user}.{tenant} dbname={tenant} password={PASSWORD}",
            proxy.ip(),
            proxy.port()
        ),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap_or_else(|e| panic!("connect {user}.{tenant}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    c
}

/// Connects through a proxy as `app.<tenant>`.
pub async fn connect(
    proxy: std::net::SocketAddr,
    tenant: &str,
) -> Result<Client, tokio_postgres::Error> {
    let (c, conn) = tokio_postgres::connect(
        &format!(
            "host={} port={} user=app.{tenant} dbname={tenant} password={PASSWORD}",
            proxy.ip(),
            proxy.port()
        ),
        NoTls,
    )
    .await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(c)
}

/// Retries `connect` until it succeeds (or returns the last error after `within`).
pub async fn connect_within(
    proxy: std::net::SocketAddr,
    tenant: &str,
    within: Duration,
) -> Result<Client, tokio_postgres::Error> {
    let deadline = Instant::now() + within;
    loop {
        match connect(proxy, tenant).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Waits until connecting fails with `code` (the registry change reached the proxy).
pub async fn refused_within(
    proxy: std::net::SocketAddr,
    tenant: &str,
    code: &str,
    within: Duration,
) -> String {
    let deadline = Instant::now() + within;
    loop {
        match connect(proxy, tenant).await {
            Err(e) if e.as_db_error().is_some_and(|d| d.code().code() == code) => {
                return e
                    .as_db_error()
                    .map(|d| d.message().to_string())
                    .unwrap_or_default();
            }
            other => {
                assert!(
                    Instant::now() < deadline,
                    "not refused with {code} in time: {:?}",
                    other.err()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

pub fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.as_db_error().map(|d| d.code().code().to_string())
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}

/// Waits (polling) until `ready` holds, failing with `what` after `within`.
pub async fn eventually(what: &str, within: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ready() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Rows of `accounts` in `db` with this owner, seen by the superuser (no RLS).
pub async fn rows_owned(f: &Fixture, db: &str, owner: &str) -> i64 {
    f.admin(db)
        .await
        .query_one("SELECT count(*) FROM accounts WHERE owner = $1", &[&owner])
        .await
        .expect("count rows")
        .get(0)
}
