//! Who a verified client certificate names.

use rustls_pki_types::CertificateDer;

/// The subject's common names and DNS subject-alternative names of a certificate, in that
/// order. Empty for anything that does not parse.
pub fn certificate_names(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, c)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let mut names: Vec<String> = c
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_string))
        .collect();
    if let Ok(Some(san)) = c.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push(d.to_string());
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_common_name_then_the_dns_alternative_names() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["alt.example".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "app.acme");
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            certificate_names(cert.der()),
            vec!["app.acme".to_string(), "alt.example".to_string()]
        );
    }

    #[test]
    fn garbage_names_no_one() {
        assert!(certificate_names(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])).is_empty());
    }
}
