//! Shared test fixture: two throwaway PostgreSQL clusters with the sample tenants (plus a few
//! made for particular tests) and a pgtenant serving them, on a runtime of its own so it
//! outlives every test's runtime. Built once per test binary; torn down at process exit.

#![allow(dead_code)]

#[path = "../common/keeper.rs"]
mod keeper;

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::sync::OnceLock;

use pgtenant::cluster::PgCluster;
use pgtenant::config::{Config, TenantConfig, TenantStatus, Tier, UserConfig};
use pgtenant::credentials::hash_password;
use pgtenant::demo::{self, SampleTenant, DEMO_PASSWORD, DEMO_ROLE};
use pgtenant::proxy::{Proxy, ProxyContext};
use pgtenant::secret::Secret;
use std::sync::Arc;
use tokio_postgres::{Client, NoTls};

pub const PASSWORD: &str = DEMO_PASSWORD;
/// The admin console's user (password `PASSWORD`).
pub const ADMIN: &str = "admin";

/// Tests that watch or load the scratch tenant's backends run one at a time.
pub static SCRATCH: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
/// Tests that kill the faulty tenant's server connections run one at a time.
pub static FAULTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
/// Held for writing while a test leaves defaults on the row tier's shared login role, which a
/// hot standby cannot clear (its row-tier logins are refused meanwhile); tests on the standby
/// hold it for reading.
pub static ROLE_DEFAULTS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());
/// The name of the main server's hot standby in the configs.
pub const STANDBY: &str = "main-standby";

pub struct Fixture {
    pub proxy: SocketAddr,
    pub config: Config,
    /// (host, port) of each cluster: 0 = "main", 1 = "second".
    pub servers: Vec<(String, u16)>,
    /// Unix-socket directory of each cluster.
    pub socket_dirs: Vec<std::path::PathBuf>,
    pub psql: std::path::PathBuf,
    pub pgbench: std::path::PathBuf,
    /// A proxy over the same tenants whose row tenants run on the main server's hot standby
    /// (read-only users, no fallback to the primary), its config, and the standby's address.
    pub standby_proxy: SocketAddr,
    pub standby_config: Config,
    pub standby: (String, u16),
    rt: tokio::runtime::Handle,
    /// Dropping the handles would stop the proxies.
    _proxy: pgtenant::proxy::ProxyHandle,
    _standby_proxy: pgtenant::proxy::ProxyHandle,
}

static FIXTURE: OnceLock<Fixture> = OnceLock::new();

pub fn fixture() -> &'static Fixture {
    FIXTURE.get_or_init(|| keeper::on_keeper_thread(build).0)
}

