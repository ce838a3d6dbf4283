//! A certificate authority of a test's own and a server certificate it signed, for TLS
//! servers on loopback (a mock upstream, Redis) that the gateway must learn to trust.
#![allow(dead_code)]

pub struct Pki {
    /// The CA's certificate (PEM): what `SSL_CERT_FILE` points the gateway at.
    pub ca_pem: String,
    /// The server's certificate and private key (PKCS#8), DER and PEM.
    pub cert_der: Vec<u8>,
    pub key_der: Vec<u8>,
    pub cert_pem: String,
    pub key_pem: String,
}

/// A new CA named `ca_name` and a server certificate for `names` (IP addresses or DNS names).
pub fn new_pki(ca_name: &str, names: &[&str]) -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, ca_name);
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
    Pki {
        ca_pem: ca.pem(),
        cert_der: leaf.der().to_vec(),
        key_der: key.serialize_der(),
        cert_pem: leaf.pem(),
        key_pem: key.serialize_pem(),
    }
}
