//! TLS to PostgreSQL servers and the registry, with libpq's `sslmode` semantics:
//! `prefer` and `require` encrypt without checking the certificate (unless `sslrootcert` is
//! given to `require`, which then checks the chain as libpq does), `verify-ca` checks the
//! chain, `verify-full` the chain and the host name.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

use crate::config::{BackendTlsConfig, SslMode};

use super::{load_certs, load_key, provider, TlsError, VERSIONS};

/// One server's TLS policy, built once from its settings.
#[derive(Clone)]
pub struct BackendTls {
    pub mode: SslMode,
    source: BackendTlsConfig,
    /// None with `disable`.
    config: Option<Arc<rustls::ClientConfig>>,
    /// Why the settings could not be used (a registry server whose files are unreadable on
    /// this proxy): every connection to the server fails with it.
    broken: Option<String>,
}

impl std::fmt::Debug for BackendTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BackendTls({})", self.mode.as_str())
    }
}

/// Servers compare equal when their settings do (the files are not read again).
impl PartialEq for BackendTls {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for BackendTls {}

impl Default for BackendTls {
    fn default() -> Self {
        BackendTls::build(&BackendTlsConfig::default()).expect("prefer needs no files")
    }
}

impl BackendTls {
    pub fn build(cfg: &BackendTlsConfig) -> Result<BackendTls, TlsError> {
        let mode = cfg.sslmode.unwrap_or_default();
        let setup = |field, reason: String| TlsError::Setup { field, reason };
        if mode == SslMode::Disable {
            return Ok(BackendTls {
                mode,
                source: cfg.clone(),
                config: None,
                broken: None,
            });
        }
        let verifier: Arc<dyn ServerCertVerifier> = match (&cfg.sslrootcert, mode) {
            (None, SslMode::VerifyCa | SslMode::VerifyFull) => {
                return Err(setup(
                    "sslrootcert",
                    format!("sslmode {} needs sslrootcert", mode.as_str()),
                ))
            }
            (None, _) => Arc::new(AnyCertificate),
            (Some(ca), _) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in load_certs(ca)? {
                    roots
                        .add(c)
                        .map_err(|e| setup("sslrootcert", e.to_string()))?;
                }
                let webpki =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                        .build()
                        .map_err(|e| setup("sslrootcert", e.to_string()))?;
                if mode == SslMode::VerifyFull {
                    webpki
                } else {
                    Arc::new(ChainOnly(webpki))
                }
            }
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .map_err(|e| setup("sslmode", e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match (&cfg.sslcert, &cfg.sslkey) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
                .map_err(|e| setup("sslkey", e.to_string()))?,
            (None, None) => builder.with_no_client_auth(),
            _ => return Err(setup("sslcert", "sslcert and sslkey go together".into())),
        };
        Ok(BackendTls {
            mode,
            source: cfg.clone(),
            config: Some(Arc::new(config)),
            broken: None,
        })
    }

    /// Like `build`, but settings that cannot be used give a policy that refuses every
    /// connection with the reason, so one bad server entry does not stop the others.
    pub fn build_or_refuse(cfg: &BackendTlsConfig) -> BackendTls {
        BackendTls::build(cfg).unwrap_or_else(|e| BackendTls {
            mode: cfg.sslmode.unwrap_or_default(),
            source: cfg.clone(),
            config: None,
            broken: Some(e.to_string()),
        })
    }

    pub fn setup_error(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// The rustls client configuration, None with `disable`.
    pub fn client_config(&self) -> Option<&Arc<rustls::ClientConfig>> {
        self.config.as_ref()
    }

    /// Whether a server without TLS must be refused.
    pub fn required(&self) -> bool {
        !matches!(self.mode, SslMode::Disable | SslMode::Prefer)
    }

    /// A tokio-postgres connector with this policy, for control-plane connections; sets the
    /// config's own sslmode to match.
    pub fn for_tokio_postgres(
        &self,
        pg: &mut tokio_postgres::Config,
    ) -> tokio_postgres_rustls::MakeRustlsConnect {
        use tokio_postgres::config::SslMode as PgMode;
        pg.ssl_mode(match self.mode {
            SslMode::Disable => PgMode::Disable,
            SslMode::Prefer => PgMode::Prefer,
            _ => PgMode::Require,
        });
        let config = self.config.clone().unwrap_or_else(|| {
            // Never used: with sslmode disable tokio-postgres makes no TLS connection.
            Arc::new(
                rustls::ClientConfig::builder_with_provider(provider())
                    .with_protocol_versions(VERSIONS)
                    .expect("TLS versions")
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(AnyCertificate))
                    .with_no_client_auth(),
            )
        });
        tokio_postgres_rustls::MakeRustlsConnect::new((*config).clone())
    }
}

/// `prefer` / `require` without `sslrootcert`: encryption against passive eavesdroppers only,
/// as in libpq.
#[derive(Debug)]
struct AnyCertificate;

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to the CA; the host name may differ.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_modes_need_a_root_certificate() {
        for mode in [SslMode::VerifyCa, SslMode::VerifyFull] {
            let cfg = BackendTlsConfig {
                sslmode: Some(mode),
                ..BackendTlsConfig::default()
            };
            let e = BackendTls::build(&cfg).unwrap_err().to_string();
            assert!(e.contains("needs sslrootcert"), "{e}");
        }
    }

    #[test]
    fn prefer_is_the_default_and_does_not_require_tls() {
        let t = BackendTls::default();
        assert_eq!(t.mode, SslMode::Prefer);
        assert!(!t.required());
        assert!(t.client_config().is_some());
    }

    #[test]
    fn disable_makes_no_tls_context() {
        let t = BackendTls::build(&BackendTlsConfig {
            sslmode: Some(SslMode::Disable),
            ..BackendTlsConfig::default()
        })
        .unwrap();
        assert!(t.client_config().is_none());
    }
}
