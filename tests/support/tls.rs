//! TLS material for tests: a throwaway CA and a server certificate signed by it (rcgen), and a
//! TLS relay that plays the man in the middle.

use std::fs;
use std::io::BufReader;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// A man in the middle: ends TLS from its client with its own certificate (`files`), opens its
/// own TLS to PostgreSQL on `upstream` (verified against `ca`: it is a good relay) and copies
/// bytes both ways. Its port.
pub async fn tls_relay(upstream: u16, ca: &Path, files: &TlsFiles) -> u16 {
    let pem = |p: &Path| BufReader::new(std::fs::File::open(p).expect("open PEM"));
    let chain: Vec<_> = rustls_pemfile::certs(&mut pem(&files.cert))
        .collect::<Result<_, _>>()
        .expect("relay certificate");
    let key = rustls_pemfile::private_key(&mut pem(&files.key))
        .expect("relay key")
        .expect("a key");
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut pem(ca)) {
        roots.add(c.expect("CA certificate")).expect("add CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("relay server config");
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("relay listens");
    let port = listener.local_addr().expect("relay address").port();
    tokio::spawn(async move {
        while let Ok((mut down, _)) = listener.accept().await {
            let (acceptor, connector) = (acceptor.clone(), connector.clone());
            tokio::spawn(async move {
                // SSLRequest down, 'S'; the same request up, its 'S'; then TLS on both sides.
                let mut request = [0u8; 8];
                down.read_exact(&mut request).await?;
                down.write_all(b"S").await?;
                let mut down = acceptor.accept(down).await?;
                let mut up = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await?;
                up.write_all(&request).await?;
                up.read_exact(&mut [0u8; 1]).await?;
                let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
                let mut up = connector.connect(name, up).await?;
                tokio::io::copy_bidirectional(&mut down, &mut up).await?;
                Ok::<_, std::io::Error>(())
            });
        }
    });
    port
}