async fn build() -> Fixture {
    let main = PgCluster::start().expect("start cluster main");
    let second = PgCluster::start().expect("start cluster second");
    let mut tenants = demo::sample_tenants();
    // globex lives on the second server: database-tier tenants on different servers.
    for t in tenants.iter_mut() {
        if t.id == "globex" {
            t.server = 1;
        }
    }
    tenants.push(SampleTenant {
        id: "dormant",
        tier: Tier::Database,
        server: 0,
        owners: &["Dora"],
    });
    tenants.push(SampleTenant {
        id: "scratch",
        tier: Tier::Database,
        server: 1,
        owners: &["Sam"],
    });
    // Tenants that stress tests may fill with rows, one per tier.
    for (id, tier) in [
        ("crowd", Tier::Database),
        ("bulk", Tier::Schema),
        ("swarm", Tier::Row),
    ] {
        tenants.push(SampleTenant {
            id,
            tier,
            server: 0,
            owners: &["Zed"],
        });
    }
    // A tenant whose server connections the fault tests kill.
    tenants.push(SampleTenant {
        id: "faulty",
        tier: Tier::Database,
        server: 0,
        owners: &["Fay"],
    });
    // A row tenant whose hostile tests may unbind its own connections (they then see nothing).
    tenants.push(SampleTenant {
        id: "mallory",
        tier: Tier::Row,
        server: 0,
        owners: &["Mal", "Mia"],
    });
    let mut config = demo::provision(&[("main", &main), ("second", &second)], &tenants)
        .await
        .expect("provision sample tenants");
    for t in config.tenants.iter_mut() {
        t.pool_size = Some(8);
        if t.id == "dormant" {
            t.status = TenantStatus::Suspended;
        }
    }
    add_auth_method_tenants(&main, &mut config).await;
    config.admin.users.push(pgtenant::config::AdminUserConfig {
        name: ADMIN.into(),
        scram: hash_password(PASSWORD),
    });
    // pgbench -i creates its tables through the proxy.
    second
        .connect("scratch")
        .await
        .expect("connect scratch")
        .batch_execute("GRANT CREATE ON SCHEMA public TO scratch_app")
        .await
        .expect("grant create");
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.pool.query_wait_timeout = 30;
    // The shared proxy refuses session features in transaction mode (the refusal tests);
    // tests of pinning, the default, start a proxy of their own.
    config.pool.session_features = pgtenant::config::SessionFeatures::Refuse;
    let servers = vec![
        (main.host().to_string(), main.port()),
        (second.host().to_string(), second.port()),
    ];
    let socket_dirs = vec![main.dir().to_path_buf(), second.dir().to_path_buf()];
    let psql = main.program("psql");
    let pgbench = main.program("pgbench");
    let proxy = Proxy::bind(config.clone())
        .await
        .expect("bind proxy")
        .spawn();
    let standby = PgCluster::start_standby(&main).expect("start standby of main");
    let mut standby_config = config.clone();
    standby_config
        .servers
        .push(pgtenant::config::ServerConfig::new(
            STANDBY,
            standby.host(),
            standby.port(),
        ));
    for t in standby_config
        .tenants
        .iter_mut()
        .filter(|t| t.tier == Tier::Row)
    {
        t.replicas = Some(vec![STANDBY.into()]);
        t.replica_fallback = false;
        for u in t.users.iter_mut() {
            u.read_only = true;
        }
    }
    let standby_proxy = Proxy::bind(standby_config.clone())
        .await
        .expect("bind standby proxy")
        .spawn();
    let standby_addr = (standby.host().to_string(), standby.port());
    keeper::keep(main);
    keeper::keep(second);
    keeper::keep(standby);
    Fixture {
        proxy: proxy.addr,
        _proxy: proxy,
        standby_proxy: standby_proxy.addr,
        _standby_proxy: standby_proxy,
        standby_config,
        standby: standby_addr,
        config,
        servers,
        socket_dirs,
        psql,
        pgbench,
        rt: tokio::runtime::Handle::current(),
    }
}

/// Tenants whose backend roles log in with md5, or are trusted (no password), each with a
/// database of its own on the main server (a database-tier tenant shares its database with
/// nobody).
async fn add_auth_method_tenants(main: &PgCluster, config: &mut Config) {
    let admin = main.connect("postgres").await.expect("connect postgres");
    admin
        .batch_execute(
            "SET password_encryption = 'md5';
             CREATE ROLE md5_app LOGIN PASSWORD 'md5-secret';
             RESET password_encryption;
             CREATE ROLE pgtenant_trust NOLOGIN;
             CREATE ROLE trust_app LOGIN IN ROLE pgtenant_trust;",
        )
        .await
        .expect("auth-method roles");
    for (database, role) in [("md5co", "md5_app"), ("trustco", "trust_app")] {
        admin
            .batch_execute(&format!("CREATE DATABASE {database}"))
            .await
            .expect("auth-method database");
        admin
            .batch_execute(&format!(
                "REVOKE ALL ON DATABASE {database} FROM PUBLIC;
                 GRANT CONNECT ON DATABASE {database} TO {role}"
            ))
            .await
            .expect("grant");
    }
    let base = config
        .tenants
        .iter()
        .find(|t| t.id == "acme")
        .cloned()
        .expect("acme");
    for (id, role, password) in [
        ("md5co", "md5_app", Some("md5-secret")),
        ("trustco", "trust_app", None),
    ] {
        config.tenants.push(TenantConfig {
            id: id.into(),
            database: id.into(),
            users: vec![UserConfig {
                name: DEMO_ROLE.into(),
                scram: hash_password(PASSWORD),
                backend_user: role.into(),
                backend_password: password.map(Secret::new),
                backend_password_env: None,
                read_only: false,
                auth: Default::default(),
                session_features: None,
            }],
            ..base.clone()
        });
    }
    // A tenant whose server is down.
    config.servers.push(pgtenant::config::ServerConfig::new(
        "ghost",
        "127.0.0.1",
        closed_port(),
    ));
    config.tenants.push(TenantConfig {
        id: "ghostco".into(),
        server: "ghost".into(),
        // Its clients wait this long for the server to come up before they are refused.
        query_wait_timeout: Some(2),
        ..base
    });
}

fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

impl Fixture {
    /// libpq-style connection string through the proxy.
    pub fn url(&self, user: &str, database: &str) -> String {
        format!(
            "host={} port={} user={user} dbname={database} password={PASSWORD}",
            self.proxy.ip(),
            self.proxy.port()
        )
    }

    /// Connects through the proxy as `app.<tenant>` to database `<tenant>`.
    pub async fn tenant(&self, tenant: &str) -> Client {
        self.connect(&format!("{DEMO_ROLE}.{tenant}"), tenant)
            .await
            .unwrap_or_else(|e| panic!("connect to {tenant}: {}", pg_error(&e)))
    }

    /// Like `tenant`, through the proxy at `addr`.
    pub async fn tenant_at(&self, addr: SocketAddr, tenant: &str) -> Client {
        self.connect_str(&self.url_at(addr, tenant))
            .await
            .unwrap_or_else(|e| panic!("connect {tenant}: {}", pg_error(&e)))
    }

    pub async fn connect(
        &self,
        user: &str,
        database: &str,
    ) -> Result<Client, tokio_postgres::Error> {
        self.connect_str(&self.url(user, database)).await
    }

    pub async fn connect_str(&self, url: &str) -> Result<Client, tokio_postgres::Error> {
        let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// A superuser connection straight to cluster `server`, bypassing the proxy.
    pub async fn direct(&self, server: usize, database: &str) -> Client {
        let (host, port) = &self.servers[server];
        Self::direct_to(host, *port, database).await
    }

    /// A superuser connection straight to the main server's hot standby.
    pub async fn direct_standby(&self, database: &str) -> Client {
        Self::direct_to(&self.standby.0, self.standby.1, database).await
    }

    async fn direct_to(host: &str, port: u16, database: &str) -> Client {
        let url = format!("host={host} port={port} user=postgres dbname={database}");
        let (client, conn) = tokio_postgres::connect(&url, NoTls)
            .await
            .expect("direct connection");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }

    /// Runs psql through the proxy with the demo password.
    pub fn psql(&self, user: &str, database: &str, args: &[&str]) -> Output {
        Command::new(&self.psql)
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg("-h")
            .arg(self.proxy.ip().to_string())
            .arg("-p")
            .arg(self.proxy.port().to_string())
            .arg("-U")
            .arg(user)
            .arg("-d")
            .arg(database)
            .args(args)
            .env("PGPASSWORD", PASSWORD)
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .expect("run psql")
    }

    /// Another proxy serving every tenant in session mode.
    pub async fn session_proxy(&self) -> SocketAddr {
        self.extra_proxy(|c| {
            for t in c.tenants.iter_mut() {
                t.pool_mode = Some(pgtenant::config::PoolMode::Session);
            }
        })
        .await
    }

    /// Starts another proxy over the same tenants with a changed config.
    pub async fn extra_proxy(&self, change: impl FnOnce(&mut Config)) -> SocketAddr {
        self.extra_proxy_ctx(change).await.0
    }

    /// Starts another proxy over the same tenants on a runtime of one thread of its own, as
    /// the binary serves with `worker_threads = 1` (the default); the fixture's proxies share
    /// a multi-threaded runtime.
    pub fn one_loop_proxy(&self) -> SocketAddr {
        let config = self.config.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("one-loop proxy".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("one-loop runtime");
                rt.block_on(async move {
                    let handle = Proxy::bind(config)
                        .await
                        .expect("bind one-loop proxy")
                        .spawn();
                    let _ = tx.send(handle.addr);
                    // Keep serving for the rest of the test binary.
                    std::mem::forget(handle);
                    std::future::pending::<()>().await
                })
            })
            .expect("one-loop proxy thread");
        rx.recv_timeout(std::time::Duration::from_secs(30))
            .expect("one-loop proxy started")
    }

