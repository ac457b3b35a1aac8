//! A throwaway certificate authority for TLS tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use pgtenant::config::{TlsConfig, TlsMode};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};

/// A CA and files signed by it, in a temporary directory.
pub struct Pki {
    dir: tempfile::TempDir,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Each CA its own name, so a client looks for the right issuer.
        let name = format!("pgtenant test CA {}", dir.path().display());
        p.distinguished_name.push(DnType::CommonName, name);
        let ca = p.self_signed(&ca_key).expect("CA");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("write CA");
        Pki { dir, ca, ca_key }
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Writes `<name>.pem` and `<name>.key` for a certificate with common name `cn` and DNS
    /// names `dns`; returns the two paths.
    pub fn issue(&self, name: &str, cn: &str, dns: &[&str], client: bool) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>())
            .expect("params");
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let cert = p.signed_by(&key, &self.ca, &self.ca_key).expect("sign");
        let (c, k) = (
            self.dir.path().join(format!("{name}.pem")),
            self.dir.path().join(format!("{name}.key")),
        );
        write_private(&c, &cert.pem());
        write_private(&k, &key.serialize_pem());
        (c, k)
    }

    /// (certificate, key) as PEM text, for a PostgreSQL server's `ssl_cert_file`.
    pub fn issue_pem(&self, name: &str, dns: &[&str]) -> (String, String) {
        let (c, k) = self.issue(name, dns.first().copied().unwrap_or(name), dns, false);
        (
            std::fs::read_to_string(c).expect("cert"),
            std::fs::read_to_string(k).expect("key"),
        )
    }

    /// `[tls]` with a server certificate for localhost and `*.db.test`.
    pub fn server_tls(&self, mode: TlsMode) -> TlsConfig {
        let (cert, key) = self.issue(
            "server",
            "localhost",
            &["localhost", "*.db.test", "127.0.0.1"],
            false,
        );
        TlsConfig {
            cert: Some(cert),
            key: Some(key),
            mode: Some(mode),
            sni_suffix: Some(".db.test".into()),
            client_ca: Some(self.ca_file()),
            ..TlsConfig::default()
        }
    }
}

pub fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}
