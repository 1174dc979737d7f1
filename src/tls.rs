//! rustls configuration for both sides: the client-facing acceptor (certificate and key from
//! files) and the upstream connector (`prefer`/`require` without certificate checks, like libpq's
//! sslmode of the same names; `verify-full` against a CA file and the host name).

use crate::config::{ClientTlsConfig, ClientTlsMode, UpstreamTlsConfig, UpstreamTlsMode};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::io::BufReader;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: no {what} found in PEM file")]
    Empty { path: String, what: &'static str },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn open(path: &str) -> Result<BufReader<std::fs::File>, TlsSetupError> {
    std::fs::File::open(path)
        .map(BufReader::new)
        .map_err(|source| TlsSetupError::Read {
            path: path.into(),
            source,
        })
}

fn certs(path: &str) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut open(path)?)
        .collect::<Result<_, _>>()
        .map_err(|source| TlsSetupError::Read {
            path: path.into(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsSetupError::Empty {
            path: path.into(),
            what: "certificate",
        });
    }
    Ok(certs)
}

fn key(path: &str) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    rustls_pemfile::private_key(&mut open(path)?)
        .map_err(|source| TlsSetupError::Read {
            path: path.into(),
            source,
        })?
        .ok_or(TlsSetupError::Empty {
            path: path.into(),
            what: "private key",
        })
}

/// What the client-facing side serves: the acceptor, and the certificate's channel-binding data.
pub struct ClientTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// RFC 5929 `tls-server-end-point` data for SCRAM-SHA-256-PLUS (`server_end_point`), or
    /// `None` when the certificate's signature names no hash (Ed25519, RSA-PSS): then only
    /// SCRAM-SHA-256 is offered, as PostgreSQL cannot bind to such a certificate either.
    pub end_point: Option<Vec<u8>>,
}

/// The acceptor for clients, or `None` when client TLS is disabled.
pub fn acceptor(c: &ClientTlsConfig) -> Result<Option<ClientTls>, TlsSetupError> {
    if c.mode == ClientTlsMode::Disable {
        return Ok(None);
    }
    // Validation guarantees both files are set when TLS is on.
    let (Some(cert), Some(k)) = (&c.cert_file, &c.key_file) else {
        return Ok(None);
    };
    let chain = certs(cert)?;
    let end_point = server_end_point(&chain[0]);
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key(k)?)?;
    Ok(Some(ClientTls {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        end_point,
    }))
}

/// The `tls-server-end-point` channel binding of a DER certificate (RFC 5929 §4.1): its hash
/// under the hash of its own signature algorithm, SHA-256 in place of MD5 and SHA-1 — what libpq
/// computes from the certificate it was shown. `None` for a signature without a hash of its own
/// (Ed25519, RSA-PSS) or a certificate that does not parse.
pub fn server_end_point(cert: &[u8]) -> Option<Vec<u8>> {
    use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm AlgorithmIdentifier, ... }
    let (0x30, certificate, _) = der(cert)? else {
        return None;
    };
    let (0x30, _tbs, rest) = der(certificate)? else {
        return None;
    };
    let (0x30, algorithm, _) = der(rest)? else {
        return None;
    };
    let (0x06, oid, _) = der(algorithm)? else {
        return None;
    };
    // 1.2.840.113549.1.1.x (PKCS #1) and 1.2.840.10045.4.x (ECDSA).
    const PKCS1: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04];
    let bits = match (oid.strip_prefix(PKCS1), oid.strip_prefix(ECDSA)) {
        // md5WithRSA, sha1WithRSA, sha256WithRSA; ecdsa-with-SHA1, ecdsa-with-SHA256
        (Some([4 | 5 | 11]), _) | (_, Some([1] | [3, 2])) => 256,
        (Some([14]), _) | (_, Some([3, 1])) => 224,
        (Some([12]), _) | (_, Some([3, 3])) => 384,
        (Some([13]), _) | (_, Some([3, 4])) => 512,
        _ => return None,
    };
    Some(match bits {
        224 => Sha224::digest(cert).to_vec(),
        256 => Sha256::digest(cert).to_vec(),
        384 => Sha384::digest(cert).to_vec(),
        _ => Sha512::digest(cert).to_vec(),
    })
}

