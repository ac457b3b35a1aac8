//! TLS for clients: modes, certificates, SNI, channel binding, client certificates, reload,
//! direct negotiation. Certificates come from a CA each test makes.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use crate::pki::Pki;
use crate::support::*;
use pgtenant::config::{AuthMethod, Config, SniCertConfig, TlsMode};
use pgtenant::demo::DEMO_ROLE;

/// Adds users to tenant acme: `clerk` (client certificate only), `binder` (SCRAM with
/// channel binding only), `both` (certificate and password).
fn add_tls_users(c: &mut Config) {
    let acme = c.tenants.iter_mut().find(|t| t.id == "acme").expect("acme");
    let base = acme.users[0].clone();
    for (name, auth) in [
        ("clerk", AuthMethod::Cert),
        ("binder", AuthMethod::ScramPlus),
        ("both", AuthMethod::ScramCert),
    ] {
        let mut u = base.clone();
        u.name = name.into();
        u.auth = auth;
        acme.users.push(u);
    }
}

async fn tls_proxy(pki: &Pki, mode: TlsMode) -> (SocketAddr, Arc<pgtenant::proxy::ProxyContext>) {
    let tls = pki.server_tls(mode);
    fixture()
        .extra_proxy_ctx(move |c| {
            c.tls = tls;
            add_tls_users(c);
            for t in c.tenants.iter_mut() {
                if t.id == "globex" {
                    t.require_tls = true;
                }
            }
        })
        .await
}

/// Runs psql with connection string `conninfo` (password: the demo's unless the string has
/// one) and returns its output.
fn psql(addr: SocketAddr, conninfo: &str, sql: &str) -> Output {
    Command::new(&fixture().psql)
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .arg(format!("port={} {conninfo}", addr.port()))
        .env("PGPASSWORD", PASSWORD)
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGSSLMODE")
        .output()
        .expect("run psql")
}

/// psql with `sslmode=verify-full` against `ca`, to `host` (which resolves to the proxy).
fn psql_verified(
    addr: SocketAddr,
    host: &str,
    ca: &Path,
    user_db: (&str, &str),
    sql: &str,
) -> Output {
    psql(
        addr,
        &format!(
            "host={host} hostaddr=127.0.0.1 user={} dbname={} sslmode=verify-full sslrootcert={}",
            user_db.0,
            user_db.1,
            ca.display()
        ),
        sql,
    )
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "psql failed: {}", stderr(o));
    stdout(o).trim().to_string()
}

#[tokio::test]
async fn psql_with_sslmode_require_is_served_over_tls() {
    let pki = Pki::new();
    let (addr, _) = tls_proxy(&pki, TlsMode::Allow).await;
    let o = psql(
        addr,
        "host=127.0.0.1 user=app.acme dbname=acme sslmode=require",
        "SELECT current_database()",
    );
    assert_eq!(ok(&o), "acme");
    let o = psql(
        addr,
        "host=127.0.0.1 user=app.acme dbname=acme sslmode=require",
        "\\conninfo",
    );
    assert!(ok(&o).contains("SSL connection"), "{}", stdout(&o));
}

#[tokio::test]
async fn psql_verify_full_accepts_the_proxy_certificate_signed_by_its_ca() {
    let pki = Pki::new();
    let (addr, _) = tls_proxy(&pki, TlsMode::Allow).await;
    let o = psql_verified(
        addr,
        "localhost",
        &pki.ca_file(),
        ("app.acme", "acme"),
        "SELECT 'verified'",
    );
    assert_eq!(ok(&o), "verified");
}

#[tokio::test]
async fn verify_full_against_another_ca_is_refused_by_the_client() {
    let pki = Pki::new();
    let other = Pki::new();
    let (addr, _) = tls_proxy(&pki, TlsMode::Allow).await;
    let o = psql_verified(
        addr,
        "localhost",
        &other.ca_file(),
        ("app.acme", "acme"),
        "SELECT 1",
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("certificate verify failed"),
        "{}",
        stderr(&o)
    );
}

