//! The client-facing TLS acceptor: certificates by server name, client certificates, and a
//! state that SIGHUP / RELOAD replace without touching connected clients.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::config::{TlsConfig, TlsMode};

use super::{end_point_hash, load_certs, load_key, provider, TlsError, VERSIONS};

/// The ALPN protocol PostgreSQL 17 clients offer; required for direct TLS negotiation.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

#[derive(Debug)]
struct ServedCert {
    key: Arc<CertifiedKey>,
    /// `tls-server-end-point` channel binding data of this certificate.
    end_point: Arc<[u8]>,
}

impl ServedCert {
    fn load(cert: &std::path::Path, key: &std::path::Path) -> Result<ServedCert, TlsError> {
        let chain = load_certs(cert)?;
        let end_point = end_point_hash(&chain[0]).into();
        let key = CertifiedKey::from_der(chain, load_key(key)?, &provider()).map_err(|e| {
            TlsError::Setup {
                field: "key",
                reason: format!("{} does not fit {}: {e}", key.display(), cert.display()),
            }
        })?;
        Ok(ServedCert {
            key: Arc::new(key),
            end_point,
        })
    }
}

/// Certificates by server name (SNI), with the default one for any other name.
#[derive(Debug)]
struct CertStore {
    default: ServedCert,
    by_name: HashMap<String, ServedCert>,
}

impl CertStore {
    fn pick(&self, server_name: Option<&str>) -> &ServedCert {
        server_name
            .and_then(|n| self.by_name.get(&n.to_ascii_lowercase()))
            .unwrap_or(&self.default)
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(hello.server_name()).key.clone())
    }
}

/// One generation of the `[tls]` settings.
pub struct TlsSettings {
    pub mode: TlsMode,
    sni_suffix: Option<String>,
    /// None when no certificate is configured or TLS is disabled.
    acceptor: Option<(tokio_rustls::TlsAcceptor, Arc<CertStore>)>,
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("TLS handshake failed: {0}")]
    Failed(std::io::Error),
    #[error("direct TLS connection without ALPN \"postgresql\"")]
    NoAlpn,
}

impl TlsSettings {
    pub fn build(cfg: &TlsConfig) -> Result<TlsSettings, TlsError> {
        let mode = cfg.effective_mode();
        let (cert, key) = match (&cfg.cert, &cfg.key) {
            (Some(c), Some(k)) => (c, k),
            (None, None) if mode == TlsMode::Disable => {
                return Ok(TlsSettings {
                    mode,
                    sni_suffix: None,
                    acceptor: None,
                })
            }
            (None, None) => {
                return Err(TlsError::Setup {
                    field: "mode",
                    reason: "allow and require need tls.cert and tls.key".into(),
                })
            }
            _ => {
                return Err(TlsError::Setup {
                    field: "cert",
                    reason: "tls.cert and tls.key go together".into(),
                })
            }
        };
        let mut by_name = HashMap::new();
        for c in &cfg.certs {
            by_name.insert(
                c.sni.to_ascii_lowercase(),
                ServedCert::load(&c.cert, &c.key)?,
            );
        }
        let store = Arc::new(CertStore {
            default: ServedCert::load(cert, key)?,
            by_name,
        });
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .map_err(|e| TlsError::Setup {
                field: "mode",
                reason: e.to_string(),
            })?;
        let builder = match &cfg.client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in load_certs(ca)? {
                    roots.add(c).map_err(|e| TlsError::Setup {
                        field: "client_ca",
                        reason: e.to_string(),
                    })?;
                }
                // Clients without a certificate are still served; users with `auth = "cert"`
                // are refused at login when they bring none.
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        .allow_unauthenticated()
                        .build()
                        .map_err(|e| TlsError::Setup {
                            field: "client_ca",
                            reason: e.to_string(),
                        })?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut server = builder.with_cert_resolver(store.clone());
        server.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
        let acceptor = (mode != TlsMode::Disable)
            .then(|| (tokio_rustls::TlsAcceptor::from(Arc::new(server)), store));
        Ok(TlsSettings {
            mode,
            sni_suffix: cfg.sni_suffix.as_ref().map(|s| s.to_ascii_lowercase()),
            acceptor,
        })
    }

    /// Whether an SSLRequest is answered `S`.
    pub fn offers_tls(&self) -> bool {
        self.acceptor.is_some()
    }

