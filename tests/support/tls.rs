//! TLS material for tests: a throwaway CA and a server certificate signed by it (rcgen).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// PEM files of a throwaway CA and a server certificate for `localhost` and `127.0.0.1`.
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Writes `ca.pem`, `server.crt`, `server.key` (mode 0600) into `dir`.
pub fn make_tls_files(dir: &Path) -> TlsFiles {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "pgcache test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().expect("generate CA key");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("self-sign CA");

    let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .expect("server certificate params");
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let key = KeyPair::generate().expect("generate server key");
    let cert = params
        .signed_by(&key, &ca)
        .expect("sign server certificate");

    let files = TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
    };
    fs::write(&files.ca, ca.pem()).expect("write ca.pem");
    fs::write(&files.cert, cert.pem()).expect("write server.crt");
    fs::write(&files.key, key.serialize_pem()).expect("write server.key");
    fs::set_permissions(&files.key, fs::Permissions::from_mode(0o600)).expect("chmod server.key");
    files
}