#[tokio::test]
async fn a_plaintext_client_is_refused_under_mode_require_with_advice() {
    let pki = Pki::new();
    let (addr, _) = tls_proxy(&pki, TlsMode::Require).await;
    let o = psql(
        addr,
        "host=127.0.0.1 user=app.acme dbname=acme sslmode=disable",
        "SELECT 1",
    );
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("requires an encrypted connection"), "{err}");
    assert!(err.contains("sslmode=require"), "{err}");
}

#[tokio::test]
async fn mode_require_serves_tls_clients() {
    let pki = Pki::new();
    let (addr, _) = tls_proxy(&pki, TlsMode::Require).await;
    let o = psql(
        addr,
        "host=127.0.0.1 user=app.acme dbname=acme sslmode=require",
        "SELECT 'in'",
    );
    assert_eq!(ok(&o), "in");
}

#[tokio::test]
async fn the_admin_console_follows_mode_require() {
    let pki = Pki::new();
    let (addr, _) = tls_proxy(&pki, TlsMode::Require).await;
    let plain = psql(
        addr,
        &format!("host=127.0.0.1 user={ADMIN} dbname=pgtenant sslmode=disable"),
        "SHOW VERSION",
    );
    assert!(!plain.status.success());
    assert!(
        stderr(&plain).contains("sslmode=require"),
        "{}",
        stderr(&plain)
    );
    let tls = psql(
        addr,
        &format!("host=127.0.0.1 user={ADMIN} dbname=pgtenant sslmode=require"),
        "SHOW VERSION",
    );
    assert!(ok(&tls).contains("pgtenant"), "{}", stdout(&tls));
}

#[tokio::test]
async fn a_require_tls_tenant_refuses_plaintext_after_authentication() {
    let pki = Pki::new();
    let (addr, _) = tls_proxy(&pki, TlsMode::Allow).await;
    let plain = psql(
        addr,
        "host=127.0.0.1 user=app.globex dbname=globex sslmode=disable",
        "SELECT 1",
    );
    assert!(!plain.status.success());
    let err = stderr(&plain);
    assert!(
        err.contains("tenant \"globex\" requires an encrypted connection"),
        "{err}"
    );
    let tls = psql(
        addr,
        "host=127.0.0.1 user=app.globex dbname=globex sslmode=require",
        "SELECT current_database()",
    );
    assert_eq!(ok(&tls), "globex");
}

#[tokio::test]
async fn the_tls_server_name_names_the_tenant() {
    let pki = Pki::new();
    let (addr, _) = tls_proxy(&pki, TlsMode::Allow).await;
    let o = psql_verified(
        addr,
        "acme.db.test",
        &pki.ca_file(),
        (DEMO_ROLE, DEMO_ROLE),
        "SELECT current_database()",
    );
    assert_eq!(ok(&o), "acme");
}

#[tokio::test]
async fn a_tls_server_name_that_disagrees_with_the_user_name_is_refused() {
    let pki = Pki::new();
    let (addr, _) = tls_proxy(&pki, TlsMode::Allow).await;
    let o = psql(
        addr,
        "host=acme.db.test hostaddr=127.0.0.1 user=app.globex dbname=globex sslmode=require",
        "SELECT 1",
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("conflicts with"), "{}", stderr(&o));
}

#[tokio::test]
async fn a_server_name_with_its_own_certificate_is_served_that_certificate() {
    let pki = Pki::new();
    let other = Pki::new();
    let mut tls = pki.server_tls(TlsMode::Allow);
    let (cert, key) = other.issue("globex", "globex.db.test", &["globex.db.test"], false);
    tls.certs.push(SniCertConfig {
        sni: "globex.db.test".into(),
        cert,
        key,
    });
    let addr = fixture().extra_proxy(move |c| c.tls = tls).await;
    let verify = |ca: &Path, host: &str| {
        psql_verified(
            addr,
            host,
            ca,
            (DEMO_ROLE, DEMO_ROLE),
            "SELECT current_database()",
        )
    };
    assert_eq!(ok(&verify(&other.ca_file(), "globex.db.test")), "globex");
    // Any other name gets the default certificate.
    assert_eq!(ok(&verify(&pki.ca_file(), "acme.db.test")), "acme");
}