    /// Like `extra_proxy`, also returning the proxy's shared context for inspection.
    pub async fn extra_proxy_ctx(
        &self,
        change: impl FnOnce(&mut Config),
    ) -> (SocketAddr, Arc<ProxyContext>) {
        self.proxy_with(self.config.clone(), change).await
    }

    /// Like `extra_proxy`, with row tenants on the standby as in `standby_proxy`.
    pub async fn extra_standby_proxy(&self, change: impl FnOnce(&mut Config)) -> SocketAddr {
        self.proxy_with(self.standby_config.clone(), change).await.0
    }

    async fn proxy_with(
        &self,
        mut config: Config,
        change: impl FnOnce(&mut Config),
    ) -> (SocketAddr, Arc<ProxyContext>) {
        change(&mut config);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.rt.spawn(async move {
            let handle = Proxy::bind(config).await.expect("bind extra proxy").spawn();
            let _ = tx.send((handle.addr, handle.ctx.clone()));
            // Keep serving for the rest of the test binary.
            std::mem::forget(handle);
        });
        rx.await.expect("extra proxy started")
    }

    /// An admin console connection to the proxy at `addr`.
    pub async fn admin_at(&self, addr: SocketAddr) -> Client {
        self.connect_str(&format!(
            "host={} port={} user={ADMIN} dbname=pgtenant password={PASSWORD}",
            addr.ip(),
            addr.port()
        ))
        .await
        .unwrap_or_else(|e| panic!("admin console: {}", pg_error(&e)))
    }

    /// Connection string through the proxy at `addr` as `app.<tenant>`.
    pub fn url_at(&self, addr: SocketAddr, tenant: &str) -> String {
        format!(
            "host={} port={} user={DEMO_ROLE}.{tenant} dbname={tenant} password={PASSWORD}",
            addr.ip(),
            addr.port()
        )
    }
}

/// Column `column` of the rows of admin command `command` (on the proxy at `addr`) whose
/// column `key` is `value`.
pub async fn admin_column(
    addr: SocketAddr,
    command: &str,
    (key, value): (&str, &str),
    column: &str,
) -> Vec<String> {
    let admin = fixture().admin_at(addr).await;
    let rows = admin.simple_query(command).await.expect("admin command");
    rows.iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) if r.get(key) == Some(value) => {
                r.get(column).map(str::to_string)
            }
            _ => None,
        })
        .collect()
}

/// The single text value a query returns.
/// Runs `pg_sleep(30)` on `c`, cancels it after half a second and checks it stopped with 57014.
pub async fn assert_cancel_stops_pg_sleep(c: Client) {
    let token = c.cancel_token();
    let started = std::time::Instant::now();
    let sleeper = tokio::spawn(async move { c.batch_execute("SELECT pg_sleep(30)").await });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    token.cancel_query(NoTls).await.expect("send cancel");
    let e = sleeper.await.unwrap().expect_err("query was cancelled");
    assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{}", pg_error(&e));
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
}

pub async fn text(c: &Client, sql: &str) -> String {
    c.query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {}", pg_error(&e)))
        .get(0)
}

/// The server's message and SQLSTATE of an error, or its Display.
pub fn pg_error(e: &tokio_postgres::Error) -> String {
    pgtenant::pg_error::describe_pg_error(e)
}

/// SQLSTATE of an error returned through the proxy.
pub fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.as_db_error().map(|d| d.code().code().to_string())
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_string()
}

