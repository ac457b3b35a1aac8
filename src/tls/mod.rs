//! TLS on rustls: certificate files, the client-facing acceptor, and the names and channel
//! binding data a TLS connection carries.

pub mod acceptor;
pub mod connector;
pub mod identity;

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256, Sha384, Sha512};

pub use acceptor::{ClientTls, TlsAcceptorState};
pub use connector::BackendTls;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{0} holds no PEM certificate")]
    NoCertificate(PathBuf),
    #[error("{0} holds no PEM private key")]
    NoKey(PathBuf),
    #[error("tls.{field}: {reason}")]
    Setup { field: &'static str, reason: String },
}

fn read_error(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Every certificate in a PEM file, leaf first.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| read_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_error(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_path_buf()));
    }
    Ok(certs)
}

/// The first private key in a PEM file. The error never quotes the file's content.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoKey(path.to_path_buf()),
        e => read_error(path, e),
    })
}

/// `tls-server-end-point` channel binding data (RFC 5929): the hash of the server's
/// certificate, with the hash of its signature algorithm, SHA-256 in place of MD5 and SHA-1.
pub fn end_point_hash(cert: &CertificateDer<'_>) -> Vec<u8> {
    use x509_parser::oid_registry as oids;
    let oid = x509_parser::parse_x509_certificate(cert.as_ref())
        .ok()
        .map(|(_, c)| c.signature_algorithm.algorithm.clone());
    match oid {
        Some(o) if o == oids::OID_PKCS1_SHA384WITHRSA || o == oids::OID_SIG_ECDSA_WITH_SHA384 => {
            Sha384::digest(cert.as_ref()).to_vec()
        }
        Some(o) if o == oids::OID_PKCS1_SHA512WITHRSA || o == oids::OID_SIG_ECDSA_WITH_SHA512 => {
            Sha512::digest(cert.as_ref()).to_vec()
        }
        _ => Sha256::digest(cert.as_ref()).to_vec(),
    }
}

/// Reads every certificate and key a config names (client TLS, servers, registry), so that
/// `check-config` finds a bad file before a proxy does.
pub fn check_files(config: &crate::config::Config) -> Result<(), TlsError> {
    acceptor::TlsSettings::build(&config.tls)?;
    for s in &config.servers {
        BackendTls::build(&s.backend_tls())?;
    }
    if let Some(r) = &config.registry {
        BackendTls::build(&r.backend_tls())?;
    }
    Ok(())
}

/// Makes a self-signed certificate for `names` (host names or IP addresses) and writes
/// `server.crt` and `server.key` (readable by its owner only) to `dir`; returns their paths.
/// For trying TLS out; production certificates come from a CA.
pub fn write_self_signed(dir: &Path, names: &[String]) -> Result<(PathBuf, PathBuf), String> {
    let cert = rcgen::generate_simple_self_signed(names.to_vec())
        .map_err(|e| format!("cannot make a certificate: {e}"))?;
    let (cert_path, key_path) = (dir.join("server.crt"), dir.join("server.key"));
    std::fs::write(&cert_path, cert.cert.pem())
        .map_err(|e| format!("cannot write {}: {e}", cert_path.display()))?;
    crate::secret::write_private(&key_path, &cert.key_pair.serialize_pem())
        .map_err(|e| format!("cannot write {}: {e}", key_path.display()))?;
    Ok((cert_path, key_path))
}

/// Protocol version and cipher suite of an established TLS connection, as the admin console's
/// `tls` column shows them (PgBouncer's form): `TLSv1.3/TLS13_AES_256_GCM_SHA384`.
pub fn describe<D>(conn: &rustls::ConnectionCommon<D>) -> String {
    let version = conn
        .protocol_version()
        .map(|v| format!("{v:?}").replace('_', "."))
        .unwrap_or_default();
    let suite = conn
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()))
        .unwrap_or_default();
    format!("{version}/{suite}")
}

/// A TLS stream's read that first sends what earlier writes left in rustls's buffer, so a
/// request is never held back while its sender waits for the answer.
pub fn poll_read_flushing<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: std::pin::Pin<&mut S>,
    cx: &mut std::task::Context<'_>,
    buf: &mut tokio::io::ReadBuf<'_>,
) -> std::task::Poll<std::io::Result<()>> {
    if let std::task::Poll::Ready(Err(e)) = s.as_mut().poll_flush(cx) {
        return std::task::Poll::Ready(Err(e));
    }
    s.poll_read(cx, buf)
}

/// A TLS stream's write that sends its records as far as the socket takes them now; the rest
/// goes with the next flush or read.
pub fn poll_write_flushing<S: tokio::io::AsyncWrite + Unpin>(
    mut s: std::pin::Pin<&mut S>,
    cx: &mut std::task::Context<'_>,
    buf: &[u8],
) -> std::task::Poll<std::io::Result<usize>> {
    let r = s.as_mut().poll_write(cx, buf);
    if let std::task::Poll::Ready(Ok(_)) = r {
        let _ = s.poll_flush(cx);
    }
    r
}

/// Writes rustls's records to a socket without waiting.
struct NonBlocking<'a>(&'a tokio::net::TcpStream);

impl std::io::Write for NonBlocking<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.try_write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The hot path's write over TLS: the plaintext goes into rustls, the records to the socket as
/// far as it takes them now; the rest is sent by the stream's next flush (its reads flush
/// first), so nothing waits here.
pub fn try_write_now<D>(
    tcp: &tokio::net::TcpStream,
    conn: &mut rustls::ConnectionCommon<D>,
    buf: &[u8],
) -> std::io::Result<usize> {
    let n = std::io::Write::write(&mut conn.writer(), buf)?;
    while conn.wants_write() {
        match conn.write_tls(&mut NonBlocking(tcp)) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    if n == 0 && !buf.is_empty() {
        return Err(std::io::ErrorKind::WouldBlock.into());
    }
    Ok(n)
}

/// The crypto provider every TLS context of pgtenant uses: ring. rustls deprecates it only for
/// lacking post-quantum key exchange; aws-lc-rs has that but needs a long C/cmake build.
#[allow(deprecated)]
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS 1.2 and 1.3 only; rustls has no older versions and no weak suites at all.
pub const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_end_point_hash_of_an_ecdsa_sha256_certificate_is_its_sha256() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["db.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = cert.der().clone();
        assert_eq!(end_point_hash(&der), Sha256::digest(der.as_ref()).to_vec());
    }

    #[test]
    fn the_end_point_hash_of_an_ecdsa_sha384_certificate_is_its_sha384() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["db.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = cert.der().clone();
        assert_eq!(end_point_hash(&der), Sha384::digest(der.as_ref()).to_vec());
    }

    #[test]
    fn a_key_file_without_a_key_says_so_without_quoting_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.pem");
        std::fs::write(&p, "not a key\n").unwrap();
        let e = load_key(&p).unwrap_err().to_string();
        assert!(e.contains("no PEM private key"), "{e}");
        assert!(!e.contains("not a key"), "{e}");
    }
}