    /// Runs the server side of a handshake. `direct`: the client sent a ClientHello first
    /// (PostgreSQL 17's `sslnegotiation=direct`), which must then have agreed on ALPN
    /// "postgresql", as PostgreSQL itself requires.
    pub async fn accept(&self, tcp: TcpStream, direct: bool) -> Result<ClientTls, HandshakeError> {
        let Some((acceptor, store)) = &self.acceptor else {
            return Err(HandshakeError::Failed(std::io::Error::other(
                "TLS is not enabled",
            )));
        };
        let stream = acceptor.accept(tcp).await.map_err(HandshakeError::Failed)?;
        let conn = stream.get_ref().1;
        if direct && conn.alpn_protocol() != Some(ALPN_POSTGRESQL) {
            return Err(HandshakeError::NoAlpn);
        }
        let server_name = conn.server_name().map(str::to_ascii_lowercase);
        let end_point = store.pick(server_name.as_deref()).end_point.clone();
        let peer_names = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(super::identity::certificate_names)
            .unwrap_or_default();
        Ok(ClientTls {
            stream,
            server_name,
            end_point,
            peer_names,
        })
    }

    /// The tenant a TLS server name carries: `acme` for `acme<sni_suffix>`.
    pub fn tenant_from_server_name<'a>(&self, name: &'a str) -> Option<&'a str> {
        let suffix = self.sni_suffix.as_deref()?;
        let head = name.len().checked_sub(suffix.len())?;
        (head > 0 && name.is_char_boundary(head) && name[head..].eq_ignore_ascii_case(suffix))
            .then(|| &name[..head])
            .filter(|t| !t.contains('.'))
    }
}

/// A client connection after a TLS handshake.
pub struct ClientTls {
    pub stream: TlsStream<TcpStream>,
    /// The server name the client asked for (SNI), lower-cased.
    pub server_name: Option<String>,
    /// Channel binding data of the certificate the client was served.
    pub end_point: Arc<[u8]>,
    /// Names of the client's verified certificate (CN, then DNS SANs); empty without one.
    pub peer_names: Vec<String>,
}

/// The `[tls]` settings in force; replaced whole on reload, read once per connection.
pub struct TlsAcceptorState {
    current: RwLock<Arc<TlsSettings>>,
}

impl TlsAcceptorState {
    pub fn new(cfg: &TlsConfig) -> Result<TlsAcceptorState, TlsError> {
        Ok(TlsAcceptorState {
            current: RwLock::new(Arc::new(TlsSettings::build(cfg)?)),
        })
    }

    pub fn current(&self) -> Arc<TlsSettings> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Loads the files again; on any error the settings in force stay.
    pub fn reload(&self, cfg: &TlsConfig) -> Result<(), TlsError> {
        let next = Arc::new(TlsSettings::build(cfg)?);
        match self.current.write() {
            Ok(mut g) => *g = next,
            Err(p) => *p.into_inner() = next,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(suffix: &str) -> TlsSettings {
        TlsSettings {
            mode: TlsMode::Allow,
            sni_suffix: Some(suffix.into()),
            acceptor: None,
        }
    }

    #[test]
    fn a_server_name_under_the_suffix_names_its_tenant() {
        let s = settings(".db.example.com");
        assert_eq!(
            s.tenant_from_server_name("acme.db.example.com"),
            Some("acme")
        );
        assert_eq!(
            s.tenant_from_server_name("ACME.DB.EXAMPLE.COM"),
            Some("ACME")
        );
    }

    #[test]
    fn other_server_names_name_no_tenant() {
        let s = settings(".db.example.com");
        assert_eq!(s.tenant_from_server_name("db.example.com"), None);
        assert_eq!(s.tenant_from_server_name(".db.example.com"), None);
        assert_eq!(s.tenant_from_server_name("a.b.db.example.com"), None);
        assert_eq!(s.tenant_from_server_name("acme.db.example.org"), None);
    }

    #[test]
    fn without_a_suffix_no_server_name_is_a_tenant() {
        let s = TlsSettings {
            mode: TlsMode::Allow,
            sni_suffix: None,
            acceptor: None,
        };
        assert_eq!(s.tenant_from_server_name("acme.db.example.com"), None);
    }

    #[test]
    fn allow_without_a_certificate_is_refused() {
        let cfg = TlsConfig {
            mode: Some(TlsMode::Require),
            ..TlsConfig::default()
        };
        assert!(TlsSettings::build(&cfg).is_err());
    }
}