#[tokio::test]
async fn channel_binding_require_is_served_with_scram_sha_256_plus() {
    let pki = Pki::new();
    let (addr, _) = tls_proxy(&pki, TlsMode::Allow).await;
    let o = psql(
        addr,
        "host=127.0.0.1 user=app.acme dbname=acme sslmode=require channel_binding=require",
        "SELECT 'bound'",
    );
    assert_eq!(ok(&o), "bound");
}

#[tokio::test]
async fn a_user_that_requires_channel_binding_is_refused_without_it() {
    let pki = Pki::new();
    let (addr, _) = tls_proxy(&pki, TlsMode::Allow).await;
    let unbound = psql(
        addr,
        "host=127.0.0.1 user=binder.acme dbname=acme sslmode=require channel_binding=disable",
        "SELECT 1",
    );
    assert!(!unbound.status.success());
    assert!(
        stderr(&unbound).contains("SCRAM-SHA-256-PLUS"),
        "{}",
        stderr(&unbound)
    );
    let bound = psql(
        addr,
        "host=127.0.0.1 user=binder.acme dbname=acme sslmode=require channel_binding=require",
        "SELECT 'bound'",
    );
    assert_eq!(ok(&bound), "bound");
}

#[tokio::test]
async fn a_client_certificate_naming_the_user_logs_in_without_a_password() {
    let pki = Pki::new();
    let (addr, _) = tls_proxy(&pki, TlsMode::Allow).await;
    let (cert, key) = pki.issue("clerk", "clerk.acme", &[], true);
    let o = psql(
        addr,
        &format!(
            "host=127.0.0.1 user=clerk.acme dbname=acme sslmode=require sslcert={} sslkey={} password=wrong",
            cert.display(),
            key.display()
        ),
        "SELECT current_database()",
    );
    assert_eq!(ok(&o), "acme");
}

#[tokio::test]
async fn a_certificate_user_without_its_certificate_fails_like_a_wrong_password() {
    let pki = Pki::new();
    let (addr, _) = tls_proxy(&pki, TlsMode::Allow).await;
    let (cert, key) = pki.issue("someone", "app.acme", &[], true);
    let o = psql(
        addr,
        &format!(
            "host=127.0.0.1 user=clerk.acme dbname=acme sslmode=require sslcert={} sslkey={}",
            cert.display(),
            key.display()
        ),
        "SELECT 1",
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("password authentication failed for user \"clerk.acme\""),
        "{}",
        stderr(&o)
    );
}

#[tokio::test]
async fn scram_plus_cert_needs_both_the_certificate_and_the_password() {
    let pki = Pki::new();
    let (addr, _) = tls_proxy(&pki, TlsMode::Allow).await;
    let (cert, key) = pki.issue("both", "both.acme", &[], true);
    let with = |password: &str| {
        psql(
            addr,
            &format!(
                "host=127.0.0.1 user=both.acme dbname=acme sslmode=require sslcert={} sslkey={} password={password}",
                cert.display(),
                key.display()
            ),
            "SELECT 'both'",
        )
    };
    assert_eq!(ok(&with(PASSWORD)), "both");
    assert!(!with("wrong").status.success());
}

#[tokio::test]
async fn new_certificates_are_served_after_reload_and_connected_clients_stay() {
    let pki = Pki::new();
    let (addr, ctx) = tls_proxy(&pki, TlsMode::Allow).await;
    let verify =
        |ca: &Path| psql_verified(addr, "localhost", ca, ("app.acme", "acme"), "SELECT 'ok'");
    let mut before = RawTls::login(addr, "app.acme", "acme").await;
    assert_eq!(ok(&verify(&pki.ca_file())), "ok");
    let next = Pki::new();
    let mut config = ctx.config.clone();
    config.tls = next.server_tls(TlsMode::Allow);
    ctx.reload(&config).expect("reload");
    assert_eq!(ok(&verify(&next.ca_file())), "ok");
    assert!(!verify(&pki.ca_file()).status.success());
    assert_eq!(
        before.simple_query_text("SELECT 'still here'").await,
        "still here"
    );
}