/// A hand-driven protocol client, for what real drivers never send.
pub struct RawClient {
    pub stream: tokio::net::TcpStream,
    buf: bytes::BytesMut,
    /// (process id, secret) from BackendKeyData, once logged in.
    pub key: Option<(u32, u32)>,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> RawClient {
        RawClient {
            stream: tokio::net::TcpStream::connect(addr)
                .await
                .expect("connect proxy"),
            buf: bytes::BytesMut::new(),
            key: None,
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Startup packet with protocol `version` and `params`.
    pub fn startup_packet(version: u32, params: &[(&str, &str)]) -> Vec<u8> {
        let mut body = version.to_be_bytes().to_vec();
        for (k, v) in params {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut pkt = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        pkt.extend(body);
        pkt
    }

    /// Reads one byte (the answer to SSLRequest / GSSENCRequest).
    pub async fn read_byte(&mut self) -> Option<u8> {
        use tokio::io::AsyncReadExt;
        let mut b = [0u8; 1];
        match tokio::time::timeout(
            std::time::Duration::from_secs(10),
            self.stream.read_exact(&mut b),
        )
        .await
        {
            Ok(Ok(_)) => Some(b[0]),
            _ => None,
        }
    }

    /// Next message as (tag, body), or None when the proxy closed the connection.
    pub async fn read_message(&mut self) -> Option<(u8, Vec<u8>)> {
        read_message_from(&mut self.stream, &mut self.buf).await
    }

    /// Reads until an ErrorResponse and returns its SQLSTATE and message.
    pub async fn read_error(&mut self) -> Option<(String, String)> {
        while let Some((tag, body)) = self.read_message().await {
            if tag == b'E' {
                return Some(error_fields(&body));
            }
        }
        None
    }

    /// Logs in with SCRAM and waits for ReadyForQuery.
    pub async fn login(addr: SocketAddr, user: &str, database: &str) -> RawClient {
        use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
        let mut c = RawClient::connect(addr).await;
        c.send(&RawClient::startup_packet(
            196608,
            &[("user", user), ("database", database)],
        ))
        .await;
        let mut scram = ScramSha256::new(PASSWORD.as_bytes(), ChannelBinding::unsupported());
        loop {
            let (tag, body) = c.read_message().await.expect("login message");
            match (
                tag,
                body.get(..4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]])),
            ) {
                (b'R', Some(10)) => {
                    let mut out = bytes::BytesMut::new();
                    postgres_protocol::message::frontend::sasl_initial_response(
                        "SCRAM-SHA-256",
                        scram.message(),
                        &mut out,
                    )
                    .expect("encode");
                    c.send(&out).await;
                }
                (b'R', Some(11)) => {
                    scram.update(&body[4..]).expect("scram update");
                    let mut out = bytes::BytesMut::new();
                    postgres_protocol::message::frontend::sasl_response(scram.message(), &mut out)
                        .expect("encode");
                    c.send(&out).await;
                }
                (b'R', Some(12)) => scram.finish(&body[4..]).expect("server signature"),
                (b'K', _) if body.len() >= 8 => {
                    let word = |i: usize| {
                        u32::from_be_bytes([body[i], body[i + 1], body[i + 2], body[i + 3]])
                    };
                    c.key = Some((word(0), word(4)));
                }
                (b'Z', _) => return c,
                (b'E', _) => panic!("login failed: {:?}", error_fields(&body)),
                _ => {}
            }
        }
    }

    /// Sends a simple query and collects (tag, body) up to ReadyForQuery.
    pub async fn query(&mut self, sql: &str) -> Vec<(u8, Vec<u8>)> {
        let mut out = bytes::BytesMut::new();
        postgres_protocol::message::frontend::query(sql, &mut out).expect("encode");
        self.send(&out).await;
        self.replies().await
    }

    /// The messages received up to and including the next ReadyForQuery.
    pub async fn replies(&mut self) -> Vec<(u8, Vec<u8>)> {
        let mut got = Vec::new();
        while let Some(m) = self.read_message().await {
            let done = m.0 == b'Z';
            got.push(m);
            if done {
                break;
            }
        }
        got
    }
}