/// The DER element at the start of `b`: its tag, its contents and what follows it.
fn der(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&first, b) = b.split_first()?;
    let (len, b) = if first < 0x80 {
        (usize::from(first), b)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        let len = b[..n].iter().fold(0usize, |a, &x| a << 8 | usize::from(x));
        (len, &b[n..])
    };
    (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
}

/// The connector for the upstream, or `None` when upstream TLS is disabled.
pub fn connector(
    c: &UpstreamTlsConfig,
) -> Result<Option<tokio_rustls::TlsConnector>, TlsSetupError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let config = match c.mode {
        UpstreamTlsMode::Disable => return Ok(None),
        UpstreamTlsMode::Prefer | UpstreamTlsMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoCertificateCheck(provider())))
            .with_no_client_auth(),
        UpstreamTlsMode::VerifyFull => {
            let mut roots = rustls::RootCertStore::empty();
            let path = c.ca_file.as_deref().unwrap_or_default();
            for cert in certs(path)? {
                roots.add(cert)?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    Ok(Some(tokio_rustls::TlsConnector::from(Arc::new(config))))
}

/// The name to present and (in `verify-full`) verify.
pub fn server_name(
    c: &UpstreamTlsConfig,
    host: &str,
) -> Result<ServerName<'static>, TlsSetupError> {
    let name = c.server_name.as_deref().unwrap_or(host).to_string();
    ServerName::try_from(name)
        .map_err(|e| TlsSetupError::Rustls(rustls::Error::General(e.to_string())))
}

/// `sslmode=require` semantics: encrypt, but accept any certificate. Handshake signatures are
/// still verified, so the session keys belong to whoever holds the presented certificate.
#[derive(Debug)]
struct NoCertificateCheck(Arc<CryptoProvider>);

impl ServerCertVerifier for NoCertificateCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
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
            &self.0.signature_verification_algorithms,
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
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::server_end_point;
    use sha2::{Digest, Sha256, Sha384, Sha512};

    fn cert(alg: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    /// A certificate's outline: an empty to-be-signed part and the signature algorithm `oid`.
    fn outline(oid: &[u8]) -> Vec<u8> {
        let alg = [&[0x06, oid.len() as u8][..], oid].concat();
        let body = [&[0x30, 0x00, 0x30, alg.len() as u8][..], &alg].concat();
        [&[0x30, body.len() as u8][..], &body].concat()
    }

    #[test]
    fn end_point_hashes_the_certificate_with_its_signatures_hash() {
        let p256 = cert(&rcgen::PKCS_ECDSA_P256_SHA256);
        assert_eq!(
            server_end_point(&p256),
            Some(Sha256::digest(&p256).to_vec())
        );
        let p384 = cert(&rcgen::PKCS_ECDSA_P384_SHA384);
        assert_eq!(
            server_end_point(&p384),
            Some(Sha384::digest(&p384).to_vec())
        );
        // Ed25519 names no hash: nothing to bind to (PostgreSQL cannot either).
        assert_eq!(server_end_point(&cert(&rcgen::PKCS_ED25519)), None);
        // RSA: SHA-1 is replaced by SHA-256 (RFC 5929), SHA-512 kept.
        let pkcs1 = |last: u8| outline(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, last]);
        let sha1 = pkcs1(5);
        assert_eq!(
            server_end_point(&sha1),
            Some(Sha256::digest(&sha1).to_vec())
        );
        let sha512 = pkcs1(13);
        assert_eq!(
            server_end_point(&sha512),
            Some(Sha512::digest(&sha512).to_vec())
        );
        // RSA-PSS keeps its hash in parameters: not bound.
        assert_eq!(server_end_point(&pkcs1(10)), None);
        for broken in [
            &b""[..],
            &[0x30],
            &[0x30, 0x05, 0x30],
            &sha1[..sha1.len() - 1],
        ] {
            assert_eq!(server_end_point(broken), None);
        }
    }
}