#[tokio::test]
async fn direct_tls_negotiation_with_alpn_postgresql_is_served() {
    let pki = Pki::new();
    let (addr, _) = tls_proxy(&pki, TlsMode::Require).await;
    let mut c = RawTls::direct_login(addr, "app.acme", "acme", Some(b"postgresql")).await;
    assert_eq!(c.simple_query_text("SELECT 'direct'").await, "direct");
}

#[tokio::test]
async fn direct_tls_without_alpn_is_refused() {
    let pki = Pki::new();
    let (addr, _) = tls_proxy(&pki, TlsMode::Require).await;
    assert!(RawTls::try_direct(addr, None).await.is_err());
}

#[tokio::test]
async fn gssenc_requests_are_still_answered_n() {
    let pki = Pki::new();
    let (addr, _) = tls_proxy(&pki, TlsMode::Allow).await;
    let mut c = RawClient::connect(addr).await;
    c.send(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30]).await;
    assert_eq!(c.read_byte().await, Some(b'N'));
}

/// A client over TLS made with rustls, speaking the protocol by hand.
struct RawTls {
    stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    buf: bytes::BytesMut,
}

/// Accepts any server certificate: these tests check the proxy's side.
#[derive(Debug)]
struct AnyCert;

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        pgtenant::tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl RawTls {
    fn connector(alpn: Option<&[u8]>) -> tokio_rustls::TlsConnector {
        let mut cfg = rustls::ClientConfig::builder_with_provider(pgtenant::tls::provider())
            .with_protocol_versions(pgtenant::tls::VERSIONS)
            .expect("versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert))
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.into_iter().map(<[u8]>::to_vec).collect();
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
    }

    /// A TLS handshake as the very first bytes (PostgreSQL 17's `sslnegotiation=direct`);
    /// then a byte read, to see whether the proxy kept the connection.
    async fn try_direct(addr: SocketAddr, alpn: Option<&[u8]>) -> std::io::Result<RawTls> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
        let stream = Self::connector(alpn).connect(name, tcp).await?;
        let mut c = RawTls {
            stream,
            buf: bytes::BytesMut::new(),
        };
        c.send(&RawClient::startup_packet(
            196608,
            &[("user", "app.acme"), ("database", "acme")],
        ))
        .await?;
        match c.read_message().await {
            Some((b'R', _)) => Ok(c),
            other => Err(std::io::Error::other(format!("no SASL request: {other:?}"))),
        }
    }

    async fn direct_login(addr: SocketAddr, user: &str, db: &str, alpn: Option<&[u8]>) -> RawTls {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
        let stream = Self::connector(alpn)
            .connect(name, tcp)
            .await
            .expect("handshake");
        let mut c = RawTls {
            stream,
            buf: bytes::BytesMut::new(),
        };
        c.scram_login(user, db).await;
        c
    }

    /// SSLRequest, then TLS, then a SCRAM login.
    async fn login(addr: SocketAddr, user: &str, db: &str) -> RawTls {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
            .await
            .expect("SSLRequest");
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await.expect("answer");
        assert_eq!(answer[0], b'S');
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
        let stream = Self::connector(None)
            .connect(name, tcp)
            .await
            .expect("handshake");
        let mut c = RawTls {
            stream,
            buf: bytes::BytesMut::new(),
        };
        c.scram_login(user, db).await;
        c
    }

    async fn scram_login(&mut self, user: &str, db: &str) {
        use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
        self.send(&RawClient::startup_packet(
            196608,
            &[("user", user), ("database", db)],
        ))
        .await
        .expect("startup");
        let mut scram = ScramSha256::new(PASSWORD.as_bytes(), ChannelBinding::unsupported());
        loop {
            let (tag, body) = self.read_message().await.expect("login message");
            let kind = body
                .get(..4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
            let mut out = bytes::BytesMut::new();
            match (tag, kind) {
                (b'R', Some(10)) => postgres_protocol::message::frontend::sasl_initial_response(
                    "SCRAM-SHA-256",
                    scram.message(),
                    &mut out,
                )
                .expect("encode"),
                (b'R', Some(11)) => {
                    scram.update(&body[4..]).expect("update");
                    postgres_protocol::message::frontend::sasl_response(scram.message(), &mut out)
                        .expect("encode")
                }
                (b'Z', _) => return,
                (b'E', _) => panic!("login failed: {:?}", error_fields(&body)),
                _ => {}
            }
            if !out.is_empty() {
                self.send(&out).await.expect("send");
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    async fn read_message(&mut self) -> Option<(u8, Vec<u8>)> {
        read_message_from(&mut self.stream, &mut self.buf).await
    }

    /// The first column of the first row of a simple query.
    async fn simple_query_text(&mut self, sql: &str) -> String {
        let mut out = bytes::BytesMut::new();
        postgres_protocol::message::frontend::query(sql, &mut out).expect("encode");
        self.send(&out).await.expect("send");
        let mut value = None;
        while let Some((tag, body)) = self.read_message().await {
            match tag {
                b'D' if value.is_none() => {
                    let len = i32::from_be_bytes([body[2], body[3], body[4], body[5]]) as usize;
                    value = Some(String::from_utf8_lossy(&body[6..6 + len]).into_owned());
                }
                b'E' => panic!("query failed: {:?}", error_fields(&body)),
                b'Z' => break,
                _ => {}
            }
        }
        value.expect("a row")
    }
}

#[tokio::test]
async fn show_clients_names_the_tls_protocol_of_a_tls_client() {
    let pki = Pki::new();
    let (addr, _) = tls_proxy(&pki, TlsMode::Allow).await;
    let _tls_client = RawTls::login(addr, "app.acme", "acme").await;
    let tls = admin_column(addr, "SHOW CLIENTS", ("user", "app.acme"), "tls").await;
    assert!(
        tls.iter().any(|t| t.starts_with("TLSv1.3/")),
        "tls column: {tls:?}"
    );
}

/// A Python with psycopg (binary: it bundles a libpq of its own, 17 or later), in a venv under
/// the target directory, made on first use. Err says why there is none.
fn psycopg_python() -> Result<std::path::PathBuf, String> {
    let venv = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("pyvenv");
    let python = venv.join("bin/python");
    let has_psycopg = |p: &Path| {
        Command::new(p)
            .args(["-c", "import psycopg"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !has_psycopg(&python) {
        let run = |cmd: &mut Command| -> Result<(), String> {
            let o = cmd.output().map_err(|e| e.to_string())?;
            if o.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&o.stderr).into_owned())
            }
        };
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        run(Command::new(venv.join("bin/pip")).args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "psycopg[binary]",
        ]))?;
    }
    Ok(python)
}

#[tokio::test]
async fn a_libpq_17_client_connects_with_direct_tls_negotiation() {
    let python = match psycopg_python() {
        Ok(p) => p,
        Err(why) => {
            // The raw rustls client test above covers direct negotiation without it.
            eprintln!("psycopg could not be installed here ({why}); skipped");
            return;
        }
    };
    let pki = Pki::new();
    let (addr, _) = tls_proxy(&pki, TlsMode::Require).await;
    let script = format!(
        "import psycopg\n\
         assert psycopg.pq.version() >= 170000, psycopg.pq.version()\n\
         c = psycopg.connect('host=127.0.0.1 port={} user=app.acme dbname=acme password={PASSWORD} \
         sslmode=require sslnegotiation=direct connect_timeout=10')\n\
         print(c.execute('SELECT current_database()').fetchone()[0])\n",
        addr.port()
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .args(["-c", &script])
            .output()
            .expect("python")
    })
    .await
    .expect("join");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "acme");
}