/// Next message from `stream` as (tag, body), `buf` holding what was read past it; None when
/// the other side closed the connection or sent nothing for 10 s.
pub async fn read_message_from<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut bytes::BytesMut,
) -> Option<(u8, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    loop {
        if buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() > len {
                let msg = buf.split_to(len + 1);
                return Some((msg[0], msg[5..].to_vec()));
            }
        }
        let read =
            tokio::time::timeout(std::time::Duration::from_secs(10), stream.read_buf(buf)).await;
        match read {
            Ok(Ok(n)) if n > 0 => {}
            _ => return None,
        }
    }
}

/// (SQLSTATE, message) of an ErrorResponse body.
pub fn error_fields(body: &[u8]) -> (String, String) {
    let (mut code, mut message) = (String::new(), String::new());
    let mut rest = body;
    while let Some((&t, tail)) = rest.split_first() {
        if t == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        let value = String::from_utf8_lossy(&tail[..end]).into_owned();
        match t {
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
        rest = tail.get(end + 1..).unwrap_or(&[]);
    }
    (code, message)
}

/// A CancelRequest packet for (process id, secret).
pub fn cancel_packet(pid: u32, secret: u32) -> Vec<u8> {
    let mut pkt = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
    pkt.extend_from_slice(&pid.to_be_bytes());
    pkt.extend_from_slice(&secret.to_be_bytes());
    pkt
}

/// A PostgreSQL server with TLS on (certificate for `localhost` only, from `ca`), holding
/// database `vault` with login role `vault_app` (password `PASSWORD`).
pub struct TlsServer {
    pub port: u16,
    pub ca: std::path::PathBuf,
    _pki: crate::pki::Pki,
}

static TLS_SERVER: OnceLock<TlsServer> = OnceLock::new();

pub fn tls_server() -> &'static TlsServer {
    TLS_SERVER.get_or_init(|| {
        keeper::on_keeper_thread(|| async {
            let pki = crate::pki::Pki::new();
            let (cert, key) = pki.issue_pem("pg", &["localhost"]);
            let mut pg = PgCluster::start().expect("start TLS cluster");
            pg.enable_tls(&cert, &key).expect("TLS on");
            let admin = pg.connect("postgres").await.expect("connect");
            for sql in [
                format!("CREATE ROLE vault_app LOGIN PASSWORD '{PASSWORD}'"),
                "CREATE DATABASE vault OWNER vault_app".to_string(),
            ] {
                admin.batch_execute(&sql).await.expect("vault");
            }
            let server = TlsServer {
                port: pg.port(),
                ca: pki.ca_file(),
                _pki: pki,
            };
            keeper::keep(pg);
            server
        })
        .0
    })
}

impl TlsServer {
    /// Adds server `secure` (at `host`, with these TLS settings) and tenant `vault` on it.
    pub fn add_to(&self, c: &mut Config, host: &str, tls: pgtenant::config::BackendTlsConfig) {
        let mut s = pgtenant::config::ServerConfig::new("secure", host, self.port);
        (s.sslmode, s.sslrootcert, s.sslcert, s.sslkey) =
            (tls.sslmode, tls.sslrootcert, tls.sslcert, tls.sslkey);
        c.servers.push(s);
        let base = c
            .tenants
            .iter()
            .find(|t| t.id == "acme")
            .cloned()
            .expect("acme");
        c.tenants.push(TenantConfig {
            id: "vault".into(),
            tier: Tier::Database,
            server: "secure".into(),
            database: "vault".into(),
            schema: None,
            users: vec![UserConfig {
                name: DEMO_ROLE.into(),
                scram: hash_password(PASSWORD),
                backend_user: "vault_app".into(),
                backend_password: Some(Secret::new(PASSWORD.to_string())),
                backend_password_env: None,
                read_only: false,
                auth: Default::default(),
                session_features: None,
            }],
            ..base
        });
    }
}
